"""The recorded experts calls of a calibration pass, kept on disk between the pass and each layer's scoring.

A calibration pass (``usaf.engine.select.calibrate``) records every experts call of every trainable layer
(:class:`usaf.engine.experts.Captured`): its input ``x`` and output gradient ``dout`` are ``2 T H`` values per
layer and batch, the routing ``T K``. Held in memory, 16 batches of 8 layers hold 128 of those pairs at once,
which at Qwen3-30B-A3B widths is about 1 GB above the training step's peak. :class:`CallRecords` writes each
batch's ``x`` and ``dout`` to an unlinked temporary file as soon as its backward completes and reads them back
one batch of one layer at a time when that layer is scored: the memory the records hold is one layer's batch,
whatever the number of batches. The bytes read back are the bytes written, so the scores are the same bit for
bit (a test compares the two).

The file lives in ``$USAF_SPILL_DIR`` (default ``$USAF_CACHE/spill``), is deleted when closed (or when the
process ends), and goes through the page cache: what the kernel keeps of it is not the process's memory. When
no file can be made there, or the disk fills while writing, the records stay in memory (a warning in the log).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator

import torch

from .experts import Captured
from .spill import read_into, spill_dir, write_at

log = logging.getLogger("usaf")


class _Slot:
    """Where one tensor of a record is in the file: byte offset, shape, dtype and device."""

    __slots__ = ("offset", "shape", "dtype", "device")

    def __init__(self, offset: int, t: torch.Tensor):
        self.offset, self.shape, self.dtype, self.device = offset, tuple(t.shape), t.dtype, t.device

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


class LayerCalls:
    """One layer's recorded calls: ``len()`` batches; iterating yields each batch's list of :class:`Captured`,
    read back from the file as it is reached (in memory when not spilled)."""

    def __init__(self, owner: CallRecords, layer: int):
        self.owner, self.layer = owner, layer

    def __len__(self) -> int:
        return len(self.owner._batches[self.layer])

    def __iter__(self) -> Iterator[list[Captured]]:
        for batch in self.owner._batches[self.layer]:
            yield [self.owner._load(c) for c in batch]


class CallRecords:
    """Per trainable layer, its experts calls of each calibration batch (see the module docstring).

    Args:
        layers: the trainable layers' indices.
        spill: write ``x`` and ``dout`` to a temporary file (default) or keep them in memory.
        directory: where the file goes (default :func:`spill_dir`).
    """

    def __init__(self, layers, spill: bool = True, directory=None):
        self._batches: dict[int, list[list]] = {i: [] for i in layers}
        self._fd: int | None = None
        self._spilling = False  # new calls go to the file (False after a failed write: earlier ones stay there)
        self._end = 0
        if spill:
            try:
                d = directory or spill_dir()
                os.makedirs(d, exist_ok=True)
                f = tempfile.TemporaryFile(dir=d, prefix="usaf-calib-")
                self._file, self._fd, self._spilling = f, f.fileno(), True
            except OSError as e:
                log.warning("calibration records stay in memory: cannot make a file in %s (%s)",
                            directory or spill_dir(), e.strerror or e)

    @property
    def spilling(self) -> bool:
        return self._spilling

    def __getitem__(self, layer: int) -> LayerCalls:
        return LayerCalls(self, layer)

    def add(self, layer: int, calls: list[Captured]) -> None:
        """Keep one batch's completed calls of ``layer`` (written out now when spilling)."""
        self._batches[layer].append([self._store(c) for c in calls])

    def _write(self, t: torch.Tensor) -> _Slot:
        slot = _Slot(self._end, t)
        self._end = write_at(self._fd, t.cpu(), self._end)
        return slot

    def _store(self, c: Captured):
        if not self._spilling:
            return c
        try:
            return (self._write(c.x), c.index, c.weights, c.on_input, self._write(c.dout))
        except OSError as e:  # a full disk: this call and the later ones stay in memory
            log.warning("calibration records stay in memory: writing to the spill file failed (%s)",
                        e.strerror or e)
            self._spilling = False
            return c

    def _read(self, s: _Slot) -> torch.Tensor:
        buf = read_into(self._fd, torch.empty(s.nbytes, dtype=torch.uint8), s.offset)
        t = buf.view(s.dtype).view(s.shape)
        return t if s.device.type == "cpu" else t.to(s.device)

    def _load(self, rec) -> Captured:
        if isinstance(rec, Captured):
            return rec
        x, index, weights, on_input, dout = rec
        return Captured(self._read(x), index, weights, on_input, self._read(dout))

    def close(self) -> None:
        """Delete the file (records already written stay readable only while it is open: call at the end)."""
        if self._fd is not None:
            self._fd, self._spilling = None, False
            self._file.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
