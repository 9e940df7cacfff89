//! The block-sparse forward: random and edge-case block masks, bit-identity with the exact
//! kernel, LSE merges and the sparse API's checks.

use cudarc::driver::CudaSlice;
use half::{bf16, f16};
use longflash::reference::{attention_f64, attention_lowp, compare, RefShape};
use longflash::{
    BlockMask, DType, Error, ForwardOptions, Input, Layout, MaskShape, MaskSpec, Output,
    SparseOptions,
};
use proptest::prelude::*;

use crate::common::Rng;
use crate::common::*;

/// A sparse case: any dense case's shape and layouts, an element mask that may carry attention
/// sinks, and a random block mask whose density ranges from empty to full.
pub(crate) fn arb_sparse_case() -> impl Strategy<Value = Case> {
    (
        arb_case(),
        prop_oneof![Just(0.0f64), Just(0.05), 0.05f64..0.6, Just(1.0)],
        any::<bool>(),
        any::<bool>(),
        prop_oneof![3 => Just(0u32), 1 => 1u32..300],
        any::<u64>(),
    )
        .prop_map(|(mut c, density, per_head, per_batch, sinks, seed)| {
            if sinks > 0 {
                c.mask = MaskSpec {
                    sink_tokens: sinks,
                    causal: true,
                    window_left: Some(sinks / 2),
                    window_right: None,
                };
            }
            c.sparse = Some(SparseSpec {
                density,
                per_head,
                per_batch,
                seed,
                one_block: false,
            });
            c
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn sparse_kernel_matches_reference(c in arb_sparse_case()) {
        let Some(g) = gpu() else {
            say_skipped("sparse_kernel_matches_reference");
            return Ok(());
        };
        let r = run_case(g, &c);
        prop_assert!(r.cmp.passes, "{:?}\n  {}", c, r.cmp);
    }
}

/// A case the property test found (H100, 2026-12-06): rows of two keys (a sink and the
/// diagonal) where one bf16 probability, 0.59570313, sits 2e-8 from a rounding tie. The naive
/// reference rounded it up and the kernel down, a difference of 1.2 allowances on one output
/// element; the rule now counts the other rounding as part of the naive error (its spread).
#[test]
fn sparse_probability_at_a_rounding_tie() {
    let g = gpu_or_skip!();
    let mask = MaskSpec {
        causal: true,
        window_left: Some(0),
        window_right: None,
        sink_tokens: 1,
    };
    let c = Case {
        seed: 12900210047944440681,
        sparse: Some(SparseSpec {
            density: 0.05,
            per_head: false,
            per_batch: true,
            seed: 16564992605394052977,
            one_block: false,
        }),
        ..Case::new(DType::Bf16, (2, 191, 65), (6, 2), 128, mask)
    };
    let r = run_case(g, &c);
    assert!(r.cmp.passes, "{c:?}\n  {}", r.cmp);
}

pub(crate) fn sparse_case(
    d: usize,
    (sq, sk): (usize, usize),
    mask: MaskSpec,
    density: f64,
) -> Case {
    Case {
        sparse: Some(SparseSpec {
            density,
            per_head: true,
            per_batch: true,
            seed: 7,
            one_block: false,
        }),
        ..Case::new(DType::Bf16, (2, sq, sk), (4, 2), d, mask)
    }
}

#[test]
fn sparse_edge_cases() {
    let g = gpu_or_skip!();
    for d in DIMS {
        // Every row empty: zeros and LSE -inf everywhere.
        let r = check(g, &sparse_case(d, (300, 300), MaskSpec::none(), 0.0));
        assert!(r.out.iter().all(|x| *x == 0.0));
        assert!(r.lse.unwrap().iter().all(|x| *x == f32::NEG_INFINITY));
        // Full density, the last blocks partial (sequence ends inside a block), causal, sinks.
        for mask in [
            MaskSpec::none(),
            MaskSpec::causal(),
            MaskSpec::causal_window(100).with_sinks(70),
        ] {
            for (sq, sk) in [(1, 1), (129, 65), (200, 331), (256, 256), (255, 257)] {
                check(g, &sparse_case(d, (sq, sk), mask, 1.0));
                check(g, &sparse_case(d, (sq, sk), mask, 0.3));
            }
        }
    }
    // A single listed block.
    let c = Case::new(DType::F16, (1, 500, 700), (2, 2), 128, MaskSpec::none());
    let shape = MaskShape {
        batch: 1,
        heads: 1,
        seqlen_q: 500,
        seqlen_k: 700,
    };
    let one =
        BlockMask::from_fn(shape, MaskSpec::none(), |_, _, qb, kb| qb == 2 && kb == 5).unwrap();
    assert_eq!(one.nnz(), 1);
    check_with_mask(g, &c, &one);
}

/// Runs `c` through the sparse kernel with an explicit mask and checks it.
fn check_with_mask(g: &Gpu, c: &Case, m: &BlockMask) -> RunResult {
    // Encode the mask as an exact-density spec is not possible in general: run it directly.
    let mut rng = Rng(c.seed);
    let n_q = c.batch * c.seqlen_q * c.heads_q * c.head_dim;
    let n_kv = c.batch * c.seqlen_k * c.heads_kv * c.head_dim;
    let gen = |n: usize, rng: &mut Rng| -> Vec<f16> {
        (0..n).map(|_| f16::from_f32(rng.normal() as f32)).collect()
    };
    let (q, k, v) = (gen(n_q, &mut rng), gen(n_kv, &mut rng), gen(n_kv, &mut rng));
    let shape = RefShape {
        batch: c.batch,
        seqlen_q: c.seqlen_q,
        seqlen_k: c.seqlen_k,
        heads_q: c.heads_q,
        heads_kv: c.heads_kv,
        head_dim: c.head_dim,
    };
    let scale = 1.0 / (c.head_dim as f32).sqrt();
    let wide = |x: &[f16]| -> Vec<f64> { x.iter().map(|t| t.to_f32() as f64).collect() };
    let ref64 = attention_f64(&shape, &wide(&q), &wide(&k), &wide(&v), m, scale as f64).unwrap();
    let lowp = attention_lowp(&shape, &q, &k, &v, m, scale).unwrap();
    let (ql, kl) = (
        Layout::bshd(c.batch, c.seqlen_q, c.heads_q, c.head_dim),
        Layout::bshd(c.batch, c.seqlen_k, c.heads_kv, c.head_dim),
    );
    let (dq, dk, dv) = (
        g.stream.clone_htod(&q).unwrap(),
        g.stream.clone_htod(&k).unwrap(),
        g.stream.clone_htod(&v).unwrap(),
    );
    let mut d_o: CudaSlice<f16> = g.stream.clone_htod(&vec![f16::NAN; n_q]).unwrap();
    let mut d_lse: CudaSlice<f32> = g
        .stream
        .alloc_zeros(c.batch * c.heads_q * c.seqlen_q)
        .unwrap();
    let dm = m.to_device(&g.stream).unwrap();
    {
        let (qv, kv, vv) = (dq.as_view(), dk.as_view(), dv.as_view());
        let (mut ov, mut lv) = (d_o.as_view_mut(), d_lse.as_view_mut());
        g.attn
            .forward_sparse(
                &g.stream,
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
                &SparseOptions {
                    mask: &dm,
                    softmax_scale: None,
                },
            )
            .unwrap();
    }
    let out: Vec<f64> = wide(&g.stream.clone_dtoh(&d_o).unwrap());
    let lse: Vec<f32> = g.stream.clone_dtoh(&d_lse).unwrap();
    let cmp = compare(&out, Some(&lse), &ref64, &lowp);
    assert!(cmp.passes, "{c:?} with {} listed blocks\n  {cmp}", m.nnz());
    RunResult {
        cmp,
        out,
        lse: Some(lse),
        reference: ref64,
        naive: lowp,
    }
}

#[test]
fn dense_block_mask_equals_the_exact_kernel_bit_for_bit() {
    let g = gpu_or_skip!();
    for d in DIMS {
        for mask in [
            MaskSpec::none(),
            MaskSpec::causal(),
            MaskSpec::causal_window(150),
            MaskSpec::sliding_window(Some(40), Some(90)),
        ] {
            for (sq, sk) in [(300, 300), (129, 520), (520, 129)] {
                let dense = check(g, &Case::new(DType::Bf16, (2, sq, sk), (4, 2), d, mask));
                let c = Case {
                    sparse: Some(SparseSpec {
                        density: 1.0,
                        per_head: false,
                        per_batch: false,
                        seed: 0,
                        one_block: false,
                    }),
                    ..Case::new(DType::Bf16, (2, sq, sk), (4, 2), d, mask)
                };
                let sparse = check(g, &c);
                if full_mask_is_bitwise_dense(g, d, false) {
                    assert!(
                        dense.out == sparse.out,
                        "d {d} {mask:?} {sq}x{sk}: outputs differ"
                    );
                    assert!(
                        dense.lse == sparse.lse,
                        "d {d} {mask:?} {sq}x{sk}: LSEs differ"
                    );
                } else {
                    // Other key tiles sum in another order: both pass the rule (check), and
                    // the sm_80 mainloop still gives the same bits both ways.
                    let dense = run_case_with(
                        g,
                        &g.sm80,
                        &Case {
                            sparse: None,
                            ..c.clone()
                        },
                    );
                    let sparse = run_case_with(g, &g.sm80, &c);
                    assert!(
                        dense.out == sparse.out && dense.lse == sparse.lse,
                        "sm80: d {d} {mask:?} {sq}x{sk}: full block mask differs"
                    );
                }
            }
        }
    }
}

#[test]
fn merging_two_sparse_passes_equals_one_pass_over_their_union() {
    let g = gpu_or_skip!();
    for (d, mask) in [
        (64, MaskSpec::none()),
        (128, MaskSpec::causal()),
        (256, MaskSpec::causal_window(300)),
    ] {
        let (b, sq, sk, hq, hkv) = (2, 333, 777, 4, 2);
        let shape = MaskShape {
            batch: b,
            heads: hq,
            seqlen_q: sq,
            seqlen_k: sk,
        };
        let split = |b: usize, h: usize, qb: usize, kb: usize| {
            Rng(((b * 131 + h) * 1031 + qb) as u64 * 7919 + kb as u64).uniform() < 0.5
        };
        let a = BlockMask::from_fn(shape, mask, split).unwrap();
        let bm = BlockMask::from_fn(shape, mask, |b, h, qb, kb| !split(b, h, qb, kb)).unwrap();
        let mut rng = Rng(99);
        let gen = |n: usize, rng: &mut Rng| -> Vec<bf16> {
            (0..n)
                .map(|_| bf16::from_f32(rng.normal() as f32))
                .collect()
        };
        let (ql, kl) = (Layout::bshd(b, sq, hq, d), Layout::bshd(b, sk, hkv, d));
        let (q, k, v) = (
            gen(ql.numel(), &mut rng),
            gen(kl.numel(), &mut rng),
            gen(kl.numel(), &mut rng),
        );
        let rs = RefShape {
            batch: b,
            seqlen_q: sq,
            seqlen_k: sk,
            heads_q: hq,
            heads_kv: hkv,
            head_dim: d,
        };
        let scale = 1.0 / (d as f32).sqrt();
        let wide = |x: &[bf16]| -> Vec<f64> { x.iter().map(|t| t.to_f32() as f64).collect() };
        // The union of the two masks is the element mask alone.
        let ref64 =
            attention_f64(&rs, &wide(&q), &wide(&k), &wide(&v), &mask, scale as f64).unwrap();
        let lowp = attention_lowp(&rs, &q, &k, &v, &mask, scale).unwrap();
        let (dq, dk, dv) = (
            g.stream.clone_htod(&q).unwrap(),
            g.stream.clone_htod(&k).unwrap(),
            g.stream.clone_htod(&v).unwrap(),
        );
        let run = |m: &BlockMask| -> (CudaSlice<bf16>, CudaSlice<f32>) {
            let mut o: CudaSlice<bf16> = g.stream.alloc_zeros(ql.numel()).unwrap();
            let mut l: CudaSlice<f32> = g.stream.alloc_zeros(b * hq * sq).unwrap();
            let dm = m.to_device(&g.stream).unwrap();
            let (qv, kv, vv) = (dq.as_view(), dk.as_view(), dv.as_view());
            let (mut ov, mut lv) = (o.as_view_mut(), l.as_view_mut());
            g.attn
                .forward_sparse(
                    &g.stream,
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
                    &SparseOptions {
                        mask: &dm,
                        softmax_scale: None,
                    },
                )
                .unwrap();
            g.stream.synchronize().unwrap();
            (o, l)
        };
        let (mut oa, mut la) = run(&a);
        let (ob, lb) = run(&bm);
        {
            let (mut oav, mut lav) = (oa.as_view_mut(), la.as_view_mut());
            let (obv, lbv) = (ob.as_view(), lb.as_view());
            g.attn
                .merge(
                    &g.stream,
                    Output {
                        data: &mut oav,
                        layout: ql,
                        lse: Some(&mut lav),
                    },
                    Input {
                        data: &obv,
                        layout: ql,
                    },
                    &lbv,
                )
                .unwrap();
        }
        let out = wide(&g.stream.clone_dtoh(&oa).unwrap());
        let lse: Vec<f32> = g.stream.clone_dtoh(&la).unwrap();
        let cmp = compare(&out, Some(&lse), &ref64, &lowp);
        assert!(cmp.passes, "d {d} {mask:?}: {cmp}");
    }
}

#[test]
fn sparse_api_rejects_masks_for_other_problems() {
    let g = gpu_or_skip!();
    let l = Layout::bshd(1, 256, 2, 64);
    let q: CudaSlice<f16> = g.stream.alloc_zeros(l.numel()).unwrap();
    let mut o: CudaSlice<f16> = g.stream.alloc_zeros(l.numel()).unwrap();
    let qv = q.as_view();
    let mut ov = o.as_view_mut();
    for (shape, arg) in [
        (
            MaskShape {
                batch: 1,
                heads: 1,
                seqlen_q: 255,
                seqlen_k: 256,
            },
            "mask.seqlen_q",
        ),
        (
            MaskShape {
                batch: 1,
                heads: 1,
                seqlen_q: 256,
                seqlen_k: 300,
            },
            "mask.seqlen_k",
        ),
        (
            MaskShape {
                batch: 1,
                heads: 3,
                seqlen_q: 256,
                seqlen_k: 256,
            },
            "mask.heads",
        ),
        (
            MaskShape {
                batch: 2,
                heads: 1,
                seqlen_q: 256,
                seqlen_k: 256,
            },
            "mask.batch",
        ),
    ] {
        let m = BlockMask::from_fn(shape, MaskSpec::none(), |_, _, _, _| true)
            .unwrap()
            .to_device(&g.stream)
            .unwrap();
        let e = g
            .attn
            .forward_sparse(
                &g.stream,
                Input {
                    data: &qv,
                    layout: l,
                },
                Input {
                    data: &qv,
                    layout: l,
                },
                Input {
                    data: &qv,
                    layout: l,
                },
                Output {
                    data: &mut ov,
                    layout: l,
                    lse: None,
                },
                &SparseOptions {
                    mask: &m,
                    softmax_scale: None,
                },
            )
            .unwrap_err();
        assert!(
            matches!(e, Error::ShapeMismatch { arg: a, .. } if a == arg),
            "{arg}: {e}"
        );
    }
    // Sinks need a block mask.
    let e = g
        .attn
        .forward(
            &g.stream,
            Input {
                data: &qv,
                layout: l,
            },
            Input {
                data: &qv,
                layout: l,
            },
            Input {
                data: &qv,
                layout: l,
            },
            Output {
                data: &mut ov,
                layout: l,
                lse: None,
            },
            &ForwardOptions::causal().with_mask(MaskSpec::causal().with_sinks(4)),
        )
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidMask {
                arg: "mask.sink_tokens",
                ..
            }
        ),
        "{e}"
    );
}
