"""A trained model in memory: a base checkpoint with (optionally) a usaf delta applied, for ``usaf eval``,
``usaf generate`` and the demo. The delta's metadata says how the base was prepared when it trained, and how
the run evaluated (``eval_settings``: seq-len, batch size, dtype, seed, held-out or eval file), so that
``usaf eval --delta`` computes the run's own eval by default."""

from __future__ import annotations

import logging
from pathlib import Path

from safetensors import safe_open

from ..config import UsafConfig
from ..data.store import load_stored
from ..io import recorded_eval_settings
from ..load.hf import load_model, load_tokenizer, resolve_device, resolve_dtype
from ..load.stream import load_prepared
from .evaluate import evaluate_examples
from .inputs import held_out_split, pad_id

log = logging.getLogger("usaf")
DEFAULT_SEQ_LEN, DEFAULT_BATCH_SIZE = 512, 4  # usaf eval without a delta that records its run's settings


def delta_metadata(delta: str) -> dict[str, str]:
    """The metadata of a delta file (cheap: no tensors); refuses a non-delta file."""
    if not Path(delta).exists():
        raise FileNotFoundError(f"delta file not found: {delta}")
    try:
        with safe_open(delta, "pt") as f:
            meta = f.metadata() or {}
    except Exception:  # noqa: BLE001 - anything safetensors cannot open is not a delta file
        raise ValueError(f"{delta} is not a safetensors file") from None
    if meta.get("format") != "usaf-delta":
        raise ValueError(f"{delta} is not a usaf delta file")
    return meta


def delta_config(delta: str) -> UsafConfig:
    """The engine settings a delta file was trained with (from its metadata); refuses a non-delta file."""
    meta = delta_metadata(delta)
    return UsafConfig.from_delta_meta(meta)


def eval_settings(delta: str | None) -> dict:
    """How the run that wrote ``delta`` evaluated (``{}`` for a delta without them, or no delta)."""
    return recorded_eval_settings(delta_metadata(delta)) if delta else {}


def load_trained(model: str, delta: str | None, device: str = "auto", dtype: str | None = "auto",
                 trust_remote_code: bool = False):
    """``(model, tokenizer, device)``: ``model`` with ``delta`` applied (prepared exactly as in training; its
    checksums and base fingerprint checked), or the plain base when ``delta`` is None. ``dtype`` None: the
    dtype the delta trained in (``auto`` without one)."""
    dev = resolve_device(device)
    dtype = dtype or eval_settings(delta).get("dtype") or "auto"
    tok = load_tokenizer(model, trust_remote_code)
    if not delta:
        m = load_model(model, dtype=resolve_dtype(dtype, dev), device=dev, trust_remote_code=trust_remote_code)
        return m, tok, dev
    cfg = delta_config(delta)
    handle = load_prepared(model, cfg, resolve_dtype(dtype, dev), dev, trust_remote_code)
    handle.load_delta(delta)
    return handle.model, tok, dev


def evaluate_data(model: str, data: str, delta: str | None = None, seq_len: int | None = None,
                  batch_size: int | None = None, dtype: str | None = None, held_out: bool = False,
                  seed: int | None = None, device: str = "auto", trust_remote_code: bool = False) -> dict:
    """``usaf eval``: perplexity of ``model`` (+ ``delta``) on ``data``, computed as the run computed its own
    eval (``usaf.train.evaluate.evaluate_examples``). Settings left None come from the delta's
    ``eval_settings`` (else seq-len 512, batch size 4, dtype auto, seed 0). ``held_out``: the held-out split
    ``usaf train`` takes from ``data`` when it has no --eval-data. Returns ``{"ppl", "loss", "tokens"}``."""
    run = eval_settings(delta)
    seq_len = seq_len or run.get("seq_len") or DEFAULT_SEQ_LEN
    batch_size = batch_size or run.get("batch_size") or DEFAULT_BATCH_SIZE
    seed = run.get("seed", 0) if seed is None else seed
    tok = load_tokenizer(model, trust_remote_code)
    examples = load_stored(data, tok, seq_len).examples  # the run's token store when it has one
    if held_out:
        examples = held_out_split(examples, seed)[1]
    elif run.get("eval") == "held-out":
        log.info("the run evaluated a held-out split of its --data: give that file with --held-out to compute "
                 "the same eval")
    if run.get("max_eval_rows"):  # the run's --max-eval-batches cap
        examples = examples[: run["max_eval_rows"]]
    m, tok, dev = load_trained(model, delta, device, dtype, trust_remote_code)
    return evaluate_examples(m, examples, batch_size, pad_id(tok), dev)
