"""The benchmark harness: one process per measured run, its memory read from the kernel, its result
returned on a tagged stdout line, the machine described; Markdown tables for the docs.

A worker is ``python -m usaf.bench.<bench> _worker ...``; it prints ``RESULT_TAG + json`` on success.
Methods other than usaf's run without usaf's process tuning (:func:`baseline_env`).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys

import torch

# the process-memory readings live with the memory package; named here for the benchmarks' workers
from ..memory.meter import AnonSampler, peak_rss_mb, reset_peak_rss, rss_mb, status_kb  # noqa: F401

RESULT_TAG = "USAF_BENCH_RESULT "


def machine_info() -> dict:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gb = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    mem_gb = round(int(line.split()[1]) / 2**20, 1)
                    break
    except OSError:
        pass
    info = {"cpu": model, "cores": os.cpu_count(), "mem_gb": mem_gb, "os": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}
    for mod in ("transformers", "peft"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    try:
        info["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def baseline_env(method: str) -> dict:
    """The environment of a worker: methods other than usaf's run without usaf's process tuning
    (``usaf.runtime``), as they would in their own programs."""
    env = dict(os.environ)
    if not method.startswith("usaf") and method != "inference":
        env["USAF_NO_RUNTIME_TUNING"] = "1"
    return env


def spawn(module: str, args: list[str], env: dict | None = None) -> subprocess.Popen:
    """Start ``python -m <module> _worker <args...>`` with its output piped."""
    cmd = [sys.executable, "-m", module, "_worker", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def collect(method: str, proc: subprocess.Popen, timeout: int) -> dict:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"method": method, "error": f"timed out after {timeout}s"}
    for line in out.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    tail = (err or out).strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
    return {"method": method, "error": tail[0][:300]}


def merge_runs(runs: list[dict]) -> dict:
    """One record from repeated runs of a method: medians of the speeds, the largest peaks."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    rec = dict(ok[len(ok) // 2])
    if len(runs) > 1:
        for k in ("tokens_per_s", "cpu_tokens_per_s", "step_s_median", "step_cpu_s_median"):
            rec[k] = round(statistics.median(r[k] for r in ok), 4)
        for k in ("peak_rss_mb", "steps_peak_rss_mb", "peak_anon_mb", "steps_peak_anon_mb"):
            vals = [r[k] for r in ok if r.get(k) is not None]
            rec[k] = max(vals) if vals else None
        rec["repeats"] = len(ok)
        rec["runs_tokens_per_s"] = [r["tokens_per_s"] for r in ok]
        rec["runs_cpu_tokens_per_s"] = [r["cpu_tokens_per_s"] for r in ok]
    return rec


def markdown_table(head: tuple, rows: list[tuple]) -> str:
    """A Markdown table with padded columns (the benchmarks' printed tables)."""
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), sep] + [line(r) for r in rows])




def print_result(rec: dict) -> None:
    """What a worker prints last: the tagged JSON line its parent reads."""
    print(RESULT_TAG + json.dumps(rec), flush=True)
