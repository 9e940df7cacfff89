#!/usr/bin/env bash
# On a GPU machine: the SmolLM2 checks of issue 12 with what scripts/smollm2-gpu-bundle.sh
# staged, over as many device calls as they need (a call runs at most 600 s).
#
#   bash scripts/gpu/smollm2.sh [PACK_DIR] [STEP ...]
#
# PACK_DIR (.gpu-pack/smollm2/call1, call2 or call3, carried by this call) is checked against its
# MANIFEST and copied to $SMOLLM2_HOME (/tmp/smollm2), which stays while the machine is warm;
# once both halves of the model are there they are joined into model.gguf and checked against
# the model's sha256. Later calls carry nothing and name no PACK_DIR.
#
# Then the steps run, most valuable first, each under its own time limit, skipping those done in
# an earlier call (results/NAME.done) and those whose inputs are not there yet, and stopping
# before a step whose limit would pass the call's budget ($SMOLLM2_BUDGET seconds from the
# start, 560 by default). STEP arguments run just those, in the order given, done or not.
# After each step the results so far (logs, JSON, results/summary.json) are tarred into
# $OUT/smollm2-results.tgz, with summary.json and steps.log beside it: a call brings back only a
# few files (8 on the device tool), so the logs travel in the tarball.
#
#   tests      longflash-candle's GPU tests (LONGFLASH_REQUIRE_GPU=1): the KV-cache drop-ins
#   check      passkey at 32k (depth 0.5, ReRoPE 4096) with --check-attn 16: the last 16 rows of
#              every attention call of layers 0, 1 and 29 (prefill chunks, the 2032-query one
#              included, and decoding steps) against longflash's f64 reference on the CPU
#   compare    longflash against candle's attention in the program: 1k-token prompt's logits,
#              64 greedy tokens (decoding steps on the KV-cache kernel)
#   decode     decoding tokens/s at a 32k context: longflash (RoPE, ReRoPE) and candle
#   prefill    prefill tokens/s at 32k: ReRoPE 4096 against plain causal RoPE (two runs each)
#   passkey    passkey with ReRoPE 4096 at 32k, 64k, 128k, five depths
#   passkey4k  the same at 32k and 64k in prefill chunks of 4096 tokens
#   ppl32      NLL per bucket at 32k for RoPE, NTK x4, ReRoPE 4096, Leaky ReRoPE 2048/16
#   ppl128     NLL per bucket up to 128k with ReRoPE 4096
#   peer       the PyTorch reference (benches/peer_smollm2.py) at 32k: NLL buckets of RoPE,
#              ReRoPE and Leaky ReRoPE, last-token logits of a short prompt
#   passkey256 passkey with ReRoPE 4096 at 256k
#   f32        passkey at 32k and 128k and NLL at 32k (ReRoPE 4096) with every projection a
#              dequantized f32 matmul (candle's CANDLE_DEQUANTIZE_ALL=1), as the PyTorch reference
#              computes them: whether the depth-0.9 misses and the ~0.015 NLL offset come from
#              candle's quantized matmuls
#   ppl128f32  ppl128 with the f32 matmuls of f32: whether the NLL's rise past 32k is the text or
#              the quantization
#   ppl128seg  the same 128k tokens scored in independent segments of 8k (the trained length),
#              with ReRoPE 4096 and with plain RoPE: what each bucket's text costs with at most
#              8k of context, against which ppl128's long-context NLL is read
#   ppl128logn ppl128 with log-n query scaling (L = 8192) on ReRoPE 4096 and Leaky ReRoPE
#              (2048, 16), and passkey with ReRoPE 4096 + log-n at 32k, 64k and 128k: whether
#              scaling the queries past the trained length keeps the far buckets down
#   pplsweep   ppl128 for each position setting in SMOLLM2_SWEEP (';'-separated option sets,
#              e.g. "--rerope 4096 --log-n 4096;--leaky 2048 16 --log-n 8192"), and passkey at
#              32k, 64k and 128k for the one in SMOLLM2_SWEEP_PASSKEY, if set
#   layersweep for each setting in SMOLLM2_LAYER_SWEEP (';'-separated option sets, typically with
#              --layers, e.g. "--rerope 8192 --layers 16-29 rerope:4096:log-n:8192"): ppl128 and
#              passkey at 32k, 64k and 128k, both targets of the issue with one setting
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
home=${SMOLLM2_HOME:-/tmp/smollm2}
budget=${SMOLLM2_BUDGET:-560}
out=${OUT:-$home/out}
res=$home/results
mkdir -p "$res" "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
log() { echo "[smollm2 +$((SECONDS))s] $*" | tee -a "$res/steps.log"; }

# --- the pack ---------------------------------------------------------------------------------
if [ $# -gt 0 ] && [ -d "$1" ]; then
  pack=$1
  shift
  if ! (cd "$pack" && grep -v ' model.gguf$' MANIFEST | sha256sum -c --quiet); then
    log "checksums of $pack do not match its MANIFEST"
    exit 1
  fi
  cp -r "$pack"/. "$home"/
  for f in "$home"/*.gz; do
    [ -e "$f" ] || continue
    gunzip -f "$f"
  done
  chmod +x "$home"/smollm2 "$home"/lfc_gpu 2>/dev/null
  log "unpacked $pack into $home"
fi
model=$home/model.gguf
if [ ! -f "$model" ] && [ -f "$home/model.part1" ] && [ -f "$home/model.part2" ]; then
  cat "$home/model.part1" "$home/model.part2" >"$model.tmp"
  want=$(grep ' model.gguf$' "$home/MANIFEST" | cut -d ' ' -f 1)
  got=$(sha256sum "$model.tmp" | cut -d ' ' -f 1)
  if [ "$want" = "$got" ]; then
    mv "$model.tmp" "$model"
    rm -f "$home/model.part1" "$home/model.part2"
    log "model joined: $(stat -c %s "$model") bytes, sha256 $got"
  else
    log "joined model has sha256 $got, expected $want"
    rm -f "$model.tmp"
  fi
fi
book=$home/book.txt

# --- the CUDA libraries: PyTorch's CUDA 13 ones first, the pack's libcudart, the stand-ins last -
nvlibs=$(python3 - <<'PY' 2>/dev/null
import glob, os, site
roots = []
try:
    import nvidia
    roots += list(nvidia.__path__)
except Exception:
    pass
for sp in site.getsitepackages():
    roots.append(os.path.join(sp, "nvidia"))
want = ["libcublas.so.13", "libcublasLt.so.13", "libcurand.so.10", "libnvrtc.so.13",
        "libcudart.so.13"]
dirs = []
for r in roots:
    for w in want:
        for p in glob.glob(os.path.join(r, "**", w), recursive=True):
            d = os.path.dirname(p)
            if d not in dirs:
                dirs.append(d)
print(":".join(dirs))
PY
)
export LD_LIBRARY_PATH=${nvlibs:+$nvlibs:}$home:$home/stubs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
if [ -x "$home/smollm2" ] && [ ! -f "$res/libraries.txt" ]; then
  { echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"; ldd "$home/smollm2"; nvidia-smi -L; } >"$res/libraries.txt" 2>&1
  grep -q "$home/stubs/libcublas" "$res/libraries.txt" &&
    log "WARNING: the program resolves libcublas to the stand-in: no PyTorch CUDA 13 libraries found"
fi

# --- results ----------------------------------------------------------------------------------
# summary.json: one entry per finished step, from its JSON files and the program's output.
summarize() {
  python3 - "$res" <<'PY' >"$res/summary.json.tmp" && mv "$res/summary.json.tmp" "$res/summary.json"
import glob, json, os, re, sys
res = sys.argv[1]
s = {}
def load(p):
    try:
        with open(p) as f:
            return json.load(f)
    except Exception:
        return None
speed = re.compile(r"prefill: (\d+) tokens in ([\d.]+) s \(([\d.]+) tok/s\); decoding: (\d+) tokens "
                   r"in ([\d.]+) s \(([\d.]+) tok/s\)")
for p in sorted(glob.glob(os.path.join(res, "gen-*.log"))):
    m = None
    for line in open(p, errors="replace"):
        m = speed.search(line) or m
    if m:
        s.setdefault("generate", {})[os.path.basename(p)[4:-4]] = {
            "prompt_tokens": int(m[1]), "prefill_s": float(m[2]), "prefill_tok_s": float(m[3]),
            "decode_tokens": int(m[4]), "decode_s": float(m[5]), "decode_tok_s": float(m[6])}
g = s.get("generate", {})
def ratio(a, b, key):
    if a in g and b in g and g[b][key] > 0:
        return g[a][key] / g[b][key]
for name, a, b, key in [("decode_longflash_over_candle", "decode-longflash-rope", "decode-candle-rope", "decode_tok_s"),
                        ("prefill_rerope_over_rope", "prefill-rerope-2", "prefill-rope-2", "prefill_tok_s")]:
    r = ratio(a, b, key)
    if r is not None:
        s[name] = round(r, 4)
for p in sorted(glob.glob(os.path.join(res, "*.json"))):
    if os.path.basename(p) != "summary.json":
        s.setdefault("files", {})[os.path.basename(p)] = load(p)
peer = (s.get("files") or {}).get("peer.json")
if peer:
    peer = dict(peer)
    if "short_prompt" in peer:
        peer["short_prompt"] = {"ids": peer["short_prompt"].get("ids")}
    s["files"]["peer.json"] = peer
for p in sorted(glob.glob(os.path.join(res, "*.done"))):
    s.setdefault("done", []).append(os.path.basename(p)[:-5])
print(json.dumps(s, indent=1))
PY
}
publish() {
  summarize
  cp "$res/summary.json" "$res/steps.log" "$out"/ 2>/dev/null
  tar czf "$out/smollm2-results.tgz.tmp" -C "$home" results && mv "$out/smollm2-results.tgz.tmp" "$out/smollm2-results.tgz"
}

# --- steps ------------------------------------------------------------------------------------
smol() { "$home/smollm2" "$@" --model "$model" --quiet; }
need_model() { [ -x "$home/smollm2" ] && [ -f "$model" ] && [ -f "$book" ]; }

step_tests() {
  [ -x "$home/lfc_gpu" ] || return 3
  LONGFLASH_REQUIRE_GPU=1 timeout "$1" "$home/lfc_gpu" --test-threads=1 >"$res/tests.log" 2>&1
}
step_check() {
  need_model || return 3
  timeout "$1" "$home/smollm2" passkey --model "$model" --quiet --lengths 32k --depths 0.5 \
    --rerope 4096 --check-attn 16 >"$res/check.log" 2>&1
}
step_compare() {
  need_model || return 3
  timeout "$1" "$home/smollm2" compare --model "$model" --quiet --prompt-file "$book" \
    --prompt-tokens 1024 --max-new 64 >"$res/compare.log" 2>&1
}
gen() { # NAME LIMIT ARGS...: one generate run at a 32k-token prompt
  local name=$1 limit=$2
  shift 2
  timeout "$limit" "$home/smollm2" generate --model "$model" --quiet --prompt-file "$book" \
    --prompt-tokens 32k "$@" >"$res/gen-$name.log" 2>&1
}
step_decode() {
  need_model || return 3
  local per=$(($1 / 3)) rc=0
  gen decode-longflash-rope "$per" --max-new 128 || rc=$?
  gen decode-longflash-rerope "$per" --max-new 128 --rerope 4096 || rc=$?
  gen decode-candle-rope "$per" --max-new 128 --attn candle || rc=$?
  return $rc
}
step_prefill() {
  need_model || return 3
  local per=$(($1 / 4)) rc=0
  for i in 1 2; do
    gen "prefill-rope-$i" "$per" --max-new 1 || rc=$?
    gen "prefill-rerope-$i" "$per" --max-new 1 --rerope 4096 || rc=$?
  done
  return $rc
}
step_passkey() {
  need_model || return 3
  timeout "$1" "$home/smollm2" passkey --model "$model" --quiet --lengths 32k,64k,128k \
    --depths 0.1,0.3,0.5,0.7,0.9 --rerope 4096 --json "$res/passkey-rerope.json" \
    >"$res/passkey.log" 2>&1
}
# The same passkey prompts in chunks of 4096: the 32k and 128k prompts then end in a chunk of
# 4080 queries instead of 2032 (the 2026-12-05 run answered both wrongly from the prefill).
step_passkey4k() {
  need_model || return 3
  timeout "$1" "$home/smollm2" passkey --model "$model" --quiet --lengths 32k,64k \
    --depths 0.1,0.3,0.5,0.7,0.9 --rerope 4096 --chunk 4096 \
    --json "$res/passkey4k-rerope.json" >"$res/passkey4k.log" 2>&1
}
step_ppl32() {
  need_model || return 3
  local per=$(($1 / 4)) rc=0 mode name
  for mode in "--rope" "--ntk 4" "--rerope 4096" "--leaky 2048 16"; do
    name=$(echo "$mode" | tr -d '-' | tr ' ' '_')
    # shellcheck disable=SC2086
    timeout "$per" "$home/smollm2" ppl "$book" --model "$model" --quiet --max-tokens 32k $mode \
      --json "$res/ppl32-$name.json" >"$res/ppl32-$name.log" 2>&1 || rc=$?
  done
  return $rc
}
step_ppl128() {
  need_model || return 3
  timeout "$1" "$home/smollm2" ppl "$book" --model "$model" --quiet --max-tokens 128k \
    --rerope 4096 --chunk 4096 --json "$res/ppl128-rerope_4096.json" >"$res/ppl128.log" 2>&1
}
step_ppl128f32() {
  need_model || return 3
  CANDLE_DEQUANTIZE_ALL=1 timeout "$1" "$home/smollm2" ppl "$book" --model "$model" --quiet \
    --max-tokens 128k --rerope 4096 --chunk 4096 --json "$res/ppl128-f32-rerope_4096.json" \
    >"$res/ppl128-f32.log" 2>&1
}
step_ppl128seg() {
  need_model || return 3
  local per=$(($1 / 2)) rc=0 mode name
  for mode in "--rerope 4096" ""; do
    name=${mode:+rerope_4096}; name=${name:-rope}
    # shellcheck disable=SC2086
    timeout "$per" "$home/smollm2" ppl "$book" --model "$model" --quiet --max-tokens 128k \
      --segment 8k $mode --chunk 4096 --json "$res/ppl128-seg8k-$name.json" \
      >"$res/ppl128-seg8k-$name.log" 2>&1 || rc=$?
  done
  return $rc
}
step_ppl128logn() {
  need_model || return 3
  local per=$(($1 / 4)) rc=0 mode name
  for mode in "--rerope 4096" "--leaky 2048 16"; do
    name=$(echo "$mode" | tr -d '-' | tr ' ' '_')
    # shellcheck disable=SC2086
    timeout "$per" "$home/smollm2" ppl "$book" --model "$model" --quiet --max-tokens 128k \
      $mode --log-n 8192 --chunk 4096 --json "$res/ppl128-logn-$name.json" \
      >"$res/ppl128-logn-$name.log" 2>&1 || rc=$?
  done
  timeout "$((2 * per))" "$home/smollm2" passkey --model "$model" --quiet --lengths 32k,64k,128k \
    --depths 0.1,0.3,0.5,0.7,0.9 --rerope 4096 --log-n 8192 --chunk 4096 \
    --json "$res/passkey-logn.json" >"$res/passkey-logn.log" 2>&1 || rc=$?
  return $rc
}
# A file-name form of an option set ("--rerope 4096 --log-n 8192" -> rerope_4096_logn_8192).
mode_name() { echo "$1" | tr -d '-' | tr ' :' '__'; }
# NLL per bucket over the first 128k tokens of the text with option set $2, as
# results/ppl128-$1-NAME.{json,log}, within $3 seconds.
ppl128_as() {
  local name
  name=$(mode_name "$2")
  # shellcheck disable=SC2086
  timeout "$3" "$home/smollm2" ppl "$book" --model "$model" --quiet --max-tokens 128k $2 \
    --chunk 4096 --json "$res/ppl128-$1-$name.json" >"$res/ppl128-$1-$name.log" 2>&1
}
# Passkey at 32k, 64k and 128k tokens, five depths, with option set $2, as
# results/passkey-$1-NAME.{json,log}, within $3 seconds.
passkey_as() {
  local name
  name=$(mode_name "$2")
  # shellcheck disable=SC2086
  timeout "$3" "$home/smollm2" passkey --model "$model" --quiet --lengths 32k,64k,128k \
    --depths 0.1,0.3,0.5,0.7,0.9 $2 --chunk 4096 \
    --json "$res/passkey-$1-$name.json" >"$res/passkey-$1-$name.log" 2>&1
}
step_pplsweep() {
  need_model || return 3
  local rc=0 mode modes
  IFS=';' read -ra modes <<<"${SMOLLM2_SWEEP:-}"
  for mode in "${modes[@]}"; do
    ppl128_as sweep "$mode" 90 || rc=$?
  done
  if [ -n "${SMOLLM2_SWEEP_PASSKEY:-}" ]; then
    passkey_as sweep "$SMOLLM2_SWEEP_PASSKEY" 200 || rc=$?
  fi
  return $rc
}
step_layersweep() {
  need_model || return 3
  local rc=0 mode modes
  IFS=';' read -ra modes <<<"${SMOLLM2_LAYER_SWEEP:-}"
  for mode in "${modes[@]}"; do
    ppl128_as layers "$mode" 90 || rc=$?
    passkey_as layers "$mode" 150 || rc=$?
    publish
  done
  return $rc
}
step_peer() {
  need_model || return 3
  ls "$home"/whl/gguf-*.whl >/dev/null 2>&1 || return 3
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$home/site" "$home"/whl/*.whl >"$res/peer-install.log" 2>&1 || return 1
  PYTHONPATH=$home/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 timeout "$1" \
    python3 "$root/benches/peer_smollm2.py" --model "$model" --text "$book" --tokens 32768 \
    --modes "${SMOLLM2_PEER_MODES:-rope,rerope:4096,leaky:2048:16}" --out "$res/peer.json" \
    >"$res/peer.log" 2>&1
}
step_passkey256() {
  need_model || return 3
  timeout "$1" "$home/smollm2" passkey --model "$model" --quiet --lengths 256k \
    --depths 0.1,0.3,0.5,0.7,0.9 --rerope 4096 --json "$res/passkey256-rerope.json" \
    >"$res/passkey256.log" 2>&1
}

step_f32() {
  need_model || return 3
  local per=$(($1 / 2)) rc=0
  CANDLE_DEQUANTIZE_ALL=1 timeout "$per" "$home/smollm2" passkey --model "$model" --quiet \
    --lengths 32k,128k --depths 0.1,0.3,0.5,0.7,0.9 --rerope 4096 \
    --json "$res/passkey-f32-rerope.json" >"$res/passkey-f32.log" 2>&1 || rc=$?
  CANDLE_DEQUANTIZE_ALL=1 timeout "$per" "$home/smollm2" ppl "$book" --model "$model" --quiet \
    --max-tokens 32k --rerope 4096 --json "$res/ppl32-f32-rerope_4096.json" \
    >"$res/ppl32-f32.log" 2>&1 || rc=$?
  return $rc
}

# name:limit in seconds, most valuable first.
steps=(tests:240 check:240 passkey:300 compare:120 passkey4k:200 decode:240 prefill:160 ppl32:240
  ppl128:300 f32:300 ppl128f32:300 ppl128seg:240 ppl128logn:400 pplsweep:560 layersweep:560 peer:540 passkey256:540)
limit_of() {
  local s
  for s in "${steps[@]}"; do
    [ "${s%%:*}" = "$1" ] && { echo "${s#*:}"; return; }
  done
}
if [ $# -gt 0 ]; then
  chosen=("$@")
  forced=1
else
  chosen=()
  for s in "${steps[@]}"; do chosen+=("${s%%:*}"); done
  forced=0
fi
for name in "${chosen[@]}"; do
  limit=$(limit_of "$name")
  [ -n "$limit" ] || { log "no step $name"; continue; }
  if [ "$forced" = 0 ] && [ -f "$res/$name.done" ]; then
    continue
  fi
  left=$((budget - SECONDS))
  if [ "$limit" -gt "$left" ]; then
    if [ "$forced" = 1 ] && [ "$left" -gt 30 ]; then
      limit=$left
    else
      log "$name needs up to ${limit}s, ${left}s left in this call: next call"
      continue
    fi
  fi
  log "$name: start (limit ${limit}s)"
  t0=$SECONDS
  "step_$name" "$limit"
  rc=$?
  case $rc in
    0) touch "$res/$name.done"; log "$name: done in $((SECONDS - t0))s" ;;
    3) log "$name: inputs not here yet (model, program or wheel)" ;;
    124|137) log "$name: ran past its limit after $((SECONDS - t0))s (partial results kept)" ;;
    *) log "$name: failed with status $rc after $((SECONDS - t0))s" ;;
  esac
  publish
done
publish
log "steps done so far: $(cd "$res" && ls ./*.done 2>/dev/null | sed 's|^\./||; s|\.done$||' | tr '\n' ' ')"
