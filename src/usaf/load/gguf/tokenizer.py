"""The tokenizer (and chat template) of a GGUF file, built once in a child process and kept as a tokenizer
directory in ``$USAF_TOKENIZER_CACHE``, else ``$USAF_CACHE/tokenizers`` (default ``~/.cache/usaf/tokenizers``).

transformers builds a GGUF's tokenizer from the file's metadata with gguf-py's reader and a Python converter:
about 170 MB at its peak and 65 MB kept afterwards for SmolLM2's 49k-token vocabulary. Loading the saved
``tokenizer.json`` costs what a checkpoint's tokenizer costs (about 45 MB), so the build runs in a child and
every later load, in this run and the next, reads the cached directory. The key is a hash of the file's
metadata bytes (where the vocabulary, merges and template are) and the transformers version. Where the cache
cannot be written the tokenizer is built in this process.

    python -m usaf.load.gguf.tokenizer FILE.gguf DIR     # what the child runs
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from .reader import GGUFError, GGUFFile

log = logging.getLogger("usaf")
CACHE_VERSION = "usaf-gguf-tokenizer-1"


def cache_root() -> Path:
    return Path(os.environ.get("USAF_TOKENIZER_CACHE") or
                Path(os.environ.get("USAF_CACHE", Path.home() / ".cache" / "usaf")) / "tokenizers")


def cache_key(f: GGUFFile) -> str:
    import transformers

    h = hashlib.sha256(f"{CACHE_VERSION}|{transformers.__version__}\n".encode())
    h.update(f.pread(0, f.kv_end))
    return h.hexdigest()[:32]


def build(path: Path):
    """The tokenizer built from the file's metadata by transformers (pad token = eos where it has none)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # noqa: BLE001
        raise GGUFError(f"cannot build the tokenizer of {path}: {str(e).splitlines()[0]}") from None
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return tok


def _build_into(path: Path, out: Path) -> None:
    """Build and save into ``out`` atomically (a sibling temporary directory renamed into place)."""
    tmp = out.with_name(f".{out.name}.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    build(path).save_pretrained(tmp)
    try:
        tmp.rename(out)
    except OSError:  # another process saved it first
        shutil.rmtree(tmp, ignore_errors=True)


def gguf_tokenizer(f: GGUFFile):
    """The tokenizer of an opened GGUF file: from the cache, built by a child on a miss."""
    from transformers import AutoTokenizer

    out = cache_root() / cache_key(f)
    if not (out / "tokenizer_config.json").is_file():
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError:
            log.info("the tokenizer cache %s cannot be written: the GGUF's tokenizer is built in this process",
                     out.parent)
            return build(f.path)
        p = subprocess.run([sys.executable, "-m", "usaf.load.gguf.tokenizer", str(f.path), str(out)],
                           capture_output=True, text=True)
        if p.returncode != 0:
            lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
            raise GGUFError(lines[-1].split(": ", 1)[-1] if lines else f"cannot build the tokenizer of {f.path}")
    return AutoTokenizer.from_pretrained(str(out))


def main() -> None:
    path, out = Path(sys.argv[1]), Path(sys.argv[2])
    try:
        _build_into(path, out)
    except GGUFError as e:
        print(f"GGUFError: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
