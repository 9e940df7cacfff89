//! The decoding forward over a paged KV cache, timed with CUDA events on the GPU: bf16, 32 query
//! heads over 8 KV heads, head dim 128, pages of 64 tokens in a shuffled order, one query token
//! per sequence (and 4 and 16 for speculative decoding), batch 1 to 256 and cache lengths 1k to
//! 512k. Decoding is bound by memory, so the figure is the bandwidth: the bytes of K and V read
//! per second, next to a device-to-device copy of the same bytes measured in the same run (its
//! read plus write traffic per second). Prints `RESULT {json}` per shape. Without a GPU it prints
//! that it skipped (and fails when LONGFLASH_REQUIRE_GPU=1).
//!
//! On three shapes it also times RoPE, ReRoPE (window 4096) and Leaky ReRoPE (window 4096, leak
//! 16) decoding over the same un-rotated cache, as times and ratios to plain decoding.
//!
//! `LONGFLASH_BENCH_DECODE_SPLITS=N` fixes the split count instead of the plan's choice.

use std::time::Duration;

#[path = "common/mod.rs"]
mod common;
use common::*;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use cudarc::driver::CudaSlice;
use half::bf16;
use longflash::rope::{PositionMode, RopeConfig, RopeOptions};
use longflash::{BlockTable, DecodeOptions, Input, KvCache, Layout, MaskSpec, Output};

fn bench_decode(c: &mut Criterion) {
    let Some(g) = gpu() else { return };
    let device = g.ctx.name().unwrap_or_default();
    let (hq, hk, d, ps) = (32usize, 8usize, 128usize, 64usize);
    let splits = std::env::var("LONGFLASH_BENCH_DECODE_SPLITS")
        .ok()
        .and_then(|v| v.parse().ok());
    let mut group = c.benchmark_group("decode_bf16_d128");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_millis(600));
    // (batch, cache length, query tokens)
    let shapes: &[(usize, usize, usize)] = &[
        (1, 1024, 1),
        (1, 8192, 1),
        (1, 32768, 1),
        (1, 131072, 1),
        (1, 524288, 1),
        (4, 131075, 1),
        (16, 8192, 1),
        (64, 4096, 1),
        (256, 2048, 1),
        (64, 1024, 1),
        (16, 8192, 4),
        (16, 8192, 16),
    ];
    for &(batch, len, sq) in shapes {
        let pages_per_seq = len.div_ceil(ps);
        let num_pages = batch * pages_per_seq;
        let cache_elems = num_pages * ps * hk * d;
        let k: CudaSlice<bf16> = g.stream.clone_htod(&random_bf16(cache_elems, 1)).unwrap();
        let v: CudaSlice<bf16> = g.stream.clone_htod(&random_bf16(cache_elems, 2)).unwrap();
        let q: CudaSlice<bf16> = g
            .stream
            .clone_htod(&random_bf16(batch * sq * hq * d, 3))
            .unwrap();
        let mut o: CudaSlice<bf16> = g.stream.alloc_zeros(batch * sq * hq * d).unwrap();
        // Pages in a shuffled order, as a cache that has served for a while holds them.
        let mut table: Vec<i32> = (0..num_pages as i32).collect();
        let mut s = 0x2545_F491_4F6C_DD1Du64 ^ len as u64;
        for i in (1..table.len()).rev() {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            table.swap(i, (s % (i as u64 + 1)) as usize);
        }
        let dt: CudaSlice<i32> = g.stream.clone_htod(&table).unwrap();
        let dl: CudaSlice<i32> = g.stream.clone_htod(&vec![len as i32; batch]).unwrap();
        let (qv, kv, vv, tv, lv) = (
            q.as_view(),
            k.as_view(),
            v.as_view(),
            dt.as_view(),
            dl.as_view(),
        );
        let cl = Layout::bshd(num_pages, ps, hk, d);
        let ql = Layout::bshd(batch, sq, hq, d);
        let cache = KvCache {
            k: Input {
                data: &kv,
                layout: cl,
            },
            v: Input {
                data: &vv,
                layout: cl,
            },
            block_table: Some(BlockTable {
                table: &tv,
                max_pages_per_seq: pages_per_seq,
            }),
            cache_seqlens: Some(&lv),
        };
        let opts = DecodeOptions {
            mask: MaskSpec::causal(),
            softmax_scale: None,
            max_seqlen_k: None,
            num_splits: splits,
        };
        let name = format!("b{batch}_len{len}_q{sq}");
        let mut ms_samples: Vec<f64> = Vec::new();
        group.bench_function(BenchmarkId::new("decode", &name), |bench| {
            bench.iter_custom(|iters| {
                time_calls(
                    &g,
                    || {
                        let mut ov = o.as_view_mut();
                        g.attn
                            .decode(
                                &g.stream,
                                Input {
                                    data: &qv,
                                    layout: ql,
                                },
                                &cache,
                                Output {
                                    data: &mut ov,
                                    layout: ql,
                                    lse: None,
                                },
                                None,
                                &opts,
                            )
                            .unwrap()
                    },
                    &mut ms_samples,
                    iters,
                )
            })
        });
        if ms_samples.is_empty() {
            continue; // filtered out by criterion's name filter
        }
        let ms = median(&mut ms_samples);
        // The same bytes copied device to device.
        let kv_bytes = 2 * batch * len * hk * d * 2;
        let mut copy_samples: Vec<f64> = Vec::new();
        let src: CudaSlice<u8> = g.stream.alloc_zeros(kv_bytes).unwrap();
        let mut dst: CudaSlice<u8> = g.stream.alloc_zeros(kv_bytes).unwrap();
        group.bench_function(BenchmarkId::new("copy", &name), |bench| {
            bench.iter_custom(|iters| {
                time_calls(
                    &g,
                    || g.stream.memcpy_dtod(&src, &mut dst).unwrap(),
                    &mut copy_samples,
                    iters,
                )
            })
        });
        let copy_ms = median(&mut copy_samples);
        // RoPE, ReRoPE and Leaky ReRoPE over the same (un-rotated) cache, on a few shapes.
        let mut rope_ms: Vec<(&str, f64)> = Vec::new();
        if sq == 1 && matches!((batch, len), (1, 131072) | (4, 131075) | (16, 8192)) {
            for (mode_name, mode) in [
                ("rope", PositionMode::Rope),
                ("rerope", PositionMode::ReRope { window: 4096 }),
                (
                    "leaky",
                    PositionMode::LeakyReRope {
                        window: 4096,
                        leak: 16.0,
                    },
                ),
            ] {
                let rope = RopeOptions::new(RopeConfig::llama(d), mode);
                let mut samples: Vec<f64> = Vec::new();
                group.bench_function(BenchmarkId::new(mode_name, &name), |bench| {
                    bench.iter_custom(|iters| {
                        time_calls(
                            &g,
                            || {
                                let mut ov = o.as_view_mut();
                                g.attn
                                    .decode_rope(
                                        &g.stream,
                                        Input {
                                            data: &qv,
                                            layout: ql,
                                        },
                                        &cache,
                                        Output {
                                            data: &mut ov,
                                            layout: ql,
                                            lse: None,
                                        },
                                        None,
                                        &opts,
                                        &rope,
                                    )
                                    .unwrap()
                            },
                            &mut samples,
                            iters,
                        )
                    })
                });
                if !samples.is_empty() {
                    rope_ms.push((mode_name, median(&mut samples)));
                }
            }
        }
        let rope_json: String = rope_ms
            .iter()
            .map(|(m, t)| format!(", \"{m}_ms\": {t:.4}, \"{m}_over_plain\": {:.3}", t / ms))
            .collect();
        let plan_splits = splits.map_or("null".to_string(), |s: usize| s.to_string());
        println!(
            "RESULT {{\"impl\": \"longflash_decode\", \"batch\": {batch}, \"cache_len\": {len}, \"seqlen_q\": {sq}, \"heads_q\": {hq}, \"heads_kv\": {hk}, \"head_dim\": {d}, \"page_size\": {ps}, \"num_splits\": {plan_splits}, \"ms\": {ms:.4}, \"kv_gb\": {:.3}, \"tb_per_s\": {:.3}, \"copy_ms\": {copy_ms:.4}, \"copy_tb_per_s\": {:.3}{rope_json}, \"device\": \"{device}\"}}",
            kv_bytes as f64 / 1e9,
            kv_bytes as f64 / ms / 1e9,
            2.0 * kv_bytes as f64 / copy_ms / 1e9,
        );
    }
    group.finish();
}

criterion_group!(benches, bench_decode);
criterion_main!(benches);
