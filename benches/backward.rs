//! Backward attention throughput (and forward + backward, a training step's attention), timed
//! with CUDA events on the GPU.
//!
//! Shapes as benches/forward.rs (FlashAttention's benchmark): batch * seqlen = 16k tokens, hidden
//! 2048 (heads = 2048 / head_dim), seqlen 512 to 16k, head dims 64 / 128 / 256, causal and not,
//! bf16. FLOPs: the forward's 4 b h s^2 d (halved when causal), 2.5 times that for the backward
//! (five matrix products where the forward has two), 3.5 times for forward + backward.
//!
//! Each configuration prints two `RESULT {json}` lines: `"impl": "longflash"` for forward +
//! backward (the forward with its LSE, then the backward), which benches/compare.py joins with
//! benches/peer_sdpa_backward.py's `sdpa_flash` / `sdpa_cudnn` lines of the same run, and
//! `"impl": "longflash_bwd"` for the backward alone (its peers: `sdpa_flash_bwd`,
//! `sdpa_cudnn_bwd`). `LONGFLASH_BENCH_DETERMINISTIC=1` times the deterministic dQ mode.
//! Without a GPU it prints that it skipped (and fails when LONGFLASH_REQUIRE_GPU=1).

use std::time::Duration;

#[path = "common/mod.rs"]
mod common;
use common::*;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use cudarc::driver::CudaSlice;
use half::bf16;
use longflash::{
    BackwardInputs, BackwardOptions, ForwardOptions, Gradient, Gradients, Layout, Output,
};

fn bench_backward(c: &mut Criterion) {
    let Some(g) = gpu() else { return };
    let device = g.ctx.name().unwrap_or_default();
    let mainloop = std::env::var("LONGFLASH_BENCH_MAINLOOP").unwrap_or_else(|_| "auto".into());
    let deterministic = std::env::var("LONGFLASH_BENCH_DETERMINISTIC").is_ok_and(|v| v == "1");
    let head_dims = parse_list("LONGFLASH_BENCH_HEAD_DIMS", &[64, 128, 256]);
    let seqlens = parse_list(
        "LONGFLASH_BENCH_SEQLENS",
        &[512, 1024, 2048, 4096, 8192, 16384],
    );
    let tokens = 16384usize;
    let protocol = Protocol::from_env();
    let protocol_name = protocol.map_or("criterion", |p| p.name);
    let mut group = c.benchmark_group("backward_bf16");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(1500));
    for &d in &head_dims {
        for causal in causal_list() {
            for &s in &seqlens {
                let (b, h) = (tokens / s, 2048 / d);
                let l = Layout::bshd(b, s, h, d);
                let n = l.numel();
                let q: CudaSlice<bf16> = g.stream.clone_htod(&random_bf16(n, 1)).unwrap();
                let k: CudaSlice<bf16> = g.stream.clone_htod(&random_bf16(n, 2)).unwrap();
                let v: CudaSlice<bf16> = g.stream.clone_htod(&random_bf16(n, 3)).unwrap();
                let dout: CudaSlice<bf16> = g.stream.clone_htod(&random_bf16(n, 4)).unwrap();
                let mut o: CudaSlice<bf16> = g.stream.alloc_zeros(n).unwrap();
                let mut lse: CudaSlice<f32> = g.stream.alloc_zeros(b * h * s).unwrap();
                let mut dq: CudaSlice<bf16> = g.stream.alloc_zeros(n).unwrap();
                let mut dk: CudaSlice<bf16> = g.stream.alloc_zeros(n).unwrap();
                let mut dv: CudaSlice<bf16> = g.stream.alloc_zeros(n).unwrap();
                let fwd_opts = if causal {
                    ForwardOptions::causal()
                } else {
                    ForwardOptions::dense()
                };
                let bwd_opts = BackwardOptions::from(fwd_opts).with_deterministic(deterministic);
                let fwd_flops = 4.0
                    * (b * h) as f64
                    * (s as f64)
                    * (s as f64)
                    * d as f64
                    * if causal { 0.5 } else { 1.0 };
                let (qv, kv, vv, dov) = (q.as_view(), k.as_view(), v.as_view(), dout.as_view());
                let forward = |o: &mut CudaSlice<bf16>, lse: &mut CudaSlice<f32>| {
                    let (mut ov, mut lv) = (o.as_view_mut(), lse.as_view_mut());
                    g.attn
                        .forward(
                            &g.stream,
                            input(&qv, l),
                            input(&kv, l),
                            input(&vv, l),
                            Output {
                                data: &mut ov,
                                layout: l,
                                lse: Some(&mut lv),
                            },
                            &fwd_opts,
                        )
                        .unwrap();
                };
                let mut backward = |o: &CudaSlice<bf16>, lse: &CudaSlice<f32>| {
                    let (ov, lv) = (o.as_view(), lse.as_view());
                    let (mut dqv, mut dkv, mut dvv) =
                        (dq.as_view_mut(), dk.as_view_mut(), dv.as_view_mut());
                    g.attn
                        .backward(
                            &g.stream,
                            BackwardInputs {
                                q: input(&qv, l),
                                k: input(&kv, l),
                                v: input(&vv, l),
                                o: input(&ov, l),
                                dout: input(&dov, l),
                                lse: &lv,
                            },
                            Gradients {
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
                            },
                            &bwd_opts,
                        )
                        .unwrap();
                };
                let name = format!("d{d}_{}", if causal { "causal" } else { "dense" });

                // Forward + backward.
                group.throughput(Throughput::Elements((3.5 * fwd_flops) as u64));
                let mut step_ms = sample_shape(
                    &mut group,
                    BenchmarkId::new(format!("fwd_bwd_{name}"), s),
                    &g,
                    protocol,
                    || {
                        forward(&mut o, &mut lse);
                        backward(&o, &lse);
                    },
                );
                // The backward alone, on the forward's O and LSE.
                forward(&mut o, &mut lse);
                group.throughput(Throughput::Elements((2.5 * fwd_flops) as u64));
                let mut bwd_ms = sample_shape(
                    &mut group,
                    BenchmarkId::new(format!("bwd_{name}"), s),
                    &g,
                    protocol,
                    || backward(&o, &lse),
                );
                for (imp, pass, times, flops) in [
                    ("longflash", "fwd_bwd", &mut step_ms, 3.5 * fwd_flops),
                    ("longflash_bwd", "bwd", &mut bwd_ms, 2.5 * fwd_flops),
                ] {
                    if times.is_empty() {
                        continue; // filtered out by criterion's name filter
                    }
                    let ms = median(times);
                    println!(
                        "RESULT {{\"impl\": \"{imp}\", \"pass\": \"{pass}\", \"dtype\": \"bf16\", \"batch\": {b}, \"heads\": {h}, \"seqlen\": {s}, \"head_dim\": {d}, \"causal\": {causal}, \"deterministic\": {deterministic}, \"protocol\": \"{protocol_name}\", \"ms\": {ms:.4}, \"tflops\": {:.1}, \"device\": \"{device}\", \"mainloop\": \"{mainloop}\"}}",
                        flops / ms / 1e9
                    );
                }
            }
        }
    }
    group.finish();
}

criterion_group!(benches, bench_backward);
criterion_main!(benches);
