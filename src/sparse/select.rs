//! Dynamic block selection on the host: each query block attends the key blocks whose summaries
//! score highest against its own, as MoBA selects them (mean-pooled keys per block; here the
//! query block is mean-pooled too, one selection per block of [`Q_BLOCK`] rows), written as the
//! reference a device selection is checked against.
//!
//! For each (batch, query head, query block): the blocks the element mask cuts (partial, e.g.
//! the diagonal under a causal mask) are always kept, as MoBA always attends the current block;
//! among the blocks it leaves whole, the `top_k` with the largest score `mean(q) . mean(k)` are
//! kept, a tie going to the lower key block. Blocks the element mask hides entirely are never
//! listed. Scores are computed in f64 from the given values, so the choice is deterministic
//! (+0 and -0 compare equal). `attention::select` makes the same choice on the GPU.

use super::{BlockMask, MaskShape, K_BLOCK, Q_BLOCK};
use crate::error::{Error, Result};
use crate::mask::MaskSpec;
use crate::reference::RefShape;

/// The block mask of a top-k block selection (see the module docs), for `shape`'s batch and
/// query heads: Q is `[batch, seqlen_q, heads_q, head_dim]`, K `[batch, seqlen_k, heads_kv,
/// head_dim]`, both contiguous; query head `h` reads key head `h / (heads_q / heads_kv)`.
///
/// # Errors
///
/// [`Error::InvalidArgument`] when `top_k` is 0, a dimension is 0, the heads do not divide, or
/// `q` / `k` do not hold the shape's elements; the errors of [`BlockMask::from_fn`] for the
/// element mask.
pub fn select_blocks(
    shape: &RefShape,
    q: &[f32],
    k: &[f32],
    element: MaskSpec,
    top_k: usize,
) -> Result<BlockMask> {
    let s = *shape;
    let bad = |arg: &'static str, value: String, expected: &str| Error::InvalidArgument {
        arg,
        value,
        expected: expected.into(),
    };
    if top_k == 0 {
        return Err(bad("top_k", "0".into(), "at least one block"));
    }
    if [
        s.batch, s.seqlen_q, s.seqlen_k, s.heads_q, s.heads_kv, s.head_dim,
    ]
    .contains(&0)
    {
        return Err(bad("shape", format!("{s:?}"), "no zero dimension"));
    }
    if s.heads_q % s.heads_kv != 0 {
        return Err(bad(
            "shape.heads_kv",
            s.heads_kv.to_string(),
            "a divisor of heads_q",
        ));
    }
    let d = s.head_dim;
    if Some(q.len()) != s.q_len() {
        return Err(bad(
            "q",
            q.len().to_string(),
            "batch * seqlen_q * heads_q * head_dim",
        ));
    }
    if Some(k.len()) != s.kv_len() {
        return Err(bad(
            "k",
            k.len().to_string(),
            "batch * seqlen_k * heads_kv * head_dim",
        ));
    }
    let mask_shape = MaskShape {
        batch: s.batch,
        heads: s.heads_q,
        seqlen_q: s.seqlen_q,
        seqlen_k: s.seqlen_k,
    };
    // Every block the element mask leaves anything of, with its full flag.
    let all = BlockMask::from_fn(mask_shape, element, |_, _, _, _| true)?;
    let (nqb, nkb) = (mask_shape.num_q_blocks(), mask_shape.num_k_blocks());
    let group = s.heads_q / s.heads_kv;
    // Mean of rows [lo, hi) of head `h` of batch `b` in a [batch, rows, heads, d] tensor.
    let mean = |x: &[f32], rows: usize, heads: usize, b: usize, h: usize, lo: usize, hi: usize| {
        let mut m = vec![0f64; d];
        for r in lo..hi {
            let o = ((b * rows + r) * heads + h) * d;
            for (a, &v) in m.iter_mut().zip(&x[o..o + d]) {
                *a += f64::from(v);
            }
        }
        let n = (hi - lo) as f64;
        m.iter_mut().for_each(|a| *a /= n);
        m
    };
    let mut keep = vec![false; mask_shape.rows() * nkb];
    let mut row = 0usize;
    for b in 0..s.batch {
        let k_means: Vec<Vec<Vec<f64>>> = (0..s.heads_kv)
            .map(|hk| {
                (0..nkb)
                    .map(|kb| {
                        let hi = ((kb + 1) * K_BLOCK).min(s.seqlen_k);
                        mean(k, s.seqlen_k, s.heads_kv, b, hk, kb * K_BLOCK, hi)
                    })
                    .collect()
            })
            .collect();
        for h in 0..s.heads_q {
            for qb in 0..nqb {
                let hi = ((qb + 1) * Q_BLOCK).min(s.seqlen_q);
                let qm = mean(q, s.seqlen_q, s.heads_q, b, h, qb * Q_BLOCK, hi);
                let listed = all.row(b, h, qb);
                let start = all.row_offsets()[row] as usize;
                let flags = &all.full_flags()[start..start + listed.len()];
                let mut whole: Vec<(f64, usize)> = Vec::new();
                for (&kb, &full) in listed.iter().zip(flags) {
                    let kb = kb as usize;
                    if full == 0 {
                        keep[row * nkb + kb] = true;
                    } else {
                        let km = &k_means[h / group][kb];
                        whole.push((qm.iter().zip(km).map(|(a, c)| a * c).sum(), kb));
                    }
                }
                // +0 and -0 compare equal (the tie goes to the lower block), as on the device.
                whole.sort_by(|x, y| (y.0 + 0.0).total_cmp(&(x.0 + 0.0)).then(x.1.cmp(&y.1)));
                for &(_, kb) in whole.iter().take(top_k) {
                    keep[row * nkb + kb] = true;
                }
                row += 1;
            }
        }
    }
    BlockMask::from_fn(mask_shape, element, |b, h, qb, kb| {
        keep[((b * s.heads_q + h) * nqb + qb) * nkb + kb]
    })
}
