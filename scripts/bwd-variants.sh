#!/usr/bin/env bash
# Builds variants of the backward's tall head dim 64 kernel (bf16, sm_90a) with other build
# options straight through nvcc (seconds, not a cargo build), for timing them against the default
# on a GPU in one call: they load with LONGFLASH_KERNEL_DIR (scripts/gpu/backward-tall.sh).
#
#   scripts/bwd-variants.sh name="NVCC_FLAGS" [name="NVCC_FLAGS" ...]
#   e.g. scripts/bwd-variants.sh w2="-DLF_BWD_TALL_WM1=2" w8="-DLF_BWD_TALL_WM1=8"
#
# Options (cuda/bwd.cuh): -DLF_BWD_TALL_WM1/2/3=N, the warp rows of the grid of S^T and dP^T, of
# dK and dV, and of dQ (8 warps). Each lands in .gpu/variants/<name>/ (after ../shared/gpu/bundle,
# which recreates .gpu/) with its ptxas report printed (registers, spills).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh >/dev/null
for spec in "$@"; do
  name=${spec%%=*}; flags=${spec#*=}
  mkdir -p ".gpu/variants/$name"
  # shellcheck disable=SC2086
  "$NVCC" -fatbin -std=c++17 -O3 --expt-relaxed-constexpr -Xptxas=-v -Icuda/include \
    -gencode=arch=compute_90a,code=sm_90a $flags -o ".gpu/variants/$name/bwd_bf16_d64_tall.fatbin" \
    cuda/kernels/bwd_bf16_d64_tall.cu 2>&1 | grep -E 'registers|spill' | sed "s/^/$name: /"
done
