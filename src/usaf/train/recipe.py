"""The training run behind ``usaf train``: one recipe, read top to bottom.

    setup           check settings and --out, read the model config, tokenizer and data (nothing written yet);
                    load and prepare the model, build the frozen-prefix cache, decide checkpointing once
    load checkpoint (--resume) the active sets, values, routers, optimizer, schedule, data position and RNG
    select          or: eval before, then score and pick the active set
    train loop      step (forward, backward, gradient sum over ranks, AdamW), reselect, eval, checkpoint
    finish          eval after; last checkpoint, delta.safetensors, metrics.json, router_load.json, loss.png,
                    report.html

State lives on the :class:`Recipe` object. Resume checks are in ``resume``, run-directory files in
``outputs``, checkpoints in ``checkpoint``, data parallelism in ``distributed`` (every rank runs this same
recipe on its shard; rank 0 writes). Reliability (docs/reliability.md): every file is written atomically; a
run killed at any moment resumes from its newest good checkpoint bit-identically; a step with a
non-finite loss or gradient is skipped (``--max-skips`` in a row stop the run with a checkpoint); a state
with non-finite values is never saved, nor the outputs of a run whose final eval is not finite.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
import warnings
from pathlib import Path

import torch

from ..config import TrainConfig
from ..data.batches import Batches
from ..engine.checkpointing import enable_checkpointing
from ..engine.loss import token_mean_loss
from ..engine.optim import LossScaler, UsafOptimizer, make_scheduler, set_peak_lrs
from ..engine.rigl import drop_fraction, reselect
from ..engine.select import select
from ..load.stream import load_prepared
from ..load.tiers import Prefetcher
from ..memory.meter import PhaseMeter
from ..memory.policy import use_checkpointing
from ..memory.prefix import enable_prefix_cache, prefix_pays_off
from ..progress import progress_bars
from ..units import dtype_name
from . import checkpoint, distributed
from .evaluate import RouterLoad, evaluate_examples, peak_memory_mb
from .inputs import read_inputs
from .outputs import Progress, StepLog, disk_full_is_an_error, prepare_out, write_results
from .resume import (
    RunError,
    changed_settings,
    check_identity,
    check_out_dir,
    convert_position,
    diff_text,
    global_batch,
    resume_point,
)

log = logging.getLogger("usaf")


class Diverged(RunError):
    """Too many consecutive steps with a non-finite loss or gradient; a checkpoint was saved."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training: a checkpoint was saved at the last completed step."""


def train(cfg: TrainConfig) -> dict:
    """Run a full training job; returns the metrics written to ``metrics.json``.

    Launched by torchrun (``WORLD_SIZE`` > 1), every rank runs this same function: data parallel over the
    ranks (docs/distributed.md). A failure before training, on any rank, stops every rank.
    """
    t_start = time.perf_counter()
    d = distributed.init(cfg.device)
    level = log.level
    if not d.main:
        log.setLevel(logging.ERROR)  # rank 0 speaks for the run
    run = None
    try:
        run = Recipe(cfg, d)
        bars = False if cfg.quiet or not d.main else None  # the phase bars: on a terminal (or USAF_PROGRESS=1)
        with progress_bars(bars):
            run.setup()
        with disk_full_is_an_error(run.out), progress_bars(bars):
            distributed.run_agreed(d, run.prepare_out if d.main else None)
            if not run.load_checkpoint():
                run.select()
            with run.meter.phase("steps"):
                run.train_loop()
            return run.finish(t_start)
    finally:
        if run is not None:
            run.meter.stop()
        log.setLevel(level)
        distributed.shutdown(d)


class Recipe:
    def __init__(self, cfg: TrainConfig, d: distributed.Dist):
        self.cfg, self.d, self.out = cfg, d, Path(cfg.out)
        self.step = 0
        self.state = {"selection_s": 0.0, "reselection_s": 0.0, "skipped": 0, "consecutive_skips": 0,
                      "tokens": 0, "train_s": 0.0, "eval_ppl_before": None, "eval_loss_before": None,
                      "losses": [], "comm_bytes": 0}
        self.ckpt = self.ckpt_tensors = self.ckpt_meta = None
        self.unreadable: list[Path] = []
        self.meter = PhaseMeter().start()  # time and peak memory of each phase (metrics.json "phases")

    # ------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        with self.meter.phase("setup"):
            self._setup_inputs()
        self.handle = distributed.local_main_first(self.d, self._load_model)
        self.model = self.handle.model
        self.identity["base_fingerprint"] = self.handle.fingerprint
        cfg, d, inp = self.cfg, self.d, self.inputs
        if use_checkpointing(self.handle, cfg.checkpointing, cfg.batch_size, cfg.seq_len):  # decided once
            enable_checkpointing(self.handle)
        # The one-process stream of --batch-size micro-batches; rank r takes micro-batches r, r + N, r + 2N, ...
        self.batches = Batches(inp.train, cfg.batch_size * d.world, seed=cfg.seed, rank=d.rank,
                               world_size=d.world, pad_id=inp.pad_id)
        steps_per_epoch = max(1, self.batches.micro_batches // (cfg.grad_accum * d.world))
        self.total_steps = cfg.steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
        self.scaler = LossScaler(enabled=inp.dtype == torch.float16)

    def _setup_inputs(self) -> None:
        """Settings, --out, the data and tokenizer, and the checkpoint to resume from (nothing written yet)."""
        cfg, d = self.cfg, self.d
        cfg.validate()
        self.prev = distributed.run_agreed(d, lambda: check_out_dir(cfg), main_only=True)
        torch.manual_seed(cfg.seed)
        # each node's local rank 0 first: it writes the token store that the other ranks then open
        self.inputs = inp = distributed.local_main_first(d, lambda: read_inputs(cfg, d))
        self.device, self.identity = inp.device, inp.identity
        if d.on:
            log.info("data parallel: %d processes (%s), global batch %d = --batch-size %d x --grad-accum %d x %d",
                     d.world, "nccl" if d.device.type == "cuda" else "gloo", global_batch(cfg, d.world),
                     cfg.batch_size, cfg.grad_accum, d.world)
        if self.prev is not None:  # rank 0 reads the checkpoint; the others get it from rank 0
            read = {}

            def point():
                c, read["tensors"], m, u = resume_point(self.out, self.prev, cfg, self.identity, d.world)
                return c, m, u

            self.ckpt, self.ckpt_meta, self.unreadable = distributed.run_agreed(d, point, main_only=True)
            if self.ckpt is not None:
                self.ckpt_tensors = distributed.broadcast_tensors(read.get("tensors"), d)

    def _load_model(self):
        cfg, inp = self.cfg, self.inputs
        with self.meter.phase("load"):
            handle = load_prepared(cfg.model, cfg.usaf, inp.dtype, inp.device, cfg.trust_remote_code,
                                   device_memory=cfg.device_memory, host_memory=cfg.host_memory,
                                   prefix_mapped=cfg.prefix_cache)
            Prefetcher(handle)
        if self.ckpt is not None:
            check_identity(self.out, self.ckpt_meta.get("identity"),
                           dict(self.identity, base_fingerprint=handle.fingerprint), ("base_fingerprint",))
        if cfg.prefix_cache:
            per_step = cfg.batch_size * cfg.grad_accum * self.d.world
            visits = cfg.steps * per_step if cfg.steps else math.ceil(cfg.epochs * len(inp.train))
            if prefix_pays_off(len(inp.train), len(inp.eval), visits):
                with self.meter.phase("prefix"):  # the support probe and the cache's build (or reuse)
                    enable_prefix_cache(handle, inp.train, inp.eval, cfg.batch_size, inp.pad_id)
            else:
                log.info("frozen-prefix cache off: this run visits %d of %d training sequences, fewer than "
                         "building the cache would compute (the frozen layers run in each step instead)", visits,
                         len(inp.train))
        return handle

    def _optimizer(self) -> None:
        """AdamW and its schedule, built once the active sets exist (selection or resume)."""
        cfg = self.cfg
        self.opt = UsafOptimizer(self.handle, lr=cfg.lr, router_lr=cfg.router_lr, weight_decay=cfg.weight_decay,
                                 attention_lr=cfg.attention_lr or cfg.lr, shared_lr=cfg.shared_lr or cfg.lr,
                                 scaler=self.scaler)
        self.sched = make_scheduler(self.opt, int(cfg.warmup * self.total_steps), self.total_steps)

    def prepare_out(self) -> None:
        prepare_out(self.out, self.cfg, self.prev is not None, self.unreadable)

    def evaluate(self, load=None) -> dict:
        """The run's eval: this rank's shard of the eval rows (``usaf eval`` computes the same)."""
        cfg, inp = self.cfg, self.inputs
        return evaluate_examples(self.model, inp.eval, cfg.batch_size, inp.pad_id, self.device, self.d,
                                 offset=len(inp.train), max_batches=cfg.max_eval_batches, load=load)

    def eval_settings(self) -> dict:
        """What ``usaf eval --delta`` needs to reproduce this run's eval (saved in the delta's metadata)."""
        cfg = self.cfg
        return {"seq_len": cfg.seq_len, "batch_size": cfg.batch_size, "dtype": dtype_name(self.inputs.dtype),
                "seed": cfg.seed, "eval": "eval-data" if cfg.eval_data else "held-out",
                "max_eval_rows": cfg.max_eval_batches * cfg.batch_size * self.d.world}

    def calib(self, step: int, n: int) -> list[dict]:
        """This rank's ``n`` calibration micro-batches of the reselection at ``step`` (-1: the initial selection),
        drawn afresh: the one-process stream of a seed of their own, shared by the ranks like training's."""
        b = Batches(self.inputs.train, self.cfg.batch_size * self.d.world, seed=self.cfg.seed + 7919 * (step + 1),
                    rank=self.d.rank, world_size=self.d.world, pad_id=self.inputs.pad_id)
        return [b.next_batch() for _ in range(n)]

    # -------------------------------------------------------------------------------- load checkpoint
    def load_checkpoint(self) -> bool:
        """Continue from the checkpoint found at setup, if any; returns whether one was loaded."""
        cfg, d = self.cfg, self.d
        if self.ckpt is None:
            if self.prev is not None:
                log.info("no complete checkpoint in %s: starting from step 0", self.out)
            return False
        tensors, meta = self.ckpt_tensors, self.ckpt_meta
        checkpoint.load_deltas(tensors, self.handle)
        self._optimizer()  # over the restored active sets
        checkpoint.load_training(tensors, meta, self.opt, self.sched)
        self.ckpt_tensors = None
        self.step = meta["step"]
        self.batches.load_state_dict(convert_position(meta["batches"], self.batches.local_batch_size))
        self.state.update(meta["state"])
        log.info("resumed from %s at step %d", self.ckpt, self.step)
        changed = changed_settings(self.prev, cfg)
        if changed:
            log.warning("resume: changed settings: %s", diff_text(self.prev, cfg, changed))
        if any(k in changed for k in ("lr", "router_lr", "attention_lr", "shared_lr", "steps", "epochs", "warmup")):
            lrs = {"deltas": cfg.lr, "routers": cfg.router_lr, "attention": cfg.attention_lr or cfg.lr,
                   "shared": cfg.shared_lr or cfg.lr}
            set_peak_lrs(self.opt, self.sched, [lrs[n] for n in self.opt.group_names])
        if int(meta.get("world_size") or 1) != d.world:
            log.info("resume: %d process(es) -> %d (global batch %d kept)", int(meta.get("world_size") or 1),
                     d.world, global_batch(cfg, d.world))
        if self.state["consecutive_skips"]:
            log.info("resume: the count of consecutive skipped steps (%d) starts again at 0",
                     self.state["consecutive_skips"])
            self.state["consecutive_skips"] = 0
        if self.step >= self.total_steps:
            log.info("the run is already at step %d (--steps %d): finishing", self.step, self.total_steps)
        distributed.check_same_selection(self.handle, d)
        return True

    # -------------------------------------------------------------------------------------------- select
    def select(self) -> None:
        """Eval before training, then the initial selection (zero deltas on the chosen active set)."""
        cfg, d = self.cfg, self.d
        with self.meter.phase("eval_before"), RouterLoad(self.handle) as load:  # tokens per expert (report.html)
            before = self.evaluate(load)
        self.state["eval_ppl_before"], self.state["eval_loss_before"] = before["ppl"], before["loss"]
        self.state["router_load_before"] = load.to_lists(d)
        log.info("eval before: ppl %.3f (%d tokens)", before["ppl"], before["tokens"])
        # --calib-batches micro-batches of --batch-size in all, rounded up to whole global steps (--grad-accum x
        # processes), spread over the ranks; select sums the scores in the one-process order
        n = calib_batches(cfg.calib_batches, cfg.grad_accum, d.world)
        with self.meter.phase("select"):
            rep = select(self.handle, self.calib(-1, n), loss_fn=token_mean_loss)
        digest = distributed.check_same_selection(self.handle, d)
        self.state["selection_s"] = rep["seconds"]
        log.info("selected %d of %d expert weights in %.1fs%s", rep["active"], self.handle.expert_elements(),
                 rep["seconds"], f" (same on all {d.world} ranks: {digest})" if d.on else "")
        self._optimizer()  # over the new active sets

    # ---------------------------------------------------------------------------------------- train loop
    def train_loop(self) -> None:
        cfg, d, state = self.cfg, self.d, self.state
        self.model.train()
        self.log = StepLog(self.out, self.step, d.main, cfg.report_to)
        progress = Progress(self.total_steps, self.step, cfg.quiet or not d.main)
        interrupt = _InterruptFlag()
        try:
            while self.step < self.total_steps:
                rec = self.train_step(interrupt)
                step = self.step
                if cfg.reselect_every and step % cfg.reselect_every == 0 and step < self.total_steps:
                    frac = drop_fraction(step, self.total_steps, cfg.reselect_fraction)
                    # one global step's micro-batches: --grad-accum on each rank
                    r = reselect(self.handle, self.opt, self.calib(step, cfg.grad_accum), frac,
                                 loss_fn=token_mean_loss)
                    distributed.check_same_selection(self.handle, d)
                    state["reselection_s"] += r["seconds"]
                    rec["reselect"] = {k: r[k] for k in ("dropped", "grown", "seconds")}
                if cfg.eval_every and step % cfg.eval_every == 0 and step < self.total_steps:
                    ev = self.evaluate()
                    rec["eval_loss"], rec["eval_ppl"] = ev["loss"], ev["ppl"]
                self.log.write(rec)
                progress.update(step, rec["loss"], state["tokens"] / max(state["train_s"], 1e-9))
                if cfg.max_skips and state["consecutive_skips"] >= cfg.max_skips:
                    saved = self.save()
                    raise self._agreed(Diverged(
                        f"stopped at step {step}: {state['consecutive_skips']} consecutive steps had a non-finite "
                        f"loss or gradient (last: {_where(self.where)}); checkpoint saved ({saved}); lower --lr, "
                        f"check the data or use --dtype fp32, then continue with --resume {self.out}"))
                if cfg.save_every and step % cfg.save_every == 0 and step < self.total_steps:
                    self.save()
        finally:
            interrupt.restore()
            self.log.close()
            progress.close()

    def train_step(self, interrupt) -> dict:
        """One optimizer step over --grad-accum micro-batches on every rank; returns its log record."""
        cfg, d, state, opt = self.cfg, self.d, self.state, self.opt
        t0 = time.perf_counter()
        start = self.batches.state_dict()
        where, micro = [], []
        for _ in range(cfg.grad_accum):
            pos = self.batches.state_dict()
            where.append([pos["epoch"], pos["position"]])
            micro.append(self.batches.next_batch())
        # The step's loss tokens over all ranks (and whether any rank was interrupted): one small collective;
        # each rank divides its summed loss by the global count.
        n_tok, tokens, stop = distributed.all_sum_many(
            [sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro),
             sum(int(b["attention_mask"].sum()) for b in micro), float(interrupt.set)], d)
        n_tok, tokens = int(n_tok), int(tokens)
        if stop:
            self.batches.load_state_dict(start)  # the checkpoint is taken before this step
            self.save()
            raise self._agreed(Interrupted(f"interrupted; checkpoint saved at step {self.step}; continue with "
                                           f"--resume {self.out}"))
        # Ranks: the gradients (values + routers) and the loss summed over the ranks micro-batch by micro-batch,
        # in the order one process accumulates them (micro-batch k of rank r is its micro-batch k * N + r).
        grads = distributed.GradientSum(opt.values + opt.routers, d) if d.on else None
        loss_sum = 0.0
        for b in micro:
            loss = token_mean_loss(self.model, b, n_tokens=n_tok)
            opt.scale_loss(loss).backward()
            loss_sum += float(loss.detach())
            if grads is not None:
                grads.add(float(loss.detach()))
        comm, loss_val = grads.finish() if grads is not None else (0, loss_sum)
        state["comm_bytes"] = comm + (8 * 3 if d.on else 0)  # + the token counts above
        scale = opt.scaler.scale
        stepped = opt.step(loss_val)
        if stepped:
            state["consecutive_skips"] = 0
        else:
            state["skipped"] += 1
            overflow = opt.scaler.enabled and math.isfinite(loss_val) and scale > 1.0
            if not overflow:
                state["consecutive_skips"] += 1
            log.warning("step %d: %s, step skipped (%s)%s", self.step + 1,
                        "non-finite gradient" if math.isfinite(loss_val) else f"non-finite loss ({loss_val})",
                        _where(where), f"; fp16 loss scale {scale:g} -> {opt.scaler.scale:g}" if overflow else "")
        opt.zero_grad()
        with warnings.catch_warnings():  # a skipped first step would make torch warn about the order
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
            self.sched.step()
        self.step += 1
        dt = time.perf_counter() - t0
        state["tokens"] += tokens
        state["train_s"] += dt
        state["losses"].append(loss_val)
        rec = {"step": self.step, "loss": loss_val, "lr": opt.param_groups[0]["lr"], "tokens": tokens,
               "tokens_per_s": tokens / dt, "active": self.handle.active(),
               "peak_mem_mb": round(peak_memory_mb(self.device), 1), "skipped": not stepped,
               "comm_bytes": state["comm_bytes"]}
        if not stepped:
            rec["batches"] = where  # [epoch, batch index within the epoch] of each micro-batch
        if opt.scaler.enabled:
            rec["loss_scale"] = opt.scaler.scale
        self.where = where
        return rec

    def _agreed(self, e: BaseException) -> BaseException:  # every rank stops; rank 0 reports it
        return e if self.d.main or isinstance(e, KeyboardInterrupt) else distributed.PeerFailed(str(e))

    # ---------------------------------------------------------------------------------------------- save
    def save(self) -> Path | None:
        """A checkpoint of the current step (rank 0 writes it)."""
        if not self.d.main:
            return None
        self.log.sync()  # the log lines up to the checkpoint survive a power loss too
        extra = {"batches": self.batches.state_dict(), "state": self.state, "identity": self.identity,
                 "global_batch": global_batch(self.cfg, self.d.world), "world_size": self.d.world}
        return checkpoint.save(self.out, self.step, self.handle, self.opt, self.sched, extra,
                               keep=self.cfg.keep_checkpoints)

    def finish(self, t_start: float) -> dict:
        """Eval after training; the last checkpoint, the delta file, metrics.json and loss.png. A final eval
        that is not finite, or no finite loss at all, writes nothing: the last good ones stay (exit code 2)."""
        cfg, d, state = self.cfg, self.d, self.state
        with self.meter.phase("eval_after"), RouterLoad(self.handle) as load:
            after = self.evaluate(load)
        router_load = {"before": state.get("router_load_before"), "after": load.to_lists(d)}
        losses = [x for x in state["losses"] if math.isfinite(x)]
        if not math.isfinite(after["loss"]) or (state["losses"] and not losses):
            last = checkpoint.latest(self.out)
            what = (f"the final eval loss is not finite ({after['loss']})" if not math.isfinite(after["loss"])
                    else f"no step of the run had a finite loss ({len(state['losses'])} steps)")
            raise self._agreed(Diverged(
                f"{what}: no delta, metrics or checkpoint written"
                + (f"; the last good checkpoint ({last}) is kept" if last else "")
                + "; lower --lr, check the data or use --dtype fp32"))
        metrics = {
            "loss_first": losses[0] if losses else None,
            "loss_last10": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
            "eval_ppl_before": state["eval_ppl_before"], "eval_ppl_after": after["ppl"],
            "eval_loss_before": state["eval_loss_before"], "eval_loss_after": after["loss"],
            "eval_tokens": after["tokens"],
            "tokens_per_s": state["tokens"] / max(state["train_s"], 1e-9),
            "peak_rss_mb": round(peak_memory_mb("cpu"), 1), "peak_device_mb": round(peak_memory_mb(self.device), 1),
            "active_elements": self.handle.active(), "expert_elements": self.handle.expert_elements(),
            "selection_s": state["selection_s"], "reselection_s": state["reselection_s"],
            "skipped_steps": state["skipped"], "steps": self.step, "train_tokens": state["tokens"],
            "world_size": d.world, "global_batch": global_batch(cfg, d.world), "comm_bytes": state["comm_bytes"],
            "wall_s": time.perf_counter() - t_start, "data": self.inputs.stats.to_dict(),
            "phases": self.meter.phases,  # this run's (a resumed run: from the resume on)
        }
        if self.opt.scaler.enabled:
            metrics["loss_scale"] = self.opt.scaler.scale

        def write():
            self.save()
            self.handle.save_delta(self.out / "delta.safetensors", steps=self.step,
                                   eval_settings=json.dumps(self.eval_settings()))
            write_results(self.out, metrics, router_load)

        distributed.run_agreed(d, write if d.main else None)
        return metrics


def calib_batches(calib: int, grad_accum: int, world: int) -> int:
    """Micro-batches each rank scores for the initial selection: ``calib`` rounded up to whole global steps
    (``grad_accum x world`` micro-batches), so that N ranks score the micro-batches of one process with
    ``--grad-accum grad_accum x N``."""
    return math.ceil(calib / (grad_accum * world)) * grad_accum


def _where(where: list[list[int]]) -> str:
    return ", ".join(f"epoch {e} batch {p}" for e, p in where)


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


__all__ = ["train", "Recipe", "RunError", "Diverged", "Interrupted", "calib_batches"]
