#!/usr/bin/env bash
# On a GPU machine, after ../shared/gpu/bundle: Nsight Compute reports of the backward's main
# kernel (dK, dV and the atomic dQ) and of FlashAttention-2's (PyTorch SDPA's flash backend) on
# the same shape, so the two can be read side by side (pipes, shared-memory wavefronts and bank
# conflicts, instructions, stall reasons) rather than guessed at.
#
#   bash scripts/gpu/ncu-bwd.sh <head dim> <seqlen> [causal: no|yes] [ours|peer|both]
#
# Writes $OUT/ncu-bwd-{ours,fa2}-d<D>-s<S>[-causal]{.txt,-raw.csv,-sass.csv} (bf16, 16k tokens,
# hidden 2048, the bench's shapes); the reports themselves stay in /tmp/ncu-bwd (large).
set -u
cd "$(dirname "$0")/../.."
source scripts/gpu/logs.sh
d=$1; s=$2; causal=${3:-no}; which=${4:-both}
tag=d$d-s$s; [ "$causal" = yes ] && tag=$tag-causal
sections=(--section SpeedOfLight --section Occupancy --section WarpStateStats
  --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables
  --section InstructionStats --section LaunchStats --section SchedulerStats)
rep=/tmp/ncu-bwd; mkdir -p "$rep"
report() { # $1 = name
  ncu --import "$rep/$1.ncu-rep" --page details "${sections[@]}" >"$out/$1.txt" 2>&1
  ncu --import "$rep/$1.ncu-rep" --page raw --csv >"$out/$1-raw.csv" 2>&1
  ncu --import "$rep/$1.ncu-rep" --page source --print-source sass --csv >"$out/$1-sass.csv" 2>&1
}
if [ "$which" != peer ]; then
  LONGFLASH_BENCH_CAUSAL=$causal LONGFLASH_BENCH_HEAD_DIMS=$d LONGFLASH_BENCH_SEQLENS=$s LONGFLASH_BENCH_BURST=2,3,0 \
    timeout 300 ncu --set full --kernel-name "regex:^lf_bwd_bf16_d${d}(_tall)?\$" --launch-skip 1 \
    --launch-count 1 -f -o "$rep/ncu-bwd-ours-$tag" .gpu/bench/backward --bench \
    >"$out/ncu-bwd-ours-$tag.log" 2>&1
  report "ncu-bwd-ours-$tag"
fi
if [ "$which" != ours ]; then
  timeout 300 ncu --set full --kernel-name "regex:flash_bwd_dq_dk_dv" --launch-skip 1 \
    --launch-count 1 -f -o "$rep/ncu-bwd-fa2-$tag" python3 benches/peer_sdpa_backward.py \
    --head-dims "$d" --seqlens "$s" --causal "$causal" --backends flash --reps 2 --warmup 1 \
    --out /tmp/ncu-peer.jsonl >"$out/ncu-bwd-fa2-$tag.log" 2>&1
  report "ncu-bwd-fa2-$tag"
fi
