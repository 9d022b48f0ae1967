"""Find a decoder layer's MoE block from the module tree: experts, layout flags, router, shared experts.

- experts: the one module of the layer holding 3-D ``gate_up_proj`` (or ``up_proj``) and ``down_proj``
  parameters; its layout comes from the flags transformers' ``@use_experts_implementation`` sets on it
  (``is_transposed``, ``has_bias``, ``has_gate``, ``has_post_expert_norm``), or from a family row.
  ``has_gate=False`` (nemotron_h): an ``up_proj`` stack and the module's activation, no gating.
- router: the nearest module beside the experts holding an ``[E, H]`` weight (E experts, H their input
  width): the experts' siblings first, then the siblings of each ancestor up to the decoder layer. The whole
  sibling trains (scales, correction biases), and its scoring stays the family's own code. When no module
  holds one, a router that also scores null experts: the nearest module holding a 2-D weight with more than
  ``E`` and at most ``2E`` rows (inkling ``[E + shared, H]``, zaya's router MLP ``[E + 1, router width]``,
  longcat_flash ``[E + zero experts, H]``). Routes to indices ``>= E`` are null experts: the fused experts
  function skips them, or adds ``w * x`` for a family whose row says ``null_experts="identity"``.
- a norm after each expert (``has_post_expert_norm``, muse_spark): run by the fused experts function, frozen.
- shared experts: a sibling named ``shared_expert*`` (only described; it stays frozen like any dense MLP unless
  ``UsafConfig.shared_density > 0`` gives its nn.Linear modules sparse deltas: ``linear.shared_expert_linears``).
- modality-isolated experts (a ``text_*`` experts module beside ``vision_*`` / ``audio_*`` ones, in a
  vision-language model): the text experts train; text tokens never reach the others, which stay frozen.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .experts import ExpertsLayout, Stack, computing_experts
from .families import Family, UnsupportedModelError, get_path


@dataclass
class MoeSite:
    """One decoder layer's MoE block, as found in its module tree."""

    block: nn.Module  # the module holding the experts as an attribute
    block_path: str  # its path on the decoder layer ("" = the layer itself)
    attr: str  # the experts' attribute name on ``block``
    experts: nn.Module
    router: nn.Module
    router_path: str  # relative to the decoder layer
    shared: nn.Module | None
    transposed: bool
    bias: bool
    concatenated: bool  # gate/up rows concatenated (False: interleaved, read by the module's _apply_gate)
    layout: ExpertsLayout  # the stacks (names, on-model paths, orientation) and the gating
    null_experts: str = "skip"  # what a route to an index >= E adds: "skip" (nothing) or "identity" (w * x)


def _is_stack(module: nn.Module, name: str) -> bool:
    p = module._parameters.get(name)
    return p is not None and p.dim() == 3


def experts_candidates(layer: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` of the modules of ``layer`` that hold 3-D expert stacks."""
    return [(n, m) for n, m in layer.named_modules()
            if _is_stack(m, "down_proj") and (_is_stack(m, "gate_up_proj") or _is_stack(m, "up_proj"))]


_OTHER_MODALITIES = ("vision", "visual", "image", "video", "audio")


def _text_experts(found: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """Modality-isolated experts (ernie4_5_vl_moe: ``text_moe.experts`` beside ``vision_moe.experts``): text
    tokens only reach the text experts, which train; the other modalities' experts stay frozen."""
    if len(found) < 2:
        return found

    def parent(path: str) -> str:
        return path.rpartition(".")[0].rpartition(".")[2]

    text = [(n, m) for n, m in found if "text" in parent(n)]
    rest = [n for n, _ in found if not any(w in parent(n) for w in _OTHER_MODALITIES)]
    return text if len(text) == 1 and rest == [text[0][0]] else found


def _flag(module: nn.Module, name: str, row_value):
    value = getattr(module, name, None)
    return row_value if row_value is not None else value


def _nearest(layer: nn.Module, path: str, match) -> tuple[str, nn.Module] | None:
    """The nearest module beside ``path`` holding a parameter for which ``match(p)``: the siblings of ``path``
    first, then those of each ancestor; None when there is none."""
    parts = path.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        parent_path = ".".join(parts[:depth])
        parent = get_path(layer, parent_path)
        own = parts[depth]
        found = []
        for name, child in parent.named_children():
            if name == own:
                continue
            if any(match(p) for p in child.parameters()):
                found.append((f"{parent_path}.{name}".lstrip("."), child))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            names = ", ".join(n for n, _ in found)
            raise UnsupportedModelError(f"more than one router candidate beside {path} ({names})")
    return None


def _router(layer: nn.Module, path: str, num_experts: int, widths: tuple[int, ...]) -> tuple[str, nn.Module]:
    """The nearest module beside ``path`` (the experts) holding an ``[E, H]`` parameter, ``H`` one of ``widths``
    (the experts' input width; nemotron_h's latent experts: the block's hidden size), else one holding a 2-D
    parameter with ``E < rows <= 2E`` (a router that also scores null or shared experts)."""
    shapes = {(num_experts, w) for w in widths}
    found = _nearest(layer, path, lambda p: p.dim() == 2 and tuple(p.shape) in shapes)
    if found is None:
        found = _nearest(layer, path, lambda p: p.dim() == 2 and num_experts < p.shape[0] <= 2 * num_experts)
    if found is None:
        raise UnsupportedModelError(f"no router beside {path}: no module with an [{num_experts}, {widths[0]}] "
                                    f"weight, nor one with {num_experts + 1} to {2 * num_experts} outputs")
    return found


def moe_site(layer: nn.Module, family: Family) -> MoeSite | None:
    """The MoE block of one decoder layer, or None for a dense layer.

    Raises:
        UnsupportedModelError: one line naming what usaf cannot train in this layer (no post-expert norm module
            for ``has_post_expert_norm``, no router, several experts modules, stacks without layout flags).
    """
    if not family.discovered:
        block = get_path(layer, family.block)
        ex = get_path(block, family.experts) if block is not None else None
        first = family.stacks[0][1] if family.stacks else "gate_up_proj"
        p = get_path(ex, first) if ex is not None else None
        if p is None or not isinstance(p, nn.Parameter) or p.dim() not in (2, 3):
            return None
        path = ".".join(filter(None, (family.block, family.experts)))
        found = [(path, ex)]
    else:
        found = experts_candidates(layer)
        routed = [(n, m) for n, m in found if not n.rpartition(".")[2].startswith("shared")]
        found = routed if routed else found  # shared experts held as stacks run on every token: frozen
        if not found:
            return None
        found = _text_experts(found)
        if len(found) > 1:
            raise UnsupportedModelError(f"{family.model_type}: more than one experts module in a decoder layer "
                                        f"({', '.join(n for n, _ in found)})")
    path, ex = found[0]
    what = f"{family.model_type} ({type(ex).__name__})"
    if getattr(ex, "has_post_expert_norm", False) and not isinstance(getattr(ex, "post_expert_norm", None),
                                                                     nn.Module):
        raise UnsupportedModelError(f"{what}: has_post_expert_norm is set but the experts hold no post_expert_norm "
                                    f"module")
    transposed = _flag(ex, "is_transposed", family.transposed)
    bias = _flag(ex, "has_bias", family.bias)
    if transposed is None or bias is None:
        raise UnsupportedModelError(f"{what}: the experts carry no layout flags (@use_experts_implementation) "
                                    f"and the family has no row in usaf.engine.families")
    if family.stacks:  # a row's own stacks (dbrx: w1 / v1 / w2)
        layout = ExpertsLayout(tuple(Stack(*row) for row in family.stacks), gated=True, bias=bool(bias),
                               act=family.act)
    else:
        gated = getattr(ex, "has_gate", True) is not False
        first = "gate_up_proj" if gated else "up_proj"
        if not _is_stack(ex, first):
            raise UnsupportedModelError(f"{what}: has_gate={gated} but the experts hold no 3-D {first} stack")
        layout = ExpertsLayout.fused(bool(transposed), bool(bias), bool(getattr(ex, "is_concatenated", True)),
                                     gated)
    if layout.stacks[-1].transposed != layout.transposed and bias:
        raise UnsupportedModelError(f"{what}: expert biases with stacks of mixed orientation are not supported")
    w = get_path(ex, layout.stacks[0].path)
    # experts that compute (longcat_flash's gate_up_proj also has rows for its zero experts, never read)
    num_experts = computing_experts(ex, layout)
    width = w.shape[-1] if w.dim() == 2 else w.shape[1 if transposed else 2]
    if family.router is not None:
        router_path = f"{family.block}.{family.router}".lstrip(".")
        router = get_path(layer, router_path)
    else:
        block_path = path.rpartition(".")[0]
        hidden = getattr(getattr(get_path(layer, block_path), "config", None), "hidden_size", None)
        widths = (width, hidden) if isinstance(hidden, int) and hidden != width else (width,)
        router_path, router = _router(layer, path, num_experts, widths)
    block_path, _, attr = path.rpartition(".")
    if family.dispatch == "jetmoe":  # the block holds the stacks: the usaf experts become its ``experts``
        block_path, attr = path, "experts"
    block = get_path(layer, block_path)
    shared = next((m for n, m in block.named_children() if n.startswith("shared_expert") and "gate" not in n), None)
    return MoeSite(block, block_path, attr, ex, router, router_path, shared, layout.transposed, bool(bias),
                   layout.concatenated, layout, family.null_experts)


def fused_experts(layer: nn.Module, family: Family):
    """The fused experts module of a decoder layer, or None for a dense layer."""
    site = moe_site(layer, family)
    return site.experts if site is not None else None
