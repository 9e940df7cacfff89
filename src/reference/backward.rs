//! The gradients of plain attention in f64 (the yardstick of a backward pass).
//!
//! For one query row `i` (batch entry `b`, query head `h`, key/value head `hk`) with visible keys
//! `j`, the forward is `s_j = scale * q_i . k_j`, `p_j = softmax(s)_j` and `o_i = sum_j p_j v_j`.
//! Given the gradient `do_i` of a loss with respect to `o_i`:
//!
//! - `dv_j += p_j do_i`
//! - `dp_j = do_i . v_j`, `D_i = sum_j p_j dp_j` (which equals `do_i . o_i`)
//! - `ds_j = p_j (dp_j - D_i)`
//! - `dq_i = scale * sum_j ds_j k_j` and `dk_j += scale * ds_j q_i`
//!
//! Key/value gradients add up over every query head of a group (grouped-query and multi-query
//! attention) and every query row that sees the key. A row that sees no key contributes nothing
//! and gets `dq_i = 0`. `tests/cpu_backward.rs` checks these against finite differences of
//! [`attention_f64`](super::attention_f64).

use super::{for_each_row, RefShape, Visibility};
use crate::dtype::Element;
use crate::error::{Error, Result};

/// Gradients with respect to the inputs of an attention call, widened to f64, in the inputs'
/// layouts: `dq` like `q` (`[batch, seqlen_q, heads_q, head_dim]`), `dk` and `dv` like `k` and
/// `v` (`[batch, seqlen_k, heads_kv, head_dim]`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RefGrads {
    /// Gradient with respect to `q`.
    pub dq: Vec<f64>,
    /// Gradient with respect to `k`.
    pub dk: Vec<f64>,
    /// Gradient with respect to `v`.
    pub dv: Vec<f64>,
}

/// The gradients of [`attention_f64`](super::attention_f64)'s output with respect to `q`, `k` and
/// `v`, for the upstream gradient `dout` (shaped like the output), analytically in f64.
///
/// # Errors
///
/// As [`attention_f64`](super::attention_f64), and
/// [`Error::InvalidArgument`] when `dout` is not shaped like `q`.
pub fn attention_backward_f64(
    shape: &RefShape,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    dout: &[f64],
    mask: &(impl Visibility + ?Sized),
    scale: f64,
) -> Result<RefGrads> {
    shape.check(q.len(), k.len(), v.len())?;
    check_like_q("dout.len", q.len(), dout.len())?;
    let d = shape.head_dim;
    let sk = shape.seqlen_k;
    let mut g = RefGrads {
        dq: vec![0.0; q.len()],
        dk: vec![0.0; k.len()],
        dv: vec![0.0; v.len()],
    };
    // One row's visible keys and their probabilities, then their dp_j.
    let mut keys: Vec<usize> = Vec::with_capacity(sk);
    let mut p: Vec<f64> = Vec::with_capacity(sk);
    let mut dp: Vec<f64> = Vec::with_capacity(sk);

    for_each_row(shape, |b, h, hk, i| {
        let qo = shape.q_offset(b, i, h);
        let (qi, doi) = (&q[qo..qo + d], &dout[qo..qo + d]);
        keys.clear();
        p.clear();
        for j in 0..sk {
            if mask.visible(shape, b, h, i, j) {
                let ko = shape.kv_offset(b, j, hk);
                p.push(scale * dot(qi, &k[ko..ko + d]));
                keys.push(j);
            }
        }
        if keys.is_empty() {
            return;
        }
        let m = p.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let mut l = 0.0;
        for s in p.iter_mut() {
            *s = (*s - m).exp();
            l += *s;
        }
        for s in p.iter_mut() {
            *s /= l;
        }
        dp.clear();
        let mut big_d = 0.0;
        for (&j, &pj) in keys.iter().zip(&p) {
            let vo = shape.kv_offset(b, j, hk);
            let x = dot(doi, &v[vo..vo + d]);
            dp.push(x);
            big_d += pj * x;
            for (a, &y) in g.dv[vo..vo + d].iter_mut().zip(doi) {
                *a += pj * y;
            }
        }
        for ((&j, &pj), &dpj) in keys.iter().zip(&p).zip(&dp) {
            let ds = scale * pj * (dpj - big_d);
            let ko = shape.kv_offset(b, j, hk);
            for (a, &y) in g.dq[qo..qo + d].iter_mut().zip(&k[ko..ko + d]) {
                *a += ds * y;
            }
            for (a, &y) in g.dk[ko..ko + d].iter_mut().zip(qi) {
                *a += ds * y;
            }
        }
    });
    Ok(g)
}

/// The gradients computed the way a plain low-precision backward would, widened to f64: its
/// distance from [`attention_backward_f64`] is the error budget a backward kernel is allowed.
///
/// Inputs (q, k, v and `dout`) are in `T`; arithmetic in f32. Per row: the scores and the
/// softmax recomputed in f32 (`p_j = exp(s_j - m) / l`); the output `o_i` the backward is given
/// is [`attention_lowp`](super::attention_lowp)'s (the naive forward's, in `T`), `D_i = do_i .
/// o_i`, then `dp_j = do_i . v_j` and `ds_j = p_j (dp_j - D_i)`; `p_j` and `ds_j` are rounded to
/// `T` before they multiply (as the operands of a backward's matrix products), every sum is in
/// f32, and dq, dk and dv are rounded to `T` at the end. A row that sees no key contributes
/// nothing.
///
/// The output matters: `D_i` cancels against `dp_j`, so where few rows see a key, the output's
/// roundings are a large part of that key's gradient error. A backward is given its forward's
/// output, whose probabilities were rounded to `T` before they multiplied V; the naive budget is
/// taken with the same roundings, not with those of an output computed without them.
///
/// # Errors
///
/// As [`attention_backward_f64`].
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_lowp<T: Element>(
    shape: &RefShape,
    q: &[T],
    k: &[T],
    v: &[T],
    dout: &[T],
    mask: &(impl Visibility + ?Sized),
    scale: f32,
) -> Result<RefGrads> {
    let out: Vec<T> = super::attention_lowp(shape, q, k, v, mask, scale)?.out_as();
    attention_backward_lowp_given(shape, (q, k, v, &out), dout, mask, scale)
}

/// [`attention_backward_lowp`] given the forward's output `out` (`[batch, seqlen_q, heads_q,
/// head_dim]`, like q), as a backward kernel is: a kernel's test passes its own forward's
/// output here, so that the budget and the kernel share the output's roundings (a probability
/// at a rounding tie may round differently in two equally good forwards, see
/// [`RefOutput::spread`](super::RefOutput::spread)), and checks that output under the
/// forward's rule separately.
///
/// # Errors
///
/// As [`attention_backward_f64`], and [`Error::InvalidArgument`] with `out.len` when `out` is
/// not shaped like q.
pub fn attention_backward_lowp_given<T: Element>(
    shape: &RefShape,
    (q, k, v, out): (&[T], &[T], &[T], &[T]),
    dout: &[T],
    mask: &(impl Visibility + ?Sized),
    scale: f32,
) -> Result<RefGrads> {
    shape.check(q.len(), k.len(), v.len())?;
    check_like_q("dout.len", q.len(), dout.len())?;
    check_like_q("out.len", q.len(), out.len())?;
    let widen = |x: &[T]| -> Vec<f32> { x.iter().map(|t| t.to_f32()).collect() };
    let (qf, kf, vf, df) = (widen(q), widen(k), widen(v), widen(dout));
    let fwd_out = widen(out);
    let round = |x: f32| T::from_f32(x).to_f32();
    let d = shape.head_dim;
    let sk = shape.seqlen_k;
    let (mut dq, mut dk, mut dv) = (
        vec![0.0f32; q.len()],
        vec![0.0f32; k.len()],
        vec![0.0f32; v.len()],
    );
    let dot32 = |a: &[f32], b: &[f32]| -> f32 {
        let mut s = 0.0f32;
        for (x, y) in a.iter().zip(b) {
            s += x * y;
        }
        s
    };
    let mut keys: Vec<usize> = Vec::with_capacity(sk);
    let mut p: Vec<f32> = Vec::with_capacity(sk);

    for_each_row(shape, |b, h, hk, i| {
        let qo = shape.q_offset(b, i, h);
        let (qi, doi) = (&qf[qo..qo + d], &df[qo..qo + d]);
        keys.clear();
        p.clear();
        for j in 0..sk {
            if mask.visible(shape, b, h, i, j) {
                let ko = shape.kv_offset(b, j, hk);
                p.push(scale * dot32(qi, &kf[ko..ko + d]));
                keys.push(j);
            }
        }
        if keys.is_empty() {
            return;
        }
        let m = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut l = 0.0f32;
        for s in p.iter_mut() {
            *s = (*s - m).exp();
            l += *s;
        }
        for s in p.iter_mut() {
            *s /= l;
        }
        let big_d = dot32(doi, &fwd_out[qo..qo + d]);
        for (&j, &pj) in keys.iter().zip(&p) {
            // K and V share their layout.
            let ko = shape.kv_offset(b, j, hk);
            let vo = ko;
            let ds = round(pj * (dot32(doi, &vf[vo..vo + d]) - big_d));
            let pt = round(pj);
            for (a, &y) in dv[vo..vo + d].iter_mut().zip(doi) {
                *a += pt * y;
            }
            for (a, &y) in dq[qo..qo + d].iter_mut().zip(&kf[ko..ko + d]) {
                *a += ds * y;
            }
            for (a, &y) in dk[ko..ko + d].iter_mut().zip(qi) {
                *a += ds * y;
            }
        }
    });
    let finish = |x: Vec<f32>, s: f32| -> Vec<f64> {
        x.into_iter()
            .map(|a| f64::from(T::from_f32(a * s).to_f32()))
            .collect()
    };
    Ok(RefGrads {
        dq: finish(dq, scale),
        dk: finish(dk, scale),
        dv: finish(dv, 1.0),
    })
}

/// A tensor a backward takes shaped like q (the upstream gradient `dout.len`, the forward's
/// output `out.len`) must have q's length.
pub(super) fn check_like_q(arg: &'static str, q_len: usize, len: usize) -> Result<()> {
    if len != q_len {
        return Err(Error::InvalidArgument {
            arg,
            value: len.to_string(),
            expected: format!("{q_len} elements, like q"),
        });
    }
    Ok(())
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}
