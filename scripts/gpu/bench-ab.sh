#!/usr/bin/env bash
# On a GPU machine, after ../shared/gpu/bundle: the forward benchmark once per variant, then
# PyTorch SDPA's flash and cuDNN backends on the same shapes. RESULT lines go to
# $OUT/bench-<name>.jsonl (or .gpu/logs).
#
#   bash scripts/gpu/bench-ab.sh [name:VAR=VALUE[:VAR=VALUE...] ...]
#
# Each variant runs the bench with its environment, for example
#   old:LONGFLASH_KERNEL_DIR=.gpu/old        the fatbins of another build (A/B in one session)
#   sm90:LONGFLASH_BENCH_MAINLOOP=sm90       the Hopper mainloop
# With no variant, one run of the built kernels, named "new".
set -u
cd "$(dirname "$0")/../.."
source scripts/gpu/logs.sh
export LONGFLASH_REQUIRE_GPU=1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee "$out/bench-gpu.txt"
[ $# -gt 0 ] || set -- new
for spec in "$@"; do
  name=${spec%%:*}
  vars=(); [ "$spec" = "$name" ] || IFS=: read -r -a vars <<<"${spec#*:}"
  env "${vars[@]}" timeout 300 .gpu/bench/forward --bench >"$out/bench-$name.log" 2>&1
  grep '^RESULT' "$out/bench-$name.log" | sed 's/^RESULT //' >"$out/bench-$name.jsonl"
  echo "$name: $(wc -l <"$out/bench-$name.jsonl") shapes"
done
PYTHONUNBUFFERED=1 timeout 200 python3 benches/peer_sdpa.py --out "$out/bench-sdpa.jsonl" >"$out/bench-sdpa.log" 2>&1
echo "sdpa: $(wc -l <"$out/bench-sdpa.jsonl") rows"
