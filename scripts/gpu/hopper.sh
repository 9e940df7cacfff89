#!/usr/bin/env bash
# On a Hopper GPU machine, after ../shared/gpu/bundle: the Hopper mainloop's tests (with a hard
# time limit: a barrier that never completes shows as a timeout, not a hung call), sanitizers on
# them, and the forward bench on both mainloops with the SDPA peer. Logs and RESULT lines go to
# $OUT (or .gpu/logs); the last lines printed are a summary.
#
#   bash scripts/gpu/hopper.sh [tests|sanitize|bench|all] [test filter, default hopper::]
set -u
cd "$(dirname "$0")/../.."
out=${OUT:-.gpu/logs}; mkdir -p "$out"
what=${1:-all}; filter=${2:-hopper::}
bin=.gpu/tests/test-gpu
export LONGFLASH_REQUIRE_GPU=1 LONGFLASH_REQUIRE_HOPPER=1 RUST_BACKTRACE=1
summary() { grep -hE "^test result|ERROR SUMMARY|RACECHECK SUMMARY|^exit|panicked|FAIL" "$@" | head -40; }
if [ "$what" = tests ] || [ "$what" = all ]; then
  timeout 240 "$bin" "$filter" >"$out/hopper-tests.log" 2>&1; echo "exit $?" >>"$out/hopper-tests.log"
  echo "== tests"; summary "$out/hopper-tests.log"
fi
if [ "$what" = sanitize ] || [ "$what" = all ]; then
  for tool in memcheck racecheck synccheck; do
    PROPTEST_CASES=2 timeout 240 compute-sanitizer --tool $tool --error-exitcode 9 "$bin" "$filter" \
      --test-threads=1 >"$out/hopper-$tool.log" 2>&1; echo "exit $?" >>"$out/hopper-$tool.log"
    echo "== $tool"; summary "$out/hopper-$tool.log"
  done
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  for ml in sm90 sm80; do
    LONGFLASH_BENCH_MAINLOOP=$ml timeout 300 .gpu/bench/forward --bench >"$out/bench-$ml.log" 2>&1
    grep '^RESULT' "$out/bench-$ml.log" | sed 's/^RESULT //' >"$out/bench-$ml.jsonl"
    echo "== bench $ml: $(wc -l <"$out/bench-$ml.jsonl") shapes"
  done
  PYTHONUNBUFFERED=1 timeout 200 python3 benches/peer_sdpa.py --out "$out/bench-sdpa.jsonl" >"$out/bench-sdpa.log" 2>&1
  echo "== sdpa: $(wc -l <"$out/bench-sdpa.jsonl") rows"
fi
