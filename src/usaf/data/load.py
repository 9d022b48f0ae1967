"""Training data files -> examples: formats, kinds, tokenization, masking and packing.

Accepted inputs (:func:`load_examples`)
---------------------------------------

* ``.jsonl`` - one JSON object per line; blank lines are skipped. Every row must be of the *same kind*, which
  is detected from the first row and then enforced row by row. A row's kind is given by its fields (other
  fields, e.g. ``"id"`` or ``"source"``, are ignored):

  ============================  ===================  =====================================================
  fields                        kind                 loss on
  ============================  ===================  =====================================================
  ``text``                      ``text``             every token (packed, see below)
  ``prompt`` + ``completion``   ``prompt_completion`` the completion tokens and the appended eos
  ``messages``                  ``messages``         the assistant turns (chat template, see below)
  ``input_ids`` [+ ``labels``]  ``tokens``           ``labels`` as given (default: a copy of ``input_ids``)
  ============================  ===================  =====================================================

* ``.txt`` - plain text; each file is one document of kind ``text``.
* a directory holding only ``.txt`` / ``.jsonl`` files (hidden files are ignored): the files are read in
  sorted name order and must all be of one kind (``.txt`` files count as ``text``).

Every problem with the user's data raises :class:`DataError` with a one-line message naming the file and,
for row problems, the 1-based line number (``data.jsonl, line 7: ...``).

Token conventions
-----------------

``labels`` are *unshifted* and as long as ``input_ids``; ``-100`` marks positions without loss. The model
shifts internally (position ``t`` predicts token ``t + 1``), so the label at position 0 never contributes;
"loss tokens" in :class:`DataStats` counts the positions that really do (``labels[1:] != -100``).

Text (``text`` rows and ``.txt`` files) is encoded without the tokenizer's own special tokens, then the bos
token is prepended (when the tokenizer has one that differs from its eos - GPT-2-style tokenizers whose bos
*is* eos only get the eos separator) and the eos token appended. ``prompt_completion`` rows are encoded the
same way with prompt and completion tokenized *separately* (``[bos] prompt completion [eos]``), so the
prompt/completion boundary is exact and matches what the model sees when it generates after the prompt.

Packing vs padding
------------------

* ``text`` data is **packed**: all documents (each ``[bos] ... [eos]``) are concatenated into one stream, in
  file/row order, which is cut into windows of exactly ``seq_len`` tokens. Documents may span two windows
  and one window may hold several documents; attention is not reset at document boundaries (the bos/eos
  separators mark them, as in standard causal-LM pre-training). The last, partial window is kept only if it
  is at least 25% full (``MIN_TAIL_FRACTION``) or if it is the only window; otherwise its tokens are
  discarded and counted in ``DataStats.dropped_tokens``. Nothing is truncated in packed data.
* Supervised kinds (``prompt_completion``, ``messages``, ``tokens``) are **not packed**: one row gives one
  sequence, padded in :func:`collate`. A row longer than ``seq_len`` is truncated from the right and counted
  in ``DataStats.truncated``; a row left without any loss position (all of them truncated away, or none to
  begin with, e.g. ``labels`` all ``-100``) is dropped and counted in ``DataStats.dropped``.

Reading is streamed (files in chunks, text rows tokenized a chunk of rows at a time with the tokenizer's
batch encoding), and every sequence goes to a *sink* as it is made: :func:`load_examples` keeps them in a
list; :mod:`usaf.data.store` writes them to an on-disk token store instead, so that no dataset-sized object is
ever held in memory.

Assistant masks for ``messages`` rows: :mod:`usaf.data.chat`. Batching: :mod:`usaf.data.batches`.
"""


from __future__ import annotations

import codecs
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from .chat import ChatEncoder
from .examples import IGNORE_INDEX, DataError, DataStats, Example, RowProblem, json_type

__all__ = ["KINDS", "MIN_TAIL_FRACTION", "Sink", "data_files", "load_examples", "read_data"]

KINDS: tuple[str, ...] = ("text", "prompt_completion", "messages", "tokens")
# A packed text stream's last, partial window is kept only if at least this full (or if it is the only one).
MIN_TAIL_FRACTION = 0.25

# The fields that identify each row kind, and those of them that are required.
_KIND_FIELDS: dict[str, tuple[str, ...]] = {
    "text": ("text",),
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
    "tokens": ("input_ids", "labels"),
}
_REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "text": ("text",),
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
    "tokens": ("input_ids",),
}
_SUFFIXES = (".jsonl", ".txt")
# Plain-text files larger than this are tokenized in pieces cut after a newline (bounded memory).
_TXT_PIECE_CHARS = 1 << 20
# Files are read in blocks of this many bytes.
_READ_BYTES = 4 << 20
# Text and prompt/completion rows are tokenized together (batch encoding) in chunks of at most this many rows
# or characters.
_CHUNK_ROWS = 1024
_CHUNK_CHARS = 4 << 20


class Sink(Protocol):
    """Where the loader puts each sequence as it is made, in order. ``labels`` None: the labels are the ids
    (packed text). ``loss_tokens``: the positions of it that contribute to the loss."""

    def add(self, ids: list[int], labels: list[int] | None, loss_tokens: int) -> None: ...


class ListSink:
    """Keeps the sequences in memory, as :class:`Example` objects."""

    def __init__(self) -> None:
        self.examples: list[Example] = []

    def add(self, ids: list[int], labels: list[int] | None, loss_tokens: int) -> None:
        self.examples.append(Example(ids, list(ids) if labels is None else labels))


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------


def load_examples(
    path: str | Path,
    tokenizer: Any,
    seq_len: int,
    *,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> tuple[list[Example], DataStats]:
    """Read ``path`` (a ``.jsonl`` / ``.txt`` file or a directory of them) into training examples, in memory.

    ``tokenizer`` is a transformers tokenizer. ``seq_len`` is the maximum sequence length: packed text is cut
    into windows of this length, supervised rows are truncated to it. ``chat_template_kwargs`` are passed to
    the chat template for ``messages`` rows (e.g. ``{"enable_thinking": False}``). Raises :class:`DataError`
    for any problem with the data. See the module docstring for the formats, masking and packing rules.
    (:func:`usaf.data.store.load_stored` produces the same examples from an on-disk token store.)
    """
    sink = ListSink()
    stats = read_data(data_files(Path(path)), tokenizer, seq_len, sink, path=path,
                      chat_template_kwargs=chat_template_kwargs)
    return sink.examples, stats


def read_data(
    files: list[Path],
    tokenizer: Any,
    seq_len: int,
    sink: Sink,
    *,
    path: str | Path,
    chat_template_kwargs: dict[str, Any] | None = None,
    progress: Any = None,
) -> DataStats:
    """Tokenize ``files`` (from :func:`data_files`) into ``sink``, streaming; returns the statistics.

    ``progress``: an object with ``update(n)``, told the bytes read as they are read (a tqdm bar)."""
    if int(seq_len) < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    loader = _Loader(tokenizer, int(seq_len), chat_template_kwargs or {}, sink, progress)
    for file in files:
        if file.suffix == ".txt":
            loader.add_txt(file)
        else:
            loader.add_jsonl(file)
    return loader.finish(path)


def data_files(path: Path) -> list[Path]:
    """The data files ``path`` names (itself, or the ``.txt`` / ``.jsonl`` files of a directory, sorted by
    name); raises :class:`DataError`."""
    path = Path(path)
    if not path.exists():
        raise DataError("no such file or directory", path=path)
    if path.is_file():
        if path.suffix not in _SUFFIXES:
            raise DataError(
                f"unsupported data file type '{path.suffix or '(none)'}': expected .jsonl or .txt "
                "(or a directory of them)",
                path=path,
            )
        return [path]
    if not path.is_dir():
        raise DataError("not a regular file or directory", path=path)
    files = []
    for entry in sorted(path.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("."):
            continue
        if not entry.is_file() or entry.suffix not in _SUFFIXES:
            what = "subdirectory" if entry.is_dir() else "file"
            raise DataError(
                f"contains the {what} '{entry.name}'; a data directory may only hold .txt and .jsonl files",
                path=path,
            )
        files.append(entry)
    if not files:
        raise DataError("directory holds no .txt or .jsonl file", path=path)
    return files


def _row_kind(row: Any) -> str:
    """The kind of a parsed jsonl row (see ``_KIND_FIELDS``); raises :class:`RowProblem`."""
    if not isinstance(row, dict):
        raise RowProblem(f"expected a JSON object, got a JSON {json_type(row)}")
    kinds = [kind for kind, names in _KIND_FIELDS.items() if any(name in row for name in names)]
    if not kinds:
        keys = ", ".join(repr(k) for k in list(row)[:8]) or "none"
        raise RowProblem(
            "unknown row kind: expected a 'text', 'prompt' + 'completion', 'messages' or 'input_ids' field "
            f"(fields: {keys})"
        )
    if len(kinds) > 1:
        fields = ", ".join(repr(name) for kind in kinds for name in _KIND_FIELDS[kind] if name in row)
        raise RowProblem(f"ambiguous row: it has fields of several kinds ({fields})")
    kind = kinds[0]
    missing = [name for name in _REQUIRED_FIELDS[kind] if name not in row]
    if missing:
        present = [name for name in _KIND_FIELDS[kind] if name in row]
        raise RowProblem(f"row has {present[0]!r} but no {missing[0]!r} field")
    return kind


def _blocks(file: Path, progress: Any) -> Iterator[bytes]:
    """The bytes of ``file`` in blocks; raises :class:`DataError` when it cannot be read."""
    try:
        with open(file, "rb") as f:
            while True:
                block = f.read(_READ_BYTES)
                if not block:
                    return
                if progress is not None:
                    progress.update(len(block))
                yield block
    except OSError as e:
        raise DataError(f"cannot read: {e.strerror or e}", path=file) from None


def _lines(file: Path, progress: Any) -> Iterator[bytes]:
    """The lines of ``file`` without their terminators, split exactly as ``bytes.splitlines`` splits the whole
    file (``\\n``, ``\\r\\n`` and ``\\r`` end a line), read block by block."""
    rest = b""
    for block in _blocks(file, progress):
        lines = (rest + block).splitlines(keepends=True)
        rest = lines.pop() if lines else b""
        if rest.endswith(b"\n"):  # complete; otherwise unfinished, or a "\r" whose "\n" may come next
            lines.append(rest)
            rest = b""
        for line in lines:
            yield _strip_eol(line)
    if rest:
        yield _strip_eol(rest)


def _strip_eol(line: bytes) -> bytes:
    if line.endswith(b"\r\n"):
        return line[:-2]
    if line.endswith((b"\n", b"\r")):
        return line[:-1]
    return line


class _Loader:
    """Reads rows of one kind from one or more files into a sink, and counts them."""

    def __init__(self, tokenizer: Any, seq_len: int, chat_template_kwargs: dict[str, Any], sink: Sink,
                 progress: Any = None) -> None:
        self.tok = tokenizer
        self.seq_len = seq_len
        self.chat_kwargs = chat_template_kwargs
        self.sink = sink
        self.progress = progress
        self.kind: str | None = None
        self.kind_origin = ""  # "file, line n" where the kind was established
        self.stats = DataStats(kind="")
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.prefix = [bos] if bos is not None and bos != eos else []
        self.suffix = [eos] if eos is not None else []
        self.vocab_size = len(tokenizer)
        self.stream: list[int] = []  # pending tokens of the packed text stream
        self.chat = ChatEncoder(tokenizer, chat_template_kwargs)

    # -- kind bookkeeping -------------------------------------------------------------------------------

    def _set_kind(self, kind: str, origin: str) -> None:
        if self.kind is None:
            self.kind = kind
            self.kind_origin = origin
            self.stats.kind = kind
            self.stats.packed = kind == "text"
        elif kind != self.kind:
            raise RowProblem(
                f"row is of kind '{kind}' but the data is of kind '{self.kind}' ({self.kind_origin})"
            )

    # -- readers ----------------------------------------------------------------------------------------

    def add_txt(self, file: Path) -> None:
        """One document: ``[bos] text [eos]``, tokenized in pieces of about ``_TXT_PIECE_CHARS`` characters cut
        after a newline, the file read block by block. A file of only whitespace adds nothing."""
        self.stats.files.append(str(file))
        started = False
        waiting: list[int] = []  # tokens of leading whitespace-only pieces, until the file proves non-blank
        for piece in self._txt_pieces(file):
            ids = self._encode(piece)
            if not started:
                if not piece.strip():
                    waiting.extend(ids)
                    continue
                try:
                    self._set_kind("text", str(file))
                except RowProblem:
                    raise DataError(
                        f"a plain-text file cannot be mixed with '{self.kind}' data ({self.kind_origin})",
                        path=file,
                    ) from None
                self.stats.rows += 1
                started = True
                self._add_packed(self.prefix + waiting)
                waiting = []
            self._add_packed(ids)
        if started:
            self._add_packed(list(self.suffix))

    def _txt_pieces(self, file: Path) -> Iterator[str]:
        """The decoded text of ``file`` in exactly the pieces :func:`_text_pieces` cuts the whole text into."""
        decoder = codecs.getincrementaldecoder("utf-8-sig")()
        lines_before = 0  # newlines in the blocks before the current one (for the line of a decoding error)
        buf = ""
        size = _TXT_PIECE_CHARS
        for block in _blocks(file, self.progress):
            try:
                buf += decoder.decode(block)
            except UnicodeDecodeError as e:
                line = lines_before + block[: max(e.start, 0)].count(b"\n") + 1
                raise DataError("not valid UTF-8 text", path=file, line=line) from None
            lines_before += block.count(b"\n")
            while len(buf) > size:
                end = size
                cut = buf.rfind("\n", 0, end)
                if cut > 0:
                    end = cut + 1
                yield buf[:end]
                buf = buf[end:]
        try:
            buf += decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise DataError("not valid UTF-8 text", path=file, line=lines_before + 1) from None
        if buf:
            yield buf

    def add_jsonl(self, file: Path) -> None:
        self.stats.files.append(str(file))
        pending: list[Any] = []  # text / (prompt, completion) rows waiting for batch tokenization
        chars = 0
        for number, line_bytes in enumerate(_lines(file, self.progress), start=1):
            try:
                line = line_bytes.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError:
                raise DataError("not valid UTF-8 text", path=file, line=number) from None
            if not line.strip():
                continue
            try:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise RowProblem(f"malformed JSON: {e.msg} (column {e.colno})") from None
                kind = _row_kind(row)
                self._set_kind(kind, f"{file}, line {number}")
                self.stats.rows += 1
                if kind == "text":
                    if not isinstance(row["text"], str):
                        raise RowProblem(f"'text' must be a string, got a JSON {json_type(row['text'])}")
                    pending.append(row["text"])
                    chars += len(row["text"])
                elif kind == "prompt_completion":
                    for name in ("prompt", "completion"):
                        if not isinstance(row[name], str):
                            raise RowProblem(f"{name!r} must be a string, got a JSON {json_type(row[name])}")
                    pending.append((row["prompt"], row["completion"]))
                    chars += len(row["prompt"]) + len(row["completion"])
                elif kind == "messages":
                    self._add_supervised(*self.chat.encode(row["messages"]))
                else:
                    self._add_supervised(*self._tokens(row))
            except RowProblem as e:
                raise DataError(str(e), path=file, line=number) from None
            if len(pending) >= _CHUNK_ROWS or chars >= _CHUNK_CHARS:
                self._flush(pending)
                pending, chars = [], 0
        self._flush(pending)

    def _flush(self, pending: list[Any]) -> None:
        """Tokenize the waiting rows together (one batch call), then add them in order."""
        if not pending:
            return
        if isinstance(pending[0], str):
            for ids in self._encode_many(pending):
                self._add_packed(self.prefix + ids + self.suffix)
            return
        prompts = self._encode_many([p for p, _ in pending])
        completions = self._encode_many([c for _, c in pending])
        for p_ids, c_ids in zip(prompts, completions):
            prompt = self.prefix + p_ids
            completion = c_ids + self.suffix
            self._add_supervised(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion)

    # -- encoders ---------------------------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False, verbose=False)["input_ids"])

    def _encode_many(self, texts: list[str]) -> list[list[int]]:
        """The ids of each text, as one call of the tokenizer each would give (a fast tokenizer encodes the
        batch in parallel)."""
        return [list(ids) for ids in self.tok(texts, add_special_tokens=False, verbose=False)["input_ids"]]

    def _tokens(self, row: dict[str, Any]) -> tuple[list[int], list[int]]:
        ids = self._int_list(row["input_ids"], "input_ids", allow_ignore=False)
        if not ids:
            raise RowProblem("'input_ids' is empty")
        if "labels" not in row or row["labels"] is None:
            return ids, list(ids)
        labels = self._int_list(row["labels"], "labels", allow_ignore=True)
        if len(labels) != len(ids):
            raise RowProblem(f"'labels' has {len(labels)} entries but 'input_ids' has {len(ids)}")
        return ids, labels

    def _int_list(self, value: Any, name: str, *, allow_ignore: bool) -> list[int]:
        if not isinstance(value, list):
            raise RowProblem(f"{name!r} must be an array of integers, got a JSON {json_type(value)}")
        for i, v in enumerate(value):
            if isinstance(v, bool) or not isinstance(v, int):
                raise RowProblem(f"{name}[{i}] is not an integer ({json.dumps(v)})")
            if not (0 <= v < self.vocab_size or (allow_ignore and v == IGNORE_INDEX)):
                raise RowProblem(
                    f"{name}[{i}] = {v} is not a valid token id (vocabulary size {self.vocab_size})"
                )
        return list(value)

    # -- sinks ------------------------------------------------------------------------------------------

    def _add_packed(self, ids: list[int]) -> None:
        n = self.seq_len
        if not self.stream and len(ids) < n:
            self.stream = ids
            return
        self.stream.extend(ids)
        full = len(self.stream) // n * n
        for s in range(0, full, n):
            self._keep(self.stream[s : s + n], None, n - 1)
        del self.stream[:full]

    def _add_supervised(self, ids: list[int], labels: list[int]) -> None:
        if len(ids) > self.seq_len:
            self.stats.truncated += 1
            ids, labels = ids[: self.seq_len], labels[: self.seq_len]
        loss = sum(1 for label in labels[1:] if label != IGNORE_INDEX)
        if loss == 0:
            self.stats.dropped += 1
            self.stats.dropped_tokens += len(ids)
            return
        self._keep(ids, labels, loss)

    def _keep(self, ids: list[int], labels: list[int] | None, loss_tokens: int) -> None:
        self.sink.add(ids, labels, loss_tokens)
        self.stats.sequences += 1
        self.stats.tokens += len(ids)
        self.stats.loss_tokens += loss_tokens

    def finish(self, path: str | Path) -> DataStats:
        if self.stream:
            tail = self.stream
            if len(tail) >= math.ceil(MIN_TAIL_FRACTION * self.seq_len) or not self.stats.sequences:
                self._keep(list(tail), None, len(tail) - 1)
            else:
                self.stats.dropped_tokens += len(tail)
            self.stream = []
        if self.stats.rows == 0:
            raise DataError("no data (no non-blank rows)", path=path)
        if not self.stats.sequences or self.stats.loss_tokens == 0:
            raise DataError(
                f"no usable training sequence: {self.stats.rows} row(s) read, {self.stats.dropped} dropped "
                f"for having no loss token within seq_len={self.seq_len}",
                path=path,
            )
        return self.stats
