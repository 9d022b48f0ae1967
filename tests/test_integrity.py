"""Integrity and identity: bytes flipped in every kind of file usaf writes are detected (by name), a damaged
checkpoint falls back to the previous good one, non-finite results never replace good ones, and the base
fingerprint is the checkpoint on disk whatever dtype it is loaded at. ``USAF_RELIABILITY_TABLE=<file>``
appends the message of each case to that file (docs/reliability.md)."""

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

import usaf
from usaf.cli import main
from usaf.data.examples import Example
from usaf.engine.optim import UsafOptimizer
from usaf.integrity import IntegrityError, checkpoint_fingerprint, read_header, verify_file
from usaf.io import atomic_save_safetensors, read_safetensors
from usaf.load import stream
from usaf.load.hf import load_model
from usaf.memory.prefix import PrefixCache
from usaf.testing import make_tiny_model, save_tiny_checkpoint
from usaf.train import checkpoint
from usaf.train import recipe as trainer

MESSAGES: list[tuple[str, str]] = []
WORDS = "the quick brown fox jumps over the lazy dog while a small cat sleeps in the warm sun".split()


@pytest.fixture(scope="module", autouse=True)
def _table():
    yield
    dest = os.environ.get("USAF_RELIABILITY_TABLE")
    if dest:
        with open(dest, "a") as f:
            for case, what in MESSAGES:
                what = re.sub(r"/tmp/pytest-of-[^/]+/pytest-\d+/[^/ ]+", "<tmp>", what)
                f.write(f"| {case} | {what.replace('|', '/')} |\n")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    ckpt = save_tiny_checkpoint("qwen3_moe", root / "ckpt")
    data = root / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"{WORDS[i % 17]} {WORDS[(3 * i + 1) % 17]} and "
                                                f"{WORDS[(5 * i + 2) % 17]}. " * 3}) + "\n" for i in range(24)))
    ref = root / "ref"
    assert main(_args(ckpt, data, ref)) == 0
    return ckpt, data, ref


def _args(ckpt, data, out, *extra, steps=4):
    return ["train", "--model", str(ckpt), "--data", str(data), "--out", str(out), "--steps", str(steps),
            "--seq-len", "32", "--batch-size", "4", "--lr", "0.01", "--density", "0.05", "--reselect-every", "0",
            "--calib-batches", "1", "--save-every", "1", "--keep-checkpoints", "3", "--quiet", *extra]


def _flip(path: Path, tensor: str | None = None, n: int = 64, where: int | None = None) -> str:
    """Invert ``n`` bytes in the middle of ``tensor`` (default: the middle of the file); returns its name."""
    if tensor is not None:
        header, start = read_header(path)
        a, b = header[tensor]["data_offsets"]
        where, n = start + (a + b) // 2 - min(n, b - a) // 2, min(n, b - a)
    data = bytearray(path.read_bytes())
    where = len(data) // 2 - n // 2 if where is None else where
    data[where : where + n] = bytes(x ^ 0xFF for x in data[where : where + n])
    path.write_bytes(bytes(data))
    return tensor


def _tree(path: Path) -> dict:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*"))
            if p.is_file()}


def _fails(argv, capsys, expect, case=None) -> str:
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("usaf: error: "), err
    assert re.search(expect, err[0]), err[0]
    if case:
        MESSAGES.append((case, f"exit 2: `{err[0]}`"))
    return err[0]


# ---------------------------------------------------------------------------------------------- checksums
def test_checksum_is_sha256_of_dtype_shape_and_bytes(tmp_path):
    tensors = {"a": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(5, dtype=torch.bfloat16),
               "c": torch.tensor([3, 1, 2], dtype=torch.int64)}
    path = tmp_path / "x.safetensors"
    atomic_save_safetensors(tensors, path, metadata={"k": "v"})
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    want = {"a": b"F32 [3, 4]\n" + tensors["a"].numpy().tobytes(),
            "b": b"BF16 [5]\n" + tensors["b"].view(torch.int16).numpy().tobytes(),
            "c": b"I64 [3]\n" + tensors["c"].numpy().tobytes()}
    assert json.loads(meta["usaf_checksums"]) == {k: hashlib.sha256(v).hexdigest() for k, v in want.items()}
    assert meta["k"] == "v" and verify_file(path)
    back, _ = read_safetensors(path)
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)
    _flip(path, "b", n=1)
    for check in (lambda: read_safetensors(path), lambda: verify_file(path)):
        with pytest.raises(IntegrityError, match=r"x.safetensors is corrupted: tensor b does not match its checksum"):
            check()
    plain = tmp_path / "plain.safetensors"  # written by someone else: no checksums, read unverified
    save_file(tensors, str(plain))
    assert not verify_file(plain) and set(read_safetensors(plain)[0]) == set(tensors)


def test_corrupted_delta_is_refused_by_every_command(env, tmp_path, capsys):
    ckpt, data, ref = env
    delta = str(shutil.copy(ref / "delta.safetensors", tmp_path / "delta.safetensors"))
    name = next(k for k in read_header(delta)[0] if k.endswith(".values"))
    _flip(Path(delta), name)
    expect = rf"delta.safetensors is corrupted: tensor {re.escape(name)} does not match its checksum"
    cmds = [("`usaf eval --delta`", ["eval", "--model", str(ckpt), "--delta", delta, "--data", str(data)]),
            ("`usaf generate --delta`", ["generate", "--model", str(ckpt), "--delta", delta, "--prompt", "hi"]),
            ("`usaf export --format hf`", ["export", delta, "--base", str(ckpt), "--out", str(tmp_path / "a")]),
            ("`usaf export --format delta`", ["export", delta, "--base", str(ckpt), "--format", "delta", "--out",
                                              str(tmp_path / "b.safetensors")]),
            ("`usaf apply`", ["apply", "--model", str(ckpt), "--delta", delta, "--out", str(tmp_path / "c")])]
    for what, argv in cmds:
        _fails(argv, capsys, expect, f"64 bytes flipped inside a `*.values` tensor of the delta, then {what}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["delta.safetensors"]  # nothing written


def test_corrupted_exports_are_refused(env, tmp_path, capsys):
    ckpt, data, ref = env
    hf, rev = tmp_path / "hf", tmp_path / "rev.safetensors"
    assert main(["export", str(ref), "--out", str(hf)]) == 0
    assert main(["export", str(ref), "--format", "delta", "--out", str(rev)]) == 0
    record = json.loads((hf / "usaf_export.json").read_text())["checksums"]
    assert record == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in hf.iterdir()
                      if p.name != "usaf_export.json"}  # what sha256sum prints
    merged = tmp_path / "merged"
    assert main(["apply", "--model", str(ckpt), "--delta", str(rev), "--out", str(merged), "--no-check"]) == 0
    name = next(k for k in read_header(rev)[0] if k.endswith(".original"))
    _flip(rev, name, n=8)
    _fails(["apply", "--model", str(merged), "--delta", str(rev), "--out", str(tmp_path / "x"), "--revert"],
           capsys, rf"rev.safetensors is corrupted: tensor {re.escape(name)} does not match",
           "8 bytes flipped in an `.original` tensor of a revertible delta, then `usaf apply --revert`")
    _flip(hf / "model.safetensors")
    for what, argv in [("usaf apply --model EXPORT", ["apply", "--model", str(hf), "--delta", str(ref / "delta.safetensors"),
                                                      "--out", str(tmp_path / "y")]),
                       ("usaf eval --model EXPORT", ["eval", "--model", str(hf), "--data", str(data)]),
                       ("usaf train --model EXPORT", _args(hf, data, tmp_path / "z", steps=1))]:
        _fails(argv, capsys, r"hf/model.safetensors is corrupted: it does not match its checksum",
               f"64 bytes flipped in a shard of an hf export, then `{what}`")
    assert not any((tmp_path / n).exists() for n in "xyz")


# --------------------------------------------------------------------------------------------- checkpoints
def test_corrupted_newest_checkpoint_falls_back_and_matches(env, tmp_path, caplog, capsys):
    """The issue's case: 64 bytes flipped in the middle of the newest checkpoint's state, then --resume."""
    ckpt, data, ref = env
    out = shutil.copytree(ref, tmp_path / "run")
    for f in ("delta.safetensors", "metrics.json"):
        (out / f).unlink()
    _flip(out / "checkpoints" / "step-0000004" / "state.safetensors")
    caplog.set_level("INFO", logger="usaf")
    assert main(_args(ckpt, data, out, "--resume", str(out))) == 0
    warn = next(r.getMessage() for r in caplog.records if "is damaged" in r.getMessage())
    assert re.fullmatch(r"checkpoint step-0000004 is damaged \(.*state.safetensors is corrupted: tensor \S+ does "
                        r"not match its checksum\); falling back to the previous one", warn), warn
    a, b = load_file(ref / "delta.safetensors"), load_file(out / "delta.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # as if nothing had happened
    assert json.loads((out / "metrics.json").read_text())["eval_ppl_after"] == \
        json.loads((ref / "metrics.json").read_text())["eval_ppl_after"]
    assert (out / "checkpoints" / ".corrupt-step-0000004").is_dir()
    MESSAGES.append(("64 bytes flipped in the middle of the newest checkpoint's state.safetensors, then --resume",
                     f"logged (warning): `{warn}`; resumed from step 3, moved to .corrupt-step-0000004; final "
                     f"delta and eval identical to the uninterrupted run"))

    # state.json edited (still valid JSON): its checksum catches it too; when no checkpoint is good: exit 2
    for d in checkpoint.complete(out):
        meta = json.loads((d / "state.json").read_text())
        meta["step"] += 1
        (d / "state.json").write_text(json.dumps(meta))
    before = _tree(out)
    _fails(_args(ckpt, data, out, "--resume", str(out), steps=6), capsys,
           r"cannot resume .*run: no good checkpoint \(3 damaged; newest step-0000004: .*step-0000004/state.json "
           r"is corrupted: it does not match its checksum\)",
           "`state.json` of every checkpoint edited (valid JSON), then --resume")
    assert _tree(out) == before  # nothing changed


def test_non_finite_state_is_never_saved(tmp_path):
    model = make_tiny_model("qwen3_moe")
    handle = usaf.prepare(model, usaf.UsafConfig(quant="none", density=0.05))
    for d in handle.deltas().values():
        d.set(torch.arange(0, d.numel, 97), torch.zeros(len(range(0, d.numel, 97))))
    opt = UsafOptimizer(handle, lr=0.01, router_lr=0.01)
    checkpoint.save(tmp_path, 1, handle, opt, None, {})
    with torch.no_grad():
        next(iter(handle.deltas().values())).values[3] = float("nan")
    with pytest.raises(checkpoint.NonFiniteState, match=r"not saving checkpoint step-0000002: \S+\.values holds "
                       r"non-finite values; the last good checkpoint \(.*step-0000001\) is kept"):
        checkpoint.save(tmp_path, 2, handle, opt, None, {})
    assert [d.name for d in (tmp_path / "checkpoints").iterdir()] == ["step-0000001"]


def test_non_finite_final_eval_or_loss_keeps_the_last_good_outputs(env, tmp_path, monkeypatch, capsys):
    ckpt, data, ref = env
    out = shutil.copytree(ref, tmp_path / "run")
    real = trainer.evaluate_examples
    monkeypatch.setattr(trainer, "evaluate_examples", lambda *a, **k: dict(real(*a, **k), loss=float("nan"),
                                                                          ppl=float("nan")))
    keep = {k: v for k, v in _tree(out).items() if k not in ("log.jsonl", "config.yaml")}
    _fails(_args(ckpt, data, out, "--resume", str(out), steps=5), capsys,
           r"the final eval loss is not finite \(nan\): no delta, metrics or checkpoint written; the last good "
           r"checkpoint \(.*step-0000004\) is kept",
           "final eval NaN (injected) after resuming a finished run with one more step")
    assert {k: v for k, v in _tree(out).items() if k not in ("log.jsonl", "config.yaml")} == keep
    monkeypatch.setattr(trainer, "evaluate_examples", real)
    calls, loss = {"n": 0}, trainer.token_mean_loss

    def nan_after_selection(*a, **k):  # call 1: the selection pass (one per calibration batch); then every step
        calls["n"] += 1
        return loss(*a, **k) * (float("nan") if calls["n"] > 1 else 1.0)

    monkeypatch.setattr(trainer, "token_mean_loss", nan_after_selection)
    fresh = tmp_path / "nan"
    _fails(_args(ckpt, data, fresh, "--max-skips", "0", "--save-every", "0", steps=2), capsys,
           r"no step of the run had a finite loss \(2 steps\): no delta, metrics or checkpoint written",
           "every loss NaN (injected) with --max-skips 0")
    assert not (fresh / "delta.safetensors").exists() and not (fresh / "metrics.json").exists()


# ------------------------------------------------------------------------------------------------- caches
def test_damaged_quantized_cache_is_rebuilt(tmp_path, caplog, monkeypatch):
    ckpt = save_tiny_checkpoint("mixtral", tmp_path / "c", per_expert=True)
    ids = torch.randint(6, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    cfg = usaf.UsafConfig(quant="4bit")
    h = stream.load_streamed(ckpt, cfg, dtype=torch.float32, cache_root=tmp_path / "q")
    with torch.no_grad():
        want = h.model(ids).logits
    (cache,) = (tmp_path / "q").glob("*.safetensors")
    name = next(k for k in read_header(cache)[0] if k.endswith(".qdata"))
    _flip(cache, name, n=16)
    caplog.set_level("WARNING", logger="usaf")
    h2 = stream.load_streamed(ckpt, cfg, dtype=torch.float32, cache_root=tmp_path / "q")
    warn = next(r.getMessage() for r in caplog.records if "quantized cache" in r.getMessage())
    assert f"tensor {name} does not match its checksum" in warn and "rebuilding it" in warn
    with torch.no_grad():
        assert torch.equal(h2.model(ids).logits, want)
    assert verify_file(cache) and h2.fingerprint == h.fingerprint == checkpoint_fingerprint(ckpt)
    _flip(cache, name, n=16)
    monkeypatch.setenv("USAF_VERIFY_CACHE", "0")  # skipped on request: the damaged cache is used as it is
    caplog.clear()
    stream.load_streamed(ckpt, cfg, dtype=torch.float32, cache_root=tmp_path / "q")
    assert not any("quantized cache" in r.getMessage() for r in caplog.records)
    with pytest.raises(IntegrityError):
        verify_file(cache)
    MESSAGES.append(("16 bytes flipped in the quantized-expert cache, then a load", f"logged (warning): "
                     f"`{warn}`; rebuilt, same logits"))


def test_damaged_prefix_cache_is_rebuilt(tmp_path, caplog):
    ckpt = save_tiny_checkpoint("qwen3_moe", tmp_path / "c")
    handle = usaf.prepare(load_model(str(ckpt), dtype=torch.float32), usaf.UsafConfig(quant="none",
                                                                                      train_layers="top:1"))
    examples = [Example([5 + (i * j) % 200 for j in range(6 + i)], [5 + (i * j) % 200 for j in range(6 + i)])
                for i in range(5)]
    a = PrefixCache.build(handle, examples, 1, 2, 0, cache_root=tmp_path / "p")
    want = torch.from_numpy(a.data.copy())
    (binf,) = (tmp_path / "p").glob("*.bin")
    _flip(binf, n=8)
    caplog.set_level("WARNING", logger="usaf")
    b = PrefixCache.build(handle, examples, 1, 2, 0, cache_root=tmp_path / "p")
    assert any("frozen-prefix cache" in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records)
    assert torch.equal(torch.from_numpy(b.data.copy()), want)


# --------------------------------------------------------------------------------------------- fingerprint
def _reference_fingerprint(ckpt: Path) -> str:
    """The documented digest written out: model_type, then per tensor in name order its on-disk name, dtype,
    shape, byte count and bytes: all of them up to 64 KiB, else 8 chunks of 4 KiB spread evenly from the
    first byte to the last (each start rounded down to a whole element)."""
    names = {"F32": torch.float32, "BF16": torch.bfloat16}
    h = hashlib.sha256(f"usaf-checkpoint-fingerprint-1|{json.loads((ckpt / 'config.json').read_text())['model_type']}\n"
                       .encode())
    tensors = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    for name in sorted(tensors):
        t = tensors[name]
        dt = next(k for k, v in names.items() if v == t.dtype)
        raw = t.contiguous().view(torch.uint8).numpy().tobytes()
        h.update(f"{name}|{dt}|{list(t.shape)}|{len(raw)}\n".encode())
        if len(raw) <= 64 << 10:
            h.update(raw)
            continue
        size = t.element_size()
        for i in range(8):
            s = (len(raw) - 4096) * i // 7 // size * size
            h.update(raw[s : s + 4096])
    return h.hexdigest()[:32]


def test_fingerprint_is_the_checkpoint_on_disk_at_any_load_dtype(tmp_path, caplog):
    """deepseek_v3 keeps its routers in fp32 in a bf16 model (the export bug): same fingerprint whether the
    checkpoint is loaded at bf16 or fp32, streamed (4-bit) or not, sharded or not."""
    ckpt = save_tiny_checkpoint("deepseek_v3", tmp_path / "c", per_expert=True)
    want = _reference_fingerprint(ckpt)
    assert checkpoint_fingerprint(ckpt) == want
    for dtype in (torch.bfloat16, torch.float32):
        h = usaf.prepare(load_model(str(ckpt), dtype=dtype), usaf.UsafConfig(quant="4bit"))
        assert (h.fingerprint, h.fingerprint_of) == (want, "checkpoint"), dtype
    h = stream.load_streamed(ckpt, usaf.UsafConfig(quant="4bit"), dtype=torch.bfloat16, cache_root=tmp_path / "q")
    assert h.fingerprint == want
    sharded = save_tiny_checkpoint("deepseek_v3", tmp_path / "s", per_expert=True, max_shard_size="20KB")
    assert len(list(sharded.glob("*.safetensors"))) > 1 and checkpoint_fingerprint(sharded) == want
    other = save_tiny_checkpoint("deepseek_v3", tmp_path / "o", seed=1, per_expert=True)
    assert checkpoint_fingerprint(other) != want

    # built from the config alone (random weights), though its config names the directory: not the checkpoint
    caplog.set_level("WARNING", logger="usaf")
    fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ckpt))
    h = usaf.prepare(fresh, usaf.UsafConfig(quant="none"))
    assert h.fingerprint_of == "memory" and h.fingerprint != want
    assert any("differs from" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_fingerprint_reads_a_sparse_sample_of_large_tensors(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
    save_file({"w": torch.zeros(1 << 18), "b": torch.ones(4)}, str(d / "model.safetensors"))  # 1 MiB + 16 B
    header, start = read_header(d / "model.safetensors")
    w0 = start + header["w"]["data_offsets"][0]
    base = checkpoint_fingerprint(d)
    _flip(d / "model.safetensors", where=w0 + 50_000, n=4)  # between the sampled 4 KiB chunks (0, ~149 KB, ...)
    assert checkpoint_fingerprint(d) == base
    _flip(d / "model.safetensors", where=w0 + 100, n=4)  # inside the first chunk
    assert checkpoint_fingerprint(d) != base
