"""Choosing what trains: importance scores, and the budget allocated by ``usaf.engine.allocate``.

Importance of an expert weight = ``sum |dL/dW|`` (or ``sum (dL/dW)^2``) over a few calibration batches,
computed by a score hook the experts' backward calls with each expert's gradient factors. Layers are scored in groups from the
top, one layer per pass by default (``score_layers``), so that at most one layer's dense score buffers
exist at once (and never more than ``score_budget_mb``). Each scored layer keeps only its best candidates
(at most ``layer_share_cap`` times its fair share of the budget), then one global threshold picks the
budget over all candidates: the budget goes where the scores are, not a fixed fraction of every tensor.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable

import torch

from ..progress import progress_bar
from ..runtime import release_free_memory
from .allocate import (
    channel_pick,
    channel_scores,
    expert_pick,
    final_scores,
    layer_pick,
    pick,
    prune,
    quotas,
)
from .attention import select_linears
from .checkpointing import lean_passes
from .experts import UsafExperts
from .loss import token_mean_loss
from .model import MoeLayer, UsafModel
from .ranks import RingFold, all_gather_ragged, rank_world


def _groups(layers: list[MoeLayer], budget_bytes: int, elem_bytes: int,
            max_layers: int = 1) -> list[list[MoeLayer]]:
    groups, cur, used = [], [], 0
    for m in layers:
        size = sum(d.numel for d in m.experts.deltas.values()) * elem_bytes
        if cur and (used + size > budget_bytes or len(cur) >= max_layers):
            groups.append(cur)
            cur, used = [], 0
        cur.append(m)
        used += size
    if cur:
        groups.append(cur)
    return groups


def _layer_params(handle: UsafModel, m: MoeLayer) -> list:
    params = [m.experts.deltas[n].values for n in m.experts.names]
    if handle.config.train_router:
        params += list(m.router.parameters())
    return params


_CHUNK = 1 << 24
_SMALL = 1 << 18  # below this, torch.topk's temporaries are a few MB


def top_candidates(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest entries of a flat score buffer and their positions.

    Small buffers use ``torch.topk``. Larger ones first find a threshold from a strided sample (a quantile),
    keep what is above it, and take the exact top-k of those: no sort-sized temporaries of the buffer
    (``torch.topk`` on CPU holds about 16 bytes per element of its input, 31 MB for a 2M-element stack).
    """
    n = scores.numel()
    if n <= _SMALL or k >= n // 4:
        top = torch.topk(scores, k, sorted=False)
        return top.values, top.indices
    sample = scores[:: max(1, n // _SMALL)].float()
    frac = 1.5 * k / n
    while True:
        thr = torch.quantile(sample, max(0.0, 1.0 - frac)).to(scores.dtype)
        # chunked: no buffer-sized boolean mask
        idx = torch.cat([(c >= thr).nonzero().squeeze(1) + off
                         for off, c in zip(range(0, n, _CHUNK), scores.split(_CHUNK))])
        if idx.numel() >= k or frac >= 1.0:
            break
        frac = min(1.0, frac * 2)
    vals = scores[idx]
    if vals.numel() > k:
        top = torch.topk(vals, k, sorted=False)
        return top.values, idx[top.indices]
    return vals, idx


class DenseScores:
    """Score hook: ``sum |dL/dW|`` (``power`` 1), ``sum (dL/dW)^2`` (2) or ``sum dL/dW`` (0, signed) of one
    experts module, accumulated into dense ``[E, R, C]`` buffers of ``dtype`` (one per stack)."""

    def __init__(self, ex: UsafExperts, dtype: torch.dtype, power: int):
        self.buffers = {n: torch.zeros(ex.shape(n), dtype=dtype, device=ex.deltas[n].values.device)
                        for n in ex.names}
        self.power = power

    def __call__(self, name: str, e: int, left: torch.Tensor, right: torch.Tensor) -> None:
        buf = self.buffers[name]
        dw = left.t() @ right
        if self.power == 1:
            buf[e] += dw.abs().to(buf.dtype)
        elif self.power == 2:
            buf[e] += dw.float().square().to(buf.dtype)
        else:
            buf[e] += dw.to(buf.dtype)


class StreamedCandidates:
    """Score hook: each expert's top ``k[name]`` of ``|dL/dW|`` among its inactive elements, reduced at once in
    the backward (one expert's dense gradient exists for a moment, never a layer's)."""

    def __init__(self, ex: UsafExperts, k: dict[str, int]):
        self.ex, self.k = ex, k
        self.found: dict[str, list] = {}
        self.ends: dict[str, list[int]] = {n: [] for n in ex.names}  # len(found[n]) after each batch

    def __call__(self, name: str, e: int, left: torch.Tensor, right: torch.Tensor) -> None:
        g = (left.t() @ right).float().abs().view(-1)
        delta = self.ex.deltas[name]
        g[delta.local(e, e + 1)] = -1.0
        top = torch.topk(g, min(self.k[name], g.numel()), sorted=False)
        keep = top.values > 0
        self.found.setdefault(name, []).append((top.values[keep], top.indices[keep] + e * delta.per_expert))

    def end_batch(self) -> None:
        for n in self.ex.names:
            self.ends[n].append(len(self.found.get(n, [])))

    def batches(self, name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's candidates of ``name`` per batch: ``(scores, flat indices)``, in batch order."""
        found, out, start = self.found.get(name, []), [], 0
        dev = self.ex.deltas[name].values.device
        for end in self.ends[name]:
            part = found[start:end]
            out.append((torch.cat([f[0] for f in part]) if part else torch.zeros(0, device=dev),
                        torch.cat([f[1] for f in part]) if part else torch.zeros(0, dtype=torch.int64, device=dev)))
            start = end
        return out

    def best(self, name: str, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The ``k`` best (summed over batches) candidates of a stack: (scores, flat indices)."""
        found = self.found.get(name, [])
        if not found:
            return None
        sc = torch.cat([f[0] for f in found])
        ix, inv = torch.unique(torch.cat([f[1] for f in found]), return_inverse=True)
        sc = torch.zeros(ix.numel(), dtype=sc.dtype, device=sc.device).scatter_reduce(0, inv, sc, "sum")
        top = torch.topk(sc, min(sc.numel(), k), sorted=False)
        return top.values, ix[top.indices]


def merge_ranks(hooks: list[StreamedCandidates]) -> None:
    """Data parallel: every rank's streamed candidates on every rank, batch by batch in the global order
    (batch k of rank r is batch ``k * N + r`` of one process), so that :meth:`StreamedCandidates.best` merges
    exactly what one process would have found. One gather of all lists (scores, indices, lengths)."""
    _, world = rank_world()
    stacks = [(h, n) for h in hooks for n in h.ex.names]
    per = [h.batches(n) for h, n in stacks]  # [stack][batch] -> (scores, indices)
    n_batches = len(per[0]) if per else 0
    dev = hooks[0].ex.deltas[hooks[0].ex.names[0]].values.device
    lengths = torch.tensor([[len(per[s][k][0]) for k in range(n_batches)] for s in range(len(stacks))],
                           dtype=torch.int64, device=dev).reshape(-1)
    scores = torch.cat([sc for batches in per for sc, _ in batches] or [torch.zeros(0, device=dev)])
    index = torch.cat([ix for batches in per for _, ix in batches] or [torch.zeros(0, dtype=torch.int64, device=dev)])
    lengths, scores, index = (all_gather_ragged(t) for t in (lengths, scores, index))
    lengths = [x.view(len(stacks), n_batches).tolist() for x in lengths]
    parts = [(sc.split([n for row in ln for n in row]), ix.split([n for row in ln for n in row]))
             for ln, sc, ix in zip(lengths, scores, index)]  # per rank: flat list over (stack, batch)
    for s, (h, n) in enumerate(stacks):
        h.found[n] = [(parts[r][0][s * n_batches + k], parts[r][1][s * n_batches + k])
                      for k in range(n_batches) for r in range(world)]


def _passes(handle: UsafModel, batches: list[dict], loss_fn: Callable, hooks: dict, only=None,
            after_batch: Callable | None = None) -> None:
    """Forward + backward over ``batches`` with a score hook on the experts of ``only`` (default: every
    trainable layer), then ``after_batch()`` after each. Only those layers' parameters require grad: autograd
    stops below the lowest of them."""
    model = handle.model
    layers = only or handle.trainable_layers
    params = handle.trainable_parameters()
    keep = None if only is None else {id(p) for m in only for p in _layer_params(handle, m)}
    flags = [p.requires_grad for p in params]
    with contextlib.ExitStack() as stack:
        for m in layers:
            stack.enter_context(m.experts.mode_as(score_hook=hooks[m.index]))
        try:
            if keep is not None:
                for p in params:
                    p.requires_grad_(id(p) in keep)
            for batch in batches:
                loss_fn(model, batch).backward()
                for p in params:
                    p.grad = None
                if after_batch is not None:
                    after_batch()
        finally:
            for p, f in zip(params, flags):
                p.requires_grad_(f)


def scored_layers(handle: UsafModel, batches: list[dict], loss_fn: Callable):
    """Yield ``(layer, {stack: flat scores})`` (:func:`final_scores`) for every trainable layer, from the top, scoring
    ``score_layers`` layers per pass within ``score_budget_mb`` (``UsafConfig.score`` picks the score)."""
    cfg = handle.config
    layers = list(reversed(handle.trainable_layers))
    dtype = torch.float32 if cfg.score_dtype == "fp32" else torch.bfloat16
    power = {"abs": 1, "gw": 1, "sq": 2, "signed": 0, "random": 1}[cfg.score]
    _, world = rank_world()
    with progress_bar(len(layers), "selection (scoring layers)", unit="layer") as bar:
        for group in _groups(layers, cfg.score_budget_mb << 20, dtype.itemsize, max(1, cfg.score_layers)):
            hooks = {m.index: DenseScores(m.experts, dtype, power) for m in group}
            if cfg.score != "random" and world == 1:
                _passes(handle, batches, loss_fn, hooks, only=group)
            elif cfg.score != "random":  # data parallel: the hooks score this rank's batch, folded in order
                _fold_ranks(handle, batches, loss_fn, hooks, group)
            for m in group:
                yield m, final_scores(m, hooks[m.index].buffers, cfg.score, seed=cfg.score_seed)
                bar.update(1)
            del hooks


def _fold_ranks(handle: UsafModel, batches: list[dict], loss_fn: Callable, hooks: dict[int, DenseScores],
                group: list[MoeLayer]) -> None:
    """Data parallel scoring: every rank's per-batch scores added to the sum in the global batch order (batch
    k of rank r is one process's batch ``k * N + r``), in the buffers' dtype, as one process adds them. Each
    rank holds a second set of the group's buffers (the running sum); the hooks' own ones are reset per batch."""
    own = [hooks[m.index].buffers[n] for m in group for n in m.experts.names]
    acc = [torch.zeros_like(b) for b in own]

    def fold(acc: list[torch.Tensor], own: list[torch.Tensor]) -> None:
        for a, o in zip(acc, own):
            a += o

    ring = RingFold(acc, fold)

    def after_batch() -> None:
        ring.add(own)
        for b in own:
            b.zero_()

    _passes(handle, batches, loss_fn, hooks, only=group, after_batch=after_batch)
    ring.result()
    for m in group:
        names = m.experts.names
        hooks[m.index].buffers = dict(zip(names, acc[: len(names)]))
        acc = acc[len(names):]


def candidates(handle: UsafModel, batches: Iterable[dict], budget: int, exclude_active: bool = False,
               loss_fn: Callable | None = None, n_batches: int | None = None,
               streaming: bool = False) -> list[tuple]:
    """Score the trainable stacks and return each one's top candidates (the ``global`` allocation).

    Two modes, both a score hook on the experts (``UsafExperts.mode_as(score_hook=...)``):
      - accumulated (default): :class:`DenseScores` through :func:`scored_layers`;
      - streaming (reselection, one pass over all layers): :class:`StreamedCandidates`, no layer-sized buffer;
        data parallel, every rank's candidates are merged in the one-process order (:func:`merge_ranks`).

    Returns:
        list of ``(layer, stack name, scores (k,), flat indices into the stack (k,))``.
    """
    cfg = handle.config
    loss_fn = loss_fn or token_mean_loss
    batches = list(batches) if n_batches is None else [b for _, b in zip(range(n_batches), batches)]
    if not batches:
        raise ValueError("no calibration batches for selection")
    total = handle.expert_elements()
    out = []
    model = handle.model
    was_training = model.training
    model.train()

    def cap(numel: int) -> int:  # numel: the elements of one stack's experts that compute
        return max(1, math.ceil(cfg.layer_share_cap * budget * numel / max(total, 1)))

    with lean_passes(handle):  # every scoring pass keeps only what a checkpointed step keeps
        try:
            if streaming:
                layers = handle.trainable_layers
                hooks = {m.index: StreamedCandidates(m.experts, {n: math.ceil(cap(m.experts.live_numel(n)) /
                                                                              m.experts.num_experts * 2)
                                                                  for n in m.experts.names})
                         for m in layers}
                if rank_world()[1] == 1:
                    _passes(handle, batches, loss_fn, hooks)
                else:
                    _passes(handle, batches, loss_fn, hooks,
                            after_batch=lambda: [h.end_batch() for h in hooks.values()])
                    merge_ranks(list(hooks.values()))
                for m in reversed(layers):
                    for n in m.experts.names:
                        best = hooks[m.index].best(n, cap(m.experts.live_numel(n)))
                        if best is not None:
                            out.append((m, n, *best))
                return out
            for m, scores in scored_layers(handle, batches, loss_fn):
                for n in m.experts.names:
                    sc = scores[n]
                    if exclude_active:
                        sc[m.experts.deltas[n].indices.long()] = -1.0
                    vals, idx = top_candidates(sc, min(sc.numel(), cap(m.experts.live_numel(n))))
                    keep = vals >= 0
                    out.append((m, n, vals[keep].float(), idx[keep]))
                out = prune(out, budget)
                del scores, sc  # not held through the next group's passes
        finally:
            model.train(was_training)
    return out


def select(handle: UsafModel, batches: Iterable[dict], density: float | None = None,
           loss_fn: Callable | None = None, n_batches: int | None = None) -> dict:
    """Initial selection: score, then activate the ``density`` budget with zero deltas, spread by
    ``UsafConfig.allocation`` (:mod:`usaf.engine.allocate`).

    Returns a report: budget, active, seconds, per-layer active counts.
    """
    t0 = time.perf_counter()
    cfg = handle.config
    budget = handle.budget(density)
    batches = list(batches) if n_batches is None else [b for _, b in zip(range(n_batches), batches)]
    n_batches = None
    if cfg.allocation == "global":
        chosen = pick(candidates(handle, batches, budget, loss_fn=loss_fn, n_batches=n_batches), budget)
    else:
        chosen = _allocate(handle, batches, budget, loss_fn or token_mean_loss, n_batches)
    per_layer = {}
    for m in handle.trainable_layers:
        for n in m.experts.names:
            idx = chosen.get((m.index, n), torch.empty(0, dtype=torch.int64))
            m.experts.deltas[n].set(idx)
        per_layer[m.index] = sum(len(m.experts.deltas[n]) for n in m.experts.names)
    linears = select_linears(handle, batches, loss_fn or token_mean_loss)  # attention + shared experts
    release_free_memory()
    return {"budget": budget, "active": handle.active(), "seconds": time.perf_counter() - t0,
            "per_layer": per_layer, "attention_active": linears["attention"], "shared_active": linears["shared"]}


def _allocate(handle: UsafModel, batches, budget: int, loss_fn: Callable, n_batches: int | None) -> dict:
    """The ``layer`` / ``expert`` / ``channel`` allocations (exact budget; see :mod:`usaf.engine.allocate`)."""
    cfg = handle.config
    batches = list(batches) if n_batches is None else [b for _, b in zip(range(n_batches), batches)]
    if not batches:
        raise ValueError("no calibration batches for selection")
    layers = handle.trainable_layers
    sizes = {m.index: [m.experts.deltas[n].per_expert for n in m.experts.names] for m in layers}
    if cfg.allocation == "layer":
        share = dict(zip((m.index for m in layers), quotas([sum(sizes[m.index]) * m.experts.num_experts
                                                            for m in layers], budget)))
    elif cfg.allocation == "expert":
        units = [(m.index, e) for m in layers for e in range(m.experts.num_experts)]
        share = dict(zip(units, quotas([sum(sizes[i]) for i, _ in units], budget)))
    out, channels = {}, {}
    model = handle.model
    was_training = model.training
    model.train()
    with lean_passes(handle):
        try:
            for m, scores in scored_layers(handle, batches, loss_fn):
                if cfg.allocation == "layer":
                    picked = layer_pick(m, scores, share[m.index])
                elif cfg.allocation == "expert":
                    picked = expert_pick(m, scores, [share[(m.index, e)] for e in range(m.experts.num_experts)])
                else:
                    channels[m.index] = channel_scores(m, scores).cpu()
                    picked = {}
                out.update({(m.index, n): idx for n, idx in picked.items()})
                del scores  # not held through the next group's passes
        finally:
            model.train(was_training)
    if cfg.allocation == "channel":
        out = channel_pick(layers, channels, budget)
    return out
