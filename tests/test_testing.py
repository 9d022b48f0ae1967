"""Tests for usaf.testing: tiny seeded MoE models, tokenizer and checkpoints (offline, CPU, fast)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open

from usaf.testing import (
    FAMILIES,
    PER_EXPERT_FAMILIES,
    make_tiny_model,
    make_tiny_tokenizer,
    save_tiny_checkpoint,
    tiny_config,
)

# family -> (CausalLM class, experts path, router path) relative to a MoE decoder layer
MOE_LAYOUT = {
    "qwen3_moe": ("Qwen3MoeForCausalLM", "mlp.experts", "mlp.gate"),
    "qwen2_moe": ("Qwen2MoeForCausalLM", "mlp.experts", "mlp.gate"),
    "mixtral": ("MixtralForCausalLM", "mlp.experts", "mlp.gate"),
    "olmoe": ("OlmoeForCausalLM", "mlp.experts", "mlp.gate"),
    "deepseek_v3": ("DeepseekV3ForCausalLM", "mlp.experts", "mlp.gate"),
    "glm4_moe": ("Glm4MoeForCausalLM", "mlp.experts", "mlp.gate"),
    "gpt_oss": ("GptOssForCausalLM", "mlp.experts", "mlp.router"),
    "granitemoe": ("GraniteMoeForCausalLM", "block_sparse_moe.experts", "block_sparse_moe.router"),
    "gemma4": ("Gemma4ForCausalLM", "experts", "router"),
    "llama4": ("Llama4ForCausalLM", "feed_forward.experts", "feed_forward.router"),
}
DENSE_FIRST = {"deepseek_v3", "glm4_moe"}
NO_PER_EXPERT = tuple(f for f in FAMILIES if f not in PER_EXPERT_FAMILIES)

# on-disk expert names of published checkpoints
PER_EXPERT_KEY = {
    "mixtral": re.compile(r"^model\.layers\.\d+\.block_sparse_moe\.experts\.\d+\.w[123]\.weight$"),
    "granitemoe": re.compile(r"^model\.layers\.\d+\.block_sparse_moe\.(input|output)_linear\.weight$"),
    "nemotron_h": re.compile(r"^backbone\.layers\.\d+\.mixer\.experts\.\d+\.(up|down)_proj\.weight$"),
}
QWEN_STYLE_KEY = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight$")


def _input_ids(batch: int = 2, seq: int = 16, vocab: int = 320) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1234)
    return torch.randint(6, vocab, (batch, seq), generator=gen)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _selected_experts(family: str, output) -> list[tuple[int, ...]]:
    if family == "llama4":  # (router_scores [T, E] with 0 for unselected experts, router_logits)
        chosen = output[0] > 0
        return [tuple(torch.nonzero(row).flatten().tolist()) for row in chosen]
    indices = output[2]  # (router_logits, top_k_weights, top_k_index)
    return [tuple(sorted(row.tolist())) for row in indices]


def _read_safetensors(path) -> dict[str, str]:
    """tensor name -> file name, over every safetensors file in ``path``."""
    where: dict[str, str] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            for key in handle.keys():
                assert key not in where, f"{key} stored twice"
                where[key] = file.name
    return where


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_config(family):
    config = tiny_config(family)
    assert config.hidden_size == 64
    assert 256 <= config.vocab_size <= 512
    assert config.max_position_embeddings >= 512
    assert config.tie_word_embeddings is False
    assert config._attn_implementation == "eager"
    assert 2 <= config.num_hidden_layers <= 3
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        assert len(layer_types) == config.num_hidden_layers
    if family in DENSE_FIRST:
        assert config.first_k_dense_replace == 1 and config.n_group == 1 and config.topk_group == 1
    overridden = tiny_config(family, num_hidden_layers=4)
    assert overridden.num_hidden_layers == 4
    if layer_types is not None:
        assert len(overridden.layer_types) == 4


@pytest.mark.parametrize("family", FAMILIES)
def test_model_builds_and_routes(family):
    cls_name, experts_path, router_path = MOE_LAYOUT[family]
    model = make_tiny_model(family)
    assert type(model).__name__ == cls_name
    assert not model.training

    layers = model.model.layers
    moe_layers = [i for i, layer in enumerate(layers) if _has(layer, experts_path)]
    if family in DENSE_FIRST:
        assert moe_layers == list(range(1, len(layers)))
    else:
        assert moe_layers == list(range(len(layers)))

    seen: dict[int, list[tuple[int, ...]]] = {}
    handles = []
    for i in moe_layers:
        layer = layers[i]
        experts = layer.get_submodule(experts_path)
        router = layer.get_submodule(router_path)
        for name, param in experts.named_parameters():
            assert param.abs().sum() > 0, f"{name} is all zeros"
        weights = [p for n, p in router.named_parameters() if n.endswith("weight")]
        assert weights and all(w.std() > 0 for w in weights)
        fused = experts.gate_up_proj
        assert fused.shape[0] == 8
        assert fused.shape[1] != fused.shape[2], "gate_up_proj must not be square"
        handles.append(router.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out)))

    for module in model.modules():  # norms stay at 1
        if "norm" in type(module).__name__.lower() and getattr(module, "weight", None) is not None:
            assert torch.all(module.weight == 1)

    ids = _input_ids()
    logits = _logits(model, ids)
    for handle in handles:
        handle.remove()
    assert logits.shape == (2, 16, model.config.vocab_size)
    assert torch.isfinite(logits).all()
    assert not torch.allclose(logits[:, 0], logits[:, 1])
    assert not torch.allclose(logits[:, 5], logits[:, 9])
    assert not torch.allclose(logits[0], logits[1])
    assert set(seen) == set(moe_layers)
    for i, output in seen.items():
        choices = _selected_experts(family, output)
        assert len(choices) == ids.numel()
        assert all(len(c) == 2 for c in choices), f"layer {i}: not top-2"
        assert len(set(choices)) > 1, f"layer {i}: every token routed to the same experts"
        assert len({e for c in choices for e in c}) >= 4, f"layer {i}: too few experts used"


def _has(module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def test_seeding_and_dtype():
    a = make_tiny_model("qwen2_moe", seed=3)
    b = make_tiny_model("qwen2_moe", seed=3)
    c = make_tiny_model("qwen2_moe", seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(
        sa["model.layers.0.mlp.experts.gate_up_proj"], sc["model.layers.0.mlp.experts.gate_up_proj"]
    )
    half = make_tiny_model("qwen2_moe", seed=3, dtype=torch.bfloat16)
    key = "model.layers.1.mlp.experts.down_proj"
    assert half.state_dict()[key].dtype == torch.bfloat16
    assert torch.equal(half.state_dict()[key], sa[key].to(torch.bfloat16))
    assert torch.isfinite(_logits(half, _input_ids())).all()


def _roundtrip_cases():
    cases = [(family, False, None) for family in FAMILIES]
    cases += [(family, False, "30KB") for family in NO_PER_EXPERT + ("qwen3_moe",)]
    cases += [(family, True, None) for family in PER_EXPERT_FAMILIES]
    cases += [(family, True, "30KB") for family in PER_EXPERT_FAMILIES]
    return cases


@pytest.mark.parametrize(("family", "per_expert", "max_shard_size"), _roundtrip_cases())
def test_checkpoint_roundtrip(tmp_path, family, per_expert, max_shard_size):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = save_tiny_checkpoint(
        family, tmp_path / "ckpt", seed=7, per_expert=per_expert, max_shard_size=max_shard_size
    )
    assert (path / "config.json").is_file() and (path / "tokenizer.json").is_file()

    where = _read_safetensors(path)
    keys = set(where)
    index_file = path / "model.safetensors.index.json"
    if max_shard_size is None:
        assert set(where.values()) == {"model.safetensors"} and not index_file.exists()
    else:
        index = json.loads(index_file.read_text())
        assert index["weight_map"] == where
        assert len(set(where.values())) > 1
        assert not (path / "model.safetensors").exists()
        total = 0
        for name in set(where.values()):
            with safe_open(str(path / name), "pt") as handle:
                total += sum(
                    handle.get_tensor(k).numel() * handle.get_tensor(k).element_size() for k in handle.keys()
                )
        assert index["metadata"]["total_size"] == total

    fused_names = {k for k in keys if k.endswith(("experts.gate_up_proj", "experts.down_proj"))}
    if per_expert:
        assert not fused_names
        pattern = PER_EXPERT_KEY.get(family, QWEN_STYLE_KEY)
        expert_keys = {k for k in keys if pattern.match(k)}
        assert expert_keys
        if family == "mixtral":
            assert not any(".mlp." in k for k in keys)
            assert "model.layers.0.block_sparse_moe.gate.weight" in keys
            assert len(expert_keys) == 2 * 8 * 3
        elif family == "granitemoe":
            assert "model.layers.0.block_sparse_moe.router.layer.weight" in keys
        elif family == "nemotron_h":  # one MoE layer of the tiny hybrid; no gate: up and down per expert
            assert len(expert_keys) == 1 * 8 * 2
            assert "backbone.layers.1.mixer.experts.7.up_proj.weight" in keys
        else:
            n_moe = 2
            assert len(expert_keys) == n_moe * 8 * 3
            assert "model.layers.1.mlp.experts.7.up_proj.weight" in keys
    else:
        assert fused_names

    reference = make_tiny_model(family, seed=7)
    loaded, info = AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager", output_loading_info=True
    )
    loaded.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ref_sd, new_sd = reference.state_dict(), loaded.state_dict()
    assert ref_sd.keys() == new_sd.keys()
    assert all(torch.equal(ref_sd[k], new_sd[k]) for k in ref_sd)
    ids = _input_ids()
    # Weights memory-mapped from the file sit at the file's byte offsets (e.g. 56 mod 64 here), and some CPU
    # kernels take a different SIMD path for unaligned operands (1e-7 apart on AMD EPYC): compare the
    # computation on aligned copies of the (bit-identical, checked above) loaded weights.
    with torch.no_grad():
        for p in loaded.parameters():
            p.data = p.data.clone()
    assert torch.equal(_logits(reference, ids), _logits(loaded, ids))

    tokenizer = AutoTokenizer.from_pretrained(path)
    assert len(tokenizer) == loaded.config.vocab_size


@pytest.mark.parametrize("family", PER_EXPERT_FAMILIES)
def test_per_expert_layout_matches_transformers_revert(family):
    from transformers.core_model_loading import revert_weight_conversion

    from usaf.testing import _original_layout_state_dict

    model = make_tiny_model(family)
    ours = _original_layout_state_dict(family, model.state_dict())
    theirs = revert_weight_conversion(model, dict(model.state_dict()))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("family", NO_PER_EXPERT)
def test_per_expert_unsupported(tmp_path, family):
    with pytest.raises(ValueError):
        save_tiny_checkpoint(family, tmp_path, per_expert=True)


def test_unknown_family():
    with pytest.raises(ValueError):
        tiny_config("llama")


def test_tokenizer_roundtrip_and_chat_template(tmp_path):
    from transformers import AutoTokenizer

    tok = make_tiny_tokenizer()
    assert len(tok) == 320
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2, 3)
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [4, 5]
    assert make_tiny_tokenizer().backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    assert len(make_tiny_tokenizer(400)) == 400

    for text in [
        "The quick brown fox jumps over the lazy dog.",
        "  spaces\tand\nnewlines ",
        "Ünïcödé ✓ 你好 🙂",
        "",
    ]:
        ids = tok(text)["input_ids"]
        assert all(0 <= i < 320 for i in ids)
        assert tok.decode(ids) == text
    assert len(tok("the router picks the experts")["input_ids"]) < len("the router picks the experts")
    assert tok("<|im_start|>user")["input_ids"][0] == 4

    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
    )
    prompt = tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    out = tok.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    masked = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tok.decode(masked) == "Hello!<|im_end|>"

    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.apply_chat_template(messages, tokenize=False) == rendered
    assert again("Hello world")["input_ids"] == tok("Hello world")["input_ids"]
    assert again.eos_token == "</s>" and again.pad_token == "<pad>"
