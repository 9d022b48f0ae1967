"""Process-level memory settings that keep a training step's peak close to inference's on CPU.

Measured (tiny bench model, docs/benchmarks.md): with glibc's default dynamic thresholds, freed activation
and selection buffers stay in the heap, and oneDNN keeps one primitive per matmul shape; together that was
most of the gap between the training and the inference peak. usaf therefore, at import:
- sets glibc's trim and mmap thresholds to 1 MiB (big buffers go back to the OS when freed) and one arena;
- caps oneDNN's primitive cache (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``, default 32) unless the user set it.
``USAF_MALLOC_THRESHOLD_MIB`` (an integer, 1-32) sets both glibc thresholds instead of 1 MiB: buffers below it are
then reused from the heap instead of mapped (and faulted in, zeroed) afresh, for faster CPU steps and a higher
peak (docs/benchmarks.md, "glibc's thresholds"). ``USAF_MALLOC_THRESHOLD_KIB`` (64-32768) sets them in KiB, and
below 1 MiB the other way: the heap then keeps fewer freed buffers between steps, for a lower peak and slower
steps (docs/quality.md, "What the memory usaf's training adds is made of").
``USAF_NO_MALLOC_TUNING=1`` turns the glibc part off; ``USAF_NO_RUNTIME_TUNING=1`` turns both off (the
benchmarks' baseline methods run that way: the settings suit usaf's allocation pattern, not theirs - with
them, PEFT LoRA on fused experts ran 1.8x slower, measured).
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
MALLOC_THRESHOLD = 1 << 20


def malloc_threshold() -> int:
    """glibc's trim and mmap thresholds in bytes: ``USAF_MALLOC_THRESHOLD_KIB`` KiB (64-32768), else
    ``USAF_MALLOC_THRESHOLD_MIB`` MiB (1-32: glibc's mmap threshold caps at 32 MiB), else 1 MiB. A bad value is
    named on stderr and ignored (this runs at import, before any command line is parsed, and without torch:
    oneDNN reads its settings when torch loads)."""
    for unit, low, high, shift in (("KiB", 64, 32 << 10, 10), ("MiB", 1, 32, 20)):
        name = f"USAF_MALLOC_THRESHOLD_{unit.upper()}"
        raw = os.environ.get(name, "").strip()
        if not raw:
            continue
        if raw.isdigit() and low <= int(raw) <= high:
            return int(raw) << shift
        print(f"usaf: ignoring {name}={raw!r}: not a whole number of {unit} from {low} to {high}", file=sys.stderr)
    return MALLOC_THRESHOLD


def tune() -> None:
    if os.environ.get("USAF_NO_RUNTIME_TUNING"):
        return
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "32")
    # ideep's cache of reordered weights: usaf's expert weights are dequantized afresh for every use, so
    # cached reorders are never hit again; they only held memory (40 MB on the tiny bench model, measured).
    os.environ.setdefault("LRU_CACHE_CAPACITY", "1")
    if os.environ.get("USAF_NO_MALLOC_TUNING") or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        size = malloc_threshold()
        libc.mallopt(_M_TRIM_THRESHOLD, size)
        libc.mallopt(_M_MMAP_THRESHOLD, size)
        libc.mallopt(_M_ARENA_MAX, 1)
    except (OSError, AttributeError):  # not glibc
        pass


def release_free_memory() -> None:
    """Return freed heap memory to the OS (after selection, which frees large score buffers)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
