//! Memory decoding: the memory layer for a few new query tokens per sequence, over a KV cache of
//! the local window and an external memory, split across CTAs and merged by LSE.
//!
//! The local part is the decoding kernel over the cache of un-rotated local keys (RoPE decoding
//! with plain RoPE, or plain decoding without a rotation), into `o` and the LSE; the memory part
//! is the decoding kernel over the memory as a contiguous cache of raw keys, for the queries
//! rotated at their positions (by the RoPE query pass, which reads the cache's lengths on the
//! device), into scratch; the LSE merge folds the second into the first. Each part's keys are
//! split across CTAs as the decoding plan cuts them, so the memory is read at the decoding
//! kernel's bandwidth. The partial outputs are rounded to the element type before the merge, so
//! [`reference::memory_attention_two_pass_lowp`](crate::reference::memory_attention_two_pass_lowp)
//! is the budget.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, CudaViewMut, DevicePtr, DevicePtrMut, DeviceSlice};

use super::{memory_shape, not_plain_rope, MemoryInput};
use crate::attention::rope::RopeTables;
use crate::attention::rope_backward::rope_queries_params;
use crate::attention::{Attention, DecodeOptions, Input, KvCache, Output};
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::mask::MaskSpec;
use crate::rope::{PositionMode, RopeOptions};
use crate::Element;

/// Options of a memory decoding call (see [`Attention::decode_memory`]).
#[derive(Clone, Copy, Default)]
pub struct MemoryDecode<'a> {
    /// Plain RoPE for the queries and the local keys at their positions (query `i` of sequence
    /// `b` at `cache_len[b] - seqlen_q + i`, local key `j` at `j`, plus the options' offsets; its
    /// `window_left` narrows the local part). `PositionMode::Rope` only. `None`: no rotation, a
    /// causal local part.
    pub rope: Option<&'a RopeOptions>,
    /// Multiplies Q K^T before the softmax (both parts); `None` means `1 / sqrt(head_dim)`.
    pub softmax_scale: Option<f32>,
}

impl Attention {
    /// Memory attention for the new query tokens of each sequence (one to 16, as
    /// [`decode`](Self::decode)): each attends its cached local keys (causal, aligned
    /// bottom-right at the sequence's cache length; un-rotated keys, rotated on the fly with
    /// `opts.rope`) and every entry of `memory` (raw keys, `[batch, mem_len, heads_kv,
    /// head_dim]`, the cache's heads; `memory.mask`, `[batch, mem_len]` bytes, hides the entries
    /// whose byte is 0), in one softmax, computed as two split decoding passes merged by LSE (the
    /// memory part reads the mask in the decoding kernel). Output and LSE as `decode`; the rotated
    /// queries, the memory part's output and LSE (and the LSE when `out` asks for none) are
    /// allocated on `stream` and freed after the kernels. The cache's lengths and table are
    /// clamped and flagged as in `decode`. The call does not synchronize.
    #[allow(clippy::too_many_arguments)]
    pub fn decode_memory<T: Element>(
        &self,
        stream: &Arc<CudaStream>,
        q: Input<'_, '_, T>,
        cache: &KvCache<'_, '_, T>,
        memory: MemoryInput<'_, '_, T>,
        out: Output<'_, '_, T>,
        error_flag: Option<&mut CudaViewMut<'_, i32>>,
        opts: &MemoryDecode<'_>,
    ) -> Result<()> {
        let ql = q.layout;
        ql.check_dims("q")?;
        let kl = cache.k.layout;
        kl.check_dims("k")?;
        if let Some(r) = opts.rope {
            if r.mode != PositionMode::Rope {
                return Err(not_plain_rope(r.mode));
            }
        }
        let (ml, mvl) = (memory.keys.layout, memory.values.layout);
        memory_shape(&ql, kl.heads, &ml, &mvl)?;
        let mem_len = ml.seqlen;
        if mem_len > 0 {
            self.check_view("memory.keys", memory.keys.data, &ml)?;
            self.check_view("memory.values", memory.values.data, &mvl)?;
        }
        // Checked before the local part runs (the memory part checks it again).
        if let Some(m) = memory.mask {
            self.same_context("memory.mask", m.stream().context().cu_ctx())?;
            let need = (ql.batch as u128) * (mem_len as u128);
            if need > m.len() as u128 {
                return Err(Error::OutOfBounds {
                    arg: "memory.mask",
                    required: need,
                    len: m.len(),
                });
            }
        }
        let rows = ql.batch * ql.heads * ql.seqlen;
        let Output {
            data: o,
            layout: ol,
            lse,
        } = out;
        let mut own_lse: CudaSlice<f32>;
        let mut lse_view: CudaViewMut<'_, f32> = match lse {
            Some(l) => l.slice_mut(0..l.len()),
            None => {
                own_lse = stream
                    .alloc_zeros::<f32>(rows.max(1))
                    .map_err(Error::driver("allocating the local part's LSE"))?;
                own_lse.as_view_mut()
            }
        };
        let lse = &mut lse_view;
        self.decode_memory_with_lse(stream, q, cache, memory, (o, ol), lse, error_flag, opts)
    }

    /// [`decode_memory`](Self::decode_memory) with the LSE buffer the local part writes and the
    /// merge updates.
    #[allow(clippy::too_many_arguments)]
    fn decode_memory_with_lse<T: Element>(
        &self,
        stream: &Arc<CudaStream>,
        q: Input<'_, '_, T>,
        cache: &KvCache<'_, '_, T>,
        memory: MemoryInput<'_, '_, T>,
        (o, ol): (&mut CudaViewMut<'_, T>, Layout),
        lse: &mut CudaViewMut<'_, f32>,
        error_flag: Option<&mut CudaViewMut<'_, i32>>,
        opts: &MemoryDecode<'_>,
    ) -> Result<()> {
        let ql = q.layout;
        let d = ql.head_dim;
        let options = |mask: MaskSpec| DecodeOptions {
            mask,
            softmax_scale: opts.softmax_scale,
            ..DecodeOptions::default()
        };
        // The local part, into `o` and the LSE.
        let (mut ov, mut lv) = (o.slice_mut(0..o.len()), lse.slice_mut(0..lse.len()));
        let local_out = Output {
            data: &mut ov,
            layout: ol,
            lse: Some(&mut lv),
        };
        match opts.rope {
            Some(r) => self.decode_rope(
                stream,
                q,
                cache,
                local_out,
                error_flag,
                &options(r.mask()),
                r,
            )?,
            None => self.decode(
                stream,
                q,
                cache,
                local_out,
                error_flag,
                &options(MaskSpec::causal()),
            )?,
        }
        let mem_len = memory.keys.layout.seqlen;
        if mem_len == 0 {
            return Ok(());
        }
        // The memory part's queries: rotated at their positions, or as given.
        let packed = Layout::bshd(ql.batch, ql.seqlen, ql.heads, d);
        let q_rot: Option<CudaSlice<T>> = match opts.rope {
            Some(r) => Some(self.rotate_decode_queries(stream, &q, cache, r)?),
            None => None,
        };
        let q_rot_view = q_rot.as_ref().map(|b| b.as_view());
        let q_mem = match &q_rot_view {
            Some(v) => Input {
                data: v,
                layout: packed,
            },
            None => q,
        };
        let rows = ql.batch * ql.heads * ql.seqlen;
        let mut o_mem: CudaSlice<T> = stream
            .alloc_zeros(packed.numel())
            .map_err(Error::driver("allocating the memory part's output"))?;
        let mut lse_mem: CudaSlice<f32> = stream
            .alloc_zeros(rows)
            .map_err(Error::driver("allocating the memory part's LSE"))?;
        let mem_cache = KvCache {
            k: memory.keys,
            v: memory.values,
            block_table: None,
            cache_seqlens: None,
        };
        {
            let (mut ov, mut lv) = (o_mem.as_view_mut(), lse_mem.as_view_mut());
            let mem_out = Output {
                data: &mut ov,
                layout: packed,
                lse: Some(&mut lv),
            };
            let opts = options(MaskSpec::none());
            match memory.mask {
                Some(m) => self.decode_key_masked(
                    stream,
                    q_mem,
                    &mem_cache,
                    mem_out,
                    &opts,
                    ("memory.mask", m),
                )?,
                None => self.decode(stream, q_mem, &mem_cache, mem_out, None, &opts)?,
            }
        }
        let (pv, plv) = (o_mem.as_view(), lse_mem.as_view());
        let (mut ov, mut lv) = (o.slice_mut(0..o.len()), lse.slice_mut(0..lse.len()));
        self.merge(
            stream,
            Output {
                data: &mut ov,
                layout: ol,
                lse: Some(&mut lv),
            },
            Input {
                data: &pv,
                layout: packed,
            },
            &plv,
        )
    }

    /// The queries rotated with plain RoPE at their decoding positions (query `i` of sequence
    /// `b` at `cache_len[b] - seqlen_q + i` plus the offsets, the length read on the device and
    /// clamped into the cache's capacity as the decoding kernel clamps it), contiguous `[batch,
    /// seqlen_q, heads_q, head_dim]`, by the RoPE query pass.
    fn rotate_decode_queries<T: Element>(
        &self,
        stream: &Arc<CudaStream>,
        q: &Input<'_, '_, T>,
        cache: &KvCache<'_, '_, T>,
        rope: &RopeOptions,
    ) -> Result<CudaSlice<T>> {
        let ql = q.layout;
        let d = ql.head_dim;
        let kl = cache.k.layout;
        let capacity = match &cache.block_table {
            Some(bt) => bt.max_pages_per_seq.saturating_mul(kl.seqlen),
            None => kl.seqlen,
        }
        .max(1);
        rope.validate(d, ql.batch, ql.seqlen, capacity)?;
        if capacity > i32::MAX as usize || ql.seqlen > i32::MAX as usize {
            return Err(Error::InvalidArgument {
                arg: "k",
                value: format!("{capacity} keys per sequence"),
                expected: "at most i32::MAX".into(),
            });
        }
        self.check_view("q", q.data, &ql)?;
        if let Some(l) = cache.cache_seqlens {
            self.same_context("cache_seqlens", l.stream().context().cu_ctx())?;
            if l.len() < ql.batch {
                return Err(Error::OutOfBounds {
                    arg: "cache_seqlens",
                    required: ql.batch as u128,
                    len: l.len(),
                });
            }
        }
        let tables = RopeTables::upload(stream, rope, d, capacity + rope.max_offset() as usize)?;
        let (raw_rope, _g1, _g2) = tables.raw(stream, rope, (0, 0));
        let lowered = raw_rope.lower_rotation(d)?;
        let mut q_rot: CudaSlice<T> = stream
            .alloc_zeros(ql.batch * ql.seqlen * ql.heads * d)
            .map_err(Error::driver("allocating the rotated queries"))?;
        let (qp, _gq) = q.data.device_ptr(stream);
        let (lens, _gl) = match cache.cache_seqlens {
            Some(l) => {
                let (p, g) = l.device_ptr(stream);
                (p, Some(g))
            }
            None => (0, None),
        };
        {
            let (rp, _gr) = q_rot.device_ptr_mut(stream);
            let mut params = rope_queries_params((qp, &ql), (rp, 0), lens, capacity, lowered);
            // SAFETY: `q` was checked against its layout and this context, the lengths hold
            // `batch` i32 of this context (checked above), the tables were uploaded above on this
            // stream with the sizes the rotation reads, and the rotated queries were allocated
            // with every pair the pass writes; every buffer outlives the launch (frees are
            // ordered after it on this stream).
            unsafe { self.launch_rope_queries(stream.cu_stream(), T::DTYPE.name(), &mut params) }?;
        }
        Ok(q_rot)
    }
}
