"""Reliability: exact resume (SIGINT elsewhere, SIGKILL here), resume refusals, crash-safe files, a full disk,
numeric faults, fp16 loss scaling, bad inputs (exit code 2, one line, --out not created or changed), out of
memory, safe defaults. docs/reliability.md tables every case; ``USAF_RELIABILITY_TABLE=<file>`` makes this
module write the exact message of each case it ran to that file.
"""

import errno
import hashlib
import json
import math
import os
import pickle
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from usaf import io
from usaf.cli import main
from usaf.engine.optim import LossScaler
from usaf.testing import save_tiny_checkpoint
from usaf.train import checkpoint
from usaf.train import recipe as trainer

WORDS = "the quick brown fox jumps over the lazy dog while a small cat sleeps in the warm sun".split()
MESSAGES: list[tuple[str, str]] = []  # (case, what happened), for docs/reliability.md


def _rows(n=40):
    return [{"text": f"{WORDS[i % 17]} {WORDS[(3 * i + 1) % 17]} and {WORDS[(5 * i + 2) % 17]}. " * 3}
            for i in range(n)]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module", autouse=True)
def _table():
    yield
    dest = os.environ.get("USAF_RELIABILITY_TABLE")
    if dest:
        with open(dest, "a") as f:
            for case, what in MESSAGES:
                what = re.sub(r"/tmp/pytest-of-[^/]+/pytest-\d+/[^/ ]+", "<tmp>", what)
                f.write(f"| {case} | {what.replace('|', '/')} |\n")


def _record(case, what):
    MESSAGES.append((case, what))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("rel")
    ckpt = save_tiny_checkpoint("qwen3_moe", root / "ckpt")
    return SimpleNamespace(root=root, ckpt=ckpt, data=_write(root / "d.jsonl", _rows()))


def _args(env, out, *extra, steps=6):
    return ["train", "--model", str(env.ckpt), "--data", str(env.data), "--out", str(out), "--steps", str(steps),
            "--seq-len", "32", "--batch-size", "4", "--lr", "0.01", "--density", "0.05", "--reselect-every", "3",
            "--calib-batches", "1", "--save-every", "1", "--quiet", *extra]


@pytest.fixture(scope="module")
def ref(env):
    """The uninterrupted run every resumed run is compared with."""
    out = env.root / "ref"
    assert main(_args(env, out)) == 0
    return out


@pytest.fixture(scope="module")
def other_ckpt(env):
    """Same architecture and config, other weights."""
    return save_tiny_checkpoint("qwen3_moe", env.root / "other", seed=1)


def _lines(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def _log(out):
    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]


def _assert_same_run(out, ref):
    da, db = load_file(ref / "delta.safetensors"), load_file(out / "delta.safetensors")
    assert da.keys() == db.keys()
    for k in da:
        assert torch.equal(da[k], db[k]), k
    la, lb = _log(ref), _log(out)
    assert [r["step"] for r in lb] == list(range(1, len(la) + 1))
    assert [r["loss"] for r in lb] == [r["loss"] for r in la]
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (ref, out))
    for k in ("loss_first", "loss_last10", "eval_ppl_before", "eval_ppl_after", "active_elements", "skipped_steps",
              "steps", "train_tokens"):
        assert ma[k] == mb[k], k
    assert mb["loss_last10"] == pytest.approx(sum(r["loss"] for r in lb[-10:]) / len(lb[-10:]))


def _no_leftovers(out):
    left = [p for p in out.rglob("*") if p.name.startswith((".tmp-", ".old-")) or p.name.endswith(".tmp")]
    assert not left, left


def _tree(path: Path) -> dict | None:
    """Every file under ``path`` with a hash of its bytes (None if ``path`` does not exist)."""
    if not path.exists():
        return None
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(path.rglob("*"))}


def _fails(argv, capsys, expect, case=None):
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("usaf: error: "), err
    assert re.search(expect, err[0]), err[0]
    if case:
        _record(case, f"exit 2: `{err[0]}`")
    return err[0]


# ---------------------------------------------------------------------------------------------------------
# 1. Exact resume
# ---------------------------------------------------------------------------------------------------------


def test_sigkill_at_random_moments_then_resume_is_bitwise_identical(env, ref, tmp_path):
    out = tmp_path / "k"
    rng = random.Random(20260)
    kills, where, finished = 0, [], False
    for _ in range(3):
        argv = _args(env, out) + (["--resume", str(out)] if (out / "config.yaml").exists() else [])
        with open(tmp_path / "stderr.txt", "a") as errf:
            p = subprocess.Popen([sys.executable, "-m", "usaf.cli", *argv], stdout=subprocess.DEVNULL, stderr=errf)
            log = out / "log.jsonl"
            last = where[-1] if where else 0
            # Kill at a random point shortly after a randomly chosen step (before the last of the 6 steps),
            # so the kill lands whatever the machine's speed.
            target = rng.randint(last + 1, max(last + 1, 4))
            while p.poll() is None and _lines(log) < target:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.05))
            if p.poll() is None:
                p.kill()  # SIGKILL: no handler, no cleanup
                kills += 1
                where.append(_lines(log))
            finished = p.wait() == 0
        if finished:
            break
    assert kills >= 1, (tmp_path / "stderr.txt").read_text()
    if not finished:
        assert main(_args(env, out, "--resume", str(out))) == 0
    _assert_same_run(out, ref)
    assert [d.name for d in checkpoint.complete(out)] == ["step-0000006", "step-0000005"]
    _no_leftovers(out)
    _record("SIGKILL at random moments (3 tries, --save-every 1), then --resume",
            f"{kills} kills (log lines at each kill: {where}); final delta, log and metrics identical to the "
            f"uninterrupted run (bitwise)")


def test_resume_refuses_other_data_model_or_settings(env, ref, other_ckpt, tmp_path, capsys):
    before = _tree(ref)
    changed = _write(tmp_path / "changed.jsonl", _rows() + [{"text": "one more row"}])
    cfg_changed = shutil.copytree(env.ckpt, tmp_path / "cfg_changed")
    c = json.loads((cfg_changed / "config.json").read_text())
    c["rms_norm_eps"] = 1e-5
    (cfg_changed / "config.json").write_text(json.dumps(c))
    resume = ["--resume", str(ref)]
    cases = [
        ("resume with data of other content", _args(env, ref, *resume, "--data", str(changed)),
         "training data changed since the checkpoint"),
        ("resume with a model of another config", _args(env, ref, *resume, "--model", str(cfg_changed)),
         "the model differs from the run's"),
        ("resume with a model of other weights", _args(env, ref, *resume, "--model", str(other_ckpt)),
         "base model's weights differ"),
        ("resume with another --density", _args(env, ref, *resume, "--density", "0.1"),
         r"settings differ \(usaf.density: 0.05 -> 0.1\)"),
        ("resume with another --seq-len", _args(env, ref, *resume, "--seq-len", "24"),
         r"settings differ \(seq_len: 32 -> 24\)"),
    ]
    for case, argv, expect in cases:
        _fails(argv, capsys, expect, case)
        assert _tree(ref) == before, case


def test_resume_allows_and_logs_compatible_changes(env, ref, tmp_path, caplog):
    out = shutil.copytree(ref, tmp_path / "more")
    moved = shutil.copy(env.data, tmp_path / "moved.jsonl")  # same content, other path
    caplog.set_level("INFO", logger="usaf")
    assert main(_args(env, out, "--resume", str(out), "--steps", "8", "--keep-checkpoints", "3",
                      "--data", str(moved))) == 0
    line = next(r.getMessage() for r in caplog.records if "changed settings" in r.getMessage())
    assert "steps: 6 -> 8" in line and "keep_checkpoints: 2 -> 3" in line and "moved.jsonl" in line
    assert [r["step"] for r in _log(out)] == list(range(1, 9))
    assert [r["loss"] for r in _log(out)][:6] == [r["loss"] for r in _log(ref)]
    assert [d.name for d in checkpoint.complete(out)] == ["step-0000008", "step-0000007", "step-0000006"]
    _record("resume with more --steps, --keep-checkpoints 3, data at another path (same content)",
            f"exit 0, logged (warning): `{line}`")


# ---------------------------------------------------------------------------------------------------------
# 2. Crash safety, full disk
# ---------------------------------------------------------------------------------------------------------


def test_disk_full_keeps_checkpoints_then_resume_cleans_and_matches(env, ref, tmp_path, monkeypatch, capsys):
    out = tmp_path / "full"
    real = io.save_file

    def full_at_step_4(tensors, path, metadata=None):
        if ".tmp-step-0000004" in str(path):
            with open(path, "wb") as f:
                f.write(b"\0" * 100)  # a partial write, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(io, "save_file", full_at_step_4)
    msg = _fails(_args(env, out), capsys, r"no space left on device while writing checkpoint .*step-0000004; the "
                 r"last complete checkpoint \(.*step-0000003\) is intact; free some space, then continue with "
                 r"--resume")
    _record("disk full while writing checkpoint 4 (write raises ENOSPC)", f"exit 2: `{msg}`")
    monkeypatch.setattr(io, "save_file", real)
    assert [d.name for d in checkpoint.complete(out)] == ["step-0000003", "step-0000002"]
    checkpoint.read(out / "checkpoints" / "step-0000003")  # intact and readable
    _no_leftovers(out)

    # What a kill leaves behind: temporary checkpoint dirs and files, an incomplete checkpoint, a cut log line,
    # and (a damaged disk) an unreadable newest checkpoint: resume ignores, cleans and falls back.
    (out / "checkpoints" / ".tmp-step-0000099-1").mkdir()
    (out / "checkpoints" / ".tmp-step-0000099-1" / "state.json").write_text("{")
    (out / "checkpoints" / "step-0000098").mkdir()
    (out / "checkpoints" / "step-0000098" / "state.json").write_text("{}")
    (out / ".delta.safetensors.k1ll3d.tmp").write_bytes(b"\0" * 10)
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 1.2')
    st = out / "checkpoints" / "step-0000003" / "state.safetensors"
    st.write_bytes(st.read_bytes()[:-64])
    assert main(_args(env, out, "--resume", str(out))) == 0
    _assert_same_run(out, ref)
    _no_leftovers(out)
    assert not (out / "checkpoints" / "step-0000098").exists()
    assert (out / "checkpoints" / ".corrupt-step-0000003").exists()
    _record("leftovers of a kill (.tmp-step-* dir, .*.tmp file, incomplete step-*, cut log line) and a "
            "truncated newest checkpoint, then --resume",
            "leftovers removed, truncated checkpoint moved to .corrupt-step-0000003, resumed from step 2; "
            "final delta, log and metrics identical to the uninterrupted run")


def test_atomic_write_failure_keeps_the_old_file(tmp_path):
    target = tmp_path / "delta.safetensors"
    target.write_bytes(b"old")

    def safetensors_style_failure(tmp):
        Path(tmp).write_bytes(b"partial")
        raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")

    with pytest.raises(io.DiskFullError, match="no space left on device while writing .*delta.safetensors"):
        io.atomic_write(target, safetensors_style_failure)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["delta.safetensors"]


# ---------------------------------------------------------------------------------------------------------
# 3. Numeric faults
# ---------------------------------------------------------------------------------------------------------


def test_non_finite_steps_are_skipped_and_too_many_stop_with_checkpoint(env, tmp_path, monkeypatch, capsys,
                                                                         caplog):
    # prompt/completion rows, a few longer than --seq-len: truncated (and one dropped), reported, no error
    rows = [{"prompt": f"Say {w}:", "completion": f" {w} {w}."} for w in WORDS * 2]
    rows += [{"prompt": "Say it:", "completion": " and".join(WORDS * 2)} for _ in range(3)]
    rows += [{"prompt": " ".join(WORDS * 3), "completion": " ok."}]
    data = _write(tmp_path / "pc.jsonl", rows)
    calls = {"n": 0}
    real = trainer.token_mean_loss
    nan_steps = {2, 4, 5, 6}  # call 1 is the selection batch (one pass), call k + 1 is step k

    def nan_loss(*a, **k):
        calls["n"] += 1
        loss = real(*a, **k)
        return loss * float("nan") if calls["n"] - 1 in nan_steps else loss

    monkeypatch.setattr(trainer, "token_mean_loss", nan_loss)
    out = tmp_path / "nan"
    argv = _args(env, out, "--data", str(data), "--max-skips", "3", "--reselect-every", "0", "--save-every", "0",
                 steps=10)
    msg = _fails(argv, capsys, r"stopped at step 6: 3 consecutive steps had a non-finite loss or gradient "
                 r"\(last: epoch 0 batch 5\); checkpoint saved \(.*step-0000006\)")
    log = _log(out)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert [r["skipped"] for r in log] == [False, True, False, True, True, True]
    assert log[1]["batches"] == [[0, 1]] and "batches" not in log[0]
    meta = checkpoint.read_meta(out / "checkpoints" / "step-0000006")
    assert meta["state"]["skipped"] == 4 and meta["state"]["consecutive_skips"] == 3
    warn = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    skip = next(w for w in warn if w.startswith("step 2:"))
    assert skip == "step 2: non-finite loss (nan), step skipped (epoch 0 batch 1)"
    trunc = next(w for w in warn if "longer than --seq-len" in w)
    assert trunc == "data: 4 of 40 rows longer than --seq-len 32 were truncated, 1 dropped (no loss token left)"
    _record("rows longer than --seq-len", f"not an error; logged: `{trunc}` (and in metrics.json `data`)")
    _record("NaN loss injected at step 2", f"step skipped, logged: `{skip}`; log.jsonl record has "
            f"`\"skipped\": true, \"batches\": [[0, 1]]`")
    _record("NaN loss at steps 4, 5, 6 with --max-skips 3", f"exit 2 with a checkpoint: `{msg}`")


def test_loss_scaler_logic():
    s = LossScaler(enabled=True, init_scale=8.0, growth_interval=2)
    assert float(s.scale_loss(torch.tensor(1.5))) == 12.0
    g = [torch.tensor([8.0, -16.0]), torch.tensor([4.0])]
    assert s.unscale_(g) and g[0].tolist() == [1.0, -2.0] and g[1].tolist() == [0.5]
    assert not s.unscale_([torch.tensor([float("inf")])])
    s.update(False)
    assert s.scale == 4.0 and s.good_steps == 0
    s.update(True)
    s.update(True)
    assert s.scale == 8.0 and s.good_steps == 0
    s.update(True)
    t = LossScaler(enabled=True)
    t.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert (t.scale, t.good_steps) == (8.0, 1)
    off = LossScaler(enabled=False)
    x = torch.tensor([3.0])
    assert off.scale_loss(x) is x and off.unscale_([x]) and x.item() == 3.0
    with pytest.raises(TypeError):
        s.unscale_([torch.ones(1, dtype=torch.float16)])


def test_loss_scaler_unscales_delta_and_router_gradients():
    """A scaled backward + unscale gives exactly the unscaled gradients of the delta values and of the router
    masters (bf16 routers: fp32 masters separate from the parameters), and the step applies them."""
    from usaf import UsafConfig, prepare
    from usaf.engine.optim import UsafOptimizer
    from usaf.testing import make_tiny_model

    def setup(scaler):
        model = make_tiny_model("qwen3_moe", seed=0, dtype=torch.bfloat16)
        handle = prepare(model, UsafConfig(quant="none", density=0.05))
        for d in handle.deltas().values():
            d.set(torch.arange(0, d.numel, 37), torch.full((len(range(0, d.numel, 37)),), 0.01))
        return model, handle, UsafOptimizer(handle, lr=0.01, router_lr=0.01, scaler=scaler)

    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    grads, routers = [], []
    for scale in (None, 2.0**12):
        model, handle, opt = setup(LossScaler(enabled=scale is not None, init_scale=scale or 1.0))
        loss = model(input_ids=ids, labels=ids).loss
        opt.scale_loss(loss).backward()
        assert any(m is not p for m, p in zip(opt.masters, opt.routers))
        assert opt.step(float(loss.detach()))
        grads.append([g.clone() for g in [v.grad for v in opt.values] + [m.grad for m in opt.masters]])
        routers.append([p.detach().clone() for p in opt.routers])
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(grads[0], grads[1]):
        assert torch.equal(a, b)
    for a, b in zip(routers[0], routers[1]):
        assert torch.equal(a, b)


class _HotScaler(LossScaler):
    """Starts far too high (every fp16 backward overflows), backs off fast and grows every 2 steps."""

    def __init__(self, enabled):
        super().__init__(enabled, init_scale=2.0**40, backoff=2.0**-8, growth_interval=2)


def test_fp16_dynamic_loss_scaling_and_its_state_resume(env, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "LossScaler", _HotScaler)
    a, b = tmp_path / "a", tmp_path / "b"
    fp16 = ("--dtype", "fp16", "--keep-checkpoints", "10", "--save-every", "2")
    assert main(_args(env, a, *fp16, steps=5)) == 0
    log = _log(a)
    scales = [r["loss_scale"] for r in log]
    assert log[0]["skipped"] and scales[0] == 2.0**32  # overflow: skipped, scale backed off
    assert not log[-1]["skipped"] and all(math.isfinite(r["loss"]) for r in log)
    good = [i for i, r in enumerate(log) if not r["skipped"]]
    assert len(good) >= 2 and scales[good[1]] == 2 * scales[good[0]]  # growth after 2 finite steps
    assert json.loads((a / "metrics.json").read_text())["skipped_steps"] == sum(r["skipped"] for r in log)
    # resume from step 2: the restored scale (not a fresh 2**40) gives the same steps 3-5, bit for bit
    shutil.copytree(a, b)
    for name in ("delta.safetensors", "metrics.json"):
        (b / name).unlink()
    for d in checkpoint.complete(b)[:-1]:
        shutil.rmtree(d)
    assert [d.name for d in checkpoint.complete(b)] == ["step-0000002"]
    assert checkpoint.read_meta(b / "checkpoints" / "step-0000002")["loss_scaler"]["scale"] == scales[1]
    assert main(_args(env, b, *fp16, "--resume", str(b), steps=5)) == 0
    assert [(r["loss"], r["loss_scale"], r["skipped"]) for r in _log(b)] == \
        [(r["loss"], r["loss_scale"], r["skipped"]) for r in log]
    da, db = load_file(a / "delta.safetensors"), load_file(b / "delta.safetensors")
    assert all(torch.equal(da[k], db[k]) for k in da)
    _record("--dtype fp16, loss scale starting at 2^40 (overflow)",
            f"overflowing steps skipped without counting toward --max-skips, scale {scales}; resumed from "
            f"step 2 with the saved scale: identical log and delta")


# ---------------------------------------------------------------------------------------------------------
# 4. Bad input: exit code 2, one line, --out neither created nor changed
# ---------------------------------------------------------------------------------------------------------


def _model_copy(env, tmp, name="m", edit=None):
    d = shutil.copytree(env.ckpt, tmp / name)
    if edit:
        c = json.loads((d / "config.json").read_text())
        edit(c)
        (d / "config.json").write_text(json.dumps(c))
    return d


def _sharded(env, tmp):
    return save_tiny_checkpoint("qwen3_moe", tmp / "sharded", max_shard_size="20KB")


def _dense(env, tmp):
    from transformers import Qwen3Config

    d = tmp / "dense"
    Qwen3Config(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16).save_pretrained(d)
    for f in env.ckpt.glob("tokenizer*"):
        shutil.copy(f, d)
    (d / "model.safetensors").write_bytes(b"")
    return d


def _case_model(build):
    def make(env, tmp):
        return _args(env, tmp / "out", "--model", str(build(env, tmp)), steps=1)
    return make


def _case_data(text):
    def make(env, tmp):
        p = tmp / "data.jsonl"
        p.write_text(text)
        return _args(env, tmp / "out", "--data", str(p), steps=1)
    return make


def _no_tokenizer(env, tmp):
    d = _model_copy(env, tmp)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (d / f).unlink(missing_ok=True)
    return d


def _truncated_shard(env, tmp):
    d = _sharded(env, tmp)
    f = sorted(d.glob("model-*.safetensors"))[3]
    f.write_bytes(f.read_bytes()[:-100])
    return d


def _missing_shard(env, tmp):
    d = _sharded(env, tmp)
    sorted(d.glob("model-*.safetensors"))[2].unlink()
    return d


def _index_edit(key_to):
    def build(env, tmp):
        d = _sharded(env, tmp)
        idx = json.loads((d / "model.safetensors.index.json").read_text())
        wm = idx["weight_map"]
        key = next(k for k in wm if "input_layernorm" in k)
        if key_to is None:
            del wm[key]
        else:
            wm[key] = key_to
        (d / "model.safetensors.index.json").write_text(json.dumps(idx))
        return d
    return build


def _pickle_only(env, tmp):
    class Evil:
        def __reduce__(self):
            return (open, (str(tmp / "PWNED"), "w"))

    d = _model_copy(env, tmp)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(pickle.dumps({"w": Evil()}))
    return d


def _remote_code(env, tmp):
    def edit(c):
        c["model_type"] = "custom_moe"
        c["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig"}

    d = _model_copy(env, tmp, edit=edit)
    (d / "configuration_custom.py").write_text(
        f"open({str(tmp / 'PWNED')!r}, 'w').close()\nfrom transformers import PretrainedConfig\n"
        "class CustomConfig(PretrainedConfig):\n    model_type = 'custom_moe'\n")
    return d


def _out_state(kind):
    def make(env, tmp):
        out = tmp / "out"
        if kind == "file":
            out.write_text("x")
        else:
            out.mkdir()
            (out / ("config.yaml" if kind == "run" else "notes.txt")).write_text("model: other\n")
        return _args(env, out, steps=1)
    return make


def _oom(exc):
    def make(env, tmp):
        return _args(env, tmp / "out", steps=1), exc
    return make


BAD = {
    "malformed JSON": (_case_data('{"text": "ok"}\n{"text": \n'), r"data.jsonl, line 2: malformed JSON"),
    "unknown row kind": (_case_data('{"foo": 1}\n'), r"line 1: unknown row kind"),
    "empty data": (_case_data(""), r"data.jsonl: no data"),
    "messages without an assistant turn": (
        _case_data(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n"),
        r"line 1: conversation has no assistant turn"),
    "mixed row kinds": (_case_data('{"text": "a"}\n{"prompt": "p", "completion": "c"}\n'),
                        r"line 2: row is of kind 'prompt_completion' but the data is of kind 'text'"),
    "data file missing": (lambda env, tmp: _args(env, tmp / "out", "--data", str(tmp / "nope.jsonl")),
                          r"nope.jsonl: no such file"),
    "missing tokenizer": (_case_model(_no_tokenizer), r"has no tokenizer"),
    "dense model": (_case_model(_dense), r"is a dense model \(model_type 'qwen3', no experts\)"),
    "unsupported model_type": (_case_model(lambda e, t: _model_copy(e, t, edit=lambda c: c.update(
        model_type="foo_moe"))), r"model type `foo_moe` but Transformers does not recognize"),
    "model directory missing": (_case_model(lambda e, t: t / "nowhere"), r"not found"),
    "truncated safetensors shard": (_case_model(_truncated_shard),
                                    r"model-00004-of-00012.safetensors is truncated: \d+ bytes, its header needs"),
    "shard missing (named in the index)": (_case_model(_missing_shard),
                                           r"names a missing shard: model-00003-of-00012.safetensors"),
    "weight missing from the index": (_case_model(_index_edit(None)), r"lacks 1 tensors"),
    "index names a shard outside the model dir": (_case_model(_index_edit("../ckpt/model.safetensors")),
                                                  r"names a shard outside the model directory: '../ckpt"),
    "index names an absolute path": (_case_model(_index_edit("/etc/passwd")),
                                     r"names a shard outside the model directory: '/etc/passwd'"),
    "pickle-only checkpoint (code in the pickle)": (
        _case_model(_pickle_only), r"has no model.safetensors .*pickle files are never loaded"),
    "remote code without --trust-remote-code": (
        _case_model(_remote_code), r"needs to run its own Python code .* unless you pass --trust-remote-code"),
    "--density out of range": (lambda env, tmp: _args(env, tmp / "out", "--density", "1.5"),
                               r"--density must be in \(0, 1\], got 1.5"),
    "--train-layers outside the model": (lambda env, tmp: _args(env, tmp / "out", "--train-layers", "1-4"),
                                         r"--train-layers '1-4' is not valid for a model with 2 layers"),
    "--seq-len 1": (lambda env, tmp: _args(env, tmp / "out", "--seq-len", "1"), r"--seq-len must be at least 2"),
    "--keep-checkpoints 0": (lambda env, tmp: _args(env, tmp / "out", "--keep-checkpoints", "0"),
                             r"--keep-checkpoints must be at least 1"),
    "--out holds another run": (_out_state("run"), r"already holds a run; use --resume .* or --overwrite"),
    "--out is a non-empty directory": (_out_state("other"), r"is not empty"),
    "--out is a file": (_out_state("file"), r"exists and is not a directory"),
    "--resume where there is no run": (lambda env, tmp: _args(env, tmp / "out", "--resume", str(tmp / "out")),
                                       r"no run there"),
    "--resume A --out B": (lambda env, tmp: _args(env, tmp / "out", "--resume", str(tmp / "elsewhere")),
                           r"name different directories"),
    "MemoryError while loading": (_oom(MemoryError()), r"out of memory; run `usaf plan`"),
    "torch.OutOfMemoryError while loading": (
        _oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")),
        r"out of memory \(CUDA out of memory. Tried to allocate 20.00 GiB\); run `usaf plan` to see what fits"),
    "CPU allocator failure while loading": (
        _oom(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")),
        r"out of memory .*; run `usaf plan`"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exit_2_one_line_nothing_written(env, tmp_path, case, capsys, monkeypatch):
    make, expect = BAD[case]
    made = make(env, tmp_path)
    calls = []
    if isinstance(made, tuple):  # out of memory: raised by the model load, never retried
        made, exc = made

        def oom(*a, **k):
            calls.append(1)
            raise exc

        monkeypatch.setattr(trainer, "load_prepared", oom)
    out = Path(made[made.index("--out") + 1])
    before = _tree(out)
    msg = _fails(made, capsys, expect)
    assert _tree(out) == before  # not created, not changed
    assert not (tmp_path / "PWNED").exists()  # no code from the checkpoint ran
    if calls:
        assert calls == [1]
    _record(case, f"exit 2: `{_short(msg, tmp_path)}`")


def _short(msg, tmp_path):
    return msg.replace(str(tmp_path), "<tmp>")


def test_eval_refuses_delta_from_another_base(env, ref, other_ckpt, tmp_path, capsys):
    _fails(["eval", "--model", str(other_ckpt), "--delta", str(ref / "delta.safetensors"), "--data", str(env.data),
            "--seq-len", "32"], capsys, r"was made for another base model \(fingerprint \w+, this model is \w+\)",
           "`usaf eval --delta` with a delta from another base")
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes((ref / "delta.safetensors").read_bytes()[:50])
    _fails(["eval", "--model", str(env.ckpt), "--delta", str(bad), "--data", str(env.data)], capsys,
           r"cut.safetensors is not a safetensors file", "`usaf eval --delta` with a truncated delta file")


def test_overwrite_replaces_only_the_previous_runs_files(env, tmp_path, monkeypatch):
    out = tmp_path / "out"
    (out / "checkpoints" / "step-0000100").mkdir(parents=True)
    for f in ("state.json", "state.safetensors"):
        (out / "checkpoints" / "step-0000100" / f).write_text("{}")
    for f in ("config.yaml", "log.jsonl", "metrics.json", "notes.txt"):
        (out / f).write_text("old\n")
    # stop right after --out is prepared: no selection, no training, no outputs
    monkeypatch.setattr(trainer.Recipe, "load_checkpoint", lambda self: True)
    monkeypatch.setattr(trainer.Recipe, "train_loop", lambda self: None)
    monkeypatch.setattr(trainer.Recipe, "finish", lambda self, t: {})
    from usaf.cli import _train_config, build_parser

    trainer.train(_train_config(build_parser().parse_args(_args(env, out, "--overwrite"))))
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "notes.txt"]
    assert (out / "config.yaml").read_text() != "old\n"


def test_bad_input_in_a_subprocess_exit_code_no_traceback(env, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    r = subprocess.run([sys.executable, "-m", "usaf.cli", *_args(env, tmp_path / "out", "--data", str(bad))],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"usaf: error: {bad}, line 2: malformed JSON: Expecting value "
                                             f"(column 10)"]
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------
# 5. Safe by default
# ---------------------------------------------------------------------------------------------------------


def _pickle_delta(tmp):
    class Evil:
        def __reduce__(self):
            return (open, (str(tmp / "PWNED"), "w"))

    p = tmp / "evil.safetensors"
    p.write_bytes(pickle.dumps({"w": Evil()}))
    return p


def test_pickle_files_are_refused_everywhere(env, ref, tmp_path, capsys):
    """A pickle where usaf expects weights, a delta or a checkpoint is refused with one line, by every
    command, and never unpickled (its payload would create PWNED)."""
    model = _pickle_only(env, tmp_path)
    evil = _pickle_delta(tmp_path)
    data = str(env.data)
    cases = [
        (["eval", "--model", str(model), "--data", data], "pickle files are never loaded"),
        (["generate", "--model", str(model), "--prompt", "hi"], "pickle files are never loaded"),
        (["eval", "--model", str(env.ckpt), "--delta", str(evil), "--data", data], "not a safetensors file"),
        (["generate", "--model", str(env.ckpt), "--delta", str(evil), "--prompt", "hi"], "not a safetensors file"),
        (["export", str(evil), "--base", str(env.ckpt), "--out", str(tmp_path / "x")], "safetensors"),
        (["apply", "--model", str(env.ckpt), "--delta", str(evil), "--out", str(tmp_path / "y")], "safetensors"),
        (["apply", "--model", str(model), "--delta", str(ref / "delta.safetensors"), "--out", str(tmp_path / "z")],
         "safetensors"),
    ]
    for argv, expect in cases:
        _fails(argv, capsys, expect)
    # a pickle planted as the newest checkpoint's state: resume skips it as unreadable, never unpickles it
    run = shutil.copytree(ref, tmp_path / "run")
    newest = sorted((run / "checkpoints").glob("step-*"))[-1]
    (newest / "state.safetensors").write_bytes(evil.read_bytes())
    assert main(_args(env, run, "--resume", str(run))) == 0
    assert not (tmp_path / "PWNED").exists()


def test_remote_code_runs_only_when_asked(env, tmp_path, capsys):
    """A checkpoint whose config needs its own Python code: refused by every command, its code not run;
    with --trust-remote-code the code runs (and the custom, dense model is then refused as such)."""
    model = _remote_code(env, tmp_path)
    pwned = tmp_path / "PWNED"
    for argv in (_args(env, tmp_path / "o", "--model", str(model), steps=1),
                 ["eval", "--model", str(model), "--data", str(env.data)],
                 ["generate", "--model", str(model), "--prompt", "hi"],
                 ["inspect", "--model", str(model)],
                 ["plan", "--model", str(model), "--device", "cpu"]):
        _fails(argv, capsys, "needs to run its own Python code.*--trust-remote-code")
        assert not pwned.exists()
    _fails(["inspect", "--model", str(model), "--trust-remote-code"], capsys, "custom_moe")
    assert pwned.exists()
