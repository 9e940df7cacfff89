# Sourced by the GPU scripts, from the repository root: sets `out`, the folder their logs and
# results go to ($OUT, or .gpu/logs without it). A device call brings back at most 8 files from
# $OUT (two folders down at most), so the first of these scripts to start in a call (the
# outermost) packs everything under $OUT into $OUT/logs.tgz when it ends, after the logs of an
# earlier script of the same call (a logs.tgz already there); the scripts it runs write as
# before, and it sees their files. A script killed at the call's limit packs nothing: plan the
# call to end inside it.
out=${OUT:-.gpu/logs}
mkdir -p "$out"
if [ -n "${OUT:-}" ] && [ -z "${LF_LOGS_TOP:-}" ]; then
  export LF_LOGS_TOP=$$
  lf_pack_logs() {
    local tmp
    tmp=$(mktemp /tmp/lf-logs.XXXXXX) || return
    [ -f "$OUT/logs.tgz" ] && tar xzf "$OUT/logs.tgz" -C "$OUT" --skip-old-files 2>/dev/null
    rm -f "$OUT/logs.tgz"
    tar czf "$tmp" -C "$OUT" . 2>/dev/null || return
    find "$OUT" -mindepth 1 -maxdepth 1 -exec rm -rf {} +
    mv "$tmp" "$OUT/logs.tgz"
  }
  trap lf_pack_logs EXIT
fi
