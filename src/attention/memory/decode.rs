//! Memory decoding: the memory layer for a few new query tokens per sequence, over a KV cache of
//! the local window and an external memory, split across CTAs and merged by LSE.
//!
//! The local part is the decoding kernel over the cache of un-rotated local keys (RoPE decoding
//! with plain RoPE, or plain decoding without a rotation), into `o` and the LSE; the memory part
//! is the decoding kernel over the memory as a contiguous cache of raw keys (its mask read in the
//! kernel), for the queries rotated at their positions (by the RoPE query pass, which reads the
//! cache's lengths on the device), into the workspace; the LSE merge folds the second into the
//! first. Each part's keys are split across CTAs as the decoding plan cuts them, so the memory is
//! read at the decoding kernel's bandwidth. The partial outputs are rounded to the element type
//! before the merge, so
//! [`reference::memory_attention_two_pass_lowp`](crate::reference::memory_attention_two_pass_lowp)
//! is the budget.
//!
//! The raw entry ([`Attention::decode_memory_raw`]) takes one workspace for every part (its size
//! from [`Attention::decode_memory_plan`], which depends on the shapes and options alone), so a
//! decoding loop or a CUDA graph allocates nothing per call; the safe entry allocates it on the
//! stream and calls the raw one.

use std::sync::Arc;

use cudarc::driver::{sys, CudaStream, CudaViewMut};

use super::{memory_shape, not_plain_rope, plain_rope, table_ranges, MemoryInput};
use crate::attention::rope::RopeTables;
use crate::attention::rope_backward::rope_queries_params;
use crate::attention::{
    Attention, DecodeOptions, DecodePlan, DecodeProblem, Input, KvCache, Output, RawDecode,
    RawMerge, RawRope, Scratch,
};
use crate::check::{self, byte_range};
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::mask::MaskSpec;
use crate::rope::{PositionMode, RopeOptions};
use crate::sys::{LfDecodeParams, LfDecodeRopeParams, LfRope, LF_DECODE_PREFILL_QUERIES};
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

/// Arguments of the raw memory decoding ([`Attention::decode_memory_raw`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RawMemoryDecode {
    /// The local part as [`Attention::decode_raw`] takes it (with a rotation, as
    /// [`Attention::decode_rope_raw`] does): the new queries, the cache of un-rotated local keys
    /// with its table and lengths, the output, the LSE (0: the workspace holds it), the error
    /// flag and the options, whose mask must be causal without sinks (a left window allowed) and
    /// whose `softmax_scale` serves both parts. Its `workspace` and `split_counters` must be 0:
    /// [`workspace`](Self::workspace) holds every part's.
    pub local: RawDecode,
    /// Raw memory keys (never rotated), `[batch, mem_len, heads_kv, head_dim]` with the cache's
    /// batch, KV heads and head dim.
    pub mem_k: sys::CUdeviceptr,
    /// Memory values, shaped like the keys.
    pub mem_v: sys::CUdeviceptr,
    /// Layout of `mem_k`.
    pub mem_k_layout: Layout,
    /// Layout of `mem_v`.
    pub mem_v_layout: Layout,
    /// `[batch, mem_len]` bytes, 0 for an entry no query sees; or 0 (every entry visible).
    pub mem_mask: sys::CUdeviceptr,
    /// Device workspace of at least [`MemoryDecodePlan::workspace_bytes`] bytes, 16-byte aligned
    /// (0 when the plan needs none), apart from every tensor and table of the call.
    pub workspace: sys::CUdeviceptr,
    /// Bytes available at `workspace`.
    pub workspace_bytes: usize,
}

/// How a memory decoding call is cut: each part's split plan and the workspace they share.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryDecodePlan {
    /// The local part's plan.
    pub local: DecodePlan,
    /// The memory part's plan (`None` for an empty memory).
    pub memory: Option<DecodePlan>,
    /// Bytes of workspace the call needs: both parts' split partials, the rotated queries, the
    /// memory part's output and LSE, and the local part's LSE when the call asks for none. Its
    /// contents need not be anything.
    pub workspace_bytes: usize,
}

/// Where the parts live in the workspace: byte offsets from its start.
#[derive(Clone, Copy, Debug)]
struct Carve {
    local_ws: usize,
    mem_ws: usize,
    q_rot: usize,
    o_mem: usize,
    lse_mem: usize,
    lse_local: usize,
}

impl RawMemoryDecode {
    /// The rows' packed layout `[batch, seqlen_q, heads_q, head_dim]`: the rotated queries', the
    /// memory part's output's.
    fn packed(&self) -> Layout {
        let q = &self.local.q_layout;
        Layout::bshd(q.batch, q.seqlen, q.heads, q.head_dim)
    }

    /// The memory part as a decoding call over the memory as a contiguous cache: queries `q`
    /// (with their layout), output and LSE at `o` and `lse`, split partials at `workspace`. A
    /// masked call of many query tokens keeps the split count the plan would choose, so that it
    /// runs the decoding kernel (the chunked-prefill kernel reads no key mask).
    fn memory_part(
        &self,
        slots: usize,
        (q, q_layout): (sys::CUdeviceptr, Layout),
        (o, lse): (sys::CUdeviceptr, sys::CUdeviceptr),
        (workspace, workspace_bytes): (sys::CUdeviceptr, usize),
    ) -> RawDecode {
        let l = &self.local;
        let mut options = DecodeOptions {
            mask: MaskSpec::none(),
            softmax_scale: l.options.softmax_scale,
            max_seqlen_k: None,
            num_splits: None,
        };
        if self.mem_mask != 0 && q_layout.seqlen >= LF_DECODE_PREFILL_QUERIES as usize {
            let problem = DecodeProblem {
                batch: q_layout.batch,
                seqlen_q: q_layout.seqlen,
                heads_q: q_layout.heads,
                heads_kv: self.mem_k_layout.heads,
                head_dim: q_layout.head_dim,
                max_seqlen_k: self.mem_k_layout.seqlen.max(1),
            };
            options.num_splits = Some(problem.plan(slots, None).num_splits);
        }
        RawDecode {
            dtype: l.dtype,
            q,
            k: self.mem_k,
            v: self.mem_v,
            o,
            lse,
            q_layout,
            k_layout: self.mem_k_layout,
            v_layout: self.mem_v_layout,
            o_layout: self.packed(),
            block_table: 0,
            max_pages_per_seq: 0,
            cache_seqlens: 0,
            error_flag: 0,
            options,
            workspace,
            workspace_bytes,
            split_counters: 0,
            split_counters_len: 0,
        }
    }

    /// The checks that depend on the shapes and options, the plan and the workspace's carve.
    fn plan(&self, slots: usize, rope: Option<&RawRope>) -> Result<(MemoryDecodePlan, Carve)> {
        let l = &self.local;
        let ql = l.q_layout;
        ql.check_dims("q")?;
        l.k_layout.check_dims("k")?;
        if let Some(r) = rope {
            plain_rope(r.mode)?;
        }
        let m = l.options.mask;
        if !m.causal || m.sink_tokens != 0 {
            return Err(Error::InvalidMask {
                arg: "local.options.mask",
                value: format!("{m:?}"),
                expected:
                    "causal without sinks (a left window allowed): the memory layer's local part",
            });
        }
        for (arg, ptr) in [
            ("local.workspace", l.workspace),
            ("local.split_counters", l.split_counters),
        ] {
            if ptr != 0 {
                return Err(Error::InvalidArgument {
                    arg,
                    value: format!("{ptr:#x}"),
                    expected: "0: the call's workspace holds every part's".into(),
                });
            }
        }
        memory_shape(
            &ql,
            l.k_layout.heads,
            &self.mem_k_layout,
            &self.mem_v_layout,
        )?;
        let (local, _, _) = l.shape_plan(slots, rope.is_some())?;
        let mem_len = self.mem_k_layout.seqlen;
        let packed = self.packed();
        let memory = if mem_len > 0 {
            let q = if rope.is_some() { packed } else { ql };
            let part = self.memory_part(slots, (0, q), (0, 0), (0, 0));
            Some(part.shape_plan(slots, false)?.0)
        } else {
            None
        };
        // Rows fit in i32 (the local plan checked it), so these sizes do not overflow.
        let rows = ql.batch * ql.heads * ql.seqlen;
        let row_bytes = rows * ql.head_dim * 2;
        let mut end = 0usize;
        let mut take = |bytes: usize| {
            let at = end;
            end = (end + bytes).next_multiple_of(256);
            at
        };
        let local_ws = take(local.workspace_bytes);
        let carve = match memory {
            Some(mp) => Carve {
                local_ws,
                mem_ws: take(mp.workspace_bytes),
                q_rot: if rope.is_some() { take(row_bytes) } else { 0 },
                o_mem: take(row_bytes),
                lse_mem: take(rows * 4),
                lse_local: if l.lse == 0 { take(rows * 4) } else { 0 },
            },
            None => Carve {
                local_ws,
                mem_ws: 0,
                q_rot: 0,
                o_mem: 0,
                lse_mem: 0,
                lse_local: 0,
            },
        };
        let plan = MemoryDecodePlan {
            local,
            memory,
            workspace_bytes: end,
        };
        Ok((plan, carve))
    }

    /// Every buffer of the call but the workspace, as byte ranges (for the workspace's overlap
    /// check).
    fn call_ranges(&self, rotation: Option<&LfRope>) -> Vec<(&'static str, (i128, i128))> {
        let l = &self.local;
        let q = &l.q_layout;
        let rows = (q.batch * q.heads * q.seqlen) as i128;
        let span = |p: u64, n: i128| (p as i128, p as i128 + n);
        let mut ranges = vec![
            ("q", byte_range(l.q, &l.q_layout, 2)),
            ("k", byte_range(l.k, &l.k_layout, 2)),
            ("v", byte_range(l.v, &l.v_layout, 2)),
            ("o", byte_range(l.o, &l.o_layout, 2)),
        ];
        let mem_len = self.mem_k_layout.seqlen;
        if mem_len > 0 {
            ranges.push(("mem_k", byte_range(self.mem_k, &self.mem_k_layout, 2)));
            ranges.push(("mem_v", byte_range(self.mem_v, &self.mem_v_layout, 2)));
        }
        for (arg, ptr, bytes) in [
            ("lse", l.lse, rows * 4),
            ("mem_mask", self.mem_mask, (q.batch * mem_len) as i128),
            (
                "block_table",
                l.block_table,
                (q.batch * l.max_pages_per_seq) as i128 * 4,
            ),
            ("cache_seqlens", l.cache_seqlens, q.batch as i128 * 4),
            ("error_flag", l.error_flag, 4),
        ] {
            if ptr != 0 {
                ranges.push((arg, span(ptr, bytes)));
            }
        }
        if let Some(r) = rotation {
            ranges.extend(table_ranges(r, q.batch));
        }
        ranges
    }
}

impl Attention {
    /// Memory attention for the new query tokens of each sequence (one to 16, as
    /// [`decode`](Self::decode)): each attends its cached local keys (causal, aligned
    /// bottom-right at the sequence's cache length; un-rotated keys, rotated on the fly with
    /// `opts.rope`) and every entry of `memory` (raw keys, `[batch, mem_len, heads_kv,
    /// head_dim]`, the cache's heads; `memory.mask`, `[batch, mem_len]` bytes, hides the entries
    /// whose byte is 0), in one softmax, computed as two split decoding passes merged by LSE (the
    /// memory part reads the mask in the decoding kernel). Output and LSE as `decode`; the
    /// rotation's tables and the workspace of [`decode_memory_plan`](Self::decode_memory_plan)
    /// are allocated on `stream` and freed after the kernels (engines that keep them call
    /// [`decode_memory_raw`](Self::decode_memory_raw)). The cache's lengths and table are
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
        self.check_memory_views(&memory, ql.batch)?;
        // The rotation's tables, for positions up to the cache's capacity (the local part's
        // and the query pass's bound) plus the offsets.
        let capacity = match &cache.block_table {
            Some(bt) => bt.max_pages_per_seq.saturating_mul(kl.seqlen),
            None => kl.seqlen,
        }
        .max(1);
        let tables = match opts.rope {
            Some(r) => {
                r.validate(ql.head_dim, ql.batch, ql.seqlen, capacity)?;
                Some(RopeTables::upload(
                    stream,
                    r,
                    ql.head_dim,
                    capacity + r.max_offset() as usize,
                )?)
            }
            None => None,
        };
        let rotation = match (&tables, opts.rope) {
            (Some(t), Some(r)) => Some(t.raw(stream, r, (0, 0))),
            _ => None,
        };
        let raw_rope = rotation.as_ref().map(|(r, _, _)| *r);
        let ((mk, mv, mm), _guards) = memory.device_ptrs(stream);
        let options = DecodeOptions {
            mask: opts.rope.map_or(MaskSpec::causal(), RopeOptions::mask),
            softmax_scale: opts.softmax_scale,
            ..DecodeOptions::default()
        };
        // decode_views checks the local part's views and lowers them (without a workspace of
        // its own: the call's holds every part's).
        self.decode_views(
            stream,
            q,
            cache,
            out,
            (error_flag, None),
            &options,
            (raw_rope.is_some(), false),
            |local, _, _| {
                let mut raw = RawMemoryDecode {
                    local: RawDecode {
                        workspace: 0,
                        workspace_bytes: 0,
                        ..*local
                    },
                    mem_k: mk,
                    mem_v: mv,
                    mem_k_layout: ml,
                    mem_v_layout: mvl,
                    mem_mask: mm,
                    workspace: 0,
                    workspace_bytes: 0,
                };
                let plan = self.decode_memory_plan(&raw, raw_rope.as_ref())?;
                let scratch = if plan.workspace_bytes > 0 {
                    // SAFETY: a stream of this value's context (decode_views checked it); the
                    // scratch is freed on the same stream after the launches that use it.
                    Some(unsafe {
                        Scratch::new(self.ctx, stream.cu_stream(), plan.workspace_bytes)
                    }?)
                } else {
                    None
                };
                if let Some(w) = &scratch {
                    raw.workspace = w.ptr;
                    raw.workspace_bytes = w.bytes;
                }
                // SAFETY: decode_views checked the local part's buffers against their layouts
                // and this context and holds their guards while this runs; the memory's keys,
                // values and mask were checked above and are guarded for the stream; the tables
                // were uploaded on this stream with what the rotation reads and outlive the call
                // (their frees are ordered after the kernels); the workspace is a fresh
                // stream-ordered allocation of the plan's size, freed after the launches.
                unsafe { self.decode_memory_raw(stream.cu_stream(), &raw, raw_rope.as_ref()) }
            },
        )
    }

    /// The plan of [`decode_memory_raw`](Self::decode_memory_raw) for `args` (its workspace size
    /// in particular), after the checks that do not depend on the pointers. It depends on the
    /// shapes and options alone, so one workspace serves a decoding loop.
    pub fn decode_memory_plan(
        &self,
        args: &RawMemoryDecode,
        rope: Option<&RawRope>,
    ) -> Result<MemoryDecodePlan> {
        args.plan(self.decode_slots(), rope).map(|(plan, _)| plan)
    }

    /// Memory decoding from raw pointers (see [`decode_memory`](Self::decode_memory) for the
    /// semantics; `rope`, plain RoPE, rotates the queries and the local keys, with key
    /// workspaces 0). Validates every part before the first launch: the local decoding call,
    /// the RoPE query pass into the workspace, the memory part's decoding call (its mask read
    /// in the kernel) and the LSE merge, all on `stream`.
    ///
    /// # Safety
    /// - As [`decode_raw`](Self::decode_raw) for `args.local` (as
    ///   [`decode_rope_raw`](Self::decode_rope_raw) with `rope`), and: `mem_k` and `mem_v` are
    ///   device memory of this context holding every element their layouts address, `mem_mask`
    ///   (when not 0) `batch * mem_len` bytes, and `workspace` its `workspace_bytes`, all alive
    ///   until the kernels have finished.
    /// - Nothing else writes the inputs, or reads or writes the outputs and the workspace, until
    ///   the kernels have finished.
    pub unsafe fn decode_memory_raw(
        &self,
        stream: sys::CUstream,
        args: &RawMemoryDecode,
        rope: Option<&RawRope>,
    ) -> Result<()> {
        let slots = self.decode_slots();
        let (plan, carve) = args.plan(slots, rope)?;
        let l = &args.local;
        // The rotation lowered once: its tables' ranges and the query pass's parameters.
        let rotation = rope
            .map(|r| r.lower_rotation(l.q_layout.head_dim))
            .transpose()?;
        if plan.workspace_bytes > 0 {
            check::workspace(
                ("workspace", "workspace_bytes"),
                (args.workspace, args.workspace_bytes),
                plan.workspace_bytes,
                "Attention::decode_memory_plan",
                args.call_ranges(rotation.as_ref()),
            )?;
        }
        let at = |offset: usize| args.workspace + offset as u64;
        let mut local = *l;
        if plan.memory.is_some() && l.lse == 0 {
            local.lse = at(carve.lse_local);
        }
        if plan.local.workspace_bytes > 0 {
            local.workspace = at(carve.local_ws);
            local.workspace_bytes = plan.local.workspace_bytes;
        }
        // Every part validated before the first launch.
        let local_call = match rope {
            Some(r) => {
                let (params, p) = local.validate_rope(slots, r)?;
                Local::Rope(params, p)
            }
            None => {
                let (params, p) = local.validate(slots)?;
                Local::Plain(params, p)
            }
        };
        let memory_calls = match plan.memory {
            None => None,
            Some(mp) => {
                let ql = l.q_layout;
                let packed = args.packed();
                let (q_mem, queries) = match rotation {
                    Some(lowered) => {
                        let max_keys = local_max_keys(&local_call);
                        let params = rope_queries_params(
                            (l.q, &ql),
                            (at(carve.q_rot), 0),
                            l.cache_seqlens,
                            max_keys,
                            lowered,
                        );
                        ((at(carve.q_rot), packed), Some(params))
                    }
                    None => ((l.q, ql), None),
                };
                let ws = if mp.workspace_bytes > 0 {
                    (at(carve.mem_ws), mp.workspace_bytes)
                } else {
                    (0, 0)
                };
                let part = args.memory_part(slots, q_mem, (at(carve.o_mem), at(carve.lse_mem)), ws);
                let (mut params, p) = part.validate(slots)?;
                if p.prefill {
                    return Err(Error::InvalidArgument {
                        arg: "mem_mask",
                        value: format!("{:#x}", args.mem_mask),
                        expected: "a memory part that runs the decoding kernel".into(),
                    });
                }
                if args.mem_mask != 0 {
                    params.key_mask = args.mem_mask as *const u8;
                    params.key_mask_batch_stride = args.mem_k_layout.seqlen as i64;
                }
                let merge = RawMerge {
                    dtype: l.dtype,
                    acc_o: l.o,
                    acc_lse: local.lse,
                    part_o: at(carve.o_mem),
                    part_lse: at(carve.lse_mem),
                    acc_layout: l.o_layout,
                    part_layout: packed,
                };
                merge.validate()?;
                Some((queries, part, params, p, merge))
            }
        };
        // The launches: this fn's contract covers the caller's buffers and stream; each part's
        // parameters came from validating it, and its workspace pieces are disjoint ranges of
        // the checked workspace (the carve), apart from every buffer of the call.
        match local_call {
            // SAFETY: `params` and `p` from `local.validate_rope`; see above.
            Local::Rope(mut params, p) => {
                unsafe { self.launch_rope_decode(stream, &local, &mut params, &p) }?
            }
            // SAFETY: `params` and `p` from `local.validate`; see above.
            Local::Plain(params, p) => {
                unsafe { self.launch_validated(stream, &local, params, &p) }?
            }
        }
        let Some((queries, part, params, p, merge)) = memory_calls else {
            return Ok(());
        };
        if let Some(mut qp) = queries {
            // SAFETY: the pass reads the validated queries and lengths and writes `batch *
            // seqlen_q * heads_q * head_dim` elements at the carve's q_rot, which the memory part
            // reads after it on the same stream.
            unsafe { self.launch_rope_queries(stream, l.dtype.name(), &mut qp) }?;
        }
        // SAFETY: `params` and `p` from `part.validate` (the key mask holds batch * mem_len
        // bytes per this fn's contract); see above.
        unsafe { self.launch_validated(stream, &part, params, &p) }?;
        // SAFETY: the merge was validated above; its inputs are the local output and LSE and the
        // memory part's output and LSE in the workspace, written before it on this stream.
        unsafe { self.merge_raw(stream, &merge) }
    }
}

/// The local part's validated call: plain decoding or RoPE decoding.
enum Local {
    Plain(LfDecodeParams, DecodePlan),
    Rope(LfDecodeRopeParams, DecodePlan),
}

/// The key bound of the local part's lengths (`mask.seqlen_k`: the options' `max_seqlen_k`, or
/// the cache's capacity), into which the decoding kernel and the query pass clamp a length.
fn local_max_keys(call: &Local) -> usize {
    match call {
        Local::Plain(p, _) => p.mask.seqlen_k as usize,
        Local::Rope(p, _) => p.base.mask.seqlen_k as usize,
    }
}
