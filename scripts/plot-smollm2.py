#!/usr/bin/env python3
"""Plots SmolLM2's mean NLL per position bucket from the smollm2 example's `ppl --json` files
(RoPE, NTK x4, ReRoPE 4096, Leaky ReRoPE 2048/16 at 32k tokens, and ReRoPE to 128k) and the
PyTorch reference's buckets (`peer.json`), into a PNG.

  python3 scripts/plot-smollm2.py benches/results/2026-12-06-h100-smollm2 docs/smollm2-nll.png

With --long, the 128k runs of the folder instead (the text in 8k segments, ReRoPE 4096 alone
and with log-n 8192, ReRoPE 7168 with log-n 16384, ReRoPE 8192, Leaky 6144/64 with log-n 16384):

  python3 scripts/plot-smollm2.py --long benches/results/2026-12-06-h100-smollm2-128k \
      docs/smollm2-nll-128k.png

Needs matplotlib (not a dependency of the crate; any Python with it).
"""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


# The 128k runs (--long): file, label, color, line style.
LONG_RUNS = [
    ("ppl128-seg8k-rope.json", "the text in 8k segments (RoPE)", "gray", "--"),
    ("ppl128-f32-rerope_4096.json", "ReRoPE w=4096 (f32 matmuls)", "tab:blue", "-"),
    ("ppl128-logn-rerope_4096.json", "ReRoPE w=4096, log-n 8192", "tab:cyan", "-"),
    ("ppl128-sweep-rerope_7168_logn_16384.json", "ReRoPE w=7168, log-n 16384", "tab:purple", "-"),
    ("ppl128-sweep-rerope_8192.json", "ReRoPE w=8192", "tab:pink", "-"),
    ("ppl128-sweep-leaky_6144_64_logn_16384.json", "Leaky w=6144 k=64, log-n 16384", "tab:green",
     "-"),
]


def centers(buckets):
    xs, ys = [], []
    for b in buckets:
        xs.append((b["lo"] + b["hi"]) / 2 / 1024)
        ys.append(b["mean_nll"])
    return xs, ys


def main():
    long = sys.argv[1] == "--long"
    folder, out = sys.argv[1 + long], sys.argv[2 + long]
    runs = LONG_RUNS if long else [
        ("ppl32-rope.json", "RoPE", "tab:red", "-"),
        ("ppl32-ntk_4.json", "fixed NTK x4", "tab:orange", "-"),
        ("ppl32-leaky_2048_16.json", "Leaky ReRoPE w=2048 k=16", "tab:green", "-"),
        ("ppl128-rerope_4096.json", "ReRoPE w=4096 (to 128k)", "tab:blue", "-"),
    ]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for name, label, color, style in runs:
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            continue
        with open(path) as f:
            xs, ys = centers(json.load(f)["buckets"])
        ax.plot(xs, ys, style, marker="o", ms=3, color=color, label=f"{label}, longflash")
    peer_path = os.path.join(folder, "peer.json")
    if os.path.exists(peer_path):
        with open(peer_path) as f:
            peer = json.load(f)
        for mode, color in [("rope", "tab:red"), ("rerope:4096", "tab:blue"),
                            ("leaky:2048:16", "tab:green")]:
            entry = peer.get("modes", {}).get(mode)
            if entry and "ppl" in entry:
                xs, ys = centers(entry["ppl"]["buckets"])
                ax.plot(xs, ys, ":", marker="x", ms=4, color=color,
                        label=f"{mode}, PyTorch reference")
    ax.axvline(8, color="gray", lw=0.8, ls="--")
    ax.text(8.3, ax.get_ylim()[1] * 0.97, "trained context (8k)", color="gray", fontsize=8,
            va="top")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position (k tokens, bucket centers)")
    ax.set_ylabel("mean NLL per token")
    ax.set_title("SmolLM2-135M-Instruct (Q4_1 GGUF) on longflash, H100, 2026-12-06"
                 + (", 128k tokens" if long else ""))
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)


if __name__ == "__main__":
    main()
