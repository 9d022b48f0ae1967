"""Sparse deltas over frozen 2-D weights (the attention projections and the nn.Linear shared experts of the
trainable layers).

A :class:`SparseLinear` is attached to an ``nn.Linear`` in place (the module, its name and its ``weight`` stay
where transformers put them): its forward computes ``x @ round(W + delta)^T + b`` with the delta added in fp32
at the active positions only and rounded once to the weight's dtype, as for the expert stacks. The backward
is exact and sparse: ``dX`` uses the same effective weight (recomputed, never saved), and the gradient of the
active values is ``g[k] = sum_t dY[t, r_k] * X[t, c_k]``, computed a block of output rows at a time (a
``rows x in`` GEMM, gathered at the active positions of those rows and freed): no dense gradient of the whole
weight, no trainable dense tensor.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from .delta import SparseDelta

_BLOCK_BYTES = 16 << 20  # fp32 bytes of one block of the weight gradient in the backward


def _effective(weight: torch.Tensor, delta: SparseDelta, values: torch.Tensor) -> torch.Tensor:
    w = weight.detach().clone()
    if len(delta):
        delta.add_to(w.view(1, *w.shape), 0, 1, values=values.detach())
    return w


class _SparseLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, values, weight, bias, delta):
        w = _effective(weight, delta, values)
        ctx.delta, ctx.weight = delta, weight
        ctx.save_for_backward(x, values)
        return nn.functional.linear(x, w, bias)

    @staticmethod
    def backward(ctx, dy):
        x, values = ctx.saved_tensors
        delta, weight = ctx.delta, ctx.weight
        dx = dv = dw = None
        if ctx.needs_input_grad[0]:
            dx = dy @ _effective(weight, delta, values)
        if ctx.needs_input_grad[2]:  # the frozen weight's dense gradient: only when scoring asks for it
            dw = (dy.reshape(-1, weight.shape[0]).float().t() @ x.reshape(-1, weight.shape[1]).float()).to(weight.dtype)
        if ctx.needs_input_grad[1] and len(delta):
            out_f, in_f = weight.shape
            x2 = x.reshape(-1, in_f).float()
            dy2 = dy.reshape(-1, out_f).float()
            idx = delta.indices.long()
            cols, where = _columns(delta, in_f)
            if cols.numel() * 2 <= in_f and out_f * cols.numel() * 4 <= _BLOCK_BYTES:
                # few distinct input columns (whole-column units, or a sparse set): dY^T X[:, cols] only
                g = dy2.t() @ x2[:, cols]  # (out, n_cols)
                return dx, g.view(-1)[(idx // in_f) * cols.numel() + where], dw, None, None
            dv = torch.empty(idx.numel(), dtype=torch.float32, device=values.device)
            rows = max(1, _BLOCK_BYTES // (4 * in_f))
            bounds = torch.searchsorted(idx, torch.arange(0, out_f + rows, rows, device=idx.device) * in_f).tolist()
            for j, r0 in enumerate(range(0, out_f, rows)):
                a, b = bounds[j], bounds[j + 1]
                if a == b:
                    continue
                r1 = min(out_f, r0 + rows)
                g = dy2[:, r0:r1].t() @ x2  # (r1 - r0, in)
                dv[a:b] = g.view(-1)[idx[a:b] - r0 * in_f]
        return dx, dv, dw, None, None


def _columns(delta: SparseDelta, in_f: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct input columns of the active set (sorted) and each element's position among them, cached
    until the active set changes."""
    src, version = getattr(delta, "_cols_key", (None, None))
    if src is not delta.indices or version != delta.indices._version:  # a reference, not an id: never reused
        cols, where = torch.unique(delta.indices.long() % in_f, sorted=True, return_inverse=True)
        delta._cols, delta._cols_key = (cols, where), (delta.indices, delta.indices._version)
    return delta._cols


def sparse_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The forward of an ``nn.Linear`` with a :class:`SparseLinear` attached (``self.usaf_delta``)."""
    d: SparseDelta = self.usaf_delta
    if getattr(self, "usaf_merged", None) is not None or (not len(d) and not d.values.requires_grad):
        return nn.functional.linear(x, self.weight, self.bias)
    return _SparseLinearFn.apply(x, d.values, self.weight, self.bias, d)


def attach(linear: nn.Linear, device=None) -> SparseDelta:
    """Give ``linear`` an empty sparse delta (``linear.usaf_delta``, shape ``(1, out, in)``) and the forward
    that adds it. Returns the delta."""
    if getattr(linear, "usaf_delta", None) is None:
        linear.usaf_delta = SparseDelta((1, *linear.weight.shape), device=device or linear.weight.device)
        linear.usaf_merged = None
        linear.forward = types.MethodType(sparse_linear_forward, linear)
    return linear.usaf_delta


@torch.no_grad()
def merge(linear: nn.Linear) -> None:
    """Fold the delta into ``linear.weight`` (``w[idx] = round(w[idx] + v)``), keeping the replaced values so
    that :func:`unmerge` restores the original bytes."""
    d: SparseDelta = linear.usaf_delta
    if linear.usaf_merged is not None:
        return
    flat = linear.weight.data.view(-1)
    idx = d.indices.long()
    linear.usaf_merged = flat[idx].clone()
    flat[idx] = (flat[idx].float() + d.values.detach().to(flat.device)).to(flat.dtype)


@torch.no_grad()
def unmerge(linear: nn.Linear) -> None:
    if linear.usaf_merged is None:
        return
    linear.weight.data.view(-1)[linear.usaf_delta.indices.long()] = linear.usaf_merged
    linear.usaf_merged = None


def attention_linears(layer: nn.Module) -> list[tuple[str, nn.Linear]]:
    """``[(name relative to the decoder layer, linear)]``: the ``nn.Linear`` modules of a decoder layer's
    attention block (``self_attn``, or the first child whose name contains ``attn``/``attention``)."""
    attn = getattr(layer, "self_attn", None)
    name = "self_attn"
    if attn is None:
        for n, child in layer.named_children():
            if "attn" in n or "attention" in n:
                attn, name = child, n
                break
    if attn is None:
        return []
    return [(f"{name}.{n}" if n else name, m) for n, m in attn.named_modules()
            if isinstance(m, nn.Linear) and m.weight.dim() == 2 and not m.weight.is_meta]


def shared_expert_linears(layer: nn.Module) -> list[tuple[str, nn.Linear]]:
    """``[(name relative to the decoder layer, linear)]``: the ``nn.Linear`` modules of the decoder layer's
    shared expert, the child of its MoE block named ``shared_expert*`` that is not a gate (qwen2_moe's
    ``mlp.shared_expert``, deepseek's ``mlp.shared_experts``; not ``mlp.shared_expert_gate``), the rule
    :func:`usaf.engine.discover.moe_site` uses for ``MoeSite.shared``. Empty when there is none or it holds
    its weights as 3-D stacks."""
    for path, block in layer.named_modules():
        name, shared = next(((n, m) for n, m in block.named_children()
                             if n.startswith("shared_expert") and "gate" not in n), (None, None))
        if shared is None:
            continue
        base = f"{path}.{name}" if path else name
        return [(f"{base}.{n}" if n else base, m) for n, m in shared.named_modules()
                if isinstance(m, nn.Linear) and m.weight.dim() == 2 and not m.weight.is_meta]
    return []
