//! Ring attention's compute and merge order on one GPU (`Attention::ring_forward_one_gpu`: each
//! rank's steps of a `RingPlan` with the shard transfers as device copies) against attention in
//! f64 over the whole sequence, under the correctness rule with `reference::ring_attention_lowp`
//! (the same pairs and merges in low precision) as the naive budget: contiguous and zigzag shards,
//! 1 to 4 ranks, lengths the ranks do not divide, no mask, causal, sliding windows (causal with a
//! left window, two-sided, one side unbounded: pairs cut to the rows that see a key, merged into
//! a range of their chunk's rows), GQA, both dtypes. Under rotary positions
//! (`Attention::ring_rope_forward_one_gpu`: RoPE, ReRoPE, Leaky ReRoPE, log-n scaling, a left
//! window) against the two-matrix definition in f64 over the whole sequence, with
//! `reference::ring_rope_attention_lowp` as the budget.

use cudarc::driver::CudaSlice;
use half::{bf16, f16};
use longflash::mask::MaskSpec;
use longflash::reference::{
    attention_f64, compare, ring_attention_lowp, ring_rope_attention_lowp, rope_attention_f64,
    RefOutput, RefShape,
};
use longflash::ring::{RingPlan, Sharding};
use longflash::rope::{PositionMode, RopeConfig, RopeOptions};
use longflash::{DType, Element, Error, Input, Layout, Output};

use crate::common::Rng;
use crate::common::*;

/// Random q, k, v (`dims`: batch, query heads, key/value heads, head dim) over `seqlen` tokens;
/// `call` runs a ring on them on the GPU into `o` and its LSE, checked against `refs`' f64
/// reference under the correctness rule with its low-precision budget.
#[allow(clippy::type_complexity)]
fn check_ring<T: Element>(
    g: &Gpu,
    seqlen: usize,
    (batch, hq, hk, d): (usize, usize, usize, usize),
    seed: u64,
    refs: impl FnOnce(&RefShape, (&[T], &[T], &[T]), f32) -> (RefOutput, RefOutput),
    call: impl FnOnce(Input<'_, '_, T>, Input<'_, '_, T>, Input<'_, '_, T>, Output<'_, '_, T>),
    what: &str,
) {
    let mut rng = Rng(seed);
    let gen = |n: usize, rng: &mut Rng| -> Vec<T> {
        (0..n).map(|_| T::from_f32(rng.normal() as f32)).collect()
    };
    let (ql, kl) = (
        Layout::bshd(batch, seqlen, hq, d),
        Layout::bshd(batch, seqlen, hk, d),
    );
    let (q, k, v) = (
        gen(ql.numel(), &mut rng),
        gen(kl.numel(), &mut rng),
        gen(kl.numel(), &mut rng),
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
    let s = &g.stream;
    let (dq, dk, dv) = (
        s.clone_htod(&q).unwrap(),
        s.clone_htod(&k).unwrap(),
        s.clone_htod(&v).unwrap(),
    );
    let mut o: CudaSlice<T> = s
        .clone_htod(&vec![T::from_f32(f32::NAN); ql.numel()])
        .unwrap();
    let mut lse: CudaSlice<f32> = s.clone_htod(&vec![f32::NAN; batch * hq * seqlen]).unwrap();
    {
        let (qv, kv, vv) = (dq.as_view(), dk.as_view(), dv.as_view());
        let (mut ov, mut lv) = (o.as_view_mut(), lse.as_view_mut());
        call(
            Input {
                data: &qv,
                layout: ql,
            },
            Input {
                data: &kv,
                layout: kl,
            },
            Input {
                data: &vv,
                layout: kl,
            },
            Output {
                data: &mut ov,
                layout: ql,
                lse: Some(&mut lv),
            },
        );
    }
    s.synchronize().unwrap();
    let out = wide(&s.clone_dtoh(&o).unwrap());
    let lse: Vec<f32> = s.clone_dtoh(&lse).unwrap();
    let cmp = compare(&out, Some(&lse), &ref64, &naive);
    assert!(cmp.passes, "{what}, heads {hq}:{hk}, d {d}\n  {cmp}");
}

/// The inputs in f64.
fn wide<T: Element>(x: &[T]) -> Vec<f64> {
    x.iter().map(|t| t.to_f32() as f64).collect()
}

fn run_t<T: Element>(
    g: &Gpu,
    (seqlen, ranks, sharding, mask): (usize, usize, Sharding, MaskSpec),
    dims: (usize, usize, usize, usize),
    seed: u64,
) {
    let plan = RingPlan::with_mask(seqlen, ranks, sharding, mask).unwrap();
    check_ring::<T>(
        g,
        seqlen,
        dims,
        seed,
        |shape, (q, k, v), scale| {
            let ref64 =
                attention_f64(shape, &wide(q), &wide(k), &wide(v), &mask, scale as f64).unwrap();
            (
                ref64,
                ring_attention_lowp(shape, (q, k, v), &plan, scale).unwrap(),
            )
        },
        |q, k, v, out| {
            g.attn
                .ring_forward_one_gpu(&g.stream, &plan, q, k, v, out, None)
                .unwrap()
        },
        &format!("{seqlen} tokens over {ranks} ranks, {sharding:?}, {mask:?}"),
    );
}

/// Every (length, ranks) pair, both shardings and every mask, bf16 at head dim 64 and f16 at 128,
/// GQA 4:2, seeds from `seed`.
fn run_all(g: &Gpu, lens: &[(usize, usize)], masks: &[MaskSpec], mut seed: u64) {
    for &(seqlen, ranks) in lens {
        for sharding in [Sharding::Contiguous, Sharding::Zigzag] {
            for &mask in masks {
                for (dtype, d) in [(DType::Bf16, 64), (DType::F16, 128)] {
                    seed += 1;
                    let plan = (seqlen, ranks, sharding, mask);
                    let heads = (2, 4, 2, d);
                    match dtype {
                        DType::Bf16 => run_t::<bf16>(g, plan, heads, seed),
                        DType::F16 => run_t::<f16>(g, plan, heads, seed),
                    }
                }
            }
        }
    }
}

#[test]
fn ring_on_one_gpu_matches_whole_attention() {
    let g = gpu_or_skip!();
    let lens = [(300, 1), (300, 2), (517, 3), (1000, 4)];
    run_all(g, &lens, &[MaskSpec::causal(), MaskSpec::none()], 3);
}

/// Sliding windows: most pairs cut to part of a chunk (the queries that see a key of the other
/// chunk, the keys they see), merged into that range of the chunk's rows, some before the chunk's
/// own pair writes the rest (zigzag shards); windows narrower than a chunk, about a chunk, wider
/// than the sequence, one side unbounded.
#[test]
fn ring_on_one_gpu_with_windows() {
    let g = gpu_or_skip!();
    let masks = [
        MaskSpec::causal_window(0),
        MaskSpec::causal_window(37),
        MaskSpec::causal_window(130),
        MaskSpec::causal_window(5000),
        MaskSpec::sliding_window(Some(64), Some(17)),
        MaskSpec::sliding_window(Some(200), None),
        MaskSpec::sliding_window(None, Some(90)),
    ];
    run_all(g, &[(300, 2), (517, 3), (1000, 4)], &masks, 100);
}

/// The rotary ring of `rope` on one GPU against `rope_attention_f64` over the whole sequence.
fn run_rope_t<T: Element>(
    g: &Gpu,
    (seqlen, ranks, sharding): (usize, usize, Sharding),
    rope: &RopeOptions,
    dims: (usize, usize, usize, usize),
    seed: u64,
) {
    let plan = RingPlan::with_mask(seqlen, ranks, sharding, rope.mask()).unwrap();
    check_ring::<T>(
        g,
        seqlen,
        dims,
        seed,
        |shape, (q, k, v), scale| {
            let (qw, kw, vw) = (wide(q), wide(k), wide(v));
            let ref64 = rope_attention_f64(shape, &qw, &kw, &vw, rope, scale as f64).unwrap();
            let naive = ring_rope_attention_lowp(shape, (q, k, v), &plan, rope, scale).unwrap();
            (ref64, naive)
        },
        |q, k, v, out| {
            g.attn
                .ring_rope_forward_one_gpu(&g.stream, &plan, rope, q, k, v, out, None)
                .unwrap()
        },
        &format!("{seqlen} tokens over {ranks} ranks, {sharding:?}, {rope:?}"),
    );
}

/// Rotary positions through the ring: plain RoPE, ReRoPE and Leaky ReRoPE with windows shorter
/// and longer than a chunk, log-n scaling, a left window; both shardings, bf16 at head dim 64 and
/// f16 at 128, GQA 4:2.
#[test]
fn ring_rope_on_one_gpu_matches_whole_rope_attention() {
    let g = gpu_or_skip!();
    let mut seed = 500;
    for (seqlen, ranks) in [(300, 2), (517, 3), (1000, 4)] {
        for sharding in [Sharding::Contiguous, Sharding::Zigzag] {
            for (mode, log_n, window_left) in [
                (PositionMode::Rope, None, None),
                (PositionMode::ReRope { window: 100 }, Some(128), None),
                (PositionMode::ReRope { window: 400 }, None, Some(600)),
                (
                    PositionMode::LeakyReRope {
                        window: 64,
                        leak: 8.0,
                    },
                    Some(64),
                    None,
                ),
            ] {
                for (dtype, d) in [(DType::Bf16, 64), (DType::F16, 128)] {
                    seed += 1;
                    let mut rope = RopeOptions::new(RopeConfig::llama(d), mode);
                    rope.log_n_train_len = log_n;
                    rope.window_left = window_left;
                    let plan = (seqlen, ranks, sharding);
                    let heads = (2, 4, 2, d);
                    match dtype {
                        DType::Bf16 => run_rope_t::<bf16>(g, plan, &rope, heads, seed),
                        DType::F16 => run_rope_t::<f16>(g, plan, &rope, heads, seed),
                    }
                }
            }
        }
    }
}

#[test]
fn ring_step_rejects_wrong_shards() {
    let g = gpu_or_skip!();
    let s = &g.stream;
    let plan = RingPlan::new(256, 2, Sharding::Zigzag, true).unwrap();
    let (b, hq, hk, d) = (1, 2, 1, 64);
    let mut acc = longflash::RingAccumulator::<bf16>::new(s, &plan, 0, (b, hq, d)).unwrap();
    let q: CudaSlice<bf16> = s.alloc_zeros(b * 256 * hq * d).unwrap();
    let k: CudaSlice<bf16> = s.alloc_zeros(b * 256 * hk * d).unwrap();
    let (qv, kv) = (q.as_view(), k.as_view());
    // The whole sequence where the rank's shard (128 rows) belongs.
    let err = g
        .attn
        .ring_step(
            s,
            &plan,
            (0, 0),
            Input {
                data: &qv,
                layout: Layout::bshd(b, 256, hq, d),
            },
            Input {
                data: &kv,
                layout: Layout::bshd(b, 128, hk, d),
            },
            Input {
                data: &kv,
                layout: Layout::bshd(b, 128, hk, d),
            },
            &mut acc,
            None,
        )
        .expect_err("a query tensor that is not the rank's shard");
    assert!(
        matches!(err, Error::InvalidArgument { arg: "q", .. }),
        "{err:?}"
    );
    let err = g
        .attn
        .ring_step(
            s,
            &plan,
            (2, 0),
            Input {
                data: &qv,
                layout: Layout::bshd(b, 128, hq, d),
            },
            Input {
                data: &kv,
                layout: Layout::bshd(b, 128, hk, d),
            },
            Input {
                data: &kv,
                layout: Layout::bshd(b, 128, hk, d),
            },
            &mut acc,
            None,
        )
        .expect_err("a rank outside the ring");
    assert!(
        matches!(err, Error::InvalidArgument { arg: "rank", .. }),
        "{err:?}"
    );
    // A step past the ring, and rank 1's step with rank 0's accumulator.
    let shard = Layout::bshd(b, 128, hq, d);
    let kvl = Layout::bshd(b, 128, hk, d);
    for ((rank, step), arg) in [((0, 2), "step"), ((1, 0), "acc")] {
        let err = g
            .attn
            .ring_step(
                s,
                &plan,
                (rank, step),
                Input {
                    data: &qv,
                    layout: shard,
                },
                Input {
                    data: &kv,
                    layout: kvl,
                },
                Input {
                    data: &kv,
                    layout: kvl,
                },
                &mut acc,
                None,
            )
            .expect_err("a bad step or accumulator");
        assert!(
            matches!(err, Error::InvalidArgument { arg: a, .. } if a == arg),
            "{arg}: {err:?}"
        );
    }
}

#[test]
fn ring_rope_rejects_bad_arguments() {
    let g = gpu_or_skip!();
    let s = &g.stream;
    let (b, hq, hk, d) = (1, 2, 1, 64);
    let rerope = RopeOptions::new(RopeConfig::llama(d), PositionMode::ReRope { window: 16 });
    let q: CudaSlice<bf16> = s.alloc_zeros(b * 256 * hq * d).unwrap();
    let k: CudaSlice<bf16> = s.alloc_zeros(b * 256 * hk * d).unwrap();
    let (qv, kv) = (q.as_view(), k.as_view());
    let (ql, kl) = (Layout::bshd(b, 128, hq, d), Layout::bshd(b, 128, hk, d));
    let input = |data, layout| Input { data, layout };
    // A plan whose mask is not the rotary options' (not causal).
    let dense = RingPlan::new(256, 2, Sharding::Zigzag, false).unwrap();
    let err = g
        .attn
        .ring_rope_rotate(s, &dense, 0, &rerope, input(&qv, ql), input(&kv, kl))
        .err()
        .expect("a non-causal plan");
    assert!(
        matches!(err, Error::InvalidMask { arg: "plan", .. }),
        "{err:?}"
    );
    // A shard of the wrong length, and a rank outside the ring.
    let plan = RingPlan::new(256, 2, Sharding::Zigzag, true).unwrap();
    let err = g
        .attn
        .ring_rope_rotate(
            s,
            &plan,
            0,
            &rerope,
            input(&qv, Layout::bshd(b, 256, hq, d)),
            input(&kv, kl),
        )
        .err()
        .expect("the whole sequence as a shard");
    assert!(
        matches!(err, Error::InvalidArgument { arg: "q", .. }),
        "{err:?}"
    );
    let err = g
        .attn
        .ring_rope_rotate(s, &plan, 2, &rerope, input(&qv, ql), input(&kv, kl))
        .err()
        .expect("a rank outside the ring");
    assert!(
        matches!(err, Error::InvalidArgument { arg: "rank", .. }),
        "{err:?}"
    );
    // A ReRoPE step without the outside branch's rows.
    let mut acc = longflash::RingAccumulator::<bf16>::new(s, &plan, 0, (b, hq, d)).unwrap();
    let err = g
        .attn
        .ring_rope_step(
            s,
            &plan,
            (0, 0),
            &rerope.mode,
            (input(&qv, ql), None),
            (input(&kv, kl), None),
            input(&kv, kl),
            &mut acc,
            None,
        )
        .expect_err("ReRoPE without outside rows");
    assert!(
        matches!(err, Error::InvalidArgument { arg: "q_out", .. }),
        "{err:?}"
    );
}
