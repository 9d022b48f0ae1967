"""Which transformers MoE families usaf trains, and the rows for the exceptions.

transformers 5 describes its own expert layouts: experts classes carry
``@use_experts_implementation(is_concatenated, is_transposed, has_bias, has_gate, has_post_expert_norm)``
(``transformers/integrations/moe.py``), the flags are set on every instance, and the gating function is the
module's own ``_apply_gate``. ``usaf.engine.discover`` reads the layout from there and finds the router
structurally, so a family whose experts carry those flags needs no row here.

Layouts of the fused expert stacks:

- standard:    ``gate_up_proj [E, 2I, H]`` (gate rows, then up rows), ``down_proj [E, H, I]``;
  ``y = down @ gate(gate_up @ x)`` with the module's ``_apply_gate`` (``act(g) * u`` by default).
- transposed:  ``gate_up_proj [E, H, 2I]``, ``down_proj [E, I, H]`` (``is_transposed``: gpt_oss, aria, llama4).
- gpt_oss adds gate/up *interleaved* along 2I (``is_concatenated=False``; its ``_apply_gate`` reads it),
  per-expert biases (``has_bias``) and a clamped SwiGLU.
- no gate (``has_gate=False``, nemotron_h): ``up_proj [E, I, H]``, ``down_proj [E, H, I]``; ``y = down @ act(up @ x)``.
- dbrx (a row): 2-D ``w1`` (gate) and ``v1`` (up) ``[E*I, H]``, viewed as ``[E, I, H]`` stacks, and ``w2
  [E*I, H]``, the down projection stored ``[E, I, H]`` (in, out); the delta files name them ``...mlp.w1`` etc.

Rows remain for real exceptions: a block whose structure discovery cannot read (llama4's block computes
every expert for every token; dbrx's 2-D expert tensors; jetmoe's block calls its expert stacks with per-expert row
counts), experts without layout flags (step3p5; longcat_flash, whose null experts add the token's input), and
families usaf refuses, with the missing piece named.

Vision-language models (``MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES``) load whole with their own class
(:func:`auto_model_class`) and run on text alone; their text decoder's MoE layers train, the vision / audio
towers stay frozen, and exports keep the checkpoint's tensor names.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """How one transformers ``model_type`` lays out its MoE layers; ``None`` fields are discovered.

    Attributes:
        model_type: ``config.model_type`` (of the text decoder).
        block: attribute path of the MoE block on a decoder layer ("" = the decoder layer itself).
        experts: attribute name of the fused experts module on the block ("" = the block itself).
        router: attribute path of the router module, relative to the block.
        transposed: expert stacks stored ``[E, in, out]``; None: the experts module's ``is_transposed``.
        bias: the experts carry ``gate_up_proj_bias`` / ``down_proj_bias``; None: ``has_bias``.
        dispatch: ``experts`` (replace the experts module), ``llama4`` (replace the block forward) or
            ``jetmoe`` (the block holds the stacks: the usaf experts are attached to it as ``experts`` and the
            block forward replaced).
        null_experts: what a route to an index ``>= E`` (a null / zero expert the router also scores) adds:
            ``skip`` (nothing: inkling, zaya) or ``identity`` (the routing weight times the token's input:
            longcat_flash's zero experts).
        refused: why usaf cannot train this family (one line), or None.
        stacks: ``(name, path on the experts module, transposed)`` of the input stacks, then down, when they
            are not transformers' fused ``gate_up_proj`` / ``down_proj`` (gated: ``act(gate) * up``).
        act: path of the activation on the experts module (with ``stacks``).
    """

    model_type: str
    block: str | None = None
    experts: str = "experts"
    router: str | None = None
    transposed: bool | None = None
    bias: bool | None = None
    dispatch: str = "experts"
    null_experts: str = "skip"
    refused: str | None = None
    stacks: tuple[tuple[str, str, bool], ...] | None = None
    act: str = "act_fn"

    @property
    def discovered(self) -> bool:
        return self.block is None


_ROWS = [
    Family("llama4_text", block="feed_forward", router="router", transposed=True, bias=False, dispatch="llama4"),
    Family("dbrx", block="ffn", router="router", transposed=False, bias=False,
           stacks=(("w1", "mlp.w1", False), ("v1", "mlp.v1", False), ("w2", "mlp.w2", True)),
           act="mlp.activation_fn"),
    # its mixture of attention heads (JetMoeMoA, experts over q/o projections) stays frozen
    Family("jetmoe", block="mlp", experts="", router="router", transposed=False, bias=False, dispatch="jetmoe",
           stacks=(("input_linear", "input_linear.weight", False), ("output_linear", "output_linear.weight", False)),
           act="activation"),
    Family("doge", refused="its cross-domain MoE keeps experts as embedding tables (no fused experts module)"),
    # Its experts carry no layout flags; routes to indices >= E are identity "zero experts" (w * x).
    Family("longcat_flash", transposed=False, bias=False, null_experts="identity"),
    # Step3p7Experts (step3p7's text decoder) carries no layout flags: standard stacks, no biases, its own
    # clamped SwiGLU in ``_apply_gate``
    Family("step3p5", transposed=False, bias=False),
    Family("diffusion_gemma", refused="it is a block-diffusion model (DiffusionGemmaForBlockDiffusion denoises a "
                                      "canvas of tokens with bidirectional attention), not a causal LM that "
                                      "next-token loss trains"),
]

FAMILIES: dict[str, Family] = {row.model_type: row for row in _ROWS}

# Config attributes that count routed experts (the config alone tells a dense model from an MoE one).
EXPERT_COUNT_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


class UnsupportedModelError(ValueError):
    """The model is dense, or its MoE layout cannot be trained by usaf (the message names why)."""


def register(row: Family) -> None:
    """Add (or replace) a family row at run time, e.g. for a block that discovery cannot read."""
    FAMILIES[row.model_type] = row


def supported() -> str:
    return ("every Mixture-of-Experts family whose experts transformers describes with "
            "@use_experts_implementation, and " + ", ".join(sorted(k for k, r in FAMILIES.items() if not r.refused)))


def num_experts_of(config) -> int:
    """Routed experts per MoE layer according to the (text) config, 0 for a dense model."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    counts = [getattr(text, a, None) for a in EXPERT_COUNT_ATTRS]
    return max((int(c) for c in counts if isinstance(c, int) and not isinstance(c, bool)), default=0)


def family_for(config) -> Family:
    """The family of a transformers config (its text decoder for multimodal wrappers).

    A row when the family has one; otherwise a discovered family for any config that counts routed experts and
    builds a CausalLM (transformers' own model types, or remote code whose ``auto_map`` names one) or is a
    vision-language model (image-text-to-text: usaf trains its text decoder, see :func:`auto_model_class`).

    Raises:
        UnsupportedModelError: one line: a refused family with the missing piece, or a model that is not a
            supported Mixture-of-Experts family.
    """
    model_type = getattr(config, "model_type", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    text_type = getattr(text, "model_type", model_type)
    for mt in (model_type, text_type):
        row = FAMILIES.get(mt)
        if row is not None:
            if row.refused:
                raise UnsupportedModelError(f"model_type {mt!r} is not supported: {row.refused}")
            return row
    # imported here: the auto-model tables add ~27 MB to `import usaf`, and are needed only for a new family
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    # a vision-language model loads with its image-text-to-text class and trains its text decoder on text
    # (``auto_model_class``)
    causal_lm = (model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or text_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
                 or model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
                 or "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {}))
    if num_experts_of(config) > 1 and causal_lm:
        return Family(text_type)
    raise UnsupportedModelError(
        f"model_type {model_type!r} is not a supported Mixture-of-Experts family "
        f"(supported: {supported()})"
    )


def auto_model_class(config):
    """transformers' auto class that builds the model usaf trains for ``config``.

    ``AutoModelForCausalLM`` for a CausalLM (or remote code whose ``auto_map`` names one); for a
    vision-language model whose type transformers registers only as image-text-to-text (its text decoder is
    no CausalLM of its own), ``AutoModelForImageTextToText``: the whole model is built and loaded (the same
    tensor names as its checkpoint), usaf runs it on text alone and trains its text decoder's MoE layers.
    """
    # imported here: the auto-model tables add ~27 MB to `import usaf`
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
    )

    model_type = getattr(config, "model_type", None)
    if "AutoModelForCausalLM" not in (getattr(config, "auto_map", None) or {}) \
            and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES \
            and model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return AutoModelForImageTextToText
    return AutoModelForCausalLM


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


# Delta files older than the "transposed" metadata key: the families whose stacks were transposed then.
_TRANSPOSED_BEFORE_METADATA = ("gpt_oss", "llama4_text")


def transposed_of(meta: dict[str, str]) -> bool:
    """Whether the stacks of a delta file are ``[E, in, out]`` (its metadata; older files: by family)."""
    if "transposed" in meta:
        return meta["transposed"] == "True"
    return meta.get("model_type", "") in _TRANSPOSED_BEFORE_METADATA


def interleaved_of(meta: dict[str, str]) -> bool:
    """Whether gate and up alternate along 2I in a delta file's gate_up stacks (``is_concatenated=False``:
    gate = even positions); older files: gpt_oss."""
    if "concatenated" in meta:
        return meta["concatenated"] == "False"
    return meta.get("model_type", "") == "gpt_oss"
