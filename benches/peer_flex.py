#!/usr/bin/env python3
"""Forward time of PyTorch FlexAttention on the block-sparse masks of the Rust bench.

The Rust sparse bench writes, for every mask NAME, into one directory:

    NAME.json         shape, pattern, density, element mask, longflash_ms
    NAME.offsets.i32  CSR row offsets (little-endian int32),
                      mask_batch * mask_heads * ceil(seqlen_q / 128) + 1 entries
    NAME.cols.i32     64-key block index of every listed block, sorted per row
    NAME.full.u8      per listed block: 1 = full (no element mask), 0 = partial

Row r of the CSR is (b * mask_heads + h) * nqb + qb. A mask with mask_batch or
mask_heads equal to 1 is shared across that dimension.

Each mask becomes a FlexAttention BlockMask with BLOCK_SIZE (128, 64) built
straight from the CSR (BlockMask.from_kv_blocks: partial blocks in kv_*, full
blocks in full_kv_*, the element mask as mask_mod). When that API is missing or
fails, create_block_mask is used with a mask_mod that also reads a dense block
layout. The compiled flex_attention is then timed on random bf16 q, k, v:
--warmup untimed calls (the first compiles), then --reps single calls, each
between CUDA events; the median is reported.

FLOPs count only the listed blocks, clipped to the sequence ends:
4 * head_dim * sum over (b, h, listed block) of rows_in_block * keys_in_block.

One JSON line per mask goes to stdout and is appended to --out:

    {"impl": "flex_attention", "name": ..., "pattern": ..., "density": ...,
     "seqlen": 16384, "head_dim": 128, "ms": 1.23, "tflops": 456.7,
     "longflash_ms": 0.98, "speedup_longflash_vs_flex": 1.26,
     "device": "NVIDIA H100 80GB HBM3", "path": "from_kv_blocks"}

A mask that fails (OOM, compile error, bad files) gives a line with "error"
and "ms": null; the run goes on. A Markdown summary table ends the run.

Usage:
    python3 benches/peer_flex.py --mask-dir target/sparse-masks --out flex.jsonl
    python3 benches/peer_flex.py --mask-dir DIR --only sliding --reps 50
    python3 benches/peer_flex.py --mask-dir DIR --check     # also verify outputs
"""

import argparse
import gc
import importlib
import json
import math
import os
import statistics
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peer_timing import settle, time_each  # noqa: E402

_flex_mod = importlib.import_module("torch.nn.attention.flex_attention")
flex_attention = _flex_mod.flex_attention

Q_BLOCK = 128
K_BLOCK = 64

DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "fp16": torch.float16}

# Every mask has its own shapes and mask_mod constants, so each one compiles
# anew. Keep Dynamo from giving up and silently running flex_attention eagerly
# (which materialises the full score matrix) once its recompile limit is hit.
for _knob in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
              "accumulated_cache_size_limit"):
    if hasattr(torch._dynamo.config, _knob):
        setattr(torch._dynamo.config, _knob, 4096)
if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
    torch._dynamo.config.fail_on_recompile_limit_hit = True

flex = torch.compile(flex_attention, dynamic=False)


# ----------------------------------------------------------------------------
# Command line


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mask-dir", required=True, metavar="DIR",
                   help="directory with NAME.json / NAME.offsets.i32 / NAME.cols.i32 / NAME.full.u8")
    p.add_argument("--out", metavar="FILE", help="append the JSON lines to FILE")
    p.add_argument("--only", metavar="SUBSTRING", action="append", default=[],
                   help="only masks whose name contains SUBSTRING (repeatable: any of them)")
    p.add_argument("--reps", type=int, default=20, help="timed calls per mask (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per mask, compilation included (default 3)")
    p.add_argument("--gap-ms", type=float, default=0.0,
                   help="leave the GPU idle this many ms before each mask's warm-up calls (default 0)")
    p.add_argument("--warmup-ms", type=float, default=0.0,
                   help="after the warm-up calls, keep calling for this many ms of wall time, so that the "
                        "timed calls run at the clocks the GPU holds under sustained load (default 0)")
    p.add_argument("--force-create-block-mask", action="store_true",
                   help="skip from_kv_blocks and build every mask with create_block_mask")
    p.add_argument("--check", action="store_true",
                   help="compare one or two (batch, head) slices against an fp32 reference "
                        "with the same token mask (only when seqlen_q * seqlen_k <= --check-max-elems)")
    p.add_argument("--check-max-elems", type=int, default=1 << 26,
                   help="largest seqlen_q * seqlen_k checked with --check (default 2^26)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.reps < 1:
        p.error("--reps must be >= 1")
    if args.warmup < 1:
        p.error("--warmup must be >= 1 (the first call compiles)")
    if not os.path.isdir(args.mask_dir):
        p.error(f"--mask-dir {args.mask_dir!r} is not a directory")
    return args


def short_error(exc, limit=200):
    text = f"{type(exc).__name__}: {exc}".strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # Inductor wraps the real cause; keep the line that names it when there is one.
    pick = lines[0] if lines else text
    for line in lines:
        if any(key in line for key in ("OutOfMemory", "out of memory", "ValueError", "RuntimeError",
                                       "divisible", "NotImplementedError", "CompilationError")):
            pick = line
            break
    return pick[:limit]


# ----------------------------------------------------------------------------
# Mask files


def read_array(path, dtype, itemsize):
    with open(path, "rb") as f:
        data = bytearray(f.read())
    if len(data) % itemsize != 0:
        raise ValueError(f"{os.path.basename(path)}: size {len(data)} is not a multiple of {itemsize}")
    if not data:
        return torch.empty(0, dtype=dtype)
    t = torch.frombuffer(data, dtype=dtype).clone()
    if itemsize > 1 and sys.byteorder == "big":
        t = t.view(torch.uint8).reshape(-1, itemsize).flip(-1).contiguous().view(dtype).reshape(-1)
    return t


def list_masks(mask_dir, only):
    names = []
    for entry in sorted(os.listdir(mask_dir)):
        if not entry.endswith(".json"):
            continue
        name = entry[: -len(".json")]
        if not os.path.exists(os.path.join(mask_dir, name + ".offsets.i32")):
            continue
        if only and not any(s in name for s in only):
            continue
        names.append(name)
    return names


class Mask:
    """One mask as written by the Rust bench, checked and decoded on the CPU."""

    def __init__(self, mask_dir, name):
        base = os.path.join(mask_dir, name)
        with open(base + ".json", "r", encoding="utf-8") as f:
            meta = json.load(f)
        self.meta = meta
        self.name = meta.get("name", name)
        self.pattern = meta.get("pattern")
        self.density = meta.get("density")
        self.seqlen_q = int(meta["seqlen_q"])
        self.seqlen_k = int(meta["seqlen_k"])
        self.batch = int(meta["batch"])
        self.heads = int(meta["heads"])
        self.head_dim = int(meta["head_dim"])
        self.dtype_name = meta.get("dtype", "bf16")
        self.longflash_ms = meta.get("longflash_ms")
        self.mask_batch = int(meta.get("mask_batch", 1))
        self.mask_heads = int(meta.get("mask_heads", 1))
        qb = int(meta.get("q_block", Q_BLOCK))
        kb = int(meta.get("k_block", K_BLOCK))
        if (qb, kb) != (Q_BLOCK, K_BLOCK):
            raise ValueError(f"block size ({qb}, {kb}) is not ({Q_BLOCK}, {K_BLOCK})")
        if self.dtype_name not in DTYPES:
            raise ValueError(f"unsupported dtype {self.dtype_name!r}")
        if self.mask_batch not in (1, self.batch) or self.mask_heads not in (1, self.heads):
            raise ValueError(f"mask_batch={self.mask_batch} / mask_heads={self.mask_heads} do not "
                             f"broadcast to batch={self.batch} / heads={self.heads}")

        elem = meta.get("element") or {}
        self.causal = bool(elem.get("causal", False))
        self.window_left = elem.get("window_left")
        self.window_right = elem.get("window_right")
        self.sink_tokens = int(elem.get("sink_tokens") or 0)
        if self.window_left is not None:
            self.window_left = int(self.window_left)
        if self.window_right is not None:
            self.window_right = int(self.window_right)

        self.nqb = -(-self.seqlen_q // Q_BLOCK)
        self.nkb = -(-self.seqlen_k // K_BLOCK)
        self.rows = self.mask_batch * self.mask_heads * self.nqb

        offsets = read_array(base + ".offsets.i32", torch.int32, 4).to(torch.int64)
        cols = read_array(base + ".cols.i32", torch.int32, 4).to(torch.int64)
        full = read_array(base + ".full.u8", torch.uint8, 1)
        if offsets.numel() != self.rows + 1:
            raise ValueError(f"offsets has {offsets.numel()} entries, expected {self.rows + 1}")
        counts = offsets[1:] - offsets[:-1]
        if int(offsets[0]) != 0 or bool((counts < 0).any()):
            raise ValueError("offsets do not start at 0 or are not non-decreasing")
        nnz = int(offsets[-1])
        if cols.numel() != nnz or full.numel() != nnz:
            raise ValueError(f"offsets end at {nnz} but cols has {cols.numel()} and full has {full.numel()} entries")
        if nnz and (int(cols.min()) < 0 or int(cols.max()) >= self.nkb):
            raise ValueError(f"key-block index out of range [0, {self.nkb})")
        self.row_ids = torch.repeat_interleave(torch.arange(self.rows, dtype=torch.int64), counts)
        if nnz > 1:
            same_row = self.row_ids[1:] == self.row_ids[:-1]
            if bool((same_row & (cols[1:] <= cols[:-1])).any()):
                raise ValueError("cols are not strictly increasing within a row")
        self.cols = cols
        self.full = full.to(torch.bool)
        self.nnz = nnz

    # Token-level element mask ------------------------------------------------

    def has_element_mask(self):
        return self.causal or self.window_left is not None or self.window_right is not None

    def mask_mod(self):
        """mask_mod(b, h, q_idx, kv_idx) for the element mask (block layout excluded)."""
        off = self.seqlen_k - self.seqlen_q
        wl = self.window_left
        wr = self.window_right
        if self.causal:
            wr = 0 if wr is None else min(wr, 0)
        sink = self.sink_tokens

        if wl is None and wr is None:
            def all_visible(b, h, q_idx, kv_idx):
                return q_idx >= 0
            return all_visible

        def element_mask(b, h, q_idx, kv_idx):
            diag = q_idx + off
            ok = q_idx >= 0
            if wl is not None:
                in_left = kv_idx >= diag - wl
                if sink > 0:
                    in_left = in_left | (kv_idx < sink)
                ok = ok & in_left
            if wr is not None:
                ok = ok & (kv_idx <= diag + wr)
            return ok

        return element_mask

    # FLOPs ---------------------------------------------------------------------

    def flops(self):
        if self.nnz == 0:
            return 0.0
        qb = self.row_ids % self.nqb
        rows_in = torch.clamp(self.seqlen_q - qb * Q_BLOCK, max=Q_BLOCK)
        keys_in = torch.clamp(self.seqlen_k - self.cols * K_BLOCK, max=K_BLOCK)
        area = int((rows_in * keys_in).sum())
        factor = (self.batch // self.mask_batch) * (self.heads // self.mask_heads)
        return 4.0 * self.head_dim * factor * area

    # Dense block layouts on the GPU ----------------------------------------------

    def dense_layouts(self, device):
        """(partial, full) bool tensors [mask_batch, mask_heads, nqb, nkb]."""
        shape = (self.mask_batch, self.mask_heads, self.nqb, self.nkb)
        rows = self.row_ids.to(device)
        cols = self.cols.to(device)
        full = self.full.to(device)
        part_dense = torch.zeros(self.rows, self.nkb, dtype=torch.bool, device=device)
        full_dense = torch.zeros(self.rows, self.nkb, dtype=torch.bool, device=device)
        part_dense[rows[~full], cols[~full]] = True
        full_dense[rows[full], cols[full]] = True
        return part_dense.view(shape), full_dense.view(shape)


# ----------------------------------------------------------------------------
# BlockMask construction


def dense_to_ordered(dense):
    """Block layout -> (num_blocks [.., rows] int32, indices [.., rows, cols] int32).

    Listed columns come first in increasing order, the remaining columns pad the
    row, the same layout create_block_mask produces.
    """
    as_int = dense.to(torch.int32)
    num = as_int.sum(dim=-1).to(torch.int32).contiguous()
    idx = torch.argsort(as_int, dim=-1, descending=True, stable=True).to(torch.int32).contiguous()
    return num, idx


def block_mask_from_kv_blocks(mask, device):
    part, full = mask.dense_layouts(device)
    kv_num, kv_idx = dense_to_ordered(part)
    full_num, full_idx = dense_to_ordered(full)
    del part, full
    BlockMask = _flex_mod.BlockMask
    kwargs = dict(BLOCK_SIZE=(Q_BLOCK, K_BLOCK), mask_mod=mask.mask_mod())
    try:
        return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx,
                                        seq_lengths=(mask.seqlen_q, mask.seqlen_k), **kwargs)
    except TypeError as exc:
        if "seq_lengths" not in str(exc):
            raise
        if mask.seqlen_q % Q_BLOCK or mask.seqlen_k % K_BLOCK:
            raise
        return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, **kwargs)


def block_mask_from_mask_mod(mask, device):
    part, full = mask.dense_layouts(device)
    layout = part | full
    del part, full
    elem = mask.mask_mod()
    # At run time the kernel calls mask_mod with the real batch / head index, so
    # a shared (size-1) dimension of the layout must not be indexed by it.
    shared_b = mask.mask_batch == 1
    shared_h = mask.mask_heads == 1
    if shared_b and shared_h:
        lay = layout[0, 0].contiguous()

        def block_listed(b, h, qb, kb):
            return lay[qb, kb]
    elif shared_b:
        lay = layout[0].contiguous()

        def block_listed(b, h, qb, kb):
            return lay[h, qb, kb]
    elif shared_h:
        lay = layout[:, 0].contiguous()

        def block_listed(b, h, qb, kb):
            return lay[b, qb, kb]
    else:
        lay = layout.contiguous()

        def block_listed(b, h, qb, kb):
            return lay[b, h, qb, kb]
    del layout

    def mask_mod_with_layout(b, h, q_idx, kv_idx):
        return block_listed(b, h, q_idx // Q_BLOCK, kv_idx // K_BLOCK) & elem(b, h, q_idx, kv_idx)

    create_block_mask = _flex_mod.create_block_mask
    args = (mask_mod_with_layout, mask.mask_batch, mask.mask_heads, mask.seqlen_q, mask.seqlen_k)
    try:
        return create_block_mask(*args, device=device, BLOCK_SIZE=(Q_BLOCK, K_BLOCK), _compile=True)
    except TypeError:
        return create_block_mask(*args, device=device, BLOCK_SIZE=(Q_BLOCK, K_BLOCK))


def build_block_mask(mask, device, force_create):
    if not force_create and hasattr(_flex_mod.BlockMask, "from_kv_blocks"):
        try:
            return block_mask_from_kv_blocks(mask, device), "from_kv_blocks"
        except Exception as exc:
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                raise
            print(f"[{mask.name}] from_kv_blocks failed ({short_error(exc)}); "
                  f"falling back to create_block_mask", file=sys.stderr, flush=True)
            gc.collect()
            torch.cuda.empty_cache()
    return block_mask_from_mask_mod(mask, device), "create_block_mask"


# ----------------------------------------------------------------------------
# Running and timing


def call_flex(q, k, v, bm, kernel_options):
    if kernel_options:
        return flex(q, k, v, block_mask=bm, kernel_options=kernel_options)
    return flex(q, k, v, block_mask=bm)


def first_call(q, k, v, bm):
    """Compile and run once; returns (out, kernel_options).

    The default Triton tile of some head dims is 128 keys wide, which does not
    divide the 64-key sparse blocks; in that case retry with BLOCK_N = 64.
    """
    try:
        return call_flex(q, k, v, bm, None), None
    except Exception as exc:
        if "divisible" not in str(exc):
            raise
    torch._dynamo.reset()
    opts = {"BLOCK_N": K_BLOCK}
    return call_flex(q, k, v, bm, opts), opts


def time_flex(q, k, v, bm, kernel_options, reps):
    return statistics.median(time_each(lambda: call_flex(q, k, v, bm, kernel_options), reps))


def check_output(mask, q, k, v, out):
    """Max abs error of a few (b, h) slices against an fp32 masked reference."""
    dev = q.device
    i = torch.arange(mask.seqlen_q, device=dev, dtype=torch.int64)[:, None]
    j = torch.arange(mask.seqlen_k, device=dev, dtype=torch.int64)[None, :]
    elem = mask.mask_mod()
    zero = torch.zeros((), dtype=torch.int64, device=dev)
    part, full = mask.dense_layouts(dev)
    layout = part | full
    del part, full
    scale = 1.0 / math.sqrt(mask.head_dim)
    worst = 0.0
    picks = {(0, 0), (mask.batch - 1, mask.heads - 1)}
    for b, h in sorted(picks):
        mb = b if mask.mask_batch > 1 else 0
        mh = h if mask.mask_heads > 1 else 0
        tok = layout[mb, mh].repeat_interleave(Q_BLOCK, 0).repeat_interleave(K_BLOCK, 1)
        tok = tok[: mask.seqlen_q, : mask.seqlen_k] & elem(zero, zero, i, j)
        s = (q[b, h].float() @ k[b, h].float().T) * scale
        s.masked_fill_(~tok, float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num_(0.0)
        ref = p @ v[b, h].float()
        worst = max(worst, float((ref - out[b, h].float()).abs().max()))
        del tok, s, p, ref
    return worst


def run_mask(args, mask_dir, name, device_name):
    rec = {"impl": "flex_attention", "name": name, "pattern": None, "density": None,
           "seqlen": None, "head_dim": None, "ms": None, "tflops": None, "longflash_ms": None,
           "speedup_longflash_vs_flex": None, "device": device_name, "path": None}
    q = k = v = bm = out = None
    try:
        mask = Mask(mask_dir, name)
        rec.update(name=mask.name, pattern=mask.pattern, density=mask.density, seqlen=mask.seqlen_q,
                   head_dim=mask.head_dim, longflash_ms=mask.longflash_ms)
        rec["batch"] = mask.batch
        rec["heads"] = mask.heads
        rec["seqlen_k"] = mask.seqlen_k

        torch._dynamo.reset()
        bm, path = build_block_mask(mask, "cuda", args.force_create_block_mask)
        rec["path"] = path
        print(f"[{mask.name}] block mask via {path}", file=sys.stderr, flush=True)

        dtype = DTYPES[mask.dtype_name]
        q = torch.randn(mask.batch, mask.heads, mask.seqlen_q, mask.head_dim, device="cuda", dtype=dtype)
        k = torch.randn(mask.batch, mask.heads, mask.seqlen_k, mask.head_dim, device="cuda", dtype=dtype)
        v = torch.randn(mask.batch, mask.heads, mask.seqlen_k, mask.head_dim, device="cuda", dtype=dtype)

        out, kernel_options = first_call(q, k, v, bm)
        if kernel_options:
            rec["kernel_options"] = kernel_options
        torch.cuda.synchronize()
        if args.check:
            if mask.seqlen_q * mask.seqlen_k <= args.check_max_elems:
                err = check_output(mask, q, k, v, out)
                rec["max_abs_err"] = round(err, 5)
                rec["check_ok"] = err < 2e-2
            else:
                rec["check_ok"] = None
        del out
        out = None
        settle(lambda: call_flex(q, k, v, bm, kernel_options), args.warmup - 1, args.gap_ms,
               args.warmup_ms)

        ms = time_flex(q, k, v, bm, kernel_options, args.reps)
        flops = mask.flops()
        rec["ms"] = round(ms, 4)
        rec["tflops"] = round(flops / ms / 1e9, 1) if ms > 0 else None
        lf = mask.longflash_ms
        rec["speedup_longflash_vs_flex"] = round(ms / lf, 3) if lf else None
    except Exception as exc:
        rec["ms"] = None
        rec["tflops"] = None
        rec["speedup_longflash_vs_flex"] = None
        rec["error"] = short_error(exc)
        if os.environ.get("PEER_FLEX_TRACEBACK"):
            traceback.print_exc()
        try:
            torch.cuda.synchronize()
        except Exception:
            pass
    finally:
        del q, k, v, bm, out
        gc.collect()
        torch.cuda.empty_cache()
    return rec


# ----------------------------------------------------------------------------
# Summary


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def print_table(records):
    print()
    print("| name | pattern | density | seqlen | longflash ms | FlexAttention ms | longflash speedup over Flex |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in records:
        flex_ms = fmt(r.get("ms"), ".3f") if r.get("ms") is not None else "error"
        speed = r.get("speedup_longflash_vs_flex")
        print(f"| {r.get('name')} | {r.get('pattern') or '-'} | {fmt(r.get('density'), '.4f')} | "
              f"{fmt(r.get('seqlen'), 'd')} | {fmt(r.get('longflash_ms'), '.3f')} | {flex_ms} | "
              f"{'-' if speed is None else format(speed, '.2f') + 'x'} |")
    errors = [r for r in records if r.get("error")]
    for r in errors:
        print(f"\n{r.get('name')}: {r['error']}")
    sys.stdout.flush()


def main():
    args = parse_args()
    if not torch.cuda.is_available():
        print("error: no CUDA device available", file=sys.stderr, flush=True)
        return 1
    names = list_masks(args.mask_dir, args.only)
    if not names:
        print(f"error: no masks found in {args.mask_dir}"
              + (f" matching {args.only}" if args.only else ""), file=sys.stderr, flush=True)
        return 1

    device_name = torch.cuda.get_device_name()
    print(f"torch {torch.__version__}, {device_name}, {len(names)} mask(s)", file=sys.stderr, flush=True)
    torch.manual_seed(args.seed)
    out_file = open(args.out, "a", encoding="utf-8") if args.out else None
    records = []
    try:
        for name in names:
            rec = run_mask(args, args.mask_dir, name, device_name)
            line = json.dumps(rec)
            print(line, flush=True)
            if out_file is not None:
                out_file.write(line + "\n")
                out_file.flush()
            records.append(rec)
    finally:
        if out_file is not None:
            out_file.close()
    print_table(records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
