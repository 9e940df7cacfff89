//! RoPE / ReRoPE / Leaky ReRoPE inside the kernel, against the two-matrix reference.

use cudarc::driver::CudaSlice;
use half::{bf16, f16};
use longflash::reference::{compare, RefShape};
use longflash::{
    Attention, BlockMask, DType, Element, Error, ForwardOptions, Input, Layout, MaskShape,
    MaskSpec, Output,
};
use proptest::prelude::*;

use crate::common::Rng;
use crate::common::*;

use longflash::reference::{
    rope_attention_f64, rope_attention_f64_sparse, rope_attention_lowp, rope_attention_lowp_sparse,
};
use longflash::rope::{PositionMode, RopeConfig, RopeLayout, RopeOptions, RopeScaling};
use longflash::RopeForward;

#[derive(Clone, Debug)]
pub(crate) struct RopeCase {
    pub(crate) dtype: DType,
    pub(crate) batch: usize,
    pub(crate) seqlen_q: usize,
    pub(crate) seqlen_k: usize,
    pub(crate) heads_q: usize,
    pub(crate) heads_kv: usize,
    pub(crate) head_dim: usize,
    pub(crate) rope: RopeOptions,
    pub(crate) seed: u64,
}

/// Runs the fused kernel on `c` and returns its output (bshd, f64), LSE and the comparison with
/// the two-matrix reference.
fn run_rope_t<T: Element>(
    g: &Gpu,
    attn: &Attention,
    c: &RopeCase,
    blocks: Option<&BlockMask>,
) -> RunResult {
    let mut rng = Rng(c.seed);
    let gen = |n: usize, rng: &mut Rng| -> Vec<T> {
        (0..n).map(|_| T::from_f32(rng.normal() as f32)).collect()
    };
    let ql = Layout::bshd(c.batch, c.seqlen_q, c.heads_q, c.head_dim);
    let kl = Layout::bshd(c.batch, c.seqlen_k, c.heads_kv, c.head_dim);
    let (q, k, v) = (
        gen(ql.numel(), &mut rng),
        gen(kl.numel(), &mut rng),
        gen(kl.numel(), &mut rng),
    );
    let shape = RefShape {
        batch: c.batch,
        seqlen_q: c.seqlen_q,
        seqlen_k: c.seqlen_k,
        heads_q: c.heads_q,
        heads_kv: c.heads_kv,
        head_dim: c.head_dim,
    };
    let scale = 1.0 / (c.head_dim as f32).sqrt();
    let wide = |x: &[T]| -> Vec<f64> { x.iter().map(|t| t.to_f32() as f64).collect() };
    let (q64, k64, v64) = (wide(&q), wide(&k), wide(&v));
    let (ref64, lowp) = match blocks {
        None => (
            rope_attention_f64(&shape, &q64, &k64, &v64, &c.rope, scale as f64).unwrap(),
            rope_attention_lowp(&shape, &q, &k, &v, &c.rope, scale).unwrap(),
        ),
        Some(bm) => (
            rope_attention_f64_sparse(&shape, &q64, &k64, &v64, &c.rope, bm, scale as f64).unwrap(),
            rope_attention_lowp_sparse(&shape, &q, &k, &v, &c.rope, bm, scale).unwrap(),
        ),
    };
    let dm = blocks.map(|bm| bm.to_device(&g.stream).unwrap());
    let (dq, dk, dv) = (
        g.stream.clone_htod(&q).unwrap(),
        g.stream.clone_htod(&k).unwrap(),
        g.stream.clone_htod(&v).unwrap(),
    );
    let mut d_o: CudaSlice<T> = g
        .stream
        .clone_htod(&vec![T::from_f32(f32::NAN); ql.numel()])
        .unwrap();
    let mut d_lse: CudaSlice<f32> = g
        .stream
        .clone_htod(&vec![f32::NAN; c.batch * c.heads_q * c.seqlen_q])
        .unwrap();
    {
        let (qv, kv, vv) = (dq.as_view(), dk.as_view(), dv.as_view());
        let (mut ov, mut lv) = (d_o.as_view_mut(), d_lse.as_view_mut());
        attn.forward_rope(
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
            &RopeForward {
                rope: &c.rope,
                block_mask: dm.as_ref(),
                softmax_scale: None,
            },
        )
        .unwrap_or_else(|e| panic!("forward_rope failed on {c:?}: {e}"));
    }
    g.stream.synchronize().unwrap();
    let out = wide(&g.stream.clone_dtoh(&d_o).unwrap());
    let lse: Vec<f32> = g.stream.clone_dtoh(&d_lse).unwrap();
    let cmp = compare(&out, Some(&lse), &ref64, &lowp);
    RunResult {
        cmp,
        out,
        lse: Some(lse),
        reference: ref64,
        naive: lowp,
    }
}

pub(crate) fn run_rope(g: &Gpu, c: &RopeCase) -> RunResult {
    run_rope_masked(g, c, None)
}

pub(crate) fn run_rope_masked(g: &Gpu, c: &RopeCase, blocks: Option<&BlockMask>) -> RunResult {
    run_rope_with(g, &g.attn, c, blocks)
}

/// [`run_rope_masked`] through a given `Attention` (another mainloop choice).
pub(crate) fn run_rope_with(
    g: &Gpu,
    attn: &Attention,
    c: &RopeCase,
    blocks: Option<&BlockMask>,
) -> RunResult {
    match c.dtype {
        DType::F16 => run_rope_t::<f16>(g, attn, c, blocks),
        DType::Bf16 => run_rope_t::<bf16>(g, attn, c, blocks),
    }
}

#[test]
fn rope_modes_over_block_masks() {
    let g = gpu_or_skip!();
    for d in DIMS {
        for mode in [
            PositionMode::Rope,
            PositionMode::ReRope { window: 65 },
            PositionMode::LeakyReRope {
                window: 100,
                leak: 4.0,
            },
        ] {
            for window_left in [None, Some(150)] {
                for (sq, sk) in [(300, 300), (129, 520)] {
                    let mut c = rope_case(d, (sq, sk), mode);
                    c.rope.window_left = window_left;
                    let shape = MaskShape {
                        batch: c.batch,
                        heads: c.heads_q,
                        seqlen_q: sq,
                        seqlen_k: sk,
                    };
                    // A full layout must equal the unmasked call bit for bit where both
                    // take the same key tiles, and pass the rule everywhere.
                    let full = BlockMask::from_fn(shape, c.rope.mask(), |_, _, _, _| true).unwrap();
                    let plain = run_rope(g, &c);
                    let masked = run_rope_masked(g, &c, Some(&full));
                    assert!(plain.cmp.passes, "{c:?} no mask: {}", plain.cmp);
                    assert!(masked.cmp.passes, "{c:?} full mask: {}", masked.cmp);
                    let (plain, masked) = if full_mask_is_bitwise_dense(g, d, true) {
                        (plain, masked)
                    } else {
                        (
                            run_rope_with(g, &g.sm80, &c, None),
                            run_rope_with(g, &g.sm80, &c, Some(&full)),
                        )
                    };
                    assert!(
                        masked.out == plain.out && masked.lse == plain.lse,
                        "{c:?}: full block mask differs"
                    );
                    for density in [0.0, 0.4] {
                        let bm = BlockMask::from_fn(shape, c.rope.mask(), |b, h, qb, kb| {
                            Rng(((b * 31 + h) * 977 + qb) as u64 * 7919 + kb as u64).uniform()
                                < density
                        })
                        .unwrap();
                        let r = run_rope_masked(g, &c, Some(&bm));
                        assert!(r.cmp.passes, "{c:?} density {density}: {}", r.cmp);
                    }
                }
            }
        }
    }
    // A block mask whose element mask is not the call's is rejected.
    let c = rope_case(64, (200, 200), PositionMode::ReRope { window: 10 });
    let shape = MaskShape {
        batch: 1,
        heads: 1,
        seqlen_q: 200,
        seqlen_k: 200,
    };
    let wrong = BlockMask::from_fn(shape, MaskSpec::none(), |_, _, _, _| true)
        .unwrap()
        .to_device(&g.stream)
        .unwrap();
    let l = Layout::bshd(2, 200, 4, 64);
    let kl = Layout::bshd(2, 200, 2, 64);
    let x: CudaSlice<bf16> = g.stream.alloc_zeros(l.numel()).unwrap();
    let mut o: CudaSlice<bf16> = g.stream.alloc_zeros(l.numel()).unwrap();
    let (xv, mut ov) = (x.as_view(), o.as_view_mut());
    let e = g
        .attn
        .forward_rope(
            &g.stream,
            Input {
                data: &xv,
                layout: l,
            },
            Input {
                data: &xv,
                layout: kl,
            },
            Input {
                data: &xv,
                layout: kl,
            },
            Output {
                data: &mut ov,
                layout: l,
                lse: None,
            },
            &RopeForward {
                rope: &c.rope,
                block_mask: Some(&wrong),
                softmax_scale: None,
            },
        )
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidMask {
                arg: "block_mask.element_mask",
                ..
            }
        ),
        "{e}"
    );
}

pub(crate) fn rope_case(d: usize, (sq, sk): (usize, usize), mode: PositionMode) -> RopeCase {
    RopeCase {
        dtype: DType::Bf16,
        batch: 2,
        seqlen_q: sq,
        seqlen_k: sk,
        heads_q: 4,
        heads_kv: 2,
        head_dim: d,
        rope: RopeOptions::new(RopeConfig::llama(d), mode),
        seed: 5,
    }
}

#[test]
fn rope_modes_match_the_two_matrix_reference() {
    let g = gpu_or_skip!();
    for d in DIMS {
        for mode in [
            PositionMode::Rope,
            PositionMode::ReRope { window: 1 },
            PositionMode::ReRope { window: 63 },
            PositionMode::ReRope { window: 65 },
            PositionMode::ReRope { window: 200 },
            PositionMode::LeakyReRope {
                window: 65,
                leak: 16.0,
            },
            PositionMode::LeakyReRope {
                window: 100,
                leak: 2.5,
            },
        ] {
            for (sq, sk) in [(333, 333), (100, 400), (257, 129)] {
                for window_left in [None, Some(0), Some(90), Some(150)] {
                    let mut c = rope_case(d, (sq, sk), mode);
                    c.rope.window_left = window_left;
                    let r = run_rope(g, &c);
                    assert!(r.cmp.passes, "{c:?}\n  {}", r.cmp);
                }
            }
        }
    }
}

#[test]
fn rerope_with_a_window_past_the_sequence_is_plain_rope_bit_for_bit() {
    let g = gpu_or_skip!();
    for d in DIMS {
        let rope = run_rope(g, &rope_case(d, (300, 300), PositionMode::Rope));
        for mode in [
            PositionMode::ReRope { window: 300 },
            PositionMode::LeakyReRope {
                window: 5000,
                leak: 8.0,
            },
        ] {
            let r = run_rope(g, &rope_case(d, (300, 300), mode));
            assert!(r.cmp.passes, "{mode:?}: {}", r.cmp);
            assert!(
                r.out == rope.out && r.lse == rope.lse,
                "d {d} {mode:?} differs from RoPE"
            );
        }
    }
}

#[test]
fn fused_rope_equals_the_exact_kernel_on_rotated_inputs() {
    let g = gpu_or_skip!();
    for d in DIMS {
        let c = rope_case(d, (250, 410), PositionMode::Rope);
        let fused = run_rope(g, &c);
        assert!(fused.cmp.passes, "{}", fused.cmp);
        // Rotate on the host (f64), round to bf16, and run the plain causal kernel.
        let mut rng = Rng(c.seed);
        let gen = |n: usize, rng: &mut Rng| -> Vec<bf16> {
            (0..n)
                .map(|_| bf16::from_f32(rng.normal() as f32))
                .collect()
        };
        let ql = Layout::bshd(c.batch, c.seqlen_q, c.heads_q, d);
        let kl = Layout::bshd(c.batch, c.seqlen_k, c.heads_kv, d);
        let (q, k, v) = (
            gen(ql.numel(), &mut rng),
            gen(kl.numel(), &mut rng),
            gen(kl.numel(), &mut rng),
        );
        let inv_freq = c.rope.config.inv_freq(d, c.seqlen_k).unwrap();
        let rot = |x: &[bf16], l: &Layout, pos: &dyn Fn(usize, usize) -> i64| -> Vec<bf16> {
            let mut out = x.to_vec();
            for b in 0..l.batch {
                for s in 0..l.seqlen {
                    for h in 0..l.heads {
                        let o = l.offset(b, s, h) as usize;
                        let mut row: Vec<f64> =
                            x[o..o + d].iter().map(|t| t.to_f32() as f64).collect();
                        longflash::rope::rotate(
                            &mut row,
                            pos(b, s) as f64,
                            &inv_freq,
                            RopeLayout::HalfSplit,
                            1.0,
                        );
                        for (y, r) in out[o..o + d].iter_mut().zip(&row) {
                            *y = bf16::from_f64(*r);
                        }
                    }
                }
            }
            out
        };
        let qr = rot(&q, &ql, &|b, i| {
            c.rope.query_position(b, i, c.seqlen_q, c.seqlen_k)
        });
        let kr = rot(&k, &kl, &|b, j| c.rope.key_position(b, j));
        let (dq, dk, dv) = (
            g.stream.clone_htod(&qr).unwrap(),
            g.stream.clone_htod(&kr).unwrap(),
            g.stream.clone_htod(&v).unwrap(),
        );
        let mut d_o: CudaSlice<bf16> = g.stream.alloc_zeros(ql.numel()).unwrap();
        {
            let (qv, kv, vv) = (dq.as_view(), dk.as_view(), dv.as_view());
            let mut ov = d_o.as_view_mut();
            g.attn
                .forward(
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
                        lse: None,
                    },
                    &ForwardOptions::causal(),
                )
                .unwrap();
        }
        let exact: Vec<f64> = g
            .stream
            .clone_dtoh(&d_o)
            .unwrap()
            .iter()
            .map(|t| t.to_f32() as f64)
            .collect();
        let diff = exact
            .iter()
            .zip(&fused.out)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f64, f64::max);
        // Both are bf16 outputs of the same attention; they may differ by the rounding of the
        // rotated inputs, which the correctness bound already allows for.
        assert!(
            diff <= fused.cmp.bound,
            "d {d}: fused vs exact-on-rotated differ by {diff} (bound {})",
            fused.cmp.bound
        );
    }
}

pub(crate) fn arb_rope_case() -> impl Strategy<Value = RopeCase> {
    let scaling = prop_oneof![
        Just(RopeScaling::None),
        Just(RopeScaling::Linear { factor: 4.0 }),
        Just(RopeScaling::NtkAware { factor: 8.0 }),
        Just(RopeScaling::DynamicNtk {
            factor: 2.0,
            original_max_position: 128
        }),
        Just(RopeScaling::Yarn {
            factor: 8.0,
            original_max_position: 128,
            beta_fast: 32.0,
            beta_slow: 1.0,
            attention_factor: None
        }),
        Just(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position: 128
        }),
    ];
    let mode = prop_oneof![
        Just(PositionMode::Rope),
        (1u32..400).prop_map(|window| PositionMode::ReRope { window }),
        ((1u32..400), prop::sample::select(vec![1.5f64, 4.0, 16.0]))
            .prop_map(|(window, leak)| PositionMode::LeakyReRope { window, leak }),
    ];
    (
        prop::sample::select(vec![DType::F16, DType::Bf16]),
        prop::sample::select(vec![64usize, 128, 256]),
        prop::sample::select(vec![(1usize, 1usize), (4, 2), (3, 3), (4, 1)]),
        arb_seqlen(),
        arb_seqlen(),
        (scaling, mode, any::<bool>(), any::<bool>()),
        (
            any::<bool>(),
            prop::option::of(prop::sample::select(vec![2usize, 64, 4096])),
            prop::option::of(0u32..5000),
        ),
        any::<u64>(),
    )
        .prop_map(
            |(
                dtype,
                d,
                (hq, hkv),
                sq,
                sk,
                (scaling, mode, interleaved, half_rotary),
                (two_batch, log_n, offset),
                seed,
            )| {
                let batch = if two_batch { 2 } else { 1 };
                let config = RopeConfig {
                    base: 10000.0,
                    rotary_dim: if half_rotary { d / 2 } else { d },
                    layout: if interleaved {
                        RopeLayout::Interleaved
                    } else {
                        RopeLayout::HalfSplit
                    },
                    scaling,
                };
                let mut rope = RopeOptions::new(config, mode);
                rope.log_n_train_len = log_n;
                rope.position_offsets =
                    offset.map(|o| (0..batch as u32).map(|b| o + 977 * b).collect());
                // A sliding window on top of causal in some cases (from the seed, so shrinking
                // keeps it).
                rope.window_left = (seed % 3 == 0).then_some((seed >> 8) as u32 % 300);
                RopeCase {
                    dtype,
                    batch,
                    seqlen_q: sq,
                    seqlen_k: sk,
                    heads_q: hq,
                    heads_kv: hkv,
                    head_dim: d,
                    rope,
                    seed,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn rope_kernel_matches_reference(c in arb_rope_case()) {
        let Some(g) = gpu() else {
            say_skipped("rope_kernel_matches_reference");
            return Ok(());
        };
        let r = run_rope(g, &c);
        prop_assert!(r.cmp.passes, "{:?}\n  {}", c, r.cmp);
    }
}
