//! The RoPE backward's arguments: its workspace, and every class of bad argument as a typed
//! error from `RawBackward::validate_rope` (which `backward_rope_raw` runs before any launch).
//! CPU only.

use longflash::{
    backward_workspace_bytes, rope_backward_workspace_bytes, BackwardOptions, DType, Error, Layout,
    MaskSpec, RawBackward, RawRope, RawRopeMode,
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
const KROT: u64 = 0xb00 * MIB;
const KALT: u64 = 0xc00 * MIB;
const FREQ: u64 = 0xd00 * MIB;

const RE: RawRopeMode = RawRopeMode::ReRope { window: 32 };

fn ok_args(mode: RawRopeMode) -> (RawBackward, RawRope) {
    let l = Layout::bshd(2, 100, 4, 64);
    let kv = Layout::bshd(2, 120, 2, 64);
    let args = RawBackward {
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
        workspace_bytes: rope_backward_workspace_bytes(&l, &kv, mode, false).unwrap(),
        q_layout: l,
        k_layout: kv,
        v_layout: kv,
        o_layout: l,
        dout_layout: l,
        dq_layout: l,
        dk_layout: kv,
        dv_layout: kv,
        options: BackwardOptions::causal(),
    };
    let rope = RawRope {
        inv_freq: FREQ,
        position_offsets: 0,
        k_rot: KROT,
        k_alt: if mode == RawRopeMode::Rope { 0 } else { KALT },
        rotary_dim: 64,
        interleaved: false,
        mode,
        attention_factor: 1.0,
        log_n_train_len: None,
    };
    (args, rope)
}

#[test]
fn workspace_sizes() {
    let (q, k) = (Layout::bshd(2, 100, 4, 64), Layout::bshd(2, 120, 2, 64));
    let exact = backward_workspace_bytes(&q, false).unwrap();
    let (nq, nk) = (2 * 100 * 4 * 64 * 2, 2 * 120 * 2 * 64 * 2);
    let up = |x: usize| x.next_multiple_of(256);
    // Plain RoPE: the rotated queries after the exact backward's part.
    let plain = rope_backward_workspace_bytes(&q, &k, RawRopeMode::Rope, false).unwrap();
    assert_eq!(plain, up(exact) + nq);
    // Two-sided: the outside queries and the outside half's dq, dk and dv too.
    let two = rope_backward_workspace_bytes(&q, &k, RE, false).unwrap();
    let mut at = up(exact) + nq;
    for n in [nq, nq, nk, nk] {
        at = up(at) + n;
    }
    assert_eq!(two, at);
    let det = rope_backward_workspace_bytes(&q, &k, RE, true).unwrap();
    assert!(
        det < two,
        "the deterministic backward needs no dQ accumulator"
    );
    let e = rope_backward_workspace_bytes(&q, &Layout::bshd(2, 0, 2, 64), RE, false).unwrap_err();
    assert!(matches!(e, Error::ZeroSized { .. }), "{e}");
}

#[test]
fn valid_arguments_pass_for_every_mode_and_window() {
    let modes = [
        RawRopeMode::Rope,
        RE,
        RawRopeMode::LeakyReRope {
            window: 16,
            leak: 8.0,
        },
        // A window as long as the keys (nothing outside) and longer.
        RawRopeMode::ReRope { window: 120 },
        RawRopeMode::ReRope { window: 1000 },
    ];
    for mode in modes {
        for mask in [
            MaskSpec::causal(),
            MaskSpec::causal_window(0),
            MaskSpec::causal_window(20),
            MaskSpec::causal_window(64),
        ] {
            let (mut args, rope) = ok_args(mode);
            args.options.mask = mask;
            args.validate_rope(&rope)
                .unwrap_or_else(|e| panic!("{mode:?} {mask:?}: {e}"));
            args.options.deterministic = true;
            args.validate_rope(&rope)
                .unwrap_or_else(|e| panic!("{mode:?} {mask:?}, deterministic: {e}"));
        }
    }
}

#[test]
fn the_mask_is_the_rope_forwards() {
    for mask in [
        MaskSpec::none(),
        MaskSpec::sliding_window(Some(10), Some(10)),
        MaskSpec {
            sink_tokens: 4,
            ..MaskSpec::causal_window(20)
        },
    ] {
        let (mut args, rope) = ok_args(RE);
        args.options.mask = mask;
        let e = args.validate_rope(&rope).unwrap_err();
        assert!(
            matches!(e, Error::InvalidMask { arg: "mask", .. }),
            "{mask:?}: {e}"
        );
    }
}

#[test]
fn the_workspace_must_hold_every_part() {
    let (mut args, rope) = ok_args(RE);
    args.workspace_bytes -= 1;
    let e = args.validate_rope(&rope).unwrap_err();
    assert!(
        matches!(e, Error::InvalidArgument { arg: "workspace_bytes", ref expected, .. }
            if expected.contains("rope_backward_workspace_bytes")),
        "{e}"
    );
    // Enough for the exact backward alone is not enough.
    let (mut args, rope) = ok_args(RawRopeMode::Rope);
    args.workspace_bytes = backward_workspace_bytes(&args.q_layout, false).unwrap();
    assert!(args.validate_rope(&rope).is_err());
}

#[test]
fn key_workspaces_overlap_nothing() {
    // k_rot over each tensor the call writes or reads.
    for (ptr, other) in [
        (DQ, "dq"),
        (DK, "dk"),
        (DV, "dv"),
        (DO, "dout"),
        (WS, "workspace"),
        (Q, "q"),
        (K, "k"),
        (V, "v"),
        (O, "o"),
    ] {
        let (args, mut rope) = ok_args(RE);
        rope.k_rot = ptr + 64;
        let e = args.validate_rope(&rope).unwrap_err();
        assert!(
            matches!(e, Error::Aliasing { output: "rope.k_rot", other: o } if o == other),
            "k_rot over {other}: {e}"
        );
    }
    let (args, mut rope) = ok_args(RE);
    rope.k_alt = LSE;
    let e = args.validate_rope(&rope).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Aliasing {
                output: "rope.k_alt",
                other: "lse"
            }
        ),
        "{e}"
    );
    let (args, mut rope) = ok_args(RE);
    rope.k_alt = KROT + 128;
    let e = args.validate_rope(&rope).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Aliasing {
                output: "rope.k_alt",
                ..
            }
        ),
        "{e}"
    );
    // Two-sided modes need k_alt.
    let (args, mut rope) = ok_args(RE);
    rope.k_alt = 0;
    let e = args.validate_rope(&rope).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Misaligned {
                arg: "rope.k_alt",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn the_whole_workspace_overlaps_nothing() {
    // Past the exact backward's part (which RawBackward::validate checks): the rotated queries
    // and the outside half's gradients.
    for (name, at) in [("q", 0usize), ("dq", 1), ("v", 2), ("lse", 3)] {
        let (mut args, rope) = ok_args(RE);
        let exact = backward_workspace_bytes(&args.q_layout, false).unwrap();
        let inside = WS + (exact as u64).next_multiple_of(256) + 4096 * at as u64;
        match name {
            "q" => args.q = inside,
            "dq" => args.dq = inside,
            "v" => args.v = inside,
            _ => args.lse = inside,
        }
        let e = args.validate_rope(&rope).unwrap_err();
        assert!(
            matches!(e, Error::Aliasing { output: "workspace", other } if other == name),
            "{name} inside the workspace: {e}"
        );
    }
}

#[test]
fn the_exact_backwards_checks_apply() {
    // A head dim the backward has no kernel for.
    let (mut args, mut rope) = ok_args(RE);
    for l in [
        &mut args.q_layout,
        &mut args.o_layout,
        &mut args.dout_layout,
        &mut args.dq_layout,
    ] {
        *l = Layout::bshd(2, 100, 4, 96);
    }
    for l in [
        &mut args.k_layout,
        &mut args.v_layout,
        &mut args.dk_layout,
        &mut args.dv_layout,
    ] {
        *l = Layout::bshd(2, 120, 2, 96);
    }
    rope.rotary_dim = 96;
    let e = args.validate_rope(&rope).unwrap_err();
    assert!(matches!(e, Error::UnsupportedHeadDim { .. }), "{e}");
    // A gradient over an input.
    let (mut args, rope) = ok_args(RE);
    args.dk = V;
    let e = args.validate_rope(&rope).unwrap_err();
    assert!(matches!(e, Error::Aliasing { output: "dk", .. }), "{e}");
    // A rotation wider than the head.
    let (args, mut rope) = ok_args(RE);
    rope.rotary_dim = 66;
    let e = args.validate_rope(&rope).unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidArgument {
                arg: "rope.rotary_dim",
                ..
            }
        ),
        "{e}"
    );
    // A Leaky ReRoPE leak at or below 1.
    let (args, rope) = ok_args(RawRopeMode::LeakyReRope {
        window: 16,
        leak: 1.0,
    });
    let e = args.validate_rope(&rope).unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidArgument {
                arg: "rope.leak",
                ..
            }
        ),
        "{e}"
    );
}
