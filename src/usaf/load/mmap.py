"""The disk tier: safetensors files mapped into memory, and giving their pages back.

A frozen stack on the disk tier is a set of tensor views of a private (copy-on-write) ``mmap`` of a
safetensors file: the kernel reads pages on use, and :func:`evict` drops them again after a frozen layer ran.
"""

from __future__ import annotations

import json
import mmap
import weakref
from pathlib import Path

import torch

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "U8": torch.uint8,
           "I32": torch.int32, "I64": torch.int64, "I8": torch.int8}


def map_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], mmap.mmap]:
    """Tensors of a safetensors file as views of a private (copy-on-write) mmap: the disk tier."""
    _prune()
    f = open(path, "rb")
    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    f.close()
    n = int.from_bytes(mm[:8], "little")
    header = json.loads(mm[8 : 8 + n])
    meta = header.pop("__metadata__", {}) or {}
    out = {}
    for k, info in header.items():
        s, e = info["data_offsets"]
        dt = _DTYPES[info["dtype"]]
        t = torch.frombuffer(mm, dtype=torch.uint8, count=e - s, offset=8 + n + s) if e > s else \
            torch.empty(0, dtype=torch.uint8)
        out[k] = t.view(dt).view(info["shape"])
        register_range(out[k], mm, 8 + n + s, e - s)
    return out, meta, mm


# data_ptr of an mmap-backed tensor -> (weak reference to the mmap, byte offset, length): lets the disk tier
# drop pages. Weak: the tensors keep their mmap alive (torch.frombuffer holds it); a strong reference here kept
# every file ever mapped mapped, with its pages resident (a second load of a model in one process, as in
# `usaf demo`, kept the first load's 1.3 GB cache mapping resident).
_MMAP_RANGES: dict[int, tuple] = {}


def evict(stack) -> None:
    """Drop the resident pages of an mmap-backed frozen stack (disk tier); they are re-read on next use."""
    for t in stack.tensors().values():
        r = _MMAP_RANGES.get(t.data_ptr())
        if r is None:
            continue
        ref, off, length = r
        mm = ref()
        if mm is None or mm.closed:  # a stale entry: its mapping is gone (a new one may reuse the address)
            continue
        start = off - off % mmap.PAGESIZE
        end = off + length
        end = end - end % mmap.PAGESIZE  # never touch pages shared with a neighbouring tensor's tail
        if end > start:
            mm.madvise(mmap.MADV_DONTNEED, start, end - start)


def is_mapped(stack) -> bool:
    """Whether any tensor of ``stack`` is a recorded view of a memory map (the disk tier)."""
    return any(t.data_ptr() in _MMAP_RANGES for t in stack.tensors().values())


def register_range(t: torch.Tensor, mm: mmap.mmap, offset: int, length: int) -> None:
    """Record that ``t`` views ``length`` bytes at ``offset`` of ``mm`` (so that :func:`evict` can drop them)."""
    _MMAP_RANGES[t.data_ptr()] = (weakref.ref(mm), offset, length)


def _prune() -> None:
    """Forget the ranges of files no longer mapped."""
    for key in [k for k, (ref, _, _) in _MMAP_RANGES.items() if ref() is None]:
        del _MMAP_RANGES[key]
