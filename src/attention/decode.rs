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
//! the device, and the raw entry takes the workspace from the caller.

use cudarc::driver::{
    sys, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceSlice, LaunchConfig,
};

use super::{head_dim_kernel, sized_module, Attention, Input, Output, Scratch};
use crate::check::{
    aligned, attention_memory, attention_shapes, byte_range, overlaps, softmax_scale,
};
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::mask::MaskSpec;
use crate::sys::{
    LfDecodeParams, LfFwdParams, LfPagedFwdParams, LF_DECODE_KEYS, LF_DECODE_PREFILL_QUERIES,
    LF_DECODE_ROPE_STAGES_D128, LF_DECODE_ROPE_STAGES_D256, LF_DECODE_ROPE_STAGES_D64,
    LF_DECODE_ROWS, LF_DECODE_SPLIT_ALIGN, LF_DECODE_STAGES_D128, LF_DECODE_STAGES_D256,
    LF_DECODE_STAGES_D64, LF_DECODE_WARPS,
};

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
    /// log-sum-exps of every split.
    pub workspace_bytes: usize,
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
    /// The split plan for a device that runs `wave` decoding CTAs at once (its SMs times the
    /// CTAs one SM holds: [`Attention::decode_plan`] knows it), with the caller's split count
    /// when given (kept as it is, up to one split per 64 keys).
    ///
    /// Without one, a grid smaller than a wave is split into as many splits as keep it within
    /// one wave (a second, partial wave would nearly double the time), with at least 256 keys
    /// per split (4 steps of every warp) so that each split's fixed costs stay small, and at
    /// most 256 splits.
    pub fn plan(&self, wave: usize, num_splits: Option<usize>) -> DecodePlan {
        let align = LF_DECODE_SPLIT_ALIGN as usize;
        let group = (self.heads_q / self.heads_kv.max(1)).max(1);
        let row_blocks = self
            .seqlen_q
            .saturating_mul(group)
            .div_ceil(LF_DECODE_ROWS as usize)
            .max(1);
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
                let fill = (wave.max(1) / ctas).max(1);
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
        let workspace_bytes = if num_splits > 1 {
            num_splits
                .saturating_mul(self.batch)
                .saturating_mul(self.seqlen_q)
                .saturating_mul(self.heads_q)
                .saturating_mul(self.head_dim + 1)
                .saturating_mul(4)
        } else {
            0
        };
        DecodePlan {
            num_splits,
            keys_per_split,
            row_blocks,
            workspace_bytes,
            prefill: false,
        }
    }
}

/// The keys one sequence can hold in a cache whose keys have layout `k`: with a block table of
/// `max_pages_per_seq` columns, pages `[num_pages, page_size, ..]` (a power of two of at least
/// `min_page`, at most i32::MAX pages) times the table's width; without one, the layout's rows.
/// At most [`MAX_CACHE_KEYS`].
pub(super) fn cache_capacity(
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

impl RawDecode {
    /// Checks everything that can be checked without reading device values or knowing buffer
    /// sizes (shapes, head dims, page size, strides and pointers, aliasing, mask, scale, the
    /// workspace against the plan), plans the splits for a device that runs `wave` decoding CTAs
    /// at once ([`DecodeProblem::plan`]), and lowers the call to the kernel's parameters.
    pub fn validate(&self, wave: usize) -> Result<(LfDecodeParams, DecodePlan)> {
        self.validate_with(wave, true, false)
    }

    /// Whether the plain (not RoPE) decoding call runs the chunked-prefill kernel: at least
    /// LF_DECODE_PREFILL_QUERIES query tokens per sequence and no fixed split count.
    fn runs_prefill(&self, rope: bool) -> bool {
        !rope
            && self.options.num_splits.is_none()
            && self.q_layout.seqlen >= LF_DECODE_PREFILL_QUERIES as usize
    }

    /// [`validate`](Self::validate), with or without checking the workspace (the plan says how
    /// big it must be).
    pub(super) fn validate_with(
        &self,
        wave: usize,
        check_workspace: bool,
        rope: bool,
    ) -> Result<(LfDecodeParams, DecodePlan)> {
        let (q, k, v, o) = (
            &self.q_layout,
            &self.k_layout,
            &self.v_layout,
            &self.o_layout,
        );
        attention_shapes([q, k, v, o], self.block_table == 0, true)?;
        let paged = self.block_table != 0;
        let capacity = cache_capacity(k, paged, self.max_pages_per_seq, LF_DECODE_KEYS as usize)?;
        let max_keys = self.options.max_seqlen_k.unwrap_or(capacity);
        if max_keys == 0 || max_keys > capacity {
            return Err(Error::InvalidArgument {
                arg: "options.max_seqlen_k",
                value: max_keys.to_string(),
                expected: format!("1 to the cache's capacity {capacity}"),
            });
        }
        if let Some(0) = self.options.num_splits {
            return Err(Error::InvalidArgument {
                arg: "options.num_splits",
                value: "Some(0)".into(),
                expected: "at least 1 split (or None)".into(),
            });
        }
        let plan = DecodeProblem {
            batch: q.batch,
            seqlen_q: q.seqlen,
            heads_q: q.heads,
            heads_kv: k.heads,
            head_dim: q.head_dim,
            max_seqlen_k: max_keys,
        }
        .plan(wave, self.options.num_splits);
        let plan = if self.runs_prefill(rope) {
            DecodePlan {
                num_splits: 1,
                keys_per_split: max_keys.next_multiple_of(LF_DECODE_SPLIT_ALIGN as usize),
                workspace_bytes: 0,
                prefill: true,
                ..plan
            }
        } else {
            plan
        };
        // The splits' bounds and the rows the split merge covers are 32-bit in the kernels.
        if plan.num_splits.saturating_mul(plan.keys_per_split) > i32::MAX as usize {
            return Err(Error::InvalidArgument {
                arg: "options.num_splits",
                value: format!("{} splits of {} keys", plan.num_splits, plan.keys_per_split),
                expected: format!("splits that cover at most {} keys", i32::MAX),
            });
        }
        let rows_total = (q.batch as u128) * (q.seqlen as u128) * (q.heads as u128);
        if q.heads > 65535 || rows_total > i32::MAX as u128 {
            return Err(Error::InvalidArgument {
                arg: "q.heads",
                value: format!(
                    "{} heads of {} sequences of {} tokens",
                    q.heads, q.batch, q.seqlen
                ),
                expected: "at most 65535 heads and i32::MAX (sequence, token, head) rows".into(),
            });
        }
        // Grid: splits on x, row blocks on y, (sequence, KV head) on z; for the prefill kernel
        // query tiles on x, query heads on y, sequences on z.
        let (y_arg, y) = if plan.prefill {
            ("q.heads", q.heads)
        } else {
            ("q.seqlen", plan.row_blocks)
        };
        let (z_arg, z) = if plan.prefill {
            ("q.batch", q.batch)
        } else {
            ("q.batch", q.batch.saturating_mul(k.heads))
        };
        for (arg, value, limit) in [(y_arg, y, 65535), (z_arg, z, 65535)] {
            if value > limit {
                return Err(Error::InvalidArgument {
                    arg,
                    value: value.to_string(),
                    expected: format!(
                        "at most {limit} {}",
                        match arg {
                            "q.batch" if plan.prefill => "sequences",
                            "q.batch" => "(sequence, KV head) pairs",
                            "q.heads" => "query heads",
                            _ => "tiles of 16 (query token, head) rows per KV head",
                        }
                    ),
                });
            }
        }
        let mask = self.options.mask.resolve(q.seqlen, max_keys)?;
        if mask.sink_tokens != 0 {
            return Err(Error::InvalidMask {
                arg: "mask.sink_tokens",
                value: mask.sink_tokens.to_string(),
                expected: "0: the decoding forward has no attention sinks",
            });
        }

        let lse_range = attention_memory([q, k, v, o], [self.q, self.k, self.v, self.o], self.lse)?;
        aligned("workspace.ptr", self.workspace, 16, false)?;
        for (arg, ptr) in [
            ("block_table.ptr", self.block_table),
            ("cache_seqlens.ptr", self.cache_seqlens),
            ("error_flag.ptr", self.error_flag),
        ] {
            aligned(arg, ptr, 4, false)?;
        }
        if check_workspace && plan.workspace_bytes > 0 {
            if self.workspace == 0 || self.workspace_bytes < plan.workspace_bytes {
                return Err(Error::InvalidArgument {
                    arg: "workspace_bytes",
                    value: if self.workspace == 0 {
                        "no workspace".into()
                    } else {
                        self.workspace_bytes.to_string()
                    },
                    expected: format!(
                        "a workspace of at least {} bytes for {} splits (Attention::decode_plan)",
                        plan.workspace_bytes, plan.num_splits
                    ),
                });
            }
            let ws_range = (
                self.workspace as i128,
                self.workspace as i128 + plan.workspace_bytes as i128,
            );
            for (other, ptr, l) in [
                ("q", self.q, q),
                ("k", self.k, k),
                ("v", self.v, v),
                ("o", self.o, o),
            ] {
                if overlaps(ws_range, byte_range(ptr, l, 2)) {
                    return Err(Error::Aliasing {
                        output: "workspace",
                        other,
                    });
                }
            }
            if self.lse != 0 && overlaps(lse_range, ws_range) {
                return Err(Error::Aliasing {
                    output: "workspace",
                    other: "lse",
                });
            }
        }

        let scale = softmax_scale(self.options.softmax_scale, q.head_dim)?;
        // The outputs (and the workspace) must not overlap the device indices the kernels read.
        let index_ranges = [
            (
                "block_table",
                self.block_table,
                q.batch
                    .saturating_mul(self.max_pages_per_seq)
                    .saturating_mul(4),
            ),
            (
                "cache_seqlens",
                self.cache_seqlens,
                q.batch.saturating_mul(4),
            ),
            ("error_flag", self.error_flag, 4),
        ];
        let workspace_used = if check_workspace {
            plan.workspace_bytes
        } else {
            0
        };
        for (output, range) in [
            ("o", byte_range(self.o, o, 2)),
            ("lse", if self.lse != 0 { lse_range } else { (0, 0) }),
            (
                "workspace",
                (
                    self.workspace as i128,
                    self.workspace as i128 + workspace_used as i128,
                ),
            ),
        ] {
            for (other, ptr, bytes) in index_ranges {
                if ptr != 0
                    && range.1 > range.0
                    && overlaps(range, (ptr as i128, ptr as i128 + bytes as i128))
                {
                    return Err(Error::Aliasing { output, other });
                }
            }
        }
        let partial_rows = plan
            .num_splits
            .saturating_mul(q.batch)
            .saturating_mul(q.seqlen)
            .saturating_mul(q.heads);
        let (partial_o, partial_lse) = if plan.workspace_bytes > 0 {
            let lse_at =
                self.workspace + partial_rows.saturating_mul(q.head_dim).saturating_mul(4) as u64;
            (self.workspace as *mut f32, lse_at as *mut f32)
        } else {
            (std::ptr::null_mut(), std::ptr::null_mut())
        };
        let (page_stride_k, page_stride_v) = (k.batch_stride, v.batch_stride);
        let params = LfDecodeParams {
            q: self.q as *const _,
            k: self.k as *const _,
            v: self.v as *const _,
            o: self.o as *mut _,
            lse: self.lse as *mut f32,
            partial_o,
            partial_lse,
            block_table: self.block_table as *const i32,
            cache_seqlens: self.cache_seqlens as *const i32,
            error_flag: self.error_flag as *mut i32,
            q_batch_stride: q.batch_stride,
            q_row_stride: q.seq_stride,
            q_head_stride: q.head_stride,
            k_page_stride: page_stride_k,
            k_row_stride: k.seq_stride,
            k_head_stride: k.head_stride,
            v_page_stride: page_stride_v,
            v_row_stride: v.seq_stride,
            v_head_stride: v.head_stride,
            o_batch_stride: o.batch_stride,
            o_row_stride: o.seq_stride,
            o_head_stride: o.head_stride,
            block_table_stride: if paged {
                self.max_pages_per_seq as i64
            } else {
                0
            },
            mask,
            batch: q.batch as i32,
            heads_q: q.heads as i32,
            heads_kv: k.heads as i32,
            head_dim: q.head_dim as i32,
            num_pages: if paged { k.batch as i32 } else { 0 },
            page_size: if paged {
                k.seqlen as i32
            } else {
                capacity as i32
            },
            page_shift: if paged {
                k.seqlen.trailing_zeros() as i32
            } else {
                0
            },
            max_pages: if paged {
                self.max_pages_per_seq.min(i32::MAX as usize) as i32
            } else {
                1
            },
            num_splits: plan.num_splits as i32,
            keys_per_split: plan.keys_per_split as i32,
            softmax_scale: scale,
            softmax_scale_log2: scale * std::f32::consts::LOG2_E,
        };
        Ok((params, plan))
    }
}

/// The chunked-prefill kernel's parameters for a validated decoding call: the same tensors as an
/// exact forward (the caches' page strides as their batch strides) and the same cache indices.
fn prefill_params(d: &LfDecodeParams) -> LfPagedFwdParams {
    LfPagedFwdParams {
        fwd: LfFwdParams {
            q: d.q,
            k: d.k,
            v: d.v,
            o: d.o,
            lse: d.lse,
            q_batch_stride: d.q_batch_stride,
            q_head_stride: d.q_head_stride,
            q_row_stride: d.q_row_stride,
            k_batch_stride: d.k_page_stride,
            k_head_stride: d.k_head_stride,
            k_row_stride: d.k_row_stride,
            v_batch_stride: d.v_page_stride,
            v_head_stride: d.v_head_stride,
            v_row_stride: d.v_row_stride,
            o_batch_stride: d.o_batch_stride,
            o_head_stride: d.o_head_stride,
            o_row_stride: d.o_row_stride,
            mask: d.mask,
            batch: d.batch,
            heads_q: d.heads_q,
            heads_kv: d.heads_kv,
            head_dim: d.head_dim,
            softmax_scale: d.softmax_scale,
            softmax_scale_log2: d.softmax_scale_log2,
            sparse: Default::default(),
        },
        block_table: d.block_table,
        cache_seqlens: d.cache_seqlens,
        error_flag: d.error_flag,
        block_table_stride: d.block_table_stride,
        num_pages: d.num_pages,
        page_size: d.page_size,
        page_shift: d.page_shift,
        reserved: 0,
    }
}

impl Attention {
    /// Decoding CTAs at head dim `d` the device runs at once: its SMs times the CTAs one SM
    /// holds by shared memory (1 KiB of each CTA's is the system's) and threads.
    pub(super) fn decode_wave(&self, d: usize) -> usize {
        let per_cta = decode_smem_bytes(d) + 1024;
        let per_sm = (self.smem_per_sm as usize / per_cta).clamp(1, 2048 / 128);
        self.sm_count as usize * per_sm
    }

    /// The split plan [`decode_raw`](Self::decode_raw) would use for `args` on this device (its
    /// workspace size in particular), after the same validation but for the workspace itself.
    pub fn decode_plan(&self, args: &RawDecode) -> Result<DecodePlan> {
        self.plan_for(args, false)
    }

    /// The plan of [`decode_rope_raw`](Self::decode_rope_raw) for `args` (its workspace size in
    /// particular): RoPE decoding always runs the decoding kernel.
    pub fn decode_rope_plan(&self, args: &RawDecode) -> Result<DecodePlan> {
        self.plan_for(args, true)
    }

    fn plan_for(&self, args: &RawDecode, rope: bool) -> Result<DecodePlan> {
        args.validate_with(self.decode_wave(args.q_layout.head_dim), false, rope)
            .map(|(_, plan)| plan)
    }

    /// The decoding forward on the caller's stream (see the [module](self) docs): `q` the new
    /// query tokens, `cache` the keys and values to attend, `out` O and optionally the
    /// log-sum-exp. Validated before launch like [`forward`](Self::forward); the workspace of a
    /// split plan is allocated on `stream` and freed after the launch (stream-ordered). The
    /// kernel clamps cache lengths and table entries and, when `error_flag` is given, ORs 1 into
    /// it if it had to. The call does not synchronize.
    pub fn decode<T: Element>(
        &self,
        stream: &CudaStream,
        q: Input<'_, '_, T>,
        cache: &KvCache<'_, '_, T>,
        out: Output<'_, '_, T>,
        error_flag: Option<&mut CudaViewMut<'_, i32>>,
        options: &DecodeOptions,
    ) -> Result<()> {
        self.decode_views(stream, q, cache, out, error_flag, options, false, |args| {
            // SAFETY: decode_views checked every buffer against what the kernel reads and holds
            // their stream guards and the workspace while this runs.
            unsafe { self.decode_raw(stream.cu_stream(), args) }
        })
    }

    /// Checks the device arrays a cache call reads besides the tensors: the block table holds
    /// `batch * max_pages_per_seq` entries, the lengths `batch`, the flag one, all in this
    /// context.
    pub(super) fn check_cache_indices(
        &self,
        batch: usize,
        block_table: Option<&BlockTable<'_, '_>>,
        cache_seqlens: Option<&CudaView<'_, i32>>,
        error_flag: Option<&CudaViewMut<'_, i32>>,
    ) -> Result<()> {
        if let Some(bt) = block_table {
            self.same_context("block_table", bt.table.stream().context().cu_ctx())?;
            let need = (batch as u128) * (bt.max_pages_per_seq as u128);
            if need > bt.table.len() as u128 || bt.max_pages_per_seq == 0 {
                return Err(Error::OutOfBounds {
                    arg: "block_table",
                    required: need.max(1),
                    len: bt.table.len(),
                });
            }
        }
        if let Some(cs) = cache_seqlens {
            self.same_context("cache_seqlens", cs.stream().context().cu_ctx())?;
            if cs.len() < batch {
                return Err(Error::OutOfBounds {
                    arg: "cache_seqlens",
                    required: batch as u128,
                    len: cs.len(),
                });
            }
        }
        if let Some(f) = error_flag {
            self.same_context("error_flag", f.stream().context().cu_ctx())?;
            if f.is_empty() {
                return Err(Error::OutOfBounds {
                    arg: "error_flag",
                    required: 1,
                    len: 0,
                });
            }
        }
        Ok(())
    }

    /// What the safe decoding entries share: checks the views (contexts, lengths against the
    /// layouts, the table's and lengths' sizes), lowers them to a [`RawDecode`] with a
    /// stream-ordered workspace of the plan's size (the RoPE plan with `rope`), and calls `run`
    /// with it.
    ///
    /// `run` may launch on `stream` with the arguments it gets: every buffer holds what
    /// [`Attention::decode_raw`] requires, guarded for the stream until `run` returns, and the
    /// workspace is freed after the work queued on the stream.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn decode_views<T: Element>(
        &self,
        stream: &CudaStream,
        q: Input<'_, '_, T>,
        cache: &KvCache<'_, '_, T>,
        out: Output<'_, '_, T>,
        error_flag: Option<&mut CudaViewMut<'_, i32>>,
        options: &DecodeOptions,
        rope: bool,
        run: impl FnOnce(&RawDecode) -> Result<()>,
    ) -> Result<()> {
        self.same_context("stream", stream.context().cu_ctx())?;
        let mut checks = vec![
            (
                "q",
                q.data.stream().context().cu_ctx(),
                q.layout,
                q.data.len(),
            ),
            (
                "k",
                cache.k.data.stream().context().cu_ctx(),
                cache.k.layout,
                cache.k.data.len(),
            ),
            (
                "v",
                cache.v.data.stream().context().cu_ctx(),
                cache.v.layout,
                cache.v.data.len(),
            ),
        ];
        checks.push((
            "o",
            out.data.stream().context().cu_ctx(),
            out.layout,
            out.data.len(),
        ));
        for (arg, ctx, layout, len) in checks {
            self.same_context(arg, ctx)?;
            let required = layout.required_len(arg)?;
            if required > len as u128 {
                return Err(Error::OutOfBounds { arg, required, len });
            }
        }
        let batch = q.layout.batch;
        if let Some(lse) = &out.lse {
            self.same_context("lse", lse.stream().context().cu_ctx())?;
            let need = (batch as u128) * (q.layout.heads as u128) * (q.layout.seqlen as u128);
            if need > lse.len() as u128 {
                return Err(Error::OutOfBounds {
                    arg: "lse",
                    required: need,
                    len: lse.len(),
                });
            }
        }
        self.check_cache_indices(
            batch,
            cache.block_table.as_ref(),
            cache.cache_seqlens,
            error_flag.as_deref(),
        )?;

        let (qp, _gq) = q.data.device_ptr(stream);
        let (kp, _gk) = cache.k.data.device_ptr(stream);
        let (vp, _gv) = cache.v.data.device_ptr(stream);
        let (op, _go) = out.data.device_ptr_mut(stream);
        let (lp, _gl) = match out.lse {
            Some(l) => {
                let (p, g) = l.device_ptr_mut(stream);
                (p, Some(g))
            }
            None => (0, None),
        };
        let (bp, _gb) = match &cache.block_table {
            Some(bt) => {
                let (p, g) = bt.table.device_ptr(stream);
                (p, Some(g))
            }
            None => (0, None),
        };
        let (cp, _gc) = match &cache.cache_seqlens {
            Some(cs) => {
                let (p, g) = cs.device_ptr(stream);
                (p, Some(g))
            }
            None => (0, None),
        };
        let (fp, _gf) = match error_flag {
            Some(f) => {
                let (p, g) = f.device_ptr_mut(stream);
                (p, Some(g))
            }
            None => (0, None),
        };
        let mut args = RawDecode {
            dtype: T::DTYPE,
            q: qp,
            k: kp,
            v: vp,
            o: op,
            lse: lp,
            q_layout: q.layout,
            k_layout: cache.k.layout,
            v_layout: cache.v.layout,
            o_layout: out.layout,
            block_table: bp,
            max_pages_per_seq: cache.block_table.map_or(0, |bt| bt.max_pages_per_seq),
            cache_seqlens: cp,
            error_flag: fp,
            options: *options,
            workspace: 0,
            workspace_bytes: 0,
        };
        let plan = self.plan_for(&args, rope)?;
        let workspace = if plan.workspace_bytes > 0 {
            // SAFETY: a stream of this value's context (checked above); the scratch is freed on
            // the same stream after the launches that use it.
            Some(unsafe { Scratch::new(self.ctx, stream.cu_stream(), plan.workspace_bytes) }?)
        } else {
            None
        };
        if let Some(w) = &workspace {
            args.workspace = w.ptr;
            args.workspace_bytes = w.bytes;
        }
        // Every buffer was checked against its layout (or the lengths the kernel reads: batch
        // cache lengths, batch * max_pages_per_seq table entries, one flag) and context, and is
        // guarded for the stream while `run` runs; the workspace is a stream-ordered allocation
        // of the plan's size on this stream, freed after the launches.
        run(&args)
    }

    /// The decoding forward from raw pointers. Validates everything [`RawDecode::validate`] can
    /// before launch; runs on every device of compute capability 8.0 or newer.
    ///
    /// # Safety
    /// - `stream` is a stream of this value's context (or null for its legacy default stream).
    /// - Every pointer in `args` is device memory of that context that holds every element its
    ///   layout addresses (`lse`, when not 0, `batch * heads_q * seqlen_q` f32 values; the block
    ///   table, when not 0, `batch * max_pages_per_seq` i32; `cache_seqlens`, when not 0, `batch`
    ///   i32; `error_flag`, when not 0, one i32; `workspace` its `workspace_bytes`), and stays
    ///   allocated until the kernels have finished. The device values (lengths, table entries)
    ///   may be anything: the kernel clamps them.
    /// - Nothing else writes those inputs, or reads or writes the outputs and the workspace,
    ///   until the kernels have finished (order other streams with events).
    pub unsafe fn decode_raw(&self, stream: sys::CUstream, args: &RawDecode) -> Result<()> {
        let (mut params, plan) = args.validate(self.decode_wave(args.q_layout.head_dim))?;
        let d = args.q_layout.head_dim;
        if plan.prefill {
            let mut paged = prefill_params(&params);
            let tiles = self.sm80_tiles(d, 1, "chunked-prefill kernel")?;
            // SAFETY: `paged` is the validated call's LfPagedFwdParams (params.h), the kernel's
            // one by-value parameter; pointers and stream per this fn's contract; the grid covers
            // every (query tile, head, sequence) once.
            return unsafe {
                self.launch_sm80(
                    stream,
                    &sized_module("paged_fwd", args.dtype.name(), d),
                    tiles,
                    (
                        args.q_layout.seqlen,
                        args.q_layout.heads,
                        args.q_layout.batch,
                    ),
                    &mut paged,
                    "launching the chunked-prefill kernel",
                )
            };
        }
        let mut combine = params;
        // SAFETY: `params` was validated and is the kernel's one by-value parameter
        // (LfDecodeParams from params.h); pointers, workspace and stream are valid per this fn's
        // contract.
        unsafe {
            self.launch_decode(
                stream,
                args,
                &plan,
                ("decode", decode_smem_bytes(d)),
                &mut params,
                &mut combine,
            )
        }
    }

    /// Launches the decoding kernel `lf_{kind}_{dtype}_d{d}` with `params`, one CTA per (split,
    /// row block, sequence and KV head) of `plan`, then, with several splits, the split merge
    /// with `combine` (the same call's LfDecodeParams).
    ///
    /// # Safety
    /// As [`Attention::launch`]: `params` is the kernel's parameter struct made from `args`
    /// validated with `plan`, and every pointer in it satisfies [`decode_raw`](Self::decode_raw)'s
    /// contract.
    pub(super) unsafe fn launch_decode<P>(
        &self,
        stream: sys::CUstream,
        args: &RawDecode,
        plan: &DecodePlan,
        (kind, smem): (&str, usize),
        params: &mut P,
        combine: &mut LfDecodeParams,
    ) -> Result<()> {
        let d = args.q_layout.head_dim;
        let smem = smem as u32;
        if smem > self.max_smem_optin {
            return Err(Error::InvalidArgument {
                arg: "q.head_dim",
                value: d.to_string(),
                expected: format!(
                    "a head dim whose {kind} kernel fits the device's {} bytes of shared memory \
                     per block (needs {smem})",
                    self.max_smem_optin
                ),
            });
        }
        let dtype = args.dtype.name();
        let module = sized_module(kind, dtype, d);
        // SAFETY: the context is kept alive by `_owner` or by the caller of from_raw_context.
        let kernel = unsafe { self.cache.kernel(&module, &format!("lf_{module}"), smem) }?;
        let config = LaunchConfig {
            grid_dim: (
                plan.num_splits as u32,
                plan.row_blocks as u32,
                (args.q_layout.batch * args.k_layout.heads) as u32,
            ),
            block_dim: (LF_DECODE_WARPS * 32, 1, 1),
            shared_mem_bytes: smem,
        };
        // SAFETY: this fn's contract; the grid covers every (split, row block, sequence and KV
        // head) once.
        unsafe {
            self.launch(
                &kernel,
                config,
                stream,
                params,
                "launching the decoding kernel",
            )
        }?;
        if plan.num_splits > 1 {
            let module = format!("decode_combine_{dtype}");
            // SAFETY: as above.
            let kernel = unsafe { self.cache.kernel(&module, &format!("lf_{module}"), 0) }?;
            let rows = args.q_layout.batch * args.q_layout.seqlen * args.q_layout.heads;
            let config = LaunchConfig {
                grid_dim: (rows.div_ceil(8) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the call's validated parameters; one warp per (sequence, token, head) row
            // reads the splits the first kernel wrote earlier on the same stream.
            unsafe {
                self.launch(
                    &kernel,
                    config,
                    stream,
                    combine,
                    "launching the decoding split merge",
                )
            }?;
        }
        Ok(())
    }
}
