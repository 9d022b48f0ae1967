"""Find a decoder layer's MoE block from the module tree: experts, layout flags, router, shared experts.

- experts: the one module of the layer holding 3-D ``gate_up_proj`` (or ``up_proj``) and ``down_proj``
  parameters; its layout comes from the flags transformers' ``@use_experts_implementation`` sets on it
  (``is_transposed``, ``has_bias``, ``has_gate``, ``has_post_expert_norm``), or from a family row.
- router: the nearest module beside the experts holding an ``[E, H]`` weight (E experts, H their input
  width): the experts' siblings first, then the siblings of each ancestor up to the decoder layer; failing
  that, an ``[E, H']`` weight (experts that run on a projection of the hidden states). The whole sibling
  trains (scales, correction biases), and its scoring stays the family's own code.
- a norm after each expert (``has_post_expert_norm``): run by the fused experts function, frozen.
- shared experts: a sibling named ``shared_expert*`` (only described; it stays frozen like any dense MLP).
- modality-isolated experts (a ``text_*`` experts module beside ``vision_*`` / ``audio_*`` ones, in a
  vision-language model): the text experts train; text tokens never reach the others, which stay frozen.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

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


def _router(layer: nn.Module, path: str, num_experts: int, width: int) -> tuple[str, nn.Module]:
    """The nearest module beside ``path`` (the experts) holding an ``[E, H]`` parameter; failing that, an
    ``[E, H']`` one (experts that run on a projection of the decoder's width: muse_spark's router scores the
    hidden states, its experts their ``pre_expert_proj`` projection)."""
    parts = path.split(".")
    for match in (lambda s: s == (num_experts, width), lambda s: len(s) == 2 and s[0] == num_experts):
        for depth in range(len(parts) - 1, -1, -1):
            parent_path = ".".join(parts[:depth])
            parent = get_path(layer, parent_path)
            own = parts[depth]
            found = []
            for name, child in parent.named_children():
                if name == own:
                    continue
                if any(match(tuple(p.shape)) for p in child.parameters()):
                    found.append((f"{parent_path}.{name}".lstrip("."), child))
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                names = ", ".join(n for n, _ in found)
                raise UnsupportedModelError(f"more than one router candidate beside {path} ({names})")
    raise UnsupportedModelError(f"no router (a module with an [{num_experts}, {width}] weight) beside {path}; "
                                f"a router that also scores null experts (more than {num_experts} outputs) "
                                f"is not supported")


def moe_site(layer: nn.Module, family: Family) -> MoeSite | None:
    """The MoE block of one decoder layer, or None for a dense layer.

    Raises:
        UnsupportedModelError: one line naming what usaf cannot train in this layer (experts without a gate,
            a post-expert norm, no router, several experts modules, stacks without layout flags).
    """
    if not family.discovered:
        block = get_path(layer, family.block)
        ex = getattr(block, family.experts, None) if block is not None else None
        if ex is None or not _is_stack(ex, "gate_up_proj"):
            return None
        path = f"{family.block}.{family.experts}".lstrip(".")
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
    if getattr(ex, "has_gate", True) is False or not _is_stack(ex, "gate_up_proj"):
        raise UnsupportedModelError(f"{what}: experts without a gate (up_proj + activation, has_gate=False) are "
                                    f"not supported; the delta engine trains gate_up_proj and down_proj stacks")
    if getattr(ex, "has_post_expert_norm", False) and not isinstance(getattr(ex, "post_expert_norm", None),
                                                                     nn.Module):
        raise UnsupportedModelError(f"{what}: has_post_expert_norm is set but the experts hold no post_expert_norm "
                                    f"module")
    transposed = _flag(ex, "is_transposed", family.transposed)
    bias = _flag(ex, "has_bias", family.bias)
    if transposed is None or bias is None:
        raise UnsupportedModelError(f"{what}: the experts carry no layout flags (@use_experts_implementation) "
                                    f"and the family has no row in usaf.engine.families")
    num_experts, width = ex.gate_up_proj.shape[0], ex.gate_up_proj.shape[1 if transposed else 2]
    if family.router is not None:
        router_path = f"{family.block}.{family.router}".lstrip(".")
        router = get_path(layer, router_path)
    else:
        router_path, router = _router(layer, path, num_experts, width)
    block_path, _, attr = path.rpartition(".")
    block = get_path(layer, block_path)
    shared = next((m for n, m in block.named_children() if n.startswith("shared_expert") and "gate" not in n), None)
    return MoeSite(block, block_path, attr, ex, router, router_path, shared, bool(transposed), bool(bias),
                   bool(getattr(ex, "is_concatenated", True)))


def fused_experts(layer: nn.Module, family: Family):
    """The fused experts module of a decoder layer, or None for a dense layer."""
    site = moe_site(layer, family)
    return site.experts if site is not None else None
