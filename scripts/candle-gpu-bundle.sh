#!/usr/bin/env bash
# Builds longflash-candle's test executables with the `cuda` feature on a machine without the
# CUDA libraries, for a GPU machine that has only the driver.
#
# candle-core links libcuda, libcublas, libcublasLt, libcurand, libnvrtc and libcudart at build
# time. This script links against stand-in libraries generated from the entry points cudarc
# declares (same names, sonames and symbol versions as CUDA 13.0's), and puts next to the
# executables stand-ins that return success for cuBLAS, cuBLASLt, cuRAND and NVRTC (candle
# creates their handles with every device; the tests call none of them) plus the real libcudart
# of the nvcc install. The GPU machine's driver provides libcuda.so.1.
#
# Usage: scripts/candle-gpu-bundle.sh [OUT]   (OUT: .gpu-pack/candle, ignored by git)
# Then, on the GPU machine, from the repository root:
#   cd OUT && gunzip -f *.gz && chmod +x lfc_* && LD_LIBRARY_PATH=$PWD LONGFLASH_REQUIRE_GPU=1 ./lfc_gpu
set -euo pipefail
source "$(dirname "$0")/env.sh"
out=${1:-.gpu-pack/candle}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

source "$(dirname "$0")/cuda-stand-ins.sh"
mkdir -p "$out"
out=$(cd "$out" && pwd)
cuda_stand_ins "$work/cuda/lib64" "$out" "$out"

export CUDA_ROOT=$work/cuda CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
cargo test -p longflash-candle --release --no-run --message-format=json-render-diagnostics |
  python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"], m["executable"])' |
  while read -r name exe; do
    gzip -1 -c "$exe" >"$out/lfc_$name.gz"
  done
ls -la "$out"
