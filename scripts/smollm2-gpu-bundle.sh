#!/usr/bin/env bash
# Stages everything the SmolLM2 runs on a GPU machine need, in three folders that device calls
# carry one after the other (a call carries at most 64 MiB; each folder is kept under 60 MiB):
#
#   .gpu-pack/smollm2/call1/  part 1 of the GGUF model (as much as fits)
#   .gpu-pack/smollm2/call2/  part 2 of the model, smollm2.gz (the example, `cuda` feature),
#                             book.txt.gz (the text), the `gguf` wheel for the PyTorch reference
#   .gpu-pack/smollm2/call3/  lfc_gpu.gz (longflash-candle's GPU tests, the KV-cache drop-ins
#                             included)
#
# and in each, libcudart.so.13 and stand-ins for the other CUDA libraries (stubs/).
#
# Both hold MANIFEST (sha256 of every file, and of the whole model). On the GPU machine,
# scripts/gpu/smollm2.sh copies each folder it is given to /tmp/smollm2 (which stays while the
# machine is warm), joins the model once both parts are there, checks it, and runs the steps.
# longflash-candle/README-smollm2.md has the calls.
#
# Built like scripts/candle-gpu-bundle.sh: linked against stand-in CUDA libraries generated from
# the entry points cudarc declares (same sonames and symbol versions as CUDA 13.0's), since this
# machine has none. Unlike the tests, the example calls cuBLAS for real (candle's matmuls): on the
# GPU machine it runs with the CUDA 13 libraries of the PyTorch install (nvidia-cublas,
# nvidia-curand, nvidia-cuda-nvrtc, nvidia-cuda-runtime), which smollm2.sh finds and puts first
# on the library path; the stand-ins only fill in for a library it does not find.
#
# The kernels are built for Hopper only (LONGFLASH_CUDA_ARCHS=90a unless set: the GPU machines
# are H100/H200), which keeps each executable small enough to carry with half the model.
#
# The text: Alice's Adventures in Wonderland, the Library of Congress Workshop on Electronic
# Texts proceedings and Paradise Lost, the three Project Gutenberg texts of the Canterbury
# compression corpus (public domain), taken from the test data of the Brotli sdist on PyPI
# (brotli==1.1.0, fetched with pip, nothing installed), CRLF turned into LF: 264k tokens of the
# model's tokenizer, the first 132k prose (Alice 39k, the proceedings 93k), then the poem (132k).
#
# Usage: scripts/smollm2-gpu-bundle.sh [OUT]   (OUT: .gpu-pack/smollm2, ignored by git)
set -euo pipefail
source "$(dirname "$0")/env.sh"
out=${1:-.gpu-pack/smollm2}
limit=$((60 * 1024 * 1024))
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

model=$(scripts/fetch-smollm2.sh | tail -n 1)
[ -f "$model" ] || { echo "smollm2-gpu-bundle: no model at $model" >&2; exit 1; }

source "$(dirname "$0")/cuda-stand-ins.sh"

rm -rf "$out"
# A fixed folder for the link-time stand-ins: cudarc's build script watches CUDA_ROOT, and a new
# path each time would rebuild it and everything above it.
cuda_root=$(pwd)/target/smollm2-cuda-stubs
mkdir -p "$cuda_root/lib64" "$out/call1" "$out/call2/stubs" "$out/call3"
out=$(cd "$out" && pwd)
c1=$out/call1 c2=$out/call2 c3=$out/call3
cuda_stand_ins "$cuda_root/lib64" "$c2/stubs" "$c2"

export CUDA_ROOT=$cuda_root CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export LONGFLASH_CUDA_ARCHS=${LONGFLASH_CUDA_ARCHS:-90a}
# The example and the GPU tests, with the cuda feature (the default).
cargo build -p longflash-candle --release --example smollm2 --test gpu \
  --message-format=json-render-diagnostics |
  python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        kind = m["target"]["kind"]
        if kind == ["example"] or (kind == ["test"] and m["profile"]["test"]):
            print(m["target"]["name"], m["executable"])' >"$work/exes"
grep -q '^smollm2 ' "$work/exes" || { echo "smollm2-gpu-bundle: the example was not built" >&2; exit 1; }
grep -q '^gpu ' "$work/exes" || { echo "smollm2-gpu-bundle: the GPU tests were not built" >&2; exit 1; }
while read -r name exe; do
  case $name in
    smollm2) gzip -9 -c "$exe" >"$c2/smollm2.gz" ;;
    gpu) gzip -9 -c "$exe" >"$c3/lfc_gpu.gz" ;;
  esac
done <"$work/exes"

# The text, from the Brotli sdist's test data.
python3 -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
  --dest "$work/brotli" brotli==1.1.0 >&2
tar xzf "$work"/brotli/[Bb]rotli-1.1.0.tar.gz -C "$work" \
  Brotli-1.1.0/tests/testdata/alice29.txt Brotli-1.1.0/tests/testdata/lcet10.txt \
  Brotli-1.1.0/tests/testdata/plrabn12.txt
for f in alice29 lcet10 plrabn12; do
  tr -d '\r' <"$work/Brotli-1.1.0/tests/testdata/$f.txt"
  printf '\n\n'
done | gzip -9 >"$c2/book.txt.gz"

# The `gguf` wheel for benches/peer_smollm2.py (pure Python; its needs are on the GPU machine).
python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --dest "$c2/whl" gguf >&2

# The libraries in every folder, so that whichever call comes first can run its executables.
for d in "$c1" "$c3"; do
  cp -r "$c2/stubs" "$c2/libcudart.so.13" "$d/"
done

# The model, split so that each call stays under the limit: call 1 takes all it can (1 MiB
# left for the manifest and slack), call 2 the rest.
size() { du -cb "$@" | tail -n 1 | cut -f 1; }
msize=$(stat -c %s "$model")
part1=$((limit - 1024 * 1024 - $(size "$c1")))
[ "$part1" -lt "$msize" ] || part1=$((msize / 2))
head -c "$part1" "$model" >"$c1/model.part1"
tail -c +$((part1 + 1)) "$model" >"$c2/model.part2"
sum=$(sha256sum "$model" | cut -d ' ' -f 1)
for d in "$c1" "$c2" "$c3"; do
  (cd "$d" && find . -type f ! -name MANIFEST -printf '%P\n' | sort | xargs sha256sum) >"$d/MANIFEST"
  echo "$sum  model.gguf" >>"$d/MANIFEST"
  total=$(size "$d")
  if [ "$total" -ge "$limit" ]; then
    echo "smollm2-gpu-bundle: $d holds $total bytes, over the $limit a call may carry" >&2
    exit 1
  fi
done
# The split joins back into the model.
[ "$(cat "$c1/model.part1" "$c2/model.part2" | sha256sum | cut -d ' ' -f 1)" = "$sum" ] ||
  { echo "smollm2-gpu-bundle: the parts do not join into the model" >&2; exit 1; }
du -sb "$c1" "$c2" "$c3"
ls -la "$c1" "$c2" "$c3"
