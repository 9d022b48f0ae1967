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

Methods (all train the same decoder layers, ``layers=``):

- ``usaf``: ``prepare`` (bf16 base, ``density``), ``select`` on ``calib`` batches, AdamW on the compact
  deltas + fp32 router masters, RigL every ``reselect`` steps, usaf's chunked LM-head loss (the other
  methods compute the same loss from full logits, as transformers does);
- ``usaf-norigl``: the same without reselection;
- ``router``: only the routers (usaf's fp32 router masters, no deltas);
- ``lora-r8`` / ``lora-r16``: PEFT LoRA (alpha = 2r) on q/k/v/o and on the fused expert stacks via
  ``target_parameters`` (fp32 adapters on the bf16 base); ``lora-r16-experts`` (ablation, not in the
  default list): the expert stacks only, the same parameters usaf may touch;
- ``full``: every expert weight and router of the trained layers, fp32 weights and AdamW (bf16 weights
  would round most updates away at a fine-tuning learning rate);
- ``esft``: ESFT-style: whole experts with the highest routing share on the training data (measured on the
  calibration batches), taken in that order while they fit usaf's parameter budget (at least one), router
  frozen, fp32, AdamW without weight decay; the other experts' gradients are masked to zero.

Reported per method: held-out in-domain and out-of-domain perplexity (the ``base`` process measures the
before values once, with the same code), tokens/s of the training steps, peak RSS (whole process and the
training-steps phase), trainable parameters, and the bytes of what must be shipped (the file the method
writes: usaf delta, PEFT adapter, or the changed tensors in bf16 for ``full`` / ``router`` / ``esft``).
"""

from __future__ import annotations

import datetime
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
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import usaf

from ..data.batches import collate
from ..data.load import load_examples
from ..engine.families import family_for, fused_experts, get_path
from ..engine.loss import lm_loss, token_weighted_loss
from ..engine.model import decoder_layers, parse_layers
from ..engine.optim import lr_lambda
from ..engine.rigl import drop_fraction, reselect
from ..load.hf import load_tokenizer
from ..train.evaluate import evaluate
from ..train.generate import generate
from .corpora import CorpusError, write_task_files
from .harness import (
    baseline_env,
    collect,
    machine_info,
    markdown_table,
    peak_rss_mb,
    print_result,
    reset_peak_rss,
    spawn,
)
from .upcycle import prepare_upcycled_smollm2

METHODS = ("usaf", "usaf-norigl", "router", "lora-r8", "lora-r16", "full", "esft")
EXTRA_METHODS = ("lora-r16-experts",)  # ablation: LoRA on the expert stacks only (no attention), like usaf

KEYS: dict[str, tuple[type, object, str]] = {
    "task": (str, "docs", "docs | chat | both"),
    "layers": (str, "top:8", "decoder layers every method trains: all | top:N | a-b"),
    "seq": (int, 256, "tokens per sequence"),
    "batch": (int, 4, "sequences per step"),
    "steps": (int, 60, "optimizer steps (the token budget is steps x batch x seq)"),
    "eval_seqs": (int, 32, "held-out sequences per perplexity"),
    "calib": (int, 4, "calibration batches (usaf selection, esft routing shares)"),
    "reselect": (int, 15, "usaf RigL period in steps"),
    "reselect_fraction": (float, 0.3, "usaf RigL initial replaced fraction"),
    "density": (float, 0.005, "usaf density"),
    "warmup": (float, 0.05, "warmup fraction of the steps (linear, then cosine to 10%)"),
    "lr_usaf": (float, 3e-3, "learning rate of usaf's deltas (usaf, usaf-norigl; best of 3e-4..3e-2 in --quick)"),
    "lr_router": (float, 1e-4, "learning rate of the routers (usaf methods and router)"),
    "lr_lora": (float, 3e-3, "LoRA learning rate (best of 3e-4, 1e-3, 3e-3 in --quick)"),
    "lr_full": (float, 1e-4, "full fine-tuning learning rate (not tuned)"),
    "lr_esft": (float, 1e-4, "ESFT learning rate (not tuned)"),
    "generations": (int, 3, "held-out questions answered before/after (chat task)"),
    "gen_tokens": (int, 48, "new tokens per generation"),
    "methods": (str, "", "comma-separated subset of methods (default: all)"),
    "seed": (int, 0, "seed of data order and initialisation"),
    "threads": (int, 0, "torch threads per worker (0 = torch default)"),
    "timeout": (int, 7200, "seconds allowed per worker"),
    "model": (str, "", "an MoE checkpoint directory (default: the upcycled SmolLM2, built and cached)"),
    "data": (str, "", "a directory of the task files (default: written from the corpora)"),
}

QUICK = {"seq": 128, "batch": 4, "steps": 10, "eval_seqs": 8, "calib": 2, "reselect": 4, "layers": "top:6",
         "generations": 2, "gen_tokens": 24}


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
    if cfg["task"] not in ("docs", "chat", "both"):
        raise ValueError(f"task must be docs, chat or both, got {cfg['task']!r}")
    for k in ("seq", "batch", "steps", "eval_seqs", "calib"):
        if int(cfg[k]) < 1:
            raise ValueError(f"{k} must be >= 1, got {cfg[k]}")
    chosen = [m.strip() for m in str(cfg["methods"]).split(",") if m.strip()] or list(METHODS)
    bad = [m for m in chosen if m not in METHODS + EXTRA_METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {', '.join(bad)} (choose from {', '.join(METHODS + EXTRA_METHODS)})")
    cfg["method_list"] = chosen
    return cfg


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


# ------------------------------------------------------------------------------------------------ methods
def moe_modules(model, layers: range):
    """``[(layer index, experts module name, experts module, router module)]`` of a stock model."""
    fam = family_for(model.config)
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for i, layer in enumerate(decoder_layers(model)):
        ex = fused_experts(layer, fam)
        if ex is None or i not in layers:
            continue
        out.append((i, names[id(ex)], ex, get_path(get_path(layer, fam.block), fam.router)))
    return out


def routing_shares(model, mods, batches) -> dict[tuple[int, int], float]:
    """Share of routed (token, slot) assignments each expert receives on ``batches`` (ESFT's criterion)."""
    counts: dict[int, torch.Tensor] = {}
    hooks = []
    for i, _, ex, _router in mods:
        def hook(mod, args, kwargs, i=i):
            idx = args[1] if len(args) > 1 else kwargs["top_k_index"]
            c = torch.bincount(idx.reshape(-1), minlength=mod.gate_up_proj.shape[0]).float()
            counts[i] = counts.get(i, 0) + c

        hooks.append(ex.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            for b in batches:
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    finally:
        for h in hooks:
            h.remove()
    return {(i, e): float(c[e] / c.sum()) for i, c in counts.items() for e in range(c.numel())}


def _file_bytes(tensors: dict) -> int:

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "x.safetensors"
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(p))
        return p.stat().st_size


def setup_method(method: str, cfg: dict, model_dir: str, data: dict):
    """Load the model for ``method``; returns (model, params_for_schedule, step(batch)->loss, info, ship())."""


    fp32 = method in ("full", "esft")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32 if fp32 else torch.bfloat16)
    model.config.use_cache = False
    layers = parse_layers(cfg["layers"], len(decoder_layers(model)))
    info: dict = {"dtype": "fp32" if fp32 else "bf16"}
    total = cfg["steps"]
    sched = lr_lambda(int(cfg["warmup"] * total), total)

    def loss_of(m, b):
        logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        s, n = token_weighted_loss(logits, b["labels"])
        return s / n

    if method in ("usaf", "usaf-norigl", "router"):

        def loss_of(m, b):  # usaf's own training loss: chunked LM head, the same value
            s, n = lm_loss(m, b, "cpu")
            return s / n.clamp(min=1)

        spec = f"{layers.start}-{layers.stop - 1}"
        handle = usaf.prepare(model, usaf.UsafConfig(density=cfg["density"], quant="none", train_layers=spec))
        if method != "router":  # router only: no selection, so no delta is active
            t0 = time.perf_counter()
            rep = usaf.select(handle, data["calib"], loss_fn=loss_of)
            info["selection_s"] = round(time.perf_counter() - t0, 2)
            info["active"] = rep["active"]
        opt = usaf.UsafOptimizer(handle, lr=cfg["lr_usaf"], router_lr=cfg["lr_router"])
        base_lrs = [g["lr"] for g in opt.param_groups]
        state = {"step": 0, "reselect_s": 0.0}

        def step(b):
            k = state["step"]
            for g, lr in zip(opt.param_groups, base_lrs):
                g["lr"] = lr * sched(k)
            loss = loss_of(model, b)
            loss.backward()
            opt.step()
            opt.zero_grad()
            state["step"] = k + 1
            if method == "usaf" and cfg["reselect"] and state["step"] % cfg["reselect"] == 0 and state["step"] < total:
                r = reselect(handle, opt, [b], drop_fraction(state["step"], total, cfg["reselect_fraction"]),
                             loss_fn=loss_of, n_batches=1)
                state["reselect_s"] += r["seconds"]
            return float(loss.detach())

        trainable = sum(p.numel() for p in handle.trainable_parameters()) if method != "router" else \
            sum(p.numel() for p in handle.router_parameters().values())

        def ship() -> int:
            info["reselection_s"] = round(state["reselect_s"], 2)
            with tempfile.TemporaryDirectory() as d:
                p = Path(d) / "delta.safetensors"
                handle.save_delta(p)
                return p.stat().st_size

        return model, trainable, step, info, ship

    mods = moe_modules(model, layers)
    if method.startswith("lora-r"):
        from peft import LoraConfig, get_peft_model

        r = int(method.removeprefix("lora-r").removesuffix("-experts"))
        blk = mods[0][1].split(f".{mods[0][0]}.", 1)[1]  # the experts module below a layer, e.g. "mlp.experts"
        lcfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                          target_modules=[] if method.endswith("-experts") else ["q_proj", "k_proj", "v_proj", "o_proj"],
                          target_parameters=[f"{blk}.gate_up_proj", f"{blk}.down_proj"],
                          layers_to_transform=None if len(layers) == len(decoder_layers(model)) else list(layers))
        model = get_peft_model(model, lcfg)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg["lr_lora"], weight_decay=0.0)

        def ship() -> int:
            with tempfile.TemporaryDirectory() as d:
                model.save_pretrained(d)
                return sum(f.stat().st_size for f in Path(d).glob("*.safetensors"))
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        chosen_names: dict[str, object] = {}
        if method == "full":
            for _i, name, ex, router in mods:
                for n, p in list(ex.named_parameters()) + [(f"router.{k}", v) for k, v in router.named_parameters()]:
                    p.requires_grad_(True)
                    chosen_names[f"{name}.{n}"] = p
            lr = cfg["lr_full"]
        elif method == "esft":
            shares = routing_shares(model, mods, data["calib"])
            per_expert = sum(p[0].numel() for n, p in mods[0][2].named_parameters() if p.dim() == 3)
            budget = max(per_expert, int(round(cfg["density"] * sum(p.numel() for _, _, ex, _ in mods
                                                                     for p in ex.parameters() if p.dim() == 3))))
            ranked = sorted(shares, key=lambda k: -shares[k])
            picked = ranked[: max(1, budget // per_expert)]
            info["experts"] = [f"layer {i} expert {e} ({shares[(i, e)]:.1%})" for i, e in picked]
            by_layer: dict[int, list[int]] = {}
            for i, e in picked:
                by_layer.setdefault(i, []).append(e)
            for i, name, ex, _router in mods:
                if i not in by_layer:
                    continue
                rows = torch.zeros(ex.gate_up_proj.shape[0], dtype=torch.bool)
                rows[by_layer[i]] = True
                for n, p in ex.named_parameters():
                    p.requires_grad_(True)
                    mask = rows.view(-1, *([1] * (p.dim() - 1))).to(p.dtype)
                    p.register_hook(lambda g, mask=mask: g * mask)
                    chosen_names[f"{name}.{n}"] = (p, rows)
            lr = cfg["lr_esft"]
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

        def ship() -> int:
            out = {}
            for k, v in chosen_names.items():
                if isinstance(v, tuple):
                    p, rows = v
                    out[k] = p.detach()[rows].to(torch.bfloat16)
                else:
                    out[k] = v.detach().to(torch.bfloat16)
            return _file_bytes(out)

    if method == "esft":
        trainable = sum(int(rows.sum()) * p[0].numel() for p, rows in chosen_names.values())
    else:
        trainable = sum(p.numel() for p in params)
    base_lr = opt.param_groups[0]["lr"]
    state = {"step": 0}

    def step(b):
        for g in opt.param_groups:
            g["lr"] = base_lr * sched(state["step"])
        loss = loss_of(model, b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["step"] += 1
        return float(loss.detach())

    model.train()
    return model, trainable, step, info, ship


# ------------------------------------------------------------------------------------------------ worker
def _evaluate(model, data: dict) -> dict:

    return {"ppl_domain": round(evaluate(model, data["eval"])["ppl"], 4),
            "ppl_general": round(evaluate(model, data["general"])["ppl"], 4)}


def _generations(model, tok, data: dict, cfg: dict) -> list[str]:

    return [generate(model, tok, q, max_new_tokens=cfg["gen_tokens"]) for q, _ in data.get("prompts", [])]


def run_worker(method: str, task: str, cfg: dict) -> dict:


    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    torch.manual_seed(cfg["seed"])
    model_dir = cfg["model_dir"]
    tok = load_tokenizer(model_dir)
    data = load_task(cfg, task, tok, task_files(task, Path(cfg["data_dir"])))
    rec: dict = {"method": method, "task": task, "train_tokens": data["train_tokens"]}
    if method == "base":

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
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
    model, trainable, step, info, ship = setup_method(method, cfg, model_dir, data)
    rec["setup_s"] = round(time.perf_counter() - t0, 2)
    setup_peak = peak_rss_mb()
    phase_ok = reset_peak_rss()
    times, losses = [], []
    t_all = time.perf_counter()
    for b in data["train"]:
        t = time.perf_counter()
        losses.append(step(b))
        times.append(time.perf_counter() - t)
    train_s = time.perf_counter() - t_all
    steps_peak = peak_rss_mb()
    rec.update(_evaluate(model, data))
    rec["generations"] = _generations(model, tok, data, cfg)
    rec.update({
        "trainable_params": int(trainable),
        "shipped_bytes": int(ship()),
        "tokens_per_s": round(data["train_tokens"] / train_s, 1),
        "step_s_median": round(statistics.median(times), 3),
        "train_s": round(train_s, 1),
        "loss_first": round(losses[0], 4), "loss_last": round(statistics.mean(losses[-max(1, len(losses) // 10):]), 4),
        "finite": all(math.isfinite(x) for x in losses),
        "setup_peak_rss_mb": round(setup_peak, 1),
        "steps_peak_rss_mb": round(steps_peak, 1) if phase_ok else None,
        "peak_rss_mb": round(max(setup_peak, peak_rss_mb()), 1),
    })
    rec.update(info)
    return rec


def _spawn(method: str, task: str, cfg: dict):
    return spawn("usaf.bench.quality", [method, task, json.dumps(cfg)], baseline_env(method))


# ------------------------------------------------------------------------------------------------ report
def _mb(n) -> str:
    return f"{n / 1e6:.2f}"


def table(base: dict, results: list[dict]) -> str:
    head = ("method", "in-domain ppl", "general ppl", "tokens/s", "peak RSS MB", "steps peak MB",
            "trainable", "shipped MB")
    rows = [("base (before)", f"{base['ppl_domain']:.3f}", f"{base['ppl_general']:.3f}", "-",
             f"{base['peak_rss_mb']:.0f}", "-", "-", "-")] if base and "error" not in base else []
    for r in results:
        if "error" in r:
            rows.append((r["method"], "FAILED", r["error"][:70], "", "", "", "", ""))
            continue
        sp = r.get("steps_peak_rss_mb")
        rows.append((r["method"], f"{r['ppl_domain']:.3f}", f"{r['ppl_general']:.3f}", f"{r['tokens_per_s']:.0f}",
                     f"{r['peak_rss_mb']:.0f}", "-" if sp is None else f"{sp:.0f}",
                     f"{r['trainable_params']:,}", _mb(r["shipped_bytes"])))
    return markdown_table(head, rows)


def targets(base: dict, results: list[dict]) -> list[dict]:
    by = {r["method"]: r for r in results if "error" not in r}
    out = []
    if "usaf" in by and "lora-r16" in by:
        u, lo = by["usaf"], by["lora-r16"]
        out.append({"target": "usaf in-domain ppl <= lora-r16", "usaf": u["ppl_domain"], "lora": lo["ppl_domain"],
                    "met": u["ppl_domain"] <= lo["ppl_domain"]})
        if base and "error" not in base:
            fu, fl = u["ppl_general"] - base["ppl_general"], lo["ppl_general"] - base["ppl_general"]
            out.append({"target": "usaf forgetting (general ppl increase) <= lora-r16", "usaf": round(fu, 4),
                        "lora": round(fl, 4), "met": fu <= fl})
        out.append({"target": "usaf peak RSS <= lora-r16", "usaf": u["peak_rss_mb"], "lora": lo["peak_rss_mb"],
                    "met": u["peak_rss_mb"] <= lo["peak_rss_mb"]})
    return out


def ensure_inputs(cfg: dict, work: Path) -> None:
    """Fill ``model_dir`` and ``data_dir`` (write the task files / build the upcycled model when not given)."""
    if cfg["data"]:
        cfg["data_dir"] = str(Path(cfg["data"]).resolve())
    else:

        cfg["data_dir"] = str(work / "data")
        write_task_files(work / "data", seed=cfg["seed"])
    if cfg["model"]:
        if not (Path(cfg["model"]) / "config.json").is_file():
            raise ValueError(f"bench quality: model={cfg['model']} is not a checkpoint directory (no config.json)")
        cfg["model_dir"] = str(Path(cfg["model"]).resolve())
    else:

        cfg["model_dir"] = str(prepare_upcycled_smollm2())


def run_quality(json_path: str | None = None, quick: bool = False, extra: list[str] | None = None) -> int:
    cfg = parse_settings(extra, quick)
    words = ["quality"] + [shlex.quote(w) for w in extra or []] + (["--quick"] if quick else [])
    command = "usaf bench " + " ".join(words + (["--json", shlex.quote(json_path)] if json_path else []))
    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="usaf-quality-") as work:

        try:
            ensure_inputs(cfg, Path(work))
        except CorpusError as e:
            raise ValueError(f"bench quality: {e}") from None
        tasks = ["docs", "chat"] if cfg["task"] == "both" else [cfg["task"]]
        print(f"{command}\nmodel {cfg['model_dir']}; layers {cfg['layers']}; {cfg['steps']} steps x batch "
              f"{cfg['batch']} x seq {cfg['seq']}\n{machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}")
        t0 = time.perf_counter()
        doc = {"bench": "quality", "command": command, "machine": machine,
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "settings": {k: v for k, v in cfg.items() if k != "method_list"}, "tasks": {}}
        failed = False
        for task in tasks:
            print(f"\ntask {task}:")
            recs = []
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
                          f"{rec['tokens_per_s']:.0f} tokens/s, peak RSS {rec['peak_rss_mb']:.0f} MB")
            base, results = recs[0], recs[1:]
            print()
            print(table(base, results))
            tg = targets(base, results)
            for t in tg:
                print(f"{t['target']}: usaf {t['usaf']} vs lora-r16 {t['lora']}  {'MET' if t['met'] else 'NOT MET'}")
            if task == "chat" and "error" not in base:
                for j, q in enumerate(base.get("questions", [])):
                    print(f"\nQ: {q}\n  reference: {base['references'][j][:200]}\n  base: {base['generations'][j]}")
                    for r in results:
                        if "error" not in r:
                            print(f"  {r['method']}: {r['generations'][j]}")
            doc["tasks"][task] = {"base": base, "results": results, "targets": tg}
        doc["wall_s"] = round(time.perf_counter() - t0, 1)
    if json_path:
        Path(json_path).write_text(json.dumps(doc, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if len(sys.argv) == 5 and sys.argv[1] == "_worker":
        print_result(run_worker(sys.argv[2], sys.argv[3], json.loads(sys.argv[4])))
