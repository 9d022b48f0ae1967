"""Routing bookkeeping for the fused experts function: which token rows each expert gets, in fixed blocks.

``Routing.build(top_k_index, E)`` groups the routed (token, expert) pairs by expert once per forward, on a
padded layout where every expert's rows are a multiple of a granule (:func:`granule`: a quarter of the layer's
block, :func:`block_rows`) and are computed in pieces of at most two blocks, so that a layer's expert matmuls
have few distinct shapes per op (at most 8) and little padding.
"""

from __future__ import annotations

import torch


def block_rows(rows: int, experts: int) -> int:
    """Rows per expert matmul: the power of two at or below the mean rows per expert, in [16, 256].

    Every expert's rows are padded to a multiple of it and computed in blocks of exactly this many rows, so
    a layer's expert matmuls all have one shape per op. On CPU each new shape costs oneDNN a primitive (about
    0.7 ms to build and 0.6 MB kept in its cache, measured); with per-expert row counts, primitive builds were
    ~20% of a training step on the tiny bench model (``ONEDNN_VERBOSE=profile_create``). Smaller blocks pad
    less but cost more: on the mid bench model a step took 8.4-9.1 s with blocks of 128 rows (the mean),
    9.7-9.9 s with 64 and 11.4-12.4 s with 32.
    """
    mean = rows // max(1, experts)
    return min(256, max(16, 1 << max(0, mean.bit_length() - 1)))


def granule(block: int) -> int:
    """What an expert's row count is padded to a multiple of: a quarter of the block (at least 4).

    Padding every expert to whole blocks computed a block at a time wasted half a block per expert on
    average (46% more rows than routed at Qwen3-30B-A3B width, 512 tokens: blocks of 32 for a mean of 32),
    and a matmul of 40 rows costs less than two of 32 (0.82 against 1.25 ms, 2048 x 1536 bf16, measured on
    the CPU). With a quarter-block granule and pieces of up to two blocks the padding is about an eighth of
    a block per expert, and each op sees at most 8 shapes.
    """
    return max(4, block // 4)


def piece_rows(block: int) -> int:
    """The most rows one expert matmul takes: two blocks (``8 * granule``)."""
    return 8 * granule(block)


def bucket(n: int, block: int) -> int:
    """``n`` rows padded to a multiple of the block's granule."""
    g = granule(block)
    return -(-n // g) * g


class Routing:
    """The routed (token, expert) pairs of one forward, grouped by expert on a padded layout.

    Expert ``e`` owns padded rows ``[bounds[e], bounds[e + 1])``: its ``counts[e]`` real rows first, then
    zero-gradient padding up to a multiple of :func:`granule` of ``block`` (:func:`block_rows`), computed in
    pieces of at most :func:`piece_rows` rows (:meth:`blocks`). ``tok`` (S_pad,) is the token row of each padded row, ``slot`` (S_pad,) its position in the
    flattened (T * K) routing weights (padding rows point at row 0 / slot 0 and are never scattered back),
    ``pos`` (S,) the padded rows that are routed. ``null`` (T, K) bool marks the routes to an index ``>= E``
    (null experts, which run no expert), None when there is none.
    """

    __slots__ = ("counts", "bounds", "tok", "slot", "pos", "block", "null")

    def __init__(self, counts: list[int], bounds: list[int], tok: torch.Tensor, slot: torch.Tensor,
                 pos: torch.Tensor, block: int, null: torch.Tensor | None = None):
        self.counts, self.bounds, self.block = counts, bounds, block
        self.tok, self.slot, self.pos = tok, slot, pos
        self.null = null

    @staticmethod
    @torch.no_grad()
    def build(top_k_index: torch.Tensor, num_experts: int) -> Routing:
        top_k = top_k_index.shape[1]
        flat = top_k_index.reshape(-1)
        block = block_rows(flat.numel(), num_experts)
        _, perm = torch.sort(flat, stable=True)
        counts = torch.bincount(flat, minlength=num_experts + 1)[:num_experts].tolist()
        routed = sum(counts)
        perm = perm[:routed]  # routes to null experts (index >= E) run no expert
        null = top_k_index >= num_experts if routed < flat.numel() else None
        bounds, rows = [0], []
        for c in counts:
            rows.append(torch.arange(bounds[-1], bounds[-1] + c))
            bounds.append(bounds[-1] + bucket(c, block))
        pos = (torch.cat(rows) if rows else torch.empty(0, dtype=torch.long)).to(flat.device)
        slot = torch.zeros(bounds[-1], dtype=torch.long, device=flat.device)
        slot[pos] = perm
        return Routing(counts, bounds, slot // top_k, slot, pos, block, null)

    def segments(self, start: int, stop: int):
        """``(e, a, b, c)`` for the hit experts in ``[start, stop)``: padded rows ``[a, b)``, ``c`` real."""
        for e in range(start, stop):
            a, b = self.bounds[e], self.bounds[e + 1]
            if a != b:
                yield e, a, b, self.counts[e]

    def blocks(self, a: int, b: int, c: int):
        """``(r0, n, real)`` for the pieces of segment ``[a, b)``: rows ``[r0, r0 + n)``, the first ``real``
        of them routed (the rest padding, fewer than a granule, in the last piece)."""
        step = piece_rows(self.block)
        for r0 in range(a, b, step):
            n = min(step, b - r0)
            yield r0, n, min(n, c - (r0 - a))
