"""How the budget of active elements is spread, once every element of a layer has a score.

``UsafConfig.allocation``:

- ``global`` (default): one threshold over all trainable layers; each layer may take at most
  ``layer_share_cap`` times its fair share (:func:`prune` and :func:`pick` keep the pool between layer groups
  near the budget);
- ``layer``: every layer gets the density of its own elements (largest-remainder quotas, exact in total);
- ``expert``: every expert of every layer gets the density of its own elements;
- ``channel``: structured: whole channels ``j`` of an expert (gate row ``j``, up row ``j``, down column
  ``j``: the weights of one intermediate neuron, ``3H`` elements), the best by summed score over all layers;
  the budget's remainder (less than one channel) is the first elements of the next best channel.

Scores (``UsafConfig.score``): ``abs`` = sum |dL/dW| over the calibration batches, ``sq`` = sum (dL/dW)^2
(Fisher), ``signed`` = |sum dL/dW|, ``gw`` = |w| * sum |dL/dW| (first-order Taylor), ``random`` (a control).
"""

from __future__ import annotations

import torch

from .experts import NAMES
from .model import MoeLayer

SCORES = ("abs", "sq", "signed", "gw", "random")
ALLOCATIONS = ("global", "layer", "expert", "channel")


def quotas(sizes: list[int], budget: int) -> list[int]:
    """``budget`` split over units in proportion to ``sizes`` (largest remainder: exact sum, each <= size)."""
    total = sum(sizes)
    if total == 0:
        return [0] * len(sizes)
    raw = [budget * s / total for s in sizes]
    out = [min(int(r), s) for r, s in zip(raw, sizes)]
    order = sorted(range(len(sizes)), key=lambda i: raw[i] - int(raw[i]), reverse=True)
    left = budget - sum(out)
    for i in order:
        if left <= 0:
            break
        if out[i] < sizes[i]:
            out[i] += 1
            left -= 1
    return out


def final_scores(m: MoeLayer, buffers: dict[str, torch.Tensor], score: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Flat fp32 scores per stack from the accumulated buffers (``signed`` buffers hold sum dL/dW).

    Stack rows of null experts (longcat_flash's gate_up_proj rows past its routed experts) score -1: never
    a candidate."""
    ex = m.experts
    out = {}
    for n in NAMES:
        b = buffers[n]
        per = ex.deltas[n].per_expert
        if score == "random":
            g = torch.Generator().manual_seed(seed * 1000003 + m.index * 2 + NAMES.index(n))
            s = torch.rand(b.numel(), generator=g).to(b.device)
        else:
            s = b.float().abs().view(-1) if score == "signed" else b.float().view(-1)
        if score == "gw":  # |w| of the base (deltas are zero at selection), expert by expert
            for e in range(ex.num_experts):
                w = ex.weight(n, e, e + 1, torch.float32, s.device).view(-1)
                s[e * per : (e + 1) * per] *= w.abs()
        s[ex.num_experts * per :] = -1.0
        out[n] = s
    return out


def layer_pick(m: MoeLayer, scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """The ``k`` best elements of one layer (both stacks) -> ``{stack: flat indices}``."""
    flat = torch.cat([scores[n] for n in NAMES])
    top = torch.topk(flat, min(k, flat.numel()), sorted=False).indices
    split = scores[NAMES[0]].numel()
    return {NAMES[0]: top[top < split], NAMES[1]: top[top >= split] - split}


def expert_pick(m: MoeLayer, scores: dict[str, torch.Tensor], ks: list[int]) -> dict[str, torch.Tensor]:
    """``ks[e]`` best elements of each expert ``e`` (both stacks)."""
    ex = m.experts
    per = {n: ex.deltas[n].per_expert for n in NAMES}
    out = {n: [] for n in NAMES}
    for e, k in enumerate(ks):
        if k == 0:
            continue
        parts = [scores[n][e * per[n] : (e + 1) * per[n]] for n in NAMES]
        top = torch.topk(torch.cat(parts), k, sorted=False).indices
        a = per[NAMES[0]]
        out[NAMES[0]].append(top[top < a] + e * per[NAMES[0]])
        out[NAMES[1]].append(top[top >= a] - a + e * per[NAMES[1]])
    return {n: torch.cat(v) if v else torch.empty(0, dtype=torch.long) for n, v in out.items()}


def channel_elements(m: MoeLayer, e: int, j: int) -> dict[str, torch.Tensor]:
    """Flat indices of channel ``j`` of expert ``e``: gate row ``j``, up row ``I + j`` (``gate_up_proj`` [E, 2I,
    H]) and down column ``j`` (``down_proj`` [E, H, I]); standard layout only."""
    ex = m.experts
    _, two_i, h = ex.shape("gate_up_proj")
    i = two_i // 2
    base = e * two_i * h
    cols = torch.arange(h)
    gu = torch.cat([base + j * h + cols, base + (i + j) * h + cols])
    dn = e * h * i + cols * i + j
    return {"gate_up_proj": gu, "down_proj": dn}


def channel_scores(m: MoeLayer, scores: dict[str, torch.Tensor]) -> torch.Tensor:
    """(E, I) summed element scores of every channel of a standard-layout layer."""
    ex = m.experts
    if ex.transposed:
        raise ValueError("allocation 'channel' needs the standard expert layout ([E, 2I, H] / [E, H, I])")
    rows, two_i, h = ex.shape("gate_up_proj")
    i = two_i // 2
    gu = scores["gate_up_proj"].view(rows, two_i, h)[: ex.num_experts].sum(-1)
    dn = scores["down_proj"].view(-1, h, i)[: ex.num_experts].sum(1)
    return gu[:, :i] + gu[:, i:] + dn


def channel_pick(layers: list[MoeLayer], ch: dict[int, torch.Tensor], budget: int) -> dict:
    """The best channels over all layers until the budget is spent (the last one partly).

    Returns ``{(layer index, stack): flat indices}``."""
    by_index = {m.index: m for m in layers}
    keys = [(li, e, j) for li, c in ch.items() for e in range(c.shape[0]) for j in range(c.shape[1])]
    flat = torch.cat([c.reshape(-1) for c in ch.values()])
    order = torch.argsort(flat, descending=True, stable=True).tolist()
    out: dict = {}
    left = budget
    for pos in order:
        if left <= 0:
            break
        li, e, j = keys[pos]
        for n, idx in channel_elements(by_index[li], e, j).items():
            take = idx[: max(0, left)]
            left -= take.numel()
            out.setdefault((li, n), []).append(take)
    return {k: torch.cat(v) for k, v in out.items()}


def prune(cands: list[tuple], k: int) -> list[tuple]:
    """Keep only candidates that can still be among the global top ``k`` (what :func:`pick` takes), so
    the pool held between layer groups stays near ``k`` entries instead of growing with every group."""
    total = sum(c[2].numel() for c in cands)
    if total <= k:
        return cands
    thr = torch.topk(torch.cat([c[2].float().cpu() for c in cands]), k, sorted=False).values.min()
    out = []
    for m, n, vals, idx in cands:
        keep = vals >= thr.to(vals.device)
        if keep.any():
            out.append((m, n, vals[keep], idx[keep]))
    return out


def pick(cands: list[tuple], k: int) -> dict[tuple[int, str], torch.Tensor]:
    """Global top-``k`` over all candidates -> ``{(layer index, stack name): flat indices}``."""
    if not cands:
        return {}
    scores = torch.cat([c[2].float().cpu() for c in cands])
    k = min(k, scores.numel())
    chosen = torch.zeros(scores.numel(), dtype=torch.bool)
    if k > 0:
        chosen[torch.topk(scores, k, sorted=False).indices] = True
    out, pos = {}, 0
    for m, n, s, idx in cands:
        sel = idx[chosen[pos : pos + s.numel()].to(idx.device)]
        pos += s.numel()
        key = (m.index, n)
        out[key] = torch.cat([out[key], sel]) if key in out else sel
    return out
