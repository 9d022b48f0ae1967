"""``usaf export RUN --format gguf --like-source``: the trained model as the source GGUF with the deltas in it.

The output keeps the source's metadata, tensor order and types. Tensors the delta does not touch are copied
byte for byte. A touched tensor (an expert stack with deltas, a shared-expert or attention weight with deltas, a trained
router) is rewritten only where it changed: each GGML block holding a changed element is dequantized, given
the new values (``base + delta`` in fp32; a router: its trained fp32 weights) and requantized in the tensor's own type, keeping its own scales:
only the changed elements get new codes, rounded stochastically so that deltas below half a quantization
step are kept in expectation, and the other elements keep their exact values (a block whose new values leave
the range of its scales is quantized afresh: ``export.kquant.requantize_touched``); every other block keeps
its bytes. (Requantizing a whole K-quant tensor would not give back its bytes, so untouched blocks are never
requantized.) ``--touched-type T`` writes every touched tensor whole in type ``T`` instead (the tensor infos
and offsets are rewritten; the key/values stay as stored).

The check reads the output back with usaf's GGUF reader: untouched tensors and untouched blocks equal the
source's bytes, and touched blocks dequantize to the trained values within the type's rounding.
"""

from __future__ import annotations

import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from ..engine.ggml import BLOCKS, dequantize, type_name
from ..load.gguf.model import gguf_config, gguf_fingerprint, open_gguf
from ..load.gguf.names import (
    EXPERT_LAYOUT,
    MLA,
    expert_names,
    gguf_name,
    kv_b_names,
    kv_b_rows,
    name_map,
    permute,
    qk_heads,
)
from ..load.gguf.reader import GGUFFile
from .kquant import quantize_rows, requantize_touched
from .layout import ExportCheckError, ExportError, Run, Staged

_LAYER = re.compile(r"\.layers\.(\d+)\.")
TYPES = {"f32": 0, "f16": 1, "bf16": 30, "q8_0": 8, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q4_k": 12, "q5_k": 13,
         "q6_k": 14, "mxfp4": 39}


def _new_values(run: Run, src: GGUFFile, config) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{GGUF name: (rows (n,) int64, values (n, cols) fp32)}``: for each touched tensor, the new contents of
    every row with a change, rows flat over the tensor's leading dims (expert stacks: base + delta; routers:
    the trained weights)."""
    family = run.meta.get("model_type", "")
    tmap = name_map(family, config.num_hidden_layers)
    out = {}
    for key, v in run.tensors.items():
        if key.startswith("router::"):
            name = gguf_name(tmap, key[len("router::"):])
            if name not in src.tensors:
                raise ExportError(f"the source GGUF has no tensor for the router {key[8:]}")
            t = src.tensors[name]
            if tuple(v.shape) != t.shape:
                raise ExportError(f"router {key[8:]} has shape {list(v.shape)}, the GGUF's {name} {list(t.shape)}")
            rows = v.float().reshape(-1, t.shape[-1])
            out[name] = (torch.arange(rows.shape[0]), rows.clone())
    for key in sorted({k.rsplit(".", 1)[0] for k in run.tensors if k.endswith(".indices")}):
        m = _LAYER.search(key)
        stack = key.rsplit(".", 1)[-1]
        if stack == "weight":  # a linear's delta (shared expert, attention): flat indices into its [out, in]
            for name, *got in _linear_rows(run, src, key, family, config):
                out[name] = tuple(got)
            continue
        if m is None or stack not in ("gate_up_proj", "down_proj"):
            raise ExportError(f"the delta's stack {key} has no GGUF counterpart")
        parts = expert_names(int(m.group(1)))[stack]
        idx, vals = run.stack(key)
        infos = [src.tensors[p] for p in parts]
        cols = infos[0].shape[-1]
        rows_per = [i.shape[1] for i in infos]
        total = sum(rows_per)
        interleaved, transposed = EXPERT_LAYOUT.get(family, (False, False))
        if transposed:  # the stack is [E, cols, rows] in memory (gpt-oss): element (e, c, r)
            expert, c_r = idx // (cols * total), idx % (cols * total)
            col, r = c_r // total, c_r % total
        else:
            row, col = idx // cols, idx % cols  # row over (E, R_total)
            expert, r = row // total, row % total
        for pi, part in enumerate(parts):
            if interleaved:  # row r of the stack is row r // n of part r % n
                sel, prow_in = r % len(parts) == pi, r // len(parts)
            else:
                lo = sum(rows_per[:pi])
                sel, prow_in = (r >= lo) & (r < lo + rows_per[pi]), r - lo
            if not bool(sel.any()):
                continue
            prow = expert[sel] * rows_per[pi] + prow_in[sel]  # flat row of this part, over (E * R_i)
            out[part] = _base_plus(src, part, prow, col[sel], vals[sel])
    return out


def _base_plus(src: GGUFFile, name: str, row: torch.Tensor, col: torch.Tensor, vals: torch.Tensor):
    """``(rows, values)``: the distinct ``rows`` of tensor ``name`` (flat over its leading dims) that the delta
    touches, dequantized to fp32, with the delta ``vals`` added at ``(row, col)``."""
    info = src.tensors[name]
    cols = info.shape[-1]
    rows, where = torch.unique(row, return_inverse=True)
    raw = src.raw(name).reshape(-1, src.raw(name).shape[-1])
    w = dequantize(raw[rows], info.ggml_type, cols)  # (n, cols) fp32
    w.view(-1).index_put_((where * cols + col,), vals, accumulate=True)
    return rows, w


def _linear_rows(run: Run, src: GGUFFile, key: str, family: str, config) -> list:
    """``[(GGUF name, rows, new rows fp32)]`` (empty when the delta is) of a linear's sparse delta (a shared-expert
    or attention weight): the source's dequantized rows plus the delta. llama's q/k rows are stored permuted
    (RoPE order): the delta's rows are mapped to the file's. MLA's ``kv_b_proj`` is stored split per head
    (``attn_k_b`` transposed, ``attn_v_b``): each element goes to the half that holds it."""
    name = gguf_name(name_map(family, config.num_hidden_layers), key)
    idx, vals = run.stack(key)
    if not idx.numel():
        return []
    if family in MLA and key.endswith("kv_b_proj.weight") and name not in src.tensors:
        return _kv_b_rows(src, key, name, idx, vals, config)
    if name is None or name not in src.tensors:
        raise ExportError(f"the source GGUF has no tensor for the delta of {key}")
    info = src.tensors[name]
    n_rows, cols = int(np.prod(info.shape[:-1])), info.shape[-1]
    if int(idx.max()) >= n_rows * cols:
        raise ExportError(f"the delta of {key} does not fit the GGUF's {name} {list(info.shape)}")
    row, col = idx // cols, idx % cols
    heads = qk_heads(family, key, config)
    if heads:
        order = permute(torch.arange(n_rows), heads)  # the file's row j holds the model's row order[j]
        at = torch.empty_like(order)
        at[order] = torch.arange(n_rows)
        row = at[row]
    return [(name, *_base_plus(src, name, row, col, vals))]


def _kv_b_rows(src: GGUFFile, key: str, name: str, idx: torch.Tensor, vals: torch.Tensor, config) -> list:
    """The delta of ``kv_b_proj [heads * (nope + v), rank]`` on the file's ``attn_k_b [heads, rank, nope]`` and
    ``attn_v_b [heads, v, rank]`` (:func:`usaf.load.gguf.names.split_kv_b`)."""
    heads, nope, v = kv_b_rows(config)
    rank = config.kv_lora_rank
    k_b, v_b = kv_b_names(int(name.split(".")[1]))
    if k_b not in src.tensors or v_b not in src.tensors:
        raise ExportError(f"the source GGUF has no tensor for the delta of {key}")
    if int(idx.max()) >= heads * (nope + v) * rank:
        raise ExportError(f"the delta of {key} does not fit the model's kv_b_proj")
    row, col = idx // rank, idx % rank
    h, r = row // (nope + v), row % (nope + v)
    out = []
    is_k = r < nope
    if bool(is_k.any()):  # kv_b[h, r, c] = k_b[h, c, r]
        out.append((k_b, *_base_plus(src, k_b, h[is_k] * rank + col[is_k], r[is_k], vals[is_k])))
    if bool((~is_k).any()):  # kv_b[h, nope + j, c] = v_b[h, j, c]
        out.append((v_b, *_base_plus(src, v_b, h[~is_k] * v + r[~is_k] - nope, col[~is_k], vals[~is_k])))
    return out


def _same_types(src: GGUFFile, path: Path, new: dict) -> dict:
    """Copy the source, then overwrite the changed blocks of the touched rows, requantized in their type."""
    shutil.copyfile(src.path, path)
    count = 0
    with open(path, "r+b") as fh:
        for name, (rows, values) in new.items():
            t = src.tensors[name]
            block, size = BLOCKS[t.ggml_type]
            raw = src.raw(name).reshape(-1, src.raw(name).shape[-1])
            row_bytes = raw.shape[-1]
            old = raw[rows].numpy().copy()  # (n, row bytes)
            before = dequantize(torch.from_numpy(old), t.ggml_type, t.shape[-1]).numpy()
            vals = values.numpy()
            changed = (before.reshape(len(rows), -1, block) != vals.reshape(len(rows), -1, block)).any(-1)
            blocks = old.reshape(len(rows), -1, size)
            blocks[changed] = requantize_touched(blocks[changed], before.reshape(len(rows), -1, block)[changed],
                                                 vals.reshape(len(rows), -1, block)[changed], t.ggml_type,
                                                 seed=zlib.crc32(name.encode()))  # a stream per tensor
            count += int(changed.sum())
            for i, r in enumerate(rows.tolist()):
                if changed[i].any():
                    fh.seek(t.offset + r * row_bytes)
                    fh.write(blocks[i].tobytes())
    return {"blocks": count}


def _pack_str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def write_retyped(src: GGUFFile, path: Path, new: dict, kinds: dict[str, int]) -> dict:
    """Write ``src`` to ``path`` with tensor ``name`` in type ``kinds[name]`` (dequantized, given the rows of
    ``new[name]``, requantized whole); other tensors byte for byte. Tensor infos and offsets are rewritten,
    the key/values stay as stored. (Also makes the K-quant test files from an F16/F32 GGUF.)"""
    plan = []
    offset = 0
    for name, t in src.tensors.items():
        k = kinds.get(name, t.ggml_type)
        block, size = BLOCKS[k]
        if name in kinds and t.shape[-1] % block:
            raise ExportError(f"--touched-type {type_name(k)}: {name}'s rows of {t.shape[-1]} are not a "
                              f"multiple of its block of {block}")
        n = int(np.prod(t.shape)) // block * size
        plan.append((name, t, k, offset))
        offset += -(-n // src.alignment) * src.alignment
    with open(path, "wb") as fh:
        fh.write(src.mm[: src.kv_end])
        for name, t, k, off in plan:
            fh.write(_pack_str(name) + struct.pack("<I", len(t.shape)))
            fh.write(struct.pack(f"<{len(t.shape)}Q", *reversed(t.shape)) + struct.pack("<IQ", k, off))
        start = fh.tell()
        fh.write(b"\0" * (-(-start // src.alignment) * src.alignment - start))
        base = fh.tell()
        for name, t, k, off in plan:
            fh.seek(base + off)
            if name not in kinds:
                fh.write(src.mm[t.offset : t.offset + t.nbytes])
                continue
            rows = src.raw(name).reshape(-1, src.raw(name).shape[-1])
            cols = t.shape[-1]
            step = max(1, (1 << 22) // max(cols, 1))
            changed, values = new.get(name, (torch.empty(0, dtype=torch.long), None))
            for r0 in range(0, rows.shape[0], step):  # a few MB of fp32 at a time
                w = dequantize(rows[r0 : r0 + step], t.ggml_type, cols)
                sel = (changed >= r0) & (changed < r0 + step)
                if bool(sel.any()):
                    w[changed[sel] - r0] = values[sel]
                fh.write(quantize_rows(w.numpy(), k).tobytes())
        end = fh.tell()
        fh.write(b"\0" * ((-end) % src.alignment))
    return {"blocks": None}


def _check(src: GGUFFile, path: Path, new: dict, touched_kind: int | None) -> dict:
    out = GGUFFile(path)
    if list(out.tensors) != list(src.tensors) or out.metadata != src.metadata:
        raise ExportCheckError("check failed: the output's tensors or metadata differ from the source's; "
                               "output removed")
    worst = 0.0
    for name, t in src.tensors.items():
        o = out.tensors[name]
        if o.shape != t.shape:
            raise ExportCheckError(f"check failed: {name} changed shape; output removed")
        if name not in new:
            if o.ggml_type != t.ggml_type or out.bytes_of(name) != src.bytes_of(name):
                raise ExportCheckError(f"check failed: untouched tensor {name} is not byte-identical; output "
                                       f"removed")
            continue
        rows, values = new[name]
        rows_out = out.raw(name).reshape(-1, out.raw(name).shape[-1])
        got = dequantize(rows_out[rows], o.ggml_type, t.shape[-1])
        scale = values.abs().amax(-1, keepdim=True).clamp_min(1e-12)
        worst = max(worst, float(((got - values).abs() / scale).max()))
        if touched_kind is None:  # every block but the changed ones keeps its bytes
            block, size = BLOCKS[t.ggml_type]
            rows_src = src.raw(name).reshape(-1, src.raw(name).shape[-1])
            before = dequantize(rows_src[rows], t.ggml_type, t.shape[-1]).view(len(rows), -1, block)
            same = (before == values.view(len(rows), -1, block)).all(-1)
            keep = torch.ones(rows_src.shape[0], rows_src.shape[1] // size, dtype=torch.bool)
            keep[rows] = same
            a = rows_src.reshape(rows_src.shape[0], -1, size)[keep]
            if not torch.equal(rows_out.reshape(rows_src.shape[0], -1, size)[keep], a):
                raise ExportCheckError(f"check failed: untouched blocks of {name} changed; output removed")
    return {"max_rel_error": worst}


def export_gguf_like_source(run: Run, out, touched_type: str | None = None, overwrite: bool = False,
                            check: bool = True) -> dict:
    """Write ``run``'s model as its source GGUF with the deltas in it (module docstring)."""
    src = open_gguf(run.base)
    if run.meta.get("base_fingerprint") != gguf_fingerprint(src):
        raise ExportError(f"{run.delta} was made for another base model than {run.base} (fingerprints differ)")
    kind = None
    if touched_type is not None:
        if touched_type.lower() not in TYPES:
            raise ExportError(f"--touched-type must be one of {', '.join(TYPES)}, got {touched_type!r}")
        kind = TYPES[touched_type.lower()]
    config = gguf_config(src).get_text_config()
    new = _new_values(run, src, config)
    report = {"out": str(out), "arch": src.arch, "touched_tensors": len(new), "tensors": len(src.tensors),
              "touched_type": type_name(kind) if kind is not None else "own", "check": "skipped"}
    with Staged(out, overwrite, is_dir=False, source=run.base) as st:
        stats = _same_types(src, st.path, new) if kind is None else \
            write_retyped(src, st.path, new, {n: kind for n in new})
        report["requantized_blocks"] = stats["blocks"]
        if check:
            report.update(_check(src, st.path, new, kind))
            report["check"] = (f"untouched tensors byte-identical; touched values within "
                               f"{report['max_rel_error']:.1e} (relative to each row's largest)")
    return report
