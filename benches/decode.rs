//! The decoding forward over a KV cache, timed with CUDA events on the GPU: bf16, head dim 128,
//! one query token per sequence; GQA 32:8 and MHA 32:32; batch 1, 8, 64 and 256; cache lengths
//! 1k to 128k tokens per sequence (shapes whose K and V pass 24 GB are skipped); paged caches
//! with pages of 16 and 64 tokens in a shuffled order, and a contiguous cache (the layout
//! `benches/peer_decode.py` gives PyTorch SDPA's flash backend). Decoding is bound by memory, so
//! the figure is the bandwidth: the bytes of K and V read per second, next to a device-to-device
//! copy of the same bytes measured in the same run (its read plus write traffic per second).
//! Speculative decoding (4 and 16 tokens) and RoPE / ReRoPE (window 4096) / Leaky ReRoPE (leak
//! 16) decoding over the same un-rotated cache run on a few GQA shapes. Prints `RESULT {json}`
//! per shape. Without a GPU it prints that it skipped (and fails when LONGFLASH_REQUIRE_GPU=1).
//! Each shape is timed through the safe `decode` (`ms`), through the safe `decode_kept` with split
//! counters made once (`kept_ms`: no counter memset per call), and through `decode_raw` with a
//! workspace and split counters allocated once (`raw_ms`: no allocation and no memset), with the host's time to queue one call of each (`host_us`,
//! `raw_host_us`): when that nears the GPU time, the queued timing measures the host.
//!
//! `LONGFLASH_BENCH_DECODE_SPLITS=N` fixes the split count instead of the plan's choice;
//! `LONGFLASH_BENCH_DECODE_BATCHES` and `LONGFLASH_BENCH_DECODE_LENS` (comma lists) narrow the
//! grid.

use std::time::Duration;

#[path = "common/mod.rs"]
mod common;
use common::*;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use half::bf16;
use longflash::rope::{PositionMode, RopeConfig, RopeOptions};
use longflash::{
    BlockTable, DType, DecodeOptions, KvCache, Layout, MaskSpec, Output, RawDecode, SplitCounters,
};

const HEAD_DIM: usize = 128;
const HEADS_Q: usize = 32;
const MAX_KV_BYTES: usize = 24 << 30;

/// `n` elements on the device: a few MB of random data repeated (decoding's speed does not
/// depend on the values, and generating gigabytes on the host would take minutes).
fn device_data(stream: &std::sync::Arc<CudaStream>, n: usize, seed: u64) -> CudaSlice<bf16> {
    let chunk = n.min(1 << 22);
    let pattern = stream.clone_htod(&random_bf16(chunk, seed)).unwrap();
    let mut out: CudaSlice<bf16> = stream.alloc_zeros(n).unwrap();
    let mut at = 0;
    while at < n {
        let len = chunk.min(n - at);
        let mut dst = out.slice_mut(at..at + len);
        stream
            .memcpy_dtod(&pattern.slice(0..len), &mut dst)
            .unwrap();
        at += len;
    }
    out
}

/// One timed configuration.
struct Shape {
    batch: usize,
    len: usize,
    seqlen_q: usize,
    heads_kv: usize,
    /// Page size, or `None` for a contiguous cache.
    page: Option<usize>,
    /// Also time RoPE, ReRoPE and Leaky ReRoPE decoding.
    rope: bool,
}

fn shapes() -> Vec<Shape> {
    let batches = parse_list("LONGFLASH_BENCH_DECODE_BATCHES", &[1, 8, 64, 256]);
    let lens = parse_list("LONGFLASH_BENCH_DECODE_LENS", &[1024, 8192, 32768, 131072]);
    let mut v = Vec::new();
    for heads_kv in [8, 32] {
        for page in [Some(16), Some(64), None] {
            for &batch in &batches {
                for &len in &lens {
                    if 2 * batch * len * heads_kv * HEAD_DIM * 2 > MAX_KV_BYTES {
                        continue;
                    }
                    let rope = heads_kv == 8
                        && page == Some(64)
                        && matches!((batch, len), (1, 131072) | (8, 32768) | (64, 8192));
                    v.push(Shape {
                        batch,
                        len,
                        seqlen_q: 1,
                        heads_kv,
                        page,
                        rope,
                    });
                }
            }
        }
    }
    for seqlen_q in [4, 16] {
        v.push(Shape {
            batch: 8,
            len: 32768,
            seqlen_q,
            heads_kv: 8,
            page: Some(64),
            rope: false,
        });
    }
    v
}

fn bench_decode(c: &mut Criterion) {
    let Some(g) = gpu() else { return };
    let device = g.ctx.name().unwrap_or_default();
    let (hq, d) = (HEADS_Q, HEAD_DIM);
    let splits = std::env::var("LONGFLASH_BENCH_DECODE_SPLITS")
        .ok()
        .and_then(|v| v.parse().ok());
    // LONGFLASH_BENCH_BURST / LONGFLASH_BENCH_SUSTAINED: the peers' timing (common::Protocol).
    let protocol = Protocol::from_env();
    let mut group = c.benchmark_group("decode_bf16_d128");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(100))
        .measurement_time(Duration::from_millis(400));
    for s in shapes() {
        let (batch, len, sq, hk) = (s.batch, s.len, s.seqlen_q, s.heads_kv);
        // Paged: pages handed out in a shuffled order; contiguous: one entry per sequence.
        let (entries, rows, max_pages) = match s.page {
            Some(ps) => (batch * len.div_ceil(ps), ps, len.div_ceil(ps)),
            None => (batch, len, 1),
        };
        let cache_elems = entries * rows * hk * d;
        let k = device_data(&g.stream, cache_elems, 1);
        let v = device_data(&g.stream, cache_elems, 2);
        let q = g
            .stream
            .clone_htod(&random_bf16(batch * sq * hq * d, 3))
            .unwrap();
        let mut o: CudaSlice<bf16> = g.stream.alloc_zeros(batch * sq * hq * d).unwrap();
        let mut table: Vec<i32> = (0..entries as i32).collect();
        let mut x = 0x2545_F491_4F6C_DD1Du64 ^ len as u64;
        for i in (1..table.len()).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            table.swap(i, (x % (i as u64 + 1)) as usize);
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
        let cl = Layout::bshd(entries, rows, hk, d);
        let ql = Layout::bshd(batch, sq, hq, d);
        let cache = KvCache {
            k: input(&kv, cl),
            v: input(&vv, cl),
            block_table: s.page.map(|_| BlockTable {
                table: &tv,
                max_pages_per_seq: max_pages,
            }),
            cache_seqlens: Some(&lv),
        };
        let opts = DecodeOptions {
            mask: MaskSpec::causal(),
            softmax_scale: None,
            max_seqlen_k: None,
            num_splits: splits,
        };
        let page_name = s.page.map_or("contiguous".to_string(), |p| p.to_string());
        let name = format!("b{batch}_len{len}_q{sq}_hkv{hk}_page{page_name}");
        // One safe call: through `decode`, or through `decode_kept` with counters kept across
        // calls (no counter memset per call).
        let mut safe_call = |counters: Option<&mut SplitCounters>| {
            let mut ov = o.as_view_mut();
            let out = Output {
                data: &mut ov,
                layout: ql,
                lse: None,
            };
            let q = input(&qv, ql);
            match counters {
                None => g.attn.decode(&g.stream, q, &cache, out, None, &opts),
                Some(c) => g
                    .attn
                    .decode_kept(&g.stream, q, &cache, out, None, &opts, c),
            }
            .unwrap()
        };
        let mut decode_call = || safe_call(None);
        let mut ms_samples = sample_shape(
            &mut group,
            BenchmarkId::new("decode", &name),
            &g,
            protocol,
            &mut decode_call,
        );
        if ms_samples.is_empty() {
            continue; // filtered out by criterion's name filter
        }
        let ms = median(&mut ms_samples);
        let host_us = host_us_per_call(&g, &mut decode_call, 64);
        let mut counters = SplitCounters::for_shape(&g.stream, batch, sq, hq, hk).unwrap();
        let mut kept_call = || safe_call(Some(&mut counters));
        let mut kept_samples = sample_shape(
            &mut group,
            BenchmarkId::new("decode_kept", &name),
            &g,
            protocol,
            &mut kept_call,
        );
        let kept_ms = median(&mut kept_samples);
        // The raw entry an engine with its own allocator (or a CUDA graph) calls: device
        // pointers and a workspace allocated once, so the host does no allocation and no
        // per-buffer stream bookkeeping.
        let ptr = |x: &CudaSlice<bf16>| x.device_ptr(&g.stream).0;
        let raw = RawDecode {
            dtype: DType::Bf16,
            q: ptr(&q),
            k: ptr(&k),
            v: ptr(&v),
            o: ptr(&o),
            lse: 0,
            q_layout: ql,
            k_layout: cl,
            v_layout: cl,
            o_layout: ql,
            block_table: s.page.map_or(0, |_| dt.device_ptr(&g.stream).0),
            max_pages_per_seq: max_pages,
            cache_seqlens: dl.device_ptr(&g.stream).0,
            error_flag: 0,
            options: opts,
            workspace: 0,
            workspace_bytes: 0,
            split_counters: 0,
            split_counters_len: 0,
        };
        let plan = g.attn.decode_plan(&raw).unwrap();
        let ws: CudaSlice<u8> = g.stream.alloc_zeros(plan.workspace_bytes.max(16)).unwrap();
        // Split counters kept across calls (zeroed once here; each call leaves them zero), as a
        // decoding loop or a graph keeps them: no memset per call.
        let counters: CudaSlice<i32> = g.stream.alloc_zeros(plan.counters.max(1)).unwrap();
        let raw = RawDecode {
            workspace: ws.device_ptr(&g.stream).0,
            workspace_bytes: plan.workspace_bytes.max(16),
            split_counters: counters.device_ptr(&g.stream).0,
            split_counters_len: plan.counters.max(1),
            ..raw
        };
        let mut raw_call = || {
            // SAFETY: every pointer is a live allocation of this context that holds what its
            // layout addresses (the cache, table and lengths built above, the plan's workspace);
            // nothing else touches them while the stream runs, and they outlive its work (the
            // stream is synchronized before they are dropped).
            unsafe { g.attn.decode_raw(g.stream.cu_stream(), &raw) }.unwrap()
        };
        let mut raw_samples = sample_shape(
            &mut group,
            BenchmarkId::new("decode_raw", &name),
            &g,
            protocol,
            &mut raw_call,
        );
        let raw_ms = median(&mut raw_samples);
        let raw_host_us = host_us_per_call(&g, &mut raw_call, 64);
        g.stream.synchronize().unwrap();
        drop(ws);
        // The same bytes copied device to device.
        let kv_bytes = 2 * batch * len * hk * d * 2;
        let src: CudaSlice<u8> = g.stream.alloc_zeros(kv_bytes).unwrap();
        let mut dst: CudaSlice<u8> = g.stream.alloc_zeros(kv_bytes).unwrap();
        let mut copy_samples = sample_shape(
            &mut group,
            BenchmarkId::new("copy", &name),
            &g,
            protocol,
            || g.stream.memcpy_dtod(&src, &mut dst).unwrap(),
        );
        drop((src, dst));
        let copy_ms = median(&mut copy_samples);
        // RoPE, ReRoPE and Leaky ReRoPE over the same (un-rotated) cache.
        let mut rope_ms: Vec<(&str, f64)> = Vec::new();
        if s.rope {
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
                let mut samples = sample_shape(
                    &mut group,
                    BenchmarkId::new(mode_name, &name),
                    &g,
                    protocol,
                    || {
                        let mut ov = o.as_view_mut();
                        g.attn
                            .decode_rope(
                                &g.stream,
                                input(&qv, ql),
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
                );
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
        let page_json = s.page.map_or("null".to_string(), |p| p.to_string());
        println!(
            "RESULT {{\"impl\": \"longflash_decode\", \"batch\": {batch}, \"cache_len\": {len}, \"seqlen_q\": {sq}, \"heads_q\": {hq}, \"heads_kv\": {hk}, \"head_dim\": {d}, \"page_size\": {page_json}, \"num_splits\": {plan_splits}, \"ms\": {ms:.4}, \"host_us\": {host_us:.1}, \"kept_ms\": {kept_ms:.4}, \"raw_ms\": {raw_ms:.4}, \"raw_host_us\": {raw_host_us:.1}, \"kv_gb\": {:.3}, \"tb_per_s\": {:.3}, \"copy_ms\": {copy_ms:.4}, \"copy_tb_per_s\": {:.3}, \"of_copy\": {:.3}{rope_json}, \"device\": \"{device}\"}}",
            kv_bytes as f64 / 1e9,
            kv_bytes as f64 / ms / 1e9,
            2.0 * kv_bytes as f64 / copy_ms / 1e9,
            (kv_bytes as f64 / ms) / (2.0 * kv_bytes as f64 / copy_ms),
        );
    }
    group.finish();
}

criterion_group!(benches, bench_decode);
criterion_main!(benches);
