//! Ring attention on the CPU: the schedule of a [`RingPlan`] run with the f64 reference, each
//! rank's steps merged by log-sum-exp in step order, as a ring of GPUs runs it. It equals
//! attention over the whole sequence up to f64 rounding; `tests/cpu_ring.rs` checks that, and the
//! GPU ring's results are compared with it.

use super::dense::{attention_f64, attention_lowp};
use super::rope::{rope_outside_k_position, rope_outside_q_position, rope_tables};
use super::{merge, RefOutput, RefShape};
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::mask::MaskSpec;
use crate::ring::{PairWork, RingPlan, RopeBranch};
use crate::rope::{rotate, RopeOptions};

/// Rows `rows` of a `[batch, seqlen, heads, head_dim]` tensor of `seqlen` rows, as a tensor of
/// their own.
fn gather<E: Copy>(
    x: &[E],
    batch: usize,
    seqlen: usize,
    row: usize,
    rows: &[std::ops::Range<usize>],
) -> Vec<E> {
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
/// sequence order. Output and log-sum-exp as [`attention_f64`] with the plan's mask.
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
    run_ring(
        shape,
        (q, k, v),
        plan,
        |s, q, k, v, m| attention_f64(s, q, k, v, m, scale),
        merge,
    )
}

/// [`ring_attention_f64`] computed as a ring of low-precision kernels would: each pair by
/// [`attention_lowp`] (output rounded to `T`), each merge as the GPU's LSE merge does it (weights
/// and the weighted sum in f32, the result rounded to `T`, the LSE in f32). The budget of a ring
/// under [`compare`](super::compare): the roundings of its partial outputs are the ring's own.
///
/// # Errors
///
/// As [`ring_attention_f64`].
pub fn ring_attention_lowp<T: Element>(
    shape: &RefShape,
    (q, k, v): (&[T], &[T], &[T]),
    plan: &RingPlan,
    scale: f32,
) -> Result<RefOutput> {
    let mut r = run_ring(
        shape,
        (q, k, v),
        plan,
        |s, q, k, v, m| attention_lowp(s, q, k, v, m, scale),
        merge_lowp::<T>,
    )?;
    r.dtype = Some(T::DTYPE);
    Ok(r)
}

/// The GPU's LSE merge (cuda/merge.cuh) on the CPU: f32 weights and sums, the output rounded to
/// `T`.
pub(super) fn merge_lowp<T: Element>(shape: &RefShape, a: &RefOutput, b: &RefOutput) -> RefOutput {
    let d = shape.head_dim;
    let mut out = a.out.clone();
    let mut lse = a.lse.clone();
    for (r, row_lse) in lse.iter_mut().enumerate() {
        let (bi, rest) = (
            r / (shape.heads_q * shape.seqlen_q),
            r % (shape.heads_q * shape.seqlen_q),
        );
        let (h, i) = (rest / shape.seqlen_q, rest % shape.seqlen_q);
        let (la, lb) = (a.lse[r] as f32, b.lse[r] as f32);
        let m = la.max(lb);
        let (mut wa, mut wb, mut l) = (0f32, 0f32, f32::NEG_INFINITY);
        if m != f32::NEG_INFINITY {
            let (ea, eb) = ((la - m).exp(), (lb - m).exp());
            let sum = ea + eb;
            (wa, wb, l) = (ea / sum, eb / sum, m + sum.ln());
        }
        *row_lse = f64::from(l);
        let o = shape.q_offset(bi, i, h);
        let rows = out[o..o + d]
            .iter_mut()
            .zip(&a.out[o..o + d])
            .zip(&b.out[o..o + d]);
        for ((y, &xa), &xb) in rows {
            let ya = if wa > 0.0 { wa * xa as f32 } else { 0.0 };
            let yb = if wb > 0.0 { wb * xb as f32 } else { 0.0 };
            *y = f64::from(T::from_f32(ya + yb).to_f32());
        }
    }
    RefOutput {
        out,
        lse,
        ..RefOutput::default()
    }
}

/// Rotary attention (`rope_attention_f64`'s definition, over the whole sequence: keys at `off_b +
/// j`, queries at `off_b + i`, the causal mask with `rope.window_left`) computed the way a ring runs
/// `plan`: each rank rotates its queries and the keys it holds to their global positions for
/// both branches of the position mode, and runs the parts of [`RingPlan::rope_pairs`] (the
/// elements inside the window over the plainly rotated rows, those outside over the outside
/// branch's) as exact attention, merged into its rows by log-sum-exp. It equals
/// [`rope_attention_f64`](super::rope_attention_f64) up to f64 rounding (`tests/cpu_ring.rs`).
///
/// # Errors
///
/// As [`ring_attention_f64`] and [`RopeOptions::validate`]; [`Error::InvalidArgument`] when the
/// plan's mask is not the rotary options' (causal, with their left window).
pub fn ring_rope_attention_f64(
    shape: &RefShape,
    (q, k, v): (&[f64], &[f64], &[f64]),
    plan: &RingPlan,
    rope: &RopeOptions,
    scale: f64,
) -> Result<RefOutput> {
    let [q_in, k_in, q_out, k_out] = rope_ring_rows(shape, (q, k, v), plan, rope)?;
    let inputs = [(&q_in[..], &k_in[..], v), (&q_out[..], &k_out[..], v)];
    run_ring_parts(
        shape,
        &inputs,
        plan,
        rope_parts(plan, rope),
        |s, q, k, v, m| attention_f64(s, q, k, v, m, scale),
        merge,
    )
}

/// [`ring_rope_attention_f64`] computed as a ring of low-precision kernels would: the rotated
/// rows rounded to `T` (as the RoPE passes write them), each part by [`attention_lowp`], each
/// merge as the GPU's LSE merge. The budget of `Attention::ring_rope_forward_one_gpu` under
/// [`compare`](super::compare).
///
/// # Errors
///
/// As [`ring_rope_attention_f64`].
pub fn ring_rope_attention_lowp<T: Element>(
    shape: &RefShape,
    (q, k, v): (&[T], &[T], &[T]),
    plan: &RingPlan,
    rope: &RopeOptions,
    scale: f32,
) -> Result<RefOutput> {
    let wide = |x: &[T]| -> Vec<f64> { x.iter().map(|t| f64::from(t.to_f32())).collect() };
    let (qw, kw, vw) = (wide(q), wide(k), wide(v));
    let rows = rope_ring_rows(shape, (&qw, &kw, &vw), plan, rope)?;
    let [q_in, k_in, q_out, k_out] =
        rows.map(|x| x.iter().map(|&a| T::from_f32(a as f32)).collect::<Vec<T>>());
    let inputs = [(&q_in[..], &k_in[..], v), (&q_out[..], &k_out[..], v)];
    let mut r = run_ring_parts(
        shape,
        &inputs,
        plan,
        rope_parts(plan, rope),
        |s, q, k, v, m| attention_lowp(s, q, k, v, m, scale),
        merge_lowp::<T>,
    )?;
    r.dtype = Some(T::DTYPE);
    Ok(r)
}

/// The parts of a rotary ring, each with the index of the rows it reads (0: inside, 1: outside).
fn rope_parts<'a>(
    plan: &'a RingPlan,
    rope: &'a RopeOptions,
) -> impl Fn(usize, usize) -> Result<Vec<(PairWork, usize)>> + 'a {
    move |rank, step| {
        Ok(plan
            .rope_pairs(rank, step, &rope.mode)?
            .into_iter()
            .map(|(p, branch)| (p, usize::from(branch == RopeBranch::Outside)))
            .collect())
    }
}

/// The checks of a rotary ring and both branches' rotations of the whole sequence (queries and
/// keys at `off_b + i`, log-n scaling on the queries): `[q_in, k_in, q_out, k_out]`. A rank
/// rotates its own rows the same way.
fn rope_ring_rows(
    shape: &RefShape,
    (q, k, v): (&[f64], &[f64], &[f64]),
    plan: &RingPlan,
    rope: &RopeOptions,
) -> Result<[Vec<f64>; 4]> {
    shape.check(q.len(), k.len(), v.len())?;
    if plan.mask() != rope.mask() {
        return Err(Error::InvalidArgument {
            arg: "plan",
            value: format!("{:?}", plan.mask()),
            expected: format!("the rotary options' mask, {:?}", rope.mask()),
        });
    }
    let (inv_freq, af) = rope_tables(shape, rope)?;
    let (d, s) = (shape.head_dim, shape.seqlen_q);
    let rotated = |x: &[f64], heads: usize, position: &dyn Fn(i64) -> f64, logn: bool| {
        let mut y = x.to_vec();
        for b in 0..shape.batch {
            for i in 0..s {
                let p = rope.key_position(b, i); // = the query position: seqlen_q = seqlen_k
                let m = if logn { rope.log_n_scale(p) } else { 1.0 };
                for h in 0..heads {
                    let o = ((b * s + i) * heads + h) * d;
                    let row = &mut y[o..o + d];
                    row.iter_mut().for_each(|a| *a *= m);
                    rotate(row, position(p), &inv_freq, rope.config.layout, af);
                }
            }
        }
        y
    };
    let mode = rope.mode;
    let plain = |p: i64| p as f64;
    let out_q = |p: i64| rope_outside_q_position(&mode, p);
    let out_k = |p: i64| rope_outside_k_position(&mode, p);
    let (hq, hk) = (shape.heads_q, shape.heads_kv);
    Ok([
        rotated(q, hq, &plain, true),
        rotated(k, hk, &plain, false),
        rotated(q, hq, &out_q, true),
        rotated(k, hk, &out_k, false),
    ])
}

/// The gradients of attention over the whole sequence computed the way a ring runs its
/// backward over `plan`: the forward's output and log-sum-exp first (by the ring,
/// [`ring_attention_f64`]), `D_i = do_i . o_i` per row; then each rank, at each step, runs the
/// backward of every visible pair of the key / value shard it holds with the whole row's
/// log-sum-exp and `D` (each score's gradient depends on its own pair only), adding to its own
/// queries' dQ and to the held shard's dK and dV, which travel around the ring with the shard
/// and are back at their owner after the last step. It equals
/// [`attention_backward_f64`](super::attention_backward_f64) with the plan's mask up to f64
/// rounding (`tests/cpu_ring.rs`).
///
/// # Errors
///
/// As [`ring_attention_f64`], and [`Error::InvalidArgument`] when `dout` is not shaped like q.
pub fn ring_attention_backward_f64(
    shape: &RefShape,
    (q, k, v): (&[f64], &[f64], &[f64]),
    dout: &[f64],
    plan: &RingPlan,
    scale: f64,
) -> Result<super::RefGrads> {
    if dout.len() != q.len() {
        return Err(Error::InvalidArgument {
            arg: "dout.len",
            value: dout.len().to_string(),
            expected: format!("{} (shaped like q)", q.len()),
        });
    }
    let fwd = ring_attention_f64(shape, (q, k, v), plan, scale)?;
    let (b, s, d) = (shape.batch, plan.seqlen(), shape.head_dim);
    let (hq, hk) = (shape.heads_q, shape.heads_kv);
    let group = hq / hk;
    let dot = |x: &[f64], y: &[f64]| -> f64 { x.iter().zip(y).map(|(a, b)| a * b).sum() };
    let qo = |bi: usize, i: usize, h: usize| ((bi * s + i) * hq + h) * d;
    let ko = |bi: usize, j: usize, h: usize| ((bi * s + j) * hk + h) * d;
    let row = |bi: usize, h: usize, i: usize| (bi * hq + h) * s + i;
    // D per (batch entry, query head, row).
    let mut big_d = vec![0.0; b * hq * s];
    for bi in 0..b {
        for h in 0..hq {
            for i in 0..s {
                let o = qo(bi, i, h);
                big_d[row(bi, h, i)] = dot(&dout[o..o + d], &fwd.out[o..o + d]);
            }
        }
    }
    let mut dq = vec![0.0; q.len()];
    // Each shard's dK and dV, as they travel: indexed by their owner, rows in shard order.
    let mut travelling: Vec<(Vec<f64>, Vec<f64>)> = (0..plan.ranks())
        .map(|r| {
            let n = b * plan.shard_len(r) * hk * d;
            (vec![0.0; n], vec![0.0; n])
        })
        .collect();
    for step in 0..plan.ranks() {
        for rank in 0..plan.ranks() {
            let owner = plan.kv_owner(rank, step);
            let m = plan.shard_len(owner);
            let (dk_held, dv_held) = &mut travelling[owner];
            for p in plan.pairs(rank, step) {
                let spec = p.mask.spec();
                let (lq, lk) = (p.q.len(), p.k.len());
                for bi in 0..b {
                    for h in 0..hq {
                        let g = h / group;
                        for (ii, i) in p.q.clone().enumerate() {
                            let r = row(bi, h, i);
                            let (lse, dd) = (fwd.lse[r], big_d[r]);
                            let (qa, da) = (qo(bi, i, h), qo(bi, i, h));
                            for (jj, j) in p.k.clone().enumerate() {
                                if !spec.is_visible(lq, lk, ii, jj) {
                                    continue;
                                }
                                let ka = ko(bi, j, g);
                                let pij = (scale * dot(&q[qa..qa + d], &k[ka..ka + d]) - lse).exp();
                                let dp = dot(&dout[da..da + d], &v[ka..ka + d]);
                                let ds = scale * pij * (dp - dd);
                                // The held shard's row of key j.
                                let hr = ((bi * m + p.k_rows.start + jj) * hk + g) * d;
                                for x in 0..d {
                                    dv_held[hr + x] += pij * dout[da + x];
                                    dk_held[hr + x] += ds * q[qa + x];
                                    dq[qa + x] += ds * k[ka + x];
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    // Back at their owners: each shard's rows in sequence order.
    let (mut dk, mut dv) = (vec![0.0; k.len()], vec![0.0; v.len()]);
    for (owner, (dk_s, dv_s)) in travelling.iter().enumerate() {
        let n = plan.shard_len(owner);
        for bi in 0..b {
            let mut at = 0;
            for c in plan.shard(owner) {
                for t in c {
                    let (src, dst) = ((bi * n + at) * hk * d, (bi * s + t) * hk * d);
                    dk[dst..dst + hk * d].copy_from_slice(&dk_s[src..src + hk * d]);
                    dv[dst..dst + hk * d].copy_from_slice(&dv_s[src..src + hk * d]);
                    at += 1;
                }
            }
        }
    }
    Ok(super::RefGrads { dq, dk, dv })
}

/// Runs `plan` with `pair` computing each visible pair and `merge` folding it into the rank's
/// running result.
fn run_ring<E: Copy>(
    shape: &RefShape,
    (q, k, v): (&[E], &[E], &[E]),
    plan: &RingPlan,
    pair: impl FnMut(&RefShape, &[E], &[E], &[E], &MaskSpec) -> Result<RefOutput>,
    merge: impl Fn(&RefShape, &RefOutput, &RefOutput) -> RefOutput,
) -> Result<RefOutput> {
    shape.check(q.len(), k.len(), v.len())?;
    run_ring_parts(
        shape,
        &[(q, k, v)],
        plan,
        |rank, step| Ok(plan.pairs(rank, step).into_iter().map(|p| (p, 0)).collect()),
        pair,
        merge,
    )
}

/// Runs `plan` over the parts `parts(rank, step)` gives, each a pair and the index of the inputs
/// (q, k, v over the whole sequence) it reads, with `pair` computing each part and `merge`
/// folding it into the rank's running result.
fn run_ring_parts<E: Copy>(
    shape: &RefShape,
    inputs: &[(&[E], &[E], &[E])],
    plan: &RingPlan,
    parts: impl Fn(usize, usize) -> Result<Vec<(PairWork, usize)>>,
    mut pair: impl FnMut(&RefShape, &[E], &[E], &[E], &MaskSpec) -> Result<RefOutput>,
    merge: impl Fn(&RefShape, &RefOutput, &RefOutput) -> RefOutput,
) -> Result<RefOutput> {
    let (q, _, _) = inputs[0];
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
            for (p, input) in parts(rank, step)? {
                let (q, k, v) = inputs[input];
                let (lq, lk) = (p.q.len(), p.k.len());
                let pair_shape = RefShape {
                    seqlen_q: lq,
                    seqlen_k: lk,
                    ..*shape
                };
                let mask = p.mask.spec();
                let part = pair(
                    &pair_shape,
                    &gather(q, b, s, qrow, std::slice::from_ref(&p.q)),
                    &gather(k, b, s, krow, std::slice::from_ref(&p.k)),
                    &gather(v, b, s, krow, std::slice::from_ref(&p.k)),
                    &mask,
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
