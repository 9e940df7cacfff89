//! RoPE / ReRoPE / Leaky ReRoPE applied inside the causal kernel, against the plain causal
//! kernel on the same shapes: batch 1, 16 heads, head dim 128, bf16, seqlen 4k to 128k, plus one
//! 256k-token ReRoPE call to show the context one GPU runs. Prints `RESULT {json}` per shape
//! with the median time (CUDA events) and the ratio to plain causal attention;
//! benches/peer_rerope.py times the two-matrix PyTorch ReRoPE in the same session.

use std::time::Duration;

#[path = "common/mod.rs"]
mod common;
use common::*;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use cudarc::driver::CudaSlice;
use half::bf16;
use longflash::rope::{PositionMode, RopeConfig, RopeOptions};
use longflash::{ForwardOptions, Layout, Output, RopeForward};

fn bench_rope(c: &mut Criterion) {
    let Some(g) = gpu() else { return };
    let device = g.ctx.name().unwrap_or_default();
    let (heads, d, window, leak) = (16usize, 128usize, 2048u32, 16.0f64);
    let seqlens: Vec<usize> = std::env::var("LONGFLASH_BENCH_SEQLENS")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![4096, 8192, 16384, 32768, 65536, 131072, 262144]);
    // LONGFLASH_BENCH_BURST / LONGFLASH_BENCH_SUSTAINED: the peers' timing (common::Protocol).
    let protocol = Protocol::from_env();
    let mut group = c.benchmark_group("rope_bf16_d128");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_millis(1000));
    for &s in &seqlens {
        let l = Layout::bshd(1, s, heads, d);
        let n = l.numel();
        let q: CudaSlice<bf16> = g.stream.clone_htod(&random_bf16(n, 1)).unwrap();
        let k: CudaSlice<bf16> = g.stream.clone_htod(&random_bf16(n, 2)).unwrap();
        let v: CudaSlice<bf16> = g.stream.clone_htod(&random_bf16(n, 3)).unwrap();
        let mut o: CudaSlice<bf16> = g.stream.alloc_zeros(n).unwrap();
        let (qv, kv, vv) = (q.as_view(), k.as_view(), v.as_view());
        let modes: Vec<(&str, Option<PositionMode>)> = if s > 131072 {
            vec![("rerope", Some(PositionMode::ReRope { window }))]
        } else {
            vec![
                ("causal", None),
                ("rope", Some(PositionMode::Rope)),
                ("rerope", Some(PositionMode::ReRope { window })),
                ("leaky", Some(PositionMode::LeakyReRope { window, leak })),
            ]
        };
        let mut plain_ms = None;
        for (name, mode) in modes {
            let rope = mode.map(|m| RopeOptions::new(RopeConfig::llama(d), m));
            let mut samples =
                sample_shape(&mut group, BenchmarkId::new(name, s), &g, protocol, || {
                    let mut ov = o.as_view_mut();
                    let (qi, ki, vi) = (input(&qv, l), input(&kv, l), input(&vv, l));
                    let out = Output {
                        data: &mut ov,
                        layout: l,
                        lse: None,
                    };
                    match &rope {
                        None => {
                            g.attn
                                .forward(&g.stream, qi, ki, vi, out, &ForwardOptions::causal())
                        }
                        Some(r) => g.attn.forward_rope(
                            &g.stream,
                            qi,
                            ki,
                            vi,
                            out,
                            &RopeForward {
                                rope: r,
                                block_mask: None,
                                softmax_scale: None,
                            },
                        ),
                    }
                    .unwrap();
                });
            if samples.is_empty() {
                continue;
            }
            let ms = median(&mut samples);
            if name == "causal" {
                plain_ms = Some(ms);
            }
            let flops = 2.0 * heads as f64 * (s as f64).powi(2) * d as f64;
            println!(
                "RESULT {{\"impl\": \"longflash_{name}\", \"mode\": \"{name}\", \"seqlen\": {s}, \"heads\": {heads}, \"head_dim\": {d}, \"window\": {window}, \"leak\": {leak}, \"ms\": {ms:.4}, \"tflops\": {:.1}, \"vs_plain_causal\": {}, \"device\": \"{device}\"}}",
                flops / ms / 1e9,
                plain_ms.map_or("null".into(), |p| format!("{:.3}", ms / p))
            );
        }
    }
    group.finish();
}

criterion_group!(benches, bench_rope);
criterion_main!(benches);
