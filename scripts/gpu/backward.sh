#!/usr/bin/env bash
# On a GPU machine, after ../shared/gpu/bundle: the backward's GPU tests (each in its own process
# under a time limit, scripts/gpu/each.sh), compute-sanitizer memcheck, racecheck and synccheck on
# its small-shape tests, then the backward bench (forward + backward, and the backward alone) and
# its PyTorch SDPA peer in one run, joined into a table. Logs, RESULT lines and the table go to
# $OUT (or .gpu/logs); the last lines printed are a summary.
#
#   bash scripts/gpu/backward.sh [tests|sanitize|bench|all] [seconds per test, default 300]
set -u
cd "$(dirname "$0")/../.."
source scripts/gpu/logs.sh
what=${1:-all}; limit=${2:-300}
bin=.gpu/tests/test-gpu
export LONGFLASH_REQUIRE_GPU=1 RUST_BACKTRACE=1
summary() { grep -hE "^test result|ERROR SUMMARY|RACECHECK SUMMARY|^exit|panicked|FAIL" "$@" | head -40; }
if [ "$what" = tests ] || [ "$what" = all ]; then
  echo "== tests"
  bash scripts/gpu/each.sh backward:: "$limit"
fi
if [ "$what" = sanitize ] || [ "$what" = all ]; then
  for tool in memcheck racecheck synccheck; do
    for t in backward::backward_single_token_and_tile_edges \
             backward::backward_rows_and_keys_that_see_nothing_get_zero_gradients; do
      timeout 900 compute-sanitizer --tool $tool --error-exitcode 9 "$bin" "$t" --exact \
        --test-threads=1 >>"$out/backward-$tool.log" 2>&1; echo "exit $?" >>"$out/backward-$tool.log"
    done
    echo "== $tool"; summary "$out/backward-$tool.log"
  done
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  timeout 900 .gpu/bench/backward --bench >"$out/backward-bench.log" 2>&1
  grep '^RESULT' "$out/backward-bench.log" | sed 's/^RESULT //' >"$out/backward.jsonl"
  echo "== bench: $(wc -l <"$out/backward.jsonl") rows"
  PYTHONUNBUFFERED=1 timeout 900 python3 benches/peer_sdpa_backward.py \
    --out "$out/backward-peer.jsonl" >"$out/backward-peer.log" 2>&1
  echo "== peer: $(wc -l <"$out/backward-peer.jsonl" 2>/dev/null || echo 0) rows"
  # Forward + backward (impl longflash / sdpa_flash / sdpa_cudnn), then the backward alone.
  python3 benches/compare.py "$out/backward.jsonl" "$out/backward-peer.jsonl" \
    --md "$out/backward-fwd-bwd.md"
  sed -E 's/"impl": "(longflash|sdpa_flash|sdpa_cudnn)_bwd"/"impl": "\1"/; t; d' \
    "$out/backward.jsonl" "$out/backward-peer.jsonl" >"$out/backward-only.jsonl"
  python3 benches/compare.py "$out/backward-only.jsonl" --md "$out/backward-only.md"
fi
