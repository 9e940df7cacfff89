#!/usr/bin/env python3
"""Join longflash forward results with PyTorch SDPA peers into a Markdown table.

Inputs are JSON-lines files: plain JSON objects (benches/peer_sdpa.py) or lines
of the form `RESULT {json}` (the Rust bench, benches/forward.rs). Any other
line is ignored. Records are joined on (dtype, head_dim, seqlen, causal); when
the same impl and key appear more than once, the last successful record wins.

Usage:
    cargo bench --bench forward | tee longflash.txt
    python3 benches/peer_sdpa.py --out peer.jsonl
    python3 benches/compare.py longflash.txt peer.jsonl --md results.md
"""

import argparse
import datetime
import json
import sys

PREFIX = "RESULT "
COLUMNS = [
    "head dim",
    "causal",
    "seqlen",
    "longflash ms",
    "longflash TFLOP/s",
    "SDPA flash TFLOP/s",
    "cuDNN TFLOP/s",
    "vs flash",
    "vs cuDNN",
]
NA = "n/a"


def parse_line(line):
    # Progress output may use carriage returns; only the last segment matters.
    line = line.rstrip("\n").split("\r")[-1].strip()
    if line.startswith(PREFIX):
        line = line[len(PREFIX):].strip()
    if not line.startswith("{"):
        return None
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(rec, dict) or "impl" not in rec:
        return None
    return rec


def as_bool(value):
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)


def key_of(rec):
    try:
        return (
            str(rec.get("dtype", "bf16")),
            int(rec["head_dim"]),
            int(rec["seqlen"]),
            as_bool(rec.get("causal", False)),
        )
    except (KeyError, TypeError, ValueError):
        return None


def number(value):
    if isinstance(value, bool) or value is None:
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if x == x and x not in (float("inf"), float("-inf")) else None


def ok(rec):
    return rec is not None and not rec.get("error") and number(rec.get("ms")) is not None


def tflops_of(rec):
    """TFLOP/s of a record, recomputed from ms and the shape when absent."""
    if not ok(rec):
        return None
    t = number(rec.get("tflops"))
    if t is not None:
        return t
    ms = number(rec.get("ms"))
    try:
        b, h, s, d = (int(rec[f]) for f in ("batch", "heads", "seqlen", "head_dim"))
    except (KeyError, TypeError, ValueError):
        return None
    if not ms or ms <= 0:
        return None
    flops = 4.0 * b * h * s * s * d
    if as_bool(rec.get("causal", False)):
        flops /= 2.0
    return flops / ms / 1e9


def load(paths):
    table = {}  # key -> impl -> record
    devices = []
    for path in paths:
        try:
            fh = open(path, encoding="utf-8", errors="replace")
        except OSError as exc:
            print(f"warning: cannot read {path}: {exc}", file=sys.stderr)
            continue
        with fh:
            for line in fh:
                rec = parse_line(line)
                if rec is None:
                    continue
                key = key_of(rec)
                if key is None:
                    continue
                dev = rec.get("device")
                if dev and dev not in devices:
                    devices.append(dev)
                slot = table.setdefault(key, {})
                impl = str(rec["impl"])
                # Keep the last successful record; an error only fills an empty slot.
                if ok(rec) or not ok(slot.get(impl)):
                    slot[impl] = rec
    return table, devices


def fmt(value, spec):
    return NA if value is None else format(value, spec)


def ratio(ours, theirs):
    if ours is None or theirs is None or theirs <= 0:
        return NA
    return f"{ours / theirs:.2f}x"


def render_table(rows):
    lines = [
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---:" for _ in COLUMNS) + "|",
    ]
    for key, impls in rows:
        _, d, s, causal = key
        lf = impls.get("longflash")
        lf_ms = number(lf.get("ms")) if ok(lf) else None
        lf_t = tflops_of(lf)
        fl_t = tflops_of(impls.get("sdpa_flash"))
        cu_t = tflops_of(impls.get("sdpa_cudnn"))
        cells = [
            str(d),
            "yes" if causal else "no",
            str(s),
            fmt(lf_ms, ".3f"),
            fmt(lf_t, ".1f"),
            fmt(fl_t, ".1f"),
            fmt(cu_t, ".1f"),
            ratio(lf_t, fl_t),
            ratio(lf_t, cu_t),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", help="JSON-lines result files")
    p.add_argument("--md", metavar="FILE", help="also write the output to FILE")
    args = p.parse_args()

    table, devices = load(args.files)
    if not table:
        print("error: no result records found", file=sys.stderr)
        return 1

    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    device_text = ", ".join(devices) if devices else "unknown device"
    out = [f"Device: {device_text}; date: {date} (UTC)", ""]

    # Sorted by head_dim, causal, seqlen; one table per dtype when several are present.
    keys = sorted(table, key=lambda k: (k[0], k[1], k[3], k[2]))
    dtypes = []
    for k in keys:
        if k[0] not in dtypes:
            dtypes.append(k[0])
    for i, dt in enumerate(dtypes):
        if len(dtypes) > 1:
            if i:
                out.append("")
            out.append(f"dtype: {dt}")
            out.append("")
        out.extend(render_table([(k, table[k]) for k in keys if k[0] == dt]))

    text = "\n".join(out) + "\n"
    sys.stdout.write(text)
    if args.md:
        with open(args.md, "w", encoding="utf-8") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
