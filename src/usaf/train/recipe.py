"""The training run behind ``usaf train``: one loop you can read top to bottom.

validate (settings, --out, model files, tokenizer, data; nothing is written yet) -> load -> [resume checks]
-> create --out -> eval before -> select -> [step, (reselect), (eval), (checkpoint)]* -> eval after
-> delta.safetensors, metrics.json, log.jsonl, loss.png, config.yaml, checkpoints/.

Reliability (docs/reliability.md): every file is written atomically; a run killed at any moment resumes
from its newest complete checkpoint bit-identically; ``--resume`` refuses a different model or data (by
content) or incompatible settings and logs the compatible changes; a step with a non-finite loss or gradient
is skipped (``--max-skips`` in a row stop the run with a checkpoint); fp16 compute uses dynamic loss scaling.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import signal
import threading
import time
import warnings
from array import array
from pathlib import Path

import torch
import yaml

from ..config import TrainConfig, to_dict
from ..data.load import Batches, DataError, collate, load_examples, split_eval
from ..engine.loss import lm_loss
from ..engine.model import parse_layers
from ..engine.optim import UsafOptimizer, make_scheduler
from ..engine.rigl import drop_fraction, reselect
from ..engine.select import select
from ..io import atomic_write, atomic_write_json, atomic_write_text, is_disk_full
from ..load.hf import check_model, load_tokenizer, resolve_device, resolve_dtype
from ..load.stream import load_prepared
from ..load.tiers import Prefetcher
from ..memory.prefix import enable_checkpointing, enable_prefix_cache, use_checkpointing
from . import checkpoint, distributed
from .evaluate import evaluate, peak_memory_mb

log = logging.getLogger("usaf")

# Settings that must match for --resume (they change the data stream or the trainable set). Others, like
# --steps or --lr, may change: they are logged, and a new --lr applies from the next step. The global batch
# (--batch-size x --grad-accum x processes) must match too; how it is split may change (checked against the
# checkpoint: see _check_global_batch).
RESUME_KEYS = ("seq_len", "seed")
RESUME_USAF_KEYS = ("density", "train_layers", "quant", "group_size", "train_router")
# Compared by content (data files, tokenized data, model config, base weights), not by path.
RESUME_PATH_KEYS = ("model", "data", "eval_data")
_NOT_SETTINGS = ("resume", "overwrite", "quiet", "out")
# What a run writes into --out (removed by --overwrite; nothing else there is touched).
RUN_FILES = ("config.yaml", "log.jsonl", "delta.safetensors", "metrics.json", "loss.png")


class RunError(ValueError):
    """A problem with the run's settings or output directory (shown as one line, exit code 2)."""


class Diverged(RunError):
    """Too many consecutive steps with a non-finite loss or gradient; a checkpoint was saved."""


# ---------------------------------------------------------------------------------------------------------
# Validation (reads only)
# ---------------------------------------------------------------------------------------------------------


def _validate(cfg: TrainConfig) -> None:
    """Cheap checks of the numbers, before anything is read or written."""
    u = cfg.usaf
    checks = [
        (0 < u.density <= 1, f"--density must be in (0, 1], got {u.density}"),
        (cfg.seq_len >= 2, f"--seq-len must be at least 2, got {cfg.seq_len}"),
        (cfg.batch_size >= 1, f"--batch-size must be at least 1, got {cfg.batch_size}"),
        (cfg.grad_accum >= 1, f"--grad-accum must be at least 1, got {cfg.grad_accum}"),
        (cfg.steps >= 0, f"--steps must be >= 0, got {cfg.steps}"),
        (cfg.steps > 0 or cfg.epochs > 0, f"--epochs must be > 0 when --steps is 0, got {cfg.epochs}"),
        (cfg.lr >= 0 and cfg.router_lr >= 0, "--lr and --router-lr must be >= 0"),
        (0 <= cfg.warmup < 1, f"--warmup must be in [0, 1), got {cfg.warmup}"),
        (0 <= cfg.reselect_fraction <= 1, f"--reselect-fraction must be in [0, 1], got {cfg.reselect_fraction}"),
        (min(cfg.reselect_every, cfg.eval_every, cfg.save_every, cfg.max_eval_batches) >= 0,
         "--reselect-every, --eval-every, --save-every and --max-eval-batches must be >= 0"),
        (cfg.calib_batches >= 1, f"--calib-batches must be at least 1, got {cfg.calib_batches}"),
        (cfg.keep_checkpoints >= 1, f"--keep-checkpoints must be at least 1, got {cfg.keep_checkpoints}"),
        (cfg.max_skips >= 0, f"--max-skips must be >= 0, got {cfg.max_skips}"),
        (u.group_size >= 1, f"--group-size must be at least 1, got {u.group_size}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise RunError(msg)


def _check_out_dir(cfg: TrainConfig) -> dict | None:
    """The previous run's config when resuming (settings that must match are checked), else None."""
    out = Path(cfg.out)
    if cfg.resume:
        if Path(cfg.resume).absolute() != out.absolute():
            raise RunError(f"--resume {cfg.resume} and --out {cfg.out} name different directories")
        saved = out / "config.yaml"
        if not saved.is_file():
            raise RunError(f"--resume {cfg.resume}: no run there (config.yaml missing)")
        try:
            prev = yaml.safe_load(saved.read_text())
        except yaml.YAMLError:
            prev = None
        if not isinstance(prev, dict):
            raise RunError(f"--resume {cfg.resume}: {saved} is not a usaf run config")
        diffs = [k for k in RESUME_KEYS if str(prev.get(k)) != str(getattr(cfg, k))]
        diffs += [f"usaf.{k}" for k in RESUME_USAF_KEYS
                  if str((prev.get("usaf") or {}).get(k)) != str(getattr(cfg.usaf, k))]
        if diffs:
            raise RunError(f"cannot resume {out}: settings differ ({_diff_text(prev, cfg, diffs)}); "
                           f"use the run's settings, or start a new run in another --out")
        return prev
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        if (out / "config.yaml").exists():
            raise RunError(f"{out} already holds a run; use --resume {out} to continue it or --overwrite")
        raise RunError(f"{out} is not empty; choose a new --out (or --overwrite to write into it anyway)")
    return None


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d.get(part, {}) if isinstance(d, dict) else None
    return d


def _diff_text(prev: dict, cfg: TrainConfig, keys: list[str]) -> str:
    now = to_dict(cfg)
    return ", ".join(f"{k}: {_get(prev, k)!r} -> {_get(now, k)!r}" for k in keys)


def _changed_settings(prev: dict, cfg: TrainConfig) -> list[str]:
    now = to_dict(cfg)
    keys = [k for k in now if k not in _NOT_SETTINGS and k != "usaf"]
    keys += [f"usaf.{k}" for k in now["usaf"]]
    return [k for k in keys if str(_get(prev, k)) != str(_get(now, k))]


def _files_digest(files: list[str]) -> str:
    h = hashlib.sha256()
    for name in files:  # content only: the same data at another path is the same data
        h.update(f"{os.path.getsize(name)}\0".encode())
        with open(name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:32]


def _examples_digest(*example_lists) -> str:
    h = hashlib.sha256()
    for examples in example_lists:
        for ex in examples:
            h.update(array("q", ex.input_ids).tobytes())
            h.update(array("q", ex.labels).tobytes())
        h.update(b"|")
    return h.hexdigest()[:32]


def _config_digest(model_cfg) -> str:
    d = {k: v for k, v in model_cfg.to_dict().items()
         if k not in ("transformers_version", "_name_or_path", "_commit_hash", "dtype", "torch_dtype")}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:32]


_IDENTITY = (
    ("model_config", "the model differs from the run's (config.json: {a} -> {b})"),
    ("data", "the training data changed since the checkpoint (content of --data: {a} -> {b})"),
    ("eval_data", "the eval data changed since the checkpoint (content of --eval-data: {a} -> {b})"),
    ("tokens", "the tokenized data differs from the run's (same files: tokenizer or chat template changed?)"),
    ("base_fingerprint", "the base model's weights differ from the run's (fingerprint {a} -> {b})"),
)


def _check_identity(out: Path, saved: dict | None, now: dict, keys) -> None:
    if not saved:
        return
    for key, what in _IDENTITY:
        if key in keys and key in saved and saved[key] != now.get(key):
            a, b = (str(x)[:12] if x else x for x in (saved[key], now.get(key)))
            raise RunError(f"cannot resume {out}: " + what.format(a=a, b=b))


def _global_batch(cfg: TrainConfig, world: int) -> int:
    return cfg.batch_size * cfg.grad_accum * world


def _check_global_batch(out: Path, prev: dict, meta: dict, cfg: TrainConfig, world: int) -> None:
    """A resumed run must keep the global batch (sequences per optimizer step); the split into --batch-size,
    --grad-accum and processes may change. The data position is stored in units of the checkpointed run's
    per-micro-step batch (--batch-size x processes) and must fall on a boundary of the new one."""
    pos = meta.get("batches") or {}
    old_unit = int(pos.get("batch_size", prev.get("batch_size") or cfg.batch_size))
    old = int(meta.get("global_batch") or old_unit * int(prev.get("grad_accum") or 1))  # older checkpoints: 1 rank
    old_world = int(meta.get("world_size") or 1)
    new = _global_batch(cfg, world)
    if old != new:
        raise RunError(
            f"cannot resume {out}: the global batch changed ({old} -> {new} sequences per step = --batch-size "
            f"{cfg.batch_size} x --grad-accum {cfg.grad_accum} x {world} process(es)); the run was "
            f"checkpointed with {old_world} process(es): keep --batch-size x --grad-accum x processes = {old}")
    unit = cfg.batch_size * world
    if int(pos.get("position", 0)) * old_unit % unit:
        raise RunError(
            f"cannot resume {out}: its data position (epoch {pos.get('epoch')}, sequence "
            f"{int(pos.get('position', 0)) * old_unit}) is not a multiple of the new --batch-size x processes "
            f"({unit}); resume with --batch-size x processes = {old_unit}")


def _convert_position(state: dict, unit: int) -> dict:
    """A Batches state saved with another per-micro-step batch, in units of ``unit`` (checked beforehand)."""
    old = int(state.get("batch_size", unit))
    if old == unit:
        return state
    return dict(state, position=int(state["position"]) * old // unit, batch_size=unit)


def _resume_point(out: Path, prev: dict, cfg: TrainConfig, identity: dict, world: int = 1):
    """The newest readable checkpoint of the run being resumed: (path, tensors, meta, unreadable newer ones),
    or None. Refuses different data or model (by content), or a different global batch, before any weights
    are loaded."""
    unreadable = []
    for ckpt in checkpoint.complete(out):
        try:
            tensors, meta = checkpoint.read(ckpt)
        except (ValueError, OSError) as e:
            log.warning("checkpoint %s is unreadable (%s); trying an older one", ckpt.name, e)
            unreadable.append(ckpt)
            continue
        saved = meta.get("identity")
        if saved is None:  # a checkpoint from before content identities: paths must match
            diffs = [k for k in RESUME_PATH_KEYS if str(prev.get(k)) != str(getattr(cfg, k))]
            if diffs:
                raise RunError(f"cannot resume {out}: settings differ ({_diff_text(prev, cfg, diffs)})")
        _check_identity(out, saved, identity, ("model_config", "data", "eval_data", "tokens"))
        _check_global_batch(out, prev, meta, cfg, world)
        return ckpt, tensors, meta, unreadable
    return None, None, None, unreadable


# ---------------------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------------------


def _micro_loss(model, batch: dict, device, n_tokens: int) -> tuple[torch.Tensor, float]:
    s, _ = lm_loss(model, batch, device)  # chunked LM head + cross-entropy: no full logits tensor
    return s / max(n_tokens, 1), float(s.detach())


def _n_loss_tokens(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


def loss_fn(model, batch: dict) -> torch.Tensor:
    """Per-batch token-mean loss, used by selection and reselection."""
    device = next(model.parameters()).device
    loss, _ = _micro_loss(model, batch, device, _n_loss_tokens(batch))
    return loss


class LossScaler:
    """Dynamic loss scaling for fp16 compute; disabled (scale 1, a no-op) for bf16 / fp32.

    The loss is multiplied by ``scale`` before backward so that small fp16 gradients do not flush to zero.
    Before the optimizer step every gradient it uses - the delta values' and the routers' fp32 masters' -
    is divided by ``scale`` (a power of two: exact). A non-finite gradient means the scale was too large:
    the step is skipped and the scale multiplied by ``backoff``; after ``growth_interval`` finite steps in a
    row it is multiplied by ``growth``. The state is saved in checkpoints, so a resumed run continues with
    the same scale.
    """

    def __init__(self, enabled: bool, init_scale: float = 2.0**16, growth: float = 2.0, backoff: float = 0.5,
                 growth_interval: int = 2000, min_scale: float = 2.0**-24, max_scale: float = 2.0**24):
        self.enabled = enabled
        self.scale = float(init_scale) if enabled else 1.0
        self.growth, self.backoff, self.growth_interval = growth, backoff, growth_interval
        self.min_scale, self.max_scale = min_scale, max_scale
        self.good_steps = 0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale if self.enabled else loss

    @torch.no_grad()
    def unscale_(self, grads: list[torch.Tensor]) -> bool:
        """Divide every gradient by the scale in place; True when all of them are finite."""
        finite = True
        for g in grads:
            if self.enabled:
                if g.dtype != torch.float32:
                    raise TypeError(f"loss scaling needs fp32 gradients, got {g.dtype}")
                g.mul_(1.0 / self.scale)
            finite = finite and bool(torch.isfinite(g).all())
        return finite

    def update(self, grads_finite: bool) -> None:
        if not self.enabled:
            return
        if grads_finite:
            self.good_steps += 1
            if self.good_steps >= self.growth_interval:
                self.scale = min(self.scale * self.growth, self.max_scale)
                self.good_steps = 0
        else:
            self.scale = max(self.scale * self.backoff, self.min_scale)
            self.good_steps = 0

    def state_dict(self) -> dict:
        return {"enabled": self.enabled, "scale": self.scale, "good_steps": self.good_steps,
                "growth": self.growth, "backoff": self.backoff, "growth_interval": self.growth_interval}

    def load_state_dict(self, sd: dict | None) -> None:
        if self.enabled and sd and sd.get("enabled"):
            self.scale = float(sd["scale"])
            self.good_steps = int(sd["good_steps"])


def _apply_step(opt: UsafOptimizer, scaler: LossScaler, loss_val: float) -> tuple[bool, bool]:
    """Unscale and check the gradients, then step. Returns (stepped, grads_finite)."""
    grads = opt.gradients()  # router grads are copied into the fp32 masters here
    grads_finite = scaler.unscale_(grads)
    stepped = grads_finite and math.isfinite(loss_val)
    if stepped:
        if scaler.enabled:  # the masters hold unscaled grads: step without re-copying the scaled ones
            with torch.no_grad():
                opt.opt.step()
                for p, m in zip(opt.routers, opt.masters):
                    if m is not p:
                        p.copy_(m.to(p.dtype))
        else:
            opt.step()
    scaler.update(grads_finite)
    return stepped, grads_finite


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------


def train(cfg: TrainConfig) -> dict:
    """Run a full training job; returns the metrics written to ``metrics.json``.

    Every check that can fail on the user's input (settings, --out, model files, tokenizer, data, a resume
    that does not match) runs before --out is created or changed.

    Launched by torchrun (``WORLD_SIZE`` > 1), every rank runs this same function: data parallel over the
    ranks (docs/distributed.md). Only rank 0 reads and writes --out, logs and shows progress; a failure
    before training, on any rank, stops every rank (:func:`usaf.train.distributed.run_agreed`).
    """
    t_start = time.perf_counter()
    d = distributed.init(cfg.device)
    level = log.level
    if not d.main:
        log.setLevel(logging.ERROR)  # rank 0 speaks for the run
    try:
        return _train(cfg, d, t_start)
    finally:
        log.setLevel(level)
        distributed.shutdown(d)


def _train(cfg: TrainConfig, d: distributed.Dist, t_start: float) -> dict:
    _validate(cfg)
    out = Path(cfg.out)
    prev = distributed.run_agreed(d, lambda: _check_out_dir(cfg), main_only=True)

    def inputs():
        model_cfg = check_model(cfg.model, cfg.trust_remote_code)
        parse_layers(cfg.usaf.train_layers, model_cfg.get_text_config().num_hidden_layers)
        device = resolve_device(distributed.device_for(d, cfg.device))
        dtype = resolve_dtype(cfg.dtype, device)
        tok = load_tokenizer(cfg.model, cfg.trust_remote_code)
        examples, stats = load_examples(cfg.data, tok, cfg.seq_len)
        eval_stats = None
        if cfg.eval_data:
            train_ex = examples
            eval_ex, eval_stats = load_examples(cfg.eval_data, tok, cfg.seq_len)
        else:
            train_ex, eval_ex = split_eval(examples, fraction=0.1, seed=cfg.seed, max_eval=64)
        _log_data("data", stats, cfg.seq_len)
        if eval_stats is not None:
            _log_data("eval data", eval_stats, cfg.seq_len)
        identity = {"model_config": _config_digest(model_cfg), "data": _files_digest(stats.files),
                    "eval_data": _files_digest(eval_stats.files) if eval_stats else None,
                    "tokens": _examples_digest(examples, eval_ex if cfg.eval_data else [])}
        return device, dtype, tok, stats, train_ex, eval_ex, identity

    torch.manual_seed(cfg.seed)
    device, dtype, tok, stats, train_ex, eval_ex, identity = distributed.run_agreed(d, inputs)
    if d.on:
        log.info("data parallel: %d processes (%s), global batch %d = --batch-size %d x --grad-accum %d x %d",
                 d.world, "nccl" if d.device.type == "cuda" else "gloo", _global_batch(cfg, d.world),
                 cfg.batch_size, cfg.grad_accum, d.world)
    ckpt, tensors, meta, unreadable = (None, None, None, [])
    if prev is not None:  # rank 0 reads the checkpoint; the others get it from rank 0
        read = {}

        def point():
            c, read["tensors"], m, u = _resume_point(out, prev, cfg, identity, d.world)
            return c, m, u

        ckpt, meta, unreadable = distributed.run_agreed(d, point, main_only=True)
        if ckpt is not None:
            tensors = distributed.broadcast_tensors(read.get("tensors"), d)
        read.clear()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def load():
        handle = load_prepared(cfg.model, cfg.usaf, dtype, device, cfg.trust_remote_code,
                               device_memory=cfg.device_memory, host_memory=cfg.host_memory)
        Prefetcher(handle)
        if ckpt is not None:
            _check_identity(out, meta.get("identity"), dict(identity, base_fingerprint=handle.fingerprint),
                            ("base_fingerprint",))
        if cfg.prefix_cache:
            enable_prefix_cache(handle, train_ex, eval_ex, cfg.batch_size, pad)
        return handle

    handle = distributed.local_main_first(d, load)
    model = handle.model
    identity["base_fingerprint"] = handle.fingerprint
    if use_checkpointing(handle, cfg.checkpointing, cfg.batch_size, cfg.seq_len):
        enable_checkpointing(handle)
    # Batches of --batch-size x processes sequences; each rank gets its --batch-size slice of every one.
    batches = Batches(train_ex, cfg.batch_size * d.world, seed=cfg.seed, rank=d.rank, world_size=d.world,
                      pad_id=pad)
    eval_batches = lambda: _eval_batches(eval_ex, cfg.batch_size, d, pad, len(train_ex),  # noqa: E731
                                         cfg.max_eval_batches)
    steps_per_epoch = max(1, len(batches) // cfg.grad_accum)
    total_steps = cfg.steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    with _disk_full_is_an_error(out):
        distributed.run_agreed(d, (lambda: _prepare_out(out, cfg, prev, unreadable)) if d.main else None)
        return _run(cfg, d, out, prev, ckpt, tensors, meta, identity, handle, model, device, dtype, train_ex,
                    batches, eval_batches, total_steps, pad, stats, t_start)


def _eval_batches(eval_ex, batch_size: int, d: distributed.Dist, pad: int, offset: int, max_batches: int):
    """This rank's contiguous shard of the eval set (at most ``max_batches`` global batches of --batch-size x
    processes sequences), in batches of --batch-size; ``index`` is the row in the frozen-prefix cache (eval
    rows follow the train rows). With one process: the eval set in order, exactly as before."""
    n = len(eval_ex) if not max_batches else min(len(eval_ex), max_batches * batch_size * d.world)
    lo, hi = n * d.rank // d.world, n * (d.rank + 1) // d.world
    for a in range(lo, hi, batch_size):
        idx = list(range(a, min(a + batch_size, hi)))
        batch = collate([eval_ex[i] for i in idx], pad)
        batch["index"] = torch.tensor(idx, dtype=torch.long) + offset
        yield batch


def _run(cfg, d, out, prev, ckpt, tensors, meta, identity, handle, model, device, dtype, train_ex, batches,
         eval_batches, total_steps, pad, stats, t_start) -> dict:
    main = d.main
    calib = lambda step: Batches(train_ex, cfg.batch_size * d.world, seed=cfg.seed + 7919 * (step + 1),  # noqa: E731
                                 rank=d.rank, world_size=d.world, pad_id=pad)
    # Selection scores --calib-batches micro-batches of --batch-size in all, spread over the ranks (each rank
    # its slice of every calibration batch); a reselection one micro-batch per rank. Each rank scores its
    # slices as one process scores a micro-batch; select.py sums the scores over the ranks.
    calib_per_rank = math.ceil(cfg.calib_batches / d.world)
    state = {"selection_s": 0.0, "reselection_s": 0.0, "skipped": 0, "consecutive_skips": 0, "tokens": 0,
             "train_s": 0.0, "eval_ppl_before": None, "eval_loss_before": None, "losses": [], "comm_bytes": 0}
    scaler = LossScaler(enabled=dtype == torch.float16)
    step = 0
    if ckpt is not None:
        checkpoint.load_deltas(tensors, handle)
        opt, sched = _optimizer(cfg, handle, total_steps)
        checkpoint.load_training(tensors, meta, opt, sched)
        del tensors
        step = meta["step"]
        batches.load_state_dict(_convert_position(meta["batches"], batches.batch_size))
        state.update(meta["state"])
        scaler.load_state_dict(meta.get("loss_scaler"))
        if main:
            _truncate_log(out / "log.jsonl", step)
        log.info("resumed from %s at step %d", ckpt, step)
        _log_changes(prev, cfg, opt, sched)
        if int(meta.get("world_size") or 1) != d.world:
            log.info("resume: %d process(es) -> %d (global batch %d kept)", int(meta.get("world_size") or 1),
                     d.world, _global_batch(cfg, d.world))
        if state["consecutive_skips"]:
            log.info("resume: the count of consecutive skipped steps (%d) starts again at 0",
                     state["consecutive_skips"])
            state["consecutive_skips"] = 0
        if step >= total_steps:
            log.info("the run is already at step %d (--steps %d): finishing", step, total_steps)
        distributed.check_same_selection(handle, d)
    else:
        if prev is not None:
            log.info("no complete checkpoint in %s: starting from step 0", out)
        if main:
            _truncate_log(out / "log.jsonl", 0)
        before = evaluate(model, eval_batches(), device, dist=d)
        state["eval_ppl_before"], state["eval_loss_before"] = before["ppl"], before["loss"]
        log.info("eval before: ppl %.3f (%d tokens)", before["ppl"], before["tokens"])
        rep = select(handle, calib(-1), loss_fn=loss_fn, n_batches=calib_per_rank)
        digest = distributed.check_same_selection(handle, d)
        state["selection_s"] = rep["seconds"]
        log.info("selected %d of %d expert weights in %.1fs%s", rep["active"], handle.expert_elements(),
                 rep["seconds"], f" (same on all {d.world} ranks: {digest})" if d.on else "")
        opt, sched = _optimizer(cfg, handle, total_steps)

    model.train()
    progress = _progress(total_steps, step, cfg.quiet or not main)
    logf = open(out / "log.jsonl", "a") if main else None

    def save() -> Path | None:
        if not main:
            return None
        if not logf.closed:
            logf.flush()
        _fsync_file(out / "log.jsonl")  # the log lines up to the checkpoint survive a power loss too
        extra = {"batches": batches.state_dict(), "state": state, "loss_scaler": scaler.state_dict(),
                 "identity": identity, "global_batch": _global_batch(cfg, d.world), "world_size": d.world}
        return checkpoint.save(out, step, handle, opt, sched, extra, keep=cfg.keep_checkpoints)

    def agreed(e: BaseException) -> BaseException:  # every rank stops; rank 0 reports it
        return e if main or isinstance(e, KeyboardInterrupt) else distributed.PeerFailed(str(e))

    interrupt = _InterruptFlag()
    try:
        while step < total_steps:
            t0 = time.perf_counter()
            start = batches.state_dict()
            where, micro = [], []
            for _ in range(cfg.grad_accum):
                pos = batches.state_dict()
                where.append([pos["epoch"], pos["position"]])
                micro.append(batches.next_batch())
            # The step's loss tokens over all ranks (and whether any rank was interrupted): one small
            # collective; each rank divides its summed loss by the global count.
            n_tok, tokens, stop = distributed.all_sum_many(
                [sum(_n_loss_tokens(b) for b in micro), sum(int(b["attention_mask"].sum()) for b in micro),
                 float(interrupt.set)], d)
            n_tok, tokens = int(n_tok), int(tokens)
            if stop:
                batches.load_state_dict(start)  # the checkpoint is taken before this step
                save()
                raise agreed(Interrupted(f"interrupted; checkpoint saved at step {step}; continue with "
                                         f"--resume {out}"))
            loss_sum = 0.0
            for b in micro:
                loss, s = _micro_loss(model, b, device, n_tok)
                scaler.scale_loss(loss).backward()
                loss_sum += s
            # Sum the gradients (values + routers) and the loss over the ranks: one flat fp32 bucket.
            comm, (loss_sum,) = distributed.all_reduce_grads(opt.values + opt.routers, d, [loss_sum])
            if d.on:
                comm += 8 * 3  # the token counts above
            state["comm_bytes"] = comm
            loss_val = loss_sum / max(n_tok, 1)
            scale = scaler.scale
            stepped, _ = _apply_step(opt, scaler, loss_val)
            if stepped:
                state["consecutive_skips"] = 0
            else:
                state["skipped"] += 1
                overflow = scaler.enabled and math.isfinite(loss_val) and scale > 1.0
                if not overflow:
                    state["consecutive_skips"] += 1
                log.warning("step %d: %s, step skipped (%s)%s", step + 1,
                            "non-finite gradient" if math.isfinite(loss_val) else f"non-finite loss ({loss_val})",
                            _where(where), f"; fp16 loss scale {scale:g} -> {scaler.scale:g}" if overflow else "")
            opt.zero_grad()
            with warnings.catch_warnings():  # a skipped first step would make torch warn about the order
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
                sched.step()
            step += 1
            dt = time.perf_counter() - t0
            state["tokens"] += tokens
            state["train_s"] += dt
            state["losses"].append(loss_val)
            rec = {"step": step, "loss": loss_val, "lr": opt.param_groups[0]["lr"], "tokens": tokens,
                   "tokens_per_s": tokens / dt, "active": handle.active(),
                   "peak_mem_mb": round(peak_memory_mb(device), 1), "skipped": not stepped, "comm_bytes": comm}
            if not stepped:
                rec["batches"] = where  # [epoch, batch index within the epoch] of each micro-batch
            if scaler.enabled:
                rec["loss_scale"] = scaler.scale
            if cfg.reselect_every and step % cfg.reselect_every == 0 and step < total_steps:
                frac = drop_fraction(step, total_steps, cfg.reselect_fraction)
                r = reselect(handle, opt, calib(step), frac, loss_fn=loss_fn, n_batches=1)
                distributed.check_same_selection(handle, d)
                state["reselection_s"] += r["seconds"]
                rec["reselect"] = {k: r[k] for k in ("dropped", "grown", "seconds")}
            if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
                ev = evaluate(model, eval_batches(), device, dist=d)
                rec["eval_loss"], rec["eval_ppl"] = ev["loss"], ev["ppl"]
            if main:
                logf.write(json.dumps(rec) + "\n")
                logf.flush()
            progress(step, loss_val, state["tokens"] / max(state["train_s"], 1e-9))
            if cfg.max_skips and state["consecutive_skips"] >= cfg.max_skips:
                saved = save()
                raise agreed(Diverged(
                    f"stopped at step {step}: {state['consecutive_skips']} consecutive steps had a non-finite "
                    f"loss or gradient (last: {_where(where)}); checkpoint saved ({saved}); lower --lr, "
                    f"check the data or use --dtype fp32, then continue with --resume {out}"))
            if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
                save()
    finally:
        interrupt.restore()
        if logf is not None:
            logf.close()
        progress(None, None, None)

    after = evaluate(model, eval_batches(), device, dist=d)
    losses = [x for x in state["losses"] if math.isfinite(x)]
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
        "world_size": d.world,
        "global_batch": _global_batch(cfg, d.world),
        "comm_bytes": state["comm_bytes"],
        "wall_s": time.perf_counter() - t_start,
        "data": stats.to_dict(),
    }
    if scaler.enabled:
        metrics["loss_scale"] = scaler.scale

    def finish():
        save()
        handle.save_delta(out / "delta.safetensors", steps=step)
        atomic_write_json(out / "metrics.json", metrics)
        _plot(out)

    distributed.run_agreed(d, finish if main else None)
    return metrics


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _where(where: list[list[int]]) -> str:
    return ", ".join(f"epoch {e} batch {p}" for e, p in where)


def _log_data(what: str, stats, seq_len: int) -> None:
    log.info("%s: %s", what, stats.summary())
    if stats.truncated or stats.dropped:
        log.warning("%s: %d of %d rows longer than --seq-len %d were truncated, %d dropped (no loss token "
                    "left)", what, stats.truncated, stats.rows, seq_len, stats.dropped)


def _log_changes(prev: dict, cfg: TrainConfig, opt: UsafOptimizer, sched) -> None:
    """Log the settings that changed since the run was started; apply a new peak learning rate."""
    changed = _changed_settings(prev, cfg)
    if changed:
        log.warning("resume: changed settings: %s", _diff_text(prev, cfg, changed))
    if any(k in changed for k in ("lr", "router_lr", "steps", "epochs", "warmup")):
        sched.base_lrs = [cfg.lr, cfg.router_lr][: len(opt.opt.param_groups)]
        for g, base, f in zip(opt.opt.param_groups, sched.base_lrs, sched.lr_lambdas):
            g["lr"] = base * f(sched.last_epoch)


@contextlib.contextmanager
def _disk_full_is_an_error(out: Path):
    """A full disk while writing into --out is a one-line error that says what is intact."""
    try:
        yield
    except OSError as e:
        if not is_disk_full(e):
            raise
        last = checkpoint.latest(out)
        kept = f"the last complete checkpoint ({last}) is intact" if last else "no checkpoint was written yet"
        what = str(e) if e.filename else "no space left on device"
        raise RunError(f"{what}; {kept}; free some space, then continue with --resume {out}") from None


def _prepare_out(out: Path, cfg: TrainConfig, prev: dict | None, unreadable: list[Path]) -> None:
    """Create --out (all checks passed); --overwrite removes the previous run's files; a resumed run's
    leftovers of a kill (temporary files and directories, unreadable checkpoints) are cleaned."""
    if prev is None and cfg.overwrite and out.is_dir():
        import shutil

        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    for bad in unreadable:
        log.warning("moved the unreadable checkpoint %s to %s", bad, checkpoint.discard(bad))
    removed = checkpoint.clean(out)
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted run", len(removed))
    atomic_write_text(out / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))


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
    """Keep the log lines of steps <= ``step`` (those after the checkpoint are redone); a line cut short by
    a kill is dropped."""
    if not path.exists():
        return
    keep = []
    for ln in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(ln)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
            keep.append(ln)
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
    atomic_write(out / "loss.png", lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


__all__ = ["train", "RunError", "DataError", "Diverged", "LossScaler"]
