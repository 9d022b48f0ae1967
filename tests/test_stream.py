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
    monkeypatch.setattr(stream.ShardReader, "read_rows", lambda self, key, *a: pytest.fail(key))
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


def test_cache_is_written_stack_by_stack_with_progress_bars(tmp_path, capsys):
    """The first load writes the quantized cache one stack at a time (``SafetensorsStream``: the header,
    checksums included, goes last) under a bar; a later load checks it under a bar; off, no bar."""
    from usaf.integrity import verify_file
    from usaf.io import read_safetensors
    from usaf.progress import progress_bars

    ckpt = save_tiny_checkpoint("qwen3_moe", tmp_path / "c", per_expert=True)
    cfg = usaf.UsafConfig(quant="4bit")
    with progress_bars(True):
        h = stream.load_streamed(ckpt, cfg, dtype=torch.bfloat16, cache_root=tmp_path / "q", tier="host",
                                 attn_implementation="eager")
    assert "quantizing experts (4bit, first run)" in capsys.readouterr().err
    (cache,) = (tmp_path / "q").glob("*.safetensors")
    assert verify_file(cache)
    tensors, meta = read_safetensors(cache)  # safetensors reads it; every checksum matches
    assert meta["quant"] == "4bit" and "base_fingerprint" in meta
    for m in h.layers:  # the host tier kept the stacks it wrote: equal to the file's
        for n, st in m.experts.frozen.items():
            for k, v in st.tensors().items():
                assert torch.equal(tensors[f"model.layers.{m.index}.mlp.experts.{n}.{k}"], v)
    with progress_bars(True):
        stream.load_streamed(ckpt, cfg, dtype=torch.bfloat16, cache_root=tmp_path / "q", attn_implementation="eager")
    assert "checking the quantized cache" in capsys.readouterr().err
    with progress_bars(False):
        stream.load_streamed(ckpt, cfg, dtype=torch.bfloat16, cache_root=tmp_path / "q2", attn_implementation="eager")
    assert capsys.readouterr().err == ""


def test_expert_reads_leave_nothing_mapped(tmp_path, monkeypatch):
    """The first load reads every expert with ``pread`` (``ShardReader.read_rows``), never through the
    shards' mmap, whose pages would stay resident: 21 GB at 16 layers of Qwen3-30B-A3B's widths."""
    ckpt = save_tiny_checkpoint("qwen3_moe", tmp_path / "c", per_expert=True)
    real_get = stream.ShardReader.get

    def no_experts(self, key):
        assert ".experts." not in key, key
        return real_get(self, key)

    monkeypatch.setattr(stream.ShardReader, "get", no_experts)
    monkeypatch.setattr(stream.ShardReader, "get_slice", lambda self, key: pytest.fail(key))
    reader = stream.ShardReader(ckpt)
    key = next(k for k in reader.keys() if ".experts.1.up_proj" in k)
    assert torch.equal(reader.read_rows(key), real_get(reader, key))
    assert torch.equal(reader.read_rows(key, 2, 5), real_get(reader, key)[2:5])
    stream.load_streamed(ckpt, usaf.UsafConfig(quant="4bit"), dtype=torch.bfloat16, cache_root=tmp_path / "q")
