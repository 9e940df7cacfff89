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
pub(crate) struct LowpOutput<T> {
    out: Vec<f64>,
    unrounded: Vec<f64>,
    lse: Vec<f64>,
    acc: Vec<f32>,
    _t: std::marker::PhantomData<T>,
}

impl<T: Element> LowpOutput<T> {
    pub(crate) fn new(out_len: usize, rows: usize) -> Self {
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
    pub(crate) fn row<'v>(
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

    pub(crate) fn finish(self) -> RefOutput {
        RefOutput {
            out: self.out,
            lse: self.lse,
            unrounded: self.unrounded,
            dtype: Some(T::DTYPE),
        }
    }
}
