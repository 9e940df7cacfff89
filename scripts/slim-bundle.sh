#!/usr/bin/env bash
# After ../shared/gpu/bundle: drops from .gpu/ the test executables that need no GPU (the CPU
# tests, the bindings check, the library's unit tests: CI runs them), so that .gpu/ with kernel
# variants stays under what one device call carries (64 MiB). Prints what is left.
#
#   scripts/slim-bundle.sh [bench names to keep, default: all]
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .gpu/tests ] || { echo "slim-bundle: no .gpu/ (run ../shared/gpu/bundle first)" >&2; exit 1; }
rm -f .gpu/tests/test-cpu_* .gpu/tests/test-bindings .gpu/tests/lib-longflash
if [ $# -gt 0 ]; then
  for b in .gpu/bench/*; do
    keep=0; for k in "$@"; do [ "$(basename "$b")" = "$k" ] && keep=1; done
    [ $keep = 1 ] || rm -f "$b"
  done
fi
du -sh .gpu; ls .gpu/tests .gpu/bench
