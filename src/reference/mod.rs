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
//! [`attention_backward_f64`] gives the gradients of [`attention_f64`] with respect to q, k and v
//! for an upstream gradient of the output, analytically in f64 (checked against finite
//! differences in `tests/cpu_backward.rs`); [`attention_backward_lowp`] the same the way a plain
//! low-precision backward computes them from the naive forward's output, whose error is a
//! backward kernel's budget ([`attention_backward_lowp_given`]: from the output the kernel was
//! given).
//!
//! [`compare`] applies the correctness rule: a kernel output element passes when it is within
//! twice the naive implementation's error (before the naive's final rounding to the output type,
//! and over the roundings of probabilities that sit within f32 noise of a tie) plus half a unit in the last place of the output type, plus `1e-5`, of the f64 answer; nothing
//! is NaN; and its log-sum-exp matches the f64 one to `2 * e_naive + 1e-3` relative.
//!
//! All host data is contiguous `[batch, seqlen, heads, head_dim]` (bshd): `q` and `out` are
//! `[batch, seqlen_q, heads_q, head_dim]`, `k` and `v` are `[batch, seqlen_k, heads_kv,
//! head_dim]`, and `lse` is `[batch, heads_q, seqlen_q]`. Query head `h` reads key/value head
//! `h / (heads_q / heads_kv)` (grouped-query and multi-query attention).
//!
//! Which keys a query sees is [`MaskSpec::is_visible`], evaluated per element; nothing here
//! shares code with the kernels' tile plan.

use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::mask::MaskSpec;
use crate::sparse::BlockMask;

mod backward;
mod compare;
mod dense;
mod memory;
mod ring;
mod rope;
mod rope_backward;
mod serving;

pub use backward::{
    attention_backward_f64, attention_backward_lowp, attention_backward_lowp_given, RefGrads,
};
pub use compare::{
    compare, compare_gradient, half_ulp, Comparison, GradComparison, GRAD_ABS_TOL, LSE_REL_TOL,
    OUT_ABS_TOL,
};
pub use dense::{attention_f64, attention_lowp};
pub use memory::{
    memory_attention_f64, memory_attention_lowp, memory_attention_two_pass_lowp, memory_top_k,
    RefMemory,
};
pub use ring::{
    ring_attention_backward_f64, ring_attention_f64, ring_attention_lowp, ring_rope_attention_f64,
    ring_rope_attention_lowp,
};
pub use rope::{
    rope_attention_f64, rope_attention_f64_sparse, rope_attention_lowp, rope_attention_lowp_sparse,
    rope_rotate_k, rope_rotate_q,
};
pub use rope_backward::{
    rope_attention_backward_f64, rope_attention_backward_f64_sparse, rope_attention_backward_lowp,
    rope_attention_backward_lowp_given,
};
pub use serving::{
    paged_attention_f64, paged_attention_lowp, paged_gather, varlen_attention_f64,
    varlen_attention_lowp, PagedLayout, PagedShape, VarlenShape,
};

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
    pub(crate) fn check(&self, q: usize, k: usize, v: usize) -> Result<()> {
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
    pub(crate) fn q_offset(&self, b: usize, s: usize, h: usize) -> usize {
        ((b * self.seqlen_q + s) * self.heads_q + h) * self.head_dim
    }

    /// Offset of element `(b, s, h, 0)` of the key/value-shaped tensors.
    pub(crate) fn kv_offset(&self, b: usize, s: usize, h: usize) -> usize {
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
    /// For a low-precision reference, per element of `unrounded`: how far it moves when the
    /// probability that sits within f32 noise of a rounding tie rounds the other way (see
    /// [`attention_lowp`]); zero almost everywhere. Empty when not computed (the f64 reference,
    /// or references assembled from pieces without it): the rule then counts none.
    pub spread: Vec<f64>,
    /// For a low-precision reference: the element type its output is rounded to.
    pub dtype: Option<DType>,
}

impl RefOutput {
    /// The output in the element type `T`: exact for a low-precision reference, whose output is
    /// already rounded to `T` (a backward's given output, as its forward produced it).
    pub fn out_as<T: Element>(&self) -> Vec<T> {
        self.out.iter().map(|&x| T::from_f32(x as f32)).collect()
    }
}

/// Calls `row(b, h, kv_head, i)` for every output row, in output order of `lse`.
pub(crate) fn for_each_row(shape: &RefShape, mut row: impl FnMut(usize, usize, usize, usize)) {
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
