//! Memory attention (`Attention::forward_memory`: a local causal window plus an external memory
//! in one softmax) against the dense kernel over the same keys: batch 1, 16 heads, head dim 128,
//! bf16, a local window of 2048 queries and keys (plain RoPE), memories of 64k to 1M entries
//! (`LONGFLASH_BENCH_MEMORY` overrides, `LONGFLASH_BENCH_WINDOW` the window). The dense
//! comparison is the exact forward without a mask of the window's queries over the memory and
//! the window as one key tensor: the memory call visits the same keys but half the window's
//! (causal). Both read one K and one V buffer of memory + window rows (the memory call as two
//! views of it). Prints `RESULT {json}` per shape with the median time (CUDA events), TFLOP/s of
//! the scores the call computes and the ratio to the dense call; benches/peer_memory.py times
//! the PyTorch layer as the long_llama code computes it. `memory` is the library's path (two
//! passes of the Hopper forward merged by LSE on Hopper devices), `memory_one_kernel` the one
//! memory kernel (the sm_80 mainloop chosen), `memory_top_k` the top-k layer (each query's 128
//! best memory entries, `LONGFLASH_BENCH_TOP_K`; benches/peer_memory.py --top-k is its peer).
//! `memory_decode` times memory decoding against a
//! device copy of the bytes it reads (`LONGFLASH_BENCH_MEMORY=0` skips the forward shapes).

use std::time::Duration;

#[path = "common/mod.rs"]
mod common;
use common::*;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use cudarc::driver::CudaSlice;
use half::bf16;
use longflash::rope::{PositionMode, RopeConfig, RopeOptions};
use longflash::{
    Attention, ForwardOptions, KvCache, Layout, MainloopChoice, MemoryDecode, MemoryForward,
    MemoryInput, Output,
};

/// A device buffer of `n` bf16 filled with copies of one random block (host data for 1M-entry
/// memories would take long to generate).
fn filled(g: &Gpu, n: usize, seed: u64) -> CudaSlice<bf16> {
    let block = random_bf16(n.min(1 << 24), seed);
    let mut buf: CudaSlice<bf16> = g.stream.alloc_zeros(n).unwrap();
    let mut at = 0;
    while at < n {
        let len = block.len().min(n - at);
        let mut dst = buf.slice_mut(at..at + len);
        g.stream.memcpy_htod(&block[..len], &mut dst).unwrap();
        at += len;
    }
    buf
}

fn bench_memory(c: &mut Criterion) {
    let Some(g) = gpu() else { return };
    let device = g.ctx.name().unwrap_or_default();
    let (heads, d) = (16usize, 128usize);
    let window = parse_list("LONGFLASH_BENCH_WINDOW", &[2048])[0];
    let memories = parse_list("LONGFLASH_BENCH_MEMORY", &[65536, 262144, 1048576]);
    let top_k = parse_list("LONGFLASH_BENCH_TOP_K", &[128])[0];
    let rope = RopeOptions::new(RopeConfig::llama(d), PositionMode::Rope);
    let one_kernel = Attention::new(&g.ctx)
        .expect("Attention::new")
        .with_mainloop(MainloopChoice::Sm80);
    // LONGFLASH_BENCH_BURST / LONGFLASH_BENCH_SUSTAINED: the peers' timing (common::Protocol).
    let protocol = Protocol::from_env();
    let mut group = c.benchmark_group("memory_bf16_d128");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_millis(1000));
    for &m in memories.iter().filter(|&&m| m > 0) {
        let keys = m + window;
        let ql = Layout::bshd(1, window, heads, d);
        let all = Layout::bshd(1, keys, heads, d);
        let q = filled(&g, ql.numel(), 1);
        let k = filled(&g, all.numel(), 2);
        let v = filled(&g, all.numel(), 3);
        let mut o: CudaSlice<bf16> = g.stream.alloc_zeros(ql.numel()).unwrap();
        // The memory is rows [0, m) of K and V, the window rows [m, m + window).
        let ml = Layout::bshd(1, m, heads, d);
        let wl = Layout::bshd(1, window, heads, d);
        let row = heads * d;
        let (kv, vv) = (k.as_view(), v.as_view());
        let (mk, mv) = (k.slice(0..m * row), v.slice(0..m * row));
        let (wk, wv) = (k.slice(m * row..), v.slice(m * row..));
        let qv = q.as_view();
        let mut dense_ms = None;
        for name in ["dense", "memory", "memory_one_kernel", "memory_top_k"] {
            let mut samples =
                sample_shape(&mut group, BenchmarkId::new(name, m), &g, protocol, || {
                    let mut ov = o.as_view_mut();
                    let out = Output {
                        data: &mut ov,
                        layout: ql,
                        lse: None,
                    };
                    let qi = input(&qv, ql);
                    if name == "dense" {
                        g.attn
                            .forward(
                                &g.stream,
                                qi,
                                input(&kv, all),
                                input(&vv, all),
                                out,
                                &ForwardOptions::dense(),
                            )
                            .unwrap();
                    } else {
                        let memory = MemoryInput {
                            keys: input(&mk, ml),
                            values: input(&mv, ml),
                            mask: None,
                        };
                        let opts = MemoryForward {
                            rope: Some(&rope),
                            softmax_scale: None,
                        };
                        let (wki, wvi) = (input(&wk, wl), input(&wv, wl));
                        match name {
                            "memory_top_k" => g.attn.forward_memory_top_k(
                                &g.stream, qi, wki, wvi, memory, out, &opts, top_k,
                            ),
                            "memory" => g
                                .attn
                                .forward_memory(&g.stream, qi, wki, wvi, memory, out, &opts),
                            _ => one_kernel
                                .forward_memory(&g.stream, qi, wki, wvi, memory, out, &opts),
                        }
                        .unwrap();
                    }
                });
            if samples.is_empty() {
                continue;
            }
            let ms = median(&mut samples);
            // Scores computed: every key for the dense call; the memory plus the causal half of
            // the window for the memory call.
            // The top-k call's scores: Q K^T over the memory (the selection) and the causal
            // half of the window; its P V over k entries is negligible.
            let visited = if name == "dense" {
                keys as f64
            } else {
                m as f64 + (window as f64 + 1.0) / 2.0
            };
            let mut flops = 4.0 * heads as f64 * window as f64 * visited * d as f64;
            if name == "memory_top_k" {
                flops -= 2.0 * heads as f64 * window as f64 * m as f64 * d as f64;
            }
            if name == "dense" {
                dense_ms = Some(ms);
            }
            println!(
                "RESULT {{\"impl\": \"longflash_{name}\", \"top_k\": {}, \"memory\": {m}, \"window\": {window}, \"heads\": {heads}, \"head_dim\": {d}, \"ms\": {ms:.4}, \"tflops\": {:.1}, \"vs_dense\": {}, \"device\": \"{device}\"}}",
                if name == "memory_top_k" {
                    top_k.to_string()
                } else {
                    "null".into()
                },
                flops / ms / 1e9,
                dense_ms.map_or("null".into(), |p| format!("{:.3}", ms / p))
            );
        }
    }
    group.finish();
}

/// Memory decoding (`Attention::decode_memory`): one new query token per sequence over a local
/// cache of `LONGFLASH_BENCH_WINDOW` tokens and a memory of 64k or 256k entries
/// (`LONGFLASH_BENCH_DECODE_MEMORY`), 32 heads of 128 (LongLLaMA-Code-7B's), batch 1 and 4, plain
/// RoPE. Bound by memory: the figure is the bytes of K and V read (cache and memory) per second
/// against a device-to-device copy of the same bytes in the same run (its read plus write
/// traffic per second), as for the decoding bench.
fn bench_memory_decode(c: &mut Criterion) {
    let Some(g) = gpu() else { return };
    let device = g.ctx.name().unwrap_or_default();
    let (heads, d) = (32usize, 128usize);
    let window = parse_list("LONGFLASH_BENCH_WINDOW", &[2048])[0];
    let memories = parse_list("LONGFLASH_BENCH_DECODE_MEMORY", &[65536, 262144]);
    let rope = RopeOptions::new(RopeConfig::llama(d), PositionMode::Rope);
    let protocol = Protocol::from_env();
    let mut group = c.benchmark_group("memory_decode_bf16_d128");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_millis(1000));
    for batch in [1usize, 4] {
        for &m in &memories {
            let ql = Layout::bshd(batch, 1, heads, d);
            let kl = Layout::bshd(batch, window, heads, d);
            let ml = Layout::bshd(batch, m, heads, d);
            let q = filled(&g, ql.numel(), 1);
            let k = filled(&g, kl.numel(), 2);
            let mk = filled(&g, ml.numel(), 3);
            let mut o: CudaSlice<bf16> = g.stream.alloc_zeros(ql.numel()).unwrap();
            let (qv, kv, mkv) = (q.as_view(), k.as_view(), mk.as_view());
            let mut samples = sample_shape(
                &mut group,
                BenchmarkId::new(format!("b{batch}"), m),
                &g,
                protocol,
                || {
                    let mut ov = o.as_view_mut();
                    let cache = KvCache {
                        k: input(&kv, kl),
                        v: input(&kv, kl),
                        block_table: None,
                        cache_seqlens: None,
                    };
                    g.attn
                        .decode_memory(
                            &g.stream,
                            input(&qv, ql),
                            &cache,
                            MemoryInput {
                                keys: input(&mkv, ml),
                                values: input(&mkv, ml),
                                mask: None,
                            },
                            Output {
                                data: &mut ov,
                                layout: ql,
                                lse: None,
                            },
                            None,
                            &MemoryDecode {
                                rope: Some(&rope),
                                softmax_scale: None,
                            },
                        )
                        .unwrap();
                },
            );
            if samples.is_empty() {
                continue;
            }
            let ms = median(&mut samples);
            drop((q, k, mk));
            let bytes = 2 * batch * (window + m) * heads * d * 2;
            let src: CudaSlice<u8> = g.stream.alloc_zeros(bytes).unwrap();
            let mut dst: CudaSlice<u8> = g.stream.alloc_zeros(bytes).unwrap();
            let mut copy = sample_shape(
                &mut group,
                BenchmarkId::new(format!("copy_b{batch}"), m),
                &g,
                protocol,
                || g.stream.memcpy_dtod(&src, &mut dst).unwrap(),
            );
            let copy_ms = median(&mut copy);
            let (tb, copy_tb) = (bytes as f64 / ms / 1e9, 2.0 * bytes as f64 / copy_ms / 1e9);
            println!(
                "RESULT {{\"impl\": \"longflash_memory_decode\", \"batch\": {batch}, \"memory\": {m}, \"window\": {window}, \"heads\": {heads}, \"head_dim\": {d}, \"ms\": {ms:.4}, \"kv_gb\": {:.3}, \"tb_per_s\": {tb:.3}, \"copy_ms\": {copy_ms:.4}, \"copy_tb_per_s\": {copy_tb:.3}, \"of_copy\": {:.3}, \"device\": \"{device}\"}}",
                bytes as f64 / 1e9,
                tb / copy_tb
            );
        }
    }
    group.finish();
}

criterion_group!(benches, bench_memory, bench_memory_decode);
criterion_main!(benches);
