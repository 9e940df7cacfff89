//! The backward of the exact forward: dQ, dK and dV of dense, causal and sliding-window attention
//! (bottom-right windows, GQA/MQA, any strides, empty rows, softmax scale), FlashAttention-2 style
//! on the `mma.sync` mainloop (every device of compute capability 8.0 and newer). Its options, the
//! raw arguments and their validation, the workspace, and the safe and raw entry points; which
//! kernels a call runs and their launches are in `backward_launch.rs`.
//!
//! A call runs three kernels on the stream (`cuda/bwd.cuh`):
//!
//! 1. a pre-pass: `D_i = dO_i . O_i` and the forward's log-sum-exp in log2 units per query row
//!    into the workspace (and the f32 dQ accumulator cleared);
//! 2. the main kernel, one CTA per (key tile, key/value head, batch entry): P recomputed from Q, K
//!    and the log-sum-exp, `dV += P^T dO`, `dS = P (dO V^T - D)`, `dK += dS^T Q` in registers over
//!    the query tiles that see the key tile, for every query head of the group, and
//!    `dQ += dS K` added atomically to the f32 accumulator;
//! 3. the conversion of the accumulator to dQ in the element type (times the scale).
//!
//! With [`BackwardOptions::deterministic`] the main kernel leaves dQ alone and a third kernel, one
//! CTA per (query tile, query head, batch entry), computes dQ over the key tiles in a fixed order
//! (no atomics, the same bits on every run; it recomputes S and dP, about 40% more arithmetic).
//! dK and dV are always deterministic: the query heads of a group add up in registers in a fixed
//! order.

use cudarc::driver::{
    sys, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceSlice,
};

use super::{Attention, ForwardOptions, Input, Scratch};
use crate::check::{
    aligned, attention_shapes, byte_range, mismatch, overlaps, softmax_scale, strides_of_16_bytes,
};
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::mask::MaskSpec;
use crate::sys::{LfBwdParams, LF_BWD_ROW_PAD};

/// Options of a backward call: the forward's mask and scale, and whether dQ must come out the
/// same, bit for bit, on every run.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BackwardOptions {
    /// Which keys each query attends (dense, causal, sliding window): the forward's mask.
    pub mask: MaskSpec,
    /// The forward's softmax scale; `None` means `1 / sqrt(head_dim)`. Must be finite and
    /// positive.
    pub softmax_scale: Option<f32>,
    /// Compute dQ without atomics, in a fixed order (a separate pass over the query tiles):
    /// reproducible bits, at about 40% more arithmetic. dK and dV are deterministic either way.
    pub deterministic: bool,
}

impl BackwardOptions {
    /// Dense attention with the default scale.
    pub fn dense() -> Self {
        BackwardOptions::default()
    }
    /// Causal attention with the default scale.
    pub fn causal() -> Self {
        BackwardOptions {
            mask: MaskSpec::causal(),
            ..BackwardOptions::default()
        }
    }
    /// The same options with another mask.
    pub fn with_mask(self, mask: MaskSpec) -> Self {
        BackwardOptions { mask, ..self }
    }
    /// The same options with an explicit softmax scale.
    pub fn with_scale(self, scale: f32) -> Self {
        BackwardOptions {
            softmax_scale: Some(scale),
            ..self
        }
    }
    /// The same options with deterministic dQ on or off.
    pub fn with_deterministic(self, deterministic: bool) -> Self {
        BackwardOptions {
            deterministic,
            ..self
        }
    }
}

impl From<ForwardOptions> for BackwardOptions {
    /// The backward of a forward call made with `f` (atomic dQ).
    fn from(f: ForwardOptions) -> Self {
        BackwardOptions {
            mask: f.mask,
            softmax_scale: f.softmax_scale,
            deterministic: false,
        }
    }
}

/// Query rows of the workspace per (batch entry, query head): `seqlen_q` rounded up to
/// `LF_BWD_ROW_PAD` (128), so that every query tile of the kernels reads whole rows.
fn padded_rows(seqlen_q: usize) -> usize {
    seqlen_q.div_ceil(LF_BWD_ROW_PAD as usize) * LF_BWD_ROW_PAD as usize
}

/// Where the workspace's parts start, in bytes from its base, and how many bytes it needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct WorkspacePlan {
    rows_pad: usize,
    lse_log2: usize,
    dq_accum: Option<usize>,
    bytes: usize,
}

fn workspace_plan(q: &Layout, deterministic: bool) -> Result<WorkspacePlan> {
    q.check_dims("q")?;
    let too_big = || Error::InvalidArgument {
        arg: "q",
        value: format!(
            "batch {} x heads {} x seqlen {} x head_dim {}",
            q.batch, q.heads, q.seqlen, q.head_dim
        ),
        expected: "a backward workspace whose size fits in usize".into(),
    };
    let rows_pad = padded_rows(q.seqlen);
    let rows = q
        .batch
        .checked_mul(q.heads)
        .and_then(|x| x.checked_mul(rows_pad))
        .ok_or_else(too_big)?;
    // D and the LSE: one f32 per row each (rows is a multiple of 64: 16-byte aligned parts).
    let row_bytes = rows.checked_mul(4).ok_or_else(too_big)?;
    let lse_log2 = row_bytes;
    let mut bytes = row_bytes.checked_mul(2).ok_or_else(too_big)?;
    let dq_accum = if deterministic {
        None
    } else {
        let at = bytes;
        let acc = row_bytes.checked_mul(q.head_dim).ok_or_else(too_big)?;
        bytes = bytes.checked_add(acc).ok_or_else(too_big)?;
        Some(at)
    };
    Ok(WorkspacePlan {
        rows_pad,
        lse_log2,
        dq_accum,
        bytes,
    })
}

/// Bytes of device workspace a backward call over queries laid out as `q` needs (the raw API's
/// `workspace_bytes`; the safe API allocates it itself). With `rows = batch * heads_q *
/// ceil(seqlen_q / 64) * 64`: `8 * rows` bytes for the per-row `D` and log-sum-exp, plus
/// `4 * rows * head_dim` for the f32 dQ accumulator unless `deterministic`.
///
/// # Errors
///
/// [`Error::ZeroSized`] for a zero dimension, [`Error::InvalidArgument`] when the size does not
/// fit in `usize`.
pub fn backward_workspace_bytes(q: &Layout, deterministic: bool) -> Result<usize> {
    Ok(workspace_plan(q, deterministic)?.bytes)
}

/// Arguments of the raw backward: device pointers, layouts (element strides, signed), the
/// caller's workspace and options.
///
/// `q`, `k`, `v`, `o` and `dout` (the upstream gradient of `o`) point at element `(0, 0, 0, 0)` of
/// their tensors, of element type `dtype`; `lse` at the forward's contiguous f32 `[batch,
/// heads_q, seqlen_q]` log-sum-exp (natural log, `-inf` for a row that sees no key), which the
/// backward needs. `dq`, `dk` and `dv` receive the gradients, laid out as given (shaped like `q`,
/// `k` and `v`). `workspace` is device memory of at least [`backward_workspace_bytes`] bytes,
/// 16-byte aligned, that nothing else uses while the call runs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RawBackward {
    /// Element type of every tensor but the LSE.
    pub dtype: DType,
    /// Query device pointer.
    pub q: sys::CUdeviceptr,
    /// Key device pointer.
    pub k: sys::CUdeviceptr,
    /// Value device pointer.
    pub v: sys::CUdeviceptr,
    /// The forward's output.
    pub o: sys::CUdeviceptr,
    /// The upstream gradient of the output.
    pub dout: sys::CUdeviceptr,
    /// The forward's log-sum-exp (required).
    pub lse: sys::CUdeviceptr,
    /// Query gradient output.
    pub dq: sys::CUdeviceptr,
    /// Key gradient output.
    pub dk: sys::CUdeviceptr,
    /// Value gradient output.
    pub dv: sys::CUdeviceptr,
    /// Device workspace.
    pub workspace: sys::CUdeviceptr,
    /// Bytes at `workspace`.
    pub workspace_bytes: usize,
    /// Query layout `[batch, seqlen_q, heads_q, head_dim]`.
    pub q_layout: Layout,
    /// Key layout `[batch, seqlen_k, heads_kv, head_dim]`.
    pub k_layout: Layout,
    /// Value layout, same shape as the keys'.
    pub v_layout: Layout,
    /// Output layout, same shape as the queries'.
    pub o_layout: Layout,
    /// Upstream-gradient layout, same shape as the queries'.
    pub dout_layout: Layout,
    /// Query-gradient layout, same shape as the queries'.
    pub dq_layout: Layout,
    /// Key-gradient layout, same shape as the keys'.
    pub dk_layout: Layout,
    /// Value-gradient layout, same shape as the keys'.
    pub dv_layout: Layout,
    /// Mask, scale and determinism.
    pub options: BackwardOptions,
}

/// `l` (argument `names[0]`'s tensor) has the shape of `want` (argument `other`'s), dimension by
/// dimension; `names` are the labels of l's batch, seqlen, heads and head_dim.
fn same_shape(
    arg: &'static str,
    names: [&'static str; 4],
    l: &Layout,
    other: [&'static str; 4],
    want: &Layout,
) -> Result<()> {
    l.check_dims(arg)?;
    for ((name, o), (v, w)) in names.into_iter().zip(other).zip([
        (l.batch, want.batch),
        (l.seqlen, want.seqlen),
        (l.heads, want.heads),
        (l.head_dim, want.head_dim),
    ]) {
        mismatch(name, v, o, w)?;
    }
    Ok(())
}

const Q_DIMS: [&str; 4] = ["q.batch", "q.seqlen", "q.heads", "q.head_dim"];
const K_DIMS: [&str; 4] = ["k.batch", "k.seqlen", "k.heads", "k.head_dim"];

impl RawBackward {
    /// Checks everything that can be checked without knowing buffer sizes, and lowers the call
    /// to the kernels' parameter struct: the forward's shape rules (head dim 64, 128 or 256),
    /// `dout` and `dq` shaped like `q`, `dk` and `dv` like `k`, the mask (no sinks) and scale,
    /// 16-byte aligned pointers and strides of multiples of 8 elements, a 4-byte aligned LSE, a
    /// 16-byte aligned workspace of at least [`backward_workspace_bytes`], no gradient overlapping
    /// itself, another gradient, an input or the workspace, and no workspace overlapping an input.
    pub fn validate(&self) -> Result<LfBwdParams> {
        self.validate_with(false)
    }

    /// [`validate`](Self::validate), with sink tokens in the mask allowed when `sinks` (the
    /// block-sparse backward, whose block masks list the sink blocks).
    pub(super) fn validate_with(&self, sinks: bool) -> Result<LfBwdParams> {
        let (q, k, v, o) = (
            &self.q_layout,
            &self.k_layout,
            &self.v_layout,
            &self.o_layout,
        );
        attention_shapes([q, k, v, o], true, false)?;
        same_shape(
            "dout",
            ["dout.batch", "dout.seqlen", "dout.heads", "dout.head_dim"],
            &self.dout_layout,
            Q_DIMS,
            q,
        )?;
        same_shape(
            "dq",
            ["dq.batch", "dq.seqlen", "dq.heads", "dq.head_dim"],
            &self.dq_layout,
            Q_DIMS,
            q,
        )?;
        same_shape(
            "dk",
            ["dk.batch", "dk.seqlen", "dk.heads", "dk.head_dim"],
            &self.dk_layout,
            K_DIMS,
            k,
        )?;
        same_shape(
            "dv",
            ["dv.batch", "dv.seqlen", "dv.heads", "dv.head_dim"],
            &self.dv_layout,
            K_DIMS,
            k,
        )?;
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
        if mask.sink_tokens != 0 && !sinks {
            return Err(Error::InvalidMask {
                arg: "mask.sink_tokens",
                value: mask.sink_tokens.to_string(),
                expected: "0: the backward takes dense, causal and sliding-window masks",
            });
        }
        let scale = softmax_scale(self.options.softmax_scale, q.head_dim)?;
        let ws = workspace_plan(q, self.options.deterministic)?;
        let rows_pad = i32::try_from(ws.rows_pad).map_err(|_| Error::InvalidArgument {
            arg: "q.seqlen",
            value: q.seqlen.to_string(),
            expected: format!(
                "at most {} (the workspace rows, rounded up to {LF_BWD_ROW_PAD}, index with i32)",
                i32::MAX as u32 - LF_BWD_ROW_PAD + 1
            ),
        })?;

        // Memory: alignment of pointers and strides.
        let tensors: [(&'static str, &'static str, u64, &Layout); 8] = [
            ("q", "q.ptr", self.q, q),
            ("k", "k.ptr", self.k, k),
            ("v", "v.ptr", self.v, v),
            ("o", "o.ptr", self.o, o),
            ("dout", "dout.ptr", self.dout, &self.dout_layout),
            ("dq", "dq.ptr", self.dq, &self.dq_layout),
            ("dk", "dk.ptr", self.dk, &self.dk_layout),
            ("dv", "dv.ptr", self.dv, &self.dv_layout),
        ];
        for (name, ptr_arg, ptr, l) in tensors {
            aligned(ptr_arg, ptr, 16, true)?;
            strides_of_16_bytes(name, l)?;
        }
        aligned("lse.ptr", self.lse, 4, true)?;
        aligned("workspace.ptr", self.workspace, 16, true)?;
        if self.workspace_bytes < ws.bytes {
            return Err(Error::InvalidArgument {
                arg: "workspace_bytes",
                value: self.workspace_bytes.to_string(),
                expected: format!("at least {} bytes (backward_workspace_bytes)", ws.bytes),
            });
        }

        // Aliasing: the gradients and the workspace are written; nothing written may overlap
        // anything else the call touches.
        let lse_len = (q.batch * q.heads * q.seqlen) as i128 * 4;
        let inputs: [(&'static str, (i128, i128)); 6] = [
            ("q", byte_range(self.q, q, 2)),
            ("k", byte_range(self.k, k, 2)),
            ("v", byte_range(self.v, v, 2)),
            ("o", byte_range(self.o, o, 2)),
            ("dout", byte_range(self.dout, &self.dout_layout, 2)),
            ("lse", (self.lse as i128, self.lse as i128 + lse_len)),
        ];
        let outputs: [(&'static str, (i128, i128)); 4] = [
            ("dq", byte_range(self.dq, &self.dq_layout, 2)),
            ("dk", byte_range(self.dk, &self.dk_layout, 2)),
            ("dv", byte_range(self.dv, &self.dv_layout, 2)),
            (
                "workspace",
                (
                    self.workspace as i128,
                    self.workspace as i128 + ws.bytes as i128,
                ),
            ),
        ];
        for (arg, l) in [
            ("dq", &self.dq_layout),
            ("dk", &self.dk_layout),
            ("dv", &self.dv_layout),
        ] {
            if !l.is_non_overlapping() {
                return Err(Error::OverlappingOutput { arg });
            }
        }
        for (i, &(output, range)) in outputs.iter().enumerate() {
            for &(other, r) in inputs.iter().chain(&outputs[..i]) {
                if overlaps(range, r) {
                    return Err(Error::Aliasing { output, other });
                }
            }
        }

        let base = self.workspace;
        let at = |offset: usize| (base + offset as u64) as *mut f32;
        Ok(LfBwdParams {
            q: self.q as *const _,
            k: self.k as *const _,
            v: self.v as *const _,
            o: self.o as *const _,
            dout: self.dout as *const _,
            lse: self.lse as *const f32,
            dq: self.dq as *mut _,
            dk: self.dk as *mut _,
            dv: self.dv as *mut _,
            dq_accum: ws.dq_accum.map_or(std::ptr::null_mut(), at),
            dsum: at(0),
            lse_log2: at(ws.lse_log2),
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
            do_batch_stride: self.dout_layout.batch_stride,
            do_head_stride: self.dout_layout.head_stride,
            do_row_stride: self.dout_layout.seq_stride,
            dq_batch_stride: self.dq_layout.batch_stride,
            dq_head_stride: self.dq_layout.head_stride,
            dq_row_stride: self.dq_layout.seq_stride,
            dk_batch_stride: self.dk_layout.batch_stride,
            dk_head_stride: self.dk_layout.head_stride,
            dk_row_stride: self.dk_layout.seq_stride,
            dv_batch_stride: self.dv_layout.batch_stride,
            dv_head_stride: self.dv_layout.head_stride,
            dv_row_stride: self.dv_layout.seq_stride,
            mask,
            batch: q.batch as i32,
            heads_q: q.heads as i32,
            heads_kv: k.heads as i32,
            head_dim: q.head_dim as i32,
            rows_pad,
            softmax_scale: scale,
            softmax_scale_log2: scale * std::f32::consts::LOG2_E,
            reserved: 0,
        })
    }
}

/// The inputs of a backward call: the forward's Q, K, V, its output O and log-sum-exp (natural
/// log, f32 `[batch, heads_q, seqlen_q]`, as `forward` writes it), and the upstream gradient of O.
#[derive(Clone, Copy)]
pub struct BackwardInputs<'a, 'b, T> {
    /// Queries.
    pub q: Input<'a, 'b, T>,
    /// Keys.
    pub k: Input<'a, 'b, T>,
    /// Values.
    pub v: Input<'a, 'b, T>,
    /// The forward's output.
    pub o: Input<'a, 'b, T>,
    /// The upstream gradient of the output, shaped like it.
    pub dout: Input<'a, 'b, T>,
    /// The forward's log-sum-exp.
    pub lse: &'a CudaView<'b, f32>,
}

/// One gradient output: a device view and its layout.
pub struct Gradient<'a, 'b, T> {
    /// The elements.
    pub data: &'a mut CudaViewMut<'b, T>,
    /// Shape and strides.
    pub layout: Layout,
}

/// The outputs of a backward call, overwritten with the gradients.
pub struct Gradients<'a, 'b, T> {
    /// Gradient with respect to Q, shaped like Q.
    pub dq: Gradient<'a, 'b, T>,
    /// Gradient with respect to K, shaped like K (summed over the query heads of each group).
    pub dk: Gradient<'a, 'b, T>,
    /// Gradient with respect to V, shaped like V.
    pub dv: Gradient<'a, 'b, T>,
}

impl Attention {
    /// The gradients of a forward call with respect to q, k and v, on the caller's stream, given
    /// the forward's inputs, output and log-sum-exp and the upstream gradient `dout`: dQ, dK and
    /// dV overwrite `grads`. The options must be the forward's mask and scale. Everything is
    /// validated before launch ([`RawBackward::validate`], and every view's context and buffer
    /// length); the workspace is allocated and freed in stream order; the call does not
    /// synchronize.
    pub fn backward<T: Element>(
        &self,
        stream: &CudaStream,
        inputs: BackwardInputs<'_, '_, T>,
        grads: Gradients<'_, '_, T>,
        options: &BackwardOptions,
    ) -> Result<()> {
        let ws_bytes = backward_workspace_bytes(&inputs.q.layout, options.deterministic)?;
        self.backward_impl(stream, inputs, grads, options, ws_bytes, |raw| {
            // SAFETY: every buffer was checked against its layout and context, the guards keep
            // the stream ordering until the launches are queued, and the workspace is a fresh
            // allocation of the size the call needs, freed in stream order after it.
            unsafe { self.backward_raw(stream.cu_stream(), raw) }
        })
    }

    /// The safe backward's checks and buffers: checks every view's context and length,
    /// allocates a workspace of `ws_bytes` in stream order and hands the raw arguments to `run`,
    /// which launches (`backward_raw`, its block-sparse variant or the RoPE backward).
    pub(super) fn backward_impl<T: Element>(
        &self,
        stream: &CudaStream,
        inputs: BackwardInputs<'_, '_, T>,
        grads: Gradients<'_, '_, T>,
        options: &BackwardOptions,
        ws_bytes: usize,
        run: impl FnOnce(&RawBackward) -> Result<()>,
    ) -> Result<()> {
        self.same_context("stream", stream.context().cu_ctx())?;
        let BackwardInputs {
            q,
            k,
            v,
            o,
            dout,
            lse,
        } = inputs;
        let Gradients { dq, dk, dv } = grads;
        // The shape rules first (an unsupported head dim is that, whatever the buffers hold),
        // then every view's context and length, then the rest of RawBackward::validate.
        attention_shapes([&q.layout, &k.layout, &v.layout, &o.layout], true, false)?;
        self.check_view("q", q.data, &q.layout)?;
        self.check_view("k", k.data, &k.layout)?;
        self.check_view("v", v.data, &v.layout)?;
        self.check_view("o", o.data, &o.layout)?;
        self.check_view("dout", dout.data, &dout.layout)?;
        self.check_view("dq", &*dq.data, &dq.layout)?;
        self.check_view("dk", &*dk.data, &dk.layout)?;
        self.check_view("dv", &*dv.data, &dv.layout)?;
        self.same_context("lse", lse.stream().context().cu_ctx())?;
        let lse_needed =
            (q.layout.batch as u128) * (q.layout.heads as u128) * (q.layout.seqlen as u128);
        if lse_needed > lse.len() as u128 {
            return Err(Error::OutOfBounds {
                arg: "lse",
                required: lse_needed,
                len: lse.len(),
            });
        }
        // SAFETY: `stream` belongs to this value's live context (checked above) and outlives the
        // scratch, which is dropped at the end of this call, after the launches are queued.
        let ws = unsafe { Scratch::new(self.ctx, stream.cu_stream(), ws_bytes) }?;
        let (qp, _gq) = q.data.device_ptr(stream);
        let (kp, _gk) = k.data.device_ptr(stream);
        let (vp, _gv) = v.data.device_ptr(stream);
        let (op, _go) = o.data.device_ptr(stream);
        let (dop, _gdo) = dout.data.device_ptr(stream);
        let (lp, _gl) = lse.device_ptr(stream);
        let (dqp, _gdq) = dq.data.device_ptr_mut(stream);
        let (dkp, _gdk) = dk.data.device_ptr_mut(stream);
        let (dvp, _gdv) = dv.data.device_ptr_mut(stream);
        let raw = RawBackward {
            dtype: T::DTYPE,
            q: qp,
            k: kp,
            v: vp,
            o: op,
            dout: dop,
            lse: lp,
            dq: dqp,
            dk: dkp,
            dv: dvp,
            workspace: ws.ptr,
            workspace_bytes: ws.bytes,
            q_layout: q.layout,
            k_layout: k.layout,
            v_layout: v.layout,
            o_layout: o.layout,
            dout_layout: dout.layout,
            dq_layout: dq.layout,
            dk_layout: dk.layout,
            dv_layout: dv.layout,
            options: *options,
        };
        run(&raw)
    }

    /// The raw backward: device pointers and the caller's workspace; allocates nothing. Launches
    /// the pre-pass, the main kernel and the dQ conversion (or, deterministic, the dQ pass) on
    /// `stream`.
    ///
    /// Validates shapes, strides, alignment, aliasing, mask, scale and the workspace size (see
    /// [`RawBackward::validate`]) and returns a typed error before any launch.
    ///
    /// # Safety
    /// - `stream` is a stream of this value's context (or null for its legacy default stream).
    /// - Every pointer in `args` is device memory of that context that holds every element its
    ///   layout addresses (`lse`: `batch * heads_q * seqlen_q` f32 values; `workspace`:
    ///   `workspace_bytes` bytes), and stays allocated until the kernels have finished.
    /// - `lse` is the forward's log-sum-exp of these q, k, mask and scale (a row's P is
    ///   recomputed as `exp(s - lse)`: another LSE gives other gradients, not an error).
    /// - Nothing else writes the inputs, or reads or writes the gradients or the workspace, until
    ///   the kernels have finished (order other streams with events).
    pub unsafe fn backward_raw(&self, stream: sys::CUstream, args: &RawBackward) -> Result<()> {
        let params = args.validate()?;
        // SAFETY: per this fn's contract; `params` came from `args.validate()`.
        unsafe { self.launch_backward(stream, args, params, None) }
    }
}
