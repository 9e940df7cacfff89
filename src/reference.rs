//! Naive CPU attention: the yardstick the kernels are measured against.
//!
//! Two implementations of the same formula, `softmax(scale * Q K^T + mask) V` per (batch, query
//! head):
//!
//! - [`attention_f64`] computes it in f64: the "true" answer, up to f64 rounding.
//! - [`attention_lowp`] computes it the way a plain low-precision implementation would (inputs
//!   in f16/bf16, scores and softmax in f32, probabilities rounded to the input type before
//!   `P V`, output rounded). Its distance from the f64 answer is the error budget a kernel is
//!   allowed.
//!
//! [`compare`] applies the correctness rule: a kernel output passes when
//! `max|out - ref64| <= 2 * max|out_lowp - ref64| + 1e-5`, nothing is NaN, and its log-sum-exp
//! matches the f64 one to `1e-3` relative.
//!
//! All host data is contiguous `[batch, seqlen, heads, head_dim]` (bshd): `q` and `out` are
//! `[batch, seqlen_q, heads_q, head_dim]`, `k` and `v` are `[batch, seqlen_k, heads_kv,
//! head_dim]`, and `lse` is `[batch, heads_q, seqlen_q]`. Query head `h` reads key/value head
//! `h / (heads_q / heads_kv)` (grouped-query and multi-query attention).
//!
//! Which keys a query sees is [`MaskSpec::is_visible`], evaluated per element; nothing here
//! shares code with the kernels' tile plan.

use std::fmt;

use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::mask::MaskSpec;
use crate::sparse::BlockMask;

/// Problem size of a reference computation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RefShape {
    /// Batch size.
    pub batch: usize,
    /// Query tokens.
    pub seqlen_q: usize,
    /// Key/value tokens.
    pub seqlen_k: usize,
    /// Query (and output) heads; a whole multiple of `heads_kv`.
    pub heads_q: usize,
    /// Key/value heads.
    pub heads_kv: usize,
    /// Head dimension.
    pub head_dim: usize,
}

impl RefShape {
    /// Elements of `q` (and of `out`): `batch * seqlen_q * heads_q * head_dim`.
    pub fn q_len(&self) -> Option<usize> {
        self.batch
            .checked_mul(self.seqlen_q)?
            .checked_mul(self.heads_q)?
            .checked_mul(self.head_dim)
    }

    /// Elements of `k` and of `v`: `batch * seqlen_k * heads_kv * head_dim`.
    pub fn kv_len(&self) -> Option<usize> {
        self.batch
            .checked_mul(self.seqlen_k)?
            .checked_mul(self.heads_kv)?
            .checked_mul(self.head_dim)
    }

    /// Elements of `lse`: `batch * heads_q * seqlen_q`.
    pub fn lse_len(&self) -> Option<usize> {
        self.batch
            .checked_mul(self.heads_q)?
            .checked_mul(self.seqlen_q)
    }

    /// Checks the head ratio and that the three slices have the lengths this shape implies.
    fn check(&self, q: usize, k: usize, v: usize) -> Result<()> {
        if self.heads_kv == 0 {
            return Err(Error::ZeroSized {
                arg: "k",
                dim: "heads",
            });
        }
        if self.heads_q % self.heads_kv != 0 {
            return Err(Error::HeadsNotDivisible {
                heads_q: self.heads_q,
                heads_kv: self.heads_kv,
            });
        }
        let too_big = |arg: &'static str| Error::InvalidArgument {
            arg,
            value: format!("{self:?}"),
            expected: "a shape whose element count fits in usize".into(),
        };
        let q_len = self.q_len().ok_or_else(|| too_big("shape"))?;
        let kv_len = self.kv_len().ok_or_else(|| too_big("shape"))?;
        self.lse_len().ok_or_else(|| too_big("shape"))?;
        for (arg, len, want, formula) in [
            ("q.len", q, q_len, "batch * seqlen_q * heads_q * head_dim"),
            ("k.len", k, kv_len, "batch * seqlen_k * heads_kv * head_dim"),
            ("v.len", v, kv_len, "batch * seqlen_k * heads_kv * head_dim"),
        ] {
            if len != want {
                return Err(Error::InvalidArgument {
                    arg,
                    value: len.to_string(),
                    expected: format!("{want} elements ({formula} for {self:?})"),
                });
            }
        }
        Ok(())
    }

    /// Offset of element `(b, s, h, 0)` of the query-shaped tensors.
    fn q_offset(&self, b: usize, s: usize, h: usize) -> usize {
        ((b * self.seqlen_q + s) * self.heads_q + h) * self.head_dim
    }

    /// Offset of element `(b, s, h, 0)` of the key/value-shaped tensors.
    fn kv_offset(&self, b: usize, s: usize, h: usize) -> usize {
        ((b * self.seqlen_k + s) * self.heads_kv + h) * self.head_dim
    }
}

/// Output of a reference computation, widened to f64.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RefOutput {
    /// Attention output, `[batch, seqlen_q, heads_q, head_dim]`.
    pub out: Vec<f64>,
    /// Natural-log log-sum-exp of each row's scaled, masked scores, `[batch, heads_q,
    /// seqlen_q]`; `-inf` for a row that sees no key.
    pub lse: Vec<f64>,
}

/// Calls `row(b, h, kv_head, i)` for every output row, in output order of `lse`.
fn for_each_row(shape: &RefShape, mut row: impl FnMut(usize, usize, usize, usize)) {
    let group = shape.heads_q / shape.heads_kv;
    for b in 0..shape.batch {
        for h in 0..shape.heads_q {
            for i in 0..shape.seqlen_q {
                row(b, h, h / group, i);
            }
        }
    }
}

/// Which keys each query sees, for the reference: a [`MaskSpec`] (the same for every batch
/// entry and head) or a block-sparse [`BlockMask`].
pub trait Visibility {
    /// Whether query `i` of batch entry `b` and query head `h` attends key `j`.
    fn visible(&self, shape: &RefShape, b: usize, h: usize, i: usize, j: usize) -> bool;
}

impl Visibility for MaskSpec {
    fn visible(&self, shape: &RefShape, _b: usize, _h: usize, i: usize, j: usize) -> bool {
        self.is_visible(shape.seqlen_q, shape.seqlen_k, i, j)
    }
}

impl Visibility for BlockMask {
    fn visible(&self, _shape: &RefShape, b: usize, h: usize, i: usize, j: usize) -> bool {
        self.is_visible(b, h, i, j)
    }
}

/// Merges two attention results of the same problem by their log-sum-exps:
/// `lse = ln(e^a + e^b)`, `out = e^(a - lse) out_a + e^(b - lse) out_b`, in f64 (what
/// `Attention::merge` computes on the GPU). For disjoint key sets this is exactly the attention
/// over their union; for overlapping ones (LongNet's branches) it is the softmax-denominator
/// weighting of the branches. Rows where both are `-inf` stay 0 and `-inf`.
pub fn merge(shape: &RefShape, a: &RefOutput, b: &RefOutput) -> RefOutput {
    let d = shape.head_dim;
    let mut out = vec![0.0f64; a.out.len()];
    let mut lse = vec![f64::NEG_INFINITY; a.lse.len()];
    for_each_row(shape, |bi, h, _hk, i| {
        let r = (bi * shape.heads_q + h) * shape.seqlen_q + i;
        let (la, lb) = (a.lse[r], b.lse[r]);
        let m = la.max(lb);
        if m == f64::NEG_INFINITY {
            return;
        }
        let l = m + ((la - m).exp() + (lb - m).exp()).ln();
        lse[r] = l;
        let (wa, wb) = ((la - l).exp(), (lb - l).exp());
        let o = shape.q_offset(bi, i, h);
        let (ya, yb) = (&a.out[o..o + d], &b.out[o..o + d]);
        for ((y, &xa), &xb) in out[o..o + d].iter_mut().zip(ya).zip(yb) {
            *y = wa * xa + wb * xb;
        }
    });
    RefOutput { out, lse }
}

/// Attention in f64: `softmax(scale * Q K^T + mask) V`.
///
/// The mask is [`MaskSpec::is_visible`] (bottom-right aligned diagonal). A row that sees no key
/// has output zero and log-sum-exp `-inf`. The log-sum-exp is `ln(sum_j exp(scale * q_i . k_j))`
/// over visible keys `j`.
///
/// # Errors
///
/// [`Error::InvalidArgument`] when a slice length disagrees with `shape` (or the shape's element
/// count overflows), [`Error::HeadsNotDivisible`] when `heads_q` is not a multiple of
/// `heads_kv`, [`Error::ZeroSized`] when `heads_kv` is zero.
pub fn attention_f64(
    shape: &RefShape,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    mask: &(impl Visibility + ?Sized),
    scale: f64,
) -> Result<RefOutput> {
    shape.check(q.len(), k.len(), v.len())?;
    let d = shape.head_dim;
    let (sq, sk) = (shape.seqlen_q, shape.seqlen_k);
    let mut out = vec![0.0f64; q.len()];
    let mut lse = Vec::with_capacity(shape.batch * shape.heads_q * sq);
    // Scores of the visible keys of one row, and the keys they belong to.
    let mut scores: Vec<f64> = Vec::with_capacity(sk);
    let mut keys: Vec<usize> = Vec::with_capacity(sk);
    let mut acc = vec![0.0f64; d];

    for_each_row(shape, |b, h, hk, i| {
        let qo = shape.q_offset(b, i, h);
        let qi = &q[qo..qo + d];
        scores.clear();
        keys.clear();
        for j in 0..sk {
            if mask.visible(shape, b, h, i, j) {
                let ko = shape.kv_offset(b, j, hk);
                let dot: f64 = qi.iter().zip(&k[ko..ko + d]).map(|(a, b)| a * b).sum();
                scores.push(scale * dot);
                keys.push(j);
            }
        }
        if scores.is_empty() {
            lse.push(f64::NEG_INFINITY);
            return;
        }
        let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let mut l = 0.0f64;
        acc.fill(0.0);
        for (&s, &j) in scores.iter().zip(&keys) {
            let p = (s - m).exp();
            l += p;
            let vo = shape.kv_offset(b, j, hk);
            for (a, &x) in acc.iter_mut().zip(&v[vo..vo + d]) {
                *a += p * x;
            }
        }
        for (o, a) in out[qo..qo + d].iter_mut().zip(&acc) {
            *o = a / l;
        }
        lse.push(m + l.ln());
    });
    Ok(RefOutput { out, lse })
}

/// Attention computed the way a plain low-precision implementation would.
///
/// Inputs are in `T`. Each score is the f32 dot product of the widened `T` values, times
/// `scale` (f32). The softmax runs in f32 (maximum subtracted, normalized in f32), the
/// probabilities are rounded to `T`, `out = sum_j P_T[j] * V[j]` is accumulated in f32 and
/// rounded to `T`. The log-sum-exp is `m + ln(l)` in f32. Everything is returned widened to f64
/// (exactly). A row that sees no key has output zero and log-sum-exp `-inf`.
///
/// # Errors
///
/// As [`attention_f64`].
pub fn attention_lowp<T: Element>(
    shape: &RefShape,
    q: &[T],
    k: &[T],
    v: &[T],
    mask: &(impl Visibility + ?Sized),
    scale: f32,
) -> Result<RefOutput> {
    shape.check(q.len(), k.len(), v.len())?;
    let d = shape.head_dim;
    let (sq, sk) = (shape.seqlen_q, shape.seqlen_k);
    let widen = |x: &[T]| -> Vec<f32> { x.iter().map(|t| t.to_f32()).collect() };
    let (qf, kf, vf) = (widen(q), widen(k), widen(v));
    let mut out = vec![0.0f64; q.len()];
    let mut lse = Vec::with_capacity(shape.batch * shape.heads_q * sq);
    let mut scores: Vec<f32> = Vec::with_capacity(sk);
    let mut keys: Vec<usize> = Vec::with_capacity(sk);
    let mut acc = vec![0.0f32; d];

    for_each_row(shape, |b, h, hk, i| {
        let qo = shape.q_offset(b, i, h);
        let qi = &qf[qo..qo + d];
        scores.clear();
        keys.clear();
        for j in 0..sk {
            if mask.visible(shape, b, h, i, j) {
                let ko = shape.kv_offset(b, j, hk);
                let mut dot = 0.0f32;
                for (a, b) in qi.iter().zip(&kf[ko..ko + d]) {
                    dot += a * b;
                }
                scores.push(dot * scale);
                keys.push(j);
            }
        }
        if scores.is_empty() {
            lse.push(f64::NEG_INFINITY);
            return;
        }
        let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut l = 0.0f32;
        for s in scores.iter_mut() {
            *s = (*s - m).exp();
            l += *s;
        }
        acc.fill(0.0);
        for (&e, &j) in scores.iter().zip(&keys) {
            let p = T::from_f32(e / l).to_f32();
            let vo = shape.kv_offset(b, j, hk);
            for (a, &x) in acc.iter_mut().zip(&vf[vo..vo + d]) {
                *a += p * x;
            }
        }
        for (o, &a) in out[qo..qo + d].iter_mut().zip(&acc) {
            *o = f64::from(T::from_f32(a).to_f32());
        }
        lse.push(f64::from(m + l.ln()));
    });
    Ok(RefOutput { out, lse })
}

/// Outcome of [`compare`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Comparison {
    /// `max|out - ref64.out|`; NaN when `out` holds a NaN, infinite when lengths disagree.
    pub max_abs_err: f64,
    /// `max|lowp.out - ref64.out|`: the error of the naive low-precision implementation.
    pub naive_abs_err: f64,
    /// `2 * naive_abs_err + 1e-5`: the most `max_abs_err` may be.
    pub bound: f64,
    /// `max |lse - ref64.lse| / max(1, |ref64.lse|)` over rows; 0 when no LSE was given,
    /// infinite where exactly one side of a row is `-inf` (or lengths disagree), NaN when the
    /// given LSE holds a NaN.
    pub lse_max_rel_err: f64,
    /// Whether the output (and LSE, when given) passes the rule.
    pub passes: bool,
}

/// Absolute tolerance added to the bound of the output error.
pub const OUT_ABS_TOL: f64 = 1e-5;
/// Relative tolerance of the log-sum-exp, relative to `max(1, |ref|)`.
pub const LSE_REL_TOL: f64 = 1e-3;

/// `max |a - b|` over both slices, or NaN if any `a` is NaN, or infinity if lengths disagree.
fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    let mut worst = 0.0f64;
    for (&x, &y) in a.iter().zip(b) {
        let e = (x - y).abs();
        if e.is_nan() {
            return f64::NAN;
        }
        worst = worst.max(e);
    }
    worst
}

/// Applies the correctness rule to a kernel's `out` (and optionally `lse`), given the f64
/// reference `ref64` and the naive low-precision reference `lowp` of the same problem.
///
/// Passes iff nothing in `out` or `lse` is NaN, `max|out - ref64.out| <= 2 *
/// max|lowp.out - ref64.out| + 1e-5`, and, when `lse` is given, every row satisfies `|lse -
/// ref64.lse| <= 1e-3 * max(1, |ref64.lse|)`, where a row whose reference is `-inf` must be
/// exactly `-inf` and vice versa. Slices of the wrong length fail.
pub fn compare(
    out: &[f64],
    lse: Option<&[f32]>,
    ref64: &RefOutput,
    lowp: &RefOutput,
) -> Comparison {
    let max_abs_err = max_abs_diff(out, &ref64.out);
    let naive_abs_err = max_abs_diff(&lowp.out, &ref64.out);
    let bound = 2.0 * naive_abs_err + OUT_ABS_TOL;
    let out_ok = !max_abs_err.is_nan() && max_abs_err <= bound;

    let (lse_max_rel_err, lse_ok) = match lse {
        None => (0.0, true),
        Some(lse) if lse.len() != ref64.lse.len() => (f64::INFINITY, false),
        Some(lse) => {
            let mut worst = 0.0f64;
            let mut ok = true;
            for (&a, &b) in lse.iter().zip(&ref64.lse) {
                let a = f64::from(a);
                let rel = if a.is_nan() || b.is_nan() {
                    f64::NAN
                } else if a == b {
                    0.0
                } else if !a.is_finite() || !b.is_finite() {
                    f64::INFINITY
                } else {
                    (a - b).abs() / b.abs().max(1.0)
                };
                if rel.is_nan() || rel > LSE_REL_TOL {
                    ok = false;
                }
                worst = if rel.is_nan() || worst.is_nan() {
                    f64::NAN
                } else {
                    worst.max(rel)
                };
            }
            (worst, ok)
        }
    };

    Comparison {
        max_abs_err,
        naive_abs_err,
        bound,
        lse_max_rel_err,
        passes: out_ok && lse_ok,
    }
}

impl fmt::Display for Comparison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: max|out-ref64| = {:.3e} (bound {:.3e} = 2 * naive {:.3e} + {:.0e}), \
             lse max rel err = {:.3e} (tol {:.0e})",
            if self.passes { "pass" } else { "FAIL" },
            self.max_abs_err,
            self.bound,
            self.naive_abs_err,
            OUT_ABS_TOL,
            self.lse_max_rel_err,
            LSE_REL_TOL,
        )
    }
}
