"""The routed expert MLP in a few dense lines: what ``usaf.engine.experts.ExpertsFunction`` computes.

For readers and tests. Every expert runs on the tokens routed to it, with dense effective weights
(``UsafExperts.weight``: base + delta); autograd gives the gradient of the whole weight, so the gradient
of a delta value is this gradient read at its index.
"""

from __future__ import annotations

import torch


def reference_experts(x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                      gate_up: torch.Tensor, down: torch.Tensor, gate, transposed: bool = False,
                      gate_up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None,
                      score_on_input: bool = False, null_identity: bool = False) -> torch.Tensor:
    """``out[t] = sum_k w[t, k] * down_e @ gate(gate_up_e @ x[t])`` with ``e = top_k_index[t, k]``.

    Args:
        x: (T, H); top_k_index, top_k_weights: (T, K); gate_up: (E, 2I, H) or transposed (E, H, 2I);
        down: (E, H, I) or transposed (E, I, H); gate: (S, 2I) -> (S, I), the family's gating;
        score_on_input: the routing weight scales the expert input instead of its output (llama4).
        null_identity: a route to an index ``>= E`` (a null expert) adds ``w * x`` (longcat_flash's zero
            experts); otherwise it adds nothing. ``E`` is the experts that compute (down_proj's rows).
    Returns:
        (T, H)
    """
    out = torch.zeros_like(x)
    num_experts = min(gate_up.shape[0], down.shape[0])
    if null_identity:
        null = top_k_index >= num_experts
        out = out + x * (top_k_weights * null).sum(-1, keepdim=True).to(x.dtype)
    for e in range(num_experts):
        tok, slot = (top_k_index == e).nonzero(as_tuple=True)  # the (token, k) pairs routed to expert e
        if tok.numel() == 0:
            continue
        w = top_k_weights[tok, slot].unsqueeze(-1).to(x.dtype)  # (S, 1)
        xe = x[tok] * w if score_on_input else x[tok]
        h = xe @ (gate_up[e] if transposed else gate_up[e].t())
        if gate_up_bias is not None:
            h = h + gate_up_bias[e]
        y = gate(h) @ (down[e] if transposed else down[e].t())
        if down_bias is not None:
            y = y + down_bias[e]
        out = out.index_add(0, tok, y if score_on_input else y * w)
    return out
