//! The ring-attention schedule (`ring::RingPlan`): shards cover the sequence, every key shard
//! visits every rank once, every visible (query, key) element is computed exactly once under
//! every mask (none, causal, sliding windows, causal with a left window), zigzag shards balance
//! causal work; and the schedule run with the f64 reference and merged by log-sum-exp
//! (`reference::ring_attention_f64`) equals attention over the whole sequence; under rotary
//! positions (RoPE, ReRoPE, Leaky ReRoPE) every visible element falls in the part of its branch
//! once, and the ring of parts over rotated rows (`reference::ring_rope_attention_f64`) equals the
//! two-matrix definition over the whole sequence. CPU only.

use longflash::error::Error;
use longflash::mask::MaskSpec;
use longflash::reference::{
    attention_backward_f64, attention_f64, compare, ring_attention_backward_f64,
    ring_attention_f64, ring_rope_attention_f64, ring_rope_attention_lowp, rope_attention_f64,
    rope_attention_lowp, RefOutput, RefShape,
};
use longflash::ring::{PairMask, RingPlan, RopeBranch, Sharding};
use longflash::rope::{PositionMode, RopeConfig, RopeLayout, RopeOptions, RopeScaling};
use proptest::prelude::*;

#[path = "support/rng.rs"]
mod rng;
use rng::Rng;

const SHARDINGS: [Sharding; 2] = [Sharding::Contiguous, Sharding::Zigzag];

/// How many times the plan computes each (query, key) element, from its pairs and masks.
fn coverage(plan: &RingPlan) -> Vec<Vec<u32>> {
    let s = plan.seqlen();
    let mut seen = vec![vec![0u32; s]; s];
    for rank in 0..plan.ranks() {
        let shard = plan.shard(rank);
        for step in 0..plan.ranks() {
            for p in plan.pairs(rank, step) {
                assert_eq!(p.q.len(), p.q_rows.len());
                assert_eq!(p.k.len(), p.k_rows.len());
                assert!(!p.q.is_empty() && !p.k.is_empty(), "an empty pair {p:?}");
                // The pair's queries lie in its chunk, at the rows the chunk has in the shard.
                let c = &shard[p.q_chunk];
                assert!(
                    c.start <= p.q.start && p.q.end <= c.end,
                    "{p:?} outside {c:?}"
                );
                let chunk_row: usize = shard[..p.q_chunk].iter().map(|x| x.len()).sum();
                assert_eq!(p.q_rows.start, chunk_row + (p.q.start - c.start));
                let spec = p.mask.spec();
                let (lq, lk) = (p.q.len(), p.k.len());
                // The kernels must take the pair's mask at its lengths.
                spec.resolve(lq, lk).unwrap();
                for (i, qi) in p.q.clone().enumerate() {
                    let mut any = false;
                    for (j, kj) in p.k.clone().enumerate() {
                        if spec.is_visible(lq, lk, i, j) {
                            seen[qi][kj] += 1;
                            any = true;
                        }
                    }
                    // The cut keeps only queries that see some key of the pair.
                    assert!(any, "query {qi} of {p:?} sees nothing");
                }
            }
        }
    }
    seen
}

/// The masks the plans are checked under, for a sequence of `s` tokens.
fn masks(s: usize) -> Vec<MaskSpec> {
    let w = |x: usize| Some(x as u32);
    let mut m = vec![MaskSpec::none(), MaskSpec::causal()];
    for x in [0, 1, 3, s / 5, s / 2, s + 4] {
        m.push(MaskSpec::causal_window(x as u32));
        m.push(MaskSpec::sliding_window(w(x), w(x / 2 + 1)));
        m.push(MaskSpec::sliding_window(w(x), None));
        m.push(MaskSpec::sliding_window(None, w(x)));
    }
    m.push(MaskSpec::sliding_window(w(0), w(0)));
    m
}

fn check_plan(seqlen: usize, ranks: usize, sharding: Sharding, mask: MaskSpec) {
    let plan = RingPlan::with_mask(seqlen, ranks, sharding, mask).unwrap();
    assert_eq!(plan.mask(), mask);
    // The shards cover the sequence once, chunks of lengths within one token of each other.
    let mut owner = vec![usize::MAX; seqlen];
    let mut lens = Vec::new();
    for r in 0..ranks {
        let mut rows = 0;
        for c in plan.shard(r) {
            lens.push(c.len());
            rows += c.len();
            for t in c {
                assert_eq!(owner[t], usize::MAX, "token {t} in two shards");
                owner[t] = r;
            }
        }
        assert_eq!(rows, plan.shard_len(r));
    }
    assert!(owner.iter().all(|&o| o < ranks), "every token in a shard");
    let (lo, hi) = (lens.iter().min().unwrap(), lens.iter().max().unwrap());
    assert!(*lo >= 1 && hi - lo <= 1, "chunk lengths {lens:?}");
    // Each rank holds every key shard exactly once over the steps, its own first.
    for r in 0..ranks {
        assert_eq!(plan.kv_owner(r, 0), r);
        let mut owners: Vec<usize> = (0..ranks).map(|t| plan.kv_owner(r, t)).collect();
        owners.sort_unstable();
        assert_eq!(owners, (0..ranks).collect::<Vec<_>>());
        // What rank r holds at step t + 1 is what its predecessor held at step t.
        for t in 0..ranks - 1 {
            assert_eq!(
                plan.kv_owner(r, t + 1),
                plan.kv_owner((r + ranks - 1) % ranks, t)
            );
        }
    }
    // Every visible element once, nothing else.
    let seen = coverage(&plan);
    for (i, row) in seen.iter().enumerate() {
        for (j, &n) in row.iter().enumerate() {
            let want = u32::from(mask.is_visible(seqlen, seqlen, i, j));
            assert_eq!(
                n, want,
                "element ({i}, {j}) computed {n} times under {mask:?}"
            );
        }
    }
    let total: u128 = (0..ranks).map(|r| plan.work(r)).sum();
    assert_eq!(total, u128::from(mask.visible_pairs(seqlen, seqlen)));
}

#[test]
fn plans_cover_every_visible_element_once() {
    for ranks in 1..=6 {
        for seqlen in [2 * ranks, 2 * ranks + 1, 7 * ranks + 3, 40] {
            for sharding in SHARDINGS {
                for mask in masks(seqlen) {
                    check_plan(seqlen, ranks, sharding, mask);
                }
            }
        }
    }
}

#[test]
fn zigzag_balances_causal_work() {
    for ranks in [2usize, 4, 8] {
        // Chunks of equal length: every rank does exactly the same work.
        let s = 2 * ranks * 100;
        let zz = RingPlan::new(s, ranks, Sharding::Zigzag, true).unwrap();
        let work: Vec<u128> = (0..ranks).map(|r| zz.work(r)).collect();
        assert!(work.iter().all(|&w| w == work[0]), "zigzag work {work:?}");
        // Contiguous shards: the last rank has 2 * ranks - 1 times the first one's work.
        let ct = RingPlan::new(s, ranks, Sharding::Contiguous, true).unwrap();
        let (first, last) = (ct.work(0), ct.work(ranks - 1));
        let c = (s / ranks) as u128;
        assert_eq!(first, c * (c + 1) / 2);
        assert_eq!(last, (ranks as u128 - 1) * c * c + c * (c + 1) / 2);
        // And no zigzag step is idle: every rank's late chunk sees every key shard it holds.
        for r in 0..ranks {
            for t in 0..ranks {
                let p = zz.pairs(r, t);
                assert!(
                    !p.is_empty(),
                    "zigzag rank {r} step {t}: some pair is visible"
                );
            }
        }
    }
}

#[test]
fn windows_skip_the_chunks_out_of_reach() {
    // 8 ranks of 100 tokens, a causal window of 50: a rank meets only its own shard and its
    // predecessor's, and only the first 50 queries of its chunk see the predecessor's keys,
    // and only its last 50 keys.
    let plan =
        RingPlan::with_mask(800, 8, Sharding::Contiguous, MaskSpec::causal_window(50)).unwrap();
    for r in 1..8 {
        assert_eq!(plan.pairs(r, 0).len(), 1);
        let p = &plan.pairs(r, 1)[0];
        assert_eq!(p.q, 100 * r..100 * r + 50);
        assert_eq!(p.k, 100 * r - 50..100 * r);
        // Query a of the cut (token 100r + a) sees keys a to 49 of the cut (tokens 100r + a - 50
        // to 100r - 1): from the bottom-right diagonal (50 queries over 50 keys: key a) to the
        // end, a band of no keys left of the diagonal and 50 right of it.
        assert_eq!(
            p.mask,
            PairMask::Window {
                left: Some(0),
                right: Some(50)
            }
        );
        for t in 2..8 {
            assert!(plan.pairs(r, t).is_empty(), "rank {r} step {t}");
        }
    }
    // A window wider than the sequence plans as its mask without one.
    let wide = RingPlan::with_mask(64, 4, Sharding::Zigzag, MaskSpec::causal_window(1000)).unwrap();
    let causal = RingPlan::new(64, 4, Sharding::Zigzag, true).unwrap();
    for r in 0..4 {
        for t in 0..4 {
            assert_eq!(wide.pairs(r, t), causal.pairs(r, t));
        }
    }
}

#[test]
fn bad_plans_are_errors() {
    assert!(matches!(
        RingPlan::with_mask(64, 2, Sharding::Zigzag, MaskSpec::causal().with_sinks(4)),
        Err(Error::InvalidMask {
            arg: "mask.sink_tokens",
            ..
        })
    ));
    let causal_right = MaskSpec {
        window_right: Some(3),
        ..MaskSpec::causal()
    };
    assert!(matches!(
        RingPlan::with_mask(64, 2, Sharding::Zigzag, causal_right),
        Err(Error::InvalidMask { .. })
    ));
    assert!(matches!(
        RingPlan::new(10, 0, Sharding::Contiguous, true),
        Err(Error::InvalidArgument { arg: "ranks", .. })
    ));
    assert!(matches!(
        RingPlan::new(7, 4, Sharding::Zigzag, true),
        Err(Error::InvalidArgument { arg: "seqlen", .. })
    ));
    assert!(RingPlan::new(8, 4, Sharding::Zigzag, true).is_ok());
    assert!(matches!(
        RingPlan::new(3, 4, Sharding::Contiguous, false),
        Err(Error::InvalidArgument { arg: "seqlen", .. })
    ));
}

/// A whole-sequence problem of `seqlen` tokens with random q, k, v (seeded) and its scale.
struct Problem {
    shape: RefShape,
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    scale: f64,
}

impl Problem {
    fn new(seqlen: usize, (batch, hq, hk, d): (usize, usize, usize, usize), seed: u64) -> Self {
        let shape = RefShape {
            batch,
            seqlen_q: seqlen,
            seqlen_k: seqlen,
            heads_q: hq,
            heads_kv: hk,
            head_dim: d,
        };
        let mut rng = Rng(seed | 1);
        let q = rng.vec(shape.q_len().unwrap(), 2.0);
        let k = rng.vec(shape.kv_len().unwrap(), 2.0);
        let v = rng.vec(shape.kv_len().unwrap(), 1.0);
        let scale = 1.0 / (d as f64).sqrt();
        Problem {
            shape,
            q,
            k,
            v,
            scale,
        }
    }
}

/// The ring's output and log-sum-exp equal the whole sequence's within `tol`.
fn assert_same(ring: &RefOutput, whole: &RefOutput, tol: f64, what: &dyn std::fmt::Debug) {
    for (i, (a, b)) in ring.out.iter().zip(&whole.out).enumerate() {
        assert!(
            (a - b).abs() <= tol,
            "{what:?}: out[{i}]: ring {a}, whole {b}"
        );
    }
    for (i, (a, b)) in ring.lse.iter().zip(&whole.lse).enumerate() {
        assert!(
            (a - b).abs() <= tol,
            "{what:?}: lse[{i}]: ring {a}, whole {b}"
        );
    }
}

fn ring_matches_whole(
    seqlen: usize,
    ranks: usize,
    sharding: Sharding,
    mask: MaskSpec,
    dims: (usize, usize, usize, usize),
    seed: u64,
) {
    let Problem {
        shape,
        q,
        k,
        v,
        scale,
    } = Problem::new(seqlen, dims, seed);
    let whole = attention_f64(&shape, &q, &k, &v, &mask, scale).unwrap();
    let plan = RingPlan::with_mask(seqlen, ranks, sharding, mask).unwrap();
    let ring = ring_attention_f64(&shape, (&q, &k, &v), &plan, scale).unwrap();
    assert_same(&ring, &whole, 1e-12, &mask);
}

#[test]
fn ring_reference_equals_whole_attention() {
    for sharding in SHARDINGS {
        for mask in masks(37) {
            ring_matches_whole(37, 3, sharding, mask, (2, 4, 2, 16), 5);
        }
        for mask in masks(16) {
            ring_matches_whole(16, 4, sharding, mask, (1, 2, 2, 8), 6);
            ring_matches_whole(9, 1, sharding, mask, (1, 3, 1, 8), 7);
        }
    }
}

/// A random mask: none, causal, a causal window or a two-sided one (either side unbounded).
fn random_mask(kind: u8, left: u32, right: u32) -> MaskSpec {
    match kind % 5 {
        0 => MaskSpec::none(),
        1 => MaskSpec::causal(),
        2 => MaskSpec::causal_window(left),
        3 => MaskSpec::sliding_window(Some(left), Some(right)),
        _ => MaskSpec::sliding_window(
            (left % 2 == 0).then_some(left),
            (right % 2 == 1).then_some(right),
        ),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn ring_reference_equals_whole_attention_random(
        ranks in 1usize..6,
        extra in 0usize..30,
        zigzag in any::<bool>(),
        kind in any::<u8>(),
        left in 0u32..40,
        right in 0u32..40,
        group in 1usize..4,
        hk in 1usize..3,
        seed in any::<u64>(),
    ) {
        let sharding = if zigzag { Sharding::Zigzag } else { Sharding::Contiguous };
        let seqlen = 2 * ranks + extra;
        let mask = random_mask(kind, left, right);
        check_plan(seqlen, ranks, sharding, mask);
        ring_matches_whole(seqlen, ranks, sharding, mask, (1, group * hk, hk, 8), seed);
    }
}

#[test]
fn one_rank_lowp_ring_is_the_plain_lowp_attention() {
    use half::bf16;
    use longflash::reference::{attention_lowp, ring_attention_lowp};
    let shape = RefShape {
        batch: 2,
        seqlen_q: 33,
        seqlen_k: 33,
        heads_q: 4,
        heads_kv: 2,
        head_dim: 16,
    };
    let mut rng = Rng(11);
    let mut gen = |n: usize| -> Vec<bf16> {
        (0..n)
            .map(|_| bf16::from_f32(rng.sym(2.0) as f32))
            .collect()
    };
    let (q, k, v) = (
        gen(shape.q_len().unwrap()),
        gen(shape.kv_len().unwrap()),
        gen(shape.kv_len().unwrap()),
    );
    for causal in [false, true] {
        let mask = if causal {
            MaskSpec::causal()
        } else {
            MaskSpec::none()
        };
        let plan = RingPlan::new(33, 1, Sharding::Contiguous, causal).unwrap();
        let ring = ring_attention_lowp(&shape, (&q, &k, &v), &plan, 0.25).unwrap();
        let whole = attention_lowp(&shape, &q, &k, &v, &mask, 0.25).unwrap();
        assert_eq!(ring.out, whole.out);
        for (a, b) in ring.lse.iter().zip(&whole.lse) {
            assert_eq!(*a as f32, *b as f32);
        }
        // Over more ranks the low-precision ring stays within a few roundings of the f64 one.
        let plan = RingPlan::new(33, 3, Sharding::Zigzag, causal).unwrap();
        let ring = ring_attention_lowp(&shape, (&q, &k, &v), &plan, 0.25).unwrap();
        let wide = |x: &[bf16]| -> Vec<f64> { x.iter().map(|t| f64::from(t.to_f32())).collect() };
        let exact = attention_f64(&shape, &wide(&q), &wide(&k), &wide(&v), &mask, 0.25).unwrap();
        for (a, b) in ring.out.iter().zip(&exact.out) {
            assert!(
                (a - b).abs() <= 4.0 * 2f64.powi(-8) * b.abs().max(1.0),
                "{a} against {b}"
            );
        }
    }
}

/// The position modes the rotary plans are checked under, for a sequence of `s` tokens.
fn modes(s: usize) -> Vec<PositionMode> {
    let mut m = vec![PositionMode::Rope];
    for w in [1, 2, 5, s / 3 + 1, s, s + 3] {
        let window = w as u32;
        m.push(PositionMode::ReRope { window });
        m.push(PositionMode::LeakyReRope { window, leak: 4.0 });
    }
    m
}

/// Each visible element of a causal (optionally left-windowed) plan falls in exactly one part of
/// `rope_pairs`, the part of its branch (`i - j < w` inside), and no part is empty.
fn check_rope_plan(seqlen: usize, ranks: usize, sharding: Sharding, window_left: Option<u32>) {
    let mask = window_left.map_or(MaskSpec::causal(), MaskSpec::causal_window);
    let plan = RingPlan::with_mask(seqlen, ranks, sharding, mask).unwrap();
    for mode in modes(seqlen) {
        let w = mode.window() as usize;
        let mut seen = vec![vec![0u32; seqlen]; seqlen];
        for rank in 0..ranks {
            for step in 0..ranks {
                let parts = plan.rope_pairs(rank, step, &mode).unwrap();
                // The parts are the step's pairs, cut further: none reaches past them.
                let pairs = plan.pairs(rank, step);
                for (p, branch) in parts {
                    assert!(!p.q.is_empty() && !p.k.is_empty(), "an empty part {p:?}");
                    assert!(
                        pairs.iter().any(|x| x.q_chunk == p.q_chunk
                            && x.q.start <= p.q.start
                            && p.q.end <= x.q.end
                            && x.k.start <= p.k.start
                            && p.k.end <= x.k.end),
                        "{p:?} outside the step's pairs {pairs:?}"
                    );
                    assert_eq!(p.q.len(), p.q_rows.len());
                    assert_eq!(p.k.len(), p.k_rows.len());
                    let spec = p.mask.spec();
                    let (lq, lk) = (p.q.len(), p.k.len());
                    spec.resolve(lq, lk).unwrap();
                    for (i, qi) in p.q.clone().enumerate() {
                        let mut any = false;
                        for (j, kj) in p.k.clone().enumerate() {
                            if spec.is_visible(lq, lk, i, j) {
                                let inside = mode == PositionMode::Rope || qi - kj < w;
                                assert!(qi >= kj, "{mode:?}: ({qi}, {kj}) above the diagonal");
                                assert_eq!(
                                    inside,
                                    branch == RopeBranch::Inside,
                                    "{mode:?}: ({qi}, {kj}) in a {branch:?} part"
                                );
                                seen[qi][kj] += 1;
                                any = true;
                            }
                        }
                        assert!(any, "{mode:?}: query {qi} of {p:?} sees nothing");
                    }
                }
            }
        }
        for (i, row) in seen.iter().enumerate() {
            for (j, &n) in row.iter().enumerate() {
                let want = u32::from(mask.is_visible(seqlen, seqlen, i, j));
                assert_eq!(
                    n, want,
                    "{mode:?} {window_left:?}: element ({i}, {j}) computed {n} times"
                );
            }
        }
    }
}

#[test]
fn rope_parts_cover_every_visible_element_once_in_its_branch() {
    for ranks in 1..=4 {
        for seqlen in [2 * ranks, 2 * ranks + 1, 7 * ranks + 3, 23] {
            for sharding in SHARDINGS {
                for window_left in [None, Some(0), Some(2), Some(seqlen as u32 / 2)] {
                    check_rope_plan(seqlen, ranks, sharding, window_left);
                }
            }
        }
    }
}

#[test]
fn rope_parts_need_a_causal_plan_and_a_window() {
    let plan = RingPlan::new(8, 2, Sharding::Zigzag, false).unwrap();
    assert!(matches!(
        plan.rope_pairs(0, 0, &PositionMode::Rope),
        Err(Error::InvalidMask { arg: "mask", .. })
    ));
    let plan = RingPlan::new(8, 2, Sharding::Zigzag, true).unwrap();
    assert!(matches!(
        plan.rope_pairs(0, 0, &PositionMode::ReRope { window: 0 }),
        Err(Error::InvalidArgument {
            arg: "mode.window",
            ..
        })
    ));
}

/// The ring of rotary parts against the two-matrix definition over the whole sequence.
fn ring_rope_matches_whole(
    seqlen: usize,
    ranks: usize,
    sharding: Sharding,
    rope: &RopeOptions,
    dims: (usize, usize, usize, usize),
    seed: u64,
) {
    let Problem {
        shape,
        q,
        k,
        v,
        scale,
    } = Problem::new(seqlen, dims, seed);
    let whole = rope_attention_f64(&shape, &q, &k, &v, rope, scale).unwrap();
    let plan = RingPlan::with_mask(seqlen, ranks, sharding, rope.mask()).unwrap();
    let ring = ring_rope_attention_f64(&shape, (&q, &k, &v), &plan, rope, scale).unwrap();
    assert_same(&ring, &whole, 1e-11, rope);
}

fn rope_options(
    d: usize,
    mode: PositionMode,
    log_n: Option<usize>,
    window_left: Option<u32>,
    offsets: Option<Vec<u32>>,
    partial: bool,
) -> RopeOptions {
    let mut config = RopeConfig::llama(d);
    if partial {
        // Half the head rotates, pairs interleaved, positions stretched.
        config.rotary_dim = d / 2;
        config.layout = RopeLayout::Interleaved;
        config.scaling = RopeScaling::Linear { factor: 2.0 };
    }
    let mut o = RopeOptions::new(config, mode);
    o.log_n_train_len = log_n;
    o.window_left = window_left;
    o.position_offsets = offsets;
    o
}

#[test]
fn ring_rope_reference_equals_whole_rope_attention() {
    for sharding in SHARDINGS {
        for mode in modes(29) {
            for (log_n, window_left, partial) in [
                (None, None, false),
                (Some(8), None, true),
                (Some(4), Some(6), false),
            ] {
                let rope = rope_options(16, mode, log_n, window_left, None, partial);
                ring_rope_matches_whole(29, 3, sharding, &rope, (1, 4, 2, 16), 11);
            }
        }
        // Two sequences at their own offsets (key 0 of entry b at off_b).
        let rope = rope_options(
            8,
            PositionMode::ReRope { window: 5 },
            Some(6),
            None,
            Some(vec![0, 13]),
            false,
        );
        ring_rope_matches_whole(16, 4, sharding, &rope, (2, 2, 1, 8), 12);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]
    #[test]
    fn ring_rope_reference_equals_whole_rope_attention_random(
        ranks in 1usize..5,
        extra in 0usize..24,
        zigzag in any::<bool>(),
        kind in 0u8..3,
        window in 1u32..30,
        leak in 1.5f64..8.0,
        left in proptest::option::of(0u32..30),
        log_n in proptest::option::of(2usize..20),
        group in 1usize..3,
        seed in any::<u64>(),
    ) {
        let sharding = if zigzag { Sharding::Zigzag } else { Sharding::Contiguous };
        let seqlen = 2 * ranks + extra;
        let mode = match kind {
            0 => PositionMode::Rope,
            1 => PositionMode::ReRope { window },
            _ => PositionMode::LeakyReRope { window, leak },
        };
        let rope = rope_options(8, mode, log_n, left, None, false);
        ring_rope_matches_whole(seqlen, ranks, sharding, &rope, (1, 2 * group, 2, 8), seed);
    }
}

/// The low-precision rotary ring (the GPU ring's budget) is as accurate as the naive two-matrix
/// attention in the same precision: within the correctness rule with that one as the naive
/// error, for bf16 and f16, ReRoPE and Leaky ReRoPE over zigzag shards.
#[test]
fn lowp_rope_ring_is_as_accurate_as_the_naive_rope_attention() {
    fn check<T: longflash::Element>(mode: PositionMode, seed: u64) {
        let p = Problem::new(97, (1, 4, 2, 16), seed);
        let rope = rope_options(16, mode, Some(16), None, None, false);
        let round = |x: &[f64]| -> Vec<T> { x.iter().map(|&a| T::from_f32(a as f32)).collect() };
        let (q, k, v) = (round(&p.q), round(&p.k), round(&p.v));
        let wide = |x: &[T]| -> Vec<f64> { x.iter().map(|t| f64::from(t.to_f32())).collect() };
        let (qw, kw, vw) = (wide(&q), wide(&k), wide(&v));
        let scale = p.scale as f32;
        let ref64 = rope_attention_f64(&p.shape, &qw, &kw, &vw, &rope, f64::from(scale)).unwrap();
        let naive = rope_attention_lowp(&p.shape, &q, &k, &v, &rope, scale).unwrap();
        let plan = RingPlan::with_mask(97, 3, Sharding::Zigzag, rope.mask()).unwrap();
        let ring = ring_rope_attention_lowp(&p.shape, (&q, &k, &v), &plan, &rope, scale).unwrap();
        let lse: Vec<f32> = ring.lse.iter().map(|&x| x as f32).collect();
        let cmp = compare(&ring.out, Some(&lse), &ref64, &naive);
        assert!(cmp.passes, "{mode:?}: {cmp}");
    }
    for (i, mode) in [
        PositionMode::ReRope { window: 20 },
        PositionMode::LeakyReRope {
            window: 12,
            leak: 6.0,
        },
        PositionMode::Rope,
    ]
    .into_iter()
    .enumerate()
    {
        check::<half::bf16>(mode, 40 + i as u64);
        check::<half::f16>(mode, 50 + i as u64);
    }
}

/// The ring's backward schedule (each pair's gradients from the whole row's LSE and D, dK and dV
/// travelling with their shard) against the gradients of attention over the whole sequence.
fn ring_backward_matches_whole(
    seqlen: usize,
    ranks: usize,
    sharding: Sharding,
    mask: MaskSpec,
    dims: (usize, usize, usize, usize),
    seed: u64,
) {
    let Problem {
        shape,
        q,
        k,
        v,
        scale,
    } = Problem::new(seqlen, dims, seed);
    let dout = Rng(seed ^ 0x5bd1).vec(q.len(), 1.0);
    let whole = attention_backward_f64(&shape, &q, &k, &v, &dout, &mask, scale).unwrap();
    let plan = RingPlan::with_mask(seqlen, ranks, sharding, mask).unwrap();
    let ring = ring_attention_backward_f64(&shape, (&q, &k, &v), &dout, &plan, scale).unwrap();
    for (name, a, b) in [
        ("dq", &ring.dq, &whole.dq),
        ("dk", &ring.dk, &whole.dk),
        ("dv", &ring.dv, &whole.dv),
    ] {
        for (i, (x, y)) in a.iter().zip(b.iter()).enumerate() {
            assert!(
                (x - y).abs() <= 1e-11,
                "{mask:?} {name}[{i}]: ring {x}, whole {y}"
            );
        }
    }
}

#[test]
fn ring_backward_reference_equals_whole_backward() {
    for sharding in SHARDINGS {
        for mask in masks(29) {
            ring_backward_matches_whole(29, 3, sharding, mask, (2, 4, 2, 8), 21);
        }
        for mask in masks(16) {
            ring_backward_matches_whole(16, 4, sharding, mask, (1, 2, 1, 8), 22);
            ring_backward_matches_whole(9, 1, sharding, mask, (1, 3, 3, 8), 23);
        }
    }
}
