//! Block-sparse forward: time follows the number of computed blocks.
//!
//! - Density sweep: random 128 x 64 blocks at 1% .. 100% density, seqlen 16k and 64k, head dim
//!   128, 16 heads, bf16, no element mask; against the dense kernel on the same shape.
//! - Sinks + window (StreamingLLM: 4 sink tokens, a 4096-token causal window) at 64k and 128k,
//!   against the dense causal kernel.
//!
//! - Dynamic block selection (`select_blocks` + `forward_selected`, MoBA's rule on the GPU):
//!   causal, 16 heads of 128, bf16, the top 16 whole key blocks per query block, at 16k and 64k
//!   tokens (`LONGFLASH_BENCH_SELECT` overrides; 0 skips), against the dense causal kernel.
//!
//! Each mask prints `RESULT {json}` with the median time (CUDA events), TFLOP/s on the computed
//! blocks (4 * d per (query, key) pair of every listed block) and the speedup over dense. With
//! LONGFLASH_MASK_DIR set, each mask is also written there (CSR + flags + metadata) so that
//! benches/peer_flex.py runs FlexAttention on exactly the same masks in the same session.
//! Without a GPU it prints that it skipped (and fails when LONGFLASH_REQUIRE_GPU=1).

use std::time::Duration;

#[path = "common/mod.rs"]
mod common;
use common::*;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use cudarc::driver::CudaSlice;
use half::bf16;
use longflash::sparse::{patterns, BlockMask, MaskShape, K_BLOCK, Q_BLOCK};
use longflash::{
    BlockSelectPlan, ForwardOptions, Layout, MaskSpec, Output, SelectedOptions, SparseOptions,
};

/// (query, key) pairs of every listed block, per (batch, head) row of the mask, summed over the
/// call's batch and heads.
fn computed_pairs(m: &BlockMask, batch: usize, heads: usize) -> f64 {
    let s = m.shape();
    let mut total = 0.0;
    for b in 0..batch {
        for h in 0..heads {
            for qb in 0..s.num_q_blocks() {
                let rows = ((qb + 1) * Q_BLOCK).min(s.seqlen_q) - qb * Q_BLOCK;
                for &kb in m.row(b, h, qb) {
                    let keys =
                        ((kb as usize + 1) * K_BLOCK).min(s.seqlen_k) - kb as usize * K_BLOCK;
                    total += (rows * keys) as f64;
                }
            }
        }
    }
    total
}

fn write_mask(dir: &str, name: &str, m: &BlockMask, meta: &str) {
    let p = std::path::Path::new(dir);
    std::fs::create_dir_all(p).unwrap();
    let bytes = |v: &[i32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    std::fs::write(
        p.join(format!("{name}.offsets.i32")),
        bytes(m.row_offsets()),
    )
    .unwrap();
    std::fs::write(p.join(format!("{name}.cols.i32")), bytes(m.col_indices())).unwrap();
    std::fs::write(p.join(format!("{name}.full.u8")), m.full_flags()).unwrap();
    std::fs::write(p.join(format!("{name}.json")), meta).unwrap();
}

fn opt(x: Option<u32>) -> String {
    x.map_or("null".into(), |v| v.to_string())
}

fn bench_sparse(c: &mut Criterion) {
    let Some(g) = gpu() else { return };
    let device = g.ctx.name().unwrap_or_default();
    let mask_dir = std::env::var("LONGFLASH_MASK_DIR").ok();
    let (d, heads) = (128usize, 16usize);
    let mut cases: Vec<(String, String, f64, usize, BlockMask)> = Vec::new();
    for s in [16384usize, 65536] {
        for density in [0.01, 0.05, 0.10, 0.25, 0.50, 1.00] {
            let shape = MaskShape {
                batch: 1,
                heads,
                seqlen_q: s,
                seqlen_k: s,
            };
            let m = BlockMask::from_fn(shape, MaskSpec::none(), |_, h, qb, kb| {
                let mut z = (h as u64) << 40 ^ (qb as u64) << 20 ^ kb as u64 ^ 0x5eed;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                (((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64) < density
            })
            .unwrap();
            cases.push((
                format!("random_{}pct_{}k", (density * 100.0) as u32, s / 1024),
                "random".into(),
                density,
                s,
                m,
            ));
        }
    }
    for s in [65536usize, 131072] {
        let shape = MaskShape {
            batch: 1,
            heads: 1,
            seqlen_q: s,
            seqlen_k: s,
        };
        let m = patterns::sinks_window(shape, 4, 4096).unwrap();
        let density = m.density();
        cases.push((
            format!("sinks4_window4096_{}k", s / 1024),
            "sinks_window".into(),
            density,
            s,
            m,
        ));
    }
    let protocol = Protocol::from_env();
    let mut group = c.benchmark_group("sparse_bf16_d128");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_millis(1000));
    let mut dense_ms: std::collections::HashMap<(usize, bool), Option<f64>> = Default::default();
    for (name, pattern, density, s, m) in &cases {
        let l = Layout::bshd(1, *s, heads, d);
        let n = l.numel();
        let q: CudaSlice<bf16> = g.stream.clone_htod(&random_bf16(n, 1)).unwrap();
        let k: CudaSlice<bf16> = g.stream.clone_htod(&random_bf16(n, 2)).unwrap();
        let v: CudaSlice<bf16> = g.stream.clone_htod(&random_bf16(n, 3)).unwrap();
        let mut o: CudaSlice<bf16> = g.stream.alloc_zeros(n).unwrap();
        let (qv, kv, vv) = (q.as_view(), k.as_view(), v.as_view());
        let causal = m.element_mask().causal;
        // The dense kernel on the same shape (causal when the mask is causal), once per shape.
        if let std::collections::hash_map::Entry::Vacant(slot) = dense_ms.entry((*s, causal)) {
            let opts = if causal {
                ForwardOptions::causal()
            } else {
                ForwardOptions::dense()
            };
            let mut samples = sample_shape(
                &mut group,
                BenchmarkId::new(format!("dense{}", if causal { "_causal" } else { "" }), s),
                &g,
                protocol,
                || {
                    forward_same_layout(&g, (&qv, &kv, &vv), &mut o, l, &opts);
                },
            );
            // Inserted even when filtered out: criterion takes each id once.
            slot.insert((!samples.is_empty()).then(|| median(&mut samples)));
        }
        let dm = m.to_device(&g.stream).unwrap();
        let sopts = SparseOptions {
            mask: &dm,
            softmax_scale: None,
        };
        let mut samples = sample_shape(
            &mut group,
            BenchmarkId::new(name.clone(), s),
            &g,
            protocol,
            || {
                let mut ov = o.as_view_mut();
                g.attn
                    .forward_sparse(
                        &g.stream,
                        input(&qv, l),
                        input(&kv, l),
                        input(&vv, l),
                        Output {
                            data: &mut ov,
                            layout: l,
                            lse: None,
                        },
                        &sopts,
                    )
                    .unwrap();
            },
        );
        if samples.is_empty() {
            continue;
        }
        let ms = median(&mut samples);
        let flops = 4.0 * d as f64 * computed_pairs(m, 1, heads);
        let dense = dense_ms.get(&(*s, causal)).copied().flatten();
        let dense_tflops = dense.map(|t| {
            4.0 * d as f64 * heads as f64 * (*s as f64).powi(2) * if causal { 0.5 } else { 1.0 }
                / t
                / 1e9
        });
        let e = m.element_mask();
        println!(
            "RESULT {{\"impl\": \"longflash_sparse\", \"name\": \"{name}\", \"pattern\": \"{pattern}\", \"density\": {density:.4}, \"seqlen\": {s}, \"head_dim\": {d}, \"heads\": {heads}, \"ms\": {ms:.4}, \"tflops\": {:.1}, \"dense_ms\": {}, \"dense_tflops\": {}, \"speedup_vs_dense\": {}, \"device\": \"{device}\"}}",
            flops / ms / 1e9,
            dense.map_or("null".into(), |t| format!("{t:.4}")),
            dense_tflops.map_or("null".into(), |t| format!("{t:.1}")),
            dense.map_or("null".into(), |t| format!("{:.2}", t / ms)),
        );
        if let Some(dir) = &mask_dir {
            let ms_ = m.shape();
            let meta = format!(
                "{{\"name\": \"{name}\", \"pattern\": \"{pattern}\", \"density\": {density}, \"seqlen_q\": {s}, \"seqlen_k\": {s}, \"batch\": 1, \"heads\": {heads}, \"head_dim\": {d}, \"dtype\": \"bf16\", \"q_block\": {Q_BLOCK}, \"k_block\": {K_BLOCK}, \"mask_batch\": {}, \"mask_heads\": {}, \"element\": {{\"causal\": {}, \"window_left\": {}, \"window_right\": {}, \"sink_tokens\": {}}}, \"longflash_ms\": {ms}}}",
                ms_.batch, ms_.heads, e.causal, opt(e.window_left), opt(e.window_right), e.sink_tokens
            );
            write_mask(dir, name, m, &meta);
        }
    }
    group.finish();
}

/// Dynamic block selection: the selection's time, the forward over it, and the dense causal
/// forward on the same shape (see the module docs).
fn bench_select(c: &mut Criterion) {
    let Some(g) = gpu() else { return };
    let device = g.ctx.name().unwrap_or_default();
    let (d, heads, top_k) = (128usize, 16usize, 16usize);
    let protocol = Protocol::from_env();
    let mut group = c.benchmark_group("select_bf16_d128");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_millis(1000));
    for s in parse_list("LONGFLASH_BENCH_SELECT", &[16384, 65536]) {
        if s == 0 {
            continue;
        }
        let l = Layout::bshd(1, s, heads, d);
        let n = l.numel();
        let q: CudaSlice<bf16> = g.stream.clone_htod(&random_bf16(n, 1)).unwrap();
        let k: CudaSlice<bf16> = g.stream.clone_htod(&random_bf16(n, 2)).unwrap();
        let v: CudaSlice<bf16> = g.stream.clone_htod(&random_bf16(n, 3)).unwrap();
        let mut o: CudaSlice<bf16> = g.stream.alloc_zeros(n).unwrap();
        let (qv, kv, vv) = (q.as_view(), k.as_view(), v.as_view());
        let shape = MaskShape {
            batch: 1,
            heads,
            seqlen_q: s,
            seqlen_k: s,
        };
        let t0 = std::time::Instant::now();
        let plan = BlockSelectPlan::new(shape, MaskSpec::causal(), top_k).unwrap();
        let plan_ms = t0.elapsed().as_secs_f64() * 1e3;
        let nnz = plan.nnz();
        let selector = g.attn.block_selector(&g.stream, plan).unwrap();
        let mut time = |name: &str, f: &mut dyn FnMut()| {
            let mut samples = sample_shape(
                &mut group,
                BenchmarkId::new(name.to_string(), s),
                &g,
                protocol,
                f,
            );
            (!samples.is_empty()).then(|| median(&mut samples))
        };
        let Some(select_ms) = time("select", &mut || {
            g.attn
                .select_blocks(&g.stream, &selector, input(&qv, l), input(&kv, l))
                .unwrap();
        }) else {
            continue;
        };
        let blocks = g
            .attn
            .select_blocks(&g.stream, &selector, input(&qv, l), input(&kv, l))
            .unwrap();
        let opts = SelectedOptions {
            blocks: &blocks,
            softmax_scale: None,
        };
        let forward_ms = time("forward_selected", &mut || {
            let mut ov = o.as_view_mut();
            let out = Output {
                data: &mut ov,
                layout: l,
                lse: None,
            };
            g.attn
                .forward_selected(
                    &g.stream,
                    input(&qv, l),
                    input(&kv, l),
                    input(&vv, l),
                    out,
                    &opts,
                )
                .unwrap();
        })
        .unwrap_or(f64::NAN);
        let causal = ForwardOptions::causal();
        let dense_ms = time("dense_causal", &mut || {
            forward_same_layout(&g, (&qv, &kv, &vv), &mut o, l, &causal);
        })
        .unwrap_or(f64::NAN);
        println!(
            "RESULT {{\"impl\": \"longflash_select\", \"seqlen\": {s}, \"heads\": {heads}, \"head_dim\": {d}, \"top_k\": {top_k}, \"blocks\": {nnz}, \"density\": {:.4}, \"plan_host_ms\": {plan_ms:.2}, \"select_ms\": {select_ms:.4}, \"forward_ms\": {forward_ms:.4}, \"dense_causal_ms\": {dense_ms:.4}, \"speedup_vs_dense_causal\": {:.2}, \"device\": \"{device}\"}}",
            nnz as f64 / (heads * shape.num_q_blocks() * shape.num_k_blocks()) as f64,
            dense_ms / (select_ms + forward_ms),
        );
    }
    group.finish();
}

criterion_group!(benches, bench_sparse, bench_select);
criterion_main!(benches);
