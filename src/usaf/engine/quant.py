"""Group-wise quantization of frozen expert stacks.

The frozen MoE expert weights (``[E, R, C]`` tensors, or any N-D tensor whose leading
dimension is the expert index) are stored as unsigned 4- or 8-bit codes with one fp16
``scale`` and one fp16 ``zero`` (an offset: the group minimum, or what the 4-bit search chose)
per group of ``group_size`` consecutive elements of the *flattened per-expert* data::

    w[e].flatten()[g * group_size + j]  ~=  code * scale[e, g] + zero[e, g]

Every expert is padded on its own to a whole number of groups, so expert ``e``'s codes,
scales and zeros are row ``e`` of ``qdata``, ``scale`` and ``zero``; any contiguous expert
range ``[start, stop)`` is a contiguous slice of each and can be dequantized (on any
device) without touching the other experts.

4-bit packing: inside each group, byte ``j`` (``0 <= j < group_size // 2``) holds element
``j`` in its low nibble and element ``j + group_size // 2`` in its high nibble.  This lets
the CPU unpack with two ``int32``-wide mask/shift ops and two contiguous half-group
writes, which measured faster than interleaved nibbles (see ``docs/quantization.md``).

Pure torch; no custom kernels.  See ``docs/quantization.md`` for the library survey and
measurements behind the choices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["ROUNDINGS", "QuantSpec", "QuantizedTensor"]

# How a group's scale and minimum are chosen. "mse": a weighted least-squares search (the default,
# docs/quantization.md); "minmax": round to nearest on the group's min/max (the format's first quantizer).
ROUNDINGS = ("mse", "minmax")
# The "mse" search: starting ranges (fractions of max - min, the minimum kept) refined by this many
# least-squares steps each; the weights are llama.cpp's for K-quants without an importance matrix.
_SEARCH_SHRINK = (1.0, 0.95, 0.9, 0.85)
_SEARCH_STEPS = 2
_SEARCH_BLOCK = 1 << 19

_FP16_MAX = 65504.0
# Elements dequantized per step: on CPU the fp32 scratch buffer (2 MiB) stays in cache,
# which measured ~3x faster than one pass over a whole expert; on accelerators larger
# steps only bound the scratch memory.
_DEQUANT_CHUNK_CPU = 1 << 19
_DEQUANT_CHUNK_ACCEL = 1 << 24
# Quantization works on at least this many elements (or one whole expert) at a time.
_QUANT_CHUNK = 1 << 20


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize: ``bits`` in {4, 8}; ``group_size`` a multiple of 8 (32, 64, 128, ...)."""

    bits: int
    group_size: int = 64
    rounding: str = "mse"

    def __post_init__(self) -> None:
        _check_spec(self.bits, self.group_size)
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {self.rounding!r}")

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1


def _check_spec(bits: int, group_size: int) -> None:
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if group_size < 8 or group_size % 8:
        raise ValueError(f"group_size must be a positive multiple of 8, got {group_size}")


def _search(g, mn, mx, s16, z16, qmax):
    """Per group, the fp16 ``(scale, zero)`` of smallest weighted squared error among min/max rounding
    (``s16``, ``z16``) and, for each range in ``_SEARCH_SHRINK``, ``_SEARCH_STEPS`` least-squares refinements
    (codes fixed, then the scale and minimum that fit them best, rounded to fp16, then new codes).

    The weight of element x is ``rms(group) + |x|`` (llama.cpp's for K-quants without an importance matrix):
    large weights, which carry most of a layer's output, are kept closer. A group's error is never above
    min/max rounding's, since that is one of the candidates. ``g``: fp32 ``[k, G, gs]``, left unchanged;
    the others ``[k, G, 1]``. Works on blocks of ``_SEARCH_BLOCK`` elements, transposed to ``[gs, groups]``
    so that the per-group scalars broadcast along contiguous rows and the sums run across them."""
    gs = g.shape[-1]
    rows = g.reshape(-1, gs)
    n = rows.shape[0]
    cols = [t.reshape(1, -1) for t in (mn, mx, s16, z16)]
    best_s = torch.empty(1, n, dtype=torch.float16, device=g.device)
    best_z = torch.empty_like(best_s)
    step = max(1, _SEARCH_BLOCK // gs)
    bufs = torch.empty(5, gs, min(step, n), dtype=torch.float32, device=g.device)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        b = bufs[:, :, : r1 - r0]
        b[0].copy_(rows[r0:r1].t())
        best_s[:, r0:r1], best_z[:, r0:r1] = _search_block(b, *(t[:, r0:r1] for t in cols), qmax)
    return best_s.view_as(s16), best_z.view_as(z16)


def _colsum(t: torch.Tensor) -> torch.Tensor:
    """``t.sum(dim=0, keepdim=True)`` for ``[n, B]``, in a fixed pairwise order of elementwise adds: the same
    bits whatever ``B`` and the number of threads (a reduction kernel may split its sums by either), so a
    stack quantized whole, expert by expert or on another machine gets the same codes. Sums in place:
    ``t`` is overwritten; the result is a view of its first row."""
    n = t.shape[0]
    while n > 1:
        h = n // 2
        if n % 2:
            t[:1].add_(t[n - 1 : n])
        t[:h].add_(t[h : 2 * h])
        n = h
    return t[:1]


def _search_block(b, mn, mx, s16, z16, qmax):
    """``_search`` on one block: ``b[0]`` holds the groups as columns ``[gs, B]``; ``b[1:]`` is scratch."""
    x, w, wx, q, t = b
    rms = _colsum(torch.mul(x, x, out=t)).div(x.shape[0]).sqrt_()
    torch.abs(x, out=w).add_(rms)
    torch.mul(w, x, out=wx)
    sw = _colsum(t.copy_(w)).clone()
    swx = _colsum(t.copy_(wx)).clone()

    def codes(s, z):  # round((x - z) / s) as x * (1/s) - z/s; code 0 where s == 0
        inv = torch.reciprocal(s).nan_to_num_(posinf=0.0)
        return torch.addcmul(-z * inv, x, inv, out=q).round_().clamp_(0, qmax)

    def error(s, z):  # sum of w (q s + z - x)^2, computed directly (moments would cancel)
        codes(s, z)
        torch.addcmul(z, q, s, out=t).sub_(x).square_().mul_(w)
        return _colsum(t).clone()

    z0 = z16.float()
    best_s, best_z = s16.float(), z0
    best = error(best_s, best_z)
    rng = mx - mn
    for shrink in _SEARCH_SHRINK:
        s, z = (rng * (shrink / qmax)).half().float(), z0
        for _ in range(_SEARCH_STEPS):  # codes fixed: the weighted least-squares line through them
            codes(s, z)
            sq = _colsum(torch.mul(w, q, out=t)).clone()
            sqq = _colsum(torch.mul(w, q, out=t).mul_(q)).clone()
            sqx = _colsum(torch.mul(q, wx, out=t)).clone()
            den = sw * sqq - sq * sq
            ns = ((sw * sqx - sq * swx) / den).half().float()
            nz = ((swx - ns * sq) / sw).half().float()
            ok = (den > 0) & (ns >= 0) & torch.isfinite(ns) & torch.isfinite(nz)
            s, z = torch.where(ok, ns, s), torch.where(ok, nz, z)
        err = error(s, z)
        better = err < best
        best = torch.where(better, err, best)
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
    return best_s.half(), best_z.half()


class QuantizedTensor:
    """A group-wise quantized tensor with a leading expert dimension.

    Attributes: ``shape`` (original shape), ``bits``, ``group_size``, and the tensors
    ``qdata`` (uint8 ``[E, bytes_per_expert]``), ``scale`` and ``zero``
    (fp16 ``[E, groups_per_expert]``).
    """

    def __init__(
        self,
        qdata: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        shape: tuple[int, ...],
        bits: int,
        group_size: int,
    ) -> None:
        _check_spec(bits, group_size)
        self.shape = tuple(int(s) for s in shape)
        if len(self.shape) < 1:
            raise ValueError("a QuantizedTensor needs a leading expert dimension")
        self.bits = int(bits)
        self.group_size = int(group_size)
        n_exp = self.shape[0]
        groups = self.groups_per_expert
        bytes_per_expert = groups * group_size * bits // 8
        if qdata.dtype != torch.uint8 or tuple(qdata.shape) != (n_exp, bytes_per_expert):
            raise ValueError(
                f"qdata must be uint8 [{n_exp}, {bytes_per_expert}], got {qdata.dtype} {tuple(qdata.shape)}"
            )
        for name, t in (("scale", scale), ("zero", zero)):
            if t.dtype != torch.float16 or tuple(t.shape) != (n_exp, groups):
                raise ValueError(
                    f"{name} must be float16 [{n_exp}, {groups}], got {t.dtype} {tuple(t.shape)}"
                )
        if not (qdata.device == scale.device == zero.device):
            raise ValueError("qdata, scale and zero must be on the same device")
        self.qdata = qdata.contiguous()
        self.scale = scale.contiguous()
        self.zero = zero.contiguous()

    # ------------------------------------------------------------------ properties
    @property
    def num_experts(self) -> int:
        return self.shape[0]

    @property
    def numel_per_expert(self) -> int:
        return math.prod(self.shape[1:])

    @property
    def groups_per_expert(self) -> int:
        return -(-self.numel_per_expert // self.group_size)

    @property
    def device(self) -> torch.device:
        return self.qdata.device

    def numel(self) -> int:
        return self.num_experts * self.numel_per_expert

    def nbytes(self) -> int:
        """Bytes of storage: packed codes + scales + zeros."""
        return sum(t.numel() * t.element_size() for t in (self.qdata, self.scale, self.zero))

    def bits_per_weight(self) -> float:
        """Storage bits per original weight, scales, zeros and per-expert padding included."""
        return 8.0 * self.nbytes() / max(1, self.numel())

    def __repr__(self) -> str:
        return (
            f"QuantizedTensor(shape={self.shape}, bits={self.bits}, group_size={self.group_size}, "
            f"device={self.device}, bits_per_weight={self.bits_per_weight():.3f})"
        )

    # ------------------------------------------------------------------ quantize
    @classmethod
    def quantize(cls, w: torch.Tensor, spec: QuantSpec) -> QuantizedTensor:
        """Quantize ``w`` (leading expert dim) on ``w``'s device, a few experts at a time.

        Peak extra memory is one fp32 copy of ``max(one expert, 2**20 elements)``, the 4-bit search's
        scratch (five fp32 blocks of ``_SEARCH_BLOCK`` elements: 10 MiB) and the outputs.  Asymmetric per group: scale and minimum from ``spec.rounding`` ("mse": a weighted
        least-squares search, ``_search``; "minmax": the group's min/max), rounded to fp16 *before* the
        codes are computed (round to nearest, ties to even), so the codes are the nearest ones for the
        stored parameters.
        """
        if not isinstance(spec, QuantSpec):
            raise TypeError("spec must be a QuantSpec")
        if w.dim() < 1:
            raise ValueError("w needs a leading expert dimension")
        if not w.is_floating_point():
            raise TypeError(f"w must be a floating point tensor, got {w.dtype}")
        shape = tuple(w.shape)
        n_exp = shape[0]
        n = math.prod(shape[1:])
        gs, bits, qmax = spec.group_size, spec.bits, spec.qmax
        groups = -(-n // gs)
        padded = groups * gs
        dev = w.device
        qdata = torch.empty(n_exp, padded * bits // 8, dtype=torch.uint8, device=dev)
        scale = torch.empty(n_exp, groups, dtype=torch.float16, device=dev)
        zero = torch.empty(n_exp, groups, dtype=torch.float16, device=dev)
        if n == 0 or n_exp == 0:
            scale.zero_()
            zero.zero_()
            qdata.zero_()
            return cls(qdata, scale, zero, shape, bits, gs)

        step = max(1, _QUANT_CHUNK // padded)
        buf = torch.empty(min(step, n_exp), padded, dtype=torch.float32, device=dev)
        for e0 in range(0, n_exp, step):
            e1 = min(n_exp, e0 + step)
            k = e1 - e0
            x = buf[:k]
            x[:, :n].copy_(w[e0:e1].reshape(k, n))
            if padded != n:  # edge padding keeps the last group's range unchanged
                x[:, n:].copy_(x[:, n - 1 : n].expand(k, padded - n))
            g = x.view(k, groups, gs)
            mn = g.amin(dim=-1, keepdim=True)
            mx = g.amax(dim=-1, keepdim=True)
            s16 = ((mx - mn) / qmax).to(torch.float16)
            z16 = mn.to(torch.float16)
            bad = ~(torch.isfinite(s16).all() & torch.isfinite(z16).all())
            if bool(bad):
                raise ValueError(
                    f"experts [{e0}, {e1}) contain non-finite values or values whose range does not fit "
                    f"fp16 (|w| must stay well below {_FP16_MAX})"
                )
            if spec.rounding == "mse" and bits == 4:  # at 8 bits: 5% less error for 10x the time
                s16, z16 = _search(g, mn, mx, s16, z16, qmax)
            sf = s16.float()
            safe = torch.where(sf > 0, sf, torch.ones_like(sf))
            g.sub_(z16.float()).div_(safe).round_().clamp_(0, qmax)
            codes = g.to(torch.uint8)  # [k, groups, gs]
            if bits == 4:
                half = gs // 2
                packed = qdata[e0:e1].view(k, groups, half)
                torch.bitwise_left_shift(codes[..., half:], 4, out=packed)
                packed.bitwise_or_(codes[..., :half])
            else:
                qdata[e0:e1].copy_(codes.view(k, padded))
            scale[e0:e1].copy_(s16.view(k, groups))
            zero[e0:e1].copy_(z16.view(k, groups))
        return cls(qdata, scale, zero, shape, bits, gs)

    # ------------------------------------------------------------------ dequantize
    def dequantize(
        self,
        start: int = 0,
        stop: int | None = None,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
        out: torch.Tensor | None = None,
        workspace=None,
    ) -> torch.Tensor:
        """Dense experts ``[start, stop)`` as ``[stop - start, *shape[1:]]`` in ``dtype``.

        Only that expert range is transferred (if ``device`` differs from where the
        quantized data lives) and computed, on the target device.  The affine step is
        done in fp32 and rounded once to ``dtype``. ``out``: write into this contiguous tensor of that
        shape (its dtype and device win) and return it. ``workspace``: a ``usaf.engine.store.Workspace``
        holding the chunk's scratch buffers from call to call.
        """
        n_exp = self.num_experts
        stop = n_exp if stop is None else stop
        if start < 0:
            start += n_exp
        if stop < 0:
            stop += n_exp
        if not (0 <= start <= stop <= n_exp):
            raise IndexError(f"expert range [{start}, {stop}) out of bounds for {n_exp} experts")
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be floating point, got {dtype}")
        dev = self.device if device is None else torch.device(device)
        k = stop - start
        n, gs, groups = self.numel_per_expert, self.group_size, self.groups_per_expert
        padded = groups * gs
        out_shape = (k, *self.shape[1:])
        given = out
        if given is not None:
            if tuple(given.shape) != out_shape or not given.is_contiguous():
                raise ValueError(f"out must be a contiguous {out_shape} tensor, got {tuple(given.shape)}")
            dtype, dev = given.dtype, given.device
        if k == 0 or n == 0:
            return given if given is not None else torch.empty(out_shape, dtype=dtype, device=dev)

        # async host->device copies are safe (stream-ordered); device->host ones are not
        nb = dev.type != "cpu"
        q = self.qdata[start:stop].to(dev, non_blocking=nb)
        s = self.scale[start:stop].to(dev, non_blocking=nb).reshape(k * groups, 1)
        z = self.zero[start:stop].to(dev, non_blocking=nb).reshape(k * groups, 1)
        rows = k * groups
        if given is not None and padded == n:
            out = given.view(rows, gs)
        else:
            out = torch.empty(rows, gs, dtype=dtype, device=dev)
        chunk = _DEQUANT_CHUNK_CPU if dev.type == "cpu" else _DEQUANT_CHUNK_ACCEL
        step = max(1, chunk // gs)
        direct = dtype == torch.float32

        def scratch(slot, shape, dt):
            if workspace is None:
                return torch.empty(shape, dtype=dt, device=dev)
            return workspace.get(slot, shape, dt, dev)

        buf = None if direct else scratch("dequant_f32", (min(step, rows), gs), torch.float32)
        if dev.type == "cpu":  # the scales and zeros in fp32 once (the same values), not converted per chunk op
            s = scratch("dequant_scale", (rows, 1), torch.float32).copy_(s)
            z = scratch("dequant_zero", (rows, 1), torch.float32).copy_(z)
        if self.bits == 4:
            half = gs // 2
            words = q.view(rows, half).view(torch.int32)  # [rows, gs // 8]
            mask = 0x0F0F0F0F
            # the codes of a chunk, unpacked in place as [rows, 2, half] bytes (low nibbles, then high): one
            # contiguous uint8 -> float copy after (a strided one into the halves of ``b`` is ~50x slower on CPU)
            codes = scratch("dequant_codes", (min(step, rows), 2, half), torch.uint8)
            codes32 = codes.view(torch.int32)  # [rows, 2, gs // 8]
        else:
            codes8 = q.view(rows, gs)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            b = out[r0:r1] if direct else buf[: r1 - r0]
            if self.bits == 4:
                wb, m = words[r0:r1], r1 - r0
                torch.bitwise_and(wb, mask, out=codes32[:m, 0])
                hi = codes32[:m, 1]
                torch.bitwise_right_shift(wb, 4, out=hi)
                hi.bitwise_and_(mask)
                b.copy_(codes[:m].view(m, gs))
            else:
                b.copy_(codes8[r0:r1])
            b.mul_(s[r0:r1]).add_(z[r0:r1])
            if not direct:
                out[r0:r1].copy_(b)
        if padded == n:
            return given if given is not None else out.view(out_shape)
        if given is not None:
            return given.view(k, n).copy_(out.view(k, padded)[:, :n]).view(out_shape)
        return out.view(k, padded)[:, :n].contiguous().view(out_shape)

    # ------------------------------------------------------------------ (de)serialization
    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat dict for ``safetensors`` (keys ``qdata``, ``scale``, ``zero``)."""
        return {"qdata": self.qdata, "scale": self.scale, "zero": self.zero}

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], shape, bits: int, group_size: int
    ) -> QuantizedTensor:
        """Rebuild from :meth:`tensors` output plus the metadata (shape, bits, group_size)."""
        missing = {"qdata", "scale", "zero"} - set(tensors)
        if missing:
            raise KeyError(f"missing quantized tensors: {sorted(missing)}")
        return cls(tensors["qdata"], tensors["scale"], tensors["zero"], tuple(shape), bits, group_size)

    def to(self, device, non_blocking: bool = False) -> QuantizedTensor:
        device = torch.device(device)
        if device == self.device:
            return self
        return QuantizedTensor(
            self.qdata.to(device, non_blocking=non_blocking),
            self.scale.to(device, non_blocking=non_blocking),
            self.zero.to(device, non_blocking=non_blocking),
            self.shape,
            self.bits,
            self.group_size,
        )

    def to_pinned(self) -> QuantizedTensor:
        """A copy in page-locked host memory (asynchronous host-to-device copies)."""
        return QuantizedTensor(self.qdata.pin_memory(), self.scale.pin_memory(), self.zero.pin_memory(),
                               self.shape, self.bits, self.group_size)
