//! The variable-length forward with RoPE / ReRoPE / Leaky ReRoPE applied inside: a packed batch
//! (see [`varlen`](super::varlen)) whose sequences each carry their own positions, as
//! `forward_rope` gives one sequence: key `j` of sequence `b` at `off_b + j`, its queries aligned
//! bottom-right at its own lengths, `off_b` from `RopeOptions::position_offsets` (one per
//! sequence). The mask is causal, with `RopeOptions::window_left`.
//!
//! The keys are rotated once into two workspaces packed like K (`[total_k, heads_kv,
//! head_dim]`), each row to its position in its own sequence (found in the prefix sums); each
//! CTA rotates its query tile, as the RoPE forward does. sm_80 mainloop on every device.
//!
//! The inverse frequencies are the configuration's at `max_seqlen_k` plus the largest offset, for
//! the whole batch: dynamic NTK scaling therefore uses that batch-wide length, not each
//! sequence's own (the other scalings do not depend on the length).

use std::sync::Arc;

use cudarc::driver::{sys, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr};

use super::rope::{rope_keys_params, RawRope, RopeTables};
use super::{Attention, Input, MainloopChoice, Output, RawVarlenForward, VarlenOptions};
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::rope::{PositionMode, RopeOptions};
use crate::sys::{LfRopeKeysVarlenParams, LfVarlenRopeParams};

impl Attention {
    /// The variable-length forward with rotary positions applied inside (see the
    /// [module](self) docs): as [`forward_varlen`](Self::forward_varlen), with `rope` deciding
    /// positions and scores; `options.mask` must be `rope.mask()`. The frequency table and the
    /// offsets are copied to the device and the key workspaces allocated on `stream`; the call
    /// does not synchronize.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_varlen_rope<T: Element>(
        &self,
        stream: &Arc<CudaStream>,
        q: Input<'_, '_, T>,
        k: Input<'_, '_, T>,
        v: Input<'_, '_, T>,
        out: Output<'_, '_, T>,
        cu_seqlens: (&CudaView<'_, i32>, &CudaView<'_, i32>),
        error_flag: Option<&mut CudaViewMut<'_, i32>>,
        options: &VarlenOptions,
        rope: &RopeOptions,
    ) -> Result<()> {
        if options.mask != rope.mask() {
            return Err(Error::InvalidMask {
                arg: "options.mask",
                value: format!("{:?}", options.mask),
                expected: "rope.mask(): causal, with rope.window_left as its left window",
            });
        }
        let (ql, kl) = (q.layout, k.layout);
        ql.check_dims("q")?;
        kl.check_dims("k")?;
        let sequences = cu_seqlens.0.len().saturating_sub(1).max(1);
        rope.validate(
            ql.head_dim,
            sequences,
            options.max_seqlen_q.max(1),
            options.max_seqlen_k.max(1),
        )?;
        let tables = RopeTables::upload(
            stream,
            rope,
            ql.head_dim,
            options.max_seqlen_k.max(1) + rope.max_offset() as usize,
        )?;
        let ws_len = kl.seqlen * kl.heads * kl.head_dim;
        let alloc_err = || Error::driver("allocating the rotated-key workspace");
        // SAFETY: every element is written by the key pass before the attention kernel reads it
        // (the pass covers every packed row, head and pair).
        let k_rot: CudaSlice<T> = unsafe { stream.alloc(ws_len) }.map_err(alloc_err())?;
        let k_alt: Option<CudaSlice<T>> = match rope.mode {
            PositionMode::Rope => None,
            // SAFETY: as above.
            _ => Some(unsafe { stream.alloc(ws_len) }.map_err(alloc_err())?),
        };
        let (rp, _g3) = k_rot.device_ptr(stream);
        let (ap, _g4) = match &k_alt {
            Some(a) => {
                let (p, g) = a.device_ptr(stream);
                (p, Some(g))
            }
            None => (0, None),
        };
        let (raw_rope, _g1, _g2) = tables.raw(stream, rope, (rp, ap));
        self.varlen_views(
            stream,
            [q, k, v],
            out,
            cu_seqlens,
            error_flag,
            options,
            |args| {
                // SAFETY: varlen_views checked every buffer and holds their guards while this
                // runs; the tables and workspaces were made above on this stream with the sizes
                // the contract asks for and outlive the call (their frees are ordered after the
                // kernels on the stream).
                unsafe { self.forward_varlen_rope_raw(stream.cu_stream(), args, &raw_rope) }
            },
        )
    }

    /// The variable-length RoPE forward from raw pointers: the key pass into `rope`'s
    /// workspaces (packed `[total_k, heads_kv, head_dim]`, contiguous), then the attention
    /// kernel, both on `stream`. `args.forward.options.mask` must be causal. sm_80 mainloop on
    /// every device (under [`MainloopChoice::Sm90`] it is an error).
    ///
    /// # Safety
    /// As [`forward_varlen_raw`](Self::forward_varlen_raw), and as
    /// [`forward_rope_raw`](Self::forward_rope_raw) for `rope` (tables, offsets: one per
    /// sequence, and workspaces of `total_k * heads_kv * head_dim` elements each).
    pub unsafe fn forward_varlen_rope_raw(
        &self,
        stream: sys::CUstream,
        args: &RawVarlenForward,
        rope: &RawRope,
    ) -> Result<()> {
        if !args.forward.options.mask.causal {
            return Err(Error::InvalidMask {
                arg: "mask.causal",
                value: "false".into(),
                expected: "true: the RoPE forward is causal (ReRoPE's relative positions are non-negative)",
            });
        }
        let varlen = args.validate()?;
        let lf_rope = rope.validate(&args.forward)?;
        if self.mainloop == MainloopChoice::Sm90 {
            return Err(Error::InvalidArgument {
                arg: "mainloop",
                value: "MainloopChoice::Sm90".into(),
                expected: "Auto or Sm80: the variable-length forward runs on the sm_80 mainloop"
                    .into(),
            });
        }
        let f = &args.forward;
        let d = f.q_layout.head_dim;
        let tiles = self.sm80_tiles(d, 2, "RoPE kernel")?;
        let dt = f.dtype.name();
        // The packed keys are one batch entry of total_k rows; each row's sequence comes from
        // the prefix sums.
        let (keys, pairs) = rope_keys_params(f, lf_rope)?;
        let mut keys = LfRopeKeysVarlenParams {
            keys,
            cu_seqlens_k: args.cu_seqlens_k as *const i32,
            sequences: args.batch as i32,
            reserved: 0,
        };
        // SAFETY: validated parameters; the workspaces are disjoint from every input and each
        // other (validated) and sized per the contract; the prefix sums are read clamped.
        unsafe {
            self.launch_rope_keys(stream, &format!("rope_keys_varlen_{dt}"), pairs, &mut keys)
        }?;
        let mut params = LfVarlenRopeParams {
            varlen,
            rope: lf_rope,
        };
        // SAFETY: as forward_varlen_raw, with the rotated-key workspaces written by the launch
        // above on the same stream.
        unsafe {
            self.launch_sm80(
                stream,
                &format!("varlen_rope_{dt}_d{d}"),
                tiles,
                (args.max_seqlen_q, f.q_layout.heads, args.batch),
                &mut params,
                "launching the variable-length RoPE kernel",
            )
        }
    }
}
