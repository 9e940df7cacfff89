#!/usr/bin/env python3
"""PyTorch reference for the smollm2 example (longflash-candle/examples/smollm2.rs).

The same GGUF file, loaded by transformers (`gguf_file=`; it needs the `gguf` package, which
travels to the GPU machine as a wheel in .whl/), dequantized to f32. The forward runs the
model's own modules layer by layer, with attention written here in f32 as two score matrices:

  inside  (rel = p_i - p_j < w):  (R_{p_i} q_i) . (R_{p_j} k_j)
  outside (rel >= w), ReRoPE:      (R_w q_i) . k_j
  outside, Leaky ReRoPE (leak k):  (R_{p_i/k + w - w/k} q_i) . (R_{p_j/k} k_j)

merged by the window mask, then the causal softmax. Plain RoPE is the inside matrix alone.
transformers un-permutes GGUF's Q and K, so rotations here are half-split (rotate_half).

The tokenizer is built with the `tokenizers` package from the GGUF's vocabulary and merges with
SmolLM2's pre-tokenizer (digits one by one, then GPT-2 byte level), as the example's is.

  python3 benches/peer_smollm2.py --model M.gguf --text book.txt --tokens 32768 \
      --modes rope,ntk:4,rerope:4096,leaky:2048:16 --passkey 8192,16384,32768 --out peer.json
"""

import argparse
import json
import math
import os
import random
import sys
import time

import torch

K = 1024
INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
         "memorize it. I will quiz you about the important information there.")
FILLER = (" The grass is green. The sky is blue. The sun is yellow. Here we go. There and back"
          " again.")
QUESTION = " What is the pass key? The pass key is"


def tokenizer_from_gguf(path):
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    r = GGUFReader(path)

    def strings(key):
        f = r.fields[key]
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    def ints(key):
        f = r.fields[key]
        return [int(f.parts[i][0]) for i in f.data]

    tokens = strings("tokenizer.ggml.tokens")
    types = ints("tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in strings("tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True)
                            for t, ty in zip(tokens, types) if ty in (3, 4)])
    return tok


def parse_mode(s, base, head_dim):
    """'rope', 'ntk:F', 'rerope:W', 'leaky:W:K' -> (name, base, window, leak)."""
    parts = s.split(":")
    if parts[0] == "rope":
        return s, base, None, None
    if parts[0] == "ntk":
        f = float(parts[1])
        return s, base * f ** (head_dim / (head_dim - 2)), None, None
    if parts[0] == "rerope":
        return s, base, int(parts[1]), None
    if parts[0] == "leaky":
        return s, base, int(parts[1]), float(parts[2])
    sys.exit(f"unknown mode {s}")


def rotate(x, pos, inv_freq):
    """x (heads, n, d) rotated by angles pos[n] * inv_freq, half-split pairs."""
    ang = pos[:, None].double() * inv_freq[None, :].double()
    cos, sin = ang.cos().float(), ang.sin().float()
    cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    h = x.shape[-1] // 2
    rot = torch.cat([-x[..., h:], x[..., :h]], -1)
    return x * cos + rot * sin


def attention(q, k, v, inv_freq, window, leak, chunk=1024):
    """q (hq, n, d), k and v (hk, n, d), un-rotated, f32; causal; returns (hq, n, d)."""
    hq, n, d = q.shape
    g = hq // k.shape[0]
    k, v = k.repeat_interleave(g, 0), v.repeat_interleave(g, 0)
    pos = torch.arange(n, device=q.device)
    kr = rotate(k, pos, inv_freq)
    if window is not None and leak is not None:
        k_out = rotate(k, pos.double() / leak, inv_freq)
    else:
        k_out = k
    scale = 1.0 / math.sqrt(d)
    out = torch.empty_like(q)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        pq = pos[s:e]
        qi = rotate(q[:, s:e], pq, inv_freq)
        scores = qi @ kr.transpose(1, 2) * scale
        rel = pq[:, None] - pos[None, :]
        if window is not None:
            if leak is None:
                qo = rotate(q[:, s:e], torch.full_like(pq, window), inv_freq)
            else:
                qo = rotate(q[:, s:e], pq.double() / leak + window - window / leak, inv_freq)
            outside = qo @ k_out.transpose(1, 2) * scale
            scores = torch.where(rel < window, scores, outside)
        scores = scores.masked_fill(rel < 0, float("-inf"))
        out[:, s:e] = torch.softmax(scores, -1) @ v
    return out


@torch.no_grad()
def forward(model, ids, mode):
    """Logits (n, vocab) of the token ids under a position mode."""
    _, base, window, leak = mode
    cfg = model.config
    hq, hk = cfg.num_attention_heads, cfg.num_key_value_heads
    d = cfg.hidden_size // hq
    dev = next(model.parameters()).device
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2, device=dev, dtype=torch.float64) / d)
    x = model.model.embed_tokens(torch.tensor(ids, device=dev))
    n = x.shape[0]
    for layer in model.model.layers:
        a = layer.self_attn
        h = layer.input_layernorm(x)
        q = a.q_proj(h).view(n, hq, d).transpose(0, 1)
        k = a.k_proj(h).view(n, hk, d).transpose(0, 1)
        v = a.v_proj(h).view(n, hk, d).transpose(0, 1)
        o = attention(q, k, v, inv_freq, window, leak).transpose(0, 1).reshape(n, hq * d)
        x = x + a.o_proj(o)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.lm_head(model.model.norm(x))


def edges_for(n):
    e = [0, K, 2 * K, 4 * K, 8 * K, 12 * K, 16 * K, 24 * K, 32 * K]
    while e[-1] < n:
        e.append(e[-1] * 2)
    while len(e) > 2 and e[-2] >= n:
        e.pop()
    return e


def ppl(model, ids, mode):
    logits = forward(model, ids, mode)
    nll = torch.nn.functional.cross_entropy(
        logits[:-1].float(), torch.tensor(ids[1:], device=logits.device), reduction="none")
    edges = edges_for(len(ids))
    buckets = []
    for lo, hi in zip(edges, edges[1:]):
        # The NLL of the token at position p (predicted by row p - 1) counts in p's bucket.
        sel = nll[max(lo, 1) - 1:hi - 1]
        if sel.numel():
            buckets.append({"lo": lo, "hi": hi, "count": sel.numel(),
                            "mean_nll": sel.mean().item()})
    return {"tokens": len(ids), "mean_nll": nll.mean().item(), "buckets": buckets}


def passkey_ids(tok, key, length, depth):
    enc = lambda s: tok.encode(s, add_special_tokens=False).ids
    line = f" The pass key is {key}. Remember it. {key} is the pass key."

    def text(repeats):
        before = min(repeats, round(depth * repeats))
        return INTRO + FILLER * before + line + FILLER * (repeats - before) + QUESTION

    per = max(1, len(enc(FILLER)))
    repeats = max(0, length - len(enc(text(0)))) // per
    while True:
        ids = enc(text(repeats))
        if len(ids) <= length or repeats == 0:
            return ids
        repeats -= 1


def passkey(model, tok, mode, lengths, depths, seed, keys=None):
    rng = random.Random(seed)
    cases = []
    given = list(keys or [])
    for length in lengths:
        for depth in depths:
            key = given.pop(0) if given else rng.randrange(10000, 100000)
            ids = passkey_ids(tok, key, length, depth)
            out = []
            for _ in range(8):
                nxt = int(forward(model, ids + out, mode)[-1].argmax())
                out.append(nxt)
            answer = tok.decode(out)
            cases.append({"length": length, "tokens": len(ids), "depth": depth, "key": key,
                          "answer": answer, "retrieved": str(key) in answer})
            print(f"  passkey {length} @ {depth}: {answer!r} {cases[-1]['retrieved']}",
                  flush=True)
    return cases


def rope_theta(cfg):
    """The RoPE base: `rope_theta` on older transformers configs, inside `rope_parameters` on
    newer ones."""
    theta = getattr(cfg, "rope_theta", None)
    if theta is None:
        params = getattr(cfg, "rope_parameters", None) or {}
        theta = params.get("rope_theta")
    if theta is None:
        raise SystemExit("peer_smollm2: no RoPE base (rope_theta) in the model's config")
    return float(theta)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="the GGUF file")
    p.add_argument("--text", help="long text for the NLL buckets")
    p.add_argument("--tokens", type=int, default=32 * K)
    p.add_argument("--modes", default="rope,ntk:4,rerope:4096,leaky:2048:16")
    p.add_argument("--passkey", default="", help="comma list of prompt lengths")
    p.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--keys", default="",
                   help="comma list of pass keys, one per (length, depth) case in order (the "
                        "example's, to ask the same prompts); random from --seed otherwise")
    p.add_argument("--prompt", default="The capital of France is",
                   help="short prompt whose last-token logits are written")
    p.add_argument("--out", required=True)
    a = p.parse_args()

    from transformers import AutoModelForCausalLM

    folder, name = os.path.split(os.path.abspath(a.model))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                 torch_dtype=torch.float32).cuda().eval()
    tok = tokenizer_from_gguf(a.model)
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    theta = rope_theta(cfg)
    result = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
              "modes": {}}
    short = tok.encode(a.prompt, add_special_tokens=False).ids
    result["short_prompt"] = {"ids": short, "last_logits": forward(
        model, short, parse_mode("rope", theta, head_dim))[-1].tolist()}
    ids = None
    if a.text:
        with open(a.text, encoding="utf-8", errors="replace") as f:
            ids = tok.encode(f.read(), add_special_tokens=False).ids[:a.tokens]
    for s in a.modes.split(","):
        mode = parse_mode(s, theta, head_dim)
        entry = {}
        t0 = time.time()
        if ids is not None:
            entry["ppl"] = ppl(model, ids, mode)
            print(s, " ".join(f"{b['lo'] // K}k-{b['hi'] // K}k:{b['mean_nll']:.3f}"
                              for b in entry["ppl"]["buckets"]), flush=True)
        if a.passkey:
            lengths = [int(x) for x in a.passkey.split(",")]
            depths = [float(x) for x in a.depths.split(",")]
            keys = [int(x) for x in a.keys.split(",") if x]
            entry["passkey"] = passkey(model, tok, mode, lengths, depths, a.seed, keys)
        entry["seconds"] = time.time() - t0
        result["modes"][s] = entry
    with open(a.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
