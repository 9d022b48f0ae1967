"""The run's story: router_load.json against stock transformers' routing, the budget counts of report.html
against a dense count of the delta, TensorBoard event files against log.jsonl, and the page in a real
headless browser (Chromium; skipped where it is not installed)."""

import json
import re
import shutil
import subprocess

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

import usaf
from usaf.cli import main
from usaf.data.batches import collate
from usaf.data.load import load_examples
from usaf.testing import make_tiny_model, save_tiny_checkpoint
from usaf.train.report import delta_budget, read_run

WORDS = "the quick brown fox jumps over the lazy dog while a small cat sleeps in the warm sun".split()
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    ckpt = save_tiny_checkpoint("qwen3_moe", root / "ckpt")
    rows = [{"text": f"{WORDS[i % 16]} {WORDS[(3 * i + 1) % 16]} and more words. " * 3} for i in range(40)]
    (root / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ev = [{"text": f"{WORDS[(5 * i) % 16]} runs {WORDS[i % 16]}." * (1 + i % 3)} for i in range(6)]
    (root / "e.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ev))
    out = root / "run"
    assert main(["train", "--model", str(ckpt), "--data", str(root / "d.jsonl"), "--eval-data", str(root / "e.jsonl"),
                 "--out", str(out), "--steps", "8", "--seq-len", "48", "--batch-size", "4", "--lr", "0.02",
                 "--density", "0.05", "--reselect-every", "3", "--eval-every", "4", "--quant", "none",
                 "--dtype", "fp32", "--report-to", "tensorboard", "--quiet"]) == 0
    return ckpt, root / "e.jsonl", out


def test_router_load_before_training_is_stock_routing(run):
    ckpt, evald, out = run
    load = json.loads((out / "router_load.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)  # zero deltas, --quant none: the base
    tok = AutoTokenizer.from_pretrained(ckpt)
    examples, _ = load_examples(str(evald), tok, 48)
    k, e = model.config.num_experts_per_tok, model.config.num_experts
    want = {str(i): torch.zeros(e, dtype=torch.int64) for i in range(model.config.num_hidden_layers)}
    for a in range(0, len(examples), 4):  # usaf's eval batches: the eval set in order, --batch-size 4
        b = collate(examples[a : a + 4], tok.pad_token_id)
        with torch.no_grad():
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                           output_router_logits=True).router_logits
        real = b["attention_mask"].reshape(-1).bool()
        for i, lg in enumerate(logits):
            want[str(i)] += torch.bincount(lg[real].topk(k, dim=-1).indices.reshape(-1), minlength=e)
    assert load["before"] == {i: w.tolist() for i, w in want.items()}
    n_tokens = sum(len(ex) for ex in examples)  # every real (non-padding) token, once per chosen expert
    assert all(sum(c) == k * n_tokens for c in load["after"].values())
    assert load["after"] != load["before"]  # the routers trained


def _dense_counts(shape, idx, layout):
    e, r, c = shape
    mask = torch.zeros(e * r * c, dtype=torch.bool)
    mask[idx.long()] = True
    mask = mask.view(e, r, c)
    if layout == "rows":  # [E, 2I, H]
        return mask.sum((1, 2)), int(mask[:, : r // 2].sum()), int(mask[:, r // 2 :].sum())
    if layout == "cols":  # [E, H, 2I]
        return mask.sum((1, 2)), int(mask[:, :, : c // 2].sum()), int(mask[:, :, c // 2 :].sum())
    return mask.sum((1, 2)), int(mask[:, :, 0::2].sum()), int(mask[:, :, 1::2].sum())  # interleaved


@pytest.mark.parametrize("family,layout", [("qwen3_moe", "rows"), ("llama4", "cols"), ("gpt_oss", "interleaved")])
def test_budget_per_layer_expert_and_matrix_matches_a_dense_count(tmp_path, family, layout):
    handle = usaf.prepare(make_tiny_model(family), usaf.UsafConfig(quant="none"))
    gen = torch.Generator().manual_seed(0)
    for d in handle.deltas().values():
        d.set(torch.randperm(d.numel, generator=gen)[: d.numel // 7])
    handle.save_delta(tmp_path / "delta.safetensors")
    b = delta_budget(tmp_path / "delta.safetensors")
    with safe_open(str(tmp_path / "delta.safetensors"), "pt") as f:
        shapes = json.loads(f.metadata()["shapes"])
        for li, layer in enumerate(b["layers"]):
            per_expert, gate, up, down = 0, 0, 0, 0
            for key, shape in shapes.items():
                if f"layers.{layer}." not in key or key not in handle.deltas():  # the expert stacks only
                    continue
                counts, g, u = _dense_counts(shape, f.get_tensor(f"{key}.indices"), layout)
                per_expert = per_expert + counts
                if key.endswith("gate_up_proj"):
                    gate, up = g, u
                else:
                    down = int(counts.sum())
            assert b["active"][li] == per_expert.tolist()
            assert (b["matrix"]["gate"][li], b["matrix"]["up"][li], b["matrix"]["down"][li]) == (gate, up, down)


def test_budget_counts_attention_deltas_apart_from_the_experts(tmp_path):
    handle = usaf.prepare(make_tiny_model("qwen3_moe"), usaf.UsafConfig(quant="none", attention_density=0.05))
    gen = torch.Generator().manual_seed(0)
    for d in handle.deltas().values():
        d.set(torch.randperm(d.numel, generator=gen)[: d.numel // 7])
    for d in handle.attention_deltas().values():
        d.set(torch.randperm(d.numel, generator=gen)[: d.numel // 11])
    handle.save_delta(tmp_path / "delta.safetensors")
    b = delta_budget(tmp_path / "delta.safetensors")
    experts = sum(len(d) for d in handle.deltas().values())
    assert b["attention"] == sum(len(d) for d in handle.attention_deltas().values()) > 0
    assert sum(map(sum, b["active"])) == experts
    assert sum(sum(b["matrix"][n]) for n in ("gate", "up", "down")) == experts


def test_tensorboard_events_hold_the_scalars_of_log_jsonl(run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, _, out = run
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    for key in ("loss", "lr", "tokens_per_s", "active", "peak_mem_mb", "eval_ppl", "reselect/grown"):
        want = [(r["step"], r[key] if "/" not in key else r[key.split("/")[0]][key.split("/")[1]]) for r in log
                if key.split("/")[0] in r]
        got = [(e.step, e.value) for e in acc.Scalars(key)]
        assert [s for s, _ in got] == [s for s, _ in want], key
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6), key  # stored as float32


def test_report_reads_what_the_run_wrote(run):
    _, _, out = run
    data = read_run(out)
    html = (out / "report.html").read_text()
    assert data["metrics"]["eval_ppl_before"] > 0 and len(data["log"]) == 8
    assert sum(map(sum, data["budget"]["active"])) == data["metrics"]["active_elements"]
    assert [r["step"] for r in data["log"] if "reselect" in r] == [3, 6]
    # self-contained: nothing fetched (no script, no external or relative resource)
    assert not re.search(r"<script|<link|@import|url\(|(src|href)\s*=", html, re.I)


def test_report_on_a_directory_without_a_run_is_exit_2(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("x")
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"usaf: error: {tmp_path} holds no usaf run (no log.jsonl or delta.safetensors)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert main(["report", str(tmp_path / "missing")]) == 2


def _chromium(url, *flags):
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--enable-logging=stderr", "--v=0", *flags, url], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium_without_console_errors(run, tmp_path):
    _, _, out = run
    # the console check catches errors: a page that throws is seen
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>throw new Error('boom')</script></body></html>")
    assert "boom" in "".join(ln for ln in _chromium(bad.as_uri(), "--dump-dom").stderr.splitlines() if ":CONSOLE" in ln)

    dom = _chromium((out / "report.html").as_uri(), "--dump-dom")
    assert not [ln for ln in dom.stderr.splitlines() if ":CONSOLE" in ln]
    assert dom.stdout.count("<svg") >= 10 and "Router load per expert" in dom.stdout
    shot = tmp_path / "report.png"  # kept with the test output (pytest's tmp dir)
    p = _chromium((out / "report.html").as_uri(), f"--screenshot={shot}", "--window-size=1280,2400")
    assert shot.is_file(), p.stderr[-2000:]
    img = Image.open(shot).convert("RGB")
    assert img.size == (1280, 2400)
    assert len(img.resize((320, 600)).getcolors(maxcolors=1 << 20)) > 50  # charts and heatmaps, not a blank page
