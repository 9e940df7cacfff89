#!/usr/bin/env bash
# Builds the Hopper kernels of other build configurations on this machine, for timing them
# against the default ones on a GPU in one call (they load with LONGFLASH_KERNEL_DIR):
#
#   scripts/variants.sh name="NVCC_FLAGS" [name="NVCC_FLAGS" ...]
#   e.g. scripts/variants.sh plain="-DLF_SM90_OVERLAP=0 -DLF_SM90_SPLIT_RELEASE=0" overlap="-DLF_SM90_OVERLAP=2"
#
# Each variant builds in target/variants/<name> and its sm90 fatbins land in .gpu/variants/<name>/
# (run ../shared/gpu/bundle first: it recreates .gpu/). Then, on the GPU machine,
#   bash scripts/gpu/bench-ab.sh sm90:LONGFLASH_BENCH_MAINLOOP=sm90 \
#     pingpong:LONGFLASH_BENCH_MAINLOOP=sm90:LONGFLASH_KERNEL_DIR=.gpu/variants/pingpong
#
# Build options of the Hopper mainloop (cuda/sm90/), overriding the schedule tile_plan.h picks
# per head dim (ping-pong with split release up to LF_FWD_SM90_PINGPONG_MAX_D, plain above):
#   -DLF_SM90_OVERLAP=0|1|2      one tile at a time; S of tile n overlapped with P V of tile
#                                n - 1 with the consumer warpgroups taking turns (ping-pong); or
#                                overlapped without turns
#   -DLF_SM90_SPLIT_RELEASE=0|1  a stage's K slot frees after S, its V slot after P V (1), or
#                                both after P V (0)
#   -DLF_SM90_PERSISTENT=1       kernels that can run as a persistent grid; the host launches
#                                one only when asked (LONGFLASH_BENCH_SM90_CTAS=132 for the
#                                benches, LONGFLASH_TEST_SM90_CTAS=3 for the GPU tests)
#   -DLF_ROPE_Q_STEPS=1          RoPE's Q preparation by per-row rotation steps
#   -DLF_DECODE_ROPE_STEPS=1     RoPE decoding turns keys by per-key rotation steps (copy the
#                                decode_rope_* fatbins too: the script copies only *sm90*)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f scripts/env.sh ] && source scripts/env.sh >/dev/null
for spec in "$@"; do
  name=${spec%%=*}; flags=${spec#*=}
  dir=target/variants/$name
  NVCC_FLAGS="$flags" CARGO_TARGET_DIR=$dir cargo build --release --quiet
  out=$(ls -td "$dir"/release/build/longflash-*/out | head -1)
  mkdir -p ".gpu/variants/$name"
  cp "$out"/*sm90*.fatbin ".gpu/variants/$name/"
  case $flags in *LF_DECODE_ROPE_STEPS*) cp "$out"/decode_rope_*.fatbin ".gpu/variants/$name/" ;; esac
  echo "$name ($flags): $(ls ".gpu/variants/$name" | wc -l) fatbins in .gpu/variants/$name"
done
