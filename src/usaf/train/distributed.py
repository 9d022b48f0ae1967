"""Data parallelism on torch.distributed (launched by ``torchrun``): sparse deltas make it cheap.

Per step only the gradients of the compact delta values and of the routers cross the network: one flat
fp32 bucket (O(active elements + router), independent of model size), summed over the ranks in the order one
process adds its micro-batches (:class:`GradientSum`), so that N ranks train exactly like one process with the
same micro-batches. Selection and reselection combine their importance scores the same way
(``usaf.engine.select``), so every rank picks the one-process indices; a checksum of the active sets is
compared across ranks after each (re)selection and a mismatch stops the run. Only rank 0 writes files.

Backends: gloo on CPU, nccl on CUDA. Launch: ``torchrun --nproc-per-node N -m usaf train ...`` (or
``usaf train --nproc N``); multi-node with torchrun's usual ``--nnodes/--node-rank/--rdzv-endpoint`` flags
(docs/distributed.md).

Errors before training (settings, --out, data, loading) are agreed on: :func:`run_agreed` runs a phase on
every rank (or on rank 0 only) and, if it failed anywhere, raises on every rank, so that a user error seen by
rank 0 stops all ranks cleanly instead of leaving them blocked in a collective.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..engine.ranks import RingFold


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where collectives run
    owned: bool = False  # this process group was created by :func:`init` (and is destroyed by shutdown)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.world > 1


class PeerFailed(ValueError):
    """Another rank failed (its message is this one's); raised on the ranks that did not fail themselves."""


def init(device_spec: str = "auto") -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); a no-op otherwise.

    The backend is nccl when CUDA is used (then each rank uses ``cuda:<LOCAL_RANK>``), gloo otherwise. A
    process group that already exists (created by the caller) is used as it is.
    """
    local = int(os.environ.get("LOCAL_RANK", "0"))
    owned = False
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return Dist()
        cuda = torch.cuda.is_available() and not str(device_spec).startswith(("cpu", "mps"))
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        owned = True
    if dist.get_world_size() <= 1:
        return Dist(owned=owned)
    nccl = dist.get_backend() == "nccl"
    device = torch.device(f"cuda:{local}") if nccl else torch.device("cpu")
    return Dist(dist.get_rank(), dist.get_world_size(), local, device, owned)


def device_for(d: Dist, spec: str) -> str:
    """Each rank's device: ``cuda:<local rank>`` when CUDA is used (``auto``, ``cuda`` or ``cuda:N``: with
    several ranks each one takes its own GPU; choose them with CUDA_VISIBLE_DEVICES), else the spec."""
    if d.on and torch.cuda.is_available() and (spec in ("auto", "cuda") or spec.startswith("cuda:")):
        return f"cuda:{d.local_rank}"
    return spec


def all_sum(value: float | int, d: Dist) -> float:
    if not d.on:
        return value
    return all_sum_many([value], d)[0]


def all_sum_many(values: list[float], d: Dist) -> list[float]:
    """Sum a few numbers over ranks (float64, one collective)."""
    if not d.on:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.cpu().tolist()


class GradientSum:
    """The step's gradients of ``params`` summed over the ranks in the one-process order, bit for bit.

    One process accumulates ``.grad`` over its micro-batches in order, in each parameter's dtype. Rank r's k-th
    micro-batch is that process's micro-batch ``k * N + r``: after each of its backward passes a rank calls
    :meth:`add`, which takes the gradients off the parameters into one flat fp32 bucket (a has-gradient flag per
    parameter: one without a gradient on every rank keeps ``grad = None``, as in one process) and folds it
    into the running sum as it travels around the ranks (:class:`usaf.engine.ranks.RingFold`); the sum is
    added in the parameter's dtype (bf16 routers accumulate in bf16, as autograd does). :meth:`finish` puts
    the sum back on the parameters on every rank, and sums the micro-batches' losses in the same order.
    """

    def __init__(self, params: list[torch.Tensor], d: Dist):
        self.params, self.d = params, d
        device = params[0].device if params else d.device
        self.n = sum(p.numel() for p in params)
        self.acc = torch.zeros(self.n + len(params), dtype=torch.float32, device=device)  # gradients, flags
        self.own = torch.empty_like(self.acc)
        self.ring = RingFold([self.acc], self._fold)
        self.losses: list[float] = []

    def add(self, loss: float) -> None:
        """After this rank's backward of one micro-batch (its summed ``loss``): fold its gradients in."""
        own, pos = self.own, 0
        for i, p in enumerate(self.params):
            n = p.numel()
            if p.grad is None:
                own[pos : pos + n] = 0
            else:
                own[pos : pos + n] = p.grad.detach().reshape(-1)
            own[self.n + i] = float(p.grad is not None)
            p.grad = None
            pos += n
        self.ring.add([own])
        self.losses.append(float(loss))

    def _fold(self, acc: list[torch.Tensor], own: list[torch.Tensor]) -> None:
        acc, own = acc[0], own[0]
        has_acc, has_own = acc[self.n :].tolist(), own[self.n :].tolist()
        pos = 0
        for i, p in enumerate(self.params):
            n = p.numel()
            a, o = acc[pos : pos + n], own[pos : pos + n]
            if has_own[i] and has_acc[i] and p.dtype == torch.float32:  # grad += new
                a.add_(o)
            elif has_own[i] and has_acc[i]:  # in the parameter's dtype, as autograd accumulates
                a.copy_(a.to(p.dtype) + o.to(p.dtype))
            elif has_own[i]:
                a.copy_(o)
                acc[self.n + i] = 1.0
            pos += n

    def finish(self) -> tuple[int, float]:
        """Every rank's sum on the parameters. Returns ``(bytes of the bucket's passes, the summed loss)``."""
        acc = self.ring.result()[0]
        flags = acc[self.n :].tolist()
        pos = 0
        for i, p in enumerate(self.params):
            n = p.numel()
            p.grad = acc[pos : pos + n].view_as(p).to(p.dtype) if flags[i] else None
            pos += n
        world = self.ring.world
        mine = torch.tensor(self.losses, dtype=torch.float64, device=self.acc.device)
        every = torch.empty(world, len(self.losses), dtype=torch.float64, device=self.acc.device)
        dist.all_gather(list(every.unbind(0)), mine)
        loss = 0.0
        for x in every.t().reshape(-1).tolist():  # micro-batch k of rank r is micro-batch k * N + r
            loss += x
        sent = self.ring.bytes * (len(self.losses) + 1) + mine.numel() * 8 * world
        return sent, loss


def all_reduce_(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.on:
        dist.all_reduce(t)
    return t


def selection_digest(handle) -> str:
    """Checksum of every active set (delta names and sorted indices)."""
    h = hashlib.sha256()
    for key, delta in sorted(handle.sparse_deltas().items()):
        h.update(key.encode())
        h.update(delta.indices.cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def check_same_selection(handle, d: Dist) -> str:
    """Checksum of every active set; raises ``RuntimeError`` if any rank's differs."""
    digest = selection_digest(handle)
    if d.on:
        mine = torch.tensor([int(digest, 16) & ((1 << 62) - 1)], dtype=torch.int64, device=d.device)
        lo, hi = mine.clone(), mine.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        if lo.item() != hi.item():
            raise RuntimeError(f"rank {d.rank}: ranks selected different active sets (checksum mismatch, "
                               f"this rank {digest}); stopping")
    return digest


def _describe(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    if isinstance(e, (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, OSError)):
        return first or type(e).__name__
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def run_agreed(d: Dist, fn: Callable | None, main_only: bool = False):
    """Run ``fn()`` on every rank (``main_only``: on rank 0, whose result every rank then gets; ``fn=None``:
    this rank only takes part). If it raised anywhere, every rank raises: a rank that failed its own error,
    the others :class:`PeerFailed` with the first failing rank's message."""
    if not d.on:
        return fn() if fn is not None else None
    result, err = None, None
    if fn is not None and (d.main or not main_only):
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            err = e
    infos: list = [None] * d.world
    dist.all_gather_object(infos, None if err is None else _describe(err))
    failed = [(r, msg) for r, msg in enumerate(infos) if msg is not None]
    if failed:
        if err is not None:
            raise err
        r, msg = failed[0]
        raise PeerFailed(f"rank {r}: {msg}" if d.main else msg)
    if main_only:
        return broadcast_object(result, d)
    return result


def local_main_first(d: Dist, fn: Callable):
    """``fn()`` on each node's local rank 0 first (it fills the on-disk caches: quantized experts, frozen
    prefix), then on the other ranks (they map what it wrote); failures are agreed on."""
    first = d.local_rank == 0
    a = run_agreed(d, fn if first else None)
    b = run_agreed(d, None if first else fn)
    return a if first else b


def broadcast_object(obj, d: Dist):
    """Rank 0's ``obj`` on every rank (pickled)."""
    if not d.on:
        return obj
    box = [obj if d.main else None]
    dist.broadcast_object_list(box, src=0, device=d.device if d.device.type == "cuda" else None)
    return box[0]


def broadcast_tensors(tensors: dict[str, torch.Tensor] | None, d: Dist) -> dict[str, torch.Tensor]:
    """Rank 0's ``{name: tensor}`` (CPU) on every rank: the layout as an object, then the bytes of every
    tensor in one uint8 buffer (one collective)."""
    if not d.on:
        return tensors
    layout = None
    if d.main:
        layout = [(k, v.dtype, tuple(v.shape), v.numel() * v.element_size()) for k, v in tensors.items()]
    layout = broadcast_object(layout, d)
    total = sum(n for *_, n in layout)
    if d.main:
        parts = [v.detach().contiguous().cpu().reshape(-1).view(torch.uint8) for v in tensors.values()]
        buf = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8)
    else:
        buf = torch.empty(total, dtype=torch.uint8)
    buf = buf.to(d.device)
    dist.broadcast(buf, src=0)
    buf = buf.cpu()
    out, pos = {}, 0
    for k, dtype, shape, n in layout:
        out[k] = buf[pos : pos + n].clone().view(dtype).reshape(shape)
        pos += n
    return out


def barrier(d: Dist) -> None:
    if d.on:
        dist.barrier()


def shutdown(d: Dist) -> None:
    """Leave the process group (only one that :func:`init` created)."""
    if d.owned and dist.is_initialized():
        dist.destroy_process_group()
