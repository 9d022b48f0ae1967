"""Process settings at import (``usaf.runtime``): glibc's malloc thresholds."""

import os
import subprocess
import sys

import pytest

from usaf import runtime as usaf_runtime

_MAPPED = """
import ctypes, importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("usaf_runtime", sys.argv[1])  # what `import usaf` runs first
runtime = importlib.util.module_from_spec(spec)
spec.loader.exec_module(runtime)
runtime.tune()

class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
before = libc.mallinfo2().hblkhd
t = torch.empty(int(sys.argv[2]), dtype=torch.uint8)  # e.g. a 4 MiB buffer, as a step's activations are
print(libc.mallinfo2().hblkhd - before)  # bytes glibc mapped for it (0: taken from the heap)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_malloc_threshold_knob_serves_buffers_below_it_from_the_heap():
    """``USAF_MALLOC_THRESHOLD_MIB`` (and ``_KIB``): a buffer below the threshold comes from the heap (reused
    there when freed, with no page faults); by default (1 MiB) a 4 MiB buffer is mapped afresh (every page faulted in and zeroed
    on first write). A bad value is named on stderr and ignored."""

    def mapped(value, size=4 << 20, name="USAF_MALLOC_THRESHOLD_MIB"):
        env = dict(os.environ, **{name: value})
        env.pop("USAF_NO_MALLOC_TUNING", None)
        env.pop("USAF_NO_RUNTIME_TUNING", None)
        p = subprocess.run([sys.executable, "-c", _MAPPED, usaf_runtime.__file__, str(size)], env=env,
                           capture_output=True, text=True, check=True)
        return int(p.stdout.split()[-1]), p.stderr

    default, _ = mapped("")
    big, _ = mapped("16")
    bad, err = mapped("lots")
    assert default >= 4 << 20 and big == 0, (default, big)
    assert bad >= 4 << 20 and "ignoring USAF_MALLOC_THRESHOLD_MIB='lots'" in err, (bad, err)
    # USAF_MALLOC_THRESHOLD_KIB: below 1 MiB too; a 512 KiB buffer is taken from the heap by default and mapped
    # afresh with 256 KiB; out of range is named and ignored
    half, _ = mapped("", 512 << 10, "USAF_MALLOC_THRESHOLD_KIB")
    low, _ = mapped("256", 512 << 10, "USAF_MALLOC_THRESHOLD_KIB")
    tiny, err = mapped("8", 512 << 10, "USAF_MALLOC_THRESHOLD_KIB")
    assert half == 0 and low >= 512 << 10, (half, low)
    assert tiny == 0 and "ignoring USAF_MALLOC_THRESHOLD_KIB='8'" in err, (tiny, err)
