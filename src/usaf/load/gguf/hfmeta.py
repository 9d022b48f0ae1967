"""What transformers builds from a GGUF file's metadata (the config values and the tokenizer with its chat
template), built once in a child process and kept in ``$USAF_TOKENIZER_CACHE``, else ``$USAF_CACHE/tokenizers``
(default ``~/.cache/usaf/tokenizers``): one directory per file, holding the saved tokenizer and
``gguf_config.json``.

transformers reads a GGUF's metadata with gguf-py's reader and converts the vocabulary in Python: for
SmolLM2's 49k-token vocabulary that peaks about 170 MB above the process and keeps about 80 MB (16 MB for the
config values, 65 MB for the tokenizer). A saved ``tokenizer.json`` loads for what a checkpoint's tokenizer
costs (about 45 MB), so the conversion runs in a child, and every load (in this run and the next) reads the
cached directory. The key hashes the file's metadata bytes (vocabulary, merges, template, hyper-parameters)
and the transformers version. Where the cache cannot be written, or the child cannot run, both are built in
this process. ``USAF_GGUF_META_CHILD=0`` builds the cache entry in this process instead of a child (no second
interpreter to start: the test suite's setting; the process keeps the conversion's memory).

    python -m usaf.load.gguf.hfmeta FILE.gguf DIR     # what the child runs
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import transformers
from tokenizers import Regex, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from ...io import cache_dir
from .pretok import pre_tokenizer_json
from .reader import GGUFError, GGUFFile

log = logging.getLogger("usaf")
CACHE_VERSION = "usaf-gguf-hfmeta-2"  # 2: the pre-tokenizer the file names
_CONFIG, _TOKENIZER_ERROR = "gguf_config.json", "tokenizer_error.txt"


def cache_root() -> Path:
    return cache_dir("tokenizers", "USAF_TOKENIZER_CACHE")


def cache_key(f: GGUFFile) -> str:
    h = hashlib.sha256(f"{CACHE_VERSION}|{transformers.__version__}\n".encode())
    h.update(f.pread(0, f.kv_end))
    return h.hexdigest()[:32]


# llama.cpp's generic hyper-parameter keys (``{arch}.<key>``) -> config keys: the architectures transformers'
# GGUF reader has no table for (usaf's loader adds what is specific to each family: ``usaf.load.gguf.model``)
_GENERIC = {"block_count": "num_hidden_layers", "context_length": "max_position_embeddings",
            "embedding_length": "hidden_size", "feed_forward_length": "intermediate_size",
            "attention.head_count": "num_attention_heads", "attention.head_count_kv": "num_key_value_heads",
            "rope.freq_base": "rope_theta", "attention.layer_norm_rms_epsilon": "rms_norm_eps",
            "expert_count": "num_experts", "expert_used_count": "num_experts_per_tok", "vocab_size": "vocab_size",
            "attention.scale": "attention_multiplier", "embedding_scale": "embedding_multiplier",
            "residual_scale": "residual_multiplier", "logit_scale": "logits_scaling",
            "attention.sliding_window": "sliding_window"}
# llama.cpp architecture -> model type, read with usaf's table above (deepseek2: V2 or V3 by its gating, decided
# with the rest of what is specific to it by ``usaf.load.gguf.model``); gpt-oss: transformers' reader of its
# YaRN keys fails on files llama.cpp's converter writes
OWN_CONFIG = {"olmoe": "olmoe", "granitemoe": "granitemoe", "deepseek2": "deepseek_v3", "gpt-oss": "gpt_oss",
              "glm4moe": "glm4_moe"}


def _own_config(f: GGUFFile) -> dict:
    a = f.arch
    d = {hf: f.get(f"{a}.{key}") for key, hf in _GENERIC.items() if f.get(f"{a}.{key}") is not None}
    if "vocab_size" not in d:
        tokens = f.get("tokenizer.ggml.tokens")
        if tokens is not None:
            d["vocab_size"] = len(tokens)
    for key, hf in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                    ("padding_token_id", "pad_token_id")):
        if f.get(f"tokenizer.ggml.{key}") is not None:
            d[hf] = f.get(f"tokenizer.ggml.{key}")
    d["model_type"] = OWN_CONFIG[a]
    return d


def build_config(path: Path, f: GGUFFile | None = None) -> dict:
    """The config values for the file (``f``: the file already opened): transformers' (``load_gguf_checkpoint``,
    metadata only), or usaf's table for the architectures transformers has none for (:data:`OWN_CONFIG`)."""
    try:
        f = f or GGUFFile(path)
        if f.arch in OWN_CONFIG:
            return _own_config(f)
        return dict(load_gguf_checkpoint(str(path))["config"])
    except GGUFError:
        raise
    except Exception as e:  # noqa: BLE001 - transformers' reader: any failure is a bad file for us
        raise GGUFError(f"cannot read the metadata of {path}: {str(e).splitlines()[0]}") from None


def _pre_tokenizer(spec: dict):
    """A ``tokenizers`` pre-tokenizer from its ``tokenizer.json`` form (the kinds :mod:`.pretok` writes)."""
    kind = spec["type"]
    if kind == "Sequence":
        return pre_tokenizers.Sequence([_pre_tokenizer(s) for s in spec["pretokenizers"]])
    if kind == "Digits":
        return pre_tokenizers.Digits(individual_digits=spec["individual_digits"])
    if kind == "ByteLevel":
        return pre_tokenizers.ByteLevel(add_prefix_space=spec["add_prefix_space"], use_regex=spec["use_regex"])
    return pre_tokenizers.Split(Regex(spec["pattern"]["Regex"]), behavior=spec["behavior"].lower(),
                                invert=spec["invert"])


def _set_pre_tokenizer(tok, name: str | None) -> None:
    """Give ``tok`` the pre-tokenizer the file names (``tokenizer.ggml.pre``), where usaf knows the name:
    transformers chooses one by architecture alone."""
    spec = pre_tokenizer_json(name) if name else None
    if spec is None:
        if name:
            log.info("GGUF pre-tokenizer %r is not one usaf knows: transformers' choice for the architecture is "
                     "kept (its tokenization may differ from llama.cpp's on this file)", name)
        return
    tok.backend_tokenizer.pre_tokenizer = _pre_tokenizer(spec)


def _byte_level(f: GGUFFile) -> bool:
    """A byte-level BPE vocabulary (``gpt2``), whose pre-tokenizer the file names."""
    return (f.get("tokenizer.ggml.model") or "") == "gpt2"


def _generic_class(saved: Path) -> None:
    """Load the saved tokenizer as tokenizer.json says, i.e. as it was built: a model's own class
    (``Qwen2Tokenizer``, ...) rebuilds its pipeline with its own pre-tokenizer on load, so the saved config names
    the generic fast class."""
    cfg_path = saved / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")


def build_tokenizer(path: Path, f: GGUFFile | None = None):
    """The tokenizer built from the file's metadata by transformers (pad token = eos where it has none), with the
    pre-tokenizer the file names (:func:`_set_pre_tokenizer`). For the architectures transformers' GGUF reader
    has no config for, the tokenizer is built from the vocabulary metadata alone (``PreTrainedTokenizerFast``)."""
    try:
        f = f or GGUFFile(path)
        pre = f.get("tokenizer.ggml.pre")
        if f.arch in OWN_CONFIG:
            tok = PreTrainedTokenizerFast.from_pretrained(str(path.parent), gguf_file=path.name)
        else:
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except GGUFError:
        raise
    except Exception as e:  # noqa: BLE001
        raise GGUFError(f"cannot build the tokenizer of {path}: {str(e).splitlines()[0]}") from None
    if _byte_level(f):
        _set_pre_tokenizer(tok, pre if isinstance(pre, str) else None)
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return tok


def _build_into(path: Path, out: Path) -> None:
    """Both, saved into ``out`` atomically (a sibling temporary directory renamed into place). A tokenizer that
    cannot be built leaves its one-line reason instead (the config alone serves inspect and plan)."""
    f = GGUFFile(path)  # the header parsed once for both
    config = build_config(path, f)
    tmp = out.with_name(f".{out.name}.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        build_tokenizer(path, f).save_pretrained(tmp)
        if _byte_level(f):
            _generic_class(tmp)
    except GGUFError as e:
        (tmp / _TOKENIZER_ERROR).write_text(str(e))
    (tmp / _CONFIG).write_text(json.dumps(config))
    try:
        tmp.rename(out)
    except OSError:  # another process saved it first
        shutil.rmtree(tmp, ignore_errors=True)


def cached(f: GGUFFile) -> Path | None:
    """The file's cache directory, built by a child on a miss; None where the cache cannot be written."""
    out = cache_root() / cache_key(f)
    if (out / _CONFIG).is_file():
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        log.info("the cache %s cannot be written: the GGUF's tokenizer and config are built in this process",
                 out.parent)
        return None
    if os.environ.get("USAF_GGUF_META_CHILD", "1") == "0":
        _build_into(f.path, out)
        return out
    env = dict(os.environ)  # the child imports this very package, wherever it was imported from
    root = str(Path(__file__).resolve().parents[3])
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    p = subprocess.run([sys.executable, "-m", "usaf.load.gguf.hfmeta", str(f.path), str(out)],
                       capture_output=True, text=True, env=env)
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    if p.returncode == 2 and lines and lines[-1].startswith("GGUFError: "):  # the file's fault: one line
        raise GGUFError(lines[-1][len("GGUFError: "):])
    if p.returncode != 0:  # the child's own trouble (it could not start, or ran out of memory)
        log.warning("building the GGUF's tokenizer and config in a child failed (%s); building them in this "
                    "process", lines[-1] if lines else f"exit code {p.returncode}")
        return None
    return out


def gguf_config_values(f: GGUFFile) -> dict:
    d = cached(f)
    return json.loads((d / _CONFIG).read_text()) if d else build_config(f.path)


def gguf_tokenizer(f: GGUFFile):
    d = cached(f)
    if d is None:
        return build_tokenizer(f.path)
    if (d / _TOKENIZER_ERROR).is_file():
        raise GGUFError((d / _TOKENIZER_ERROR).read_text())
    return AutoTokenizer.from_pretrained(str(d))


def main() -> None:
    try:
        _build_into(Path(sys.argv[1]), Path(sys.argv[2]))
    except GGUFError as e:
        print(f"GGUFError: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
