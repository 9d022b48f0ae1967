"""Choosing the sparse deltas of frozen ``nn.Linear`` weights: the attention projections
(``UsafConfig.attention_density > 0``) and the shared experts (``UsafConfig.shared_density > 0``).

The linears of the trainable layers are scored like the expert stacks (``UsafConfig.score``: ``sum |g|``,
``sum g^2``, ``|sum g|``, ``|w| sum |g|`` or random) from their dense weight gradients over the calibration
batches, in the selection's calibration pass (the same forward and backward per batch that records the
experts: ``usaf.engine.select.calibrate``) or a pass of their own (:func:`attention_scores`), then each group
spends its own budget: the attention ``attention_density x`` its elements by ``attention_units`` (one global
top-k over every projection, or whole columns / rows), the shared experts ``shared_density x`` theirs by
``shared_units`` (whole input columns, whole intermediate channels of an expert, single weights or rows).
Data parallel, each rank's per-batch scores are folded in the one-process order (:class:`usaf.engine.ranks.RingFold`), so N ranks pick the same set as one process. These sets are chosen
once: RigL reselection moves the expert deltas only.

Memory: one score buffer per scored linear of the trainable layers while scoring (``score_dtype``: 2 bytes
per weight in bf16, the default, 4 in fp32), the frozen weights' gradients one batch at a time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .allocate import score_dtype
from .checkpointing import lean_passes
from .model import UsafModel
from .ranks import RingFold, rank_world


def _batch_score(g: torch.Tensor, kind: str) -> torch.Tensor:
    g = g.float()
    if kind == "sq":
        return g * g
    if kind == "signed":
        return g
    return g.abs()


class LinearScores:
    """Dense score buffers of some frozen linears, fed from their weights' gradients one calibration batch at a
    time (:meth:`add_batch` after each backward; data parallel, folded over the ranks in the one-process order),
    finished by :meth:`result`. Used by a pass of its own (:func:`attention_scores`) or by the calibration pass
    that also records the experts (``usaf.engine.select.calibrate``)."""

    def __init__(self, handle: UsafModel, lins: dict[str, torch.nn.Linear]):
        cfg = handle.config
        # ``adam`` scores the routed experts only; the linears' scores are then ``signed``'s
        self.lins, self.kind = lins, "signed" if cfg.score == "adam" else cfg.score
        self.dtype = score_dtype(cfg)
        self.acc = {k: torch.zeros(lin.weight.shape, dtype=self.dtype, device=lin.weight.device)
                    for k, lin in lins.items()}
        world = rank_world()[1]
        self.own = {k: torch.zeros_like(a) for k, a in self.acc.items()} if world > 1 else self.acc
        self.ring = RingFold(list(self.acc.values()), lambda a, o: [x.add_(y) for x, y in zip(a, o)]) \
            if world > 1 else None

    def watch(self, on: bool) -> None:
        """Make the linears' weights require grad (``on``) for the passes, or stop (and drop their grads)."""
        for lin in self.lins.values():
            lin.weight.requires_grad_(on)
            lin.weight.grad = None

    def add_batch(self) -> None:
        """Add the gradients of one batch's backward, then drop them."""
        for k, lin in self.lins.items():
            if lin.weight.grad is not None:
                self.own[k] += _batch_score(lin.weight.grad, self.kind).to(self.dtype)
            lin.weight.grad = None
        if self.ring is not None:
            self.ring.add(list(self.own.values()))
            for o in self.own.values():
                o.zero_()

    def result(self) -> dict[str, torch.Tensor]:
        if self.ring is not None:
            self.ring.result()
        acc = self.acc
        if self.kind == "signed":
            acc = {k: a.abs() for k, a in acc.items()}
        elif self.kind == "gw":
            acc = {k: a * self.lins[k].weight.detach().float().abs() for k, a in acc.items()}
        return acc


def random_scores(handle: UsafModel, lins: dict[str, torch.nn.Linear]) -> dict[str, torch.Tensor]:
    """The ``random`` control: seeded draws of each linear's shape (no pass)."""
    gen = torch.Generator().manual_seed(handle.config.score_seed)
    return {k: torch.rand(lin.weight.shape, generator=gen).to(lin.weight.device) for k, lin in lins.items()}


def attention_scores(handle: UsafModel, batches: list[dict], loss_fn: Callable,
                     lins: dict[str, torch.nn.Linear] | None = None) -> dict[str, torch.Tensor]:
    """``{"<linear>.weight": scores of its shape (``score_dtype``)}`` over ``batches``, for ``lins`` (default:
    ``handle.attention``; any linears of ``handle.linears()``), all scored in one pass of their own (selection
    scores them in its calibration pass instead)."""
    lins = handle.attention if lins is None else lins
    if handle.config.score == "random":
        return random_scores(handle, lins)
    scores = LinearScores(handle, lins)
    model = handle.model
    params = handle.trainable_parameters()
    flags = [p.requires_grad for p in params]
    was_training = model.training
    model.train()
    with lean_passes(handle):
        try:
            for p in params:
                p.requires_grad_(False)
            scores.watch(True)
            for batch in batches:
                loss_fn(model, batch).backward()
                scores.add_batch()
        finally:
            scores.watch(False)
            for p, f in zip(params, flags):
                p.requires_grad_(f)
            model.train(was_training)
    return scores.result()


def scored_linears(handle: UsafModel) -> dict[str, torch.nn.Linear]:
    """The linears selection scores: the attention projections and shared experts of the trainable layers
    whose group has a budget."""
    return {k: lin for group, budget in ((handle.attention, handle.attention_budget()),
                                         (handle.shared, handle.shared_budget()))
            if group and budget for k, lin in group.items()}


def select_linears(handle: UsafModel, batches: list[dict], loss_fn: Callable,
                   scores: dict[str, torch.Tensor] | None = None) -> dict[str, int]:
    """Activate ``handle.attention_budget()`` attention elements and ``handle.shared_budget()`` shared-expert
    elements (zero deltas) by score, both groups scored in the same passes (``scores``: already computed, as
    the calibration pass does). Returns ``{"attention": n, "shared": n}`` (how many each activated)."""
    groups = {"attention": (handle.attention, handle.attention_budget()),
              "shared": (handle.shared, handle.shared_budget())}
    lins = scored_linears(handle)
    out = {"attention": 0, "shared": 0}
    if not lins:
        return out
    if scores is None:
        scores = attention_scores(handle, batches, loss_fn, lins)
    for name, (group, budget) in groups.items():
        if not group or not budget:
            continue
        part = {k: scores.pop(k) for k in group}
        units = handle.config.attention_units if name == "attention" else handle.config.shared_units
        if units == "channel":
            out[name] = _select_channels(group, part, budget, _hidden_size(handle))
        elif units == "element":
            out[name] = _select_elements(group, part, budget)
        else:
            out[name] = _select_units(group, part, budget, units == "column")
        del part
    return out


def _hidden_size(handle: UsafModel) -> int:
    return int(handle.model.config.get_text_config().hidden_size)


def select_attention(handle: UsafModel, batches: list[dict], loss_fn: Callable) -> int:
    """Activate ``handle.attention_budget()`` attention elements (zero deltas) by score (the shared experts'
    too, in the same passes: :func:`select_linears`). Returns how many attention elements."""
    return select_linears(handle, batches, loss_fn)["attention"]


def _select_elements(lins: dict[str, torch.nn.Linear], scores: dict[str, torch.Tensor], budget: int) -> int:
    """One global top-k over the elements of every linear of ``lins``."""
    keys = list(scores)
    flat = torch.cat([scores[k].reshape(-1).cpu() for k in keys])
    chosen = torch.topk(flat, min(budget, flat.numel()), sorted=False).indices
    chosen, _ = torch.sort(chosen)
    starts = [0]
    for k in keys:
        starts.append(starts[-1] + scores[k].numel())
    bounds = torch.searchsorted(chosen, torch.tensor(starts)).tolist()
    for j, k in enumerate(keys):
        lins[k].usaf_delta.set(chosen[bounds[j]:bounds[j + 1]] - starts[j])
    return int(chosen.numel())


def _select_units(lins: dict[str, torch.nn.Linear], scores: dict[str, torch.Tensor], budget: int,
                  columns: bool) -> int:
    """Whole rows (or columns) by mean score per element, in decreasing order, until the budget is spent (the
    last unit in part)."""
    units = []  # (mean score, [(key, unit index, by_row)])
    for k, s in scores.items():
        per = (s.float().cpu().mean(0) if columns else s.float().cpu().mean(1)).tolist()
        units += [(v, [(k, j, not columns)]) for j, v in enumerate(per)]
    return _spend(lins, scores, units, budget)


def _spend(lins: dict[str, torch.nn.Linear], scores: dict[str, torch.Tensor], units: list, budget: int) -> int:
    """Activate whole units (``(score, [(key, index, by_row)])``: row or column ``index`` of each named linear)
    in decreasing score order until ``budget`` elements are active; the last unit in part (its best elements,
    so the budget is exact)."""
    units.sort(key=lambda u: -u[0])
    picked: dict[str, list[torch.Tensor]] = {k: [] for k in scores}
    used = 0
    for _, members in units:
        if used == budget:
            break
        idx = {}
        for k, j, by_row in members:
            rows, cols = scores[k].shape
            idx[k] = j * cols + torch.arange(cols) if by_row else torch.arange(rows) * cols + j
        length = sum(v.numel() for v in idx.values())
        if used + length > budget:
            flat = torch.cat([scores[k].float().cpu().reshape(-1)[v] for k, v in idx.items()])
            keep = torch.zeros(length, dtype=torch.bool)
            keep[torch.topk(flat, budget - used).indices] = True
            start = 0
            for k in list(idx):
                n = idx[k].numel()
                idx[k] = idx[k][keep[start:start + n]]
                start += n
        for k, v in idx.items():
            picked[k].append(v)
            used += v.numel()
    for k, parts in picked.items():
        lins[k].usaf_delta.set(torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64))
    return used


def _channel_groups(lins: dict[str, torch.nn.Linear], hidden: int) -> list[tuple[list[tuple[str, bool]], int]]:
    """The shared experts of ``lins`` as channel groups: ``[([(key, by_row)], channels)]``, one per expert (the
    linears under one module path). A linear that reads the hidden state (gate, up: ``[I, hidden]``) gives
    channel j as its row j; one that writes it (down: ``[hidden, I]``) as its column j. Raises when an
    expert's linears do not share one intermediate width ``I``."""
    experts: dict[str, list[str]] = {}
    for k in lins:
        experts.setdefault(k.rsplit(".", 2)[0], []).append(k)
    out = []
    for prefix, keys in experts.items():
        members, widths = [], set()
        for k in keys:
            o, i = lins[k].weight.shape
            if i == hidden and o != hidden:
                members.append((k, True))
                widths.add(o)
            elif o == hidden and i != hidden:
                members.append((k, False))
                widths.add(i)
            else:
                widths.add(None)
        if len(widths) != 1 or None in widths:
            shapes = ", ".join(f"{k.rsplit('.', 2)[-2]} {list(lins[k].weight.shape)}" for k in keys)
            raise ValueError(f"{prefix}: its linears ({shapes}) share no intermediate width around the hidden size "
                             f"{hidden}: --shared-units channel cannot group them")
        out.append((members, widths.pop()))
    return out


def _select_channels(lins: dict[str, torch.nn.Linear], scores: dict[str, torch.Tensor], budget: int,
                     hidden: int) -> int:
    """Whole intermediate channels of the shared experts (gate row j, up row j, down column j: a neuron with all
    its weights, as structured sparse fine-tuning picks FFN channels), by mean score per element over the
    channel, in decreasing order, until the budget is spent (the last channel in part: its best elements)."""
    units = []  # (mean score, [(key, channel, by_row)])
    for members, width in _channel_groups(lins, hidden):
        total, count = torch.zeros(width), 0
        for k, by_row in members:
            s = scores[k].float().cpu()
            total += s.sum(1) if by_row else s.sum(0)
            count += s.shape[1] if by_row else s.shape[0]
        units += [(v / count, [(k, j, by_row) for k, by_row in members]) for j, v in enumerate(total.tolist())]
    return _spend(lins, scores, units, budget)
