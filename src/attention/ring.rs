//! Ring attention on the GPU: one rank's step of a [`RingPlan`] (its shard's queries over the
//! visible chunk pairs of the key / value shard it holds, merged by log-sum-exp into per-chunk
//! accumulators), and a one-GPU run of the whole ring in which the shard transfers are device
//! copies. The NCCL transport (send / recv of the held shard around the ring on a communication
//! stream) drives the same step; it is not built yet, so this module is the ring's compute and
//! merge order, checked on one GPU against the CPU reference (`reference::ring_attention_f64`).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, DeviceSlice};

use super::{Attention, ForwardOptions, Input, Output};
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::ring::{PairWork, RingPlan};
use crate::Element;

/// One rank's running result: per query chunk of its shard, the output `[batch, chunk, heads_q,
/// head_dim]` and log-sum-exp `[batch, heads_q, chunk]` of the pairs merged so far, and scratch
/// for the next pair's partial result.
pub struct RingAccumulator<T> {
    /// The plan's chunks of the rank the accumulator was made for, and that rank.
    chunks: Vec<std::ops::Range<usize>>,
    rank: usize,
    layouts: Vec<Layout>,
    o: Vec<CudaSlice<T>>,
    lse: Vec<CudaSlice<f32>>,
    started: Vec<bool>,
    part_o: CudaSlice<T>,
    part_lse: CudaSlice<f32>,
}

impl<T: Element> RingAccumulator<T> {
    /// Empty accumulators for rank `rank` of `plan`, queries of `batch` entries and `heads_q`
    /// heads of `head_dim`, allocated on `stream`.
    pub fn new(
        stream: &Arc<CudaStream>,
        plan: &RingPlan,
        rank: usize,
        (batch, heads_q, head_dim): (usize, usize, usize),
    ) -> Result<Self> {
        let alloc = Error::driver("allocating ring accumulators");
        let shard = plan.shard(rank);
        let longest = shard.iter().map(|c| c.len()).max().unwrap_or(0);
        let mut acc = RingAccumulator {
            chunks: shard.clone(),
            rank,
            layouts: Vec::new(),
            o: Vec::new(),
            lse: Vec::new(),
            started: Vec::new(),
            part_o: stream
                .alloc_zeros(batch * longest * heads_q * head_dim)
                .map_err(alloc)?,
            part_lse: stream
                .alloc_zeros(batch * heads_q * longest)
                .map_err(Error::driver("allocating ring accumulators"))?,
        };
        for c in &shard {
            let l = Layout::bshd(batch, c.len(), heads_q, head_dim);
            acc.layouts.push(l);
            acc.o.push(
                stream
                    .alloc_zeros(l.numel())
                    .map_err(Error::driver("allocating ring accumulators"))?,
            );
            // -inf: a row no pair has reached yet has seen no key.
            acc.lse.push(
                stream
                    .clone_htod(&vec![f32::NEG_INFINITY; batch * heads_q * c.len()])
                    .map_err(Error::driver("allocating ring accumulators"))?,
            );
            acc.started.push(false);
        }
        Ok(acc)
    }

    /// Chunk `i`'s output, log-sum-exp and layout (0 and `-inf` for rows no pair has reached).
    pub fn chunk(&self, i: usize) -> (&CudaSlice<T>, &CudaSlice<f32>, Layout) {
        (&self.o[i], &self.lse[i], self.layouts[i])
    }

    /// Copies every chunk's result into `o` (contiguous `[batch, rows, heads_q, head_dim]`) and
    /// `lse` (`[batch, heads_q, rows]`), queued on `stream`: in the rank's shard order
    /// ([`RowOrder::Shard`], `rows` its shard length) or at the chunks' places in the sequence
    /// ([`RowOrder::Sequence`]).
    pub fn write_rows(
        &self,
        stream: &Arc<CudaStream>,
        order: RowOrder,
        o: &mut CudaViewMut<'_, T>,
        lse: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        let l = self.layouts[0];
        let (b, hq, row) = (l.batch, l.heads, l.heads * l.head_dim);
        let rows = match order {
            RowOrder::Shard => self.chunks.iter().map(|c| c.len()).sum(),
            RowOrder::Sequence { seqlen } => seqlen,
        };
        if matches!(order, RowOrder::Sequence { .. }) && self.chunks.iter().any(|c| c.end > rows) {
            return Err(Error::InvalidArgument {
                arg: "order",
                value: format!("{order:?}"),
                expected: format!("a sequence holding the chunks {:?}", self.chunks),
            });
        }
        for (arg, len, need) in [
            ("o", o.len(), b * rows * row),
            ("lse", lse.len(), b * hq * rows),
        ] {
            if len < need {
                return Err(Error::OutOfBounds {
                    arg,
                    required: need as u128,
                    len,
                });
            }
        }
        let copy = Error::driver;
        let mut shard_row = 0;
        for (i, c) in self.chunks.iter().enumerate() {
            let lc = c.len();
            let first = match order {
                RowOrder::Shard => shard_row,
                RowOrder::Sequence { .. } => c.start,
            };
            shard_row += lc;
            for bi in 0..b {
                let src = self.o[i].slice(bi * lc * row..(bi + 1) * lc * row);
                let at = (bi * rows + first) * row;
                let mut dst = o.slice_mut(at..at + lc * row);
                stream
                    .memcpy_dtod(&src, &mut dst)
                    .map_err(copy("writing a ring result"))?;
                for h in 0..hq {
                    let src = self.lse[i].slice((bi * hq + h) * lc..(bi * hq + h + 1) * lc);
                    let at = (bi * hq + h) * rows + first;
                    let mut dst = lse.slice_mut(at..at + lc);
                    stream
                        .memcpy_dtod(&src, &mut dst)
                        .map_err(copy("writing a ring result"))?;
                }
            }
        }
        Ok(())
    }
}

/// Where [`RingAccumulator::write_rows`] puts a rank's rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowOrder {
    /// The rank's shard, its chunks one after the other.
    Shard,
    /// The whole sequence of `seqlen` tokens, each chunk at its own positions.
    Sequence {
        /// Tokens of the sequence.
        seqlen: usize,
    },
}

/// Rows `rows` of a contiguous `[batch, seqlen, heads, head_dim]` tensor `l` as a view and the
/// layout of that view (the tensor's strides).
fn rows_of<'a, T>(
    data: &CudaView<'a, T>,
    l: &Layout,
    rows: &std::ops::Range<usize>,
) -> (CudaView<'a, T>, Layout) {
    let off = rows.start * l.seq_stride as usize;
    (
        data.slice(off..),
        Layout {
            seqlen: rows.len(),
            ..*l
        },
    )
}

/// The checks of one rank's step before any launch: the rank and step in the ring, the
/// accumulator the rank's, a head dim the LSE merge takes, and the query, key and value shards
/// contiguous at the rank's and the key owner's shard lengths and long enough.
pub(super) fn check_step<T>(
    plan: &RingPlan,
    (rank, step): (usize, usize),
    [(qa, q), (ka, k), (va, v)]: [(&'static str, &Input<'_, '_, T>); 3],
    acc: &RingAccumulator<T>,
) -> Result<()> {
    if rank >= plan.ranks() {
        return Err(Error::InvalidArgument {
            arg: "rank",
            value: rank.to_string(),
            expected: format!("a rank of the ring's {}", plan.ranks()),
        });
    }
    if step >= plan.ranks() {
        return Err(Error::InvalidArgument {
            arg: "step",
            value: step.to_string(),
            expected: format!("a step of the ring's {}", plan.ranks()),
        });
    }
    if acc.rank != rank || acc.chunks != plan.shard(rank) {
        return Err(Error::InvalidArgument {
            arg: "acc",
            value: format!(
                "the accumulator of rank {} (chunks {:?})",
                acc.rank, acc.chunks
            ),
            expected: format!("rank {rank}'s of this plan (chunks {:?})", plan.shard(rank)),
        });
    }
    // The LSE merge moves 8 elements at a time: check before the first launch, so that a step
    // never stops half done.
    let d = acc.layouts[0].head_dim;
    if d % 8 != 0 {
        return Err(Error::InvalidArgument {
            arg: "q.head_dim",
            value: d.to_string(),
            expected: "a multiple of 8 (the LSE merge's)".into(),
        });
    }
    let owner = plan.kv_owner(rank, step);
    for (arg, l, rows, heads) in [
        (qa, &q.layout, plan.shard_len(rank), acc.layouts[0].heads),
        (ka, &k.layout, plan.shard_len(owner), k.layout.heads),
        (va, &v.layout, plan.shard_len(owner), k.layout.heads),
    ] {
        let want = Layout::bshd(acc.layouts[0].batch, rows, heads, acc.layouts[0].head_dim);
        if *l != want {
            return Err(Error::InvalidArgument {
                arg,
                value: format!("{l:?}"),
                expected: format!("the contiguous shard layout {want:?}"),
            });
        }
    }
    for (arg, len, l) in [
        (qa, q.data.len(), &q.layout),
        (ka, k.data.len(), &k.layout),
        (va, v.data.len(), &v.layout),
    ] {
        if len < l.numel() {
            return Err(Error::OutOfBounds {
                arg,
                required: l.numel() as u128,
                len,
            });
        }
    }
    Ok(())
}

impl Attention {
    /// Rank `rank`'s step `step` of `plan`: attention of its shard's queries `q` (`[batch,
    /// shard_len(rank), heads_q, head_dim]`, contiguous) over the visible pairs of the key / value
    /// shard it holds at that step (`k`, `v`: the shard of `plan.kv_owner(rank, step)`, contiguous,
    /// `[batch, shard_len(owner), heads_kv, head_dim]`), merged into `acc` by log-sum-exp. A step
    /// with no visible pair does nothing.
    #[allow(clippy::too_many_arguments)]
    pub fn ring_step<T: Element>(
        &self,
        stream: &Arc<CudaStream>,
        plan: &RingPlan,
        (rank, step): (usize, usize),
        q: Input<'_, '_, T>,
        k: Input<'_, '_, T>,
        v: Input<'_, '_, T>,
        acc: &mut RingAccumulator<T>,
        softmax_scale: Option<f32>,
    ) -> Result<()> {
        check_step(plan, (rank, step), [("q", &q), ("k", &k), ("v", &v)], acc)?;
        for p in plan.pairs(rank, step) {
            self.ring_pair(stream, plan, rank, &p, (&q, &k, &v), acc, softmax_scale)?;
        }
        Ok(())
    }

    /// One pair of rank `rank`'s step: attention of its query rows over its key rows, written
    /// into the chunk's accumulator or merged into its rows (arguments checked by `check_step`).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn ring_pair<T: Element>(
        &self,
        stream: &Arc<CudaStream>,
        plan: &RingPlan,
        rank: usize,
        p: &PairWork,
        (q, k, v): (&Input<'_, '_, T>, &Input<'_, '_, T>, &Input<'_, '_, T>),
        acc: &mut RingAccumulator<T>,
        softmax_scale: Option<f32>,
    ) -> Result<()> {
        let shard = plan.shard(rank);
        let c = p.q_chunk;
        // The pair's queries as rows of their chunk (all of it, or the ones that see a key).
        let chunk_start = p.q.start - shard[c].start;
        let whole = p.q == shard[c];
        let (qv, ql) = rows_of(q.data, &q.layout, &p.q_rows);
        let (kv, kl) = rows_of(k.data, &k.layout, &p.k_rows);
        let (vv, vl) = rows_of(v.data, &v.layout, &p.k_rows);
        let options = ForwardOptions {
            mask: p.mask.spec(),
            softmax_scale,
        };
        let inputs = (
            Input {
                data: &qv,
                layout: ql,
            },
            Input {
                data: &kv,
                layout: kl,
            },
            Input {
                data: &vv,
                layout: vl,
            },
        );
        let l = acc.layouts[c];
        if whole && !acc.started[c] {
            // The chunk's first pair writes its accumulator directly.
            let (mut o, mut lse) = (acc.o[c].as_view_mut(), acc.lse[c].as_view_mut());
            self.forward(
                stream,
                inputs.0,
                inputs.1,
                inputs.2,
                Output {
                    data: &mut o,
                    layout: l,
                    lse: Some(&mut lse),
                },
                &options,
            )?;
            acc.started[c] = true;
            return Ok(());
        }
        // The partial result of the pair's rows, contiguous in the scratch.
        let pl_layout = Layout::bshd(l.batch, p.q.len(), l.heads, l.head_dim);
        let n = pl_layout.numel();
        let rows = l.batch * l.heads * p.q.len();
        {
            let mut po = acc.part_o.slice_mut(..n);
            let mut pl = acc.part_lse.slice_mut(..rows);
            self.forward(
                stream,
                inputs.0,
                inputs.1,
                inputs.2,
                Output {
                    data: &mut po,
                    layout: pl_layout,
                    lse: Some(&mut pl),
                },
                &options,
            )?;
        }
        // Merged into the same rows of the chunk's result: its O rows through the chunk's
        // strides, its LSE rows `l.seqlen` apart per (batch, head).
        let (po, pl) = (acc.part_o.slice(..n), acc.part_lse.slice(..rows));
        let acc_layout = Layout {
            seqlen: p.q.len(),
            ..l
        };
        let off = chunk_start * l.seq_stride as usize;
        let mut o = acc.o[c].slice_mut(off..);
        let mut lse = acc.lse[c].slice_mut(chunk_start..);
        self.merge_strided(
            stream,
            (
                Output {
                    data: &mut o,
                    layout: acc_layout,
                    lse: Some(&mut lse),
                },
                l.seqlen,
            ),
            Input {
                data: &po,
                layout: pl_layout,
            },
            (&pl, p.q.len()),
        )?;
        // The chunk's rows now hold a result: a later pair over the whole chunk merges.
        acc.started[c] = true;
        Ok(())
    }

    /// The whole ring of `plan` run on this one GPU, the shard transfers made device copies:
    /// attention of `q`, `k`, `v` (contiguous `[batch, seqlen, heads, head_dim]`, the plan's
    /// length) into `out` and its log-sum-exp (required: `[batch, heads_q, seqlen]`), computed
    /// in the ring's order and merges. For checking the ring's compute and merge order against
    /// the reference, and for timing it without a network; a multi-GPU ring runs
    /// [`ring_step`](Self::ring_step) per rank.
    #[allow(clippy::too_many_arguments)]
    pub fn ring_forward_one_gpu<T: Element>(
        &self,
        stream: &Arc<CudaStream>,
        plan: &RingPlan,
        q: Input<'_, '_, T>,
        k: Input<'_, '_, T>,
        v: Input<'_, '_, T>,
        out: Output<'_, '_, T>,
        softmax_scale: Option<f32>,
    ) -> Result<()> {
        self.check_one_gpu(stream, plan, (&q, &k, &v), &out)?;
        let out_lse = out.lse.ok_or_else(lse_required)?;
        let (ql, kl) = (q.layout, k.layout);
        let (b, d, hq, hk) = (ql.batch, ql.head_dim, ql.heads, kl.heads);
        let gather = |x: &CudaView<'_, T>, heads: usize, rank: usize| {
            gather_shard(stream, plan, x, (b, heads, d), rank)
        };
        let s = plan.seqlen();
        for rank in 0..plan.ranks() {
            let q_shard = gather(q.data, hq, rank)?;
            let mut acc = RingAccumulator::<T>::new(stream, plan, rank, (b, hq, d))?;
            let n = plan.shard_len(rank);
            for step in 0..plan.ranks() {
                // The transfer: the shard the rank holds at this step, copied from its owner's rows.
                let owner = plan.kv_owner(rank, step);
                let (k_held, v_held) = (gather(k.data, hk, owner)?, gather(v.data, hk, owner)?);
                let m = plan.shard_len(owner);
                let (qv, kv, vv) = (q_shard.as_view(), k_held.as_view(), v_held.as_view());
                self.ring_step(
                    stream,
                    plan,
                    (rank, step),
                    Input {
                        data: &qv,
                        layout: Layout::bshd(b, n, hq, d),
                    },
                    Input {
                        data: &kv,
                        layout: Layout::bshd(b, m, hk, d),
                    },
                    Input {
                        data: &vv,
                        layout: Layout::bshd(b, m, hk, d),
                    },
                    &mut acc,
                    softmax_scale,
                )?;
            }
            // The rank's rows back in sequence order.
            acc.write_rows(stream, RowOrder::Sequence { seqlen: s }, out.data, out_lse)?;
        }
        Ok(())
    }

    /// The checks of a one-GPU ring before any launch: contiguous tensors of the plan's length,
    /// one context, a head dim the LSE merge takes, and an output log-sum-exp; returns it.
    pub(super) fn check_one_gpu<T: Element>(
        &self,
        stream: &Arc<CudaStream>,
        plan: &RingPlan,
        (q, k, v): (&Input<'_, '_, T>, &Input<'_, '_, T>, &Input<'_, '_, T>),
        out: &Output<'_, '_, T>,
    ) -> Result<()> {
        let (ql, kl) = (q.layout, k.layout);
        for (arg, l, heads) in [
            ("q", &ql, ql.heads),
            ("k", &kl, kl.heads),
            ("v", &v.layout, kl.heads),
            ("o", &out.layout, ql.heads),
        ] {
            let want = Layout::bshd(ql.batch, plan.seqlen(), heads, ql.head_dim);
            if *l != want {
                return Err(Error::InvalidArgument {
                    arg,
                    value: format!("{l:?}"),
                    expected: format!("the contiguous layout {want:?} (the plan's length)"),
                });
            }
        }
        for (arg, ctx) in [
            ("stream", stream.context().cu_ctx()),
            ("q", q.data.stream().context().cu_ctx()),
            ("k", k.data.stream().context().cu_ctx()),
            ("v", v.data.stream().context().cu_ctx()),
            ("o", out.data.stream().context().cu_ctx()),
        ] {
            self.same_context(arg, ctx)?;
        }
        if ql.head_dim % 8 != 0 {
            return Err(Error::InvalidArgument {
                arg: "q.head_dim",
                value: ql.head_dim.to_string(),
                expected: "a multiple of 8 (the LSE merge's)".into(),
            });
        }
        let Some(out_lse) = out.lse.as_deref() else {
            return Err(lse_required());
        };
        let (b, hq) = (ql.batch, ql.heads);
        for (arg, len, need) in [
            ("q", q.data.len(), ql.numel()),
            ("k", k.data.len(), kl.numel()),
            ("v", v.data.len(), kl.numel()),
            ("o", out.data.len(), ql.numel()),
            ("out.lse", out_lse.len(), b * hq * plan.seqlen()),
        ] {
            if len < need {
                return Err(Error::OutOfBounds {
                    arg,
                    required: need as u128,
                    len,
                });
            }
        }
        Ok(())
    }
}

/// A one-GPU ring's error for an output without a log-sum-exp.
pub(super) fn lse_required() -> Error {
    Error::InvalidArgument {
        arg: "out.lse",
        value: "None".into(),
        expected: "the log-sum-exp the ring merges by".into(),
    }
}

/// Rank `rank`'s shard of a contiguous `[batch, seqlen, heads, head_dim]` tensor (`dims`: batch,
/// heads, head dim): its chunks' rows, batch entry by entry, copied into a new buffer.
pub(super) fn gather_shard<T: Element>(
    stream: &Arc<CudaStream>,
    plan: &RingPlan,
    x: &CudaView<'_, T>,
    (b, heads, d): (usize, usize, usize),
    rank: usize,
) -> Result<CudaSlice<T>> {
    let (s, row) = (plan.seqlen(), heads * d);
    let n = plan.shard_len(rank);
    let mut dst: CudaSlice<T> = stream
        .alloc_zeros(b * n * row)
        .map_err(Error::driver("allocating a ring shard"))?;
    for bi in 0..b {
        let mut at = 0;
        for c in plan.shard(rank) {
            let src = x.slice((bi * s + c.start) * row..(bi * s + c.end) * row);
            let mut to = dst.slice_mut((bi * n + at) * row..(bi * n + at + c.len()) * row);
            stream
                .memcpy_dtod(&src, &mut to)
                .map_err(Error::driver("copying a ring shard"))?;
            at += c.len();
        }
    }
    Ok(dst)
}
