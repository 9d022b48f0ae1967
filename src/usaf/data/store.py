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
  :class:`DataStats`, the byte size and sha256 of every file, and the digest of the tokenized examples.

The key is a sha256 of the format version, the content digest of the data files (their sizes and bytes in
reading order, :func:`files_digest`) and their suffixes, the tokenizer's identity (:func:`tokenizer_identity`),
``seq_len``, the chat template kwargs and the tokenizers / transformers versions: the same data at another
path shares a store, and any change that could change a token gets a new one. ``root`` is
``$USAF_TOKENS_CACHE``, else ``$USAF_CACHE/tokens`` (default ``~/.cache/usaf/tokens``).

A store is written in a hidden temporary directory beside its place and renamed into it when complete, so an
interrupted tokenization leaves no store (its temporary directory is removed by a later build once stale). A
store is used only if its manifest parses and matches the key, and every file has its recorded size and
sha256 and the offsets are consistent; otherwise it is rebuilt. When the store cannot be written (read-only
or full disk), the data is tokenized in memory instead, with a warning.
"""

from __future__ import annotations

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

from ..io import is_disk_full
from .examples import DataStats, Example
from .load import MIN_TAIL_FRACTION, data_files, load_examples, read_data

__all__ = ["FORMAT", "StoredData", "StoredExamples", "TokenStore", "cache_root", "files_digest", "load_stored",
           "tokenizer_identity", "tokens_digest"]

log = logging.getLogger("usaf")

FORMAT = 1
_FLUSH_TOKENS = 1 << 20  # tokens buffered before they are written
_STALE_S = 3600  # a temporary store directory untouched for this long belongs to a dead build
_MANIFEST = "manifest.json"


def cache_root() -> Path:
    """``$USAF_TOKENS_CACHE``, else ``$USAF_CACHE/tokens`` (default ``~/.cache/usaf/tokens``)."""
    return Path(os.environ.get("USAF_TOKENS_CACHE") or
                Path(os.environ.get("USAF_CACHE", Path.home() / ".cache" / "usaf")) / "tokens")


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
    a whole store followed by an empty list takes the digest recorded when the store was built."""
    if (len(example_lists) == 2 and isinstance(example_lists[0], StoredExamples) and example_lists[0].whole
            and len(example_lists[1]) == 0):
        return example_lists[0].store.manifest["tokens_digest"]
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
    """A token store that fails its checks (it is rebuilt)."""


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


class TokenStore:
    """An opened, checked token store (see the module docstring); :meth:`example` reads one sequence."""

    def __init__(self, directory: Path, manifest: dict[str, Any], offsets: np.ndarray) -> None:
        self.directory = Path(directory)
        self.manifest = manifest
        self.offsets = offsets
        self.kind = manifest["kind"]
        self.has_labels = bool(manifest["labels"])
        self._lock = threading.Lock()
        self._ids = open(self.directory / "ids.bin", "rb")  # noqa: SIM115 - closed in close()/__del__
        self._labels = open(self.directory / "labels.bin", "rb") if self.has_labels else None  # noqa: SIM115

    @classmethod
    def open(cls, directory: Path, key: str) -> TokenStore:
        """Open and check the store at ``directory``; raises :class:`StoreDamaged` (or ``FileNotFoundError``
        when there is none)."""
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
            for name, size in names.items():
                info = m["files"][name]
                path = directory / name
                actual = path.stat().st_size if path.exists() else -1
                if actual != size or int(info["bytes"]) != size:
                    raise StoreDamaged(f"{name} has {actual} bytes, expected {size}")
                if _sha256_file(path) != info["sha256"]:
                    raise StoreDamaged(f"{name} fails its checksum")
            DataStats(**m["stats"])  # complete
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, StoreDamaged):
                raise
            raise StoreDamaged(f"manifest incomplete ({type(e).__name__}: {e})") from None
        offsets = np.fromfile(directory / "offsets.bin", dtype="<i8")
        if offsets[0] != 0 or offsets[-1] != tokens or (sequences and not (np.diff(offsets) > 0).all()):
            raise StoreDamaged("its offsets are inconsistent")
        return cls(directory, m, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def stats(self, files: list[Path]) -> DataStats:
        """The :class:`DataStats` of the build, naming ``files`` (the paths the data has now)."""
        return DataStats(**dict(self.manifest["stats"], files=[str(f) for f in files]))

    def _read(self, f, start: int, count: int, dtype: str) -> np.ndarray:
        n = 4 * count
        if hasattr(os, "pread"):
            raw = os.pread(f.fileno(), n, 4 * start)
        else:  # pragma: no cover - platforms without pread
            with self._lock:
                f.seek(4 * start)
                raw = f.read(n)
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
        return StoredExamples(self.store, np.asarray(self.index, dtype=np.int64)[np.asarray(indices, dtype=np.int64)])

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
        self.h_ids, self.h_labels = hashlib.sha256(), hashlib.sha256()
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
            files[name] = {"bytes": (self.directory / name).stat().st_size, "sha256": h.hexdigest()}
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
    digest = files_digest(files)
    key, fields = store_key(digest, files, tokenizer, seq_len, chat_template_kwargs)
    target = Path(root) if root is not None else cache_root()
    target = target / key
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
