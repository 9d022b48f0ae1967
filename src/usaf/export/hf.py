"""Export a trained delta: ``usaf export`` (hf | delta | gguf) and ``usaf apply`` (merge / revert).

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
import json
import logging
from pathlib import Path

import torch

from ..io import atomic_save_safetensors
from .layout import (  # noqa: F401 - re-exported: the public names of usaf export
    NAMED_DTYPES,
    PROVENANCE,
    BaseMismatchError,
    Checkpoint,
    ExportCheckError,
    ExportError,
    Patches,
    Run,
    StackMap,
    Staged,
    check_out,
    disk_dtype,
    load_run,
    plan,
    read_delta,
    read_positions,
    stack_map,
    write_checkpoint,
)

log = logging.getLogger("usaf")

BASE_WEIGHTS = ("full", "dequantized")
DEFAULT_BASE_WEIGHTS = "full"
# Relative logit tolerance of the reload check (fp32 forward of identical weights on both sides).
HF_TOLERANCE = 1e-4


def merged_values(orig: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``round_to_dtype(orig + delta)``: the formula training uses (``SparseDelta.add_to``)."""
    return (orig.float() + values).to(orig.dtype)


def _full_patch(run: Run, patches: Patches):
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
    """Replace every expert tensor by the effective weights of usaf's (quantized) model, cast to disk dtype."""
    layers = {m.prefix: m.experts for m in ref.layers}
    where = {}
    for key, m in maps.items():
        for i, disk in enumerate(m.names):
            where[disk] = (key, int(m.starts[i]), int(m.starts[i + 1]))

    def patch(name: str, t: torch.Tensor) -> torch.Tensor:
        if name in patches.routers:
            return run.routers[patches.routers[name]].to(t.dtype).reshape(t.shape).contiguous()
        key, a, b = where[name]
        prefix, stack = key.rsplit(".", 1)
        w = layers[prefix].frozen[stack].tensor.reshape(-1)[a:b]
        return w.to(t.dtype).reshape(t.shape).contiguous()

    return patch, set(where)


# ------------------------------------------------------------------------------- usaf's in-memory model
class _Cast:
    """A model seen through a dtype cast (what loading it at that dtype would give): for fingerprints."""

    def __init__(self, model, dtype):
        self.model, self.dtype = model, dtype

    def named_parameters(self, *a, **k):
        for n, p in self.model.named_parameters(*a, **k):
            yield n, p.detach().to(self.dtype)


def _fingerprint_as(model, family, dtype) -> str:
    """``usaf.engine.model.fingerprint`` of ``model`` as if it had been loaded at ``dtype``."""
    from ..engine import model as usaf_model

    sample_index = getattr(usaf_model, "sample_index", None)
    if sample_index is None:  # older fingerprint(): hash a cast view of the model
        return usaf_model.fingerprint(_Cast(model, dtype), family)
    samples = {n: p.detach().reshape(-1)[sample_index(p.numel())].to(dtype) for n, p in model.named_parameters()}
    return usaf_model.fingerprint(model, family, samples)


def check_fingerprint(model, meta: dict, where: str) -> None:
    """Refuse a base whose fingerprint (at any load dtype) differs from the delta's ``base_fingerprint``."""
    from ..engine.families import family_for

    want = meta.get("base_fingerprint")
    family = family_for(model.config)
    if family.model_type != meta.get("model_type", family.model_type):
        raise BaseMismatchError(f"the delta was made for a {meta.get('model_type')} model, {where} is "
                                f"{family.model_type}")
    got = []
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        got.append(_fingerprint_as(model, family, dtype))
        if got[-1] == want:
            return
    raise BaseMismatchError(f"the delta was made for another base model than {where} "
                            f"(fingerprint {want}, {where} is {got[0]})")


def _check_base(base: str, meta: dict, dtype) -> None:
    from ..load.hf import load_model

    model = load_model(base, dtype=dtype, device="cpu")
    check_fingerprint(model, meta, base)
    del model
    gc.collect()


def reference_model(base: str, tensors: dict, meta: dict, dtype, quant: str = "none", compute_dtype=None):
    """usaf's model of ``base`` with the delta folded in: what an export must reproduce.

    The model is loaded at ``dtype`` (the on-disk dtype) and its fingerprint checked. With ``quant`` set
    (``dequantized`` base weights), the expert stacks are first cast to ``compute_dtype`` (training's dtype)
    and quantized exactly as training did. Every stack is then replaced by its effective dense weights
    (base + delta, rounded to ``compute_dtype`` as in training, then to ``dtype``), so
    ``handle.layers[i].experts.frozen[name].tensor`` holds what an export writes.
    """
    from ..config import UsafConfig
    from ..engine.experts import NAMES
    from ..engine.families import family_for, get_path
    from ..engine.model import decoder_layers, prepare
    from ..engine.store import DenseStack
    from ..load.hf import load_model

    compute_dtype = compute_dtype or dtype
    model = load_model(base, dtype=dtype, device="cpu")
    check_fingerprint(model, meta, base)
    if quant != "none":  # training loaded (and so quantized) the experts at its compute dtype
        family = family_for(model.config)
        for layer in decoder_layers(model):
            stock = get_path(get_path(layer, family.block) or layer, family.experts)
            for name in NAMES:
                p = getattr(stock, name, None) if stock is not None else None
                if p is not None and p.dim() == 3:
                    p.data = p.data.to(compute_dtype)
    cfg = UsafConfig(density=float(meta.get("density", 0.005)), train_layers=meta.get("train_layers", "all"),
                     quant=quant, group_size=int(meta.get("group_size", 64)),
                     train_router=meta.get("train_router", "True") == "True")
    handle = prepare(model, cfg)
    handle.load_delta_state({k: v for k, v in tensors.items()
                             if k.startswith("router::") or k.endswith((".indices", ".values"))})
    cpu = torch.device("cpu")
    with torch.no_grad():
        for m in handle.layers:
            ex = m.experts
            for name in list(ex.frozen):
                ex.frozen[name] = DenseStack(ex.weight(name, 0, ex.num_experts, compute_dtype, cpu).to(dtype))
            ex.merged = {}  # deltas are folded into the frozen stacks: the forward must not add them again
    return handle


def probe_ids(vocab_size: int, n: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab_size, (2, n), generator=g)


@torch.no_grad()
def fp32_logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.float().eval()
    return model(input_ids=ids).logits.float()


def compare_logits(ref: torch.Tensor, got: torch.Tensor, tol: float, what: str) -> float:
    """Max |difference| relative to the largest reference logit; raises ExportCheckError above ``tol``."""
    if got.shape != ref.shape:
        raise ExportCheckError(f"check failed: {what} logits have shape {tuple(got.shape)}, expected "
                               f"{tuple(ref.shape)}; output removed")
    err = float((ref - got).abs().max() / ref.abs().max().clamp_min(1.0))
    if not err <= tol:
        raise ExportCheckError(f"check failed: {what} logits differ from usaf's merged model (max relative "
                               f"error {err:.2e} > {tol:.0e}); output removed")
    return err


def _hf_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - any load failure is a failed check
        raise ExportCheckError(f"check failed: transformers cannot load the export ({str(e).splitlines()[0]}); "
                               f"output removed") from None
    return fp32_logits(model, ids)



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
        _check_base(run.base, run.meta, disk_dtype(ckpt, maps))
        ref = None
    else:
        ref = reference_model(run.base, run.tensors, run.meta, disk_dtype(ckpt, maps),
                              run.meta.get("quant") if dequant else "none", run.train_dtype if dequant else None)
    if dequant:  # every MoE layer's experts were quantized in training, not only the trained ones
        from ..engine.experts import NAMES

        transposed = ref.family.transposed
        all_maps = {f"{m.prefix}.{n}": stack_map(f"{m.prefix}.{n}", m.experts.shape(n), ckpt, transposed)
                    for m in ref.layers for n in NAMES}
        patch, expert_names = _dequantized_patch(run, patches, all_maps, ref)
        touched = expert_names | set(patches.routers)
    else:
        patch, touched = _full_patch(run, patches), patches.touched()
    base_weights = "dequantized" if dequant else "full"
    prov = {"format": "usaf-export-hf", "delta": str(run.delta), "base": str(run.base),
            "base_fingerprint": run.meta.get("base_fingerprint"), "base_weights": base_weights,
            "active": run.active()}
    report = {"out": str(out), "base_weights": base_weights, "touched_tensors": len(touched),
              "shards": len(ckpt.files)}
    ids, want = _reference_logits(ref, check)
    if not dequant:  # full: the shards are patched from disk + delta alone; peak memory ~ one shard
        del ref
        gc.collect()
    with Staged(out, overwrite, is_dir=True, source=ckpt.dir) as st:
        write_checkpoint(ckpt, st.path, touched, patch, prov)
        if check:
            report["check_error"] = compare_logits(want, _hf_logits(st.path, ids), HF_TOLERANCE, "the export's")
    return report


def _reference_logits(ref, check: bool):
    """Probe token ids and usaf's fp32 logits for them (computed before the export is written)."""
    if not check:
        return None, None
    ids = probe_ids(ref.model.config.get_text_config().vocab_size)
    return ids, fp32_logits(ref.model, ids)


# ------------------------------------------------------------------------------------------ export delta
def export_delta(run: Run, out, overwrite: bool = False, check: bool = True) -> dict:
    """The delta file plus the on-disk values it replaces (for byte-exact revert and a cheap base check)."""
    ckpt = Checkpoint(run.base)
    check_out(out, overwrite)
    patches, maps = plan(run.tensors, run.meta, ckpt)
    _check_base(run.base, run.meta, disk_dtype(ckpt, maps))  # the originals must come from the right base
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
        _check_base(model, meta, disk_dtype(ckpt, maps))
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
        patch = _full_patch(run, patches)
        prov = {"format": "usaf-apply", "delta": str(delta), "base": str(model),
                "base_fingerprint": meta.get("base_fingerprint"), "base_weights": "full"}
    report = {"out": str(out), "revert": revert, "touched_tensors": len(patches.touched())}
    ids, want = _reference_logits(ref, check and not revert)
    del ref
    gc.collect()
    with Staged(out, overwrite, is_dir=True, source=ckpt.dir) as st:
        write_checkpoint(ckpt, st.path, patches.touched(), patch, prov)
        if check and revert:
            _check_base(str(st.path), meta, disk_dtype(ckpt, maps))
        elif check:
            report["check_error"] = compare_logits(want, _hf_logits(st.path, ids), HF_TOLERANCE, "the merged")
    return report


# ---------------------------------------------------------------------------------------------------- CLI
def cmd_export(args) -> int:
    run = load_run(args.run, args.base, args.train_dtype)
    check = not args.no_check
    if args.format == "hf":
        r = export_hf(run, args.out, args.base_weights, args.overwrite, check)
        print(f"wrote {r['out']} ({r['shards']} shard(s), {r['touched_tensors']} tensors patched, base weights "
              f"{r['base_weights']})" + (f"; reload check ok (max rel. logit error {r['check_error']:.1e})"
                                         if "check_error" in r else ""))
    elif args.format == "delta":
        r = export_delta(run, args.out, args.overwrite, check)
        print(f"wrote {r['out']}: {r['bytes'] / 1e6:.3f} MB for {r['active']:,} active elements "
              f"({r['mb_per_million_active']:.2f} MB per million active elements, originals included)")
    else:
        from .gguf import export_gguf

        r = export_gguf(run, args.out, args.type, args.base_weights, args.overwrite, check, args.tokenizer_pre)
        print(f"wrote {r['out']} ({r['arch']}, {r['type']}, {r['tensors']} tensors); check: {r['check']}")
    return 0


def cmd_apply(args) -> int:
    r = apply_delta(args.model, args.delta, args.out, args.revert, args.overwrite, not args.no_check)
    verb = "reverted" if r["revert"] else "applied"
    print(f"{verb} {args.delta} -> {r['out']} ({r['touched_tensors']} tensors patched)"
          + ("" if args.no_check else "; reload check ok"))
    return 0


def add_parsers(sub) -> None:
    """``usaf export`` and ``usaf apply`` (called from ``usaf.cli.build_parser``)."""
    x = sub.add_parser("export", help="export a trained delta: full checkpoint (hf), revertible delta file, GGUF")
    x.add_argument("run", help="training output directory (delta.safetensors + config.yaml) or a delta file")
    x.add_argument("--format", choices=("hf", "delta", "gguf"), default="hf")
    x.add_argument("--out", required=True, help="output directory (hf) or file (delta, gguf)")
    x.add_argument("--base", help="base checkpoint directory (default: the model named in the run's config.yaml)")
    x.add_argument("--base-weights", choices=BASE_WEIGHTS, default=DEFAULT_BASE_WEIGHTS,
                   help="full: deltas added to the original full-precision weights (default); dequantized: "
                        "the dequantized 4/8-bit base training saw, plus the deltas")
    x.add_argument("--type", choices=("f16", "bf16", "q8_0"), default="f16", help="GGUF tensor type")
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
