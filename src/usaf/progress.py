"""Progress bars (with an ETA) of the long phases before training: the first run's quantization of the
experts, the quantized cache's checksum pass, the frozen-prefix cache, the initial selection (per layer).

As the tokenizing bar: shown when stderr is a terminal (tqdm's ``disable=None``), or always with
``USAF_PROGRESS=1`` (stderr going to a log file); never with ``--quiet`` or on a rank but the main one
(:func:`progress_bars` ``(False)``, which ``usaf`` commands set). ``progress_bars(True)`` forces them on.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from tqdm import tqdm

_ON: bool | None = None  # None: a terminal or USAF_PROGRESS=1 decides


def enabled() -> bool | None:
    return _ON


@contextlib.contextmanager
def progress_bars(on: bool | None) -> Iterator[None]:
    """Show (True), hide (False) or let tqdm decide (None) the phase bars within the block."""
    global _ON
    old, _ON = _ON, on
    try:
        yield
    finally:
        _ON = old


def progress_bar(total: int | float, desc: str, unit: str = "it", **kw) -> tqdm:
    """A tqdm bar of ``total`` units (rate and ETA), shown as :func:`progress_bars` says; left on screen only
    when it has ``leave=True``."""
    kw.setdefault("leave", False)
    on = _ON if _ON is not None else (True if os.environ.get("USAF_PROGRESS") == "1" else None)
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, disable=None if on is None else not on,
                **kw)
