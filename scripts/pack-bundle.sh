#!/usr/bin/env bash
# After ../shared/gpu/bundle (and scripts/slim-bundle.sh): packs .gpu/ into .gpu-pack/gpu.tgz.
# The executables are mostly embedded fatbins and compress to about 40% of their size, so one
# device call (64 MiB carried) gets every test and bench executable at once:
#
#   run carry [".gpu-pack"]: tar xzf .gpu-pack/gpu.tgz && bash .gpu/run.sh ...
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .gpu ] || { echo "pack-bundle: no .gpu/ (run ../shared/gpu/bundle first)" >&2; exit 1; }
mkdir -p .gpu-pack
tar czf .gpu-pack/gpu.tgz .gpu
du -sh .gpu .gpu-pack/gpu.tgz
