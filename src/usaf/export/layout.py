"""The on-disk side of ``usaf export`` / ``usaf apply``: runs, checkpoints, the fused -> on-disk map, writing.

- ``load_run``: a training output directory (or a delta file plus its base) -> ``Run``.
- ``Checkpoint``: a safetensors checkpoint directory (tensor -> shard, dtype, shape; read lazily).
- ``stack_map`` / ``plan``: where each fused in-memory expert stack ``[E, R, C]`` lives on disk, the way
  transformers' ``conversion_mapping.py`` builds the stacks on load (``MergeModulelist(dim=0)`` then
  ``Concatenate(dim=1)``): per-expert ``experts.N.gate_proj/up_proj/down_proj.weight`` (mixtral
  ``block_sparse_moe.experts.N.w1/w3/w2.weight``; gate_up rows ``[0, I)`` are gate, ``[I, 2I)`` up; an
  ``up_proj`` stack without a gate: ``experts.N.up_proj.weight``, nemotron_h's under ``backbone.`` instead of
  ``model.``), fused names for fused families (gpt_oss, llama4, gemma4), granitemoe's
  ``input_linear/output_linear``, dbrx's 2-D ``[E*I, H]`` ``w1/v1/w2`` (the stack's flat order); failing
  those, the names transformers' conversion tables give (``Checkpoint.source_keys``: a vision-language
  checkpoint's ``model.layers`` for ``model.language_model.layers``, renamed per-expert tensors). Stacks
  stored transposed, or merged with / split across other tensors on disk, are refused in one line.
- ``write_checkpoint``: the source copied shard by shard with some tensors patched, atomically.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

from ..engine.families import transposed_of
from ..integrity import EXPORT_RECORD, file_checksums, verify_export
from ..io import atomic_save_safetensors, atomic_write_json, read_safetensors, recorded_eval_settings
from ..load.hf import load_config, resolve_device, resolve_dtype
from ..load.stream import meta_model, source_keys
from ..units import DTYPES as NAMED_DTYPES  # fp32 | bf16 | fp16 -> torch dtype (usaf export --train-dtype)

log = logging.getLogger("usaf")

DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
PROVENANCE = EXPORT_RECORD
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt")
_PER_EXPERT_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))


class ExportError(ValueError):
    """A user-facing export problem (one line, exit code 2)."""

class BaseMismatchError(ExportError):
    """The delta was made for another base model."""

class ExportCheckError(ExportError):
    """The reload check of a written export failed (the output was removed)."""

# ------------------------------------------------------------------------------------------------ the run
@dataclass
class Run:
    """A delta file and the base checkpoint it belongs to."""
    delta: Path
    base: str
    tensors: dict[str, torch.Tensor]
    meta: dict[str, str]
    train_dtype: torch.dtype

    @property
    def routers(self) -> dict[str, torch.Tensor]:
        return {k[len("router::"):]: v for k, v in self.tensors.items() if k.startswith("router::")}

    def stack(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices int64, values fp32) of one expert stack (empty when it has no delta)."""
        if f"{key}.indices" not in self.tensors:
            return torch.empty(0, dtype=torch.int64), torch.empty(0)
        return self.tensors[f"{key}.indices"].long(), self.tensors[f"{key}.values"].float()

    def active(self) -> int:
        return sum(v.numel() for k, v in self.tensors.items() if k.endswith(".indices"))


def read_delta(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a usaf delta file, its checksums verified."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"delta file not found: {path}")
    tensors, meta = read_safetensors(path)
    if meta.get("format") != "usaf-delta":
        raise ExportError(f"{path} is not a usaf delta file")
    return tensors, meta


def load_run(run, base: str | None = None, train_dtype: str | None = None) -> Run:
    """``run``: a training output directory (delta.safetensors + config.yaml) or a delta file (needs ``base``)."""

    run = Path(run)
    cfg: dict = {}
    if run.is_dir():
        delta = run / "delta.safetensors"
        if not delta.exists():
            raise ExportError(f"{run} has no delta.safetensors (is it a finished `usaf train` output?)")
        if (run / "config.yaml").exists():
            cfg = yaml.safe_load((run / "config.yaml").read_text()) or {}
    elif run.exists():
        delta = run
        if base is None and (run.parent / "config.yaml").exists():  # runs/x/delta.safetensors
            cfg = yaml.safe_load((run.parent / "config.yaml").read_text()) or {}
    else:
        raise FileNotFoundError(f"no run or delta file at {run}")
    base = base or cfg.get("model")
    if not base:
        raise ExportError(f"{run}: which base model? give --base (no config.yaml naming the model)")
    tensors, meta = read_delta(delta)
    # the dtype the run trained in, as it recorded it (``auto`` resolves by the machine, which may differ)
    recorded = recorded_eval_settings(meta).get("dtype")
    spec = train_dtype or recorded or cfg.get("dtype") or "auto"
    try:
        dtype = NAMED_DTYPES.get(spec) or resolve_dtype(spec, resolve_device(cfg.get("device") or "auto"))
    except ValueError:
        dtype = resolve_dtype(spec, torch.device("cpu"))
    return Run(delta, str(base), tensors, meta, dtype)


# ------------------------------------------------------------------------------------ the source checkpoint
class Checkpoint:
    """A safetensors checkpoint directory: where each tensor lives, its dtype and shape (read lazily).

    One written by ``usaf export`` / ``usaf apply`` has its file checksums verified first."""
    def __init__(self, path):
        self.dir = Path(path)
        if not (self.dir / "config.json").is_file():
            raise ExportError(f"{self.dir} is not a Hugging Face checkpoint directory (no config.json)")
        verify_export(self.dir)
        self.index_file = self.dir / "model.safetensors.index.json"
        if self.index_file.exists():
            self.where = dict(json.loads(self.index_file.read_text())["weight_map"])
        elif (self.dir / "model.safetensors").exists():
            self.index_file = None
            with safe_open(str(self.dir / "model.safetensors"), "pt") as f:
                self.where = {k: "model.safetensors" for k in f.keys()}
        else:
            raise ExportError(f"{self.dir} has no model.safetensors (usaf exports safetensors checkpoints only)")
        self._meta = None  # the model on the meta device, built on first use by ``source_keys``
        self.files = list(dict.fromkeys(self.where.values()))
        for f in self.files:
            if Path(f).name != f or not (self.dir / f).is_file():
                raise ExportError(f"{self.dir}: the index names a missing or outside shard {f!r}")
        self._info: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def info(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        if name not in self._info:
            with safe_open(str(self.dir / self.where[name]), "pt") as f:
                for k in f.keys():
                    s = f.get_slice(k)
                    self._info[k] = (DTYPES.get(s.get_dtype(), s.get_dtype()), tuple(s.get_shape()))
        return self._info[name]

    def get(self, name: str) -> torch.Tensor:
        with safe_open(str(self.dir / self.where[name]), "pt") as f:
            return f.get_tensor(name)

    def source_keys(self, key: str, shape: tuple[int, ...]) -> list[str]:
        """The on-disk names transformers' conversion tables give the in-memory tensor ``key`` (a vision-language
        checkpoint's ``model.layers.N`` for ``model.language_model.layers.N``, per-expert names), those that
        this checkpoint holds; [] when the model cannot be built from its config (remote code)."""
        if self._meta is None:
            try:
                self._meta = meta_model(load_config(str(self.dir)))
            except Exception as e:  # noqa: BLE001 - no conversion tables then: the names are taken as they are
                log.info("no conversion tables for %s (%s)", self.dir, str(e).splitlines()[0][:100])
                self._meta = False
        if self._meta is False:
            return []
        try:
            names = source_keys(self._meta, key, torch.empty(shape, device="meta"))
        except Exception as e:  # noqa: BLE001 - a conversion that needs more tensors than this one (ernie4_5_vl_moe)
            log.info("no on-disk name for %s from the conversion tables (%s)", key, str(e).splitlines()[0][:100])
            return []
        return [n for n in names if n in self.where]


# ------------------------------------------------------------------------------- in-memory -> on-disk map
@dataclass
class StackMap:
    """Where the rows of one fused ``[E, R, C]`` stack live on disk.

    ``names[i]`` holds the fused flat range ``[starts[i], starts[i + 1])`` (the pieces tile the stack in
    order: per expert, gate rows then up rows, or the whole stack for fused layouts).
    """

    key: str
    shape: tuple[int, ...]
    names: list[str]
    starts: torch.Tensor  # (len(names) + 1,) int64

    def split(self, idx: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Fused flat indices (sorted) -> ``{disk name: (positions into idx, flat indices in that tensor)}``."""
        piece = torch.searchsorted(self.starts, idx, right=True) - 1
        out = {}
        bounds = torch.searchsorted(piece, torch.arange(len(self.names) + 1))
        for i in torch.nonzero(bounds[1:] > bounds[:-1]).flatten().tolist():
            a, b = int(bounds[i]), int(bounds[i + 1])
            out[self.names[i]] = (torch.arange(a, b), idx[a:b] - self.starts[i])
        return out


def disk_names(key: str) -> list[str]:
    """Where an in-memory tensor may live on disk: its own name, mixtral's ``block_sparse_moe`` for ``mlp``,
    nemotron_h's ``backbone.`` for ``model.`` (transformers renames them on load)."""
    cands = [key, key.replace(".mlp.", ".block_sparse_moe.")]
    if key.startswith("model."):
        cands.append("backbone." + key[len("model."):])
    return list(dict.fromkeys(cands))


def stack_map(key: str, shape: tuple[int, ...], ckpt: Checkpoint, transposed: bool = False) -> StackMap:
    """Map the in-memory stack ``key`` (e.g. ``model.layers.1.mlp.experts.gate_up_proj``) to ``ckpt``'s tensors."""
    prefix, name = key.rsplit(".", 1)
    n_exp, rows, cols = shape
    numel = n_exp * rows * cols
    if name == "weight":  # an attention projection's sparse delta, (1, out, in) over the 2-D weight, or a
        disk = next((c for c in disk_names(key) if c in ckpt), None)  # stack named weight (jetmoe)
        if disk is None:  # renamed on disk (transformers' conversion tables)
            disk = next(iter(ckpt.source_keys(key, (rows, cols))), None)
        if disk is None:
            raise ExportError(f"{ckpt.dir}: no on-disk tensor holds {key}")
        _expect(ckpt, disk, (rows, cols), also=tuple(shape))
        return StackMap(key, tuple(shape), [disk], torch.tensor([0, numel]))
    prefixes = disk_names(prefix)
    block = prefix.rsplit(".experts", 1)[0]
    legacy = {"gate_up_proj": "input_linear", "down_proj": "output_linear"}.get(name)  # granitemoe
    cands = [f"{p}.{name}" for p in prefixes] + [f"{p}.{name}.weight" for p in prefixes]
    cands += [f"{block}.{legacy}.weight"] if legacy else []
    if not any(c in ckpt for c in cands) and not any(f"{p}.0.{n}.weight" in ckpt
                                                   for p in prefixes for ns in _PER_EXPERT_NAMES for n in ns):
        # renamed on disk (transformers' conversion tables): one fused name, or per-expert names
        found = ckpt.source_keys(key, tuple(shape))
        if len(found) == 1:
            cands.insert(0, found[0])
        for disk in found[1:] if len(found) > 1 else ():
            parts = disk.rsplit(".", 3)  # <prefix>.<e>.<proj>.weight
            if len(parts) == 4 and parts[1].isdigit():
                prefixes.append(parts[0])
        prefixes = list(dict.fromkeys(prefixes))
    for cand in cands:
        if cand in ckpt:
            if rows != cols and tuple(ckpt.info(cand)[1]) == (n_exp, cols, rows):
                raise ExportError(f"{ckpt.dir}: {cand} is stored transposed on disk ({n_exp}, {cols}, {rows}) "
                                  f"(transformers transposes it on load); usaf patches expert stacks in their "
                                  f"in-memory layout {tuple(shape)} only")
            flat = (n_exp * rows, cols)  # dbrx: 2-D [E*R, C] on disk and in memory, the same flat order
            _expect(ckpt, cand, tuple(shape), also=flat if ckpt.info(cand)[1] == flat else None)
            return StackMap(key, tuple(shape), [cand], torch.tensor([0, numel]))
    for p in prefixes:
        for gate, up, down in _PER_EXPERT_NAMES:
            kinds = {"gate_up_proj": (gate, up), "up_proj": (up,), "down_proj": (down,)}.get(name)
            if kinds is None or f"{p}.0.{kinds[0]}.weight" not in ckpt:
                continue
            if transposed:
                raise ExportError(f"{key}: per-expert on-disk tensors for a transposed layout are not supported")
            names, starts = [], [0]
            parts = [(k, rows // len(kinds)) for k in kinds]
            for e in range(n_exp):
                for part, n_rows in parts:
                    disk = f"{p}.{e}.{part}.weight"
                    if disk not in ckpt:
                        raise ExportError(f"{ckpt.dir}: {disk} is missing (per-expert layout of {key})")
                    _expect(ckpt, disk, (n_rows, cols))
                    names.append(disk)
                    starts.append(starts[-1] + n_rows * cols)
            return StackMap(key, tuple(shape), names, torch.tensor(starts))
    raise ExportError(f"{ckpt.dir}: no on-disk tensor holds {key} (looked for fused and per-expert names)")


def router_name(key: str, ckpt: Checkpoint, shape: tuple[int, ...]) -> str:
    """On-disk name of an in-memory router parameter (mixtral ``block_sparse_moe.gate``, granite ``router.layer``)."""
    cands = disk_names(key) + [key.replace(".router.weight", ".router.layer.weight")]
    if not any(c in ckpt for c in cands):
        cands += ckpt.source_keys(key, tuple(shape))  # renamed on disk (transformers' conversion tables)
    for cand in dict.fromkeys(cands):
        if cand in ckpt:
            _expect(ckpt, cand, tuple(shape))
            return cand
    raise ExportError(f"{ckpt.dir}: no on-disk tensor holds the router {key}")


def _expect(ckpt: Checkpoint, name: str, shape: tuple[int, ...], also: tuple[int, ...] | None = None) -> None:
    got = ckpt.info(name)[1]
    if tuple(got) not in (tuple(shape), also):
        raise BaseMismatchError(f"{ckpt.dir}: {name} has shape {tuple(got)}, the delta expects {tuple(shape)} "
                                f"(the delta was made for another base model)")


@dataclass
class Patches:
    """What changes on disk: expert positions (flat index, delta values) and whole router tensors."""
    experts: dict[str, list[tuple[str, torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    routers: dict[str, str] = field(default_factory=dict)  # disk name -> in-memory router key

    def touched(self) -> set[str]:
        return set(self.experts) | set(self.routers)


def plan(run_tensors: dict[str, torch.Tensor], meta: dict[str, str], ckpt: Checkpoint) -> tuple[Patches, dict]:
    """Map every delta entry to on-disk tensors. Returns (patches, {stack key: StackMap})."""
    transposed = transposed_of(meta)
    shapes = {k: tuple(v) for k, v in json.loads(meta.get("shapes", "{}")).items()}
    patches, maps = Patches(), {}
    for key, shape in shapes.items():
        maps[key] = m = stack_map(key, shape, ckpt, transposed)
        if f"{key}.indices" not in run_tensors:
            continue
        idx = run_tensors[f"{key}.indices"].long()
        if idx.numel() and (bool((idx[1:] <= idx[:-1]).any()) or int(idx[0]) < 0 or int(idx[-1]) >= m.starts[-1]):
            raise ExportError(f"{key}: the delta's indices are not sorted, unique and inside {tuple(shape)}")
        for disk, (pos, local) in m.split(idx).items():
            patches.experts.setdefault(disk, []).append((key, pos, local))
    for k, v in run_tensors.items():
        if k.startswith("router::"):
            name = k[len("router::"):]
            patches.routers[router_name(name, ckpt, tuple(v.shape))] = name
    return patches, maps


# --------------------------------------------------------------------------------------- writing a checkpoint
def write_checkpoint(src: Checkpoint, out: Path, touched: set[str], patch, provenance: dict | None) -> None:
    """Copy ``src`` into the (new) directory ``out``, replacing the tensors in ``touched`` by ``patch(name, t)``.

    Shards without a touched tensor are copied as files; the others are read with ``safe_open`` and written
    atomically (temp name, fsync, rename) with the same tensors, order and metadata. The index and every
    non-weight file (config, tokenizer, chat template, generation config, ...) are copied. ``provenance``
    (when given) is written as ``usaf_export.json`` with the sha256 of every file written (``checksums``).
    """
    out.mkdir(parents=True, exist_ok=True)
    for file in src.files:
        names = [n for n, f in src.where.items() if f == file]
        if not touched.intersection(names):
            shutil.copyfile(src.dir / file, out / file)
            continue
        tensors = {}
        with safe_open(str(src.dir / file), "pt") as f:
            meta = f.metadata()
            for name in f.keys():
                t = f.get_tensor(name)
                if name in touched:
                    new = patch(name, t)
                    if new.dtype != t.dtype or new.shape != t.shape:
                        raise ExportError(f"internal: patched {name} changed dtype/shape")
                    t = new
                tensors[name] = t
        atomic_save_safetensors(tensors, out / file, metadata=meta, checksums=False)
        del tensors
    for item in sorted(src.dir.iterdir()):
        if item.name.startswith(".") or item.name in src.files or item.name == PROVENANCE:
            continue
        if item.is_dir():
            if any(f.name.endswith(_WEIGHT_SUFFIXES) for f in item.rglob("*")):
                log.warning("not copying %s/ (it holds other weight files)", item.name)
            else:
                shutil.copytree(item, out / item.name)
        elif item.name.endswith(_WEIGHT_SUFFIXES):
            log.warning("not copying %s (usaf writes safetensors only)", item.name)
        else:
            shutil.copyfile(item, out / item.name)
    if provenance:
        files = [p.name for p in out.iterdir() if p.is_file() and p.name != PROVENANCE]
        atomic_write_json(out / PROVENANCE, dict(provenance, checksums=file_checksums(out, files)))


def read_positions(ckpt: Checkpoint, patches: Patches, run_tensors: dict) -> dict[str, torch.Tensor]:
    """Current on-disk values at the touched positions, in delta order, per stack key."""
    out: dict[str, torch.Tensor] = {}
    for disk, entries in patches.experts.items():
        t = ckpt.get(disk).reshape(-1)
        for key, pos, local in entries:
            if key not in out:
                out[key] = torch.empty(run_tensors[f"{key}.indices"].numel(), dtype=t.dtype)
            out[key][pos] = t[local]
    return out


# --------------------------------------------------------------------------------------- staging outputs
def check_out(out, overwrite: bool, source=None) -> Path:
    """Refuse an existing ``--out`` (unless ``overwrite``) and the source checkpoint itself."""
    out = Path(out)
    if source is not None and out.resolve() == Path(source).resolve():
        raise ExportError(f"--out {out} is the source checkpoint itself; write somewhere else")
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists (use --overwrite to replace it)")
    return out


class Staged:
    """Write into a hidden sibling, move into place on success, remove it on any failure."""
    def __init__(self, out, overwrite: bool, is_dir: bool, source=None):
        self.out = check_out(out, overwrite, source)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.is_dir = is_dir
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-", dir=self.out.parent))
        self.path = self.tmp if is_dir else self.tmp / self.out.name

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            if self.out.exists():
                old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
                os.replace(self.out, old)
                shutil.rmtree(old) if old.is_dir() else old.unlink()
            os.replace(self.path, self.out)
        shutil.rmtree(self.tmp, ignore_errors=True)
        return False


def disk_dtype(ckpt: Checkpoint, maps: dict) -> torch.dtype:
    first = next(iter(maps.values()))
    return ckpt.info(first.names[0])[0]
