//! The backward of the exact forward: the GPU forward (for O and the LSE) then the GPU backward,
//! dQ, dK and dV against `reference::attention_backward_f64` under `reference::compare_gradient`
//! (each within twice the naive low-precision backward's error, plus half an ulp and
//! `GRAD_ABS_TOL`), over dtypes, head dims, batch, GQA, sequence lengths, masks, strides and both
//! dQ modes; the deterministic mode's bits; the safe API's checks.

use cudarc::driver::CudaSlice;
use half::f16;
use longflash::{
    BackwardInputs, BackwardOptions, DType, Error, Gradient, Gradients, Input, Layout, MaskSpec,
};
use proptest::prelude::*;

use crate::common::*;

mod harness;
mod rope;
mod sparse;
mod training;

pub(crate) use harness::*;

#[test]
fn backward_dense_and_causal_every_dtype_and_head_dim() {
    let g = gpu_or_skip!();
    for dtype in DTYPES {
        for d in DIMS {
            for mask in [MaskSpec::none(), MaskSpec::causal()] {
                for det in [false, true] {
                    let bc = BwdCase::new(dtype, (2, 257, 257), (3, 3), d, mask);
                    check_bwd(
                        g,
                        &BwdCase {
                            deterministic: det,
                            ..bc
                        },
                    );
                }
            }
        }
    }
}

#[test]
fn backward_single_token_and_tile_edges() {
    let g = gpu_or_skip!();
    for d in DIMS {
        for (sq, sk) in [
            (1, 1),
            (1, 200),
            (200, 1),
            (31, 33),
            (32, 32),
            (63, 65),
            (64, 64),
            (65, 63),
            (127, 129),
            (128, 128),
            (129, 127),
            (31, 700),
        ] {
            for mask in [MaskSpec::none(), MaskSpec::causal()] {
                for det in [false, true] {
                    let bc = BwdCase::new(DType::Bf16, (1, sq, sk), (2, 1), d, mask);
                    check_bwd(
                        g,
                        &BwdCase {
                            deterministic: det,
                            ..bc
                        },
                    );
                }
            }
        }
    }
}

/// A case the property test found (H100, 2026-12-05): one query row of two keys, one of one
/// key, the other 68 rows empty, where dK came out at 1.095 of its allowance and dQ at 0.93. The
/// kernels were exact given their inputs (a reference fed the GPU's output gave dK bit for bit):
/// the error came from the forward's output, whose P is rounded before P V, through D = dO . O,
/// and the naive budget had recomputed the output without that rounding. Kept with both dQ
/// modes.
#[test]
fn backward_two_keys_under_a_bottom_right_diagonal() {
    let g = gpu_or_skip!();
    let mask = MaskSpec {
        window_right: Some(0),
        ..MaskSpec::none()
    };
    let mut bc = BwdCase::new(DType::F16, (1, 70, 2), (4, 2), 64, mask);
    bc.c.seed = 104145553526547632;
    check_bwd(g, &bc);
    check_bwd(g, &bc.deterministic());
}

#[test]
fn backward_rows_and_keys_that_see_nothing_get_zero_gradients() {
    let g = gpu_or_skip!();
    // seqlen_q > seqlen_k with a bottom-right causal diagonal: the first sq - sk rows see no key
    // (LSE -inf): their dQ is exactly 0, and they add nothing to dK and dV.
    for det in [false, true] {
        let mut bc = BwdCase::new(DType::F16, (1, 300, 100), (2, 2), 128, MaskSpec::causal());
        bc.deterministic = det;
        let r = check_bwd(g, &bc);
        for i in 0..200 {
            for h in 0..2 {
                let o = (i * 2 + h) * 128;
                assert!(
                    r.dq[o..o + 128].iter().all(|&x| x == 0.0),
                    "row {i} head {h} sees no key: dq must be 0"
                );
            }
        }
    }
    // A narrow window over far more keys than queries: keys left of the window have no query,
    // so their dK and dV are exactly 0 (the CTAs of those key tiles visit nothing and still write).
    for d in DIMS {
        let mask = MaskSpec::sliding_window(Some(3), Some(2));
        let bc = BwdCase::new(DType::Bf16, (2, 50, 400), (4, 2), d, mask);
        let r = check_bwd(g, &bc);
        let first_seen = 400 - 50 - 3; // key j is seen by some row iff j >= off - left
        for b in 0..2 {
            for j in 0..first_seen {
                for h in 0..2 {
                    let o = ((b * 400 + j) * 2 + h) * d;
                    assert!(
                        r.dk[o..o + d]
                            .iter()
                            .chain(&r.dv[o..o + d])
                            .all(|&x| x == 0.0),
                        "key {j} is seen by no query: dk, dv must be 0"
                    );
                }
            }
        }
    }
}

#[test]
fn backward_sliding_windows() {
    let g = gpu_or_skip!();
    let windows = [
        MaskSpec::sliding_window(Some(0), Some(0)),
        MaskSpec::sliding_window(Some(17), Some(5)),
        MaskSpec::sliding_window(Some(64), None),
        MaskSpec::sliding_window(None, Some(63)),
        MaskSpec::causal_window(100),
        MaskSpec::causal_window(0),
        MaskSpec::sliding_window(Some(5000), Some(5000)),
    ];
    for d in DIMS {
        for mask in windows {
            for (sq, sk) in [(333, 333), (150, 401), (401, 150)] {
                let bc = BwdCase::new(DType::Bf16, (1, sq, sk), (2, 2), d, mask);
                check_bwd(g, &bc);
            }
        }
    }
}

#[test]
fn backward_gqa_and_mqa() {
    let g = gpu_or_skip!();
    for (hq, hkv) in [(8, 1), (8, 2), (6, 3), (4, 4)] {
        for mask in [MaskSpec::none(), MaskSpec::causal()] {
            for d in [64, 128] {
                let bc = BwdCase::new(DType::F16, (2, 190, 190), (hq, hkv), d, mask);
                check_bwd(g, &bc);
                check_bwd(g, &bc.deterministic());
            }
        }
    }
}

#[test]
fn backward_strided_layouts_match_contiguous_bit_for_bit() {
    let g = gpu_or_skip!();
    for d in DIMS {
        // Deterministic: the layouts are the only difference, so the bits must agree.
        let base =
            BwdCase::new(DType::Bf16, (2, 211, 300), (4, 2), d, MaskSpec::causal()).deterministic();
        let r0 = check_bwd(g, &base);
        for (q_mem, kv_mem, o_mem, dout_mem, dq_mem, dkv_mem) in [
            (
                Mem::Bhsd,
                Mem::Bhsd,
                Mem::Bhsd,
                Mem::Bhsd,
                Mem::Bhsd,
                Mem::Bhsd,
            ),
            (
                Mem::Bshd,
                Mem::Bhsd,
                Mem::PaddedBshd(1),
                Mem::PaddedBhsd(2),
                Mem::PaddedBshd(1),
                Mem::PaddedBhsd(1),
            ),
            (
                Mem::PaddedBhsd(3),
                Mem::PaddedBshd(2),
                Mem::Bhsd,
                Mem::Bshd,
                Mem::Bhsd,
                Mem::PaddedBshd(2),
            ),
        ] {
            let bc = BwdCase {
                c: Case {
                    q_mem,
                    kv_mem,
                    o_mem,
                    ..base.c.clone()
                },
                dout_mem,
                dq_mem,
                dkv_mem,
                ..base.clone()
            };
            let r = check_bwd(g, &bc);
            assert!(r.dq == r0.dq, "{bc:?}: layout changed dq");
            assert!(r.dk == r0.dk, "{bc:?}: layout changed dk");
            assert!(r.dv == r0.dv, "{bc:?}: layout changed dv");
        }
    }
}

#[test]
fn backward_deterministic_mode_repeats_its_bits() {
    let g = gpu_or_skip!();
    for d in DIMS {
        for mask in [MaskSpec::causal(), MaskSpec::none()] {
            // Long enough that many key tiles add into each dQ row.
            let det = BwdCase::new(DType::Bf16, (1, 500, 700), (4, 1), d, mask).deterministic();
            let a = check_bwd(g, &det);
            let b = check_bwd(g, &det);
            assert!(
                a.dq == b.dq && a.dk == b.dk && a.dv == b.dv,
                "{det:?}: bits differ"
            );
            // The caller's workspace, filled with NaN, gives the same bits as the safe API's.
            let raw = check_bwd(
                g,
                &BwdCase {
                    raw: true,
                    ..det.clone()
                },
            );
            assert!(
                raw.dq == a.dq && raw.dk == a.dk && raw.dv == a.dv,
                "{det:?}: raw differs"
            );
            // dK and dV never use atomics: the same bits in the atomic mode too.
            let atomic = BwdCase {
                deterministic: false,
                ..det.clone()
            };
            let x = check_bwd(g, &atomic);
            assert!(
                x.dk == a.dk && x.dv == a.dv,
                "{atomic:?}: dk, dv differ from the deterministic mode"
            );
            let y = check_bwd(
                g,
                &BwdCase {
                    raw: true,
                    ..atomic.clone()
                },
            );
            assert!(
                y.dk == x.dk && y.dv == x.dv,
                "{atomic:?}: dk, dv differ between runs"
            );
        }
    }
}

#[test]
fn backward_explicit_softmax_scale() {
    let g = gpu_or_skip!();
    for scale in [1e-3f32, 0.02, 0.5, 3.0] {
        let mut bc = BwdCase::new(DType::Bf16, (1, 130, 260), (2, 2), 128, MaskSpec::causal());
        bc.c.scale = Some(scale);
        check_bwd(g, &bc);
        check_bwd(g, &bc.deterministic());
    }
}

#[test]
fn backward_long_sequence() {
    let g = gpu_or_skip!();
    for mask in [
        MaskSpec::none(),
        MaskSpec::causal(),
        MaskSpec::causal_window(700),
    ] {
        let bc = BwdCase::new(DType::Bf16, (1, 1500, 1500), (2, 1), 128, mask);
        check_bwd(g, &bc);
    }
}

#[test]
fn backward_safe_api_rejects_bad_buffers_before_launch() {
    let g = gpu_or_skip!();
    let l = Layout::bshd(1, 64, 2, 64);
    let n = l.numel();
    let x: CudaSlice<f16> = g.stream.alloc_zeros(n).unwrap();
    let short: CudaSlice<f16> = g.stream.alloc_zeros(n - 1).unwrap();
    let lse: CudaSlice<f32> = g.stream.alloc_zeros(2 * 64).unwrap();
    let short_lse: CudaSlice<f32> = g.stream.alloc_zeros(2 * 64 - 1).unwrap();
    let mut dq: CudaSlice<f16> = g.stream.alloc_zeros(n).unwrap();
    let mut dk: CudaSlice<f16> = g.stream.alloc_zeros(n).unwrap();
    let mut dv: CudaSlice<f16> = g.stream.alloc_zeros(n - 8).unwrap();
    let (xv, sv, lv, slv) = (
        x.as_view(),
        short.as_view(),
        lse.as_view(),
        short_lse.as_view(),
    );
    let input = |data| Input { data, layout: l };
    let mut call = |dout, lse, dv_len: usize| {
        let mut dqv = dq.as_view_mut();
        let mut dkv = dk.as_view_mut();
        let mut dvv = dv.slice_mut(0..dv_len);
        g.attn.backward(
            &g.stream,
            BackwardInputs {
                q: input(&xv),
                k: input(&xv),
                v: input(&xv),
                o: input(&xv),
                dout: input(dout),
                lse,
            },
            Gradients {
                dq: Gradient {
                    data: &mut dqv,
                    layout: l,
                },
                dk: Gradient {
                    data: &mut dkv,
                    layout: l,
                },
                dv: Gradient {
                    data: &mut dvv,
                    layout: l,
                },
            },
            &BackwardOptions::causal(),
        )
    };
    let e = call(&sv, &lv, n - 8).unwrap_err();
    assert!(matches!(e, Error::OutOfBounds { arg: "dout", .. }), "{e}");
    let e = call(&xv, &slv, n - 8).unwrap_err();
    assert!(matches!(e, Error::OutOfBounds { arg: "dv", .. }), "{e}");
    // With dv long enough, the short LSE is what is wrong.
    let mut dv_full: CudaSlice<f16> = g.stream.alloc_zeros(n).unwrap();
    let (mut dqv, mut dkv, mut dvv) = (dq.as_view_mut(), dk.as_view_mut(), dv_full.as_view_mut());
    let e = g
        .attn
        .backward(
            &g.stream,
            BackwardInputs {
                q: input(&xv),
                k: input(&xv),
                v: input(&xv),
                o: input(&xv),
                dout: input(&xv),
                lse: &slv,
            },
            Gradients {
                dq: Gradient {
                    data: &mut dqv,
                    layout: l,
                },
                dk: Gradient {
                    data: &mut dkv,
                    layout: l,
                },
                dv: Gradient {
                    data: &mut dvv,
                    layout: l,
                },
            },
            &BackwardOptions::causal(),
        )
        .unwrap_err();
    assert!(matches!(e, Error::OutOfBounds { arg: "lse", .. }), "{e}");
    // An unsupported head dim is a typed error before anything is allocated or launched.
    let l100 = Layout::bshd(1, 64, 2, 100);
    let inp = |data| Input { data, layout: l100 };
    let e = g
        .attn
        .backward(
            &g.stream,
            BackwardInputs {
                q: inp(&xv),
                k: inp(&xv),
                v: inp(&xv),
                o: inp(&xv),
                dout: inp(&xv),
                lse: &lv,
            },
            Gradients {
                dq: Gradient {
                    data: &mut dqv,
                    layout: l100,
                },
                dk: Gradient {
                    data: &mut dkv,
                    layout: l100,
                },
                dv: Gradient {
                    data: &mut dvv,
                    layout: l100,
                },
            },
            &BackwardOptions::causal(),
        )
        .unwrap_err();
    assert!(
        matches!(e, Error::UnsupportedHeadDim { value: 100, .. }),
        "{e}"
    );
}

fn arb_bwd_case() -> impl Strategy<Value = BwdCase> {
    (arb_case(), (arb_mem(), arb_mem(), arb_mem()), any::<bool>()).prop_map(
        |(c, (dout_mem, dq_mem, dkv_mem), deterministic)| BwdCase {
            c,
            dout_mem,
            dq_mem,
            dkv_mem,
            deterministic,
            raw: false,
            block: None,
            dense_forward: false,
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn backward_matches_reference(bc in arb_bwd_case()) {
        let Some(g) = gpu() else {
            say_skipped("backward_matches_reference");
            return Ok(());
        };
        let r = run_bwd(g, &bc);
        prop_assert!(r.passes(), "{:?}\n  {}", bc, r.report());
    }
}
