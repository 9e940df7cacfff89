#!/usr/bin/env python3
"""Backward and forward + backward throughput of PyTorch SDPA (FlashAttention-2 and cuDNN backends).

Shapes match benches/backward.rs: batch * seqlen = 16384 tokens, hidden 2048
(heads = 2048 // head_dim), head dims 64 / 128 / 256, seqlen 512 to 16384,
causal and not. Tensors are [batch, heads, seqlen, head_dim].

FLOPs: the forward's 4 b h s^2 d (halved when causal); the backward counts 2.5
times that, forward + backward 3.5 times. Each (backend, config) prints two JSON
objects per line (and writes them to --out when given), in the schema of the
Rust bench's `RESULT` lines:

    {"impl": "sdpa_flash", "pass": "fwd_bwd", ...}      forward + backward
    {"impl": "sdpa_flash_bwd", "pass": "bwd", ...}      backward alone

so that `python3 benches/compare.py backward.txt peer_bwd.jsonl` gives the
forward + backward table (longflash against SDPA flash and cuDNN). The forward
+ backward step is `out = sdpa(q, k, v)` then `torch.autograd.grad(out, (q, k,
v), dout)`; the backward alone is the same grad call on a retained graph. A
backend that cannot run a config gives lines with "error" and "ms": null.

Usage:
    python3 benches/peer_sdpa_backward.py --out peer_bwd.jsonl
    python3 benches/peer_sdpa_backward.py --head-dims 128 --seqlens 2048,4096 --causal yes
"""

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peer_timing import median_ms  # noqa: E402

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
    p.add_argument("--reps", type=int, default=20, help="timed calls per config (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per config (default 3)")
    p.add_argument("--gap-ms", type=float, default=0.0,
                   help="leave the GPU idle this many ms before each timing (default 0)")
    p.add_argument("--warmup-ms", type=float, default=0.0,
                   help="after the warm-up calls, keep calling for this many ms of wall time (default 0)")
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
    first = next((line.strip() for line in text.splitlines() if line.strip()), text)
    if len(first) > limit:
        first = first[: limit - 3] + "..."
    return first


def time_backend(backend, q, k, v, dout, causal, warmup, reps, gap_ms=0.0, warmup_ms=0.0):
    """Median milliseconds of (forward + backward, backward alone) on one backend."""
    with sdpa_kernel([backend]):
        def step():
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            torch.autograd.grad(out, (q, k, v), dout)

        fwd_bwd = median_ms(step, warmup, reps, gap_ms, warmup_ms)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        def backward():
            torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)

        bwd = median_ms(backward, warmup, reps, gap_ms, warmup_ms)
        del out
    return fwd_bwd, bwd


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
                    fwd_flops = 4.0 * b * h * s * s * d
                    if causal:
                        fwd_flops /= 2.0
                    tensors = None
                    for name, backend in args.backend_list:
                        base = {
                            "dtype": args.dtype,
                            "batch": b,
                            "heads": h,
                            "seqlen": s,
                            "head_dim": d,
                            "causal": causal,
                        }
                        recs = [
                            dict(impl=name, **{"pass": "fwd_bwd"}, **base),
                            dict(impl=f"{name}_bwd", **{"pass": "bwd"}, **base),
                        ]
                        try:
                            if tensors is None:
                                shape = (b, h, s, d)
                                tensors = [torch.randn(shape, device="cuda", dtype=dtype, requires_grad=i < 3)
                                           for i in range(4)]
                            q, k, v, dout = tensors
                            times = time_backend(backend, q, k, v, dout, causal, args.warmup, args.reps,
                                                         args.gap_ms, args.warmup_ms)
                            for rec, ms, mult in zip(recs, times, (3.5, 2.5)):
                                rec["ms"] = round(ms, 4)
                                rec["tflops"] = round(mult * fwd_flops / ms / 1e9, 1) if ms > 0 else None
                        except Exception as exc:  # unsupported shape, missing backend, OOM, ...
                            for rec in recs:
                                rec["ms"] = None
                                rec["tflops"] = None
                                rec["error"] = short_error(exc)
                            try:
                                torch.cuda.synchronize()
                            except Exception:
                                pass
                        for rec in recs:
                            rec["device"] = device
                            emit(rec)
                    del tensors
                    torch.cuda.empty_cache()
    finally:
        if out_file is not None:
            out_file.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
