"""Choosing what trains: importance scores, and the budget allocated by ``usaf.engine.allocate``.

Importance of an expert weight = ``sum |dL/dW|`` (or ``sum (dL/dW)^2``, ...) over a few calibration batches.
Selection runs **one forward and one backward per calibration batch** for every trainable layer at once
(:func:`calibrate`): each experts call records its input, routing and output gradient
(``usaf.engine.experts.Captured``), and the shared-expert and attention linears add their dense weight
gradients (``usaf.engine.attention.LinearScores``). Then, layer by layer and a group of experts at a time, the
recorded calls' backward runs again for those experts only (``ExpertsMode.replay``: no forward, no input
gradient) with a score hook that sums each expert's dense weight gradient into a buffer of the group's experts
(at most ``score_budget_mb``; never a layer's). Each group's best candidates are merged into the layer's (at most
``layer_share_cap`` times its fair share of the budget), then one global threshold picks the budget over all
candidates: the budget goes where the scores are, not a fixed fraction of every tensor. The sums are exact:
the same as a pass per layer would give, and the same on N ranks as in one process.

RigL reselection (``usaf.engine.rigl``) scores in one streaming pass instead (:class:`StreamedCandidates`).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from ..progress import progress_bar
from ..runtime import release_free_memory
from .allocate import (
    channel_pick,
    channel_scores,
    expert_pick,
    final_scores,
    kth_largest,
    layer_pick,
    pick,
    prune,
    quotas,
    score_dtype,
    stack_pick,
)
from .attention import LinearScores, random_scores, scored_linears, select_linears
from .checkpointing import lean_passes
from .delta import index_dtype
from .experts import Captured, ExpertsFunction, UsafExperts
from .loss import token_mean_loss
from .model import MoeLayer, UsafModel
from .ranks import RingFold, all_gather_ragged, rank_world
from .records import CallRecords
from .routing import Routing

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
    experts module, accumulated into dense buffers of ``dtype`` (one per stack): ``[E, R, C]`` (the stack's
    shape), or ``[stop - first, R, C]`` for the experts ``[first, stop)`` only. Power 3 (``adam``) keeps both
    ``sum dL/dW`` and, under ``"<stack>::sq"``, ``sum (dL/dW)^2``."""

    def __init__(self, ex: UsafExperts, dtype: torch.dtype, power: int, first: int = 0, stop: int | None = None):
        dev = ex.deltas[ex.names[0]].values.device
        self.first, self.stop = first, ex.num_experts if stop is None else stop  # the experts it scores
        self.buffers = {n: torch.zeros(ex.shape(n) if stop is None else (stop - first, *ex.shape(n)[1:]),
                                       dtype=dtype, device=dev) for n in ex.names}
        if self.per_stack(power) == 2:
            self.buffers.update({f"{n}::sq": torch.zeros_like(self.buffers[n]) for n in ex.names})
        self.power = power

    @staticmethod
    def per_stack(power: int) -> int:
        """Dense buffers per stack: 2 for ``adam`` (power 3), else 1."""
        return 2 if power == 3 else 1

    def __call__(self, name: str, e: int, left: torch.Tensor, right: torch.Tensor) -> None:
        buf = self.buffers[name]
        dw = left.t() @ right
        e -= self.first
        if self.power == 1:
            buf[e] += dw.abs().to(buf.dtype)
        elif self.power == 2:
            buf[e] += dw.float().square().to(buf.dtype)
        else:
            buf[e] += dw.to(buf.dtype)
            if self.power == 3:
                sq = self.buffers[f"{name}::sq"]
                sq[e] += dw.float().square().to(sq.dtype)


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


def _passes(handle: UsafModel, batches: list[dict], loss_fn: Callable, hooks: dict,
            after_batch: Callable | None = None) -> None:
    """Forward + backward over ``batches`` with a score hook on the experts of every trainable layer, then
    ``after_batch()`` after each (RigL's streaming pass)."""
    model = handle.model
    params = handle.trainable_parameters()
    with contextlib.ExitStack() as stack:
        for m in handle.trainable_layers:
            stack.enter_context(m.experts.mode_as(score_hook=hooks[m.index]))
        for batch in batches:
            loss_fn(model, batch).backward()
            for p in params:
                p.grad = None
            if after_batch is not None:
                after_batch()


@dataclass
class Calibration:
    """What :func:`calibrate` leaves: per trainable layer, its experts' calls of each batch, and the scored
    linears' scores (None when there are none)."""

    calls: CallRecords  # layer index -> [batch][call] (kept on disk until a layer is scored)
    linears: dict[str, torch.Tensor] | None

    def close(self) -> None:
        """Delete the records' file."""
        self.calls.close()


def calibrate(handle: UsafModel, batches: list[dict], loss_fn: Callable, linears: bool = True,
              spill: bool = True) -> Calibration:
    """One forward and one backward per calibration batch over every trainable layer (checkpointed, lean
    experts): each experts call is recorded (:class:`Captured`: about ``2 T H`` values per layer and batch; with
    ``spill``, written to a temporary file as each batch's backward ends: :class:`CallRecords`) and, with
    ``linears``, the shared-expert and attention linears' scores are summed. ``random`` scores need no pass."""
    cfg = handle.config
    lins = scored_linears(handle) if linears else {}
    model, layers = handle.model, handle.trainable_layers
    if cfg.score == "random":
        return Calibration(CallRecords([], spill=False), random_scores(handle, lins) if lins else None)
    sink: dict[int, list[Captured]] = {m.index: [] for m in layers}
    calls = CallRecords([m.index for m in layers], spill=spill)
    scores = LinearScores(handle, lins) if lins else None
    params = handle.trainable_parameters()
    was_training = model.training
    model.train()
    with lean_passes(handle), contextlib.ExitStack() as stack:
        for m in layers:
            stack.enter_context(m.experts.mode_as(capture=sink[m.index]))
        try:
            if scores is not None:
                scores.watch(True)
            for batch in batches:
                loss_fn(model, batch).backward()
                for p in params:
                    p.grad = None
                if scores is not None:
                    scores.add_batch()
                for i, got in sink.items():
                    # a checkpoint's recomputation may record a second call that no backward completes
                    calls.add(i, [c for c in got if c.dout is not None])
                    got.clear()
        except BaseException:
            calls.close()
            raise
        finally:
            if scores is not None:
                scores.watch(False)
            model.train(was_training)
    return Calibration(calls, scores.result() if scores is not None else None)


def _replay(m: MoeLayer, calls: Iterable[list[Captured]], hook: DenseScores,
            after_batch: Callable | None = None) -> None:
    """Run the backward of a layer's recorded calls again for the experts ``hook`` scores only (routes to the
    others become null routes), with ``hook``, batch by batch (``after_batch()`` after each)."""
    ex = m.experts
    first, stop, num = hook.first, hook.stop, ex.num_experts
    with ex.mode_as(score_hook=hook, replay=True, lean=True, capture=None), torch.enable_grad():
        for batch in calls:
            for c in batch:
                idx = c.index if first == 0 and stop >= num else \
                    torch.where((c.index >= first) & (c.index < stop), c.index, num)
                # the routing's block size depends on the number of routes, not on where they go: the
                # replayed experts compute in the same blocks as in the pass (the same factors, bit for bit)
                route = Routing.build(idx, num)
                values = [ex.deltas[n].values.detach().requires_grad_() for n in ex.names]
                out = ExpertsFunction.apply(c.x, c.weights, ex, route, c.on_input, None, *values)
                out.backward(c.dout)
            if after_batch is not None:
                after_batch()


def _score(m: MoeLayer, calls: Iterable[list[Captured]], hook: DenseScores) -> None:
    """Fill ``hook``'s buffers from the recorded calls. Data parallel, every rank's per-batch scores are added
    to the sum in the global batch order (batch k of rank r is one process's batch ``k * N + r``), in the
    buffers' dtype, as one process adds them: each rank holds a second set of the buffers (the running sum)."""
    if rank_world()[1] == 1:
        _replay(m, calls, hook)
        return
    names = list(hook.buffers)
    own = [hook.buffers[n] for n in names]
    acc = [torch.zeros_like(b) for b in own]

    def fold(acc: list[torch.Tensor], own: list[torch.Tensor]) -> None:
        for a, o in zip(acc, own):
            a += o

    ring = RingFold(acc, fold)

    def after_batch() -> None:
        ring.add(own)
        for b in own:
            b.zero_()

    _replay(m, calls, hook, after_batch)
    ring.result()
    hook.buffers = dict(zip(names, acc))


def _dtype_power(handle: UsafModel) -> tuple[torch.dtype, int]:
    cfg = handle.config
    return score_dtype(cfg), {"abs": 1, "gw": 1, "sq": 2, "signed": 0, "adam": 3, "random": 1}[cfg.score]


def scored_layers(handle: UsafModel, cal: Calibration):
    """Yield ``(layer, {stack: flat scores})`` (:func:`final_scores`, whole layers) for every trainable layer,
    from the top (the ``layer`` / ``expert`` / ``stack`` / ``channel`` allocations)."""
    cfg = handle.config
    dtype, power = _dtype_power(handle)
    layers = list(reversed(handle.trainable_layers))
    with progress_bar(len(layers), "selection (scoring layers)", unit="layer") as bar:
        for m in layers:
            hook = DenseScores(m.experts, dtype, power)
            if cfg.score != "random":
                _score(m, cal.calls[m.index], hook)
            yield m, final_scores(m, hook.buffers, cfg.score, seed=cfg.score_seed)
            bar.update(1)
            del hook


class _Pool:
    """The best ``k`` candidates of one stack, at least ``floor``, over the groups of experts scored one after
    another. A group adds what scores at least the floor, or once the pool holds ``k``, its ``k``-th best (one
    comparison per element, no top-k over the group; with neither, the group's own best ``k``); past ``2k``
    entries the pool is cut back to its ``k`` best, among those equal to the ``k``-th the first ones in the pool's
    order (:func:`usaf.engine.allocate.top_k_masks`' rule, so what the final pick can take from the pool is
    unchanged); once it holds ``k``, a group adds only what scores above the ``k``-th (an equal one would come
    after the kept ties). The pool never holds more than ``2k`` entries: keeping every tie let it grow to the
    whole stack when most scores are 0 (a layer whose experts real text mostly leaves unvisited: 1.6 GB at
    Qwen3-30B-A3B's width). Entries keep the scores' dtype (bf16 by default) and the stack's index dtype (int32
    below 2^31 elements): 6 bytes each."""

    def __init__(self, k: int, floor: float = 0.0, index: torch.dtype = torch.int64):
        self.k, self.vals, self.idx, self.n, self.thr, self.full = k, [], [], 0, floor, False
        self.index = index

    def add(self, sc: torch.Tensor, base: int) -> None:
        """Flat scores ``sc`` of a group whose first element is the stack's element ``base`` (-1: never)."""
        if not self.full and self.thr <= 0:  # nothing to compare with yet: the group's own best k
            vals, idx = top_candidates(sc, min(sc.numel(), self.k))
            keep = vals >= 0
            vals, idx = vals[keep], idx[keep]
        else:
            above = torch.gt if self.full else torch.ge  # full: equal ones come after the kept ties
            idx = torch.cat([above(c, self.thr).nonzero().squeeze(1) + off
                             for off, c in zip(range(0, sc.numel(), _CHUNK), sc.split(_CHUNK))])
            vals = sc[idx]
        self.vals.append(vals)
        self.idx.append((idx + base).to(self.index))
        self.n += idx.numel()
        if self.n > 2 * self.k or (not self.full and self.n >= self.k):
            self._cut()

    def _cut(self) -> None:
        vals, idx = torch.cat(self.vals), torch.cat(self.idx)
        if vals.numel() >= self.k:  # the k best; of those equal to the k-th, the first ``ties`` in order
            thr, ties = kth_largest([vals], self.k)
            eq = vals == thr
            keep = (vals > thr) | (eq & (eq.cumsum(0, dtype=torch.int32) <= ties))
            vals, idx = vals[keep], idx[keep]
            self.full, self.thr = True, max(self.thr, thr)
        self.vals, self.idx, self.n = [vals], [idx], vals.numel()

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._cut()
        return self.vals[0], self.idx[0]


def layer_candidates(handle: UsafModel, m: MoeLayer, cal: Calibration, caps: dict[str, int],
                     exclude_active: bool = False, floor: float = 0.0) -> list[tuple]:
    """One layer's best ``caps[stack]`` candidates per stack that score at least ``floor``: ``[(layer, stack,
    scores, flat indices)]``, scored a group of experts at a time (their buffers within ``score_budget_mb``; the
    whole layer for ``random``)."""
    cfg = handle.config
    ex = m.experts
    dtype, power = _dtype_power(handle)
    per = {n: ex.deltas[n].per_expert for n in ex.names}
    step = max(1, (cfg.score_budget_mb << 20) // max(1, sum(per.values()) * dtype.itemsize * DenseScores.per_stack(power)))
    if cfg.score == "random" or step >= ex.num_experts:
        step = ex.num_experts
    pools = {n: _Pool(caps[n], floor, index_dtype(ex.deltas[n].numel)) for n in ex.names}
    for first in range(0, ex.num_experts, step):
        stop = min(ex.num_experts, first + step)
        whole = first == 0 and stop == ex.num_experts
        hook = DenseScores(ex, dtype, power, first, None if whole else stop)
        if cfg.score != "random":
            _score(m, cal.calls[m.index], hook)
        scores = final_scores(m, hook.buffers, cfg.score, seed=cfg.score_seed, first=first)
        for n in ex.names:
            sc, base = scores[n], first * per[n]
            if exclude_active:
                act = ex.deltas[n].indices.long() - base
                sc[act[(act >= 0) & (act < sc.numel())]] = -1.0
            pools[n].add(sc, base)
        del hook, scores
    best = {n: pool.result() for n, pool in pools.items()}
    return [(m, n, *b) for n, b in best.items() if b[0].numel()]


def candidates(handle: UsafModel, batches: Iterable[dict], budget: int, exclude_active: bool = False,
               loss_fn: Callable | None = None, n_batches: int | None = None,
               streaming: bool = False, calibration: Calibration | None = None) -> list[tuple]:
    """Score the trainable stacks and return each one's top candidates (the ``global`` allocation).

    Two modes, both a score hook on the experts (``UsafExperts.mode_as(score_hook=...)``):
      - exact (default): :func:`calibrate` (one forward and backward per batch; ``calibration``: already
        run), then :func:`layer_candidates` replays each layer a group of experts at a time;
      - streaming (reselection, one pass over all layers): :class:`StreamedCandidates`, no layer-sized buffer;
        data parallel, every rank's candidates are merged in the one-process order (:func:`merge_ranks`).

    Returns:
        list of ``(layer, stack name, scores (k,), flat indices into the stack (k,))``.
    """
    cfg = handle.config
    loss_fn = loss_fn or token_mean_loss
    batches = list(batches) if n_batches is None else [b for _, b in zip(range(n_batches), batches)]
    if not batches and calibration is None:
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
            cal = calibration or calibrate(handle, batches, loss_fn, linears=False)
            own = calibration is None  # made here: its file is deleted here
            layers = list(reversed(handle.trainable_layers))
            with progress_bar(len(layers), "selection (scoring layers)", unit="layer") as bar:
                floor = 0.0  # once the pool holds the budget, what scores below its worst can never be picked
                for m in layers:
                    caps = {n: cap(m.experts.live_numel(n)) for n in m.experts.names}
                    out = prune(out + layer_candidates(handle, m, cal, caps, exclude_active, floor), budget)
                    if sum(c[2].numel() for c in out) >= budget:
                        floor = max(floor, min(float(c[2].min()) for c in out))
                    bar.update(1)
            if own:
                cal.close()
        finally:
            model.train(was_training)
    return out


def select(handle: UsafModel, batches: Iterable[dict], density: float | None = None,
           loss_fn: Callable | None = None, n_batches: int | None = None) -> dict:
    """Initial selection: one calibration pass (:func:`calibrate`), then the ``density`` budget activated with
    zero deltas, spread by ``UsafConfig.allocation`` (:mod:`usaf.engine.allocate`), and the shared-expert and
    attention budgets from the same pass.

    Returns a report: budget, active, seconds, per-layer active counts.
    """
    t0 = time.perf_counter()
    cfg = handle.config
    budget = handle.budget(density)
    loss_fn = loss_fn or token_mean_loss
    batches = list(batches) if n_batches is None else [b for _, b in zip(range(n_batches), batches)]
    if not batches:
        raise ValueError("no calibration batches for selection")
    cal = calibrate(handle, batches, loss_fn)
    try:
        if cfg.allocation == "global":
            chosen = pick(candidates(handle, batches, budget, loss_fn=loss_fn, calibration=cal), budget)
        else:
            chosen = _allocate(handle, budget, cal)
    finally:
        cal.close()
    per_layer = {}
    for m in handle.trainable_layers:
        for n in m.experts.names:
            idx = chosen.get((m.index, n), torch.empty(0, dtype=torch.int64))
            m.experts.deltas[n].set(idx)
        per_layer[m.index] = sum(len(m.experts.deltas[n]) for n in m.experts.names)
    linears = select_linears(handle, batches, loss_fn, scores=cal.linears)  # attention + shared experts
    del cal
    release_free_memory()
    return {"budget": budget, "active": handle.active(), "seconds": time.perf_counter() - t0,
            "per_layer": per_layer, "attention_active": linears["attention"], "shared_active": linears["shared"]}


def _allocate(handle: UsafModel, budget: int, cal: Calibration) -> dict:
    """The ``layer`` / ``expert`` / ``stack`` / ``channel`` allocations (exact budget; see :mod:`usaf.engine.allocate`)."""
    cfg = handle.config
    layers = handle.trainable_layers
    sizes = {m.index: [m.experts.deltas[n].per_expert for n in m.experts.names] for m in layers}
    if cfg.allocation == "layer":
        share = dict(zip((m.index for m in layers), quotas([sum(sizes[m.index]) * m.experts.num_experts
                                                            for m in layers], budget)))
    elif cfg.allocation == "expert":
        units = [(m.index, e) for m in layers for e in range(m.experts.num_experts)]
        share = dict(zip(units, quotas([sum(sizes[i]) for i, _ in units], budget)))
    elif cfg.allocation == "stack":
        units = [(m.index, n) for m in layers for n in m.experts.names]
        share = dict(zip(units, quotas([m.experts.deltas[n].per_expert * m.experts.num_experts
                                        for m in layers for n in m.experts.names], budget)))
    out, channels = {}, {}
    for m, scores in scored_layers(handle, cal):
        if cfg.allocation == "layer":
            picked = layer_pick(m, scores, share[m.index])
        elif cfg.allocation == "expert":
            picked = expert_pick(m, scores, [share[(m.index, e)] for e in range(m.experts.num_experts)])
        elif cfg.allocation == "stack":
            picked = stack_pick(scores, {n: share[(m.index, n)] for n in m.experts.names})
        else:
            channels[m.index] = channel_scores(m, scores).cpu()
            picked = {}
        out.update({(m.index, n): idx for n, idx in picked.items()})
        del scores  # not held through the next layer's scoring
    if cfg.allocation == "channel":
        out = channel_pick(layers, channels, budget)
    return out
