//! Decoding with rotary positions applied inside the kernel, over a KV cache of **un-rotated**
//! keys: RoPE, ReRoPE and Leaky ReRoPE decoding (see [`crate::rope`] for the scores). The cache
//! stores keys as the projection wrote them, so a sequence can be decoded with any position
//! mode, window or scaling, and ReRoPE needs no second copy of the cache.
//!
//! Positions: key `j` of sequence `b` at `off_b + j`, query token `t` at `off_b +
//! cache_seqlens[b] - seqlen_q + t` (the causal alignment), `off_b` from
//! `RopeOptions::position_offsets`. Each query is rotated once per call, into its inside and
//! outside-window variants; each 16-key step of the cache is turned in shared memory by the side
//! of the window its (query, key) pairs are on: rotated to the keys' positions inside, left as it
//! is (ReRoPE) or rotated to `position / leak` (Leaky ReRoPE) outside, both for the step that
//! straddles the window's edge. Past the window, ReRoPE decoding reads the cache exactly as plain
//! decoding does.
//!
//! The same cache description, split plan, workspace and device-value clamping as
//! [`Attention::decode`]; the mask is the RoPE options' (causal, with
//! `RopeOptions::window_left`). The inverse frequencies are those of the configuration at
//! `max_seqlen_k` plus the largest offset (dynamic NTK scaling therefore uses the longest
//! sequence's length for every sequence of the batch).

use std::sync::Arc;

use cudarc::driver::{CudaStream, CudaViewMut};

use super::decode::{decode_rope_smem_bytes, DecodeOptions, DecodePlan, KvCache, RawDecode};
use super::rope::{RawRope, RopeTables};
use super::{Attention, Input, Output};
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::rope::RopeOptions;
use crate::sys::LfDecodeRopeParams;

impl RawDecode {
    /// Checks a RoPE decoding call ([`RawDecode::validate`], a causal mask, the rotation; the
    /// key workspaces of `rope` are not used and must be 0) and lowers it with its plan (always the
    /// decoding kernel, never the chunked prefill), for a device with `slots` decoding CTAs to
    /// fill.
    pub fn validate_rope(
        &self,
        slots: usize,
        rope: &RawRope,
    ) -> Result<(LfDecodeRopeParams, DecodePlan)> {
        if !self.options.mask.causal {
            return Err(Error::InvalidMask {
                arg: "mask.causal",
                value: "false".into(),
                expected:
                    "true: RoPE decoding is causal (ReRoPE's relative positions are non-negative)",
            });
        }
        for (arg, ptr) in [("rope.k_rot", rope.k_rot), ("rope.k_alt", rope.k_alt)] {
            if ptr != 0 {
                return Err(Error::InvalidArgument {
                    arg,
                    value: format!("{ptr:#x}"),
                    expected: "0: RoPE decoding turns the keys in shared memory, it takes no key workspace"
                        .into(),
                });
            }
        }
        let (base, plan) = self.validate_with(slots, true, true)?;
        let params = LfDecodeRopeParams {
            base,
            rope: rope.lower_rotation(self.q_layout.head_dim)?,
        };
        Ok((params, plan))
    }
}

impl Attention {
    /// RoPE / ReRoPE / Leaky ReRoPE decoding over a cache of un-rotated keys (see the
    /// [module](self) docs): as [`decode`](Self::decode), with `rope` deciding positions and
    /// scores. `options.mask` must be `rope.mask()` (causal, with `rope.window_left`). The
    /// frequency table and position offsets are copied to the device on `stream` (engines that
    /// keep them on the device call [`decode_rope_raw`](Self::decode_rope_raw)). The call does
    /// not synchronize.
    #[allow(clippy::too_many_arguments)]
    pub fn decode_rope<T: Element>(
        &self,
        stream: &Arc<CudaStream>,
        q: Input<'_, '_, T>,
        cache: &KvCache<'_, '_, T>,
        out: Output<'_, '_, T>,
        error_flag: Option<&mut CudaViewMut<'_, i32>>,
        options: &DecodeOptions,
        rope: &RopeOptions,
    ) -> Result<()> {
        if options.mask != rope.mask() {
            return Err(Error::InvalidMask {
                arg: "options.mask",
                value: format!("{:?}", options.mask),
                expected: "rope.mask(): causal, with rope.window_left as its left window",
            });
        }
        let (ql, kl) = (q.layout, cache.k.layout);
        ql.check_dims("q")?;
        kl.check_dims("k")?;
        let capacity = match &cache.block_table {
            Some(bt) => bt.max_pages_per_seq.saturating_mul(kl.seqlen),
            None => kl.seqlen,
        };
        let max_keys = options.max_seqlen_k.unwrap_or(capacity).max(1);
        rope.validate(ql.head_dim, ql.batch, ql.seqlen, max_keys)?;
        let tables = RopeTables::upload(
            stream,
            rope,
            ql.head_dim,
            max_keys + rope.max_offset() as usize,
        )?;
        let (raw_rope, _g1, _g2) = tables.raw(stream, rope, (0, 0));
        self.decode_views(
            stream,
            q,
            cache,
            out,
            (error_flag, None),
            options,
            (true, true),
            |args, base, plan| {
                // The mask is rope.mask(), causal (checked above); the key workspaces are 0.
                let mut params = LfDecodeRopeParams {
                    base,
                    rope: raw_rope.lower_rotation(args.q_layout.head_dim)?,
                };
                // SAFETY: decode_views validated the call, checked every buffer and holds their
                // guards and the workspace while this runs; the table and the offsets were
                // copied above on this stream, hold rotary_dim / 2 f64 and batch i32 (validated
                // against the call), and outlive the call (their frees are ordered after the
                // kernels on this stream).
                unsafe { self.launch_rope_decode(stream.cu_stream(), args, &mut params, plan) }
            },
        )
    }

    /// RoPE / ReRoPE / Leaky ReRoPE decoding from raw pointers: as
    /// [`decode_raw`](Self::decode_raw), with the plan and workspace of
    /// [`decode_rope_plan`](Self::decode_rope_plan) (always the decoding kernel, whatever the
    /// query count) and the rotation of `rope`, whose key workspaces must be 0.
    /// `args.options.mask` must be causal.
    ///
    /// # Safety
    /// As [`decode_raw`](Self::decode_raw), and: `rope.inv_freq` holds `rotary_dim / 2` f64 and
    /// `rope.position_offsets` (when not 0) `batch` i32 such that every key and query position
    /// plus the window fits in i32, device memory of this context that stays allocated and
    /// unwritten until the kernels have finished.
    pub unsafe fn decode_rope_raw(
        &self,
        stream: cudarc::driver::sys::CUstream,
        args: &RawDecode,
        rope: &RawRope,
    ) -> Result<()> {
        let (mut params, plan) = args.validate_rope(self.decode_slots(), rope)?;
        // SAFETY: this fn's contract; `params` and `plan` came from `args.validate_rope`.
        unsafe { self.launch_rope_decode(stream, args, &mut params, &plan) }
    }

    /// The launches of a validated RoPE decoding call.
    ///
    /// # Safety
    /// As [`decode_rope_raw`](Self::decode_rope_raw), with `params` and `plan` from validating
    /// `args` and the rotation.
    pub(in crate::attention) unsafe fn launch_rope_decode(
        &self,
        stream: cudarc::driver::sys::CUstream,
        args: &RawDecode,
        params: &mut LfDecodeRopeParams,
        plan: &DecodePlan,
    ) -> Result<()> {
        let base = params.base;
        // SAFETY: `params` is the kernel's one by-value parameter (LfDecodeRopeParams from
        // params.h), validated; pointers, tables, workspace and stream per this fn's contract.
        unsafe {
            self.launch_decode(
                stream,
                args,
                plan,
                (
                    "decode_rope",
                    decode_rope_smem_bytes(args.q_layout.head_dim),
                ),
                params,
                &base,
            )
        }
    }
}
