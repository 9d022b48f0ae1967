"""``usaf export --format hf``: the merged model as a checkpoint in the source's own layout.

- ``hf``: a full checkpoint in the *source's own on-disk layout* (same tensor names, shapes, dtypes, shards
  and index). The fused in-memory delta indices ``[E, R, C]`` are mapped back onto the on-disk tensors
  (per-expert ``experts.N.gate_proj/up_proj/down_proj`` or mixtral ``w1/w3/w2``: gate_up rows ``[0, I)`` are
  gate, ``[I, 2I)`` up; fused families keep their fused names). Written shard by shard: a shard with nothing
  to patch is copied as a file, the others are read with ``safe_open``, patched and written atomically.
- ``delta``: the delta file plus the on-disk values it replaces (``<stack>.original``,
  ``router_original::<name>``), so that ``usaf apply --revert`` restores the original bytes exactly and
  ``usaf apply`` can tell the wrong base from the right one without loading it.
- ``gguf``: see ``usaf.gguf_export``.

Base weights (``--base-weights``): ``full`` (default) adds the deltas to the original full-precision
weights at the active positions (``w[i] = round(w[i] + delta[i])``, everything else untouched);
``dequantized`` writes the expert weights training saw (the dequantized 4/8-bit base plus the deltas).
docs/export.md has the measurement behind the default.

Every export ends with a check: what was written is reloaded (transformers for hf, llama.cpp or the gguf
reader for gguf) and its logits are compared with usaf's in-memory merged model; a failed check removes the
output and raises ``ExportCheckError`` (a ``ValueError``: one line, exit code 2 on the command line).
"""

from __future__ import annotations

import gc

import torch

from .layout import (
    Checkpoint,
    ExportError,
    Patches,
    Run,
    Staged,
    check_out,
    disk_dtype,
    plan,
    stack_map,
    write_checkpoint,
)
from .reference import (
    BASE_WEIGHTS,
    DEFAULT_BASE_WEIGHTS,
    HF_TOLERANCE,
    check_base,
    compare_logits,
    hf_logits,
    merged_values,
    reference_logits,
    reference_model,
)


def full_patch(run: Run, patches: Patches):
    def patch(name: str, t: torch.Tensor) -> torch.Tensor:
        if name in patches.routers:
            return run.routers[patches.routers[name]].to(t.dtype).reshape(t.shape).contiguous()
        t = t.clone()
        flat = t.view(-1)
        for key, pos, local in patches.experts[name]:
            flat[local] = merged_values(flat[local], run.stack(key)[1][pos])
        return t

    return patch


def _dequantized_patch(run: Run, patches: Patches, maps: dict, ref):
    """Replace every expert tensor by the effective weights of usaf's (quantized) model, cast to disk dtype.

    ``maps``: ``{stack key: (experts module, stack name, StackMap)}``."""
    where = {}
    for ex, stack, m in maps.values():
        for i, disk in enumerate(m.names):
            where[disk] = (ex, stack, int(m.starts[i]), int(m.starts[i + 1]))

    def patch(name: str, t: torch.Tensor) -> torch.Tensor:
        if name in patches.routers:
            return run.routers[patches.routers[name]].to(t.dtype).reshape(t.shape).contiguous()
        ex, stack, a, b = where[name]
        w = ex.frozen[stack].tensor.reshape(-1)[a:b]
        return w.to(t.dtype).reshape(t.shape).contiguous()

    return patch, set(where)



# ------------------------------------------------------------------------------------------- export hf
def export_hf(run: Run, out, base_weights: str = DEFAULT_BASE_WEIGHTS, overwrite: bool = False,
              check: bool = True) -> dict:
    """Write the merged model as a checkpoint in the source's own layout; returns a small report."""
    if base_weights not in BASE_WEIGHTS:
        raise ExportError(f"--base-weights must be one of {BASE_WEIGHTS}, got {base_weights!r}")
    ckpt = Checkpoint(run.base)
    check_out(out, overwrite, ckpt.dir)
    patches, maps = plan(run.tensors, run.meta, ckpt)
    dequant = base_weights == "dequantized" and run.meta.get("quant", "none") != "none"
    if not (check or dequant):  # only the fingerprint is needed
        check_base(run.base, run.meta, disk_dtype(ckpt, maps))
        ref = None
    else:
        ref = reference_model(run.base, run.tensors, run.meta, disk_dtype(ckpt, maps),
                              run.meta.get("quant") if dequant else "none", run.train_dtype if dequant else None)
    if dequant:  # every MoE layer's experts were quantized in training, not only the trained ones

        transposed = ref.transposed
        all_maps = {m.key(n): (m.experts, n, stack_map(m.key(n), m.experts.shape(n), ckpt, transposed))
                    for m in ref.layers for n in m.experts.names}
        patch, expert_names = _dequantized_patch(run, patches, all_maps, ref)
        touched = expert_names | set(patches.routers)
    else:
        patch, touched = full_patch(run, patches), patches.touched()
    base_weights = "dequantized" if dequant else "full"
    prov = {"format": "usaf-export-hf", "delta": str(run.delta), "base": str(run.base),
            "base_fingerprint": run.meta.get("base_fingerprint"), "base_weights": base_weights,
            "active": run.active()}
    report = {"out": str(out), "base_weights": base_weights, "touched_tensors": len(touched),
              "shards": len(ckpt.files)}
    ids, want = reference_logits(ref, check)
    if not dequant:  # full: the shards are patched from disk + delta alone; peak memory ~ one shard
        del ref
        gc.collect()
    with Staged(out, overwrite, is_dir=True, source=ckpt.dir) as st:
        write_checkpoint(ckpt, st.path, touched, patch, prov)
        if check:
            report["check_error"] = compare_logits(want, hf_logits(st.path, ids), HF_TOLERANCE, "the export's")
    return report


