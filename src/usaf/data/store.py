"""Token stores: data files tokenized once, streaming, into flat files that are read back a sequence at a time.

:func:`load_stored` gives the examples :func:`usaf.data.load.load_examples` gives - the same sequences,
labels, order and :class:`DataStats` - without ever holding the dataset in memory: the first time, the files
are tokenized row chunk by row chunk into a store; later runs (and ``usaf eval`` on the same file) open the
store and skip tokenization. Examples are built on demand (:class:`StoredExamples`), so memory stays in
proportion to a batch.

A store is a directory ``<root>/<key>/`` holding

* ``ids.bin`` - the token ids of every sequence, concatenated (little-endian ``uint32``);
* ``labels.bin`` - their labels (little-endian ``int32``, ``-100`` = no loss), for the supervised kinds
  only (packed text: the labels are the ids);
* ``offsets.bin`` - little-endian ``int64``, sequences + 1 entries: sequence ``i`` is tokens
  ``offsets[i]:offsets[i + 1]``;
* ``manifest.json`` - format version, the key and what it was made of, kind, counts, the
  :class:`DataStats`, the byte size and sha256 of every file, the sha256 of every block (``block_bytes``,
  1 MiB) of ``ids.bin`` and ``labels.bin``, and the digest of the tokenized examples.

The key is a sha256 of the format version, the content digest of the data files (their sizes and bytes in
reading order, :func:`files_digest`) and their suffixes, the tokenizer's identity (:func:`tokenizer_identity`),
``seq_len``, the chat template kwargs and the tokenizers / transformers versions: the same data at another
path shares a store, and any change that could change a token gets a new one. ``root`` is
``$USAF_TOKENS_CACHE``, else ``$USAF_CACHE/tokens`` (default ``~/.cache/usaf/tokens``).

The content digest is not recomputed for files that have not changed: ``<root>/digests.json`` records, for
the files of each data path, the digest with each file's absolute path, size, mtime, ctime, inode and device
(:func:`data_digest`), as git's index does; any change of these hashes the files again. A file whose bytes
change while all of these stay the same (possible only by setting the clock back or writing the disk beneath
the file system) is not detected - the assumption git and make rely on. A digest is recorded only when the
files had not changed for a few seconds before they were hashed, and did not change while they were hashed,
so a file rewritten within one timestamp tick is not trusted.

A store is written in a hidden temporary directory beside its place and renamed into it when complete, so an
interrupted tokenization leaves no store (its temporary directory is removed by a later build once stale). A
store is used only if its manifest parses and matches the key, every file has its recorded size, the offsets
file its sha256 and consistent offsets; otherwise it is rebuilt. The token files are checked lazily, block by
block: the first read of a block in a process hashes the whole block and compares it with the manifest (so
opening costs no pass over the data, and a run reads each block's hash once). A block that fails is a
:class:`StoreCorrupted` error (a one-line :class:`DataError`); the store is removed first, so the next run
tokenizes the data again. A store written before block checksums existed is checked whole once and its
manifest given them. When the store cannot be written (read-only or full disk), the data is tokenized in
memory instead, with a warning.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
import transformers
from tqdm import tqdm

from ..io import cache_dir, is_disk_full
from .examples import DataError, DataStats, Example
from .load import MIN_TAIL_FRACTION, data_files, load_examples, read_data

__all__ = ["FORMAT", "StoreCorrupted", "StoredData", "StoredExamples", "TokenStore", "cache_root", "data_digest",
           "files_digest", "load_stored", "tokenizer_identity", "tokens_digest"]

log = logging.getLogger("usaf")

FORMAT = 1
_FLUSH_TOKENS = 1 << 20  # tokens buffered before they are written
_STALE_S = 3600  # a temporary store directory untouched for this long belongs to a dead build
_MANIFEST = "manifest.json"
_BLOCK_BYTES = 1 << 20  # the token files are checked by blocks of this size (recorded in the manifest)
_DIGESTS = "digests.json"  # the data digest cache in the stores' root
_DIGEST_ENTRIES = 256  # data paths remembered there (the most recently hashed)
_SETTLED_NS = 3_000_000_000  # a file changed more recently than this when hashed: its digest is not recorded


def cache_root() -> Path:
    """``$USAF_TOKENS_CACHE``, else ``$USAF_CACHE/tokens`` (default ``~/.cache/usaf/tokens``)."""
    return cache_dir("tokens", "USAF_TOKENS_CACHE")


def files_digest(files) -> str:
    """Content digest of ``files`` in order (size and bytes of each, read in blocks): the same data at
    another path has the same digest."""
    h = hashlib.sha256()
    for name in files:
        h.update(f"{os.path.getsize(name)}\0".encode())
        with open(name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:32]


def _file_stat(path: str) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _read_digests(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text())
        return d["entries"] if isinstance(d, dict) and d.get("format") == 1 and isinstance(d["entries"], dict) else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` to ``path`` atomically (a temporary file beside it, renamed over it)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            mode = path.stat().st_mode & 0o777  # the file's own mode, else rw-r--r--
        except OSError:
            mode = 0o644
        os.chmod(tmp, mode)
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def data_digest(files, root: str | Path | None) -> str:
    """:func:`files_digest` of ``files``, taken from ``<root>/digests.json`` when every file has the size,
    mtime, ctime, inode and device recorded with it there (no byte is read); else computed and recorded
    (best effort: an unwritable ``root`` only means the files are hashed again next time). ``root`` None:
    no cache."""
    if root is None:
        return files_digest(files)
    paths = [os.path.abspath(f) for f in files]
    name = json.dumps(paths)
    cache = Path(root) / _DIGESTS
    before = [_file_stat(p) for p in paths]
    entry = _read_digests(cache).get(name)
    if isinstance(entry, dict) and entry.get("stat") == before and isinstance(entry.get("digest"), str):
        return entry["digest"]
    start = time.time_ns()
    digest = files_digest(files)
    after = [_file_stat(p) for p in paths]
    settled = all(start - max(st[1], st[2]) > _SETTLED_NS for st in before)
    if after == before and settled:
        _record_digest(cache, name, {"stat": before, "digest": digest})
    return digest


def _record_digest(cache: Path, name: str, entry: dict[str, Any]) -> None:
    """Add ``entry`` to the digest cache ``cache`` (best effort), keeping the newest :data:`_DIGEST_ENTRIES`."""
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        entries = _read_digests(cache)  # read again: another process may have added its own
        entries[name] = dict(entry, at=time.time())
        if len(entries) > _DIGEST_ENTRIES:
            newest = sorted(entries, key=lambda k: entries[k].get("at", 0) if isinstance(entries[k], dict)
                            else 0)[-_DIGEST_ENTRIES:]
            entries = {k: entries[k] for k in newest}
        _write_json(cache, {"format": 1, "entries": entries})
    except OSError as e:
        log.debug("cannot record a digest in %s (%s)", cache, e)


def tokenizer_identity(tokenizer: Any) -> str:
    """A digest of everything of ``tokenizer`` that decides its tokens: the backend's full serialization (a
    fast tokenizer) or the vocabulary (a slow one), the special tokens and the chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    extra = {
        "class": type(tokenizer).__name__,
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "size": len(tokenizer),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "added": {int(k): str(v) for k, v in getattr(tokenizer, "added_tokens_decoder", {}).items()},
    }
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


# ---------------------------------------------------------------------------------------------------------
# Digests of tokenized examples
# ---------------------------------------------------------------------------------------------------------


def _hash_examples(h, ids: np.ndarray, labels: np.ndarray | None, lengths: np.ndarray) -> None:
    """Update ``h`` with each example's ids then labels, as int64 bytes (``labels`` None: the ids)."""
    ids = ids.astype(np.int64)
    labels = ids if labels is None else labels.astype(np.int64)
    if len(lengths) and (lengths == lengths[0]).all():  # equal lengths (packed text): one update
        n = int(lengths[0])
        h.update(np.concatenate([ids.reshape(-1, n), labels.reshape(-1, n)], axis=1).tobytes())
        return
    a = 0
    for n in lengths.tolist():
        h.update(ids[a : a + n])
        h.update(labels[a : a + n])
        a += n


def tokens_digest(*example_lists) -> str:
    """Digest of the tokenized examples of each list (token ids and labels, in order; ``|`` after each
    list). Lists of :class:`Example` and :class:`StoredExamples` give the same digest for the same examples;
    a whole store followed by an empty list takes the digest recorded when the store was built, and other
    lists of whole stores (a run's --data and --eval-data) the digest recorded in the stores' data digest
    cache (``digests.json``) under their keys, which name their content - computed (reading every block) the
    first time."""
    if (len(example_lists) == 2 and isinstance(example_lists[0], StoredExamples) and example_lists[0].whole
            and len(example_lists[1]) == 0):
        return example_lists[0].store.manifest["tokens_digest"]
    stores = [e.store for e in example_lists if isinstance(e, StoredExamples) and e.whole]
    if stores and all(len(e) == 0 or (isinstance(e, StoredExamples) and e.whole) for e in example_lists):
        name = json.dumps(["tokens"] + [e.store.manifest["key"] if len(e) else "" for e in example_lists])
        cache = stores[0].directory.parent / _DIGESTS
        entry = _read_digests(cache).get(name)
        if isinstance(entry, dict) and isinstance(entry.get("digest"), str):
            return entry["digest"]
        digest = _tokens_digest(example_lists)
        _record_digest(cache, name, {"digest": digest})
        return digest
    return _tokens_digest(example_lists)


def _tokens_digest(example_lists) -> str:
    h = hashlib.sha256()
    for examples in example_lists:
        if isinstance(examples, StoredExamples) and examples.whole:
            examples.store.hash_into(h)
        else:
            for ex in examples:
                h.update(array("q", ex.input_ids).tobytes())
                h.update(array("q", ex.labels).tobytes())
        h.update(b"|")
    return h.hexdigest()[:32]


# ---------------------------------------------------------------------------------------------------------
# Reading a store
# ---------------------------------------------------------------------------------------------------------


class StoreDamaged(ValueError):
    """A token store that fails its checks when opened (it is rebuilt)."""


class StoreCorrupted(DataError, StoreDamaged):
    """A block of a token store that fails its checksum when read: the store has been removed (the next run
    tokenizes the data again). One line, exit status 2 from the CLI."""


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


class _Blocks:
    """The sha256 of a file, and of each of its blocks of ``size`` bytes, from its bytes as they come."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.whole, self.block, self.filled = hashlib.sha256(), hashlib.sha256(), 0
        self.digests: list[str] = []

    def update(self, raw) -> None:
        self.whole.update(raw)
        view = memoryview(raw).cast("B")
        while len(view):
            take = min(len(view), self.size - self.filled)
            self.block.update(view[:take])
            self.filled += take
            view = view[take:]
            if self.filled == self.size:
                self.digests.append(self.block.hexdigest())
                self.block, self.filled = hashlib.sha256(), 0

    def info(self, nbytes: int) -> dict[str, Any]:
        """The manifest entry of the file (``nbytes`` long)."""
        if self.filled:
            self.digests.append(self.block.hexdigest())
            self.block, self.filled = hashlib.sha256(), 0
        return {"bytes": nbytes, "sha256": self.whole.hexdigest(), "block_bytes": self.size, "blocks": self.digests}


def _blocks_ok(info: dict[str, Any], size: int) -> bool:
    """Whether ``info`` (a manifest entry) has a well-formed block checksum for each block of ``size`` bytes."""
    block, blocks = info.get("block_bytes"), info.get("blocks")
    if not isinstance(block, int) or block <= 0 or not isinstance(blocks, list):
        return False
    return len(blocks) == -(-size // block) and all(isinstance(d, str) and len(d) == 64 for d in blocks)


def _add_blocks(directory: Path, m: dict[str, Any], names: list[str]) -> None:
    """A store written before block checksums: check ``names`` whole (raises :class:`StoreDamaged`) and add
    their block checksums to the manifest (atomically; skipped when the store is read-only)."""
    for name in names:
        blocks = _Blocks(_BLOCK_BYTES)
        with open(directory / name, "rb") as f:
            for chunk in iter(lambda: f.read(_BLOCK_BYTES), b""):
                blocks.update(chunk)
        info = blocks.info(m["files"][name]["bytes"])
        if info["sha256"] != m["files"][name]["sha256"]:
            raise StoreDamaged(f"{name} fails its checksum")
        m["files"][name] = info
    try:
        _write_json(directory / _MANIFEST, m)
    except OSError as e:
        log.debug("cannot add block checksums to %s (%s)", directory, e)


class TokenStore:
    """An opened, checked token store (see the module docstring); :meth:`example` reads one sequence, after
    checking the blocks it lies in (once each)."""

    def __init__(self, directory: Path, manifest: dict[str, Any], offsets: np.ndarray,
                 verified: bool = False) -> None:
        self.directory = Path(directory)
        self.manifest = manifest
        self.offsets = offsets
        self.kind = manifest["kind"]
        self.has_labels = bool(manifest["labels"])
        self._lock = threading.Lock()
        self._check_lock = threading.Lock()
        try:
            st = os.stat(self.directory)
            self._identity = (st.st_ino, st.st_dev)
        except OSError:
            self._identity = None
        self._ids = open(self.directory / "ids.bin", "rb")  # noqa: SIM115 - closed in close()/__del__
        self._labels = open(self.directory / "labels.bin", "rb") if self.has_labels else None  # noqa: SIM115
        # per file: its block size, the expected digests and which blocks this process has checked
        self._checks: dict[int, tuple[str, int, int, list[str], bytearray]] = {}
        for name, f in (("ids.bin", self._ids), ("labels.bin", self._labels)):
            if f is None:
                continue
            info = manifest["files"][name]
            n = len(info["blocks"])
            self._checks[f.fileno()] = (name, int(info["bytes"]), int(info["block_bytes"]), info["blocks"],
                                        bytearray(b"\1" * n if verified else n))

    @classmethod
    def open(cls, directory: Path, key: str) -> TokenStore:
        """Open and check the store at ``directory`` (manifest, sizes, offsets; the token files are checked
        block by block as they are read); raises :class:`StoreDamaged` (or ``FileNotFoundError`` when there
        is none)."""
        directory = Path(directory)
        try:
            text = (directory / _MANIFEST).read_text()
        except FileNotFoundError:
            raise
        except OSError as e:
            raise StoreDamaged(f"manifest unreadable ({e.strerror or e})") from None
        try:
            m = json.loads(text)
            if not isinstance(m, dict) or m.get("format") != FORMAT:
                raise StoreDamaged(f"format {m.get('format') if isinstance(m, dict) else '?'} is not {FORMAT}")
            if m.get("key") != key:
                raise StoreDamaged("its key differs")
            sequences, tokens = int(m["sequences"]), int(m["tokens"])
            names = {"ids.bin": 4 * tokens, "offsets.bin": 8 * (sequences + 1)}
            if m["labels"]:
                names["labels.bin"] = 4 * tokens
            unblocked = []
            for name, size in names.items():
                info = m["files"][name]
                path = directory / name
                actual = path.stat().st_size if path.exists() else -1
                if actual != size or int(info["bytes"]) != size:
                    raise StoreDamaged(f"{name} has {actual} bytes, expected {size}")
                if name == "offsets.bin":
                    if _sha256_file(path) != info["sha256"]:
                        raise StoreDamaged(f"{name} fails its checksum")
                elif not _blocks_ok(info, size):
                    unblocked.append(name)
            DataStats(**m["stats"])  # complete
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, StoreDamaged):
                raise
            raise StoreDamaged(f"manifest incomplete ({type(e).__name__}: {e})") from None
        offsets = np.fromfile(directory / "offsets.bin", dtype="<i8")
        if offsets[0] != 0 or offsets[-1] != tokens or (sequences and not (np.diff(offsets) > 0).all()):
            raise StoreDamaged("its offsets are inconsistent")
        if unblocked:
            log.info("token store %s: checking it whole once, to record its block checksums", directory)
            _add_blocks(directory, m, unblocked)
            if len(unblocked) < len(names) - 1:  # some files were already blocked: not all checked now
                return cls(directory, m, offsets)
            return cls(directory, m, offsets, verified=True)
        return cls(directory, m, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def stats(self, files: list[Path]) -> DataStats:
        """The :class:`DataStats` of the build, naming ``files`` (the paths the data has now)."""
        return DataStats(**dict(self.manifest["stats"], files=[str(f) for f in files]))

    def _pread(self, f, n: int, at: int) -> bytes:
        if hasattr(os, "pread"):
            return os.pread(f.fileno(), n, at)
        with self._lock:  # pragma: no cover - platforms without pread
            f.seek(at)
            return f.read(n)

    def _check(self, f, lo: int, hi: int) -> None:
        """Check the blocks of ``f`` that bytes ``lo:hi`` lie in, those not checked yet in this process."""
        name, size, block, digests, done = self._checks[f.fileno()]
        for k in range(lo // block, (hi - 1) // block + 1):
            if done[k]:
                continue
            with self._check_lock:
                if done[k]:
                    continue
                h, at, end = hashlib.sha256(), k * block, min(size, (k + 1) * block)
                while at < end:
                    raw = self._pread(f, min(end - at, 1 << 22), at)
                    if not raw:
                        break
                    h.update(raw)
                    at += len(raw)
                if at != end or h.hexdigest() != digests[k]:
                    self._corrupted(f"{name} bytes {k * block}-{end} fail their checksum" if at == end else
                                    f"{name} is truncated")
                done[k] = 1

    def _corrupted(self, why: str):
        """Remove this store (if it is still the one opened) and raise :class:`StoreCorrupted`."""
        removed = False
        try:
            st = os.stat(self.directory)
            if self._identity is not None and (st.st_ino, st.st_dev) == self._identity:
                aside = Path(tempfile.mkdtemp(prefix=f".{self.directory.name}.bad.", suffix=".tmp",
                                              dir=self.directory.parent))
                os.rename(self.directory, aside / "store")
                shutil.rmtree(aside, ignore_errors=True)
            removed = True
        except FileNotFoundError:
            removed = True  # another process removed it already
        except OSError as e:
            log.debug("cannot remove the token store %s (%s)", self.directory, e)
        then = ("it has been removed: the next run tokenizes the data again" if removed else
                "remove it and run again to tokenize the data again")
        raise StoreCorrupted(f"the token store is corrupted ({why}); {then}", path=self.directory)

    def _read(self, f, start: int, count: int, dtype: str) -> np.ndarray:
        n = 4 * count
        self._check(f, 4 * start, 4 * start + n)
        raw = self._pread(f, n, 4 * start)
        if len(raw) != n:
            raise StoreDamaged(f"token store {self.directory} is truncated (it changed while in use)")
        return np.frombuffer(raw, dtype=dtype)

    def example(self, i: int) -> Example:
        """Sequence ``i``, read from the files."""
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        ids = self._read(self._ids, a, b - a, "<u4").tolist()
        labels = self._read(self._labels, a, b - a, "<i4").tolist() if self._labels else list(ids)
        return Example(ids, labels)

    def hash_into(self, h) -> None:
        """Update ``h`` with every example (see :func:`tokens_digest`), read in chunks."""
        k = 0
        n = len(self)
        while k < n:
            j = int(np.searchsorted(self.offsets, self.offsets[k] + _FLUSH_TOKENS, side="right")) - 1
            j = min(max(j, k + 1), n)
            a, b = int(self.offsets[k]), int(self.offsets[j])
            ids = self._read(self._ids, a, b - a, "<u4")
            labels = self._read(self._labels, a, b - a, "<i4") if self._labels else None
            _hash_examples(h, ids, labels, np.diff(self.offsets[k : j + 1]))
            k = j

    def close(self) -> None:
        for f in (self._ids, self._labels):
            if f is not None:
                f.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __getstate__(self) -> dict:
        return {"directory": str(self.directory), "manifest": self.manifest}

    def __setstate__(self, state: dict) -> None:
        offsets = np.fromfile(Path(state["directory"]) / "offsets.bin", dtype="<i8")
        self.__init__(Path(state["directory"]), state["manifest"], offsets)


class StoredExamples(Sequence):
    """A sequence of :class:`Example` read from a :class:`TokenStore` when indexed (one at a time); slicing
    and :meth:`take` give views (no data is read)."""

    def __init__(self, store: TokenStore, index: range | np.ndarray | None = None) -> None:
        self.store = store
        self.index = range(len(store)) if index is None else index

    @property
    def whole(self) -> bool:
        """Whether this is every sequence of the store, in order."""
        return isinstance(self.index, range) and self.index == range(len(self.store))

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return StoredExamples(self.store, self.index[i])
        return self.store.example(int(self.index[i]))

    def __iter__(self) -> Iterator[Example]:
        for j in self.index:
            yield self.store.example(int(j))

    def take(self, indices) -> StoredExamples:
        """The examples at ``indices`` (positions in this view), as a view."""
        index = self.index
        base = (np.arange(index.start, index.stop, index.step, dtype=np.int64) if isinstance(index, range)
                else np.asarray(index, dtype=np.int64))
        return StoredExamples(self.store, base[np.asarray(indices, dtype=np.int64)])

    def __repr__(self) -> str:
        return f"StoredExamples({len(self)} of {len(self.store)} sequences in {self.store.directory})"


# ---------------------------------------------------------------------------------------------------------
# Writing a store
# ---------------------------------------------------------------------------------------------------------


class _Writer:
    """A :class:`usaf.data.load.Sink` that writes the sequences into the files of a store being built."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ids_file = open(directory / "ids.bin", "wb")  # noqa: SIM115 - closed in finish()
        self.labels_file = None
        self.ids, self.labels, self.lengths = array("I"), array("i"), array("q")
        self.offsets = array("q", [0])
        self.h_ids, self.h_labels = _Blocks(_BLOCK_BYTES), _Blocks(_BLOCK_BYTES)
        self.h_tokens = hashlib.sha256()  # tokens_digest of the examples, as they come

    def add(self, ids: list[int], labels: list[int] | None, loss_tokens: int) -> None:
        self.ids.extend(ids)
        if labels is not None:
            if self.labels_file is None:
                self.labels_file = open(self.directory / "labels.bin", "wb")  # noqa: SIM115
            self.labels.extend(labels)
        self.lengths.append(len(ids))
        self.offsets.append(self.offsets[-1] + len(ids))
        if len(self.ids) >= _FLUSH_TOKENS:
            self.flush()

    def flush(self) -> None:
        if not self.lengths:
            return
        ids = np.frombuffer(self.ids, dtype=np.uint32)
        raw = ids.astype("<u4", copy=False).tobytes()
        self.ids_file.write(raw)
        self.h_ids.update(raw)
        labels = None
        if self.labels_file is not None:
            labels = np.frombuffer(self.labels, dtype=np.int32)
            raw = labels.astype("<i4", copy=False).tobytes()
            self.labels_file.write(raw)
            self.h_labels.update(raw)
        _hash_examples(self.h_tokens, ids, labels, np.frombuffer(self.lengths, dtype=np.int64))
        self.ids, self.labels, self.lengths = array("I"), array("i"), array("q")

    def finish(self, stats: DataStats, key: str, fields: dict[str, Any]) -> None:
        self.flush()
        files = {}
        for name, f, h in (("ids.bin", self.ids_file, self.h_ids), ("labels.bin", self.labels_file, self.h_labels)):
            if f is None:
                continue
            f.flush()
            os.fsync(f.fileno())
            f.close()
            files[name] = h.info((self.directory / name).stat().st_size)
        raw = np.frombuffer(self.offsets, dtype=np.int64).astype("<i8", copy=False).tobytes()
        with open(self.directory / "offsets.bin", "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        files["offsets.bin"] = {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
        self.h_tokens.update(b"||")
        stats_dict = stats.to_dict()
        stats_dict.pop("files")
        manifest = {
            "format": FORMAT, "key": key, "fields": fields, "kind": stats.kind,
            "sequences": stats.sequences, "tokens": stats.tokens, "labels": self.labels_file is not None,
            "stats": stats_dict, "files": files, "tokens_digest": self.h_tokens.hexdigest()[:32],
        }
        with open(self.directory / _MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        for f in (self.ids_file, self.labels_file):
            if f is not None and not f.closed:
                f.close()


def _remove_stale_builds(root: Path) -> None:
    """Temporary store directories of builds that died (nothing in them changed for ``_STALE_S``)."""
    now = time.time()
    for entry in root.glob(".*.tmp"):
        try:
            newest = max([entry.stat().st_mtime] + [p.stat().st_mtime for p in entry.iterdir()])
            if now - newest > _STALE_S:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            continue


def _publish(tmp: Path, target: Path, key: str) -> None:
    """Rename the finished ``tmp`` into ``target``; a good store already there (another process built it)
    is kept, a bad one replaced."""
    try:
        os.rename(tmp, target)
        return
    except OSError:
        if not target.exists():
            raise
    try:
        TokenStore.open(target, key).close()
        return  # someone else's good store
    except (StoreDamaged, OSError):
        pass
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", suffix=".tmp", dir=target.parent))
    os.rename(target, aside / "store")
    shutil.rmtree(aside, ignore_errors=True)
    os.rename(tmp, target)


def build_store(target: Path, key: str, fields: dict[str, Any], files: list[Path], tokenizer: Any,
                seq_len: int, *, path: str | Path, chat_template_kwargs: dict[str, Any] | None = None,
                progress: bool | None = None) -> None:
    """Tokenize ``files`` into a new store at ``target`` (atomically). ``progress``: show a bar of the bytes
    read (None: when stderr is a terminal)."""
    root = target.parent
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(root)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=root))
    writer = None
    try:
        writer = _Writer(tmp)
        total = sum(f.stat().st_size for f in files)
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="tokenizing",
                  dynamic_ncols=True, disable=None if progress is None else not progress) as bar:
            stats = read_data(files, tokenizer, seq_len, writer, path=path,
                              chat_template_kwargs=chat_template_kwargs, progress=bar)
        writer.finish(stats, key, fields)
        _publish(tmp, target, key)
    finally:
        if writer is not None:
            writer.close()
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# The entry point
# ---------------------------------------------------------------------------------------------------------


@dataclass
class StoredData:
    """What :func:`load_stored` gives: the examples (a :class:`StoredExamples`, or a list when no store could
    be written), their :class:`DataStats`, the data files' content digest, and the store (or None)."""

    examples: Sequence[Example]
    stats: DataStats
    digest: str
    store: TokenStore | None


def store_key(digest: str, files: list[Path], tokenizer: Any, seq_len: int,
              chat_template_kwargs: dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
    """The key of the store of this data and tokenization, and the fields it is made of."""
    fields = {
        "format": FORMAT,
        "data": digest,
        "suffixes": [f.suffix for f in files],
        "tokenizer": tokenizer_identity(tokenizer),
        "seq_len": int(seq_len),
        "min_tail_fraction": MIN_TAIL_FRACTION,
        "chat_template_kwargs": json.loads(json.dumps(chat_template_kwargs or {}, sort_keys=True, default=str)),
        "tokenizers": tokenizers.__version__,
        "transformers": transformers.__version__,
    }
    key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]
    return key, fields


def load_stored(
    path: str | Path,
    tokenizer: Any,
    seq_len: int,
    *,
    chat_template_kwargs: dict[str, Any] | None = None,
    progress: bool | None = None,
    root: str | Path | None = None,
) -> StoredData:
    """The examples of ``path`` (as :func:`usaf.data.load.load_examples` reads them), from its token store,
    which is built first when there is none (or the one there fails its checks). Raises
    :class:`usaf.data.examples.DataError` for any problem with the data. ``progress``: the tokenizing bar
    (None: when stderr is a terminal). ``root``: the stores' directory (default :func:`cache_root`)."""
    if int(seq_len) < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    files = data_files(Path(path))
    stores = Path(root) if root is not None else cache_root()
    digest = data_digest(files, stores)
    key, fields = store_key(digest, files, tokenizer, seq_len, chat_template_kwargs)
    target = stores / key
    try:
        store = TokenStore.open(target, key)
        log.info("token store: %s (%d sequences)", target, len(store))
    except FileNotFoundError:
        store = None
    except (StoreDamaged, OSError) as e:
        log.warning("token store %s is damaged (%s): tokenizing again", target, e)
        store = None
    if store is None:
        log.info("tokenizing %s (%.1f MB) into the token store %s", path,
                 sum(f.stat().st_size for f in files) / 1e6, target)
        try:
            build_store(target, key, fields, files, tokenizer, int(seq_len), path=path,
                        chat_template_kwargs=chat_template_kwargs, progress=progress)
            store = TokenStore.open(target, key)
        except (OSError, StoreDamaged) as e:
            why = "the disk is full" if is_disk_full(e) else str(e)
            log.warning("cannot write the token store %s (%s): tokenizing in memory", target, why)
            examples, stats = load_examples(path, tokenizer, seq_len, chat_template_kwargs=chat_template_kwargs)
            return StoredData(examples, stats, digest, None)
    return StoredData(StoredExamples(store), store.stats(files), digest, store)
