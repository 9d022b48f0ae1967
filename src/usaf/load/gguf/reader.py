"""Reading a GGUF file safely: every count, length, offset and size is checked against the file before
anything is allocated, and tensors are views of a read-only memory map (nothing is copied).

A GGUF file is ``magic "GGUF" | version u32 | n_tensors u64 | n_kv u64 | n_kv key/values | n_tensors
tensor infos (name, n_dims u32, dims u64[n_dims] innermost first, type u32, offset u64) | padding to
general.alignment | tensor data``. A GGUF is a file people download from strangers, so the parser trusts no
number in it: a string or array may not be longer than what is left of the file, a tensor needs 1-4 dims of
at least 1 and at most 2**31 each, a known type whose block divides its rows, and data that lies inside the
file without overlapping another tensor's. Any violation is a :class:`GGUFError` (one line).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ...engine.ggml import BLOCKS, type_name


class GGUFError(ValueError):
    """The file is not a GGUF usaf can read (shown as one line, exit code 2)."""


_MAGIC = b"GGUF"
_MAX_DIM = 1 << 31
_MAX_ELEMENTS = 1 << 44
# GGUF value types -> (struct code, size); 8 string, 9 array
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4), 6: ("<f", 4),
            7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_STRING, _ARRAY = 8, 9
_LAZY = 4096  # metadata arrays longer than this (a vocabulary, its merges) stay bytes of the map until read


class LazyArray:
    """A long metadata array kept as its span of the file (its lengths checked, nothing decoded): a 150k-token
    vocabulary as Python strings is tens of MB that usaf never reads (transformers reads the file itself).
    Reading it (iteration, ``len``, indexing, ``==`` with a list) parses it; two of them compare by bytes."""

    def __init__(self, cursor: _Cursor, start: int, end: int, etype: int, count: int):
        self._buf, self._path, self.start, self.end = cursor.buf, cursor.path, start, end
        self.etype, self.count = etype, count

    def items(self) -> list:
        c = _Cursor(self._buf, self._path)
        c.pos = self.start
        return c.items(self.etype, self.count, "an array")

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        return iter(self.items())

    def __getitem__(self, i):
        return self.items()[i]

    def __eq__(self, other) -> bool:
        if isinstance(other, LazyArray):
            return self.etype == other.etype and self.count == other.count and \
                bytes(self._buf[self.start : self.end]) == bytes(other._buf[other.start : other.end])
        return isinstance(other, list) and self.items() == other

    __hash__ = None

    def __repr__(self) -> str:
        return f"LazyArray({self.count} of type {self.etype})"


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the file: ``shape`` in numpy order (outermost first), ``offset`` absolute in the file."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int
    nbytes: int

    @property
    def type_name(self) -> str:
        return type_name(self.ggml_type)


class _Cursor:
    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path, self.size = buf, 0, path, len(buf)

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise GGUFError(f"{self.path} is truncated or corrupt: {what} runs past the end of the file")

    def scalar(self, code: str, size: int, what: str):
        self.need(size, what)
        (v,) = struct.unpack_from(code, self.buf, self.pos)
        self.pos += size
        return v

    def u32(self, what: str) -> int:
        return self.scalar("<I", 4, what)

    def u64(self, what: str) -> int:
        return self.scalar("<Q", 8, what)

    def string(self, what: str) -> str:
        n = self.u64(what)
        self.need(n, what)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFError(f"{self.path}: {what} is not valid UTF-8") from None

    def value(self, vtype: int, what: str, depth: int = 0):
        if vtype in _SCALARS:
            return self.scalar(*_SCALARS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY and depth == 0:
            etype, count = self.u32(what), self.u64(what)
            least = _SCALARS[etype][1] if etype in _SCALARS else 8 if etype in (_STRING, _ARRAY) else None
            if least is None:
                raise GGUFError(f"{self.path}: {what} has unknown element type {etype}")
            self.need(count * least, what)  # before allocating the list
            if count > _LAZY and etype in (*_SCALARS, _STRING):
                start = self.pos
                if etype == _STRING:
                    for _ in range(count):  # the lengths checked, nothing decoded
                        n = self.u64(what)
                        self.need(n, what)
                        self.pos += n
                else:
                    self.pos += count * _SCALARS[etype][1]
                return LazyArray(self, start, self.pos, etype, count)
            return self.items(etype, count, what, depth + 1)
        raise GGUFError(f"{self.path}: {what} has unknown value type {vtype}")

    def items(self, etype: int, count: int, what: str, depth: int = 1) -> list:
        if etype in _SCALARS and etype != 7:
            code, size = _SCALARS[etype]
            self.need(count * size, what)
            out = list(struct.unpack_from(f"<{count}{code[1]}", self.buf, self.pos))
            self.pos += count * size
            return out
        return [self.value(etype, what, depth) for _ in range(count)]


class GGUFFile:
    """A parsed, validated GGUF file: ``metadata`` (key -> value), ``tensors`` (name -> :class:`TensorInfo`,
    in file order), and :meth:`data` / :meth:`raw` views of the read-only memory map."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise GGUFError(f"{self.path} does not exist or is not a file")
        with open(self.path, "rb") as f:
            if f.read(4) != _MAGIC:
                raise GGUFError(f"{self.path} is not a GGUF file (no GGUF magic)")
            self.size = self.path.stat().st_size
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        c = _Cursor(memoryview(self._mm), self.path)
        c.pos = 4
        self.version = c.u32("the version")
        if self.version not in (2, 3):
            raise GGUFError(f"{self.path}: GGUF version {self.version} is not supported (2 and 3 are)")
        n_tensors, n_kv = c.u64("the tensor count"), c.u64("the key/value count")
        if n_tensors * 32 > self.size or n_kv * 12 > self.size:  # smallest tensor info / key-value
            raise GGUFError(f"{self.path} is truncated or corrupt: {n_tensors} tensors and {n_kv} keys do not "
                            f"fit in {self.size} bytes")
        self.metadata: dict[str, object] = {}
        for i in range(n_kv):
            key = c.string(f"key {i}")
            self.metadata[key] = c.value(c.u32(f"the type of {key}"), f"the value of {key}")
        self.kv_end = c.pos  # bytes [0, kv_end): magic, version, counts and the key/values, as stored
        infos = []
        for i in range(n_tensors):
            name = c.string(f"the name of tensor {i}")
            n_dims = c.u32(f"the dims of {name}")
            if not 1 <= n_dims <= 4:
                raise GGUFError(f"{self.path}: tensor {name} has {n_dims} dimensions (1 to 4 allowed)")
            dims = [c.u64(f"the dims of {name}") for _ in range(n_dims)]
            infos.append((name, dims, c.u32(f"the type of {name}"), c.u64(f"the offset of {name}")))
        align = self.metadata.get("general.alignment", 32)
        if not isinstance(align, int) or align < 1 or align & (align - 1) or align > 1 << 16:
            raise GGUFError(f"{self.path}: general.alignment {align!r} is not a power of two")
        self.alignment = align
        self.data_start = -(-c.pos // align) * align
        self.tensors: dict[str, TensorInfo] = {}
        for name, dims, kind, off in infos:
            self.tensors[name] = self._check_tensor(name, dims, kind, off)
        spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in self.tensors.values())
        for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
            if start < end:
                raise GGUFError(f"{self.path}: tensors {a} and {b} overlap in the file")

    def _check_tensor(self, name: str, dims: list[int], kind: int, off: int) -> TensorInfo:
        if name in self.tensors:
            raise GGUFError(f"{self.path}: tensor {name} appears twice")
        if any(d < 1 or d > _MAX_DIM for d in dims):
            raise GGUFError(f"{self.path}: tensor {name} has absurd dimensions {dims}")
        n = 1
        for d in dims:
            n *= d
        if n > _MAX_ELEMENTS:
            raise GGUFError(f"{self.path}: tensor {name} has absurd dimensions {dims}")
        if kind not in BLOCKS:
            raise GGUFError(f"{self.path}: tensor {name} has type {type_name(kind)}, which usaf does not read "
                            f"(supported: {', '.join(type_name(k) for k in BLOCKS)})")
        block, size = BLOCKS[kind]
        if dims[0] % block:
            raise GGUFError(f"{self.path}: tensor {name} has rows of {dims[0]} elements, not a multiple of "
                            f"{type_name(kind)}'s block of {block}")
        nbytes = n // block * size
        if off % self.alignment:
            raise GGUFError(f"{self.path}: tensor {name}'s offset {off} is not aligned")
        start = self.data_start + off
        if start + nbytes > self.size:
            raise GGUFError(f"{self.path} is truncated or corrupt: tensor {name} ({nbytes} bytes at {start}) "
                            f"ends past the end of the file ({self.size} bytes)")
        return TensorInfo(name, tuple(reversed(dims)), kind, start, nbytes)

    def raw(self, name: str) -> torch.Tensor:
        """The tensor's bytes as a read-only uint8 view ``(rows..., bytes per row)`` of the memory map."""
        t = self.tensors[name]
        block, size = BLOCKS[t.ggml_type]
        buf = torch.frombuffer(self._mm, dtype=torch.uint8, count=t.nbytes, offset=t.offset) if t.nbytes else \
            torch.empty(0, dtype=torch.uint8)
        return buf.view(*t.shape[:-1], t.shape[-1] // block * size)

    def bytes_of(self, name: str) -> bytes:
        t = self.tensors[name]
        return self.pread(t.offset, t.nbytes)

    def pread(self, offset: int, n: int) -> bytes:
        """``n`` bytes at ``offset`` read with plain reads (the memory map's pages are not touched, so they do
        not become resident in this process)."""
        with open(self.path, "rb") as fh:
            fh.seek(offset)
            return fh.read(n)

    def release(self, name: str) -> None:
        """Give back the resident pages of a tensor's whole pages of the memory map (read again on next use)."""
        t = self.tensors[name]
        start = -(-t.offset // mmap.PAGESIZE) * mmap.PAGESIZE
        end = (t.offset + t.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > start:
            self._mm.madvise(mmap.MADV_DONTNEED, start, end - start)

    @property
    def mm(self) -> mmap.mmap:
        """The private (copy-on-write) memory map of the whole file."""
        return self._mm

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)

    @property
    def arch(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise GGUFError(f"{self.path} has no general.architecture")
        return arch
