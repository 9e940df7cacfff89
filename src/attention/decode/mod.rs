//! The decoding forward over a KV cache, FlashAttention's `flash_attn_with_kvcache`: a few query
//! tokens per sequence (one for plain decoding, up to 16 for speculative decoding) attending to
//! the sequence's cached keys and values, paged (a block table) or contiguous. Its options, the
//! split plan, the raw arguments and their validation, and the safe and raw entry points.
//!
//! Q and O are `[batch, seqlen_q, heads_q, head_dim]` (the last `seqlen_q` positions of each
//! sequence); the log-sum-exp is f32 `[batch, heads_q, seqlen_q]`. The cache is described by the
//! [`Layout`] of its K and V tensors:
//! - paged: `[num_pages, page_size, heads_kv, head_dim]` in any memory order (the layout's batch
//!   is the page count, its seqlen the page size, a power of two from 16), and a block table
//!   `[batch, max_pages_per_seq]` of i32 page indices: key `j` of sequence `b` is row
//!   `j % page_size` of page `block_table[b][j / page_size]`. Pages may come in any order and be
//!   shared between sequences;
//! - contiguous: `[batch, capacity, heads_kv, head_dim]`, key `j` of sequence `b` at `(b, j)`.
//!
//! Sequence `b` holds `cache_seqlens[b]` keys (i32 on the device), or the whole capacity without
//! `cache_seqlens`; its mask (causal, windows) aligns bottom-right at that length. The query heads
//! of one KV head and the sequence's query tokens share one tile of 16 rows (GQA packing), and the
//! keys are split across CTAs whose partial results are merged by log-sum-exp (split-KV).
//!
//! Cache lengths and table entries live on the device, so they cannot be checked before the
//! launch without a copy and a synchronization. The kernel clamps a length into `[0,
//! max_seqlen_k]` and a table entry into `[0, num_pages)`, so it never reads outside the cache,
//! and reports either through an optional error flag (an i32 the caller zeroes before and reads
//! after, when it wants to: nothing here synchronizes).
//!
//! For CUDA graphs: with [`DecodeOptions::num_splits`] and [`DecodeOptions::max_seqlen_k`] fixed,
//! the grid and the workspace ([`DecodePlan::workspace_bytes`]) do not depend on the lengths on
//! the device, and the raw entry takes the workspace from the caller; split counters the caller
//! keeps ([`RawDecode::split_counters`], or [`SplitCounters`] with
//! [`Attention::decode_kept`](crate::Attention::decode_kept)) spare each call a memset.

//!
//! Here: the options, cache descriptions, split plan and raw arguments; `validate.rs` checks and
//! lowers the raw arguments; `launch.rs` holds the safe and raw entry points.

use cudarc::driver::{sys, CudaView};

use super::{head_dim_kernel, Input};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::mask::MaskSpec;
use crate::sys::{
    LF_DECODE_KEYS, LF_DECODE_ROPE_STAGES_D128, LF_DECODE_ROPE_STAGES_D256,
    LF_DECODE_ROPE_STAGES_D64, LF_DECODE_ROWS, LF_DECODE_SPLIT_ALIGN, LF_DECODE_STAGES_D128,
    LF_DECODE_STAGES_D256, LF_DECODE_STAGES_D64, LF_DECODE_WARPS,
};

mod launch;
mod validate;

/// Options of a decoding call.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct DecodeOptions {
    /// Which cached keys each query token sees (dense, causal, sliding window; aligned
    /// bottom-right at each sequence's cache length). Attention sinks are not supported.
    pub mask: MaskSpec,
    /// Multiplies Q K^T before the softmax; `None` means `1 / sqrt(head_dim)`.
    pub softmax_scale: Option<f32>,
    /// The most keys any sequence holds (`None`: the cache's capacity). The split plan covers
    /// this many keys; a longer cache length is cut to it and reported through the error flag.
    pub max_seqlen_k: Option<usize>,
    /// Key splits per (sequence, KV head) (`None`: chosen from the batch, the head counts, the
    /// key count and the device's SMs). Fix it (with `max_seqlen_k`) for a launch whose grid and
    /// workspace must not change, as in a CUDA graph.
    pub num_splits: Option<usize>,
}

/// Where the cached keys and values are: a block table for a paged cache, or nothing for a
/// contiguous one.
#[derive(Clone, Copy, Debug)]
pub struct BlockTable<'a, 'b> {
    /// `[batch, max_pages_per_seq]` i32 page indices, row-major.
    pub table: &'a CudaView<'b, i32>,
    /// Columns of the table: the most pages one sequence may use.
    pub max_pages_per_seq: usize,
}

/// A KV cache as the decoding forward reads it (see the [module](self) docs).
#[derive(Clone, Copy)]
pub struct KvCache<'a, 'b, T> {
    /// Cached keys: pages `[num_pages, page_size, heads_kv, head_dim]` with a block table,
    /// `[batch, capacity, heads_kv, head_dim]` without.
    pub k: Input<'a, 'b, T>,
    /// Cached values, the same shape as the keys.
    pub v: Input<'a, 'b, T>,
    /// The block table of a paged cache, `None` for a contiguous one.
    pub block_table: Option<BlockTable<'a, 'b>>,
    /// Keys held by each sequence, `[batch]` i32; `None`: every sequence holds the capacity.
    pub cache_seqlens: Option<&'a CudaView<'b, i32>>,
}

/// How a decoding call is cut: the grid's key splits and the workspace they need.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DecodePlan {
    /// Key splits per (sequence, KV head).
    pub num_splits: usize,
    /// Keys per split, a multiple of 64 (the last split may cover fewer).
    pub keys_per_split: usize,
    /// Tiles of 16 packed (query token, head) rows per (sequence, KV head).
    pub row_blocks: usize,
    /// Bytes of device workspace the call needs (0 for one split): f32 partial outputs and
    /// log-sum-exps of every split, and an i32 counter per (row block, sequence and KV head).
    /// Its contents need not be anything: the launch zeroes the counters on the stream (unless
    /// the caller keeps them: [`RawDecode::split_counters`]).
    pub workspace_bytes: usize,
    /// Split counters the call uses (0 for one split): one i32 per (row block, sequence and KV
    /// head), `batch * heads_kv * row_blocks`.
    pub counters: usize,
    /// The call runs the chunked-prefill kernel instead (many query tokens per sequence: the
    /// sm_80 mainloop with rows gathered from the cache, one CTA per query tile and head): one
    /// split, no workspace.
    pub prefill: bool,
}

/// Arguments of the raw decoding forward.
///
/// `q`, `k`, `v` and `o` point at element `(0, 0, 0, 0)` of their tensors, of element type
/// `dtype`; `lse`, when not 0, at a contiguous f32 `[batch, heads_q, seqlen_q]` buffer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RawDecode {
    /// Element type of Q, the cache and O.
    pub dtype: DType,
    /// Query device pointer.
    pub q: sys::CUdeviceptr,
    /// Key cache device pointer.
    pub k: sys::CUdeviceptr,
    /// Value cache device pointer.
    pub v: sys::CUdeviceptr,
    /// Output device pointer.
    pub o: sys::CUdeviceptr,
    /// Log-sum-exp output device pointer, or 0 for none.
    pub lse: sys::CUdeviceptr,
    /// Query layout `[batch, seqlen_q, heads_q, head_dim]`.
    pub q_layout: Layout,
    /// Key cache layout (see [`KvCache::k`]).
    pub k_layout: Layout,
    /// Value cache layout, the same shape as the keys'.
    pub v_layout: Layout,
    /// Output layout, the same shape as the queries'.
    pub o_layout: Layout,
    /// Device pointer to the `[batch, max_pages_per_seq]` i32 block table, or 0 for a
    /// contiguous cache.
    pub block_table: sys::CUdeviceptr,
    /// Columns of the block table (ignored without one).
    pub max_pages_per_seq: usize,
    /// Device pointer to `batch` i32 cache lengths, or 0 (every sequence holds the capacity).
    pub cache_seqlens: sys::CUdeviceptr,
    /// Device pointer to an i32 the kernel ORs 1 into for a cache length outside
    /// `[0, max_seqlen_k]` or a table entry outside `[0, num_pages)` that it had to clamp (that
    /// sequence's output is then unspecified), or 0 for none. The caller zeroes it.
    pub error_flag: sys::CUdeviceptr,
    /// Mask, scale, key bound and splits.
    pub options: DecodeOptions,
    /// Device workspace of at least [`DecodePlan::workspace_bytes`] bytes, 16-byte aligned (0
    /// when the plan needs none).
    pub workspace: sys::CUdeviceptr,
    /// Bytes available at `workspace`.
    pub workspace_bytes: usize,
    /// Device pointer to split counters the caller keeps, or 0 to have them in the workspace,
    /// zeroed by a memset on the stream before each launch that splits. The kernel's last split
    /// of each (row block, sequence and KV head) sets its counter back to 0, so counters the
    /// caller zeroed once (at allocation) are zero again after every call that completes, and
    /// a decoding loop or a CUDA graph that keeps them launches no memset. 4-byte aligned i32,
    /// at least [`DecodePlan::counters`] of them; unused with one split.
    pub split_counters: sys::CUdeviceptr,
    /// i32 counters available at `split_counters`.
    pub split_counters_len: usize,
}

/// What a decoding loop keeps across safe calls ([`Attention::decode_kept`](crate::Attention::decode_kept)):
/// split counters, i32s zeroed once when made, which every call that completes leaves zero
/// again, so that the calls launch no memset (the raw entry's [`RawDecode::split_counters`]);
/// and the split partials' workspace, allocated by the first call whose plan needs more than the
/// set holds and kept, so that the calls after it allocate nothing. One set serves calls on any
/// stream: its use is ordered through cudarc's events like any buffer's, so two streams using one
/// set run their decoding calls one after the other; give each stream its own for concurrent
/// ones.
#[derive(Debug)]
pub struct SplitCounters {
    buf: cudarc::driver::CudaSlice<i32>,
    partials: Option<cudarc::driver::CudaSlice<u8>>,
}

impl SplitCounters {
    /// `len` zeroed counters on `stream` (at least one), and no workspace yet.
    pub fn new(stream: &std::sync::Arc<cudarc::driver::CudaStream>, len: usize) -> Result<Self> {
        let buf = stream
            .alloc_zeros::<i32>(len.max(1))
            .map_err(Error::driver("allocating split counters"))?;
        Ok(SplitCounters {
            buf,
            partials: None,
        })
    }

    /// Enough counters for every decoding call with at most `batch` sequences of `seqlen_q`
    /// query tokens over `heads_q` query heads and `heads_kv` KV heads, whatever its split
    /// count: one per (16-row block, sequence and KV head).
    pub fn for_shape(
        stream: &std::sync::Arc<cudarc::driver::CudaStream>,
        batch: usize,
        seqlen_q: usize,
        heads_q: usize,
        heads_kv: usize,
    ) -> Result<Self> {
        let row_blocks = row_blocks(seqlen_q, heads_q, heads_kv);
        Self::new(
            stream,
            batch.saturating_mul(heads_kv).saturating_mul(row_blocks),
        )
    }

    /// Counters held.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Always false: a set holds at least one counter.
    pub fn is_empty(&self) -> bool {
        self.buf.len() == 0
    }

    /// Bytes of split workspace held (0 until a call that splits): the largest
    /// [`DecodePlan::workspace_bytes`] a call with this set has needed.
    pub fn workspace_bytes(&self) -> usize {
        self.partials.as_ref().map_or(0, |p| p.len())
    }

    /// The counters, and the kept workspace (grown by the caller as a plan needs).
    pub(in crate::attention) fn parts_mut(
        &mut self,
    ) -> (
        &mut cudarc::driver::CudaSlice<i32>,
        &mut Option<cudarc::driver::CudaSlice<u8>>,
    ) {
        (&mut self.buf, &mut self.partials)
    }
}

/// Tiles of LF_DECODE_ROWS packed (query token, head) rows per (sequence, KV head).
fn row_blocks(seqlen_q: usize, heads_q: usize, heads_kv: usize) -> usize {
    let group = (heads_q / heads_kv.max(1)).max(1);
    seqlen_q
        .saturating_mul(group)
        .div_ceil(LF_DECODE_ROWS as usize)
        .max(1)
}

/// Pipeline stages of each warp's K/V ring at head dim `d` (tile_plan.h).
fn decode_stages(d: usize) -> usize {
    match d {
        64 => LF_DECODE_STAGES_D64 as usize,
        128 => LF_DECODE_STAGES_D128 as usize,
        _ => LF_DECODE_STAGES_D256 as usize,
    }
}

/// Dynamic shared memory of the decoding kernel at head dim `d`: the Q tile and every warp's
/// ring of K/V stages.
pub fn decode_smem_bytes(d: usize) -> usize {
    let (d, _) = head_dim_kernel(d).unwrap_or((d, false));
    let tile = LF_DECODE_KEYS as usize * d * 2;
    tile + LF_DECODE_WARPS as usize * decode_stages(d) * 2 * tile
}

/// Dynamic shared memory of the RoPE decoding kernel at head dim `d`: two Q tiles, every warp's
/// ring of K/V stages and its scratch tile for the rotated keys of a step on the window's edge.
pub fn decode_rope_smem_bytes(d: usize) -> usize {
    let (d, _) = head_dim_kernel(d).unwrap_or((d, false));
    let tile = LF_DECODE_KEYS as usize * d * 2;
    let stages = match d {
        64 => LF_DECODE_ROPE_STAGES_D64,
        128 => LF_DECODE_ROPE_STAGES_D128,
        _ => LF_DECODE_ROPE_STAGES_D256,
    } as usize;
    let warps = LF_DECODE_WARPS as usize;
    2 * tile + warps * stages * 2 * tile + warps * tile
}

/// The sizes a decoding call's split plan depends on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DecodeProblem {
    /// Sequences.
    pub batch: usize,
    /// Query tokens per sequence.
    pub seqlen_q: usize,
    /// Query heads, a multiple of `heads_kv`.
    pub heads_q: usize,
    /// Key/value heads.
    pub heads_kv: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// The most keys any sequence holds (what the splits cover).
    pub max_seqlen_k: usize,
}

impl DecodeProblem {
    /// The split plan for a device with `slots` decoding CTAs to fill ([`Attention::decode_plan`]
    /// plans with one per SM), with the caller's split count when given (kept as it is, up to
    /// one split per 64 keys).
    ///
    /// Without one, a grid smaller than `slots` is split into as many splits as keep it within
    /// them (past the CTAs the device runs at once, a second, partial wave would nearly double
    /// the time), with at least 256 keys per split (4 steps of every warp) so that each split's
    /// fixed costs stay small, and at most 256 splits.
    pub fn plan(&self, slots: usize, num_splits: Option<usize>) -> DecodePlan {
        let align = LF_DECODE_SPLIT_ALIGN as usize;
        let row_blocks = row_blocks(self.seqlen_q, self.heads_q, self.heads_kv);
        let keys = self.max_seqlen_k.max(1);
        let chunks = keys.div_ceil(align);
        let wanted = match num_splits {
            Some(s) => s.clamp(1, chunks),
            None => {
                let ctas = self
                    .batch
                    .saturating_mul(self.heads_kv)
                    .saturating_mul(row_blocks)
                    .max(1);
                let fill = (slots.max(1) / ctas).max(1);
                fill.min(keys / 256).clamp(1, 256)
            }
        };
        let keys_per_split = chunks.div_ceil(wanted) * align;
        // The caller's count is kept (a graph's grid must not change; trailing splits may then
        // hold no key); the plan's own drops the splits its rounding left empty.
        let num_splits = match num_splits {
            Some(_) => wanted,
            None => keys.div_ceil(keys_per_split),
        };
        // f32 partial outputs and log-sum-exps of every split, then one i32 counter per (row
        // block, sequence and KV head) that tells the last of its splits to merge them.
        let counters = if num_splits > 1 {
            self.batch
                .saturating_mul(self.heads_kv)
                .saturating_mul(row_blocks)
        } else {
            0
        };
        let workspace_bytes = if num_splits > 1 {
            num_splits
                .saturating_mul(self.batch)
                .saturating_mul(self.seqlen_q)
                .saturating_mul(self.heads_q)
                .saturating_mul(self.head_dim + 1)
                .saturating_add(counters)
                .saturating_mul(4)
        } else {
            0
        };
        DecodePlan {
            num_splits,
            keys_per_split,
            row_blocks,
            workspace_bytes,
            counters,
            prefill: false,
        }
    }
}

/// The keys one sequence can hold in a cache whose keys have layout `k`: with a block table of
/// `max_pages_per_seq` columns, pages `[num_pages, page_size, ..]` (a power of two of at least
/// `min_page`, at most i32::MAX pages) times the table's width; without one, the layout's rows.
/// At most [`MAX_CACHE_KEYS`].
pub(in crate::attention) fn cache_capacity(
    k: &Layout,
    paged: bool,
    max_pages_per_seq: usize,
    min_page: usize,
) -> Result<usize> {
    let capacity = if paged {
        let ps = k.seqlen;
        if !ps.is_power_of_two() || ps < min_page {
            return Err(Error::InvalidArgument {
                arg: "k.seqlen",
                value: ps.to_string(),
                expected: format!("a page size that is a power of two of at least {min_page}"),
            });
        }
        if max_pages_per_seq == 0 {
            return Err(Error::InvalidArgument {
                arg: "max_pages_per_seq",
                value: "0".into(),
                expected: "at least 1 page per sequence".into(),
            });
        }
        if k.batch > i32::MAX as usize {
            return Err(Error::InvalidArgument {
                arg: "k.batch",
                value: k.batch.to_string(),
                expected: format!("at most {} pages", i32::MAX),
            });
        }
        max_pages_per_seq.saturating_mul(ps)
    } else {
        k.seqlen
    };
    if capacity > MAX_CACHE_KEYS {
        return Err(Error::InvalidArgument {
            arg: if paged {
                "max_pages_per_seq"
            } else {
                "k.seqlen"
            },
            value: capacity.to_string(),
            expected: format!("a cache capacity of at most {MAX_CACHE_KEYS} keys"),
        });
    }
    Ok(capacity)
}

/// The most keys a cache may hold: i32::MAX rounded down to a whole split alignment, so that
/// every key index plus a step, and every split's bounds, fit in the kernels' 32-bit ints.
pub const MAX_CACHE_KEYS: usize = (i32::MAX as usize) & !(LF_DECODE_SPLIT_ALIGN as usize - 1);
