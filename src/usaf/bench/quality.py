"""``usaf bench quality``: does usaf learn as well as LoRA, full fine-tuning and ESFT, and forget less?

Same model, same data, same token budget, same seed, one process per method. The model is SmolLM2-135M-
Instruct upcycled to an 8-expert top-2 Mixtral-layout MoE (:mod:`usaf.upcycle`; bf16 base for every
method). The data are real text found offline (:mod:`usaf.corpora`): Python's reST documentation (the
domain) and English quotations from ``fortunes`` (the general corpus, for forgetting).

Tasks:

- ``docs``: causal LM on packed windows of the domain's training files; in-domain perplexity on held-out
  *files*; out-of-domain perplexity on the quotations.
- ``chat``: instruction rows built from the library reference ("In Python, what does ``f(x)`` do?" ->
  the documentation's first paragraph), loss on the assistant turn only; in-domain perplexity is on the
  answers of held-out reference *files*; a few held-out questions are answered greedily before and after.

Methods (all train the same decoder layers, ``layers=``; :mod:`usaf.bench.methods`): ``usaf``,
``router``, ``lora``, ``full`` and ``esft`` with options (``usaf/density=0.01/lr=1e-3``, ``lora/r=4``), the
historical names (``usaf-norigl``, ``lora-r8``, ``lora-r16``, ``lora-r16-experts``), and grids with ``|``
(``usaf/density=0.0025|0.005|0.01``). Every method's trainable count and layers are asserted against its
scope, computed from the model's shapes (a worker fails otherwise).

Beds (``bed=``, :mod:`usaf.bench.beds`): ``upcycle`` (identical experts) and ``moefy`` (experts that differ,
a fitted router: routing matters).

Reported per method: held-out in-domain and out-of-domain perplexity (the ``base`` process measures the
before values once, with the same code), tokens/s of the training steps, peak RSS (whole process and the
training-steps phase), trainable parameters, and the bytes of what must be shipped (the file the method
writes: usaf delta, PEFT adapter, or the changed tensors in bf16 for ``full`` / ``router`` / ``esft``).
"""

from __future__ import annotations

import datetime
import itertools
import json
import math
import os
import random
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from ..data.batches import collate
from ..data.load import load_examples
from ..load.hf import load_tokenizer
from ..train.evaluate import evaluate
from ..train.generate import generate
from ..units import DTYPES, auto_dtype_name
from .beds import BEDS, bed_model
from .corpora import CorpusError, write_task_files
from .harness import (
    baseline_env,
    collect,
    machine_info,
    markdown_table,
    peak_rss_mb,
    print_result,
    reset_peak_rss,
    rss_mb,
    spawn,
)
from .methods import DEFAULT_METHODS, parse_method, setup_method

KEYS: dict[str, tuple[type, object, str]] = {
    "task": (str, "docs", "docs | chat | both"),
    "bed": (str, "upcycle", "upcycle (identical experts) | moefy (experts that differ, routing matters) | both (--quick: both)"),
    "layers": (str, "top:8", "decoder layers every method trains: all | top:N | a-b"),
    "seq": (int, 256, "tokens per sequence"),
    "batch": (int, 4, "sequences per step"),
    "steps": (int, 60, "optimizer steps (the token budget is steps x batch x seq)"),
    "eval_seqs": (int, 32, "held-out sequences per perplexity"),
    "calib": (int, 16, "calibration batches (usaf selection, esft routing shares; usaf train's default)"),
    "reselect": (int, 15, "usaf RigL period in steps"),
    "reselect_fraction": (float, 0.3, "usaf RigL initial replaced fraction"),
    "density": (float, 0.005, "usaf density"),
    "attention_density": (float, 0.0, "usaf attention density (sparse deltas on q/k/v/o of the trained layers)"),
    "lr_attention": (float, 0.0, "learning rate of usaf's attention deltas (0 = lr_usaf)"),
    "shared_density": (float, 0.1, "usaf shared-expert density (sparse deltas, whole input columns, on the shared "
                                   "experts' linears of the trained layers)"),
    "lr_shared": (float, 1e-3, "learning rate of usaf's shared-expert deltas (0 = lr_usaf; the default of usaf train)"),
    "warmup": (float, 0.05, "warmup fraction of the steps (linear, then cosine to 10%)"),
    "lr_usaf": (float, 3e-3, "learning rate of usaf's deltas (usaf, usaf-norigl; the default of usaf train, docs/quality.md)"),
    "lr_router": (float, 1e-4, "learning rate of the routers (usaf methods and router; best of 0, 1e-4, 1e-3)"),
    "lr_lora": (float, 3e-3, "LoRA learning rate (best of 3e-4, 1e-3, 3e-3 in --quick)"),
    "lr_full": (float, 1e-4, "full fine-tuning learning rate (not tuned)"),
    "lr_esft": (float, 1e-4, "ESFT learning rate (not tuned)"),
    "generations": (int, 3, "held-out questions answered before/after (chat task)"),
    "gen_tokens": (int, 48, "new tokens per generation"),
    "methods": (str, "", "comma-separated method specs, `|` for alternatives (default: "
                         + ",".join(DEFAULT_METHODS) + "; --quick: usaf,router,lora/r=2,esft)"),
    "dtype": (str, "auto", "compute dtype of the base for base, usaf, router and LoRA (full and ESFT train in "
                           "fp32): auto (bf16 where the CPU has native bf16, else fp32) | bf16 | fp32"),
    "seed": (int, 0, "seed of data order and initialisation"),
    "threads": (int, 0, "torch threads per worker (0 = torch default)"),
    "timeout": (int, 7200, "seconds allowed per worker"),
    "model": (str, "", "an MoE checkpoint directory (default: the bed's, built and cached)"),
    "data": (str, "", "a directory of the task files (default: written from the corpora)"),
}

QUICK = {"seq": 128, "batch": 4, "steps": 10, "eval_seqs": 8, "calib": 2, "reselect": 4, "layers": "top:6",
         "generations": 2, "gen_tokens": 24, "bed": "both", "methods": "usaf,router,lora/r=2,esft"}


def parse_settings(extra: list[str] | None, quick: bool = False) -> dict:
    cfg = {k: v[1] for k, v in KEYS.items()}
    if quick:
        cfg.update(QUICK)
    for word in extra or []:
        key, sep, value = word.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in KEYS:
            raise ValueError(f"bench setting {word!r} is not key=value with a known key (known: {', '.join(KEYS)})")
        typ = KEYS[key][0]
        try:
            cfg[key] = typ(value)
        except ValueError:
            raise ValueError(f"bench setting {word!r}: {value!r} is not a {typ.__name__}") from None
    if cfg["dtype"] == "auto":  # the bench runs on the CPU; without native bf16 a bf16 base runs 10-40x slower
        cfg["dtype"] = auto_dtype_name(on_cpu=True)
    if cfg["dtype"] not in ("bf16", "fp32"):
        raise ValueError(f"dtype must be auto, bf16 or fp32, got {cfg['dtype']!r}")
    if cfg["task"] not in ("docs", "chat", "both"):
        raise ValueError(f"task must be docs, chat or both, got {cfg['task']!r}")
    for k in ("seq", "batch", "steps", "eval_seqs", "calib"):
        if int(cfg[k]) < 1:
            raise ValueError(f"{k} must be >= 1, got {cfg[k]}")
    if cfg["bed"] not in BEDS + ("both",):
        raise ValueError(f"bed must be {', '.join(BEDS)} or both, got {cfg['bed']!r}")
    chosen = expand_methods(str(cfg["methods"])) or list(DEFAULT_METHODS)
    for spec in chosen:
        parse_method(spec, cfg)  # unknown methods and options are errors before anything runs
    cfg["method_list"] = chosen
    return cfg


def expand_methods(text: str) -> list[str]:
    """``"usaf/density=0.005|0.01,lora/r=2|4"`` -> every combination of the ``|`` alternatives, in order:
    ``usaf/density=0.005``, ``usaf/density=0.01``, ``lora/r=2``, ``lora/r=4``."""
    out = []
    for spec in (x.strip() for x in text.split(",") if x.strip()):
        alternatives = []
        for part in spec.split("/"):
            key, sep, values = part.partition("=")
            alternatives.append([f"{key}={v}" for v in values.split("|")] if sep else part.split("|"))
        out += ["/".join(combo) for combo in itertools.product(*alternatives)]
    return out


# ------------------------------------------------------------------------------------------------ data
def task_files(task: str, data_dir: Path) -> dict[str, Path]:
    """The train / in-domain eval / general eval files of ``task`` in ``data_dir``."""
    pre = "domain" if task == "docs" else "chat"
    files = {"train": data_dir / f"{pre}_train.jsonl", "eval": data_dir / f"{pre}_eval.jsonl",
             "general": data_dir / "general_eval.jsonl"}
    for role, p in files.items():
        if not p.is_file():
            raise ValueError(f"bench quality: {p} ({role} data of task {task}) does not exist")
    return files


def _examples(path: Path, tok, seq: int, n: int, seed: int, cycle: bool):

    ex, _ = load_examples(path, tok, seq)
    order = list(range(len(ex)))
    random.Random(f"usaf-quality:{seed}:{path.name}").shuffle(order)
    if cycle:
        order = (order * math.ceil(n / max(1, len(order))))[:n]
    return [ex[i] for i in order[:n]]


def load_task(cfg: dict, task: str, tok, files: dict[str, Path]) -> dict:
    """Token-identical batches for every method: training, calibration and the held-out sets."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    b, seq = cfg["batch"], cfg["seq"]
    train = _examples(files["train"], tok, seq, cfg["steps"] * b, cfg["seed"], cycle=True)
    evald = _examples(files["eval"], tok, seq, cfg["eval_seqs"], cfg["seed"], cycle=False)
    general = _examples(files["general"], tok, seq, cfg["eval_seqs"], cfg["seed"], cycle=False)

    def batches(ex):
        return [collate(ex[i : i + b], pad) for i in range(0, len(ex), b)]

    out = {"train": batches(train), "eval": batches(evald), "general": batches(general)}
    out["calib"] = out["train"][: cfg["calib"]]
    out["train_tokens"] = int(sum(int(x["attention_mask"].sum()) for x in out["train"]))
    if task == "chat":
        rows = [json.loads(line) for line in files["eval"].read_text(encoding="utf-8").splitlines()[:200]]
        random.Random(cfg["seed"]).shuffle(rows)
        out["prompts"] = [(r["messages"][0]["content"], r["messages"][1]["content"])
                          for r in rows[: cfg["generations"]]]
    return out


_SETS = ("train", "eval", "general")


def save_task(data: dict, path: Path) -> None:
    """Write :func:`load_task`'s batches to ``path`` (safetensors), so that every worker of a run reads the same
    token ids instead of tokenizing the task's files again (10 MB of documentation: seconds per worker)."""
    tensors = {f"{s}.{i}.{k}": v.contiguous() for s in _SETS for i, b in enumerate(data[s]) for k, v in b.items()}
    meta = {"train_tokens": str(data["train_tokens"]), "calib": str(len(data["calib"])),
            "prompts": json.dumps(data.get("prompts")), "format": "usaf-quality-task-1"}
    save_file(tensors, str(path), metadata=meta)


def read_task(path: Path) -> dict:
    """The batches :func:`save_task` wrote, as :func:`load_task` returns them."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != "usaf-quality-task-1":
            raise ValueError(f"bench quality: {path} is not a task file of this version")
        flat = {k: f.get_tensor(k) for k in f.keys()}
    grouped: dict = {s: {} for s in _SETS}  # set -> batch number -> {field: tensor}
    for key, v in flat.items():
        s, i, name = key.split(".")
        grouped[s].setdefault(int(i), {})[name] = v
    out: dict = {s: [grouped[s][i] for i in range(len(grouped[s]))] for s in _SETS}
    out["calib"] = out["train"][: int(meta["calib"])]
    out["train_tokens"] = int(meta["train_tokens"])
    prompts = json.loads(meta["prompts"])
    if prompts is not None:
        out["prompts"] = [tuple(x) for x in prompts]
    return out


def task_data(cfg: dict, task: str, tok) -> dict:
    """The task's batches: from the run's task file when the parent wrote one, else tokenized here."""
    path = cfg.get("task_data", {}).get(task)
    if path:
        return read_task(Path(path))
    return load_task(cfg, task, tok, task_files(task, Path(cfg["data_dir"])))


# ------------------------------------------------------------------------------------------------ worker
def _evaluate(model, data: dict) -> dict:

    return {"ppl_domain": round(evaluate(model, data["eval"])["ppl"], 4),
            "ppl_general": round(evaluate(model, data["general"])["ppl"], 4)}


def _generations(model, tok, data: dict, cfg: dict) -> list[str]:

    return [generate(model, tok, q, max_new_tokens=cfg["gen_tokens"]) for q, _ in data.get("prompts", [])]


def run_worker(method: str, task: str, cfg: dict) -> dict:
    """One method (or ``base``: evaluation only) on one task, in this process."""
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    torch.manual_seed(cfg["seed"])
    model_dir = cfg["model_dir"]
    tok = load_tokenizer(model_dir)
    data = task_data(cfg, task, tok)
    rec: dict = {"method": method, "task": task, "bed": cfg.get("bed_name"), "train_tokens": data["train_tokens"]}
    if method == "base":
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[cfg.get("dtype", "bf16")])
        rec["dtype"] = cfg.get("dtype", "bf16")
        rec["loaded_rss_mb"] = round(rss_mb(), 1)
        t0 = time.perf_counter()
        rec.update(_evaluate(model, data))
        n = sum(int(b["attention_mask"].sum()) for b in data["eval"] + data["general"])
        rec["eval_tokens_per_s"] = round(n / (time.perf_counter() - t0), 1)
        rec["generations"] = _generations(model, tok, data, cfg)
        rec["references"] = [a for _, a in data.get("prompts", [])]
        rec["questions"] = [q for q, _ in data.get("prompts", [])]
        rec["peak_rss_mb"] = round(peak_rss_mb(), 1)
        return rec
    t0 = time.perf_counter()
    st = setup_method(parse_method(method, cfg), cfg, model_dir, data)
    rec["setup_s"] = round(time.perf_counter() - t0, 2)
    setup_peak = peak_rss_mb()
    phase_ok = reset_peak_rss()
    times, losses = [], []
    t_all = time.perf_counter()
    for b in data["train"]:
        t = time.perf_counter()
        losses.append(st.step(b))
        times.append(time.perf_counter() - t)
    train_s = time.perf_counter() - t_all
    steps_peak = peak_rss_mb()
    rec.update(_evaluate(st.model, data))
    rec["generations"] = _generations(st.model, tok, data, cfg)
    rec.update({
        "trainable_params": int(st.trainable),
        "shipped_bytes": int(st.ship()),
        "tokens_per_s": round(data["train_tokens"] / train_s, 1),
        "step_s_median": round(statistics.median(times), 3),
        "train_s": round(train_s, 1),
        "loss_first": round(losses[0], 4), "loss_last": round(statistics.mean(losses[-max(1, len(losses) // 10):]), 4),
        "finite": all(math.isfinite(x) for x in losses),
        "setup_peak_rss_mb": round(setup_peak, 1),
        "steps_peak_rss_mb": round(steps_peak, 1) if phase_ok else None,
        "peak_rss_mb": round(max(setup_peak, peak_rss_mb()), 1),
    })
    if phase_ok and "loaded_rss_mb" in st.info:  # what training adds over the loaded model
        rec["train_added_mb"] = round(steps_peak - st.info["loaded_rss_mb"], 1)
    rec.update(st.info)
    return rec


def _spawn(method: str, task: str, cfg: dict):
    return spawn("usaf.bench.quality", [method, task, json.dumps(cfg)], baseline_env(method.split("/")[0]))


# ------------------------------------------------------------------------------------------------ report
def _mb(n) -> str:
    return f"{n / 1e6:.2f}"


def table(base: dict, results: list[dict]) -> str:
    head = ("method", "in-domain ppl", "general ppl", "tokens/s", "peak RSS MB", "train loop MB",
            "added MB", "trainable", "shipped MB")
    rows = [("base (before)", f"{base['ppl_domain']:.3f}", f"{base['ppl_general']:.3f}", "-",
             f"{base['peak_rss_mb']:.0f}", "-", "-", "-", "-")] if base and "error" not in base else []
    for r in results:
        if "error" in r:
            rows.append((r["method"], "FAILED", r["error"][:70], "", "", "", "", "", ""))
            continue
        sp, add = r.get("steps_peak_rss_mb"), r.get("train_added_mb")
        rows.append((r["method"], f"{r['ppl_domain']:.3f}", f"{r['ppl_general']:.3f}", f"{r['tokens_per_s']:.0f}",
                     f"{r['peak_rss_mb']:.0f}", "-" if sp is None else f"{sp:.0f}",
                     "-" if add is None else f"{add:.0f}", f"{r['trainable_params']:,}", _mb(r["shipped_bytes"])))
    return markdown_table(head, rows)


def targets(base: dict, results: list[dict]) -> list[dict]:
    """usaf (the first ``usaf...`` row) against LoRA r=16 (``lora-r16`` or ``lora/r=16``), when both ran."""
    ok = [r for r in results if "error" not in r]
    u = next((r for r in ok if r["method"].split("/")[0] in ("usaf",)), None)
    lo = next((r for r in ok if r["method"] in ("lora-r16", "lora/r=16")), None)
    if u is None or lo is None:
        return []
    out = [{"target": "usaf in-domain ppl <= lora r16", "usaf": u["ppl_domain"], "lora": lo["ppl_domain"],
            "met": u["ppl_domain"] <= lo["ppl_domain"]}]
    if base and "error" not in base:
        fu, fl = u["ppl_general"] - base["ppl_general"], lo["ppl_general"] - base["ppl_general"]
        out.append({"target": "usaf forgetting (general ppl increase) <= lora r16", "usaf": round(fu, 4),
                    "lora": round(fl, 4), "met": fu <= fl})
    if u.get("train_added_mb") is not None and lo.get("train_added_mb"):
        ratio = u["train_added_mb"] / lo["train_added_mb"]
        out.append({"target": "memory training adds <= 15% of lora r16's", "usaf": u["train_added_mb"],
                    "lora": lo["train_added_mb"], "ratio": round(ratio, 3), "met": ratio <= 0.15})
    return out


def ensure_inputs(cfg: dict, work: Path) -> None:
    """Fill ``data_dir`` (write the task files when not given) and check ``model`` when given."""
    if cfg["data"]:
        cfg["data_dir"] = str(Path(cfg["data"]).resolve())
    else:
        cfg["data_dir"] = str(work / "data")
        write_task_files(work / "data", seed=cfg["seed"])
    if cfg["model"] and not (Path(cfg["model"]) / "config.json").is_file():
        raise ValueError(f"bench quality: model={cfg['model']} is not a checkpoint directory (no config.json)")


def run_quality(json_path: str | None = None, quick: bool = False, extra: list[str] | None = None) -> int:
    cfg = parse_settings(extra, quick)
    words = ["quality"] + [shlex.quote(w) for w in extra or []] + (["--quick"] if quick else [])
    command = "usaf bench " + " ".join(words + (["--json", shlex.quote(json_path)] if json_path else []))
    machine = machine_info()
    doc = {"bench": "quality", "command": command, "machine": machine,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "settings": {k: v for k, v in cfg.items() if k != "method_list"}, "tasks": {}, "beds": {}}
    failed = False
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="usaf-quality-") as work:
        try:
            ensure_inputs(cfg, Path(work))
        except CorpusError as e:
            raise ValueError(f"bench quality: {e}") from None
        beds = list(BEDS) if cfg["bed"] == "both" else [cfg["bed"]]
        tasks = ["docs", "chat"] if cfg["task"] == "both" else [cfg["task"]]
        print(f"{command}\nlayers {cfg['layers']}; {cfg['steps']} steps x batch {cfg['batch']} x seq {cfg['seq']}\n"
              f"{machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}")
        for bed in beds:
            run = dict(cfg, bed_name=bed, model_dir=str(Path(cfg["model"]).resolve() if cfg["model"] else bed_model(bed)))
            tok = load_tokenizer(run["model_dir"])  # tokenized once per bed and task; every worker reads the file
            run["task_data"] = {}
            for task in tasks:
                path = Path(work) / f"{bed}_{task}.safetensors"
                save_task(load_task(run, task, tok, task_files(task, Path(run["data_dir"]))), path)
                run["task_data"][task] = str(path)
            for task in tasks:
                print(f"\nbed {bed}, task {task}:")
                result, bad = _run_task(run, task)
                failed |= bad
                doc["beds"].setdefault(bed, {})[task] = result
        if len(beds) == 1:  # the layout of single-bed runs, as before
            doc["tasks"] = doc["beds"][beds[0]]
        doc["wall_s"] = round(time.perf_counter() - t0, 1)
    if json_path:
        Path(json_path).write_text(json.dumps(doc, indent=2) + "\n")
    return 1 if failed else 0


def _run_task(cfg: dict, task: str) -> tuple[dict, bool]:
    recs, failed = [], False
    for m in ["base"] + cfg["method_list"]:
        rec = collect(m, _spawn(m, task, cfg), int(cfg["timeout"]))
        recs.append(rec)
        if "error" in rec:
            failed = True
            print(f"  {m}: FAILED ({rec['error']})")
        elif m == "base":
            print(f"  base: in-domain ppl {rec['ppl_domain']:.3f}, general ppl {rec['ppl_general']:.3f}")
        else:
            print(f"  {m}: in-domain ppl {rec['ppl_domain']:.3f}, general {rec['ppl_general']:.3f}, "
                  f"{rec['tokens_per_s']:.0f} tokens/s, peak RSS {rec['peak_rss_mb']:.0f} MB", flush=True)
    base, results = recs[0], recs[1:]
    print()
    print(table(base, results))
    tg = targets(base, results)
    for t in tg:
        print(f"{t['target']}: usaf {t['usaf']} vs lora {t['lora']}  {'MET' if t['met'] else 'NOT MET'}")
    if task == "chat" and "error" not in base:
        for j, q in enumerate(base.get("questions", [])):
            print(f"\nQ: {q}\n  reference: {base['references'][j][:200]}\n  base: {base['generations'][j]}")
            for r in results:
                if "error" not in r:
                    print(f"  {r['method']}: {r['generations'][j]}")
    return {"base": base, "results": results, "targets": tg}, failed


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if len(sys.argv) == 5 and sys.argv[1] == "_worker":
        print_result(run_worker(sys.argv[2], sys.argv[3], json.loads(sys.argv[4])))
