#!/usr/bin/env bash
# On a GPU machine, after ../shared/gpu/bundle: the forward benchmark once per variant and
# protocol, then PyTorch SDPA's flash and cuDNN backends on the same shapes under the same
# protocols, with the GPU's clocks logged. RESULT lines go to $OUT/bench-<name>-<protocol>.jsonl
# (or .gpu/logs), the peers' to $OUT/bench-sdpa-<protocol>.jsonl.
#
#   [BENCH_PROTOCOLS="burst sustained"] bash scripts/gpu/bench-ab.sh [name:VAR=VALUE[:VAR=VALUE...] ...]
#
# Each variant runs the bench with its environment, for example
#   old:LONGFLASH_KERNEL_DIR=.gpu/old        the fatbins of another build (A/B in one session)
#   sm90:LONGFLASH_BENCH_MAINLOOP=sm90       the Hopper mainloop
# With no variant, one run of the built kernels, named "new". The protocols (README,
# "Benchmarks"): burst, 300 ms idle then 5 warm-up and 30 timed calls per shape
# (LONGFLASH_BENCH_BURST=5,30,300; the peers' --gap-ms 300), at the GPU's full clock; sustained,
# 1.5 s of calls before the 30 timed ones (LONGFLASH_BENCH_SUSTAINED=1500,30; the peers'
# --warmup-ms 1500), at the clock the power limit leaves.
# Compare ours with a peer only under the same protocol.
set -u
cd "$(dirname "$0")/../.."
source scripts/gpu/logs.sh
export LONGFLASH_REQUIRE_GPU=1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv,noheader | tee "$out/bench-gpu.txt"
[ $# -gt 0 ] || set -- new
protocols=${BENCH_PROTOCOLS:-burst sustained}
# The GPU's clocks and power every 50 ms through the whole call, to set beside the per-shape end
# times (end_unix_ms) of ours and the peers'; throttle reasons in a second log (a field the
# driver does not know fails the whole query).
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu \
  --format=csv,nounits -lms 50 >"$out/bench-clocks.csv" 2>&1 &
clocks_pid=$!
nvidia-smi --query-gpu=timestamp,clocks_throttle_reasons.active --format=csv,nounits -lms 200 \
  >"$out/bench-throttle.csv" 2>&1 &
clocks_pid="$clocks_pid $!"
dims=${LONGFLASH_BENCH_HEAD_DIMS:-64,128,256}
seqlens=${LONGFLASH_BENCH_SEQLENS:-512,1024,2048,4096,8192,16384}
for protocol in $protocols; do
  case $protocol in
    burst) ours=(LONGFLASH_BENCH_BURST=5,30,300); peer=(--gap-ms 300) ;;
    sustained) ours=(LONGFLASH_BENCH_SUSTAINED=1500,30); peer=(--warmup-ms 1500) ;;
    *) echo "bench-ab: unknown protocol $protocol (burst, sustained)" >&2; exit 2 ;;
  esac
  for spec in "$@"; do
    name=${spec%%:*}
    vars=(); [ "$spec" = "$name" ] || IFS=: read -r -a vars <<<"${spec#*:}"
    env "${ours[@]}" "${vars[@]}" timeout 300 .gpu/bench/forward --bench >"$out/bench-$name-$protocol.log" 2>&1
    grep '^RESULT' "$out/bench-$name-$protocol.log" | sed 's/^RESULT //' >"$out/bench-$name-$protocol.jsonl"
    echo "$name ($protocol): $(wc -l <"$out/bench-$name-$protocol.jsonl") shapes"
  done
  PYTHONUNBUFFERED=1 timeout 300 python3 benches/peer_sdpa.py --head-dims "$dims" --seqlens "$seqlens" \
    "${peer[@]}" --out "$out/bench-sdpa-$protocol.jsonl" >"$out/bench-sdpa-$protocol.log" 2>&1
  echo "sdpa ($protocol): $(wc -l <"$out/bench-sdpa-$protocol.jsonl") rows"
done
kill $clocks_pid 2>/dev/null || true
