"""``usaf export --format delta`` (a revertible delta file) and ``usaf apply`` (merge into / revert from a copy
of a checkpoint, byte-exact)."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import torch

from ..io import atomic_save_safetensors
from .hf import full_patch
from .layout import (
    BaseMismatchError,
    Checkpoint,
    ExportCheckError,
    ExportError,
    Run,
    Staged,
    check_out,
    disk_dtype,
    plan,
    read_delta,
    read_positions,
    write_checkpoint,
)
from .reference import (
    HF_TOLERANCE,
    check_base,
    compare_logits,
    hf_logits,
    merged_values,
    reference_logits,
    reference_model,
)


def export_delta(run: Run, out, overwrite: bool = False, check: bool = True) -> dict:
    """The delta file plus the on-disk values it replaces (for byte-exact revert and a cheap base check)."""
    ckpt = Checkpoint(run.base)
    check_out(out, overwrite)
    patches, maps = plan(run.tensors, run.meta, ckpt)
    check_base(run.base, run.meta, disk_dtype(ckpt, maps))  # the originals must come from the right base
    tensors = dict(run.tensors)
    for key, o in read_positions(ckpt, patches, run.tensors).items():
        tensors[f"{key}.original"] = o
    for disk, key in patches.routers.items():
        tensors[f"router_original::{key}"] = ckpt.get(disk)
    meta = dict(run.meta)
    meta.update({"revertible": "1", "layout": json.dumps({k: m.names[0] for k, m in maps.items()}),
                 "export_version": "1"})
    with Staged(out, overwrite, is_dir=False) as st:
        atomic_save_safetensors(tensors, st.path, metadata=meta)
        back, back_meta = read_delta(st.path)
        if set(back) != set(tensors) or any(not torch.equal(back[k], tensors[k]) for k in tensors):
            raise ExportCheckError("check failed: the written delta file does not read back identically; "
                                   "output removed")
        size = st.path.stat().st_size
    active = run.active()
    return {"out": str(out), "bytes": size, "active": active,
            "mb_per_million_active": size / 1e6 / max(active / 1e6, 1e-12)}


# ------------------------------------------------------------------------------------------------- apply

def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _count_diff(a: torch.Tensor, b: torch.Tensor) -> int:
    if a.dtype != b.dtype or a.shape != b.shape:
        return max(a.numel(), b.numel())
    return int((_bits(a) != _bits(b)).sum())


def apply_delta(model: str, delta, out, revert: bool = False, overwrite: bool = False, check: bool = True) -> dict:
    """Merge a delta into a copy of checkpoint ``model`` (full-precision rule), or take it out again (``revert``)."""
    tensors, meta = read_delta(delta)
    ckpt = Checkpoint(model)
    check_out(out, overwrite, ckpt.dir)
    run = Run(Path(delta), model, tensors, meta, torch.float32)
    patches, maps = plan(tensors, meta, ckpt)
    has_orig = meta.get("revertible") == "1"
    if revert and not has_orig:
        raise ExportError(f"{delta} carries no original values; make a revertible file with "
                          f"`usaf export RUN --format delta --out FILE`")
    current = read_positions(ckpt, patches, tensors)
    if has_orig:
        expect = {k: tensors[f"{k}.original"] for k in current}
        if revert:
            expect = {k: merged_values(v, run.stack(k)[1]) for k, v in expect.items()}
        bad = sum(_count_diff(current[k], expect[k]) for k in current)
        for disk, key in patches.routers.items():
            want = tensors[f"router_original::{key}"]
            if revert:
                want = run.routers[key].to(want.dtype).reshape(want.shape)
            bad += _count_diff(ckpt.get(disk), want)
        if bad:
            what = "does not contain this delta" if revert else "is not the base this delta was made for"
            raise BaseMismatchError(f"refused: {model} {what} ({bad} touched values differ)")
    ref = None
    if check and not revert:
        ref = reference_model(model, tensors, meta, disk_dtype(ckpt, maps), "none")  # checks the fingerprint
    elif not has_orig:
        check_base(model, meta, disk_dtype(ckpt, maps))
    if revert:
        def patch(name, t):
            if name in patches.routers:
                return tensors[f"router_original::{patches.routers[name]}"].reshape(t.shape).contiguous()
            t = t.clone()
            flat = t.view(-1)
            for key, pos, local in patches.experts[name]:
                flat[local] = tensors[f"{key}.original"][pos]
            return t
        prov = None
    else:
        patch = full_patch(run, patches)
        prov = {"format": "usaf-apply", "delta": str(delta), "base": str(model),
                "base_fingerprint": meta.get("base_fingerprint"), "base_weights": "full"}
    report = {"out": str(out), "revert": revert, "touched_tensors": len(patches.touched())}
    ids, want = reference_logits(ref, check and not revert)
    del ref
    gc.collect()
    with Staged(out, overwrite, is_dir=True, source=ckpt.dir) as st:
        write_checkpoint(ckpt, st.path, patches.touched(), patch, prov)
        if check and revert:
            check_base(str(st.path), meta, disk_dtype(ckpt, maps))
        elif check:
            report["check_error"] = compare_logits(want, hf_logits(st.path, ids), HF_TOLERANCE, "the merged")
    return report


