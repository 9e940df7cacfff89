//! The RoPE / ReRoPE / Leaky ReRoPE backward as two plain backwards, the plan of the GPU RoPE
//! backward, checked on the f64 references.
//!
//! Given the forward's LSE and `D = rowsum(dO * O)`, each score's gradient depends only on its
//! own (query, key) pair, so the score set can be split: the inside pairs (causal, `p_i - p_j <
//! w`) on the inside-rotated inputs `(m_i R_{p_i} q, R_{p_j} k)`, the outside pairs (`p_j <= p_i -
//! w`) on the outside-rotated ones `(m_i R_{a_i} q, R_{c_j} k)`. The outside pairs are exactly the
//! causal mask, aligned bottom-right, over the first `seqlen_k - w` keys, so both halves are calls
//! of the exact backward (a sliding window for the inside one). The gradients come back to the
//! un-rotated inputs through the transposed rotations `R_{-x}`, and dV is the two halves' sum.
//!
//! The second test replays the plan in the element type, roundings where the kernels round
//! (each half's gradients come out of the exact backward in `T`), and checks it against the
//! backward's correctness rule with the naive two-matrix backward in `T`
//! (`rope_attention_backward_lowp`) as the budget.

#[path = "support/rng.rs"]
mod rng;

use half::{bf16, f16};
use longflash::reference::{
    compare_gradient, rope_attention_backward_f64, rope_attention_backward_lowp,
    rope_attention_f64, RefShape,
};
use longflash::rope::{rotate, PositionMode, RopeConfig, RopeLayout, RopeOptions, RopeScaling};
use longflash::{DType, Element};
use rng::Rng;

/// Which pairs a half takes.
#[derive(Clone, Copy, PartialEq)]
enum Half {
    Inside,
    Outside,
}

struct Grads {
    dq: Vec<f64>,
    dk: Vec<f64>,
    dv: Vec<f64>,
}

/// Where a query at `p` and a key at `p` are rotated to in each half.
fn positions(mode: PositionMode, half: Half, p: i64) -> (f64, f64) {
    match (half, mode) {
        (Half::Inside, _) | (_, PositionMode::Rope) => (p as f64, p as f64),
        (Half::Outside, PositionMode::ReRope { window }) => (f64::from(window), 0.0),
        (Half::Outside, PositionMode::LeakyReRope { window, leak }) => {
            let w = f64::from(window);
            (p as f64 / leak + w - w / leak, p as f64 / leak)
        }
    }
}

fn window(mode: PositionMode) -> Option<i64> {
    match mode {
        PositionMode::Rope => None,
        PositionMode::ReRope { window } | PositionMode::LeakyReRope { window, .. } => {
            Some(i64::from(window))
        }
    }
}

/// One half: the exact backward over its pairs with the whole forward's LSE and D, its inputs
/// rotated as the half says, the gradients turned back to the un-rotated frames.
#[allow(clippy::too_many_arguments)]
fn half_backward(
    s: &RefShape,
    (q, k, v, dout): (&[f64], &[f64], &[f64], &[f64]),
    lse: &[f64],
    dsum: &[f64],
    rope: &RopeOptions,
    half: Half,
    scale: f64,
) -> Grads {
    let d = s.head_dim;
    let inv_freq = rope.config.inv_freq(d, s.seqlen_k).unwrap();
    let (layout, af) = (rope.config.layout, rope.config.attention_factor());
    let group = s.heads_q / s.heads_kv;
    let off = s.seqlen_k as i64 - s.seqlen_q as i64;
    let w = window(rope.mode);
    // The pairs of the half. The outside one is the causal mask over the first seqlen_k - w
    // keys, aligned bottom-right: that is what the exact backward would be called with.
    let takes = |i: usize, j: usize| -> bool {
        let (pi, pj) = (off + i as i64, j as i64);
        if pj > pi {
            return false;
        }
        match (half, w) {
            (Half::Inside, None) => true,
            (Half::Outside, None) => false,
            (Half::Inside, Some(w)) => pi - pj < w,
            (Half::Outside, Some(w)) => {
                let kept = s.seqlen_k as i64 - w;
                let truncated = pj < kept && pj <= i as i64 + kept - s.seqlen_q as i64;
                assert_eq!(
                    truncated,
                    pi - pj >= w,
                    "outside pairs as a truncated causal mask"
                );
                truncated
            }
        }
    };
    let turn = |x: &[f64], pos: f64, m: f64| -> Vec<f64> {
        let mut y: Vec<f64> = x.iter().map(|a| a * m).collect();
        rotate(&mut y, pos, &inv_freq, layout, af);
        y
    };
    let qi = |b: usize, i: usize, h: usize| ((b * s.seqlen_q + i) * s.heads_q + h) * d;
    let ki = |b: usize, j: usize, h: usize| ((b * s.seqlen_k + j) * s.heads_kv + h) * d;
    let mut g = Grads {
        dq: vec![0.0; q.len()],
        dk: vec![0.0; k.len()],
        dv: vec![0.0; v.len()],
    };
    for b in 0..s.batch {
        for h in 0..s.heads_q {
            let hk = h / group;
            for i in 0..s.seqlen_q {
                let pi = off + i as i64;
                let m = rope.log_n_scale(pi);
                let (qa, _) = positions(rope.mode, half, pi);
                let qr = turn(&q[qi(b, i, h)..][..d], qa, m);
                let row = (b * s.heads_q + h) * s.seqlen_q + i;
                let mut dqr = vec![0.0; d];
                for j in 0..s.seqlen_k {
                    if !takes(i, j) {
                        continue;
                    }
                    let (_, kc) = positions(rope.mode, half, j as i64);
                    let kr = turn(&k[ki(b, j, hk)..][..d], kc, 1.0);
                    let sc: f64 = qr.iter().zip(&kr).map(|(a, c)| a * c).sum::<f64>() * scale;
                    let p = (sc - lse[row]).exp();
                    let (o_do, o_v) = (qi(b, i, h), ki(b, j, hk));
                    let dp: f64 = (0..d).map(|x| dout[o_do + x] * v[o_v + x]).sum();
                    let ds = p * (dp - dsum[row]);
                    let mut dkr = vec![0.0; d];
                    for x in 0..d {
                        dqr[x] += scale * ds * kr[x];
                        dkr[x] = scale * ds * qr[x];
                        g.dv[o_v + x] += p * dout[o_do + x];
                    }
                    // dk = R_{-c} dk~: the transpose of a rotation scaled by af.
                    let back = turn(&dkr, -kc, 1.0);
                    for (t, b) in g.dk[o_v..o_v + d].iter_mut().zip(&back) {
                        *t += b;
                    }
                }
                let back = turn(&dqr, -qa, m);
                let o = qi(b, i, h);
                for (t, b) in g.dq[o..o + d].iter_mut().zip(&back) {
                    *t += b;
                }
            }
        }
    }
    g
}

fn check(s: RefShape, rope: &RopeOptions, seed: u64) {
    let mut rng = Rng(seed);
    let (nq, nkv) = (s.q_len().unwrap(), s.kv_len().unwrap());
    let (q, k, v, dout) = (
        rng.vec(nq, 1.0),
        rng.vec(nkv, 1.0),
        rng.vec(nkv, 1.0),
        rng.vec(nq, 1.0),
    );
    let scale = 1.0 / (s.head_dim as f64).sqrt();
    let fwd = rope_attention_f64(&s, &q, &k, &v, rope, scale).unwrap();
    let want = rope_attention_backward_f64(&s, &q, &k, &v, &dout, rope, scale).unwrap();
    // D per (batch, head, row), in the LSE's order.
    let mut dsum = vec![0.0; fwd.lse.len()];
    for b in 0..s.batch {
        for h in 0..s.heads_q {
            for i in 0..s.seqlen_q {
                let o = ((b * s.seqlen_q + i) * s.heads_q + h) * s.head_dim;
                dsum[(b * s.heads_q + h) * s.seqlen_q + i] =
                    (0..s.head_dim).map(|x| dout[o + x] * fwd.out[o + x]).sum();
            }
        }
    }
    let inputs = (&q[..], &k[..], &v[..], &dout[..]);
    let a = half_backward(&s, inputs, &fwd.lse, &dsum, rope, Half::Inside, scale);
    let b = half_backward(&s, inputs, &fwd.lse, &dsum, rope, Half::Outside, scale);
    for (name, x, y, w) in [
        ("dq", &a.dq, &b.dq, &want.dq),
        ("dk", &a.dk, &b.dk, &want.dk),
        ("dv", &a.dv, &b.dv, &want.dv),
    ] {
        for e in 0..w.len() {
            let got = x[e] + y[e];
            assert!(
                (got - w[e]).abs() <= 1e-12 * w[e].abs().max(1.0),
                "{s:?} {rope:?}: {name}[{e}] = {got} from the halves, {} from the reference",
                w[e]
            );
        }
    }
}

#[test]
fn rope_backward_is_two_exact_backwards() {
    let modes = [
        PositionMode::Rope,
        PositionMode::ReRope { window: 1 },
        PositionMode::ReRope { window: 3 },
        PositionMode::LeakyReRope {
            window: 3,
            leak: 2.5,
        },
        PositionMode::LeakyReRope {
            window: 5,
            leak: 16.0,
        },
    ];
    let mut seed = 1;
    for mode in modes {
        for (sq, sk) in [(6, 6), (4, 11), (9, 7)] {
            for (layout, scaling, log_n, rotary) in [
                (RopeLayout::HalfSplit, RopeScaling::None, None, 8),
                (
                    RopeLayout::Interleaved,
                    RopeScaling::Linear { factor: 2.0 },
                    Some(3),
                    6,
                ),
            ] {
                let shape = RefShape {
                    batch: 2,
                    seqlen_q: sq,
                    seqlen_k: sk,
                    heads_q: 4,
                    heads_kv: 2,
                    head_dim: 8,
                };
                let mut rope = RopeOptions::new(
                    RopeConfig {
                        base: 100.0,
                        rotary_dim: rotary,
                        layout,
                        scaling,
                    },
                    mode,
                );
                rope.log_n_train_len = log_n;
                check(shape, &rope, seed);
                seed += 1;
            }
        }
    }
}

/// What the GPU plan computes, rounding included: the rotated inputs of each half in `T` (the
/// forward's key workspaces and Q variants), the forward's LSE and output (in `T`), then each
/// half as the exact backward kernel computes it (P and dS rounded to `T` as matrix operands, f32
/// sums, every gradient rounded to `T` at its end, dK summed over the group first), then one f32
/// pass that turns the halves' dQ and dK back, adds them (and the halves' dV) and rounds once.
fn split_plan_lowp<T: Element>(
    s: &RefShape,
    (q, k, v, dout): (&[T], &[T], &[T], &[T]),
    rope: &RopeOptions,
    scale: f32,
) -> Grads {
    let d = s.head_dim;
    let inv_freq = rope
        .config
        .inv_freq(d, s.seqlen_k + rope.max_offset() as usize)
        .unwrap();
    let (layout, af) = (rope.config.layout, rope.config.attention_factor());
    let round = |x: f32| T::from_f32(x).to_f32();
    let wide = |x: &[T]| -> Vec<f32> { x.iter().map(|t| t.to_f32()).collect() };
    // m A_pos x in f32 (angles and the rotation in f64, as precise as the kernels' f64
    // reduction), optionally rounded to T.
    let turn = |x: &[f32], pos: f64, m: f32| -> Vec<f32> {
        let mut y: Vec<f64> = x.iter().map(|&a| f64::from(a * m)).collect();
        rotate(&mut y, pos, &inv_freq, layout, af);
        y.into_iter().map(|a| a as f32).collect()
    };
    let dot = |a: &[f32], b: &[f32]| -> f32 { a.iter().zip(b).map(|(x, y)| x * y).sum() };
    let (sq, sk) = (s.seqlen_q, s.seqlen_k);
    let group = s.heads_q / s.heads_kv;
    let qi = |b: usize, i: usize, h: usize| ((b * sq + i) * s.heads_q + h) * d;
    let ki = |b: usize, j: usize, h: usize| ((b * sk + j) * s.heads_kv + h) * d;
    let w = window(rope.mode);
    let mask = rope.mask();
    let (vf, df) = (wide(v), wide(dout));
    let mut g = Grads {
        dq: vec![0.0; q.len()],
        dk: vec![0.0; k.len()],
        dv: vec![0.0; v.len()],
    };
    let halves: &[Half] = if w.is_some() {
        &[Half::Inside, Half::Outside]
    } else {
        &[Half::Inside]
    };
    for b in 0..s.batch {
        let pq = |i: usize| rope.query_position(b, i, sq, sk);
        let pk = |j: usize| rope.key_position(b, j);
        for hk in 0..s.heads_kv {
            // Each side's rotated keys, rounded to T (the forward's key workspaces).
            let keys: Vec<Vec<Vec<f32>>> = halves
                .iter()
                .map(|&half| {
                    (0..sk)
                        .map(|j| {
                            let (_, c) = positions(rope.mode, half, pk(j));
                            let x = turn(&wide(&k[ki(b, j, hk)..][..d]), c, 1.0);
                            x.into_iter().map(round).collect()
                        })
                        .collect()
                })
                .collect();
            // Per half: dQ~ (per query head, rounded), dK~ and dV (summed over the group in f32,
            // rounded at the end).
            let mut dq_h = vec![vec![vec![0.0f32; d]; sq * group]; 2];
            let mut dk_acc = vec![vec![vec![0.0f32; d]; sk]; 2];
            let mut dv_acc = vec![vec![vec![0.0f32; d]; sk]; 2];
            for gh in 0..group {
                let h = hk * group + gh;
                for i in 0..sq {
                    let m = rope.log_n_scale(pq(i)) as f32;
                    let qrow = wide(&q[qi(b, i, h)..][..d]);
                    // Each side's rotated query, rounded to T (the forward's Q variants).
                    let qs: Vec<Vec<f32>> = halves
                        .iter()
                        .map(|&half| {
                            let (a, _) = positions(rope.mode, half, pq(i));
                            turn(&qrow, a, m).into_iter().map(round).collect()
                        })
                        .collect();
                    // The forward: scores of the row's visible keys, each from its side.
                    let row: Vec<(usize, usize, f32)> = (0..sk)
                        .filter(|&j| mask.is_visible(sq, sk, i, j))
                        .map(|j| {
                            let side = usize::from(w.is_some_and(|w| pq(i) - pk(j) >= w));
                            (j, side, scale * dot(&qs[side], &keys[side][j]))
                        })
                        .collect();
                    if row.is_empty() {
                        continue;
                    }
                    let mx = row.iter().map(|r| r.2).fold(f32::NEG_INFINITY, f32::max);
                    let l: f32 = row.iter().map(|r| (r.2 - mx).exp()).sum();
                    let lse = mx + l.ln();
                    let mut o = vec![0.0f32; d];
                    for r in &row {
                        let p = (r.2 - lse).exp();
                        for (a, &x) in o.iter_mut().zip(&vf[ki(b, r.0, hk)..][..d]) {
                            *a += p * x;
                        }
                    }
                    let o: Vec<f32> = o.into_iter().map(round).collect();
                    let doi = &df[qi(b, i, h)..][..d];
                    let big_d = dot(doi, &o);
                    // Each half's backward over its own pairs, with the whole row's LSE.
                    let mut dqr = vec![vec![0.0f32; d]; 2];
                    for &(j, side, sc) in &row {
                        let p = (sc - lse).exp();
                        let vo = ki(b, j, hk);
                        let ds = round(p * (dot(doi, &vf[vo..vo + d]) - big_d));
                        let pt = round(p);
                        for x in 0..d {
                            dqr[side][x] += ds * keys[side][j][x];
                            dk_acc[side][j][x] += ds * qs[side][x];
                            dv_acc[side][j][x] += pt * doi[x];
                        }
                    }
                    for (side, dq) in dqr.iter().enumerate() {
                        dq_h[side][gh * sq + i] = dq.iter().map(|&a| round(a * scale)).collect();
                    }
                }
            }
            let dk_h: Vec<Vec<Vec<f32>>> = dk_acc
                .iter()
                .map(|side| {
                    let rows = side.iter();
                    rows.map(|r| r.iter().map(|&a| round(a * scale)).collect())
                        .collect()
                })
                .collect();
            let dv_h: Vec<Vec<Vec<f32>>> = dv_acc
                .iter()
                .map(|side| {
                    side.iter()
                        .map(|r| r.iter().map(|&a| round(a)).collect())
                        .collect()
                })
                .collect();
            // The combining pass: back through each half's rotation, added in f32, rounded once.
            for gh in 0..group {
                let h = hk * group + gh;
                for i in 0..sq {
                    let m = rope.log_n_scale(pq(i)) as f32;
                    let mut x = vec![0.0f32; d];
                    for &half in halves {
                        let (a, _) = positions(rope.mode, half, pq(i));
                        let hi = (half == Half::Outside) as usize;
                        for (t, y) in x.iter_mut().zip(turn(&dq_h[hi][gh * sq + i], -a, m)) {
                            *t += y;
                        }
                    }
                    let o = qi(b, i, h);
                    for (t, y) in g.dq[o..o + d].iter_mut().zip(x) {
                        *t = f64::from(round(y));
                    }
                }
            }
            for j in 0..sk {
                let (mut x, mut y) = (vec![0.0f32; d], vec![0.0f32; d]);
                for &half in halves {
                    let (_, c) = positions(rope.mode, half, pk(j));
                    let hi = (half == Half::Outside) as usize;
                    for (t, u) in x.iter_mut().zip(turn(&dk_h[hi][j], -c, 1.0)) {
                        *t += u;
                    }
                    for (t, u) in y.iter_mut().zip(&dv_h[hi][j]) {
                        *t += u;
                    }
                }
                let o = ki(b, j, hk);
                for e in 0..d {
                    g.dk[o + e] = f64::from(round(x[e]));
                    g.dv[o + e] = f64::from(round(y[e]));
                }
            }
        }
    }
    g
}

fn check_rounding<T: Element>(s: RefShape, rope: &RopeOptions, dtype: DType, seed: u64) {
    let mut rng = Rng(seed);
    let (nq, nkv) = (s.q_len().unwrap(), s.kv_len().unwrap());
    let to_t = |x: Vec<f64>| -> Vec<T> { x.into_iter().map(|a| T::from_f32(a as f32)).collect() };
    let (q, k, v, dout) = (
        to_t(rng.vec(nq, 2.0)),
        to_t(rng.vec(nkv, 2.0)),
        to_t(rng.vec(nkv, 1.0)),
        to_t(rng.vec(nq, 1.0)),
    );
    let wide = |x: &[T]| -> Vec<f64> { x.iter().map(|t| f64::from(t.to_f32())).collect() };
    let scale = 1.0 / (s.head_dim as f32).sqrt();
    let want = rope_attention_backward_f64(
        &s,
        &wide(&q),
        &wide(&k),
        &wide(&v),
        &wide(&dout),
        rope,
        f64::from(scale),
    )
    .unwrap();
    let inputs = (&q[..], &k[..], &v[..], &dout[..]);
    let naive = rope_attention_backward_lowp(&s, inputs, rope, scale).unwrap();
    let got = split_plan_lowp(&s, inputs, rope, scale);
    for (name, x, w, n) in [
        ("dq", &got.dq, &want.dq, &naive.dq),
        ("dk", &got.dk, &want.dk, &naive.dk),
        ("dv", &got.dv, &want.dv, &naive.dv),
    ] {
        let c = compare_gradient(x, w, n, dtype);
        assert!(
            c.passes,
            "{dtype:?} {s:?} {rope:?} seed {seed}: {name}: {c}"
        );
        // The budget is the low-precision backward's own error, not something far off: within
        // four units in the last place of the largest gradient.
        let big = w.iter().fold(0.0f64, |a, x| a.max(x.abs()));
        let ulp = match dtype {
            DType::Bf16 => 2f64.powi(-7),
            DType::F16 => 2f64.powi(-10),
        };
        assert!(
            c.naive_abs_err <= 4.0 * ulp * big,
            "{dtype:?} {name}: the naive backward is {:.2e} off, the largest gradient {big:.2e}",
            c.naive_abs_err
        );
    }
}

/// The plan's extra roundings (each half's gradients in the element type, dV added from two
/// rounded halves) stay inside the backward's correctness rule against the naive two-matrix
/// backward in the same type, over positions, offsets, log-n scaling and grouped heads.
#[test]
fn rope_backward_plan_rounding_meets_the_rule() {
    let modes = [
        PositionMode::Rope,
        PositionMode::ReRope { window: 7 },
        PositionMode::ReRope { window: 30 },
        PositionMode::LeakyReRope {
            window: 12,
            leak: 16.0,
        },
    ];
    let mut seed = 100;
    for mode in modes {
        for (sq, sk, offsets, log_n, window_left) in [
            (40, 40, None, None, None),
            (17, 90, Some(vec![0, 1000]), Some(8), None),
            (64, 70, None, None, Some(50)),
        ] {
            let shape = RefShape {
                batch: 2,
                seqlen_q: sq,
                seqlen_k: sk,
                heads_q: 4,
                heads_kv: 2,
                head_dim: 64,
            };
            let mut rope = RopeOptions::new(
                RopeConfig {
                    base: 10000.0,
                    rotary_dim: 64,
                    layout: RopeLayout::HalfSplit,
                    scaling: RopeScaling::None,
                },
                mode,
            );
            rope.log_n_train_len = log_n;
            rope.position_offsets = offsets;
            rope.window_left = window_left;
            check_rounding::<bf16>(shape, &rope, DType::Bf16, seed);
            check_rounding::<f16>(shape, &rope, DType::F16, seed + 1);
            seed += 2;
        }
    }
}
