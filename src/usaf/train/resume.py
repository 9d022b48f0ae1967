"""Resuming a run: what must match, what may change, and which checkpoint to continue from.

A run is resumed only into the same job: settings that change the data stream or the trainable set
(``RESUME_KEYS``, ``RESUME_USAF_KEYS``) must match; the model, data and eval data are compared by content
(digests of the files, the tokenized examples, the config and the base weights' fingerprint), not by path;
the global batch (``--batch-size`` x ``--grad-accum`` x processes) must match, while its split may change.
Other settings (``--steps``, ``--lr``, ...) may change: they are logged, and a new learning rate applies
from the next step. Every refusal is a one-line :class:`RunError` before any weights are loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import yaml

from ..config import TrainConfig, UsafConfig, to_dict
from ..data.store import tokens_digest
from . import checkpoint

log = logging.getLogger("usaf")

RESUME_KEYS = ("seq_len", "seed")
RESUME_USAF_KEYS = ("density", "train_layers", "quant", "group_size", "quant_rounding", "train_router",
                    "attention_density", "shared_density", "shared_units")
# Compared by content (data files, tokenized data, model config, base weights), not by path.
RESUME_PATH_KEYS = ("model", "data", "eval_data")
_NOT_SETTINGS = ("resume", "overwrite", "quiet", "out")
# What a run saved before a setting existed trained with, where that differs from today's default.
_ABSENT_MEANS = {"shared_density": 0.0, "quant_rounding": "minmax"}


class RunError(ValueError):
    """A problem with the run's settings or output directory (shown as one line, exit code 2)."""


def check_out_dir(cfg: TrainConfig) -> dict | None:
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
        keys = [k for k in RESUME_USAF_KEYS if k != "quant_rounding" or cfg.usaf.quant == "4bit"]  # 4-bit only
        diffs += [f"usaf.{k}" for k in keys if str(_saved_usaf(prev, k)) != str(getattr(cfg.usaf, k))]
        if diffs:
            raise RunError(f"cannot resume {out}: settings differ ({diff_text(prev, cfg, diffs)}); "
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


def _saved_usaf(prev: dict, key: str):
    """Engine setting ``key`` of a saved run config; one the config lacks (a run from before the setting existed)
    is what such a run trained with (``_ABSENT_MEANS``, else the default)."""
    saved = prev.get("usaf") or {}
    return saved[key] if key in saved else _ABSENT_MEANS.get(key, getattr(UsafConfig, key))


def diff_text(prev: dict, cfg: TrainConfig, keys: list[str]) -> str:
    now = to_dict(cfg)
    before = [_saved_usaf(prev, k[5:]) if k.startswith("usaf.") else _get(prev, k) for k in keys]
    return ", ".join(f"{k}: {b!r} -> {_get(now, k)!r}" for k, b in zip(keys, before))


def changed_settings(prev: dict, cfg: TrainConfig) -> list[str]:
    now = to_dict(cfg)
    keys = [k for k in now if k not in _NOT_SETTINGS and k != "usaf"]
    keys += [f"usaf.{k}" for k in now["usaf"]]
    return [k for k in keys if str(_get(prev, k)) != str(_get(now, k))]


# ------------------------------------------------------------------------------------------- identities
def examples_digest(*example_lists) -> str:
    """Digest of the tokenized examples (lists of examples or token-store views): ``usaf.data.store``."""
    return tokens_digest(*example_lists)


def config_digest(model_cfg) -> str:
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


def check_identity(out: Path, saved: dict | None, now: dict, keys) -> None:
    if not saved:
        return
    for key, what in _IDENTITY:
        if key in keys and key in saved and saved[key] != now.get(key):
            a, b = (str(x)[:12] if x else x for x in (saved[key], now.get(key)))
            raise RunError(f"cannot resume {out}: " + what.format(a=a, b=b))


# --------------------------------------------------------------------------------------------- batches
def global_batch(cfg: TrainConfig, world: int) -> int:
    return cfg.batch_size * cfg.grad_accum * world


def check_global_batch(out: Path, prev: dict, meta: dict, cfg: TrainConfig, world: int) -> None:
    """A resumed run must keep the global batch (sequences per optimizer step); the split into --batch-size,
    --grad-accum and processes may change. The data position is stored in units of the checkpointed run's
    micro-batch (--batch-size; before the ranks took turns on one stream: --batch-size x processes) and must
    fall on a boundary of the new --batch-size."""
    pos = meta.get("batches") or {}
    old_unit = int(pos.get("batch_size", prev.get("batch_size") or cfg.batch_size))
    old = int(meta.get("global_batch") or old_unit * int(prev.get("grad_accum") or 1))  # older checkpoints: 1 rank
    old_world = int(meta.get("world_size") or 1)
    new = global_batch(cfg, world)
    if old != new:
        raise RunError(
            f"cannot resume {out}: the global batch changed ({old} -> {new} sequences per step = --batch-size "
            f"{cfg.batch_size} x --grad-accum {cfg.grad_accum} x {world} process(es)); the run was "
            f"checkpointed with {old_world} process(es): keep --batch-size x --grad-accum x processes = {old}")
    unit = cfg.batch_size
    if int(pos.get("position", 0)) * old_unit % unit:
        raise RunError(
            f"cannot resume {out}: its data position (epoch {pos.get('epoch')}, sequence "
            f"{int(pos.get('position', 0)) * old_unit}) is not a multiple of the new --batch-size ({unit}); "
            f"resume with --batch-size {old_unit}")


def convert_position(state: dict, unit: int) -> dict:
    """A Batches state saved with another per-micro-step batch, in units of ``unit`` (checked beforehand)."""
    old = int(state.get("batch_size", unit))
    if old == unit:
        return state
    return dict(state, position=int(state["position"]) * old // unit, batch_size=unit)


def resume_point(out: Path, prev: dict, cfg: TrainConfig, identity: dict, world: int = 1):
    """The newest good checkpoint of the run being resumed: (path, tensors, meta, damaged newer ones), or
    ``(None, None, None, [])`` when the run has none yet. A checkpoint that is truncated, fails its checksums
    or holds non-finite values is reported by name and the previous one is tried; when every checkpoint is
    damaged the resume is refused (:class:`RunError`, nothing changed). Refuses different data or model (by
    content), or a different global batch, before any weights are loaded."""
    unreadable, why = [], []
    for ckpt in checkpoint.complete(out):
        try:
            tensors, meta = checkpoint.read(ckpt)
        except (ValueError, OSError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            log.warning("checkpoint %s is damaged (%s); falling back to the previous one", ckpt.name, reason)
            unreadable.append(ckpt)
            why.append(f"{ckpt.name}: {reason}")
            continue
        saved = meta.get("identity")
        if saved is None:  # a checkpoint from before content identities: paths must match
            diffs = [k for k in RESUME_PATH_KEYS if str(prev.get(k)) != str(getattr(cfg, k))]
            if diffs:
                raise RunError(f"cannot resume {out}: settings differ ({diff_text(prev, cfg, diffs)})")
        check_identity(out, saved, identity, ("model_config", "data", "eval_data", "tokens"))
        check_global_batch(out, prev, meta, cfg, world)
        return ckpt, tensors, meta, unreadable
    if unreadable:
        raise RunError(f"cannot resume {out}: no good checkpoint ({len(unreadable)} damaged; newest "
                       f"{why[0]})")
    return None, None, None, unreadable
