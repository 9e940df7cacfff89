//! Ring attention under rotary positions (RoPE, ReRoPE, Leaky ReRoPE) on the GPU: each rank
//! rotates its own shard's queries and keys to their global positions for both branches of the
//! position mode ([`Attention::ring_rope_rotate`], the RoPE forward's key pass and the backward's
//! query pass with each chunk's start as its offset), and each step runs the parts of
//! [`RingPlan::rope_pairs`] over the rows of their branch ([`Attention::ring_rope_step`]), through
//! the exact forward and the LSE merge of the plain ring. [`Attention::ring_rope_forward_one_gpu`]
//! runs the whole ring on one GPU, checked against the two-matrix definition
//! (`reference::ring_rope_attention_f64`).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, CudaView, DevicePtr, DeviceSlice};

use super::ring::{check_step, gather_shard, lse_required, RingAccumulator, RowOrder};
use super::rope::{rope_keys_params, RopeTables};
use super::rope_backward::rope_queries_params;
use super::{Attention, ForwardOptions, Input, Output, RawForward};
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::ring::{RingPlan, RopeBranch};
use crate::rope::{PositionMode, RopeOptions};
use crate::Element;

/// A rank's shard rotated for a rotary ring ([`Attention::ring_rope_rotate`]), contiguous
/// `[batch, shard_len, heads, head_dim]`: its queries and keys rotated to their global positions
/// as plain RoPE (the queries with log-n scaling), and as the outside branch for ReRoPE and Leaky
/// ReRoPE (`None` for plain RoPE). In a ring of GPUs the key halves travel with the values.
pub struct RopeShard<T> {
    /// Queries, inside branch.
    pub q_in: CudaSlice<T>,
    /// Queries, outside branch.
    pub q_out: Option<CudaSlice<T>>,
    /// Keys, inside branch.
    pub k_in: CudaSlice<T>,
    /// Keys, outside branch.
    pub k_out: Option<CudaSlice<T>>,
}

/// A rotary ring's plan must attend with the rotary options' mask.
fn check_rope_plan(plan: &RingPlan, rope: &RopeOptions) -> Result<()> {
    if plan.mask() != rope.mask() {
        return Err(Error::InvalidMask {
            arg: "plan",
            value: format!("{:?}", plan.mask()),
            expected: "the rotary options' mask (rope.mask(): causal, with its left window)",
        });
    }
    Ok(())
}

impl Attention {
    /// Rank `rank`'s shard of `plan` rotated for the ring under `rope`: `q` and `k` are its
    /// un-rotated queries and keys (`[batch, shard_len(rank), heads, head_dim]`, contiguous), the
    /// rows of each chunk at the chunk's global positions (plus `rope`'s per-sequence offsets).
    /// The frequency table is the whole sequence's (`plan.seqlen()` plus the largest offset).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for a rank outside the ring or shards of another layout,
    /// [`Error::OutOfBounds`] for short buffers, [`Error::InvalidMask`] when the plan's mask is not
    /// `rope.mask()`, as [`RopeOptions::validate`] for the whole sequence; driver errors.
    pub fn ring_rope_rotate<T: Element>(
        &self,
        stream: &Arc<CudaStream>,
        plan: &RingPlan,
        rank: usize,
        rope: &RopeOptions,
        q: Input<'_, '_, T>,
        k: Input<'_, '_, T>,
    ) -> Result<RopeShard<T>> {
        if rank >= plan.ranks() {
            return Err(Error::InvalidArgument {
                arg: "rank",
                value: rank.to_string(),
                expected: format!("a rank of the ring's {}", plan.ranks()),
            });
        }
        check_rope_plan(plan, rope)?;
        let (ql, kl) = (q.layout, k.layout);
        let (b, n, d, s) = (ql.batch, plan.shard_len(rank), ql.head_dim, plan.seqlen());
        for (arg, l, heads) in [("q", &ql, ql.heads), ("k", &kl, kl.heads)] {
            let want = Layout::bshd(b, n, heads, d);
            if *l != want {
                return Err(Error::InvalidArgument {
                    arg,
                    value: format!("{l:?}"),
                    expected: format!("the contiguous shard layout {want:?}"),
                });
            }
        }
        ql.check_dims("q")?;
        kl.check_dims("k")?;
        for (arg, len, l) in [("q", q.data.len(), &ql), ("k", k.data.len(), &kl)] {
            if len < l.numel() {
                return Err(Error::OutOfBounds {
                    arg,
                    required: l.numel() as u128,
                    len,
                });
            }
        }
        for (arg, ctx) in [
            ("stream", stream.context().cu_ctx()),
            ("q", q.data.stream().context().cu_ctx()),
            ("k", k.data.stream().context().cu_ctx()),
        ] {
            self.same_context(arg, ctx)?;
        }
        rope.validate(d, b, s, s)?;
        let chunks = plan.shard(rank);
        // One offset per (batch entry, chunk): the chunk's first global position.
        let mut offsets = Vec::with_capacity(b * chunks.len());
        for bi in 0..b {
            for c in &chunks {
                let p = i64::from(rope.offset(bi)) + c.start as i64;
                // In i32: validate checked every position of the sequence plus the window.
                offsets.push(p as i32);
            }
        }
        let tables = RopeTables::with_offsets(
            stream,
            rope,
            d,
            s + rope.max_offset() as usize,
            Some(&offsets),
        )?;
        let two = !matches!(rope.mode, PositionMode::Rope);
        let alloc = |len: usize| -> Result<CudaSlice<T>> {
            stream
                .alloc_zeros(len)
                .map_err(Error::driver("allocating a rotated ring shard"))
        };
        let shard = RopeShard {
            q_in: alloc(ql.numel())?,
            q_out: if two { Some(alloc(ql.numel())?) } else { None },
            k_in: alloc(kl.numel())?,
            k_out: if two { Some(alloc(kl.numel())?) } else { None },
        };
        // The passes' launches, with every pointer's guard alive until they are queued.
        {
            let (raw, _g1, _g2) = tables.raw(stream, rope, (0, 0));
            let lowered = raw.lower_rotation(d)?;
            let ((qp, _g3), (kp, _g4)) = (q.data.device_ptr(stream), k.data.device_ptr(stream));
            let ((ip, _g5), (rp, _g6)) =
                (shard.q_in.device_ptr(stream), shard.k_in.device_ptr(stream));
            let (q_out, k_out) = (
                shard.q_out.as_ref().map(|x| x.device_ptr(stream)),
                shard.k_out.as_ref().map(|x| x.device_ptr(stream)),
            );
            let (op, ap) = (
                q_out.as_ref().map_or(0, |x| x.0),
                k_out.as_ref().map_or(0, |x| x.0),
            );
            let elem = std::mem::size_of::<T>() as u64;
            let dt = T::DTYPE.name();
            let mut row0 = 0;
            let chunk_rows: Vec<usize> = chunks
                .iter()
                .map(|c| {
                    let r = row0;
                    row0 += c.len();
                    r
                })
                .collect();
            for bi in 0..b {
                for (ci, c) in chunks.iter().enumerate() {
                    let row = (bi * n + chunk_rows[ci]) as u64;
                    let (qo, ko) = (
                        row * (ql.heads * d) as u64 * elem,
                        row * (kl.heads * d) as u64 * elem,
                    );
                    let at = |base: u64, off: u64| if base == 0 { 0 } else { base + off };
                    let lf_rope = crate::sys::LfRope {
                        position_offsets: (lowered.position_offsets as u64
                            + 4 * (bi * chunks.len() + ci) as u64)
                            as *const i32,
                        k_rot: (rp + ko) as *const _,
                        k_alt: at(ap, ko) as *const _,
                        ..lowered
                    };
                    let (cq, ck) = (
                        Layout::bshd(1, c.len(), ql.heads, d),
                        Layout::bshd(1, c.len(), kl.heads, d),
                    );
                    // The key pass reads K through a forward's view of it (nothing else of the view).
                    let view = RawForward {
                        dtype: T::DTYPE,
                        q: qp + qo,
                        k: kp + ko,
                        v: 0,
                        o: 0,
                        lse: 0,
                        q_layout: cq,
                        k_layout: ck,
                        v_layout: ck,
                        o_layout: cq,
                        options: ForwardOptions::causal(),
                        block_mask: None,
                    };
                    let (mut keys, pairs) = rope_keys_params(&view, lf_rope)?;
                    let mut queries = rope_queries_params(
                        (qp + qo, &cq),
                        (ip + qo, at(op, qo)),
                        0,
                        c.len(),
                        lf_rope,
                    );
                    // SAFETY: q and k were checked against their contiguous shard layouts (lengths,
                    // context); the chunk's rows of batch entry bi start `row` rows in, in q, k and
                    // in the outputs allocated above with the same layouts (disjoint from the inputs
                    // and each other); the offsets and tables were uploaded above and outlive the
                    // launches on this stream; one thread per element pair of the chunk, covered once.
                    unsafe {
                        self.launch_rope_keys(
                            stream.cu_stream(),
                            &format!("rope_keys_{dt}"),
                            pairs,
                            &mut keys,
                        )?;
                        self.launch_rope_queries(stream.cu_stream(), dt, &mut queries)?;
                    }
                }
            }
        }
        Ok(shard)
    }

    /// [`ring_step`](Self::ring_step) under rotary positions: the parts of
    /// [`RingPlan::rope_pairs`] (`plan`'s mask causal, optionally with a left window; `mode` the
    /// position mode), each over the rows rotated as its branch rotates them. `q` holds the rank's
    /// shard rotated to its global positions as plain RoPE (log-n scaling included) and, for
    /// ReRoPE and Leaky ReRoPE, as the outside branch; `k` the held key shard the same way (its
    /// owner's global positions); layouts as [`ring_step`](Self::ring_step)'s.
    /// [`ring_rope_rotate`](Self::ring_rope_rotate) makes them.
    ///
    /// # Errors
    ///
    /// As [`ring_step`](Self::ring_step) and [`RingPlan::rope_pairs`];
    /// [`Error::InvalidArgument`] when a ReRoPE or Leaky ReRoPE step is given no outside rows.
    #[allow(clippy::too_many_arguments)]
    pub fn ring_rope_step<T: Element>(
        &self,
        stream: &Arc<CudaStream>,
        plan: &RingPlan,
        (rank, step): (usize, usize),
        mode: &PositionMode,
        (q_in, q_out): (Input<'_, '_, T>, Option<Input<'_, '_, T>>),
        (k_in, k_out): (Input<'_, '_, T>, Option<Input<'_, '_, T>>),
        v: Input<'_, '_, T>,
        acc: &mut RingAccumulator<T>,
        softmax_scale: Option<f32>,
    ) -> Result<()> {
        check_step(
            plan,
            (rank, step),
            [("q", &q_in), ("k", &k_in), ("v", &v)],
            acc,
        )?;
        let outside = match (q_out, k_out) {
            (Some(q), Some(k)) => {
                check_step(
                    plan,
                    (rank, step),
                    [("q_out", &q), ("k_out", &k), ("v", &v)],
                    acc,
                )?;
                Some((q, k))
            }
            (None, None) => None,
            (q, _) => {
                return Err(Error::InvalidArgument {
                    arg: if q.is_none() { "q_out" } else { "k_out" },
                    value: "None".into(),
                    expected: "both outside shards or neither".into(),
                })
            }
        };
        let parts = plan.rope_pairs(rank, step, mode)?;
        if outside.is_none() && !matches!(mode, PositionMode::Rope) {
            return Err(Error::InvalidArgument {
                arg: "q_out",
                value: "None".into(),
                expected: format!("the outside branch's rotated rows ({mode:?})"),
            });
        }
        for (p, branch) in parts {
            let (q, k) = match (branch, &outside) {
                (RopeBranch::Outside, Some((q, k))) => (q, k),
                _ => (&q_in, &k_in),
            };
            self.ring_pair(stream, plan, rank, &p, (q, k, &v), acc, softmax_scale)?;
        }
        Ok(())
    }

    /// [`ring_forward_one_gpu`](Self::ring_forward_one_gpu) under rotary positions: causal
    /// attention of un-rotated `q` and `k` with the scores of `rope` (RoPE, ReRoPE or Leaky
    /// ReRoPE, its scaling, log-n scaling and per-sequence offsets; `plan`'s mask must be
    /// `rope.mask()`), as [`Attention::forward_rope`] computes it over the whole sequence, run
    /// as a ring: every rank rotates its shard where it lives
    /// ([`ring_rope_rotate`](Self::ring_rope_rotate)), and its steps run the parts of
    /// [`RingPlan::rope_pairs`] over the rotated shards it holds
    /// ([`ring_rope_step`](Self::ring_rope_step)), the transfers made device copies.
    ///
    /// # Errors
    ///
    /// As [`ring_forward_one_gpu`](Self::ring_forward_one_gpu) and
    /// [`ring_rope_rotate`](Self::ring_rope_rotate).
    #[allow(clippy::too_many_arguments)]
    pub fn ring_rope_forward_one_gpu<T: Element>(
        &self,
        stream: &Arc<CudaStream>,
        plan: &RingPlan,
        rope: &RopeOptions,
        q: Input<'_, '_, T>,
        k: Input<'_, '_, T>,
        v: Input<'_, '_, T>,
        out: Output<'_, '_, T>,
        softmax_scale: Option<f32>,
    ) -> Result<()> {
        self.check_one_gpu(stream, plan, (&q, &k, &v), &out)?;
        check_rope_plan(plan, rope)?;
        rope.validate(
            q.layout.head_dim,
            q.layout.batch,
            plan.seqlen(),
            plan.seqlen(),
        )?;
        let out_lse = out.lse.ok_or_else(lse_required)?;
        let (ql, kl) = (q.layout, k.layout);
        let (b, s, d, hq, hk) = (ql.batch, plan.seqlen(), ql.head_dim, ql.heads, kl.heads);
        let gather = |x: &CudaView<'_, T>, heads: usize, rank: usize| {
            gather_shard(stream, plan, x, (b, heads, d), rank)
        };
        // Each rank's shard, rotated where it lives.
        let mut shards = Vec::with_capacity(plan.ranks());
        for rank in 0..plan.ranks() {
            let n = plan.shard_len(rank);
            let (qs, ks) = (gather(q.data, hq, rank)?, gather(k.data, hk, rank)?);
            let (qv, kv) = (qs.as_view(), ks.as_view());
            shards.push(self.ring_rope_rotate(
                stream,
                plan,
                rank,
                rope,
                Input {
                    data: &qv,
                    layout: Layout::bshd(b, n, hq, d),
                },
                Input {
                    data: &kv,
                    layout: Layout::bshd(b, n, hk, d),
                },
            )?);
        }
        for (rank, mine) in shards.iter().enumerate() {
            let n = plan.shard_len(rank);
            let mut acc = RingAccumulator::<T>::new(stream, plan, rank, (b, hq, d))?;
            let (qa, qb) = (
                mine.q_in.as_view(),
                mine.q_out.as_ref().map(|x| x.as_view()),
            );
            for step in 0..plan.ranks() {
                // The transfer: the owner's rotated keys and its values.
                let owner = plan.kv_owner(rank, step);
                let m = plan.shard_len(owner);
                let held = &shards[owner];
                let v_held = gather(v.data, hk, owner)?;
                let (ka, va) = (held.k_in.as_view(), v_held.as_view());
                let kb = held.k_out.as_ref().map(|x| x.as_view());
                let (ql_n, kl_m) = (Layout::bshd(b, n, hq, d), Layout::bshd(b, m, hk, d));
                self.ring_rope_step(
                    stream,
                    plan,
                    (rank, step),
                    &rope.mode,
                    (
                        Input {
                            data: &qa,
                            layout: ql_n,
                        },
                        qb.as_ref().map(|data| Input { data, layout: ql_n }),
                    ),
                    (
                        Input {
                            data: &ka,
                            layout: kl_m,
                        },
                        kb.as_ref().map(|data| Input { data, layout: kl_m }),
                    ),
                    Input {
                        data: &va,
                        layout: kl_m,
                    },
                    &mut acc,
                    softmax_scale,
                )?;
            }
            acc.write_rows(stream, RowOrder::Sequence { seqlen: s }, out.data, out_lse)?;
        }
        Ok(())
    }
}
