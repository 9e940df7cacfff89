#!/usr/bin/env bash
# On a GPU machine, after ../shared/gpu/bundle and scripts/variants.sh: every variant build in
# .gpu/variants/<name>/ through the Hopper tests (its kernels loaded with LONGFLASH_KERNEL_DIR,
# each test under a time limit: scripts/gpu/each.sh), then the forward bench of the default
# build and of every variant whose tests passed, in one run. A variant whose name contains
# "persistent" runs as a persistent grid (3 CTAs in the tests, VARIANT_CTAS in the bench,
# default 132); variants named rope* also through the RoPE bench. Logs under $OUT/variants/.
#
#   bash scripts/gpu/variants.sh [head dims for the bench, default "128"]
set -u
cd "$(dirname "$0")/../.."
source scripts/gpu/logs.sh
mkdir -p "$out/variants"
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
# Variants named rope*: the RoPE bench too (4k, 16k, 64k), against the default build.
for spec in "sm90:" $(ls -d .gpu/variants/rope*/ 2>/dev/null); do
  name=$(basename "${spec%:}"); [ "$spec" = "sm90:" ] && name=sm90
  dir=${spec%:}; [ "$name" = sm90 ] && dir=
  env ${dir:+LONGFLASH_KERNEL_DIR=$dir} LONGFLASH_BENCH_MAINLOOP=sm90 \
    LONGFLASH_BENCH_SEQLENS=4096,16384,65536 timeout 200 .gpu/bench/rope --bench \
    >"$out/variants/rope-$name.log" 2>&1
  grep '^RESULT' "$out/variants/rope-$name.log" | sed 's/^RESULT //' >"$out/variants/rope-$name.jsonl"
  echo "rope $name: $(wc -l <"$out/variants/rope-$name.jsonl") rows"
done
