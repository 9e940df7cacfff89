//! The Hopper mainloop (wgmma, TMA, warp specialization), dense and block-sparse, against the
//! reference, through an
//! `Attention` with `MainloopChoice::Sm90`: every case asserts that the Hopper kernel ran. On a
//! device that is not compute capability 9.0 these tests print that they skipped (a failure under
//! LONGFLASH_REQUIRE_HOPPER=1).

use longflash::rope::PositionMode;
use longflash::{
    Attention, BlockMask, DType, ForwardOptions, Layout, Mainloop, MainloopChoice, MaskShape,
    MaskSpec, RawBlockMask, RawForward,
};
use proptest::prelude::*;

use crate::common::*;
use crate::corner::arb_corner_case;
use crate::rope::{arb_rope_case, rope_case, run_rope_with, RopeCase};
use crate::sparse::{arb_sparse_case, sparse_case};

/// The Hopper-mainloop `Attention`, or a printed skip and `return`.
macro_rules! hopper_or_skip {
    ($g:expr) => {
        match hopper($g) {
            Some(h) => h,
            None => return,
        }
    };
}

fn hopper(g: &Gpu) -> Option<&Attention> {
    if g.hopper.is_none() {
        let test = std::thread::current()
            .name()
            .unwrap_or("hopper test")
            .to_string();
        assert!(
            !std::env::var("LONGFLASH_REQUIRE_HOPPER").is_ok_and(|v| v == "1"),
            "{test}: LONGFLASH_REQUIRE_HOPPER=1 but the device is compute capability {:?}",
            g.attn.compute_capability()
        );
        say_skipped(&format!("{test} (not a compute capability 9.0 device)"));
    }
    g.hopper.as_ref()
}

/// Runs `c` on the Hopper mainloop, checks it, and checks that the Hopper kernel is the one a call
/// of this shape runs.
fn check_hopper(g: &Gpu, h: &Attention, c: &Case) -> RunResult {
    assert_eq!(mainloop_of(g, h, c), Mainloop::Sm90, "{c:?}");
    let r = run_case_with(g, h, c);
    assert!(r.cmp.passes, "Hopper mainloop, {c:?}\n  {}", r.cmp);
    r
}

/// The name of the Hopper kernel a call of `c`'s shape launches.
fn kernel_of(g: &Gpu, h: &Attention, c: &Case) -> String {
    with_raw_case(g, c, |raw| h.hopper_kernel_for(raw))
        .unwrap_or_else(|e| panic!("{c:?}: {e}"))
        .expect("a Hopper kernel")
}

/// `c` on the Hopper and the sm_80 mainloops: both pass the rule, and they agree to the rule's
/// bound (they round P at the same points; only f32 sums differ).
fn agrees_with_sm80(g: &Gpu, h: &Attention, c: &Case) {
    let a = check_hopper(g, h, c);
    let b = run_case_with(g, &g.sm80, c);
    assert!(b.cmp.passes, "sm80: {}", b.cmp);
    let diff = a
        .out
        .iter()
        .zip(&b.out)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f64, f64::max);
    assert!(
        diff <= a.cmp.bound,
        "sm80 vs sm90 differ by {diff} (bound {})",
        a.cmp.bound
    );
}

#[test]
fn hopper_mainloop_is_chosen_when_able_and_refused_when_asked_and_unable() {
    let g = gpu_or_skip!();
    let h = hopper_or_skip!(g);
    let auto = Attention::new(&g.ctx).unwrap();
    let c = Case::new(DType::Bf16, (1, 256, 256), (2, 1), 128, MaskSpec::causal());
    assert_eq!(mainloop_of(g, h, &c), Mainloop::Sm90);
    assert_eq!(mainloop_of(g, &auto, &c), Mainloop::Sm90);
    assert_eq!(mainloop_of(g, &g.sm80, &c), Mainloop::Sm80);
    // A block mask runs on the Hopper sparse kernel.
    let mut raw = RawForward {
        dtype: DType::Bf16,
        q: 1 << 20,
        k: 2 << 20,
        v: 3 << 20,
        o: 4 << 20,
        lse: 0,
        q_layout: Layout::bshd(1, 256, 2, 128),
        k_layout: Layout::bshd(1, 256, 1, 128),
        v_layout: Layout::bshd(1, 256, 1, 128),
        o_layout: Layout::bshd(1, 256, 2, 128),
        options: ForwardOptions::causal(),
        block_mask: Some(RawBlockMask {
            row_offsets: 5 << 20,
            col_indices: 6 << 20,
            full: 7 << 20,
            batch: 1,
            heads: 1,
        }),
    };
    assert_eq!(h.mainloop_for(&raw).unwrap(), Mainloop::Sm90);
    // The same from a thread that has never had a current context.
    let fresh = std::thread::scope(|s| s.spawn(|| h.mainloop_for(&raw)).join());
    assert_eq!(fresh.expect("no panic").unwrap(), Mainloop::Sm90);
    assert_eq!(auto.mainloop_for(&raw).unwrap(), Mainloop::Sm90);
    // Keys stored last row first (a negative row stride) cannot be a tensor map: asking for the
    // Hopper kernel is then an error that says why, and the default choice runs sm_80.
    raw.block_mask = None;
    raw.k_layout.seq_stride = -128;
    raw.k += 255 * 128 * 2;
    let e = h.mainloop_for(&raw).unwrap_err().to_string();
    assert!(e.contains("positive strides"), "{e}");
    assert_eq!(auto.mainloop_for(&raw).unwrap(), Mainloop::Sm80);
    assert_eq!(g.sm80.mainloop_for(&raw).unwrap(), Mainloop::Sm80);
}

/// With kernels built with LF_SM90_PERSISTENT=1 (and LONGFLASH_TEST_SM90_CTAS set), a grid of 3
/// CTAs computes every one of many work items, each CTA carrying its barriers and K/V ring from
/// item to item; with the default kernels (one item per CTA) asking for it is refused.
#[test]
fn hopper_persistent_grid_runs_every_item_or_is_refused() {
    let g = gpu_or_skip!();
    let _ = hopper_or_skip!(g);
    // The zigzag kernels are persistent by construction (hopper_zigzag_grid_*): here the others.
    let p = Attention::new(&g.ctx)
        .unwrap()
        .with_mainloop(MainloopChoice::Sm90)
        .with_sm90_zigzag(Some(false))
        .with_sm90_persistent(Some(3));
    let cases = [
        Case::new(DType::Bf16, (2, 300, 300), (3, 3), 128, MaskSpec::causal()),
        Case::new(DType::F16, (3, 129, 700), (4, 2), 64, MaskSpec::none()),
        Case::new(
            DType::Bf16,
            (2, 257, 257),
            (2, 1),
            256,
            MaskSpec::causal_window(100),
        ),
        // Items with no key tile (rows past a window's reach) between items with some.
        Case::new(DType::Bf16, (1, 900, 300), (3, 3), 64, MaskSpec::causal()),
    ];
    if std::env::var("LONGFLASH_TEST_SM90_CTAS").is_err() {
        // SAFETY: the buffers live for the call and match the layouts; the call is refused
        // before any launch (an error from the planning).
        let e = with_raw_case(g, &cases[0], |raw| unsafe {
            p.forward_raw(g.stream.cu_stream(), raw)
        })
        .unwrap_err();
        assert!(e.to_string().contains("LF_SM90_PERSISTENT"), "{e}");
        return;
    }
    for c in &cases {
        let r = run_case_with(g, &p, c);
        assert!(r.cmp.passes, "persistent grid, {c:?}\n  {}", r.cmp);
        let r = run_case_with(g, &p, &sparse_case(c.head_dim, (300, 300), c.mask, 0.5));
        assert!(r.cmp.passes, "persistent grid, sparse, {c:?}\n  {}", r.cmp);
    }
    for d in [64, 128] {
        let c = rope_case(d, (300, 300), PositionMode::ReRope { window: 65 });
        let r = run_rope_with(g, &p, &c, None);
        assert!(r.cmp.passes, "persistent grid, {c:?}: {}", r.cmp);
    }
}

#[test]
fn hopper_dense_and_causal_every_dtype_and_head_dim() {
    let g = gpu_or_skip!();
    let h = hopper_or_skip!(g);
    // Short calls take the zigzag grid by default: the one-item grid too.
    let one_item = &hopper_with_zigzag(g, Some(false), None);
    for h in [h, one_item] {
        for dtype in DTYPES {
            for d in DIMS {
                for mask in [MaskSpec::none(), MaskSpec::causal()] {
                    check_hopper(g, h, &Case::new(dtype, (2, 257, 257), (3, 3), d, mask));
                }
            }
        }
    }
}

#[test]
fn hopper_single_token_and_tile_edges() {
    let g = gpu_or_skip!();
    let h = hopper_or_skip!(g);
    for d in DIMS {
        for (sq, sk) in [
            (1, 1),
            (1, 200),
            (200, 1),
            (63, 65),
            (64, 64),
            (127, 129),
            (128, 128),
            (129, 127),
            (255, 257),
            (31, 700),
            (700, 31),
        ] {
            for mask in [MaskSpec::none(), MaskSpec::causal()] {
                check_hopper(g, h, &Case::new(DType::Bf16, (1, sq, sk), (2, 1), d, mask));
            }
        }
    }
}

#[test]
fn hopper_sliding_windows_gqa_and_layouts() {
    let g = gpu_or_skip!();
    let h = hopper_or_skip!(g);
    let windows = [
        MaskSpec::sliding_window(Some(0), Some(0)),
        MaskSpec::sliding_window(Some(17), Some(5)),
        MaskSpec::sliding_window(None, Some(63)),
        MaskSpec::causal_window(100),
        MaskSpec::causal_window(0),
    ];
    for d in DIMS {
        for mask in windows {
            for (sq, sk) in [(333, 333), (150, 401), (401, 150)] {
                check_hopper(g, h, &Case::new(DType::Bf16, (1, sq, sk), (2, 2), d, mask));
            }
        }
    }
    for (hq, hkv) in [(8, 1), (8, 2), (6, 3)] {
        check_hopper(
            g,
            h,
            &Case::new(
                DType::F16,
                (2, 190, 190),
                (hq, hkv),
                128,
                MaskSpec::causal(),
            ),
        );
    }
    for (q_mem, kv_mem, o_mem) in [
        (Mem::Bhsd, Mem::Bhsd, Mem::Bhsd),
        (Mem::PaddedBshd(1), Mem::PaddedBhsd(2), Mem::PaddedBshd(2)),
    ] {
        let c = Case {
            q_mem,
            kv_mem,
            o_mem,
            ..Case::new(DType::Bf16, (2, 300, 260), (4, 2), 64, MaskSpec::causal())
        };
        check_hopper(g, h, &c);
    }
}

/// A Hopper-mainloop `Attention` on `g`'s context with the tall-tile choice overridden (and the
/// zigzag grid off, so that a call without tall tiles runs the one-item grid).
fn hopper_with_tall(g: &Gpu, tall: Option<bool>) -> Attention {
    Attention::new(&g.ctx)
        .expect("Attention::new")
        .with_mainloop(MainloopChoice::Sm90)
        .with_sm90_tall_tiles(tall)
        .with_sm90_zigzag(Some(false))
}

/// Which tile shape a head-dim-64 call takes: tall (192-row) tiles without a mask, and with a
/// causal or window mask only from 8192 query rows (where they measured faster); 128-row tiles
/// at the other head dims, with a block mask, and when the override says no.
#[test]
fn hopper_tall_tiles_where_they_gain() {
    let g = gpu_or_skip!();
    hopper_or_skip!(g);
    let h = &hopper_with_tall(g, None);
    let never = hopper_with_tall(g, Some(false));
    let always = hopper_with_tall(g, Some(true));
    for dtype in DTYPES {
        let tall = format!("lf_fwd_tall_sm90_{}_d64", dtype.name());
        let base = |d: usize| format!("lf_fwd_sm90_{}_d{d}", dtype.name());
        let case = |sq, d, mask| Case::new(dtype, (1, sq, 300), (2, 1), d, mask);
        let masks = [
            MaskSpec::causal(),
            MaskSpec::causal_window(100),
            MaskSpec::sliding_window(Some(30), Some(50)),
        ];
        for sq in [1, 300, 8191, 8192, 20000] {
            let c = case(sq, 64, MaskSpec::none());
            assert_eq!(kernel_of(g, h, &c), tall, "{c:?}");
            assert_eq!(kernel_of(g, &never, &c), base(64), "{c:?}");
            for mask in masks {
                let c = case(sq, 64, mask);
                let want = if sq >= 8192 { &tall } else { &base(64) };
                assert_eq!(&kernel_of(g, h, &c), want, "{c:?}");
                assert_eq!(kernel_of(g, &always, &c), tall, "{c:?}");
                assert_eq!(kernel_of(g, &never, &c), base(64), "{c:?}");
            }
            for d in [128, 256] {
                let c = case(sq, d, MaskSpec::none());
                assert_eq!(kernel_of(g, &always, &c), base(d), "{c:?}");
            }
        }
    }
}

/// The tall (192-row, three consumer warpgroups) query tiles at head dim 64, with and without
/// masks: query counts around the tall tile's multiples, keys around the key tile's, windows,
/// grouped heads, the LSE, and a long causal problem against the sm_80 mainloop.
#[test]
fn hopper_tall_query_tiles_at_head_dim_64() {
    let g = gpu_or_skip!();
    hopper_or_skip!(g);
    let h = &hopper_with_tall(g, Some(true));
    let masks = [
        MaskSpec::none(),
        MaskSpec::causal(),
        MaskSpec::causal_window(100),
        MaskSpec::sliding_window(Some(30), Some(50)),
    ];
    for dtype in DTYPES {
        let tall = format!("lf_fwd_tall_sm90_{}_d64", dtype.name());
        for mask in masks {
            for (sq, sk) in [
                (1, 1),
                (191, 130),
                (192, 192),
                (193, 257),
                (385, 300),
                (64, 400),
            ] {
                let c = Case::new(dtype, (2, sq, sk), (6, 2), 64, mask);
                assert_eq!(kernel_of(g, h, &c), tall, "{c:?}");
                check_hopper(g, h, &c);
            }
        }
    }
    let c = Case {
        lse: true,
        ..Case::new(DType::Bf16, (1, 2000, 2100), (4, 2), 64, MaskSpec::causal())
    };
    agrees_with_sm80(g, h, &c);
}

/// One small case on the tall tiles, without a mask and causal: what the sanitizers run, a few
/// tiles each.
#[test]
fn hopper_tall_tiles_small() {
    let g = gpu_or_skip!();
    hopper_or_skip!(g);
    let h = &hopper_with_tall(g, Some(true));
    for mask in [MaskSpec::none(), MaskSpec::causal()] {
        let c = Case::new(DType::Bf16, (1, 400, 400), (2, 1), 64, mask);
        assert_eq!(kernel_of(g, h, &c), "lf_fwd_tall_sm90_bf16_d64", "{c:?}");
        check_hopper(g, h, &c);
    }
}

/// A Hopper-mainloop `Attention` on `g`'s context with the zigzag-grid choice overridden and,
/// optionally, that grid's CTA count (the tall tiles off, so that head dim 64 takes it too).
fn hopper_with_zigzag(g: &Gpu, zigzag: Option<bool>, ctas: Option<u32>) -> Attention {
    Attention::new(&g.ctx)
        .expect("Attention::new")
        .with_mainloop(MainloopChoice::Sm90)
        .with_sm90_tall_tiles(Some(false))
        .with_sm90_zigzag(zigzag)
        .with_sm90_persistent(ctas)
}

/// Which calls take the persistent zigzag grid: dense calls without a block mask, masked ones of
/// at most 8192 query rows and keys (head dim 64 from 8192 rows takes its tall tiles first),
/// others of at most 4096 (from 1024 rows at head dim 256; head dim 64 keeps its tall tiles), and
/// any length when the override says so; none when it says no.
#[test]
fn hopper_zigzag_grid_where_it_gains() {
    let g = gpu_or_skip!();
    let h = hopper_or_skip!(g);
    let never = Attention::new(&g.ctx)
        .unwrap()
        .with_mainloop(MainloopChoice::Sm90)
        .with_sm90_zigzag(Some(false));
    let always = Attention::new(&g.ctx)
        .unwrap()
        .with_mainloop(MainloopChoice::Sm90)
        .with_sm90_zigzag(Some(true));
    for dtype in DTYPES {
        let zz = |d: usize| format!("lf_fwd_zz_sm90_{}_d{d}", dtype.name());
        let base = |d: usize| format!("lf_fwd_sm90_{}_d{d}", dtype.name());
        let tall = format!("lf_fwd_tall_sm90_{}_d64", dtype.name());
        for d in DIMS {
            for mask in [
                MaskSpec::causal(),
                MaskSpec::sliding_window(Some(30), Some(50)),
            ] {
                for sq in [1, 300, 4097, 8000, 8192, 8193] {
                    let c = Case::new(dtype, (1, sq, 300), (2, 1), d, mask);
                    let want = match (sq, d) {
                        (8192.., 64) => tall.clone(),
                        (8193.., _) => base(d),
                        _ => zz(d),
                    };
                    assert_eq!(kernel_of(g, h, &c), want, "{c:?}");
                    if want != tall {
                        assert_eq!(kernel_of(g, &always, &c), zz(d), "{c:?}");
                        assert_eq!(kernel_of(g, &never, &c), base(d), "{c:?}");
                    }
                }
            }
            // Few queries over many keys: long items, the one-item grid.
            let c = Case::new(dtype, (1, 1000, 9000), (2, 1), d, MaskSpec::causal());
            assert_eq!(kernel_of(g, h, &c), base(d), "{c:?}");
            // Without a mask.
            for (sq, sk) in [(512, 300), (1000, 300), (1024, 4096), (4096, 4097)] {
                let c = Case::new(dtype, (1, sq, sk), (2, 1), d, MaskSpec::none());
                let want = match d {
                    64 => tall.clone(),
                    _ if sk > 4096 => base(d),
                    256 if sq < 1024 => base(d),
                    _ => zz(d),
                };
                assert_eq!(kernel_of(g, h, &c), want, "{c:?}");
            }
        }
    }
}

/// The zigzag grid over every mask kind, head dim and dtype, with odd and even query-tile counts
/// (a slot of one middle tile), several (head, batch) pairs and GQA, as one CTA, three and seven
/// (many rounds each) and the default one per SM; the LSE; a causal problem against the sm_80
/// mainloop.
#[test]
fn hopper_zigzag_grid_every_mask_and_round_count() {
    let g = gpu_or_skip!();
    hopper_or_skip!(g);
    let masks = [
        MaskSpec::none(),
        MaskSpec::causal(),
        MaskSpec::causal_window(100),
        MaskSpec::sliding_window(Some(30), Some(50)),
    ];
    for ctas in [Some(1), Some(3), Some(7), None] {
        let h = &hopper_with_zigzag(g, Some(true), ctas);
        for d in DIMS {
            for mask in masks {
                // (900, 300): under a causal mask the first query tiles see no key, so a CTA
                // runs items without key tiles between items with some.
                for (sq, sk) in [
                    (1, 1),
                    (129, 300),
                    (300, 257),
                    (513, 640),
                    (640, 513),
                    (900, 300),
                ] {
                    let dtype = if sq % 2 == 0 { DType::F16 } else { DType::Bf16 };
                    let c = Case::new(dtype, (2, sq, sk), (6, 2), d, mask);
                    assert_eq!(
                        kernel_of(g, h, &c),
                        format!("lf_fwd_zz_sm90_{}_d{d}", dtype.name()),
                        "{c:?}"
                    );
                    check_hopper(g, h, &c);
                }
            }
        }
    }
    let h = &hopper_with_zigzag(g, Some(true), Some(5));
    let c = Case {
        lse: true,
        ..Case::new(
            DType::Bf16,
            (2, 1500, 1600),
            (4, 2),
            128,
            MaskSpec::causal(),
        )
    };
    agrees_with_sm80(g, h, &c);
}

/// One small case on the zigzag grid, three CTAs for five query tiles of two heads (rounds of
/// both halves of a slot and a middle tile): what the sanitizers run.
#[test]
fn hopper_zigzag_grid_small() {
    let g = gpu_or_skip!();
    hopper_or_skip!(g);
    let h = &hopper_with_zigzag(g, Some(true), Some(3));
    for mask in [MaskSpec::none(), MaskSpec::causal()] {
        let c = Case::new(DType::Bf16, (1, 600, 600), (2, 1), 128, mask);
        assert_eq!(kernel_of(g, h, &c), "lf_fwd_zz_sm90_bf16_d128", "{c:?}");
        check_hopper(g, h, &c);
    }
}

/// The sm_80 and Hopper mainloops on the same long causal problem: both pass the rule, and
/// they agree to the rule's bound (they round P at the same points; only f32 sums differ).
#[test]
fn hopper_long_sequence_agrees_with_sm80() {
    let g = gpu_or_skip!();
    let h = hopper_or_skip!(g);
    let c = Case::new(
        DType::Bf16,
        (1, 2048, 2048),
        (2, 1),
        128,
        MaskSpec::causal(),
    );
    agrees_with_sm80(g, h, &c);
}

#[test]
fn hopper_block_sparse_edge_cases() {
    let g = gpu_or_skip!();
    let h = hopper_or_skip!(g);
    for d in DIMS {
        let r = check_hopper(g, h, &sparse_case(d, (300, 300), MaskSpec::none(), 0.0));
        assert!(r.out.iter().all(|x| *x == 0.0));
        for mask in [
            MaskSpec::none(),
            MaskSpec::causal(),
            MaskSpec::causal_window(100).with_sinks(70),
        ] {
            for (sq, sk) in [(1, 1), (129, 65), (200, 331), (256, 256), (255, 257)] {
                check_hopper(g, h, &sparse_case(d, (sq, sk), mask, 1.0));
                check_hopper(g, h, &sparse_case(d, (sq, sk), mask, 0.3));
            }
        }
    }
}

/// Runs a RoPE case on the Hopper mainloop and checks it. Under `MainloopChoice::Sm90` a call
/// the Hopper kernel cannot run is an error, so a pass means the Hopper kernel ran.
fn check_hopper_rope(g: &Gpu, h: &Attention, c: &RopeCase, blocks: Option<&BlockMask>) {
    let r = run_rope_with(g, h, c, blocks);
    assert!(r.cmp.passes, "Hopper mainloop, {c:?}\n  {}", r.cmp);
}

#[test]
fn hopper_rope_is_chosen_for_head_dims_64_and_128() {
    let g = gpu_or_skip!();
    let h = hopper_or_skip!(g);
    for (d, ok) in [(64, true), (128, true), (256, false)] {
        let (fwd, rope) = raw_rope_placeholder(d);
        // Asked from a thread that has never had a current context (planning encodes tensor
        // maps, which needs one).
        let chosen = std::thread::scope(|s| s.spawn(|| h.rope_mainloop_for(&fwd, &rope)).join());
        match chosen.expect("no panic") {
            Ok(m) => assert!(ok && m == Mainloop::Sm90, "d {d}: {m:?}"),
            Err(e) => assert!(!ok, "d {d}: {e}"),
        }
        assert_eq!(
            g.sm80.rope_mainloop_for(&fwd, &rope).unwrap(),
            Mainloop::Sm80
        );
        // The default choice runs what the Hopper kernels can and sm_80 for the rest.
        let auto = Attention::new(&g.ctx).unwrap();
        let want = if ok { Mainloop::Sm90 } else { Mainloop::Sm80 };
        assert_eq!(auto.rope_mainloop_for(&fwd, &rope).unwrap(), want, "d {d}");
    }
}

#[test]
fn hopper_rope_modes_match_the_two_matrix_reference() {
    let g = gpu_or_skip!();
    let h = hopper_or_skip!(g);
    for d in [64, 128] {
        for mode in [
            PositionMode::Rope,
            PositionMode::ReRope { window: 1 },
            PositionMode::ReRope { window: 65 },
            PositionMode::ReRope { window: 200 },
            PositionMode::LeakyReRope {
                window: 63,
                leak: 16.0,
            },
        ] {
            for (sq, sk) in [(1, 300), (300, 300), (129, 400), (257, 257)] {
                let c = rope_case(d, (sq, sk), mode);
                check_hopper_rope(g, h, &c, None);
                let mut windowed = c.clone();
                windowed.rope.window_left = Some(90);
                check_hopper_rope(g, h, &windowed, None);
            }
            // Over a block mask (the call's causal element mask, 30% of the blocks).
            let c = rope_case(d, (300, 300), mode);
            let shape = MaskShape {
                batch: 1,
                heads: 1,
                seqlen_q: 300,
                seqlen_k: 300,
            };
            let m = BlockMask::from_fn(shape, c.rope.mask(), |_, _, qb, kb| {
                (qb * 7 + kb * 3) % 10 < 3
            })
            .unwrap();
            check_hopper_rope(g, h, &c, Some(&m));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn hopper_rope_kernel_matches_reference(c in arb_rope_case()) {
        let Some(g) = gpu() else {
            say_skipped("hopper_rope_kernel_matches_reference");
            return Ok(());
        };
        let Some(h) = hopper(g) else { return Ok(()) };
        // Two Q variants and the K/V ring fit in shared memory up to head dim 128.
        let mut c = RopeCase { head_dim: c.head_dim.min(128), ..c };
        c.rope.config.rotary_dim = c.rope.config.rotary_dim.min(c.head_dim);
        let r = run_rope_with(g, h, &c, None);
        prop_assert!(r.cmp.passes, "Hopper mainloop, {:?}\n  {}", c, r.cmp);
    }

    #[test]
    fn hopper_sparse_kernel_matches_reference(c in arb_sparse_case()) {
        let Some(g) = gpu() else {
            say_skipped("hopper_sparse_kernel_matches_reference");
            return Ok(());
        };
        let Some(h) = hopper(g) else { return Ok(()) };
        let r = check_hopper(g, h, &c);
        prop_assert!(r.cmp.passes);
    }

    #[test]
    fn hopper_kernel_matches_reference(c in arb_case()) {
        let Some(g) = gpu() else {
            say_skipped("hopper_kernel_matches_reference");
            return Ok(());
        };
        let Some(h) = hopper(g) else { return Ok(()) };
        let r = check_hopper(g, h, &c);
        prop_assert!(r.cmp.passes);
    }

    #[test]
    fn hopper_few_rows_few_keys(c in arb_corner_case()) {
        let Some(g) = gpu() else {
            say_skipped("hopper_few_rows_few_keys");
            return Ok(());
        };
        let Some(h) = hopper(g) else { return Ok(()) };
        let c = Case { sparse: None, ..c };
        let r = check_hopper(g, h, &c);
        prop_assert!(r.cmp.passes);
    }
}
