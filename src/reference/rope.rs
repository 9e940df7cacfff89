//! Rotary position embeddings: RoPE, ReRoPE and Leaky ReRoPE references (the two-matrix
//! definition in f64, its low-precision counterpart) and host-side rotation of Q and K.

use super::dense::{dot_mag, LowpOutput};
use super::{RefOutput, RefShape};
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::mask::MaskSpec;
use crate::rope::{rotate, PositionMode, RopeLayout, RopeOptions};
use crate::sparse::BlockMask;

/// What every two-matrix reference takes from a problem and its rotary options: the
/// frequency table and attention factor ([`rope_tables`]), the pair layout, the position mode
/// and whether it has an outside branch, the sizes, and the causal mask (with its window).
pub(super) struct RopeRef<'a> {
    pub(super) inv_freq: Vec<f64>,
    pub(super) af: f64,
    pub(super) layout: RopeLayout,
    pub(super) mode: &'a PositionMode,
    pub(super) two: bool,
    pub(super) d: usize,
    pub(super) sq: usize,
    pub(super) sk: usize,
    pub(super) group: usize,
    pub(super) mask: MaskSpec,
}

impl<'a> RopeRef<'a> {
    pub(super) fn new(shape: &RefShape, rope: &'a RopeOptions) -> Result<Self> {
        let (inv_freq, af) = rope_tables(shape, rope)?;
        Ok(RopeRef {
            inv_freq,
            af,
            layout: rope.config.layout,
            mode: &rope.mode,
            two: !matches!(rope.mode, PositionMode::Rope),
            d: shape.head_dim,
            sq: shape.seqlen_q,
            sk: shape.seqlen_k,
            group: shape.heads_q / shape.heads_kv,
            mask: rope.mask(),
        })
    }
}

/// Validates a rotary problem and returns its inverse-frequency table and attention factor.
///
/// The table is `rope.config.inv_freq(head_dim, seqlen_k + max offset)`: the current sequence
/// length is the largest key position plus one, over all batch entries.
pub(super) fn rope_tables(shape: &RefShape, rope: &RopeOptions) -> Result<(Vec<f64>, f64)> {
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
pub(super) fn rope_outside_q_position(mode: &PositionMode, p: i64) -> f64 {
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
pub(super) fn rope_outside_k_position(mode: &PositionMode, p: i64) -> f64 {
    match *mode {
        PositionMode::Rope => p as f64,
        PositionMode::ReRope { .. } => 0.0,
        PositionMode::LeakyReRope { leak, .. } => p as f64 / leak,
    }
}

/// Whether a pair at relative position `rel = p_i - p_j` takes the inside (plain RoPE) score.
pub(super) fn rope_inside(mode: &PositionMode, rel: i64) -> bool {
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
/// bottom-right aligned ([`MaskSpec::causal`](crate::mask::MaskSpec::causal), with `rope.window_left` as a sliding window when
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
/// V; a row that sees no key has output zero and log-sum-exp `-inf`, as [`attention_f64`](super::attention_f64).
///
/// The inverse frequencies are `rope.config.inv_freq(head_dim, seqlen_k + max offset)`.
///
/// # Errors
///
/// As [`attention_f64`](super::attention_f64), and as [`RopeOptions::validate`].
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

/// `x` multiplied by `mul`, rotated to `position` ([`rope_rotate_f32`]) and rounded to `T`, in
/// place: a q or k vector as a low-precision implementation that rotates first and stores the
/// result in `T` has it.
pub(super) fn rope_rotate_rounded<T: Element>(
    x: &mut [f32],
    mul: f32,
    position: f64,
    inv_freq: &[f64],
    layout: RopeLayout,
    af: f64,
) {
    x.iter_mut().for_each(|a| *a *= mul);
    rope_rotate_f32(x, position, inv_freq, layout, af);
    x.iter_mut().for_each(|a| *a = T::from_f32(*a).to_f32());
}

/// Rotates the first `2 * inv_freq.len()` elements of `x` in f32, with `a cos` and `a sin` of
/// the angle `position * inv_freq[f]` (computed in f64, `a` the attention factor) rounded to f32.
pub(super) fn rope_rotate_f32(
    x: &mut [f32],
    position: f64,
    inv_freq: &[f64],
    layout: RopeLayout,
    af: f64,
) {
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
/// computed as in [`attention_lowp`](super::attention_lowp) (probabilities rounded to `T` against a power-of-two base,
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
    let mut out = LowpOutput::<T>::new(q.len(), shape.batch * shape.heads_q * sq);
    let vf: Vec<f32> = v.iter().map(|t| t.to_f32()).collect();

    // Widened, optionally multiplied, rotated in f32 and rounded to `T`.
    let rotated = |x: &[T], mul: f32, position: f64| -> Vec<f32> {
        let mut y: Vec<f32> = x.iter().map(|t| t.to_f32()).collect();
        rope_rotate_rounded::<T>(&mut y, mul, position, &inv_freq, layout, af);
        y
    };
    let dot = dot_mag;

    let none = (f32::NEG_INFINITY, 0.0f32);
    let mut s_in = vec![none; sq * sk];
    let mut s_out = vec![none; if two { sq * sk } else { 0 }];
    let mut row: Vec<(usize, f32, f32)> = Vec::with_capacity(sk);
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

            s_in.fill(none);
            s_out.fill(none);
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
                        let (s, m) = if rope_inside(mode, pq[i] - pk[j]) {
                            s_in[i * sk + j]
                        } else {
                            s_out[i * sk + j]
                        };
                        row.push((j, s, m));
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
