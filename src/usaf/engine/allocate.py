"""How the budget of active elements is spread, once every element of a layer has a score.

``UsafConfig.allocation``:

- ``global`` (default): one threshold over all trainable layers; each layer may take at most
  ``layer_share_cap`` times its fair share (:func:`prune` and :func:`pick` keep the pool between layer groups
  near the budget);
- ``layer``: every layer gets the density of its own elements (largest-remainder quotas, exact in total);
- ``expert``: every expert of every layer gets the density of its own elements;
- ``stack``: every expert stack of every layer (``gate_up_proj``, ``down_proj``, ...) gets the density of its
  own elements, the best of each by score: a stack whose gradients are smaller in scale (the moefy bed's
  ``down_proj``, which the global threshold left almost empty) still trains its share;
- ``channel``: structured: whole channels ``j`` of an expert (gate row ``j``, up row ``j``, down column
  ``j``: the weights of one intermediate neuron, ``3H`` elements; ``2H`` without a gate), the best by summed
  score over all layers; the budget's remainder (less than one channel) is the first elements of the next
  best channel.

Scores (``UsafConfig.score``): ``abs`` = sum |dL/dW| over the calibration batches, ``sq`` = sum (dL/dW)^2
(Fisher), ``signed`` = |sum dL/dW|, ``gw`` = |w| * sum |dL/dW| (first-order Taylor), ``random`` (a control).
"""

from __future__ import annotations

import torch

from .model import MoeLayer

SCORES = ("abs", "sq", "signed", "gw", "random")


def score_dtype(cfg) -> torch.dtype:
    """The dtype of the dense score buffers (``UsafConfig.score_dtype``)."""
    return torch.float32 if cfg.score_dtype == "fp32" else torch.bfloat16
ALLOCATIONS = ("global", "layer", "expert", "stack", "channel")


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


def final_scores(m: MoeLayer, buffers: dict[str, torch.Tensor], score: str, seed: int = 0,
                 first: int = 0) -> dict[str, torch.Tensor]:
    """Flat scores per stack from the accumulated buffers (``signed`` buffers hold sum dL/dW) of the experts
    from ``first`` on (a group of experts, or the whole stack).

    ``abs``, ``sq`` and ``signed`` are the buffers themselves, flattened, in their dtype (``signed`` made
    absolute in place): no fp32 copy of the buffers. ``adam`` is ``(sum g)^2 / sqrt(sum g^2)``, computed in
    place in the signed buffer: with AdamW's update ``~ E[g] / sqrt(E[g^2])`` per step, the expected first-order
    loss decrease of training that weight. ``gw`` is fp32 (a product), ``random`` fp32 draws
    (whole stacks only).

    Stack rows of null experts (longcat_flash's gate_up_proj rows past its routed experts) score -1 (written
    into the buffer views too): never a candidate."""
    ex = m.experts
    out = {}
    for i, n in enumerate(ex.names):
        b = buffers[n]
        per = ex.deltas[n].per_expert
        if score == "random":
            if first:
                raise ValueError("random scores are drawn for whole stacks")
            g = torch.Generator().manual_seed(seed * 1000003 + m.index * len(ex.names) + i)
            s = torch.rand(b.numel(), generator=g).to(b.device)
        elif score in ("abs", "sq", "signed"):
            s = (b.abs_() if score == "signed" else b).view(-1)
        elif score == "adam":  # (sum g)^2 / sqrt(sum g^2): an AdamW step's first-order gain, in place
            sq = buffers[f"{n}::sq"]
            s = b.square_().div_(sq.sqrt_().clamp_(min=torch.finfo(sq.dtype).tiny)).view(-1)
        else:
            s = b.float().view(-1)
        if score == "gw":  # |w| of the base (deltas are zero at selection), expert by expert
            for e in range(first, min(ex.num_experts, first + b.shape[0])):
                w = ex.weight(n, e, e + 1, torch.float32, s.device).view(-1)
                s[(e - first) * per : (e - first + 1) * per] *= w.abs()
        s[max(0, ex.num_experts - first) * per :] = -1.0
        out[n] = s
    return out


def _split(top: torch.Tensor, names: tuple[str, ...], sizes: list[int], offsets: list[int]) -> dict:
    """Positions ``top`` in the concatenation of stacks of ``sizes`` -> ``{stack: position - start + offset}``."""
    out, start = {}, 0
    for n, size, off in zip(names, sizes, offsets):
        out[n] = top[(top >= start) & (top < start + size)] - start + off
        start += size
    return out


def layer_pick(m: MoeLayer, scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """The ``k`` best elements of one layer (all its stacks) -> ``{stack: flat indices}``."""
    names = m.experts.names
    flat = torch.cat([scores[n] for n in names])
    top = torch.topk(flat, min(k, flat.numel()), sorted=False).indices
    return _split(top, names, [scores[n].numel() for n in names], [0] * len(names))


def stack_pick(scores: dict[str, torch.Tensor], ks: dict[str, int]) -> dict[str, torch.Tensor]:
    """The ``ks[stack]`` best elements of each stack of one layer."""
    return {n: torch.topk(s, min(ks[n], s.numel()), sorted=False).indices for n, s in scores.items()}


def expert_pick(m: MoeLayer, scores: dict[str, torch.Tensor], ks: list[int]) -> dict[str, torch.Tensor]:
    """``ks[e]`` best elements of each expert ``e`` (all its stacks)."""
    ex = m.experts
    per = [ex.deltas[n].per_expert for n in ex.names]
    out = {n: [] for n in ex.names}
    for e, k in enumerate(ks):
        if k == 0:
            continue
        parts = [scores[n][e * p : (e + 1) * p] for n, p in zip(ex.names, per)]
        top = torch.topk(torch.cat(parts), k, sorted=False).indices
        for n, idx in _split(top, ex.names, per, [e * p for p in per]).items():
            out[n].append(idx)
    return {n: torch.cat(v) if v else torch.empty(0, dtype=torch.long) for n, v in out.items()}


def _channel_rows(m: MoeLayer) -> tuple[int, dict[str, int]]:
    """``(I, {input stack: rows per channel})`` of a layer whose input stacks are ``[E, W, H]``: a gate_up
    stack holds channel ``j`` at rows ``j`` and ``I + j``; an up_proj (no gate), or dbrx's separate gate and
    up stacks, at row ``j``."""
    ex = m.experts
    if ex.transposed or not ex.layout.concatenated:
        raise ValueError("allocation 'channel' needs input stacks [E, out, in] with gate/up concatenated")
    inputs = ex.names[:-1]
    parts = 2 if ex.layout.gated and len(inputs) == 1 else 1
    inter = ex.shape(inputs[0])[1] // parts
    return inter, {n: ex.shape(n)[1] // inter for n in inputs}


def channel_elements(m: MoeLayer, e: int, j: int) -> dict[str, torch.Tensor]:
    """Flat indices of channel ``j`` of expert ``e``: gate row ``j``, up row ``I + j`` (``gate_up_proj`` [E, 2I,
    H]; up row ``j`` alone without a gate; dbrx: row ``j`` of ``w1`` and ``v1``) and down column ``j``
    (``down_proj`` [E, H, I]; row ``j`` of a down stack stored [E, I, H], dbrx's ``w2``)."""
    ex = m.experts
    i, rows = _channel_rows(m)
    out = {}
    for n, parts in rows.items():
        _, r, h = ex.shape(n)
        cols = torch.arange(h)
        out[n] = torch.cat([e * r * h + (p * i + j) * h + cols for p in range(parts)])
    down = ex.names[-1]
    _, r, c = ex.shape(down)
    out[down] = e * r * c + (j * c + torch.arange(c) if ex.down_transposed else torch.arange(r) * c + j)
    return out


def channel_scores(m: MoeLayer, scores: dict[str, torch.Tensor]) -> torch.Tensor:
    """(E, I) summed element scores of every channel of a layer (input stacks [E, out, in])."""
    ex = m.experts
    i, rows = _channel_rows(m)
    live = ex.num_experts  # rows past it belong to null experts (longcat_flash's gate_up_proj)
    total = None
    for n, parts in rows.items():
        e, r, h = ex.shape(n)
        s = scores[n].view(e, r, h)[:live].sum(-1, dtype=torch.float32)
        for p in range(parts):
            total = s[:, p * i : (p + 1) * i] if total is None else total + s[:, p * i : (p + 1) * i]
    e, r, c = ex.shape(ex.names[-1])
    dn = scores[ex.names[-1]].view(e, r, c)[:live]
    return total + (dn.sum(2, dtype=torch.float32) if ex.down_transposed else dn.sum(1, dtype=torch.float32))


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


_BINS = 1 << 16
_SPLIT = 1 << 24


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The float32 bit patterns of non-negative scores as int32 (ordered as the values; ``+ 0.0`` makes -0 +0)."""
    return (t.float() + 0.0).view(torch.int32)


def kth_largest(parts: list[torch.Tensor], k: int) -> tuple[float, int]:
    """The ``k``-th largest value over the non-negative scores ``parts`` (``1 <= k <= their size``), and how many
    of the ``k`` largest equal it (the rest are above it). Exact, from two 16-bit histograms of the float32 bit
    patterns, chunk by chunk: no sort-sized temporaries (``torch.topk`` on CPU holds about 16 bytes per element
    of its input: 640 MB for the 40 M candidates of a 30B-width selection)."""
    hi = torch.zeros(_BINS, dtype=torch.int64)
    for p in parts:
        for c in p.split(_SPLIT):
            hi += torch.bincount((_bits(c) >> 16).cpu(), minlength=_BINS)
    above = hi.flip(0).cumsum(0).flip(0)  # above[b]: how many have high bits >= b
    b = int((above >= k).nonzero().max())
    over = int(above[b + 1]) if b + 1 < _BINS else 0
    lo = torch.zeros(_BINS, dtype=torch.int64)
    for p in parts:
        for c in p.split(_SPLIT):
            bits = _bits(c)
            lo += torch.bincount((bits[(bits >> 16) == b] & 0xFFFF).cpu(), minlength=_BINS)
    la = lo.flip(0).cumsum(0).flip(0)
    low = int((la >= k - over).nonzero().max())
    more = over + (int(la[low + 1]) if low + 1 < _BINS else 0)  # strictly above the k-th
    value = torch.tensor([(b << 16) | low], dtype=torch.int32).view(torch.float32).item()
    return value, k - more


def top_k_masks(parts: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Boolean masks over ``parts`` that pick exactly their ``k`` largest (non-negative) scores; among scores
    equal to the ``k``-th, the first ones in order."""
    total = sum(p.numel() for p in parts)
    if k >= total:
        return [torch.ones(p.numel(), dtype=torch.bool, device=p.device) for p in parts]
    if k <= 0:
        return [torch.zeros(p.numel(), dtype=torch.bool, device=p.device) for p in parts]
    thr, ties = kth_largest(parts, k)
    out = []
    for p in parts:
        pf = p.float()
        eq = pf == thr
        n_eq = int(eq.sum())
        if n_eq > ties:  # only the first ``ties`` of the equal ones
            eq &= eq.cumsum(0) <= ties
        out.append((pf > thr) | eq)
        ties -= min(n_eq, ties)
    return out


def prune(cands: list[tuple], k: int) -> list[tuple]:
    """Keep only candidates that can still be among the global top ``k`` (what :func:`pick` takes), so
    the pool held between layers stays near ``k`` entries instead of growing with every layer."""
    total = sum(c[2].numel() for c in cands)
    if total <= k:
        return cands
    thr, _ = kth_largest([c[2] for c in cands], k)
    out = []
    for m, n, vals, idx in cands:
        keep = vals >= thr
        if keep.any():
            out.append((m, n, vals[keep], idx[keep]))
    return out


def pick(cands: list[tuple], k: int) -> dict[tuple[int, str], torch.Tensor]:
    """Global top-``k`` over all candidates -> ``{(layer index, stack name): flat indices}``."""
    if not cands:
        return {}
    out = {}
    for (m, n, _, idx), chosen in zip(cands, top_k_masks([c[2] for c in cands], k)):
        sel = idx[chosen.to(idx.device)]
        key = (m.index, n)
        out[key] = torch.cat([out[key], sel]) if key in out else sel
    return out
