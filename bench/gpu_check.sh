#!/usr/bin/env bash
# The GPU checks of usaf in one script, sized to take at most about 8 minutes on one CUDA GPU:
#
#   1. the CUDA-marked tests (pytest -m cuda: every test that needs a GPU carries @pytest.mark.cuda);
#   2. bench/real_shape.py (Qwen3-30B-A3B's real dimensions, random weights; LAYERS layers, the top TRAIN_TOP
#      trainable, seq SEQ, batch 1) on the GPU with the caching allocator capped at 4 GB (the experts do not
#      fit: host tier, pinned, copied ahead on a side stream), then 8 GB and 12 GB (device tier)
#      (torch.cuda.set_per_process_memory_fraction), printing the device peaks (max_memory_allocated and
#      max_memory_reserved) of the selection pass and of the training steps next to `usaf plan`'s prediction
#      for that budget, and tokens/s;
#   3. the same run on the CPU (disk tier, CPU_THREADS threads): peak RSS against the plan's host prediction,
#      and tokens/s.
#
# Usage (from anywhere; it runs in the repository root):
#   bash bench/gpu_check.sh                  # everything; results in $GPU_CHECK_DIR/results (JSON, logs)
#   bash bench/gpu_check.sh --summary DIR    # print the table again from the JSON files of an earlier run
# Settings (environment): PYTHON (default python), GPU_CHECK_DIR (/tmp/usaf-gpu-check: the generated
# checkpoint and 4-bit cache, about 4.4 GB at 12 layers), LAYERS (12), TRAIN_TOP (8), SEQ (512), STEPS (3),
# CPU_RUN (1; 0 skips step 3), CPU_THREADS (all cores).
#
# Exit code: 0 when every step ran (a plan miss is reported, not failed); 1 when a step failed; 2 when
# there is no CUDA device. Run on an H200: see docs/memory.md ("GPU check").
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
PY=${PYTHON:-python}
DIR=${GPU_CHECK_DIR:-/tmp/usaf-gpu-check}
OUT=$DIR/results
LAYERS=${LAYERS:-12}
TRAIN_TOP=${TRAIN_TOP:-8}
SEQ=${SEQ:-512}
STEPS=${STEPS:-3}
CPU_RUN=${CPU_RUN:-1}
CPU_THREADS=${CPU_THREADS:-$(nproc)}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

summary() {
  "$PY" - "$1" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])

def load(name):
    f = out / f"{name}.json"
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError):
        return None

def pct(measured, plan):
    return f"{100 * (measured - plan) / plan:+.1f}%" if plan else "-"

print("\n== real-shape run (Qwen3-30B-A3B dimensions, random weights) ==")
rows = []
for cap in ("4GB", "8GB", "12GB"):
    r = load(f"cuda_{cap}")
    if r is None or "cuda" not in r:
        print(f"cuda, cap {cap}: FAILED or not run (see {out}/cuda_{cap}.log)")
        continue
    c = r["cuda"]
    rt = c["plan_cuda_runtime_mb"]
    print(f"cuda, cap {cap} ({c['name']}; experts on the {c['tier']} tier; plan fits: {c['plan_fits']}; "
          f"plan budget {c['plan_budget_mb']} MB; the plan's peaks include {rt} MB of CUDA runtime, which the allocator's "
          f"counters do not see: subtracted below)")
    for phase in ("select", "step"):
        alloc, res = c[f"{phase}_peak_allocated_mb"], c[f"{phase}_peak_reserved_mb"]
        plan = c[f"plan_{phase}_peak_mb"] - rt
        print(f"  {phase:6s} peak: allocated {alloc:>6} MB, reserved {res:>6} MB | plan {plan:>6} MB (without runtime)"
              f" | allocated vs plan {pct(alloc, plan)}, reserved vs plan {pct(res, plan)}")
    print(f"  tokens/s {r['tokens_per_s']} (step {r['step_s_median']} s, median of the steps); "
          f"host peak RSS {r['peak_rss_mb']} MB")
r = load("cpu")
if r is None:
    print(f"cpu: FAILED or not run (see {out}/cpu.log)")
else:
    print(f"cpu ({r.get('threads')} threads, disk tier):")
    print(f"  select peak RSS {r['peak_rss_through_select_mb']:>6} MB | plan {r.get('plan_select_peak_host_mb')} MB"
          f" | {pct(r['peak_rss_through_select_mb'], r.get('plan_select_peak_host_mb'))}")
    sp = r.get("steps_peak_rss_mb")
    if sp is not None:
        print(f"  step   peak RSS {sp:>6} MB | plan {r.get('plan_train_peak_host_mb')} MB"
              f" | {pct(sp, r.get('plan_train_peak_host_mb'))}")
    print(f"  tokens/s {r['tokens_per_s']} (step {r['step_s_median']} s)")
EOF
}

if [ "${1:-}" = "--summary" ]; then
  summary "${2:?usage: gpu_check.sh --summary DIR}"
  exit $?
fi

# 0. A CUDA device, or stop here.
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check.sh: FAILED: no CUDA device: torch.cuda.is_available() is False" \
       "(torch $("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo 'not importable')," \
       "CUDA_VISIBLE_DEVICES='${CUDA_VISIBLE_DEVICES:-}'). This script only runs on a machine with a CUDA GPU." >&2
  exit 2
fi
"$PY" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"device: {p.name}, {p.total_memory / 2**30:.1f} GiB; torch {torch.__version__}, CUDA {torch.version.cuda}")'
mkdir -p "$OUT"
failed=()
start=$SECONDS

# step NAME TIMEOUT_S CMD...: run with a time limit, output to $OUT/NAME.log; records a failure
step() {
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  echo "-- $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  if [ $rc -ne 0 ]; then
    failed+=("$name (exit $rc$([ $rc -eq 124 ] && echo ', timed out'))")
    echo "   FAILED (exit $rc) after $((SECONDS - t0)) s; last lines of $OUT/$name.log:"
    tail -n 5 "$OUT/$name.log" | sed 's/^/   | /'
  else
    echo "   ok, $((SECONDS - t0)) s"
  fi
  return $rc
}

# 1. The CUDA-marked tests; on a CUDA machine none may be skipped.
mapfile -t cuda_files < <(grep -l "pytest.mark.cuda" tests/*.py)
if [ ${#cuda_files[@]} -eq 0 ]; then
  failed+=("cuda tests (no test file carries @pytest.mark.cuda)")
else
  step cuda_tests 180 "$PY" -m pytest -q -m cuda -rs --junitxml="$OUT/cuda_tests.xml" "${cuda_files[@]}"
  tail -n 1 "$OUT/cuda_tests.log"
  if ! "$PY" - "$OUT/cuda_tests.xml" <<'EOF'
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suite = root if root.tag == "testsuite" else root.find("testsuite")
tests, skipped = int(suite.get("tests", 0)), int(suite.get("skipped", 0))
print(f"   {tests} CUDA tests, {skipped} skipped")
sys.exit(1 if tests == 0 or skipped else 0)
EOF
  then
    failed+=("cuda tests (none ran, or some were skipped on a CUDA machine)")
  fi
fi

# 2. The real-shape run on the GPU, capped at 8 GB and at 12 GB (the first run also generates the data).
common=(bench/real_shape.py --layers "$LAYERS" --train-top "$TRAIN_TOP" --seq-len "$SEQ" --steps "$STEPS"
        --sequences 2 --dir "$DIR")
for cap in 4GB 8GB 12GB; do
  if step "cuda_$cap" 200 "$PY" "${common[@]}" --device cuda --device-cap "$cap"; then
    tail -n 1 "$OUT/cuda_$cap.log" >"$OUT/cuda_$cap.json"
  fi
done

# 3. The same run on the CPU.
if [ "$CPU_RUN" != "0" ]; then
  if step cpu 240 "$PY" "${common[@]}" --device cpu --threads "$CPU_THREADS"; then
    tail -n 1 "$OUT/cpu.log" >"$OUT/cpu.json"
  fi
fi

summary "$OUT"
echo
echo "wall time $((SECONDS - start)) s (target: at most 480 s); results in $OUT"
if [ ${#failed[@]} -gt 0 ]; then
  printf 'FAILED: %s\n' "${failed[@]}"
  exit 1
fi
echo "all steps ran"
