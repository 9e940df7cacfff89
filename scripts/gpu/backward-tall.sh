#!/usr/bin/env bash
# On a GPU machine, after ../shared/gpu/bundle or scripts/stage-gpu.sh backward (and
# scripts/bwd-variants.sh for variants): what the
# backward's taller query steps (head dims 64 and 256, LONGFLASH_BWD_TALL=1) need before they can
# be the default, in one call of about 9 minutes:
#   1. the whole GPU suite with them switched on (rope_long skipped: its own call);
#   2. the backward bench at head dims 64 and 256 (1k, 4k, 16k tokens, burst protocol) with them
#      off and on, and every .gpu/variants/<name>/ build on, then SDPA's flash and cuDNN backward
#      in the same run;
#   3. compute-sanitizer memcheck and racecheck on the backward's small-shape tests, switched on;
#   4. Nsight Compute on the head dim 64 main kernel and FlashAttention-2's if time is left.
# Logs and RESULT lines under $OUT (or .gpu/logs); summary lines on the screen.
set -u
cd "$(dirname "$0")/../.."
source scripts/gpu/logs.sh
source scripts/gpu/unpack.sh
export LONGFLASH_REQUIRE_GPU=1 RUST_BACKTRACE=1
bin=.gpu/tests/test-gpu
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv,noheader >"$out/gpu.txt"
t() { echo "$(date -u +%T) ${SECONDS}s $*" | tee -a "$out/times.txt"; }
t start
LONGFLASH_BWD_TALL=1 timeout 230 "$bin" --test-threads 6 --skip rope_long >"$out/suite.log" 2>&1
echo "exit $?" >>"$out/suite.log"; grep -E '^test result|^exit|FAILED|panicked' "$out/suite.log" | head -20
t suite
bench() { # name head-dims [env...]
  local name=$1 dims=$2; shift 2
  env "$@" LONGFLASH_BENCH_HEAD_DIMS="$dims" LONGFLASH_BENCH_SEQLENS=1024,4096,16384 \
    LONGFLASH_BENCH_BURST=5,30,300 timeout 90 .gpu/bench/backward --bench >"$out/bench-$name.log" 2>&1
  grep '^RESULT' "$out/bench-$name.log" | sed "s/^RESULT //; s/\"impl\": \"longflash/\"impl\": \"$name/" \
    >"$out/bench-$name.jsonl"
}
bench short 64,256 LONGFLASH_BWD_TALL=0
bench tall 64,256 LONGFLASH_BWD_TALL=1
for dir in .gpu/variants/*/; do
  [ -d "$dir" ] && bench "$(basename "$dir")" 64 LONGFLASH_BWD_TALL=1 LONGFLASH_KERNEL_DIR="$dir"
done
t bench
PYTHONUNBUFFERED=1 timeout 120 python3 benches/peer_sdpa_backward.py --head-dims 64,256 \
  --seqlens 1024,4096,16384 --warmup 5 --reps 30 --gap-ms 300 --out "$out/peer.jsonl" >"$out/peer.log" 2>&1
t peer
for tool in memcheck racecheck; do
  for tst in backward::backward_single_token_and_tile_edges \
             backward::backward_rows_and_keys_that_see_nothing_get_zero_gradients; do
    [ $SECONDS -lt 500 ] || continue
    LONGFLASH_BWD_TALL=1 timeout 60 compute-sanitizer --tool $tool --error-exitcode 9 "$bin" "$tst" \
      --exact --test-threads 1 >>"$out/bwd-$tool.log" 2>&1
    echo "exit $? $tst" >>"$out/bwd-$tool.log"
  done
  grep -hE 'ERROR SUMMARY|RACECHECK SUMMARY|^exit' "$out/bwd-$tool.log" 2>/dev/null
done
t sanitizers
[ $SECONDS -lt 440 ] && LONGFLASH_BWD_TALL=1 timeout 120 bash scripts/gpu/ncu-bwd.sh 64 4096 no both
t end
