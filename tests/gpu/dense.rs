//! The exact forward: dense, causal and sliding-window masks, layouts, GQA, the safe API's
//! checks, and the property test over all of it.

use cudarc::driver::CudaSlice;
use half::f16;
use longflash::{DType, Error, ForwardOptions, Input, Layout, MaskSpec, Output};
use proptest::prelude::*;

use crate::common::*;

#[test]
fn dense_and_causal_every_dtype_and_head_dim() {
    let g = gpu_or_skip!();
    for dtype in DTYPES {
        for d in DIMS {
            for mask in [MaskSpec::none(), MaskSpec::causal()] {
                check(g, &Case::new(dtype, (2, 257, 257), (3, 3), d, mask));
            }
        }
    }
}

#[test]
fn single_token_and_tile_edges() {
    let g = gpu_or_skip!();
    for d in DIMS {
        for (sq, sk) in [
            (1, 1),
            (1, 200),
            (200, 1),
            (63, 65),
            (64, 64),
            (65, 63),
            (127, 129),
            (128, 128),
            (129, 127),
            (31, 700),
        ] {
            for mask in [MaskSpec::none(), MaskSpec::causal()] {
                check(g, &Case::new(DType::Bf16, (1, sq, sk), (2, 1), d, mask));
            }
        }
    }
}

#[test]
fn causal_rows_with_no_key_give_zero_and_neg_inf_lse() {
    let g = gpu_or_skip!();
    // seqlen_q > seqlen_k with a bottom-right diagonal: the first sq - sk rows see nothing.
    let c = Case::new(DType::F16, (1, 300, 100), (2, 2), 128, MaskSpec::causal());
    let r = check(g, &c);
    let lse = r.lse.unwrap();
    for h in 0..2 {
        for i in 0..300 {
            let l = lse[h * 300 + i];
            if i < 200 {
                assert_eq!(l, f32::NEG_INFINITY, "row {i} sees no key");
                for x in &r.out[(i * 2 + h) * 128..(i * 2 + h + 1) * 128] {
                    assert_eq!(*x, 0.0);
                }
            } else {
                assert!(l.is_finite(), "row {i} sees keys");
            }
        }
    }
}

#[test]
fn sliding_windows() {
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
                check(g, &Case::new(DType::Bf16, (1, sq, sk), (2, 2), d, mask));
            }
        }
    }
}

#[test]
fn gqa_and_mqa() {
    let g = gpu_or_skip!();
    for (hq, hkv) in [(8, 1), (8, 2), (6, 3), (4, 4)] {
        for mask in [MaskSpec::none(), MaskSpec::causal()] {
            check(
                g,
                &Case::new(DType::F16, (2, 190, 190), (hq, hkv), 128, mask),
            );
        }
    }
}

#[test]
fn strided_layouts_match_contiguous_bit_for_bit() {
    let g = gpu_or_skip!();
    for d in DIMS {
        let base = Case::new(DType::Bf16, (2, 211, 300), (4, 2), d, MaskSpec::causal());
        let r0 = check(g, &base);
        for (q_mem, kv_mem, o_mem) in [
            (Mem::Bhsd, Mem::Bhsd, Mem::Bhsd),
            (Mem::Bshd, Mem::Bhsd, Mem::PaddedBshd(1)),
            (Mem::PaddedBhsd(3), Mem::PaddedBshd(2), Mem::Bhsd),
        ] {
            let c = Case {
                q_mem,
                kv_mem,
                o_mem,
                ..base.clone()
            };
            let r = check(g, &c);
            assert!(r.out == r0.out, "{c:?}: layout changed the result");
            assert!(r.lse == r0.lse, "{c:?}: layout changed the lse");
        }
    }
}

#[test]
fn repeated_calls_are_deterministic_and_lse_is_optional() {
    let g = gpu_or_skip!();
    let c = Case::new(DType::F16, (1, 500, 500), (2, 2), 64, MaskSpec::none());
    let a = check(g, &c);
    let b = check(g, &c);
    assert!(a.out == b.out);
    let no_lse = check(g, &Case { lse: false, ..c });
    assert!(no_lse.out == a.out);
}

#[test]
fn explicit_softmax_scale() {
    let g = gpu_or_skip!();
    for scale in [1e-3f32, 0.02, 0.5, 3.0] {
        check(
            g,
            &Case {
                scale: Some(scale),
                ..Case::new(DType::Bf16, (1, 130, 260), (2, 2), 128, MaskSpec::causal())
            },
        );
    }
}

#[test]
fn long_sequence() {
    let g = gpu_or_skip!();
    for mask in [
        MaskSpec::none(),
        MaskSpec::causal(),
        MaskSpec::causal_window(700),
    ] {
        check(
            g,
            &Case::new(DType::Bf16, (1, 2100, 2100), (1, 1), 128, mask),
        );
    }
}

#[test]
fn safe_api_rejects_bad_buffers_before_launch() {
    let g = gpu_or_skip!();
    let l = Layout::bshd(1, 64, 2, 64);
    let n = l.numel();
    let q: CudaSlice<f16> = g.stream.alloc_zeros(n).unwrap();
    let k: CudaSlice<f16> = g.stream.alloc_zeros(n).unwrap();
    let mut o: CudaSlice<f16> = g.stream.alloc_zeros(n).unwrap();
    let short: CudaSlice<f16> = g.stream.alloc_zeros(n - 1).unwrap();
    let opts = ForwardOptions::dense();
    let (qv, kv, sv) = (q.as_view(), k.as_view(), short.as_view());
    // A buffer shorter than its layout.
    let mut ov = o.as_view_mut();
    let e = g
        .attn
        .forward(
            &g.stream,
            Input {
                data: &qv,
                layout: l,
            },
            Input {
                data: &sv,
                layout: l,
            },
            Input {
                data: &kv,
                layout: l,
            },
            Output {
                data: &mut ov,
                layout: l,
                lse: None,
            },
            &opts,
        )
        .unwrap_err();
    assert!(matches!(e, Error::OutOfBounds { arg: "k", .. }), "{e}");
    // A view that starts one element in is not 16-byte aligned.
    let big: CudaSlice<f16> = g.stream.alloc_zeros(n + 8).unwrap();
    let off = big.slice(1..n + 1);
    let e = g
        .attn
        .forward(
            &g.stream,
            Input {
                data: &off,
                layout: l,
            },
            Input {
                data: &kv,
                layout: l,
            },
            Input {
                data: &kv,
                layout: l,
            },
            Output {
                data: &mut ov,
                layout: l,
                lse: None,
            },
            &opts,
        )
        .unwrap_err();
    assert!(matches!(e, Error::Misaligned { arg: "q.ptr", .. }), "{e}");
    // An LSE buffer too small.
    let mut lse: CudaSlice<f32> = g.stream.alloc_zeros(10).unwrap();
    let mut lv = lse.as_view_mut();
    let e = g
        .attn
        .forward(
            &g.stream,
            Input {
                data: &qv,
                layout: l,
            },
            Input {
                data: &kv,
                layout: l,
            },
            Input {
                data: &kv,
                layout: l,
            },
            Output {
                data: &mut ov,
                layout: l,
                lse: Some(&mut lv),
            },
            &opts,
        )
        .unwrap_err();
    assert!(matches!(e, Error::OutOfBounds { arg: "lse", .. }), "{e}");
    // The output overlapping an input: safe Rust cannot express it (a &mut and a & of the
    // same memory), so go through the raw layer with the same pointer for q and o.
    let (qp, _) = cudarc::driver::DevicePtr::device_ptr(&qv, &g.stream);
    let raw = longflash::RawForward {
        dtype: DType::F16,
        q: qp,
        k: qp,
        v: qp,
        o: qp,
        lse: 0,
        q_layout: l,
        k_layout: l,
        v_layout: l,
        o_layout: l,
        options: opts,
        block_mask: None,
    };
    // SAFETY: validation rejects the call before any launch.
    let e = unsafe { g.attn.forward_raw(g.stream.cu_stream(), &raw) }.unwrap_err();
    assert!(
        matches!(
            e,
            Error::Aliasing {
                output: "o",
                other: "q"
            }
        ),
        "{e}"
    );
    // A stream of the same context is accepted, so the checks above were about the buffers.
    assert!(std::sync::Arc::ptr_eq(g.stream.context(), &g.ctx));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn kernel_matches_reference(c in arb_case()) {
        let Some(g) = gpu() else {
            say_skipped("kernel_matches_reference");
            return Ok(());
        };
        let r = run_case(g, &c);
        prop_assert!(r.cmp.passes, "{:?}\n  {}", c, r.cmp);
    }
}
