#!/usr/bin/env bash
# One call on a lent GPU machine (the `device` tool): build for the local GPU, run the whole test
# suite with CUDA, run the benchmarks. Everything worth keeping goes to $OUT:
#   build.log, info.txt, pytest.log, pytest.xml, bench.log, <device>.json, <device>-<suite>.png
# Back on the dev machine: copy <device>.json into benchmarks/results/ and run
#   python benchmarks/run.py --render benchmarks/results/<device>.json   (README table + plot)
# Usage: bash benchmarks/gpu_session.sh [--skip-tests] [--quick]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/lmkern-out}
mkdir -p "$OUT"
SKIP_TESTS=0
QUICK=""
for a in "$@"; do
  case "$a" in
    --skip-tests) SKIP_TESTS=1 ;;
    --quick) QUICK="--quick" ;;
  esac
done
PY=${PY:-python3}
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1

echo "== build (local arch)"
start=$(date +%s)
if ! $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -60 "$OUT/build.log"; exit 1
fi
echo "built in $(( $(date +%s) - start )) s"
$PY -m lmkern info | tee "$OUT/info.txt"

rc=0
if [ "$SKIP_TESTS" = 0 ]; then
  echo "== tests (CUDA and CPU devices)"
  LMKERN_REQUIRE_BACKENDS=cuda,triton,cpu,reference $PY -m pytest tests -q -rs --maxfail=20 \
    --junitxml="$OUT/pytest.xml" > "$OUT/pytest.log" 2>&1
  rc=$?
  tail -25 "$OUT/pytest.log"
fi

echo "== benchmarks"
$PY benchmarks/run.py --device cuda --out "$OUT" --no-readme $QUICK > "$OUT/bench.log" 2>&1 || rc=$?
grep -A200 "^targets:" "$OUT/bench.log" | head -80
exit $rc
