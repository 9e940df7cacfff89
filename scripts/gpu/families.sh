#!/usr/bin/env bash
# On a GPU machine, after ../shared/gpu/bundle: the block-sparse or RoPE bench on each mainloop,
# then its PyTorch peer in the same session (FlexAttention on the sparse bench's masks, the
# two-matrix ReRoPE), under each timing protocol (README, "Benchmarks": burst, the GPU at its
# full clock; sustained, at the clock its power limit leaves). RESULT lines go to
# $OUT/<family>-<mainloop>-<protocol>.jsonl, the peer's to $OUT/<family>-peer-<protocol>.jsonl,
# logs beside them.
#
#   [BENCH_PROTOCOLS="burst sustained"] bash scripts/gpu/families.sh sparse|rope [mainloops, default "sm90 sm80"]
set -u
cd "$(dirname "$0")/../.."
source scripts/gpu/logs.sh
fam=$1; loops=${2:-sm90 sm80}
export LONGFLASH_REQUIRE_GPU=1
masks=$(mktemp -d)
first=1
for protocol in ${BENCH_PROTOCOLS:-burst sustained}; do
  case $protocol in
    burst) ours=(LONGFLASH_BENCH_BURST=5,30,300); peer=(--warmup 6 --reps 30 --gap-ms 300) ;;
    sustained) ours=(LONGFLASH_BENCH_SUSTAINED=1500,30); peer=(--warmup 6 --warmup-ms 1500 --reps 30) ;;
    *) echo "families: unknown protocol $protocol (burst, sustained)" >&2; exit 2 ;;
  esac
  for m in $loops; do
    vars=(LONGFLASH_BENCH_MAINLOOP=$m)
    [ $first = 1 ] && vars+=(LONGFLASH_MASK_DIR=$masks) # the first run writes the masks
    first=0
    env "${ours[@]}" "${vars[@]}" timeout 200 .gpu/bench/$fam --bench >"$out/$fam-$m-$protocol.log" 2>&1
    grep '^RESULT' "$out/$fam-$m-$protocol.log" | sed 's/^RESULT //' >"$out/$fam-$m-$protocol.jsonl"
    echo "$fam $m ($protocol): $(wc -l <"$out/$fam-$m-$protocol.jsonl") rows"
  done
  case $fam in
    sparse) PYTHONUNBUFFERED=1 timeout 240 python3 benches/peer_flex.py --mask-dir "$masks" "${peer[@]}" \
              --out "$out/$fam-peer-$protocol.jsonl" >"$out/$fam-peer-$protocol.log" 2>&1 ;;
    rope) PYTHONUNBUFFERED=1 timeout 200 python3 benches/peer_rerope.py \
            --out "$out/$fam-peer-$protocol.jsonl" >"$out/$fam-peer-$protocol.log" 2>&1 ;;
  esac
  echo "$fam peer ($protocol): $(wc -l <"$out/$fam-peer-$protocol.jsonl" 2>/dev/null || echo 0) rows"
done
