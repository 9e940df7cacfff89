//! Memory attention's raw arguments: the parameters `RawMemory::validate` lowers (which
//! `forward_memory_raw` launches with), and every class of bad argument as a typed error before
//! any launch; the same for the top-k selection (`RawMemorySelect::validate`). CPU only.

use longflash::attention::MAX_TOP_K;
use longflash::{
    DType, Error, ForwardOptions, Layout, MaskSpec, RawForward, RawMemory, RawMemorySelect,
    RawRope, RawRopeMode,
};

const MIB: u64 = 1 << 20;
const Q: u64 = 0x100 * MIB;
const K: u64 = 0x200 * MIB;
const V: u64 = 0x300 * MIB;
const O: u64 = 0x400 * MIB;
const LSE: u64 = 0x500 * MIB;
const MK: u64 = 0x600 * MIB;
const MV: u64 = 0x700 * MIB;
const MASK: u64 = 0x800 * MIB;
const KROT: u64 = 0x900 * MIB;
const FREQ: u64 = 0xa00 * MIB;

fn ok_args(d: usize) -> (RawForward, RawMemory, RawRope) {
    let ql = Layout::bshd(2, 100, 4, d);
    let kl = Layout::bshd(2, 120, 2, d);
    let ml = Layout::bshd(2, 1000, 2, d);
    let fwd = RawForward {
        dtype: DType::Bf16,
        q: Q,
        k: K,
        v: V,
        o: O,
        lse: LSE,
        q_layout: ql,
        k_layout: kl,
        v_layout: kl,
        o_layout: ql,
        options: ForwardOptions::causal(),
        block_mask: None,
    };
    let mem = RawMemory {
        keys: MK,
        values: MV,
        mask: MASK,
        keys_layout: ml,
        values_layout: ml,
        workspace: 0,
        workspace_bytes: 0,
    };
    let rope = RawRope {
        inv_freq: FREQ,
        position_offsets: 0,
        k_rot: KROT,
        k_alt: 0,
        rotary_dim: d,
        interleaved: false,
        mode: RawRopeMode::Rope,
        attention_factor: 1.0,
        log_n_train_len: None,
    };
    (fwd, mem, rope)
}

#[test]
fn valid_calls_lower_to_the_kernel_parameters() {
    for d in [64, 100, 128] {
        let (fwd, mem, rope) = ok_args(d);
        let p = mem.validate(&fwd, Some(&rope)).unwrap();
        assert_eq!(p.mem_len, 1000);
        assert_eq!(p.rotate, 1);
        assert_eq!(p.rope.k_rot as u64, KROT);
        assert!(p.rope.k_alt.is_null());
        assert_eq!(p.rope.mode, 0);
        assert_eq!(
            (p.mem_k as u64, p.mem_v as u64, p.mem_mask as u64),
            (MK, MV, MASK)
        );
        assert_eq!(p.mem_k_row_stride, (2 * d) as i64);
        assert_eq!(p.mem_k_batch_stride, (1000 * 2 * d) as i64);
        assert_eq!(p.mem_v_head_stride, d as i64);
        assert_eq!(p.fwd.mask.window_right, 0, "the local part is causal");
        let p = mem.validate(&fwd, None).unwrap();
        assert_eq!(p.rotate, 0);
        // No mask, and an empty memory (pointers may then be null).
        let unmasked = RawMemory { mask: 0, ..mem };
        assert!(unmasked.validate(&fwd, None).unwrap().mem_mask.is_null());
        let empty = RawMemory {
            keys: 0,
            values: 0,
            mask: 0,
            keys_layout: Layout::bshd(2, 0, 2, d),
            values_layout: Layout::bshd(2, 0, 2, d),
            workspace: 0,
            workspace_bytes: 0,
        };
        assert_eq!(empty.validate(&fwd, Some(&rope)).unwrap().mem_len, 0);
    }
}

#[test]
fn bad_arguments_are_typed_errors() {
    let (fwd, mem, rope) = ok_args(64);
    let err = |f: &RawForward, m: &RawMemory, r: Option<&RawRope>| m.validate(f, r).unwrap_err();

    // The local part: causal only, no block mask, a head dim with a memory kernel.
    let dense = RawForward {
        options: ForwardOptions::dense(),
        ..fwd
    };
    assert!(matches!(
        err(&dense, &mem, None),
        Error::InvalidMask {
            arg: "mask.causal",
            ..
        }
    ));
    let windowed = RawForward {
        options: ForwardOptions::causal().with_mask(MaskSpec::causal_window(16)),
        ..fwd
    };
    assert!(mem.validate(&windowed, None).is_ok());
    for d in [32, 256, 132] {
        let (f, m, _) = ok_args(d);
        assert!(
            matches!(
                err(&f, &m, None),
                Error::InvalidArgument {
                    arg: "q.head_dim",
                    ..
                }
            ),
            "head dim {d}"
        );
    }

    // The memory's shape against the call.
    let wrong = |l: Layout| RawMemory {
        keys_layout: l,
        ..mem
    };
    for (l, arg) in [
        (Layout::bshd(1, 1000, 2, 64), "memory.keys.batch"),
        (Layout::bshd(2, 1000, 4, 64), "memory.keys.heads"),
        (Layout::bshd(2, 999, 2, 64), "memory.values.seqlen"),
    ] {
        match err(&fwd, &wrong(l), None) {
            Error::ShapeMismatch { arg: a, .. } => assert_eq!(a, arg),
            e => panic!("{arg}: {e:?}"),
        }
    }
    let wrong_v = RawMemory {
        values_layout: Layout::bshd(2, 1000, 2, 128),
        ..mem
    };
    assert!(matches!(
        err(&fwd, &wrong_v, None),
        Error::ShapeMismatch {
            arg: "memory.values.head_dim",
            ..
        }
    ));

    // Alignment of pointers and strides, and null pointers for a memory that has entries.
    for m in [
        RawMemory {
            keys: MK + 8,
            ..mem
        },
        RawMemory {
            values: MV + 2,
            ..mem
        },
        RawMemory { keys: 0, ..mem },
    ] {
        assert!(
            matches!(err(&fwd, &m, None), Error::Misaligned { .. }),
            "{m:?}"
        );
    }
    let strided = RawMemory {
        keys_layout: Layout {
            seq_stride: 132,
            ..mem.keys_layout
        },
        ..mem
    };
    assert!(matches!(
        err(&fwd, &strided, None),
        Error::Misaligned {
            arg: "memory.keys.seq_stride",
            ..
        }
    ));

    // Outputs that overlap the memory.
    let into_keys = RawForward { o: MK, ..fwd };
    assert!(matches!(
        err(&into_keys, &mem, None),
        Error::Aliasing {
            output: "o",
            other: "memory.keys"
        }
    ));
    let lse_on_mask = RawForward { lse: MASK, ..fwd };
    assert!(matches!(
        err(&lse_on_mask, &mem, None),
        Error::Aliasing {
            output: "lse",
            other: "memory.mask"
        }
    ));

    // The rotation: plain RoPE only, an aligned workspace of its own.
    let rerope = RawRope {
        mode: RawRopeMode::ReRope { window: 8 },
        ..rope
    };
    assert!(matches!(
        err(&fwd, &mem, Some(&rerope)),
        Error::InvalidArgument {
            arg: "rope.mode",
            ..
        }
    ));
    for (k_rot, want) in [
        (MASK, "memory.mask"),
        (FREQ, "rope.inv_freq"),
        (KROT + 4, "misaligned"),
        (0, "misaligned"),
        (MV, "memory.values"),
        (Q, "q"),
    ] {
        let r = RawRope { k_rot, ..rope };
        match (err(&fwd, &mem, Some(&r)), want) {
            (
                Error::Misaligned {
                    arg: "rope.k_rot", ..
                },
                "misaligned",
            ) => {}
            (
                Error::Aliasing {
                    output: "rope.k_rot",
                    other,
                },
                w,
            ) if other == w => {}
            (e, w) => panic!("k_rot {k_rot:#x}: {e:?}, wanted {w}"),
        }
    }
    let odd = RawRope {
        rotary_dim: 63,
        ..rope
    };
    assert!(matches!(
        err(&fwd, &mem, Some(&odd)),
        Error::InvalidArgument {
            arg: "rope.rotary_dim",
            ..
        }
    ));
}

const IDX: u64 = 0xb00 * MIB;
const WS: u64 = 0xc00 * MIB;

fn ok_select(d: usize) -> RawMemorySelect {
    let ql = Layout::bshd(2, 100, 4, d);
    RawMemorySelect {
        dtype: DType::Bf16,
        q: Q,
        q_layout: ql,
        keys: MK,
        keys_layout: Layout::bshd(2, 1000, 2, d),
        mask: MASK,
        top_k: 64,
        indices: IDX,
        workspace: WS,
        workspace_bytes: 2 * 4 * 100 * 4096,
    }
}

/// The top-k selection's parameters: the pointers and strides as given, no output or LSE, the
/// candidate workspace at the documented size (4 KiB per query row).
#[test]
fn select_lowers_its_arguments() {
    for d in [64, 100, 128] {
        let a = ok_select(d);
        let p = a.validate().unwrap_or_else(|e| panic!("d {d}: {e}"));
        assert_eq!(p.q as u64, Q);
        assert_eq!(p.mem_k as u64, MK);
        assert_eq!(p.mem_mask as u64, MASK);
        assert_eq!(p.cand as u64, WS);
        assert_eq!(p.indices as u64, IDX);
        assert!(p.o.is_null() && p.lse.is_null() && p.mem_v.is_null());
        assert_eq!((p.batch, p.heads_q, p.heads_kv), (2, 4, 2));
        assert_eq!(
            (p.seqlen_q, p.head_dim, p.mem_len, p.top_k),
            (100, d as i32, 1000, 64)
        );
        assert_eq!(p.q_row_stride, a.q_layout.seq_stride);
        assert_eq!(p.mem_k_batch_stride, a.keys_layout.batch_stride);
    }
}

/// Every class of bad selection argument is a typed error.
#[test]
fn select_rejects_bad_arguments() {
    let bad = |f: &dyn Fn(&mut RawMemorySelect)| -> Error {
        let mut a = ok_select(64);
        f(&mut a);
        a.validate().expect_err("must be refused")
    };
    let is_arg =
        |e: &Error, name: &str| matches!(e, Error::InvalidArgument { arg, .. } if *arg == name);
    // k: 0, past MAX_TOP_K, past the memory.
    assert!(is_arg(&bad(&|a| a.top_k = 0), "top_k"));
    assert!(is_arg(&bad(&|a| a.top_k = MAX_TOP_K + 1), "top_k"));
    assert!(is_arg(
        &bad(&|a| a.keys_layout = Layout::bshd(2, 63, 2, 64)),
        "top_k"
    ));
    // Shapes: heads that do not divide, another batch, another head dim, an unsupported head
    // dim, empty queries.
    assert!(is_arg(
        &bad(&|a| a.keys_layout = Layout::bshd(2, 1000, 3, 64)),
        "q.heads"
    ));
    assert!(matches!(
        bad(&|a| a.keys_layout = Layout::bshd(1, 1000, 2, 64)),
        Error::ShapeMismatch { .. }
    ));
    assert!(matches!(
        bad(&|a| a.keys_layout = Layout::bshd(2, 1000, 2, 128)),
        Error::ShapeMismatch { .. }
    ));
    assert!(is_arg(
        &bad(&|a| {
            a.q_layout = Layout::bshd(2, 100, 4, 256);
            a.keys_layout = Layout::bshd(2, 1000, 2, 256);
        }),
        "q.head_dim"
    ));
    assert!(matches!(
        bad(&|a| a.q_layout = Layout::bshd(2, 0, 4, 64)),
        Error::ZeroSized { .. }
    ));
    // Alignment, a small workspace, outputs over inputs or each other.
    assert!(matches!(bad(&|a| a.q += 2), Error::Misaligned { .. }));
    assert!(matches!(bad(&|a| a.indices += 2), Error::Misaligned { .. }));
    assert!(matches!(
        bad(&|a| a.workspace += 8),
        Error::Misaligned { .. }
    ));
    assert!(is_arg(&bad(&|a| a.workspace_bytes -= 1), "workspace_bytes"));
    assert!(matches!(
        bad(&|a| a.indices = MK + 64),
        Error::Aliasing {
            output: "indices",
            ..
        }
    ));
    assert!(matches!(
        bad(&|a| a.workspace = Q),
        Error::Aliasing {
            output: "workspace",
            ..
        }
    ));
    assert!(matches!(
        bad(&|a| a.workspace = IDX + 1024),
        Error::Aliasing { .. }
    ));
    assert!(matches!(
        bad(&|a| a.indices = MASK),
        Error::Aliasing { other: "mask", .. }
    ));
}
