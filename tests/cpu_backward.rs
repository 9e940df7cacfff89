//! The f64 backward reference (`reference::attention_backward_f64`) against finite differences
//! of the f64 forward, on tiny shapes of every mask kind and head grouping. CPU only.

use longflash::error::Error;
use longflash::mask::MaskSpec;
use longflash::reference::{attention_backward_f64, attention_f64, RefShape};
use proptest::prelude::*;

/// A small deterministic generator (xorshift), so that a failing case reproduces from its seed.
struct Rng(u64);
impl Rng {
    fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f64> {
        (0..n).map(|_| self.uniform()).collect()
    }
}

/// The loss whose gradients are checked: `sum(dout * attention(q, k, v))`.
fn loss(
    shape: &RefShape,
    (q, k, v): (&[f64], &[f64], &[f64]),
    dout: &[f64],
    mask: &MaskSpec,
    scale: f64,
) -> f64 {
    let o = attention_f64(shape, q, k, v, mask, scale).unwrap();
    o.out.iter().zip(dout).map(|(a, b)| a * b).sum()
}

/// Central differences of `loss` with respect to every element of q, k and v, against the
/// analytic gradients.
fn check_against_finite_differences(shape: RefShape, mask: MaskSpec, scale: f64, seed: u64) {
    let mut rng = Rng(seed | 1);
    let (nq, nkv) = (shape.q_len().unwrap(), shape.kv_len().unwrap());
    let (q, k, v, dout) = (rng.vec(nq), rng.vec(nkv), rng.vec(nkv), rng.vec(nq));
    let g = attention_backward_f64(&shape, &q, &k, &v, &dout, &mask, scale).unwrap();
    let eps = 1e-5;
    let inputs = [(&q, &g.dq, "dq"), (&k, &g.dk, "dk"), (&v, &g.dv, "dv")];
    for (which, (x, grad, name)) in inputs.into_iter().enumerate() {
        for e in 0..x.len() {
            let at = |delta: f64| {
                let mut xs = [q.clone(), k.clone(), v.clone()];
                xs[which][e] += delta;
                loss(&shape, (&xs[0], &xs[1], &xs[2]), &dout, &mask, scale)
            };
            let fd = (at(eps) - at(-eps)) / (2.0 * eps);
            let tol = 1e-6 * fd.abs().max(1.0);
            assert!(
                (grad[e] - fd).abs() <= tol,
                "{shape:?} {mask:?} scale {scale} seed {seed}: {name}[{e}] = {}, finite \
                 difference {fd}",
                grad[e]
            );
        }
    }
}

fn shape(sq: usize, sk: usize, hq: usize, hk: usize, d: usize) -> RefShape {
    RefShape {
        batch: 2,
        seqlen_q: sq,
        seqlen_k: sk,
        heads_q: hq,
        heads_kv: hk,
        head_dim: d,
    }
}

#[test]
fn one_visible_key_passes_dout_to_v_only() {
    // With a single key the softmax is 1 whatever the score: dq = dk = 0 and dv = dout.
    let s = RefShape {
        batch: 1,
        seqlen_q: 1,
        seqlen_k: 1,
        heads_q: 1,
        heads_kv: 1,
        head_dim: 3,
    };
    let (q, k, v, dout) = (
        [0.5, -1.0, 2.0],
        [1.5, 0.25, -0.75],
        [3.0, 4.0, 5.0],
        [0.1, -0.2, 0.3],
    );
    let g = attention_backward_f64(&s, &q, &k, &v, &dout, &MaskSpec::none(), 0.7).unwrap();
    assert_eq!(g.dq, vec![0.0; 3]);
    assert_eq!(g.dk, vec![0.0; 3]);
    assert_eq!(g.dv, dout.to_vec());
}

#[test]
fn two_keys_by_hand() {
    // q = [1], k = [0, 1], v = [1, 3], scale 1: p = (1, e) / (1 + e), o = (1 + 3e) / (1 + e),
    // do = 1: dv = p, dp = v, D = o, ds_j = p_j (v_j - o), dq = sum ds_j k_j = ds_1,
    // dk_j = ds_j q = ds_j.
    let s = RefShape {
        batch: 1,
        seqlen_q: 1,
        seqlen_k: 2,
        heads_q: 1,
        heads_kv: 1,
        head_dim: 1,
    };
    let e = std::f64::consts::E;
    let p = [1.0 / (1.0 + e), e / (1.0 + e)];
    let o = p[0] + 3.0 * p[1];
    let ds = [p[0] * (1.0 - o), p[1] * (3.0 - o)];
    let g = attention_backward_f64(
        &s,
        &[1.0],
        &[0.0, 1.0],
        &[1.0, 3.0],
        &[1.0],
        &MaskSpec::none(),
        1.0,
    )
    .unwrap();
    let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
    assert!(close(g.dq[0], ds[1]), "dq {:?} want {}", g.dq, ds[1]);
    assert!(
        close(g.dk[0], ds[0]) && close(g.dk[1], ds[1]),
        "dk {:?}",
        g.dk
    );
    assert!(
        close(g.dv[0], p[0]) && close(g.dv[1], p[1]),
        "dv {:?}",
        g.dv
    );
}

#[test]
fn rows_that_see_no_key_contribute_nothing() {
    // A causal mask with more queries than keys: the first rows see no key.
    let s = shape(4, 2, 1, 1, 2);
    let mut rng = Rng(7);
    let (q, k, v, dout) = (rng.vec(16), rng.vec(8), rng.vec(8), rng.vec(16));
    let mask = MaskSpec::causal();
    let g = attention_backward_f64(&s, &q, &k, &v, &dout, &mask, 0.5).unwrap();
    // Rows 0 and 1 of each batch entry see no key (bottom-right alignment: row i sees keys
    // j <= i - 2).
    for b in 0..2 {
        for i in 0..2 {
            let o = (b * 4 + i) * 2;
            assert_eq!(&g.dq[o..o + 2], &[0.0, 0.0], "row {i} of batch {b}");
        }
    }
    // Their upstream gradient must not reach dk or dv either.
    let mut dout2 = dout.clone();
    for b in 0..2 {
        for i in 0..2 {
            let o = (b * 4 + i) * 2;
            dout2[o] = 100.0;
            dout2[o + 1] = -100.0;
        }
    }
    let g2 = attention_backward_f64(&s, &q, &k, &v, &dout2, &mask, 0.5).unwrap();
    assert_eq!(g.dk, g2.dk);
    assert_eq!(g.dv, g2.dv);
}

#[test]
fn bad_dout_length_is_an_error() {
    let s = shape(2, 2, 1, 1, 2);
    let r = attention_backward_f64(
        &s,
        &[0.0; 8],
        &[0.0; 8],
        &[0.0; 8],
        &[0.0; 7],
        &MaskSpec::none(),
        1.0,
    );
    assert!(
        matches!(
            r,
            Err(Error::InvalidArgument {
                arg: "dout.len",
                ..
            })
        ),
        "{r:?}"
    );
}

#[test]
fn every_mask_kind_matches_finite_differences() {
    for (i, mask) in [
        MaskSpec::none(),
        MaskSpec::causal(),
        MaskSpec::causal_window(1),
        MaskSpec::sliding_window(Some(1), Some(2)),
        MaskSpec::causal().with_sinks(1),
    ]
    .into_iter()
    .enumerate()
    {
        check_against_finite_differences(shape(3, 5, 4, 2, 3), mask, 0.6, 11 + i as u64);
    }
}

fn arb_mask() -> impl Strategy<Value = MaskSpec> {
    prop_oneof![
        Just(MaskSpec::none()),
        Just(MaskSpec::causal()),
        (0u32..4).prop_map(MaskSpec::causal_window),
        (0u32..3, 0u32..3).prop_map(|(l, r)| MaskSpec::sliding_window(Some(l), Some(r))),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn gradients_match_finite_differences(
        sq in 1usize..5,
        sk in 1usize..6,
        (hq, hk) in prop_oneof![Just((1usize, 1usize)), Just((2, 1)), Just((2, 2)), Just((4, 2))],
        d in 1usize..5,
        mask in arb_mask(),
        scale in 0.1f64..1.5,
        seed in any::<u64>(),
    ) {
        check_against_finite_differences(shape(sq, sk, hq, hk, d), mask, scale, seed);
    }
}

/// The low-precision backward approximates the f64 one: its error is small against the
/// gradients' size (a loose bound, a few percent in bf16), and it is not exact (it does round).
#[test]
fn lowp_backward_is_close_to_f64_and_rounds() {
    use half::bf16;
    use longflash::reference::attention_backward_lowp;
    let s = shape(17, 23, 4, 2, 8);
    let mut rng = Rng(3);
    let (nq, nkv) = (s.q_len().unwrap(), s.kv_len().unwrap());
    let to_t = |x: Vec<f64>| -> Vec<bf16> { x.into_iter().map(bf16::from_f64).collect() };
    let (q, k, v, dout) = (
        to_t(rng.vec(nq)),
        to_t(rng.vec(nkv)),
        to_t(rng.vec(nkv)),
        to_t(rng.vec(nq)),
    );
    let wide = |x: &[bf16]| -> Vec<f64> { x.iter().map(|t| t.to_f64()).collect() };
    for mask in [MaskSpec::none(), MaskSpec::causal()] {
        let exact = attention_backward_f64(
            &s,
            &wide(&q),
            &wide(&k),
            &wide(&v),
            &wide(&dout),
            &mask,
            0.5,
        )
        .unwrap();
        let low = attention_backward_lowp(&s, &q, &k, &v, &dout, &mask, 0.5).unwrap();
        for (name, a, b) in [
            ("dq", &low.dq, &exact.dq),
            ("dk", &low.dk, &exact.dk),
            ("dv", &low.dv, &exact.dv),
        ] {
            let err = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f64::max);
            let size = b.iter().map(|y| y.abs()).fold(0.0, f64::max);
            assert!(size > 0.0, "{name}: zero gradient");
            assert!(
                err <= 0.05 * size,
                "{mask:?} {name}: error {err}, gradients up to {size}"
            );
            assert!(err > 0.0, "{mask:?} {name}: no rounding at all");
        }
    }
}

/// The gradient rule: the naive backward passes against itself; an answer off by more than
/// twice its error plus the tolerances fails, as does a NaN or a wrong length.
#[test]
fn gradient_rule_accepts_the_naive_error_and_rejects_more() {
    use half::bf16;
    use longflash::reference::{attention_backward_lowp, compare_gradient, half_ulp, GRAD_ABS_TOL};
    use longflash::DType;
    let s = shape(33, 40, 2, 1, 16);
    let mut rng = Rng(7);
    let (nq, nkv) = (s.q_len().unwrap(), s.kv_len().unwrap());
    let to_t = |x: Vec<f64>| -> Vec<bf16> { x.into_iter().map(bf16::from_f64).collect() };
    let (q, k, v, dout) = (
        to_t(rng.vec(nq)),
        to_t(rng.vec(nkv)),
        to_t(rng.vec(nkv)),
        to_t(rng.vec(nq)),
    );
    let wide = |x: &[bf16]| -> Vec<f64> { x.iter().map(|t| t.to_f64()).collect() };
    let mask = MaskSpec::causal();
    let exact = attention_backward_f64(
        &s,
        &wide(&q),
        &wide(&k),
        &wide(&v),
        &wide(&dout),
        &mask,
        0.25,
    )
    .unwrap();
    let low = attention_backward_lowp(&s, &q, &k, &v, &dout, &mask, 0.25).unwrap();
    for (name, naive, reference) in [
        ("dq", &low.dq, &exact.dq),
        ("dk", &low.dk, &exact.dk),
        ("dv", &low.dv, &exact.dv),
    ] {
        let c = compare_gradient(naive, reference, naive, DType::Bf16);
        assert!(c.passes, "{name}: {c}");
        assert!(c.worst_ratio <= 0.5, "{name}: {c}");
        // One element pushed past its allowance fails, at that element.
        let i = reference.len() / 3;
        let mut off = naive.clone();
        let allowance =
            2.0 * c.naive_abs_err + GRAD_ABS_TOL + half_ulp(DType::Bf16, reference[i].abs() + 1.0);
        off[i] = reference[i] + 1.01 * allowance;
        let c = compare_gradient(&off, reference, naive, DType::Bf16);
        assert!(!c.passes && c.worst_index == i, "{name}: {c}");
        let mut nan = naive.clone();
        nan[i] = f64::NAN;
        assert!(!compare_gradient(&nan, reference, naive, DType::Bf16).passes);
        assert!(!compare_gradient(&naive[1..], reference, naive, DType::Bf16).passes);
    }
}

mod rope {
    use super::Rng;
    use longflash::reference::{rope_attention_backward_f64, rope_attention_f64, RefShape};
    use longflash::rope::{PositionMode, RopeConfig, RopeLayout, RopeOptions, RopeScaling};
    use proptest::prelude::*;

    /// Central differences of `sum(dout * rope_attention(q, k, v))` against the analytic
    /// gradients of the un-rotated inputs.
    fn check(shape: RefShape, rope: &RopeOptions, scale: f64, seed: u64) {
        let mut rng = Rng(seed | 1);
        let (nq, nkv) = (shape.q_len().unwrap(), shape.kv_len().unwrap());
        let (q, k, v, dout) = (rng.vec(nq), rng.vec(nkv), rng.vec(nkv), rng.vec(nq));
        let g = rope_attention_backward_f64(&shape, &q, &k, &v, &dout, rope, scale).unwrap();
        let loss = |q: &[f64], k: &[f64], v: &[f64]| -> f64 {
            let o = rope_attention_f64(&shape, q, k, v, rope, scale).unwrap();
            o.out.iter().zip(&dout).map(|(a, b)| a * b).sum()
        };
        let eps = 1e-5;
        let inputs = [(&q, &g.dq, "dq"), (&k, &g.dk, "dk"), (&v, &g.dv, "dv")];
        for (which, (x, grad, name)) in inputs.into_iter().enumerate() {
            for e in 0..x.len() {
                let at = |delta: f64| {
                    let mut xs = [q.clone(), k.clone(), v.clone()];
                    xs[which][e] += delta;
                    loss(&xs[0], &xs[1], &xs[2])
                };
                let fd = (at(eps) - at(-eps)) / (2.0 * eps);
                let tol = 1e-6 * fd.abs().max(1.0);
                assert!(
                    (grad[e] - fd).abs() <= tol,
                    "{shape:?} {rope:?} seed {seed}: {name}[{e}] = {}, finite difference {fd}",
                    grad[e]
                );
            }
        }
    }

    fn arb_rope() -> impl Strategy<Value = RopeOptions> {
        let mode = prop_oneof![
            Just(PositionMode::Rope),
            (1u32..4).prop_map(|window| PositionMode::ReRope { window }),
            (1u32..4, 1.5f64..8.0)
                .prop_map(|(window, leak)| PositionMode::LeakyReRope { window, leak }),
        ];
        let scaling = prop_oneof![
            Just(RopeScaling::None),
            Just(RopeScaling::Yarn {
                factor: 4.0,
                original_max_position: 2,
                beta_fast: 32.0,
                beta_slow: 1.0,
                attention_factor: None,
            }),
        ];
        let layout = prop_oneof![Just(RopeLayout::HalfSplit), Just(RopeLayout::Interleaved)];
        (
            mode,
            scaling,
            layout,
            any::<bool>(),
            prop::option::of(0u32..3),
            prop::option::of(1u32..4),
        )
            .prop_map(|(mode, scaling, layout, partial, log_n, window_left)| {
                let config = RopeConfig {
                    base: 100.0,
                    // Head dim 6: all of it rotated, or the first 4.
                    rotary_dim: if partial { 4 } else { 6 },
                    layout,
                    scaling,
                };
                let mut r = RopeOptions::new(config, mode);
                r.log_n_train_len = log_n.map(|n| n as usize + 2);
                r.window_left = window_left;
                r.position_offsets = Some(vec![0, 3]);
                r
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn rope_gradients_match_finite_differences(
            sq in 1usize..5,
            extra in 0usize..3,
            (hq, hk) in prop_oneof![Just((1usize, 1usize)), Just((2, 1)), Just((2, 2))],
            rope in arb_rope(),
            scale in 0.1f64..1.0,
            seed in any::<u64>(),
        ) {
            let shape = RefShape {
                batch: 2,
                seqlen_q: sq,
                seqlen_k: sq + extra,
                heads_q: hq,
                heads_kv: hk,
                head_dim: 6,
            };
            check(shape, &rope, scale, seed);
        }
    }
}
