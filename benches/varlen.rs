//! The variable-length (packed) forward against the fixed-length kernel on the same total tokens,
//! timed with CUDA events on the GPU: 16k tokens, hidden 2048 (16 heads of 128), bf16, causal and
//! not; sequences all of one length (the packed call computes exactly what the batched call
//! does) and of mixed lengths (the same tokens cut unevenly, FLOPs counted per sequence). Prints
//! `RESULT {json}` per shape with both times and their ratio (target: the packed call within 5%
//! of the batched one at equal lengths). The packed call runs on the sm_80 mainloop on every
//! device for now: `LONGFLASH_BENCH_MAINLOOP=sm80` makes the batched call do the same, for a
//! like-for-like ratio on Hopper. Without a GPU it prints that it skipped (and fails when
//! LONGFLASH_REQUIRE_GPU=1).

use std::time::Duration;

#[path = "common/mod.rs"]
mod common;
use common::*;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use cudarc::driver::CudaSlice;
use half::bf16;
use longflash::{ForwardOptions, Layout, MaskSpec, Output, VarlenOptions};

fn bench_varlen(c: &mut Criterion) {
    let Some(g) = gpu() else { return };
    let device = g.ctx.name().unwrap_or_default();
    let (tokens, h, d) = (16384usize, 16usize, 128usize);
    // LONGFLASH_BENCH_BURST / LONGFLASH_BENCH_SUSTAINED: the peers' timing (common::Protocol).
    let protocol = Protocol::from_env();
    let mut group = c.benchmark_group("varlen_bf16_d128");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_millis(1000));
    let n = tokens * h * d;
    let q: CudaSlice<bf16> = g.stream.clone_htod(&random_bf16(n, 1)).unwrap();
    let k: CudaSlice<bf16> = g.stream.clone_htod(&random_bf16(n, 2)).unwrap();
    let v: CudaSlice<bf16> = g.stream.clone_htod(&random_bf16(n, 3)).unwrap();
    let mut o: CudaSlice<bf16> = g.stream.alloc_zeros(n).unwrap();
    let (qv, kv, vv) = (q.as_view(), k.as_view(), v.as_view());
    let packed = Layout::bshd(1, tokens, h, d);
    // (name, sequence lengths); the mixed one has a long sequence and many short ones.
    let mut mixed = vec![8192usize, 3000, 2048, 1000, 1024, 512, 300, 200, 100];
    mixed.push(tokens - mixed.iter().sum::<usize>());
    let shapes: Vec<(String, Vec<usize>)> = [512usize, 1024, 2048, 4096, 8192, 16384]
        .iter()
        .map(|&s| (format!("equal_{s}"), vec![s; tokens / s]))
        .chain(std::iter::once(("mixed".to_string(), mixed)))
        .collect();
    for causal in [false, true] {
        let mask = if causal {
            MaskSpec::causal()
        } else {
            MaskSpec::none()
        };
        for (name, lens) in &shapes {
            let mut cu = vec![0i32];
            for &l in lens {
                cu.push(cu.last().unwrap() + l as i32);
            }
            let dcu: CudaSlice<i32> = g.stream.clone_htod(&cu).unwrap();
            let cuv = dcu.as_view();
            let max = *lens.iter().max().unwrap();
            let flops: f64 = lens
                .iter()
                .map(|&l| 4.0 * (h * l * l * d) as f64 * if causal { 0.5 } else { 1.0 })
                .sum();
            let opts = VarlenOptions {
                mask,
                softmax_scale: None,
                max_seqlen_q: max,
                max_seqlen_k: max,
            };
            let mut varlen_ms = sample_shape(
                &mut group,
                BenchmarkId::new(format!("varlen_{causal}"), name),
                &g,
                protocol,
                || {
                    let mut ov = o.as_view_mut();
                    g.attn
                        .forward_varlen(
                            &g.stream,
                            input(&qv, packed),
                            input(&kv, packed),
                            input(&vv, packed),
                            Output {
                                data: &mut ov,
                                layout: packed,
                                lse: None,
                            },
                            &cuv,
                            &cuv,
                            None,
                            &opts,
                        )
                        .unwrap()
                },
            );
            if varlen_ms.is_empty() {
                continue; // filtered out by criterion's name filter
            }
            let ms = median(&mut varlen_ms);
            // The batched call on the same tokens, when every sequence has one length.
            let equal = lens.iter().all(|&l| l == lens[0]);
            let mut fixed_ms: Vec<f64> = Vec::new();
            if equal {
                let l = Layout::bshd(lens.len(), lens[0], h, d);
                let fopts = ForwardOptions {
                    mask,
                    softmax_scale: None,
                };
                fixed_ms = sample_shape(
                    &mut group,
                    BenchmarkId::new(format!("fixed_{causal}"), name),
                    &g,
                    protocol,
                    || forward_same_layout(&g, (&qv, &kv, &vv), &mut o, l, &fopts),
                );
            }
            let fixed = if fixed_ms.is_empty() {
                "null".to_string()
            } else {
                format!("{:.4}", median(&mut fixed_ms))
            };
            let ratio = if fixed_ms.is_empty() {
                "null".to_string()
            } else {
                format!("{:.3}", ms / median(&mut fixed_ms))
            };
            println!(
                "RESULT {{\"impl\": \"longflash_varlen\", \"shape\": \"{name}\", \"sequences\": {}, \"tokens\": {tokens}, \"heads\": {h}, \"head_dim\": {d}, \"causal\": {causal}, \"ms\": {ms:.4}, \"tflops\": {:.1}, \"fixed_ms\": {fixed}, \"varlen_over_fixed\": {ratio}, \"device\": \"{device}\"}}",
                lens.len(),
                flops / ms / 1e9
            );
        }
    }
    group.finish();
}

criterion_group!(benches, bench_varlen);
criterion_main!(benches);
