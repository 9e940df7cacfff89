#!/usr/bin/env bash
# On a GPU machine, after ../shared/gpu/bundle: an Nsight Compute report of one forward launch per
# shape, for reading stall reasons and pipe use rather than guessing.
#
#   bash scripts/gpu/ncu.sh <kernel regex> <head dim> <seqlen> [name] [extra bench env VAR=VALUE ...]
#
# Writes $OUT/ncu-<name>.ncu-rep (the first non-causal launch after a few warm-ups) and a text
# summary $OUT/ncu-<name>.txt (speed of light, occupancy, warp states).
set -u
cd "$(dirname "$0")/../.."
source scripts/gpu/logs.sh
re=$1; d=$2; s=$3; name=${4:-$re-d$d-s$s}; shift 4 2>/dev/null || shift $#
env "$@" LONGFLASH_BENCH_HEAD_DIMS="$d" LONGFLASH_BENCH_SEQLENS="$s" timeout 240 \
  ncu --set full --kernel-name "regex:$re" --launch-skip 3 --launch-count 1 -f -o "$out/ncu-$name" \
  .gpu/bench/forward --bench >"$out/ncu-$name.log" 2>&1
ncu --import "$out/ncu-$name.ncu-rep" --page details \
  --section SpeedOfLight --section Occupancy --section WarpStateStats --section ComputeWorkloadAnalysis \
  --section LaunchStats >"$out/ncu-$name.txt" 2>&1
ncu --import "$out/ncu-$name.ncu-rep" --page raw --csv >"$out/ncu-$name-raw.csv" 2>&1
ncu --import "$out/ncu-$name.ncu-rep" --page source --print-source sass --csv >"$out/ncu-$name-sass.csv" 2>&1
