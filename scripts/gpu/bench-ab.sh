#!/usr/bin/env bash
# On a GPU machine, after ../shared/gpu/bundle: a forward benchmark of the built kernels, of
# the kernels in each directory given (LONGFLASH_KERNEL_DIR: fatbins of another build, for an
# A/B comparison in the same session), and PyTorch SDPA's flash and cuDNN backends on the same
# shapes. RESULT lines go to $OUT/bench-<name>.jsonl.
#
#   bash scripts/gpu/bench-ab.sh [name=dir ...]
set -u
cd "$(dirname "$0")/../.."
out=${OUT:-.gpu/logs}; mkdir -p "$out"
export LONGFLASH_REQUIRE_GPU=1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee "$out/bench-gpu.txt"
bench() { # $1 = name, rest = env
  local name=$1; shift
  env "$@" .gpu/bench/forward --bench >"$out/bench-$name.log" 2>&1
  grep '^RESULT' "$out/bench-$name.log" | sed 's/^RESULT //' >"$out/bench-$name.jsonl"
  echo "$name: $(wc -l <"$out/bench-$name.jsonl") shapes"
}
bench new
for arg in "$@"; do bench "${arg%%=*}" LONGFLASH_KERNEL_DIR="${arg#*=}"; done
PYTHONUNBUFFERED=1 python3 benches/peer_sdpa.py --out "$out/bench-sdpa.jsonl" >"$out/bench-sdpa.log" 2>&1
echo "sdpa: $(wc -l <"$out/bench-sdpa.jsonl") rows"
