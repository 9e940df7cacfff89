#!/usr/bin/env python3
"""Forward time and memory of "two-matrix" ReRoPE / Leaky ReRoPE attention in PyTorch.

This is the straightforward formulation of ReRoPE (Su, 2023): two full score
matrices are materialized and merged elementwise, so time and memory grow with
seqlen^2. Inputs are UN-rotated q, k, v of shape [batch, heads, seqlen, head_dim]
(bf16, torch.randn), causal, positions p = 0 .. seqlen-1.

RoPE: half-split (LLaMA / NeoX rotate_half) over the full head_dim, base 10000,
inv_freq = 1 / base^(2i/d); cos / sin and the rotation are computed in float32
and the rotated tensors are cast back to bf16. R_x denotes rotation by the
(possibly fractional) position x.

  ReRoPE (window w):            q1 = R_p q,  k1 = R_p k
                                q2 = R_w q,  k2 = k
  Leaky ReRoPE (window w, k):   q1 = R_p q,  k1 = R_p k
                                q2 = R_{p/k + w - w/k} q,  k2 = R_{p/k} k

  scores1 = q1 @ k1^T,  scores2 = q2 @ k2^T               (bf16 matmuls)
  rel     = p_i - p_j
  scores  = where(rel < w, scores1, scores2) * 1/sqrt(d)
  scores[rel < 0] = -inf                                   (causal)
  out     = softmax(scores, float32).to(bf16) @ v

One timed call covers everything from the un-rotated inputs: the cos / sin
tables, the rotations, the two [s, s] boolean masks, both score matrices, the
merge, the softmax and the output matmul.

Memory. By default all batch*heads rows are processed at once (full
[b, h, s, s] score matrices) and each dead intermediate is freed as soon as it
is no longer needed, which peaks at about three bf16 [b, h, s, s] buffers.
--keep-intermediates instead keeps scores1 / scores2 / the merged scores alive
until the softmax is done, as the local variables of the reference LLaMA
attention patch do (about six such buffers). --head-chunk N processes N of the
batch*heads slices at a time, which divides the quadratic memory by
batch*heads/N. torch.cuda.OutOfMemoryError is caught and reported.

Output: one JSON line per (mode, seqlen) on stdout, also appended to --out:

    {"impl": "torch_two_matrix", "mode": "rerope", "seqlen": 8192,
     "batch": 1, "heads": 16, "head_dim": 128, "window": 2048, "leak": null,
     "dtype": "bf16", "causal": true, "head_chunk": null,
     "intermediates": "freed", "ms": 12.3, "peak_mem_gib": 6.1,
     "device": "NVIDIA H100 80GB HBM3"}

"leak" is null for mode rerope. A config that does not fit has "ms": null and
"error": "OOM ...". peak_mem_gib is torch.cuda.max_memory_allocated() / 2^30,
reset before each config (q, k, v included).

--max-context additionally finds, per mode, the longest power-of-two seqlen
(4096, 8192, ... up to 262144) at which one forward runs without OOM:

    {"impl": "torch_two_matrix", "max_seqlen": 16384, "mode": "rerope",
     "device": ..., "first_failed_seqlen": 32768, "failure": "OOM ...", ...}

max_seqlen is null when even 4096 fails; first_failed_seqlen is null when
every length up to 262144 ran.

--check first compares both modes, at a small size, against an independent
float32 reference that rotates q by the effective relative position of every
(query, key) pair; it exits with status 1 if the error is too large.

Usage:
    python3 benches/peer_rerope.py --out rerope_peer.jsonl
    python3 benches/peer_rerope.py --seqlens 4096,8192 --modes leaky --leak 16
    python3 benches/peer_rerope.py --seqlens '' --max-context --out rerope_peer.jsonl
    python3 benches/peer_rerope.py --check --head-chunk 4 --seqlens 32768
"""

import argparse
import gc
import json
import math
import sys

import torch

from peer_timing import median_ms

IMPL = "torch_two_matrix"
ROPE_BASE = 10000.0
DTYPE = torch.bfloat16
MAX_CONTEXT_START = 4096
MAX_CONTEXT_LIMIT = 262144
MODES = ("rerope", "leaky")


# ---------------------------------------------------------------------------
# command line


def int_list(text):
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", type=int_list, default=[4096, 8192, 16384, 32768],
                   help="comma-separated sequence lengths to time (default 4096,8192,16384,32768; "
                        "'' times none)")
    p.add_argument("--head-dim", type=int, default=128, help="head dimension (default 128)")
    p.add_argument("--heads", type=int, default=16, help="number of heads (default 16)")
    p.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    p.add_argument("--window", type=int, default=2048, help="ReRoPE window w (default 2048)")
    p.add_argument("--leak", type=float, default=16.0, help="Leaky ReRoPE factor k (default 16)")
    p.add_argument("--modes", default="rerope,leaky", help="comma-separated subset of rerope,leaky")
    p.add_argument("--reps", type=int, default=5, help="timed calls per config (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per config (default 2)")
    p.add_argument("--gap-ms", type=float, default=0.0,
                   help="idle GPU time before the warm-up (the burst protocol; default 0)")
    p.add_argument("--warmup-ms", type=float, default=0.0,
                   help="calls for this much wall time after the warm-up (the sustained "
                        "protocol; default 0)")
    p.add_argument("--head-chunk", type=int, default=0, metavar="N",
                   help="process N of the batch*heads slices at a time (default 0: all at once)")
    p.add_argument("--keep-intermediates", action="store_true",
                   help="keep both score matrices and the merged scores alive through the softmax, "
                        "like the locals of the reference attention patch")
    p.add_argument("--max-context", action="store_true",
                   help="also find the longest power-of-two seqlen (4096..262144) that runs one forward")
    p.add_argument("--check", action="store_true",
                   help="first check both modes against a float32 pairwise reference at a small size")
    p.add_argument("--seed", type=int, default=0, help="torch.manual_seed (default 0)")
    p.add_argument("--out", metavar="FILE", help="also append the JSON lines to FILE")
    args = p.parse_args()

    if args.reps < 1:
        p.error("--reps must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.head_dim <= 0 or args.head_dim % 2:
        p.error("--head-dim must be a positive even number")
    if args.heads < 1 or args.batch < 1:
        p.error("--heads and --batch must be >= 1")
    if args.window < 1:
        p.error("--window must be >= 1")
    if not (args.leak > 0 and math.isfinite(args.leak)):
        p.error("--leak must be a finite number > 0")
    if args.head_chunk < 0:
        p.error("--head-chunk must be >= 0")
    if any(s < 1 for s in args.seqlens):
        p.error("--seqlens must be positive")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        p.error(f"unknown mode(s): {', '.join(unknown)}")
    if not modes:
        p.error("--modes is empty")
    args.mode_list = list(dict.fromkeys(modes))
    if args.leak == int(args.leak):
        args.leak = int(args.leak)
    return args


# ---------------------------------------------------------------------------
# RoPE


def inv_freq_for(head_dim, device):
    exponent = torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim
    return 1.0 / (ROPE_BASE ** exponent)


def rope_tables(positions, inv_freq):
    """float32 cos, sin of shape [len(positions), head_dim] (half-split layout)."""
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x, cos, sin):
    """Rotate x [..., s, d] by per-position tables [s, d] (or [1, d]); float32 math, x.dtype out."""
    xf = x.to(torch.float32)
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


# ---------------------------------------------------------------------------
# the two-matrix attention


def two_matrix_attention(q, k, v, mode, window, leak, head_chunk=0, keep_intermediates=False):
    b, h, s, d = q.shape
    device = q.device
    scale = 1.0 / math.sqrt(d)

    pos = torch.arange(s, device=device, dtype=torch.float32)
    inv_freq = inv_freq_for(d, device)

    cos1, sin1 = rope_tables(pos, inv_freq)
    q1 = apply_rope(q, cos1, sin1)
    k1 = apply_rope(k, cos1, sin1)
    del cos1, sin1
    if mode == "rerope":
        cos_q, sin_q = rope_tables(torch.full((1,), float(window), device=device), inv_freq)
        q2 = apply_rope(q, cos_q, sin_q)
        k2 = k
        del cos_q, sin_q
    elif mode == "leaky":
        cos_q, sin_q = rope_tables(pos / leak + (window - window / leak), inv_freq)
        cos_k, sin_k = rope_tables(pos / leak, inv_freq)
        q2 = apply_rope(q, cos_q, sin_q)
        k2 = apply_rope(k, cos_k, sin_k)
        del cos_q, sin_q, cos_k, sin_k
    else:
        raise ValueError(f"unknown mode {mode!r}")

    # rel = p_i - p_j with p = arange(s); triu(diagonal=t) keeps j - i >= t.
    #   rel < w  <=>  j - i >= 1 - w        rel < 0  <=>  j - i >= 1
    ones = torch.ones(s, s, dtype=torch.bool, device=device)
    in_window = torch.triu(ones, diagonal=1 - window)
    future = torch.triu(ones, diagonal=1)
    del ones

    bh = b * h
    q1 = q1.reshape(bh, s, d)
    k1 = k1.reshape(bh, s, d)
    q2 = q2.reshape(bh, s, d)
    k2 = k2.reshape(bh, s, d)
    vv = v.reshape(bh, s, d)
    step = bh if head_chunk <= 0 or head_chunk >= bh else head_chunk

    out = None if step == bh else torch.empty((bh, s, d), device=device, dtype=v.dtype)
    for start in range(0, bh, step):
        rows = slice(start, start + step)
        scores1 = torch.matmul(q1[rows], k1[rows].transpose(-1, -2))
        scores2 = torch.matmul(q2[rows], k2[rows].transpose(-1, -2))
        scores = torch.where(in_window, scores1, scores2)
        if not keep_intermediates:
            del scores1, scores2
        scores.mul_(scale)
        scores.masked_fill_(future, float("-inf"))
        probs32 = torch.softmax(scores, dim=-1, dtype=torch.float32)
        if not keep_intermediates:
            del scores
        probs = probs32.to(v.dtype)
        del probs32
        if keep_intermediates:
            del scores1, scores2, scores
        part = torch.matmul(probs, vv[rows])
        del probs
        if out is None:
            out = part
        else:
            out[rows] = part
        del part
    return out.view(b, h, s, d)


# ---------------------------------------------------------------------------
# independent float32 reference (for --check)


def pairwise_reference(q, k, v, mode, window, leak):
    """Every (i, j) logit as (R_r q_i) . k_j with r the effective relative position."""
    b, h, s, d = q.shape
    device = q.device
    qf, kf, vf = q.float(), k.float(), v.float()
    idx = torch.arange(s, device=device, dtype=torch.float32)
    rel = idx[:, None] - idx[None, :]
    if mode == "rerope":
        far = torch.full_like(rel, float(window))
    else:
        far = window + (rel - window) / leak
    r = torch.where(rel < window, rel, far)
    angles = r[..., None] * inv_freq_for(d, device)  # [s, s, d/2]
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = emb.cos(), emb.sin()  # [s, s, d]
    qi = qf[:, :, :, None, :]  # [b, h, s, 1, d]
    rq = qi * cos + rotate_half(qi) * sin  # [b, h, s, s, d]
    logits = (rq * kf[:, :, None, :, :]).sum(-1) / math.sqrt(d)
    logits = logits.masked_fill(rel < 0, float("-inf"))
    return torch.softmax(logits, dim=-1) @ vf


def run_checks(head_dim, emit_err):
    torch.manual_seed(1234)
    b, h, s, w, leak = 1, 2, 384, 100, 4
    q = torch.randn(b, h, s, head_dim, device="cuda", dtype=DTYPE)
    k = torch.randn(b, h, s, head_dim, device="cuda", dtype=DTYPE)
    v = torch.randn(b, h, s, head_dim, device="cuda", dtype=DTYPE)
    tol = 5e-2
    ok = True
    for mode in MODES:
        ref = pairwise_reference(q, k, v, mode, w, leak)
        for chunk, keep in ((0, False), (1, True)):
            got = two_matrix_attention(q, k, v, mode, w, leak, head_chunk=chunk, keep_intermediates=keep)
            err = (got.float() - ref).abs().max().item()
            good = math.isfinite(err) and err < tol
            ok &= good
            emit_err(json.dumps({"check": mode, "seqlen": s, "window": w, "leak": leak,
                                 "head_dim": head_dim, "head_chunk": chunk or None,
                                 "keep_intermediates": keep, "max_abs_err": err,
                                 "tol": tol, "ok": good}))
    del q, k, v
    return ok


# ---------------------------------------------------------------------------
# running


def short_error(exc, limit=240):
    text = f"{type(exc).__name__}: {exc}".strip()
    first = next((line.strip() for line in text.splitlines() if line.strip()), text)
    if len(first) > limit:
        first = first[: limit - 3] + "..."
    return first


def describe_failure(exc):
    msg = short_error(exc)
    if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in msg.lower():
        return "OOM " + msg, True
    return msg, False


def cleanup():
    gc.collect()
    try:
        torch.cuda.synchronize()
    except Exception:
        pass
    torch.cuda.empty_cache()


def make_inputs(batch, heads, seqlen, head_dim):
    shape = (batch, heads, seqlen, head_dim)
    q = torch.randn(shape, device="cuda", dtype=DTYPE)
    k = torch.randn(shape, device="cuda", dtype=DTYPE)
    v = torch.randn(shape, device="cuda", dtype=DTYPE)
    return q, k, v


def time_config(args, mode, seqlen):
    """(median ms or None, error or None, peak GiB)."""
    cleanup()
    torch.cuda.reset_peak_memory_stats()
    ms, error = None, None
    q = k = v = out = None

    def fwd():
        return two_matrix_attention(q, k, v, mode, args.window, args.leak,
                                    head_chunk=args.head_chunk,
                                    keep_intermediates=args.keep_intermediates)

    try:
        q, k, v = make_inputs(args.batch, args.heads, seqlen, args.head_dim)
        # benches/peer_timing.py: the README's protocols, as the other peers and ours (each
        # call's output is dropped as soon as it returns).
        ms = median_ms(fwd, args.warmup, args.reps, args.gap_ms, args.warmup_ms)
    except Exception as exc:  # OOM above all; anything else is reported too
        error, _ = describe_failure(exc)
    out = None
    peak = torch.cuda.max_memory_allocated() / 2**30
    del q, k, v, out
    cleanup()
    return ms, error, peak


def runs_once(args, mode, seqlen):
    """(ok, error or None, is_oom, peak GiB) for a single forward."""
    cleanup()
    torch.cuda.reset_peak_memory_stats()
    ok, error, oom = False, None, False
    q = k = v = out = None
    try:
        q, k, v = make_inputs(args.batch, args.heads, seqlen, args.head_dim)
        out = two_matrix_attention(q, k, v, mode, args.window, args.leak,
                                   head_chunk=args.head_chunk,
                                   keep_intermediates=args.keep_intermediates)
        torch.cuda.synchronize()
        ok = True
    except Exception as exc:
        error, oom = describe_failure(exc)
    out = None
    peak = torch.cuda.max_memory_allocated() / 2**30
    del q, k, v, out
    cleanup()
    return ok, error, oom, peak


def base_record(args, mode, device):
    return {
        "impl": IMPL,
        "mode": mode,
        "batch": args.batch,
        "heads": args.heads,
        "head_dim": args.head_dim,
        "window": args.window,
        "leak": args.leak if mode == "leaky" else None,
        "dtype": "bf16",
        "causal": True,
        "head_chunk": args.head_chunk or None,
        "intermediates": "kept" if args.keep_intermediates else "freed",
        "device": device,
    }


def main():
    args = parse_args()
    if not torch.cuda.is_available():
        print("error: no CUDA device available", file=sys.stderr, flush=True)
        return 1
    device = torch.cuda.get_device_name()
    out_file = open(args.out, "a", encoding="utf-8") if args.out else None

    def emit(rec):
        line = json.dumps(rec)
        print(line, flush=True)
        if out_file is not None:
            out_file.write(line + "\n")
            out_file.flush()

    try:
        if args.check:
            ok = run_checks(args.head_dim, lambda line: print(line, file=sys.stderr, flush=True))
            cleanup()
            if not ok:
                print("error: two-matrix attention disagrees with the pairwise reference",
                      file=sys.stderr, flush=True)
                return 1

        torch.manual_seed(args.seed)
        for mode in args.mode_list:
            for seqlen in args.seqlens:
                ms, error, peak = time_config(args, mode, seqlen)
                rec = base_record(args, mode, device)
                rec.update(seqlen=seqlen,
                           ms=None if ms is None else round(ms, 4),
                           peak_mem_gib=round(peak, 3))
                if error is not None:
                    rec["error"] = error
                emit(rec)

        if args.max_context:
            for mode in args.mode_list:
                best, best_peak, failed_at, failure = None, None, None, None
                seqlen = MAX_CONTEXT_START
                while seqlen <= MAX_CONTEXT_LIMIT:
                    ok, error, _oom, peak = runs_once(args, mode, seqlen)
                    print(json.dumps({"probe": mode, "seqlen": seqlen, "ok": ok,
                                      "peak_mem_gib": round(peak, 3), "error": error}),
                          file=sys.stderr, flush=True)
                    if not ok:
                        failed_at, failure = seqlen, error
                        break
                    best, best_peak = seqlen, peak
                    seqlen *= 2
                rec = base_record(args, mode, device)
                rec.update(max_seqlen=best,
                           peak_mem_gib=None if best_peak is None else round(best_peak, 3),
                           first_failed_seqlen=failed_at,
                           failure=failure,
                           search=[MAX_CONTEXT_START, MAX_CONTEXT_LIMIT])
                emit(rec)
    finally:
        if out_file is not None:
            out_file.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
