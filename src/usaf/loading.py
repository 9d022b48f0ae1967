"""Loading a checkpoint and its tokenizer, with one-line errors for what users get wrong."""

from __future__ import annotations

import json
from pathlib import Path

import torch


class LoadError(ValueError):
    """The model or tokenizer cannot be loaded (shown as one line, exit code 2)."""


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
    """``auto``: bf16 on CPU (its matmuls are fastest there) and on GPUs that have it, else fp32."""
    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if spec in table:
        return table[spec]
    if spec not in ("", "auto"):
        raise LoadError(f"unknown dtype {spec!r} (use auto, bf16, fp16 or fp32)")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "mps":
        return torch.float32
    return torch.bfloat16


def _check_model_dir(model: str) -> None:
    p = Path(model)
    if p.exists():
        if not (p / "config.json").exists():
            raise LoadError(f"{model} has no config.json: not a Hugging Face checkpoint directory")
        return
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise LoadError(f"model {model!r} not found (give a checkpoint directory or a hub id)")


def load_tokenizer(model: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

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
    from transformers import AutoConfig

    _check_model_dir(model)
    try:
        return AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise LoadError(f"cannot read the config of {model}: {str(e).splitlines()[0]}") from None


def load_model(model: str, dtype=torch.bfloat16, device="cpu", trust_remote_code: bool = False):
    """Load a causal LM from a local directory (or hub id); refuses unsupported families before loading."""
    from transformers import AutoModelForCausalLM

    from .families import family_for

    family_for(load_config(model, trust_remote_code))  # one-line error for dense / unknown models
    p = Path(model)
    if p.exists():
        _check_shards(p)
    try:
        m = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise LoadError(f"cannot load {model}: {str(e).splitlines()[0]}") from None
    return m.to(device).eval()


def _check_shards(p: Path) -> None:
    """Index entries must name files inside the directory that exist (no path escapes)."""
    index = p / "model.safetensors.index.json"
    if not index.exists():
        if not (p / "model.safetensors").exists():
            raise LoadError(f"{p} has no model.safetensors (usaf reads safetensors checkpoints only)")
        return
    try:
        files = set(json.loads(index.read_text())["weight_map"].values())
    except (ValueError, KeyError) as e:
        raise LoadError(f"{index} is not a valid safetensors index ({e})") from None
    root = p.resolve()
    for f in sorted(files):
        target = (p / f).resolve()
        if root not in target.parents:
            raise LoadError(f"{index} names a shard outside the model directory: {f!r}")
        if not target.exists():
            raise LoadError(f"{index} names a missing shard: {f}")
