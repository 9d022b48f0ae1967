"""Tiers and prefetch: every tier computes the same thing; budgets place the stacks."""

import pytest
import torch

import usaf
from usaf.load import stream
from usaf.load.tiers import Prefetcher, choose_tier, parse_bytes
from usaf.testing import save_tiny_checkpoint

IDS = torch.randint(6, 320, (2, 16), generator=torch.Generator().manual_seed(1))


def test_all_tiers_give_identical_logits_with_prefetch(tmp_path):
    ckpt = save_tiny_checkpoint("mixtral", tmp_path / "c", per_expert=True)
    outs = []
    for tier in ("disk", "host", "device"):
        h = stream.load_streamed(ckpt, usaf.UsafConfig(quant="4bit"), dtype=torch.bfloat16,
                                 cache_root=tmp_path / "q", tier=tier)
        pf = Prefetcher(h)
        with torch.no_grad():
            outs.append(h.model(IDS).logits)
        pf.close()
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_budgets():
    assert parse_bytes("12GB") == 12 * 10**9 and parse_bytes("1GiB") == 2**30 and parse_bytes("") is None
    with pytest.raises(ValueError, match="memory size"):
        parse_bytes("twelve")
    assert choose_tier(10**9, "cpu", host_memory="8GB") == "host"
    assert choose_tier(10**10, "cpu", host_memory="8GB") == "disk"
    assert choose_tier(10**9, "cpu", device_memory="1GB", host_memory="64GB") == "disk"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_side_stream_prefetch_matches_device_tier(tmp_path):
    ckpt = save_tiny_checkpoint("mixtral", tmp_path / "c", per_expert=True)
    ids = IDS.cuda()
    outs = []
    for tier, prefetch in (("device", False), ("host", False), ("host", True)):
        h = stream.load_streamed(ckpt, usaf.UsafConfig(quant="4bit"), dtype=torch.bfloat16, device="cuda",
                                 cache_root=tmp_path / "q", tier=tier)
        pf = Prefetcher(h) if prefetch else None
        if prefetch:  # host stacks were pinned, and the next layer's copies are staged on the side stream
            assert all(t.is_pinned() for m in h.layers for st in m.experts.frozen.values()
                       for t in st.tensors().values())
        with torch.no_grad():
            outs.append(h.model(ids).logits.float().cpu())
        if pf:
            pf.close()
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_a_mapped_file_is_unmapped_with_its_tensors(tmp_path):
    """The disk tier's page registry holds its mmaps weakly: once the tensors are gone, the file is unmapped
    (a strong reference kept every mapped cache resident: a second load in one process doubled the RSS)."""
    import gc
    import weakref

    from safetensors.torch import save_file

    from usaf.load import mmap as usaf_mmap

    save_file({"w": torch.ones(4096)}, str(tmp_path / "x.safetensors"))
    tensors, _, mm = usaf_mmap.map_safetensors(tmp_path / "x.safetensors")
    assert float(tensors["w"].sum()) == 4096
    usaf_mmap.evict(stream.DenseStack(tensors["w"].view(1, 1, -1)))  # a registered range: evicts, no error
    ref = weakref.ref(mm)
    del tensors, mm
    gc.collect()
    assert ref() is None
