//! The hard corner of the correctness rule: one to four query rows over few visible keys, where
//! an output has few elements and a single rounding decides the largest error. Dense, block
//! sparse (one listed block per row) and every RoPE mode, all dtypes and head dims, windows of 0
//! to 3 keys.

use longflash::reference::{half_ulp, OUT_ABS_TOL};
use longflash::rope::{PositionMode, RopeConfig, RopeLayout, RopeOptions, RopeScaling};
use longflash::{BlockMask, DType, MaskShape, MaskSpec};
use proptest::prelude::*;

use crate::common::*;
use crate::rope::{run_rope_masked, RopeCase};

/// The case of the report that opened this suite (1 query row, 244 keys, two heads over one KV
/// head, a random block mask that lists three blocks for head 1 and none for head 0): every
/// element's error, the kernel's next to the naive implementation's, and the rule.
#[test]
fn single_row_sparse_case_of_the_report() {
    let g = gpu_or_skip!();
    let c = Case {
        dtype: DType::Bf16,
        batch: 1,
        seqlen_q: 1,
        seqlen_k: 244,
        heads_q: 2,
        heads_kv: 1,
        head_dim: 64,
        mask: MaskSpec::none(),
        scale: None,
        q_mem: Mem::Bshd,
        kv_mem: Mem::Bshd,
        o_mem: Mem::Bshd,
        lse: false,
        seed: 1230847420003083734,
        sparse: Some(SparseSpec {
            density: 0.1574193221721348,
            per_head: true,
            per_batch: false,
            seed: 1428057971348396064,
            one_block: false,
        }),
    };
    let r = run_case(g, &c);
    let (reference, naive) = (&r.reference.out, &r.naive);
    println!(
        "element  ref64          kernel-ref     naive-ref      naive(unrounded)-ref  allowance"
    );
    for (i, &x) in reference.iter().enumerate() {
        let allowed = 2.0 * r.cmp.naive_abs_err
            + half_ulp(DType::Bf16, x.abs().max(r.out[i].abs()))
            + OUT_ABS_TOL;
        println!(
            "{i:7}  {x:+.6e}  {:+.3e}     {:+.3e}     {:+.3e}            {allowed:.3e}",
            r.out[i] - x,
            naive.out[i] - x,
            naive.unrounded[i] - x,
        );
    }
    let naive_rounded = reference
        .iter()
        .zip(&naive.out)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f64, f64::max);
    println!(
        "max|kernel-ref| = {:.3e}, max|naive-ref| = {naive_rounded:.3e}, {}",
        r.cmp.max_abs_err, r.cmp
    );
    assert!(r.cmp.passes, "{}", r.cmp);
    // Head 0 lists no block: zeros.
    assert!(r.out[..64].iter().all(|&x| x == 0.0));
}

fn arb_small_window() -> impl Strategy<Value = Option<u32>> {
    prop_oneof![2 => Just(None), 1 => (0u32..4).prop_map(Some)]
}

/// A dense or single-block sparse case: 1 to 4 query rows, 1 to 200 keys, windows of 0 to 3.
pub(crate) fn arb_corner_case() -> impl Strategy<Value = Case> {
    (
        prop::sample::select(vec![DType::F16, DType::Bf16]),
        prop::sample::select(vec![64usize, 128, 256]),
        prop::sample::select(vec![(1usize, 1usize), (2, 1), (4, 2), (3, 3)]),
        1usize..=4,
        1usize..=200,
        (any::<bool>(), arb_small_window(), arb_small_window()),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(
            |(
                dtype,
                head_dim,
                (heads_q, heads_kv),
                seqlen_q,
                seqlen_k,
                (causal, wl, wr),
                sparse,
                seed,
            )| {
                Case {
                    dtype,
                    batch: 1,
                    seqlen_q,
                    seqlen_k,
                    heads_q,
                    heads_kv,
                    head_dim,
                    mask: MaskSpec {
                        sink_tokens: 0,
                        causal,
                        window_left: wl,
                        window_right: if causal { None } else { wr },
                    },
                    scale: None,
                    q_mem: Mem::Bshd,
                    kv_mem: Mem::Bshd,
                    o_mem: Mem::Bshd,
                    lse: true,
                    seed,
                    sparse: sparse.then_some(SparseSpec {
                        density: 0.0,
                        per_head: true,
                        per_batch: false,
                        seed: seed.rotate_left(17),
                        one_block: true,
                    }),
                }
            },
        )
}

/// Every RoPE mode over 1 to 4 query rows and 1 to 200 keys, windows of 0 to 3 on top of
/// causal, ReRoPE windows around the sequence length, with or without a single-block mask.
fn arb_corner_rope_case() -> impl Strategy<Value = (RopeCase, bool)> {
    let mode = prop_oneof![
        Just(PositionMode::Rope),
        (1u32..200).prop_map(|window| PositionMode::ReRope { window }),
        ((1u32..200), prop::sample::select(vec![1.5f64, 4.0, 16.0]))
            .prop_map(|(window, leak)| PositionMode::LeakyReRope { window, leak }),
    ];
    (
        prop::sample::select(vec![DType::F16, DType::Bf16]),
        prop::sample::select(vec![64usize, 128, 256]),
        prop::sample::select(vec![(1usize, 1usize), (4, 2), (3, 3)]),
        1usize..=4,
        1usize..=200,
        (mode, any::<bool>(), arb_small_window()),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(
            |(dtype, d, (hq, hkv), sq, sk, (mode, interleaved, window_left), sparse, seed)| {
                let config = RopeConfig {
                    base: 10000.0,
                    rotary_dim: d,
                    layout: if interleaved {
                        RopeLayout::Interleaved
                    } else {
                        RopeLayout::HalfSplit
                    },
                    scaling: RopeScaling::None,
                };
                let mut rope = RopeOptions::new(config, mode);
                rope.window_left = window_left;
                let c = RopeCase {
                    dtype,
                    batch: 1,
                    seqlen_q: sq,
                    seqlen_k: sk,
                    heads_q: hq,
                    heads_kv: hkv,
                    head_dim: d,
                    rope,
                    seed,
                };
                (c, sparse)
            },
        )
}

/// A mask over `c`'s problem that lists one key block per query block and head, chosen from
/// the seed, with the call's causal/window element mask.
fn one_block_mask(c: &RopeCase) -> BlockMask {
    let shape = MaskShape {
        batch: 1,
        heads: c.heads_q,
        seqlen_q: c.seqlen_q,
        seqlen_k: c.seqlen_k,
    };
    let key_blocks = c.seqlen_k.div_ceil(longflash::sparse::K_BLOCK) as u64;
    BlockMask::from_fn(shape, c.rope.mask(), |_, h, qb, kb| {
        Rng(c.seed ^ ((h as u64) << 40) ^ ((qb as u64) << 20)).next_u64() % key_blocks == kb as u64
    })
    .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn few_rows_few_keys_dense_and_sparse(c in arb_corner_case()) {
        let Some(g) = gpu() else {
            say_skipped("few_rows_few_keys_dense_and_sparse");
            return Ok(());
        };
        let r = run_case(g, &c);
        prop_assert!(r.cmp.passes, "{:?}\n  {}", c, r.cmp);
    }

    #[test]
    fn few_rows_few_keys_rope(cs in arb_corner_rope_case()) {
        let Some(g) = gpu() else {
            say_skipped("few_rows_few_keys_rope");
            return Ok(());
        };
        let (c, sparse) = cs;
        let mask = sparse.then(|| one_block_mask(&c));
        let r = run_rope_masked(g, &c, mask.as_ref());
        prop_assert!(r.cmp.passes, "{:?} (one block per row: {})\n  {}", c, sparse, r.cmp);
    }
}
