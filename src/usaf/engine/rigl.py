"""RigL reselection: drop the smallest deltas, grow where the gradient is large, keep the budget.

Every R steps: a fraction ``f(t)`` (cosine decay to 0) of the active elements with the smallest
``|delta|`` is dropped (they revert to the base: the effective model is always base + current deltas);
as many currently inactive elements with the largest recent gradient magnitude are grown with value 0
and zero moments. Kept elements keep their values and AdamW moments.
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


@torch.no_grad()
def _drop_masks(handle: UsafModel, k: int) -> dict[str, torch.Tensor]:
    """Boolean keep-masks per delta after dropping the ``k`` globally smallest ``|values|``."""
    deltas = handle.deltas()
    mags = torch.cat([d.values.detach().abs().float().cpu() for d in deltas.values()])
    keep = torch.ones(mags.numel(), dtype=torch.bool)
    if k > 0:
        keep[torch.topk(mags, k, largest=False, sorted=False).indices] = False
    out, pos = {}, 0
    for key, d in deltas.items():
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
    if handle.config.allocation != "global" and fraction > 0:
        raise ValueError(f"RigL reselection keeps a global budget; allocation={handle.config.allocation!r} "
                         f"trains without it (--reselect-every 0)")
    active = handle.expert_active()  # the attention and shared-expert deltas keep their sets (selected once)
    k = int(round(fraction * active))
    if k == 0:
        return {"dropped": 0, "grown": 0, "active": handle.active(), "seconds": time.perf_counter() - t0}
    # Grow candidates are scored with the current effective weights, excluding the active set.
    cands = candidates(handle, batches, k, exclude_active=True, loss_fn=loss_fn, n_batches=n_batches,
                       streaming=not exact)
    grown = pick(cands, k)
    n_grow = sum(v.numel() for v in grown.values())
    keep = _drop_masks(handle, n_grow)  # drop exactly as many as can be grown: the budget is kept
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
