#!/usr/bin/env bash
# On a GPU machine, after ../shared/gpu/bundle and scripts/variants.sh: every variant build in
# .gpu/variants/<name>/ through the Hopper tests (its kernels loaded with LONGFLASH_KERNEL_DIR,
# each test under a time limit: scripts/gpu/each.sh), then the forward bench of the default
# build and of every variant whose tests passed, in one run. A variant whose name contains
# "persistent" runs as a persistent grid (3 CTAs in the tests, VARIANT_CTAS in the bench,
# default 132). Logs under $OUT/variants/; the last lines printed are a summary.
#
#   bash scripts/gpu/variants.sh [head dims for the bench, default "128"]
set -u
cd "$(dirname "$0")/../.."
out=${OUT:-.gpu/logs}; mkdir -p "$out/variants"
dims=${1:-128}
specs=(sm90:LONGFLASH_BENCH_MAINLOOP=sm90)
for dir in .gpu/variants/*/; do
  name=$(basename "$dir")
  ctas=(); bctas=()
  case $name in *persistent*) ctas=(LONGFLASH_TEST_SM90_CTAS=3); bctas=(":LONGFLASH_BENCH_SM90_CTAS=${VARIANT_CTAS:-132}") ;; esac
  env LONGFLASH_KERNEL_DIR="$dir" "${ctas[@]}" OUT="$out/variants/$name" \
    bash scripts/gpu/each.sh hopper:: 90 >/dev/null
  fails=$(grep -vc '^ok' "$out/variants/$name/each.log")
  echo "tests $name: $(grep -c '^ok' "$out/variants/$name/each.log") ok, $fails not"
  [ "$fails" = 0 ] && specs+=("$name:LONGFLASH_BENCH_MAINLOOP=sm90:LONGFLASH_KERNEL_DIR=$dir${bctas[*]}")
done
LONGFLASH_BENCH_HEAD_DIMS=$dims OUT="$out/variants" bash scripts/gpu/bench-ab.sh "${specs[@]}"
