//! The gradients of the RoPE / ReRoPE / Leaky ReRoPE reference in f64: the yardstick of a
//! backward that takes un-rotated Q and K.
//!
//! Every score of [`rope_attention_f64`](super::rope_attention_f64) is `scale * (A_a (m_i q_i)) .
//! (A_c k_j)`, with `m_i` the query's log-n factor and `A_x` the rotation to position `x` whose
//! rotated part is scaled by the attention factor (the inside branch takes `a = p_i`, `c = p_j`;
//! the outside one the window's positions). `A_x` is linear with transpose `A_{-x}`, so a score's
//! gradient reaches the un-rotated inputs as `dq_i += m_i A_{-a} (ds k~_j)` and
//! `dk_j += A_{-c} (ds q~_i)`, where `q~` and `k~` are the rotated vectors of the pair's branch:
//! the gradients are summed per branch in the rotated frames, then turned back once per row.

use super::backward::{check_like_q, RefGrads};
use super::rope::{
    rope_inside, rope_outside_k_position, rope_outside_q_position, rope_rotate_rounded, RopeRef,
};
use super::RefShape;
use crate::dtype::Element;
use crate::error::Result;
use crate::rope::{rotate, RopeOptions};
use crate::sparse::BlockMask;

/// The gradients of [`rope_attention_f64`](super::rope_attention_f64)'s output with respect to
/// the un-rotated `q`, `k` and `v`, for the upstream gradient `dout`, analytically in f64 (through
/// both branches of ReRoPE and Leaky ReRoPE, log-n scaling and the attention factor included).
///
/// # Errors
///
/// As [`rope_attention_f64`](super::rope_attention_f64), and [`Error::InvalidArgument`] when
/// `dout` is not shaped like `q`.
pub fn rope_attention_backward_f64(
    shape: &RefShape,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    dout: &[f64],
    rope: &RopeOptions,
    scale: f64,
) -> Result<RefGrads> {
    rope_backward_impl(shape, (q, k, v, dout), rope, None, scale)
}

/// [`rope_attention_backward_f64`] restricted to the blocks a block mask lists, as
/// [`rope_attention_f64_sparse`](super::rope_attention_f64_sparse).
pub fn rope_attention_backward_f64_sparse(
    shape: &RefShape,
    (q, k, v, dout): (&[f64], &[f64], &[f64], &[f64]),
    rope: &RopeOptions,
    blocks: &BlockMask,
    scale: f64,
) -> Result<RefGrads> {
    rope_backward_impl(shape, (q, k, v, dout), rope, Some(blocks), scale)
}

fn rope_backward_impl(
    shape: &RefShape,
    (q, k, v, dout): (&[f64], &[f64], &[f64], &[f64]),
    rope: &RopeOptions,
    blocks: Option<&BlockMask>,
    scale: f64,
) -> Result<RefGrads> {
    shape.check(q.len(), k.len(), v.len())?;
    check_like_q("dout.len", q.len(), dout.len())?;
    let RopeRef {
        inv_freq,
        af,
        layout,
        mode,
        two,
        d,
        sq,
        sk,
        group,
        mask,
    } = RopeRef::new(shape, rope)?;
    let mut g = RefGrads {
        dq: vec![0.0; q.len()],
        dk: vec![0.0; k.len()],
        dv: vec![0.0; v.len()],
    };
    // A_position (mul x), and its transpose A_-position y.
    let rotated = |x: &[f64], mul: f64, position: f64| -> Vec<f64> {
        let mut y: Vec<f64> = x.iter().map(|a| a * mul).collect();
        rotate(&mut y, position, &inv_freq, layout, af);
        y
    };
    let dot = |a: &[f64], b: &[f64]| -> f64 { a.iter().zip(b).map(|(x, y)| x * y).sum() };
    let add_scaled = |acc: &mut [f64], s: f64, x: &[f64]| {
        for (a, &y) in acc.iter_mut().zip(x) {
            *a += s * y;
        }
    };

    for b in 0..shape.batch {
        let pq: Vec<i64> = (0..sq).map(|i| rope.query_position(b, i, sq, sk)).collect();
        let pk: Vec<i64> = (0..sk).map(|j| rope.key_position(b, j)).collect();
        let q_at = |i: usize| rope_outside_q_position(mode, pq[i]);
        let k_at = |j: usize| rope_outside_k_position(mode, pk[j]);
        for h in 0..shape.heads_q {
            let hk = h / group;
            let qv = |i: usize| &q[shape.q_offset(b, i, h)..shape.q_offset(b, i, h) + d];
            let kv = |j: usize| &k[shape.kv_offset(b, j, hk)..shape.kv_offset(b, j, hk) + d];
            let logn: Vec<f64> = (0..sq).map(|i| rope.log_n_scale(pq[i])).collect();
            let q_in: Vec<Vec<f64>> = (0..sq)
                .map(|i| rotated(qv(i), logn[i], pq[i] as f64))
                .collect();
            let k_in: Vec<Vec<f64>> = (0..sk).map(|j| rotated(kv(j), 1.0, pk[j] as f64)).collect();
            let (q_out, k_out): (Vec<Vec<f64>>, Vec<Vec<f64>>) = if two {
                (
                    (0..sq).map(|i| rotated(qv(i), logn[i], q_at(i))).collect(),
                    (0..sk).map(|j| rotated(kv(j), 1.0, k_at(j))).collect(),
                )
            } else {
                (Vec::new(), Vec::new())
            };
            // Gradients with respect to the rotated vectors, per branch.
            let mut gq_in = vec![vec![0.0f64; d]; sq];
            let mut gq_out = vec![vec![0.0f64; d]; if two { sq } else { 0 }];
            let mut gk_in = vec![vec![0.0f64; d]; sk];
            let mut gk_out = vec![vec![0.0f64; d]; if two { sk } else { 0 }];

            for i in 0..sq {
                let qo = shape.q_offset(b, i, h);
                let doi = &dout[qo..qo + d];
                // (key, inside, score) of the row's visible keys, then their probabilities.
                let mut row: Vec<(usize, bool, f64)> = (0..sk)
                    .filter(|&j| {
                        mask.is_visible(sq, sk, i, j)
                            && blocks.is_none_or(|bm| bm.is_visible(b, h, i, j))
                    })
                    .map(|j| {
                        let inside = rope_inside(mode, pq[i] - pk[j]);
                        let s = if inside {
                            dot(&q_in[i], &k_in[j])
                        } else {
                            dot(&q_out[i], &k_out[j])
                        };
                        (j, inside, scale * s)
                    })
                    .collect();
                if row.is_empty() {
                    continue;
                }
                let m = row.iter().map(|r| r.2).fold(f64::NEG_INFINITY, f64::max);
                let mut l = 0.0;
                for r in row.iter_mut() {
                    r.2 = (r.2 - m).exp();
                    l += r.2;
                }
                let mut dp = Vec::with_capacity(row.len());
                let mut big_d = 0.0;
                for r in row.iter_mut() {
                    r.2 /= l;
                    let vo = shape.kv_offset(b, r.0, hk);
                    let x = dot(doi, &v[vo..vo + d]);
                    big_d += r.2 * x;
                    dp.push(x);
                    add_scaled(&mut g.dv[vo..vo + d], r.2, doi);
                }
                for (&(j, inside, p), &dpj) in row.iter().zip(&dp) {
                    let ds = scale * p * (dpj - big_d);
                    if inside {
                        add_scaled(&mut gq_in[i], ds, &k_in[j]);
                        add_scaled(&mut gk_in[j], ds, &q_in[i]);
                    } else {
                        add_scaled(&mut gq_out[i], ds, &k_out[j]);
                        add_scaled(&mut gk_out[j], ds, &q_out[i]);
                    }
                }
            }
            // Back through the rotations (and the log-n factor) to the un-rotated inputs.
            for i in 0..sq {
                let qo = shape.q_offset(b, i, h);
                let mut x = rotated(&gq_in[i], logn[i], -(pq[i] as f64));
                if two {
                    for (a, y) in x.iter_mut().zip(rotated(&gq_out[i], logn[i], -q_at(i))) {
                        *a += y;
                    }
                }
                add_scaled(&mut g.dq[qo..qo + d], 1.0, &x);
            }
            for j in 0..sk {
                let ko = shape.kv_offset(b, j, hk);
                add_scaled(
                    &mut g.dk[ko..ko + d],
                    1.0,
                    &rotated(&gk_in[j], 1.0, -(pk[j] as f64)),
                );
                if two {
                    add_scaled(
                        &mut g.dk[ko..ko + d],
                        1.0,
                        &rotated(&gk_out[j], 1.0, -k_at(j)),
                    );
                }
            }
        }
    }
    Ok(g)
}

/// [`rope_attention_backward_f64`] computed the way a plain low-precision two-matrix
/// implementation would, widened to f64: its distance from the f64 gradients is the error budget
/// a RoPE backward kernel is allowed
/// ([`compare_gradient`](super::compare_gradient)).
///
/// Inputs are in `T`; arithmetic in f32. The rotated queries and keys of each branch are
/// computed and rounded to `T` as in [`rope_attention_lowp`](super::rope_attention_lowp); each
/// row's scores pick the inside or outside branch, and from there the row is computed as in
/// [`attention_backward_lowp`](super::attention_backward_lowp) (the output given is
/// [`rope_attention_lowp`](super::rope_attention_lowp)'s, `p` and `ds` rounded to `T` before
/// they multiply, sums in f32, dv rounded once). The gradients with respect to the rotated
/// vectors are rounded to `T` per branch (times the scale); each is turned back through its
/// transposed rotation (and the log-n factor) in f32 and rounded to `T`, and the branches'
/// results are added in f32 and rounded to `T`: what automatic differentiation of the two-matrix
/// form stored in `T` does.
///
/// # Errors
///
/// As [`rope_attention_backward_f64`].
pub fn rope_attention_backward_lowp<T: Element>(
    shape: &RefShape,
    (q, k, v, dout): (&[T], &[T], &[T], &[T]),
    rope: &RopeOptions,
    scale: f32,
) -> Result<RefGrads> {
    let out: Vec<T> = super::rope_attention_lowp(shape, q, k, v, rope, scale)?.out_as();
    rope_attention_backward_lowp_given(shape, (q, k, v, dout), &out, rope, scale)
}

/// [`rope_attention_backward_lowp`] given the forward's output `out` (like q), as a backward
/// kernel is (see [`attention_backward_lowp_given`](super::attention_backward_lowp_given)).
///
/// # Errors
///
/// As [`rope_attention_backward_f64`], and [`Error::InvalidArgument`](crate::error::Error::InvalidArgument)
/// with `out.len` when `out` is not shaped like q.
pub fn rope_attention_backward_lowp_given<T: Element>(
    shape: &RefShape,
    (q, k, v, dout): (&[T], &[T], &[T], &[T]),
    out: &[T],
    rope: &RopeOptions,
    scale: f32,
) -> Result<RefGrads> {
    shape.check(q.len(), k.len(), v.len())?;
    check_like_q("dout.len", q.len(), dout.len())?;
    check_like_q("out.len", q.len(), out.len())?;
    let RopeRef {
        inv_freq,
        af,
        layout,
        mode,
        two,
        d,
        sq,
        sk,
        group,
        mask,
    } = RopeRef::new(shape, rope)?;
    let round = |x: f32| T::from_f32(x).to_f32();
    let widen = |x: &[T]| -> Vec<f32> { x.iter().map(|t| t.to_f32()).collect() };
    let (vf, df) = (widen(v), widen(dout));
    // Multiplied, rotated (A_position, or its transpose for a negated position) in f32, rounded.
    let turn = |x: &[f32], mul: f32, position: f64| -> Vec<f32> {
        let mut y = x.to_vec();
        rope_rotate_rounded::<T>(&mut y, mul, position, &inv_freq, layout, af);
        y
    };
    let dot32 = |a: &[f32], b: &[f32]| -> f32 {
        let mut s = 0.0f32;
        for (x, y) in a.iter().zip(b) {
            s += x * y;
        }
        s
    };
    let (mut dq, mut dk, mut dv) = (
        vec![0.0f32; q.len()],
        vec![0.0f32; k.len()],
        vec![0.0f32; v.len()],
    );
    let fwd_out: Vec<f32> = out.iter().map(|t| t.to_f32()).collect();
    let mut row: Vec<(usize, bool, f32)> = Vec::with_capacity(sk);
    for b in 0..shape.batch {
        let pq: Vec<i64> = (0..sq).map(|i| rope.query_position(b, i, sq, sk)).collect();
        let pk: Vec<i64> = (0..sk).map(|j| rope.key_position(b, j)).collect();
        let q_at = |i: usize| rope_outside_q_position(mode, pq[i]);
        let k_at = |j: usize| rope_outside_k_position(mode, pk[j]);
        for h in 0..shape.heads_q {
            let hk = h / group;
            let qv = |i: usize| widen(&q[shape.q_offset(b, i, h)..][..d]);
            let kv = |j: usize| widen(&k[shape.kv_offset(b, j, hk)..][..d]);
            let logn: Vec<f32> = (0..sq).map(|i| rope.log_n_scale(pq[i]) as f32).collect();
            let q_in: Vec<Vec<f32>> = (0..sq)
                .map(|i| turn(&qv(i), logn[i], pq[i] as f64))
                .collect();
            let k_in: Vec<Vec<f32>> = (0..sk).map(|j| turn(&kv(j), 1.0, pk[j] as f64)).collect();
            let (q_out, k_out): (Vec<Vec<f32>>, Vec<Vec<f32>>) = if two {
                (
                    (0..sq).map(|i| turn(&qv(i), logn[i], q_at(i))).collect(),
                    (0..sk).map(|j| turn(&kv(j), 1.0, k_at(j))).collect(),
                )
            } else {
                (Vec::new(), Vec::new())
            };
            // Gradients with respect to the rotated vectors, per branch, in f32.
            let mut gq = [vec![vec![0.0f32; d]; sq], vec![vec![0.0f32; d]; sq]];
            let mut gk = [vec![vec![0.0f32; d]; sk], vec![vec![0.0f32; d]; sk]];
            for i in 0..sq {
                let qo = shape.q_offset(b, i, h);
                let doi = &df[qo..qo + d];
                row.clear();
                for j in 0..sk {
                    if mask.is_visible(sq, sk, i, j) {
                        let inside = rope_inside(mode, pq[i] - pk[j]);
                        let s = if inside {
                            dot32(&q_in[i], &k_in[j])
                        } else {
                            dot32(&q_out[i], &k_out[j])
                        };
                        row.push((j, inside, scale * s));
                    }
                }
                if row.is_empty() {
                    continue;
                }
                let m = row.iter().map(|r| r.2).fold(f32::NEG_INFINITY, f32::max);
                let mut l = 0.0f32;
                for r in row.iter_mut() {
                    r.2 = (r.2 - m).exp();
                    l += r.2;
                }
                for r in row.iter_mut() {
                    r.2 /= l;
                }
                let big_d = dot32(doi, &fwd_out[qo..qo + d]);
                for &(j, inside, pj) in &row {
                    let vo = shape.kv_offset(b, j, hk);
                    let ds = round(pj * (dot32(doi, &vf[vo..vo + d]) - big_d));
                    let pt = round(pj);
                    for (a, &y) in dv[vo..vo + d].iter_mut().zip(doi) {
                        *a += pt * y;
                    }
                    let (br, qr, kr) = if inside {
                        (0, &q_in[i], &k_in[j])
                    } else {
                        (1, &q_out[i], &k_out[j])
                    };
                    for (a, &y) in gq[br][i].iter_mut().zip(kr) {
                        *a += ds * y;
                    }
                    for (a, &y) in gk[br][j].iter_mut().zip(qr) {
                        *a += ds * y;
                    }
                }
            }
            // Each branch's gradient in T, turned back and rounded, the branches added.
            let back = |g: &[f32], mul: f32, position: f64| -> Vec<f32> {
                let g: Vec<f32> = g.iter().map(|&a| round(a * scale)).collect();
                turn(&g, mul, -position)
            };
            for i in 0..sq {
                let qo = shape.q_offset(b, i, h);
                let mut x = back(&gq[0][i], logn[i], pq[i] as f64);
                if two {
                    for (a, y) in x.iter_mut().zip(back(&gq[1][i], logn[i], q_at(i))) {
                        *a = round(*a + y);
                    }
                }
                for (a, y) in dq[qo..qo + d].iter_mut().zip(x) {
                    *a += y;
                }
            }
            for j in 0..sk {
                let ko = shape.kv_offset(b, j, hk);
                let mut x = back(&gk[0][j], 1.0, pk[j] as f64);
                if two {
                    for (a, y) in x.iter_mut().zip(back(&gk[1][j], 1.0, k_at(j))) {
                        *a = round(*a + y);
                    }
                }
                // The query heads of a group add up in f32.
                for (a, y) in dk[ko..ko + d].iter_mut().zip(x) {
                    *a += y;
                }
            }
        }
    }
    let finish = |x: Vec<f32>| -> Vec<f64> { x.into_iter().map(|a| f64::from(round(a))).collect() };
    Ok(RefGrads {
        dq: finish(dq),
        dk: finish(dk),
        dv: finish(dv),
    })
}
