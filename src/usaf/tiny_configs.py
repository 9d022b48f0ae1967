"""Tiny configs for every decoder Mixture-of-Experts family the installed transformers ships (tests, no downloads).

* :func:`moe_families` enumerates the families from transformers' own registries: the model types of
  ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` and ``MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES`` whose modeling module
  defines an experts / MoE class, a wrapper merged into its text decoder when that is a CausalLM.
* :func:`tiny_config` derives a tiny config for any of them generically: the sizes in :data:`_TINY` are set where
  the config class has the attribute, and :data:`_OVERRIDES` holds the one row of a family that needs more.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from pathlib import Path
from typing import Any

from transformers import AutoConfig
from transformers.models.auto.configuration_auto import model_type_to_module_name
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
)

from .engine.families import EXPERT_COUNT_ATTRS

PAD_ID, BOS_ID, EOS_ID = 0, 2, 3
DEFAULT_VOCAB_SIZE = 320

HIDDEN = 64
DENSE_INTERMEDIATE = 96  # dense MLPs (deepseek/glm4 first layer, gemma4's always-on MLP, llama4 dense layers)
MOE_INTERMEDIATE = 24  # every routed expert (2 * 24 != 64, so gate_up_proj is never square)
SHARED_INTERMEDIATE = 40  # qwen2_moe's shared expert
NUM_EXPERTS = 8
TOP_K = 2

_COMMON: dict[str, Any] = {
    "vocab_size": DEFAULT_VOCAB_SIZE,
    "hidden_size": HIDDEN,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
    "pad_token_id": PAD_ID,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
}


# Sizes of every tiny model, set where the family's config class has the attribute.
_TINY: dict[str, Any] = {
    "head_dim": 16,
    "intermediate_size": DENSE_INTERMEDIATE,
    "moe_intermediate_size": MOE_INTERMEDIATE,
    "expert_intermediate_size": MOE_INTERMEDIATE,
    "moe_hidden_size": 40,  # muse_spark's experts run on a projection of the hidden states (not 64 wide)
    "shared_expert_intermediate_size": SHARED_INTERMEDIATE,
    "num_experts": NUM_EXPERTS,
    "num_local_experts": NUM_EXPERTS,
    "n_routed_experts": NUM_EXPERTS,
    "moe_num_experts": NUM_EXPERTS,
    "num_experts_per_tok": TOP_K,
    "top_k_experts": TOP_K,
    "moe_topk": TOP_K,
    "moe_k": TOP_K,
    "n_shared_experts": 1,
    "n_group": 1,
    "num_expert_group": 1,  # bailing_hybrid's name of n_group
    "topk_group": 1,
    "first_k_dense_replace": 1,  # layer 0 dense, the others MoE (3 layers then: see _DENSE_FIRST)
    "num_dense_layers": 1,
    "mlp_only_layers": [0],
    "num_mtp_layers": 0,
    "q_lora_rank": 40,
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    "sliding_window": 8,
    "attention_chunk_size": 8,
    # linear attention (gated delta rule: qwen3_next, qwen3_5_moe, lara_mini; kimi_linear's KDA)
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_head_dim": 16,
    "linear_num_heads": 4,
    # state-space layers (granitemoehybrid's mamba2, nemotron_h)
    "mamba_n_heads": 8,  # 8 heads of 16 = mamba_expand (2) * hidden
    "mamba_d_state": 16,
    "mamba_chunk_size": 16,
    "mamba_num_heads": 8,
    "mamba_head_dim": 16,
    "ssm_state_size": 16,
    "chunk_size": 16,
    # sparse-attention indexers (deepseek_v32 / v4, glm_moe_dsa, minimax_m3), deepseek_v4's grouped output
    "index_n_heads": 2,
    "index_head_dim": 16,
    "o_lora_rank": 16,
    "indexer_n_heads": 2,  # qwen4_exp's QSA indexer (no default: published configs set it)
    "indexer_kv_heads": 1,
    "indexer_head_dim": 16,
    "indexer_budget": 8,
    "indexer_compress_ratio": 4,
    # other wide layers that default to published sizes
    "dense_intermediate_size": DENSE_INTERMEDIATE,
    "shared_intermediate_size": SHARED_INTERMEDIATE,
    "moe_shared_expert_intermediate_size": SHARED_INTERMEDIATE,
    "unpadded_vocab_size": DEFAULT_VOCAB_SIZE,  # inkling2's lm_head width
    "swa_num_attention_heads": 4,
    "swa_num_key_value_heads": 2,
    "swa_head_dim": 16,
    "hc_lowrank": 16,  # qwen4_exp's hyper-connection mixers
}

_OVERRIDES: dict[str, dict[str, Any]] = {
    # The families of the core suite (usaf.testing.FAMILIES): their tiny models as the suite has always built them.
    "qwen3_moe": {
        "head_dim": 16,
        "intermediate_size": DENSE_INTERMEDIATE,  # only used by mlp_only_layers (none by default)
        "moe_intermediate_size": MOE_INTERMEDIATE,
        "num_experts": NUM_EXPERTS,
        "num_experts_per_tok": TOP_K,
        "norm_topk_prob": True,  # as in the published Qwen3 MoE checkpoints
        "decoder_sparse_step": 1,
    },
    "qwen2_moe": {
        "intermediate_size": DENSE_INTERMEDIATE,
        "moe_intermediate_size": MOE_INTERMEDIATE,
        "shared_expert_intermediate_size": SHARED_INTERMEDIATE,
        "num_experts": NUM_EXPERTS,
        "num_experts_per_tok": TOP_K,
        "decoder_sparse_step": 1,
    },
    "mixtral": {
        "intermediate_size": MOE_INTERMEDIATE,  # mixtral experts use intermediate_size
        "num_local_experts": NUM_EXPERTS,
        "num_experts_per_tok": TOP_K,
    },
    "olmoe": {
        "intermediate_size": MOE_INTERMEDIATE,  # olmoe experts use intermediate_size
        "num_experts": NUM_EXPERTS,
        "num_experts_per_tok": TOP_K,
    },
    "deepseek_v3": {
        "num_hidden_layers": 3,
        "first_k_dense_replace": 1,  # layer 0 dense, layers 1-2 MoE
        "num_key_value_heads": 4,
        "intermediate_size": DENSE_INTERMEDIATE,
        "moe_intermediate_size": MOE_INTERMEDIATE,
        "n_routed_experts": NUM_EXPERTS,
        "n_shared_experts": 1,
        "num_experts_per_tok": TOP_K,
        "n_group": 1,
        "topk_group": 1,
        "q_lora_rank": 40,
        "kv_lora_rank": 16,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 16,
        "num_mtp_layers": 0,  # transformers does not build MTP layers in DeepseekV3ForCausalLM
    },
    "glm4_moe": {
        "num_hidden_layers": 3,
        "first_k_dense_replace": 1,
        "intermediate_size": DENSE_INTERMEDIATE,
        "moe_intermediate_size": MOE_INTERMEDIATE,
        "n_routed_experts": NUM_EXPERTS,
        "n_shared_experts": 1,
        "num_experts_per_tok": TOP_K,
        "n_group": 1,
        "topk_group": 1,
        "num_mtp_layers": 0,
    },
    "gpt_oss": {
        "head_dim": 16,
        "intermediate_size": MOE_INTERMEDIATE,  # gpt_oss experts use intermediate_size
        "num_local_experts": NUM_EXPERTS,
        "num_experts_per_tok": TOP_K,
        "sliding_window": 8,
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 150000.0,
            "factor": 4.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
            "original_max_position_embeddings": 128,
        },
    },
    "granitemoe": {
        "intermediate_size": MOE_INTERMEDIATE,  # granitemoe experts use intermediate_size
        "num_local_experts": NUM_EXPERTS,
        "num_experts_per_tok": TOP_K,
    },
    "gemma4_text": {
        "head_dim": 16,
        "global_head_dim": 32,  # head_dim of the full-attention layers (popped by Gemma4TextConfig)
        "intermediate_size": DENSE_INTERMEDIATE,  # the dense MLP that runs next to the MoE block
        "moe_intermediate_size": MOE_INTERMEDIATE,
        "enable_moe_block": True,
        "num_experts": NUM_EXPERTS,
        "top_k_experts": TOP_K,
        "sliding_window": 8,
        "hidden_size_per_layer_input": 0,  # no per-layer embeddings (PLE)
        "vocab_size_per_layer_input": DEFAULT_VOCAB_SIZE,
    },
    "llama4_text": {
        "head_dim": 16,
        "intermediate_size": MOE_INTERMEDIATE,  # routed experts and the shared expert
        "intermediate_size_mlp": DENSE_INTERMEDIATE,  # dense layers (none with interleave_moe_layer_step=1)
        "num_local_experts": NUM_EXPERTS,
        "num_experts_per_tok": TOP_K,
        "interleave_moe_layer_step": 1,
        "no_rope_layer_interval": 2,  # layer 1 is a NoPE (full attention) layer, layer 0 chunked + RoPE
        "attention_chunk_size": 8,
    },
}



# Attributes that make the first layers dense: a tiny model then has 3 layers, 2 of them MoE.
_DENSE_FIRST = ("first_k_dense_replace", "num_dense_layers", "mlp_only_layers")
# The core suite's families keep their rows exactly (no generic size added).
_EXACT = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v3", "glm4_moe", "gpt_oss", "granitemoe",
          "gemma4_text", "llama4_text")
# Families whose config needs more than the generic sizes (one row each).
_OVERRIDES.update({
    "beam": {"mlp_layer_types": ["dense", "sparse", "sparse"], "num_hidden_layers": 3},
    "zaya": {"num_experts_per_tok": 1},
    # 2 decoder layers (num_hidden_layers counts its 2 attention sublayers per layer); 4 identity zero experts
    # beside the 8 routed ones (256 beside 512 published)
    "longcat_flash": {"num_hidden_layers": 4, "expert_ffn_hidden_size": MOE_INTERMEDIATE,
                      "ffn_hidden_size": DENSE_INTERMEDIATE, "zero_expert_num": 4},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1},
    "lfm2_moe": {"layer_types": ["conv", "conv", "full_attention"]},  # no default pattern; layer 0 is dense  # mamba, then attention (as in 1 of 8 published)
    # dbrx: its own names of the sizes (the aliases reach ffn_config too late), expert sizes in ffn_config;
    # DbrxAttention reads attn_config.rope_theta, which DbrxAttentionConfig does not define, and clamps with
    # clip_qkv unconditionally (published: 8)
    "dbrx": {"d_model": HIDDEN, "n_heads": 4, "n_layers": 2, "max_seq_len": 512,
             "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
             "ffn_config": {"ffn_hidden_size": MOE_INTERMEDIATE, "moe_num_experts": NUM_EXPERTS, "moe_top_k": TOP_K}},
})

# Wrapper model types of the core suite -> the text decoder their tiny model is built from.
_TEXT_OF = {"gemma4": "gemma4_text", "llama4": "llama4_text"}

# The towers of a vision-language wrapper (vision / audio encoders and their nested sub-configs, projectors):
# these sizes are set where a sub-config has the attribute, so a tiny wrapper costs about its text decoder.
# ``out_hidden_size`` / ``output_dim`` feed the text decoder (its hidden width).
_TINY_TOWER: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "mlp_dim": 64,
    "num_hidden_layers": 2,
    "depth": 2,
    "n_layers": 2,
    "num_heads": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "out_hidden_size": HIDDEN,
    "output_dim": HIDDEN,
    "text_hidden_size": HIDDEN,
    "projection_intermediate_size": 64,
    "projector_hidden_size": 64,
    "encoder_layers": 2,
    "encoder_attention_heads": 2,
    "encoder_ffn_dim": 64,
    "d_model": 32,
    "downsample_hidden_size": 16,
    "output_channels": 16,
    "downsample_channels": [16, 32],
    "hidden_sizes": [16, 16, 16, 16],
    "depths": [1, 1, 1, 1],
    "deepstack_visual_indexes": [1],
    "global_attn_indexes": [1],
}
# Text decoders of vision-language wrappers whose config needs more than the generic sizes (one row each).
_OVERRIDES.update({
    "ernie4_5_vl_moe_text": {"moe_intermediate_size": [MOE_INTERMEDIATE, MOE_INTERMEDIATE],  # text, vision experts
                             "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0,
                                                 "mrope_section": [3, 3, 2]}},  # sums to head_dim // 2
    "glm4v_moe_text": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                           "mrope_section": [2, 1, 1]}},  # sums to the rotary half-width (4)
    "hy_v4_vl_text": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [2, 1, 1]}},  # sums to qk_rope_head_dim // 2
    "glm5_next_text": {"qk_rope_head_dim": 0, "qk_nope_head_dim": 16,  # its DSA attention layers have no RoPE
                       "num_hidden_layers": 3, "mlp_layer_types": ["dense", "sparse", "sparse"]},  # MoE from 3
    "deepseek_ocr2_text": {"mlp_layer_types": ["dense", "sparse", "sparse"], "num_hidden_layers": 3},  # no default
    "unlimited_ocr_text": {"num_key_value_heads": 4},  # its eager attention has no key/value groups
    "mistral4": {"head_dim": 16},
    # the thinker's forward reads vision_start_token_id (its 3-D positions, with an attention mask), which its
    # config class does not define in transformers 5.24 (Qwen3OmniMoeConfig's default)
    "qwen3_omni_moe_thinker": {"vision_start_token_id": 151652},  # qk_nope_head_dim + qk_rope_head_dim (its rotary part is a fraction of it)
    "step3p5": {"mlp_layer_types": ["dense", "sparse", "sparse"], "num_hidden_layers": 3},  # MoE from layer 3
})
_MOE_CLASS = re.compile(r"(Experts|MoE|Moe|MoA|MoeBlock|MoELayer)$")


_CLASS_DEF = re.compile(r"^class (\w+)\b", re.MULTILINE)


def _defines_experts(model_type: str) -> bool:
    """Whether the family's modeling module defines a top-level experts / MoE class.

    The module's source is read rather than imported: importing the ~280 modeling modules of the registries
    takes 20-50 s on 2 cores, reading them well under a second.
    """
    name = model_type_to_module_name(model_type)
    try:
        spec = importlib.util.find_spec(f"transformers.models.{name}.modeling_{name}")
    except ImportError:
        return False
    if spec is None or spec.origin is None:
        return False
    source = Path(spec.origin).read_text(encoding="utf-8")
    return any(_MOE_CLASS.search(n) for n in _CLASS_DEF.findall(source))


@functools.lru_cache(maxsize=1)
def moe_families() -> dict[str, str]:
    """``{model_type: text decoder model_type}`` of every decoder MoE family of the installed transformers.

    A wrapper (multimodal, or a composite config) maps to its text decoder when that is a CausalLM of its own,
    and is then not listed separately; one whose text decoder is no CausalLM maps to itself.
    """
    out: dict[str, str] = {}
    seen = list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    seen += [m for m in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES if m not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES]
    for mt in seen:
        if not _defines_experts(mt):
            continue
        try:
            text = AutoConfig.for_model(mt).get_text_config().model_type
        except Exception:  # a config class that cannot build with its defaults: listed as itself
            text = mt
        out[mt] = text if text in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else mt
    return out


def tiny_config(family: str, **overrides):
    """A tiny config for ``family`` (a model_type; ``gemma4``/``llama4`` build their text decoders).

    Defaults: :data:`_COMMON` (hidden 64, 4 heads / 2 KV heads, 2 layers, vocab 320 (= the tiny tokenizer),
    max_position_embeddings 512, untied embeddings), the sizes of :data:`_TINY` that the config class has
    (8 experts, top-2, expert intermediate 24, dense intermediate 96; 3 layers where layer 0 is dense), then
    the family's row in :data:`_OVERRIDES`, then ``overrides``; eager attention. Layer-indexed lists
    (``layer_types``, ``moe_layers``...) are derived from ``num_hidden_layers`` by the config class unless
    overridden; a hybrid whose derived ``layer_types`` hold linear-attention layers only (one attention layer
    in 4 published) gets its last layer as ``full_attention``.

    Raises:
        ValueError: ``family`` is not a Mixture-of-Experts model type of transformers.
    """
    model_type = _TEXT_OF.get(family, family)
    try:
        defaults = AutoConfig.for_model(model_type)
    except ValueError:
        raise ValueError(f"unknown family {family!r}: not a model_type of transformers") from None
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and "text_config" in getattr(defaults, "sub_configs", {}):
        return _tiny_wrapper(defaults, overrides)
    known = defaults.to_dict()
    if not any(k in known for k in EXPERT_COUNT_ATTRS) and family not in _OVERRIDES:
        raise ValueError(f"{family!r} is not a Mixture-of-Experts family")
    kwargs: dict[str, Any] = dict(_COMMON)
    if model_type not in _EXACT:
        kwargs.update({k: v for k, v in _TINY.items() if k in known})
        if any(k in known for k in _DENSE_FIRST):
            kwargs["num_hidden_layers"] = 3
        if "kv_lora_rank" in known:  # multi-head latent attention: head_dim is the rope part, no KV groups
            kwargs["head_dim"] = kwargs["qk_rope_head_dim"]
            kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
    kwargs.update(_OVERRIDES.get(model_type, {}))
    kwargs["attn_implementation"] = "eager"
    kwargs.update(overrides)
    if model_type == "gemma4_text" and "layer_types" not in overrides:
        # sliding-window layers with a final full-attention layer (the config forces the last layer to full)
        n = kwargs["num_hidden_layers"]
        kwargs["layer_types"] = ["sliding_attention"] * (n - 1) + ["full_attention"]
    config = AutoConfig.for_model(model_type, **kwargs)
    layer_types = getattr(config, "layer_types", None)
    if "layer_types" in known and "layer_types" not in overrides and set(layer_types or ()) == {"linear_attention"}:
        # a hybrid whose default pattern has no attention layer in a tiny model (one in 4 or 8 published):
        # the last layer attends, so its caches and masks hold both kinds as in the published models
        kwargs["layer_types"] = ["linear_attention"] * (len(layer_types) - 1) + ["full_attention"]
        config = AutoConfig.for_model(model_type, **kwargs)
        layer_types = config.layer_types
    if layer_types is not None and len(layer_types) != config.num_hidden_layers:
        raise ValueError(f"layer_types has {len(layer_types)} entries for {config.num_hidden_layers} layers")
    return config


def _tiny_tower(sub: dict[str, Any]) -> dict[str, Any]:
    """A vision / audio sub-config (dict) with the sizes of :data:`_TINY_TOWER`, nested sub-configs too; a
    per-layer list (one entry per layer: ``layer_types``, a stage's ``patch_sizes``) keeps its first entries
    and its last one."""
    out = {**sub, **{k: v for k, v in _TINY_TOWER.items() if k in sub}}
    layers = next((k for k in ("num_hidden_layers", "depth", "n_layers") if isinstance(sub.get(k), int)), None)
    if layers is not None and out[layers] < sub[layers]:
        n = out[layers]
        for key, value in out.items():
            if isinstance(value, list) and len(value) == sub[layers]:
                out[key] = value[: n - 1] + value[-1:]
    for key, value in sub.items():
        if isinstance(value, dict) and "model_type" in value:
            out[key] = _tiny_tower(value)
    return out


def _tiny_wrapper(defaults, overrides: dict[str, Any]):
    """A vision-language wrapper whose text decoder is no CausalLM of its own: the text decoder's tiny config
    (:func:`tiny_config` of its model type), every other sub-config shrunk by :func:`_tiny_tower`. Overrides
    that the wrapper's own config holds go there (after its row in :data:`_OVERRIDES`), the others to the text
    decoder."""
    known = defaults.to_dict()
    top = {k: v for k, v in overrides.items() if k in known and k != "text_config"}
    kwargs: dict[str, Any] = {}
    for key in defaults.sub_configs:
        sub = getattr(defaults, key, None)
        if sub is None:
            continue
        if key == "text_config":
            text = {k: v for k, v in overrides.items() if k not in top}
            kwargs[key] = tiny_config(sub.model_type, **text).to_dict()
        else:
            kwargs[key] = _tiny_tower(sub.to_dict())
    kwargs.update({k: v for k, v in _TINY_TOWER.items() if k in known and k not in kwargs})
    if "tie_word_embeddings" in known:
        kwargs["tie_word_embeddings"] = False
    kwargs.update(_OVERRIDES.get(defaults.model_type, {}))
    kwargs.update(top)
    kwargs["attn_implementation"] = "eager"
    return AutoConfig.for_model(defaults.model_type, **kwargs)
