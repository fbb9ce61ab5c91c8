#!/usr/bin/env bash
# GPU figures of issue 15 on a bare GPU machine (torch, numpy, scipy, pandas, pyarrow
# installed; no dagster, no duckdb, no network, nothing to install). From the repo root:
#
#   bash bench/gpu_check.sh                 # the real run: ~6-7 min on an H100/H200
#   bash bench/gpu_check.sh --quick         # smoke test of every section (~1-2 min)
#   OUT=/some/dir bash bench/gpu_check.sh   # where the figures go (default bench_out/)
#
# Extra arguments go to bench/gpu_check.py (--budget S, --sections a,b, --skip a,b,
# --no-compile, --device cpu). Writes $OUT/gpu_figures.json, $OUT/gpu_figures.md and
# $OUT/gpu_check.log; the JSON and markdown are rewritten after every section, so a run
# cut short still leaves every figure measured so far.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-bench_out}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export GPU_CHECK_CMD="bash bench/gpu_check.sh $*"
# One compile cache for this process and the two sharing-test workers it starts.
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/deconflow_inductor_cache}"
unset DECONFLOW_FAULT
PY="${PYTHON:-python3}"
LIMIT="${GPU_CHECK_TIMEOUT:-420}"  # hard stop (s); the script's own budget is --budget (360 s)

{
    echo "gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname), hard limit ${LIMIT}s, OUT=$OUT"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit --format=csv
    "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$LOG"

timeout -k 15 "$LIMIT" "$PY" bench/gpu_check.py --out "$OUT" "$@" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
echo "gpu_check: exit $rc$([ "$rc" = 124 ] && echo " (hit the ${LIMIT}s limit: figures up to the last finished section are kept)")" | tee -a "$LOG"
ls -l "$OUT" | tee -a "$LOG"
exit "$rc"
