#!/usr/bin/env python3
"""Decoding with PyTorch SDPA's flash backend over a contiguous KV cache, the peer of
benches/decode.rs.

The shapes are the Rust bench's contiguous ones: bf16, head dim 128, 32 query heads over 8 (GQA)
or 32 (MHA) key/value heads, one query token per sequence, batch 1 / 8 / 64 / 256, cache lengths
1k to 128k tokens (skipped when K and V pass 24 GB). Q is [batch, 32, 1, 128] and K, V are
[batch, heads_kv, len, 128] (enable_gqa=True for GQA). One query token attends to every key, so
the call is not causal. Each shape prints one JSON object per line (and writes it to --out):

    {"impl": "sdpa_flash_decode", "batch": 8, "cache_len": 32768, "seqlen_q": 1, "heads_q": 32,
     "heads_kv": 8, "head_dim": 128, "ms": 0.123, "kv_gb": 1.07, "tb_per_s": 3.2,
     "device": "NVIDIA H200"}

A shape the backend cannot run gives a line with "error" and "ms": null.

Usage:
    python3 benches/peer_decode.py --out peer-decode.jsonl
"""

import argparse
import json
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from peer_timing import median_ms

HEAD_DIM = 128
HEADS_Q = 32
MAX_KV_BYTES = 24 << 30


def int_list(text):
    return [int(x) for x in text.replace(" ", "").split(",") if x]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int_list, default=[1, 8, 64, 256])
    p.add_argument("--lens", type=int_list, default=[1024, 8192, 32768, 131072])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--gap-ms", type=float, default=0.0,
                   help="leave the GPU idle this many ms before each timing (default 0)")
    p.add_argument("--warmup-ms", type=float, default=0.0,
                   help="after the warm-up calls, keep calling for this many ms of wall time (default 0)")
    p.add_argument("--out", help="also append the JSON lines to this file")
    args = p.parse_args()
    out = open(args.out, "a") if args.out else None
    device = torch.cuda.get_device_name(0)
    for heads_kv in (8, 32):
        for batch in args.batches:
            for length in args.lens:
                kv_bytes = 2 * batch * length * heads_kv * HEAD_DIM * 2
                if kv_bytes > MAX_KV_BYTES:
                    continue
                rec = {"impl": "sdpa_flash_decode", "batch": batch, "cache_len": length,
                       "seqlen_q": 1, "heads_q": HEADS_Q, "heads_kv": heads_kv,
                       "head_dim": HEAD_DIM, "kv_gb": round(kv_bytes / 1e9, 3), "device": device}
                try:
                    q = torch.randn(batch, HEADS_Q, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
                    k = torch.randn(batch, heads_kv, length, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
                    v = torch.randn_like(k)
                    gqa = heads_kv != HEADS_Q

                    def call():
                        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                            return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)

                    ms = median_ms(call, 3, args.reps, args.gap_ms, args.warmup_ms)
                    rec.update(ms=round(ms, 4), tb_per_s=round(kv_bytes / ms / 1e9, 3))
                    del q, k, v
                except Exception as e:  # a backend that cannot run the shape
                    rec.update(ms=None, error=f"{type(e).__name__}: {e}"[:300])
                torch.cuda.empty_cache()
                line = json.dumps(rec)
                print(line, flush=True)
                if out:
                    out.write(line + "\n")
    if out:
        out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
