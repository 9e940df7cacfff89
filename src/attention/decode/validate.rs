//! Checks and lowering of the raw decoding arguments ([`RawDecode::validate`]), and the
//! chunked-prefill kernel's parameters made from them.

use super::{cache_capacity, DecodePlan, DecodeProblem, RawDecode};
use crate::check::{
    aligned, attention_memory, attention_shapes, byte_range, overlaps, softmax_scale,
};
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::sys::{
    LfDecodeParams, LfFwdParams, LfMask, LfPagedFwdParams, LF_DECODE_KEYS,
    LF_DECODE_PREFILL_QUERIES, LF_DECODE_SPLIT_ALIGN,
};

impl RawDecode {
    /// Checks everything that can be checked without reading device values or knowing buffer
    /// sizes (shapes, head dims, page size, strides and pointers, aliasing, mask, scale, the
    /// workspace against the plan), plans the splits for a device with `slots` decoding CTAs to
    /// fill ([`DecodeProblem::plan`]), and lowers the call to the kernel's parameters.
    pub fn validate(&self, slots: usize) -> Result<(LfDecodeParams, DecodePlan)> {
        self.validate_with(slots, true, false)
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
    pub(in crate::attention) fn validate_with(
        &self,
        slots: usize,
        check_workspace: bool,
        rope: bool,
    ) -> Result<(LfDecodeParams, DecodePlan)> {
        let (plan, capacity, mask) = self.shape_plan(slots, rope)?;
        let (q, k, v, o) = (
            &self.q_layout,
            &self.k_layout,
            &self.v_layout,
            &self.o_layout,
        );
        let paged = self.block_table != 0;
        let lse_range = attention_memory([q, k, v, o], [self.q, self.k, self.v, self.o], self.lse)?;
        aligned("workspace.ptr", self.workspace, 16, false)?;
        for (arg, ptr) in [
            ("block_table.ptr", self.block_table),
            ("cache_seqlens.ptr", self.cache_seqlens),
            ("error_flag.ptr", self.error_flag),
            ("split_counters.ptr", self.split_counters),
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

        self.check_counters(&plan, check_workspace, [q, k, v, o], lse_range)?;

        let scale = softmax_scale(self.options.softmax_scale, q.head_dim)?;
        // The outputs (and the workspace) must not overlap the device indices the kernels read.
        let index_ranges = self.index_ranges();
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
        let (page_stride_k, page_stride_v) = (k.batch_stride, v.batch_stride);
        let mut params = LfDecodeParams {
            q: self.q as *const _,
            k: self.k as *const _,
            v: self.v as *const _,
            o: self.o as *mut _,
            lse: self.lse as *mut f32,
            partial_o: std::ptr::null_mut(),
            partial_lse: std::ptr::null_mut(),
            block_table: self.block_table as *const i32,
            cache_seqlens: self.cache_seqlens as *const i32,
            error_flag: self.error_flag as *mut i32,
            split_counters: std::ptr::null_mut(),
            key_mask: std::ptr::null(),
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
            key_mask_batch_stride: 0,
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
            reserved: 0,
            num_splits: plan.num_splits as i32,
            keys_per_split: plan.keys_per_split as i32,
            softmax_scale: scale,
            softmax_scale_log2: scale * std::f32::consts::LOG2_E,
        };
        if check_workspace {
            place_workspace(&mut params, self.workspace, self.split_counters);
        }
        Ok((params, plan))
    }

    /// The checks and the plan that depend on the shapes and options alone (not on the
    /// pointers): the plan, the cache's capacity and the resolved mask.
    pub(in crate::attention) fn shape_plan(
        &self,
        slots: usize,
        rope: bool,
    ) -> Result<(DecodePlan, usize, LfMask)> {
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
        .plan(slots, self.options.num_splits);
        let plan = if self.runs_prefill(rope) {
            DecodePlan {
                num_splits: 1,
                keys_per_split: max_keys.next_multiple_of(LF_DECODE_SPLIT_ALIGN as usize),
                workspace_bytes: 0,
                counters: 0,
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

        Ok((plan, capacity, mask))
    }

    /// The device indices the kernels read (or write: the flag), with their bytes.
    fn index_ranges(&self) -> [(&'static str, u64, usize); 3] {
        let batch = self.q_layout.batch;
        [
            (
                "block_table",
                self.block_table,
                batch
                    .saturating_mul(self.max_pages_per_seq)
                    .saturating_mul(4),
            ),
            ("cache_seqlens", self.cache_seqlens, batch.saturating_mul(4)),
            ("error_flag", self.error_flag, 4),
        ]
    }

    /// The caller's split counters against the device indices (the raw and safe entries' check).
    pub(in crate::attention) fn counters_apart_from_indices(
        &self,
        plan: &DecodePlan,
    ) -> Result<()> {
        let range = (
            self.split_counters as i128,
            self.split_counters as i128 + plan.counters as i128 * 4,
        );
        for (other, ptr, bytes) in self.index_ranges() {
            if ptr != 0 && overlaps(range, (ptr as i128, ptr as i128 + bytes as i128)) {
                return Err(Error::Aliasing {
                    output: "split_counters",
                    other,
                });
            }
        }
        Ok(())
    }

    /// The caller's split counters ([`RawDecode::split_counters`]), when the plan splits and
    /// `check_sizes`: enough of them, and overlapping no tensor, the workspace or the device
    /// indices.
    fn check_counters(
        &self,
        plan: &DecodePlan,
        check_sizes: bool,
        tensors: [&Layout; 4],
        lse_range: (i128, i128),
    ) -> Result<()> {
        if self.split_counters == 0 || plan.counters == 0 || !check_sizes {
            return Ok(());
        }
        if self.split_counters_len < plan.counters {
            return Err(Error::InvalidArgument {
                arg: "split_counters_len",
                value: self.split_counters_len.to_string(),
                expected: format!(
                    "at least {} counters for {} splits (Attention::decode_plan)",
                    plan.counters, plan.num_splits
                ),
            });
        }
        let range = (
            self.split_counters as i128,
            self.split_counters as i128 + plan.counters as i128 * 4,
        );
        let [q, k, v, o] = tensors;
        for (other, r) in [
            ("q", byte_range(self.q, q, 2)),
            ("k", byte_range(self.k, k, 2)),
            ("v", byte_range(self.v, v, 2)),
            ("o", byte_range(self.o, o, 2)),
            ("lse", if self.lse != 0 { lse_range } else { (0, 0) }),
            (
                "workspace",
                (
                    self.workspace as i128,
                    self.workspace as i128 + plan.workspace_bytes as i128,
                ),
            ),
        ] {
            if r.1 > r.0 && overlaps(range, r) {
                return Err(Error::Aliasing {
                    output: "split_counters",
                    other,
                });
            }
        }
        self.counters_apart_from_indices(plan)
    }
}

/// The chunked-prefill kernel's parameters for a validated decoding call: the same tensors as an
/// exact forward (the caches' page strides as their batch strides) and the same cache indices.
pub(super) fn prefill_params(d: &LfDecodeParams) -> LfPagedFwdParams {
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

/// Points the split partials of `p` (several splits) at `workspace`: the f32 partial outputs
/// `[num_splits, batch, seqlen_q, heads_q, head_dim]`, then the partial LSEs, then the i32 split
/// counters (LfDecodeParams), or the caller's `counters` when not 0. Nothing with one split, or
/// no workspace.
pub(in crate::attention) fn place_workspace(p: &mut LfDecodeParams, workspace: u64, counters: u64) {
    if p.num_splits > 1 && workspace != 0 {
        let rows =
            p.num_splits as u128 * p.batch as u128 * p.mask.seqlen_q as u128 * p.heads_q as u128;
        let o_bytes = rows * p.head_dim as u128 * 4;
        p.partial_o = workspace as *mut f32;
        p.partial_lse = workspace.wrapping_add(o_bytes as u64) as *mut f32;
        p.split_counters = if counters != 0 {
            counters as *mut i32
        } else {
            workspace.wrapping_add((o_bytes + rows * 4) as u64) as *mut i32
        };
    } else {
        p.partial_o = std::ptr::null_mut();
        p.partial_lse = std::ptr::null_mut();
        p.split_counters = std::ptr::null_mut();
    }
}

/// Where `p`'s split counters start and their bytes (0 when `p` has none, or the caller keeps
/// them: `caller_counters` not 0): the launch zeroes them.
pub(in crate::attention) fn split_counters(
    p: &LfDecodeParams,
    row_blocks: usize,
    caller_counters: u64,
) -> (u64, usize) {
    if p.split_counters.is_null() || caller_counters != 0 {
        return (0, 0);
    }
    let n = p.batch as usize * p.heads_kv as usize * row_blocks;
    (p.split_counters as u64, n * 4)
}
