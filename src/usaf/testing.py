"""Tiny, seeded, random Mixture-of-Experts models for tests (no downloads).

Every helper here builds its model from a tiny config (``usaf.tiny_configs``), so tests can run offline and fast:

* :func:`tiny_config` - a small :class:`~transformers.PretrainedConfig` for any MoE family (``usaf.tiny_configs``);
  :data:`FAMILIES` are the ones the core suite runs everything on.
* :func:`make_tiny_model` - the matching ``*ForCausalLM`` with every parameter re-initialised from a seeded
  normal distribution (norm weights kept at 1), so routers really route and experts are non-zero.
* :func:`make_tiny_tokenizer` - a byte-level BPE tokenizer trained on the fly on :data:`TINY_CORPUS`, with a
  ChatML-style chat template.
* :func:`save_tiny_checkpoint` - a ``save_pretrained`` directory (safetensors + tokenizer), either in the
  fused in-memory layout of transformers 5 or in the per-expert layout that published checkpoints use.

Family names are the transformers ``model_type`` values, except ``gemma4`` and ``llama4`` which build the
text-only models (``gemma4_text`` -> ``Gemma4ForCausalLM``, ``llama4_text`` -> ``Llama4ForCausalLM``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from transformers.modeling_utils import remove_tied_weights_from_state_dict

from .engine.families import auto_model_class
from .tiny_configs import BOS_ID, DEFAULT_VOCAB_SIZE, EOS_ID, PAD_ID, moe_families, tiny_config

__all__ = [
    "FAMILIES",
    "PER_EXPERT_FAMILIES",
    "TINY_CORPUS",
    "CHAT_TEMPLATE",
    "tiny_config",
    "moe_families",
    "PAD_ID",
    "BOS_ID",
    "EOS_ID",
    "make_tiny_model",
    "make_tiny_tokenizer",
    "save_tiny_checkpoint",
]

FAMILIES: tuple[str, ...] = (
    "qwen3_moe",
    "qwen2_moe",
    "mixtral",
    "olmoe",
    "deepseek_v3",
    "glm4_moe",
    "gpt_oss",
    "granitemoe",
    "gemma4",
    "llama4",
)

# Families whose published checkpoints store experts differently from transformers' fused in-memory layout
# (transformers converts them on load, see ``transformers/conversion_mapping.py``). ``granitemoe`` is listed
# although its published experts are *not* split per expert: its checkpoints keep the fused tensors under the
# legacy names ``block_sparse_moe.input_linear/output_linear`` and ``router.layer``.
# The GGUF architectures' tiny models: rows of 256 (the K-types' block), 4 experts (tests/test_gguf.py,
# bench/gguf_converter.py)
GGUF_DIMS: dict[str, dict] = {
    "qwen3_moe": {"hidden_size": 256, "moe_intermediate_size": 256, "num_experts": 4},
    "qwen2_moe": {"hidden_size": 256, "moe_intermediate_size": 256, "shared_expert_intermediate_size": 256,
                  "num_experts": 4},
    "olmoe": {"hidden_size": 256, "intermediate_size": 256, "num_experts": 4, "num_key_value_heads": 4},
    "granitemoe": {"hidden_size": 256, "intermediate_size": 256, "num_local_experts": 4, "embedding_multiplier": 2.0,
                   "residual_multiplier": 0.5, "attention_multiplier": 0.1, "logits_scaling": 4.0},
    "mixtral": {"hidden_size": 256, "intermediate_size": 256, "num_local_experts": 4},
    "deepseek_v3": {"hidden_size": 256, "intermediate_size": 256, "moe_intermediate_size": 256,
                    "n_routed_experts": 4},
    "deepseek_v2": {"hidden_size": 256, "intermediate_size": 256, "moe_intermediate_size": 256,
                    "n_routed_experts": 4},
    "glm4_moe": {"hidden_size": 256, "intermediate_size": 256, "moe_intermediate_size": 256, "n_routed_experts": 4,
                 "attention_bias": True, "use_qk_norm": True},
    # YaRN as llama.cpp computes it (truncate=True: ``usaf.load.gguf.model``); the tiny config's is False
    "gpt_oss": {"hidden_size": 256, "intermediate_size": 256, "num_local_experts": 4,
                "rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0,
                                    "beta_slow": 1.0, "truncate": True, "original_max_position_embeddings": 128}},
}

PER_EXPERT_FAMILIES: tuple[str, ...] = (
    "qwen3_moe",
    "qwen2_moe",
    "mixtral",
    "olmoe",
    "deepseek_v3",
    "glm4_moe",
    "granitemoe",
    "nemotron_h",
)

_ALIASES = {"gemma4_text": "gemma4", "llama4_text": "llama4"}

# Standard deviation used to re-initialise every non-norm parameter in :func:`make_tiny_model`.
INIT_STD = 0.05

# ---------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------

PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN = "<pad>", "<unk>", "<s>", "</s>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# Trained in this order, so their ids are 0..5.
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, IM_START, IM_END)
UNK_ID = 1  # PAD_ID, BOS_ID, EOS_ID: usaf.tiny_configs (the ids the tiny configs name)

TINY_CORPUS = """\
The quick brown fox jumps over the lazy dog. A mixture of experts is a neural network layer in which a small
router picks, for every token, a few experts out of many. Each expert is a feed-forward block with its own
weights, and only the chosen experts are run, so the model can be very large while each token stays cheap.

Fine-tuning such a model does not have to touch every weight. One can train the router and a sparse set of
changes to the expert weights, keep the rest frozen, and still teach the model a new task. The changes are
stored as deltas: small lists of positions and values that are added to the original tensors when needed.

The weather was mild that morning. She walked to the market, bought bread, apples, cheese and a bottle of
water, and then sat by the river to read. Children played near the bridge, a dog chased the ducks, and the
old clock on the tower struck nine. "What a lovely day," she said to herself, and turned the page.

Numbers and symbols appear in text as well: 1, 2, 3, 10, 42, 100 and 2024; plus (+), minus (-), equals (=),
the percent sign (%), the hash (#) and the at sign (@). Code often looks like this: def add(a, b): return a + b.
Questions end with a question mark? Answers often start with yes or no. Lists use commas, and sentences end.

User: How many experts does the layer use for each token?
Assistant: It uses the top two experts, chosen by the router, and mixes their outputs with the router weights.
User: Thank you! Can you explain that again, more slowly?
Assistant: Of course. First the router scores every expert, then it keeps the best two, then it adds them up.
"""

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}{{- '\\n' }}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def make_tiny_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE):
    """A deterministic byte-level BPE tokenizer trained on :data:`TINY_CORPUS`.

    Ids 0..5 are ``<pad> <unk> <s> </s> <|im_start|> <|im_end|>``, the next 256 ids are the byte alphabet and the
    rest are BPE merges, so every string round-trips. No BOS/EOS is added automatically. The ChatML-style
    :data:`CHAT_TEMPLATE` supports ``add_generation_prompt`` and ``return_assistant_tokens_mask``.
    """
    min_size = len(SPECIAL_TOKENS) + 256
    if vocab_size < min_size:
        raise ValueError(
            f"vocab_size must be at least {min_size} (specials + byte alphabet), got {vocab_size}"
        )

    tok = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TINY_CORPUS.splitlines(keepends=True), trainer=trainer, length=None)
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(token) == i, (token, tok.token_to_id(token))

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        additional_special_tokens=[IM_START, IM_END],
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# ---------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------

# 1-D multiplicative scales (not norms) that a model initialises to ones: re-initialised to 1 + N(0, std).
_ONE_CENTERED_PARAMS = ("router.scale", "router.per_expert_scale")
# Persistent buffers that are real checkpoint weights and get random values too.
_RANDOM_BUFFERS = ("e_score_correction_bias",)


def _is_norm(module: torch.nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


@torch.no_grad()
def _reinit_(model: torch.nn.Module, seed: int, std: float = INIT_STD) -> None:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    norm_params: set[int] = set()
    for module in model.modules():
        if _is_norm(module):
            for name, param in module.named_parameters(recurse=False):
                norm_params.add(id(param))
                if name == "bias":
                    param.zero_()
                else:
                    param.fill_(1.0)
    for name, param in model.named_parameters():
        if id(param) in norm_params:
            continue
        values = torch.randn(param.shape, generator=gen, dtype=torch.float32) * std
        if name.endswith(_ONE_CENTERED_PARAMS):
            values += 1.0
        param.copy_(values)
    for name, buf in model.named_buffers():
        if name.endswith(_RANDOM_BUFFERS):
            buf.copy_(torch.randn(buf.shape, generator=gen, dtype=torch.float32) * std)


def make_tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """Build the model of ``tiny_config(family, **overrides)``, seeded, in eval mode: its ``AutoModelForCausalLM``
    class, or for a vision-language wrapper its ``AutoModelForImageTextToText`` class (tiny towers).

    Every parameter is overwritten with ``N(0, INIT_STD)`` drawn from a generator seeded with ``seed`` (values are
    drawn in float32, then cast, so different dtypes get the same rounded weights), except norm weights (1) and
    biases (0), and gemma4's router ``scale``/``per_expert_scale`` (1 + N(0, INIT_STD)). deepseek_v3/glm4_moe's
    ``e_score_correction_bias`` buffer is random as well.
    """
    config = tiny_config(family, **overrides)
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
        torch.manual_seed(seed)
        model = auto_model_class(config).from_config(config, dtype=dtype)
    _reinit_(model, seed)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------

# family -> (per-expert projection names for gate, up, down; rename of the MoE block prefix on disk)
_PER_EXPERT_NAMES: dict[str, tuple[tuple[str | None, str, str], tuple[str, str] | None]] = {
    "qwen3_moe": (("gate_proj", "up_proj", "down_proj"), None),
    "qwen2_moe": (("gate_proj", "up_proj", "down_proj"), None),
    "olmoe": (("gate_proj", "up_proj", "down_proj"), None),
    "deepseek_v3": (("gate_proj", "up_proj", "down_proj"), None),
    "glm4_moe": (("gate_proj", "up_proj", "down_proj"), None),
    "mixtral": (("w1", "w3", "w2"), (".mlp.", ".block_sparse_moe.")),
    "nemotron_h": ((None, "up_proj", "down_proj"), ("model.", "backbone.")),  # no gate; backbone.layers.N...
}
_FUSED_EXPERT_KEY = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<name>gate_up_proj|up_proj|down_proj)$")


def _original_layout_state_dict(family: str, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a fused (in-memory) state dict to the on-disk layout of published checkpoints of ``family``.

    This is the reverse of what ``transformers/conversion_mapping.py`` does on load:

    * qwen3_moe, qwen2_moe, olmoe, deepseek_v3, glm4_moe (``qwen2_moe`` pattern):
      ``mlp.experts.gate_up_proj [E, 2I, H]`` -> ``mlp.experts.{e}.gate_proj.weight [I, H]`` (first half) and
      ``mlp.experts.{e}.up_proj.weight [I, H]`` (second half); ``mlp.experts.down_proj [E, H, I]`` ->
      ``mlp.experts.{e}.down_proj.weight [H, I]``. Routers and shared experts keep their names.
    * mixtral: the same split with ``w1`` (gate), ``w3`` (up), ``w2`` (down), and ``.mlp.`` -> ``.block_sparse_moe.``
      everywhere (so the router is ``block_sparse_moe.gate.weight``).
    * nemotron_h (no gate): ``mixer.experts.up_proj [E, I, H]`` -> ``mixer.experts.{e}.up_proj.weight [I, H]``,
      ``down_proj`` as above, and every ``model.`` name under ``backbone.``.
    * granitemoe: experts stay fused but are renamed ``block_sparse_moe.input_linear.weight [E, 2I, H]`` and
      ``block_sparse_moe.output_linear.weight [E, H, I]``; the router becomes ``block_sparse_moe.router.layer.weight``.
    """
    family = _ALIASES.get(family, family)
    out: dict[str, torch.Tensor] = {}
    if family == "granitemoe":
        renames = {
            ".block_sparse_moe.experts.gate_up_proj": ".block_sparse_moe.input_linear.weight",
            ".block_sparse_moe.experts.down_proj": ".block_sparse_moe.output_linear.weight",
            ".block_sparse_moe.router.weight": ".block_sparse_moe.router.layer.weight",
        }
        for key, tensor in state_dict.items():
            for old, new in renames.items():
                if key.endswith(old):
                    key = key[: -len(old)] + new
                    break
            out[key] = tensor.detach().clone().contiguous()
        return out
    if family not in _PER_EXPERT_NAMES:
        raise ValueError(
            f"{family!r} checkpoints store experts in transformers' fused layout (no conversion on load); "
            f"per_expert is supported for {PER_EXPERT_FAMILIES}"
        )
    (gate_name, up_name, down_name), block_rename = _PER_EXPERT_NAMES[family]
    for key, tensor in state_dict.items():
        disk_key = key.replace(*block_rename, 1) if block_rename else key
        match = _FUSED_EXPERT_KEY.match(disk_key)
        if match is None:
            out[disk_key] = tensor.detach().clone().contiguous()
            continue
        prefix = match["prefix"]
        if match["name"] == "gate_up_proj":
            intermediate = tensor.shape[1] // 2
            for e in range(tensor.shape[0]):
                out[f"{prefix}.{e}.{gate_name}.weight"] = (
                    tensor[e, :intermediate].detach().clone().contiguous()
                )
                out[f"{prefix}.{e}.{up_name}.weight"] = tensor[e, intermediate:].detach().clone().contiguous()
        else:
            part = up_name if match["name"] == "up_proj" else down_name
            for e in range(tensor.shape[0]):
                out[f"{prefix}.{e}.{part}.weight"] = tensor[e].detach().clone().contiguous()
    return out


def _write_safetensors(
    state_dict: dict[str, torch.Tensor], path: Path, max_shard_size: str | int, total_parameters: int
) -> None:
    split = split_torch_state_dict_into_shards(
        state_dict, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    for filename, names in split.filename_to_tensors.items():
        save_file({name: state_dict[name] for name in names}, str(path / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {
            "metadata": {"total_parameters": total_parameters, **split.metadata},
            "weight_map": dict(sorted(split.tensor_to_filename.items())),
        }
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def save_tiny_checkpoint(
    family: str,
    path: str | os.PathLike,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    per_expert: bool = False,
    max_shard_size: str | None = None,
    **overrides,
) -> Path:
    """Save ``make_tiny_model(family, seed, dtype, **overrides)`` and the tiny tokenizer into ``path``.

    ``per_expert=False`` writes transformers 5's fused in-memory names (``save_original_format=False``; note that a
    plain ``save_pretrained`` would already revert to the published layout for families with a conversion
    mapping). ``per_expert=True`` writes the layout of published checkpoints (see
    :func:`_original_layout_state_dict`), only for :data:`PER_EXPERT_FAMILIES`; ``ValueError`` otherwise.
    ``max_shard_size`` (e.g. ``"20KB"``) shards the weights and writes ``model.safetensors.index.json``.
    """
    family = _ALIASES.get(family, family)
    if per_expert and family not in PER_EXPERT_FAMILIES:
        raise ValueError(
            f"{family!r} checkpoints store experts in transformers' fused layout (no conversion on load); "
            f"per_expert is supported for {PER_EXPERT_FAMILIES}"
        )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = make_tiny_model(family, seed=seed, dtype=dtype, **overrides)
    shard = max_shard_size if max_shard_size is not None else "50GB"
    model.save_pretrained(path, save_original_format=False, max_shard_size=shard)
    if per_expert:
        for old in list(path.glob("model*.safetensors")) + list(path.glob("model.safetensors.index.json")):
            old.unlink()
        state_dict = dict(model.state_dict())
        # drop tied aliases (e.g. lm_head with tie_word_embeddings=True), like save_pretrained does
        state_dict = remove_tied_weights_from_state_dict(state_dict, model)
        state_dict = _original_layout_state_dict(family, state_dict)
        _write_safetensors(state_dict, path, shard, model.num_parameters())
    make_tiny_tokenizer(model.config.get_text_config().vocab_size).save_pretrained(path)
    return path
