"""``usaf bench``: the speed bench end to end in a tiny configuration (structure only, not timings)."""

from __future__ import annotations

import json

import pytest

from usaf.bench.speed import SPEED_METHODS, parse_extra, run_bench, table, targets

# One small layer. jobs=0 runs the methods in the test process (one worker process costs ~5 s of imports);
# test_workers covers the one-process-per-method path. Timings mean nothing here.
TINY = ["layers=1", "hidden=64", "experts=4", "top_k=2", "moe_inter=64", "heads=2", "kv_heads=1", "head_dim=32",
        "vocab=512", "seq=32", "batch=2", "steps=2", "warmup=0", "calib=1"]


def test_speed_bench_json(tmp_path, capsys):
    out = tmp_path / "speed.json"
    assert run_bench("speed", json_path=str(out), extra=TINY + ["jobs=0"]) == 0
    doc = json.loads(out.read_text())
    assert doc["bench"] == "speed"
    assert doc["command"].startswith("usaf bench speed")
    assert doc["machine"]["cores"] >= 1 and doc["machine"]["cpu"]
    assert [r["method"] for r in doc["results"]] == list(SPEED_METHODS)
    by = {r["method"]: r for r in doc["results"]}
    for r in doc["results"]:
        assert "error" not in r, r
        assert r["tokens_per_s"] > 0 and r["cpu_tokens_per_s"] > 0
        assert r["peak_rss_mb"] > 0
        assert isinstance(r["trainable_params"], int)
    assert by["inference"]["trainable_params"] == by["inference-bf16"]["trainable_params"] == 0
    assert 0 < by["usaf"]["trainable_params"] < by["lora-r8"]["trainable_params"] < by["full"]["trainable_params"]
    assert by["usaf"]["active"] > 0
    assert {t["target"] for t in doc["targets"]} >= {"usaf tokens/s >= 1.5x lora-r8",
                                                     "usaf peak RSS <= 1.15x inference (same 4-bit base)"}
    printed = capsys.readouterr().out
    assert "| usaf " in printed and "tokens/s" in printed


def test_workers(tmp_path):
    """The one-process-per-method path: a worker process runs, its record is parsed back."""
    out = tmp_path / "memory.json"
    assert run_bench("memory", json_path=str(out), extra=TINY + ["methods=inference"]) == 0
    doc = json.loads(out.read_text())
    assert doc["bench"] == "memory"
    (rec,) = doc["results"]
    assert "error" not in rec, rec
    assert rec["method"] == "inference" and rec["trainable_params"] == 0
    assert rec["peak_rss_mb"] > 100  # a process with torch loaded
    assert rec["peak_rss_mb"] >= rec["steps_peak_rss_mb"] > 0


def test_settings():
    cfg = parse_extra(["layers=2", "seq=64"], quick=True)
    assert cfg["layers"] == 2 and cfg["seq"] == 64 and cfg["steps"] == 3 and cfg["hidden"] == 256
    assert parse_extra(["size=mid"])["experts"] == 64
    for bad in (["nokey=1"], ["layers"], ["layers=x"], ["size=huge"], ["dtype=fp8"], ["top_k=9", "experts=4"]):
        with pytest.raises(ValueError):
            parse_extra(bad)
    with pytest.raises(ValueError, match="unknown method"):
        run_bench("speed", extra=["methods=usaf,qlora"])


def test_table_and_targets():
    res = [{"method": "usaf", "tokens_per_s": 300.0, "cpu_tokens_per_s": 310.0, "step_s_median": 1.0,
            "peak_rss_mb": 110.0, "steps_peak_rss_mb": 100.0, "trainable_params": 5},
           {"method": "lora-r8", "tokens_per_s": 100.0, "cpu_tokens_per_s": 100.0, "step_s_median": 3.0,
            "peak_rss_mb": 120.0, "steps_peak_rss_mb": None, "trainable_params": 50},
           {"method": "inference", "tokens_per_s": 1000.0, "cpu_tokens_per_s": 1000.0, "step_s_median": 0.3,
            "peak_rss_mb": 100.0, "steps_peak_rss_mb": 100.0, "trainable_params": 0},
           {"method": "full", "error": "boom"}]
    text = table(res)
    assert "FAILED" in text and "| lora-r8" in text
    got = {t["target"]: t for t in targets("speed", res)}
    assert got["usaf tokens/s >= 1.5x lora-r8"]["met"] is True
    assert got["usaf peak RSS <= 1.15x inference (same 4-bit base)"]["ratio"] == 1.1


def test_baselines_run_without_usaf_process_tuning():
    import subprocess
    import sys

    from usaf.bench.harness import baseline_env

    assert "USAF_NO_RUNTIME_TUNING" not in baseline_env("usaf")
    for m in ("lora-r8", "lora-r16", "full", "esft", "router", "inference-bf16", "base"):
        assert baseline_env(m)["USAF_NO_RUNTIME_TUNING"] == "1", m
    probe = "import os, usaf; print(os.environ.get('ONEDNN_PRIMITIVE_CACHE_CAPACITY'))"
    env = {k: v for k, v in baseline_env("lora-r8").items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True).stdout.strip()
    assert out == "None"  # usaf's oneDNN cap is not applied to a baseline
    env.pop("USAF_NO_RUNTIME_TUNING")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True).stdout.strip()
    assert out == "32"


@pytest.mark.parametrize("quant", ["4bit", "none"])
def test_build_prepared_equals_prepare_of_build_model(quant):
    """The memory bench's layer-by-layer build (no bf16 copy of the model) gives the same handle as
    ``usaf.prepare(build_model(cfg))``: parameters, frozen stacks and the loss, bit for bit."""
    import torch

    import usaf
    from usaf.bench.speed import build_model, build_prepared, make_batches

    cfg = parse_extra(TINY + ["layers=2"])
    ucfg = usaf.UsafConfig(density=0.05, quant=quant, train_layers="all")
    a, b = usaf.prepare(build_model(cfg), ucfg), build_prepared(cfg, ucfg)
    pa, pb = dict(a.model.named_parameters()), dict(b.model.named_parameters())
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]) and pa[k].requires_grad == pb[k].requires_grad, k
    assert not any(p.is_meta for p in pb.values())
    for la, lb in zip(a.layers, b.layers, strict=True):
        for n, st in la.experts.frozen.items():
            ta, tb = st.tensors(), lb.experts.frozen[n].tensors()
            assert ta.keys() == tb.keys() and all(torch.equal(ta[x], tb[x]) for x in ta), n
    batch = make_batches(cfg, 1)[0]
    with torch.no_grad():
        assert torch.equal(a.model(**batch).loss, b.model(**batch).loss)
