#!/usr/bin/env python3
"""The Focused-Transformer memory layer in PyTorch, as the long_llama code computes it, timed
on the shapes of benches/memory.rs.

LongLlamaAttention.forward (src/modeling_longllama.py of CStanKonrad/long_llama): queries and
local keys rotated with RoPE at window-relative positions (0 .. W-1, half-split pairs, base
10000), memory keys not rotated; scores Q K_local^T / sqrt(d) plus the causal mask and
Q K_mem^T / sqrt(d) (every memory entry visible here), concatenated along the keys, one softmax
in float32, cast back to bf16, times [V_local; V_mem]. The scores are materialized in float32:
[heads, W, W + M] per batch entry, the cost the memory kernel avoids. --head-chunk N runs N
heads at a time (default: all at once, as the released code does); a configuration that does
not fit reports "ms": null and the OOM. Timing as benches/peer_timing.py (--gap-ms, --warmup-ms:
the README's burst and sustained protocols).

--top-k K times the kNN variant (the Focused Transformer paper's smaller models, Memorizing
Transformer style): torch.topk over the f32 memory scores, the selected values gathered, one
softmax over [local | top k].

--check DIR compares instead of timing: DIR holds what `LONGFLASH_BENCH_DUMP=DIR
benches/memory` wrote (random inputs, batch 1, and longflash's outputs of the full layer, the
full layer with a memory mask, and the top-k layer). Each is recomputed here as the long_llama
code computes it (bf16 tensors, f32 scores and softmax; the mask as hidden scores) and in f64
from the same bf16 inputs (the rotations too); longflash passes where its largest error
against the f64 result is within twice this layer's plus 2^-10 (the correctness rule of the
crate's tests). One JSON line per case.

Output: one JSON line per memory length on stdout, also appended to --out:
  {"impl": "torch_fot_memory", "memory": 262144, "window": 2048, "heads": 16, "head_dim": 128,
   "head_chunk": null, "ms": 123.4, "peak_mem_gib": 40.1, "device": "..."}
"""
import argparse
import json
import math
import os

import torch

from peer_timing import median_ms


def rope_tables(w, d, device):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
    t = torch.arange(w, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x.float() * cos + rot.float() * sin).to(x.dtype)


def scores(q, k, mk, cos, sin):
    """The rotated queries, the local scores (causal) and the memory scores, f32."""
    d = q.shape[-1]
    w = q.shape[-2]
    q = rotate(q, cos, sin)
    k = rotate(k, cos, sin)
    local = torch.matmul(q, k.transpose(-1, -2)).float() / math.sqrt(d)
    causal = torch.ones(w, w, dtype=torch.bool, device=q.device).triu(1)
    local = local.masked_fill(causal, float("-inf"))
    mem = torch.matmul(q, mk.transpose(-1, -2)).float() / math.sqrt(d)
    return q, local, mem


def layer(q, k, v, mk, mv, cos, sin, visible=None):
    q, local, mem = scores(q, k, mk, cos, sin)
    if visible is not None:
        mem = mem.masked_fill(~visible, float("-inf"))
    s = torch.cat([local, mem], dim=-1)
    del local, mem
    p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    del s
    return torch.matmul(p, torch.cat([v, mv], dim=-2))


def layer_top_k(q, k, v, mk, mv, cos, sin, top_k):
    """The kNN memory variant: each query's top_k memory scores (torch.topk over the f32
    [heads, W, M] scores), their values gathered, one softmax over [local | top k]."""
    w = q.shape[-2]
    q, local, mem = scores(q, k, mk, cos, sin)
    top, idx = torch.topk(mem, top_k, dim=-1)
    del mem
    p = torch.softmax(torch.cat([local, top], dim=-1), dim=-1, dtype=torch.float32).to(q.dtype)
    b, h = q.shape[0], q.shape[1]
    # [b, h, w, top_k, d]: each query's selected memory values.
    gathered = mv[torch.arange(b, device=q.device)[:, None, None, None],
                  torch.arange(h, device=q.device)[None, :, None, None], idx]
    out = torch.matmul(p[..., :w], v)
    return out + torch.einsum("bhwk,bhwkd->bhwd", p[..., w:], gathered)


def layer_f64(q, k, v, mk, mv, visible=None, top_k=None):
    """The same layer in f64 from the same bf16 inputs: rotations, scores and softmax."""
    q, k, v, mk, mv = (x.double() for x in (q, k, v, mk, mv))
    w, d = q.shape[-2], q.shape[-1]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, device=q.device, dtype=torch.float64) / d))
    freqs = torch.outer(torch.arange(w, device=q.device, dtype=torch.float64), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()

    def rot(x):
        half = d // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    q, k = rot(q), rot(k)
    local = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(d)
    causal = torch.ones(w, w, dtype=torch.bool, device=q.device).triu(1)
    local = local.masked_fill(causal, float("-inf"))
    mem = torch.matmul(q, mk.transpose(-1, -2)) / math.sqrt(d)
    if visible is not None:
        mem = mem.masked_fill(~visible, float("-inf"))
    if top_k is None:
        p = torch.softmax(torch.cat([local, mem], dim=-1), dim=-1)
        return torch.matmul(p, torch.cat([v, mv], dim=-2))
    top, idx = torch.topk(mem, top_k, dim=-1)
    p = torch.softmax(torch.cat([local, top], dim=-1), dim=-1)
    b, h = q.shape[0], q.shape[1]
    gathered = mv[torch.arange(b, device=q.device)[:, None, None, None],
                  torch.arange(h, device=q.device)[None, :, None, None], idx]
    return torch.matmul(p[..., :w], v) + torch.einsum("bhwk,bhwkd->bhwd", p[..., w:], gathered)


def check(dirname, dev):
    """Compares longflash's outputs in `dirname` with this layer and with the f64 layer."""

    def raw(name, dtype):
        with open(os.path.join(dirname, name), "rb") as f:
            return torch.frombuffer(bytearray(f.read()), dtype=dtype)

    meta = json.load(open(os.path.join(dirname, "meta.json")))
    w, m, h, d, top_k = (meta[x] for x in ("window", "memory", "heads", "head_dim", "top_k"))

    def load(name, n):
        t = raw(name, torch.int16).view(torch.bfloat16).reshape(1, n, h, d)
        return t.permute(0, 2, 1, 3).contiguous().to(dev)  # [1, heads, n, d]

    q, k, v = (load(f"{x}.bin", w) for x in ("q", "k", "v"))
    mk, mv = (load(f"{x}.bin", m) for x in ("mem_k", "mem_v"))
    visible = (raw("mask.bin", torch.uint8) != 0).to(dev)
    cos, sin = rope_tables(w, d, dev)
    ok = True
    for case in ("full", "masked", "top_k"):
        vis = visible if case == "masked" else None
        tk = top_k if case == "top_k" else None
        ours = load(f"out_{case}.bin", w).double()
        if tk:
            peer = layer_top_k(q, k, v, mk, mv, cos, sin, tk).double()
        else:
            peer = layer(q, k, v, mk, mv, cos, sin, vis).double()
        ref = layer_f64(q, k, v, mk, mv, vis, tk)
        e_ours, e_peer = (ours - ref).abs(), (peer - ref).abs()
        passes = bool(e_ours.max() <= 2 * e_peer.max() + 2 ** -10)
        ok &= passes
        rec = {"check": case, "window": w, "memory": m, "heads": h, "head_dim": d,
               "top_k": tk, "max_err_ours": round(e_ours.max().item(), 6),
               "max_err_peer": round(e_peer.max().item(), 6),
               "mean_err_ours": round(e_ours.mean().item(), 7),
               "mean_err_peer": round(e_peer.mean().item(), 7),
               "max_diff_ours_peer": round((ours - peer).abs().max().item(), 6),
               "passes": passes, "device": meta["device"]}
        print(json.dumps(rec), flush=True)
    return ok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--memory", default="65536,262144,1048576")
    ap.add_argument("--window", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--head-chunk", type=int, default=None)
    ap.add_argument("--top-k", type=int, default=None,
                    help="the kNN variant: each query's top k memory entries")
    ap.add_argument("--iters", type=int, default=5, help="timed calls per memory length")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls first")
    ap.add_argument("--gap-ms", type=float, default=0.0,
                    help="idle GPU time before the warm-up (the burst protocol)")
    ap.add_argument("--warmup-ms", type=float, default=0.0,
                    help="calls for this much wall time after the warm-up (the sustained protocol)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--check", default=None,
                    help="compare with longflash's outputs in this directory instead of timing")
    a = ap.parse_args()
    dev = torch.device("cuda")
    if a.check:
        raise SystemExit(0 if check(a.check, dev) else 1)
    name = torch.cuda.get_device_name(dev)
    h, d, w = a.heads, a.head_dim, a.window
    cos, sin = rope_tables(w, d, dev)
    for m in [int(x) for x in a.memory.split(",")]:
        rec = {"impl": "torch_fot_memory" + (f"_top{a.top_k}" if a.top_k else ""),
               "top_k": a.top_k, "memory": m, "window": w, "heads": h, "head_dim": d,
               "head_chunk": a.head_chunk, "device": name}
        try:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            mk = mv = q = k = v = None
            g = torch.Generator(device=dev).manual_seed(0)
            mk = torch.randn(1, h, m, d, device=dev, dtype=torch.bfloat16, generator=g)
            mv = torch.randn(1, h, m, d, device=dev, dtype=torch.bfloat16, generator=g)
            q, k, v = (torch.randn(1, h, w, d, device=dev, dtype=torch.bfloat16, generator=g)
                       for _ in range(3))
            chunk = a.head_chunk or h

            def one(i):
                args = (q[:, i:i + chunk], k[:, i:i + chunk], v[:, i:i + chunk],
                        mk[:, i:i + chunk], mv[:, i:i + chunk], cos, sin)
                return layer_top_k(*args, a.top_k) if a.top_k else layer(*args)

            def run():
                return torch.cat([one(i) for i in range(0, h, chunk)], dim=1)

            # benches/peer_timing.py: the README's protocols, as the other peers and ours.
            rec["ms"] = round(median_ms(run, a.warmup, a.iters, a.gap_ms, a.warmup_ms), 4)
        except torch.cuda.OutOfMemoryError as err:
            rec["ms"] = None
            rec["error"] = "OOM " + str(err).split("\n")[0][:160]
        rec["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        mk = mv = q = k = v = None
        torch.cuda.empty_cache()
        line = json.dumps(rec)
        print(line, flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
