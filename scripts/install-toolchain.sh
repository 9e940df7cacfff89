#!/usr/bin/env bash
# Installs what a fresh machine lacks to build longflash:
#  - a CUDA compiler (nvcc 13.0, pinned to the GPU machines' CUDA) from PyPI into .venv-cuda/
#    when none is found on the machine;
#  - libclang (for bindgen) from Debian when it is missing.
# Prints the NVCC path to use on its last line.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${LONGFLASH_CUDA_VENV:-$root/.venv-cuda}

find_nvcc() {
  for c in "${NVCC:-}" "${CUDA_HOME:+$CUDA_HOME/bin/nvcc}" "${CUDA_PATH:+$CUDA_PATH/bin/nvcc}" \
           "$(command -v nvcc 2>/dev/null || true)" /usr/local/cuda/bin/nvcc "$venv/lib/python3*/site-packages/nvidia/cu13/bin/nvcc"; do
    for f in $c; do [ -n "$f" ] && [ -x "$f" ] && { echo "$f"; return 0; }; done
  done
  return 1
}

if ! ls /usr/lib/llvm-*/lib/libclang.so* /usr/lib/llvm-*/lib/libclang-[0-9]*.so* /usr/lib/x86_64-linux-gnu/libclang-[0-9]*.so* >/dev/null 2>&1; then
  echo "install-toolchain: installing libclang-dev (for bindgen)" >&2
  export DEBIAN_FRONTEND=noninteractive
  sudo_=; [ "$(id -u)" = 0 ] || sudo_=sudo
  $sudo_ apt-get update -qq >&2
  $sudo_ apt-get install -y -qq libclang-dev >&2
fi

if ! nvcc=$(find_nvcc); then
  echo "install-toolchain: no nvcc found; installing CUDA 13.0 compiler from PyPI into $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-cccl==13.0.85 nvidia-nvvm==13.0.88 >&2
  nvcc=$(find_nvcc)
fi
echo "$nvcc"
