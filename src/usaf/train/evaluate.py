"""Perplexity, computed exactly as the training loss is: same masking, token-weighted.

One code path for the run's own eval (``usaf train``: before, every ``--eval-every`` steps, after) and for
``usaf eval``: :func:`evaluate_examples` over :func:`eval_batches` (the eval rows in order, right-padded
batches of ``--batch-size``), so ``usaf eval --delta`` reproduces ``metrics.json``'s ``eval_ppl_after``.
"""

from __future__ import annotations

import math
import resource
from collections.abc import Iterable

import torch

from ..data.batches import collate
from ..engine.loss import lm_loss
from ..progress import progress_bar
from .distributed import Dist, all_sum_many


class RouterLoad:
    """Tokens routed to each expert of each trainable MoE layer while active (a context manager): forward
    hooks on the experts modules read their ``top_k_index`` (T, K); positions whose ``mask`` is 0 (padding)
    are not counted. ``counts``: {decoder layer index: (E,) int64}, each token counted once per chosen
    expert (so a layer's counts sum to K x tokens, less its routes to null experts, index >= E, which are
    not counted)."""

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
            idx = idx.reshape(-1).cpu()
            n = len(self.counts[layer])
            self.counts[layer] += torch.bincount(idx[idx < n], minlength=n)

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


def eval_batches(eval_ex, batch_size: int, pad: int, d: Dist | None = None, offset: int = 0,
                 max_batches: int = 0):
    """This rank's contiguous shard of the eval set (at most ``max_batches`` global batches of --batch-size x
    processes sequences), in batches of --batch-size; ``index`` is the row in the frozen-prefix cache (eval
    rows follow the train rows: ``offset``). With one process: the eval set in order."""
    rank, world = (d.rank, d.world) if d is not None else (0, 1)
    n = len(eval_ex) if not max_batches else min(len(eval_ex), max_batches * batch_size * world)
    lo, hi = n * rank // world, n * (rank + 1) // world
    for a in range(lo, hi, batch_size):
        idx = list(range(a, min(a + batch_size, hi)))
        batch = collate([eval_ex[i] for i in idx], pad)
        batch["index"] = torch.tensor(idx, dtype=torch.long) + offset
        yield batch


def evaluate_examples(model, eval_ex, batch_size: int, pad: int, device=None, d: Dist | None = None,
                      offset: int = 0, max_batches: int = 0, load: RouterLoad | None = None) -> dict:
    """:func:`evaluate` over :func:`eval_batches`: the run's eval, and ``usaf eval``'s (with a progress bar)."""
    rank, world = (d.rank, d.world) if d is not None else (0, 1)
    n = len(eval_ex) if not max_batches else min(len(eval_ex), max_batches * batch_size * world)
    mine = n * (rank + 1) // world - n * rank // world
    with progress_bar(-(-mine // batch_size), "eval (held-out batches)", unit="batch") as bar:
        def counted():
            for batch in eval_batches(eval_ex, batch_size, pad, d, offset, max_batches):
                yield batch
                bar.update(1)

        return evaluate(model, counted(), device, dist=d, load=load)


def peak_memory_mb(device: torch.device | str = "cpu") -> float:
    """Peak resident memory of this process (CPU) or peak allocated device memory (CUDA), in MB."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
