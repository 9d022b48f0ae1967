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

from .config import TrainConfig, UsafConfig, from_dict

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
    import yaml

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


def cmd_train(args) -> int:
    nproc = getattr(args, "nproc", None)
    if nproc is not None:
        if nproc < 1:
            raise ValueError(f"--nproc must be at least 1, got {nproc}")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("--nproc cannot be used in a process launched by torchrun")
        if nproc > 1:
            return _launch(_without_nproc(args.argv), nproc)
    from .train.recipe import train

    rank = int(os.environ.get("RANK", "0"))
    cfg = _train_config(args)
    if rank == 0:
        metrics = train(cfg)
        print(f"eval ppl {metrics['eval_ppl_before']:.3f} -> {metrics['eval_ppl_after']:.3f}; "
              f"{metrics['tokens_per_s']:.0f} tokens/s; outputs in {cfg.out}")
        return 0
    # Ranks > 0 of a torchrun launch: rank 0 reports the run and the errors every rank stopped on; an error
    # of this rank alone is printed with its rank.
    from .train.distributed import PeerFailed

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
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

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


def _load_prepared(model: str, delta: str | None, device: str, dtype: str, trust_remote_code: bool):
    from safetensors import safe_open

    from .load.hf import load_model, load_tokenizer, resolve_device, resolve_dtype
    from .load.stream import load_prepared

    dev = resolve_device(device)
    tok = load_tokenizer(model, trust_remote_code)
    if not delta:
        m = load_model(model, dtype=resolve_dtype(dtype, dev), device=dev, trust_remote_code=trust_remote_code)
    else:
        if not Path(delta).exists():
            raise FileNotFoundError(f"delta file not found: {delta}")
        try:
            with safe_open(delta, "pt") as f:
                meta = f.metadata() or {}
        except Exception:
            raise ValueError(f"{delta} is not a safetensors file") from None
        if meta.get("format") != "usaf-delta":
            raise ValueError(f"{delta} is not a usaf delta file")
        cfg = UsafConfig(quant=meta.get("quant", "none"), group_size=int(meta.get("group_size", 64)),
                         train_layers=meta.get("train_layers", "all"), density=float(meta.get("density", 0.005)),
                         train_router=meta.get("train_router", "True") == "True")
        handle = load_prepared(model, cfg, resolve_dtype(dtype, dev), dev, trust_remote_code)
        handle.load_delta(delta)
        m = handle.model
    return m, tok, dev


def cmd_eval(args) -> int:
    from .data.load import Batches, load_examples
    from .train.evaluate import evaluate

    m, tok, dev = _load_prepared(args.model, args.delta, args.device, args.dtype, args.trust_remote_code)
    examples, _ = load_examples(args.data, tok, args.seq_len)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    res = evaluate(m, Batches(examples, args.batch_size, shuffle=False, pad_id=pad), dev)
    if args.json:
        print(json.dumps({"ppl": res["ppl"], "loss": res["loss"], "tokens": res["tokens"]}))
    else:
        print(f"ppl {res['ppl']:.4f}  loss {res['loss']:.4f}  tokens {res['tokens']}")
    return 0


def cmd_generate(args) -> int:
    from .train.generate import generate

    m, tok, dev = _load_prepared(args.model, args.delta, args.device, args.dtype, args.trust_remote_code)
    print(generate(m, tok, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   seed=args.seed))
    return 0


def cmd_inspect(args) -> int:
    from .load.inspect import inspect_model

    report = inspect_model(args.model, density=args.density, trust_remote_code=args.trust_remote_code)
    print(json.dumps(report, indent=2) if args.json else report["text"])
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(out=args.out, steps=args.steps, quiet=args.quiet)
    return 0


def cmd_bench(args) -> int:
    from .bench.harness import run_bench

    return run_bench(args.name, json_path=args.json, quick=args.quick, extra=args.extra)


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
        q.add_argument("--dtype", default="auto")
        q.add_argument("--trust-remote-code", action="store_true")

    e = sub.add_parser("eval", help="perplexity of a model (optionally with a delta) on data")
    model_args(e)
    e.add_argument("--data", required=True)
    e.add_argument("--seq-len", type=int, default=512)
    e.add_argument("--batch-size", type=int, default=4)
    e.add_argument("--json", action="store_true", help='print {"ppl", "loss", "tokens"}')
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="generate text (chat template when the tokenizer has one)")
    model_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=cmd_generate)

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
    b.add_argument("extra", nargs="*", help="benchmark-specific key=value settings")
    b.set_defaults(func=cmd_bench)

    from .memory.plan import add_parser as _plan; _plan(sub)  # noqa: E702, I001
    from .export.hf import add_parsers; add_parsers(sub)  # noqa: E702, I001
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("transformers", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    args = build_parser().parse_args(argv)
    if getattr(args, "nproc", None) is not None:  # usaf train --nproc N relaunches these arguments
        args.argv = list(sys.argv[1:] if argv is None else argv)
    if getattr(args, "quiet", False):
        logging.getLogger("usaf").setLevel(logging.WARNING)
    try:
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
    import torch

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
