//! The backward's arguments: every class of bad argument is a typed error from
//! `RawBackward::validate` (which the safe and raw entry points both run before any launch), the
//! workspace size and its parts, and the lowering of good arguments. CPU only.

use longflash::{
    backward_workspace_bytes, BackwardOptions, DType, Error, ForwardOptions, Layout, MaskSpec,
    RawBackward,
};

const MIB: u64 = 1 << 20;
const Q: u64 = 0x100 * MIB;
const K: u64 = 0x200 * MIB;
const V: u64 = 0x300 * MIB;
const O: u64 = 0x400 * MIB;
const DO: u64 = 0x500 * MIB;
const LSE: u64 = 0x600 * MIB;
const DQ: u64 = 0x700 * MIB;
const DK: u64 = 0x800 * MIB;
const DV: u64 = 0x900 * MIB;
const WS: u64 = 0xa00 * MIB;

/// Edits one field of the arguments (a table of cases below).
type SetShape = fn(&mut RawBackward, Layout, Layout);
type PtrField = fn(&mut RawBackward) -> &mut u64;
type LayoutField = fn(&mut RawBackward) -> &mut Layout;

fn ok_args() -> RawBackward {
    let l = Layout::bshd(2, 100, 4, 64);
    let kv = Layout::bshd(2, 120, 2, 64);
    RawBackward {
        dtype: DType::Bf16,
        q: Q,
        k: K,
        v: V,
        o: O,
        dout: DO,
        lse: LSE,
        dq: DQ,
        dk: DK,
        dv: DV,
        workspace: WS,
        workspace_bytes: backward_workspace_bytes(&l, false).unwrap(),
        q_layout: l,
        k_layout: kv,
        v_layout: kv,
        o_layout: l,
        dout_layout: l,
        dq_layout: l,
        dk_layout: kv,
        dv_layout: kv,
        options: BackwardOptions::causal(),
    }
}

#[test]
fn workspace_sizes() {
    // rows = batch * heads * (seqlen rounded up to 128): D and the LSE in f32, and the f32 dQ
    // accumulator unless deterministic.
    let l = Layout::bshd(2, 100, 4, 64);
    let rows = 2 * 4 * 128;
    assert_eq!(backward_workspace_bytes(&l, true).unwrap(), 8 * rows);
    assert_eq!(
        backward_workspace_bytes(&l, false).unwrap(),
        8 * rows + 4 * rows * 64
    );
    let l = Layout::bshd(1, 128, 1, 256);
    assert_eq!(backward_workspace_bytes(&l, true).unwrap(), 8 * 128);
    assert_eq!(
        backward_workspace_bytes(&l, false).unwrap(),
        8 * 128 + 4 * 128 * 256
    );
    let l = Layout::bshd(1, 129, 1, 128);
    assert_eq!(backward_workspace_bytes(&l, true).unwrap(), 8 * 256);
    // Zero dims and overflow are errors, not panics.
    let e = backward_workspace_bytes(&Layout::bshd(0, 10, 1, 64), false).unwrap_err();
    assert!(matches!(e, Error::ZeroSized { arg: "q", .. }), "{e}");
    let huge = Layout {
        batch: usize::MAX / 2,
        ..Layout::bshd(1, 1 << 20, 64, 128)
    };
    let e = backward_workspace_bytes(&huge, false).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { arg: "q", .. }), "{e}");
}

#[test]
fn valid_arguments_lower_to_kernel_params() {
    let a = ok_args();
    let p = a.validate().unwrap();
    assert_eq!((p.batch, p.heads_q, p.heads_kv, p.head_dim), (2, 4, 2, 64));
    assert_eq!(p.rows_pad, 128);
    assert_eq!(
        (
            p.mask.seqlen_q,
            p.mask.seqlen_k,
            p.mask.window_left,
            p.mask.window_right
        ),
        (100, 120, -1, 0)
    );
    assert_eq!((p.q_row_stride, p.k_row_stride), (4 * 64, 2 * 64));
    assert_eq!((p.do_row_stride, p.dq_row_stride), (4 * 64, 4 * 64));
    assert_eq!((p.dk_head_stride, p.dv_batch_stride), (64, 120 * 2 * 64));
    assert!((p.softmax_scale - 0.125).abs() < 1e-7);
    assert!((p.softmax_scale_log2 - 0.125 * std::f32::consts::LOG2_E).abs() < 1e-6);
    // The workspace: D, then the LSE (log2), then the dQ accumulator.
    let rows = 2 * 4 * 128u64;
    assert_eq!(p.dsum as u64, WS);
    assert_eq!(p.lse_log2 as u64, WS + 4 * rows);
    assert_eq!(p.dq_accum as u64, WS + 8 * rows);
    assert_eq!(
        (
            p.q as u64,
            p.o as u64,
            p.dout as u64,
            p.lse as u64,
            p.dq as u64,
            p.dk as u64,
            p.dv as u64
        ),
        (Q, O, DO, LSE, DQ, DK, DV)
    );
    // Deterministic: no accumulator, a smaller workspace is enough.
    let mut d = ok_args();
    d.options = d.options.with_deterministic(true);
    d.workspace_bytes = backward_workspace_bytes(&d.q_layout, true).unwrap();
    let p = d.validate().unwrap();
    assert!(p.dq_accum.is_null());
    // The forward's options carry over.
    let f = ForwardOptions::causal().with_scale(0.3);
    assert_eq!(
        BackwardOptions::from(f),
        BackwardOptions::causal().with_scale(0.3)
    );
}

#[test]
fn head_dims_are_64_128_256() {
    for d in [64, 128, 256] {
        let mut a = ok_args();
        let (l, kv) = (Layout::bshd(2, 100, 4, d), Layout::bshd(2, 120, 2, d));
        a.q_layout = l;
        a.o_layout = l;
        a.dout_layout = l;
        a.dq_layout = l;
        a.k_layout = kv;
        a.v_layout = kv;
        a.dk_layout = kv;
        a.dv_layout = kv;
        a.workspace_bytes = backward_workspace_bytes(&l, false).unwrap();
        let p = a.validate().unwrap_or_else(|e| panic!("{d}: {e}"));
        assert_eq!(p.head_dim, d as i32);
    }
    for d in [32, 80, 96, 100, 512] {
        let mut a = ok_args();
        let (l, kv) = (Layout::bshd(2, 100, 4, d), Layout::bshd(2, 120, 2, d));
        a.q_layout = l;
        a.o_layout = l;
        a.dout_layout = l;
        a.dq_layout = l;
        a.k_layout = kv;
        a.v_layout = kv;
        a.dk_layout = kv;
        a.dv_layout = kv;
        let e = a.validate().unwrap_err();
        assert!(
            matches!(
                e,
                Error::UnsupportedHeadDim {
                    arg: "q.head_dim",
                    ..
                }
            ),
            "{d}: {e}"
        );
    }
}

#[test]
fn gradient_and_dout_shapes_must_match() {
    let bad = Layout::bshd(2, 99, 4, 64);
    let bad_kv = Layout::bshd(2, 120, 1, 64);
    let cases: [(SetShape, &str); 4] = [
        (|a, l, _| a.dout_layout = l, "dout.seqlen"),
        (|a, l, _| a.dq_layout = l, "dq.seqlen"),
        (|a, _, kv| a.dk_layout = kv, "dk.heads"),
        (|a, _, kv| a.dv_layout = kv, "dv.heads"),
    ];
    for (set, want) in cases {
        let mut a = ok_args();
        set(&mut a, bad, bad_kv);
        let e = a.validate().unwrap_err();
        assert!(
            matches!(e, Error::ShapeMismatch { arg, .. } if arg == want),
            "{want}: {e}"
        );
    }
    let mut a = ok_args();
    a.dk_layout = Layout::bshd(2, 0, 2, 64);
    let e = a.validate().unwrap_err();
    assert!(
        matches!(
            e,
            Error::ZeroSized {
                arg: "dk",
                dim: "seqlen"
            }
        ),
        "{e}"
    );
    // The forward's own rules come first.
    let mut a = ok_args();
    a.k_layout = Layout::bshd(2, 120, 3, 64);
    a.v_layout = a.k_layout;
    let e = a.validate().unwrap_err();
    assert!(matches!(e, Error::HeadsNotDivisible { .. }), "{e}");
}

#[test]
fn masks_and_scale() {
    let mut a = ok_args();
    a.options = a.options.with_mask(MaskSpec::causal().with_sinks(4));
    let e = a.validate().unwrap_err();
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
    let mut a = ok_args();
    a.options.mask = MaskSpec {
        causal: true,
        window_right: Some(3),
        ..MaskSpec::none()
    };
    let e = a.validate().unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidMask {
                arg: "mask.window_right",
                ..
            }
        ),
        "{e}"
    );
    for s in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        let mut a = ok_args();
        a.options = a.options.with_scale(s);
        let e = a.validate().unwrap_err();
        assert!(
            matches!(
                e,
                Error::InvalidArgument {
                    arg: "options.softmax_scale",
                    ..
                }
            ),
            "{s}: {e}"
        );
    }
    let mut a = ok_args();
    a.options = a
        .options
        .with_mask(MaskSpec::sliding_window(Some(7), Some(3)));
    let p = a.validate().unwrap();
    assert_eq!((p.mask.window_left, p.mask.window_right), (7, 3));
}

#[test]
fn pointers_and_strides_must_be_aligned() {
    let ptrs: [(PtrField, &str); 8] = [
        (|a| &mut a.q, "q.ptr"),
        (|a| &mut a.k, "k.ptr"),
        (|a| &mut a.v, "v.ptr"),
        (|a| &mut a.o, "o.ptr"),
        (|a| &mut a.dout, "dout.ptr"),
        (|a| &mut a.dq, "dq.ptr"),
        (|a| &mut a.dk, "dk.ptr"),
        (|a| &mut a.dv, "dv.ptr"),
    ];
    for (field, want) in ptrs {
        for bad in [8u64, 0] {
            let mut a = ok_args();
            let p = field(&mut a);
            *p = if bad == 0 { 0 } else { *p + bad };
            let e = a.validate().unwrap_err();
            assert!(
                matches!(e, Error::Misaligned { arg, multiple_of: 16, .. } if arg == want),
                "{want} {bad}: {e}"
            );
        }
    }
    let mut a = ok_args();
    a.lse += 2;
    let e = a.validate().unwrap_err();
    assert!(
        matches!(
            e,
            Error::Misaligned {
                arg: "lse.ptr",
                multiple_of: 4,
                ..
            }
        ),
        "{e}"
    );
    let mut a = ok_args();
    a.lse = 0;
    let e = a.validate().unwrap_err();
    assert!(
        matches!(e, Error::Misaligned { arg: "lse.ptr", .. }),
        "the LSE is required: {e}"
    );
    let mut a = ok_args();
    a.workspace += 8;
    let e = a.validate().unwrap_err();
    assert!(
        matches!(
            e,
            Error::Misaligned {
                arg: "workspace.ptr",
                ..
            }
        ),
        "{e}"
    );
    // Strides of every tensor: multiples of 8 elements.
    let strides: [(LayoutField, &str); 4] = [
        (|a| &mut a.dout_layout, "dout.seq_stride"),
        (|a| &mut a.dq_layout, "dq.seq_stride"),
        (|a| &mut a.dk_layout, "dk.seq_stride"),
        (|a| &mut a.dv_layout, "dv.seq_stride"),
    ];
    for (field, want) in strides {
        let mut a = ok_args();
        field(&mut a).seq_stride += 4;
        let e = a.validate().unwrap_err();
        assert!(
            matches!(e, Error::Misaligned { arg, multiple_of: 8, .. } if arg == want),
            "{want}: {e}"
        );
    }
}

#[test]
fn workspace_must_be_big_enough() {
    let mut a = ok_args();
    a.workspace_bytes -= 16;
    let e = a.validate().unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidArgument {
                arg: "workspace_bytes",
                ..
            }
        ),
        "{e}"
    );
    // The deterministic size is too small for the atomic mode.
    let mut a = ok_args();
    a.workspace_bytes = backward_workspace_bytes(&a.q_layout, true).unwrap();
    assert!(a.validate().is_err());
    a.options = a.options.with_deterministic(true);
    assert!(a.validate().is_ok());
}

#[test]
fn outputs_must_not_alias() {
    // A gradient over an input.
    let mut a = ok_args();
    a.dq = Q;
    let e = a.validate().unwrap_err();
    assert!(
        matches!(
            e,
            Error::Aliasing {
                output: "dq",
                other: "q"
            }
        ),
        "{e}"
    );
    let mut a = ok_args();
    a.dv = LSE;
    let e = a.validate().unwrap_err();
    assert!(
        matches!(
            e,
            Error::Aliasing {
                output: "dv",
                other: "lse"
            }
        ),
        "{e}"
    );
    let mut a = ok_args();
    a.dk = DO + 64;
    let e = a.validate().unwrap_err();
    assert!(
        matches!(
            e,
            Error::Aliasing {
                output: "dk",
                other: "dout"
            }
        ),
        "{e}"
    );
    // Two gradients over each other.
    let mut a = ok_args();
    a.dv = DK;
    let e = a.validate().unwrap_err();
    assert!(
        matches!(
            e,
            Error::Aliasing {
                output: "dv",
                other: "dk"
            }
        ),
        "{e}"
    );
    // The workspace over a gradient or an input, including its last byte.
    let mut a = ok_args();
    a.workspace = DQ;
    let e = a.validate().unwrap_err();
    assert!(
        matches!(
            e,
            Error::Aliasing {
                output: "workspace",
                other: "dq"
            }
        ),
        "{e}"
    );
    let mut a = ok_args();
    let need = backward_workspace_bytes(&a.q_layout, false).unwrap() as u64;
    a.workspace = (V - need + 16) & !15;
    let e = a.validate().unwrap_err();
    assert!(
        matches!(
            e,
            Error::Aliasing {
                output: "workspace",
                other: "v"
            }
        ),
        "{e}"
    );
    a.workspace = V - need;
    assert!(a.validate().is_ok(), "a workspace that ends where v starts");
    // A gradient layout that writes an element twice.
    let mut a = ok_args();
    a.dk_layout.seq_stride = 0;
    let e = a.validate().unwrap_err();
    assert!(matches!(e, Error::OverlappingOutput { arg: "dk" }), "{e}");
    // Inputs may share memory (K and V from one buffer, a broadcast batch).
    let mut a = ok_args();
    a.v = K;
    a.k_layout.batch_stride = 0;
    a.v_layout = a.k_layout;
    assert!(a.validate().is_ok());
}

#[test]
fn grid_limits() {
    let mut a = ok_args();
    let l = Layout::bshd(70_000, 1, 1, 64);
    a.q_layout = l;
    a.o_layout = l;
    a.dout_layout = l;
    a.dq_layout = l;
    let kv = Layout::bshd(70_000, 1, 1, 64);
    a.k_layout = kv;
    a.v_layout = kv;
    a.dk_layout = kv;
    a.dv_layout = kv;
    let e = a.validate().unwrap_err();
    assert!(
        matches!(e, Error::InvalidArgument { arg: "q.batch", .. }),
        "{e}"
    );
}
