#!/usr/bin/env bash
# On a GPU machine, after ../shared/gpu/bundle: the decoding bench (benches/decode.rs: paged and
# contiguous caches, GQA and MHA, batch 1 to 256, 1k to 128k tokens, RoPE modes on a few shapes)
# and its peer, PyTorch SDPA's flash backend on the contiguous shapes (benches/peer_decode.py),
# in one run. RESULT lines go to $OUT/decode.jsonl and the peer's to $OUT/decode-peer.jsonl, logs
# beside them.
#
#   bash scripts/gpu/decode.sh
set -u
cd "$(dirname "$0")/../.."
source scripts/gpu/logs.sh
export LONGFLASH_REQUIRE_GPU=1
timeout 300 .gpu/bench/decode --bench >"$out/decode.log" 2>&1
grep '^RESULT' "$out/decode.log" | sed 's/^RESULT //' >"$out/decode.jsonl"
echo "decode: $(wc -l <"$out/decode.jsonl") rows"
PYTHONUNBUFFERED=1 timeout 200 python3 benches/peer_decode.py --out "$out/decode-peer.jsonl" \
  >"$out/decode-peer.log" 2>&1
echo "decode peer: $(wc -l <"$out/decode-peer.jsonl" 2>/dev/null || echo 0) rows"
