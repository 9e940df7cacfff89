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
//! memory kernel (the sm_80 mainloop chosen), `memory_masked` the library's path with a memory
//! mask (the last 64 entries of every 2048 hidden, as a padded window would leave them; on
//! Hopper devices the memory pass with a per-key mask), `memory_top_k` the top-k layer (each query's 128
//! best memory entries, `LONGFLASH_BENCH_TOP_K`; benches/peer_memory.py --top-k is its peer).
//! `memory_decode` times memory decoding against a
//! device copy of the bytes it reads (`LONGFLASH_BENCH_MEMORY=0` skips the forward shapes).
//! `LONGFLASH_BENCH_ONLY=name,...` times only those (and `dense`, the ratios' base; the timing
//! protocols bypass criterion's own filter). `LONGFLASH_BENCH_DUMP=dir` times nothing: it runs
//! the layer once on small random tensors (full, masked, top-k) and writes the inputs and the
//! outputs there, for `benches/peer_memory.py --check dir` to compare with the PyTorch layer.

use std::time::Duration;

/// Whether `LONGFLASH_BENCH_ONLY` (a comma list of names) leaves `name` in; unset: every name.
fn selected(name: &str) -> bool {
    std::env::var("LONGFLASH_BENCH_ONLY")
        .map_or(true, |only| only.split(',').any(|n| n.trim() == name))
}

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

/// A device buffer of `n` bf16 filled from one random block (host data for 1M-entry memories
/// would take long to generate), each copy of it rotated by a different number of elements (not
/// a multiple of a head vector), so that no key repeats an earlier one: the PyTorch peer's
/// memory is i.i.d., and the top-k selection's work depends on it (keys repeated every block
/// tie the kept scores, and every later copy of a kept key enters the candidates again).
fn filled(g: &Gpu, n: usize, seed: u64) -> CudaSlice<bf16> {
    let block = random_bf16(n.min(1 << 24), seed);
    let mut buf: CudaSlice<bf16> = g.stream.alloc_zeros(n).unwrap();
    let mut at = 0;
    let mut copy = 0;
    while at < n {
        let shift = (copy * 977) % block.len();
        let rotated = block[shift..].iter().chain(&block[..shift]);
        let len = block.len().min(n - at);
        let part: Vec<bf16> = rotated.take(len).copied().collect();
        let mut dst = buf.slice_mut(at..at + len);
        g.stream.memcpy_htod(&part, &mut dst).unwrap();
        at += len;
        copy += 1;
    }
    buf
}

/// Writes `x` as raw little-endian 16-bit values.
fn write_bf16(dir: &std::path::Path, name: &str, x: &[bf16]) {
    let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_bits().to_le_bytes()).collect();
    std::fs::write(dir.join(name), bytes).unwrap();
}

/// `LONGFLASH_BENCH_DUMP`: batch 1, a window of 512 queries and keys (RoPE at positions 0 to
/// 511), a memory of 8192 entries, 8 heads of 128, bf16; the full layer without and with a mask
/// (a random third of the entries hidden) and the top-128 layer, each written with its inputs
/// (`[1, n, heads, 128]` row-major, the mask one byte per entry) and `meta.json`.
fn dump(g: &Gpu, dir: &std::path::Path) {
    let (w, m, heads, d, top_k) = (512usize, 8192usize, 8usize, 128usize, 128usize);
    std::fs::create_dir_all(dir).unwrap();
    let ql = Layout::bshd(1, w, heads, d);
    let ml = Layout::bshd(1, m, heads, d);
    let host: Vec<Vec<bf16>> = (0..5)
        .map(|i| random_bf16(if i < 3 { ql.numel() } else { ml.numel() }, 101 + i as u64))
        .collect();
    let mut s = 7u64;
    let visible: Vec<u8> = (0..m)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
            u8::from((s >> 33) % 3 != 0)
        })
        .collect();
    for (name, x) in ["q", "k", "v", "mem_k", "mem_v"].iter().zip(&host) {
        write_bf16(dir, &format!("{name}.bin"), x);
    }
    std::fs::write(dir.join("mask.bin"), &visible).unwrap();
    let dev: Vec<CudaSlice<bf16>> = host
        .iter()
        .map(|x| g.stream.clone_htod(x).unwrap())
        .collect();
    let mask = g.stream.clone_htod(&visible).unwrap();
    let maskv = mask.as_view();
    let views: Vec<_> = dev.iter().map(|x| x.as_view()).collect();
    let rope = RopeOptions::new(RopeConfig::llama(d), PositionMode::Rope);
    let opts = MemoryForward {
        rope: Some(&rope),
        softmax_scale: None,
    };
    for case in ["full", "masked", "top_k"] {
        let mut o: CudaSlice<bf16> = g.stream.alloc_zeros(ql.numel()).unwrap();
        {
            let mut ov = o.as_view_mut();
            let out = Output {
                data: &mut ov,
                layout: ql,
                lse: None,
            };
            let memory = MemoryInput {
                keys: input(&views[3], ml),
                values: input(&views[4], ml),
                mask: (case == "masked").then_some(&maskv),
            };
            let (qi, ki, vi) = (
                input(&views[0], ql),
                input(&views[1], ql),
                input(&views[2], ql),
            );
            match case {
                "top_k" => g
                    .attn
                    .forward_memory_top_k(&g.stream, qi, ki, vi, memory, out, &opts, top_k),
                _ => g
                    .attn
                    .forward_memory(&g.stream, qi, ki, vi, memory, out, &opts),
            }
            .unwrap();
        }
        let back = g.stream.clone_dtoh(&o).unwrap();
        write_bf16(dir, &format!("out_{case}.bin"), &back);
    }
    std::fs::write(
        dir.join("meta.json"),
        format!(
            "{{\"window\": {w}, \"memory\": {m}, \"heads\": {heads}, \"head_dim\": {d}, \"top_k\": {top_k}, \"device\": \"{}\"}}\n",
            g.ctx.name().unwrap_or_default()
        ),
    )
    .unwrap();
    println!("dumped to {}", dir.display());
}

fn bench_memory(c: &mut Criterion) {
    let Some(g) = gpu() else { return };
    if let Ok(dir) = std::env::var("LONGFLASH_BENCH_DUMP") {
        dump(&g, std::path::Path::new(&dir));
        return;
    }
    let device = g.ctx.name().unwrap_or_default();
    // LONGFLASH_BENCH_BATCH / _HEADS / _HEAD_DIM: other shapes (OpenLLaMA-3B's: 32 heads of
    // 100, on the 128-wide padded kernels).
    let batch = parse_list("LONGFLASH_BENCH_BATCH", &[1])[0];
    let heads = parse_list("LONGFLASH_BENCH_HEADS", &[16])[0];
    let d = parse_list("LONGFLASH_BENCH_HEAD_DIM", &[128])[0];
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
        let ql = Layout::bshd(batch, window, heads, d);
        let all = Layout::bshd(batch, keys, heads, d);
        let q = filled(&g, ql.numel(), 1);
        let k = filled(&g, all.numel(), 2);
        let v = filled(&g, all.numel(), 3);
        let mut o: CudaSlice<bf16> = g.stream.alloc_zeros(ql.numel()).unwrap();
        // The memory is rows [0, m) of each batch entry's K and V, the window rows
        // [m, m + window): views with the whole entry's batch stride.
        let row = heads * d;
        let ml = Layout {
            batch_stride: (keys * row) as i64,
            ..Layout::bshd(batch, m, heads, d)
        };
        let wl = Layout {
            batch_stride: (keys * row) as i64,
            ..Layout::bshd(batch, window, heads, d)
        };
        let (kv, vv) = (k.as_view(), v.as_view());
        let (mk, mv) = (k.as_view(), v.as_view());
        let (wk, wv) = (k.slice(m * row..), v.slice(m * row..));
        let qv = q.as_view();
        let hidden: Vec<u8> = (0..batch * m)
            .map(|j| u8::from(j % m % 2048 < 1984))
            .collect();
        let mask = g.stream.clone_htod(&hidden).unwrap();
        let maskv = mask.as_view();
        let mut dense_ms = None;
        for name in [
            "dense",
            "memory",
            "memory_masked",
            "memory_one_kernel",
            "memory_top_k",
        ] {
            if name != "dense" && !selected(name) {
                continue;
            }
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
                            mask: (name == "memory_masked").then_some(&maskv),
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
                            "memory" | "memory_masked" => g
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
            let rows = (batch * heads * window) as f64;
            let mut flops = 4.0 * rows * visited * d as f64;
            if name == "memory_top_k" {
                flops -= 2.0 * rows * m as f64 * d as f64;
            }
            if name == "dense" {
                dense_ms = Some(ms);
            }
            println!(
                "RESULT {{\"impl\": \"longflash_{name}\", \"top_k\": {}, \"batch\": {batch}, \"memory\": {m}, \"window\": {window}, \"heads\": {heads}, \"head_dim\": {d}, \"ms\": {ms:.4}, \"tflops\": {:.1}, \"vs_dense\": {}, \"device\": \"{device}\"}}",
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
    if !selected("memory_decode") || std::env::var_os("LONGFLASH_BENCH_DUMP").is_some() {
        return;
    }
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
