#!/usr/bin/env python3
"""Peers of the variable-length forward (benches/varlen.rs), on the same shapes.

16384 tokens, 16 heads of 128, bf16, causal and not; sequences all of one length (512 to
16384) and one mixed batch (8192, 3000, 2048, 1000, 1024, 512, 300, 200, 100 and the rest),
FLOPs counted per sequence (4 * heads * len^2 * head_dim, halved when causal) as the Rust bench
counts them. Per shape:

  sdpa_flash_per_seq   PyTorch SDPA's flash backend called once per sequence, the way a caller
                       without a packed entry runs a ragged batch (the calls of one batch timed
                       together with CUDA events);
  torch_varlen         torch.nn.attention.varlen.varlen_attn on the packed tensors, where this
                       PyTorch has it;
  flash_attn_varlen    flash_attn.flash_attn_varlen_func, where the package is installed.

A peer that cannot run a shape gives a line with "error" and "ms": null. Each line is a JSON
object with "impl", "shape", "sequences", "tokens", "heads", "head_dim", "causal", "ms" and
"tflops", to join with the RESULT lines of benches/varlen.rs on (shape, causal).

Usage:
    python3 benches/peer_varlen.py --out varlen-peer.jsonl
"""

import argparse
import json
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from peer_timing import median_ms

TOKENS = 16384
HEADS = 16
HEAD_DIM = 128


def shapes():
    out = [(f"equal_{s}", [s] * (TOKENS // s)) for s in (512, 1024, 2048, 4096, 8192, 16384)]
    mixed = [8192, 3000, 2048, 1000, 1024, 512, 300, 200, 100]
    mixed.append(TOKENS - sum(mixed))
    out.append(("mixed", mixed))
    return out


def short_error(exc, limit=200):
    text = f"{type(exc).__name__}: {exc}".strip()
    first = next((line.strip() for line in text.splitlines() if line.strip()), text)
    return first if len(first) <= limit else first[: limit - 3] + "..."


def peers(q, k, v, lens, causal):
    """(name, callable or None, reason) for every peer."""
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), device="cuda",
                      dtype=torch.int32)
    starts = cu.tolist()
    max_len = max(lens)

    # Per sequence: [1, heads, len, head_dim] views of the packed [tokens, heads, head_dim].
    views = [
        (q[a:b].transpose(0, 1).unsqueeze(0), k[a:b].transpose(0, 1).unsqueeze(0),
         v[a:b].transpose(0, 1).unsqueeze(0))
        for a, b in zip(starts[:-1], starts[1:])
    ]

    def per_seq():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            for qs, ks, vs in views:
                F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal)

    out = [("sdpa_flash_per_seq", per_seq, None)]

    try:
        from torch.nn.attention.varlen import varlen_attn  # PyTorch 2.9+

        def torch_varlen():
            varlen_attn(q, k, v, cu, cu, max_len, max_len, is_causal=causal)

        out.append(("torch_varlen", torch_varlen, None))
    except Exception as exc:  # noqa: BLE001 - any import or signature problem
        out.append(("torch_varlen", None, short_error(exc)))

    try:
        from flash_attn import flash_attn_varlen_func

        def fa_varlen():
            flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=causal)

        out.append(("flash_attn_varlen", fa_varlen, None))
    except Exception as exc:  # noqa: BLE001
        out.append(("flash_attn_varlen", None, short_error(exc)))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--gap-ms", type=float, default=0.0,
                   help="leave the GPU idle this many ms before each timing (default 0)")
    p.add_argument("--warmup-ms", type=float, default=0.0,
                   help="after the warm-up calls, keep calling for this many ms of wall time (default 0)")
    p.add_argument("--out", metavar="FILE", help="also write the JSON lines to FILE (overwritten)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("error: no CUDA device available", file=sys.stderr, flush=True)
        return 1
    device = torch.cuda.get_device_name()
    out_file = open(args.out, "w", encoding="utf-8") if args.out else None
    torch.manual_seed(0)
    q, k, v = (torch.randn(TOKENS, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    for causal in (False, True):
        for name, lens in shapes():
            flops = sum(4.0 * HEADS * n * n * HEAD_DIM for n in lens) * (0.5 if causal else 1.0)
            for impl, fn, why in peers(q, k, v, lens, causal):
                rec = {"impl": impl, "shape": name, "sequences": len(lens), "tokens": TOKENS,
                       "heads": HEADS, "head_dim": HEAD_DIM, "causal": causal, "device": device}
                if fn is None:
                    rec.update(ms=None, tflops=None, error=why)
                else:
                    try:
                        ms = median_ms(fn, args.warmup, args.reps, args.gap_ms, args.warmup_ms)
                        rec.update(ms=round(ms, 4), tflops=round(flops / (ms * 1e-3) / 1e12, 1))
                    except Exception as exc:  # noqa: BLE001 - report, keep going
                        rec.update(ms=None, tflops=None, error=short_error(exc))
                line = json.dumps(rec)
                print(line, flush=True)
                if out_file is not None:
                    out_file.write(line + "\n")
    if out_file is not None:
        out_file.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
