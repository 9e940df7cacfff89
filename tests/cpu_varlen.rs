//! The variable-length forward's arguments: every bad one is a typed error from
//! `RawVarlenForward::validate` (which the safe and raw entry points run before any launch),
//! and a valid call lowers to the kernel's parameters with the sequences' maximum lengths in the
//! mask. CPU only; the kernel's own clamping of device prefix sums is tested on the GPU.

use longflash::{
    DType, Error, ForwardOptions, Layout, MaskSpec, RawBlockMask, RawForward, RawVarlenForward,
};

fn ok_args() -> RawVarlenForward {
    // Three sequences packed into 300 query rows and 420 key rows.
    let q = Layout::bshd(1, 300, 4, 128);
    let kv = Layout::bshd(1, 420, 2, 128);
    RawVarlenForward {
        forward: RawForward {
            dtype: DType::Bf16,
            q: 0x10_0000,
            k: 0x20_0000,
            v: 0x30_0000,
            o: 0x40_0000,
            lse: 0x50_0000,
            q_layout: q,
            k_layout: kv,
            v_layout: kv,
            o_layout: q,
            options: ForwardOptions::causal(),
            block_mask: None,
        },
        cu_seqlens_q: 0x60_0000,
        cu_seqlens_k: 0x70_0000,
        batch: 3,
        max_seqlen_q: 150,
        max_seqlen_k: 200,
        error_flag: 0,
    }
}

/// An edit of the valid arguments that makes one of them bad.
type Edit = Box<dyn Fn(&mut RawVarlenForward)>;

fn arg_of(e: Error) -> &'static str {
    match e {
        Error::InvalidArgument { arg, .. } | Error::Misaligned { arg, .. } => arg,
        other => panic!("unexpected error {other:?}"),
    }
}

#[test]
fn valid_arguments_lower_to_kernel_params() {
    let p = ok_args().validate().unwrap();
    assert_eq!((p.total_q, p.total_k), (300, 420));
    assert_eq!((p.fwd.batch, p.fwd.heads_q, p.fwd.heads_kv), (3, 4, 2));
    assert_eq!((p.fwd.mask.seqlen_q, p.fwd.mask.seqlen_k), (150, 200));
    assert_eq!((p.fwd.mask.window_left, p.fwd.mask.window_right), (-1, 0));
    assert_eq!(p.cu_seqlens_q as u64, 0x60_0000);
    assert_eq!(p.cu_seqlens_k as u64, 0x70_0000);
    assert!(p.error_flag.is_null());
    assert_eq!(p.fwd.q_row_stride, 4 * 128);
    let mut a = ok_args();
    a.error_flag = 0x80_0000;
    assert_eq!(a.validate().unwrap().error_flag as u64, 0x80_0000);
}

#[test]
fn bad_arguments_name_themselves() {
    let cases: Vec<(&str, Edit)> = vec![
        (
            "q.batch",
            Box::new(|a| a.forward.q_layout = Layout::bshd(2, 150, 4, 128)),
        ),
        (
            "k.batch",
            Box::new(|a| a.forward.k_layout = Layout::bshd(2, 210, 2, 128)),
        ),
        ("batch", Box::new(|a| a.batch = 0)),
        ("batch", Box::new(|a| a.batch = 65536)),
        ("max_seqlen_q", Box::new(|a| a.max_seqlen_q = 0)),
        ("max_seqlen_q", Box::new(|a| a.max_seqlen_q = 301)),
        ("max_seqlen_k", Box::new(|a| a.max_seqlen_k = 0)),
        ("max_seqlen_k", Box::new(|a| a.max_seqlen_k = 421)),
        ("cu_seqlens_q.ptr", Box::new(|a| a.cu_seqlens_q = 0)),
        ("cu_seqlens_k.ptr", Box::new(|a| a.cu_seqlens_k = 0x70_0002)),
        ("error_flag.ptr", Box::new(|a| a.error_flag = 0x80_0001)),
        (
            "forward.block_mask",
            Box::new(|a| {
                a.forward.block_mask = Some(RawBlockMask {
                    row_offsets: 0x90_0000,
                    col_indices: 0xa0_0000,
                    full: 0xb0_0000,
                    batch: 1,
                    heads: 1,
                })
            }),
        ),
    ];
    for (want, edit) in cases {
        let mut a = ok_args();
        edit(&mut a);
        let e = a.validate().unwrap_err();
        assert_eq!(arg_of(e), want);
    }
}

#[test]
fn the_dense_checks_still_apply() {
    // Head dims, masks and scales go through RawForward::validate.
    let mut a = ok_args();
    a.forward.q_layout = Layout::bshd(1, 300, 4, 102);
    a.forward.o_layout = a.forward.q_layout;
    assert!(matches!(
        a.validate().unwrap_err(),
        Error::InvalidArgument {
            arg: "q.head_dim",
            ..
        }
    ));
    let mut a = ok_args();
    a.forward.options.mask = MaskSpec {
        causal: true,
        window_right: Some(3),
        ..MaskSpec::none()
    };
    assert!(matches!(
        a.validate().unwrap_err(),
        Error::InvalidMask { .. }
    ));
    let mut a = ok_args();
    a.forward.options.softmax_scale = Some(-1.0);
    assert_eq!(arg_of(a.validate().unwrap_err()), "options.softmax_scale");
}
