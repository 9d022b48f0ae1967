"""``usaf bench speed`` and ``usaf bench memory`` (``quality``: :mod:`usaf.bench.quality`).

Every method runs in its own Python process (``python -m usaf.bench _worker METHOD JSON``), so the peak
resident memory of one method is not inflated by another. The model is a seeded, randomly initialised
Qwen3-MoE built from a config in this file (no download); the data are random token ids from a fixed seed.

Methods:

- ``usaf``: ``prepare`` (4-bit base, density 0.005, every layer trains), ``select`` on 2 batches, then
  training steps with ``UsafOptimizer``.
- ``lora-r8``: PEFT LoRA r=8 (alpha 16) on q/k/v/o and on the fused expert stacks via ``target_parameters``;
  bf16 base, torch AdamW.
- ``full``: experts + routers trainable (params in the compute dtype), everything else frozen, torch AdamW.
- ``inference``: forward only (``torch.no_grad``) over the usaf 4-bit base (``prepare`` without selection).
- ``inference-bf16``: forward only over the stock model in the compute dtype.

Reported per method: tokens/s (wall clock, median over the timed steps), tokens per CPU-second (process
CPU time; robust when other processes share the cores, with ``threads=1``), peak RSS (``ru_maxrss``: the
whole process) and the peak of the timed steps alone (kernel high-water mark reset after setup), the
sampled peak of anonymous memory (no library code pages), and the trainable parameter count.

Settings are ``key=value`` words, written before the flags (``usaf bench speed steps=3 seq=128 --json F``);
see ``KEYS``. Results and the discussion: ``docs/benchmarks.md``.
"""

from __future__ import annotations

import datetime
import json
import shlex
import statistics
import sys
import time

import torch
from accelerate import init_empty_weights
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

import usaf

from ..engine.checkpointing import enable_checkpointing
from ..engine.discover import moe_site
from ..engine.experts import computing_experts, stack_tensor
from ..engine.families import family_for, get_path
from ..engine.loss import token_mean_loss
from ..engine.model import decoder_layers
from ..engine.store import freeze_stack
from ..memory.policy import use_checkpointing
from ..units import auto_dtype_name
from .harness import (
    AnonSampler,
    baseline_env,
    collect,
    machine_info,
    markdown_table,
    merge_runs,
    peak_rss_mb,
    print_result,
    reset_peak_rss,
    rss_mb,
    spawn,
    status_kb,
)

SIZES: dict[str, dict] = {
    # Tiny: fast on 2 CPU cores. Byte-level-ish vocab of 4096 keeps the LM head from dominating.
    "tiny": {"hidden": 256, "layers": 4, "experts": 16, "top_k": 2, "moe_inter": 256, "heads": 4,
             "kv_heads": 2, "head_dim": 64, "vocab": 4096},
    # Mid: ~0.8 B expert weights (8 layers x 64 experts x 3 x 1024 x 512).
    "mid": {"hidden": 1024, "layers": 8, "experts": 64, "top_k": 8, "moe_inter": 512, "heads": 16,
            "kv_heads": 4, "head_dim": 64, "vocab": 4096},
}

SPEED_METHODS = ("usaf", "lora-r8", "full", "inference", "inference-bf16")
MEMORY_METHODS = ("inference", "usaf")
ALL_METHODS = SPEED_METHODS

# key -> (type, default, help). Model-shape keys default to the chosen ``size``.
KEYS: dict[str, tuple[type, object, str]] = {
    "size": (str, "tiny", "model size preset: tiny | mid"),
    "hidden": (int, None, "hidden size"),
    "layers": (int, None, "decoder layers"),
    "experts": (int, None, "routed experts per layer"),
    "top_k": (int, None, "experts per token"),
    "moe_inter": (int, None, "moe_intermediate_size"),
    "heads": (int, None, "attention heads"),
    "kv_heads": (int, None, "key/value heads"),
    "head_dim": (int, None, "attention head size"),
    "vocab": (int, None, "vocabulary size"),
    "seq": (int, 256, "tokens per sequence"),
    "batch": (int, 4, "sequences per step"),
    "steps": (int, 6, "timed steps (the median is reported)"),
    "warmup": (int, 2, "untimed warmup steps before the timed ones"),
    "dtype": (str, "auto", "compute dtype: bf16 | fp32 | auto (bf16 where the CPU has native bf16, else fp32)"),
    "density": (float, 0.005, "usaf density"),
    "quant": (str, "4bit", "usaf base storage: 4bit | 8bit | none"),
    "calib": (int, 2, "usaf selection batches"),
    "lora_r": (int, 8, "LoRA rank (the method keeps its name lora-r8 only for r=8)"),
    "methods": (str, "", "comma-separated subset of methods (default: all of the bench)"),
    "threads": (int, 1, "torch threads in each worker (0 = torch default; 1 = stable on a shared CPU)"),
    "seed": (int, 0, "seed of the weights and the data"),
    "jobs": (int, 1, "workers run at once; >1 only for smoke tests (timings and RSS are then unreliable); "
                     "0 runs every method in this process (tests only: RSS is then not per method)"),
    "timeout": (int, 1800, "seconds allowed per worker"),
    "repeat": (int, 1, "run the method list this many times, round-robin; medians are reported"),
    "checkpointing": (str, "auto", "usaf activation checkpointing: auto (usaf train's rule) | on | off"),
    "dnnl_cache": (int, -1, "oneDNN primitive + ideep LRU cache capacity in the workers (-1 = torch default)"),
}

QUICK = {"seq": 128, "steps": 3, "warmup": 1}


# ------------------------------------------------------------------------------------------------ settings
def parse_extra(extra: list[str] | None, quick: bool = False) -> dict:
    """``["k=v", ...]`` -> full settings dict (defaults, then the size preset, then ``quick``, then ``extra``)."""
    given: dict[str, object] = {}
    for word in extra or []:
        key, sep, value = word.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in KEYS:
            raise ValueError(f"bench setting {word!r} is not key=value with a known key "
                             f"(known: {', '.join(KEYS)})")
        typ = KEYS[key][0]
        try:
            given[key] = typ(value)
        except ValueError:
            raise ValueError(f"bench setting {word!r}: {value!r} is not a {typ.__name__}") from None
    size = str(given.get("size", KEYS["size"][1]))
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r} (choose {', '.join(SIZES)})")
    cfg = {k: v[1] for k, v in KEYS.items()}
    cfg.update(SIZES[size])
    if quick:
        cfg.update(QUICK)
    cfg.update(given)
    if cfg["dtype"] == "auto":
        cfg["dtype"] = auto_dtype_name(on_cpu=True)
    if cfg["dtype"] not in ("bf16", "fp32"):
        raise ValueError(f"dtype must be bf16 or fp32, got {cfg['dtype']!r}")
    if int(cfg["jobs"]) < 0:
        raise ValueError(f"jobs must be >= 0, got {cfg['jobs']}")
    for k in ("seq", "batch", "steps", "layers", "experts", "top_k", "hidden", "repeat"):
        if int(cfg[k]) < 1:
            raise ValueError(f"{k} must be >= 1, got {cfg[k]}")
    if cfg["top_k"] > cfg["experts"]:
        raise ValueError(f"top_k ({cfg['top_k']}) cannot exceed experts ({cfg['experts']})")
    return cfg


def _methods(name: str, cfg: dict) -> list[str]:
    default = SPEED_METHODS if name == "speed" else MEMORY_METHODS
    if not cfg["methods"]:
        return list(default)
    chosen = [m.strip() for m in str(cfg["methods"]).split(",") if m.strip()]
    bad = [m for m in chosen if m not in ALL_METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {', '.join(bad)} (choose from {', '.join(ALL_METHODS)})")
    return chosen


# ------------------------------------------------------------------------------------------------ model/data
def _model_config(cfg: dict) -> Qwen3MoeConfig:
    return Qwen3MoeConfig(
        vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], num_hidden_layers=cfg["layers"],
        num_attention_heads=cfg["heads"], num_key_value_heads=cfg["kv_heads"], head_dim=cfg["head_dim"],
        intermediate_size=2 * cfg["moe_inter"], moe_intermediate_size=cfg["moe_inter"],
        num_experts=cfg["experts"], num_experts_per_tok=cfg["top_k"], norm_topk_prob=True,
        decoder_sparse_step=1, max_position_embeddings=max(512, cfg["seq"]), tie_word_embeddings=False,
        initializer_range=0.02, use_cache=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


def _dtype(cfg: dict) -> torch.dtype:
    return torch.bfloat16 if cfg["dtype"] == "bf16" else torch.float32


def _fill(name: str, p: torch.Tensor, gen: torch.Generator) -> None:
    """The bench's weights: norms at 1, everything else std 0.02 normal, drawn from ``gen`` in chunks (no fp32
    temporary of a whole stack). Called on every parameter in ``named_parameters`` order."""
    if "norm" in name:
        p.fill_(1.0)
    else:
        for chunk in p.view(-1).split(1 << 24):
            chunk.copy_(torch.randn(chunk.numel(), generator=gen) * 0.02)


def build_model(cfg: dict):
    """Seeded random Qwen3-MoE (std 0.02 normal weights, norms at 1) in the compute dtype, train mode."""
    dtype = _dtype(cfg)
    conf = _model_config(cfg)
    torch.manual_seed(cfg["seed"])
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build directly in the compute dtype (no fp32 copy of a big model)
    try:
        model = Qwen3MoeForCausalLM(conf)
    finally:
        torch.set_default_dtype(prev)
    gen = torch.Generator().manual_seed(cfg["seed"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            _fill(name, p, gen)
    model.train()
    return model


def build_prepared(cfg: dict, ucfg: usaf.UsafConfig) -> usaf.UsafModel:
    """``usaf.prepare(build_model(cfg), ucfg)`` without ever holding the model in the compute dtype: the module
    tree is built on the meta device, every parameter gets :func:`build_model`'s values (same generator, same
    order), and each expert stack is frozen (quantized) as soon as it is drawn, so memory beyond the frozen
    model is one stack in the compute dtype (the mid model's bf16 build was the whole-process peak of
    ``usaf bench memory size=mid``). Same handle as the two-step form, bit for bit."""
    dtype = _dtype(cfg)
    conf = _model_config(cfg)
    torch.manual_seed(cfg["seed"])
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with init_empty_weights(include_buffers=False):  # buffers (rotary tables) real, as in build_model
            model = Qwen3MoeForCausalLM(conf)
    finally:
        torch.set_default_dtype(prev)
    family = family_for(model.config)
    stacks: dict[str, tuple] = {}  # parameter name -> (experts module name, experts module, layout, stack)
    names = {id(m): n for n, m in model.named_modules()}
    for layer in decoder_layers(model):
        site = moe_site(layer, family)
        if site is None:
            continue
        prefix = names[id(site.experts)]
        for st in site.layout.stacks:
            stacks[f"{prefix}.{st.path}"] = (prefix, site.experts, site.layout, st)
    gen = torch.Generator().manual_seed(cfg["seed"])
    frozen: dict[str, dict] = {}
    with torch.no_grad():
        for name, meta in list(model.named_parameters()):
            value = torch.empty(meta.shape, dtype=meta.dtype)
            _fill(name, value, gen)
            owner_name, _, leaf = name.rpartition(".")
            owner = get_path(model, owner_name)
            owner._parameters[leaf] = torch.nn.Parameter(value, requires_grad=meta.requires_grad)
            if name in stacks:  # frozen now, the way UsafExperts freezes the stock stack; the meta one goes back
                prefix, experts, layout, st = stacks[name]
                stack = stack_tensor(experts, st, computing_experts(experts, layout))
                frozen.setdefault(prefix, {})[st.name] = freeze_stack(stack, ucfg.quant, ucfg.group_size, ucfg.quant_rounding)
                del stack
                owner._parameters[leaf] = meta
                del value
    model.train()
    return usaf.prepare(model, ucfg, frozen=frozen, base_fingerprint=f"usaf-bench:{json.dumps(cfg, sort_keys=True)}")


def make_batches(cfg: dict, n: int) -> list[dict]:
    """``n`` batches of random token ids (fixed seed); labels = inputs (the model shifts them)."""
    gen = torch.Generator().manual_seed(cfg["seed"] + 1)
    out = []
    for _ in range(n):
        ids = torch.randint(3, cfg["vocab"], (cfg["batch"], cfg["seq"]), generator=gen)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def _numel(params) -> int:
    return sum(p.numel() for p in params)


# ------------------------------------------------------------------------------------------------ worker
def _setup(method: str, cfg: dict, batches: list[dict]):
    """Build the model for ``method``; returns (step_fn(batch) -> loss or None, trainable, info)."""
    if method in ("usaf", "inference"):  # built and frozen layer by layer: no bf16 copy of the model
        handle = build_prepared(cfg, usaf.UsafConfig(density=cfg["density"], quant=cfg["quant"], train_layers="all"))
        model = handle.model
    else:
        model = build_model(cfg)
    info: dict = {"experts_implementation": getattr(model.config, "_experts_implementation", None)}

    def fwd_loss(b):
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss

    if method in ("usaf", "inference"):
        frozen = [st for m in handle.layers for st in m.experts.frozen.values()]
        info["frozen_expert_mb"] = round(sum(st.nbytes() for st in frozen) / 2**20, 1)
        if method == "inference":
            model.eval()

            def step(b):
                with torch.no_grad():
                    model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])

            return step, 0, info
        # The same activation-checkpointing choice `usaf train --checkpointing auto` makes, made (as there)
        # before selection, whose passes then run lean as well.
        b0 = batches[0]
        info["checkpointing"] = use_checkpointing(handle, cfg.get("checkpointing", "auto"), b0["input_ids"].shape[0],
                                                  b0["input_ids"].shape[1])
        if info["checkpointing"]:
            enable_checkpointing(handle)
        # The selection pass's own peak (the kernel's high-water mark is reset after the model build).
        info["build_peak_rss_mb"] = round(peak_rss_mb(), 1)
        phase = reset_peak_rss()
        t0 = time.perf_counter()
        rep = usaf.select(handle, batches, n_batches=cfg["calib"])
        info["selection_s"] = round(time.perf_counter() - t0, 3)
        info["selection_peak_rss_mb"] = round(peak_rss_mb(), 1) if phase else None
        info["active"] = rep["active"]
        opt = usaf.UsafOptimizer(handle, lr=2e-4, router_lr=5e-5)
        model.train()

        def step(b):  # usaf's training loss (as in `usaf train`): chunked LM head, no full logits tensor
            loss = token_mean_loss(model, b)
            loss.backward()
            opt.step()
            opt.zero_grad()
            return float(loss.detach())

        return step, _numel(handle.trainable_parameters()), info

    if method == "inference-bf16":
        model.eval()

        def step(b):
            with torch.no_grad():
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])

        return step, 0, info

    if method == "lora-r8":
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=cfg["lora_r"], lora_alpha=2 * cfg["lora_r"], lora_dropout=0.0,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                          target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
        model = get_peft_model(model, lcfg)
        model.train()
    elif method == "full":
        for name, p in model.named_parameters():
            p.requires_grad_(".mlp.experts." in name or ".mlp.gate." in name)
    else:
        raise ValueError(f"unknown method {method!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    info["param_dtype"] = str(params[0].dtype).replace("torch.", "")
    opt = torch.optim.AdamW(params, lr=2e-4)

    def step(b):
        loss = fwd_loss(b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step, _numel(params), info


def run_worker(method: str, cfg: dict) -> dict:
    """One method in this process: setup, warmup, timed steps. Returns the result record."""
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    base_rss = rss_mb()
    with AnonSampler() as anon:
        t0 = time.perf_counter()
        batches = make_batches(cfg, max(cfg["calib"], 4))
        step, trainable, info = _setup(method, cfg, batches)
        setup_s = time.perf_counter() - t0
        setup_peak = peak_rss_mb()
        phase_ok = reset_peak_rss()
        setup_anon, anon.peak_kb = anon.peak_kb, 0
        times, cpu_times, losses = [], [], []
        for i in range(cfg["warmup"] + cfg["steps"]):
            b = batches[i % len(batches)]
            t, c = time.perf_counter(), time.process_time()
            loss = step(b)
            dt, dc = time.perf_counter() - t, time.process_time() - c
            if i >= cfg["warmup"]:
                times.append(dt)
                cpu_times.append(dc)
            if loss is not None:
                losses.append(loss)
        steps_peak = peak_rss_mb()
    tokens = cfg["batch"] * cfg["seq"]
    med = statistics.median(times)
    cpu_med = statistics.median(cpu_times)
    rec = {
        "method": method,
        "tokens_per_s": round(tokens / med, 1),
        "cpu_tokens_per_s": round(tokens / max(cpu_med, 1e-9), 1),
        "peak_rss_mb": round(max(setup_peak, steps_peak, info.get("build_peak_rss_mb", 0)), 1),
        "trainable_params": int(trainable),
        "step_s_median": round(med, 4),
        "step_s_min": round(min(times), 4),
        "step_cpu_s_median": round(cpu_med, 4),
        "steps_peak_rss_mb": round(steps_peak, 1) if phase_ok else None,
        "setup_peak_rss_mb": round(max(setup_peak, info.get("build_peak_rss_mb", 0)), 1),
        "peak_anon_mb": round(max(setup_anon, anon.peak_kb) / 1024, 1),
        "steps_peak_anon_mb": round(anon.peak_kb / 1024, 1),
        "file_rss_mb_end": round(status_kb(("RssFile",)).get("RssFile", 0) / 1024, 1),
        "base_rss_mb": round(base_rss, 1),
        "setup_s": round(setup_s, 2),
        "dtype": cfg["dtype"],
        "torch_threads": torch.get_num_threads(),
    }
    if losses:
        rec["loss_first"], rec["loss_last"] = round(losses[0], 4), round(losses[-1], 4)
    rec.update(info)
    return rec


def _spawn(method: str, cfg: dict):
    env = baseline_env(method)
    if int(cfg.get("dnnl_cache", -1)) >= 0:
        env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = str(cfg["dnnl_cache"])
        env["LRU_CACHE_CAPACITY"] = str(max(1, cfg["dnnl_cache"]))
    return spawn("usaf.bench.speed", [method, json.dumps(cfg)], env)


def _in_process(method: str, cfg: dict) -> dict:
    try:
        return run_worker(method, cfg)
    except Exception as e:  # reported like a failed worker
        return {"method": method, "error": f"{type(e).__name__}: {e}"[:300]}


def run_methods(methods: list[str], cfg: dict, log=print) -> list[dict]:
    """Run every method ``repeat`` times (round-robin, ``jobs`` at once), one process per run."""
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    queue = [m for _ in range(max(1, int(cfg["repeat"]))) for m in methods]
    jobs = int(cfg["jobs"])
    for i in range(0, len(queue), max(1, jobs)):
        if jobs == 0:
            batch = [(queue[i], None)]
        else:
            batch = [(m, _spawn(m, cfg)) for m in queue[i : i + jobs]]
        for m, p in batch:
            rec = _in_process(m, cfg) if p is None else collect(m, p, int(cfg["timeout"]))
            runs[m].append(rec)
            if "error" in rec:
                log(f"  {m}: FAILED ({rec['error']})")
            else:
                log(f"  {m}: {rec['tokens_per_s']:.0f} tokens/s ({rec['cpu_tokens_per_s']:.0f} per CPU-s), "
                    f"peak RSS {rec['peak_rss_mb']:.0f} MB")
    return [merge_runs(runs[m]) for m in methods]


# ------------------------------------------------------------------------------------------------ report
def _fmt_int(n) -> str:
    return "-" if n is None else f"{n:,}"


def table(results: list[dict]) -> str:
    head = ("method", "tokens/s", "tokens/CPU-s", "step s", "peak RSS MB", "steps-phase peak MB",
            "trainable params")
    rows = []
    for r in results:
        if "error" in r:
            rows.append((r["method"], "FAILED", "", "", "", "", r["error"][:60]))
            continue
        sp = r.get("steps_peak_rss_mb")
        rows.append((r["method"], f"{r['tokens_per_s']:.0f}", f"{r['cpu_tokens_per_s']:.0f}",
                     f"{r['step_s_median']:.3f}",
                     f"{r['peak_rss_mb']:.0f}", "-" if sp is None else f"{sp:.0f}",
                     _fmt_int(r["trainable_params"])))
    return markdown_table(head, rows)


def targets(name: str, results: list[dict]) -> list[dict]:
    """The targets the benchmarks report against, with the measured ratio and met / not met."""
    by = {r["method"]: r for r in results if "error" not in r}
    out = []
    if name == "speed" and "usaf" in by and "lora-r8" in by:
        ratio = by["usaf"]["tokens_per_s"] / by["lora-r8"]["tokens_per_s"]
        out.append({"target": "usaf tokens/s >= 1.5x lora-r8", "ratio": round(ratio, 3), "met": ratio >= 1.5})
        ratio = by["usaf"]["cpu_tokens_per_s"] / by["lora-r8"]["cpu_tokens_per_s"]
        out.append({"target": "usaf tokens/CPU-s >= 1.5x lora-r8", "ratio": round(ratio, 3),
                    "met": ratio >= 1.5})
    if "usaf" in by and "inference" in by:
        ratio = by["usaf"]["peak_rss_mb"] / by["inference"]["peak_rss_mb"]
        out.append({"target": "usaf peak RSS <= 1.15x inference (same 4-bit base)", "ratio": round(ratio, 3),
                    "met": ratio <= 1.15})
        a, b = by["usaf"].get("steps_peak_rss_mb"), by["inference"].get("steps_peak_rss_mb")
        if a and b:  # the memory engine's figure: a training step's peak / an inference forward's peak
            out.append({"target": "usaf steps-phase peak RSS <= 1.15x inference steps-phase", "ratio": round(a / b, 3),
                        "met": a / b <= 1.15})
        s = by["usaf"].get("selection_peak_rss_mb")
        if s and b:
            out.append({"target": "(info) usaf selection-pass peak RSS / inference steps-phase", "ratio": round(s / b, 3),
                        "met": None})
    return out


def run_bench(name: str, json_path: str | None = None, quick: bool = False, extra: list[str] | None = None) -> int:
    """Run benchmark ``name`` (speed | memory), print a table, optionally write JSON. Returns an exit code."""
    if name not in ("speed", "memory"):
        raise ValueError(f"unknown bench {name!r} (choose speed, memory or quality)")
    cfg = parse_extra(extra, quick)
    methods = _methods(name, cfg)
    # key=value words before the flags: argparse cannot parse the words after ``--quick`` / ``--json F``
    words = [name] + [shlex.quote(w) for w in extra or []] + (["--quick"] if quick else [])
    command = "usaf bench " + " ".join(words + (["--json", shlex.quote(json_path)] if json_path else []))
    machine = machine_info()
    model_desc = (f"Qwen3-MoE {cfg['size']}: hidden {cfg['hidden']}, {cfg['layers']} layers, {cfg['experts']} "
                  f"experts top-{cfg['top_k']}, moe_intermediate {cfg['moe_inter']}, {cfg['heads']}/{cfg['kv_heads']} "
                  f"heads, vocab {cfg['vocab']}; batch {cfg['batch']} x seq {cfg['seq']}, {cfg['dtype']}")
    print(f"{command}\n{model_desc}\n{machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}")
    if cfg["jobs"] != 1:
        print(f"warning: jobs={cfg['jobs']}: timings and RSS are not comparable between methods")
    t0 = time.perf_counter()
    results = run_methods(methods, cfg)
    print()
    print(table(results))
    tg = targets(name, results)
    for t in tg:
        verdict = "" if t["met"] is None else ("  MET" if t["met"] else "  NOT MET")
        print(f"{t['target']}: {t['ratio']:.2f}x{verdict}")
    if json_path:
        doc = {"bench": name, "command": command, "machine": machine,
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "model": model_desc, "settings": cfg, "wall_s": round(time.perf_counter() - t0, 1),
               "results": results, "targets": tg}
        with open(json_path, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
    return 1 if any("error" in r for r in results) else 0




if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "_worker":
        print_result(run_worker(sys.argv[2], json.loads(sys.argv[3])))
