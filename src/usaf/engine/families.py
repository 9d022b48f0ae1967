"""The family table: where each transformers MoE family keeps its experts and routers.

One declarative row per transformers ``model_type``. Generic code (``usaf.model``) works against the
canonical description below; adding a family whose experts follow one of the known layouts is one row
(plus one line in the tests' family list).

Layouts of the fused expert stacks (transformers 5.x):

- ``standard``:    ``gate_up_proj [E, 2I, H]`` (gate rows, then up rows), ``down_proj [E, H, I]``;
  ``y = down @ (act(gate @ x) * (up @ x))``.
- ``transposed``:  ``gate_up_proj [E, H, 2I]``, ``down_proj [E, I, H]`` (llama4; gpt_oss).
- gpt_oss adds: gate/up *interleaved* along 2I, per-expert biases, and a clamped SwiGLU; the gating
  function is taken from the experts module itself (``_apply_gate``), so no row has to describe it.

Dispatch: ``experts`` means the experts module has the transformers 5 signature
``forward(hidden_states (T, H), top_k_index (T, K), top_k_weights (T, K)) -> (T, H)`` and usaf replaces
only that module. ``llama4`` means the block computes every expert for every token with the routing
score applied to the *input*; usaf replaces the block forward with a routed equivalent.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """How one transformers ``model_type`` lays out its MoE layers.

    Attributes:
        model_type: ``config.model_type``.
        block: attribute path of the MoE block on a decoder layer ("" = the decoder layer itself).
        experts: attribute path of the fused experts module, relative to the block.
        router: attribute path of the router module, relative to the block.
        shared: attribute path of the shared expert(s), relative to the block, if any.
        transposed: expert stacks stored ``[E, in, out]`` instead of ``[E, out, in]``.
        bias: the experts carry ``gate_up_proj_bias [E, 2I]`` / ``down_proj_bias [E, H]``.
        router_kind: how the router turns logits into top-k weights (descriptive; the stock router runs).
        dispatch: ``experts`` (replace the experts module) or ``llama4`` (replace the block forward).
        num_experts_attr: config attribute holding the number of routed experts.
    """

    model_type: str
    block: str = "mlp"
    experts: str = "experts"
    router: str = "gate"
    shared: str | None = None
    transposed: bool = False
    bias: bool = False
    router_kind: str = "softmax_topk"
    dispatch: str = "experts"
    num_experts_attr: str = "num_experts"


_ROWS = [
    Family("qwen3_moe"),
    Family("qwen2_moe", shared="shared_expert"),
    Family("qwen3_5_moe", shared="shared_expert"),
    Family("qwen3_next", shared="shared_expert"),
    Family("mixtral", num_experts_attr="num_local_experts"),
    Family("olmoe"),
    Family("flex_olmo"),
    Family("deepseek_v3", shared="shared_experts", router_kind="sigmoid_bias_grouped",
           num_experts_attr="n_routed_experts"),
    Family("glm4_moe", shared="shared_experts", router_kind="sigmoid_bias_grouped",
           num_experts_attr="n_routed_experts"),
    Family("gpt_oss", router="router", transposed=True, bias=True, router_kind="topk_softmax_bias",
           num_experts_attr="num_local_experts"),
    Family("granitemoe", block="block_sparse_moe", router="router", num_experts_attr="num_local_experts"),
    Family("gemma4_text", block="", router="router", router_kind="scaled_softmax_topk"),
    Family("llama4_text", block="feed_forward", router="router", shared="shared_expert", transposed=True,
           router_kind="sigmoid_topk", dispatch="llama4", num_experts_attr="num_local_experts"),
]

FAMILIES: dict[str, Family] = {row.model_type: row for row in _ROWS}

# Families covered by the test suite (tiny random models compared against the stock module).
TESTED = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v3", "glm4_moe", "gpt_oss", "granitemoe",
          "gemma4_text", "llama4_text")


class UnsupportedModelError(ValueError):
    """The model is dense, or its MoE layout is not in the family table."""


def register(row: Family) -> None:
    """Add (or replace) a family row at run time, e.g. for a new model_type with a known layout."""
    FAMILIES[row.model_type] = row


def supported() -> str:
    return ", ".join(sorted(FAMILIES))


def family_for(config) -> Family:
    """Return the row for a transformers config (uses ``text_config`` for multimodal wrappers).

    Raises:
        UnsupportedModelError: one line naming the supported families.
    """
    model_type = getattr(config, "model_type", None)
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    text = getattr(config, "text_config", None)
    if text is not None and getattr(text, "model_type", None) in FAMILIES:
        return FAMILIES[text.model_type]
    raise UnsupportedModelError(
        f"model_type {model_type!r} is not a supported Mixture-of-Experts family "
        f"(supported: {supported()})"
    )


def get_path(root, path: str):
    """Resolve a dotted attribute path ("" = root itself); None when any part is missing."""
    obj = root
    for part in filter(None, path.split(".")):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def set_path(root, path: str, value) -> None:
    parent, _, name = path.rpartition(".")
    setattr(get_path(root, parent), name, value)


def fused_experts(layer, family: Family):
    """The fused experts module of a decoder layer (3-D ``gate_up_proj``), or None for a dense layer."""
    block = get_path(layer, family.block)
    ex = get_path(block, family.experts) if block is not None else None
    w = getattr(ex, "gate_up_proj", None)
    return ex if w is not None and w.dim() == 3 else None
