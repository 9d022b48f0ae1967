"""Sparse deltas over frozen expert stacks: sorted flat indices + a compact fp32 values vector.

The effective weight of an expert tensor is ``round_to_dtype(base + delta)``: the delta is added in
fp32 to the (dequantized) base at the active positions only, then rounded once to the compute dtype.
Merging into a checkpoint uses the same formula, so what trains is what is exported.
"""

from __future__ import annotations

import torch
from torch import nn


def index_dtype(numel: int) -> torch.dtype:
    """4-byte indices where they fit (2**31 elements per stack), else 8."""
    return torch.int32 if numel < 2**31 else torch.int64


class SparseDelta(nn.Module):
    """Trainable sparse delta over one frozen ``[E, R, C]`` expert stack, in its native layout.

    Buffers:
        indices: (N,) sorted flat indices into the stack (int32 when the stack has < 2**31 elements).
        offsets: (E + 1,) int64; expert ``e`` owns ``indices[offsets[e]:offsets[e + 1]]``.
    Parameters:
        values: (N,) fp32, the only trainable tensor.
    """

    def __init__(self, shape: tuple[int, ...], indices: torch.Tensor | None = None,
                 values: torch.Tensor | None = None, device=None):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        self.per_expert = 1
        for s in self.shape[1:]:
            self.per_expert *= s
        self.numel = self.shape[0] * self.per_expert
        if indices is None:
            indices = torch.empty(0, dtype=torch.int64)
        self.register_buffer("indices", torch.empty(0, dtype=index_dtype(self.numel), device=device))
        self.register_buffer("offsets", torch.zeros(self.shape[0] + 1, dtype=torch.int64, device=device))
        self.values = nn.Parameter(torch.empty(0, dtype=torch.float32, device=device))
        self.set(indices, values)

    def __len__(self) -> int:
        return self.indices.numel()

    @torch.no_grad()
    def set(self, indices: torch.Tensor, values: torch.Tensor | None = None) -> torch.Tensor:
        """Replace the active set. Indices are sorted here; values follow the sort.

        Returns the permutation applied (so callers can reorder optimizer state the same way).
        """
        device = self.indices.device
        indices = indices.to(device=device, dtype=torch.int64).reshape(-1)
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.numel):
            raise ValueError(f"delta index out of range for a stack of shape {self.shape}")
        indices, perm = torch.sort(indices)
        if indices.numel() > 1 and bool((indices[1:] == indices[:-1]).any()):
            raise ValueError("duplicate indices in a sparse delta")
        if values is None:
            values = torch.zeros(indices.numel(), dtype=torch.float32, device=device)
        else:
            values = values.to(device=device, dtype=torch.float32).reshape(-1)[perm.to(values.device)]
        self.indices = indices.to(index_dtype(self.numel))
        bounds = torch.arange(self.shape[0] + 1, device=device, dtype=torch.int64) * self.per_expert
        self.offsets = torch.searchsorted(indices, bounds)
        # A new Parameter (autograd caches a leaf's shape): optimizers swap it in, see UsafOptimizer.remap.
        self.values = nn.Parameter(values.contiguous(), requires_grad=self.values.requires_grad)
        return perm

    def span(self, start: int, stop: int) -> tuple[int, int]:
        """Range of ``indices``/``values`` owned by experts ``[start, stop)``."""
        # a host copy of the offsets, refreshed on change (a reference to the tensor, not its id: ids are reused)
        src, version = getattr(self, "_span_key", (None, None))
        if src is not self.offsets or version != self.offsets._version:
            self._span_list, self._span_key = self.offsets.tolist(), (self.offsets, self.offsets._version)
        return self._span_list[start], self._span_list[stop]

    def local(self, start: int, stop: int) -> torch.Tensor:
        """(n,) flat indices (the dtype of ``indices``) relative to expert ``start`` for experts ``[start, stop)``."""
        a, b = self.span(start, stop)
        idx = self.indices[a:b]
        return idx - start * self.per_expert if start else idx

    @torch.no_grad()
    def add_to(self, w: torch.Tensor, start: int, stop: int, values: torch.Tensor | None = None,
               sign: float = 1.0) -> torch.Tensor:
        """In place: ``w[active] = round(w[active] + sign * delta)`` for a dense block of experts.

        Args:
            w: (stop - start, R, C) contiguous dense weights of experts ``[start, stop)``.
        """
        a, b = self.span(start, stop)
        if a == b:
            return w
        v = (self.values if values is None else values)[a:b]
        idx = self.local(start, stop).long()
        flat = w.view(-1)
        upd = flat.index_select(0, idx).float().add_(v.to(flat.device), alpha=sign)
        flat.index_copy_(0, idx, upd.to(flat.dtype))
        return w

    @torch.no_grad()
    def to_dense(self, dtype=torch.float32) -> torch.Tensor:
        """Dense ``[E, R, C]`` delta (tests and debugging only)."""
        out = torch.zeros(self.numel, dtype=dtype, device=self.values.device)
        out[self.indices.long()] = self.values.to(dtype)
        return out.view(self.shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, active={len(self)}, density={len(self) / max(self.numel, 1):.5f}"
