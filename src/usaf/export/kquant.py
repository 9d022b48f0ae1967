"""Quantizing to GGML types in numpy: ``gguf.quants.quantize`` where the gguf package can (F32, F16, BF16, Q8_0,
Q4_0, Q4_1, ...), and a plain round-to-nearest quantizer for the K-types it cannot (Q4_K, Q5_K, Q6_K).

The K-quantizer here is simpler than llama.cpp's (which searches scales to minimise a weighted error): per
sub-block, the scale (and, for Q4_K / Q5_K, the min) come from the sub-block's range, the super-block's fp16
``d`` / ``dmin`` from the largest of them, and the codes are rounded against the stored (rounded) scales. Its
output is a valid block of the type (``gguf.quants.dequantize`` reads it; ``tests/test_gguf_export.py``); its
error is a little larger than llama.cpp's.
"""

from __future__ import annotations

import numpy as np

from ..engine.ggml import BLOCKS, Q4_K, Q5_K, Q6_K, type_name


def _f16(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rounded fp32 values, their fp16 bytes (n, 2))."""
    h = x.astype(np.float16)
    return h.astype(np.float32), h.reshape(-1, 1).view(np.uint8)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b != 0, a / np.where(b != 0, b, 1), 0).astype(np.float32)


def _k4_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins (n, 8) -> Q4_K's 12 bytes (inverse of ``ggml._scale_min_k4``)."""
    out = np.empty((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)
    return out


def _quant_k45(x: np.ndarray, bits: int) -> np.ndarray:
    n = x.shape[0]
    qmax = (1 << bits) - 1
    sub = x.reshape(n, 8, 32)
    lo = np.minimum(sub.min(-1), 0)  # (n, 8): x = d*sc*q - dmin*m with m >= 0
    scale = (sub.max(-1) - lo) / qmax
    d, d16 = _f16(scale.max(-1) / 63)
    dmin, m16 = _f16(-lo.min(-1) / 63)
    sc = np.clip(np.rint(_safe_div(scale, d[:, None])), 0, 63).astype(np.uint8)
    mn = np.clip(np.rint(_safe_div(-lo, dmin[:, None])), 0, 63).astype(np.uint8)
    step = (d[:, None] * sc.astype(np.float32))[..., None]
    off = (dmin[:, None] * mn.astype(np.float32))[..., None]
    q = np.clip(np.rint(_safe_div(sub + off, np.broadcast_to(step, sub.shape))), 0, qmax).astype(np.uint8)
    low = (q & 15).reshape(n, 4, 2, 32)
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(n, 128)
    parts = [d16, m16, _k4_scales(sc, mn)]
    if bits == 5:
        hi = (q >> 4) & 1  # (n, 8, 32): bit k of byte j is sub-block k's element j
        qh = np.zeros((n, 32), dtype=np.uint8)
        for k in range(8):
            qh |= hi[:, k] << k
        parts.append(qh)
    return np.concatenate(parts + [qs], axis=1)


def _quant_q6k(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    sub = x.reshape(n, 16, 16)
    scale = np.abs(sub).max(-1) / 31  # (n, 16), codes -32..31 used as -31..31
    d, d16 = _f16(scale.max(-1) / 127)
    sc = np.clip(np.rint(_safe_div(scale, d[:, None])), -128, 127).astype(np.int8)
    step = (d[:, None] * sc.astype(np.float32))[..., None]
    q = (np.clip(np.rint(_safe_div(sub, np.broadcast_to(step, sub.shape))), -32, 31) + 32).astype(np.uint8)
    q = q.reshape(n, 256)
    low = (q & 15).reshape(n, 2, 2, 64)
    ql = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(n, 128)
    hi = (q >> 4).reshape(n, 2, 4, 32)
    qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(n, 64)
    return np.concatenate([ql, qh, sc.view(np.uint8), d16], axis=1)


def quantize_rows(x: np.ndarray, kind: int) -> np.ndarray:
    """fp32 ``(..., cols)`` -> GGML bytes ``(..., bytes per row)`` of type ``kind``."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    block, size = BLOCKS.get(kind, (None, None))
    if kind in (Q4_K, Q5_K, Q6_K):
        if x.shape[-1] % block:
            raise ValueError(f"rows of {x.shape[-1]} are not a multiple of {type_name(kind)}'s block of {block}")
        blocks = x.reshape(-1, block)
        q = _quant_q6k(blocks) if kind == Q6_K else _quant_k45(blocks, 4 if kind == Q4_K else 5)
        return q.reshape(*x.shape[:-1], x.shape[-1] // block * size)
    import gguf

    q = gguf.quants.quantize(x, gguf.GGMLQuantizationType(kind))
    return np.ascontiguousarray(q).view(np.uint8).reshape(*x.shape[:-1], -1)
