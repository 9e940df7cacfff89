#!/usr/bin/env bash
# On a GPU machine, after ../shared/gpu/bundle: every GPU test matching a filter in its own
# process with its own time limit, so one hung kernel costs one test, not the whole call.
#
#   bash scripts/gpu/each.sh [filter, default hopper::] [seconds per test, default 60]
#
# One line per test (ok / FAIL exit N / TIMEOUT) to the screen and $OUT/each.log; each test's
# output in $OUT/each/<test>.log.
set -u
cd "$(dirname "$0")/../.."
source scripts/gpu/logs.sh
mkdir -p "$out/each"
filter=${1:-hopper::}; limit=${2:-60}
bin=.gpu/tests/test-gpu
export LONGFLASH_REQUIRE_GPU=1 RUST_BACKTRACE=1
"$bin" --list 2>/dev/null | sed -n 's/: test$//p' | grep -F -- "$filter" | while read -r t; do
  log="$out/each/${t//::/.}.log"
  timeout "$limit" "$bin" "$t" --exact --test-threads=1 >"$log" 2>&1; r=$?
  case $r in 0) s=ok ;; 124|137) s=TIMEOUT ;; *) s="FAIL exit $r" ;; esac
  echo "$s $t" | tee -a "$out/each.log"
done
