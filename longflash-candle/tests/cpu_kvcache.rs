//! Argument checks of the KV-cache calls (decoding, chunked prefill, RoPE decoding, KV append)
//! on CPU tensors: every bad call is an `Err` naming what was wrong, and a well-formed call still
//! fails on the CPU, for the device (longflash needs CUDA tensors). No GPU and no CUDA libraries
//! needed (`--no-default-features`).

use candle_core::{DType, Device, Result, Tensor};
use longflash_candle::{
    append_kv, append_kv_rope, flash_attn_with_kvcache, flash_attn_with_kvcache_lse,
    flash_attn_with_kvcache_rope, flash_attn_with_kvcache_rope_lse,
    flash_attn_with_kvcache_windowed, KvCache, MaskSpec, PositionMode, RopeConfig, RopeOptions,
};

fn t(dims: &[usize], dtype: DType) -> Tensor {
    Tensor::zeros(dims, dtype, &Device::Cpu).unwrap()
}

fn i32s(v: &[i32]) -> Tensor {
    Tensor::new(v, &Device::Cpu).unwrap()
}

/// The call failed, and its message holds every one of `words`.
#[track_caller]
fn fails_with<T: std::fmt::Debug>(r: Result<T>, words: &[&str]) {
    let e = r.expect_err("the call must fail").to_string();
    for w in words {
        assert!(e.contains(w), "error {e:?} does not mention {w:?}");
    }
}

/// The call passed every argument check and failed only for the device.
#[track_caller]
fn fails_for_the_device<T: std::fmt::Debug>(r: Result<T>) {
    let e = r.expect_err("CPU tensors").to_string();
    assert!(e.to_lowercase().contains("cuda"), "{e}");
}

fn rope(mode: PositionMode) -> RopeOptions {
    RopeOptions::new(RopeConfig::llama(64), mode)
}

const MODES: [PositionMode; 3] = [
    PositionMode::Rope,
    PositionMode::ReRope { window: 16 },
    PositionMode::LeakyReRope {
        window: 16,
        leak: 8.0,
    },
];

#[test]
fn well_formed_calls_fail_only_for_the_device() {
    for dtype in [DType::F16, DType::BF16] {
        // Decoding (1 and 4 query tokens) and a chunk of 40 over a contiguous cache of 2
        // sequences, 8 query heads over 2 KV heads.
        let (kc, vc) = (t(&[2, 256, 2, 64], dtype), t(&[2, 256, 2, 64], dtype));
        let lens = i32s(&[100, 256]);
        let cache = KvCache::contiguous(&kc, &vc, &lens);
        for sq in [1, 4, 40] {
            let q = t(&[2, sq, 8, 64], dtype);
            fails_for_the_device(flash_attn_with_kvcache(&q, &cache, 0.125, true));
            fails_for_the_device(flash_attn_with_kvcache(&q, &cache, 0.125, false));
            fails_for_the_device(flash_attn_with_kvcache_windowed(
                &q,
                &cache,
                0.125,
                Some(32),
                Some(0),
            ));
            fails_for_the_device(flash_attn_with_kvcache_lse(
                &q,
                &cache,
                0.125,
                MaskSpec::causal(),
            ));
            for mode in MODES {
                fails_for_the_device(flash_attn_with_kvcache_rope(&q, &cache, 0.125, &rope(mode)));
                fails_for_the_device(flash_attn_with_kvcache_rope_lse(
                    &q,
                    &cache,
                    0.125,
                    &rope(mode),
                ));
            }
        }
        // A paged cache: 7 pages of 16, 2 sequences of up to 3 pages.
        let (kp, vp) = (t(&[7, 16, 2, 64], dtype), t(&[7, 16, 2, 64], dtype));
        let table = Tensor::new(&[[3i32, 0, 6], [1, 1, 2]], &Device::Cpu).unwrap();
        let paged = KvCache::paged(&kp, &vp, &table, &lens);
        let q = t(&[2, 1, 8, 64], dtype);
        fails_for_the_device(flash_attn_with_kvcache(&q, &paged, 0.125, true));
        fails_for_the_device(flash_attn_with_kvcache_rope(
            &q,
            &paged,
            0.125,
            &rope(MODES[1]),
        ));
        // Appends of 1 and 5 tokens into either.
        for s in [1, 5] {
            let kn = t(&[2, s, 2, 64], dtype);
            fails_for_the_device(append_kv(&kn, &kn.clone(), &cache));
            fails_for_the_device(append_kv(&kn, &kn.clone(), &paged));
            fails_for_the_device(append_kv_rope(&kn, &kn.clone(), &cache, &rope(MODES[0])));
        }
    }
}

#[test]
fn query_and_cache_shapes() {
    let dt = DType::F16;
    let (kc, vc) = (t(&[2, 64, 2, 64], dt), t(&[2, 64, 2, 64], dt));
    let lens = i32s(&[10, 20]);
    let cache = KvCache::contiguous(&kc, &vc, &lens);
    let q = t(&[2, 1, 8, 64], dt);
    // Ranks.
    let q3 = t(&[2, 8, 64], dt);
    fails_with(
        flash_attn_with_kvcache(&q3, &cache, 0.125, true),
        &["`q`", "rank 4"],
    );
    let k3 = t(&[2, 64, 128], dt);
    fails_with(
        flash_attn_with_kvcache(&q, &KvCache::contiguous(&k3, &vc, &lens), 0.125, true),
        &["`k_cache`", "rank 4"],
    );
    // Dtypes: f32 q, a cache of another dtype than q.
    let q32 = q.to_dtype(DType::F32).unwrap();
    fails_with(flash_attn_with_kvcache(&q32, &cache, 0.125, true), &["F32"]);
    let qb = q.to_dtype(DType::BF16).unwrap();
    fails_with(
        flash_attn_with_kvcache(&qb, &cache, 0.125, true),
        &["`k_cache`", "F16"],
    );
    // k and v caches of different shapes.
    let v2 = t(&[2, 32, 2, 64], dt);
    fails_with(
        flash_attn_with_kvcache(&q, &KvCache::contiguous(&kc, &v2, &lens), 0.125, true),
        &["same shape"],
    );
    // Batch: the contiguous cache holds 2 sequences, q 3.
    let q_b3 = t(&[3, 1, 8, 64], dt);
    let lens3 = i32s(&[1, 2, 3]);
    fails_with(
        flash_attn_with_kvcache(&q_b3, &KvCache::contiguous(&kc, &vc, &lens3), 0.125, true),
        &["batch 2", "3"],
    );
    // Heads: 8 query heads over 3 KV heads; the head dims disagree.
    let k_h3 = t(&[2, 64, 3, 64], dt);
    fails_with(
        flash_attn_with_kvcache(&q, &KvCache::contiguous(&k_h3, &k_h3, &lens), 0.125, true),
        &["multiple"],
    );
    let q128 = t(&[2, 1, 8, 128], dt);
    fails_with(
        flash_attn_with_kvcache(&q128, &cache, 0.125, true),
        &["head dim"],
    );
    // Head dims the decoding kernels do not run.
    let (k6, q6) = (t(&[2, 64, 2, 6], dt), t(&[2, 1, 8, 6], dt));
    fails_with(
        flash_attn_with_kvcache(&q6, &KvCache::contiguous(&k6, &k6, &lens), 0.125, true),
        &["head dim 6"],
    );
    // A zero dimension.
    let q0 = t(&[2, 0, 8, 64], dt);
    fails_with(flash_attn_with_kvcache(&q0, &cache, 0.125, true), &["zero"]);
    // The head dim must be contiguous.
    let kt = t(&[2, 64, 64, 2], dt).transpose(2, 3).unwrap();
    fails_with(
        flash_attn_with_kvcache(&q, &KvCache::contiguous(&kt, &kt, &lens), 0.125, true),
        &["contiguous"],
    );
    // The scale.
    for s in [0.0f32, -1.0, f32::NAN] {
        fails_with(
            flash_attn_with_kvcache(&q, &cache, s, true),
            &["softmax_scale"],
        );
    }
    // A (batch, heads, seqlen, head_dim) cache seen as (batch, seqlen, heads, head_dim) is a
    // strided view, read in place: it passes the checks.
    let bhsd = t(&[2, 2, 64, 64], dt).transpose(1, 2).unwrap();
    fails_for_the_device(flash_attn_with_kvcache(
        &q,
        &KvCache::contiguous(&bhsd, &bhsd, &lens),
        0.125,
        true,
    ));
}

#[test]
fn cache_lengths_and_block_tables() {
    let dt = DType::BF16;
    let q = t(&[2, 1, 4, 64], dt);
    let (kp, vp) = (t(&[5, 32, 2, 64], dt), t(&[5, 32, 2, 64], dt));
    let lens = i32s(&[10, 20]);
    let table = Tensor::new(&[[0i32, 1], [2, 3]], &Device::Cpu).unwrap();
    fails_for_the_device(flash_attn_with_kvcache(
        &q,
        &KvCache::paged(&kp, &vp, &table, &lens),
        0.125,
        true,
    ));
    // Lengths: u32 or i64 instead of i32, one per sequence, rank 1.
    let lens_u = Tensor::new(&[10u32, 20], &Device::Cpu).unwrap();
    fails_with(
        flash_attn_with_kvcache(&q, &KvCache::paged(&kp, &vp, &table, &lens_u), 0.125, true),
        &["cache_seqlens", "I32"],
    );
    let lens_1 = i32s(&[10]);
    fails_with(
        flash_attn_with_kvcache(&q, &KvCache::paged(&kp, &vp, &table, &lens_1), 0.125, true),
        &["cache_seqlens", "(batch,)"],
    );
    let lens_2d = lens.reshape((1, 2)).unwrap();
    fails_with(
        flash_attn_with_kvcache(&q, &KvCache::paged(&kp, &vp, &table, &lens_2d), 0.125, true),
        &["cache_seqlens", "rank 1"],
    );
    // Tables: a row per sequence, i32, rank 2, contiguous, at least one column.
    let t3 = Tensor::new(&[[0i32, 1], [2, 3], [4, 4]], &Device::Cpu).unwrap();
    fails_with(
        flash_attn_with_kvcache(&q, &KvCache::paged(&kp, &vp, &t3, &lens), 0.125, true),
        &["block_table", "(batch, max_pages)"],
    );
    let tu = table.to_dtype(DType::U32).unwrap();
    fails_with(
        flash_attn_with_kvcache(&q, &KvCache::paged(&kp, &vp, &tu, &lens), 0.125, true),
        &["block_table", "I32"],
    );
    let t1 = i32s(&[0, 1]);
    fails_with(
        flash_attn_with_kvcache(&q, &KvCache::paged(&kp, &vp, &t1, &lens), 0.125, true),
        &["block_table", "rank 2"],
    );
    let tt = Tensor::new(&[[0i32, 1, 2], [3, 4, 0]], &Device::Cpu)
        .unwrap()
        .t()
        .unwrap();
    let lens3 = i32s(&[1, 2, 3]);
    let q3 = t(&[3, 1, 4, 64], dt);
    fails_with(
        flash_attn_with_kvcache(&q3, &KvCache::paged(&kp, &vp, &tt, &lens3), 0.125, true),
        &["block_table", "contiguous"],
    );
    let t0 = Tensor::zeros((2, 0), DType::I32, &Device::Cpu).unwrap();
    fails_with(
        flash_attn_with_kvcache(&q, &KvCache::paged(&kp, &vp, &t0, &lens), 0.125, true),
        &["block_table", "page"],
    );
    // Page sizes: a power of two, at least 16 for attention, any power of two for the append.
    for ps in [8usize, 24] {
        let k = t(&[5, ps, 2, 64], dt);
        fails_with(
            flash_attn_with_kvcache(
                &q,
                &KvCache::paged(&k, &k.clone(), &table, &lens),
                0.125,
                true,
            ),
            &["page size"],
        );
    }
    let k8 = t(&[5, 8, 2, 64], dt);
    let kn = t(&[2, 3, 2, 64], dt);
    fails_for_the_device(append_kv(
        &kn,
        &kn.clone(),
        &KvCache::paged(&k8, &k8.clone(), &table, &lens),
    ));
    let k24 = t(&[5, 24, 2, 64], dt);
    fails_with(
        append_kv(
            &kn,
            &kn.clone(),
            &KvCache::paged(&k24, &k24.clone(), &table, &lens),
        ),
        &["page size 24"],
    );
    // A paged cache may hold any number of pages, whatever the batch.
    let k1 = t(&[1, 16, 2, 64], dt);
    fails_for_the_device(flash_attn_with_kvcache(
        &q,
        &KvCache::paged(&k1, &k1.clone(), &table, &lens),
        0.125,
        true,
    ));
}

#[test]
fn rope_decoding() {
    let dt = DType::F16;
    let (kc, vc) = (t(&[1, 128, 3, 64], dt), t(&[1, 128, 3, 64], dt));
    let lens = i32s(&[50]);
    let cache = KvCache::contiguous(&kc, &vc, &lens);
    let q = t(&[1, 1, 9, 64], dt);
    // A rotary dim past the head dim, an odd one, a leak of 1, offsets for two sequences.
    let mut r = rope(PositionMode::Rope);
    r.config.rotary_dim = 96;
    fails_with(
        flash_attn_with_kvcache_rope(&q, &cache, 0.125, &r),
        &["rotary_dim"],
    );
    let mut r = rope(PositionMode::Rope);
    r.config.rotary_dim = 33;
    fails_with(
        flash_attn_with_kvcache_rope(&q, &cache, 0.125, &r),
        &["rotary_dim"],
    );
    let r = rope(PositionMode::LeakyReRope {
        window: 16,
        leak: 1.0,
    });
    fails_with(
        flash_attn_with_kvcache_rope(&q, &cache, 0.125, &r),
        &["leak"],
    );
    let mut r = rope(PositionMode::ReRope { window: 16 });
    r.position_offsets = Some(vec![0, 5]);
    fails_with(
        flash_attn_with_kvcache_rope(&q, &cache, 0.125, &r),
        &["position_offsets"],
    );
    // Head dims: padded ones pass (80), odd ones do not.
    let (k80, q80) = (t(&[1, 128, 3, 80], dt), t(&[1, 1, 9, 80], dt));
    let r80 = RopeOptions::new(RopeConfig::llama(80), PositionMode::ReRope { window: 16 });
    fails_for_the_device(flash_attn_with_kvcache_rope(
        &q80,
        &KvCache::contiguous(&k80, &k80.clone(), &lens),
        0.125,
        &r80,
    ));
}

#[test]
fn append_shapes() {
    let dt = DType::F16;
    let (kc, vc) = (t(&[2, 64, 2, 64], dt), t(&[2, 64, 2, 64], dt));
    let lens = i32s(&[10, 20]);
    let cache = KvCache::contiguous(&kc, &vc, &lens);
    let kn = t(&[2, 3, 2, 64], dt);
    // k_new and v_new of different shapes or dtypes; f32 rows; rank 3.
    let vn = t(&[2, 4, 2, 64], dt);
    fails_with(append_kv(&kn, &vn, &cache), &["same shape"]);
    let vb = kn.to_dtype(DType::BF16).unwrap();
    fails_with(append_kv(&kn, &vb, &cache), &["`v_new`", "BF16"]);
    let k32 = kn.to_dtype(DType::F32).unwrap();
    fails_with(append_kv(&k32, &k32, &cache), &["F32"]);
    let k3 = t(&[2, 3, 128], dt);
    fails_with(append_kv(&k3, &k3, &cache), &["`k_new`", "rank 4"]);
    // The cache's dtype, KV heads, head dim and batch must be the new rows'.
    let kb = kn.to_dtype(DType::BF16).unwrap();
    fails_with(append_kv(&kb, &kb, &cache), &["`k_cache`", "F16"]);
    let k_h4 = t(&[2, 3, 4, 64], dt);
    fails_with(append_kv(&k_h4, &k_h4, &cache), &["key/value heads"]);
    let k_d32 = t(&[2, 3, 2, 32], dt);
    fails_with(append_kv(&k_d32, &k_d32, &cache), &["head dim"]);
    let k_b1 = t(&[1, 3, 2, 64], dt);
    fails_with(append_kv(&k_b1, &k_b1, &cache), &["cache_seqlens"]);
    // An odd head dim.
    let (ko, kco) = (t(&[2, 3, 2, 63], dt), t(&[2, 64, 2, 63], dt));
    fails_with(
        append_kv(&ko, &ko, &KvCache::contiguous(&kco, &kco.clone(), &lens)),
        &["even head dim"],
    );
    // Lengths must be i32.
    let lens_f = lens.to_dtype(DType::F32).unwrap();
    fails_with(
        append_kv(&kn, &kn.clone(), &KvCache::contiguous(&kc, &vc, &lens_f)),
        &["cache_seqlens", "I32"],
    );
}
