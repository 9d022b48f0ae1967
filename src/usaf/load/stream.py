"""Loading models larger than memory: meta-device build, lazy shard reads, quantize-while-streaming, cache.

``load_streamed(model_dir, cfg)`` never holds the model at full precision:

1. the module tree is built with parameters on the meta device (buffers real, e.g. rotary tables);
2. each non-expert tensor is read from its shard (safetensors, one tensor at a time) and assigned;
3. each expert stack is assembled one expert at a time — from fused tensors or from the per-expert
   tensors most published checkpoints use (``experts.N.gate_proj.weight`` ...) — and quantized at once;
4. the quantized stacks are written to a cache (safetensors, with per-tensor checksums) keyed by the
   checkpoint's path, file sizes and times and the quantization; later runs map the cache (mmap) instead of
   reading the checkpoint's experts again. The cache records the checkpoint's fingerprint
   (``usaf.integrity.checkpoint_fingerprint``, computed once when the cache is built); a cache that fails
   its checksums is rebuilt (a warning names it).

Tiers: a frozen stack lives on the compute device, in host RAM, or on disk (the mmap of the cache, paged
in on use); ``Prefetcher`` asks the kernel for the next layer's pages while the current layer computes.
The on-disk -> in-memory name mapping comes from transformers' own conversion tables (reverted on the
meta model), so any family transformers can load is covered without a table of names here. A tensor whose
on-disk form needs more than a rename (split, merged or transposed: several vision-language checkpoints in
their original layout) raises ``LayoutError``, and ``load_prepared`` loads the model with transformers'
``from_pretrained`` instead (a warning says so).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from transformers import AutoConfig
from transformers.core_model_loading import revert_weight_conversion

from ..config import UsafConfig
from ..engine.discover import moe_site
from ..engine.families import auto_model_class, family_for, get_path
from ..engine.model import UsafModel, decoder_layers, parse_layers, prepare
from ..engine.quant import QuantizedTensor, QuantSpec
from ..engine.store import DenseStack
from ..integrity import TORCH_DTYPES, IntegrityError, checkpoint_fingerprint, read_header, verify_file
from ..io import SafetensorsStream, atomic_write, cache_dir
from ..progress import progress_bar
from .gguf.model import gguf_expert_bytes, is_gguf, load_gguf
from .hf import check_shards, load_config, load_model
from .mmap import evict, map_safetensors
from .tiers import choose_tier

log = logging.getLogger("usaf")

_EXPERT_KEY = re.compile(r"\.experts\.(\d+)\.(\w+)\.weight$")
_GATE, _UP, _DOWN = {"gate_proj", "w1"}, {"up_proj", "w3"}, {"down_proj", "w2"}


class ShardReader:
    """Lazy access to every tensor of a safetensors checkpoint directory (one tensor read at a time)."""

    def __init__(self, model_dir: Path):
        self.dir = Path(model_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            self.where = json.loads(index.read_text())["weight_map"]
        else:
            with safe_open(str(self.dir / "model.safetensors"), "pt") as f:
                self.where = {k: "model.safetensors" for k in f.keys()}
        self._open: dict[str, object] = {}
        self._headers: dict[str, tuple[dict, int]] = {}

    def keys(self) -> set[str]:
        return set(self.where)

    def get(self, key: str) -> torch.Tensor:
        file = self.where[key]
        if file not in self._open:
            self._open[file] = safe_open(str(self.dir / file), "pt")
        return self._open[file].get_tensor(key)

    def get_slice(self, key: str):
        """A lazy slice handle: ``reader.get_slice(k)[e]`` reads only expert ``e``."""
        file = self.where[key]
        if file not in self._open:
            self._open[file] = safe_open(str(self.dir / file), "pt")
        return self._open[file].get_slice(key)

    def read_rows(self, key: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Rows ``start:stop`` of dim 0 of ``key`` (all when None), read with ``pread`` into private memory.

        ``get`` / ``get_slice`` read through safetensors' mmap of the shard, whose pages then count in the
        process's resident set until the file is closed; the first run reads every expert of the checkpoint
        once, so they would add up to the whole checkpoint (21 GB for a 16-layer Qwen3-30B-A3B-width
        model). A ``pread`` goes through the page cache only: the resident set stays one expert."""
        file = self.where[key]
        if file not in self._headers:
            self._headers[file] = read_header(self.dir / file)
        header, begin = self._headers[file]
        info = header[key]
        dtype, shape = TORCH_DTYPES[info["dtype"]], list(info["shape"])
        a, b = (int(x) for x in info["data_offsets"])
        if start is not None or stop is not None:
            row = (b - a) // max(shape[0], 1)
            lo, hi = start or 0, shape[0] if stop is None else stop
            a, b, shape = a + lo * row, a + hi * row, [hi - lo, *shape[1:]]
        buf = bytearray(b - a)
        with open(self.dir / file, "rb", buffering=0) as f:
            f.seek(begin + a)
            view, got = memoryview(buf), 0
            while got < len(buf):
                n = f.readinto(view[got:])
                if not n:
                    raise OSError(f"{self.dir / file} is truncated (tensor {key})")
                got += n
        return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).view(shape) if buf else \
            torch.empty(shape, dtype=dtype)

    def files_signature(self) -> str:
        h = hashlib.sha256()
        for file in sorted(set(self.where.values())):
            st = (self.dir / file).stat()
            h.update(f"{file}:{st.st_size}:{int(st.st_mtime)}".encode())
        return h.hexdigest()[:16]


def source_keys(meta_model, key: str, tensor: torch.Tensor) -> list[str]:
    """On-disk names of one in-memory tensor, from transformers' conversion tables (reverted): a renamed
    name, or the per-expert names of a fused stack."""
    return list(revert_weight_conversion(meta_model, {key: tensor}).keys())


def _expert_parts(keys: list[str], name: str, num_experts: int) -> list[list[str]]:
    """Per-expert on-disk keys of a fused stack, in concatenation order (gate rows, then up rows)."""
    parts: list[dict[str, str]] = [{} for _ in range(num_experts)]
    for k in keys:
        m = _EXPERT_KEY.search(k)
        if m is None:
            raise LayoutError(f"unexpected on-disk expert tensor {k}")
        parts[int(m.group(1))][m.group(2)] = k
    out = []
    kinds = {"gate_up_proj": [_GATE, _UP], "up_proj": [_UP]}.get(name, [_DOWN])  # up_proj: no gate (nemotron_h)
    for e, p in enumerate(parts):
        row = []
        for kind in kinds:
            match = [v for n, v in p.items() if n in kind]
            if len(match) != 1:
                raise LayoutError(f"cannot find expert {e}'s {'/'.join(sorted(kind))} tensor on disk")
            row.append(match[0])
        out.append(row)
    return out


class LayoutError(ValueError):
    """A tensor of the model is not on disk under its name (or a renamed one) at its shape: the checkpoint
    needs a conversion of transformers' (a split, merge or transpose) that the streamed loader does not do."""


class _StackBuilder:
    """Reads one fused expert stack, expert by expert, quantizing as it goes.

    ``shape``: the stack's ``[E, R, C]`` (``meta`` may be dbrx's 2-D ``[E * R, C]`` parameter)."""

    def __init__(self, reader: ShardReader, meta_model, key: str, meta: torch.Tensor, dtype, quant: str,
                 group_size: int, shape: tuple[int, ...], rounding: str = "mse"):
        self.reader, self.key, self.shape, self.dtype = reader, key, tuple(shape), dtype
        self.quant, self.group_size, self.rounding = quant, group_size, rounding
        disk = reader.keys()
        if key in disk:
            self.mode, self.src = "fused", key
        else:
            src = [k for k in source_keys(meta_model, key, meta) if k in disk] or []
            if len(src) == 1:
                self.mode, self.src = "fused", src[0]
            elif src:
                self.mode, self.src = "per_expert", _expert_parts(src, key.rsplit(".", 1)[1], self.shape[0])
            else:
                raise LayoutError(f"checkpoint has no tensor for {key}")
        self.flat = meta.dim() == 2

    def expert(self, e: int) -> torch.Tensor:
        """Expert ``e``'s weight, read with ``pread`` (``ShardReader.read_rows``: nothing stays mapped)."""
        if self.mode == "fused" and self.flat:  # [E * R, C]: expert e's rows
            r = self.shape[1]
            w = self.reader.read_rows(self.src, e * r, (e + 1) * r)
        elif self.mode == "fused":
            w = self.reader.read_rows(self.src, e, e + 1)[0]
        else:
            parts = [self.reader.read_rows(k) for k in self.src[e]]
            w = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
        if tuple(w.shape) != self.shape[1:]:
            raise LayoutError(f"{self.key}: expert {e} has shape {tuple(w.shape)}, expected {self.shape[1:]}")
        return w.to(self.dtype)

    def build(self, bar=None):
        """The frozen stack (dense or quantized), read one expert at a time (``bar.update(1)`` after each)."""
        parts = []
        for e in range(self.shape[0]):
            w = self.expert(e)
            if self.quant in ("none", None):
                parts.append(w.unsqueeze(0))
            else:
                bits = 4 if self.quant == "4bit" else 8
                spec = QuantSpec(bits=bits, group_size=self.group_size, rounding=self.rounding)
                parts.append(QuantizedTensor.quantize(w.unsqueeze(0), spec))
            if bar is not None:
                bar.update(1)
        if self.quant in ("none", None):
            return DenseStack(torch.cat(parts))
        t = {n: torch.cat([p.tensors()[n] for p in parts]) for n in ("qdata", "scale", "zero")}
        return QuantizedTensor.from_tensors(t, self.shape, parts[0].bits, self.group_size)


def cache_path(model_dir: Path, reader: ShardReader, cfg: UsafConfig, dtype, cache_root: Path | None) -> Path:
    """``$USAF_QUANT_CACHE`` or ``$USAF_CACHE/quant`` (default ``~/.cache/usaf/quant``)."""
    root = cache_root or cache_dir("quant", "USAF_QUANT_CACHE")
    tag = (f"v2|{Path(model_dir).resolve()}|{reader.files_signature()}|{cfg.quant}|{cfg.group_size}|{dtype}"
           # the search changes only 4-bit groups; the tags of the caches from before it stay as they were
           + (f"|{cfg.quant_rounding}" if cfg.quant == "4bit" and cfg.quant_rounding != "minmax" else ""))
    return root / f"{hashlib.sha256(tag.encode()).hexdigest()[:24]}.safetensors"


def load_streamed(model_dir, cfg: UsafConfig | None = None, dtype=torch.bfloat16, device="cpu",
                  tier: str = "disk", cache_root: Path | None = None, attn_implementation: str | None = None,
                  prefix_mapped: bool = False) -> UsafModel:
    """Load and prepare a checkpoint without ever holding its experts at full precision.

    Args:
        tier: where frozen expert stacks live: "device", "host" (RAM) or "disk" (mmap of the cache).
        prefix_mapped: the layers below the trainable range (``cfg.train_layers``) will run only to build the
            frozen-prefix cache, then be released: their stacks stay on the disk tier (the mapped cache, pages
            dropped after each use) whatever ``tier`` says, so they are never all resident at once.
    """
    cfg = cfg or UsafConfig()
    model_dir = Path(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    family = family_for(config)
    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with init_empty_weights(include_buffers=False):
        model = auto_model_class(config).from_config(config, dtype=dtype, **kw)
    reader = ShardReader(model_dir)
    # in-memory key -> (experts prefix, stack name, meta parameter, [E, R, C])
    stacks: dict[str, tuple[str, str, torch.Tensor, tuple[int, ...]]] = {}
    layers = decoder_layers(model)
    below = parse_layers(cfg.train_layers, len(layers)).start if prefix_mapped else 0
    mapped: set[str] = set()  # stacks that stay on the disk tier (layers below the trainable range)
    for i, layer in enumerate(layers):
        site = moe_site(layer, family)
        if site is None:
            continue
        prefix = next(n for n, m in model.named_modules() if m is site.experts)
        for st in site.layout.stacks:
            p = get_path(site.experts, st.path)
            e = p.shape[0] if p.dim() == 3 else int(site.experts.num_experts)  # dbrx: 2-D [E * R, C]
            shape = tuple(p.shape) if p.dim() == 3 else (e, p.shape[0] // e, p.shape[1])
            stacks[f"{prefix}.{st.path}"] = (prefix, st.name, p, shape)
            if i < below:
                mapped.add(f"{prefix}.{st.path}")

    # 1. Non-expert tensors, one at a time, straight to their device.
    disk = reader.keys()
    for key, p in list(model.named_parameters()):
        if key in stacks:
            continue
        src = key if key in disk else next((k for k in source_keys(model, key, p) if k in disk), None)
        if src is None:
            continue  # tied (lm_head) or computed
        t = reader.get(src).to(dtype=p.dtype if p.is_floating_point() else None, device=device)
        if tuple(t.shape) != tuple(p.shape):
            raise LayoutError(f"{src}: shape {tuple(t.shape)} does not match the model's {tuple(p.shape)}")
        mod_name, _, pname = key.rpartition(".")
        get_path(model, mod_name)._parameters[pname] = torch.nn.Parameter(t, requires_grad=False)
    for key, b in list(model.named_buffers()):
        if key in disk:
            mod_name, _, bname = key.rpartition(".")
            get_path(model, mod_name)._buffers[bname] = reader.get(key).to(device=device, dtype=b.dtype)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta and n not in stacks]
    if missing:
        raise ValueError(f"checkpoint {model_dir} lacks {len(missing)} tensors, e.g. {missing[0]}")

    # 2. Expert stacks: from the quantized cache, or streamed + quantized + cached.
    key_of = {(prefix, name): key for key, (prefix, name, _, _) in stacks.items()}
    cpath = cache_path(model_dir, reader, cfg, dtype, cache_root)
    cached = _open_cache(cpath)
    if cached is not None:
        tensors, meta, _mm = cached
        base_fp = meta["base_fingerprint"]
        frozen = {}
        for key, (prefix, name, _, shape) in stacks.items():
            frozen.setdefault(prefix, {})[name] = _from_cache(tensors, key, shape, cfg)
        log.info("expert stacks mapped from the quantized cache %s", cpath)
    else:
        base_fp = checkpoint_fingerprint(model_dir)
        # Each stack goes to the cache file as soon as it is quantized; only the host and device tiers keep
        # them in memory (the disk tier maps the file after): the first run's peak is one stack, not all.
        keep = tier in ("device", "host")
        frozen = {}
        builders = [(prefix, name, _StackBuilder(reader, model, key, m, dtype, cfg.quant, cfg.group_size, shape,
                                                       cfg.quant_rounding))
                    for key, (prefix, name, m, shape) in stacks.items()]

        def write(tmp):
            with open(tmp, "wb") as f, progress_bar(sum(b.shape[0] for *_, b in builders),
                                                     f"quantizing experts ({cfg.quant}, first run)",
                                                     unit="expert") as bar:
                out = SafetensorsStream(f, 4096 + 512 * 3 * len(builders))
                for prefix, name, b in builders:
                    stack = b.build(bar)
                    for k, v in stack.tensors().items():
                        out.add(f"{b.key}.{k}", v)
                    if keep and b.key not in mapped:
                        frozen.setdefault(prefix, {})[name] = stack
                    del stack
                out.finish({"base_fingerprint": base_fp, "quant": cfg.quant, "group_size": str(cfg.group_size),
                            "quant_rounding": cfg.quant_rounding})

        atomic_write(cpath, write)
        log.info("expert stacks quantized and cached in %s", cpath)
        if not keep or mapped:  # the disk tier, or the prefix layers of the host and device tiers
            tensors, _, _mm = map_safetensors(cpath)
            for key, (prefix, name, _, shape) in stacks.items():
                if not keep or key in mapped:
                    frozen.setdefault(prefix, {})[name] = _from_cache(tensors, key, shape, cfg)
    target = device if tier == "device" else "cpu"
    if tier in ("device", "host"):
        # Stack by stack, each mapped stack's pages dropped once copied: the mapped cache and its copy never
        # add up (at 16 layers of Qwen3-30B-A3B's widths the whole copy would peak at 2 x 5.4 GB). Stacks just
        # quantized on the CPU for the host tier are already where they go: kept as they are; the prefix's
        # stacks stay mapped.
        just_built = cached is None and torch.device(target).type == "cpu"
        moved: dict = {}
        for p, d in frozen.items():
            for n, s in d.items():
                if key_of[p, n] in mapped or just_built:
                    moved.setdefault(p, {})[n] = s
                else:
                    moved.setdefault(p, {})[n] = _clone_to(s, target)
                    evict(s)
        frozen = moved
        if mapped:
            log.info("the frozen stacks of layers 0-%d stay mapped (disk tier): they run once, for the "
                     "frozen-prefix cache", below - 1)
    handle = prepare(model, cfg, frozen=frozen, base_fingerprint=base_fp)
    model.eval()
    return handle


def _open_cache(cpath: Path):
    """The mapped quantized cache ``(tensors, metadata, mmap)`` when it exists and passes its checksums; a
    damaged one is removed (it is rebuilt) with a warning naming it. ``USAF_VERIFY_CACHE=0`` skips the
    checksums (they cost one read of the cache per load: 16 GB for Qwen3-30B-A3B's experts at 4 bits)."""
    if not cpath.exists():
        return None
    try:
        if os.environ.get("USAF_VERIFY_CACHE", "1") != "0":
            with progress_bar(cpath.stat().st_size, "checking the quantized cache", unit="B", unit_scale=True,
                              unit_divisor=1024) as bar:
                if not verify_file(cpath, progress=bar):
                    raise IntegrityError(f"{cpath} has no checksums")
        tensors, meta, mm = map_safetensors(cpath)
        if "base_fingerprint" not in meta:
            raise IntegrityError(f"{cpath} records no fingerprint")
        return tensors, meta, mm
    except (IntegrityError, ValueError, KeyError, OSError) as e:
        log.warning("the quantized cache is damaged (%s); rebuilding it", str(e).splitlines()[0])
        cpath.unlink(missing_ok=True)
        return None


def _from_cache(tensors: dict, key: str, shape: tuple, cfg: UsafConfig):
    if cfg.quant in ("none", None):
        return DenseStack(tensors[f"{key}.dense"])
    t = {n: tensors[f"{key}.{n}"] for n in ("qdata", "scale", "zero")}
    return QuantizedTensor.from_tensors(t, shape, 4 if cfg.quant == "4bit" else 8, cfg.group_size)


def _clone_to(stack, device):
    if isinstance(stack, DenseStack):
        return DenseStack(stack.tensor.to(device, copy=True))
    t = {k: v.to(device, copy=True) for k, v in stack.tensors().items()}
    return QuantizedTensor.from_tensors(t, stack.shape, stack.bits, stack.group_size)


def load_prepared(model: str, cfg: UsafConfig, dtype, device, trust_remote_code: bool = False,
                  tier: str = "auto", device_memory=None, host_memory=None, prefix_mapped: bool = False
                  ) -> UsafModel:
    """The one way usaf loads a model to train or evaluate: streamed for local safetensors checkpoints
    (quantized cache, tiers), ``from_pretrained`` + ``prepare`` otherwise (hub ids, remote code).
    ``prefix_mapped``: see :func:`load_streamed` (the caller builds the frozen-prefix cache next)."""
    family_for(load_config(model, trust_remote_code))
    if is_gguf(model):
        if tier == "auto":
            tier = choose_tier(gguf_expert_bytes(model), device, device_memory, host_memory, in_file=True)
            log.info("frozen expert stacks (GGUF) on the %s tier", tier)
        handle = load_gguf(model, cfg, dtype=dtype, device=device, tier=tier, prefix_mapped=prefix_mapped)
        handle.model.to(device)
        return handle
    p = Path(model)
    if p.is_dir() and not trust_remote_code:
        check_shards(p)
        if tier == "auto":
            tier = choose_tier(expert_bytes(load_config(model, trust_remote_code), cfg), device,
                               device_memory, host_memory)
            log.info("frozen expert stacks on the %s tier", tier)
        try:
            handle = load_streamed(p, cfg, dtype=dtype, device=device, tier=tier, prefix_mapped=prefix_mapped)
        except LayoutError as e:  # transformers' own loader converts it (the whole model is loaded at once)
            log.warning("the checkpoint's on-disk layout needs transformers' conversion (%s): loaded with "
                        "from_pretrained instead of streamed", str(e).splitlines()[0])
        except (OSError, RuntimeError) as e:
            raise ValueError(f"cannot load {model}: {str(e).splitlines()[0]}") from None
        else:
            handle.model.to(device)
            return handle
    return prepare(load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code), cfg)


def meta_model(config):
    """The model of ``config`` on the meta device (no memory), built with the class usaf loads it with."""
    with init_empty_weights(include_buffers=False):
        return auto_model_class(config).from_config(config)


def expert_bytes(config, cfg: UsafConfig) -> int:
    """Bytes of all frozen expert stacks at the chosen quantization, from the config alone."""
    with init_empty_weights():
        model = auto_model_class(config).from_config(config)
    family = family_for(config)
    n = 0
    for layer in decoder_layers(model):
        site = moe_site(layer, family)
        n += sum(get_path(site.experts, st.path).numel() for st in site.layout.stacks) if site is not None else 0
    bits = {"4bit": 4 + 32 / cfg.group_size, "8bit": 8 + 32 / cfg.group_size}.get(cfg.quant, 16)
    return int(n * bits / 8)
