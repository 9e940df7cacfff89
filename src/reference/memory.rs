//! Memory attention (Focused Transformer / LongLLaMA) in f64: a local causal window with
//! window-relative RoPE plus an external memory of (key, value) pairs in one softmax, attending
//! every memory entry or each query's top k.
//!
//! The semantics are those of `LongLlamaAttention.forward` in `src/modeling_longllama.py` of the
//! long_llama repository (CStanKonrad/long_llama):
//!
//! - queries and local keys are rotated with RoPE at window-relative positions
//!   (`rel_pos_ids = position_ids - min(position_ids)`, then `rotate_one`): here key `j` of the
//!   local window at position `j` and query `i` at `seqlen_k - seqlen_q + i`, the bottom-right
//!   alignment of [`RopeOptions`] with no offsets;
//! - memory keys are stored "as if first" (`rotate_as_if_first`, position 0: the identity), so
//!   the memory score is the rotated query against the raw key;
//! - one softmax over the concatenation `[S_local + causal mask | S_mem + memory mask]`
//!   (`torch.concat([attn_weights, mem_attn_weights], dim=-1)`), times `[V_local; V_mem]`, with
//!   `S = Q K^T / sqrt(head_dim)` in both parts; the memory mask is one additive value per
//!   (batch entry, memory key) (`LongLlamaMemCache.masks`, the last query row's mask of the
//!   window the keys came from), here a visibility flag per (batch entry, memory key).
//!
//! Generalizations: grouped-query heads (memory heads are the local key/value heads), any
//! softmax scale, the RoPE options of [`RopeOptions`] (scalings, layouts, partial rotary), and a
//! top-k variant (the paper's kNN memory of its smaller models, Memorizing-Transformer style):
//! each query row attends its local keys plus the `top_k` visible memory entries with the
//! largest memory scores, ties broken by the lower memory index. Where the released code clamps
//! masked scores to -1e6 (a row with nothing visible then averages every value), here such a row
//! has output 0 and log-sum-exp `-inf`, as every attention in the crate.

use super::dense::{dot_mag, LowpOutput};
use super::rope::{rope_rotate_k, rope_rotate_q, rope_rotate_rounded, rope_tables};
use super::{RefOutput, RefShape, Visibility};
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::mask::MaskSpec;
use crate::rope::{PositionMode, RopeOptions};

/// The external memory of one memory-attention problem: `keys` and `values` are `[batch,
/// mem_len, heads_kv, head_dim]` (raw keys, never rotated) in f64 for
/// [`memory_attention_f64`] or in the element type for [`memory_attention_lowp`], `visible`
/// (when given) `[batch, mem_len]`, false for the entries the memory mask hides.
#[derive(Clone, Copy, Debug)]
pub struct RefMemory<'a, E = f64> {
    /// Entries per batch entry.
    pub mem_len: usize,
    /// Raw keys, `[batch, mem_len, heads_kv, head_dim]`.
    pub keys: &'a [E],
    /// Values, `[batch, mem_len, heads_kv, head_dim]`.
    pub values: &'a [E],
    /// Per (batch entry, entry) visibility; `None`: every entry visible.
    pub visible: Option<&'a [bool]>,
}

impl<E> RefMemory<'_, E> {
    fn offset(&self, shape: &RefShape, b: usize, j: usize, hk: usize) -> usize {
        ((b * self.mem_len + j) * shape.heads_kv + hk) * shape.head_dim
    }

    fn is_visible(&self, b: usize, j: usize) -> bool {
        self.visible.is_none_or(|v| v[b * self.mem_len + j])
    }

    /// The memory's lengths and its mask's against `shape`, `top_k` and the position mode.
    fn check(
        &self,
        shape: &RefShape,
        rope: Option<&RopeOptions>,
        top_k: Option<usize>,
    ) -> Result<()> {
        check(
            shape,
            self.mem_len,
            [self.keys.len(), self.values.len()],
            self.visible,
            rope,
            top_k,
        )
    }
}

/// The memory's lengths, its mask's, `top_k` and the position mode.
fn check(
    shape: &RefShape,
    mem_len: usize,
    lens: [usize; 2],
    visible: Option<&[bool]>,
    rope: Option<&RopeOptions>,
    top_k: Option<usize>,
) -> Result<()> {
    let len = shape
        .batch
        .checked_mul(mem_len)
        .and_then(|x| x.checked_mul(shape.heads_kv))
        .and_then(|x| x.checked_mul(shape.head_dim));
    for (arg, got) in ["memory.keys.len", "memory.values.len"]
        .into_iter()
        .zip(lens)
    {
        if Some(got) != len {
            return Err(Error::InvalidArgument {
                arg,
                value: got.to_string(),
                expected: "batch * mem_len * heads_kv * head_dim".into(),
            });
        }
    }
    if let Some(v) = visible {
        if Some(v.len()) != shape.batch.checked_mul(mem_len) {
            return Err(Error::InvalidArgument {
                arg: "memory.visible.len",
                value: v.len().to_string(),
                expected: "batch * mem_len".into(),
            });
        }
    }
    if top_k == Some(0) {
        return Err(Error::InvalidArgument {
            arg: "top_k",
            value: "0".into(),
            expected: "at least 1 (None for every entry)".into(),
        });
    }
    if let Some(r) = rope {
        if !matches!(r.mode, PositionMode::Rope) {
            return Err(Error::InvalidArgument {
                arg: "rope.mode",
                value: format!("{:?}", r.mode),
                expected: "PositionMode::Rope (the memory layer rotates plainly)".into(),
            });
        }
    }
    Ok(())
}

/// The memory entries query row `scores` selects: every visible one (`top_k: None`), or the
/// `top_k` with the largest scores, ties to the lower index, in index order. `scores[j]` is
/// `None` for an entry the memory mask hides.
pub fn memory_top_k(scores: &[Option<f64>], top_k: Option<usize>) -> Vec<usize> {
    let mut chosen: Vec<usize> = (0..scores.len()).filter(|&j| scores[j].is_some()).collect();
    if let Some(k) = top_k {
        if chosen.len() > k {
            // Larger score first; equal scores by lower index (a stable sort keeps index order).
            chosen.sort_by(|&a, &b| scores[b].unwrap().total_cmp(&scores[a].unwrap()));
            chosen.truncate(k);
            chosen.sort_unstable();
        }
    }
    chosen
}

/// Memory attention in f64 (see the module documentation).
///
/// `q` is `[batch, seqlen_q, heads_q, head_dim]`, `k` and `v` the local window `[batch,
/// seqlen_k, heads_kv, head_dim]`, un-rotated. Queries and local keys are rotated by `rope`
/// (plain RoPE at its positions; its position offsets, log-n scaling and window apply as in
/// [`rope_attention_f64`](super::rope_attention_f64); `None`: no rotation, FoT's
/// `positionals = False`), the local part is causal (bottom-right, with `rope.window_left` as
/// a sliding window), the memory part sees every visible entry (or each row's `top_k`). Output
/// `[batch, seqlen_q, heads_q, head_dim]`, log-sum-exp `[batch, heads_q, seqlen_q]` over both
/// parts; a row that sees nothing has output 0 and log-sum-exp `-inf`.
///
/// # Errors
///
/// As [`attention_f64`](super::attention_f64) for the local part and [`RopeOptions::validate`];
/// [`Error::InvalidArgument`] when the memory's slices do not match `shape` and `mem_len`, when
/// `rope` is not plain RoPE (the memory layer has no ReRoPE), or when `top_k` is 0.
#[allow(clippy::too_many_arguments)]
pub fn memory_attention_f64(
    shape: &RefShape,
    (q, k, v): (&[f64], &[f64], &[f64]),
    memory: &RefMemory,
    rope: Option<&RopeOptions>,
    top_k: Option<usize>,
    scale: f64,
) -> Result<RefOutput> {
    shape.check(q.len(), k.len(), v.len())?;
    memory.check(shape, rope, top_k)?;
    let (q, k) = match rope {
        Some(r) => (rope_rotate_q(shape, q, r)?, rope_rotate_k(shape, k, r)?),
        None => (q.to_vec(), k.to_vec()),
    };
    let mask = rope.map_or(MaskSpec::causal(), RopeOptions::mask);
    let d = shape.head_dim;
    let (sq, sk) = (shape.seqlen_q, shape.seqlen_k);
    let group = shape.heads_q / shape.heads_kv;
    let mut out = vec![0.0f64; q.len()];
    let mut lse = Vec::with_capacity(shape.batch * shape.heads_q * sq);
    let dot = |a: &[f64], b: &[f64]| -> f64 { a.iter().zip(b).map(|(x, y)| x * y).sum() };
    // (score, value row offset, from memory) of every key a row sees.
    let mut seen: Vec<(f64, usize, bool)> = Vec::new();
    let mut mem_scores: Vec<Option<f64>> = vec![None; memory.mem_len];
    for b in 0..shape.batch {
        for h in 0..shape.heads_q {
            let hk = h / group;
            for i in 0..sq {
                let qo = shape.q_offset(b, i, h);
                let qi = &q[qo..qo + d];
                seen.clear();
                for j in 0..sk {
                    if mask.is_visible(sq, sk, i, j) {
                        let ko = shape.kv_offset(b, j, hk);
                        seen.push((scale * dot(qi, &k[ko..ko + d]), ko, false));
                    }
                }
                for (j, s) in mem_scores.iter_mut().enumerate() {
                    let ko = memory.offset(shape, b, j, hk);
                    *s = memory
                        .is_visible(b, j)
                        .then(|| scale * dot(qi, &memory.keys[ko..ko + d]));
                }
                for j in memory_top_k(&mem_scores, top_k) {
                    let s = mem_scores[j].expect("selected entries are visible");
                    seen.push((s, memory.offset(shape, b, j, hk), true));
                }
                if seen.is_empty() {
                    lse.push(f64::NEG_INFINITY);
                    continue;
                }
                let m = seen.iter().map(|x| x.0).fold(f64::NEG_INFINITY, f64::max);
                let l: f64 = seen.iter().map(|x| (x.0 - m).exp()).sum();
                let o = &mut out[qo..qo + d];
                for &(s, vo, from_memory) in &seen {
                    let p = (s - m).exp() / l;
                    let vrow = if from_memory {
                        &memory.values[vo..vo + d]
                    } else {
                        &v[vo..vo + d]
                    };
                    for (a, &x) in o.iter_mut().zip(vrow) {
                        *a += p * x;
                    }
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

/// Queries and local keys of [`memory_attention_lowp`] in f32: rotated in f32 at their positions
/// and rounded to `T` (the log-n factor on the queries), as the kernels' rotation passes write
/// them; as given without a rotation.
fn rotated_lowp<T: Element>(
    shape: &RefShape,
    q: &[T],
    k: &[T],
    rope: Option<&RopeOptions>,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let widen = |x: &[T]| -> Vec<f32> { x.iter().map(|t| t.to_f32()).collect() };
    let (mut qf, mut kf) = (widen(q), widen(k));
    let d = shape.head_dim;
    let (sq, sk) = (shape.seqlen_q, shape.seqlen_k);
    if let Some(r) = rope {
        let (inv_freq, af) = rope_tables(shape, r)?;
        let turn = |x: &mut [f32], mul: f32, p: i64| {
            rope_rotate_rounded::<T>(x, mul, p as f64, &inv_freq, r.config.layout, af);
        };
        for b in 0..shape.batch {
            for i in 0..sq {
                let p = r.query_position(b, i, sq, sk);
                let mul = r.log_n_scale(p) as f32;
                for h in 0..shape.heads_q {
                    let o = shape.q_offset(b, i, h);
                    turn(&mut qf[o..o + d], mul, p);
                }
            }
            for j in 0..sk {
                let p = r.key_position(b, j);
                for h in 0..shape.heads_kv {
                    let o = shape.kv_offset(b, j, h);
                    turn(&mut kf[o..o + d], 1.0, p);
                }
            }
        }
    }
    Ok((qf, kf))
}

/// The memory mask as a visibility over the memory pass of
/// [`memory_attention_two_pass_lowp`]: every query of a batch entry sees the same entries.
struct MemoryVisibility<'a> {
    mem_len: usize,
    visible: Option<&'a [bool]>,
}

impl Visibility for MemoryVisibility<'_> {
    fn visible(&self, _shape: &RefShape, b: usize, _h: usize, _i: usize, j: usize) -> bool {
        self.visible.is_none_or(|v| v[b * self.mem_len + j])
    }
}

/// The memory layer as the GPU's multi-pass paths compute it (the two-pass path on Hopper GPUs,
/// memory decoding, and every top-k call): the local pass ([`memory_attention_lowp`] over an
/// empty memory, its output rounded to `T`), the memory pass over the rotated, rounded queries
/// (every visible entry: [`attention_lowp`](super::attention_lowp) over the raw memory, no
/// causality; with `top_k`: [`memory_attention_lowp`] of those queries over no local keys and
/// the memory, ranking by the f32 scores), its output rounded to `T`, and the GPU's LSE merge of
/// the two (f32 weights and sum, rounded to `T`). Its error against [`memory_attention_f64`] is
/// what those paths add to the one-kernel layer's: the two partial outputs' roundings.
///
/// # Errors
///
/// As [`memory_attention_lowp`].
pub fn memory_attention_two_pass_lowp<T: Element>(
    shape: &RefShape,
    (q, k, v): (&[T], &[T], &[T]),
    memory: &RefMemory<T>,
    rope: Option<&RopeOptions>,
    top_k: Option<usize>,
    scale: f32,
) -> Result<RefOutput> {
    shape.check(q.len(), k.len(), v.len())?;
    memory.check(shape, rope, top_k)?;
    let empty = RefMemory::<T> {
        mem_len: 0,
        keys: &[],
        values: &[],
        visible: None,
    };
    let local = memory_attention_lowp(shape, (q, k, v), &empty, rope, None, scale)?;
    let (qf, _) = rotated_lowp(shape, q, k, rope)?;
    let q_rot: Vec<T> = qf.iter().map(|&x| T::from_f32(x)).collect();
    let mem = match top_k {
        Some(_) => {
            let no_local = RefShape {
                seqlen_k: 0,
                ..*shape
            };
            memory_attention_lowp(&no_local, (&q_rot, &[], &[]), memory, None, top_k, scale)?
        }
        None => {
            let mem_shape = RefShape {
                seqlen_k: memory.mem_len,
                ..*shape
            };
            let visibility = MemoryVisibility {
                mem_len: memory.mem_len,
                visible: memory.visible,
            };
            super::attention_lowp(
                &mem_shape,
                &q_rot,
                memory.keys,
                memory.values,
                &visibility,
                scale,
            )?
        }
    };
    Ok(super::ring::merge_lowp::<T>(shape, &local, &mem))
}

/// [`memory_attention_f64`] computed the way a plain low-precision implementation would: the
/// budget of a memory-attention kernel under [`compare`](super::compare).
///
/// Inputs in `T`. Queries and local keys rotated in f32 and rounded to `T` as in
/// [`rope_attention_lowp`](super::rope_attention_lowp); memory keys used as given. Scores are
/// f32 dot products; the top-k selection ranks the f32 memory scores (ties to the lower index);
/// from there the row is computed as in [`attention_lowp`](super::attention_lowp) over the local
/// keys then the selected memory entries (probabilities rounded to `T` at a power-of-two base,
/// the output normalized by their sum, the spread of probabilities at a rounding tie).
///
/// # Errors
///
/// As [`memory_attention_f64`].
pub fn memory_attention_lowp<T: Element>(
    shape: &RefShape,
    (q, k, v): (&[T], &[T], &[T]),
    memory: &RefMemory<T>,
    rope: Option<&RopeOptions>,
    top_k: Option<usize>,
    scale: f32,
) -> Result<RefOutput> {
    shape.check(q.len(), k.len(), v.len())?;
    memory.check(shape, rope, top_k)?;
    let widen = |x: &[T]| -> Vec<f32> { x.iter().map(|t| t.to_f32()).collect() };
    let vf = widen(v);
    let (qf, kf) = rotated_lowp(shape, q, k, rope)?;
    let (mk, mv) = (widen(memory.keys), widen(memory.values));
    let d = shape.head_dim;
    let (sq, sk) = (shape.seqlen_q, shape.seqlen_k);
    let mask = rope.map_or(MaskSpec::causal(), RopeOptions::mask);
    let group = shape.heads_q / shape.heads_kv;
    let mut out = LowpOutput::<T>::new(q.len(), shape.batch * shape.heads_q * sq);
    // Keys are numbered local first (0..sk), then memory entries (sk + j).
    let mut row: Vec<(usize, f32, f32)> = Vec::new();
    let mut mem: Vec<(f32, f32)> = vec![(0.0, 0.0); memory.mem_len];
    let mut mem_scores: Vec<Option<f64>> = vec![None; memory.mem_len];
    for b in 0..shape.batch {
        for h in 0..shape.heads_q {
            let hk = h / group;
            for i in 0..sq {
                let qo = shape.q_offset(b, i, h);
                let qi = &qf[qo..qo + d];
                row.clear();
                for j in 0..sk {
                    if mask.is_visible(sq, sk, i, j) {
                        let ko = shape.kv_offset(b, j, hk);
                        let (s, m) = dot_mag(qi, &kf[ko..ko + d]);
                        row.push((j, s, m));
                    }
                }
                for j in 0..memory.mem_len {
                    let ko = memory.offset(shape, b, j, hk);
                    mem[j] = dot_mag(qi, &mk[ko..ko + d]);
                    mem_scores[j] = memory.is_visible(b, j).then(|| f64::from(mem[j].0));
                }
                for j in memory_top_k(&mem_scores, top_k) {
                    row.push((sk + j, mem[j].0, mem[j].1));
                }
                let value = |j: usize| -> &[f32] {
                    if j < sk {
                        let o = shape.kv_offset(b, j, hk);
                        &vf[o..o + d]
                    } else {
                        let o = memory.offset(shape, b, j - sk, hk);
                        &mv[o..o + d]
                    }
                };
                out.row(qo..qo + d, &row, scale, value);
            }
        }
    }
    Ok(out.finish())
}
