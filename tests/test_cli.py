"""The command line end to end on a tiny MoE saved with a tokenizer: train, eval, generate, inspect, errors."""

import json
import subprocess
import sys

import pytest

from usaf.cli import main, parse_args
from usaf.testing import save_tiny_checkpoint

WORDS = "the quick brown fox jumps over the lazy dog while a small cat sleeps in the warm sun".split()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_checkpoint("qwen3_moe", tmp_path_factory.mktemp("m") / "ckpt")


def _rows(kind, n=48):
    rows = []
    for i in range(n):
        a, b = WORDS[i % len(WORDS)], WORDS[(3 * i + 1) % len(WORDS)]
        if kind == "text":
            rows.append({"text": f"{a} {b} and {b} {a}. " * 3})
        elif kind == "prompt_completion":
            rows.append({"prompt": f"Say {a} then {b}:", "completion": f" {a} {b}."})
        elif kind == "messages":
            rows.append({"messages": [{"role": "user", "content": f"Say {a} then {b}"},
                                      {"role": "assistant", "content": f"{a} {b}"}]})
        else:
            ids = [10 + (i * 7 + j * 3) % 40 for j in range(20)]
            rows.append({"input_ids": ids, "labels": ids})
    return rows


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("kind", ["text", "prompt_completion", "messages", "input_ids"])
def test_train_then_eval_each_data_kind(ckpt, tmp_path, kind, capsys):
    data = _write(tmp_path / "train.jsonl", _rows(kind))
    evald = _write(tmp_path / "eval.jsonl", _rows(kind, 8))
    out = tmp_path / "run"
    rc = main(["train", "--model", str(ckpt), "--data", str(data), "--eval-data", str(evald), "--out", str(out),
               "--steps", "12", "--seq-len", "48", "--batch-size", "4", "--lr", "0.02", "--density", "0.05",
               "--reselect-every", "6", "--save-every", "5", "--quiet"])
    assert rc == 0
    for f in ("config.yaml", "log.jsonl", "delta.safetensors", "metrics.json", "loss.png"):
        assert (out / f).exists(), f
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("loss_first", "loss_last10", "eval_ppl_before", "eval_ppl_after", "tokens_per_s", "peak_rss_mb",
                "active_elements", "selection_s", "reselection_s"):
        assert key in metrics, key
    phases = {p["phase"]: p for p in metrics["phases"]}  # each phase timed, its memory sampled
    assert list(phases) == ["setup", "load", "prefix", "eval_before", "select", "steps", "eval_after"]
    assert all(p["seconds"] >= 0 and 0 < p["peak_anon_mb"] <= p["peak_rss_mb"] for p in phases.values())
    assert max(p["peak_rss_mb"] for p in phases.values()) <= metrics["peak_rss_mb"] + 1
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 13))
    assert metrics["loss_first"] == log[0]["loss"]
    assert metrics["loss_last10"] == pytest.approx(sum(r["loss"] for r in log[-10:]) / 10)
    assert all(r["active"] == metrics["active_elements"] for r in log)
    assert metrics["loss_last10"] < metrics["loss_first"]
    assert metrics["eval_ppl_after"] < metrics["eval_ppl_before"]
    assert any("reselect" in r for r in log)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000010", "step-0000012"]
    capsys.readouterr()  # usaf eval --delta takes the run's --seq-len, --batch-size and --dtype by default
    assert main(["eval", "--model", str(ckpt), "--delta", str(out / "delta.safetensors"), "--data", str(evald),
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(res) == {"ppl", "loss", "tokens"}
    assert res["tokens"] == metrics["eval_tokens"]
    assert res["ppl"] == pytest.approx(metrics["eval_ppl_after"], rel=1e-6)


@pytest.mark.parametrize("kind", ["text", "prompt_completion", "messages", "input_ids"])
def test_eval_held_out_reproduces_the_runs_eval(ckpt, tmp_path, kind, capsys):
    """Without --eval-data a run evaluates a held-out split of --data; `usaf eval --held-out` takes the same."""
    data = _write(tmp_path / "train.jsonl", _rows(kind, 24))
    out = tmp_path / "run"
    assert main(["train", "--model", str(ckpt), "--data", str(data), "--out", str(out), "--steps", "2",
                 "--seq-len", "24", "--batch-size", "3", "--lr", "0.02", "--density", "0.05", "--seed", "5",
                 "--calib-batches", "1", "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    capsys.readouterr()
    assert main(["eval", "--model", str(ckpt), "--delta", str(out / "delta.safetensors"), "--data", str(data),
                 "--held-out", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["tokens"] == metrics["eval_tokens"]
    assert res["ppl"] == pytest.approx(metrics["eval_ppl_after"], rel=1e-4)


def test_generate_and_inspect(ckpt, capsys):
    assert main(["generate", "--model", str(ckpt), "--prompt", "Say the fox", "--max-new-tokens", "5"]) == 0
    assert main(["inspect", "--model", str(ckpt), "--json"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out[out.index("{"):])
    assert report["family"] == "qwen3_moe" and report["expert_shapes"]["gate_up_proj"][0] == 8
    assert report["active_budget_all_layers"] == round(0.005 * report["expert_params"])


def test_config_file_and_flag_override(ckpt, tmp_path):
    data = _write(tmp_path / "d.jsonl", _rows("text"))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {ckpt}\ndata: {data}\nsteps: 2\nseq_len: 32\ndensity: 0.01\nquiet: true\n")
    out = tmp_path / "o"
    assert main(["train", "--config", str(cfg), "--out", str(out), "--density", "0.02"]) == 0
    import yaml

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["steps"] == 2 and saved["usaf"]["density"] == 0.02 and saved["seq_len"] == 32


@pytest.mark.parametrize("case", ["bad_json", "density", "layers", "no_model", "existing_out"])
def test_user_errors_exit_2_one_line(ckpt, tmp_path, case, capsys):
    data = _write(tmp_path / "d.jsonl", _rows("text"))
    args = ["train", "--model", str(ckpt), "--data", str(data), "--out", str(tmp_path / "o"), "--steps", "1",
            "--quiet", "--seq-len", "32"]
    if case == "bad_json":
        (tmp_path / "d.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    elif case == "density":
        args += ["--density", "2"]
    elif case == "layers":
        args += ["--train-layers", "top:7"]
    elif case == "no_model":
        args[2] = str(tmp_path / "nope")
    elif case == "existing_out":
        (tmp_path / "o").mkdir()
        (tmp_path / "o" / "config.yaml").write_text("model: other\n")
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("usaf: error: ")
    if case == "bad_json":
        assert "line 2" in err[0]
    if case == "existing_out":
        assert (tmp_path / "o" / "config.yaml").read_text() == "model: other\n"


def test_subprocess_exit_code_and_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "usaf.cli", "inspect", "--model", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stderr.strip().startswith("usaf: error:")


@pytest.mark.parametrize("argv", [
    ["bench", "quality", "task=chat", "steps=100", "--quick", "--json", "q.json"],
    ["bench", "quality", "--quick", "task=chat", "steps=100", "--json", "q.json"],
    ["bench", "quality", "--quick", "task=chat", "--json", "q.json", "steps=100"],
    ["bench", "--json", "q.json", "quality", "task=chat", "--quick", "steps=100"],
])
def test_bench_settings_and_flags_mix_in_any_order(argv):
    args = parse_args(argv)
    assert (args.name, args.quick, args.json, args.extra) == ("quality", True, "q.json", ["task=chat", "steps=100"])


def test_unknown_words_are_still_refused(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["bench", "quality", "--quick", "--nope"])
    assert e.value.code == 2 and "unrecognized arguments: --nope" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["eval", "--model", "m", "--data", "d", "task=chat"])
