"""Frozen expert weights, kept outside the parameters that train.

A frozen stack is anything with ``shape``, ``nbytes()`` and
``dequantize(start, stop, dtype, device, out=None, workspace=None) -> dense (stop - start, R, C) tensor``: either a plain
dense tensor (bf16 / fp16 / fp32) or a group-quantized one (``usaf.engine.quant.QuantizedTensor``). The result of
``dequantize`` is always a tensor that the caller may modify in place (deltas are added to it): a new one, or
``out`` when given (a :class:`Workspace` buffer, reused from call to call).
"""

from __future__ import annotations

import torch

from .quant import QuantizedTensor, QuantSpec


class DenseStack:
    """A frozen dense ``[E, R, C]`` stack (no quantization)."""
    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor.detach()
        self.shape = tuple(tensor.shape)
        self.dtype = tensor.dtype

    def dequantize(self, start: int = 0, stop: int | None = None, dtype=None, device=None,
                   out: torch.Tensor | None = None, workspace=None) -> torch.Tensor:
        """``workspace``: accepted for a common signature (a dense copy needs no scratch)."""
        block = self.tensor[start:stop]
        if out is not None:
            return out.copy_(block)
        dtype = dtype or block.dtype
        device = device or block.device
        return block.to(device=device, dtype=dtype, copy=True)

    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    def to(self, device, non_blocking: bool = False) -> DenseStack:
        return DenseStack(self.tensor.to(device, non_blocking=non_blocking))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"dense": self.tensor}


class Workspace:
    """Reused buffers for the dequantized weights of the hot path, one per slot name (one per stack of the
    standard layout), shared by every experts module of a model.

    A run of experts' weights is written into the same memory step after step instead of a new allocation:
    on the CPU a fresh allocation of that size is a new ``mmap`` whose every page faults and is zeroed by the
    kernel on first touch (about 1 s of system time per Qwen3-30B-A3B-width layer and step, measured with
    ``bench/experts_layer.py``), and freeing it unmaps them again. A buffer only grows (to the largest run
    asked for); :meth:`clear` drops them all.
    """

    MAX_VIEWS = 1024  # views kept for reuse (all dropped when more shapes than this were asked for)

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}
        # Host time matters as much as memory here: the per-expert loop asks for buffers thousands of times a
        # step, and on a GPU every tensor op is launch overhead. A shape asked for before gets the same view
        # back with no op at all; a new one costs one op (``as_strided`` of the slot's buffer, viewed once per
        # dtype), not three.
        self._views: dict[tuple, torch.Tensor] = {}  # (slot, device, shape, dtype) -> view
        self._typed: dict[tuple, torch.Tensor] = {}  # (slot, device, dtype) -> the whole buffer in that dtype

    def get(self, slot: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A contiguous ``shape`` tensor of ``dtype`` on ``device`` (uninitialized) in the slot's buffer."""
        dev = str(device)
        shape = tuple(int(s) for s in shape)
        vkey = (slot, dev, shape, dtype)
        view = self._views.get(vkey)
        if view is not None:
            return view
        n = 1
        for s in shape:
            n *= s
        nbytes = n * dtype.itemsize
        key = f"{slot}@{dev}"
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < nbytes:
            self._bufs.pop(key, None)  # free the old one before the larger one exists
            self._views = {k: v for k, v in self._views.items() if k[:2] != (slot, dev)}
            self._typed = {k: v for k, v in self._typed.items() if k[:2] != (slot, dev)}
            buf = self._bufs[key] = torch.empty(-(-nbytes // 16) * 16, dtype=torch.uint8, device=device)
        typed = self._typed.get((slot, dev, dtype))
        if typed is None:
            typed = self._typed[(slot, dev, dtype)] = buf.view(dtype)
        strides, step = [], 1
        for s in reversed(shape):
            strides.append(step)
            step *= max(s, 1)
        if len(self._views) >= self.MAX_VIEWS:
            self._views.clear()
        view = self._views[vkey] = typed.as_strided(shape, tuple(reversed(strides)))
        return view

    def nbytes(self) -> int:
        return sum(b.numel() for b in self._bufs.values())

    def clear(self) -> None:
        self._bufs.clear()
        self._views.clear()
        self._typed.clear()


def freeze_stack(tensor: torch.Tensor, quant: str, group_size: int = 64, rounding: str = "mse"):
    """Build the frozen form of an expert stack.

    Args:
        tensor: (E, R, C) weights in any float dtype.
        quant: "none" (keep the tensor's dtype), "4bit" or "8bit" (group-wise, ``usaf.quant``).
        rounding: how the groups' scales and minimums are chosen (``QuantSpec.rounding``).
    """
    if quant in (None, "none"):
        return DenseStack(tensor)

    bits = {"4bit": 4, "8bit": 8}.get(quant)
    if bits is None:
        raise ValueError(f"unknown quantization {quant!r} (choose 4bit, 8bit or none)")
    return QuantizedTensor.quantize(tensor.detach(), QuantSpec(bits=bits, group_size=group_size, rounding=rounding))
