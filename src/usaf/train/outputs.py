"""What a run writes into ``--out`` besides checkpoints: the config, the step log, metrics and the loss plot.

Every file is written atomically (``usaf.io``); ``log.jsonl`` is appended line by line, flushed after each
step and fsynced before each checkpoint, and cut back to the checkpoint's step when a run resumes (the
steps after it are redone). A full disk is a one-line error that says what is intact.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path

import yaml
from tqdm import tqdm

from ..config import TrainConfig, to_dict
from ..io import atomic_write, atomic_write_json, atomic_write_text, is_disk_full
from . import checkpoint
from .report import write_report
from .resume import RunError
from .tensorboard import TensorBoardWriter

log = logging.getLogger("usaf")

# What a run writes into --out (removed by --overwrite; nothing else there is touched).
RUN_FILES = ("config.yaml", "log.jsonl", "delta.safetensors", "metrics.json", "loss.png", "router_load.json",
             "report.html")
RUN_DIRS = ("checkpoints", "tensorboard")


def prepare_out(out: Path, cfg: TrainConfig, resuming: bool, unreadable: list[Path]) -> None:
    """Create --out (all checks passed); --overwrite removes the previous run's files; a resumed run's
    leftovers of a kill (temporary files and directories, unreadable checkpoints) are cleaned."""
    if not resuming and cfg.overwrite and out.is_dir():
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
        for name in RUN_DIRS:
            shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    for bad in unreadable:
        log.warning("moved the unreadable checkpoint %s to %s", bad, checkpoint.discard(bad))
    removed = checkpoint.clean(out)
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted run", len(removed))
    atomic_write_text(out / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))


class StepLog:
    """``log.jsonl``: one JSON object per step (only rank 0 writes; elsewhere every call is a no-op); with
    ``report_to="tensorboard"`` the same scalars go to ``<out>/tensorboard`` too."""

    def __init__(self, out: Path, step: int, main: bool, report_to: str = "none"):
        self.path = out / "log.jsonl"
        self.file = self.tb = None
        if main:
            truncate_log(self.path, step)
            self.file = open(self.path, "a")
            if report_to == "tensorboard":
                self.tb = TensorBoardWriter(out / "tensorboard", purge_step=step + 1 if step else None)

    def write(self, rec: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(rec) + "\n")
            self.file.flush()
        if self.tb is not None:
            self.tb.write(rec)

    def sync(self) -> None:
        """Make the lines written so far durable (before a checkpoint: they survive a power loss too)."""
        if self.file is None:
            return
        if not self.file.closed:
            self.file.flush()
        if self.tb is not None:
            self.tb.flush()
        with open(self.path, "rb") as f:
            os.fsync(f.fileno())

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def truncate_log(path: Path, step: int) -> None:
    """Keep the log lines of steps <= ``step`` (those after the checkpoint are redone); a line cut short by
    a kill is dropped."""
    if not path.exists():
        return
    keep = []
    for ln in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(ln)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
            keep.append(ln)
    atomic_write_text(path, "".join(ln + "\n" for ln in keep))


def write_results(out: Path, metrics: dict, router_load: dict | None = None) -> None:
    """``metrics.json``, ``router_load.json`` (tokens per expert and trainable layer in the eval passes
    before and after training), ``loss.png`` and ``report.html`` (the delta and the last checkpoint are
    written by the recipe, before)."""
    atomic_write_json(out / "metrics.json", metrics)
    if router_load is not None:
        atomic_write_json(out / "router_load.json", router_load)
    plot_loss(out)
    try:
        write_report(out)
    except Exception as e:  # noqa: BLE001 - the run's results are written; a report failure must not fail it
        log.warning("report.html not written (%s: %s)", type(e).__name__, str(e).splitlines()[0][:200])


@contextlib.contextmanager
def disk_full_is_an_error(out: Path):
    """A full disk while writing into --out is a one-line error that says what is intact."""
    try:
        yield
    except OSError as e:
        if not is_disk_full(e):
            raise
        last = checkpoint.latest(out)
        kept = f"the last complete checkpoint ({last}) is intact" if last else "no checkpoint was written yet"
        what = str(e) if e.filename else "no space left on device"
        raise RunError(f"{what}; {kept}; free some space, then continue with --resume {out}") from None


class Progress:
    """A step progress bar with the loss and tokens/s (nothing when quiet, or on ranks > 0)."""

    def __init__(self, total: int, start: int, quiet: bool):
        self.bar = None if quiet else tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:.0f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def plot_loss(out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib not installed: no loss.png")
        return
    recs = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines() if ln.strip()]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in recs], [r["loss"] for r in recs], label="train loss")
    ev = [(r["step"], r["eval_loss"]) for r in recs if "eval_loss" in r]
    if ev:
        ax.plot(*zip(*ev), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    atomic_write(out / "loss.png", lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
