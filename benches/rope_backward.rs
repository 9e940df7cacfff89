//! A training step's attention with RoPE / ReRoPE / Leaky ReRoPE inside the kernels (the RoPE
//! forward with its LSE, then `backward_rope`), against plain causal forward + backward on the
//! same shapes: batch 1, 16 heads, head dim 128, bf16, seqlen 4k to 64k (window 2048, leak 16).
//! Prints `RESULT {json}` per shape and mode with the median time (CUDA events) and the ratio
//! to plain causal forward + backward. Without a GPU it prints that it skipped (and fails when
//! LONGFLASH_REQUIRE_GPU=1).

use std::time::Duration;

#[path = "common/mod.rs"]
mod common;
use common::*;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use cudarc::driver::CudaSlice;
use half::bf16;
use longflash::rope::{PositionMode, RopeConfig, RopeOptions};
use longflash::{
    BackwardInputs, BackwardOptions, ForwardOptions, Gradient, Gradients, Layout, Output,
    RopeBackward, RopeForward,
};

fn bench_rope_backward(c: &mut Criterion) {
    let Some(g) = gpu() else { return };
    let device = g.ctx.name().unwrap_or_default();
    let (heads, d, window, leak) = (16usize, 128usize, 2048u32, 16.0f64);
    let seqlens = parse_list("LONGFLASH_BENCH_SEQLENS", &[4096, 16384, 65536]);
    // LONGFLASH_BENCH_BURST / LONGFLASH_BENCH_SUSTAINED: the peers' timing (common::Protocol).
    let protocol = Protocol::from_env();
    let mut group = c.benchmark_group("rope_backward_bf16_d128");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_millis(1500));
    for &s in &seqlens {
        let l = Layout::bshd(1, s, heads, d);
        let n = l.numel();
        let q: CudaSlice<bf16> = g.stream.clone_htod(&random_bf16(n, 1)).unwrap();
        let k: CudaSlice<bf16> = g.stream.clone_htod(&random_bf16(n, 2)).unwrap();
        let v: CudaSlice<bf16> = g.stream.clone_htod(&random_bf16(n, 3)).unwrap();
        let dout: CudaSlice<bf16> = g.stream.clone_htod(&random_bf16(n, 4)).unwrap();
        let mut o: CudaSlice<bf16> = g.stream.alloc_zeros(n).unwrap();
        let mut lse: CudaSlice<f32> = g.stream.alloc_zeros(heads * s).unwrap();
        let mut dq: CudaSlice<bf16> = g.stream.alloc_zeros(n).unwrap();
        let mut dk: CudaSlice<bf16> = g.stream.alloc_zeros(n).unwrap();
        let mut dv: CudaSlice<bf16> = g.stream.alloc_zeros(n).unwrap();
        let (qv, kv, vv, dov) = (q.as_view(), k.as_view(), v.as_view(), dout.as_view());
        // Causal FLOPs of forward + backward: 3.5 times the forward's 2 b h s^2 d.
        let flops = 3.5 * 2.0 * heads as f64 * (s as f64) * (s as f64) * d as f64;
        let mut plain_ms = None;
        for (name, mode) in [
            ("causal", None),
            ("rope", Some(PositionMode::Rope)),
            ("rerope", Some(PositionMode::ReRope { window })),
            ("leaky", Some(PositionMode::LeakyReRope { window, leak })),
        ] {
            let rope = mode.map(|m| RopeOptions::new(RopeConfig::llama(d), m));
            let mut step = || {
                let (mut ov, mut lv) = (o.as_view_mut(), lse.as_view_mut());
                let out = Output {
                    data: &mut ov,
                    layout: l,
                    lse: Some(&mut lv),
                };
                match &rope {
                    None => g.attn.forward(
                        &g.stream,
                        input(&qv, l),
                        input(&kv, l),
                        input(&vv, l),
                        out,
                        &ForwardOptions::causal(),
                    ),
                    Some(r) => g.attn.forward_rope(
                        &g.stream,
                        input(&qv, l),
                        input(&kv, l),
                        input(&vv, l),
                        out,
                        &RopeForward {
                            rope: r,
                            block_mask: None,
                            softmax_scale: None,
                        },
                    ),
                }
                .unwrap();
                let (ov, lv) = (o.as_view(), lse.as_view());
                let (mut dqv, mut dkv, mut dvv) =
                    (dq.as_view_mut(), dk.as_view_mut(), dv.as_view_mut());
                let inputs = BackwardInputs {
                    q: input(&qv, l),
                    k: input(&kv, l),
                    v: input(&vv, l),
                    o: input(&ov, l),
                    dout: input(&dov, l),
                    lse: &lv,
                };
                let grads = Gradients {
                    dq: Gradient {
                        data: &mut dqv,
                        layout: l,
                    },
                    dk: Gradient {
                        data: &mut dkv,
                        layout: l,
                    },
                    dv: Gradient {
                        data: &mut dvv,
                        layout: l,
                    },
                };
                match &rope {
                    None => g
                        .attn
                        .backward(&g.stream, inputs, grads, &BackwardOptions::causal()),
                    Some(r) => g.attn.backward_rope(
                        &g.stream,
                        inputs,
                        grads,
                        &RopeBackward {
                            rope: r,
                            softmax_scale: None,
                            deterministic: false,
                        },
                    ),
                }
                .unwrap();
            };
            let mut samples = sample_shape(
                &mut group,
                BenchmarkId::new(name, s),
                &g,
                protocol,
                &mut step,
            );
            if samples.is_empty() {
                continue; // filtered out by criterion's name filter
            }
            let ms = median(&mut samples);
            if mode.is_none() {
                plain_ms = Some(ms);
            }
            let ratio = plain_ms.map_or(f64::NAN, |p| ms / p);
            println!(
                "RESULT {{\"impl\": \"longflash\", \"pass\": \"fwd_bwd\", \"mode\": \"{name}\", \"dtype\": \"bf16\", \"batch\": 1, \"heads\": {heads}, \"seqlen\": {s}, \"head_dim\": {d}, \"window\": {window}, \"ms\": {ms:.4}, \"tflops\": {:.1}, \"vs_causal\": {ratio:.3}, \"device\": \"{device}\"}}",
                flops / ms / 1e9
            );
        }
    }
    group.finish();
}

criterion_group!(benches, bench_rope_backward);
criterion_main!(benches);
