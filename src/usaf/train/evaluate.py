"""Perplexity, computed exactly as the training loss is: same masking, token-weighted."""

from __future__ import annotations

import math
import resource
from collections.abc import Iterable

import torch

from ..engine.loss import lm_loss
from .distributed import all_sum_many


class RouterLoad:
    """Tokens routed to each expert of each trainable MoE layer while active (a context manager): forward
    hooks on the experts modules read their ``top_k_index`` (T, K); positions whose ``mask`` is 0 (padding)
    are not counted. ``counts``: {decoder layer index: (E,) int64}, each token counted once per chosen
    expert (so a layer's counts sum to K x tokens)."""

    def __init__(self, handle):
        self.layers = handle.trainable_layers
        self.counts = {m.index: torch.zeros(m.experts.num_experts, dtype=torch.int64) for m in self.layers}
        self.mask: torch.Tensor | None = None  # (T,) bool of the batch being run, set by evaluate
        self._hooks = []

    def __enter__(self) -> RouterLoad:
        for m in self.layers:
            self._hooks.append(m.experts.register_forward_hook(self._hook(m.index), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _hook(self, layer: int):
        def hook(module, args, kwargs, out):
            idx = args[1] if len(args) > 1 else kwargs["top_k_index"]  # (T, K)
            if self.mask is not None and self.mask.numel() == idx.shape[0]:
                idx = idx[self.mask.to(idx.device)]
            self.counts[layer] += torch.bincount(idx.reshape(-1).cpu(), minlength=len(self.counts[layer]))

        return hook

    def to_lists(self, dist=None) -> dict[str, list[int]]:
        """``{"<layer>": [count per expert]}``, summed over the ranks."""
        keys = sorted(self.counts)
        flat = torch.cat([self.counts[k] for k in keys]).tolist() if keys else []
        if dist is not None and dist.on:
            flat = [int(round(x)) for x in all_sum_many(flat, dist)]
        out, pos = {}, 0
        for k in keys:
            n = len(self.counts[k])
            out[str(k)] = [int(x) for x in flat[pos : pos + n]]
            pos += n
        return out


@torch.no_grad()
def evaluate(model, batches: Iterable[dict], device=None, max_batches: int = 0, dist=None,
             load: RouterLoad | None = None) -> dict:
    """Token-weighted loss and perplexity over ``batches`` (collated dicts).

    Data parallel (``dist``, a :class:`usaf.train.distributed.Dist` with several ranks): each rank passes its shard
    of the eval set, and the summed loss and token count are added up over the ranks before the mean, so
    the result is the one process' over the whole set (every rank gets it). ``load``: a :class:`RouterLoad`
    (entered) that counts the routing of the non-padding tokens.

    Returns ``{"loss": float, "ppl": float, "tokens": int}``.
    """
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    total, count = 0.0, 0
    for i, batch in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        if load is not None:
            load.mask = batch["attention_mask"].reshape(-1).bool()
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
