"""Progress bars (with an ETA) of the long phases before training: the first run's quantization of the
experts, the quantized cache's checksum pass, the frozen-prefix cache, the initial selection (per layer).

``usaf`` commands switch them on, or off with ``--quiet`` (and on every rank but the main one) through
:func:`progress_bars`; outside it (library use) a bar shows only when stderr is a terminal, as tqdm's
``disable=None`` does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from tqdm import tqdm

_ON: bool | None = None  # None: tqdm decides (stderr a terminal)


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
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, disable=None if _ON is None else not _ON,
                **kw)
