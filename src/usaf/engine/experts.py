"""The hot path: routed expert compute over a frozen (optionally quantized) base plus sparse deltas.

``UsafExperts`` replaces a transformers fused-experts module. Its forward groups the routed
(token, expert) pairs by expert, and ``ExpertsFunction`` runs only the experts that were hit:

- forward: per run of hit experts, dequantize the frozen stack (into the workspace's reused buffer), add
  that run's delta (O(nnz)), then per expert, its rows padded to a multiple of a granule and in pieces of at
  most two blocks (``usaf.engine.routing``: few matmul shapes per op, so oneDNN builds no new primitive per
  step): gather the token rows, one matmul pair, scale by the routing weight and scatter-add into the (T, H)
  output. It keeps the layer input, the routing and (by default)
  the gate/up pre-activations; no per-route copy of the inputs or outputs.
- backward: re-dequantizes the weights (never saved), returns the input gradient, the routing-weight
  gradient and the gradient of the compact delta values, ``g[k] = sum_t dY[t, r_k] * X[t, c_k]`` over
  the tokens of that expert. Either gather-dot (O(T * nnz)) or a per-expert GEMM ``dY^T X`` gathered
  and freed at once, chosen by cost; no dense gradient of a whole expert stack ever exists.
- null experts: routes to an index ``>= E`` (a router that also scores null or zero experts) run no expert.
  By default they add nothing (inkling's and zaya's experts skip them); with ``null_experts="identity"``
  (longcat_flash's zero experts) they add ``w * x``, and the backward returns ``w * dY`` to the input and
  ``dY . x`` to their routing weights.

The module's mode is one explicit value, :class:`ExpertsMode`, changed only through
:meth:`UsafExperts.set_mode` (or the ``with experts.mode_as(...)`` context): ``lean`` (recompute the
pre-activations in the backward; activation checkpointing and scoring passes), ``score_hook`` (called in the
backward with the two factors of each hit expert's dense weight gradient: importance scoring lives in
``usaf.engine.select``, not here), ``staged`` (device copies of host-tier stacks sent ahead by the
prefetcher), ``capture`` (a calibration pass records each call's input, routing and output gradient:
:class:`Captured`) and ``replay`` (the forward computes nothing, so that the backward of a captured call can be
run again for some of its experts with a score hook). ``usaf.engine.reference`` holds the dense ~30-line computation this function must equal.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers.activations import SiLUActivation
from transformers.integrations.moe import _default_apply_gate

from .delta import SparseDelta
from .routing import Routing
from .spill import PreactSpill
from .store import DenseStack, Workspace, freeze_stack

# The stack names of the standard layout (transformers' fused experts with a gate); a module's own are
# ``UsafExperts.names`` (its :class:`ExpertsLayout`).
NAMES = ("gate_up_proj", "down_proj")

# Relative cost of one gather-dot multiply-add vs one GEMM multiply-add (measured: bench/sparse_grad.py, 2 CPU
# cores: 43-180 in bf16, median ~75; 23-114 in fp32): the gather path below a density of 1/64 in an expert.
GATHER_COST = 64.0
# Bound on the (nnz x T) gather buffers, in elements (two of them, fp32, in the workspace).
GATHER_CHUNK = 1 << 20


def _default_gate(act_fn):
    def gate(h: torch.Tensor) -> torch.Tensor:
        g, u = h.chunk(2, dim=-1)
        return act_fn(g) * u

    return gate


@dataclass(frozen=True)
class Stack:
    """One expert weight stack as the stock experts module holds it."""

    name: str  # usaf's name for it (deltas, frozen stacks, score hooks): the parameter's own name
    path: str  # the parameter's path on the experts module: its on-model name is ``<experts prefix>.<path>``
    transposed: bool  # stored [E, in, out] (else [E, out, in]); a 2-D [E * R, C] parameter is viewed as [E, R, C]


@dataclass(frozen=True)
class ExpertsLayout:
    """The stacks of one experts module and how they compose: ``y = down @ act(inputs @ x)``.

    The outputs of the input stacks are concatenated along the intermediate axis (one ``gate_up_proj``; an
    ``up_proj`` alone; or dbrx's separate gate ``w1`` then up ``v1``); the last stack is ``down``.
    """

    stacks: tuple[Stack, ...]  # the input stacks, then down
    gated: bool = True  # act(gate) * up with the module's ``_apply_gate``; False: act(up) (``has_gate=False``)
    bias: bool = False  # ``<path>_bias`` beside a single input stack and beside down
    concatenated: bool = True  # gate/up rows concatenated (False: interleaved, read by ``_apply_gate``)
    act: str = "act_fn"  # path of the activation on the experts module (default gating, or no gate)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.stacks)

    @property
    def transposed(self) -> bool:
        """The orientation of the input stacks."""
        return self.stacks[0].transposed

    @staticmethod
    def fused(transposed: bool, bias: bool = False, concatenated: bool = True, gated: bool = True) -> ExpertsLayout:
        """transformers' fused experts: ``gate_up_proj`` (``up_proj`` without a gate) and ``down_proj``."""
        first = "gate_up_proj" if gated else "up_proj"
        return ExpertsLayout((Stack(first, first, transposed), Stack("down_proj", "down_proj", transposed)),
                             gated=gated, bias=bias, concatenated=concatenated)


def _get(module: nn.Module, path: str):
    for part in path.split("."):
        module = getattr(module, part)
    return module


def stack_tensor(stock: nn.Module, stack: Stack, num_experts: int) -> torch.Tensor:
    """The ``[E, R, C]`` weights of one stack of a stock experts module (a view of its parameter)."""
    t = _get(stock, stack.path)
    return t.data.view(num_experts, -1, t.shape[-1]) if t.dim() == 2 else t.data


def computing_experts(stock: nn.Module, layout: ExpertsLayout) -> int:
    """The experts of a stock experts module that compute: the fewest rows of its 3-D stacks (longcat_flash's
    gate_up_proj also holds rows for its zero experts, never read), or its ``num_experts`` for 2-D stacks
    (dbrx's ``[E * R, C]``)."""
    rows = [t.shape[0] for t in (_get(stock, st.path) for st in layout.stacks) if t.dim() == 3]
    return min(rows) if rows else int(stock.num_experts)


# hook(stack name, expert, left (S, R), right (S, C)): the expert's dense weight gradient is ``left.T @ right``
# in the stack's native layout (``[R, C]``); called once per hit expert and stack in every backward.
ScoreHook = Callable[[str, int, torch.Tensor, torch.Tensor], None]


@dataclass(eq=False)
class Captured:
    """One call of an experts module in a calibration pass (``ExpertsMode.capture``): its input, routing and,
    once its backward ran, the gradient of its output. From these the backward of that call can be run again
    for any subset of its experts (``ExpertsMode.replay``), without the rest of the model."""

    x: torch.Tensor  # (T, H) layer input
    index: torch.Tensor  # (T, K) routed experts
    weights: torch.Tensor  # (T, K) routing weights
    on_input: bool  # llama4: the routing weight scales the expert input
    dout: torch.Tensor | None = None  # (T, H) gradient of the output; None until the backward ran


@dataclass(frozen=True)
class ExpertsMode:
    """How a :class:`UsafExperts` runs (see the module docstring). Immutable: change it with ``set_mode``."""

    lean: bool = False  # recompute the gate/up pre-activations in the backward instead of keeping them
    score_hook: ScoreHook | None = None  # receives each hit expert's weight-gradient factors in the backward
    staged: tuple[dict, object] | None = None  # ({stack name: device copy}, CUDA event) from the prefetcher
    capture: list | None = None  # each forward appends a :class:`Captured`, which its backward completes
    replay: bool = False  # the forward computes nothing: only the backward (and its score hook) is wanted


class UsafExperts(nn.Module):
    """Drop-in replacement for a transformers fused experts module.

    The frozen stacks live in ``self.frozen`` (dense or quantized, not parameters); the only trainable
    expert tensors are ``self.deltas[name].values``. Both are keyed by ``self.names`` (the layout's stacks:
    ``gate_up_proj`` / ``down_proj``, ``up_proj`` / ``down_proj`` without a gate, dbrx's ``w1`` / ``v1`` /
    ``w2``); ``param_name`` gives each one's on-model name.
    """

    def __init__(self, stock: nn.Module, layout: ExpertsLayout, quant: str = "none", group_size: int = 64,
                 chunk_bytes: int = 256 << 20, frozen: dict | None = None, null_experts: str = "skip",
                 rounding: str = "mse"):
        super().__init__()
        if null_experts not in ("skip", "identity"):
            raise ValueError(f"null_experts must be 'skip' or 'identity', got {null_experts!r}")
        self.layout = layout
        self.names = layout.names  # the input stacks, then down
        self.paths = {st.name: st.path for st in layout.stacks}
        self.transposed = layout.transposed  # the input stacks' orientation
        self.down_transposed = layout.stacks[-1].transposed
        first = _get(stock, layout.stacks[0].path)
        # Experts that compute; routes to indices >= num_experts are null experts (``null_experts``). A stack
        # may hold more rows than that (longcat_flash's gate_up_proj has rows for its zero experts, never read):
        # the frozen stacks and deltas keep the checkpoint's shapes.
        self.num_experts = computing_experts(stock, layout)
        self.null_identity = null_experts == "identity"
        stacks = {st.name: stack_tensor(stock, st, self.num_experts) for st in layout.stacks}
        self.frozen = frozen or {name: freeze_stack(t, quant, group_size, rounding) for name, t in stacks.items()}
        self.base_dtype = first.dtype
        self.frozen_numel = {name: t.numel() for name, t in stacks.items()}
        self._expert_bytes = 2 * sum(t[0].numel() for t in stacks.values())  # one expert, bf16
        # widths of the input stacks' outputs: their slices of the intermediate pre-activations
        self.widths = [stacks[n].shape[2 if self.transposed else 1] for n in self.names[:-1]]
        self.quant = quant
        bias_paths = []
        if layout.bias:
            if len(self.names) != 2:
                raise ValueError("expert biases with more than one input stack are not supported")
            bias_paths = [f"{layout.stacks[0].path}_bias", f"{layout.stacks[1].path}_bias"]
            self.register_buffer("gate_up_bias", _get(stock, bias_paths[0]).detach().clone(), persistent=False)
            self.register_buffer("down_bias", _get(stock, bias_paths[1]).detach().clone(), persistent=False)
        else:
            self.gate_up_bias = self.down_bias = None
        # a norm after each expert's down projection (``has_post_expert_norm``: muse_spark), before the routing
        # weight; a frozen submodule, so its weight keeps its name and device with the model
        self.post_expert_norm = stock.post_expert_norm if getattr(stock, "has_post_expert_norm", False) else None
        apply_gate = getattr(type(stock), "_apply_gate", None)  # set by transformers' experts decorator
        if not layout.gated:  # up_proj + activation (has_gate=False)
            self._gate = _get(stock, layout.act)
        elif apply_gate is not None:
            self._gate = lambda h, _s=stock: apply_gate(_s, h)
        else:
            self._gate = _default_gate(_get(stock, layout.act))
        # silu(gate) * up on concatenated halves (most families): the backward computes the gate's derivative
        # itself, the same ops autograd would run, without an autograd call per block of rows
        act = getattr(stock, layout.act, None) if "." not in layout.act else None
        self.swiglu = (layout.gated and layout.concatenated and apply_gate in (None, _default_apply_gate)
                       and isinstance(act, (nn.SiLU, SiLUActivation)))
        # Keep the stock module (minus its big tensors) for its gate constants (e.g. gpt_oss alpha/limit).
        for path in [st.path for st in layout.stacks] + bias_paths:
            owner, _, leaf = path.rpartition(".")
            owner = _get(stock, owner) if owner else stock
            if leaf in owner._parameters:
                del owner._parameters[leaf]
        self._stock = [stock]
        self.deltas = nn.ModuleDict()
        self.chunk_bytes = chunk_bytes
        # where the hot path dequantizes a run's weights; ``usaf.engine.model.prepare`` gives every experts
        # module of a model the same one
        self.workspace = Workspace()
        # where the lean backward finds the gate/up pre-activations its forward wrote (CPU; else recomputed)
        self.preact_spill: PreactSpill | None = None
        self._mode = ExpertsMode()
        # called after each pass over the frozen stacks (the forward, the backward): the disk tier sets it so
        # that a trainable layer's mapped pages are given back between uses (``usaf.load.tiers.Prefetcher``)
        self.after_pass = None
        # Base values replaced by merge() ({} once fold() made the effective weights the frozen stacks): while
        # set, the forward adds no delta.
        self._merged: dict[str, torch.Tensor] | None = None

    # -- mode ------------------------------------------------------------------------------------------
    @property
    def mode(self) -> ExpertsMode:
        return self._mode

    def set_mode(self, **changes) -> ExpertsMode:
        """Change fields of the mode (``lean``, ``score_hook``, ``staged``); returns the previous mode."""
        old = self._mode
        self._mode = dataclasses.replace(old, **changes)
        return old

    @contextlib.contextmanager
    def mode_as(self, **changes):
        """``with experts.mode_as(score_hook=h): ...``: the mode for the block, restored after."""
        old = self.set_mode(**changes)
        try:
            yield self
        finally:
            self._mode = old

    @property
    def merged(self) -> bool:
        """The deltas are folded into the frozen stacks (the forward adds none)."""
        return self._merged is not None

    # ----------------------------------------------------------------------------------------------
    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.frozen[name].shape)

    def live_numel(self, name: str) -> int:
        """Elements of stack ``name`` that belong to experts that compute (what selection may activate)."""
        return self.num_experts * self.deltas[name].per_expert

    def param_name(self, name: str) -> str:
        """The on-model name of stack ``name`` relative to this module (e.g. dbrx ``mlp.w1``)."""
        return self.paths[name]

    def init_deltas(self, device=None) -> None:
        for name in self.names:
            if name not in self.deltas:
                self.deltas[name] = SparseDelta(self.shape(name), device=device)

    def weight(self, name: str, start: int, stop: int, dtype, device, values=None,
               reuse: bool = False) -> torch.Tensor:
        """Effective weights of experts ``[start, stop)``: dequantized base + delta, (n, R, C). ``reuse``: in the
        workspace's buffer for ``name`` (valid until the next such call: the hot path's runs), else a new
        tensor."""
        delta = self.deltas[name] if name in self.deltas and self._merged is None else None
        has_delta = delta is not None and len(set(delta.span(start, stop))) == 2
        frozen = self.frozen[name]
        staged = self._mode.staged
        if staged is not None and name in staged[0]:  # a device copy the prefetcher sent on a side stream
            torch.cuda.current_stream(staged[0][name].device).wait_event(staged[1])
            frozen = staged[0][name]
        device = torch.device(device)
        if isinstance(frozen, DenseStack) and not has_delta and frozen.dtype == dtype:
            return frozen.tensor[start:stop].to(device)  # no copy where none is needed
        if reuse:
            out = self.workspace.get(name, (stop - start, *frozen.shape[1:]), dtype, device)
            w = frozen.dequantize(start, stop, dtype=dtype, device=device, out=out, workspace=self.workspace)
        else:
            w = frozen.dequantize(start, stop, dtype=dtype, device=device)
        if has_delta:
            delta.add_to(w, start, stop, values=values)
        return w

    def runs(self, counts: list[int]) -> list[tuple[int, int]]:
        """Group consecutive hit experts into runs whose dequantized weights fit ``chunk_bytes``."""
        cap = max(1, self.chunk_bytes // max(self._expert_bytes, 1))
        runs, start = [], None
        for e, c in enumerate(counts + [0]):
            if c and start is None:
                start = e
            if start is not None and (not c or e - start >= cap):
                runs.append((start, e))
                start = e if c else None
        return runs

    # -- the frozen base ----------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        """Fold the deltas into an unquantized frozen base (``base[idx] = round(base[idx] + v)``), keeping the
        replaced base values so that :meth:`unmerge` restores the original bytes exactly."""
        if self._merged is not None:
            return
        saved = {}
        for n in self.names:
            frozen = self.frozen[n]
            if not hasattr(frozen, "tensor"):
                raise ValueError("merge needs an unquantized base (quant='none')")
            d = self.deltas[n]
            flat = frozen.tensor.view(-1)
            idx = d.indices.long()
            saved[n] = flat[idx].clone()
            flat[idx] = (flat[idx].float() + d.values.detach()).to(flat.dtype)
        self._merged = saved

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`: the frozen base returns to its original bytes."""
        if not self._merged:
            return
        for n in self.names:
            self.frozen[n].tensor.view(-1)[self.deltas[n].indices.long()] = self._merged[n]
        self._merged = None

    @torch.no_grad()
    def fold(self, compute_dtype: torch.dtype, store_dtype: torch.dtype) -> None:
        """Replace every frozen stack by its dense effective weights (base + delta, rounded to
        ``compute_dtype`` as in training, then stored at ``store_dtype``), for good: what an export writes."""
        cpu = torch.device("cpu")
        for name in list(self.frozen):
            rows = self.shape(name)[0]
            self.frozen[name] = DenseStack(self.weight(name, 0, rows, compute_dtype, cpu).to(store_dtype))
        self._merged = {}

    def release(self) -> list:
        """Drop the frozen stacks (a layer that will not run again); returns them (for their pages' eviction)."""
        stacks = list(self.frozen.values())
        self.frozen = {}
        return stacks

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                score_on_input: bool = False) -> torch.Tensor:
        """Args: hidden_states (T, H) (or (B, S, H): dbrx); top_k_index (T, K); top_k_weights (T, K).
        Returns hidden_states' shape."""
        route = Routing.build(top_k_index, self.num_experts)
        values = [self.deltas[n].values for n in self.names]
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        rec = None
        if self._mode.capture is not None:
            rec = Captured(x.detach(), top_k_index.detach(), top_k_weights.detach(), score_on_input)
            self._mode.capture.append(rec)
        out = ExpertsFunction.apply(x, top_k_weights, self, route, score_on_input, rec, *values)
        return out.view(hidden_states.shape)


def _sparse_grad(left: torch.Tensor, right: torch.Tensor, idx: torch.Tensor,
                 gather_cost: float | None = None, workspace: Workspace | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Gather of ``(left^T @ right).view(-1)[idx]`` without forming it when that is cheaper.

    Args:
        left: (T, R); right: (T, C); idx: (n,) flat indices into (R, C). Returns (n,) fp32.
        workspace: where the GEMM path writes the dense (R, C) product (reused: no new allocation per call).
        out: an (n,) fp32 tensor to write the result into (and return).

    The gather path transposes both factors to fp32 rows of T values and takes, for each index, the dot
    product of row ``r`` of ``left^T`` and row ``c`` of ``right^T``: contiguous reads of T values each, summed in
    fp32 (the GEMM path rounds the product to the factors' dtype first).
    """
    n_tok, rows = left.shape
    cols = right.shape[1]
    if idx.numel() * (GATHER_COST if gather_cost is None else gather_cost) >= rows * cols:
        full = workspace.get("dW", (rows, cols), left.dtype, left.device) if workspace is not None else None
        full = torch.mm(left.t(), right, out=full) if full is not None else left.t() @ right
        picked = full.view(-1).index_select(0, idx).float()
        return out.copy_(picked) if out is not None else picked
    if out is None:
        out = torch.empty(idx.numel(), dtype=torch.float32, device=left.device)
    ws = workspace or Workspace()
    dev, f32 = left.device, torch.float32
    lt = ws.get("gather_l", (rows, n_tok), f32, dev).copy_(left.t())  # (R, T): row r is column r of left
    rt = ws.get("gather_r", (cols, n_tok), f32, dev).copy_(right.t())
    step = max(1, GATHER_CHUNK // max(n_tok, 1))
    for a in range(0, idx.numel(), step):
        k = idx[a : a + step]
        m = k.numel()
        pl = torch.index_select(lt, 0, k // cols, out=ws.get("gather_a", (m, n_tok), f32, dev))
        pr = torch.index_select(rt, 0, k % cols, out=ws.get("gather_b", (m, n_tok), f32, dev))
        torch.sum(pl.mul_(pr), dim=1, out=out[a : a + m])
    return out


def _identity_weights(mod: UsafExperts, route: Routing, weights: torch.Tensor) -> torch.Tensor | None:
    """(T, 1) summed routing weights of each token's routes to identity null experts; None when the module's
    null experts add nothing or no route goes to one."""
    if not mod.null_identity or route.null is None:
        return None
    return (weights * route.null).sum(-1, keepdim=True)


class ExpertsFunction(torch.autograd.Function):
    """Routed expert MLP over ``base + delta``, fused with the gather of the token rows, the routing
    weights and the scatter back: ``out[t] = sum_k w[t, k] * expert_{e[t, k]}(x[t])``.

    Gradients for the hidden states, the routing weights and the delta values only. It keeps the layer
    input and the routing (and, unless the module's mode is ``lean``, the (S_pad, W) pre-activations of the
    input stacks: W = 2I for gate/up, I without a gate); no per-route copy of the inputs or outputs is kept.
    These are held on ``ctx`` rather than through ``save_for_backward``, so that decoder-layer checkpointing
    does not re-run the experts: its recomputation stops after the last op that saved a tensor (the router),
    and the backward recomputes the pre-activations from the kept input with the weights it dequantizes anyway.
    """

    @staticmethod
    def forward(ctx, x, weights, mod: UsafExperts, route: Routing, score_on_input: bool, rec: Captured | None,
                *values):
        # x: (T, H); weights: (T, K) routing weights; rec: this call's record in a calibration pass (its
        # backward stores the output gradient there); values: the delta values of mod.names, in order.
        wp = weights.reshape(-1)[route.slot].unsqueeze(-1)  # (S_pad, 1)
        width = sum(mod.widths)
        out = torch.zeros_like(x)
        save = not mod.mode.replay and any(ctx.needs_input_grad)
        h_all = x.new_empty(route.bounds[-1], width) if save and not mod.mode.lean else None
        spilled = None  # lean on the CPU: the pre-activations go to the spill file instead of being recomputed
        if save and mod.mode.lean and mod.preact_spill is not None and x.device.type == "cpu":
            spilled = mod.preact_spill.region(route.bounds[-1], width, x.dtype)
        for start, stop in ([] if mod.mode.replay else mod.runs(route.counts)):
            w_gu, w_dn = _run_weights(mod, start, stop, x, values)
            for e, a, b, c in route.segments(start, stop):
                wg, wd = w_gu[e - start], w_dn[e - start]
                wg = wg if mod.transposed else wg.t()
                wd = wd if mod.down_transposed else wd.t()
                for r0, n, real in route.blocks(a, b, c):
                    tok = route.tok[r0 : r0 + n]
                    xe = x.index_select(0, tok)
                    if score_on_input:  # llama4: the routing score scales the expert input
                        xe = xe * wp[r0 : r0 + n]
                    h = xe @ wg
                    if mod.gate_up_bias is not None:
                        h = h + mod.gate_up_bias[e]
                    if h_all is not None:
                        h_all[r0 : r0 + n] = h
                    elif spilled is not None:
                        spilled.write(r0, h)
                    y = mod._gate(h) @ wd
                    if mod.down_bias is not None:
                        y = y + mod.down_bias[e]
                    if mod.post_expert_norm is not None:
                        y = mod.post_expert_norm(y)
                    if not score_on_input:
                        y = y * wp[r0 : r0 + n]
                    out.index_add_(0, tok[:real], y[:real].to(out.dtype))
        null = _identity_weights(mod, route, weights)
        if null is not None:  # identity null experts: out[t] += sum_k w[t, k] x[t] over the null routes
            out.add_((x * null).to(out.dtype))
        ctx.x, ctx.weights, ctx.h_all, ctx.spilled = x.detach(), weights.detach(), h_all, spilled
        ctx.mod, ctx.route, ctx.score_on_input, ctx.rec = mod, route, score_on_input, rec
        if mod.after_pass is not None and not mod.mode.replay:
            mod.after_pass()
        return out

    @staticmethod
    def backward(ctx, dout):
        x, h_all, mod, route = ctx.x, ctx.h_all, ctx.mod, ctx.route
        spilled = ctx.spilled if ctx.spilled is not None and ctx.spilled.ok else None
        width = sum(mod.widths)
        if ctx.rec is not None:
            ctx.rec.dout = dout.detach()
        on_input = ctx.score_on_input
        wp = ctx.weights.reshape(-1)[route.slot].unsqueeze(-1)  # (S_pad, 1)
        dx_all = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        dwp = torch.zeros(route.bounds[-1], dtype=torch.float32, device=x.device)
        want = any(ctx.needs_input_grad[5:])
        grads = {nm: torch.zeros_like(mod.deltas[nm].values) for nm in mod.names} if want else None
        hook = mod.mode.score_hook
        inputs, down = mod.names[:-1], mod.names[-1]
        spans = [(sum(mod.widths[:i]), sum(mod.widths[: i + 1])) for i in range(len(inputs))]
        swiglu = mod.swiglu
        half = sum(mod.widths[: len(inputs)]) // 2
        for start, stop in mod.runs(route.counts):
            w_gu, w_dn = _run_weights(mod, start, stop, x)
            for e, a, b, c in route.segments(start, stop):
                wg, wd = w_gu[e - start], w_dn[e - start]
                # forward orientation (in, out) and backward orientation (out, in)
                wg_f, wg_b = (wg, wg.t()) if mod.transposed else (wg.t(), wg)
                wd_f, wd_b = (wd, wd.t()) if mod.down_transposed else (wd.t(), wd)
                # The expert's rows of the four factors of its weight gradients, filled piece by piece; the
                # gradients themselves are one product per stack over all of them (inner size b - a, a
                # multiple of the granule).
                seg = b - a
                f_act = x.new_empty(seg, wd_b.shape[1])
                f_dy = x.new_empty(seg, x.shape[1])
                f_dh = x.new_empty(seg, wg_b.shape[0])
                f_x = x.new_empty(seg, x.shape[1])
                for r0, n, real in route.blocks(a, b, c):
                    tok = route.tok[r0 : r0 + n]
                    o = r0 - a
                    # the expert's input rows go straight into their factor (unless llama4 scales them first)
                    xe, we = torch.index_select(x, 0, tok, out=None if on_input else f_x[o : o + n]), wp[r0 : r0 + n]
                    if on_input:
                        xe_raw, xe = xe, xe * we
                    if h_all is not None:
                        he = h_all[r0 : r0 + n]
                    elif spilled is not None:  # what the forward wrote, into one reused buffer
                        he = spilled.read(r0, mod.workspace.get("preact", (n, width), x.dtype, x.device))
                    else:
                        he = xe @ wg_f
                        if mod.gate_up_bias is not None:
                            he = he + mod.gate_up_bias[e]
                    g = dout.index_select(0, tok)
                    if real < n:
                        g[real:] = 0  # padding rows carry no gradient
                    if swiglu:  # act = silu(gate) * up, written in place into the expert's act factor
                        gate, up = he[:, :half], he[:, half:]
                        sg = F.silu(gate)
                        act = torch.mul(sg, up, out=f_act[o : o + n])
                    else:
                        with torch.enable_grad():
                            hh = he.detach().requires_grad_(True)
                            act = mod._gate(hh)  # (n, I)
                    if mod.post_expert_norm is not None:  # y = norm(act @ Wd (+ bias)): its backward by autograd
                        y_pre = act.detach() @ wd_f
                        if mod.down_bias is not None:
                            y_pre = y_pre + mod.down_bias[e]
                        with torch.enable_grad():
                            yp = y_pre.requires_grad_(True)
                            yn = mod.post_expert_norm(yp)
                        dyn = g
                        if not on_input:  # out = w * norm(y): dw = g . norm(y), d norm(y) = w * g
                            dwp[r0 : r0 + real] = (g.float() * yn.detach().float()).sum(-1)[:real]
                            dyn = g * we.to(g.dtype)
                        (dye,) = torch.autograd.grad(yn, yp, dyn)
                        dact = dye @ wd_b
                    elif on_input:
                        dact = g @ wd_b
                        dye = g
                    else:  # out = w * y: dw = g . y = (g @ Wd) . act (+ g . bias), dy = w * g
                        dact = g @ wd_b
                        dw = (dact * act.detach()).sum(-1, dtype=torch.float32)
                        if mod.down_bias is not None:
                            dw += g.float() @ mod.down_bias[e].float()
                        dwp[r0 : r0 + real] = dw[:real]
                        dye = torch.mul(g, we.to(g.dtype), out=f_dy[o : o + n])
                        dact = dact * we.to(dact.dtype)
                    if swiglu:  # d gate = silu'(gate) * (dact * up), d up = dact * silu(gate), into f_dh's rows
                        dh = f_dh[o : o + n]
                        torch.mul(dact, sg, out=dh[:, half:])
                        torch.ops.aten.silu_backward(dact * up, gate, grad_input=dh[:, :half])
                    else:
                        (dh,) = torch.autograd.grad(act, hh, dact)
                    if dx_all is not None or on_input:  # else no input gradient is wanted (the lowest trained
                        dxe = dh @ wg_b                 # layer, a scoring replay): one matmul less
                        if on_input:  # xe = w * x: dw = dxe . x, dx = w * dxe
                            dwp[r0 : r0 + real] = (dxe.float() * xe_raw.float()).sum(-1)[:real]
                            dxe = dxe * we.to(dxe.dtype)
                        if dx_all is not None:
                            dx_all.index_add_(0, tok[:real], dxe[:real].to(dx_all.dtype))
                    if not swiglu:
                        f_act[o : o + n], f_dh[o : o + n] = act.detach(), dh
                    if on_input or mod.post_expert_norm is not None:  # else written in place above
                        f_dy[o : o + n] = dye
                    if on_input:
                        f_x[o : o + n] = xe
                # dW = left^T @ right in the native layout of each stack; an input stack's part of the
                # pre-activation gradient is its slice of f_dh.
                pairs = {down: (f_act, f_dy) if mod.down_transposed else (f_dy, f_act)}
                for name, (lo, hi) in zip(inputs, spans):
                    dh_s = f_dh if len(inputs) == 1 else f_dh[:, lo:hi]
                    pairs[name] = (f_x, dh_s) if mod.transposed else (dh_s, f_x)
                for name, (left, right) in pairs.items():
                    if hook is not None:
                        hook(name, e, left, right)
                    if grads is not None:
                        delta = mod.deltas[name]
                        i0, i1 = delta.span(e, e + 1)
                        if i0 != i1:
                            _sparse_grad(left, right, delta.local(e, e + 1), workspace=mod.workspace,
                                         out=grads[name][i0:i1])
        if ctx.spilled is not None:
            ctx.spilled.free()
        if mod.after_pass is not None:
            mod.after_pass()
        null = _identity_weights(mod, route, ctx.weights)
        if null is not None and dx_all is not None:  # out = w * x on the null routes: dx = w * dout
            dx_all.add_((dout * null).to(dx_all.dtype))
        dweights = None
        if ctx.needs_input_grad[1]:
            dflat = torch.zeros(ctx.weights.numel(), dtype=torch.float32, device=x.device)
            dflat[route.slot[route.pos]] = dwp[route.pos]
            if null is not None:  # dw = dout . x on the null routes
                dnull = (dout.float() * x.float()).sum(-1, keepdim=True) * route.null
                dflat += dnull.view(-1)
            dweights = dflat.view_as(ctx.weights).to(ctx.weights.dtype)
        values_grads = [grads[nm] for nm in mod.names] if grads is not None else [None] * len(mod.names)
        return dx_all, dweights, None, None, None, None, *values_grads


def _run_weights(mod: UsafExperts, start: int, stop: int, x: torch.Tensor, values=None):
    """Effective (input, down) weights of experts ``[start, stop)``; separate input stacks (dbrx's gate and
    up) are concatenated along their output axis, as one gate_up stack."""
    vals = values if values is not None else [None] * len(mod.names)
    ws = [mod.weight(nm, start, stop, x.dtype, x.device, v, reuse=True) for nm, v in zip(mod.names, vals)]
    w_in = ws[0] if len(ws) == 2 else torch.cat(ws[:-1], dim=2 if mod.transposed else 1)
    return w_in, ws[-1]


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


def jetmoe_block_forward(self, layer_input: torch.Tensor) -> torch.Tensor:
    """Routed equivalent of ``JetMoeMoE.forward`` (stock sorts the tokens by expert and calls its stacks with
    per-expert row counts): softmax over the top-k router logits, the experts, the block's bias."""
    bsz, length, width = layer_input.shape
    x = layer_input.reshape(-1, width)
    logits = self.router(x)[4]  # the router module runs: transformers records its logits
    top_logits, top_idx = logits.topk(self.router.top_k, dim=1)
    weights = torch.softmax(top_logits, dim=1).type_as(x)
    return self.experts(x, top_idx, weights).view(bsz, length, width) + self.bias


