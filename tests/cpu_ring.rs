//! The ring-attention schedule (`ring::RingPlan`): shards cover the sequence, every key shard
//! visits every rank once, every visible (query, key) element is computed exactly once, zigzag
//! shards balance causal work; and the schedule run with the f64 reference and merged by
//! log-sum-exp (`reference::ring_attention_f64`) equals attention over the whole sequence. CPU only.

use longflash::error::Error;
use longflash::mask::MaskSpec;
use longflash::reference::{attention_f64, ring_attention_f64, RefShape};
use longflash::ring::{PairMask, RingPlan, Sharding};
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
        for step in 0..plan.ranks() {
            for p in plan.pairs(rank, step) {
                assert_eq!(p.q.len(), p.q_rows.len());
                assert_eq!(p.k.len(), p.k_rows.len());
                if p.mask == PairMask::Causal {
                    assert_eq!(p.q, p.k, "a causal pair is one chunk against itself");
                }
                for (i, qi) in p.q.clone().enumerate() {
                    for (j, kj) in p.k.clone().enumerate() {
                        if p.mask == PairMask::Full || j <= i {
                            seen[qi][kj] += 1;
                        }
                    }
                }
            }
        }
    }
    seen
}

fn check_plan(seqlen: usize, ranks: usize, sharding: Sharding, causal: bool) {
    let plan = RingPlan::new(seqlen, ranks, sharding, causal).unwrap();
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
            let want = u32::from(!causal || j <= i);
            assert_eq!(n, want, "element ({i}, {j}) computed {n} times");
        }
    }
    let total: u128 = (0..ranks).map(|r| plan.work(r)).sum();
    let s = seqlen as u128;
    assert_eq!(total, if causal { s * (s + 1) / 2 } else { s * s });
}

#[test]
fn plans_cover_every_visible_element_once() {
    for ranks in 1..=6 {
        for seqlen in [2 * ranks, 2 * ranks + 1, 7 * ranks + 3, 40] {
            for sharding in SHARDINGS {
                for causal in [false, true] {
                    check_plan(seqlen, ranks, sharding, causal);
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
fn bad_plans_are_errors() {
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

fn ring_matches_whole(
    seqlen: usize,
    ranks: usize,
    sharding: Sharding,
    causal: bool,
    (batch, hq, hk, d): (usize, usize, usize, usize),
    seed: u64,
) {
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
    let mask = if causal {
        MaskSpec::causal()
    } else {
        MaskSpec::none()
    };
    let whole = attention_f64(&shape, &q, &k, &v, &mask, scale).unwrap();
    let plan = RingPlan::new(seqlen, ranks, sharding, causal).unwrap();
    let ring = ring_attention_f64(&shape, (&q, &k, &v), &plan, scale).unwrap();
    for (i, (a, b)) in ring.out.iter().zip(&whole.out).enumerate() {
        assert!((a - b).abs() <= 1e-12, "out[{i}]: ring {a}, whole {b}");
    }
    for (i, (a, b)) in ring.lse.iter().zip(&whole.lse).enumerate() {
        assert!((a - b).abs() <= 1e-12, "lse[{i}]: ring {a}, whole {b}");
    }
}

#[test]
fn ring_reference_equals_whole_attention() {
    for sharding in SHARDINGS {
        for causal in [false, true] {
            ring_matches_whole(37, 3, sharding, causal, (2, 4, 2, 16), 5);
            ring_matches_whole(16, 4, sharding, causal, (1, 2, 2, 8), 6);
            ring_matches_whole(9, 1, sharding, causal, (1, 3, 1, 8), 7);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn ring_reference_equals_whole_attention_random(
        ranks in 1usize..6,
        extra in 0usize..30,
        zigzag in any::<bool>(),
        causal in any::<bool>(),
        group in 1usize..4,
        hk in 1usize..3,
        seed in any::<u64>(),
    ) {
        let sharding = if zigzag { Sharding::Zigzag } else { Sharding::Contiguous };
        let seqlen = 2 * ranks + extra;
        ring_matches_whole(seqlen, ranks, sharding, causal, (1, group * hk, hk, 8), seed);
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
