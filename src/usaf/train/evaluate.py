"""Perplexity, computed exactly as the training loss is: same masking, token-weighted."""

from __future__ import annotations

import math
import resource
from collections.abc import Iterable

import torch

from ..engine.loss import lm_loss
from .distributed import all_sum_many


@torch.no_grad()
def evaluate(model, batches: Iterable[dict], device=None, max_batches: int = 0, dist=None) -> dict:
    """Token-weighted loss and perplexity over ``batches`` (collated dicts).

    Data parallel (``dist``, a :class:`usaf.train.distributed.Dist` with several ranks): each rank passes its shard
    of the eval set, and the summed loss and token count are added up over the ranks before the mean, so
    the result is the one process' over the whole set (every rank gets it).

    Returns ``{"loss": float, "ppl": float, "tokens": int}``.
    """
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    total, count = 0.0, 0
    for i, batch in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        s, n = lm_loss(model, batch, device)
        total += float(s)
        count += int(n)
    model.train(was_training)
    if dist is not None and dist.on:
        total, count = all_sum_many([total, count], dist)
        count = int(round(count))
    loss = total / max(count, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": count}


def peak_memory_mb(device: torch.device | str = "cpu") -> float:
    """Peak resident memory of this process (CPU) or peak allocated device memory (CUDA), in MB."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
