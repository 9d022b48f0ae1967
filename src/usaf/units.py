"""Units shared by every layer: memory sizes (``12GB`` <-> bytes) and dtype names (``bf16`` <-> torch)."""

from __future__ import annotations

import math
import re

import torch

# The one table of dtype names usaf accepts and writes (flags, config files, cache keys, metadata).
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bf16"`` (other dtypes: their torch name without the prefix)."""
    return DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_MEM_RE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_memory(text: str | int | float, flag: str = "memory") -> int:
    """``"12GB"`` -> 12 * 10**9, ``"12GiB"`` -> 12 * 2**30, ``"512MB"``, ``"1.5TB"``, a plain number = bytes.

    Raises:
        ValueError: one line naming ``flag`` and the accepted forms.
    """
    if isinstance(text, bool):
        raise ValueError(f"{flag} {text!r} is not a memory size (use e.g. 12GB, 12GiB, 512MB)")
    if isinstance(text, (int, float)):
        if text <= 0 or not math.isfinite(text):
            raise ValueError(f"{flag} must be positive, got {text!r}")
        return int(text)
    m = _MEM_RE.match(str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(
            f"{flag} {text!r} is not a memory size (use e.g. 12GB, 12GiB, 512MB; GB = 10^9 bytes, GiB = 2^30)"
        )
    value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"{flag} must be positive, got {text!r}")
    return value


def fmt_bytes(n: float) -> str:
    """Decimal units, like the inputs: 1.23 GB, 456.7 MB."""
    n = float(n)
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"




def parse_bytes(text: str | int | None, flag: str = "memory") -> int | None:
    """Like :func:`parse_memory`, but empty (``None``, ``""``, ``0``) means "not given" -> None."""
    if text in (None, "", 0):
        return None
    return parse_memory(text, flag)


def cpu_bf16_is_native() -> bool:
    """Whether this CPU runs bf16 matmuls natively (oneDNN's bf16 path: AVX512 or AMX). Without it (AVX2-only
    CPUs) torch's bf16 matmul takes a slow fallback, measured 40x slower than fp32 (docs/benchmarks.md)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def auto_dtype_name(on_cpu: bool) -> str:
    """What ``--dtype auto`` means by name: bf16 on an accelerator and on CPUs with native bf16, else fp32."""
    return "bf16" if not on_cpu or cpu_bf16_is_native() else "fp32"
