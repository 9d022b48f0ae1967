"""What the data layer produces: examples (token ids + unshifted labels), statistics and errors.

``labels`` are *unshifted* and as long as ``input_ids``; ``-100`` marks positions without loss. The model
shifts internally (position ``t`` predicts token ``t + 1``), so the label at position 0 never contributes;
"loss tokens" in :class:`DataStats` counts the positions that really do (``labels[1:] != -100``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

IGNORE_INDEX = -100


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


class RowProblem(Exception):
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


def json_type(value: Any) -> str:
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
