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
- ``Q6_K``: ``128 bytes low nibbles | 64 bytes high 2 bits | 16 int8 scales | d``: ``(d * sc) * (q - 32)``;
- ``MXFP4`` (gpt-oss's experts): ``e (E8M0) | 16 bytes``, nibbles as Q4_0's, each an E2M1 code:
  ``kvalues[q] * 2^(e - 128)`` (llama.cpp's doubled E2M1 values with half the scale).

``dequantize_blocks`` states each formula plainly; ``dequantize`` (the hot path) computes the same fp32
operations in the same order, in place, through buffers reused by every chunk of blocks (no temporaries per
chunk), nibbles and the high bits of Q5_K / Q6_K unpacked four bytes at a time (where aligned), Q5_0 / Q5_1's
high bits looked up in a table: 1.5-4.8x faster than the formulas on CPU (``bench/ggml_dequant.py``).
"""

from __future__ import annotations

import torch

# GGML type id -> (elements per block, bytes per block), for the types usaf reads
BLOCKS = {0: (1, 4), 1: (1, 2), 30: (1, 2), 8: (32, 34), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24),
          12: (256, 144), 13: (256, 176), 14: (256, 210), 39: (32, 17)}
F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K, MXFP4 = 0, 1, 30, 8, 2, 3, 6, 7, 12, 13, 14, 39
MXFP4_VALUES = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)  # E2M1 codes, doubled (llama.cpp's)


def type_name(kind: int) -> str:
    """GGML's name of a type id (``Q4_K``), from the gguf package when it is installed."""
    try:
        import gguf

        return gguf.GGMLQuantizationType(kind).name
    except (ImportError, ValueError):
        return {F32: "F32", F16: "F16", BF16: "BF16", Q8_0: "Q8_0", Q4_0: "Q4_0", Q4_1: "Q4_1", Q5_0: "Q5_0",
                Q5_1: "Q5_1", Q4_K: "Q4_K", Q5_K: "Q5_K", Q6_K: "Q6_K", MXFP4: "MXFP4"}.get(kind, f"type {kind}")


def e8m0_half(e: torch.Tensor) -> torch.Tensor:
    """MXFP4's E8M0 scale bytes -> half the scale, fp32 (``ggml_e8m0_to_fp32_half``: ``2^(e - 128)``, a
    subnormal below ``e = 2``)."""
    x = e.to(torch.int32)
    return torch.where(x < 2, torch.tensor(0x00200000, dtype=torch.int32, device=e.device) << x,
                       (x - 1) << 23).view(torch.float32)


def _mxfp4_values(device) -> torch.Tensor:
    return torch.tensor(MXFP4_VALUES, dtype=torch.float32, device=device)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """(n, 2) uint8 -> (n, 1) fp32."""
    return b.clone(memory_format=torch.contiguous_format).view(torch.float16).float()  # aligned, unlike a slice


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
    if kind == MXFP4:
        q = _nibbles(blocks[:, 1:], 16).reshape(n, 32).long()
        return e8m0_half(blocks[:, :1]) * _mxfp4_values(blocks.device)[q]
    raise ValueError(f"GGML type {type_name(kind)} is not supported (supported: "
                     f"{', '.join(type_name(k) for k in BLOCKS)})")


# Elements dequantized per step: the fp32 scratch of a step stays in cache on CPU (as in ``engine.quant``)
_CHUNK_CPU = 1 << 19
_CHUNK_ACCEL = 1 << 24
_MASK = 0x0F0F0F0F


def _unpack_nibbles(qs: torch.Tensor, width: int, out: torch.Tensor) -> None:
    """(m, k * width) bytes -> ``out`` (m, k, 2, width) uint8: per chunk of ``width`` bytes, the low nibbles
    then the high ones. Four bytes at a time where the bytes are int32-aligned (rows of whole words)."""
    m = qs.shape[0]
    src = qs.reshape(m, -1, width)
    if width % 4 == 0 and qs.stride(0) % 4 == 0 and qs.data_ptr() % 4 == 0:
        w, o = src.view(torch.int32), out.view(torch.int32)
        torch.bitwise_and(w, _MASK, out=o[:, :, 0])
        torch.bitwise_right_shift(w, 4, out=o[:, :, 1])  # arithmetic shift: the sign bits land in masked-out bits
        o[:, :, 1].bitwise_and_(_MASK)
    else:
        torch.bitwise_and(src, 15, out=out[:, :, 0])
        torch.bitwise_right_shift(src, 4, out=out[:, :, 1])


def _bit_table(device) -> torch.Tensor:
    """A byte's eight bits spread one per output byte, shifted to bit 4: ``(256,)`` int64 whose bytes, read in
    memory order, are bit 0 ... bit 7 of the index."""
    fields = ((torch.arange(256, dtype=torch.int64).view(256, 1) >> torch.arange(8)) & 1) << 4
    return fields.to(torch.uint8).contiguous().view(torch.int64).view(256).to(device)


class _Scratch:
    """The buffers of one ``dequantize`` call, reused by every chunk (no allocation per chunk)."""

    def __init__(self, kind: int, rows: int, device):
        block = BLOCKS[kind][0]
        self.codes = torch.empty(rows, block, dtype=torch.uint8, device=device)
        if kind in (Q5_0, Q5_1):  # 4 bytes of fifth bits: each byte's eight fields looked up in a table
            self.table = _bit_table(device)
            self.index = torch.empty(rows * 4, dtype=torch.int64, device=device)
            self.high = torch.empty(rows * 4, dtype=self.table.dtype, device=device)
        if kind == MXFP4:
            self.values = _mxfp4_values(device)
        if kind in (Q5_K, Q6_K):  # the high-bit bytes copied to aligned words, and one field of each at a time
            n = 32 if kind == Q5_K else 64
            self.qh = torch.empty(rows, n, dtype=torch.uint8, device=device)
            self.field = torch.empty(rows, n, dtype=torch.uint8, device=device)

    def fields(self, qh: torch.Tensor, width: int, codes: torch.Tensor) -> None:
        """OR each ``width``-bit field ``i`` of the bytes ``qh`` (m, n), shifted to bit 4, into ``codes``
        viewed as (m, 8 // width, n): Q5_K's fifth bits (field i of byte l: sub-block i's element l) and Q6_K's
        two high bits (per half: field s of byte l is element l of group s). Four bytes at a time."""
        m, n = qh.shape
        src, tmp = self.qh[:m], self.field[:m]
        src.copy_(qh)
        w, t = src.view(torch.int32), tmp.view(torch.int32)  # (m, n / 4) words
        halves = n // 32  # Q6_K: two halves of 128 elements, each with its 32 bytes of high bits
        c = codes.view(torch.int32).view(m, halves, 8 // width, 8)  # (m, halves, field, 32 bytes as words)
        mask = 0x01010101 * ((1 << width) - 1)
        wv, tv = w.view(m, halves, 8), t.view(m, halves, 8)
        for i in range(8 // width):
            torch.bitwise_right_shift(wv, width * i, out=tv)  # arithmetic: the sign lands in masked-out bits
            tv.bitwise_and_(mask).bitwise_left_shift_(4)
            c[:, :, i].bitwise_or_(tv)

    def high_bits(self, qh: torch.Tensor) -> torch.Tensor:
        """(m, k) bytes -> (m, k, fields per byte) uint8: each byte's fields, shifted to bit 4."""
        m, k = qh.shape
        idx, high = self.index[: m * k], self.high[: m * k]
        idx.view(m, k).copy_(qh)
        torch.index_select(self.table, 0, idx, out=high)
        return high.view(torch.uint8).view(m, k, -1)


def _fill(kind: int, blocks: torch.Tensor, b: torch.Tensor, s: _Scratch) -> None:
    """Dequantize ``blocks`` (m, bytes per block) uint8 into ``b`` (m, elements per block) fp32: the formulas of
    ``dequantize_blocks``, with the same fp32 operations in the same order, in place."""
    m = blocks.shape[0]
    codes = s.codes[:m]
    if kind == Q8_0:
        b.copy_(blocks[:, 2:].view(torch.int8))
        b.mul_(_f16(blocks[:, :2]))
        return
    if kind in (Q4_0, Q4_1, Q5_0, Q5_1):
        at = {Q4_0: 2, Q4_1: 4, Q5_0: 6, Q5_1: 8}[kind]
        _unpack_nibbles(blocks[:, at:], 16, codes.view(m, 1, 2, 16))
        if kind in (Q5_0, Q5_1):  # bit j of the 4 bytes before the nibbles is element j's fifth bit
            codes.bitwise_or_(s.high_bits(blocks[:, at - 4 : at]).view(m, 32))
        b.copy_(codes)
        if kind in (Q4_0, Q5_0):
            b.sub_(8 if kind == Q4_0 else 16).mul_(_f16(blocks[:, :2]))
        else:
            b.mul_(_f16(blocks[:, :2])).add_(_f16(blocks[:, 2:4]))
        return
    if kind in (Q4_K, Q5_K):
        sc, mn = _scale_min_k4(blocks[:, 4:16])
        d = (_f16(blocks[:, :2]) * sc.float()).view(m, 8, 1)
        dm = (_f16(blocks[:, 2:4]) * mn.float()).view(m, 8, 1)
        at = 16 if kind == Q4_K else 48
        _unpack_nibbles(blocks[:, at:], 32, codes.view(m, 4, 2, 32))
        if kind == Q5_K:  # bit i of byte l of the 32 bytes before the nibbles: element l of sub-block i
            s.fields(blocks[:, 16:48], 1, codes)
        b.copy_(codes)
        b.view(m, 8, 32).mul_(d).sub_(dm)
        return
    if kind == Q6_K:  # bits 2s..2s+1 of byte l of half c: element l of group 4c + s
        d = (_f16(blocks[:, 208:210]) * blocks[:, 192:208].view(torch.int8).float()).view(m, 16, 1)
        _unpack_nibbles(blocks[:, :128], 64, codes.view(m, 2, 2, 64))
        s.fields(blocks[:, 128:192], 2, codes)
        b.copy_(codes)
        b.sub_(32)
        b.view(m, 16, 16).mul_(d)
        return
    if kind == MXFP4:
        _unpack_nibbles(blocks[:, 1:], 16, codes.view(m, 1, 2, 16))
        torch.index_select(s.values, 0, codes.view(-1).to(torch.int32), out=b.view(-1))
        b.mul_(e8m0_half(blocks[:, :1]))
        return
    raise ValueError(f"{type_name(kind)} has no in-place path")  # ``dequantize`` refuses unknown types first


def dequantize(raw: torch.Tensor, kind: int, cols: int, dtype: torch.dtype = torch.float32,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Raw rows ``(..., bytes per row)`` uint8 -> ``(..., cols)`` in ``dtype`` (on ``raw``'s device), a chunk of
    blocks at a time through reused buffers (computed in fp32, rounded once to ``dtype``). ``out``: write into
    this ``(k, rows, cols)`` tensor instead (``raw`` is then ``(k, rows, bytes)``; each ``out[e]`` contiguous, as
    in a row range of a larger stack) and return it."""
    if kind not in BLOCKS:
        dequantize_blocks(raw[:0], kind)  # names the type
    block, size = BLOCKS[kind]
    if out is None:
        out = torch.empty(*raw.shape[:-1], cols, dtype=dtype, device=raw.device)
        pairs = [(raw.reshape(-1, size), out.view(-1, block))]
    else:
        pairs = [(raw[e].reshape(-1, size), out[e].view(-1, block)) for e in range(out.shape[0])]
    if kind in (F32, F16, BF16):
        ftype = {F32: torch.float32, F16: torch.float16, BF16: torch.bfloat16}[kind]
        for src, dst in pairs:
            src = src.contiguous() if src.data_ptr() % size == 0 else src.clone()  # a view as floats needs alignment
            dst.copy_(src.view(ftype))
        return out
    n = max((src.shape[0] for src, _ in pairs), default=0)
    step = min(n, max(1, (_CHUNK_CPU if raw.device.type == "cpu" else _CHUNK_ACCEL) // block))
    if step == 0:
        return out
    scratch = _Scratch(kind, step, raw.device)
    direct = out.dtype == torch.float32
    buf = None if direct else torch.empty(step, block, dtype=torch.float32, device=raw.device)
    for src, dst in pairs:
        for b0 in range(0, src.shape[0], step):
            b1 = min(src.shape[0], b0 + step)
            b = dst[b0:b1] if direct else buf[: b1 - b0]
            _fill(kind, src[b0:b1], b, scratch)
            if not direct:
                dst[b0:b1].copy_(b)
    return out


class GGMLStack:
    """A frozen ``[E, R, C]`` expert stack in its GGUF quantization: one or more GGUF tensors (raw rows
    ``[E, R_i, bytes per row]``, e.g. the memory map of the file) concatenated along R (gate rows, then up
    rows). ``dequantize`` reads only the asked expert range, on the target device.

    ``interleave``: the parts' rows alternate instead (gpt-oss: gate row j is row 2j, up row j is row 2j + 1);
    ``transposed``: the stack is used as ``[E, C, R]`` (gpt-oss keeps its experts ``[E, in, out]``, a GGUF
    ``[E, out, in]``), dequantized into that layout."""

    def __init__(self, parts: list[torch.Tensor], kinds: list[int], cols: int, interleave: bool = False,
                 transposed: bool = False):
        self.parts, self.kinds, self.cols = list(parts), list(kinds), int(cols)
        self.interleave, self.transposed = bool(interleave), bool(transposed)
        e = {p.shape[0] for p in parts}
        if len(e) != 1:
            raise ValueError("the parts of an expert stack must have the same number of experts")
        if interleave and len({p.shape[1] for p in parts}) != 1:
            raise ValueError("interleaved parts of an expert stack must have the same number of rows")
        for p, k in zip(parts, kinds):
            block, size = BLOCKS[k]
            if p.dtype != torch.uint8 or p.dim() != 3 or p.shape[2] * block != cols * size:
                raise ValueError(f"a {type_name(k)} part of shape {tuple(p.shape)} does not hold rows of {cols}")
        rows = sum(p.shape[1] for p in parts)
        self.shape = (e.pop(), self.cols, rows) if transposed else (e.pop(), rows, self.cols)
        self.dtype = torch.float32

    def dequantize(self, start: int = 0, stop: int | None = None, dtype=torch.bfloat16, device=None,
                   out: torch.Tensor | None = None, workspace=None) -> torch.Tensor:
        """``workspace``: accepted for the common signature of frozen stacks (not used here)."""
        stop = self.shape[0] if stop is None else stop
        k = stop - start
        if out is not None:
            if tuple(out.shape) != (k, *self.shape[1:]) or not out.is_contiguous():
                raise ValueError(f"out must be a contiguous {(k, *self.shape[1:])} tensor, got {tuple(out.shape)}")
            dtype, dev = out.dtype, out.device
        else:
            dev = torch.device(device) if device is not None else self.parts[0].device
            dtype = dtype or torch.float32
            out = torch.empty(k, *self.shape[1:], dtype=dtype, device=dev)
        if not (self.interleave or self.transposed):  # each part straight into its rows
            r0 = 0
            for p, kind in zip(self.parts, self.kinds):
                dequantize(p[start:stop].to(dev, non_blocking=dev.type != "cpu"), kind, self.cols,
                           out=out[:, r0 : r0 + p.shape[1]])
                r0 += p.shape[1]
            return out
        rows = out.transpose(1, 2) if self.transposed else out  # (k, R, C) view of the result
        n, r0 = len(self.parts), 0
        for i, (p, kind) in enumerate(zip(self.parts, self.kinds)):
            part = dequantize(p[start:stop].to(dev, non_blocking=dev.type != "cpu"), kind, self.cols, dtype=dtype)
            (rows[:, i::n] if self.interleave else rows[:, r0 : r0 + p.shape[1]]).copy_(part)
            r0 += p.shape[1]
        return out

    def nbytes(self) -> int:
        return sum(p.numel() for p in self.parts)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"part{i}": p for i, p in enumerate(self.parts)}

    def to(self, device, non_blocking: bool = False) -> GGMLStack:
        return GGMLStack([p.to(device, non_blocking=non_blocking) for p in self.parts], self.kinds, self.cols,
                         self.interleave, self.transposed)

    def to_pinned(self) -> GGMLStack:
        return GGMLStack([p.pin_memory() for p in self.parts], self.kinds, self.cols, self.interleave,
                         self.transposed)
