#!/usr/bin/env bash
# On a GPU machine, after ../shared/gpu/bundle: the block-sparse or RoPE bench on each mainloop,
# then its PyTorch peer in the same session (FlexAttention on the sparse bench's masks, the
# two-matrix ReRoPE). RESULT lines go to $OUT/<family>-<mainloop>.jsonl, the peer's to
# $OUT/<family>-peer.jsonl, logs beside them.
#
#   bash scripts/gpu/families.sh sparse|rope [mainloops, default "sm90 sm80"]
set -u
cd "$(dirname "$0")/../.."
source scripts/gpu/logs.sh
fam=$1; loops=${2:-sm90 sm80}
export LONGFLASH_REQUIRE_GPU=1
masks=$(mktemp -d)
for m in $loops; do
  vars=(LONGFLASH_BENCH_MAINLOOP=$m)
  [ "$m" = "${loops%% *}" ] && vars+=(LONGFLASH_MASK_DIR=$masks) # the first run writes the masks
  env "${vars[@]}" timeout 200 .gpu/bench/$fam --bench >"$out/$fam-$m.log" 2>&1
  grep '^RESULT' "$out/$fam-$m.log" | sed 's/^RESULT //' >"$out/$fam-$m.jsonl"
  echo "$fam $m: $(wc -l <"$out/$fam-$m.jsonl") rows"
done
case $fam in
  sparse) PYTHONUNBUFFERED=1 timeout 240 python3 benches/peer_flex.py --mask-dir "$masks" \
            --out "$out/$fam-peer.jsonl" >"$out/$fam-peer.log" 2>&1 ;;
  rope) PYTHONUNBUFFERED=1 timeout 200 python3 benches/peer_rerope.py \
          --out "$out/$fam-peer.jsonl" >"$out/$fam-peer.log" 2>&1 ;;
esac
echo "$fam peer: $(wc -l <"$out/$fam-peer.jsonl" 2>/dev/null || echo 0) rows"
