"""usaf inside ``transformers.Trainer`` and ``trl.SFTTrainer``: one call, :func:`attach`.

    trainer = SFTTrainer(model=model, args=args, train_dataset=ds)     # or transformers.Trainer(...)
    attach(trainer, usaf.UsafConfig(density=0.005))                    # the one usaf line
    trainer.train()

:func:`attach` checks the setup (nothing is written when it is refused), prepares the model in place
(``usaf.prepare``) and makes the trainer an instance of a subclass of its own class that:

- draws training batches in ``usaf train``'s order (:class:`usaf.data.batches.EpochOrder`, seeded with
  ``args.seed``): the same seed gives the same batches as ``usaf train --seed``;
- selects the active set on the first batches when the optimizer is created (``calib_batches`` batches of
  that order, as ``usaf train`` does), unless a checkpoint is being resumed;
- gives the Trainer usaf's compact AdamW (``args.learning_rate`` for the deltas, ``router_lr`` for the
  routers, ``args.weight_decay``, ``adam_beta1/2``, ``adam_epsilon``); the Trainer builds its own lr
  scheduler around it (``lr_scheduler_type``, warmup) and clips with ``max_grad_norm`` as usual;
- computes the training loss with usaf's chunked loss (no full logits), token-weighted over the step;
- runs RigL every ``reselect_every`` steps from a ``TrainerCallback`` (calibration batches drawn afresh with
  the seed ``args.seed + 7919 * (step + 1)``, as ``usaf train``);
- saves ``delta.safetensors`` as the model of every checkpoint (and of ``save_model``), and the optimizer,
  scheduler and RNG states as ``usaf_state.safetensors`` + ``usaf_state.json`` beside it: no pickle is
  written, and a resume reads these files only;
- writes usaf's ``log.jsonl`` (one line per step) into ``args.output_dir``.

Not served (refused with one line, exit code 2, see :class:`SetupError`): a model usaf cannot prepare (dense,
unknown family), an optimizer passed to the Trainer, fp16 (usaf's loss scaling cannot run inside the
Trainer's step), several processes, DeepSpeed / FSDP, a PEFT model.
"""

from __future__ import annotations

import json
import logging
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import Trainer, TrainerCallback

from ..config import UsafConfig
from ..data.batches import EpochOrder, epoch_order
from ..engine.families import UnsupportedModelError
from ..engine.loss import token_mean_loss
from ..engine.model import UsafModel, prepare
from ..engine.optim import UsafOptimizer
from ..engine.rigl import drop_fraction, reselect
from ..engine.select import select
from ..io import atomic_save_safetensors, atomic_write_json, read_safetensors
from ..train.evaluate import peak_memory_mb
from ..train.outputs import StepLog

log = logging.getLogger("usaf")

DELTA_FILE = "delta.safetensors"
STATE_FILE = "usaf_state.safetensors"
STATE_META = "usaf_state.json"


class SetupError(SystemExit):
    """A Trainer setup usaf cannot serve. Like ``argparse``, the one line ``usaf: error: ...`` is printed to
    stderr and the script stops with exit code 2; catch ``SetupError`` (a ``SystemExit``) to handle it."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _refuse(message: str):
    print(f"usaf: error: {message}", file=sys.stderr)
    raise SetupError(message)


def _check(trainer, model) -> None:
    if not isinstance(trainer, Trainer):
        _refuse(f"attach() takes a transformers.Trainer (or a subclass such as trl.SFTTrainer), got "
                f"{type(trainer).__name__}")
    if getattr(trainer, "usaf", None) is not None:
        _refuse("this trainer already runs usaf")
    opt = trainer.optimizer
    if opt is not None or getattr(trainer, "optimizer_cls_and_kwargs", None) is not None:
        what = type(opt).__name__ if opt is not None else "optimizer_cls_and_kwargs"
        _refuse(f"the Trainer was given an optimizer ({what}); usaf brings its own (AdamW over the active "
                f"deltas and the routers): remove optimizers=(...) / optimizer_cls_and_kwargs")
    args = trainer.args
    if args.fp16 or any(p.dtype == torch.float16 for p in model.parameters()):
        _refuse("fp16 is not supported under the Trainer (usaf's loss scaling cannot run inside its step): "
                "load the model in bfloat16 or float32 and leave fp16=False")
    if args.world_size > 1:
        _refuse(f"{args.world_size} processes: data parallel runs under the Trainer are not supported; use "
                f"`usaf train --nproc N`")
    if getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False):
        _refuse("DeepSpeed and FSDP are not supported with usaf")
    if hasattr(model, "peft_config"):
        _refuse("the model is a PEFT model; usaf trains the base model's experts itself: pass the plain model")


def attach(trainer: Trainer, config: UsafConfig | None = None, *, router_lr: float = 1e-4,
           reselect_every: int = 50, reselect_fraction: float = 0.3, calib_batches: int = 16) -> UsafModel:
    """Turn ``trainer`` (a ``transformers.Trainer`` or ``trl.SFTTrainer``, built but not yet trained) into a usaf
    run; returns the :class:`~usaf.engine.model.UsafModel` handle (``trainer.model`` is the same module).

    ``config``: engine settings (density, train_layers, quant, ...); the run settings that ``usaf train``
    takes as flags come from the Trainer's ``args`` (``learning_rate``, ``weight_decay``, ``seed``, steps,
    batch size, gradient accumulation, warmup and schedule), except ``router_lr``, ``reselect_every``,
    ``reselect_fraction`` and ``calib_batches`` (same meaning and defaults as ``usaf train``'s flags).

    Raises:
        SetupError: a setup usaf cannot serve (one line on stderr, exit code 2 if uncaught); usaf writes
            nothing.
    """
    model = trainer.model
    _check(trainer, model)
    config = config or UsafConfig()
    checks = [(router_lr >= 0, f"router_lr must be >= 0, got {router_lr}"),
              (reselect_every >= 0, f"reselect_every must be >= 0, got {reselect_every}"),
              (0 <= reselect_fraction <= 1, f"reselect_fraction must be in [0, 1], got {reselect_fraction}"),
              (calib_batches >= 1, f"calib_batches must be at least 1, got {calib_batches}")]
    for ok, msg in checks:
        if not ok:
            _refuse(msg)
    try:
        handle = prepare(model, config)
    except (UnsupportedModelError, ValueError) as e:
        _refuse(str(e).splitlines()[0])
    trainer.usaf = _Run(handle, router_lr, reselect_every, reselect_fraction, calib_batches)
    trainer.__class__ = _usaf_class(type(trainer))
    trainer.add_callback(_RiglCallback(trainer))
    return handle


class _Run:
    """What usaf keeps on the trainer (``trainer.usaf``)."""

    def __init__(self, handle: UsafModel, router_lr: float, reselect_every: int, reselect_fraction: float,
                 calib_batches: int):
        self.handle = handle
        self.router_lr, self.calib_batches = router_lr, calib_batches
        self.reselect_every, self.reselect_fraction = reselect_every, reselect_fraction
        self.opt: UsafOptimizer | None = None
        self.resumed = False  # active sets restored from a checkpoint: no selection
        self.step_loss, self.step_tokens, self.t0 = 0.0, 0, None
        self.log: StepLog | None = None
        self.reselections: list[dict] = []


_CLASSES: dict[type, type] = {}


def _usaf_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Usaf{cls.__name__}", (_UsafTrainer, cls), {"__module__": __name__})
    return _CLASSES[cls]


class _UsafTrainer:
    """The Trainer methods usaf replaces (placed before the trainer's own class in the MRO)."""

    usaf: _Run

    # -- data ----------------------------------------------------------------------------------------
    def _get_train_sampler(self, train_dataset=None):
        ds = train_dataset if train_dataset is not None else self.train_dataset
        if ds is None or not hasattr(ds, "__len__"):
            return super()._get_train_sampler(train_dataset)
        return EpochOrder(len(ds), self.args.seed)

    def usaf_calibration(self, step: int) -> list[dict]:
        """Calibration batches of the reselection after ``step`` (-1: the initial selection), collated by the
        Trainer's own collator, in a fresh order seeded with ``args.seed + 7919 * (step + 1)``, continuing into
        the next epochs' orders when one epoch has fewer batches (as ``usaf train``'s do)."""
        seed, n = self.args.seed + 7919 * (step + 1), self.usaf.calib_batches if step < 0 else 1

        def order(ds, epoch: int) -> list[int]:  # a plain list: the loader's own set_epoch cannot reset it
            return epoch_order(len(ds), seed, epoch).tolist()

        out: list[dict] = []
        epoch = 0
        while len(out) < n:  # past the end of an epoch into the next, as usaf train's batches go
            loader = self._get_dataloader(self.train_dataset, description="usaf calibration",
                                          batch_size=self._train_batch_size,
                                          sampler_fn=lambda ds, e=epoch: order(ds, e))
            before = len(out)
            for batch in loader:
                out.append(batch)
                if len(out) == n:
                    break
            if len(out) == before:  # an empty dataset
                break
            epoch += 1
        return out

    # -- optimizer -----------------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        if self.optimizer is None:
            run, args = self.usaf, self.args
            if not run.resumed:
                t0 = time.perf_counter()
                rep = select(run.handle, self.usaf_calibration(-1), loss_fn=token_mean_loss,
                             n_batches=run.calib_batches)
                log.info("selected %d of %d expert weights in %.1fs", rep["active"],
                         run.handle.expert_elements(), time.perf_counter() - t0)
            run.opt = UsafOptimizer(run.handle, lr=args.learning_rate, router_lr=run.router_lr,
                                    weight_decay=args.weight_decay, betas=(args.adam_beta1, args.adam_beta2),
                                    eps=args.adam_epsilon)
            self.optimizer = run.opt
        return self.optimizer

    def create_scheduler(self, num_training_steps, optimizer=None):
        """The Trainer's own scheduler (``lr_scheduler_type``, warmup), over the AdamW inside usaf's optimizer."""
        return super().create_scheduler(num_training_steps, optimizer=self.usaf.opt.torch_optimizer)

    # -- loss ----------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs or not model.training:  # evaluation: the Trainer's own loss, from full logits
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        run = self.usaf
        if run.t0 is None:
            run.t0 = time.perf_counter()
        n = None if num_items_in_batch is None else int(num_items_in_batch)
        batch = {k: inputs[k] for k in ("input_ids", "labels", "attention_mask") if k in inputs}
        loss = token_mean_loss(self.accelerator.unwrap_model(model), batch, n_tokens=n)
        run.step_loss += float(loss.detach())
        mask = batch.get("attention_mask")
        run.step_tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        return loss

    # -- checkpoints: delta.safetensors + usaf_state.{safetensors,json}; no pickle ------------------------
    def _save(self, output_dir=None, state_dict=None):
        out = Path(output_dir if output_dir is not None else self.args.output_dir)
        if not self.args.should_save:
            return
        out.mkdir(parents=True, exist_ok=True)
        self.usaf.handle.save_delta(out / DELTA_FILE, steps=self.state.global_step)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(str(out))
        (out / "training_args.json").write_text(self.args.to_json_string())

    def _save_optimizer_and_scheduler(self, output_dir):
        run, out = self.usaf, Path(output_dir)
        tensors = run.handle.delta_state()
        opt_state = run.opt.state_dict()
        tensors.update(opt_state["tensors"])
        tensors["rng::torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng::cuda{i}"] = s
        np_state = np.random.get_state()
        tensors["rng::numpy"] = torch.from_numpy(np_state[1].astype(np.int64))
        atomic_save_safetensors(tensors, out / STATE_FILE, metadata=run.handle.delta_metadata())
        meta = dict(opt_state["meta"], step=self.state.global_step, sched=self.lr_scheduler.state_dict(),
                    python_rng=_jsonable(random.getstate()), numpy_rng=[np_state[0], *map(_num, np_state[2:])],
                    base_fingerprint=run.handle.fingerprint, reselections=run.reselections)
        atomic_write_json(out / STATE_META, meta)

    def _save_rng_state(self, output_dir):  # in usaf_state.safetensors (above)
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        ckpt = Path(resume_from_checkpoint)
        if not (ckpt / STATE_FILE).is_file() or not (ckpt / STATE_META).is_file():
            raise ValueError(f"{ckpt} is not a usaf checkpoint (no {STATE_FILE} / {STATE_META})")
        tensors, _ = read_safetensors(ckpt / STATE_FILE)
        meta = json.loads((ckpt / STATE_META).read_text())
        run = self.usaf
        if meta.get("base_fingerprint") != run.handle.fingerprint:
            raise ValueError(f"{ckpt} was made for another base model (fingerprint {meta.get('base_fingerprint')}, "
                             f"this model is {run.handle.fingerprint})")
        run.handle.load_delta_state({k: v for k, v in tensors.items() if "::" not in k or k.startswith("router::")})
        run.resumed = True
        run.reselections = list(meta.get("reselections", []))

    def _load_optimizer_and_scheduler(self, checkpoint):
        if checkpoint is None:
            return
        ckpt = Path(checkpoint)
        tensors, _ = read_safetensors(ckpt / STATE_FILE)
        meta = json.loads((ckpt / STATE_META).read_text())
        self.usaf.opt.load_state_dict({"tensors": tensors, "meta": meta})
        self.lr_scheduler.load_state_dict(meta["sched"])
        for g, lr in zip(self.usaf.opt.param_groups, meta.get("lrs", [])):
            g["lr"] = lr

    def _load_rng_state(self, checkpoint):
        if checkpoint is None or not (Path(checkpoint) / STATE_FILE).is_file():
            return
        tensors, _ = read_safetensors(Path(checkpoint) / STATE_FILE)
        meta = json.loads((Path(checkpoint) / STATE_META).read_text())
        torch.set_rng_state(tensors["rng::torch"])
        if torch.cuda.is_available():
            states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng::cuda"))]
            if states:
                torch.cuda.set_rng_state_all(states)
        random.setstate(_tupled(meta["python_rng"]))
        name, pos, has_gauss, cached = meta["numpy_rng"]
        np.random.set_state((name, tensors["rng::numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))


class _RiglCallback(TrainerCallback):
    """Records usaf's ``log.jsonl`` line of every step and runs RigL every ``reselect_every`` steps."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kw):
        run = self.trainer.usaf
        run.log = StepLog(Path(args.output_dir), state.global_step, args.should_save)

    def on_step_end(self, args, state, control, **kw):
        trainer, run = self.trainer, self.trainer.usaf
        step, total = state.global_step, state.max_steps
        dt = time.perf_counter() - (run.t0 or time.perf_counter())
        rec = {"step": step, "loss": run.step_loss, "lr": run.opt.param_groups[0]["lr"],
               "tokens": run.step_tokens, "tokens_per_s": run.step_tokens / max(dt, 1e-9),
               "active": run.handle.active(), "peak_mem_mb": round(peak_memory_mb(args.device), 1)}
        if run.reselect_every and step % run.reselect_every == 0 and step < total:
            frac = drop_fraction(step, total, run.reselect_fraction)
            r = reselect(run.handle, run.opt, trainer.usaf_calibration(step), frac, loss_fn=token_mean_loss,
                         n_batches=1)
            rec["reselect"] = {k: r[k] for k in ("dropped", "grown", "seconds")}
            run.reselections.append({"step": step, **rec["reselect"]})
        if run.log is not None:
            run.log.write(rec)
        run.step_loss, run.step_tokens, run.t0 = 0.0, 0, None

    def on_save(self, args, state, control, **kw):
        if self.trainer.usaf.log is not None:
            self.trainer.usaf.log.sync()

    def on_train_end(self, args, state, control, **kw):
        if self.trainer.usaf.log is not None:
            self.trainer.usaf.log.close()
            self.trainer.usaf.log = None


def _num(x):
    return x.item() if hasattr(x, "item") else x


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tupled(x):
    return tuple(_tupled(v) for v in x) if isinstance(x, list) else x


__all__ = ["attach", "SetupError", "DELTA_FILE", "STATE_FILE", "STATE_META"]
