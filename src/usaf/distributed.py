"""Data parallelism on torch.distributed (launched by ``torchrun``): sparse deltas make it cheap.

Per step only the gradients of the compact delta values and of the routers cross the network: one flat
fp32 bucket, all-reduced once (O(active elements + router), independent of model size). Selection and
reselection reduce their importance scores across ranks before the top-k, so every rank picks the same
indices; a checksum of the active sets is compared across ranks after each (re)selection and a mismatch
stops the run. Only rank 0 writes files.

Backends: gloo on CPU, nccl on CUDA. Launch: ``torchrun --nproc-per-node N -m usaf train ...``; multi-node
with torchrun's usual ``--nnodes/--node-rank/--rdzv-endpoint`` flags (docs/distributed.md).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.world > 1


def init(device_spec: str = "auto") -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); a no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        cuda = torch.cuda.is_available() and device_spec not in ("cpu",)
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def device_for(d: Dist, spec: str) -> str:
    """Each rank's device: ``cuda:<local rank>`` when CUDA is used, else the spec."""
    if d.on and torch.cuda.is_available() and spec in ("auto", "cuda"):
        return f"cuda:{d.local_rank}"
    return spec


def all_sum(value: float | int, d: Dist) -> float:
    if not d.on:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())


def all_reduce_grads(params: list[torch.Tensor], d: Dist) -> int:
    """Sum the gradients of ``params`` over ranks in one flat fp32 bucket; returns bytes sent per rank."""
    if not d.on:
        return 0
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads]) if grads else torch.zeros(0)
    dist.all_reduce(flat)
    pos = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[pos : pos + n].view_as(g).to(g.dtype)
        pos += n
    return flat.numel() * 4


def all_reduce_(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.on:
        dist.all_reduce(t)
    return t


def check_same_selection(handle, d: Dist) -> str:
    """Checksum of every active set; raises if any rank differs."""
    h = hashlib.sha256()
    for key, delta in sorted(handle.deltas().items()):
        h.update(key.encode())
        h.update(delta.indices.cpu().numpy().tobytes())
    digest = h.hexdigest()[:16]
    if d.on:
        mine = torch.tensor([int(digest, 16) & ((1 << 62) - 1)], dtype=torch.int64)
        lo, hi = mine.clone(), mine.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        if lo.item() != hi.item():
            raise RuntimeError("ranks selected different active sets (checksum mismatch); stopping")
    return digest


def barrier(d: Dist) -> None:
    if d.on:
        dist.barrier()


def shutdown(d: Dist) -> None:
    if d.on and dist.is_initialized():
        dist.destroy_process_group()
