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

#[path = "support/rng.rs"]
mod rng;

use longflash::reference::{rope_attention_backward_f64, rope_attention_f64, RefShape};
use longflash::rope::{rotate, PositionMode, RopeConfig, RopeLayout, RopeOptions, RopeScaling};
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
