"""A trained model in memory: a base checkpoint with (optionally) a usaf delta applied, for ``usaf eval``,
``usaf generate`` and the demo. The delta's metadata says how the base was prepared when it trained."""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open

from ..config import UsafConfig
from ..load.hf import load_model, load_tokenizer, resolve_device, resolve_dtype
from ..load.stream import load_prepared


def delta_config(delta: str) -> UsafConfig:
    """The engine settings a delta file was trained with (from its metadata); refuses a non-delta file."""
    if not Path(delta).exists():
        raise FileNotFoundError(f"delta file not found: {delta}")
    try:
        with safe_open(delta, "pt") as f:
            meta = f.metadata() or {}
    except Exception:  # noqa: BLE001 - anything safetensors cannot open is not a delta file
        raise ValueError(f"{delta} is not a safetensors file") from None
    if meta.get("format") != "usaf-delta":
        raise ValueError(f"{delta} is not a usaf delta file")
    return UsafConfig(quant=meta.get("quant", "none"), group_size=int(meta.get("group_size", 64)),
                      train_layers=meta.get("train_layers", "all"), density=float(meta.get("density", 0.005)),
                      train_router=meta.get("train_router", "True") == "True")


def load_trained(model: str, delta: str | None, device: str = "auto", dtype: str = "auto",
                 trust_remote_code: bool = False):
    """``(model, tokenizer, device)``: ``model`` with ``delta`` applied (prepared exactly as in training), or
    the plain base when ``delta`` is None."""
    dev = resolve_device(device)
    tok = load_tokenizer(model, trust_remote_code)
    if not delta:
        m = load_model(model, dtype=resolve_dtype(dtype, dev), device=dev, trust_remote_code=trust_remote_code)
        return m, tok, dev
    handle = load_prepared(model, delta_config(delta), resolve_dtype(dtype, dev), dev, trust_remote_code)
    handle.load_delta(delta)
    return handle.model, tok, dev
