//! The decoding forward's host side: the split plan (every key covered once, aligned splits, no
//! empty split of its own choosing, the caller's count kept, the workspace it implies) and the validation of the raw
//! arguments (typed errors naming the argument), without a GPU.

use longflash::attention::decode::{DecodeOptions, DecodeProblem, RawDecode};
use longflash::attention::{RawRope, RawRopeMode};
use longflash::layout::Layout;

use super::*;

fn problem(batch: usize, seqlen_q: usize, heads: (usize, usize), keys: usize) -> DecodeProblem {
    DecodeProblem {
        batch,
        seqlen_q,
        heads_q: heads.0,
        heads_kv: heads.1,
        head_dim: 128,
        max_seqlen_k: keys,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn split_plan_covers_every_key_once(
        batch in 1usize..300,
        seqlen_q in 1usize..20,
        heads in prop_oneof![Just((1usize, 1usize)), Just((32, 8)), Just((9, 3)), Just((64, 64))],
        keys in prop_oneof![1usize..300, 1usize..2_000_000],
        wave in prop_oneof![Just(1usize), Just(108), Just(264)],
        asked in prop_oneof![Just(None), (1usize..2000).prop_map(Some)],
    ) {
        let p = problem(batch, seqlen_q, heads, keys).plan(wave, asked);
        prop_assert!(p.num_splits >= 1);
        prop_assert_eq!(p.keys_per_split % 64, 0);
        // The splits cover the keys; the plan's own splits all hold keys.
        prop_assert!(p.num_splits * p.keys_per_split >= keys);
        if asked.is_none() {
            prop_assert!((p.num_splits - 1) * p.keys_per_split < keys);
        }
        let group = heads.0 / heads.1;
        prop_assert_eq!(p.row_blocks, (seqlen_q * group).div_ceil(16));
        if let Some(a) = asked {
            // The caller's count, unless it asks for more splits than 64-key chunks.
            prop_assert_eq!(p.num_splits, a.min(keys.div_ceil(64)));
        } else {
            prop_assert!(p.num_splits <= 256);
            let ctas = batch * heads.1 * p.row_blocks;
            prop_assert!(p.num_splits == 1 || ctas * p.num_splits <= wave);
            prop_assert!(p.num_splits == 1 || p.keys_per_split >= 256);
        }
        // Partial outputs and LSEs of every split, and a counter per (row block, sequence, KV
        // head).
        let want_ws = if p.num_splits > 1 {
            (p.num_splits * batch * seqlen_q * heads.0 * 129 + batch * heads.1 * p.row_blocks) * 4
        } else {
            0
        };
        prop_assert_eq!(p.workspace_bytes, want_ws);
    }
}

#[test]
fn split_plan_fills_one_wave_when_the_grid_is_small() {
    // One sequence, 8 KV heads, one token: 8 CTAs without splits; a long cache is split until
    // the grid fills one wave of 264 CTAs (132 SMs holding 2 each), and not past it.
    let p = problem(1, 1, (32, 8), 131_072).plan(264, None);
    assert_eq!(p.num_splits * 8, 264, "{p:?}");
    // 32 CTAs: 8 splits make 256, one wave; 9 would spill into a second.
    let p = problem(4, 1, (32, 8), 131_075).plan(264, None);
    assert_eq!(p.num_splits, 8, "{p:?}");
    // A batch that already fills the device is not split.
    let p = problem(256, 1, (32, 8), 131_072).plan(264, None);
    assert_eq!(p.num_splits, 1, "{p:?}");
    // A short cache is not cut below 256 keys per split.
    let p = problem(1, 1, (32, 8), 1000).plan(264, None);
    assert_eq!(p.num_splits, 3, "{p:?}");
}

/// A valid paged call at placeholder addresses (nothing is launched by validate).
fn base() -> RawDecode {
    RawDecode {
        dtype: longflash::DType::Bf16,
        q: 1 << 30,
        k: 2 << 30,
        v: 3 << 30,
        o: 4 << 30,
        lse: 0,
        q_layout: Layout::bshd(2, 1, 8, 64),
        k_layout: Layout::bshd(16, 32, 2, 64),
        v_layout: Layout::bshd(16, 32, 2, 64),
        o_layout: Layout::bshd(2, 1, 8, 64),
        block_table: 5 << 30,
        max_pages_per_seq: 8,
        cache_seqlens: 6 << 30,
        error_flag: 0,
        options: DecodeOptions {
            num_splits: Some(1),
            ..DecodeOptions::default()
        },
        workspace: 0,
        workspace_bytes: 0,
        split_counters: 0,
        split_counters_len: 0,
    }
}

fn refused(a: RawDecode, arg: &str) {
    match a.validate(132) {
        Ok(_) => panic!("{arg}: accepted"),
        Err(e) => assert!(e.to_string().contains(arg), "{arg}: {e}"),
    }
}

#[test]
fn raw_decode_validation() {
    let (params, plan) = base().validate(132).unwrap();
    assert_eq!(plan.num_splits, 1);
    assert_eq!(params.page_size, 32);
    assert_eq!(params.page_shift, 5);
    assert_eq!(params.num_pages, 16);
    assert_eq!(params.mask.seqlen_k, 8 * 32);
    // Contiguous: the cache's own length is the capacity, its batch the query batch.
    let contiguous = RawDecode {
        block_table: 0,
        k_layout: Layout::bshd(2, 100, 2, 64),
        v_layout: Layout::bshd(2, 100, 2, 64),
        ..base()
    };
    let (params, _) = contiguous.validate(132).unwrap();
    assert_eq!((params.page_size, params.mask.seqlen_k), (100, 100));
    refused(
        RawDecode {
            k_layout: Layout::bshd(3, 100, 2, 64),
            v_layout: Layout::bshd(3, 100, 2, 64),
            ..contiguous
        },
        "k.batch",
    );

    let pages = |n: usize, ps: usize| RawDecode {
        k_layout: Layout::bshd(n, ps, 2, 64),
        v_layout: Layout::bshd(n, ps, 2, 64),
        ..base()
    };
    refused(pages(16, 24), "k.seqlen");
    refused(pages(16, 8), "k.seqlen");
    refused(
        RawDecode {
            max_pages_per_seq: 0,
            ..base()
        },
        "max_pages_per_seq",
    );
    refused(
        RawDecode {
            max_pages_per_seq: 1 << 30,
            ..base()
        },
        "max_pages_per_seq",
    );
    let with = |options: DecodeOptions| RawDecode { options, ..base() };
    refused(
        with(DecodeOptions {
            max_seqlen_k: Some(8 * 32 + 1),
            ..DecodeOptions::default()
        }),
        "max_seqlen_k",
    );
    refused(
        with(DecodeOptions {
            max_seqlen_k: Some(0),
            ..DecodeOptions::default()
        }),
        "max_seqlen_k",
    );
    refused(
        with(DecodeOptions {
            num_splits: Some(0),
            ..DecodeOptions::default()
        }),
        "num_splits",
    );
    refused(
        with(DecodeOptions {
            mask: MaskSpec {
                sink_tokens: 4,
                ..MaskSpec::causal_window(8)
            },
            ..DecodeOptions::default()
        }),
        "sink_tokens",
    );
    refused(
        with(DecodeOptions {
            softmax_scale: Some(-1.0),
            ..DecodeOptions::default()
        }),
        "softmax_scale",
    );
    // Several splits need a workspace of the plan's size, apart from the other buffers.
    let split = with(DecodeOptions {
        num_splits: Some(3),
        ..DecodeOptions::default()
    });
    refused(split, "workspace_bytes");
    let need = split.validate(132).map(|_| ()).unwrap_err();
    assert!(
        matches!(
            need,
            Error::InvalidArgument {
                arg: "workspace_bytes",
                ..
            }
        ),
        "{need}"
    );
    let ws = 7u64 << 30;
    let plan = DecodeProblem {
        batch: 2,
        seqlen_q: 1,
        heads_q: 8,
        heads_kv: 2,
        head_dim: 64,
        max_seqlen_k: 256,
    }
    .plan(132, Some(3));
    let ok = RawDecode {
        workspace: ws,
        workspace_bytes: plan.workspace_bytes,
        ..split
    };
    let (params, p) = ok.validate(132).unwrap();
    assert_eq!(p, plan);
    assert_eq!(params.partial_o as u64, ws);
    assert_eq!(
        params.partial_lse as u64,
        ws + (3 * 2 * 8 * 64 * 4) as u64,
        "partial LSEs follow the partial outputs"
    );
    refused(
        RawDecode {
            workspace_bytes: plan.workspace_bytes - 1,
            ..ok
        },
        "workspace_bytes",
    );
    refused(
        RawDecode {
            workspace: ws + 8,
            ..ok
        },
        "workspace.ptr",
    );
    refused(
        RawDecode {
            workspace: 1 << 30,
            ..ok
        },
        "workspace",
    );
    // Counters the caller keeps: used instead of the workspace's, enough of them, aligned, apart
    // from every tensor, the workspace and the device indices.
    assert_eq!(plan.counters, 2 * 2, "one counter per (sequence, KV head)");
    let counters = 8u64 << 30;
    let kept = RawDecode {
        split_counters: counters,
        split_counters_len: plan.counters,
        ..ok
    };
    let (params, _) = kept.validate(132).unwrap();
    assert_eq!(params.split_counters as u64, counters);
    let (params, _) = ok.validate(132).unwrap();
    assert_eq!(
        params.split_counters as u64,
        ws + (plan.workspace_bytes - 4 * plan.counters) as u64,
        "without them, the counters end the workspace"
    );
    refused(
        RawDecode {
            split_counters_len: plan.counters - 1,
            ..kept
        },
        "split_counters_len",
    );
    refused(
        RawDecode {
            split_counters: counters + 2,
            ..kept
        },
        "split_counters.ptr",
    );
    for (at, other) in [
        (4u64 << 30, "o"),
        (ws + 64, "workspace"),
        (2 << 30, "k"),
        (6 << 30, "cache_seqlens"),
    ] {
        match (RawDecode {
            split_counters: at,
            ..kept
        })
        .validate(132)
        {
            Err(Error::Aliasing { output, other: o }) => {
                assert!(
                    (output, o) == ("split_counters", other)
                        || (o, output) == ("split_counters", other),
                    "{output} / {o}"
                )
            }
            r => panic!("counters at {other}: {:?}", r.map(|(_, p)| p)),
        }
    }
    // One split has no counters: a short or absent count is fine then.
    assert!(RawDecode {
        split_counters: counters,
        split_counters_len: 0,
        ..base()
    }
    .validate(132)
    .is_ok());

    // Shapes, heads, head dims, alignment, aliasing.
    refused(
        RawDecode {
            q_layout: Layout::bshd(2, 1, 6, 64),
            o_layout: Layout::bshd(2, 1, 6, 64),
            k_layout: Layout::bshd(16, 32, 4, 64),
            v_layout: Layout::bshd(16, 32, 4, 64),
            ..base()
        },
        "heads",
    );
    refused(
        RawDecode {
            q_layout: Layout::bshd(2, 1, 8, 96),
            o_layout: Layout::bshd(2, 1, 8, 96),
            ..base()
        },
        "head_dim",
    );
    refused(
        RawDecode {
            v_layout: Layout::bshd(16, 64, 2, 64),
            ..base()
        },
        "v.seqlen",
    );
    refused(
        RawDecode {
            k: (2 << 30) + 8,
            ..base()
        },
        "k.ptr",
    );
    refused(
        RawDecode {
            block_table: (5 << 30) + 2,
            ..base()
        },
        "block_table.ptr",
    );
    refused(
        RawDecode {
            o: 1 << 30,
            ..base()
        },
        "o",
    );
    refused(
        RawDecode {
            lse: 2 << 30,
            ..base()
        },
        "lse",
    );
    // Capacities and splits stay within the kernels' 32-bit key indices.
    refused(
        RawDecode {
            k_layout: Layout::bshd(8, 16, 2, 64),
            v_layout: Layout::bshd(8, 16, 2, 64),
            max_pages_per_seq: 134_217_727,
            ..base()
        },
        "max_pages_per_seq",
    );
    assert_eq!(
        longflash::attention::decode::MAX_CACHE_KEYS,
        (i32::MAX as usize) & !63
    );
    // The outputs must not overlap the device indices.
    refused(
        RawDecode {
            block_table: (4 << 30) + 64,
            ..base()
        },
        "`o` overlaps `block_table`",
    );
    refused(
        RawDecode {
            error_flag: 4 << 30,
            ..base()
        },
        "`o` overlaps `error_flag`",
    );
    refused(
        RawDecode {
            q_layout: Layout::bshd(1, 1, 70_000, 64),
            o_layout: Layout::bshd(1, 1, 70_000, 64),
            k_layout: Layout::bshd(16, 32, 70_000, 64),
            v_layout: Layout::bshd(16, 32, 70_000, 64),
            ..base()
        },
        "q.heads",
    );
    // The grid: (sequence, KV head) pairs on one dimension.
    refused(
        RawDecode {
            q_layout: Layout::bshd(40_000, 1, 8, 64),
            o_layout: Layout::bshd(40_000, 1, 8, 64),
            ..base()
        },
        "q.batch",
    );
}

/// RoPE decoding's own checks: a causal mask, no key workspaces, a valid rotation.
#[test]
fn raw_rope_decode_validation() {
    let causal = RawDecode {
        options: DecodeOptions {
            mask: MaskSpec::causal(),
            num_splits: Some(1),
            ..DecodeOptions::default()
        },
        ..base()
    };
    let rope = RawRope {
        inv_freq: 8 << 30,
        position_offsets: 0,
        k_rot: 0,
        k_alt: 0,
        rotary_dim: 64,
        interleaved: false,
        mode: RawRopeMode::ReRope { window: 512 },
        attention_factor: 1.0,
        log_n_train_len: None,
    };
    let (p, plan) = causal.validate_rope(264, &rope).unwrap();
    assert!(!plan.prefill);
    assert_eq!(
        (p.rope.mode, p.rope.window, p.rope.rotary_dim),
        (1, 512, 64)
    );
    assert!(p.rope.k_rot.is_null() && p.rope.k_alt.is_null());
    assert_eq!(p.base.mask.window_right, 0);
    let refused = |a: &RawDecode, r: &RawRope, arg: &str| match a.validate_rope(264, r) {
        Ok(_) => panic!("{arg}: accepted"),
        Err(e) => assert!(e.to_string().contains(arg), "{arg}: {e}"),
    };
    refused(&base(), &rope, "mask.causal");
    refused(
        &causal,
        &RawRope {
            k_rot: 9 << 30,
            ..rope
        },
        "rope.k_rot",
    );
    refused(
        &causal,
        &RawRope {
            rotary_dim: 66,
            ..rope
        },
        "rope.rotary_dim",
    );
    refused(
        &causal,
        &RawRope {
            mode: RawRopeMode::LeakyReRope {
                window: 8,
                leak: 1.0,
            },
            ..rope
        },
        "rope.leak",
    );
    refused(
        &causal,
        &RawRope {
            inv_freq: 0,
            ..rope
        },
        "rope.inv_freq",
    );
}

/// From 64 query tokens per sequence, without a fixed split count, a plain decoding call runs
/// the chunked-prefill kernel: one split, no workspace.
#[test]
fn many_queries_take_the_prefill_kernel() {
    let many = |seqlen_q: usize, num_splits: Option<usize>| RawDecode {
        q_layout: Layout::bshd(2, seqlen_q, 8, 64),
        o_layout: Layout::bshd(2, seqlen_q, 8, 64),
        options: DecodeOptions {
            num_splits,
            ..DecodeOptions::default()
        },
        ..base()
    };
    let (_, p) = many(64, None).validate(264).unwrap();
    assert!(
        p.prefill && p.num_splits == 1 && p.workspace_bytes == 0,
        "{p:?}"
    );
    let (_, p) = many(63, None).validate(264).unwrap();
    assert!(!p.prefill, "{p:?}");
    let (_, p) = many(200, Some(1)).validate(264).unwrap();
    assert!(!p.prefill, "{p:?}");
}

/// Narrow heads (multiples of 4 below a tile width) decode in padded kernels whose rows need only
/// be 8-byte aligned; other head dims are refused.
#[test]
fn narrow_head_dims_decode() {
    let with_dim = |d: usize| RawDecode {
        q_layout: Layout::bshd(2, 1, 8, d),
        o_layout: Layout::bshd(2, 1, 8, d),
        k_layout: Layout::bshd(16, 32, 2, d),
        v_layout: Layout::bshd(16, 32, 2, d),
        ..base()
    };
    for d in [4, 80, 96, 100, 112, 160, 192, 252] {
        let (p, plan) = with_dim(d)
            .validate(264)
            .unwrap_or_else(|e| panic!("{d}: {e}"));
        assert_eq!(p.head_dim, d as i32);
        assert!((p.softmax_scale - 1.0 / (d as f32).sqrt()).abs() < 1e-7);
        assert_eq!(plan.workspace_bytes, 0);
    }
    for d in [2, 6, 102, 260] {
        let e = with_dim(d).validate(264).unwrap_err();
        assert!(e.to_string().contains("q.head_dim"), "{d}: {e}");
    }
    // A 100-element head's rows are 200 bytes: 8-byte aligned pointers and strides suffice.
    let mut a = with_dim(100);
    a.q = (1 << 30) + 8;
    assert!(a.validate(264).is_ok());
    a.q = (1 << 30) + 4;
    refused(a, "q.ptr");
    // Splits lay the partial outputs out at the head's own width.
    let split = RawDecode {
        options: DecodeOptions {
            num_splits: Some(2),
            ..DecodeOptions::default()
        },
        workspace: 7 << 30,
        workspace_bytes: 1 << 20,
        ..with_dim(100)
    };
    let (p, plan) = split.validate(264).unwrap();
    // Two splits of 2 sequences x 8 heads, then a counter per (sequence, KV head): 2 x 2.
    assert_eq!(plan.workspace_bytes, (2 * 2 * 8 * (100 + 1) + 2 * 2) * 4);
    assert_eq!(
        p.partial_lse as u64 - p.partial_o as u64,
        (2 * 2 * 8 * 100 * 4) as u64
    );
    assert_eq!(
        p.split_counters as u64 - p.partial_lse as u64,
        (2 * 2 * 8 * 4) as u64
    );
}
