//! The exact forward: dense, causal and sliding-window attention. Its options, the raw
//! arguments and their validation, and the safe and raw entry points.

use cudarc::driver::{sys, CudaStream, LaunchConfig};

use super::SUPPORTED_HEAD_DIMS;
use super::{head_dim_kernel, sized_module, Attention, Input, Output, RawBlockMask};
use crate::check::{attention_memory, attention_shapes, softmax_scale};
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::mask::MaskSpec;
use crate::plan::{forward_tile_shape, TileShape};
use crate::sys::{LfBlockSparse, LfFwdParams, LF_FWD_WARPS};

/// Options of a forward call.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ForwardOptions {
    /// Which keys each query attends (dense, causal, sliding window).
    pub mask: MaskSpec,
    /// Multiplies Q K^T before the softmax; `None` means `1 / sqrt(head_dim)`. Must be finite
    /// and positive.
    pub softmax_scale: Option<f32>,
}

impl ForwardOptions {
    /// Dense attention with the default scale.
    pub fn dense() -> Self {
        ForwardOptions::default()
    }
    /// Causal attention with the default scale.
    pub fn causal() -> Self {
        ForwardOptions {
            mask: MaskSpec::causal(),
            softmax_scale: None,
        }
    }
    /// The same options with another mask.
    pub fn with_mask(self, mask: MaskSpec) -> Self {
        ForwardOptions { mask, ..self }
    }
    /// The same options with an explicit softmax scale.
    pub fn with_scale(self, scale: f32) -> Self {
        ForwardOptions {
            softmax_scale: Some(scale),
            ..self
        }
    }
}

/// Arguments of the raw forward: device pointers, layouts (element strides, signed) and options.
///
/// `q`, `k`, `v` and `o` point at element `(0, 0, 0, 0)` of their tensors, of element type
/// `dtype`; `lse`, when not 0, points at a contiguous f32 `[batch, heads_q, seqlen_q]` buffer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RawForward {
    /// Element type of Q, K, V and O.
    pub dtype: DType,
    /// Query device pointer.
    pub q: sys::CUdeviceptr,
    /// Key device pointer.
    pub k: sys::CUdeviceptr,
    /// Value device pointer.
    pub v: sys::CUdeviceptr,
    /// Output device pointer.
    pub o: sys::CUdeviceptr,
    /// Log-sum-exp output device pointer, or 0 for none.
    pub lse: sys::CUdeviceptr,
    /// Query layout `[batch, seqlen_q, heads_q, head_dim]`.
    pub q_layout: Layout,
    /// Key layout `[batch, seqlen_k, heads_kv, head_dim]`.
    pub k_layout: Layout,
    /// Value layout, same shape as the keys'.
    pub v_layout: Layout,
    /// Output layout, same shape as the queries'.
    pub o_layout: Layout,
    /// Mask and scale. With a block mask, `options.mask` is its element mask.
    pub options: ForwardOptions,
    /// A block-sparse layout on the device, or `None` for dense / causal / window attention.
    pub block_mask: Option<RawBlockMask>,
}

impl RawForward {
    /// Checks everything that can be checked without knowing buffer sizes, and lowers the call
    /// to the kernel's parameter struct: shapes agree, head dim supported, heads divide, no zero
    /// dims, strides and pointers meet the 16-byte rule, the output does not overlap itself or
    /// any input, the mask and scale make sense.
    pub fn validate(&self) -> Result<LfFwdParams> {
        let (q, k, v, o) = (
            &self.q_layout,
            &self.k_layout,
            &self.v_layout,
            &self.o_layout,
        );
        attention_shapes([q, k, v, o], true, self.block_mask.is_none())?;
        // Grid limits: heads on grid.y, batch on grid.z.
        for (arg, val) in [("q.heads", q.heads), ("q.batch", q.batch)] {
            if val > 65535 {
                return Err(Error::InvalidArgument {
                    arg,
                    value: val.to_string(),
                    expected: "at most 65535".into(),
                });
            }
        }
        let mask = self.options.mask.resolve(q.seqlen, k.seqlen)?;
        let sparse = match &self.block_mask {
            None => {
                if mask.sink_tokens != 0 {
                    return Err(Error::InvalidMask {
                        arg: "mask.sink_tokens",
                        value: mask.sink_tokens.to_string(),
                        expected: "0 for dense attention: attention sinks come with a block mask (sparse::patterns::sinks_window)",
                    });
                }
                LfBlockSparse::default()
            }
            Some(bm) => bm.lower(q, k)?,
        };

        attention_memory([q, k, v, o], [self.q, self.k, self.v, self.o], self.lse)?;
        let scale = softmax_scale(self.options.softmax_scale, q.head_dim)?;
        Ok(LfFwdParams {
            q: self.q as *const _,
            k: self.k as *const _,
            v: self.v as *const _,
            o: self.o as *mut _,
            lse: self.lse as *mut f32,
            q_batch_stride: q.batch_stride,
            q_head_stride: q.head_stride,
            q_row_stride: q.seq_stride,
            k_batch_stride: k.batch_stride,
            k_head_stride: k.head_stride,
            k_row_stride: k.seq_stride,
            v_batch_stride: v.batch_stride,
            v_head_stride: v.head_stride,
            v_row_stride: v.seq_stride,
            o_batch_stride: o.batch_stride,
            o_head_stride: o.head_stride,
            o_row_stride: o.seq_stride,
            mask,
            batch: q.batch as i32,
            heads_q: q.heads as i32,
            heads_kv: k.heads as i32,
            head_dim: q.head_dim as i32,
            softmax_scale: scale,
            softmax_scale_log2: scale * std::f32::consts::LOG2_E,
            sparse,
        })
    }
}

impl Attention {
    /// Forward attention on the caller's stream: `o = softmax(scale * q k^T + mask) v`, and the
    /// log-sum-exp of each row (natural log, f32 `[batch, heads_q, seqlen_q]`) when `out.lse` is
    /// given. Everything is validated before launch; the call does not synchronize.
    pub fn forward<T: Element>(
        &self,
        stream: &CudaStream,
        q: Input<'_, '_, T>,
        k: Input<'_, '_, T>,
        v: Input<'_, '_, T>,
        out: Output<'_, '_, T>,
        options: &ForwardOptions,
    ) -> Result<()> {
        self.forward_impl(stream, [q, k, v], out, *options, None, |raw| {
            // SAFETY: forward_impl checked every buffer against its layout and context and holds
            // the stream-ordering guards while this runs.
            unsafe { self.forward_raw(stream.cu_stream(), raw) }
        })
    }

    ///
    /// Validates shapes, strides, alignment, aliasing, mask and scale (see
    /// [`RawForward::validate`]) and returns a typed error before any launch.
    ///
    /// # Safety
    /// - `stream` is a stream of this value's context (or null for its legacy default stream).
    /// - A `block_mask` is a well-formed CSR layout for this call (as `BlockMask` makes them):
    ///   `batch * heads * ceil(seqlen_q / 128) + 1` non-decreasing row offsets starting at 0,
    ///   column indices below `ceil(seqlen_k / 64)`, one flag per listed block, and a block
    ///   flagged full only when the element mask hides none of its elements.
    /// - Every pointer in `args` is device memory of that context that holds every element its
    ///   layout addresses (and `lse`, when not 0, `batch * heads_q * seqlen_q` f32 values),
    ///   and stays allocated until the kernel has finished.
    /// - Nothing else writes those inputs, or reads or writes the outputs, until the kernel has
    ///   finished (order other streams with events).
    pub unsafe fn forward_raw(&self, stream: sys::CUstream, args: &RawForward) -> Result<()> {
        let params = args.validate()?;
        // SAFETY: this fn's contract, and `params` came from `args.validate()`.
        if unsafe { self.try_forward_sm90(stream, args, params) }? {
            return Ok(());
        }
        let d = args.q_layout.head_dim;
        let tiles = self.sm80_tiles(d, 1, "kernel")?;
        let kind = if args.block_mask.is_some() {
            "sparse"
        } else {
            "fwd"
        };
        let l = &args.q_layout;
        let mut params = params;
        // SAFETY: `params` was validated and is the kernel's one by-value parameter (the struct
        // both sides take from params.h); pointers and stream are valid per this fn's contract.
        unsafe {
            self.launch_sm80(
                stream,
                &sized_module(kind, args.dtype.name(), d),
                tiles,
                (l.seqlen, l.heads, l.batch),
                &mut params,
                "launching the forward kernel",
            )
        }
    }

    /// The sm_80 kernels' tile shape at head dim `d` and their dynamic shared memory (`q_tiles`
    /// Q tiles, one K and one V tile), or the error that says the device cannot hold them
    /// (`what` names the kernel in it).
    pub(super) fn sm80_tiles(
        &self,
        d: usize,
        q_tiles: usize,
        what: &str,
    ) -> Result<(TileShape, u32)> {
        let width = head_dim_kernel(d).map_or(d, |(w, _)| w);
        let shape = forward_tile_shape(width).ok_or(Error::UnsupportedHeadDim {
            arg: "q.head_dim",
            value: d,
            supported: SUPPORTED_HEAD_DIMS,
        })?;
        let smem = ((q_tiles * shape.br + 2 * shape.bc) * width * 2) as u32;
        if smem > self.max_smem_optin {
            return Err(Error::InvalidArgument {
                arg: "q.head_dim",
                value: d.to_string(),
                expected: format!(
                    "a head dim whose {what} fits the device's {} bytes of shared memory per \
                     block (needs {smem})",
                    self.max_smem_optin
                ),
            });
        }
        Ok((shape, smem))
    }

    /// Launches the sm_80 kernel `lf_{module}` (loaded once per context): one CTA of
    /// LF_FWD_WARPS warps per (query tile of `rows` query rows, head, batch entry), with the
    /// tile shape and shared memory of [`sm80_tiles`](Self::sm80_tiles).
    ///
    /// # Safety
    /// As [`Attention::launch`]: `params` is the kernel's one by-value parameter, made from the
    /// call's validated arguments, whose buffers and stream are valid for the launch; the
    /// kernel covers each (query tile, head, batch entry) of that grid once.
    pub(super) unsafe fn launch_sm80<P>(
        &self,
        stream: sys::CUstream,
        module: &str,
        (shape, smem): (TileShape, u32),
        (rows, heads, batch): (usize, usize, usize),
        params: &mut P,
        what: &'static str,
    ) -> Result<()> {
        // SAFETY: the context is kept alive by `_owner` or by the caller of from_raw_context.
        let kernel = unsafe { self.cache.kernel(module, &format!("lf_{module}"), smem) }?;
        let config = LaunchConfig {
            grid_dim: (rows.div_ceil(shape.br) as u32, heads as u32, batch as u32),
            block_dim: (LF_FWD_WARPS * 32, 1, 1),
            shared_mem_bytes: smem,
        };
        // SAFETY: this fn's contract.
        unsafe { self.launch(&kernel, config, stream, params, what) }
    }
}
