"""Loading a checkpoint and its tokenizer, with one-line errors for what users get wrong."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer

from ..engine.families import UnsupportedModelError, auto_model_class, family_for, supported
from ..integrity import verify_export
from ..io import check_safetensors
from ..units import DTYPES, cpu_bf16_is_native
from .gguf.model import gguf_config, gguf_tokenizer, is_gguf, load_gguf, open_gguf
from .gguf.reader import GGUFError


class LoadError(ValueError):
    """The model or tokenizer cannot be loaded (shown as one line, exit code 2)."""


__all__ = ["GGUFError", "LoadError", "check_model", "load_config", "load_model", "load_tokenizer"]


def resolve_device(spec: str = "auto") -> torch.device:
    if spec in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise LoadError(f"unknown device {spec!r} (use auto, cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LoadError(f"device {spec!r} requested but CUDA is not available")
    return dev


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on GPUs that have it and on CPUs with native bf16 matmuls (where they are fastest);
    fp32 elsewhere."""
    if spec in DTYPES:
        return DTYPES[spec]
    if spec not in ("", "auto"):
        raise LoadError(f"unknown dtype {spec!r} (use auto, bf16, fp16 or fp32)")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "mps":
        return torch.float32
    return torch.bfloat16 if cpu_bf16_is_native() else torch.float32


def _check_model_dir(model: str) -> None:
    p = Path(model)
    if p.exists():
        if not (p / "config.json").exists():
            raise LoadError(f"{model} has no config.json: not a Hugging Face checkpoint directory")
        return
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise LoadError(f"model {model!r} not found (give a checkpoint directory or a hub id)")


def load_tokenizer(model: str, trust_remote_code: bool = False):
    if is_gguf(model):
        open_gguf(model)
        return gguf_tokenizer(model)
    _check_model_dir(model)
    p = Path(model)
    if p.exists() and not any((p / f).exists() for f in ("tokenizer.json", "tokenizer.model", "vocab.json",
                                                         "tokenizer_config.json")):
        raise LoadError(f"{model} has no tokenizer (tokenizer.json / tokenizer_config.json); usaf needs one")
    try:
        tok = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise LoadError(f"cannot load the tokenizer of {model}: {str(e).splitlines()[0]}") from None
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return tok


def load_config(model: str, trust_remote_code: bool = False):
    if is_gguf(model):
        return gguf_config(open_gguf(model))
    _check_model_dir(model)
    try:
        return AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    except Exception as e:
        text = str(e)
        if not trust_remote_code and ("custom code" in text or "trust_remote_code" in text):
            raise LoadError(f"{model} needs to run its own Python code (auto_map in config.json); usaf does "
                            f"not run it unless you pass --trust-remote-code") from None
        raise LoadError(f"cannot read the config of {model}: {text.splitlines()[0]}") from None


def check_model(model: str, trust_remote_code: bool = False):
    """Everything about ``--model`` that can be checked without reading weights: the directory, its
    config and family (dense / unknown models are refused), and, for a local directory, its safetensors
    files (present, inside the directory, complete). Returns the transformers config."""
    config = load_config(model, trust_remote_code)
    if is_gguf(model):
        return config  # the file and its family were checked reading it
    try:
        family_for(config)
    except UnsupportedModelError:
        text = config.get_text_config().to_dict()
        experts = [v for k, v in text.items() if "expert" in k and isinstance(v, int) and not isinstance(v, bool)]
        if max(experts, default=0) <= 1:
            raise UnsupportedModelError(
                f"{model} is a dense model (model_type {getattr(config, 'model_type', None)!r}, no experts); "
                f"usaf fine-tunes Mixture-of-Experts models (supported: {supported()})") from None
        raise
    p = Path(model)
    if p.exists():
        check_shards(p)
    return config


def load_model(model: str, dtype=torch.bfloat16, device="cpu", trust_remote_code: bool = False):
    """Load a causal LM from a local directory (or hub id); refuses unsupported families before loading.

    A vision-language model loads whole with its image-text-to-text class (``auto_model_class``): usaf runs
    it on text and trains its text decoder; its vision tower is loaded and stays frozen.

    Only safetensors weights are read (``use_safetensors=True``: never a pickle); a checkpoint that lacks
    some of the model's weights is refused rather than completed with random values.
    """
    if is_gguf(model):  # experts stay in their GGUF quantization; zero deltas compute the base
        return load_gguf(model, dtype=dtype, device=device).model.eval()
    config = check_model(model, trust_remote_code)  # one-line errors for dense / unknown models, bad shards
    try:
        m, info = auto_model_class(config).from_pretrained(model, dtype=dtype, trust_remote_code=trust_remote_code,
                                                           use_safetensors=True, output_loading_info=True)
    except (MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as e:
        raise LoadError(f"cannot load {model}: {str(e).splitlines()[0]}") from None
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise LoadError(f"{model} lacks {len(missing)} weight(s) of the model, e.g. {missing[0]} "
                        f"(an incomplete or mismatched checkpoint)")
    return m.to(device).eval()


def check_shards(p: Path) -> None:
    """The safetensors weights must exist and be complete; index entries must name files inside the
    directory (no absolute paths, no ``..``), so a crafted index cannot make usaf read elsewhere. A checkpoint
    written by ``usaf export`` / ``usaf apply`` must match the file checksums it recorded."""
    index = p / "model.safetensors.index.json"
    if not index.exists():
        single = p / "model.safetensors"
        if not single.exists():
            pickles = [f.name for f in p.glob("*.bin")] + [f.name for f in p.glob("*.pt")]
            hint = f" (found {pickles[0]}: pickle files are never loaded)" if pickles else ""
            raise LoadError(f"{p} has no model.safetensors (usaf reads safetensors checkpoints only){hint}")
        _check_file(single, check_safetensors)
        verify_export(p)
        return
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        files = set(weight_map.values())
        if not all(isinstance(f, str) for f in files):
            raise ValueError("shard names must be strings")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise LoadError(f"{index} is not a valid safetensors index ({e})") from None
    for f in sorted(files):
        parts = Path(f).parts
        if not f or Path(f).is_absolute() or ".." in parts or "\\" in f:
            raise LoadError(f"{index} names a shard outside the model directory: {f!r}")
        if not f.endswith(".safetensors"):
            raise LoadError(f"{index} names a shard that is not a .safetensors file: {f!r}")
        target = p / f
        if not target.is_file():
            raise LoadError(f"{index} names a missing shard: {f}")
        _check_file(target, check_safetensors)
    verify_export(p)


def _check_file(path: Path, check) -> None:
    try:
        check(path)
    except ValueError as e:
        raise LoadError(str(e)) from None
