//! Ring attention on the CPU: the schedule of a [`RingPlan`] run with the f64 reference, each
//! rank's steps merged by log-sum-exp in step order, as a ring of GPUs runs it. It equals
//! attention over the whole sequence up to f64 rounding; `tests/cpu_ring.rs` checks that, and the
//! GPU ring's results are compared with it.

use super::dense::attention_f64;
use super::{merge, RefOutput, RefShape};
use crate::error::{Error, Result};
use crate::mask::MaskSpec;
use crate::ring::{PairMask, RingPlan};

/// Rows `rows` of a `[batch, seqlen, heads, head_dim]` tensor of `seqlen` rows, as a tensor of
/// their own.
fn gather(
    x: &[f64],
    batch: usize,
    seqlen: usize,
    row: usize,
    rows: &[std::ops::Range<usize>],
) -> Vec<f64> {
    let mut out = Vec::new();
    for b in 0..batch {
        for r in rows {
            out.extend_from_slice(&x[(b * seqlen + r.start) * row..(b * seqlen + r.end) * row]);
        }
    }
    out
}

/// Attention of `q`, `k`, `v` (`[batch, seqlen, heads, head_dim]` over the whole sequence,
/// `shape.seqlen_q == shape.seqlen_k == plan.seqlen()`) computed the way a ring runs `plan`: for
/// each rank, at each step, attention of its shard's queries over the visible pairs of the key
/// shard it holds, merged into its running result by log-sum-exp; the ranks' rows put back in
/// sequence order. Output and log-sum-exp as [`attention_f64`] with the plan's mask (causal or
/// none).
///
/// # Errors
///
/// As [`attention_f64`]; [`Error::InvalidArgument`] when the shape's lengths are not the plan's.
pub fn ring_attention_f64(
    shape: &RefShape,
    (q, k, v): (&[f64], &[f64], &[f64]),
    plan: &RingPlan,
    scale: f64,
) -> Result<RefOutput> {
    shape.check(q.len(), k.len(), v.len())?;
    if shape.seqlen_q != plan.seqlen() || shape.seqlen_k != plan.seqlen() {
        return Err(Error::InvalidArgument {
            arg: "shape",
            value: format!("{shape:?}"),
            expected: format!("seqlen_q = seqlen_k = {} (the plan's)", plan.seqlen()),
        });
    }
    let (b, s, d) = (shape.batch, plan.seqlen(), shape.head_dim);
    let (qrow, krow) = (shape.heads_q * d, shape.heads_kv * d);
    let mut out = vec![0.0f64; q.len()];
    let mut lse = vec![f64::NEG_INFINITY; b * shape.heads_q * s];
    for rank in 0..plan.ranks() {
        let shard = plan.shard(rank);
        let n = plan.shard_len(rank);
        let rank_shape = RefShape {
            seqlen_q: n,
            seqlen_k: n,
            ..*shape
        };
        // The rank's running result over its shard's rows: nothing seen yet.
        let mut acc = RefOutput {
            out: vec![0.0; b * n * qrow],
            lse: vec![f64::NEG_INFINITY; b * shape.heads_q * n],
            ..RefOutput::default()
        };
        for step in 0..plan.ranks() {
            for p in plan.pairs(rank, step) {
                let (lq, lk) = (p.q.len(), p.k.len());
                let pair_shape = RefShape {
                    seqlen_q: lq,
                    seqlen_k: lk,
                    ..*shape
                };
                let mask = match p.mask {
                    PairMask::Full => MaskSpec::none(),
                    PairMask::Causal => MaskSpec::causal(),
                };
                let part = attention_f64(
                    &pair_shape,
                    &gather(q, b, s, qrow, std::slice::from_ref(&p.q)),
                    &gather(k, b, s, krow, std::slice::from_ref(&p.k)),
                    &gather(v, b, s, krow, std::slice::from_ref(&p.k)),
                    &mask,
                    scale,
                )?;
                // The pair's rows inside the shard; every other row unchanged by the merge.
                let mut full = RefOutput {
                    out: vec![0.0; acc.out.len()],
                    lse: vec![f64::NEG_INFINITY; acc.lse.len()],
                    ..RefOutput::default()
                };
                for bi in 0..b {
                    for i in 0..lq {
                        let (src, dst) =
                            ((bi * lq + i) * qrow, (bi * n + p.q_rows.start + i) * qrow);
                        full.out[dst..dst + qrow].copy_from_slice(&part.out[src..src + qrow]);
                        for h in 0..shape.heads_q {
                            full.lse[(bi * shape.heads_q + h) * n + p.q_rows.start + i] =
                                part.lse[(bi * shape.heads_q + h) * lq + i];
                        }
                    }
                }
                acc = merge(&rank_shape, &acc, &full);
            }
        }
        // Back to sequence order.
        for bi in 0..b {
            let mut row = 0;
            for c in &shard {
                for t in c.clone() {
                    let (src, dst) = ((bi * n + row) * qrow, (bi * s + t) * qrow);
                    out[dst..dst + qrow].copy_from_slice(&acc.out[src..src + qrow]);
                    for h in 0..shape.heads_q {
                        lse[(bi * shape.heads_q + h) * s + t] =
                            acc.lse[(bi * shape.heads_q + h) * n + row];
                    }
                    row += 1;
                }
            }
        }
    }
    Ok(RefOutput {
        out,
        lse,
        ..RefOutput::default()
    })
}
