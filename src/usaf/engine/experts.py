"""The hot path: routed expert compute over a frozen (optionally quantized) base plus sparse deltas.

``UsafExperts`` replaces a transformers fused-experts module. Its forward groups the routed
(token, expert) pairs by expert, and ``ExpertsFunction`` runs only the experts that were hit:

- forward: per run of hit experts, dequantize the frozen stack, add that run's delta (O(nnz)),
  then per expert, in blocks of a fixed number of rows (``block_rows``: one matmul shape per op, so
  oneDNN builds no new primitive per step): gather the token rows, one matmul pair, scale by the routing
  weight and scatter-add into the (T, H) output. It keeps the layer input, the routing and (by default)
  the gate/up pre-activations; no per-route copy of the inputs or outputs.
- backward: re-dequantizes the weights (never saved), returns the input gradient, the routing-weight
  gradient and the gradient of the compact delta values, ``g[k] = sum_t dY[t, r_k] * X[t, c_k]`` over
  the tokens of that expert. Either gather-dot (O(T * nnz)) or a per-expert GEMM ``dY^T X`` gathered
  and freed at once, chosen by cost; no dense gradient of a whole expert stack ever exists.
- selection mode (``scores`` set): also accumulates ``|dL/dW|`` (or its square) into per-layer dense score
  buffers, used by ``usaf.select``; reselection (``stream_k`` set) keeps each expert's top candidates.
"""

from __future__ import annotations

import torch
from torch import nn

from .delta import SparseDelta
from .store import DenseStack, freeze_stack

NAMES = ("gate_up_proj", "down_proj")

# Relative cost of one gather-dot multiply-add vs one GEMM multiply-add (measured: bench/sparse_grad.py).
GATHER_COST = 256.0
# Bound on the temporary (T x nnz) gather buffer, in elements.
GATHER_CHUNK = 1 << 22


def _default_gate(act_fn):
    def gate(h: torch.Tensor) -> torch.Tensor:
        g, u = h.chunk(2, dim=-1)
        return act_fn(g) * u

    return gate


class UsafExperts(nn.Module):
    """Drop-in replacement for a transformers fused experts module.

    The frozen stacks live in ``self.frozen`` (dense or quantized, not parameters); the only trainable
    expert tensors are ``self.deltas[name].values``.
    """

    def __init__(self, stock: nn.Module, transposed: bool, bias: bool, quant: str = "none",
                 group_size: int = 64, chunk_bytes: int = 256 << 20, frozen: dict | None = None):
        super().__init__()
        self.transposed = transposed
        self.num_experts = stock.gate_up_proj.shape[0]
        self.frozen = frozen or {name: freeze_stack(getattr(stock, name).data, quant, group_size) for name in NAMES}
        self.base_dtype = stock.gate_up_proj.dtype
        self.frozen_numel = {n: stock.gate_up_proj.numel() if n == "gate_up_proj" else stock.down_proj.numel()
                             for n in NAMES}
        self.quant = quant
        if bias:
            self.register_buffer("gate_up_bias", stock.gate_up_proj_bias.detach().clone(), persistent=False)
            self.register_buffer("down_bias", stock.down_proj_bias.detach().clone(), persistent=False)
        else:
            self.gate_up_bias = self.down_bias = None
        apply_gate = getattr(type(stock), "_apply_gate", None)  # set by transformers' experts decorator
        if apply_gate is not None:
            self._gate = lambda h, _s=stock: apply_gate(_s, h)
        else:
            self._gate = _default_gate(stock.act_fn)
        # Keep the stock module (minus its big tensors) for its gate constants (e.g. gpt_oss alpha/limit).
        for name in NAMES + ("gate_up_proj_bias", "down_proj_bias"):
            if name in stock._parameters:
                del stock._parameters[name]
        self._stock = [stock]
        self.deltas = nn.ModuleDict()
        self.chunk_bytes = chunk_bytes
        self.scores: dict[str, torch.Tensor] | None = None
        # Streaming candidates (reselection): {name: per-expert k}; results appended to self.found[name].
        self.stream_k: dict[str, int] | None = None
        self.found: dict[str, list] = {}
        self.merged: dict[str, torch.Tensor] | None = None  # base values replaced by UsafModel.merge
        self.score_power = 1
        # ({name: device copy of a host-tier stack}, CUDA event): set by tiers.Prefetcher for the next layer
        self.staged: tuple[dict, object] | None = None
        # Keep the gate/up pre-activations for the backward (fast) or recompute them from the layer input
        # with the weights the backward dequantizes anyway (one more GEMM; set when checkpointing).
        self.save_preact = True

    # ----------------------------------------------------------------------------------------------
    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.frozen[name].shape)

    def init_deltas(self, device=None) -> None:
        for name in NAMES:
            if name not in self.deltas:
                self.deltas[name] = SparseDelta(self.shape(name), device=device)

    def weight(self, name: str, start: int, stop: int, dtype, device, values=None) -> torch.Tensor:
        """Effective weights of experts ``[start, stop)``: dequantized base + delta, (n, R, C)."""
        delta = self.deltas[name] if name in self.deltas and self.merged is None else None
        has_delta = delta is not None and len(set(delta.span(start, stop))) == 2
        frozen = self.frozen[name]
        staged = self.staged
        if staged is not None and name in staged[0]:  # a device copy the prefetcher sent on a side stream
            torch.cuda.current_stream(staged[0][name].device).wait_event(staged[1])
            frozen = staged[0][name]
        if isinstance(frozen, DenseStack):
            w = frozen.dequantize(start, stop, dtype, device) if has_delta or frozen.dtype != dtype else \
                frozen.tensor[start:stop].to(device)
        else:
            w = frozen.dequantize(start, stop, dtype=dtype, device=device)
        if has_delta:
            delta.add_to(w, start, stop, values=values)
        return w

    def runs(self, counts: list[int]) -> list[tuple[int, int]]:
        """Group consecutive hit experts into runs whose dequantized weights fit ``chunk_bytes``."""
        per_expert = 2 * sum(self.frozen_numel[n] // self.num_experts for n in NAMES)  # bf16 bytes
        cap = max(1, self.chunk_bytes // max(per_expert, 1))
        runs, start = [], None
        for e, c in enumerate(counts + [0]):
            if c and start is None:
                start = e
            if start is not None and (not c or e - start >= cap):
                runs.append((start, e))
                start = e if c else None
        return runs

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                score_on_input: bool = False) -> torch.Tensor:
        """Args: hidden_states (T, H); top_k_index (T, K); top_k_weights (T, K). Returns (T, H)."""
        route = Routing.build(top_k_index, self.num_experts)
        values = [self.deltas[n].values for n in NAMES]
        return ExpertsFunction.apply(hidden_states, top_k_weights, values[0], values[1], self, route,
                                     score_on_input)


def _sparse_grad(left: torch.Tensor, right: torch.Tensor, idx: torch.Tensor,
                 gather_cost: float | None = None) -> torch.Tensor:
    """Gather of ``(left^T @ right).view(-1)[idx]`` without forming it when that is cheaper.

    Args:
        left: (T, R); right: (T, C); idx: (n,) int64 flat indices into (R, C). Returns (n,) fp32.
    """
    n_tok, rows = left.shape
    cols = right.shape[1]
    if idx.numel() * (GATHER_COST if gather_cost is None else gather_cost) >= rows * cols:
        return (left.t() @ right).view(-1).index_select(0, idx).float()
    out = torch.empty(idx.numel(), dtype=torch.float32, device=left.device)
    step = max(1, GATHER_CHUNK // max(n_tok, 1))
    lf, rf = left.float(), right.float()
    for a in range(0, idx.numel(), step):
        k = idx[a : a + step]
        out[a : a + step] = (lf[:, k // cols] * rf[:, k % cols]).sum(0)
    return out


def _stream_candidates(mod: UsafExperts, name: str, e: int, dw: torch.Tensor) -> None:
    """Top-k of ``|dL/dW|`` of one expert (``dw``: its dense gradient, fp32) among its inactive elements,
    kept as (scores, flat indices): one expert's dense gradient exists for a moment, never a layer's."""
    g = dw.abs().view(-1)
    delta = mod.deltas[name]
    g[delta.local(e, e + 1)] = -1.0
    k = min(mod.stream_k[name], g.numel())
    top = torch.topk(g, k, sorted=False)
    keep = top.values > 0
    per = delta.per_expert
    mod.found.setdefault(name, []).append((top.values[keep], top.indices[keep] + e * per))


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


def _bucket(n: int, block: int) -> int:
    """``n`` rows padded to a multiple of ``block``."""
    return -(-n // block) * block


class Routing:
    """The routed (token, expert) pairs of one forward, grouped by expert on a padded layout.

    Expert ``e`` owns padded rows ``[bounds[e], bounds[e + 1])``: its ``counts[e]`` real rows first, then
    zero-gradient padding up to a multiple of ``block`` (:func:`block_rows`), computed ``block`` rows at a
    time. ``tok`` (S_pad,) is the token row of each padded row, ``slot`` (S_pad,) its position in the
    flattened (T * K) routing weights (padding rows point at row 0 / slot 0 and are never scattered back),
    ``pos`` (S,) the padded rows that are routed.
    """

    __slots__ = ("counts", "bounds", "tok", "slot", "pos", "block")

    def __init__(self, counts: list[int], bounds: list[int], tok: torch.Tensor, slot: torch.Tensor,
                 pos: torch.Tensor, block: int):
        self.counts, self.bounds, self.block = counts, bounds, block
        self.tok, self.slot, self.pos = tok, slot, pos

    @staticmethod
    @torch.no_grad()
    def build(top_k_index: torch.Tensor, num_experts: int) -> Routing:
        top_k = top_k_index.shape[1]
        flat = top_k_index.reshape(-1)
        block = block_rows(flat.numel(), num_experts)
        _, perm = torch.sort(flat, stable=True)
        counts = torch.bincount(flat, minlength=num_experts + 1)[:num_experts].tolist()
        perm = perm[: sum(counts)]  # routes to the sentinel expert (index == E) are dropped
        bounds, rows = [0], []
        for c in counts:
            rows.append(torch.arange(bounds[-1], bounds[-1] + c))
            bounds.append(bounds[-1] + _bucket(c, block))
        pos = (torch.cat(rows) if rows else torch.empty(0, dtype=torch.long)).to(flat.device)
        slot = torch.zeros(bounds[-1], dtype=torch.long, device=flat.device)
        slot[pos] = perm
        return Routing(counts, bounds, slot // top_k, slot, pos, block)

    def segments(self, start: int, stop: int):
        """``(e, a, b, c)`` for the hit experts in ``[start, stop)``: padded rows ``[a, b)``, ``c`` real."""
        for e in range(start, stop):
            a, b = self.bounds[e], self.bounds[e + 1]
            if a != b:
                yield e, a, b, self.counts[e]

    def blocks(self, a: int, b: int, c: int):
        """``(r0, real)`` for the blocks of segment ``[a, b)``: rows ``[r0, r0 + block)``, the first ``real``
        of them routed (the rest padding)."""
        for r0 in range(a, b, self.block):
            yield r0, min(self.block, c - (r0 - a))


class ExpertsFunction(torch.autograd.Function):
    """Routed expert MLP over ``base + delta``, fused with the gather of the token rows, the routing
    weights and the scatter back: ``out[t] = sum_k w[t, k] * expert_{e[t, k]}(x[t])``.

    Gradients for the hidden states, the routing weights and the delta values only. It keeps the layer
    input and the routing (and, unless ``mod.save_preact`` is off, the (S_pad, 2I) gate/up
    pre-activations); no per-route copy of the inputs or outputs is kept. These are held on ``ctx``
    rather than through ``save_for_backward``, so that decoder-layer checkpointing does not re-run the
    experts: its recomputation stops after the last op that saved a tensor (the router), and the
    backward recomputes the pre-activations from the kept input with the weights it dequantizes anyway.
    """

    @staticmethod
    def forward(ctx, x, weights, v_gate_up, v_down, mod: UsafExperts, route: Routing, score_on_input: bool):
        # x: (T, H); weights: (T, K) routing weights.
        wp = weights.reshape(-1)[route.slot].unsqueeze(-1)  # (S_pad, 1)
        width = mod.shape("gate_up_proj")[2 if mod.transposed else 1]
        out = torch.zeros_like(x)
        save = mod.save_preact and any(ctx.needs_input_grad)
        h_all = x.new_empty(route.bounds[-1], width) if save else None
        n = route.block
        for start, stop in mod.runs(route.counts):
            w_gu = mod.weight("gate_up_proj", start, stop, x.dtype, x.device, v_gate_up)
            w_dn = mod.weight("down_proj", start, stop, x.dtype, x.device, v_down)
            for e, a, b, c in route.segments(start, stop):
                wg, wd = w_gu[e - start], w_dn[e - start]
                wg, wd = (wg, wd) if mod.transposed else (wg.t(), wd.t())
                for r0, real in route.blocks(a, b, c):
                    tok = route.tok[r0 : r0 + n]
                    xe = x.index_select(0, tok)
                    if score_on_input:  # llama4: the routing score scales the expert input
                        xe = xe * wp[r0 : r0 + n]
                    h = xe @ wg
                    if mod.gate_up_bias is not None:
                        h = h + mod.gate_up_bias[e]
                    if h_all is not None:
                        h_all[r0 : r0 + n] = h
                    y = mod._gate(h) @ wd
                    if mod.down_bias is not None:
                        y = y + mod.down_bias[e]
                    if not score_on_input:
                        y = y * wp[r0 : r0 + n]
                    out.index_add_(0, tok[:real], y[:real].to(out.dtype))
        ctx.x, ctx.weights, ctx.h_all = x.detach(), weights.detach(), h_all
        ctx.mod, ctx.route, ctx.score_on_input = mod, route, score_on_input
        return out

    @staticmethod
    def backward(ctx, dout):
        x, h_all, mod, route = ctx.x, ctx.h_all, ctx.mod, ctx.route
        on_input = ctx.score_on_input
        n = route.block
        wp = ctx.weights.reshape(-1)[route.slot].unsqueeze(-1)  # (S_pad, 1)
        dx_all = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        dwp = torch.zeros(route.bounds[-1], dtype=torch.float32, device=x.device)
        want = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        grads = {nm: torch.zeros_like(mod.deltas[nm].values) for nm in NAMES} if want else None
        scores = mod.scores
        for start, stop in mod.runs(route.counts):
            w_gu = mod.weight("gate_up_proj", start, stop, x.dtype, x.device)
            w_dn = mod.weight("down_proj", start, stop, x.dtype, x.device)
            for e, a, b, c in route.segments(start, stop):
                wg, wd = w_gu[e - start], w_dn[e - start]
                wg_f, wd_f = (wg, wd) if mod.transposed else (wg.t(), wd.t())  # forward orientation
                wg_b, wd_b = (wg.t(), wd.t()) if mod.transposed else (wg, wd)  # backward orientation
                # The expert's rows of the four factors of its weight gradients, filled block by block; the
                # gradients themselves are one matmul per stack over all of them (inner size b - a, a
                # multiple of the block: few distinct shapes).
                seg = b - a
                f_act = x.new_empty(seg, wd_b.shape[1])
                f_dy = x.new_empty(seg, x.shape[1])
                f_dh = x.new_empty(seg, wg_b.shape[0])
                f_x = x.new_empty(seg, x.shape[1])
                for r0, real in route.blocks(a, b, c):
                    tok = route.tok[r0 : r0 + n]
                    xe, we = x.index_select(0, tok), wp[r0 : r0 + n]
                    if on_input:
                        xe_raw, xe = xe, xe * we
                    if h_all is not None:
                        he = h_all[r0 : r0 + n]
                    else:
                        he = xe @ wg_f
                        if mod.gate_up_bias is not None:
                            he = he + mod.gate_up_bias[e]
                    g = dout.index_select(0, tok)
                    g[real:] = 0  # padding rows carry no gradient
                    with torch.enable_grad():
                        hh = he.detach().requires_grad_(True)
                        act = mod._gate(hh)  # (n, I)
                    dact = g @ wd_b
                    if on_input:
                        dye = g
                    else:  # out = w * y: dw = g . y = (g @ Wd) . act (+ g . bias), dy = w * g
                        dw = (dact * act.detach()).sum(-1, dtype=torch.float32)
                        if mod.down_bias is not None:
                            dw += g.float() @ mod.down_bias[e].float()
                        dwp[r0 : r0 + real] = dw[:real]
                        dye = g * we.to(g.dtype)
                        dact = dact * we.to(dact.dtype)
                    (dh,) = torch.autograd.grad(act, hh, dact)
                    dxe = dh @ wg_b
                    if on_input:  # xe = w * x: dw = dxe . x, dx = w * dxe
                        dwp[r0 : r0 + real] = (dxe.float() * xe_raw.float()).sum(-1)[:real]
                        dxe = dxe * we.to(dxe.dtype)
                    if dx_all is not None:
                        dx_all.index_add_(0, tok[:real], dxe[:real].to(dx_all.dtype))
                    o = r0 - a
                    f_act[o : o + n], f_dy[o : o + n] = act.detach(), dye
                    f_dh[o : o + n], f_x[o : o + n] = dh, xe
                # dW = left^T @ right in the native layout of each stack.
                pairs = {"down_proj": (f_act, f_dy) if mod.transposed else (f_dy, f_act),
                         "gate_up_proj": (f_x, f_dh) if mod.transposed else (f_dh, f_x)}
                for name, (left, right) in pairs.items():
                    if scores is not None and name in scores:
                        dw_full = left.t() @ right
                        scores[name][e] += dw_full.abs().to(scores[name].dtype) if mod.score_power == 1 else \
                            dw_full.float().square().to(scores[name].dtype)
                    if mod.stream_k is not None and name in mod.stream_k:
                        _stream_candidates(mod, name, e, (left.t() @ right).float())
                    if grads is not None:
                        delta = mod.deltas[name]
                        i0, i1 = delta.span(e, e + 1)
                        if i0 != i1:
                            grads[name][i0:i1] = _sparse_grad(left, right, delta.local(e, e + 1))
        dweights = None
        if ctx.needs_input_grad[1]:
            dflat = torch.zeros(ctx.weights.numel(), dtype=torch.float32, device=x.device)
            dflat[route.slot[route.pos]] = dwp[route.pos]
            dweights = dflat.view_as(ctx.weights).to(ctx.weights.dtype)
        g_gu = grads["gate_up_proj"] if grads is not None else None
        g_dn = grads["down_proj"] if grads is not None else None
        return dx_all, dweights, g_gu, g_dn, None, None, None


def llama4_block_forward(self, hidden_states: torch.Tensor):
    """Routed equivalent of ``Llama4TextMoe.forward`` (stock computes every expert for every token)."""
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_scores, router_logits = self.router(hidden_states)  # (T, E) zero outside the top-k
    top_idx = torch.topk(router_logits, self.top_k, dim=1).indices
    top_w = router_scores.gather(1, top_idx)
    routed = self.experts(hidden_states, top_idx, top_w, score_on_input=True)
    out = self.shared_expert(hidden_states)
    out.add_(routed)
    return out, router_logits


