"""The ``usaf`` command line. Flags of ``usaf train`` are derived from ``usaf.config``.

Exit codes: 0 success; 2 user error, printed as one line ``usaf: error: ...`` (no traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import MISSING, fields
from pathlib import Path

import torch
import transformers
import yaml
from torch.distributed import run as torchrun
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from .bench.quality import run_quality
from .bench.speed import run_bench
from .config import TrainConfig, UsafConfig, from_dict
from .demo import run_demo
from .export.delta import apply_delta, export_delta
from .export.gguf import export_gguf
from .export.gguf_source import export_gguf_like_source
from .export.hf import export_hf
from .export.layout import NAMED_DTYPES, ExportError, load_run
from .export.reference import BASE_WEIGHTS, DEFAULT_BASE_WEIGHTS
from .load.gguf.model import is_gguf
from .load.inspect import inspect_model
from .memory.plan import predict
from .memory.report import format_plan, json_safe
from .memory.sizes import DTYPE_BYTES, QUANTS
from .progress import progress_bars
from .train.chat import ChatSession, run_chat
from .train.distributed import PeerFailed
from .train.generate import generate
from .train.recipe import train
from .train.report import write_report
from .train.trained import evaluate_data, load_trained
from .units import auto_dtype_name

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NotADirectoryError,
                                                 PermissionError, KeyError)


def _add_dataclass_flags(p: argparse.ArgumentParser, cls, skip=()) -> None:
    for f in fields(cls):
        if f.name in skip or f.default_factory is not MISSING:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata.get("help", "") + (f" (default: {f.default})" if f.default not in ("", None) else "")
        if isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_)
        else:
            kw = {"choices": f.metadata["choices"]} if "choices" in f.metadata else {}
            p.add_argument(flag, type=type(f.default), default=argparse.SUPPRESS, help=help_, **kw)


def _train_config(args: argparse.Namespace) -> TrainConfig:
    data: dict = {}
    if getattr(args, "config", None):
        try:
            data = yaml.safe_load(Path(args.config).read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{args.config} is not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{args.config} must be a mapping of settings")
    usaf_keys = {f.name for f in fields(UsafConfig)}
    nested = dict(data.pop("usaf", {}) or {})
    for k in list(data):
        if k.replace("-", "_") in usaf_keys:
            nested[k.replace("-", "_")] = data.pop(k)
    for k, v in vars(args).items():
        if k in ("cmd", "config", "func", "nproc", "argv"):
            continue
        (nested if k in usaf_keys else data)[k] = v
    if data.get("resume"):
        data.setdefault("out", data["resume"])
    data["usaf"] = from_dict(UsafConfig, nested)
    cfg = from_dict(TrainConfig, data)
    for need in ("model", "data", "out"):
        if not getattr(cfg, need):
            raise ValueError(f"--{need} is required")
    return cfg


# ------------------------------------------------------------------------------------------------ commands
def cmd_train(args) -> int:
    nproc = getattr(args, "nproc", None)
    if nproc is not None:
        if nproc < 1:
            raise ValueError(f"--nproc must be at least 1, got {nproc}")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("--nproc cannot be used in a process launched by torchrun")
        if nproc > 1:
            return _launch(_without_nproc(args.argv), nproc)

    rank = int(os.environ.get("RANK", "0"))
    cfg = _train_config(args)
    if rank == 0:
        metrics = train(cfg)
        print(f"eval ppl {metrics['eval_ppl_before']:.3f} -> {metrics['eval_ppl_after']:.3f}; "
              f"{metrics['tokens_per_s']:.0f} tokens/s; outputs in {cfg.out}")
        return 0
    # Ranks > 0 of a torchrun launch: rank 0 reports the run and the errors every rank stopped on; an error
    # of this rank alone is printed with its rank.
    try:
        train(cfg)
    except PeerFailed:
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        msg = _error_line(e)
        if msg is None:
            raise
        print(f"usaf: error: rank {rank}: {msg}", file=sys.stderr)
        return 2
    return 0


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def _launch(argv: list[str], nproc: int) -> int:
    """Run ``usaf <argv>`` on ``nproc`` local processes through torchrun (``torch.distributed.run``); exit code
    2 when the ranks stopped on a user error (rank 0 printed it)."""
    targs = torchrun.parse_args(["--standalone", "--nproc-per-node", str(nproc), "--module", "usaf", *argv])
    # The ranks print their own errors; torchrun's per-failure log lines would only repeat them.
    quiet = [lg for name, lg in logging.root.manager.loggerDict.items()
             if name.startswith("torch.distributed.elastic") and isinstance(lg, logging.Logger)]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.CRITICAL)
    try:
        torchrun.run(targs)
    except ChildFailedError as e:
        codes = {f.exitcode for f in e.failures.values()}
        if codes <= {2}:
            return 2
        if codes <= {130, 2, -2}:
            return 130
        print(f"usaf: error: {len(e.failures)} of {nproc} processes failed (exit codes "
              f"{sorted(codes)}); see their output above", file=sys.stderr)
        return 1
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)
    return 0


def cmd_eval(args) -> int:
    res = evaluate_data(args.model, args.data, args.delta, args.seq_len, args.batch_size, args.dtype,
                        args.held_out, args.seed, args.device, args.trust_remote_code)
    if args.json:
        print(json.dumps({"ppl": res["ppl"], "loss": res["loss"], "tokens": res["tokens"]}))
    else:
        print(f"ppl {res['ppl']:.4f}  loss {res['loss']:.4f}  tokens {res['tokens']}")
    return 0


def cmd_generate(args) -> int:
    m, tok, dev = load_trained(args.model, args.delta, args.device, args.dtype, args.trust_remote_code)
    print(generate(m, tok, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   seed=args.seed))
    return 0


def cmd_chat(args) -> int:
    if args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
        raise ValueError("--max-new-tokens must be >= 1, --temperature >= 0 and --top-p in (0, 1]")
    m, tok, _ = load_trained(args.model, args.delta, args.device, args.dtype, args.trust_remote_code)
    torch.manual_seed(args.seed)
    session = ChatSession(m, tok, temperature=args.temperature, top_p=args.top_p,
                          max_new_tokens=args.max_new_tokens, system=args.system)
    run_chat(session)
    return 0


def cmd_report(args) -> int:
    print(f"wrote {write_report(args.run, args.out)}")
    return 0


def cmd_inspect(args) -> int:
    report = inspect_model(args.model, density=args.density, trust_remote_code=args.trust_remote_code)
    print(json.dumps(report, indent=2) if args.json else report["text"])
    return 0


def cmd_demo(args) -> int:
    run_demo(out=args.out, steps=args.steps, quiet=args.quiet)
    return 0


def cmd_bench(args) -> int:
    if args.name == "quality":
        return run_quality(args.json, args.quick, args.extra)
    return run_bench(args.name, json_path=args.json, quick=args.quick, extra=args.extra)


def cmd_plan(args: argparse.Namespace) -> int:
    """``usaf plan``: prints the table (or JSON); exit code 0 (also when it does not fit)."""
    r = predict(
        args.model,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        density=args.density,
        attention_density=args.attention_density,
        shared_density=args.shared_density,
        train_layers=args.train_layers,
        quant=args.quant,
        dtype=args.dtype if args.dtype != "auto" else auto_dtype_name(on_cpu=args.device == "cpu"),
        device_memory=args.device_memory,
        host_memory=args.host_memory,
        device=args.device,
        chunk_mb=args.chunk_mb,
        attn=args.attn,
        checkpointing=args.checkpointing,
        prefix_cache=args.prefix_cache,
        calib_batches=args.calib_batches,
        trust_remote_code=args.trust_remote_code,
    )
    print(json.dumps(json_safe(r), indent=2) if args.json else format_plan(r))
    return 0


def cmd_export(args) -> int:
    run = load_run(args.run, args.base, args.train_dtype)
    check = not args.no_check
    from_gguf = is_gguf(run.base)
    if args.like_source and not (args.format == "gguf" and from_gguf):
        raise ExportError("--like-source writes a GGUF like the GGUF the run trained from: it needs --format gguf "
                          "and a .gguf base")
    if args.touched_type and not args.like_source:
        raise ExportError("--touched-type goes with --format gguf --like-source")
    if from_gguf and args.format != "gguf":
        raise ExportError(f"{run.base} is a GGUF: export a run trained from it with --format gguf --like-source")
    if from_gguf:
        r = export_gguf_like_source(run, args.out, args.touched_type, args.overwrite, check)
        print(f"wrote {r['out']} ({r['arch']}, {r['touched_tensors']} of {r['tensors']} tensors touched, in "
              f"{r['touched_type']} type; {r['requantized_blocks']} blocks requantized); check: {r['check']}")
    elif args.format == "hf":
        r = export_hf(run, args.out, args.base_weights, args.overwrite, check)
        print(f"wrote {r['out']} ({r['shards']} shard(s), {r['touched_tensors']} tensors patched, base weights "
              f"{r['base_weights']})" + (f"; reload check ok (max rel. logit error {r['check_error']:.1e})"
                                         if "check_error" in r else ""))
    elif args.format == "delta":
        r = export_delta(run, args.out, args.overwrite, check)
        print(f"wrote {r['out']}: {r['bytes'] / 1e6:.3f} MB for {r['active']:,} active elements "
              f"({r['mb_per_million_active']:.2f} MB per million active elements, originals included)")
    else:
        r = export_gguf(run, args.out, args.type, args.base_weights, args.overwrite, check, args.tokenizer_pre)
        print(f"wrote {r['out']} ({r['arch']}, {r['type']}, {r['tensors']} tensors); check: {r['check']}")
    return 0


def cmd_apply(args) -> int:
    if is_gguf(args.model):
        raise ExportError(f"usaf apply takes a checkpoint directory, not a GGUF ({args.model}); for a GGUF use "
                          f"`usaf export RUN --format gguf --like-source`")
    r = apply_delta(args.model, args.delta, args.out, args.revert, args.overwrite, not args.no_check)
    verb = "reverted" if r["revert"] else "applied"
    print(f"{verb} {args.delta} -> {r['out']} ({r['touched_tensors']} tensors patched)"
          + ("" if args.no_check else "; reload check ok"))
    return 0


# ------------------------------------------------------------------------------------------------ parsing
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="usaf", description="Ultra-sparse fine-tuning of MoE language models.")
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="fine-tune a model (writes delta.safetensors, metrics.json, ...)")
    t.add_argument("--config", help="YAML file with the same keys as the flags (flags override)")
    t.add_argument("--nproc", type=int, default=argparse.SUPPRESS,
                   help="data parallel on N local processes (GPUs): relaunches through torchrun; --batch-size "
                        "is per process (docs/distributed.md)")
    _add_dataclass_flags(t, TrainConfig)
    _add_dataclass_flags(t, UsafConfig)
    t.set_defaults(func=cmd_train)

    def model_args(q, delta=True):
        q.add_argument("--model", required=True, help="checkpoint directory or hub id")
        if delta:
            q.add_argument("--delta", help="a usaf delta file to apply")
        q.add_argument("--device", default="auto")
        q.add_argument("--dtype", help="auto | bf16 | fp16 | fp32 (default: the delta's training dtype, else auto)")
        q.add_argument("--trust-remote-code", action="store_true")

    e = sub.add_parser("eval", help="perplexity of a model (optionally with a delta) on data",
                       description="Perplexity computed as usaf train computes its eval. With --delta, the run's "
                                   "--seq-len, --batch-size, --dtype and --seed are the defaults, so `usaf eval "
                                   "--delta RUN/delta.safetensors --data EVAL` reproduces metrics.json's "
                                   "eval_ppl_after (--held-out with the training data when the run had no "
                                   "--eval-data).")
    model_args(e)
    e.add_argument("--data", required=True)
    e.add_argument("--seq-len", type=int, help="default: the delta's run, else 512")
    e.add_argument("--batch-size", type=int, help="default: the delta's run, else 4")
    e.add_argument("--held-out", action="store_true",
                   help="evaluate the held-out split usaf train takes from --data when it has no --eval-data")
    e.add_argument("--seed", type=int, help="seed of the --held-out split (default: the delta's run, else 0)")
    e.add_argument("--json", action="store_true", help='print {"ppl", "loss", "tokens"}')
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="generate text (chat template when the tokenizer has one)")
    model_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=cmd_generate)

    r = sub.add_parser("report", help="what a run did, as one self-contained report.html (loss, lr, budget per "
                                      "layer x expert, router load, RigL churn, speed, memory)")
    r.add_argument("run", help="a usaf train output directory")
    r.add_argument("--out", help="output file (default: RUN/report.html)")
    r.set_defaults(func=cmd_report)

    c = sub.add_parser("chat", help="talk to a model (and a delta) in the terminal: several turns, tokens streamed")
    model_args(c)
    c.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default: 0.7)")
    c.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling (default: 0.9)")
    c.add_argument("--max-new-tokens", type=int, default=256, help="per reply (default: 256)")
    c.add_argument("--system", default="", help="a system message opening the conversation")
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=cmd_chat)

    i = sub.add_parser("inspect", help="family, MoE layout, parameter counts and the budget at a density")
    i.add_argument("--model", required=True)
    i.add_argument("--density", type=float, default=0.005)
    i.add_argument("--json", action="store_true")
    i.add_argument("--trust-remote-code", action="store_true")
    i.set_defaults(func=cmd_inspect)

    d = sub.add_parser("demo", help="fine-tune a real small MoE (upcycled SmolLM2-135M) on a bundled task")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--steps", type=int, default=0, help="override the demo's step count")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="benchmarks: speed | memory | quality")
    b.add_argument("name", choices=("speed", "memory", "quality"))
    b.add_argument("--json", help="write results as JSON to this file")
    b.add_argument("--quick", action="store_true", help="smaller, faster variant")
    b.add_argument("extra", nargs="*", help="benchmark-specific key=value settings (anywhere among the flags)")
    b.set_defaults(func=cmd_bench)

    _plan_parser(sub)
    _export_parsers(sub)
    return p


def _plan_parser(sub) -> None:
    q = sub.add_parser(
        "plan",
        help="predict peak memory of inference and training, and where each part goes",
        description="Predict peak device/host memory of inference and of one training step from "
        "config.json alone, with a device/host/disk placement; says what to change "
        "when it does not fit. Sizes: 12GB = 12*10^9 bytes, 12GiB = 12*2^30.",
    )
    q.add_argument("--model", required=True, help="checkpoint directory, path to a config.json, or a hub id")
    q.add_argument("--device-memory", help="device budget, e.g. 12GB (required unless --device cpu)")
    q.add_argument("--host-memory", help="host RAM budget (default: this machine's RAM)")
    q.add_argument("--seq-len", type=int, default=512)
    q.add_argument("--batch-size", type=int, default=1)
    q.add_argument("--density", type=float, default=0.005)
    q.add_argument("--attention-density", type=float, default=UsafConfig.attention_density,
                   help="fraction of the attention projections that train (as usaf train)")
    q.add_argument("--shared-density", type=float, default=UsafConfig.shared_density,
                   help="fraction of the shared experts' linear weights that train (as usaf train)")
    q.add_argument("--train-layers", default="top:8", help="all | top:N | a-b (default: top:8)")
    q.add_argument("--quant", default="4bit", choices=QUANTS)
    q.add_argument("--dtype", default="auto", choices=tuple(DTYPE_BYTES) + ("auto",),
                   help="compute dtype (default auto: bf16 on an accelerator and on CPUs with native bf16, else fp32)")
    q.add_argument("--device", default="cuda", help="cuda (any accelerator) or cpu (default: cuda)")
    q.add_argument("--chunk-mb", type=int, default=256, help="dequantized expert weights per run, MB")
    q.add_argument(
        "--attn", choices=("eager", "sdpa"), help="attention implementation (default: the config's)"
    )
    q.add_argument(
        "--checkpointing",
        default="auto",
        choices=("auto", "on", "off"),
        help="activation checkpointing at layer boundaries, as in usaf train (default: auto = on "
        "when it lowers the predicted training peak by more than 2%%)",
    )
    q.add_argument(
        "--prefix-cache",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="layers below the trainable range are cached hidden states, not resident (default: on)",
    )
    q.add_argument("--calib-batches", type=int, default=TrainConfig.calib_batches,
                   help="micro-batches the initial selection records, as usaf train (default: %(default)s)")
    q.add_argument("--json", action="store_true", help="print the full prediction as JSON")
    q.add_argument("--trust-remote-code", action="store_true")
    q.set_defaults(func=cmd_plan)


def _export_parsers(sub) -> None:
    x = sub.add_parser("export", help="export a trained delta: full checkpoint (hf), revertible delta file, GGUF")
    x.add_argument("run", help="training output directory (delta.safetensors + config.yaml) or a delta file")
    x.add_argument("--format", choices=("hf", "delta", "gguf"), default="hf")
    x.add_argument("--out", required=True, help="output directory (hf) or file (delta, gguf)")
    x.add_argument("--base", help="base checkpoint directory (default: the model named in the run's config.yaml)")
    x.add_argument("--base-weights", choices=BASE_WEIGHTS, default=DEFAULT_BASE_WEIGHTS,
                   help="full: deltas added to the original full-precision weights (default); dequantized: "
                        "the dequantized 4/8-bit base training saw, plus the deltas")
    x.add_argument("--type", choices=("f16", "bf16", "q8_0"), default="f16", help="GGUF tensor type")
    x.add_argument("--like-source", action="store_true",
                   help="GGUF from a GGUF base: the source's metadata, tensor order and types; untouched tensors "
                        "byte for byte, touched blocks requantized in their own type")
    x.add_argument("--touched-type", help="with --like-source: write the touched tensors in this type instead "
                                          "(f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k, mxfp4)")
    x.add_argument("--tokenizer-pre", help="GGUF: llama.cpp pre-tokenizer name, when it cannot be detected")
    x.add_argument("--train-dtype", choices=tuple(NAMED_DTYPES) + ("auto",),
                   help="compute dtype training used (default: from config.yaml); matters for dequantized")
    x.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    x.add_argument("--no-check", action="store_true", help="skip the reload check (not recommended)")
    x.set_defaults(func=cmd_export)

    a = sub.add_parser("apply", help="merge a delta into a copy of a checkpoint, or take it out (--revert)")
    a.add_argument("--model", required=True, help="checkpoint directory to copy")
    a.add_argument("--delta", required=True, help="delta file (from `usaf export --format delta` to revert)")
    a.add_argument("--out", required=True, help="output checkpoint directory")
    a.add_argument("--revert", action="store_true", help="restore the original bytes of a merged checkpoint")
    a.add_argument("--overwrite", action="store_true")
    a.add_argument("--no-check", action="store_true", help="skip the reload check (not recommended)")
    a.set_defaults(func=cmd_apply)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line. ``key=value`` settings (``usaf bench``) and flags mix in any order: argparse
    stops filling a positional list at the first flag, so the words it left over are settings too."""
    p = build_parser()
    args, rest = p.parse_known_args(argv)
    if rest and hasattr(args, "extra"):
        words = [a for a in rest if "=" in a and not a.startswith("-")]
        args.extra = list(args.extra or []) + words
        rest = [a for a in rest if a not in words]
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("transformers", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    args = parse_args(argv)
    if getattr(args, "nproc", None) is not None:  # usaf train --nproc N relaunches these arguments
        args.argv = list(sys.argv[1:] if argv is None else argv)
    if getattr(args, "quiet", False):
        logging.getLogger("usaf").setLevel(logging.WARNING)
    try:
        with progress_bars(False if getattr(args, "quiet", False) else None):  # train: also off on ranks > 0
            return args.func(args)
    except KeyboardInterrupt as e:
        print(f"usaf: {e or 'interrupted'}", file=sys.stderr)
        return 130
    except Exception as e:  # expected failures become one line and exit code 2; anything else is a bug
        msg = _error_line(e)
        if msg is None:
            raise
        print(f"usaf: error: {msg}", file=sys.stderr)
        return 2


OOM_HINT = ("run `usaf plan` to see what fits, then use fewer --train-layers, a smaller --seq-len / "
            "--batch-size, --quant 4bit or a lower --density")


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))):
        return True
    text = str(e)
    return isinstance(e, (RuntimeError, ValueError)) and (
        "out of memory" in text.lower() or "can't allocate memory" in text or "not enough memory" in text)


def _error_line(e: BaseException) -> str | None:
    """The one-line message for an expected failure (user error, out of memory, disk full, I/O), else None.
    Out of memory is reported as such and never retried."""
    first = (str(e).strip().splitlines() or [""])[0]
    if _is_oom(e):
        detail = f" ({first[:160]})" if first else ""
        return f"out of memory{detail}; {OOM_HINT}"
    if isinstance(e, KeyError):
        return f"missing key {first or type(e).__name__}"
    if isinstance(e, USER_ERRORS):
        return first or type(e).__name__
    if isinstance(e, OSError):  # disk full (DiskFullError says which file), I/O errors
        if e.filename and e.strerror:
            return f"{e.strerror}: {e.filename}"
        return first or type(e).__name__
    return None


if __name__ == "__main__":
    sys.exit(main())
