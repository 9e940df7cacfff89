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

cudarc=$(cargo metadata --format-version 1 |
  python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"]=="cudarc").rsplit("/",1)[0])')

# stub SOURCE_DIR PREFIX SONAME VERSION_NODE OUTPUT: a shared library exporting every `fn PREFIX*(`
# that cudarc declares under src/SOURCE_DIR/sys, each returning 0 (a *Create* one first stores a
# non-null handle through its first argument).
stub() {
  local src=$1 prefix=$2 soname=$3 node=$4 output=$5
  grep -ohE "fn ${prefix}[A-Za-z0-9_]*\(" "$cudarc/src/$src/sys/"*.rs | sed 's/^fn //; s/($//' | sort -u |
    while read -r f; do
      case $f in
        *Create*) echo "int $f(void **h) { if (h) *h = (void *)0x10; return 0; }" ;;
        *) echo "int $f(void) { return 0; }" ;;
      esac
    done >"$work/$soname.c"
  local flags=(-shared -fPIC -o "$output" "$work/$soname.c" "-Wl,-soname,$soname")
  if [ -n "$node" ]; then
    echo "$node { global: *; };" >"$work/$soname.map"
    flags+=("-Wl,--version-script=$work/$soname.map")
  fi
  gcc "${flags[@]}"
}

mkdir -p "$work/cuda/lib64" "$out"
out=$(cd "$out" && pwd)
lib=$work/cuda/lib64
stub driver cu libcuda.so.1 "" "$lib/libcuda.so"
for spec in "cublas cublas libcublas.so.13 libcublas.so.13" \
            "cublaslt cublasLt libcublasLt.so.13 libcublasLt.so.13" \
            "curand curand libcurand.so.10 libcurand.so.10" \
            "nvrtc nvrtc libnvrtc.so.13 libnvrtc.so.13"; do
  set -- $spec
  stub "$1" "$2" "$3" "$4" "$out/$3"
  ln -sf "$out/$3" "$lib/${3%.so.*}.so"
done
cudart=$(dirname "$NVCC")/../lib/libcudart.so.13
[ -f "$cudart" ] || cudart=$(find "$(dirname "$NVCC")/.." /usr/local/cuda/lib64 -name 'libcudart.so.13' 2>/dev/null | head -n 1)
cp -L "$cudart" "$out/libcudart.so.13"
ln -sf "$out/libcudart.so.13" "$lib/libcudart.so"

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
