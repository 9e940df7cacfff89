#!/usr/bin/env python3
"""Plots SmolLM2's mean NLL per position bucket from the smollm2 example's `ppl --json` files
(RoPE, NTK x4, ReRoPE 4096, Leaky ReRoPE 2048/16 at 32k tokens, and ReRoPE to 128k) and the
PyTorch reference's buckets (`peer.json`), into a PNG.

  python3 scripts/plot-smollm2.py benches/results/2026-12-06-h100-smollm2 docs/smollm2-nll.png

Needs matplotlib (not a dependency of the crate; any Python with it).
"""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def centers(buckets):
    xs, ys = [], []
    for b in buckets:
        xs.append((b["lo"] + b["hi"]) / 2 / 1024)
        ys.append(b["mean_nll"])
    return xs, ys


def main():
    folder, out = sys.argv[1], sys.argv[2]
    runs = [
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
    ax.set_title("SmolLM2-135M-Instruct (Q4_1 GGUF) on longflash, H100, 2026-12-06")
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)


if __name__ == "__main__":
    main()
