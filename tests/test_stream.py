"""Streamed loading: meta build, per-expert and fused on-disk layouts, quantize-while-streaming, cache."""

import re

import pytest
import torch
from transformers import AutoModelForCausalLM

import usaf
from usaf.load import stream
from usaf.testing import FAMILIES, PER_EXPERT_FAMILIES, save_tiny_checkpoint

IDS = torch.randint(6, 320, (2, 16), generator=torch.Generator().manual_seed(1))
CASES = [(f, False) for f in FAMILIES] + [(f, True) for f in FAMILIES if f in PER_EXPERT_FAMILIES]


@pytest.mark.parametrize("family,per_expert", CASES)
def test_streamed_equals_from_pretrained_and_cache_is_reused(family, per_expert, tmp_path, monkeypatch):
    ckpt = save_tiny_checkpoint(family, tmp_path / "c", per_expert=per_expert, max_shard_size="30KB")
    ref = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="eager")
    ref_handle = usaf.prepare(ref, usaf.UsafConfig(quant="none"))
    cfg = usaf.UsafConfig(quant="none")
    h = stream.load_streamed(ckpt, cfg, dtype=torch.float32, cache_root=tmp_path / "q", attn_implementation="eager")
    with torch.no_grad():
        expected = ref(IDS).logits
        assert torch.equal(h.model(IDS).logits, expected)
    assert h.fingerprint == ref_handle.fingerprint
    # Second load: expert stacks come from the cache (mmap), the checkpoint's expert tensors are not read.
    real_get = stream.ShardReader.get

    def no_experts(self, key):
        stack = key.endswith(("gate_up_proj", "down_proj")) or re.search(r"experts\.\d+\.|_linear\.", key)
        assert not stack, key
        return real_get(self, key)

    monkeypatch.setattr(stream.ShardReader, "get", no_experts)
    monkeypatch.setattr(stream.ShardReader, "get_slice", lambda self, key: pytest.fail(key))
    h2 = stream.load_streamed(ckpt, cfg, dtype=torch.float32, cache_root=tmp_path / "q", tier="disk",
                              attn_implementation="eager")
    with torch.no_grad():
        assert torch.equal(h2.model(IDS).logits, expected)
    assert h2.fingerprint == ref_handle.fingerprint


def test_streamed_4bit_equals_in_memory_4bit(tmp_path):
    ckpt = save_tiny_checkpoint("qwen3_moe", tmp_path / "c", per_expert=True)
    ref = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16, attn_implementation="eager")
    usaf.prepare(ref, usaf.UsafConfig(quant="4bit"))
    h = stream.load_streamed(ckpt, usaf.UsafConfig(quant="4bit"), dtype=torch.bfloat16, cache_root=tmp_path / "q",
                             attn_implementation="eager")
    with torch.no_grad():
        assert torch.equal(h.model(IDS).logits, ref(IDS).logits)
