//! Ring attention over NCCL: without NCCL a typed error; with NCCL and GPUs, a ring over every
//! visible GPU (one rank per GPU; a single GPU makes a ring of one) against attention in f64 over
//! the whole sequence, each rank's shard under the correctness rule with the low-precision ring
//! (`reference::ring_attention_lowp`) as the budget; the same under rotary positions
//! (`ring_rope_forward`, against the two-matrix definition with `ring_rope_attention_lowp` as the
//! budget). Without a GPU or NCCL the GPU tests print that they skipped; with
//! LONGFLASH_REQUIRE_GPU=1 that is a failure.

use half::bf16;
use longflash::mask::MaskSpec;
use longflash::reference::{
    attention_f64, compare, ring_attention_lowp, ring_rope_attention_lowp, rope_attention_f64,
    RefOutput, RefShape,
};
use longflash::ring::{RingPlan, Sharding};
use longflash::rope::{PositionMode, RopeConfig, RopeOptions};
use longflash_ring::{
    nccl_present, ring_forward, ring_rope_forward, run_local_ring, Error, LocalRank, Shard,
    ShardOutput,
};

fn require_gpu() -> bool {
    std::env::var("LONGFLASH_REQUIRE_GPU").is_ok_and(|v| v == "1")
}

#[test]
fn no_nccl_is_a_typed_error() {
    if nccl_present() {
        println!("skipped: NCCL is present here");
        return;
    }
    assert!(matches!(
        run_local_ring(&[0], |_| Ok(())),
        Err(Error::NoNccl)
    ));
}

/// Rows of rank `rank`'s shard of a `[batch, seqlen, heads, d]` tensor (`row` elements a token).
fn shard_rows<E: Copy>(x: &[E], plan: &RingPlan, rank: usize, batch: usize, row: usize) -> Vec<E> {
    let s = plan.seqlen();
    let mut out = Vec::new();
    for b in 0..batch {
        for c in plan.shard(rank) {
            out.extend_from_slice(&x[(b * s + c.start) * row..(b * s + c.end) * row]);
        }
    }
    out
}

/// Rank `rank`'s rows of a whole-sequence result (output and LSE) as a result of its own.
fn shard_result(
    r: &RefOutput,
    plan: &RingPlan,
    rank: usize,
    batch: usize,
    hq: usize,
    d: usize,
) -> RefOutput {
    let s = plan.seqlen();
    let out = shard_rows(&r.out, plan, rank, batch, hq * d);
    let mut lse = Vec::new();
    for b in 0..batch {
        for h in 0..hq {
            for c in plan.shard(rank) {
                lse.extend_from_slice(&r.lse[(b * hq + h) * s + c.start..(b * hq + h) * s + c.end]);
            }
        }
    }
    RefOutput {
        out,
        lse,
        dtype: r.dtype,
        ..RefOutput::default()
    }
}

/// The visible GPUs with NCCL, or `None` after saying the test skipped.
fn gpus_or_skip() -> Option<usize> {
    if !nccl_present() {
        assert!(
            !require_gpu(),
            "LONGFLASH_REQUIRE_GPU=1 but no NCCL library"
        );
        println!("skipped: no NCCL library");
        return None;
    }
    match cudarc::driver::CudaContext::device_count() {
        Ok(n) if n > 0 => Some(n as usize),
        _ => {
            assert!(!require_gpu(), "LONGFLASH_REQUIRE_GPU=1 but no GPU");
            println!("skipped: no GPU");
            None
        }
    }
}

/// Random bf16 q, k, v over `plan`'s sequence (`dims`: batch, query heads, key/value heads, head
/// dim); `ring` runs each rank's part over NCCL on one GPU each, checked per rank against
/// `refs`' f64 reference under the correctness rule with its low-precision budget.
#[allow(clippy::type_complexity)]
fn check_ring(
    gpus: usize,
    plan: &RingPlan,
    (batch, hq, hk, d): (usize, usize, usize, usize),
    refs: impl FnOnce(&RefShape, (&[bf16], &[bf16], &[bf16]), f32) -> (RefOutput, RefOutput),
    ring: impl Fn(&LocalRank, Shard<'_, bf16>, ShardOutput<'_, bf16>) -> longflash_ring::Result<()>
        + Sync,
    what: &str,
) {
    let seqlen = plan.seqlen();
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ seqlen as u64;
    let mut gen = |n: usize| -> Vec<bf16> {
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                bf16::from_f32(((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 3.0)
            })
            .collect()
    };
    let (q, k, v) = (
        gen(batch * seqlen * hq * d),
        gen(batch * seqlen * hk * d),
        gen(batch * seqlen * hk * d),
    );
    let shape = RefShape {
        batch,
        seqlen_q: seqlen,
        seqlen_k: seqlen,
        heads_q: hq,
        heads_kv: hk,
        head_dim: d,
    };
    let scale = 1.0 / (d as f32).sqrt();
    let (ref64, naive) = refs(&shape, (&q, &k, &v), scale);
    let ordinals: Vec<usize> = (0..gpus).collect();
    let results = run_local_ring(&ordinals, |me| {
        let rank = me.comm.rank();
        let n = plan.shard_len(rank);
        let s = &me.compute;
        let up = |x: Vec<bf16>| s.clone_htod(&x).unwrap();
        let (dq, dk, dv) = (
            up(shard_rows(&q, plan, rank, batch, hq * d)),
            up(shard_rows(&k, plan, rank, batch, hk * d)),
            up(shard_rows(&v, plan, rank, batch, hk * d)),
        );
        let mut o = s.alloc_zeros::<bf16>(batch * n * hq * d).unwrap();
        let mut lse = s.alloc_zeros::<f32>(batch * hq * n).unwrap();
        ring(
            me,
            Shard {
                q: &dq,
                k: &dk,
                v: &dv,
                dims: (batch, hq, hk, d),
            },
            ShardOutput {
                o: &mut o,
                lse: &mut lse,
            },
        )?;
        s.synchronize().unwrap();
        let out: Vec<f64> = s
            .clone_dtoh(&o)
            .unwrap()
            .iter()
            .map(|t| t.to_f32() as f64)
            .collect();
        Ok((rank, out, s.clone_dtoh(&lse).unwrap()))
    })
    .unwrap();
    for (rank, out, lse) in results {
        let cmp = compare(
            &out,
            Some(&lse),
            &shard_result(&ref64, plan, rank, batch, hq, d),
            &shard_result(&naive, plan, rank, batch, hq, d),
        );
        assert!(cmp.passes, "rank {rank} of {gpus}, {what}: {cmp}");
    }
}

fn wide(x: &[bf16]) -> Vec<f64> {
    x.iter().map(|t| t.to_f32() as f64).collect()
}

#[test]
fn ring_over_every_gpu_matches_whole_attention() {
    let Some(gpus) = gpus_or_skip() else { return };
    for (seqlen, sharding, mask) in [
        (1000, Sharding::Zigzag, MaskSpec::causal()),
        (1001, Sharding::Contiguous, MaskSpec::causal()),
        (777, Sharding::Zigzag, MaskSpec::none()),
        (1003, Sharding::Contiguous, MaskSpec::causal_window(150)),
        (
            900,
            Sharding::Zigzag,
            MaskSpec::sliding_window(Some(97), Some(40)),
        ),
    ] {
        let plan = RingPlan::with_mask(seqlen, gpus, sharding, mask).unwrap();
        check_ring(
            gpus,
            &plan,
            (1, 4, 2, 64),
            |shape, (q, k, v), scale| {
                let ref64 = attention_f64(shape, &wide(q), &wide(k), &wide(v), &mask, scale as f64)
                    .unwrap();
                (
                    ref64,
                    ring_attention_lowp(shape, (q, k, v), &plan, scale).unwrap(),
                )
            },
            |me, shard, out| ring_forward(&me.attn, &me.compute, &me.comm, &plan, shard, out, None),
            &format!("{seqlen} tokens, {sharding:?}, {mask:?}"),
        );
    }
}

/// Rotary positions over NCCL: each rank rotates its own shard, the rotated keys travel.
#[test]
fn rope_ring_over_every_gpu_matches_whole_rope_attention() {
    let Some(gpus) = gpus_or_skip() else { return };
    let d = 64;
    for (seqlen, sharding, mode, log_n) in [
        (
            1000,
            Sharding::Zigzag,
            PositionMode::ReRope { window: 120 },
            Some(256),
        ),
        (
            1001,
            Sharding::Contiguous,
            PositionMode::LeakyReRope {
                window: 90,
                leak: 8.0,
            },
            None,
        ),
        (777, Sharding::Zigzag, PositionMode::Rope, None),
    ] {
        let mut rope = RopeOptions::new(RopeConfig::llama(d), mode);
        rope.log_n_train_len = log_n;
        let plan = RingPlan::with_mask(seqlen, gpus, sharding, rope.mask()).unwrap();
        check_ring(
            gpus,
            &plan,
            (1, 4, 2, d),
            |shape, (q, k, v), scale| {
                let ref64 =
                    rope_attention_f64(shape, &wide(q), &wide(k), &wide(v), &rope, scale as f64)
                        .unwrap();
                let naive =
                    ring_rope_attention_lowp(shape, (q, k, v), &plan, &rope, scale).unwrap();
                (ref64, naive)
            },
            |me, shard, out| {
                ring_rope_forward(
                    &me.attn,
                    &me.compute,
                    &me.comm,
                    &plan,
                    &rope,
                    shard,
                    out,
                    None,
                )
            },
            &format!("{seqlen} tokens, {sharding:?}, {rope:?}"),
        );
    }
}
