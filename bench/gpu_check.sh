#!/usr/bin/env bash
# One command on a GPU machine: build, GPU tests, the rest of the tests, all benchmarks (~9 minutes).
#
#   bash bench/gpu_check.sh            # from the repository root (or anywhere: it cd's there)
#   OUT=/some/dir bash bench/gpu_check.sh   # also copies bench/results/* and the stage logs into $OUT
#
# Stages, each under `timeout` so that the whole script stays inside TOTAL_S seconds (default 540):
#   1. build   python3 -m pip install --no-build-isolation --no-deps -e .   (no registry needed)
#   selftest   python3 -m simu_fast selftest --no-record --json bench/results/selftest-<gpu>.json   (every
#              kernel against its reference on this GPU, < 3 minutes; a failure is reported, the script goes on)
#   2. gpu     python3 -m pytest -q -m gpu tests
#   3. rest    python3 -m pytest -q -m "not gpu" tests   (the rest of the suite, on this GPU machine;
#              only while enough time is left for the benchmarks)
#   4. bench   python3 -m bench --time-limit <what is left>   (GPU sizes; sizes that would not fit are
#              skipped, results are written after every size)
# Environment: PYTHON (default python3), TOTAL_S (default 540), SKIP_BUILD=1 (use the installed build),
# BENCH_ARGS (extra arguments for python -m bench, e.g. --quick), SELFTEST_ARGS (for the selftest, e.g. --quick).
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
TOTAL_S=${TOTAL_S:-540}
BENCH_RESERVE_S=${BENCH_RESERVE_S:-150}   # stages 2-3 leave at least this much for the benchmarks
START=$SECONDS
STATUS=0
LOGDIR=$(mktemp -d)

left() { echo $((TOTAL_S - (SECONDS - START))); }
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }

copy_out() {
  if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    cp -f bench/results/* "$OUT"/ 2>/dev/null || true
    cp -f "$LOGDIR"/*.log "$OUT"/ 2>/dev/null || true
  fi
}
trap copy_out EXIT

# stage NAME SECONDS COMMAND...: run under timeout, log to $LOGDIR/NAME.log, print the time it took.
stage() {
  local name=$1 limit=$2
  shift 2
  if [ "$limit" -le 5 ]; then
    echo "=== $name: skipped (no time left) ==="
    STATUS=1
    return 1
  fi
  echo "=== $name (timeout ${limit}s): $* ==="
  local t0=$SECONDS rc
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$LOGDIR/$name.log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "=== $name: TIMED OUT after $((SECONDS - t0))s ==="
  else
    echo "=== $name: exit $rc after $((SECONDS - t0))s ==="
  fi
  [ "$rc" -ne 0 ] && STATUS=1
  return "$rc"
}

echo "=== machine ==="
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not available"
command -v nvcc >/dev/null && nvcc --version | tail -n 2
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())"
"$PY" -c "import triton; print('triton', triton.__version__)" 2>/dev/null || echo "triton: not installed"
echo "nproc $(nproc)"

# 1. build
if [ "${SKIP_BUILD:-0}" != "1" ]; then
  if ! MAX_JOBS=${MAX_JOBS:-$(nproc)} stage build "$(min 300 "$(( $(left) - BENCH_RESERVE_S ))")" \
      "$PY" -m pip install --no-build-isolation --no-deps -e .; then
    echo "build failed: nothing else can run"
    exit 1
  fi
fi
"$PY" -c "import json, simu_fast; print(json.dumps(simu_fast.backends()))" || STATUS=1

# the selftest: every kernel on this GPU against its reference (its JSON lands in bench/results, copied to $OUT).
# A failure sets STATUS and the stages below still run; --no-record: backend="auto" keeps choosing the kernels as
# built, so that the tests and benchmarks below measure them.
GPU_SLUG=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 | tr -cs 'A-Za-z0-9' '-' | sed 's/^-*//; s/-*$//')
mkdir -p bench/results
# shellcheck disable=SC2086
stage selftest "$(min 200 "$(( $(left) - BENCH_RESERVE_S ))")" \
  "$PY" -m simu_fast selftest --no-record --json "bench/results/selftest-${GPU_SLUG:-cpu}.json" ${SELFTEST_ARGS:-}

# 2. the GPU tests
stage gpu "$(min 180 "$(( $(left) - BENCH_RESERVE_S ))")" "$PY" -m pytest -q -m gpu tests

# 3. the rest of the suite on this machine, if it fits
REST_LIMIT=$(min 120 "$(( $(left) - BENCH_RESERVE_S ))")
if [ "$REST_LIMIT" -ge 30 ]; then
  stage rest "$REST_LIMIT" "$PY" -m pytest -q -m "not gpu" tests
else
  echo "=== rest: skipped (only $(left)s left; the benchmarks need ${BENCH_RESERVE_S}s) ==="
fi

# 4. all benchmarks with what is left (a margin for the copy and the exit)
BENCH_LIMIT=$(( $(left) - 10 ))
# shellcheck disable=SC2086
stage bench "$BENCH_LIMIT" "$PY" -m bench --time-limit "$(( BENCH_LIMIT - 20 ))" ${BENCH_ARGS:-}

echo "=== done in $((SECONDS - START))s, status $STATUS ==="
ls -l bench/results/
exit "$STATUS"
