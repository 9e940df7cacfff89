#!/usr/bin/env bash
# Like scripts/variants.sh, but compiles only the Hopper kernels (cuda/kernels/*_sm90_*.cu) with
# nvcc, the way build.rs does, instead of building the crate again: about a minute per variant
# on two cores instead of several. The fatbins land in .gpu/variants/<name>/ for
# scripts/gpu/variants.sh (LONGFLASH_KERNEL_DIR).
#
#   scripts/sm90-variants.sh name="NVCC_FLAGS" [name="NVCC_FLAGS" ...]
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f scripts/env.sh ] && source scripts/env.sh >/dev/null
nvcc=${NVCC:-$(command -v nvcc)}
for spec in "$@"; do
  name=${spec%%=*}; flags=${spec#*=}
  dst=.gpu/variants/$name; mkdir -p "$dst"
  # shellcheck disable=SC2086
  ls cuda/kernels/*_sm90_*.cu | xargs -P "$(nproc)" -I{} sh -c \
    "$nvcc -fatbin -std=c++17 -O3 --expt-relaxed-constexpr -Xptxas=-v -Icuda/include \
       -gencode=arch=compute_90a,code=sm_90a $flags -o $dst/\$(basename {} .cu).fatbin {} 2>$dst/\$(basename {} .cu).log"
  grep -h "Potential Performance Loss\|bytes spill stores" "$dst"/*.log | grep -v " 0 bytes spill stores" | sed "s/^/$name: /" || true
  rm -f "$dst"/*.log
  echo "$name ($flags): $(ls "$dst" | wc -l) fatbins in $dst"
done
