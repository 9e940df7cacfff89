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

use super::rope::rope_tables;
use super::{RefOutput, RefShape};
use crate::error::{Error, Result};
use crate::mask::MaskSpec;
use crate::rope::{rotate, PositionMode, RopeOptions};

/// The external memory of one memory-attention problem, in f64: `keys` and `values` are
/// `[batch, mem_len, heads_kv, head_dim]` (raw keys, never rotated), `visible` (when given)
/// `[batch, mem_len]`, false for the entries the memory mask hides.
#[derive(Clone, Copy, Debug)]
pub struct RefMemory<'a> {
    /// Entries per batch entry.
    pub mem_len: usize,
    /// Raw keys, `[batch, mem_len, heads_kv, head_dim]`.
    pub keys: &'a [f64],
    /// Values, `[batch, mem_len, heads_kv, head_dim]`.
    pub values: &'a [f64],
    /// Per (batch entry, entry) visibility; `None`: every entry visible.
    pub visible: Option<&'a [bool]>,
}

impl RefMemory<'_> {
    fn check(&self, shape: &RefShape) -> Result<()> {
        let len = shape
            .batch
            .checked_mul(self.mem_len)
            .and_then(|x| x.checked_mul(shape.heads_kv))
            .and_then(|x| x.checked_mul(shape.head_dim));
        for (arg, got) in [
            ("memory.keys.len", self.keys.len()),
            ("memory.values.len", self.values.len()),
        ] {
            if Some(got) != len {
                return Err(Error::InvalidArgument {
                    arg,
                    value: got.to_string(),
                    expected: "batch * mem_len * heads_kv * head_dim".into(),
                });
            }
        }
        if let Some(v) = self.visible {
            if Some(v.len()) != shape.batch.checked_mul(self.mem_len) {
                return Err(Error::InvalidArgument {
                    arg: "memory.visible.len",
                    value: v.len().to_string(),
                    expected: "batch * mem_len".into(),
                });
            }
        }
        Ok(())
    }

    fn offset(&self, shape: &RefShape, b: usize, j: usize, hk: usize) -> usize {
        ((b * self.mem_len + j) * shape.heads_kv + hk) * shape.head_dim
    }

    fn is_visible(&self, b: usize, j: usize) -> bool {
        self.visible.is_none_or(|v| v[b * self.mem_len + j])
    }
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
    memory.check(shape)?;
    if top_k == Some(0) {
        return Err(Error::InvalidArgument {
            arg: "top_k",
            value: "0".into(),
            expected: "at least 1 (None for every entry)".into(),
        });
    }
    let (q, k) = match rope {
        Some(r) => {
            if !matches!(r.mode, PositionMode::Rope) {
                return Err(Error::InvalidArgument {
                    arg: "rope.mode",
                    value: format!("{:?}", r.mode),
                    expected: "PositionMode::Rope (the memory layer rotates plainly)".into(),
                });
            }
            (rotated(shape, q, r, true)?, rotated(shape, k, r, false)?)
        }
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

/// Queries (`is_q`) or keys rotated at their RoPE positions, in f64, log-n scaling on queries.
fn rotated(shape: &RefShape, x: &[f64], rope: &RopeOptions, is_q: bool) -> Result<Vec<f64>> {
    let (inv_freq, af) = rope_tables(shape, rope)?;
    let d = shape.head_dim;
    let (sq, sk) = (shape.seqlen_q, shape.seqlen_k);
    let (rows, heads) = if is_q {
        (sq, shape.heads_q)
    } else {
        (sk, shape.heads_kv)
    };
    let mut y = x.to_vec();
    for b in 0..shape.batch {
        for i in 0..rows {
            let (p, mul) = if is_q {
                let p = rope.query_position(b, i, sq, sk);
                (p, rope.log_n_scale(p))
            } else {
                (rope.key_position(b, i), 1.0)
            };
            for h in 0..heads {
                let o = ((b * rows + i) * heads + h) * d;
                let row = &mut y[o..o + d];
                row.iter_mut().for_each(|a| *a *= mul);
                rotate(row, p as f64, &inv_freq, rope.config.layout, af);
            }
        }
    }
    Ok(y)
}
