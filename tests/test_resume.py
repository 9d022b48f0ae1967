"""Exact resume: an interrupted run continued with --resume ends bit-identical to an uninterrupted one."""

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from usaf.cli import main
from usaf.testing import save_tiny_checkpoint
from usaf.train import recipe as trainer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    ckpt = save_tiny_checkpoint("mixtral", root / "ckpt")
    rows = [{"text": f"{w} fox {w} dog {i} " * 4} for i, w in enumerate("abcdefghijklmnopqrstuvwxyz" * 2)]
    data = root / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ckpt, data


def _args(ckpt, data, out, *extra):
    return ["train", "--model", str(ckpt), "--data", str(data), "--out", str(out), "--steps", "9",
            "--seq-len", "32", "--batch-size", "4", "--lr", "0.01", "--density", "0.05", "--reselect-every", "3",
            "--score-layers", "64", "--quiet", *extra]


def _losses(out):
    return [json.loads(x)["loss"] for x in (out / "log.jsonl").read_text().splitlines()]


# SIGINT during step 5 (calls: 4 selection batches, all layers in one pass, + 4 scoring the attention when it
# trains; steps 1-3, 1 reselection batch, steps 4, 5).
@pytest.mark.parametrize("extra,interrupt_at", [((), 10), (("--attention-density", "0.05"), 14)])
def test_interrupt_then_resume_is_bitwise_identical(setup, tmp_path, monkeypatch, extra, interrupt_at):
    ckpt, data = setup
    assert main(_args(ckpt, data, tmp_path / "a", *extra)) == 0

    calls = {"n": 0}
    real = trainer.token_mean_loss

    def interrupting(*a, **k):
        calls["n"] += 1
        if calls["n"] == interrupt_at:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **k)

    monkeypatch.setattr(trainer, "token_mean_loss", interrupting)
    assert main(_args(ckpt, data, tmp_path / "b", *extra)) == 130
    monkeypatch.setattr(trainer, "token_mean_loss", real)
    assert len(_losses(tmp_path / "b")) == 5
    assert main(_args(ckpt, data, tmp_path / "b", "--resume", str(tmp_path / "b"), *extra)) == 0

    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    da, db = load_file(tmp_path / "a" / "delta.safetensors"), load_file(tmp_path / "b" / "delta.safetensors")
    assert da.keys() == db.keys()
    assert any("self_attn" in k for k in da) == bool(extra)
    for k in da:
        assert torch.equal(da[k], db[k]), k


def test_resume_with_different_settings_is_refused(setup, tmp_path, capsys):
    ckpt, data = setup
    assert main(_args(ckpt, data, tmp_path / "a")) == 0
    capsys.readouterr()
    assert main(_args(ckpt, data, tmp_path / "a", "--resume", str(tmp_path / "a"), "--density", "0.1")) == 2
    assert "density" in capsys.readouterr().err
