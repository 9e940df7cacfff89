#!/usr/bin/env bash
# On a Hopper GPU machine, after ../shared/gpu/bundle: the Hopper mainloop's tests (with a hard
# time limit: a barrier that never completes shows as a timeout, not a hung call), sanitizers on
# them, and the forward bench on both mainloops with the SDPA peer. Logs and RESULT lines go to
# $OUT (or .gpu/logs); the last lines printed are a summary.
#
#   bash scripts/gpu/hopper.sh [tests|sanitize|bench|all] [test filter, default hopper::]
#
# HOPPER_VARIANTS="name=dir ..." also benches (and, with tests, tests) the Hopper kernels of
# other builds, loaded from each dir with LONGFLASH_KERNEL_DIR; for example the overlapped,
# ping-pong schedule, built here with
#   NVCC_FLAGS=-DLF_SM90_OVERLAP=1 CARGO_TARGET_DIR=/tmp/ov cargo build --release
#   mkdir -p .gpu/overlap && cp /tmp/ov/release/build/longflash-*/out/fwd_sm90_*.fatbin .gpu/overlap/
set -u
cd "$(dirname "$0")/../.."
source scripts/gpu/logs.sh
what=${1:-all}; filter=${2:-hopper::}
bin=.gpu/tests/test-gpu
export LONGFLASH_REQUIRE_GPU=1 LONGFLASH_REQUIRE_HOPPER=1 RUST_BACKTRACE=1
summary() { grep -hE "^test result|ERROR SUMMARY|RACECHECK SUMMARY|^exit|panicked|FAIL" "$@" | head -40; }
if [ "$what" = tests ] || [ "$what" = all ]; then
  timeout 240 "$bin" "$filter" >"$out/hopper-tests.log" 2>&1; echo "exit $?" >>"$out/hopper-tests.log"
  echo "== tests"; summary "$out/hopper-tests.log"
  for v in ${HOPPER_VARIANTS:-}; do
    LONGFLASH_KERNEL_DIR=${v#*=} timeout 240 "$bin" "$filter" >"$out/hopper-tests-${v%%=*}.log" 2>&1
    echo "exit $?" >>"$out/hopper-tests-${v%%=*}.log"
    echo "== tests ${v%%=*}"; summary "$out/hopper-tests-${v%%=*}.log"
  done
fi
if [ "$what" = sanitize ] || [ "$what" = all ]; then
  for tool in memcheck racecheck synccheck; do
    # --report-api-errors no: hopper_persistent_grid_runs_every_item_or_is_refused provokes a
    # CUDA_ERROR_NOT_FOUND on purpose (a one-item build has no persistent marker), which memcheck
    # would otherwise count as an error.
    PROPTEST_CASES=2 timeout 240 compute-sanitizer --tool $tool --report-api-errors no --error-exitcode 9 "$bin" "$filter" \
      --test-threads=1 >"$out/hopper-$tool.log" 2>&1; echo "exit $?" >>"$out/hopper-$tool.log"
    echo "== $tool"; summary "$out/hopper-$tool.log"
  done
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  variants=(sm90:LONGFLASH_BENCH_MAINLOOP=sm90)
  for v in ${HOPPER_VARIANTS:-}; do
    variants+=("sm90-${v%%=*}:LONGFLASH_BENCH_MAINLOOP=sm90:LONGFLASH_KERNEL_DIR=${v#*=}")
  done
  variants+=(sm80:LONGFLASH_BENCH_MAINLOOP=sm80)
  echo "== bench"; bash scripts/gpu/bench-ab.sh "${variants[@]}"
fi
