"""Safe file handling: safetensors only, atomic writes (temp name, fsync, rename), stale-temp cleanup.

Every file usaf writes goes through :func:`atomic_write`: the bytes go to a hidden temporary file
(``.<name>.<random>.tmp``) in the destination directory, which is fsynced and then renamed over the target,
and the directory is fsynced. A process killed at any moment leaves either the old file or the new one,
plus possibly a stale temporary file, which :func:`remove_stale_temps` deletes (on resume). A full disk
raises :class:`DiskFullError` (an ``OSError`` with ``errno.ENOSPC``) naming the file; the target is untouched.

Safetensors files written here record a checksum of every tensor, and :func:`read_safetensors` verifies them
(``usaf.integrity``).
"""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .integrity import CHECKSUM_KEY, ST_DTYPES, tensor_checksum, verify_tensors, with_checksums

_DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
_DISK_FULL_TEXT = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")
_STALE = re.compile(r"^\..+\.tmp$")


class DiskFullError(OSError):
    """No space left (or quota exceeded) while writing ``filename``; the previous file is intact."""

    def __init__(self, path):
        super().__init__(errno.ENOSPC, "no space left on device", str(path))

    def __str__(self) -> str:
        return f"no space left on device while writing {self.filename}"


def is_disk_full(e: BaseException) -> bool:
    """Whether ``e`` reports a full disk (OSError ENOSPC/EDQUOT, or a library error carrying that text)."""
    if isinstance(e, OSError) and e.errno in _DISK_FULL:
        return True
    return any(t in str(e) for t in _DISK_FULL_TEXT)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write) -> None:
    """Call ``write(tmp_path)``, fsync it, then rename over ``path``; the old file survives any failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, Exception) and not isinstance(e, DiskFullError) and is_disk_full(e):
            raise DiskFullError(path) from None
        raise


def remove_stale_temps(directory) -> list[Path]:
    """Delete the temporary files (``.<name>.<random>.tmp``) a killed process left in ``directory``."""
    removed = []
    d = Path(directory)
    if not d.is_dir():
        return removed
    for p in d.iterdir():
        if _STALE.match(p.name) and p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path, metadata: dict | None = None,
                            checksums: bool = True) -> None:
    """Write ``tensors`` atomically, recording their checksums in the metadata unless ``checksums=False``
    (the patched shards of an hf export keep the source's metadata; their files are checksummed instead)."""
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if checksums:
        metadata = with_checksums(tensors, metadata)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


class SafetensorsStream:
    """Write a safetensors file one tensor at a time into an open file, so a file larger than memory (the
    quantized expert cache of a large model) never exists in memory at once; the checksums usaf records
    (``usaf.integrity``) are computed tensor by tensor as they are written.

    The header goes last, into ``reserve`` bytes kept before the data (padded with spaces, as the format
    allows): ``add`` each tensor, then ``finish(metadata)``. Use inside :func:`atomic_write`."""

    def __init__(self, f, reserve: int):
        self.f, self.reserve = f, int(reserve) + (-int(reserve) % 8)
        self.header: dict[str, dict] = {}
        self.sums: dict[str, str] = {}
        self.off = 0
        f.seek(8 + self.reserve)

    def add(self, name: str, t: torch.Tensor) -> None:
        if name in self.header:
            raise ValueError(f"tensor {name} written twice")
        t = t.detach().cpu().contiguous()
        n = t.numel() * t.element_size()
        self.header[name] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape),
                             "data_offsets": [self.off, self.off + n]}
        self.sums[name] = tensor_checksum(t)
        if n:
            self.f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self.off += n

    def finish(self, metadata: dict | None = None, checksums: bool = True) -> None:
        meta = {k: str(v) for k, v in (metadata or {}).items() if k != CHECKSUM_KEY}
        if checksums:
            meta[CHECKSUM_KEY] = json.dumps(self.sums, sort_keys=True, separators=(",", ":"))
        raw = json.dumps({"__metadata__": meta, **self.header}, separators=(",", ":")).encode()
        if len(raw) > self.reserve:
            raise ValueError(f"safetensors header of {len(raw)} bytes exceeds the {self.reserve} reserved")
        self.f.seek(0)
        self.f.write(self.reserve.to_bytes(8, "little"))
        self.f.write(raw + b" " * (self.reserve - len(raw)))
        self.f.flush()


def atomic_write_text(path, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


def atomic_write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_safetensors(path, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read every tensor and the metadata of a safetensors file (clear error if it is not one), and verify
    the checksums it recorded (``usaf.integrity.IntegrityError`` naming the file and tensor)."""
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0]})") from None
    verify_tensors(path, tensors, meta)
    return tensors, meta


def check_safetensors(path) -> None:
    """Cheap integrity check of a safetensors file from its header alone: it must be complete.

    Raises ``ValueError`` (one line) for a file that is truncated, empty or not safetensors at all.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > min(size - 8, 1 << 30):
            raise ValueError(f"{path} is truncated or not a safetensors file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise ValueError(f"{path} is not a safetensors file (unreadable header)") from None
    if 8 + n + end > size:
        raise ValueError(f"{path} is truncated: {size} bytes, its header needs {8 + n + end}")


def recorded_eval_settings(metadata: dict[str, str]) -> dict:
    """How a run evaluated, as it recorded it in its delta file's metadata (``eval_settings``: seq-len, batch
    size, dtype, seed, held-out or eval file); ``{}`` when absent or unreadable."""
    try:
        return dict(json.loads(metadata.get("eval_settings") or "{}"))
    except (ValueError, TypeError):
        return {}


def cache_dir(name: str, override: str) -> Path:
    """``$override`` if set, else ``$USAF_CACHE/name`` (default ``~/.cache/usaf/name``): where usaf keeps a
    kind of cache (quantized stacks, token stores, prefix states, GGUF tokenizers)."""
    return Path(os.environ.get(override) or Path(os.environ.get("USAF_CACHE", Path.home() / ".cache" / "usaf")) / name)
