"""RigL reselection: drop the smallest deltas, grow where the gradient is large, keep the budget.

Every R steps: a fraction ``f(t)`` (cosine decay to 0) of the active elements with the smallest
``|delta|`` is dropped (they revert to the base: the effective model is always base + current deltas);
as many currently inactive elements with the largest recent gradient magnitude are grown with value 0
and zero moments. Kept elements keep their values and AdamW moments.

With ``allocation`` ``layer`` or ``stack`` every unit (a layer; a stack of a layer) keeps its own count: the
fraction is dropped and grown within each unit, so the per-unit budgets of the selection hold through
training. The other fixed allocations (``expert``, ``channel``) train without reselection.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable

import torch

from .allocate import pick
from .model import UsafModel
from .optim import UsafOptimizer
from .select import candidates


def drop_fraction(step: int, total_steps: int, initial: float) -> float:
    """Cosine-decayed fraction of the active set replaced at ``step`` (0 at the end)."""
    t = min(1.0, max(0.0, step / max(1, total_steps)))
    return initial * 0.5 * (1 + math.cos(math.pi * t))


RESELECTABLE = ("global", "layer", "stack")  # the allocations RigL keeps (globally, per layer, per stack)


def _unit(allocation: str, layer: int, name: str):
    """The budget unit of stack ``name`` of layer ``layer``: one for all (global), the layer, or the stack."""
    return None if allocation == "global" else layer if allocation == "layer" else (layer, name)


def _units(handle: UsafModel) -> dict:
    """``{budget unit: [(delta key, delta)]}`` of the expert stacks, in the model's order."""
    alloc = handle.config.allocation
    groups: dict = {}
    for m in handle.trainable_layers:
        for n in m.experts.names:
            groups.setdefault(_unit(alloc, m.index, n), []).append((m.key(n), m.experts.deltas[n]))
    return groups


@torch.no_grad()
def _drop_masks(groups: dict, ks: dict) -> dict[str, torch.Tensor]:
    """Boolean keep-masks per delta after dropping, in every budget unit ``u`` of ``groups`` (:func:`_units`),
    its ``ks[u]`` smallest ``|values|``."""
    out = {}
    for u, members in groups.items():
        mags = torch.cat([d.values.detach().abs().float().cpu() for _, d in members])
        keep = torch.ones(mags.numel(), dtype=torch.bool)
        if ks.get(u, 0) > 0:
            keep[torch.topk(mags, ks[u], largest=False, sorted=False).indices] = False
        pos = 0
        for key, d in members:
            out[key] = keep[pos : pos + len(d)].to(d.values.device)
            pos += len(d)
    return out


def reselect(handle: UsafModel, opt: UsafOptimizer | None, batches: Iterable[dict], fraction: float,
             loss_fn: Callable | None = None, n_batches: int | None = None, exact: bool = False) -> dict:
    """One RigL update. Returns a report (dropped, grown, active, seconds).

    Grown elements are ranked by ``|dL/dW|`` summed over ``batches`` (each batch's per-expert top candidates,
    streamed in the backward), or with ``exact`` by the selection's own score (``config.score``, e.g. ``|Σg|``)
    over every inactive element: the calibration pass and replay of :func:`usaf.engine.select.candidates`."""
    t0 = time.perf_counter()
    alloc = handle.config.allocation
    if alloc not in RESELECTABLE and fraction > 0:
        raise ValueError(f"RigL reselection keeps a global, per-layer or per-stack budget; allocation={alloc!r} "
                         f"trains without it (--reselect-every 0)")
    active = handle.expert_active()  # the attention and shared-expert deltas keep their sets (selected once)
    k = int(round(fraction * active))
    if k == 0:
        return {"dropped": 0, "grown": 0, "active": handle.active(), "seconds": time.perf_counter() - t0}
    # Grow candidates are scored with the current effective weights, excluding the active set. Each stack's
    # pool holds up to layer_share_cap (4) x its fair share of k: a unit's own count whenever each stack is at
    # least a quarter of its layer (gate_up / down: two thirds / one third).
    cands = candidates(handle, batches, k, exclude_active=True, loss_fn=loss_fn, n_batches=n_batches,
                       streaming=not exact)
    groups = _units(handle)
    if alloc == "global":
        grown = pick(cands, k)
        ks = {None: sum(v.numel() for v in grown.values())}
    else:  # each unit replaces the fraction of its own active elements, from its own candidates
        by_unit: dict = {}
        for c in cands:
            by_unit.setdefault(_unit(alloc, c[0].index, c[1]), []).append(c)
        grown, ks = {}, {}
        for u, members in groups.items():
            g = pick(by_unit.get(u, []), int(round(fraction * sum(len(d) for _, d in members))))
            grown.update(g)
            ks[u] = sum(v.numel() for v in g.values())
    n_grow = sum(ks.values())
    keep = _drop_masks(groups, ks)  # drop exactly as many as can be grown, unit by unit: the budgets are kept
    with torch.no_grad():
        for m in handle.trainable_layers:
            for n in m.experts.names:
                d = m.experts.deltas[n]
                mask = keep[m.key(n)]
                old_idx = d.indices.long()
                kept_pos = mask.nonzero().squeeze(1)
                new_idx = grown.get((m.index, n), torch.empty(0, dtype=torch.int64)).to(old_idx.device)
                idx = torch.cat([old_idx[kept_pos], new_idx])
                vals = torch.cat([d.values.detach()[kept_pos], torch.zeros(new_idx.numel(), device=idx.device)])
                old = d.values
                perm = d.set(idx, vals)  # sorted order: position j of the new set came from idx[perm[j]]
                inv = torch.empty_like(perm)
                inv[perm] = torch.arange(perm.numel(), device=perm.device)
                if opt is not None:
                    opt.replace_active(old, d.values, kept_pos, inv[: kept_pos.numel()])
    return {"dropped": n_grow, "grown": n_grow, "active": handle.active(), "seconds": time.perf_counter() - t0}
