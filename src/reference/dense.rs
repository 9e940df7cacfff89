//! Plain attention in f64 and in low precision (the yardsticks of the exact and block-sparse
//! kernels).

use super::{for_each_row, RefOutput, RefShape, Visibility};
use crate::dtype::Element;
use crate::error::Result;

/// Attention in f64: `softmax(scale * Q K^T + mask) V`.
///
/// The mask is [`MaskSpec::is_visible`](crate::mask::MaskSpec::is_visible) (bottom-right aligned diagonal). A row that sees no key
/// has output zero and log-sum-exp `-inf`. The log-sum-exp is `ln(sum_j exp(scale * q_i . k_j))`
/// over visible keys `j`.
///
/// # Errors
///
/// [`Error::InvalidArgument`](crate::error::Error::InvalidArgument) when a slice length disagrees with `shape` (or the shape's element
/// count overflows), [`Error::HeadsNotDivisible`](crate::error::Error::HeadsNotDivisible) when `heads_q` is not a multiple of
/// `heads_kv`, [`Error::ZeroSized`](crate::error::Error::ZeroSized) when `heads_kv` is zero.
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
/// Only by f32 arithmetic, but that is not nothing: a `P_j` within f32 noise of a tie between
/// two values of `T` rounds either way depending on the order of the score's sum (a bf16 `P` of
/// 0.59570313, 2e-8 from a tie, did). [`RefOutput::spread`] holds, per output element, the
/// most the unrounded output moves when one such `P_j` (within `rho_j = ln 2 * 2^-24 * (|scale
/// * log2 e| * sum_t |q_t k_t| + 1) + 2^-22` of a tie, relative) rounds the other way; the
/// correctness rule counts it as part of the naive error ([`compare`](super::compare)).
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
    let mut dots: Vec<(usize, f32, f32)> = Vec::with_capacity(sk);

    for_each_row(shape, |b, h, hk, i| {
        let qo = shape.q_offset(b, i, h);
        let qi = &qf[qo..qo + d];
        dots.clear();
        for j in 0..sk {
            if mask.visible(shape, b, h, i, j) {
                let ko = shape.kv_offset(b, j, hk);
                let (dot, mag) = dot_mag(qi, &kf[ko..ko + d]);
                dots.push((j, dot, mag));
            }
        }
        let value = |j: usize| &vf[shape.kv_offset(b, j, hk)..shape.kv_offset(b, j, hk) + d];
        out.row(qo..qo + d, &dots, scale, value);
    });
    Ok(out.finish())
}

/// A sequential f32 dot product and its sum of absolute terms (what [`LowpOutput::row`] takes).
pub(crate) fn dot_mag(a: &[f32], b: &[f32]) -> (f32, f32) {
    let (mut s, mut m) = (0.0f32, 0.0f32);
    for (x, y) in a.iter().zip(b) {
        s += x * y;
        m += (x * y).abs();
    }
    (s, m)
}

/// How far two f32 evaluations of the same scaled score `x = (q . k) * scale * log2 e` may
/// disagree, per unit of `|scale * log2 e| * sum_t |q_t k_t| + 1`: one f32 ulp of the sum of
/// absolute terms, which is several ulps of the dot product itself, the disagreement of a
/// sequential sum and a chunked one (a tensor core's) in all but rare cases. Wider would cover
/// more of those and loosen the rule everywhere: at 2^-20 the naive error of f16 rows of 512
/// keys doubled, at 2^-24 it grows by at most a few percent.
const P_NOISE_X: f32 = 1.0 / (1u32 << 24) as f32;
/// Relative disagreement of two evaluations of `exp2` (an approximate one, as kernels use, is
/// off by about 2^-22).
const P_NOISE_EXP2: f32 = 1.0 / (1u32 << 22) as f32;

/// The output of a low-precision reference, built row by row.
pub(crate) struct LowpOutput<T> {
    out: Vec<f64>,
    unrounded: Vec<f64>,
    spread: Vec<f64>,
    lse: Vec<f64>,
    acc: Vec<f32>,
    flips: Vec<(usize, f32)>,
    _t: std::marker::PhantomData<T>,
}

impl<T: Element> LowpOutput<T> {
    pub(crate) fn new(out_len: usize, rows: usize) -> Self {
        LowpOutput {
            out: vec![0.0; out_len],
            unrounded: vec![0.0; out_len],
            spread: vec![0.0; out_len],
            lse: Vec::with_capacity(rows),
            acc: Vec::new(),
            flips: Vec::new(),
            _t: std::marker::PhantomData,
        }
    }

    /// One row (output elements `at`) of [`attention_lowp`]'s arithmetic, from the row's visible
    /// keys, their unscaled f32 dot products and the dot products' sums of absolute terms
    /// (`sum_t |q_t k_t|`, in f32); `value(j)` is key `j`'s value row, widened.
    /// Rows must come in `lse` order.
    pub(crate) fn row<'v>(
        &mut self,
        at: std::ops::Range<usize>,
        dots: &[(usize, f32, f32)],
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
            .map(|&(_, s, _)| s * scale_log2)
            .fold(f32::NEG_INFINITY, f32::max);
        let base = x_max.ceil();
        self.acc.clear();
        self.acc.resize(at.len(), 0.0);
        self.flips.clear();
        let mut sum = 0.0f32;
        for &(j, s, mag) in dots {
            let exact = s.mul_add(scale_log2, -base).exp2();
            let p = T::from_f32(exact).to_f32();
            sum += p;
            for (a, &x) in self.acc.iter_mut().zip(value(j)) {
                *a += p * x;
            }
            // The rounding another order of the same f32 arithmetic may give (see `spread`).
            let rho =
                std::f32::consts::LN_2 * (mag * scale_log2.abs() + 1.0) * P_NOISE_X + P_NOISE_EXP2;
            let other = [exact * (1.0 - rho), exact * (1.0 + rho)]
                .map(|e| T::from_f32(e).to_f32())
                .into_iter()
                .find(|&r| r != p);
            if let Some(r) = other {
                self.flips.push((j, r - p));
            }
        }
        for ((o, u), &a) in self.out[at.clone()]
            .iter_mut()
            .zip(&mut self.unrounded[at.clone()])
            .zip(&self.acc)
        {
            let y = a / sum;
            *u = f64::from(y);
            *o = f64::from(T::from_f32(y).to_f32());
        }
        // What each flip moves the output by, (acc + dp v_j) / (sum + dp) - acc / sum; the
        // spread is the largest (the flips of a row are rare and independent).
        let spread = &mut self.spread[at.clone()];
        for &(j, dp) in &self.flips {
            let (dp, sum) = (f64::from(dp), f64::from(sum));
            for ((w, &a), &x) in spread.iter_mut().zip(&self.acc).zip(value(j)) {
                let a = f64::from(a);
                *w = w.max(((a + dp * f64::from(x)) / (sum + dp) - a / sum).abs());
            }
        }
        // The log-sum-exp of the exact exponentials of the scaled scores.
        let m = dots
            .iter()
            .map(|&(_, s, _)| s * scale)
            .fold(f32::NEG_INFINITY, f32::max);
        let l: f32 = dots.iter().map(|&(_, s, _)| (s * scale - m).exp()).sum();
        self.lse.push(f64::from(m + l.ln()));
    }

    pub(crate) fn finish(self) -> RefOutput {
        RefOutput {
            out: self.out,
            lse: self.lse,
            unrounded: self.unrounded,
            spread: self.spread,
            dtype: Some(T::DTYPE),
        }
    }
}
