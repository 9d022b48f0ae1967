"""Frozen expert weights, kept outside the parameters that train.

A frozen stack is anything with ``shape``, ``nbytes()`` and
``dequantize(start, stop, dtype, device) -> fresh dense (stop - start, R, C) tensor``: either a plain
dense tensor (bf16 / fp16 / fp32) or a group-quantized one (``usaf.engine.quant.QuantizedTensor``). The result of
``dequantize`` is always a new tensor that the caller may modify in place (deltas are added to it).
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

    def dequantize(self, start: int = 0, stop: int | None = None, dtype=None, device=None) -> torch.Tensor:
        block = self.tensor[start:stop]
        dtype = dtype or block.dtype
        device = device or block.device
        return block.to(device=device, dtype=dtype, copy=True)

    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    def to(self, device, non_blocking: bool = False) -> DenseStack:
        return DenseStack(self.tensor.to(device, non_blocking=non_blocking))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"dense": self.tensor}


def freeze_stack(tensor: torch.Tensor, quant: str, group_size: int = 64):
    """Build the frozen form of an expert stack.

    Args:
        tensor: (E, R, C) weights in any float dtype.
        quant: "none" (keep the tensor's dtype), "4bit" or "8bit" (group-wise, ``usaf.quant``).
    """
    if quant in (None, "none"):
        return DenseStack(tensor)

    bits = {"4bit": 4, "8bit": 8}.get(quant)
    if bits is None:
        raise ValueError(f"unknown quantization {quant!r} (choose 4bit, 8bit or none)")
    return QuantizedTensor.quantize(tensor.detach(), QuantSpec(bits=bits, group_size=group_size))
