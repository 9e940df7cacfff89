//! The correctness rule: a kernel's output and LSE against the f64 reference, with the naive
//! low-precision implementation's error as the budget.

use std::fmt;

use super::RefOutput;
use crate::dtype::DType;

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
    max_abs_diff_spread(a, b, &[])
}

/// `max(|a - b| + spread)`, with an empty `spread` read as zeros.
fn max_abs_diff_spread(a: &[f64], b: &[f64], spread: &[f64]) -> f64 {
    if a.len() != b.len() || !(spread.is_empty() || spread.len() == a.len()) {
        return f64::INFINITY;
    }
    let mut worst = 0.0f64;
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        let e = (x - y).abs() + spread.get(i).copied().unwrap_or(0.0);
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
/// `e_naive = max(|lowp.unrounded - ref64.out| + lowp.spread)` is the naive implementation's
/// error before its output is rounded to the output type (over the roundings of `P` its f32
/// arithmetic leaves open; see [`RefOutput::spread`](super::RefOutput::spread)), and `h_i` is half an ulp of that type at
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
    let naive_abs_err = max_abs_diff_spread(naive, &ref64.out, &lowp.spread);
    let computed = 2.0 * naive_abs_err + OUT_ABS_TOL;
    let rounding = |o: f64, r: f64| {
        lowp.dtype
            .map_or(0.0, |t| half_ulp(t, o.abs().max(r.abs())))
    };
    let (mut worst_ratio, mut worst_index, mut bound) = (0.0f64, 0usize, computed);
    if out.len() != ref64.out.len() || !naive_abs_err.is_finite() {
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

/// Absolute tolerance added to the bound of a gradient's error (see [`compare_gradient`]).
///
/// Larger than [`OUT_ABS_TOL`] for one reason: where a row sees a single key, the naive backward's
/// `dS = P (dP - D)` is exactly 0 (its `D = dO . O` and `dP = dO . V` are the same f32 dot product
/// in the same order, and `O = V`), so its error is 0, while a kernel computes `D` in a separate
/// pass and `dP` on the tensor cores in another order: an f32 difference of a few ulps of
/// `|dO . V|` (about 1e-6 at head dim 64 to 256 for unit-variance data) per row, which dK adds up
/// over the hundreds of rows that see the key. 1e-4 leaves room for that and is below a
/// half-ulp of bf16 and f16 gradients of magnitude 0.05 and 0.2.
pub const GRAD_ABS_TOL: f64 = 1e-4;

/// Outcome of [`compare_gradient`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GradComparison {
    /// `max|grad - ref64|`; NaN when `grad` holds a NaN, infinite when lengths disagree.
    pub max_abs_err: f64,
    /// `max|naive - ref64|`: the naive low-precision backward's error (its gradients rounded to
    /// the element type, as every implementation's are).
    pub naive_abs_err: f64,
    /// The largest allowance of any element: `2 * naive_abs_err + GRAD_ABS_TOL` plus its
    /// half-ulp.
    pub bound: f64,
    /// `max_i |grad_i - ref_i| / allowance_i`: at most 1 passes; NaN when `grad` holds a NaN.
    pub worst_ratio: f64,
    /// Index of the element where `worst_ratio` is reached.
    pub worst_index: usize,
    /// Whether the gradient passes.
    pub passes: bool,
}

/// The correctness rule of a backward pass, per gradient (dQ, dK or dV): every element must
/// satisfy `|grad_i - ref_i| <= 2 * e_naive + h_i + GRAD_ABS_TOL`, where `ref` is the f64
/// gradient ([`attention_backward_f64`](super::attention_backward_f64)), `e_naive =
/// max|naive - ref|` the largest error of the naive low-precision backward
/// ([`attention_backward_lowp`](super::attention_backward_lowp)) and `h_i` half an ulp of `dtype`
/// at `max(|grad_i|, |ref_i|)` (the final rounding every implementation pays): the rule
/// FlashAttention's tests apply to their backward, with the absolute term stated above. Nothing
/// may be NaN; slices of different lengths fail.
pub fn compare_gradient(
    grad: &[f64],
    ref64: &[f64],
    naive: &[f64],
    dtype: DType,
) -> GradComparison {
    let max_abs_err = max_abs_diff(grad, ref64);
    let naive_abs_err = max_abs_diff(naive, ref64);
    let computed = 2.0 * naive_abs_err + GRAD_ABS_TOL;
    let (mut worst_ratio, mut worst_index, mut bound) = (0.0f64, 0usize, computed);
    if grad.len() != ref64.len() || !naive_abs_err.is_finite() {
        worst_ratio = f64::INFINITY;
    } else {
        for (i, (&o, &r)) in grad.iter().zip(ref64).enumerate() {
            let allowed = computed + half_ulp(dtype, o.abs().max(r.abs()));
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
    GradComparison {
        max_abs_err,
        naive_abs_err,
        bound,
        worst_ratio,
        worst_index,
        passes: !max_abs_err.is_nan() && worst_ratio <= 1.0,
    }
}

impl fmt::Display for GradComparison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: max|grad-ref64| = {:.3e}; worst element {} at {:.3} of its allowance \
             (2 * naive {:.3e} + half-ulp + {:.0e}; at most {:.3e})",
            if self.passes { "pass" } else { "FAIL" },
            self.max_abs_err,
            self.worst_index,
            self.worst_ratio,
            self.naive_abs_err,
            GRAD_ABS_TOL,
            self.bound,
        )
    }
}
