//! Bad input never reaches a kernel: every class of bad argument is a typed error from
//! `RawForward::validate` (which the safe and raw entry points both run before any launch), and
//! a machine without a driver gets an error, not a panic. CPU only.

use longflash::{DType, Error, ForwardOptions, Layout, MaskSpec, RawForward};
use proptest::prelude::*;

const Q: u64 = 0x10_0000;
const K: u64 = 0x20_0000;
const V: u64 = 0x30_0000;
const O: u64 = 0x40_0000;
const LSE: u64 = 0x50_0000;

fn ok_args() -> RawForward {
    let l = Layout::bshd(2, 100, 4, 64);
    let kv = Layout::bshd(2, 120, 2, 64);
    RawForward {
        dtype: DType::Bf16,
        q: Q,
        k: K,
        v: V,
        o: O,
        lse: LSE,
        q_layout: l,
        k_layout: kv,
        v_layout: kv,
        o_layout: l,
        options: ForwardOptions::causal(),
        block_mask: None,
    }
}

#[test]
fn valid_arguments_lower_to_kernel_params() {
    let a = ok_args();
    let p = a.validate().unwrap();
    assert_eq!((p.batch, p.heads_q, p.heads_kv, p.head_dim), (2, 4, 2, 64));
    assert_eq!(
        (
            p.mask.seqlen_q,
            p.mask.seqlen_k,
            p.mask.window_left,
            p.mask.window_right
        ),
        (100, 120, -1, 0)
    );
    assert_eq!(p.q_row_stride, 4 * 64);
    assert_eq!(p.k_row_stride, 2 * 64);
    assert!((p.softmax_scale - 0.125).abs() < 1e-7);
    assert!((p.softmax_scale_log2 - 0.125 * std::f32::consts::LOG2_E).abs() < 1e-6);
    assert_eq!(p.lse as u64, LSE);
}

#[test]
fn head_dims() {
    let with_dim = |d: usize| {
        let mut a = ok_args();
        for l in [&mut a.q_layout, &mut a.o_layout] {
            *l = Layout::bshd(2, 100, 4, d);
        }
        for l in [&mut a.k_layout, &mut a.v_layout] {
            *l = Layout::bshd(2, 120, 2, d);
        }
        a
    };
    // The exact forward takes every multiple of 4 up to 256 (narrower heads run padded).
    for d in [4, 8, 16, 32, 64, 80, 96, 100, 112, 128, 160, 192, 252, 256] {
        let p = with_dim(d)
            .validate()
            .unwrap_or_else(|e| panic!("{d}: {e}"));
        assert_eq!(p.head_dim, d as i32);
        assert!((p.softmax_scale - 1.0 / (d as f32).sqrt()).abs() < 1e-7);
    }
    for d in [2, 6, 102, 260, 512] {
        let e = with_dim(d).validate().unwrap_err();
        assert!(
            matches!(
                e,
                Error::InvalidArgument {
                    arg: "q.head_dim",
                    ..
                }
            ),
            "{d}: {e}"
        );
        assert!(e.to_string().contains(&d.to_string()));
    }
    // With a block mask only the kernels' own widths.
    for d in [16, 80, 96, 192] {
        let mut a = with_dim(d);
        a.block_mask = Some(longflash::RawBlockMask {
            row_offsets: 1 << 30,
            col_indices: 2 << 30,
            full: 3 << 30,
            batch: 1,
            heads: 1,
        });
        let e = a.validate().unwrap_err();
        assert!(
            matches!(e, Error::UnsupportedHeadDim { value, .. } if value == d),
            "{d}: {e}"
        );
    }
    // The kernel each head dim runs in.
    use longflash::attention::head_dim_kernel;
    assert_eq!(head_dim_kernel(64), Some((64, false)));
    assert_eq!(head_dim_kernel(56), Some((64, true)));
    assert_eq!(head_dim_kernel(80), Some((128, true)));
    assert_eq!(head_dim_kernel(128), Some((128, false)));
    assert_eq!(head_dim_kernel(136), Some((256, true)));
    assert_eq!(head_dim_kernel(100), Some((128, true)));
    assert_eq!(head_dim_kernel(102), None);
    assert_eq!(head_dim_kernel(0), None);
    assert_eq!(head_dim_kernel(264), None);
    // A narrow head's rows need only be 8-byte aligned.
    let mut a = with_dim(100);
    a.q_layout.head_stride = 100;
    a.q_layout.seq_stride = 400;
    a.q_layout.batch_stride = 40_000;
    a.o_layout = a.q_layout;
    assert!(a.validate().is_ok());
    a.q_layout.head_stride = 102;
    let e = a.validate().unwrap_err();
    assert!(matches!(e, Error::Misaligned { multiple_of: 4, .. }), "{e}");
}

#[test]
fn mismatched_shapes_name_the_argument() {
    type Edit = Box<dyn Fn(&mut RawForward)>;
    let cases: Vec<(Edit, &str)> = vec![
        (
            Box::new(|a| a.k_layout = Layout::bshd(2, 120, 2, 128)),
            "k.head_dim",
        ),
        (
            Box::new(|a| a.v_layout = Layout::bshd(2, 121, 2, 64)),
            "v.seqlen",
        ),
        (
            Box::new(|a| a.v_layout = Layout::bshd(3, 120, 2, 64)),
            "v.batch",
        ),
        (
            Box::new(|a| a.o_layout = Layout::bshd(2, 99, 4, 64)),
            "o.seqlen",
        ),
        (
            Box::new(|a| a.o_layout = Layout::bshd(2, 100, 8, 64)),
            "o.heads",
        ),
        (
            Box::new(|a| a.v_layout = Layout::bshd(2, 120, 1, 64)),
            "v.heads",
        ),
        (
            Box::new(|a| a.k_layout = Layout::bshd(1, 120, 2, 64)),
            "k.batch",
        ),
    ];
    for (f, arg) in cases {
        let mut a = ok_args();
        f(&mut a);
        let e = a.validate().unwrap_err();
        assert!(
            matches!(e, Error::ShapeMismatch { arg: got, .. } if got == arg),
            "{arg}: {e}"
        );
        assert!(e.to_string().contains(arg));
    }
}

#[test]
fn heads_that_do_not_divide() {
    let mut a = ok_args();
    a.k_layout = Layout::bshd(2, 120, 3, 64);
    a.v_layout = a.k_layout;
    let e = a.validate().unwrap_err();
    assert_eq!(
        e,
        Error::HeadsNotDivisible {
            heads_q: 4,
            heads_kv: 3
        }
    );
}

#[test]
fn zero_sized_dims() {
    for (t, dim) in [
        ("q", "seqlen"),
        ("k", "seqlen"),
        ("q", "batch"),
        ("v", "heads"),
        ("o", "head_dim"),
    ] {
        let mut a = ok_args();
        let l = match t {
            "q" => &mut a.q_layout,
            "k" => &mut a.k_layout,
            "v" => &mut a.v_layout,
            _ => &mut a.o_layout,
        };
        match dim {
            "seqlen" => l.seqlen = 0,
            "batch" => l.batch = 0,
            "heads" => l.heads = 0,
            _ => l.head_dim = 0,
        }
        let e = a.validate().unwrap_err();
        assert_eq!(e, Error::ZeroSized { arg: t, dim }, "{t}.{dim}");
    }
}

#[test]
fn misaligned_pointers_and_strides() {
    let mut a = ok_args();
    a.k = K + 2;
    assert!(matches!(
        a.validate().unwrap_err(),
        Error::Misaligned {
            arg: "k.ptr",
            multiple_of: 16,
            ..
        }
    ));
    let mut a = ok_args();
    a.lse = LSE + 2;
    assert!(matches!(
        a.validate().unwrap_err(),
        Error::Misaligned { arg: "lse.ptr", .. }
    ));
    let mut a = ok_args();
    a.v_layout.seq_stride += 4;
    assert!(
        matches!(a.validate().unwrap_err(), Error::Misaligned { arg: "v.seq_stride", value, multiple_of: 8 } if value == 2 * 64 + 4)
    );
    let mut a = ok_args();
    a.q_layout.head_stride = 72;
    a.q_layout.seq_stride = 4 * 72;
    a.q_layout.batch_stride = 100 * 4 * 72 + 3;
    assert!(matches!(
        a.validate().unwrap_err(),
        Error::Misaligned {
            arg: "q.batch_stride",
            ..
        }
    ));
}

#[test]
fn overlapping_or_aliasing_outputs() {
    // o whose heads overlap each other.
    let mut a = ok_args();
    a.o_layout.head_stride = 32;
    assert_eq!(
        a.validate().unwrap_err(),
        Error::OverlappingOutput { arg: "o" }
    );
    // o on top of q, of v, and lse inside k.
    let mut a = ok_args();
    a.o = a.q;
    assert_eq!(
        a.validate().unwrap_err(),
        Error::Aliasing {
            output: "o",
            other: "q"
        }
    );
    let mut a = ok_args();
    a.o = V + 1024;
    assert_eq!(
        a.validate().unwrap_err(),
        Error::Aliasing {
            output: "o",
            other: "v"
        }
    );
    let mut a = ok_args();
    a.lse = K + 64;
    assert_eq!(
        a.validate().unwrap_err(),
        Error::Aliasing {
            output: "lse",
            other: "k"
        }
    );
    let mut a = ok_args();
    a.lse = O + 16;
    assert_eq!(
        a.validate().unwrap_err(),
        Error::Aliasing {
            output: "lse",
            other: "o"
        }
    );
    // Inputs may overlap each other (k == v is fine), and K/V broadcast across batch is fine.
    let mut a = ok_args();
    a.v = a.k;
    a.k_layout.batch_stride = 0;
    a.v_layout = a.k_layout;
    assert!(a.validate().is_ok());
}

#[test]
fn masks_and_scales_that_make_no_sense() {
    let mut a = ok_args();
    a.options.mask = MaskSpec {
        sink_tokens: 0,
        causal: true,
        window_left: None,
        window_right: Some(3),
    };
    assert!(matches!(
        a.validate().unwrap_err(),
        Error::InvalidMask {
            arg: "mask.window_right",
            ..
        }
    ));
    let mut a = ok_args();
    a.options.mask = MaskSpec::sliding_window(Some(u32::MAX), None);
    assert!(matches!(
        a.validate().unwrap_err(),
        Error::InvalidMask {
            arg: "mask.window_left",
            ..
        }
    ));
    for bad in [0.0f32, -0.5, f32::NAN, f32::INFINITY] {
        let mut a = ok_args();
        a.options.softmax_scale = Some(bad);
        assert!(
            matches!(
                a.validate().unwrap_err(),
                Error::InvalidArgument {
                    arg: "options.softmax_scale",
                    ..
                }
            ),
            "{bad}"
        );
    }
}

#[test]
fn grid_limits() {
    let mut a = ok_args();
    a.q_layout = Layout::bshd(70000, 1, 4, 64);
    a.o_layout = a.q_layout;
    a.k_layout = Layout::bshd(70000, 1, 2, 64);
    a.v_layout = a.k_layout;
    assert!(matches!(
        a.validate().unwrap_err(),
        Error::InvalidArgument { arg: "q.batch", .. }
    ));
}

#[test]
fn layouts_report_their_reach_and_overlap() {
    let l = Layout::bshd(2, 3, 4, 64);
    assert_eq!(l.required_len("t").unwrap(), (2 * 3 * 4 * 64) as u128);
    let l = Layout::bhsd(2, 3, 4, 64);
    assert_eq!(l.required_len("t").unwrap(), (2 * 3 * 4 * 64) as u128);
    assert!(l.is_non_overlapping());
    let neg = Layout {
        seq_stride: -64,
        ..l
    };
    assert!(matches!(
        neg.required_len("t").unwrap_err(),
        Error::InvalidArgument { arg: "t", .. }
    ));
    let overlapping = Layout {
        head_stride: 64,
        seq_stride: 64,
        ..l
    };
    assert!(!overlapping.is_non_overlapping());
}

#[test]
fn a_clamped_device_index_says_what_and_where() {
    // What DeviceErrorFlag::check returns when a serving kernel clamped an index.
    let e = Error::DeviceIndexOutOfRange {
        during: "decoding step 7",
    };
    let text = e.to_string();
    assert!(text.starts_with("decoding step 7: "), "{text}");
    assert!(
        text.contains("clamped") && text.contains("unspecified"),
        "{text}"
    );
}

#[test]
fn no_driver_is_an_error_not_a_panic() {
    // On a machine without libcuda this must be NoDriver; with a GPU it opens the device.
    match longflash::open_device(0) {
        Ok(_) => {}
        Err(e) => assert!(
            matches!(e, Error::NoDriver | Error::NoDevice | Error::Driver { .. }),
            "{e}"
        ),
    }
    // An ordinal that cannot exist is an error either way.
    assert!(longflash::open_device(1 << 20).is_err());
}

proptest! {
    #[test]
    fn visible_pairs_counts_the_dense_mask(sq in 1usize..200, sk in 1usize..200, causal: bool,
                                           wl in prop::option::of(0u32..250), wr in prop::option::of(0u32..250)) {
        let m = MaskSpec { sink_tokens: 0, causal, window_left: wl, window_right: if causal { None } else { wr } };
        let brute = (0..sq).map(|i| (0..sk).filter(|&j| m.is_visible(sq, sk, i, j)).count() as u64).sum::<u64>();
        prop_assert_eq!(m.visible_pairs(sq, sk), brute);
    }
}
