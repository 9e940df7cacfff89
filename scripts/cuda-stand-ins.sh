# Sourced by the bundle scripts that build candle's CUDA path on this machine, which has no CUDA
# libraries to link against (after scripts/env.sh, for $NVCC).
#
#   cuda_stand_ins LIB STUBS CUDART
#
# writes into LIB (a CUDA_ROOT's lib64) a stand-in libcuda.so, and into STUBS stand-ins of
# cuBLAS, cuBLASLt, cuRAND and NVRTC under their CUDA 13 sonames (to ship: they fill in on the GPU
# machine for a library it lacks), linked from LIB by their plain names; copies the toolkit's
# libcudart.so.13 into CUDART and links it from LIB. Each stand-in exports every `fn PREFIX*(`
# that cudarc declares under src/SOURCE/sys, returning 0 (a *Create* one first stores a non-null
# handle through its first argument), with the symbol version node of the real library.

cuda_stand_ins() {
  local lib=$1 stubs=$2 cudart_dir=$3 cudarc tmp spec
  cudarc=$(cargo metadata --format-version 1 |
    python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"]=="cudarc").rsplit("/",1)[0])')
  tmp=$(mktemp -d)
  # stub SOURCE PREFIX SONAME VERSION_NODE OUTPUT
  stub() {
    local src=$1 prefix=$2 soname=$3 node=$4 output=$5
    grep -ohE "fn ${prefix}[A-Za-z0-9_]*\(" "$cudarc/src/$src/sys/"*.rs | sed 's/^fn //; s/($//' | sort -u |
      while read -r f; do
        case $f in
          *Create*) echo "int $f(void **h) { if (h) *h = (void *)0x10; return 0; }" ;;
          *) echo "int $f(void) { return 0; }" ;;
        esac
      done >"$tmp/$soname.c"
    local flags=(-shared -fPIC -o "$output" "$tmp/$soname.c" "-Wl,-soname,$soname")
    if [ -n "$node" ]; then
      echo "$node { global: *; };" >"$tmp/$soname.map"
      flags+=("-Wl,--version-script=$tmp/$soname.map")
    fi
    gcc "${flags[@]}"
  }
  mkdir -p "$lib" "$stubs" "$cudart_dir"
  stub driver cu libcuda.so.1 "" "$lib/libcuda.so"
  for spec in "cublas cublas libcublas.so.13 libcublas.so.13" \
              "cublaslt cublasLt libcublasLt.so.13 libcublasLt.so.13" \
              "curand curand libcurand.so.10 libcurand.so.10" \
              "nvrtc nvrtc libnvrtc.so.13 libnvrtc.so.13"; do
    # shellcheck disable=SC2086
    set -- $spec
    stub "$1" "$2" "$3" "$4" "$stubs/$3"
    ln -sf "$stubs/$3" "$lib/${3%.so.*}.so"
  done
  local cudart
  cudart=$(dirname "$NVCC")/../lib/libcudart.so.13
  [ -f "$cudart" ] || cudart=$(find "$(dirname "$NVCC")/.." /usr/local/cuda/lib64 -name 'libcudart.so.13' 2>/dev/null | head -n 1)
  cp -L "$cudart" "$cudart_dir/libcudart.so.13"
  ln -sf "$cudart_dir/libcudart.so.13" "$lib/libcudart.so"
  rm -rf "$tmp"
}
