"""Training data: loading, masking, packing, splitting, batching and the token-weighted loss.

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

Assistant masks for ``messages``
--------------------------------

Conversations are rendered with ``tokenizer.apply_chat_template`` (whatever bos/eos the template itself
writes, nothing added). Which tokens are "assistant tokens" is decided as follows:

1. If the chat template marks assistant output with ``{% generation %}`` blocks (and the tokenizer is a fast
   one), transformers' ``return_assistant_tokens_mask`` is used: exactly the tokens inside those blocks.
2. Otherwise (most published templates) the spans are found by **incremental prefix rendering and token
   diffing**. For each assistant message ``i`` of the tokenized full conversation ``F``:

   * start = length of the common prefix of ``F`` and the rendering of ``messages[:i]`` with
     ``add_generation_prompt=True`` - so the assistant header the template emits as generation prompt is
     *not* trained on;
   * end = length of the common prefix of ``F`` and the rendering of ``messages[:i + 1]`` - so the assistant
     content, any tool calls and the end-of-turn markup the template writes after them (e.g.
     ``<|im_end|>\\n`` for ChatML) *are* trained on: the model must learn to stop.

   Common prefixes (rather than plain lengths) keep this right when tokenization at a boundary differs.
   Some templates render the *final* assistant turn differently from earlier ones (Qwen3 adds an empty
   ``<think></think>`` block to the last turn, gpt-oss ends it with ``<|return|>`` instead of ``<|end|>``),
   so ``messages[:i + 1]`` is not a prefix of ``F``. Then the end is re-aligned on the longest common
   *suffix* of that rendering's divergent tail and ``F`` (bounded by the next assistant turn's start): the
   earlier turn still gets its content and end-of-turn tokens; at worst (no common tail, as for gpt-oss)
   the span stops where the renderings diverge.

A conversation without an assistant message, or whose assistant turns yield no token, raises
:class:`DataError`, as does a tokenizer without a chat template.

Evaluation, batching, loss
--------------------------

* :func:`split_eval` - deterministic held-out split when no eval file is given.
* :func:`collate` - right padding to the longest sequence of the batch.
* :class:`Batches` - seeded, epoch-aware, resumable batch iterator with optional rank sharding.
* :func:`token_weighted_loss` - (sum, count) of the causal-LM loss exactly as transformers computes it, so
  that ``exp(total_sum / total_count)`` is the token-weighted perplexity over any number of batches.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "IGNORE_INDEX",
    "KINDS",
    "MIN_TAIL_FRACTION",
    "DataError",
    "Example",
    "DataStats",
    "load_examples",
    "split_eval",
    "collate",
    "Batches",
    "token_weighted_loss",
]

IGNORE_INDEX = -100
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
_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


class DataError(ValueError):
    """A problem with the user's training data.

    ``str(error)`` is one line: ``"<file>, line <n>: <problem>"`` (or ``"<file>: <problem>"``); the CLI prints
    it as ``usaf: error: <msg>`` and exits with status 2. ``path``, ``line`` and ``problem`` are kept as
    attributes.
    """

    def __init__(self, problem: str, *, path: str | Path | None = None, line: int | None = None) -> None:
        problem = " ".join(str(problem).split())  # guarantee a single line
        where = "" if path is None else str(path) if line is None else f"{path}, line {line}"
        super().__init__(f"{where}: {problem}" if where else problem)
        self.problem = problem
        self.path = None if path is None else str(path)
        self.line = line


class _RowProblem(Exception):
    """Internal: a problem with one row; turned into a :class:`DataError` that names the file and line."""


@dataclass(slots=True)
class Example:
    """One training sequence: token ids and *unshifted* labels of the same length (``-100`` = no loss)."""

    input_ids: list[int]
    labels: list[int]

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError(
                f"input_ids ({len(self.input_ids)}) and labels ({len(self.labels)}) differ in length"
            )

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_loss_tokens(self) -> int:
        """Positions that contribute to the (shifted) causal-LM loss."""
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


@dataclass
class DataStats:
    """What :func:`load_examples` read and produced.

    ``rows``: data rows read (jsonl rows; one per ``.txt`` file). ``sequences``: examples produced.
    ``tokens``: tokens in those examples (no padding). ``loss_tokens``: positions that contribute to the loss.
    ``truncated``: supervised rows cut to ``seq_len``. ``dropped``: supervised rows dropped for having no loss
    position left. ``dropped_tokens``: tokens discarded (the short tail window of packed text, and the
    tokens of dropped rows). ``packed``: whether the sequences are packed windows of a text stream.
    """

    kind: str
    rows: int = 0
    sequences: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    truncated: int = 0
    dropped: int = 0
    dropped_tokens: int = 0
    packed: bool = False
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy."""
        return asdict(self)

    def summary(self) -> str:
        """A one-line human summary, e.g. for the CLI log."""
        how = "packed into" if self.packed else "->"
        parts = [
            f"{self.rows:,} {self.kind} row{'s' * (self.rows != 1)} {how} {self.sequences:,} "
            f"sequence{'s' * (self.sequences != 1)}, {self.tokens:,} tokens ({self.loss_tokens:,} with loss)"
        ]
        if self.truncated:
            parts.append(f"{self.truncated:,} truncated")
        if self.dropped:
            parts.append(f"{self.dropped:,} dropped")
        if self.dropped_tokens:
            parts.append(f"{self.dropped_tokens:,} tokens discarded")
        return "; ".join(parts)


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
    """Read ``path`` (a ``.jsonl`` / ``.txt`` file or a directory of them) into training examples.

    ``tokenizer`` is a transformers tokenizer. ``seq_len`` is the maximum sequence length: packed text is cut
    into windows of this length, supervised rows are truncated to it. ``chat_template_kwargs`` are passed to
    the chat template for ``messages`` rows (e.g. ``{"enable_thinking": False}``). Raises :class:`DataError`
    for any problem with the data. See the module docstring for the formats, masking and packing rules.
    """
    if int(seq_len) < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    files = _data_files(Path(path))
    loader = _Loader(tokenizer, int(seq_len), chat_template_kwargs or {})
    for file in files:
        if file.suffix == ".txt":
            loader.add_txt(file)
        else:
            loader.add_jsonl(file)
    return loader.finish(path)


def _data_files(path: Path) -> list[Path]:
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


def _json_type(value: Any) -> str:
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return "null" if value is None else type(value).__name__


def _row_kind(row: Any) -> str:
    """The kind of a parsed jsonl row (see ``_KIND_FIELDS``); raises :class:`_RowProblem`."""
    if not isinstance(row, dict):
        raise _RowProblem(f"expected a JSON object, got a JSON {_json_type(row)}")
    kinds = [kind for kind, names in _KIND_FIELDS.items() if any(name in row for name in names)]
    if not kinds:
        keys = ", ".join(repr(k) for k in list(row)[:8]) or "none"
        raise _RowProblem(
            "unknown row kind: expected a 'text', 'prompt' + 'completion', 'messages' or 'input_ids' field "
            f"(fields: {keys})"
        )
    if len(kinds) > 1:
        fields = ", ".join(repr(name) for kind in kinds for name in _KIND_FIELDS[kind] if name in row)
        raise _RowProblem(f"ambiguous row: it has fields of several kinds ({fields})")
    kind = kinds[0]
    missing = [name for name in _REQUIRED_FIELDS[kind] if name not in row]
    if missing:
        present = [name for name in _KIND_FIELDS[kind] if name in row]
        raise _RowProblem(f"row has {present[0]!r} but no {missing[0]!r} field")
    return kind


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class _Loader:
    """Accumulates rows of one kind from one or more files into examples and statistics."""

    def __init__(self, tokenizer: Any, seq_len: int, chat_template_kwargs: dict[str, Any]) -> None:
        self.tok = tokenizer
        self.seq_len = seq_len
        self.chat_kwargs = chat_template_kwargs
        self.kind: str | None = None
        self.kind_origin = ""  # "file, line n" where the kind was established
        self.examples: list[Example] = []
        self.stats = DataStats(kind="")
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.prefix = [bos] if bos is not None and bos != eos else []
        self.suffix = [eos] if eos is not None else []
        self.vocab_size = len(tokenizer)
        self.stream: list[int] = []  # pending tokens of the packed text stream
        self._chat_checked = False
        self._use_generation_mask = False

    # -- kind bookkeeping -------------------------------------------------------------------------------

    def _set_kind(self, kind: str, origin: str) -> None:
        if self.kind is None:
            self.kind = kind
            self.kind_origin = origin
            self.stats.kind = kind
            self.stats.packed = kind == "text"
        elif kind != self.kind:
            raise _RowProblem(
                f"row is of kind '{kind}' but the data is of kind '{self.kind}' ({self.kind_origin})"
            )

    # -- readers ----------------------------------------------------------------------------------------

    def add_txt(self, file: Path) -> None:
        self.stats.files.append(str(file))
        try:
            text = file.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as e:
            line = file.read_bytes()[: e.start].count(b"\n") + 1
            raise DataError("not valid UTF-8 text", path=file, line=line) from None
        except OSError as e:
            raise DataError(f"cannot read: {e.strerror or e}", path=file) from None
        if not text.strip():
            return
        try:
            self._set_kind("text", str(file))
        except _RowProblem:
            raise DataError(
                f"a plain-text file cannot be mixed with '{self.kind}' data ({self.kind_origin})", path=file
            ) from None
        self.stats.rows += 1
        ids: list[int] = list(self.prefix)
        for piece in _text_pieces(text, _TXT_PIECE_CHARS):
            ids.extend(self._encode(piece))
        ids.extend(self.suffix)
        self._add_packed(ids)

    def add_jsonl(self, file: Path) -> None:
        self.stats.files.append(str(file))
        try:
            raw = file.read_bytes()
        except OSError as e:
            raise DataError(f"cannot read: {e.strerror or e}", path=file) from None
        for number, line_bytes in enumerate(raw.splitlines(), start=1):
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
                    raise _RowProblem(f"malformed JSON: {e.msg} (column {e.colno})") from None
                kind = _row_kind(row)
                self._set_kind(kind, f"{file}, line {number}")
                self.stats.rows += 1
                if kind == "text":
                    self._add_packed(self._text_ids(row["text"]))
                elif kind == "prompt_completion":
                    self._add_supervised(*self._prompt_completion(row))
                elif kind == "messages":
                    self._add_supervised(*self._messages(row["messages"]))
                else:
                    self._add_supervised(*self._tokens(row))
            except _RowProblem as e:
                raise DataError(str(e), path=file, line=number) from None

    # -- encoders ---------------------------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False, verbose=False)["input_ids"])

    def _text_ids(self, text: Any) -> list[int]:
        if not isinstance(text, str):
            raise _RowProblem(f"'text' must be a string, got a JSON {_json_type(text)}")
        return self.prefix + self._encode(text) + self.suffix

    def _prompt_completion(self, row: dict[str, Any]) -> tuple[list[int], list[int]]:
        for name in ("prompt", "completion"):
            if not isinstance(row[name], str):
                raise _RowProblem(f"{name!r} must be a string, got a JSON {_json_type(row[name])}")
        prompt = self.prefix + self._encode(row["prompt"])
        completion = self._encode(row["completion"]) + self.suffix
        return prompt + completion, [IGNORE_INDEX] * len(prompt) + completion

    def _tokens(self, row: dict[str, Any]) -> tuple[list[int], list[int]]:
        ids = self._int_list(row["input_ids"], "input_ids", allow_ignore=False)
        if not ids:
            raise _RowProblem("'input_ids' is empty")
        if "labels" not in row or row["labels"] is None:
            return ids, list(ids)
        labels = self._int_list(row["labels"], "labels", allow_ignore=True)
        if len(labels) != len(ids):
            raise _RowProblem(f"'labels' has {len(labels)} entries but 'input_ids' has {len(ids)}")
        return ids, labels

    def _int_list(self, value: Any, name: str, *, allow_ignore: bool) -> list[int]:
        if not isinstance(value, list):
            raise _RowProblem(f"{name!r} must be an array of integers, got a JSON {_json_type(value)}")
        for i, v in enumerate(value):
            if isinstance(v, bool) or not isinstance(v, int):
                raise _RowProblem(f"{name}[{i}] is not an integer ({json.dumps(v)})")
            if not (0 <= v < self.vocab_size or (allow_ignore and v == IGNORE_INDEX)):
                raise _RowProblem(
                    f"{name}[{i}] = {v} is not a valid token id (vocabulary size {self.vocab_size})"
                )
        return list(value)

    def _check_chat(self) -> None:
        if self._chat_checked:
            return
        template = getattr(self.tok, "chat_template", None)
        if not template:
            raise _RowProblem("'messages' rows need a chat template, and the tokenizer has none")
        if isinstance(template, dict):  # named templates: the default one is used
            template = template.get("default") or next(iter(template.values()))
        self._use_generation_mask = bool(_GENERATION_BLOCK.search(str(template))) and bool(
            getattr(self.tok, "is_fast", False)
        )
        self._chat_checked = True

    def _render(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> list[int]:
        try:
            ids = self.tok.apply_chat_template(
                messages,
                add_generation_prompt=add_generation_prompt,
                tokenize=True,
                return_dict=False,
                **self.chat_kwargs,
            )
        except Exception as e:  # the template (Jinja) may raise anything on data it does not accept
            raise _RowProblem(f"chat template failed: {type(e).__name__}: {e}") from None
        return list(ids)

    def _messages(self, messages: Any) -> tuple[list[int], list[int]]:
        self._check_chat()
        if not isinstance(messages, list) or not messages:
            raise _RowProblem("'messages' must be a non-empty array of {role, content} objects")
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise _RowProblem(f"messages[{i}] must be an object, got a JSON {_json_type(m)}")
            role = m.get("role")
            if not isinstance(role, str) or not role:
                raise _RowProblem(f"messages[{i}] has no 'role' string")
            content = m.get("content")
            if not (isinstance(content, (str, list)) or (content is None and m.get("tool_calls"))):
                raise _RowProblem(f"messages[{i}] has no 'content' string")
        if not any(m["role"] == "assistant" for m in messages):
            raise _RowProblem("conversation has no assistant turn (nothing to train on)")
        if self._use_generation_mask:
            try:
                out = self.tok.apply_chat_template(
                    messages,
                    tokenize=True,
                    return_dict=True,
                    return_assistant_tokens_mask=True,
                    **self.chat_kwargs,
                )
            except Exception as e:  # see _render
                raise _RowProblem(f"chat template failed: {type(e).__name__}: {e}") from None
            ids = list(out["input_ids"])
            mask = list(out["assistant_masks"])
        else:
            ids = self._render(messages, add_generation_prompt=False)
            mask = [0] * len(ids)
            for start, end in self._assistant_spans(ids, messages):
                mask[start:end] = [1] * (end - start)
        labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
        if all(label == IGNORE_INDEX for label in labels):
            raise _RowProblem("the chat template rendered no token for the assistant turns")
        return ids, labels

    def _assistant_spans(self, full: list[int], messages: list[dict[str, Any]]) -> list[tuple[int, int]]:
        """Token spans of ``full`` (the rendered conversation) that belong to assistant turns.

        See the module docstring: incremental prefix rendering + common-prefix diff, with a common-suffix
        re-alignment for templates that render the final assistant turn differently.
        """
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        starts = [_common_prefix(full, self._render(messages[:i], True)) if i else 0 for i in turns]
        spans = []
        for k, i in enumerate(turns):
            start = starts[k]
            bound = starts[k + 1] if k + 1 < len(turns) else len(full)
            upto = self._render(messages[: i + 1], False)
            end = _common_prefix(full, upto)
            if end < len(upto):
                end = max(end, _realign_end(full, upto, end, bound))
            end = min(end, bound)
            if end > start:
                spans.append((start, end))
        return spans

    # -- sinks ------------------------------------------------------------------------------------------

    def _add_packed(self, ids: list[int]) -> None:
        self.stream.extend(ids)
        n = self.seq_len
        full = len(self.stream) // n * n
        for s in range(0, full, n):
            window = self.stream[s : s + n]
            self._keep(Example(window, list(window)))
        del self.stream[:full]

    def _add_supervised(self, ids: list[int], labels: list[int]) -> None:
        if len(ids) > self.seq_len:
            self.stats.truncated += 1
            ids, labels = ids[: self.seq_len], labels[: self.seq_len]
        example = Example(ids, labels)
        if example.num_loss_tokens == 0:
            self.stats.dropped += 1
            self.stats.dropped_tokens += len(ids)
            return
        self._keep(example)

    def _keep(self, example: Example) -> None:
        self.examples.append(example)
        self.stats.sequences += 1
        self.stats.tokens += len(example)
        self.stats.loss_tokens += example.num_loss_tokens

    def finish(self, path: str | Path) -> tuple[list[Example], DataStats]:
        if self.stream:
            tail = self.stream
            if len(tail) >= math.ceil(MIN_TAIL_FRACTION * self.seq_len) or not self.examples:
                self._keep(Example(list(tail), list(tail)))
            else:
                self.stats.dropped_tokens += len(tail)
            self.stream = []
        if self.stats.rows == 0:
            raise DataError("no data (no non-blank rows)", path=path)
        if not self.examples or self.stats.loss_tokens == 0:
            raise DataError(
                f"no usable training sequence: {self.stats.rows} row(s) read, {self.stats.dropped} dropped "
                f"for having no loss token within seq_len={self.seq_len}",
                path=path,
            )
        return self.examples, self.stats


def _realign_end(full: list[int], upto: list[int], diverge: int, bound: int) -> int:
    """End of an assistant turn in ``full`` when ``upto`` (the conversation rendered up to and including that
    turn) is not a prefix of ``full``: the position ``q`` in ``(diverge, bound]`` whose preceding tokens share
    the longest suffix with ``upto``'s divergent tail (earliest on ties); ``diverge`` if none does."""
    tail = upto[diverge:]
    best_q, best_len = diverge, 0
    last = tail[-1]
    for q in range(diverge + 1, min(bound, len(full)) + 1):
        if full[q - 1] != last:
            continue
        n = 0
        limit = min(len(tail), q - diverge)
        while n < limit and full[q - 1 - n] == tail[-1 - n]:
            n += 1
        if n > best_len:
            best_q, best_len = q, n
    return best_q


def _text_pieces(text: str, size: int) -> Iterator[str]:
    """``text`` in consecutive pieces of about ``size`` characters, cut just after a newline when possible."""
    start = 0
    while start < len(text):
        end = start + size
        if end < len(text):
            cut = text.rfind("\n", start, end)
            if cut > start:
                end = cut + 1
        yield text[start:end]
        start = end


# ---------------------------------------------------------------------------------------------------------
# Splitting, collation, batching
# ---------------------------------------------------------------------------------------------------------


def split_eval(
    examples: Sequence[Example],
    fraction: float = 0.1,
    seed: int = 0,
    min_eval: int = 1,
    max_eval: int | None = 256,
) -> tuple[list[Example], list[Example]]:
    """Deterministic held-out split ``(train, eval)`` for when no eval file is given.

    ``round(fraction * n)`` examples, clamped to ``[min_eval, max_eval]`` (``max_eval=None``: no cap) and to at
    most ``n - 1``, are drawn with a seeded RNG; both parts keep the original order. ``fraction=0`` (or
    ``max_eval=0``) returns ``(all, [])``. Raises :class:`DataError` when fewer than 2 examples are given
    (nothing could be held out and still leave training data). For packed text the held-out windows are
    windows of the same stream, so a document cut across two windows can be on both sides of the split.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"eval fraction must be in [0, 1), got {fraction}")
    n = len(examples)
    if fraction == 0.0 or max_eval == 0:
        return list(examples), []
    if n < 2:
        raise DataError(
            f"only {n} training sequence(s): too few to hold out an eval split; add data or give an eval file"
        )
    k = max(int(min_eval), round(fraction * n))
    if max_eval is not None:
        k = min(k, int(max_eval))
    k = max(1, min(k, n - 1))
    held = set(random.Random(f"usaf-split:{seed}").sample(range(n), k))
    train = [ex for i, ex in enumerate(examples) if i not in held]
    evals = [ex for i, ex in enumerate(examples) if i in held]
    return train, evals


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest sequence.

    Returns ``input_ids`` (B, T) padded with ``pad_id``, ``labels`` (B, T) with ``-100`` on padding and
    ``attention_mask`` (B, T) with 1 on real tokens, all ``torch.long``.
    """
    if not examples:
        raise ValueError("cannot collate an empty batch")
    width = max(len(ex) for ex in examples)
    input_ids = torch.full((len(examples), width), int(pad_id), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex)
        input_ids[row, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(ex.labels, dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


class Batches:
    """Deterministic, epoch-aware, resumable batches of shuffled examples.

    Each epoch visits every example once, in an order drawn from ``(seed, epoch)`` (or the original order if
    ``shuffle=False``), in *global* batches of ``batch_size`` examples; ``len()`` is the number of global
    batches per epoch. The last, partial batch is kept unless ``drop_last``.

    With ``world_size > 1`` (``batch_size`` must then be a multiple of it) each rank gets a disjoint contiguous
    slice of ``batch_size // world_size`` examples of every global batch; a partial last batch is first
    filled up to a multiple of ``world_size`` with examples from the start of the epoch's order, so every
    rank always gets the same number of examples.

    Iterating yields the remaining batches of the current epoch and then moves to the next epoch, so
    ``for epoch in ...: for batch in batches: ...`` works; :meth:`next_batch` crosses epochs by itself.
    Batches are lists of :class:`Example`, or :func:`collate` dicts when ``pad_id`` is given.
    :meth:`state_dict` / :meth:`load_state_dict` save and restore ``(epoch, position, seed)``: a resumed run
    gets exactly the batches the uninterrupted one would have.
    """

    def __init__(
        self,
        examples: Sequence[Example],
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        pad_id: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"invalid rank {rank} for world_size {world_size}")
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is not a multiple of world_size {world_size}")
        if not examples:
            raise ValueError("no examples to batch")
        if drop_last and len(examples) < batch_size:
            raise ValueError(f"{len(examples)} examples make no full batch of {batch_size} (drop_last=True)")
        self.examples = examples
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.pad_id = pad_id
        self.epoch = 0
        self.position = 0  # index of the next global batch within the epoch
        self._order_epoch: int | None = None
        self._order: list[int] = []

    def __len__(self) -> int:
        n = len(self.examples)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def local_batch_size(self) -> int:
        """Examples per rank in a full batch."""
        return self.batch_size // self.world_size

    def order(self, epoch: int) -> list[int]:
        """Example indices in the order epoch ``epoch`` visits them."""
        if self._order_epoch != epoch:
            order = list(range(len(self.examples)))
            if self.shuffle:
                random.Random(f"usaf-batches:{self.seed}:{epoch}").shuffle(order)
            self._order, self._order_epoch = order, epoch
        return self._order

    def global_indices(self, epoch: int, position: int) -> list[int]:
        """Indices of global batch ``position`` of epoch ``epoch`` (before rank sharding, incl. fill)."""
        order = self.order(epoch)
        batch = order[position * self.batch_size : (position + 1) * self.batch_size]
        if self.world_size > 1 and len(batch) % self.world_size:
            need = self.world_size - len(batch) % self.world_size
            batch = batch + [order[i % len(order)] for i in range(need)]
        return batch

    def rank_indices(self, epoch: int, position: int) -> list[int]:
        """This rank's slice of :meth:`global_indices`."""
        batch = self.global_indices(epoch, position)
        per_rank = len(batch) // self.world_size
        return batch[self.rank * per_rank : (self.rank + 1) * per_rank]

    def _normalize(self) -> None:
        if self.position >= len(self):
            self.epoch += self.position // len(self)
            self.position %= len(self)

    def next_batch(self) -> list[Example] | dict[str, torch.Tensor]:
        """The next batch (for this rank), advancing to the next epoch after the last one."""
        self._normalize()
        indices = self.rank_indices(self.epoch, self.position)
        self.position += 1
        self._normalize()
        batch = [self.examples[i] for i in indices]
        if self.pad_id is None:
            return batch
        out = collate(batch, self.pad_id)
        out["index"] = torch.tensor(indices, dtype=torch.long)  # which examples (frozen-prefix cache rows)
        return out

    def __iter__(self) -> Iterator[list[Example] | dict[str, torch.Tensor]]:
        self._normalize()
        for _ in range(len(self) - self.position):
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        """``epoch``, ``position`` (next batch within the epoch), ``seed``, plus sizes checked on load."""
        self._normalize()
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_examples": len(self.examples),
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore a :meth:`state_dict`; raises ``ValueError`` if the data or batch size changed since."""
        for key, mine in (("num_examples", len(self.examples)), ("batch_size", self.batch_size)):
            if key in state and int(state[key]) != mine:
                raise ValueError(f"cannot resume batches: {key} was {state[key]}, is now {mine}")
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order_epoch = None
        self._normalize()


# ---------------------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------------------


def token_weighted_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed causal-LM cross-entropy and the number of tokens it covers.

    Computed exactly like transformers' ``ForCausalLMLoss``: logits upcast to fp32, labels shifted left by
    one (position ``t`` predicts ``labels[t + 1]``), ``-100`` ignored. Returns ``(sum_loss, n_tokens)`` as 0-d
    tensors (fp32 and int64) on ``logits``' device, so the mean is ``sum_loss / n_tokens`` and, over many
    batches, perplexity is ``exp(sum of sums / sum of counts)`` (token-weighted, not batch-weighted).
    """
    vocab = logits.shape[-1]
    shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1).to(logits.device)
    sum_loss = F.cross_entropy(
        logits.float().reshape(-1, vocab), shift_labels, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    n_tokens = (shift_labels != IGNORE_INDEX).sum()
    return sum_loss, n_tokens
