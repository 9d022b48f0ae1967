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
import torch

from ..engine.ggml import (
    BLOCKS,
    MXFP4,
    MXFP4_VALUES,
    Q4_0,
    Q4_1,
    Q4_K,
    Q5_0,
    Q5_1,
    Q5_K,
    Q6_K,
    Q8_0,
    dequantize,
    e8m0_half,
    type_name,
)


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
    return np.concatenate([d16, m16, _k4_scales(sc, mn), _codes_k45(q.reshape(n, 256), bits)], axis=1)


def _nibbles(q: np.ndarray, width: int) -> np.ndarray:
    """(n, k * 2 * width) codes < 16 -> (n, k * width) bytes: per chunk, low nibbles then high ones."""
    n = q.shape[0]
    c = q.reshape(n, -1, 2, width).astype(np.uint8)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, -1)


def _codes_k45(q: np.ndarray, bits: int) -> np.ndarray:
    """Q4_K / Q5_K codes (n, 256) -> the bytes after the scales: [32 bytes of fifth bits] + 128 of nibbles."""
    qs = _nibbles(q & 15, 32)
    if bits == 4:
        return qs
    hi = ((q >> 4) & 1).reshape(-1, 8, 32).astype(np.uint8)  # bit k of byte j is sub-block k's element j
    qh = np.zeros((q.shape[0], 32), dtype=np.uint8)
    for k in range(8):
        qh |= hi[:, k] << k
    return np.concatenate([qh, qs], axis=1)


def _codes_q6k(q: np.ndarray) -> np.ndarray:
    """Q6_K codes (n, 256), 0..63 -> ql (128 bytes) + qh (64 bytes)."""
    n = q.shape[0]
    hi = (q >> 4).reshape(n, 2, 4, 32).astype(np.uint8)
    qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(n, 64)
    return np.concatenate([_nibbles(q & 15, 64), qh], axis=1)


def _quant_q6k(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    sub = x.reshape(n, 16, 16)
    scale = np.abs(sub).max(-1) / 31  # (n, 16), codes -32..31 used as -31..31
    d, d16 = _f16(scale.max(-1) / 127)
    sc = np.clip(np.rint(_safe_div(scale, d[:, None])), -128, 127).astype(np.int8)
    step = (d[:, None] * sc.astype(np.float32))[..., None]
    q = (np.clip(np.rint(_safe_div(sub, np.broadcast_to(step, sub.shape))), -32, 31) + 32).astype(np.uint8)
    return np.concatenate([_codes_q6k(q.reshape(n, 256)), sc.view(np.uint8), d16], axis=1)


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


# code range of each quantized type, and where its codes sit in a block
CODE_RANGE = {Q8_0: (-128, 127), Q4_0: (0, 15), Q4_1: (0, 15), Q5_0: (0, 31), Q5_1: (0, 31), Q4_K: (0, 15),
              Q5_K: (0, 31), Q6_K: (0, 63)}


def with_codes(blocks: np.ndarray, q: np.ndarray, kind: int) -> np.ndarray:
    """Blocks ``(n, bytes)`` of type ``kind`` with their codes replaced by ``q`` ``(n, elements)`` (within
    ``CODE_RANGE``); the scales, mins and every other byte stay."""
    out = np.array(blocks, dtype=np.uint8, copy=True)
    n = out.shape[0]
    if kind == Q8_0:
        out[:, 2:] = q.astype(np.int8).view(np.uint8)
    elif kind in (Q4_0, Q4_1):
        at = 2 if kind == Q4_0 else 4
        out[:, at : at + 16] = _nibbles(q, 16)
    elif kind in (Q5_0, Q5_1):
        at = 2 if kind == Q5_0 else 4
        bits = ((q.astype(np.uint32) >> 4) & 1) << np.arange(32, dtype=np.uint32)
        out[:, at : at + 4] = bits.sum(-1, dtype=np.uint32).astype("<u4").reshape(n, 1).view(np.uint8)
        out[:, at + 4 : at + 20] = _nibbles(q & 15, 16)
    elif kind in (Q4_K, Q5_K):
        out[:, 16:] = _codes_k45(q, 4 if kind == Q4_K else 5)
    elif kind == Q6_K:
        out[:, :192] = _codes_q6k(q)
    else:
        raise ValueError(f"{type_name(kind)} has no codes")
    return out


def _deq(blocks: np.ndarray, kind: int) -> np.ndarray:
    return dequantize(torch.from_numpy(np.ascontiguousarray(blocks)), kind, BLOCKS[kind][0]).numpy()


def requantize_touched(blocks: np.ndarray, base: np.ndarray, target: np.ndarray, kind: int,
                       seed: int = 0) -> np.ndarray:
    """Blocks ``(n, bytes)`` of type ``kind`` whose values go from ``base`` to ``target`` ``(n, elements)``.

    Each block keeps its own scales; only the moved elements get new codes, rounded *stochastically* between
    the two nearest grid values (up with probability equal to the fraction of the step): a trained delta
    smaller than half a quantization step, which round-to-nearest would drop, is kept in expectation over the
    many elements that moved, and every element that did not move keeps its exact value. A block where a
    moved element falls outside the range its scales can represent (by more than half a step) is quantized
    afresh from ``target`` instead. Untyped formats (F32, F16, BF16) are written afresh (exact up to their
    rounding). ``seed`` fixes the rounding (the same run exports the same bytes)."""
    if kind == MXFP4:
        return _requantize_mxfp4(blocks, base, target, seed)
    if kind not in CODE_RANGE:
        return quantize_rows(target, kind)
    lo, hi = CODE_RANGE[kind]
    n, block = target.shape
    zero = _deq(with_codes(blocks, np.zeros((n, block), np.int64), kind), kind)
    step = _deq(with_codes(blocks, np.ones((n, block), np.int64), kind), kind) - zero
    live = step != 0
    safe = np.where(live, step, 1)
    q_old = np.where(live, np.rint((base - zero) / safe), 0)
    moved = (target != base) & live
    x = (target - zero) / safe  # the wanted code, fractional
    floor = np.floor(x)
    up = np.random.default_rng(seed).random(x.shape, dtype=np.float32) < (x - floor)
    q = np.where(moved, np.clip(floor + up, lo, hi), q_old).astype(np.int64)
    outside = (moved & ((x < lo - 0.5) | (x > hi + 0.5))).any(-1) | ((target != base) & ~live).any(-1)
    out = with_codes(blocks, q, kind)
    if outside.any():
        out[outside] = quantize_rows(target[outside], kind)
    return out


# MXFP4's grid (doubled E2M1 values, ascending) and the code of each grid value (+0 for zero)
_FP4_GRID = np.array(sorted(set(MXFP4_VALUES)), dtype=np.float32)
_FP4_CODE = np.array([MXFP4_VALUES.index(int(v)) for v in _FP4_GRID], dtype=np.uint8)


def _requantize_mxfp4(blocks: np.ndarray, base: np.ndarray, target: np.ndarray, seed: int) -> np.ndarray:
    """:func:`requantize_touched` for MXFP4, whose codes are not evenly spaced: each block keeps its E8M0 scale;
    a moved element is rounded stochastically between the two nearest values of the E2M1 grid (in proportion
    to the distance), the others keep their codes; a block with a moved element beyond the grid's ends (by
    more than half the last step) is quantized afresh."""
    n, block = target.shape
    d = e8m0_half(torch.from_numpy(np.ascontiguousarray(blocks[:, :1]))).numpy()  # (n, 1)
    packed = blocks[:, 1:]
    q_old = np.concatenate([packed & 15, packed >> 4], axis=1).astype(np.uint8)  # (n, 32): elements 0-15, 16-31
    x = target / d
    moved = target != base
    hi_i = np.clip(np.searchsorted(_FP4_GRID, x, side="left"), 1, len(_FP4_GRID) - 1)
    lo_v, hi_v = _FP4_GRID[hi_i - 1], _FP4_GRID[hi_i]
    p = np.clip((x - lo_v) / (hi_v - lo_v), 0, 1)
    up = np.random.default_rng(seed).random(x.shape, dtype=np.float32) < p
    q_new = _FP4_CODE[np.where(up, hi_i, hi_i - 1)]
    q = np.where(moved, q_new, q_old)
    out = np.array(blocks, dtype=np.uint8, copy=True)
    out[:, 1:] = _nibbles(q, 16)
    end = (_FP4_GRID[-1] - _FP4_GRID[-2]) / 2
    outside = (moved & ((x < _FP4_GRID[0] - end) | (x > _FP4_GRID[-1] + end))).any(-1)
    if outside.any():
        out[outside] = quantize_rows(target[outside], MXFP4)
    return out
