#!/usr/bin/env bash
# One call on a lent GPU machine (the `device` tool): build for the local GPU, run the CUDA tests,
# run the benchmarks, all inside a time budget, since a lease is short (15 minutes of device time
# per task, starts included, and at most 10 minutes per command). Everything worth keeping goes to
# $OUT as soon as it exists, so a run cut short still brings back what it did:
#   nvidia-smi.txt, build.log, info.txt, pytest.log, pytest.xml, bench-<suite>.log,
#   <device>.json, <device>-<suite>.png, session.txt (each phase's seconds and exit status)
# Back on the dev machine: copy <device>.json into benchmarks/results/ and run
#   python benchmarks/run.py --render benchmarks/results/<device>.json   (README table + plot)
#
# Usage (from the device tool: run(command="bash benchmarks/gpu_session.sh", timeout_s=600)):
#   bash benchmarks/gpu_session.sh [--all-tests] [--skip-tests] [--skip-build] [--quick]
# (--skip-build: a rerun on a machine still warm from a call that built lmkern)
# LMKERN_BENCH_DEVICE=cpu tries the flow on a machine without a GPU.
# LMKERN_GPU_BUDGET_S (default 540) is the whole script's budget; keep it under the call's timeout_s.
# After the build, the tests get LMKERN_GPU_TEST_SHARE percent (default 35) of what is left, then the
# benchmark suites share the rest, each measuring the sizes its targets name first and stopping
# (results marked partial) when its share is spent.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/lmkern-out}
mkdir -p "$OUT"
BUDGET_S=${LMKERN_GPU_BUDGET_S:-540}
TEST_SHARE=${LMKERN_GPU_TEST_SHARE:-35}
TESTS=cuda
BUILD=1
QUICK=""
for a in "$@"; do
  case "$a" in
    --all-tests) TESTS=all ;;
    --skip-tests) TESTS=none ;;
    --skip-build) BUILD=0 ;;
    --quick) QUICK="--quick" ;;
    *) echo "unknown argument $a"; exit 2 ;;
  esac
done
PY=${PY:-python3}
T0=$(date +%s)
left() { echo $(( BUDGET_S - ($(date +%s) - T0) )); }
phase() {  # phase NAME RC SECONDS: one line in session.txt
  printf '%-22s rc=%-4s %5s s   (%s s of %s left)\n' "$1" "$2" "$3" "$(left)" "$BUDGET_S" | tee -a "$OUT/session.txt"
}
: > "$OUT/session.txt"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1

if [ $BUILD = 1 ]; then
  echo "== build (local arch)"
  start=$(date +%s)
  MAX_JOBS=${MAX_JOBS:-$(nproc)} $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1
  rc=$?
  phase build $rc $(( $(date +%s) - start ))
  if [ $rc != 0 ]; then tail -60 "$OUT/build.log"; cat "$OUT/session.txt"; exit 1; fi
fi
$PY -m lmkern info > "$OUT/info.txt" 2>&1
head -30 "$OUT/info.txt"

status=0
if [ "$TESTS" != none ]; then
  # CUDA tests only by default: the CPU tiers run in CI on every commit, and the lease is short.
  # The CPU emulations of the CUDA kernels (*_cuda_algo) are CPU tests despite their names; the
  # Triton launchers' per-tile tests (every autotune candidate) and the tuner run on the GPU too.
  select=(-k "(cuda or environment or every_gpu or tma or autotune) and not algo")
  [ "$TESTS" = all ] && select=()
  extra=()
  $PY -c "import xdist" 2>/dev/null && extra+=(-n 8)  # Triton compiles its kernels on the CPU: in parallel
  $PY -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout=180)
  t=$(( $(left) * TEST_SHARE / 100 )); [ $t -lt 60 ] && t=60
  echo "== tests ($TESTS, up to $t s)"
  start=$(date +%s)
  # SIGINT first: pytest then stops, prints its summary and writes the junit file.
  LMKERN_TEST_SEED=${LMKERN_TEST_SEED:-$RANDOM} LMKERN_REQUIRE_BACKENDS=cuda,triton,cpu,reference \
    timeout --signal=INT --kill-after=20 $t $PY -m pytest tests -q -rs "${select[@]}" "${extra[@]}" \
    --junitxml="$OUT/pytest.xml" > "$OUT/pytest.log" 2>&1
  rc=$?
  phase "tests ($TESTS)" $rc $(( $(date +%s) - start ))
  [ $rc != 0 ] && status=1
  tail -25 "$OUT/pytest.log"
fi

# Benchmarks: each suite gets a share of what is left (attention, whose targets are the hardest,
# the most); a suite stops starting measurements at its budget, a hung one is killed 60 s later.
suites=(attention norm sampling)
shares=(50 60 100)
for i in 0 1 2; do
  suite=${suites[$i]}
  t=$(( ($(left) - 15) * ${shares[$i]} / 100 ))
  if [ $t -lt 20 ]; then phase "bench $suite" skip 0; continue; fi
  echo "== benchmarks: $suite (budget $t s)"
  start=$(date +%s)
  timeout --kill-after=10 $(( t + 60 )) $PY benchmarks/run.py --device "${LMKERN_BENCH_DEVICE:-cuda}" --suite "$suite" --out "$OUT" \
    --no-readme --time-budget-s "$t" $QUICK > "$OUT/bench-$suite.log" 2>&1
  rc=$?
  phase "bench $suite" $rc $(( $(date +%s) - start ))
  [ $rc != 0 ] && status=1
  grep -A60 "^targets:" "$OUT/bench-$suite.log" | head -40
done
echo "== session"
cat "$OUT/session.txt"
exit $status
