"""Tensors kept on disk between a forward and its backward: the lean experts' gate/up pre-activations.

In their lean mode (decoder-layer checkpointing, ``usaf.engine.checkpointing``) the experts keep only the
layer input and the routing, and their backward recomputes each hit expert's gate/up pre-activations
``h = x_e @ W_gu``: a third of the experts' matmul work of a training step, done again. :class:`PreactSpill`
writes each block of ``h`` to an unlinked temporary file as the forward computes it, and the backward reads it
back a block at a time (into one reused buffer) instead of recomputing it. The bytes read are the bytes
written, so the gradients are those of the non-lean backward, bit for bit; the process holds one block of
``h``, not the layer's (the file goes through the page cache, which is not the process's memory, and which the
kernel may write out and drop under memory pressure).

CPU tensors only (a GPU recomputes faster than it would copy to the host and back). The file lives in
``$USAF_SPILL_DIR`` (default ``$USAF_CACHE/spill``) and is deleted when closed or when the process ends. Where
no file can be made, or a write fails (a full disk), the backward recomputes as before (a warning in the log).
``USAF_NO_PREACT_SPILL=1`` turns it off.
"""

from __future__ import annotations

import logging
import os
import tempfile

import torch

from ..io import cache_dir

log = logging.getLogger("usaf")


def spill_dir():
    """Where spilled tensors go: ``$USAF_SPILL_DIR``, else ``$USAF_CACHE/spill``."""
    return cache_dir("spill", "USAF_SPILL_DIR")


def write_at(fd: int, t: torch.Tensor, pos: int) -> int:
    """Write the bytes of CPU tensor ``t`` at byte ``pos`` of ``fd``; returns the position after them."""
    data = t.detach().contiguous().view(-1).view(torch.uint8).numpy()
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, pos)
        view, pos = view[n:], pos + n
    return pos


def read_into(fd: int, out: torch.Tensor, pos: int) -> torch.Tensor:
    """Fill contiguous CPU tensor ``out`` with the bytes at ``pos`` of ``fd``; returns ``out``."""
    view = memoryview(out.view(-1).view(torch.uint8).numpy())
    while view:
        n = os.preadv(fd, [view], pos)
        if n <= 0:
            raise OSError(f"spill file is short at byte {pos}")
        view, pos = view[n:], pos + n
    return out


class Region:
    """A forward's part of the file: rows of ``width`` values of ``dtype``, from byte ``offset``. Freed by its
    backward (or when dropped unused)."""

    __slots__ = ("owner", "offset", "row_bytes", "ok")

    def __init__(self, owner: PreactSpill, offset: int, row_bytes: int):
        self.owner, self.offset, self.row_bytes, self.ok = owner, offset, row_bytes, True

    def write(self, r0: int, h: torch.Tensor) -> None:
        """Rows ``r0 ..`` of the pre-activations (``h`` contiguous)."""
        if not self.ok:
            return
        if h.shape[-1] * h.dtype.itemsize != self.row_bytes or not h.is_contiguous():  # not rows as reserved
            self.ok = False
            return
        try:
            write_at(self.owner.fd, h, self.offset + r0 * self.row_bytes)
        except OSError as e:
            self.ok = False
            self.owner.fail(f"writing failed ({e.strerror or e})")

    def read(self, r0: int, out: torch.Tensor) -> torch.Tensor:
        return read_into(self.owner.fd, out, self.offset + r0 * self.row_bytes)

    def free(self) -> None:
        if self.owner is not None:
            self.owner._release()
            self.owner = None

    def __del__(self):
        try:
            self.free()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class PreactSpill:
    """The file, filled from the start by the forwards whose backward is pending (a bump allocator: the end
    returns to 0 once every region is freed, so a training step reuses the same bytes)."""

    def __init__(self, directory=None):
        self.directory = directory
        self.fd: int | None = None
        self.failed = os.environ.get("USAF_NO_PREACT_SPILL", "") not in ("", "0")
        self._end = 0
        self._live = 0
        self._file = None

    def region(self, rows: int, width: int, dtype: torch.dtype) -> Region | None:
        """Space for ``rows`` x ``width`` values, or None (no file: the backward recomputes)."""
        if self.failed:
            return None
        if self.fd is None:
            d = self.directory or spill_dir()
            try:
                os.makedirs(d, exist_ok=True)
                self._file = tempfile.TemporaryFile(dir=d, prefix="usaf-preact-")
                self.fd = self._file.fileno()
            except OSError as e:
                self.fail(f"cannot make a file in {d} ({e.strerror or e})")
                return None
        row_bytes = width * dtype.itemsize
        r = Region(self, self._end, row_bytes)
        self._end += rows * row_bytes
        self._live += 1
        return r

    def fail(self, why: str) -> None:
        if not self.failed:
            log.warning("the experts' pre-activations are recomputed in the backward: %s", why)
        self.failed = True

    def _release(self) -> None:
        self._live -= 1
        if self._live <= 0:
            self._live, self._end = 0, 0

    def __deepcopy__(self, memo) -> PreactSpill:
        """A copied model gets a file of its own (opened on its first use)."""
        new = PreactSpill(self.directory)
        new.failed = self.failed
        return new

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file, self.fd = None, None
