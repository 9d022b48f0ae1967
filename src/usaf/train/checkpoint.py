"""Training checkpoints: everything needed to continue as if nothing happened.

A checkpoint is a directory ``checkpoints/step-XXXXXXX/`` holding ``state.safetensors`` (delta indices and
values, routers, and the optimizer's tensors: AdamW moments, router masters; RNG states) and ``state.json``
(step, schedule position, data position, counters, the optimizer's step counts, learning rates and loss
scale, the identity of the data and model). It is written under a
temporary name (``.tmp-step-...``), fsynced and renamed, so a run killed at any moment leaves only complete
checkpoints; the newest ``keep`` are kept. Temporary directories left by a killed run are ignored by
:func:`latest` and removed by :func:`clean`.

Integrity: ``state.safetensors`` records the sha256 of every tensor (``usaf.integrity``) and ``state.json``
the sha256 of its own content (``checksum``); :func:`read` verifies both and raises ``ValueError`` naming the
file (and tensor) that was damaged after it was written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from ..engine.model import UsafModel
from ..engine.optim import UsafOptimizer
from ..integrity import IntegrityError
from ..io import (
    DiskFullError,
    _fsync_dir,
    atomic_save_safetensors,
    atomic_write_json,
    check_safetensors,
    read_safetensors,
    remove_stale_temps,
)


class NonFiniteState(ValueError):
    """The training state holds NaN or infinite values: it is not saved (one line, exit code 2)."""


def save(out_dir, step: int, handle: UsafModel, opt: UsafOptimizer, sched, state: dict, keep: int = 2) -> Path:
    """Write ``out_dir/checkpoints/step-<step>`` atomically, then prune all but the newest ``keep``.

    On any failure (e.g. a full disk) the temporary directory is removed and every existing checkpoint is
    left as it was. A state with a non-finite value is not saved (:class:`NonFiniteState`).
    """
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}-{os.getpid()}"
    old = root / f".old-step-{step:07d}-{os.getpid()}"
    tensors = handle.delta_state()
    opt_state = opt.state_dict()
    tensors.update(opt_state["tensors"])
    bad = non_finite(tensors)
    if bad is not None:
        last = latest(out_dir)
        raise NonFiniteState(f"not saving checkpoint {final.name}: {bad} holds non-finite values; "
                             + (f"the last good checkpoint ({last}) is kept" if last else "no checkpoint was kept"))
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        tensors["rng::torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng::cuda{i}"] = s
        atomic_save_safetensors(tensors, tmp / "state.safetensors", metadata=handle.delta_metadata())
        meta = dict(state, step=step, sched=sched.state_dict() if sched else None, **opt_state["meta"])
        meta = json.loads(json.dumps(meta))  # as it reads back (tuples are lists), for its checksum
        atomic_write_json(tmp / "state.json", dict(meta, checksum=_json_checksum(meta)))
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again (a resumed run that ends where it resumed)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not final.exists():
            os.replace(old, final)
        if isinstance(e, DiskFullError):
            raise DiskFullError(f"checkpoint {final}") from None
        raise
    shutil.rmtree(old, ignore_errors=True)
    if keep > 0:
        for d in complete(out_dir)[keep:]:
            shutil.rmtree(d, ignore_errors=True)
    return final


def _is_complete(d: Path) -> bool:
    return (d / "state.json").is_file() and (d / "state.safetensors").is_file()


def complete(out_dir) -> list[Path]:
    """Complete checkpoints (both files present), newest first."""
    root = Path(out_dir) / "checkpoints"
    dirs = [d for d in root.glob("step-*") if d.is_dir() and d.name[5:].isdigit() and _is_complete(d)]
    return sorted(dirs, key=lambda d: int(d.name[5:]), reverse=True)


def latest(out_dir) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = complete(out_dir)
    return found[0] if found else None


def clean(out_dir) -> list[Path]:
    """Remove what a killed run left behind: temporary checkpoint directories (``.tmp-*``, ``.old-*``),
    incomplete ``step-*`` directories, and stale temporary files of atomic writes. Returns what was removed."""
    root = Path(out_dir) / "checkpoints"
    removed = remove_stale_temps(out_dir)
    if root.is_dir():
        for d in root.iterdir():
            if d.is_dir() and (d.name.startswith((".tmp-", ".old-")) or
                               (d.name.startswith("step-") and not _is_complete(d))):
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d)
            elif d.is_dir() and d.name.startswith("step-"):
                removed += remove_stale_temps(d)
        removed += remove_stale_temps(root)
    return removed


def discard(ckpt: Path) -> Path:
    """Move an unreadable checkpoint aside (``.corrupt-step-...``) so it is neither used nor pruned into."""
    target = ckpt.with_name(f".corrupt-{ckpt.name}")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(ckpt, target)
    return target


def _json_checksum(meta: dict) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def read_meta(ckpt: Path) -> dict:
    """``state.json`` of a checkpoint (cheap: no tensors), its checksum verified."""
    path = Path(ckpt) / "state.json"
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"{path} is not valid JSON") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path} is not a checkpoint state")
    want = meta.pop("checksum", None)
    if want is not None and want != _json_checksum(meta):
        raise IntegrityError(f"{path} is corrupted: it does not match its checksum")
    return meta


def non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating tensor with a NaN or infinite value, or None."""
    for k, v in tensors.items():
        if v.is_floating_point() and v.numel() and not bool(torch.isfinite(v).all()):
            return k
    return None


def read(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and ``state.json`` of a checkpoint, checksums verified; ``ValueError`` if either is damaged."""
    path = Path(ckpt) / "state.safetensors"
    check_safetensors(path)
    tensors, _ = read_safetensors(path)
    bad = non_finite(tensors)
    if bad is not None:
        raise ValueError(f"{path} holds non-finite values (tensor {bad})")
    return tensors, read_meta(ckpt)


@torch.no_grad()
def load_deltas(tensors: dict[str, torch.Tensor], handle: UsafModel) -> None:
    """Restore the active sets, delta values and routers (before the optimizer is built)."""
    handle.load_delta_state({k: v for k, v in tensors.items() if "::" not in k or k.startswith("router::")})


def load_training(tensors: dict[str, torch.Tensor], meta: dict, opt: UsafOptimizer, sched) -> None:
    """Restore the optimizer (moments, router masters, learning rates, loss scale), schedule and RNG states."""
    opt.load_state_dict({"tensors": tensors, "meta": meta})
    if sched is not None and meta.get("sched"):
        sched.load_state_dict(meta["sched"])
    for g, lr in zip(opt.param_groups, meta.get("lrs", [])):  # the schedule's state sets them too
        g["lr"] = lr
    torch.set_rng_state(tensors["rng::torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng::cuda"))]
        if states:
            torch.cuda.set_rng_state_all(states)
