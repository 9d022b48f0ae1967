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
            "--calib-batches", "4", "--quiet", *extra]


def _losses(out):
    return [json.loads(x)["loss"] for x in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory, setup):
    """A qwen2_moe checkpoint (it has a shared expert of nn.Linear modules) and the same data."""
    return save_tiny_checkpoint("qwen2_moe", tmp_path_factory.mktemp("resume-qwen2") / "ckpt"), setup[1]


# SIGINT during step 5 (calls: 4 selection batches, one pass each for every layer, the attention and shared
# experts included; steps 1-3, 1 reselection batch, steps 4, 5).
@pytest.mark.parametrize("family,extra,interrupt_at,marker", [
    ("mixtral", (), 10, None),
    ("mixtral", ("--attention-density", "0.05"), 10, "self_attn"),
    ("qwen2_moe", ("--shared-density", "0.1", "--attention-density", "0.05"), 10, "shared_expert"),
])
def test_interrupt_then_resume_is_bitwise_identical(setup, qwen2, tmp_path, monkeypatch, family, extra,
                                                    interrupt_at, marker):
    ckpt, data = qwen2 if family == "qwen2_moe" else setup
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
    assert any(".shared_expert." in k for k in da) == (marker == "shared_expert")
    for k in da:
        assert torch.equal(da[k], db[k]), k


def test_resume_with_different_settings_is_refused(setup, tmp_path, capsys):
    ckpt, data = setup
    assert main(_args(ckpt, data, tmp_path / "a")) == 0
    capsys.readouterr()
    assert main(_args(ckpt, data, tmp_path / "a", "--resume", str(tmp_path / "a"), "--density", "0.1")) == 2
    assert "density" in capsys.readouterr().err


def test_resume_with_another_shared_density_is_refused(qwen2, tmp_path, capsys):
    """--shared-density changes the trainable set: a resume must keep it; a run saved before the setting
    existed (no shared_density in its config.yaml) trained without shared deltas (0), not today's default."""
    import yaml

    ckpt, data = qwen2
    out = tmp_path / "a"
    assert main(_args(ckpt, data, out, "--steps", "2", "--shared-density", "0.05")) == 0
    capsys.readouterr()
    assert main(_args(ckpt, data, out, "--steps", "2", "--resume", str(out))) == 2  # the default, 0.1
    err = capsys.readouterr().err
    assert "usaf.shared_density" in err and len(err.strip().splitlines()) == 1
    saved = yaml.safe_load((out / "config.yaml").read_text())
    del saved["usaf"]["shared_density"]
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    from usaf.config import TrainConfig, UsafConfig
    from usaf.train.resume import RunError, check_out_dir

    keep = {k: v for k, v in saved.items() if k != "usaf"}
    old = UsafConfig(**saved["usaf"], shared_density=0.0)
    assert check_out_dir(TrainConfig(**dict(keep, resume=str(out)), usaf=old)) is not None
    with pytest.raises(RunError, match="usaf.shared_density"):
        check_out_dir(TrainConfig(**dict(keep, resume=str(out)), usaf=UsafConfig(**saved["usaf"])))


@pytest.mark.parametrize("quant", ["4bit", "8bit", "none"])
def test_a_run_from_before_the_rounding_search_resumes_with_minmax_at_4bit(tmp_path, quant):
    """A 4-bit run whose config.yaml has no quant_rounding was quantized by min/max rounding: resuming it
    with today's default (mse) is refused with the setting named, and with minmax accepted. The rounding
    changes nothing at 8 bits or without quantization, so there it is not compared."""
    import yaml

    from usaf.config import TrainConfig, UsafConfig, to_dict
    from usaf.train.resume import RunError, check_out_dir

    out = tmp_path / "run"
    out.mkdir()
    saved = to_dict(TrainConfig(out=str(out), usaf=UsafConfig(quant=quant)))
    del saved["usaf"]["quant_rounding"]
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    keep = {k: v for k, v in saved.items() if k != "usaf"}

    def resume(rounding):
        return check_out_dir(TrainConfig(**dict(keep, resume=str(out)),
                                         usaf=UsafConfig(**saved["usaf"], quant_rounding=rounding)))

    assert resume("minmax") is not None
    if quant == "4bit":
        with pytest.raises(RunError, match=r"usaf.quant_rounding: 'minmax' -> 'mse'"):
            resume("mse")
    else:
        assert resume("mse") is not None
