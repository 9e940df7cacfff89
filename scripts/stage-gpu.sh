#!/usr/bin/env bash
# A small alternative to ../shared/gpu/bundle for one device call: builds only the GPU test
# executable and the named benches, strips and gzips them into .gpu/ (about 11 MB each, where
# the whole bundle can pass the 64 MiB a call carries). The GPU scripts unpack them
# (scripts/gpu/unpack.sh).
#
#   scripts/stage-gpu.sh [bench ...]        e.g. scripts/stage-gpu.sh backward forward
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh >/dev/null
excl=$(git rev-parse --git-path info/exclude); mkdir -p "$(dirname "$excl")"
grep -qxF '/.gpu/' "$excl" 2>/dev/null || echo '/.gpu/' >> "$excl"
exe() { jq -r 'select(.reason=="compiler-artifact" and .executable != null) | .executable' | tail -n 1; }
mkdir -p .gpu/tests .gpu/bench
t=$(cargo test --release --no-run --test gpu --message-format=json 2>/dev/null | exe)
cp "$t" .gpu/tests/test-gpu
for b in "$@"; do
  x=$(cargo bench --no-run --bench "$b" --message-format=json 2>/dev/null | exe)
  cp "$x" ".gpu/bench/$b"
done
strip --strip-debug .gpu/tests/test-gpu "${@/#/.gpu/bench/}" 2>/dev/null || true
gzip -9f .gpu/tests/test-gpu "${@/#/.gpu/bench/}"
du -sh .gpu
