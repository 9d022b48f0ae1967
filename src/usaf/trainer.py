"""The training run behind ``usaf train``: one loop you can read top to bottom.

load -> prepare -> data -> eval before -> select -> [step, (reselect), (eval), (checkpoint)]* -> eval after
-> delta.safetensors, metrics.json, log.jsonl, loss.png, config.yaml, checkpoints/.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
from pathlib import Path

import torch
import yaml

from . import checkpoint
from .config import TrainConfig, to_dict
from .data import Batches, DataError, load_examples, split_eval, token_weighted_loss
from .evaluate import evaluate, peak_memory_mb
from .families import family_for
from .io import atomic_write_json, atomic_write_text
from .loading import load_config, load_tokenizer, resolve_device, resolve_dtype
from .model import parse_layers
from .optim import UsafOptimizer, make_scheduler
from .rigl import drop_fraction, reselect
from .select import select
from .stream import load_prepared

log = logging.getLogger("usaf")

# Settings that must match for --resume (others, like --steps, may change and are logged).
RESUME_KEYS = ("model", "data", "eval_data", "seq_len", "batch_size", "grad_accum", "seed")
RESUME_USAF_KEYS = ("density", "train_layers", "quant", "group_size", "train_router")


class RunError(ValueError):
    """A problem with the run's settings or output directory (shown as one line, exit code 2)."""


def _check_out_dir(cfg: TrainConfig) -> dict | None:
    out = Path(cfg.out)
    saved = out / "config.yaml"
    if cfg.resume:
        if not saved.exists():
            raise RunError(f"--resume {cfg.resume}: no run there (config.yaml missing)")
        prev = yaml.safe_load(saved.read_text())
        diffs = [k for k in RESUME_KEYS if str(prev.get(k)) != str(getattr(cfg, k))]
        diffs += [f"usaf.{k}" for k in RESUME_USAF_KEYS
                  if str(prev.get("usaf", {}).get(k)) != str(getattr(cfg.usaf, k))]
        if diffs:
            detail = ", ".join(f"{k}: {_get(prev, k)!r} -> {_get(to_dict(cfg), k)!r}" for k in diffs)
            raise RunError(f"cannot resume {out}: settings differ ({detail})")
        return prev
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise RunError(f"{out} already holds a run; use --resume {out} to continue it or --overwrite")
    return None


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d.get(part, {}) if isinstance(d, dict) else None
    return d


def _micro_loss(model, batch: dict, device, n_tokens: int) -> tuple[torch.Tensor, float]:
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    s, _ = token_weighted_loss(logits, batch["labels"].to(device))
    return s / max(n_tokens, 1), float(s.detach())


def _n_loss_tokens(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


def loss_fn(model, batch: dict) -> torch.Tensor:
    """Per-batch token-mean loss, used by selection and reselection."""
    device = next(model.parameters()).device
    loss, _ = _micro_loss(model, batch, device, _n_loss_tokens(batch))
    return loss


def train(cfg: TrainConfig) -> dict:
    """Run a full training job; returns the metrics written to ``metrics.json``."""
    t_start = time.perf_counter()
    if not 0 < cfg.usaf.density <= 1:
        raise RunError(f"--density must be in (0, 1], got {cfg.usaf.density}")
    prev = _check_out_dir(cfg)
    model_cfg = load_config(cfg.model, cfg.trust_remote_code)
    family_for(model_cfg)
    parse_layers(cfg.usaf.train_layers, model_cfg.get_text_config().num_hidden_layers)
    out = Path(cfg.out)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    tok = load_tokenizer(cfg.model, cfg.trust_remote_code)
    examples, stats = load_examples(cfg.data, tok, cfg.seq_len)
    if cfg.eval_data:
        train_ex = examples
        eval_ex, _ = load_examples(cfg.eval_data, tok, cfg.seq_len)
    else:
        train_ex, eval_ex = split_eval(examples, fraction=0.1, seed=cfg.seed, max_eval=64)
    if stats.truncated or stats.dropped:
        log.warning("data: %d rows truncated to --seq-len %d, %d dropped", stats.truncated, cfg.seq_len,
                    stats.dropped)
    handle = load_prepared(cfg.model, cfg.usaf, dtype, device, cfg.trust_remote_code)
    model = handle.model
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    batches = Batches(train_ex, cfg.batch_size, seed=cfg.seed, pad_id=pad)
    eval_batches = lambda: Batches(eval_ex, cfg.batch_size, shuffle=False, pad_id=pad)  # noqa: E731
    steps_per_epoch = max(1, len(batches) // cfg.grad_accum)
    total_steps = cfg.steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))

    calib = lambda step: Batches(train_ex, cfg.batch_size, seed=cfg.seed + 7919 * (step + 1), pad_id=pad)  # noqa: E731
    state = {"selection_s": 0.0, "reselection_s": 0.0, "skipped": 0, "tokens": 0, "train_s": 0.0,
             "eval_ppl_before": None, "eval_loss_before": None, "losses": []}
    step = 0
    ckpt = checkpoint.latest(out) if prev is not None else None
    if ckpt is not None:
        tensors, meta = checkpoint.read(ckpt)
        checkpoint.load_deltas(tensors, handle)
        opt, sched = _optimizer(cfg, handle, total_steps)
        checkpoint.load_training(tensors, meta, opt, sched)
        step = meta["step"]
        batches.load_state_dict(meta["batches"])
        state.update(meta["state"])
        _truncate_log(out / "log.jsonl", step)
        log.info("resumed from %s at step %d", ckpt, step)
        if cfg.steps and prev.get("steps") != cfg.steps:
            log.info("steps changed: %s -> %s", prev.get("steps"), cfg.steps)
    else:
        _truncate_log(out / "log.jsonl", 0)
        before = evaluate(model, eval_batches(), device, cfg.max_eval_batches)
        state["eval_ppl_before"], state["eval_loss_before"] = before["ppl"], before["loss"]
        log.info("eval before: ppl %.3f (%d tokens)", before["ppl"], before["tokens"])
        rep = select(handle, calib(-1), loss_fn=loss_fn, n_batches=cfg.calib_batches)
        state["selection_s"] = rep["seconds"]
        log.info("selected %d of %d expert weights in %.1fs", rep["active"], handle.expert_elements(),
                 rep["seconds"])
        opt, sched = _optimizer(cfg, handle, total_steps)

    model.train()
    progress = _progress(total_steps, step, cfg.quiet)
    logf = open(out / "log.jsonl", "a")
    interrupt = _InterruptFlag()
    try:
        while step < total_steps:
            if interrupt.set:
                checkpoint.save(out, step, handle, opt, sched, {"batches": batches.state_dict(), "state": state})
                raise Interrupted(f"interrupted; checkpoint saved at step {step}; continue with --resume {out}")
            t0 = time.perf_counter()
            micro = [batches.next_batch() for _ in range(cfg.grad_accum)]
            n_tok = sum(_n_loss_tokens(b) for b in micro)
            loss_sum = 0.0
            for b in micro:
                loss, s = _micro_loss(model, b, device, n_tok)
                loss.backward()
                loss_sum += s
            loss_val = loss_sum / max(n_tok, 1)
            grads = opt.gradients()
            finite = math.isfinite(loss_val) and all(bool(torch.isfinite(g).all()) for g in grads)
            if finite:
                opt.step()
            else:
                state["skipped"] += 1
                log.warning("step %d: non-finite loss or gradient, step skipped", step + 1)
            opt.zero_grad()
            sched.step()
            step += 1
            dt = time.perf_counter() - t0
            tokens = int(sum(int(b["attention_mask"].sum()) for b in micro))
            state["tokens"] += tokens
            state["train_s"] += dt
            state["losses"].append(loss_val)
            rec = {"step": step, "loss": loss_val, "lr": opt.param_groups[0]["lr"], "tokens": tokens,
                   "tokens_per_s": tokens / dt, "active": handle.active(),
                   "peak_mem_mb": round(peak_memory_mb(device), 1), "skipped": not finite}
            if cfg.reselect_every and step % cfg.reselect_every == 0 and step < total_steps:
                frac = drop_fraction(step, total_steps, cfg.reselect_fraction)
                r = reselect(handle, opt, calib(step), frac, loss_fn=loss_fn, n_batches=1)
                state["reselection_s"] += r["seconds"]
                rec["reselect"] = {k: r[k] for k in ("dropped", "grown", "seconds")}
            if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
                ev = evaluate(model, eval_batches(), device, cfg.max_eval_batches)
                rec["eval_loss"], rec["eval_ppl"] = ev["loss"], ev["ppl"]
            logf.write(json.dumps(rec) + "\n")
            logf.flush()
            progress(step, loss_val, state["tokens"] / max(state["train_s"], 1e-9))
            if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
                checkpoint.save(out, step, handle, opt, sched, {"batches": batches.state_dict(), "state": state})
    finally:
        interrupt.restore()
        logf.close()
        progress(None, None, None)

    after = evaluate(model, eval_batches(), device, cfg.max_eval_batches)
    checkpoint.save(out, step, handle, opt, sched, {"batches": batches.state_dict(), "state": state})
    handle.save_delta(out / "delta.safetensors", steps=step)
    losses = state["losses"]
    metrics = {
        "loss_first": losses[0] if losses else None,
        "loss_last10": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
        "eval_ppl_before": state["eval_ppl_before"],
        "eval_ppl_after": after["ppl"],
        "eval_loss_before": state["eval_loss_before"],
        "eval_loss_after": after["loss"],
        "eval_tokens": after["tokens"],
        "tokens_per_s": state["tokens"] / max(state["train_s"], 1e-9),
        "peak_rss_mb": round(peak_memory_mb("cpu"), 1),
        "peak_device_mb": round(peak_memory_mb(device), 1),
        "active_elements": handle.active(),
        "expert_elements": handle.expert_elements(),
        "selection_s": state["selection_s"],
        "reselection_s": state["reselection_s"],
        "skipped_steps": state["skipped"],
        "steps": step,
        "train_tokens": state["tokens"],
        "wall_s": time.perf_counter() - t_start,
        "data": stats.to_dict(),
    }
    atomic_write_json(out / "metrics.json", metrics)
    _plot(out)
    return metrics


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training: a checkpoint was saved at the last completed step."""


class _InterruptFlag:
    """Turns SIGINT into a flag checked between steps, so a checkpoint is never taken mid-step."""

    def __init__(self):
        self.set = False
        self._old = None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.set:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.set = True

    def restore(self):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None


def _optimizer(cfg: TrainConfig, handle, total_steps: int):
    """Built after the active set exists (selection or resume): it tracks the current value tensors."""
    opt = UsafOptimizer(handle, lr=cfg.lr, router_lr=cfg.router_lr, weight_decay=cfg.weight_decay)
    return opt, make_scheduler(opt, int(cfg.warmup * total_steps), total_steps)


def _truncate_log(path: Path, step: int) -> None:
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    atomic_write_text(path, "".join(ln + "\n" for ln in keep))


def _progress(total: int, start: int, quiet: bool):
    if quiet:
        return lambda *a: None
    from tqdm import tqdm

    bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def update(step, loss, tps):
        if step is None:
            bar.close()
            return
        bar.update(step - bar.n)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:.0f}")

    return update


def _plot(out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib not installed: no loss.png")
        return
    recs = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines() if ln.strip()]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in recs], [r["loss"] for r in recs], label="train loss")
    ev = [(r["step"], r["eval_loss"]) for r in recs if "eval_loss" in r]
    if ev:
        ax.plot(*zip(*ev), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100)
    plt.close(fig)


__all__ = ["train", "RunError", "DataError"]
