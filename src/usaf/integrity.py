"""Integrity of the files usaf writes, and the identity of the checkpoints it reads.

**Checksums** (files usaf writes). Every safetensors file usaf writes (delta files, training checkpoints,
revertible delta exports, the quantized-expert cache) records in its metadata, under ``usaf_checksums``, a
JSON object ``{tensor name: sha256}``; the digest covers the tensor's dtype and shape (``"BF16 [8, 48, 64]\\n"``)
followed by its raw bytes as stored. Every reader verifies them (:func:`verify_tensors`, called by
``usaf.io.read_safetensors``) and refuses a file whose tensor differs with one line naming the file and the
tensor (:class:`IntegrityError`). A file without ``usaf_checksums`` (written before checksums existed, or by
someone else) is read unverified. Checkpoint directories written by ``usaf export --format hf`` and
``usaf apply`` keep the source's shards byte for byte apart from the patched values, so their checksums are
the sha256 of every file, in ``usaf_export.json`` (:func:`file_checksums`, :func:`verify_files`;
``sha256sum`` computes the same digests).

**Fingerprint** (checkpoints usaf reads). :func:`checkpoint_fingerprint` identifies a base checkpoint on disk,
whatever dtype it is later loaded at: it hashes ``model_type`` (config.json) and, for every tensor of the
safetensors checkpoint in name order, its on-disk name, dtype, shape and a sparse sample of its raw bytes:
the whole tensor up to 64 KiB, else 8 chunks of 4 KiB evenly spread from its first to its last byte. It
reads at most 64 KiB per tensor (about 0.6 GB of a 60 GB checkpoint of 18k tensors), never the whole file.
Buffers that transformers recomputes (rotary tables) are not in a checkpoint and so not in its fingerprint.
Two checkpoints with the same tensors in another sharding have the same fingerprint; any change of a name,
dtype, shape or of sampled bytes changes it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from huggingface_hub import try_to_load_from_cache

CHECKSUM_KEY = "usaf_checksums"
EXPORT_RECORD = "usaf_export.json"  # provenance + file checksums of a checkpoint written by export / apply
FINGERPRINT_VERSION = "usaf-checkpoint-fingerprint-1"
SMALL = 64 << 10  # tensors up to this many bytes enter the fingerprint whole
CHUNK, CHUNKS = 4 << 10, 8  # larger ones: this many chunks of this many bytes

# safetensors dtype names (what the file header says)
ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
             torch.float8_e4m3fnuz: "F8_E4M3FNUZ", torch.float8_e5m2fnuz: "F8_E5M2FNUZ", torch.uint16: "U16",
             torch.uint32: "U32", torch.uint64: "U64", torch.complex64: "C64"}
TORCH_DTYPES = {v: k for k, v in ST_DTYPES.items()}


class IntegrityError(ValueError):
    """A file usaf wrote does not match the checksums it recorded (one line: file and tensor)."""


# ------------------------------------------------------------------------------------------- checksums
def tensor_checksum(t: torch.Tensor) -> str:
    """sha256 of ``"<DTYPE> [shape]\\n"`` followed by the tensor's raw (little-endian) bytes."""
    t = t.detach()
    h = hashlib.sha256(f"{ST_DTYPES.get(t.dtype, str(t.dtype))} {list(t.shape)}\n".encode())
    if t.numel():
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def checksums(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    return {k: tensor_checksum(v) for k, v in tensors.items()}


def with_checksums(tensors: dict[str, torch.Tensor], metadata: dict | None) -> dict[str, str]:
    """``metadata`` plus ``usaf_checksums`` of ``tensors`` (replacing any recorded before)."""
    meta = {k: v for k, v in (metadata or {}).items() if k != CHECKSUM_KEY}
    meta[CHECKSUM_KEY] = json.dumps(checksums(tensors), sort_keys=True, separators=(",", ":"))
    return meta


def recorded(path, metadata: dict) -> dict[str, str] | None:
    """The checksums a file recorded (None when it has none); a damaged record is an :class:`IntegrityError`."""
    text = metadata.get(CHECKSUM_KEY)
    if text is None:
        return None
    try:
        sums = json.loads(text)
        if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
            raise ValueError
    except ValueError:
        raise IntegrityError(f"{path} is corrupted: its checksum record is damaged") from None
    return sums


def verify_tensors(path, tensors: dict[str, torch.Tensor], metadata: dict) -> bool:
    """Compare every tensor with the checksum ``path`` recorded; returns False when it recorded none.

    Raises :class:`IntegrityError` naming the file and the first tensor that differs (or is missing/extra)."""
    sums = recorded(path, metadata)
    if sums is None:
        return False
    extra = sorted(set(tensors) - set(sums))
    missing = sorted(set(sums) - set(tensors))
    if extra or missing:
        name = (extra or missing)[0]
        raise IntegrityError(f"{path} is corrupted: tensor {name} is {'not' if extra else 'no longer'} in its "
                             f"checksum record")
    for name in sorted(tensors):
        if tensor_checksum(tensors[name]) != sums[name]:
            raise IntegrityError(f"{path} is corrupted: tensor {name} does not match its checksum")
    return True


def verify_file(path, progress=None) -> bool:
    """:func:`verify_tensors` reading the file from disk tensor by tensor (bounded memory, no mmap: a large
    cache verified this way does not stay resident); returns False when the file recorded no checksums.
    ``progress``: an object with ``update(n)``, told the bytes checked (a tqdm bar)."""
    header, start, meta = read_header(path, with_metadata=True)
    sums = recorded(path, meta)
    if sums is None:
        return False
    if set(sums) != set(header):
        name = sorted(set(sums) ^ set(header))[0]
        raise IntegrityError(f"{path} is corrupted: tensor {name} is missing from it or from its checksum record")
    with open(path, "rb") as f:
        for name in sorted(header, key=lambda k: header[k]["data_offsets"][0]):
            info = header[name]
            a, b = (int(x) for x in info["data_offsets"])
            h = hashlib.sha256(f"{info['dtype']} {list(info['shape'])}\n".encode())
            f.seek(start + a)
            left = b - a
            while left > 0:
                block = f.read(min(left, 16 << 20))
                if not block:
                    raise IntegrityError(f"{path} is truncated (tensor {name})")
                h.update(block)
                left -= len(block)
                if progress is not None:
                    progress.update(len(block))
            if h.hexdigest() != sums[name]:
                raise IntegrityError(f"{path} is corrupted: tensor {name} does not match its checksum")
    return True


def file_checksum(path) -> str:
    """sha256 of a whole file (what ``sha256sum`` prints)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(16 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_checksums(directory, names) -> dict[str, str]:
    """``{name: sha256}`` of files in ``directory``, hashed on several threads (hashlib releases the GIL)."""
    d, names = Path(directory), sorted(names)
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1, len(names)))) as pool:
        return dict(zip(names, pool.map(lambda n: file_checksum(d / n), names)))


def verify_files(directory, sums: dict[str, str]) -> None:
    """Every file named in ``sums`` must exist under ``directory`` with that sha256 (:class:`IntegrityError`)."""
    d = Path(directory)
    for name in sorted(sums):
        if Path(name).name != name or not (d / name).is_file():
            raise IntegrityError(f"{d} is incomplete: {name} (listed in its checksums) is missing")
    got = file_checksums(d, sums)
    for name in sorted(sums):
        if got[name] != sums[name]:
            raise IntegrityError(f"{d / name} is corrupted: it does not match its checksum")


_VERIFIED: set = set()


def verify_export(model_dir) -> bool:
    """Verify the file checksums of a checkpoint directory written by ``usaf export`` / ``usaf apply`` (its
    ``usaf_export.json``); once per process per unchanged directory. Returns False for other checkpoints."""
    d = Path(model_dir)
    record = d / EXPORT_RECORD
    if not record.is_file():
        return False
    try:
        sums = json.loads(record.read_text()).get("checksums")
    except (ValueError, AttributeError):
        raise IntegrityError(f"{record} is corrupted (not valid JSON)") from None
    if not isinstance(sums, dict):
        return False
    key = (str(d.resolve()), tuple(sorted((n, _stat(d / n)) for n in sums)))
    if key not in _VERIFIED:
        verify_files(d, sums)
        _VERIFIED.add(key)
    return True


def _stat(p: Path):
    try:
        st = p.stat()
        return st.st_size, st.st_mtime_ns
    except OSError:
        return None


# ----------------------------------------------------------------------------------------- fingerprint
def read_header(path, with_metadata: bool = False):
    """``({tensor: {"dtype", "shape", "data_offsets"}}, byte offset of the data)`` of a safetensors file
    (and its metadata, with ``with_metadata``)."""
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > 100 << 20:
            raise ValueError(f"{path} is truncated or not a safetensors file")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise ValueError(f"{path} is not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file (unreadable header)")
    meta = header.pop("__metadata__", None) or {}
    return (header, 8 + n, meta) if with_metadata else (header, 8 + n)


def weight_files(model_dir) -> dict[str, str]:
    """``{tensor name: shard file}`` of a safetensors checkpoint directory (index or a single file)."""
    d = Path(model_dir)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    header, _ = read_header(d / "model.safetensors")
    return {k: "model.safetensors" for k in header}


def local_checkpoint(name_or_path: str | os.PathLike | None) -> Path | None:
    """The local safetensors checkpoint directory behind a model path or a hub id already in the Hugging
    Face cache (offline lookup), or None."""
    if not name_or_path:
        return None
    p = Path(name_or_path)
    if not p.is_dir() and str(name_or_path).count("/") == 1 and not str(name_or_path).startswith((".", "/", "~")):
        try:
            hit = try_to_load_from_cache(str(name_or_path), "config.json")
        except Exception:  # noqa: BLE001 - not a valid repo id: no cached snapshot
            hit = None
        p = Path(hit).parent if isinstance(hit, str) else p
    if p.is_dir() and (p / "config.json").is_file() and \
            ((p / "model.safetensors").is_file() or (p / "model.safetensors.index.json").is_file()):
        return p
    return None


def _offsets(nbytes: int, itemsize: int) -> list[tuple[int, int]]:
    """(start, length) of the byte ranges of a tensor that enter the fingerprint (element-aligned)."""
    if nbytes <= SMALL:
        return [(0, nbytes)]
    last = nbytes - CHUNK
    starts = sorted({(last * i // (CHUNKS - 1)) // itemsize * itemsize for i in range(CHUNKS)})
    return [(s, min(CHUNK, nbytes - s)) for s in starts]


Visit = Callable[[str, str, list, int, bytes], None]


def checkpoint_fingerprint(model_dir, visit: Visit | None = None) -> str:
    """The fingerprint of a safetensors checkpoint directory (module docstring), 32 hex digits.

    ``visit(name, dtype, shape, byte offset, chunk)`` is called with every sampled chunk (for a caller that
    compares a loaded model with the files it came from)."""
    d = Path(model_dir)
    try:
        model_type = json.loads((d / "config.json").read_text()).get("model_type", "")
    except (OSError, ValueError):
        model_type = ""
    where = weight_files(d)
    headers = {f: read_header(d / f) for f in sorted(set(where.values()))}
    h = hashlib.sha256(f"{FINGERPRINT_VERSION}|{model_type}\n".encode())
    fds = {f: os.open(d / f, os.O_RDONLY) for f in headers}
    try:
        for name in sorted(where):
            header, start = headers[where[name]]
            info = header.get(name)
            if info is None:
                raise ValueError(f"{d}: the index names {name} in {where[name]}, which does not hold it")
            a, b = (int(x) for x in info["data_offsets"])
            dtype, shape = info["dtype"], list(info["shape"])
            h.update(f"{name}|{dtype}|{shape}|{b - a}\n".encode())
            itemsize = TORCH_DTYPES[dtype].itemsize if dtype in TORCH_DTYPES else 1
            for off, n in _offsets(b - a, itemsize) if b > a else []:
                chunk = os.pread(fds[where[name]], n, start + a + off)
                if len(chunk) != n:
                    raise ValueError(f"{d / where[name]} is truncated (tensor {name})")
                h.update(chunk)
                if visit is not None:
                    visit(name, dtype, shape, off, chunk)
    finally:
        for fd in fds.values():
            os.close(fd)
    return h.hexdigest()[:32]
