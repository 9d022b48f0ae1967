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
    assert choose_tier(10**9, "cpu", host_memory="8GB", in_file=True) == "disk"  # a GGUF stays mapped on the CPU


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


@pytest.mark.parametrize("quant", ["4bit", "none"])
def test_prefix_layers_stay_mapped_on_the_host_tier(tmp_path, quant):
    """``prefix_mapped``: the stacks of the layers below the trainable range stay views of the mapped cache
    (the disk tier), on the first load (cache just built) and on a later one; the others are in RAM; the
    logits equal the plain host tier's."""
    from usaf.load.mmap import _MMAP_RANGES

    ckpt = save_tiny_checkpoint("mixtral", tmp_path / "c", per_expert=True)
    cfg = usaf.UsafConfig(quant=quant, train_layers="top:1")
    outs = []
    for mapped in (True, True, False):  # first load builds the cache, the second maps it
        h = stream.load_streamed(ckpt, cfg, dtype=torch.bfloat16, cache_root=tmp_path / "q", tier="host",
                                 prefix_mapped=mapped)
        start = h.trainable_layers[0].index
        assert start > 0
        for m in h.layers:
            on_disk = [t.data_ptr() in _MMAP_RANGES for s in m.experts.frozen.values() for t in s.tensors().values()]
            assert all(on_disk) if (mapped and m.index < start) else not any(on_disk), (m.index, mapped)
        pf = Prefetcher(h)
        with torch.no_grad():
            outs.append(h.model(IDS).logits)
        pf.close()
    assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[2])


def test_a_skipped_layer_is_not_paged_back_in_after_its_eviction(tmp_path, monkeypatch):
    """The suffix forward skips the prefix layers (they return at once): the read-ahead of a layer queued
    before its eviction must not run after it, or the layer's pages stay resident (every prefix layer's did,
    823 MB in the demo). Each frozen layer's last page operation is the eviction."""
    import threading
    import time

    from usaf.engine.forward import skip_prefix
    from usaf.load import tiers

    ckpt = save_tiny_checkpoint("mixtral", tmp_path / "c", per_expert=True, num_hidden_layers=4)
    h = stream.load_streamed(ckpt, usaf.UsafConfig(quant="4bit", train_layers="top:1"), dtype=torch.bfloat16,
                             cache_root=tmp_path / "q", tier="disk")
    owner = {t.data_ptr(): m.index for m in h.layers for s in m.experts.frozen.values() for t in s.tensors().values()}
    log, lock = [], threading.Lock()
    touch, evict = tiers._touch, tiers.evict

    def slow_touch(tensors):
        time.sleep(0.05)  # a read-ahead slower than a skipped layer
        with lock:
            log.append(("touch", owner[tensors[0].data_ptr()]))
        touch(tensors)

    def logged_evict(stack):
        with lock:
            log.append(("evict", owner[next(iter(stack.tensors().values())).data_ptr()]))
        evict(stack)

    monkeypatch.setattr(tiers, "_touch", slow_touch)
    monkeypatch.setattr(tiers, "evict", logged_evict)
    pf = Prefetcher(h)
    start = h.trainable_layers[0].index
    with torch.no_grad(), skip_prefix(h.model, start):
        h.model(IDS)
    pf.close()
    last = {}
    for op, i in log:
        last[i] = op
    assert start == 3
    assert all(last[i] == "evict" for i in last if i < start), log


def test_merged_deltas_on_the_disk_tier_are_not_given_back(tmp_path):
    """A trainable layer on the disk tier gives its pages back after each pass, but not while its deltas are
    merged into the stacks: they live in the map's copy-on-write pages, and dropping those would silently
    revert the base to the file's bytes (the second forward would then lack the deltas)."""
    ckpt = save_tiny_checkpoint("mixtral", tmp_path / "c", per_expert=True)
    cfg = usaf.UsafConfig(quant="none", density=0.05, train_layers="top:1")
    outs = {}
    for tier in ("host", "disk"):
        h = stream.load_streamed(ckpt, cfg, dtype=torch.float32, cache_root=tmp_path / "q", tier=tier)
        usaf.select(h, [{"input_ids": IDS, "labels": IDS}])
        pf = Prefetcher(h)
        with torch.no_grad():
            base = h.model(IDS).logits
            torch.manual_seed(0)
            for m in h.trainable_layers:
                for d in m.experts.deltas.values():
                    assert d.values.numel() > 0
                    d.values.normal_(0, 0.5)
            plain = h.model(IDS).logits
            h.merge()
            outs[tier] = [h.model(IDS).logits for _ in range(2)]
            h.unmerge()
            after = h.model(IDS).logits
        pf.close()
        assert not torch.allclose(plain, base, atol=1e-3)  # the deltas change the logits
        assert torch.allclose(outs[tier][0], plain, atol=1e-5) and torch.equal(after, plain)
    assert torch.equal(outs["disk"][0], outs["disk"][1]) and torch.equal(outs["disk"][1], outs["host"][1])
