"""What this process holds, measured: current and peak RSS, and the time and peak memory of each phase of a run.

``PhaseMeter`` is what ``usaf train`` records in ``metrics.json`` (``phases``): per phase (setup, load,
prefix, eval before, select, steps, finish) its wall seconds, the highest resident set size sampled during it
(``VmRSS``), and the highest anonymous part (``RssAnon``: heap and tensors; the rest is file-backed pages:
libraries, memory-mapped weights and caches). A thread samples ``/proc/self/status`` every ``interval``
seconds, plus once at each phase's start and end, so a spike shorter than the interval can be missed (the
whole-run peak, ``peak_rss_mb``, is the kernel's). The kernel's own peak mark is never reset here: a tool
that reads it afterwards (``/usr/bin/time -v``, ``getrusage``) still sees the whole run's peak. Linux only;
elsewhere the phases carry their times and no memory figures.
"""

from __future__ import annotations

import ctypes
import os
import resource
import sys
import threading
import time
from contextlib import contextmanager

_KB = 1024


def status_kb(fields: tuple[str, ...]) -> dict[str, int]:
    """Fields of ``/proc/self/status`` in kB (empty where there is no such file)."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in fields:
                    out[key] = int(line.split()[1])
    except (OSError, ValueError):
        pass
    return out


def peak_rss_mb() -> float:
    """This process's peak RSS in MB: ``VmHWM`` where Linux has it (the peak of this program's own memory
    map), else ``getrusage(RUSAGE_SELF).ru_maxrss``. ``ru_maxrss`` of a worker started by fork + exec also
    keeps the parent's peak at the fork, so a worker of a big parent would report the parent's peak."""
    hwm = status_kb(("VmHWM",)).get("VmHWM")
    if hwm:
        return hwm / _KB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / _KB


def rss_mb() -> float:
    """Current resident set size, MB (Linux /proc; else the peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return peak_rss_mb()


class _MallInfo2(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def malloc_info() -> dict[str, int]:
    """glibc's ``mallinfo2`` in bytes: ``in_use`` (heap chunks allocated and not freed), ``free`` (freed heap
    the allocator keeps) and ``mapped`` (allocations mapped on their own); ``{}`` where the C library is not
    glibc. It walks the heap's bins: cheap once per step, not every few milliseconds at real width."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        m = libc.mallinfo2()
    except (OSError, AttributeError):
        return {}
    return {"in_use": m.uordblks, "free": m.fordblks, "mapped": m.hblkhd}


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux ``clear_refs`` 5) so a later phase can be measured alone (the
    benchmarks' workers; never ``usaf train``, whose whole-run peak tools read afterwards)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class AnonSampler:
    """Samples anonymous RSS (``RssAnon``: heap and tensors, no library code pages) every ``interval`` s.

    ``ru_maxrss`` also counts the file-backed pages of libtorch that a process touches, which differ by
    method (backward kernels, PEFT code) and dominate a tiny model; the sampled anonymous peak does not.
    """

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, status_kb(("RssAnon",)).get("RssAnon", 0))
            self._stop.wait(self.interval)

    def __enter__(self) -> AnonSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kb = max(self.peak_kb, status_kb(("RssAnon",)).get("RssAnon", 0))


class PhaseMeter:
    """Wall time, peak RSS and peak anonymous RSS of named phases (module docstring)."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.phases: list[dict] = []
        self._peak = {"VmRSS": 0, "RssAnon": 0}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.available = bool(status_kb(("VmRSS",)))

    def _sample(self) -> None:
        s = status_kb(("VmRSS", "RssAnon"))
        with self._lock:
            for k, v in s.items():
                self._peak[k] = max(self._peak[k], v)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def start(self) -> PhaseMeter:
        if self.available and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="usaf-phase-meter", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    @contextmanager
    def phase(self, name: str):
        """Measure the enclosed block as phase ``name`` (recorded even when it raises)."""
        if self.available:
            with self._lock:
                self._peak = {"VmRSS": 0, "RssAnon": 0}
            self._sample()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            rec = {"phase": name, "seconds": round(time.perf_counter() - t0, 2)}
            if self.available:
                self._sample()
                with self._lock:
                    rec["peak_rss_mb"] = round(self._peak["VmRSS"] / _KB, 1)
                    rec["peak_anon_mb"] = round(self._peak["RssAnon"] / _KB, 1)
            self.phases.append(rec)
