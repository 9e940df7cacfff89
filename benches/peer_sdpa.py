#!/usr/bin/env python3
"""Forward throughput of PyTorch SDPA (FlashAttention and cuDNN backends).

Shapes match benches/forward.rs: batch * seqlen = 16384 tokens, hidden 2048
(heads = 2048 // head_dim), head dims 64 / 128 / 256, seqlen 512 to 16384,
causal and not. Tensors are [batch, heads, seqlen, head_dim].

Each (backend, config) prints one JSON object per line (and writes it to
--out when given), in the same schema as the `RESULT` lines of the Rust
bench, so benches/compare.py can join them:

    {"impl": "sdpa_flash", "dtype": "bf16", "batch": 8, "heads": 16,
     "seqlen": 2048, "head_dim": 128, "causal": false, "ms": 1.23,
     "tflops": 456.7, "device": "NVIDIA H100 80GB HBM3"}

A backend that cannot run a config gives a line with "error" and "ms": null.

Usage:
    python3 benches/peer_sdpa.py --out peer.jsonl
    python3 benches/peer_sdpa.py --head-dims 128 --seqlens 2048,4096 --causal yes
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peer_timing import settle, time_each  # noqa: E402

TOTAL_TOKENS = 16384
HIDDEN = 2048

BACKENDS = [
    ("sdpa_flash", SDPBackend.FLASH_ATTENTION),
    ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
]

DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16}


def int_list(text):
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--head-dims", type=int_list, default=[64, 128, 256],
                   help="comma-separated head dims (default 64,128,256)")
    p.add_argument("--seqlens", type=int_list, default=[512, 1024, 2048, 4096, 8192, 16384],
                   help="comma-separated sequence lengths (default 512..16384)")
    p.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    p.add_argument("--backends", default="flash,cudnn",
                   help="comma-separated subset of flash,cudnn (default both)")
    p.add_argument("--reps", type=int, default=30, help="timed calls per config (default 30)")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls per config (default 5)")
    p.add_argument("--warmup-ms", type=float, default=0.0,
                   help="after the warm-up calls, keep calling for this many ms of wall time, so that the "
                        "timed calls run at the clocks the GPU holds under sustained load (default 0)")
    p.add_argument("--gap-ms", type=float, default=0.0,
                   help="leave the GPU idle this many ms before each config's warm-up (default 0)")
    p.add_argument("--sync-each", action="store_true",
                   help="synchronize after every timed call instead of queueing them")
    p.add_argument("--out", metavar="FILE", help="also write the JSON lines to FILE (overwritten)")
    args = p.parse_args()
    if args.reps < 1:
        p.error("--reps must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    wanted = {b.strip() for b in args.backends.split(",") if b.strip()}
    unknown = wanted - {"flash", "cudnn"}
    if unknown:
        p.error(f"unknown backend(s): {', '.join(sorted(unknown))}")
    args.backend_list = [(name, be) for name, be in BACKENDS if name.split("_", 1)[1] in wanted]
    return args


def short_error(exc, limit=200):
    text = f"{type(exc).__name__}: {exc}".strip()
    # Keep the first non-empty line; SDPA warnings/errors can be long.
    first = next((line.strip() for line in text.splitlines() if line.strip()), text)
    if len(first) > limit:
        first = first[: limit - 3] + "..."
    return first


def time_config(backend, q, k, v, causal, args):
    """Milliseconds of single SDPA calls, each timed with CUDA events after the warm-up."""

    def call():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        del out

    with sdpa_kernel([backend]):
        settle(call, args.warmup, args.gap_ms, args.warmup_ms)
        return time_each(call, args.reps, args.sync_each)


def main():
    args = parse_args()
    if not torch.cuda.is_available():
        print("error: no CUDA device available", file=sys.stderr, flush=True)
        return 1

    device = torch.cuda.get_device_name()
    dtype = DTYPES[args.dtype]
    causals = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
    out_file = open(args.out, "w", encoding="utf-8") if args.out else None
    torch.manual_seed(0)

    def emit(rec):
        line = json.dumps(rec)
        print(line, flush=True)
        if out_file is not None:
            out_file.write(line + "\n")
            out_file.flush()

    try:
        for d in args.head_dims:
            if d <= 0 or HIDDEN % d != 0:
                print(f"skipping head_dim {d}: does not divide hidden {HIDDEN}", file=sys.stderr, flush=True)
                continue
            h = HIDDEN // d
            for s in args.seqlens:
                if s <= 0 or TOTAL_TOKENS % s != 0:
                    print(f"skipping seqlen {s}: does not divide {TOTAL_TOKENS} tokens", file=sys.stderr, flush=True)
                    continue
                b = TOTAL_TOKENS // s
                for causal in causals:
                    flops = 4.0 * b * h * s * s * d
                    if causal:
                        flops /= 2.0
                    q = k = v = None
                    for name, backend in args.backend_list:
                        rec = {
                            "impl": name,
                            "dtype": args.dtype,
                            "batch": b,
                            "heads": h,
                            "seqlen": s,
                            "head_dim": d,
                            "causal": causal,
                        }
                        try:
                            if q is None:
                                shape = (b, h, s, d)
                                q = torch.randn(shape, device="cuda", dtype=dtype)
                                k = torch.randn(shape, device="cuda", dtype=dtype)
                                v = torch.randn(shape, device="cuda", dtype=dtype)
                            times = time_config(backend, q, k, v, causal, args)
                            ms = statistics.median(times)
                            rec["ms"] = round(ms, 4)
                            rec["tflops"] = round(flops / ms / 1e9, 1) if ms > 0 else None
                            rec["min_ms"] = round(min(times), 4)
                            rec["max_ms"] = round(max(times), 4)
                            # When the timing ended, to set it beside a log of the GPU's clocks.
                            rec["end_unix_ms"] = int(time.time() * 1e3)
                        except Exception as exc:  # unsupported shape, missing backend, OOM, ...
                            rec["ms"] = None
                            rec["tflops"] = None
                            rec["error"] = short_error(exc)
                            try:
                                torch.cuda.synchronize()
                            except Exception:
                                pass
                        rec["device"] = device
                        emit(rec)
                    del q, k, v
                    torch.cuda.empty_cache()
    finally:
        if out_file is not None:
            out_file.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
