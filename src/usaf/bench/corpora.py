"""Real text found offline, for ``usaf bench quality``: a domain to adapt to and a general corpus.

- **Domain**: Python 3.11's reST documentation, as the Debian package ``python3.11-doc`` ships it
  (``/usr/share/doc/python3.11/html/_sources/**/*.rst.txt``, 512 files, 12 MB).
- **General** (forgetting): the English quotations of the Debian package ``fortunes`` (literature, wisdom,
  people, science, ...; the computer-themed files are left out so the corpus stays off-domain).
- **Instructions**: chat rows made from the library reference: "What does ``module.func(args)`` do?" is
  answered by the first paragraph of that entry's documentation (reST roles reduced to their text).

Neither text is written by this project. :func:`find_corpora` looks for the packages' files in
``$USAF_CORPORA`` (default ``~/.cache/usaf/corpora``, filled by ``scripts/fetch-corpora.sh``, which needs no
root) and then in ``/``; a missing corpus is a clear :class:`CorpusError`.

Splits are by *file* (the domain, the reference entries) or by *file and entry* (fortunes), drawn from a
hash of the name: held-out text is never a window of a training document.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

DOC_SOURCES = "usr/share/doc/python3.11/html/_sources"
FORTUNES = "usr/share/games/fortunes"
GENERAL_FILES = ("art", "education", "food", "humorists", "kids", "law", "literature", "love", "medicine",
                 "people", "pets", "platitudes", "politics", "science", "sports", "wisdom", "work")
SYSTEM_ROOT = Path("/")  # where the Debian packages install them
FETCH_HINT = "run scripts/fetch-corpora.sh (downloads the Debian packages python3.11-doc and fortunes)"


class CorpusError(ValueError):
    """A corpus is missing or empty."""


def corpora_root() -> Path:
    env = os.environ.get("USAF_CORPORA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "usaf" / "corpora"


def _locate(rel: str, what: str) -> Path:
    for root in (corpora_root(), SYSTEM_ROOT):
        p = root / rel
        if p.is_dir() and any(p.iterdir()):
            return p
    raise CorpusError(f"{what} not found in {corpora_root()} or {SYSTEM_ROOT / rel}: {FETCH_HINT}")


def find_corpora() -> tuple[Path, Path]:
    """``(python docs _sources dir, fortunes dir)``."""
    return _locate(DOC_SOURCES, "Python 3.11 reST docs"), _locate(FORTUNES, "fortunes")


def held_out(name: str, fraction: float, seed: int = 0) -> bool:
    """Deterministic membership of ``name`` in the held-out part (a hash, not an RNG stream)."""
    h = int(hashlib.sha1(f"{seed}:{name}".encode()).hexdigest()[:8], 16)
    return h < fraction * 0x100000000


def domain_documents(src: Path) -> list[tuple[str, str]]:
    """``(relative path, text)`` of every ``.rst.txt`` file, sorted by path."""
    out = []
    for p in sorted(src.rglob("*.rst.txt")):
        text = p.read_text(encoding="utf-8", errors="replace").strip()
        if text:
            out.append((str(p.relative_to(src)), text))
    if not out:
        raise CorpusError(f"no .rst.txt files under {src}: {FETCH_HINT}")
    return out


def general_documents(src: Path) -> list[tuple[str, str]]:
    """``(file:n, quotation)`` for the quotations of :data:`GENERAL_FILES` (``%``-separated entries)."""
    out = []
    for name in GENERAL_FILES:
        p = src / name
        if not p.is_file():
            continue
        entries = re.split(r"^%\s*$", p.read_text(encoding="utf-8", errors="replace"), flags=re.M)
        out += [(f"{name}:{i}", e.strip()) for i, e in enumerate(entries) if len(e.strip()) > 40]
    if not out:
        raise CorpusError(f"no fortunes files ({', '.join(GENERAL_FILES[:3])}, ...) under {src}: {FETCH_HINT}")
    return out


_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`~?([^`<]*?)(?:\s*<[^>]*>)?`")
_ENTRY = re.compile(r"^\.\. (function|method|class|classmethod|staticmethod|attribute|data|exception)::\s*(.+)$")


def clean_rst(text: str) -> str:
    """reST inline markup reduced to its text: roles to their title, ``literal`` and *emphasis* unwrapped."""
    text = _ROLE.sub(lambda m: m.group(1).strip(), text)
    text = re.sub(r"``([^`]+)``", r"\1", text).replace("\\*", "\0")  # an escaped star is text
    text = re.sub(r"\*\*([^*]+)\*\*", r"\1", text)
    text = re.sub(r"(?<![\w*])\*([^*\s][^*]*?)\*(?!\w)", r"\1", text)
    text = text.replace("\0", "*")
    return re.sub(r"\s+", " ", text).strip()


def reference_entries(src: Path, min_chars: int = 60, max_chars: int = 700) -> list[tuple[str, str, str]]:
    """``(file, qualified signature, answer)`` for the library reference's documented callables.

    The answer is the first paragraph of the entry's body. Entries whose first paragraph is a directive
    (``.. versionadded::``), too short or too long are skipped.
    """
    out = []
    for p in sorted((src / "library").glob("*.rst.txt")):
        lines = p.read_text(encoding="utf-8", errors="replace").splitlines()
        module, cls = "", ""
        for i, line in enumerate(lines):
            m = re.match(r"^\.\. (?:module|currentmodule):: (\S+)", line)
            if m:
                module, cls = m.group(1), ""
                continue
            stripped = line.strip()
            m = _ENTRY.match(stripped)
            if not m:
                continue
            kind, sig = m.groups()
            indent = len(line) - len(line.lstrip())
            if kind == "class" and indent == 0:
                cls = sig.split("(")[0].strip()
            if kind in ("attribute", "data"):
                continue
            para, j = [], i + 1
            while j < len(lines) and (not lines[j].strip() or lines[j].strip().startswith(":")
                                      or lines[j].strip().startswith(".. ") and _ENTRY.match(lines[j].strip())):
                j += 1  # blank lines, field options (:noindex:) and stacked signatures
            while j < len(lines) and lines[j].strip() and len(lines[j]) - len(lines[j].lstrip()) > indent:
                para.append(lines[j].strip())
                j += 1
            answer = clean_rst(" ".join(para))
            if not para or para[0].startswith(".."):
                continue
            if not min_chars <= len(answer) <= max_chars:
                continue
            name = sig.split("(")[0].strip()
            owner = cls if kind in ("method", "classmethod", "staticmethod") and indent > 0 and cls else ""
            qual = ".".join(x for x in (module, owner, name) if x) if "." not in name else name
            out.append((str(p.relative_to(src)), qual + ("(" + sig.split("(", 1)[1] if "(" in sig else ""), answer))
    if not out:
        raise CorpusError(f"no library reference entries under {src}/library: {FETCH_HINT}")
    return out


def chat_row(signature: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": f"In Python, what does {signature} do?"},
                         {"role": "assistant", "content": answer}]}


def write_task_files(out: Path, eval_fraction: float = 0.1, seed: int = 0) -> dict[str, Path]:
    """Write the benchmark's JSONL files into ``out``; returns their paths by role.

    ``domain_train`` / ``domain_eval`` (text rows, one per doc file), ``general_eval`` (text rows, one per
    quotation), ``chat_train`` / ``chat_eval`` (messages rows; held out by source file).
    """
    docs, fortunes = find_corpora()
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict]] = {k: [] for k in ("domain_train", "domain_eval", "general_eval",
                                                   "chat_train", "chat_eval")}
    for name, text in domain_documents(docs):
        rows["domain_eval" if held_out(name, eval_fraction, seed) else "domain_train"].append({"text": text})
    rows["general_eval"] = [{"text": t} for _, t in general_documents(fortunes)]
    for f, sig, ans in reference_entries(docs):
        rows["chat_eval" if held_out(f, eval_fraction, seed + 1) else "chat_train"].append(chat_row(sig, ans))
    paths = {}
    for role, rs in rows.items():
        if not rs:
            raise CorpusError(f"{role}: no rows (corpus too small for a {eval_fraction:.0%} split)")
        p = out / f"{role}.jsonl"
        p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rs), encoding="utf-8")
        paths[role] = p
    return paths
