#!/usr/bin/env bash
# On a GPU machine, after ../shared/gpu/bundle (and scripts/slim-bundle.sh decode varlen): the
# serving path in one call. Every GPU test of the serving families in its own process under a
# time limit (scripts/gpu/each.sh), compute-sanitizer on the tests that feed the kernels bad
# device values or turn keys in shared memory, the decoding bench with its SDPA peer
# (scripts/gpu/decode.sh), the varlen bench (batched calls on the sm_80 mainloop, like for like)
# with its PyTorch peers (benches/peer_varlen.py), and examples/decode.rs when staged as
# .gpu/examples/decode. The logs are packed into $OUT/serving.tgz (a device call returns only a
# few files); the summary is printed last and is summary.txt inside.
#
#   bash scripts/gpu/serving.sh [seconds per test, default 150]
set -u
cd "$(dirname "$0")/../.."
dest=${OUT:-.gpu/logs}; mkdir -p "$dest"
# This script packs its own logs (serving.tgz): the scripts it runs must not pack theirs.
export LF_LOGS_TOP=$$
out=$(mktemp -d)
limit=${1:-150}
export LONGFLASH_REQUIRE_GPU=1
for f in varlen:: varlen_rope:: decode:: decode_rope:: append:: narrow::; do
  OUT="$out/tests" bash scripts/gpu/each.sh "$f" "$limit" >/dev/null 2>&1
done
bin=.gpu/tests/test-gpu
for t in decode::bad_lengths_and_pages_are_clamped_and_reported append::append_out_of_range_tokens_are_skipped_and_reported \
         varlen::bad_prefix_sums_are_clamped_and_reported varlen_rope::varlen_rope_bad_prefix_sums_are_clamped_and_reported; do
  timeout 150 compute-sanitizer --tool memcheck "$bin" "$t" --exact --test-threads=1 >"$out/memcheck-$t.log" 2>&1
done
for t in decode_rope::rope_decode_narrow_head_dims decode::decode_narrow_head_dims decode::chunked_prefill_over_the_cache; do
  timeout 150 compute-sanitizer --tool racecheck "$bin" "$t" --exact --test-threads=1 >"$out/racecheck-$t.log" 2>&1
done
OUT="$out" bash scripts/gpu/decode.sh >"$out/decode-bench.txt" 2>&1
[ -x .gpu/bench/varlen ] && LONGFLASH_BENCH_MAINLOOP=sm80 timeout 200 .gpu/bench/varlen --bench >"$out/varlen-bench.log" 2>&1
PYTHONUNBUFFERED=1 timeout 200 python3 benches/peer_varlen.py --out "$out/varlen-peer.jsonl" >"$out/varlen-peer.log" 2>&1
[ -x .gpu/examples/decode ] && timeout 120 .gpu/examples/decode >"$out/example-decode.log" 2>&1
{
  cat "$out/tests/each.log"
  for f in "$out"/*check-*.log; do
    echo "$(basename "$f"): $(grep -hE 'ERROR SUMMARY|RACECHECK SUMMARY' "$f" | tail -1) $(grep -h '^test result' "$f" | tail -1)"
  done
  cat "$out/decode-bench.txt"
  grep -c '^RESULT' "$out/varlen-bench.log" 2>/dev/null | sed 's/^/varlen bench rows: /'
  grep -c '"ms": [0-9]' "$out/varlen-peer.jsonl" 2>/dev/null | sed 's/^/varlen peer rows timed: /'
  tail -3 "$out/example-decode.log" 2>/dev/null
} | tee "$out/summary.txt"
tar czf "$dest/serving.tgz" -C "$out" .
