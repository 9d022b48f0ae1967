"""GGML block formats in torch: dequantization (bit-exact with ``gguf.quants.dequantize``) and the frozen
expert stack kept in a GGUF tensor's own quantization.

Each type stores rows of ``block`` elements per ``size`` bytes (``BLOCKS``). The formulas follow
llama.cpp's ``dequantize_row_*`` exactly, in fp32, one operation at a time (no fused multiply-add), so the
results equal the ``gguf`` package's numpy reference bit for bit (``tests/test_ggml.py``):

- ``Q8_0``: ``d (f16) | 32 x int8``: ``d * q``;
- ``Q4_0``: ``d | 16 bytes``: low nibbles are elements 0-15, high 16-31: ``d * (q - 8)``;
- ``Q4_1``: ``d | m | 16 bytes``: ``d * q + m``;
- ``Q5_0`` / ``Q5_1``: as Q4_0 / Q4_1 with a fifth bit per element in 4 bytes after the scale(s)
  (``d * (q - 16)``, ``d * q + m``); llama.cpp's fallback for rows that K-types do not divide;
- ``Q4_K``: 256 elements in 8 sub-blocks of 32: ``d | dmin | 12 bytes of 6-bit scales and mins | 128 bytes``:
  ``(d * sc) * q - dmin * m``;
- ``Q5_K``: as Q4_K with a fifth bit per element in 32 bytes before the nibbles;
- ``Q6_K``: ``128 bytes low nibbles | 64 bytes high 2 bits | 16 int8 scales | d``: ``(d * sc) * (q - 32)``.
"""

from __future__ import annotations

import torch

# GGML type id -> (elements per block, bytes per block), for the types usaf reads
BLOCKS = {0: (1, 4), 1: (1, 2), 30: (1, 2), 8: (32, 34), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24),
          12: (256, 144), 13: (256, 176), 14: (256, 210)}
F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K = 0, 1, 30, 8, 2, 3, 6, 7, 12, 13, 14


def type_name(kind: int) -> str:
    """GGML's name of a type id (``Q4_K``), from the gguf package when it is installed."""
    try:
        import gguf

        return gguf.GGMLQuantizationType(kind).name
    except (ImportError, ValueError):
        return {F32: "F32", F16: "F16", BF16: "BF16", Q8_0: "Q8_0", Q4_0: "Q4_0", Q4_1: "Q4_1", Q5_0: "Q5_0",
                Q5_1: "Q5_1", Q4_K: "Q4_K", Q5_K: "Q5_K", Q6_K: "Q6_K"}.get(kind, f"type {kind}")


def _f16(b: torch.Tensor) -> torch.Tensor:
    """(n, 2) uint8 -> (n, 1) fp32."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor, width: int) -> torch.Tensor:
    """(n, k * width) bytes -> (n, 2k, width): per chunk of ``width`` bytes, low nibbles then high."""
    n = qs.shape[0]
    q = qs.reshape(n, -1, 1, width) >> torch.tensor([0, 4], dtype=torch.uint8, device=qs.device).view(1, 1, 2, 1)
    return (q & 15).reshape(n, -1, width)


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K's 12 bytes -> 8 six-bit scales and 8 six-bit mins, (n, 8) each."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def dequantize_blocks(blocks: torch.Tensor, kind: int) -> torch.Tensor:
    """(n, bytes per block) uint8 -> (n, elements per block) fp32."""
    n = blocks.shape[0]
    if kind == F32:
        return blocks.contiguous().view(torch.float32).clone()
    if kind == F16:
        return blocks.contiguous().view(torch.float16).float()
    if kind == BF16:
        return blocks.contiguous().view(torch.bfloat16).float()
    if kind == Q8_0:
        return blocks[:, 2:].contiguous().view(torch.int8).float() * _f16(blocks[:, :2])
    if kind == Q4_0:
        q = _nibbles(blocks[:, 2:], 16).reshape(n, 32).to(torch.int8) - 8
        return _f16(blocks[:, :2]) * q.float()
    if kind == Q4_1:
        q = _nibbles(blocks[:, 4:], 16).reshape(n, 32).float()
        return _f16(blocks[:, :2]) * q + _f16(blocks[:, 2:4])
    if kind in (Q5_0, Q5_1):  # d [| m] | 4 bytes: bit j is element j's fifth bit | 16 bytes of nibbles
        at = 2 if kind == Q5_0 else 4
        bits = torch.arange(8, dtype=torch.uint8, device=blocks.device).view(1, 1, 8)
        qh = ((blocks[:, at : at + 4].reshape(n, 4, 1) >> bits) & 1).reshape(n, 32)
        q = _nibbles(blocks[:, at + 4 :], 16).reshape(n, 32) | (qh << 4)
        if kind == Q5_0:
            return _f16(blocks[:, :2]) * (q.to(torch.int8) - 16).float()
        return _f16(blocks[:, :2]) * q.float() + _f16(blocks[:, 2:4])
    if kind in (Q4_K, Q5_K):
        sc, mn = _scale_min_k4(blocks[:, 4:16])
        d = (_f16(blocks[:, :2]) * sc.float()).view(n, 8, 1)
        dm = (_f16(blocks[:, 2:4]) * mn.float()).view(n, 8, 1)
        if kind == Q4_K:
            q = _nibbles(blocks[:, 16:], 32)
        else:
            qh = blocks[:, 16:48].reshape(n, 1, 32) >> torch.arange(8, dtype=torch.uint8,
                                                                    device=blocks.device).view(1, 8, 1)
            q = _nibbles(blocks[:, 48:], 32) | ((qh & 1) << 4)
        return (d * q.float() - dm).reshape(n, 256)
    if kind == Q6_K:
        d = (_f16(blocks[:, 208:210]) * blocks[:, 192:208].contiguous().view(torch.int8).float()).view(n, 16, 1)
        ql = _nibbles(blocks[:, :128], 64).reshape(n, 8, 32)
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=blocks.device).view(1, 1, 4, 1)
        qh = ((blocks[:, 128:192].reshape(n, 2, 1, 32) >> shifts) & 3).reshape(n, 8, 32)
        q = (ql | (qh << 4)).to(torch.int8) - 32
        return (d * q.reshape(n, 16, 16).float()).reshape(n, 256)
    raise ValueError(f"GGML type {type_name(kind)} is not supported (supported: "
                     f"{', '.join(type_name(k) for k in BLOCKS)})")


# Elements dequantized per step: the fp32 temporaries of a step stay small (a few MB on CPU)
_CHUNK_CPU = 1 << 18
_CHUNK_ACCEL = 1 << 24


def dequantize(raw: torch.Tensor, kind: int, cols: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Raw rows ``(..., bytes per row)`` uint8 -> ``(..., cols)`` in ``dtype`` (on ``raw``'s device), a chunk of
    blocks at a time (computed in fp32, rounded once to ``dtype``)."""
    block, size = BLOCKS[kind]
    lead = raw.shape[:-1]
    blocks = raw.reshape(-1, size)
    out = torch.empty(blocks.shape[0], block, dtype=dtype, device=raw.device)
    step = max(1, (_CHUNK_CPU if raw.device.type == "cpu" else _CHUNK_ACCEL) // block)
    for b0 in range(0, blocks.shape[0], step):
        out[b0 : b0 + step] = dequantize_blocks(blocks[b0 : b0 + step], kind)
    return out.reshape(*lead, cols)


class GGMLStack:
    """A frozen ``[E, R, C]`` expert stack in its GGUF quantization: one or more GGUF tensors (raw rows
    ``[E, R_i, bytes per row]``, e.g. the memory map of the file) concatenated along R (gate rows, then up
    rows). ``dequantize`` reads only the asked expert range, on the target device."""

    def __init__(self, parts: list[torch.Tensor], kinds: list[int], cols: int):
        self.parts, self.kinds, self.cols = list(parts), list(kinds), int(cols)
        e = {p.shape[0] for p in parts}
        if len(e) != 1:
            raise ValueError("the parts of an expert stack must have the same number of experts")
        for p, k in zip(parts, kinds):
            block, size = BLOCKS[k]
            if p.dtype != torch.uint8 or p.dim() != 3 or p.shape[2] * block != cols * size:
                raise ValueError(f"a {type_name(k)} part of shape {tuple(p.shape)} does not hold rows of {cols}")
        self.shape = (e.pop(), sum(p.shape[1] for p in parts), self.cols)
        self.dtype = torch.float32

    def dequantize(self, start: int = 0, stop: int | None = None, dtype=torch.bfloat16, device=None) -> torch.Tensor:
        stop = self.shape[0] if stop is None else stop
        dev = torch.device(device) if device is not None else self.parts[0].device
        dtype = dtype or torch.float32
        k = stop - start
        out = torch.empty(k, self.shape[1], self.cols, dtype=dtype, device=dev)
        r0 = 0
        for p, kind in zip(self.parts, self.kinds):
            out[:, r0 : r0 + p.shape[1]] = dequantize(p[start:stop].to(dev, non_blocking=dev.type != "cpu"), kind,
                                                      self.cols, dtype)
            r0 += p.shape[1]
        return out

    def nbytes(self) -> int:
        return sum(p.numel() for p in self.parts)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"part{i}": p for i, p in enumerate(self.parts)}

    def to(self, device, non_blocking: bool = False) -> GGMLStack:
        return GGMLStack([p.to(device, non_blocking=non_blocking) for p in self.parts], self.kinds, self.cols)

    def to_pinned(self) -> GGMLStack:
        return GGMLStack([p.pin_memory() for p in self.parts], self.kinds, self.cols)
