//! The variable-length (packed) forward, FlashAttention's `flash_attn_varlen_func`: sequences of
//! different lengths packed one after the other, found through prefix sums on the device. Its
//! options, the raw arguments and their validation, and the safe and raw entry points.
//!
//! Q and O are `[total_q, heads_q, head_dim]`, K and V `[total_k, heads_kv, head_dim]`, each
//! described by a [`Layout`] of batch 1 (any row and head strides the dense forward accepts); the
//! log-sum-exp is f32 `[heads_q, total_q]`. Sequence `b` owns query rows
//! `cu_seqlens_q[b]..cu_seqlens_q[b + 1]` and key rows `cu_seqlens_k[b]..cu_seqlens_k[b + 1]`, and
//! is attended as the dense forward would attend it alone: GQA, causal and windows aligned
//! bottom-right at its own lengths. A sequence with no key gives 0 and LSE `-inf`.
//!
//! The prefix sums live on the device, so they cannot be checked before the launch without a
//! copy and a synchronization. The kernel clamps a sequence's start into `[0, total]`, its end
//! into `[start, total]` and its queries to `max_seqlen_q`, so bad sums never make it read or
//! write outside the tensors; it reports them through an optional error flag, an i32 on the
//! device the caller zeroes before the call and reads after it (when and if it wants to:
//! nothing here synchronizes). With the flag set the output is unspecified (decreasing sums
//! make sequences share rows).

use cudarc::driver::{
    sys, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceSlice,
};

use super::{sized_module, Attention, Input, Output, RawForward};
use crate::check::aligned;
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::mask::MaskSpec;
use crate::sys::LfVarlenParams;
use crate::ForwardOptions;

/// Options of a variable-length forward call.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct VarlenOptions {
    /// Which keys each query attends, per sequence (dense, causal, sliding window; aligned
    /// bottom-right at each sequence's own lengths).
    pub mask: MaskSpec,
    /// Multiplies Q K^T before the softmax; `None` means `1 / sqrt(head_dim)`.
    pub softmax_scale: Option<f32>,
    /// The most queries any sequence has (at least 1, at most the packed query count): the
    /// launch covers this many rows per sequence, and a longer sequence is cut and reported.
    pub max_seqlen_q: usize,
    /// The most keys any sequence has (at least 1, at most the packed key count); a longer
    /// sequence is computed whole and reported.
    pub max_seqlen_k: usize,
}

/// Arguments of the raw variable-length forward.
///
/// `forward` holds the packed tensors as one batch entry (`q_layout` `[1, total_q, heads_q,
/// head_dim]`, `k_layout` and `v_layout` `[1, total_k, heads_kv, head_dim]`, `o_layout` like
/// `q_layout`; `lse`, when not 0, a contiguous f32 `[heads_q, total_q]`), its mask and scale, and
/// no block mask.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RawVarlenForward {
    /// The packed tensors, mask and scale.
    pub forward: RawForward,
    /// Device pointer to `batch + 1` i32 prefix sums of the sequences' query counts.
    pub cu_seqlens_q: sys::CUdeviceptr,
    /// Device pointer to `batch + 1` i32 prefix sums of the sequences' key counts.
    pub cu_seqlens_k: sys::CUdeviceptr,
    /// Number of sequences.
    pub batch: usize,
    /// The most queries any sequence has (see [`VarlenOptions::max_seqlen_q`]).
    pub max_seqlen_q: usize,
    /// The most keys any sequence has.
    pub max_seqlen_k: usize,
    /// Device pointer to an i32 the kernel ORs 1 into for prefix sums that do not start at 0,
    /// decrease, pass the packed tensors, or give a sequence more than `max_seqlen_q` queries or
    /// `max_seqlen_k` keys (the output is then unspecified), or 0 for none. The caller zeroes it
    /// before the launch.
    pub error_flag: sys::CUdeviceptr,
}

impl RawVarlenForward {
    /// Checks everything that can be checked without reading the prefix sums or knowing buffer
    /// sizes, and lowers the call to the kernel's parameters.
    pub fn validate(&self) -> Result<LfVarlenParams> {
        let f = &self.forward;
        if f.block_mask.is_some() {
            return Err(Error::InvalidArgument {
                arg: "forward.block_mask",
                value: "Some(..)".into(),
                expected: "None: the variable-length forward takes no block mask".into(),
            });
        }
        for (arg, l) in [
            ("q.batch", &f.q_layout),
            ("k.batch", &f.k_layout),
            ("v.batch", &f.v_layout),
            ("o.batch", &f.o_layout),
        ] {
            if l.batch != 1 {
                return Err(Error::InvalidArgument {
                    arg,
                    value: l.batch.to_string(),
                    expected: "1: packed tensors are one batch entry [1, total, heads, head_dim]"
                        .into(),
                });
            }
        }
        let mut fwd = f.validate()?;
        let (total_q, total_k) = (f.q_layout.seqlen, f.k_layout.seqlen);
        if self.batch == 0 || self.batch > 65535 {
            return Err(Error::InvalidArgument {
                arg: "batch",
                value: self.batch.to_string(),
                expected: "1 to 65535 sequences".into(),
            });
        }
        for (arg, max, total) in [
            ("max_seqlen_q", self.max_seqlen_q, total_q),
            ("max_seqlen_k", self.max_seqlen_k, total_k),
        ] {
            if max == 0 || max > total {
                return Err(Error::InvalidArgument {
                    arg,
                    value: max.to_string(),
                    expected: format!("1 to the packed count {total}"),
                });
            }
        }
        for (arg, ptr) in [
            ("cu_seqlens_q.ptr", self.cu_seqlens_q),
            ("cu_seqlens_k.ptr", self.cu_seqlens_k),
        ] {
            aligned(arg, ptr, 4, true)?;
        }
        aligned("error_flag.ptr", self.error_flag, 4, false)?;
        // The layouts' lengths passed the dense checks, so they fit in i32.
        fwd.batch = self.batch as i32;
        fwd.mask.seqlen_q = self.max_seqlen_q as i32;
        fwd.mask.seqlen_k = self.max_seqlen_k as i32;
        Ok(LfVarlenParams {
            fwd,
            cu_seqlens_q: self.cu_seqlens_q as *const i32,
            cu_seqlens_k: self.cu_seqlens_k as *const i32,
            error_flag: self.error_flag as *mut i32,
            total_q: total_q as i32,
            total_k: total_k as i32,
        })
    }
}

impl Attention {
    /// The variable-length forward on the caller's stream (see the [module](self) docs): packed
    /// `q`, `k`, `v` and `out` as batch-1 layouts, `cu_seqlens_q` and `cu_seqlens_k` the
    /// `batch + 1` prefix sums on the device. Validated before launch like
    /// [`forward`](Self::forward); the kernel clamps the prefix sums and, when `error_flag` is
    /// given, ORs 1 into it if it had to (see [`RawVarlenForward::error_flag`]). The call does not
    /// synchronize.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_varlen<T: Element>(
        &self,
        stream: &CudaStream,
        q: Input<'_, '_, T>,
        k: Input<'_, '_, T>,
        v: Input<'_, '_, T>,
        out: Output<'_, '_, T>,
        cu_seqlens_q: &CudaView<'_, i32>,
        cu_seqlens_k: &CudaView<'_, i32>,
        error_flag: Option<&mut CudaViewMut<'_, i32>>,
        options: &VarlenOptions,
    ) -> Result<()> {
        self.varlen_views(
            stream,
            [q, k, v],
            out,
            (cu_seqlens_q, cu_seqlens_k),
            error_flag,
            options,
            |args| {
                // SAFETY: varlen_views checked every tensor against its layout and context and
                // holds the stream-ordering guards while this runs; the prefix sums and the flag
                // are device arrays of this context of `batch + 1` and at least 1 elements,
                // guarded for the stream; the kernel clamps whatever the sums hold.
                unsafe { self.forward_varlen_raw(stream.cu_stream(), args) }
            },
        )
    }

    /// What the safe variable-length entries share: checks the prefix sums and the flag (their
    /// context and length) and the tensors (through `forward_impl`), lowers the call to a
    /// [`RawVarlenForward`] and calls `run` with it while every buffer is guarded for `stream`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn varlen_views<T: Element>(
        &self,
        stream: &CudaStream,
        qkv: [Input<'_, '_, T>; 3],
        out: Output<'_, '_, T>,
        (cu_seqlens_q, cu_seqlens_k): (&CudaView<'_, i32>, &CudaView<'_, i32>),
        error_flag: Option<&mut CudaViewMut<'_, i32>>,
        options: &VarlenOptions,
        run: impl FnOnce(&RawVarlenForward) -> Result<()>,
    ) -> Result<()> {
        for (arg, cu) in [
            ("cu_seqlens_q", cu_seqlens_q),
            ("cu_seqlens_k", cu_seqlens_k),
        ] {
            self.same_context(arg, cu.stream().context().cu_ctx())?;
        }
        if let Some(f) = &error_flag {
            self.same_context("error_flag", f.stream().context().cu_ctx())?;
            if f.is_empty() {
                return Err(Error::OutOfBounds {
                    arg: "error_flag",
                    required: 1,
                    len: 0,
                });
            }
        }
        if cu_seqlens_q.len() < 2 || cu_seqlens_k.len() != cu_seqlens_q.len() {
            return Err(Error::InvalidArgument {
                arg: "cu_seqlens_k.len",
                value: format!("{} and {}", cu_seqlens_q.len(), cu_seqlens_k.len()),
                expected: "batch + 1 entries in both, batch at least 1".into(),
            });
        }
        let batch = cu_seqlens_q.len() - 1;
        let fwd_options = ForwardOptions {
            mask: options.mask,
            softmax_scale: options.softmax_scale,
        };
        {
            let (cq, _gq) = cu_seqlens_q.device_ptr(stream);
            let (ck, _gk) = cu_seqlens_k.device_ptr(stream);
            let (fp, _gf) = match error_flag {
                Some(f) => {
                    let (p, g) = f.device_ptr_mut(stream);
                    (p, Some(g))
                }
                None => (0, None),
            };
            self.forward_impl(stream, qkv, out, fwd_options, None, |raw| {
                let args = RawVarlenForward {
                    forward: *raw,
                    cu_seqlens_q: cq,
                    cu_seqlens_k: ck,
                    batch,
                    max_seqlen_q: options.max_seqlen_q,
                    max_seqlen_k: options.max_seqlen_k,
                    error_flag: fp,
                };
                run(&args)
            })?;
        }
        Ok(())
    }

    /// The variable-length forward from raw pointers. Validates everything
    /// [`RawVarlenForward::validate`] can before launch. On an H100/H200 it runs on the Hopper
    /// mainloop (head dims 64, 128 and 256, layouts a tensor map describes), elsewhere and for
    /// other calls on the sm_80 one, as the dense forward chooses
    /// ([`Attention::varlen_mainloop_for`] says which).
    ///
    /// # Safety
    /// As [`forward_raw`](Self::forward_raw) for `args.forward` (the packed tensors, and `lse`,
    /// when not 0, `heads_q * total_q` f32 values), and: `cu_seqlens_q` and `cu_seqlens_k` hold
    /// `batch + 1` i32 each and `error_flag`, when not 0, one i32, all device memory of this
    /// context that stays allocated and unwritten by others until the kernel has finished.
    /// Their values may be anything: the kernel clamps them.
    pub unsafe fn forward_varlen_raw(
        &self,
        stream: sys::CUstream,
        args: &RawVarlenForward,
    ) -> Result<()> {
        let mut params = args.validate()?;
        // SAFETY: this fn's contract; `params` is the validated call.
        if unsafe { self.try_varlen_sm90(stream, args, params) }? {
            return Ok(());
        }
        let f = &args.forward;
        let d = f.q_layout.head_dim;
        let tiles = self.sm80_tiles(d, 1, "kernel")?;
        // SAFETY: `params` was validated and is the kernel's one by-value parameter
        // (LfVarlenParams from params.h); pointers and stream are valid per this fn's contract;
        // the grid covers max_seqlen_q rows of every (head, sequence), and the kernel clamps
        // each sequence's rows into the packed tensors.
        unsafe {
            self.launch_sm80(
                stream,
                &sized_module("varlen", f.dtype.name(), d),
                tiles,
                (args.max_seqlen_q, f.q_layout.heads, args.batch),
                &mut params,
                "launching the variable-length forward kernel",
            )
        }
    }
}
