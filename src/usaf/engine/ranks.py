"""Sums over data-parallel ranks in the order one process computes them, so N ranks give its numbers exactly.

Floating-point sums depend on their order. One process that runs micro-batches 0, 1, 2, ... accumulates
``acc = ((c0 + c1) + c2) + ...`` (autograd's ``.grad``, the selection's score buffers). With N ranks, rank r's
k-th micro-batch is global micro-batch ``k * N + r`` (``usaf.data.batches.Batches`` slices every global batch
by rank), so the same sum is the fold over k, then over r. An all-reduce adds in the backend's order instead.

:class:`RingFold` passes the running sum around the ring 0 -> 1 -> ... -> N-1 -> 0: at every micro-batch each
rank receives it, folds its own contribution in (in the accumulator's dtype, the way one process adds) and
passes it on; after the last micro-batch rank N-1 holds the sum and broadcasts it. Each rank receives the
accumulator once per micro-batch plus the broadcast, and holds one extra buffer: its own contribution.

:func:`all_gather_ragged` collects every rank's variable-length 1-D tensor, for merges that must see all
ranks' items in the global order (reselection's streamed candidates).

With one process (or no process group) nothing here is used: callers keep their one-process code path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist


def rank_world() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group; ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class RingFold:
    """Folds every rank's per-micro-batch contributions into ``acc`` in global micro-batch order.

    Args:
        acc: the accumulator tensors, equal on every rank at the start (e.g. zeros); rank 0 folds into them
            first, the other ranks receive into them (their own values are overwritten).
        fold: ``fold(acc, own)`` adds one contribution to the accumulator in place.

    Call :meth:`add` once per micro-batch on every rank (the same number of times), then :meth:`result`.
    """

    def __init__(self, acc: list[torch.Tensor], fold: Callable[[list[torch.Tensor], list[torch.Tensor]], None]):
        self.acc, self.fold = acc, fold
        self.rank, self.world = rank_world()
        self.k = 0  # micro-batches folded on this rank
        self.bytes = sum(t.numel() * t.element_size() for t in acc)  # one pass of the accumulator

    def _send(self, dst: int) -> None:
        for t in self.acc:
            dist.send(t, dst)

    def _recv(self, src: int) -> None:
        for t in self.acc:
            dist.recv(t, src)

    def add(self, own: list[torch.Tensor]) -> None:
        """Fold this rank's contribution of its next micro-batch (global micro-batch ``k * N + rank``)."""
        r, n = self.rank, self.world
        if n == 1:
            self.fold(self.acc, own)
            self.k += 1
            return
        last = n - 1
        if r == last and self.k > 0:  # the previous micro-batch's sum goes on to rank 0 (not after the last)
            self._send(0)
        if r > 0 or self.k > 0:
            self._recv(r - 1 if r > 0 else last)
        self.fold(self.acc, own)
        if r < last:
            self._send(r + 1)
        self.k += 1

    def result(self) -> list[torch.Tensor]:
        """The sum over every rank's micro-batches, on every rank (rank N-1 broadcasts it)."""
        if self.k and self.world > 1:
            for t in self.acc:
                dist.broadcast(t, src=self.world - 1)
        return self.acc


def all_gather_ragged(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's 1-D ``t`` (lengths may differ between ranks), in rank order."""
    _, world = rank_world()
    n = torch.tensor([t.numel()], dtype=torch.int64, device=t.device)
    sizes = [torch.empty_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    width = max(sizes)
    if width == 0:
        return [t[:0] for _ in range(world)]
    padded = torch.zeros(width, dtype=t.dtype, device=t.device)
    padded[: t.numel()] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return [p[:s] for p, s in zip(parts, sizes)]
