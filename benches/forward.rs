//! Forward attention throughput, timed with CUDA events on the GPU.
//!
//! Shapes follow FlashAttention's benchmark: batch * seqlen = 16k tokens, hidden 2048 (heads =
//! 2048 / head_dim), seqlen 512 to 16k, head dims 64 / 128 / 256, causal and not, bf16.
//! Each configuration prints `RESULT {json}` with the median time and TFLOP/s (FLOPs = 4 b h s^2
//! d, halved when causal), which benches/compare.py joins with the PyTorch peers measured by
//! benches/peer_sdpa.py in the same run. Without a GPU it prints that it skipped (and fails when
//! LONGFLASH_REQUIRE_GPU=1). `LONGFLASH_BENCH_BURST` and `LONGFLASH_BENCH_SUSTAINED` time each
//! shape as the peers do instead of through criterion (see `common::Protocol`).

use std::time::Duration;

#[path = "common/mod.rs"]
mod common;
use common::*;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use cudarc::driver::CudaSlice;
use half::bf16;
use longflash::{ForwardOptions, Layout};

fn bench_forward(c: &mut Criterion) {
    let Some(g) = gpu() else { return };
    let device = g.ctx.name().unwrap_or_default();
    let mainloop = std::env::var("LONGFLASH_BENCH_MAINLOOP").unwrap_or_else(|_| "auto".into());
    let head_dims = parse_list("LONGFLASH_BENCH_HEAD_DIMS", &[64, 128, 256]);
    let seqlens = parse_list(
        "LONGFLASH_BENCH_SEQLENS",
        &[512, 1024, 2048, 4096, 8192, 16384],
    );
    let tokens = 16384usize;
    let protocol = Protocol::from_env();
    let protocol_name = protocol.map_or("criterion", |p| p.name);
    // Every shape holds tokens * 2048 elements per tensor: one set of buffers, filled once, serves
    // them all, so no shape times fresh allocations or another placement of its data than the
    // others (LONGFLASH_BENCH_FRESH_BUFFERS=1: new buffers per shape, as before).
    let fresh = std::env::var("LONGFLASH_BENCH_FRESH_BUFFERS").is_ok_and(|v| v == "1");
    let n_all = tokens * 2048;
    let upload =
        |seed: u64| -> CudaSlice<bf16> { g.stream.clone_htod(&random_bf16(n_all, seed)).unwrap() };
    let shared = (!fresh).then(|| (upload(1), upload(2), upload(3)));
    let mut shared_o: Option<CudaSlice<bf16>> =
        (!fresh).then(|| g.stream.alloc_zeros(n_all).unwrap());
    let mut group = c.benchmark_group("forward_bf16");
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
                assert_eq!(n, n_all, "every shape holds tokens * 2048 elements");
                let own = if fresh {
                    Some((upload(1), upload(2), upload(3)))
                } else {
                    None
                };
                let (q, k, v) = own.as_ref().or(shared.as_ref()).unwrap();
                let mut own_o: Option<CudaSlice<bf16>> =
                    fresh.then(|| g.stream.alloc_zeros(n).unwrap());
                let o: &mut CudaSlice<bf16> = own_o.as_mut().or(shared_o.as_mut()).unwrap();
                let opts = if causal {
                    ForwardOptions::causal()
                } else {
                    ForwardOptions::dense()
                };
                let flops = 4.0
                    * (b * h) as f64
                    * (s as f64)
                    * (s as f64)
                    * d as f64
                    * if causal { 0.5 } else { 1.0 };
                let (qv, kv, vv) = (q.as_view(), k.as_view(), v.as_view());
                let launch = |o: &mut CudaSlice<bf16>| {
                    forward_same_layout(&g, (&qv, &kv, &vv), o, l, &opts);
                };
                let id = BenchmarkId::new(
                    format!("d{d}_{}", if causal { "causal" } else { "dense" }),
                    s,
                );
                group.throughput(Throughput::Elements(flops as u64));
                let mut times_ms = sample_shape(&mut group, id, &g, protocol, || launch(o));
                if times_ms.is_empty() {
                    continue; // filtered out by criterion's name filter
                }
                let n_samples = times_ms.len();
                let ms = median(&mut times_ms);
                // The spread and the wall-clock time of the shape's end, to set the samples
                // beside a log of the GPU's clocks (scripts/gpu/bench-ab.sh).
                let (min_ms, max_ms) = (times_ms[0], times_ms[n_samples - 1]);
                let end_unix_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |t| t.as_millis());
                println!(
                    "RESULT {{\"impl\": \"longflash\", \"dtype\": \"bf16\", \"batch\": {b}, \"heads\": {h}, \"seqlen\": {s}, \"head_dim\": {d}, \"causal\": {causal}, \"ms\": {ms:.4}, \"tflops\": {:.1}, \"min_ms\": {min_ms:.4}, \"max_ms\": {max_ms:.4}, \"samples\": {n_samples}, \"protocol\": \"{protocol_name}\", \"end_unix_ms\": {end_unix_ms}, \"device\": \"{device}\", \"mainloop\": \"{mainloop}\"}}",
                    flops / ms / 1e9
                );
            }
        }
    }
    group.finish();
}

criterion_group!(benches, bench_forward);
criterion_main!(benches);
