//! Naive CPU attention: the yardstick the kernels are measured against.
//!
//! Two implementations of the same formula, `softmax(scale * Q K^T + mask) V` per (batch, query
//! head):
//!
//! - [`attention_f64`] computes it in f64: the "true" answer, up to f64 rounding.
//! - [`attention_lowp`] computes it the way a plain low-precision implementation would: inputs
//!   in f16/bf16, scores and softmax in f32, the unnormalized probabilities rounded to the input
//!   type before `P V`, the f32 result divided by the sum of the rounded probabilities and
//!   rounded to the input type (see [`attention_lowp`] for the exact rounding points). Its
//!   distance from the f64 answer is the error budget a kernel is allowed.
//!
//! [`compare`] applies the correctness rule: a kernel output element passes when it is within
//! twice the naive implementation's error (before the naive's final rounding to the output type)
//! plus half a unit in the last place of the output type, plus `1e-5`, of the f64 answer; nothing
//! is NaN; and its log-sum-exp matches the f64 one to `2 * e_naive + 1e-3` relative.
//!
//! All host data is contiguous `[batch, seqlen, heads, head_dim]` (bshd): `q` and `out` are
//! `[batch, seqlen_q, heads_q, head_dim]`, `k` and `v` are `[batch, seqlen_k, heads_kv,
//! head_dim]`, and `lse` is `[batch, heads_q, seqlen_q]`. Query head `h` reads key/value head
//! `h / (heads_q / heads_kv)` (grouped-query and multi-query attention).
//!
//! Which keys a query sees is [`MaskSpec::is_visible`], evaluated per element; nothing here
//! shares code with the kernels' tile plan.

use std::fmt;

use crate::dtype::{DType, Element};
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
    /// For a low-precision reference: `out` before its final rounding to [`Self::dtype`] (the
    /// f32 values, widened). Empty for the f64 reference.
    pub unrounded: Vec<f64>,
    /// For a low-precision reference: the element type its output is rounded to.
    pub dtype: Option<DType>,
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
    RefOutput {
        out,
        lse,
        ..RefOutput::default()
    }
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
    Ok(RefOutput {
        out,
        lse,
        ..RefOutput::default()
    })
}

/// Attention computed the way a plain low-precision implementation would.
///
/// Inputs are in `T`. Each score is the f32 dot product of the widened `T` values. Per row, in
/// f32, with `x_j = dot_j * (scale * log2 e)`:
///
/// - the exponent base is `B = ceil(max_j x_j)`, an integer;
/// - the probabilities `P_j = exp2(x_j - B)` (largest in `(1/2, 1]`) are rounded to `T`;
/// - `out = (sum_j P_T[j] V[j]) / (sum_j P_T[j])`, both sums in f32, rounded to `T`.
///
/// These are the rounding points of a one-pass (online softmax) kernel whose running base moves
/// by whole powers of two: every `P_T[j]` it rounds is this one times an exact power of two, so
/// its error differs from this implementation's only by f32 arithmetic, not by a different draw
/// of the roundings of `P`. (Rounding the normalized probabilities instead is equally accurate,
/// but its roundings are independent of the kernel's, and on outputs of few elements two
/// independent draws of equal accuracy differ by more than 2x about once in a thousand.)
///
/// The log-sum-exp is `m + ln(l)` in f32, with `m` the largest scaled score and `l` the sum of
/// the exact (unrounded) `exp(s - m)`. Everything is returned widened to f64 (exactly), with the
/// output before its final rounding in [`RefOutput::unrounded`]. A row that sees no key has output
/// zero and log-sum-exp `-inf`.
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
    let mut out = LowpOutput::<T>::new(q.len(), shape.batch * shape.heads_q * sq);
    let mut dots: Vec<(usize, f32)> = Vec::with_capacity(sk);

    for_each_row(shape, |b, h, hk, i| {
        let qo = shape.q_offset(b, i, h);
        let qi = &qf[qo..qo + d];
        dots.clear();
        for j in 0..sk {
            if mask.visible(shape, b, h, i, j) {
                let ko = shape.kv_offset(b, j, hk);
                let mut dot = 0.0f32;
                for (a, b) in qi.iter().zip(&kf[ko..ko + d]) {
                    dot += a * b;
                }
                dots.push((j, dot));
            }
        }
        let value = |j: usize| &vf[shape.kv_offset(b, j, hk)..shape.kv_offset(b, j, hk) + d];
        out.row(qo..qo + d, &dots, scale, value);
    });
    Ok(out.finish())
}

/// The output of a low-precision reference, built row by row.
struct LowpOutput<T> {
    out: Vec<f64>,
    unrounded: Vec<f64>,
    lse: Vec<f64>,
    acc: Vec<f32>,
    _t: std::marker::PhantomData<T>,
}

impl<T: Element> LowpOutput<T> {
    fn new(out_len: usize, rows: usize) -> Self {
        LowpOutput {
            out: vec![0.0; out_len],
            unrounded: vec![0.0; out_len],
            lse: Vec::with_capacity(rows),
            acc: Vec::new(),
            _t: std::marker::PhantomData,
        }
    }

    /// One row (output elements `at`) of [`attention_lowp`]'s arithmetic, from the row's visible
    /// keys and their unscaled f32 dot products; `value(j)` is key `j`'s value row, widened.
    /// Rows must come in `lse` order.
    fn row<'v>(
        &mut self,
        at: std::ops::Range<usize>,
        dots: &[(usize, f32)],
        scale: f32,
        value: impl Fn(usize) -> &'v [f32],
    ) {
        if dots.is_empty() {
            self.lse.push(f64::NEG_INFINITY);
            return;
        }
        let scale_log2 = scale * std::f32::consts::LOG2_E;
        let x_max = dots
            .iter()
            .map(|&(_, s)| s * scale_log2)
            .fold(f32::NEG_INFINITY, f32::max);
        let base = x_max.ceil();
        self.acc.clear();
        self.acc.resize(at.len(), 0.0);
        let mut sum = 0.0f32;
        for &(j, s) in dots {
            let p = T::from_f32(s.mul_add(scale_log2, -base).exp2()).to_f32();
            sum += p;
            for (a, &x) in self.acc.iter_mut().zip(value(j)) {
                *a += p * x;
            }
        }
        for ((o, u), &a) in self.out[at.clone()]
            .iter_mut()
            .zip(&mut self.unrounded[at])
            .zip(&self.acc)
        {
            let y = a / sum;
            *u = f64::from(y);
            *o = f64::from(T::from_f32(y).to_f32());
        }
        // The log-sum-exp of the exact exponentials of the scaled scores.
        let m = dots
            .iter()
            .map(|&(_, s)| s * scale)
            .fold(f32::NEG_INFINITY, f32::max);
        let l: f32 = dots.iter().map(|&(_, s)| (s * scale - m).exp()).sum();
        self.lse.push(f64::from(m + l.ln()));
    }

    fn finish(self) -> RefOutput {
        RefOutput {
            out: self.out,
            lse: self.lse,
            unrounded: self.unrounded,
            dtype: Some(T::DTYPE),
        }
    }
}

/// Outcome of [`compare`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Comparison {
    /// `max|out - ref64.out|`; NaN when `out` holds a NaN, infinite when lengths disagree.
    pub max_abs_err: f64,
    /// `max|lowp.unrounded - ref64.out|`: the error of the naive low-precision implementation
    /// before its final rounding to the output type (of `lowp.out` when it has no unrounded
    /// output).
    pub naive_abs_err: f64,
    /// The largest error any element may have: `2 * naive_abs_err + 1e-5` plus the largest
    /// half-ulp allowance of any element. An element's own allowance uses the half ulp of its own
    /// magnitude.
    pub bound: f64,
    /// `max_i |out_i - ref_i| / allowance_i` over the elements: at most 1 passes; NaN when `out`
    /// holds a NaN.
    pub worst_ratio: f64,
    /// Index of the element where `worst_ratio` is reached.
    pub worst_index: usize,
    /// `max |lse - ref64.lse| / max(1, |ref64.lse|)` over rows; 0 when no LSE was given,
    /// infinite where exactly one side of a row is `-inf` (or lengths disagree), NaN when the
    /// given LSE holds a NaN.
    pub lse_max_rel_err: f64,
    /// The most `lse_max_rel_err` may be: `2 * (the naive implementation's) + LSE_REL_TOL`.
    pub lse_bound: f64,
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

/// Half a unit in the last place of `dtype` at magnitude `x` (finite, >= 0): the most that
/// rounding a value of that magnitude to `dtype` can move it (0 for 0).
pub fn half_ulp(dtype: DType, x: f64) -> f64 {
    if x == 0.0 || !x.is_finite() {
        return 0.0;
    }
    // Significant bits and the smallest normal exponent of the type.
    let (bits, min_exp) = match dtype {
        DType::F16 => (11, -14),
        DType::Bf16 => (8, -126),
    };
    let exp = ((x.abs().to_bits() >> 52) & 0x7ff) as i32 - 1023; // floor(log2 |x|), x normal in f64
    2f64.powi(exp.max(min_exp) - bits)
}

/// Applies the correctness rule to a kernel's `out` (and optionally `lse`), given the f64
/// reference `ref64` and the naive low-precision reference `lowp` of the same problem.
///
/// Every output element must satisfy `|out_i - ref_i| <= 2 * e_naive + h_i + 1e-5`, where
/// `e_naive = max|lowp.unrounded - ref64.out|` is the naive implementation's error before its
/// output is rounded to the output type, and `h_i` is half an ulp of that type at
/// `max(|out_i|, |ref_i|)`: the final rounding that every implementation of the type pays. (A
/// rule on the rounded naive output, `2 * max|lowp.out - ref| + 1e-5`, measures on outputs of
/// few elements mostly whether the naive output happened to round close to the answer: an
/// implementation of the same accuracy failed it about once in a thousand such cases.) With
/// no `lowp.dtype` the rule is the same without `h_i`, and `lowp.out` stands in for
/// `lowp.unrounded` when that is empty.
///
/// Nothing in `out` or `lse` may be NaN; when `lse` is given, every row must satisfy `|lse -
/// ref64.lse| / max(1, |ref64.lse|) <= 2 * e_naive_lse + 1e-3`, where `e_naive_lse` is the same
/// relative error of `lowp.lse` at its worst row (about 1e-7 for inputs used as given, so the
/// bound is 1e-3 then), and a row whose reference is `-inf` must be exactly `-inf` and vice
/// versa. Slices of the wrong length fail.
pub fn compare(
    out: &[f64],
    lse: Option<&[f32]>,
    ref64: &RefOutput,
    lowp: &RefOutput,
) -> Comparison {
    let max_abs_err = max_abs_diff(out, &ref64.out);
    let naive = if lowp.unrounded.is_empty() {
        &lowp.out
    } else {
        &lowp.unrounded
    };
    let naive_abs_err = max_abs_diff(naive, &ref64.out);
    let computed = 2.0 * naive_abs_err + OUT_ABS_TOL;
    let rounding = |o: f64, r: f64| {
        lowp.dtype
            .map_or(0.0, |t| half_ulp(t, o.abs().max(r.abs())))
    };
    let (mut worst_ratio, mut worst_index, mut bound) = (0.0f64, 0usize, computed);
    if out.len() != ref64.out.len() || naive_abs_err.is_nan() {
        worst_ratio = f64::INFINITY;
    } else {
        for (i, (&o, &r)) in out.iter().zip(&ref64.out).enumerate() {
            let allowed = computed + rounding(o, r);
            bound = bound.max(allowed);
            let ratio = (o - r).abs() / allowed;
            if ratio.is_nan() {
                worst_ratio = f64::NAN;
                worst_index = i;
                break;
            }
            if ratio > worst_ratio {
                worst_ratio = ratio;
                worst_index = i;
            }
        }
    }
    let out_ok = !max_abs_err.is_nan() && worst_ratio <= 1.0;

    // The LSE may be off by twice what the naive low-precision implementation is off by, plus
    // LSE_REL_TOL: the same principle as the output. For 16-bit inputs used as given the naive
    // LSE error is ~1e-7 and the bound is LSE_REL_TOL; when the score's inputs are themselves
    // rounded (rotated q and k in RoPE), every implementation inherits that rounding.
    let naive_lse_rel_err = if lowp.lse.len() == ref64.lse.len() {
        lowp.lse
            .iter()
            .zip(&ref64.lse)
            .map(|(&a, &b)| lse_rel_err(a, b))
            .fold(0.0f64, f64::max)
    } else {
        f64::INFINITY
    };
    let lse_bound = 2.0 * naive_lse_rel_err + LSE_REL_TOL;
    let (lse_max_rel_err, lse_ok) = match lse {
        None => (0.0, true),
        Some(lse) if lse.len() != ref64.lse.len() => (f64::INFINITY, false),
        Some(lse) => {
            let mut worst = 0.0f64;
            let mut ok = true;
            for (&a, &b) in lse.iter().zip(&ref64.lse) {
                let rel = lse_rel_err(f64::from(a), b);
                if rel.is_nan() || rel > lse_bound {
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
        worst_ratio,
        worst_index,
        lse_max_rel_err,
        lse_bound,
        passes: out_ok && lse_ok,
    }
}

/// `|a - b| / max(1, |b|)`; 0 when equal (both `-inf` included), infinite when exactly one is
/// infinite, NaN when either is NaN.
fn lse_rel_err(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else if a == b {
        0.0
    } else if !a.is_finite() || !b.is_finite() {
        f64::INFINITY
    } else {
        (a - b).abs() / b.abs().max(1.0)
    }
}

impl fmt::Display for Comparison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: max|out-ref64| = {:.3e}; worst element {} at {:.3} of its allowance \
             (2 * naive {:.3e} + half-ulp + {:.0e}; at most {:.3e}), \
             lse max rel err = {:.3e} (bound {:.3e})",
            if self.passes { "pass" } else { "FAIL" },
            self.max_abs_err,
            self.worst_index,
            self.worst_ratio,
            self.naive_abs_err,
            OUT_ABS_TOL,
            self.bound,
            self.lse_max_rel_err,
            self.lse_bound,
        )
    }
}

// Rotary position embeddings: RoPE, ReRoPE and Leaky ReRoPE (DESIGN.md section 3).

use crate::rope::{rotate, PositionMode, RopeLayout, RopeOptions};

/// Validates a rotary problem and returns its inverse-frequency table and attention factor.
///
/// The table is `rope.config.inv_freq(head_dim, seqlen_k + max offset)`: the current sequence
/// length is the largest key position plus one, over all batch entries.
fn rope_tables(shape: &RefShape, rope: &RopeOptions) -> Result<(Vec<f64>, f64)> {
    rope.validate(shape.head_dim, shape.batch, shape.seqlen_q, shape.seqlen_k)?;
    let seq_len = shape
        .seqlen_k
        .checked_add(rope.max_offset() as usize)
        .ok_or_else(|| Error::InvalidArgument {
            arg: "rope.position_offsets",
            value: rope.max_offset().to_string(),
            expected: "seqlen_k + offset that fits in usize".into(),
        })?;
    let inv_freq = rope.config.inv_freq(shape.head_dim, seq_len)?;
    Ok((inv_freq, rope.config.attention_factor()))
}

/// Where a query at position `p` is rotated to for a pair outside the window: `w` for ReRoPE,
/// `p / k + w - w / k` for Leaky ReRoPE (`p` for plain RoPE, which has no outside).
fn rope_outside_q_position(mode: &PositionMode, p: i64) -> f64 {
    match *mode {
        PositionMode::Rope => p as f64,
        PositionMode::ReRope { window } => f64::from(window),
        PositionMode::LeakyReRope { window, leak } => {
            let w = f64::from(window);
            p as f64 / leak + w - w / leak
        }
    }
}

/// Where a key at position `p` is rotated to for a pair outside the window: 0 (not rotated)
/// for ReRoPE, `p / k` for Leaky ReRoPE (`p` for plain RoPE).
fn rope_outside_k_position(mode: &PositionMode, p: i64) -> f64 {
    match *mode {
        PositionMode::Rope => p as f64,
        PositionMode::ReRope { .. } => 0.0,
        PositionMode::LeakyReRope { leak, .. } => p as f64 / leak,
    }
}

/// Whether a pair at relative position `rel = p_i - p_j` takes the inside (plain RoPE) score.
fn rope_inside(mode: &PositionMode, rel: i64) -> bool {
    match *mode {
        PositionMode::Rope => true,
        PositionMode::ReRope { window } | PositionMode::LeakyReRope { window, .. } => {
            rel < i64::from(window)
        }
    }
}

/// Causal attention with rotary positions, in f64: the definition the fused ReRoPE kernel is
/// measured against.
///
/// Q and K arrive un-rotated. Positions are those of [`RopeOptions`] (key `j` of batch entry `b`
/// at `off_b + j`, query `i` at `off_b + seqlen_k - seqlen_q + i`), the mask is causal and
/// bottom-right aligned ([`MaskSpec::causal`], with `rope.window_left` as a sliding window when
/// set). For each (batch entry, query head) two full
/// score matrices are built, following Jianlin Su's two-matrix formulation (bojone/rerope),
/// with `q~_i = logn(p_i) * q_i` (log-n scaling, 1 when off) and `R_x` the rotation of
/// [`crate::rope::rotate`] to position `x`, its rotated part multiplied by the attention factor
/// `a`:
///
/// - inside: `S_in[i][j] = scale * (R_{p_i} q~_i) . (R_{p_j} k_j)`;
/// - outside, ReRoPE: `S_out[i][j] = scale * (R_w q~_i) . (R_0 k_j)` (k not rotated);
/// - outside, Leaky ReRoPE: `S_out[i][j] = scale * (R_{p_i/k + w - w/k} q~_i) .
///   (R_{p_j/k} k_j)`.
///
/// The score of a pair is `S_in` where `p_i - p_j < w` (always for plain RoPE, which builds no
/// `S_out`) and `S_out` elsewhere. Transformers multiplies `cos` and `sin` by YaRN's attention
/// factor, which scales the rotated part of both q and k. Here it does so in every branch,
/// ReRoPE's unrotated key included (`R_0 k = a k` on the rotated part), so all branches agree
/// with plain RoPE inside the window. With `rotary_dim == head_dim` this is every score times
/// `a^2`; with partial rotary only the rotated part of the dot product is. Entries the causal
/// mask hides are never computed. The output is the softmax over visible keys times
/// V; a row that sees no key has output zero and log-sum-exp `-inf`, as [`attention_f64`].
///
/// The inverse frequencies are `rope.config.inv_freq(head_dim, seqlen_k + max offset)`.
///
/// # Errors
///
/// As [`attention_f64`], and as [`RopeOptions::validate`].
pub fn rope_attention_f64(
    shape: &RefShape,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    rope: &RopeOptions,
    scale: f64,
) -> Result<RefOutput> {
    rope_attention_f64_impl(shape, q, k, v, rope, None, scale)
}

/// [`rope_attention_f64`] restricted to the blocks a block mask lists: a pair is visible when
/// the causal (and window) mask allows it and `blocks.is_visible(b, h, i, j)`. `blocks` must
/// carry the same element mask (`rope.mask()`).
pub fn rope_attention_f64_sparse(
    shape: &RefShape,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    rope: &RopeOptions,
    blocks: &BlockMask,
    scale: f64,
) -> Result<RefOutput> {
    rope_attention_f64_impl(shape, q, k, v, rope, Some(blocks), scale)
}

fn rope_attention_f64_impl(
    shape: &RefShape,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    rope: &RopeOptions,
    blocks: Option<&BlockMask>,
    scale: f64,
) -> Result<RefOutput> {
    shape.check(q.len(), k.len(), v.len())?;
    let (inv_freq, af) = rope_tables(shape, rope)?;
    let layout = rope.config.layout;
    let mode = &rope.mode;
    let two = !matches!(mode, PositionMode::Rope);
    let d = shape.head_dim;
    let (sq, sk) = (shape.seqlen_q, shape.seqlen_k);
    let group = shape.heads_q / shape.heads_kv;
    let mask = rope.mask();
    let mut out = vec![0.0f64; q.len()];
    let mut lse = Vec::with_capacity(shape.batch * shape.heads_q * sq);

    // Multiplied by `mul` (log-n), then rotated to `position`.
    let rotated = |x: &[f64], mul: f64, position: f64| -> Vec<f64> {
        let mut y: Vec<f64> = x.iter().map(|a| a * mul).collect();
        rotate(&mut y, position, &inv_freq, layout, af);
        y
    };
    let dot = |a: &[f64], b: &[f64]| -> f64 { a.iter().zip(b).map(|(x, y)| x * y).sum() };

    let mut s_in = vec![f64::NEG_INFINITY; sq * sk];
    let mut s_out = vec![f64::NEG_INFINITY; if two { sq * sk } else { 0 }];
    let mut acc = vec![0.0f64; d];
    for b in 0..shape.batch {
        let pq: Vec<i64> = (0..sq).map(|i| rope.query_position(b, i, sq, sk)).collect();
        let pk: Vec<i64> = (0..sk).map(|j| rope.key_position(b, j)).collect();
        for h in 0..shape.heads_q {
            let hk = h / group;
            let qv = |i: usize| &q[shape.q_offset(b, i, h)..shape.q_offset(b, i, h) + d];
            let kv = |j: usize| &k[shape.kv_offset(b, j, hk)..shape.kv_offset(b, j, hk) + d];
            let q_in: Vec<Vec<f64>> = (0..sq)
                .map(|i| rotated(qv(i), rope.log_n_scale(pq[i]), pq[i] as f64))
                .collect();
            let k_in: Vec<Vec<f64>> = (0..sk).map(|j| rotated(kv(j), 1.0, pk[j] as f64)).collect();
            let (q_out, k_out): (Vec<Vec<f64>>, Vec<Vec<f64>>) = if two {
                (
                    (0..sq)
                        .map(|i| {
                            let p = rope_outside_q_position(mode, pq[i]);
                            rotated(qv(i), rope.log_n_scale(pq[i]), p)
                        })
                        .collect(),
                    (0..sk)
                        .map(|j| rotated(kv(j), 1.0, rope_outside_k_position(mode, pk[j])))
                        .collect(),
                )
            } else {
                (Vec::new(), Vec::new())
            };

            // The two score matrices.
            s_in.fill(f64::NEG_INFINITY);
            s_out.fill(f64::NEG_INFINITY);
            for i in 0..sq {
                for j in 0..sk {
                    if mask.is_visible(sq, sk, i, j)
                        && blocks.is_none_or(|bm| bm.is_visible(b, h, i, j))
                    {
                        s_in[i * sk + j] = scale * dot(&q_in[i], &k_in[j]);
                        if two {
                            s_out[i * sk + j] = scale * dot(&q_out[i], &k_out[j]);
                        }
                    }
                }
            }

            // Select per element, then softmax over the visible keys of each row.
            for i in 0..sq {
                let row: Vec<(usize, f64)> = (0..sk)
                    .filter(|&j| {
                        mask.is_visible(sq, sk, i, j)
                            && blocks.is_none_or(|bm| bm.is_visible(b, h, i, j))
                    })
                    .map(|j| {
                        let s = if rope_inside(mode, pq[i] - pk[j]) {
                            s_in[i * sk + j]
                        } else {
                            s_out[i * sk + j]
                        };
                        (j, s)
                    })
                    .collect();
                if row.is_empty() {
                    lse.push(f64::NEG_INFINITY);
                    continue;
                }
                let m = row
                    .iter()
                    .map(|&(_, s)| s)
                    .fold(f64::NEG_INFINITY, f64::max);
                let mut l = 0.0f64;
                acc.fill(0.0);
                for &(j, s) in &row {
                    let p = (s - m).exp();
                    l += p;
                    let vo = shape.kv_offset(b, j, hk);
                    for (a, &x) in acc.iter_mut().zip(&v[vo..vo + d]) {
                        *a += p * x;
                    }
                }
                let qo = shape.q_offset(b, i, h);
                for (o, a) in out[qo..qo + d].iter_mut().zip(&acc) {
                    *o = a / l;
                }
                lse.push(m + l.ln());
            }
        }
    }
    Ok(RefOutput {
        out,
        lse,
        ..RefOutput::default()
    })
}

/// Rotates the first `2 * inv_freq.len()` elements of `x` in f32, with `a cos` and `a sin` of
/// the angle `position * inv_freq[f]` (computed in f64, `a` the attention factor) rounded to f32.
fn rope_rotate_f32(x: &mut [f32], position: f64, inv_freq: &[f64], layout: RopeLayout, af: f64) {
    let half = inv_freq.len();
    for (f, &w) in inv_freq.iter().enumerate() {
        let (a, b) = match layout {
            RopeLayout::HalfSplit => (f, f + half),
            RopeLayout::Interleaved => (2 * f, 2 * f + 1),
        };
        let (sin, cos) = (position * w).sin_cos();
        let (sin, cos) = ((af * sin) as f32, (af * cos) as f32);
        let (xa, xb) = (x[a], x[b]);
        x[a] = xa * cos - xb * sin;
        x[b] = xa * sin + xb * cos;
    }
}

/// [`rope_attention_f64`] computed the way a plain low-precision implementation would
/// (DESIGN.md section 5).
///
/// Inputs are in `T`. Each rotated q and k is computed in f32 (q widened and multiplied by its
/// log-n factor in f32 first) from f32 `a cos`/`a sin` (`a` the attention factor) of an angle
/// computed in f64, and rounded to `T`, as an implementation that rotates first and stores the
/// result in `T` would (ReRoPE's unrotated keys are rotated to position 0: with `a = 1`, the
/// inputs themselves). Scores are f32 dot products of those `T` values; from there each row is
/// computed as in [`attention_lowp`] (probabilities rounded to `T` against a power-of-two base,
/// the output normalized by their sum and rounded to `T`, the log-sum-exp from the exact
/// exponentials). The inside/outside selection and the positions are those of
/// [`rope_attention_f64`]. Everything is returned widened to f64 (exactly).
///
/// # Errors
///
/// As [`rope_attention_f64`].
pub fn rope_attention_lowp<T: Element>(
    shape: &RefShape,
    q: &[T],
    k: &[T],
    v: &[T],
    rope: &RopeOptions,
    scale: f32,
) -> Result<RefOutput> {
    rope_attention_lowp_impl(shape, q, k, v, rope, None, scale)
}

/// [`rope_attention_lowp`] restricted to the blocks a block mask lists (see
/// [`rope_attention_f64_sparse`]).
pub fn rope_attention_lowp_sparse<T: Element>(
    shape: &RefShape,
    q: &[T],
    k: &[T],
    v: &[T],
    rope: &RopeOptions,
    blocks: &BlockMask,
    scale: f32,
) -> Result<RefOutput> {
    rope_attention_lowp_impl(shape, q, k, v, rope, Some(blocks), scale)
}

fn rope_attention_lowp_impl<T: Element>(
    shape: &RefShape,
    q: &[T],
    k: &[T],
    v: &[T],
    rope: &RopeOptions,
    blocks: Option<&BlockMask>,
    scale: f32,
) -> Result<RefOutput> {
    shape.check(q.len(), k.len(), v.len())?;
    let (inv_freq, af) = rope_tables(shape, rope)?;
    let layout = rope.config.layout;
    let mode = &rope.mode;
    let two = !matches!(mode, PositionMode::Rope);
    let d = shape.head_dim;
    let (sq, sk) = (shape.seqlen_q, shape.seqlen_k);
    let group = shape.heads_q / shape.heads_kv;
    let mask = rope.mask();
    let mut out = LowpOutput::<T>::new(q.len(), shape.batch * shape.heads_q * sq);
    let vf: Vec<f32> = v.iter().map(|t| t.to_f32()).collect();

    // Widened, optionally multiplied, rotated in f32 and rounded to `T`.
    let rotated = |x: &[T], mul: f32, position: f64| -> Vec<f32> {
        let mut y: Vec<f32> = x.iter().map(|t| t.to_f32() * mul).collect();
        rope_rotate_f32(&mut y, position, &inv_freq, layout, af);
        y.iter().map(|&a| T::from_f32(a).to_f32()).collect()
    };
    let dot = |a: &[f32], b: &[f32]| -> f32 {
        let mut s = 0.0f32;
        for (x, y) in a.iter().zip(b) {
            s += x * y;
        }
        s
    };

    let mut s_in = vec![f32::NEG_INFINITY; sq * sk];
    let mut s_out = vec![f32::NEG_INFINITY; if two { sq * sk } else { 0 }];
    let mut row: Vec<(usize, f32)> = Vec::with_capacity(sk);
    for b in 0..shape.batch {
        let pq: Vec<i64> = (0..sq).map(|i| rope.query_position(b, i, sq, sk)).collect();
        let pk: Vec<i64> = (0..sk).map(|j| rope.key_position(b, j)).collect();
        for h in 0..shape.heads_q {
            let hk = h / group;
            let qv = |i: usize| &q[shape.q_offset(b, i, h)..shape.q_offset(b, i, h) + d];
            let kv = |j: usize| &k[shape.kv_offset(b, j, hk)..shape.kv_offset(b, j, hk) + d];
            let logn = |i: usize| rope.log_n_scale(pq[i]) as f32;
            let q_in: Vec<Vec<f32>> = (0..sq)
                .map(|i| rotated(qv(i), logn(i), pq[i] as f64))
                .collect();
            let k_in: Vec<Vec<f32>> = (0..sk).map(|j| rotated(kv(j), 1.0, pk[j] as f64)).collect();
            let (q_out, k_out): (Vec<Vec<f32>>, Vec<Vec<f32>>) = if two {
                (
                    (0..sq)
                        .map(|i| {
                            let p = rope_outside_q_position(mode, pq[i]);
                            rotated(qv(i), logn(i), p)
                        })
                        .collect(),
                    (0..sk)
                        .map(|j| rotated(kv(j), 1.0, rope_outside_k_position(mode, pk[j])))
                        .collect(),
                )
            } else {
                (Vec::new(), Vec::new())
            };

            s_in.fill(f32::NEG_INFINITY);
            s_out.fill(f32::NEG_INFINITY);
            for i in 0..sq {
                for j in 0..sk {
                    if mask.is_visible(sq, sk, i, j)
                        && blocks.is_none_or(|bm| bm.is_visible(b, h, i, j))
                    {
                        s_in[i * sk + j] = dot(&q_in[i], &k_in[j]);
                        if two {
                            s_out[i * sk + j] = dot(&q_out[i], &k_out[j]);
                        }
                    }
                }
            }

            for i in 0..sq {
                row.clear();
                for j in 0..sk {
                    if mask.is_visible(sq, sk, i, j)
                        && blocks.is_none_or(|bm| bm.is_visible(b, h, i, j))
                    {
                        let s = if rope_inside(mode, pq[i] - pk[j]) {
                            s_in[i * sk + j]
                        } else {
                            s_out[i * sk + j]
                        };
                        row.push((j, s));
                    }
                }
                let qo = shape.q_offset(b, i, h);
                let value =
                    |j: usize| &vf[shape.kv_offset(b, j, hk)..shape.kv_offset(b, j, hk) + d];
                out.row(qo..qo + d, &row, scale, value);
            }
        }
    }
    Ok(out.finish())
}

/// Checks that `x` holds `batch * seqlen * heads * head_dim` elements.
fn rope_check_len(
    arg: &'static str,
    len: usize,
    dims: [usize; 4],
    formula: &'static str,
) -> Result<()> {
    let want = dims.iter().try_fold(1usize, |a, &b| a.checked_mul(b));
    if want == Some(len) {
        Ok(())
    } else {
        Err(Error::InvalidArgument {
            arg,
            value: len.to_string(),
            expected: match want {
                Some(w) => format!("{w} elements ({formula})"),
                None => format!("a shape whose element count fits in usize ({formula})"),
            },
        })
    }
}

/// Queries rotated as plain RoPE sees them, in f64: `q'_i = R_{p_i}(logn(p_i) q_i)` with the
/// rotated part multiplied by the attention factor (query positions, log-n scaling and the
/// table of [`rope_attention_f64`]). With [`rope_rotate_k`], `attention_f64(q', k', v, causal,
/// scale)` is [`rope_attention_f64`] in [`PositionMode::Rope`]: pre-rotated inputs for a plain
/// attention kernel.
///
/// # Errors
///
/// [`Error::InvalidArgument`] for `q.len` when it is not `batch * seqlen_q * heads_q *
/// head_dim`; as [`RopeOptions::validate`].
pub fn rope_rotate_q(shape: &RefShape, q: &[f64], rope: &RopeOptions) -> Result<Vec<f64>> {
    rope_check_len(
        "q.len",
        q.len(),
        [shape.batch, shape.seqlen_q, shape.heads_q, shape.head_dim],
        "batch * seqlen_q * heads_q * head_dim",
    )?;
    let (inv_freq, af) = rope_tables(shape, rope)?;
    let d = shape.head_dim;
    let (sq, sk) = (shape.seqlen_q, shape.seqlen_k);
    let mut y = q.to_vec();
    for b in 0..shape.batch {
        for i in 0..sq {
            let p = rope.query_position(b, i, sq, sk);
            let logn = rope.log_n_scale(p);
            for h in 0..shape.heads_q {
                let o = shape.q_offset(b, i, h);
                let x = &mut y[o..o + d];
                x.iter_mut().for_each(|a| *a *= logn);
                rotate(x, p as f64, &inv_freq, rope.config.layout, af);
            }
        }
    }
    Ok(y)
}

/// Keys rotated as plain RoPE sees them, in f64: `k'_j = R_{p_j} k_j` with the rotated part
/// multiplied by the attention factor (key positions and table of [`rope_attention_f64`]). See
/// [`rope_rotate_q`].
///
/// # Errors
///
/// [`Error::InvalidArgument`] for `k.len` when it is not `batch * seqlen_k * heads_kv *
/// head_dim`; as [`RopeOptions::validate`].
pub fn rope_rotate_k(shape: &RefShape, k: &[f64], rope: &RopeOptions) -> Result<Vec<f64>> {
    rope_check_len(
        "k.len",
        k.len(),
        [shape.batch, shape.seqlen_k, shape.heads_kv, shape.head_dim],
        "batch * seqlen_k * heads_kv * head_dim",
    )?;
    let (inv_freq, af) = rope_tables(shape, rope)?;
    let d = shape.head_dim;
    let mut y = k.to_vec();
    for b in 0..shape.batch {
        for j in 0..shape.seqlen_k {
            let p = rope.key_position(b, j);
            for h in 0..shape.heads_kv {
                let o = shape.kv_offset(b, j, h);
                rotate(
                    &mut y[o..o + d],
                    p as f64,
                    &inv_freq,
                    rope.config.layout,
                    af,
                );
            }
        }
    }
    Ok(y)
}
