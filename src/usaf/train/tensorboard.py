"""``--report-to tensorboard``: the scalars of every ``log.jsonl`` line as TensorBoard event files.

Written with the ``tensorboard`` package's own event writer (no TensorFlow, no torch wrapper) into
``<out>/tensorboard``; one tag per number of the line (``loss``, ``lr``, ``tokens_per_s``, ``eval_ppl``, ...;
nested records as ``reselect/dropped``), at the line's ``step``. A resumed run starts a new event file that
first marks the resume step, so TensorBoard drops the steps after the checkpoint that are redone (as
``torch.utils.tensorboard.SummaryWriter(purge_step=...)`` does).
"""

from __future__ import annotations

import time
from pathlib import Path


def scalars(rec: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a log record, flattened (``{"reselect": {"dropped": 3}}`` -> ``reselect/dropped``)."""
    out = {}
    for k, v in rec.items():
        if k == "step":
            continue
        if isinstance(v, dict):
            out.update(scalars(v, f"{prefix}{k}/"))
        elif isinstance(v, (bool, int, float)):
            out[prefix + k] = float(v)
    return out


class TensorBoardWriter:
    """Event files in ``logdir``; ``purge_step`` (a resumed run's first step) drops older events from there on."""

    def __init__(self, logdir: Path, purge_step: int | None = None):
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._Event, self._Summary = Event, Summary
        Path(logdir).mkdir(parents=True, exist_ok=True)
        self.writer = EventFileWriter(str(logdir))
        if purge_step is not None:
            self.writer.add_event(Event(step=purge_step, wall_time=time.time(),
                                        session_log=SessionLog(status=SessionLog.START)))

    def write(self, rec: dict) -> None:
        values = [self._Summary.Value(tag=k, simple_value=v) for k, v in scalars(rec).items()]
        self.writer.add_event(self._Event(step=int(rec["step"]), wall_time=time.time(),
                                          summary=self._Summary(value=values)))

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
