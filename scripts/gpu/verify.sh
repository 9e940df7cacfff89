#!/usr/bin/env bash
# On a GPU machine, after ../shared/gpu/bundle: the GPU test binary at scale, in parallel
# processes, with logs under $OUT (or .gpu/logs).
#
#   bash scripts/gpu/verify.sh [cases] [slices] [seeds] [sanitize]
#
#   cases     property-test cases per property test (default 3000), split over `slices`
#             processes per test with different PROPTEST_RNG_SEEDs (default 4)
#   seeds     extra full runs of the binary at the default case counts, one per seed
#             (default "11 22 33")
#   sanitize  compute-sanitizer tools to run on every test at a few cases, e.g.
#             "memcheck racecheck synccheck" (default none; racecheck takes minutes)
#
# Prints one summary line per process; the full output is in $OUT/verify-*.log.
set -u
cd "$(dirname "$0")/../.."
source scripts/gpu/logs.sh
bin=.gpu/tests/test-gpu
cases=${1:-3000}; slices=${2:-4}; seeds=${3:-11 22 33}; sanitize=${4:-}
limit=${VERIFY_TIMEOUT:-540}
export LONGFLASH_REQUIRE_GPU=1 RUST_BACKTRACE=1
props=(dense::kernel_matches_reference sparse::sparse_kernel_matches_reference
       rope::rope_kernel_matches_reference corner::few_rows_few_keys_dense_and_sparse
       corner::few_rows_few_keys_rope)
skip=(); for p in "${props[@]}"; do skip+=(--skip "$p"); done
pids=()
run() { # $1 = log name, rest = env and command
  local log="$out/verify-$1.log"; shift
  ( timeout "$limit" env "$@" >"$log" 2>&1; echo "exit $?" >>"$log" ) &
  pids+=($!)
}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >"$out/verify-gpu.txt"
run plain "$bin" "${skip[@]}"
per=$(( (cases + slices - 1) / slices ))
for p in "${props[@]}"; do
  for s in $(seq 1 "$slices"); do
    run "${p//::/-}-$s" PROPTEST_CASES=$per PROPTEST_RNG_SEED=$((1000 * s + ${#p})) "$bin" --exact "$p"
  done
done
for seed in $seeds; do run "full-seed$seed" PROPTEST_RNG_SEED=$seed "$bin"; done
run report "$bin" --exact corner::single_row_sparse_case_of_the_report --nocapture
for tool in $sanitize; do
  case $tool in
    racecheck) run "$tool" PROPTEST_CASES=4 compute-sanitizer --tool "$tool" --report-api-errors no --error-exitcode 9 "$bin" --test-threads=1 ;;
    *) run "$tool" PROPTEST_CASES=8 compute-sanitizer --tool "$tool" --report-api-errors no --error-exitcode 9 "$bin" --test-threads=4 ;;
  esac
done
for p in "${pids[@]}"; do wait "$p"; done
for f in "$out"/verify-*.log; do
  printf '%-60s %s | %s\n' "$(basename "$f")" "$(grep -E '^test result' "$f" | tail -1)" \
    "$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|^exit' "$f" | tr '\n' ' ')"
done
