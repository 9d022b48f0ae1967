"""The lean experts' pre-activations spilled to disk (usaf.engine.spill): the backward reads what the forward
wrote instead of recomputing it, with the non-lean backward's gradients bit for bit; a failed write falls
back to recomputing; the file's space is reused from one step to the next."""

import copy
import logging

import pytest
import torch

import usaf
from usaf.engine import spill as sp
from usaf.engine.checkpointing import enable_checkpointing
from usaf.testing import make_tiny_model

IDS = torch.randint(6, 320, (2, 24), generator=torch.Generator().manual_seed(1))
FAMILIES = ["qwen3_moe", "mixtral", "gpt_oss", "llama4", "deepseek_v3", "qwen2_moe"]


def _handle(family, tmp_path, monkeypatch):
    monkeypatch.setenv("USAF_SPILL_DIR", str(tmp_path / "spill"))
    model = copy.deepcopy(make_tiny_model(family, seed=0))
    handle = usaf.prepare(model, usaf.UsafConfig(quant="4bit", density=0.05))
    g = torch.Generator().manual_seed(0)
    for d in handle.deltas().values():
        k = max(1, int(0.05 * d.numel))
        d.set(torch.randperm(d.numel, generator=g)[:k], torch.randn(k, generator=g) * 0.02)
    model.train()
    return handle


def _grads(handle, mode):
    """Gradients of every trainable tensor after one forward and backward of the model with the experts in
    ``mode`` (``plain``: keep the pre-activations in memory; ``lean``: recompute them; ``spill``: the file)."""
    for m in handle.layers:
        m.experts.set_mode(lean=mode != "plain")
    spills = {id(m.experts.preact_spill): m.experts.preact_spill for m in handle.layers}
    if mode == "lean":
        for m in handle.layers:
            m.experts.preact_spill = None
    params = handle.trainable_parameters()
    for p in params:
        p.grad = None
    handle.model(IDS, labels=IDS).loss.backward()
    if mode == "lean":
        (spill,) = spills.values()
        for m in handle.layers:
            m.experts.preact_spill = spill
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]


@pytest.mark.parametrize("family", FAMILIES)
def test_spilled_preactivations_give_the_plain_backward_bit_for_bit(family, tmp_path, monkeypatch):
    handle = _handle(family, tmp_path, monkeypatch)
    spill = handle.layers[0].experts.preact_spill
    assert all(m.experts.preact_spill is spill for m in handle.layers)  # one file per model
    plain = _grads(handle, "plain")
    assert spill.fd is None  # nothing spilled without the lean mode
    spilled = _grads(handle, "spill")
    assert spill.fd is not None and not spill.failed
    assert spill._live == 0 and spill._end == 0  # every region freed by its backward: the next step reuses them
    lean = _grads(handle, "lean")
    for a, b, c in zip(plain, spilled, lean):
        assert torch.equal(a, b)
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-7)  # recomputed: the same up to rounding


def test_the_backward_reads_the_file_and_a_failed_write_recomputes(tmp_path, monkeypatch, caplog):
    handle = _handle("qwen3_moe", tmp_path, monkeypatch)
    plain = _grads(handle, "plain")
    # bytes changed in the file between the forward and the backward change the gradients: they are read
    real_read = sp.read_into
    monkeypatch.setattr(sp, "read_into", lambda fd, out, pos: real_read(fd, out, pos).mul_(2))
    assert any(not torch.equal(a, b) for a, b in zip(plain, _grads(handle, "spill")))
    monkeypatch.setattr(sp, "read_into", real_read)

    def full_disk(*a):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sp.os, "pwrite", full_disk)
    with caplog.at_level(logging.WARNING, logger="usaf"):
        got = _grads(handle, "spill")
    spill = handle.layers[0].experts.preact_spill
    assert spill.failed and "No space left on device" in caplog.text
    for a, b in zip(plain, got):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_no_spill_when_turned_off_or_no_file_can_be_made(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("USAF_NO_PREACT_SPILL", "1")
    handle = _handle("mixtral", tmp_path, monkeypatch)
    plain = _grads(handle, "plain")
    got = _grads(handle, "spill")
    assert handle.layers[0].experts.preact_spill.fd is None
    for a, b in zip(plain, got):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    monkeypatch.delenv("USAF_NO_PREACT_SPILL")
    (tmp_path / "file").write_text("a file, so no directory can be made under it")
    s = sp.PreactSpill(directory=tmp_path / "file" / "spill")
    with caplog.at_level(logging.WARNING, logger="usaf"):
        assert s.region(4, 8, torch.float32) is None
    assert s.failed and "cannot make a file" in caplog.text


def test_a_training_step_with_checkpointing_keeps_one_block_of_preactivations(tmp_path, monkeypatch):
    """With checkpointing (usaf train's lean steps) the forward writes each trainable layer's pre-activations
    to the file, and two steps use the same bytes of it."""
    handle = _handle("qwen3_moe", tmp_path, monkeypatch)
    enable_checkpointing(handle)
    spill = handle.layers[0].experts.preact_spill
    sizes = []
    for _ in range(2):
        handle.model(IDS, labels=IDS).loss.backward()
        sizes.append(__import__("os").fstat(spill.fd).st_size)
    assert sizes[0] > 0 and sizes[1] == sizes[0]
    assert spill._live == 0


def test_a_copied_model_gets_its_own_file(tmp_path, monkeypatch):
    handle = _handle("qwen3_moe", tmp_path, monkeypatch)
    _grads(handle, "spill")  # the file is open now
    other = copy.deepcopy(handle)
    spill = other.layers[0].experts.preact_spill
    assert spill is not handle.layers[0].experts.preact_spill and spill.fd is None
    assert all(m.experts.preact_spill is spill for m in other.layers)  # still one per model
    plain = _grads(other, "plain")
    assert all(torch.equal(a, b) for a, b in zip(plain, _grads(other, "spill")))
    assert spill.fd is not None
