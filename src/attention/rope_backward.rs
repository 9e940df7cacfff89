//! The backward of the RoPE forward: dQ, dK and dV of [`Attention::forward_rope`] (RoPE, ReRoPE
//! and Leaky ReRoPE applied inside the kernel) with respect to its **un-rotated** Q and K. Its
//! options, workspace, and the safe and raw entry points.
//!
//! Given the forward's log-sum-exp, each score's gradient depends on its own (query, key) pair
//! only, so the forward's score set splits at the window (`crate::rope`): the pairs inside it
//! (`p_i - p_j < w`) are plain attention over the inside-rotated inputs `(m_i A_{p_i} q, A_{p_j}
//! k)`, and the pairs outside it are plain attention over the outside-rotated ones, which is the
//! causal mask, aligned bottom-right, over the first `seqlen_k - w` keys. A call runs on the
//! stream:
//!
//! 1. the forward's key pass (`k_rot`, `k_alt`) and a query pass that writes the two rotated
//!    queries as the forward's kernels compute them (`cuda/rope_bwd.cuh`);
//! 2. the exact backward ([`Attention::backward_raw`]'s kernels) over the inside pairs, into the
//!    caller's dq, dk and dv, and (ReRoPE and Leaky ReRoPE) over the outside pairs, into the
//!    workspace;
//! 3. a gradient pass that turns each half's dQ and dK back through its transposed rotation (and
//!    the log-n factor), adds the halves in f32 and rounds once; dV is the halves' sum.
//!
//! `tests/cpu_rope_backward_split.rs` checks the split on the f64 references, and that its
//! roundings (each half's gradients in the element type) stay inside the backward's
//! correctness rule against the naive two-matrix backward
//! ([`crate::reference::rope_attention_backward_lowp`]).

use std::sync::Arc;

use cudarc::driver::{sys, CudaStream, DevicePtr};

use super::backward::{backward_workspace_bytes, BackwardInputs, BackwardOptions, Gradients};
use super::rope::{key_workspaces, rope_keys_params, RopeTables};
use super::{Attention, ForwardOptions, RawBackward, RawForward, RawRope, RawRopeMode};
use crate::check::{byte_range, overlaps};
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::mask::MaskSpec;
use crate::rope::{PositionMode, RopeOptions};
use crate::sys::{LfRope, LfRopeGradsParams, LfRopeQueriesParams};

/// Options of a RoPE backward call: the forward's rotary options (mode, scaling, log-n, position
/// offsets, window) and scale, and whether dQ must come out the same on every run.
#[derive(Clone, Copy)]
pub struct RopeBackward<'a> {
    /// The forward's rotary configuration, position mode, log-n scaling, offsets and window.
    pub rope: &'a RopeOptions,
    /// The forward's softmax scale; `None` means `1 / sqrt(head_dim)`.
    pub softmax_scale: Option<f32>,
    /// dQ without atomics (see [`BackwardOptions::deterministic`]).
    pub deterministic: bool,
}

/// Where the parts of a RoPE backward's workspace start (bytes from its base): the exact
/// backward's workspace, the rotated queries of each side, and the outside half's gradients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RopeWorkspace {
    q_in: usize,
    /// q_out, dq_out, dk_out and dv_out (ReRoPE and Leaky ReRoPE only).
    outside: Option<[usize; 4]>,
    bytes: usize,
}

fn rope_workspace(
    q: &Layout,
    k: &Layout,
    two_sided: bool,
    deterministic: bool,
) -> Result<RopeWorkspace> {
    k.check_dims("k")?;
    let too_big = || Error::InvalidArgument {
        arg: "q",
        value: format!("{q:?}"),
        expected: "a RoPE backward workspace whose size fits in usize".into(),
    };
    let elems = |l: &Layout| -> Result<usize> {
        [l.seqlen, l.heads, l.head_dim]
            .iter()
            .try_fold(l.batch, |a, &b| a.checked_mul(b))
            .and_then(|n| n.checked_mul(2))
            .ok_or_else(too_big)
    };
    let (nq, nk) = (elems(q)?, elems(k)?);
    let mut at = backward_workspace_bytes(q, deterministic)?;
    let mut part = |bytes: usize| -> Result<usize> {
        let start = at.checked_next_multiple_of(256).ok_or_else(too_big)?;
        at = start.checked_add(bytes).ok_or_else(too_big)?;
        Ok(start)
    };
    let q_in = part(nq)?;
    let outside = if two_sided {
        Some([part(nq)?, part(nq)?, part(nk)?, part(nk)?])
    } else {
        None
    };
    Ok(RopeWorkspace {
        q_in,
        outside,
        bytes: at,
    })
}

/// Bytes of device workspace a RoPE backward call needs (the raw API's
/// `RawBackward::workspace_bytes`; the safe API allocates it itself): the exact backward's
/// ([`backward_workspace_bytes`]), plus the rotated queries (`2 * batch * seqlen_q * heads_q *
/// head_dim` bytes), plus, for ReRoPE and Leaky ReRoPE, the outside queries and the outside
/// half's dq, dk and dv (twice the query size and twice the key size), each part 256-byte
/// aligned.
///
/// # Errors
///
/// [`Error::ZeroSized`] for a zero dimension, [`Error::InvalidArgument`] when the size does not
/// fit in `usize`.
pub fn rope_backward_workspace_bytes(
    q: &Layout,
    k: &Layout,
    mode: RawRopeMode,
    deterministic: bool,
) -> Result<usize> {
    let two_sided = mode != RawRopeMode::Rope;
    Ok(rope_workspace(q, k, two_sided, deterministic)?.bytes)
}

/// The raw mode of a position mode.
fn raw_mode(mode: PositionMode) -> RawRopeMode {
    match mode {
        PositionMode::Rope => RawRopeMode::Rope,
        PositionMode::ReRope { window } => RawRopeMode::ReRope { window },
        PositionMode::LeakyReRope { window, leak } => RawRopeMode::LeakyReRope { window, leak },
    }
}

/// The two exact backwards a RoPE backward runs (the outside one `None` when no pair lies
/// outside the window), their validated parameters, and the passes around them.
struct RopePlan {
    lf_rope: LfRope,
    inside: (RawBackward, crate::sys::LfBwdParams),
    outside: Option<(RawBackward, crate::sys::LfBwdParams)>,
    queries: LfRopeQueriesParams,
    q_grads: LfRopeGradsParams,
    k_grads: LfRopeGradsParams,
}

impl Attention {
    /// The backward of [`Attention::forward_rope`]: dQ, dK and dV with respect to the
    /// **un-rotated** q and k (and v), for the upstream gradient `dout`, given the forward's
    /// output and log-sum-exp. Causal, with `opts.rope.window_left` as the forward's left window;
    /// RoPE, ReRoPE and Leaky ReRoPE with every scaling, log-n scaling and position offsets. Head
    /// dims 64, 128 and 256, f16 and bf16, GQA/MQA, any strides that meet the 16-byte rule.
    /// Allocates the key workspaces, the tables and the workspace on `stream`.
    pub fn backward_rope<T: Element>(
        &self,
        stream: &Arc<CudaStream>,
        inputs: BackwardInputs<'_, '_, T>,
        grads: Gradients<'_, '_, T>,
        opts: &RopeBackward<'_>,
    ) -> Result<()> {
        let rope = opts.rope;
        let (ql, kl) = (inputs.q.layout, inputs.k.layout);
        let tables = RopeTables::for_call(stream, rope, &ql, &kl)?;
        let mode = raw_mode(rope.mode);
        let options = BackwardOptions {
            mask: rope.mask(),
            softmax_scale: opts.softmax_scale,
            deterministic: opts.deterministic,
        };
        let ws_bytes = rope_backward_workspace_bytes(&ql, &kl, mode, opts.deterministic)?;
        let (k_rot, k_alt) = key_workspaces::<T>(stream, rope, &kl)?;
        let (rp, _g1) = k_rot.device_ptr(stream);
        let (ap, _g2) = match &k_alt {
            Some(a) => {
                let (p, g) = a.device_ptr(stream);
                (p, Some(g))
            }
            None => (0, None),
        };
        let (raw_rope, _g3, _g4) = tables.raw(stream, rope, (rp, ap));
        self.backward_impl(stream, inputs, grads, &options, ws_bytes, |raw| {
            // SAFETY: as in backward (every view checked against its layout and context, the
            // workspace a fresh allocation of the size the call needs); the tables and key
            // workspaces were allocated above in this context with the sizes the contract asks
            // for and live until the call returns (freed in stream order after the kernels).
            unsafe { self.backward_rope_raw(stream.cu_stream(), raw, &raw_rope) }
        })
    }

    /// The raw RoPE backward: device pointers and the caller's workspaces; allocates nothing.
    /// `args` is as for [`Attention::backward_raw`] with the **un-rotated** q and k, the mask
    /// causal (a left window may be added; the RoPE forward's mask) and
    /// `args.workspace_bytes` at least [`rope_backward_workspace_bytes`]; `rope` is as for
    /// [`Attention::forward_rope_raw`] (the key pass writes its `k_rot` and `k_alt`).
    ///
    /// Validates everything [`RawBackward::validate`] and [`RawRope::validate`] check, and that
    /// the key workspaces overlap no gradient, `dout` or the workspace, before any launch.
    ///
    /// # Safety
    /// As [`backward_raw`](Self::backward_raw) and [`forward_rope_raw`](Self::forward_rope_raw):
    /// `lse` is the forward's log-sum-exp of this RoPE call, and the key workspaces are used by
    /// nothing else until the kernels finish.
    pub unsafe fn backward_rope_raw(
        &self,
        stream: sys::CUstream,
        args: &RawBackward,
        rope: &RawRope,
    ) -> Result<()> {
        let plan = rope_plan(args, rope)?;
        // What the exact backward's launch would refuse (a head dim whose kernels need more
        // shared memory than this device gives) before any of this call's kernels runs.
        self.backward_fits(&plan.inside.0, false)?;
        let dt = args.dtype.name();
        let fwd = forward_view(args);
        let (mut keys, pairs) = rope_keys_params(&fwd, plan.lf_rope)?;
        let RopePlan {
            inside,
            outside,
            mut queries,
            mut q_grads,
            mut k_grads,
            ..
        } = plan;
        // SAFETY: validated parameters; the key workspaces are disjoint from every input, output
        // and each other (validated) and sized per the contract.
        unsafe { self.launch_rope_keys(stream, &format!("rope_keys_{dt}"), pairs, &mut keys) }?;
        let module = format!("rope_bwd_{dt}");
        let q = &args.q_layout;
        let q_pairs = (q.batch * q.seqlen * q.heads * q.head_dim / 2) as u64;
        // SAFETY: as above; q_in and q_out are disjoint parts of the validated workspace.
        unsafe { self.launch_rope_queries(stream, dt, &mut queries) }?;
        // SAFETY: the inner calls were validated (their inputs are the rotated queries and keys
        // written above on the same stream, their outputs the caller's gradients and disjoint
        // parts of the workspace); the exact backward's part of the workspace is reused by the
        // second call only after the first one's kernels, in stream order.
        unsafe { self.launch_backward(stream, &inside.0, inside.1, None) }?;
        if let Some((raw, params)) = outside {
            // SAFETY: as above.
            unsafe { self.launch_backward(stream, &raw, params, None) }?;
        }
        // SAFETY: the gradient passes read and write the validated gradients and workspace
        // parts the backwards above wrote on this stream; one thread per pair, covered once.
        unsafe { self.launch_rope_pass(stream, &module, "grads", q_pairs, &mut q_grads) }?;
        let k = &args.k_layout;
        let k_pairs = (k.batch * k.seqlen * k.heads * k.head_dim / 2) as u64;
        // SAFETY: as above.
        unsafe { self.launch_rope_pass(stream, &module, "grads", k_pairs, &mut k_grads) }
    }

    /// Launches the query pass (`params` from [`rope_queries_params`]) for element type `dt`.
    ///
    /// # Safety
    /// As [`Attention::launch`]: `params` was made from validated arguments whose buffers and
    /// stream are valid for the launch (the rotated queries hold every pair of `params`).
    pub(super) unsafe fn launch_rope_queries(
        &self,
        stream: sys::CUstream,
        dt: &str,
        params: &mut LfRopeQueriesParams,
    ) -> Result<()> {
        let pairs = params.batch as u64
            * params.seqlen_q as u64
            * params.heads_q as u64
            * params.head_dim as u64
            / 2;
        if pairs.div_ceil(256) > i32::MAX as u64 {
            return Err(Error::InvalidArgument {
                arg: "q",
                value: format!("{pairs} element pairs"),
                expected: "at most 256 * i32::MAX (the launch's grid)".into(),
            });
        }
        // SAFETY: this fn's contract; one thread per pair.
        unsafe {
            self.launch_rope_pass(stream, &format!("rope_bwd_{dt}"), "queries", pairs, params)
        }
    }

    /// Launches `lf_{module}_{name}` with one thread per element pair.
    ///
    /// # Safety
    /// As [`Attention::launch`]: `params` is the kernel's parameter struct, made from validated
    /// arguments covering `pairs` pairs, whose buffers and stream are valid for the launch.
    unsafe fn launch_rope_pass<P>(
        &self,
        stream: sys::CUstream,
        module: &str,
        name: &str,
        pairs: u64,
        params: &mut P,
    ) -> Result<()> {
        let kernel = format!("lf_{module}_{name}");
        // SAFETY: this fn's contract.
        unsafe {
            self.launch_per_pair(
                stream,
                (module, &kernel),
                pairs,
                params,
                "launching a RoPE backward pass",
            )
        }
    }
}

/// The query pass's parameters: the queries at `q` (`ql` their layout) rotated as the forward's
/// Q preparation rotates them into `q_in` (and, unless 0, the outside-window variant into
/// `q_out`), contiguous `[batch, seqlen_q, heads_q, head_dim]`; query `i` of sequence `b` at
/// position `len_b - seqlen_q + i`, `len_b` read from `seqlens_k` (a device `[batch]` i32
/// array, clamped into `[0, seqlen_k]`) or `seqlen_k` when it is 0.
pub(super) fn rope_queries_params(
    (q, ql): (u64, &Layout),
    (q_in, q_out): (u64, u64),
    seqlens_k: u64,
    seqlen_k: usize,
    rope: LfRope,
) -> LfRopeQueriesParams {
    LfRopeQueriesParams {
        q: q as *const _,
        q_batch_stride: ql.batch_stride,
        q_head_stride: ql.head_stride,
        q_row_stride: ql.seq_stride,
        q_in: q_in as *mut _,
        q_out: q_out as *mut _,
        seqlens_k: seqlens_k as *const i32,
        batch: ql.batch as i32,
        seqlen_q: ql.seqlen as i32,
        seqlen_k: seqlen_k as i32,
        heads_q: ql.heads as i32,
        head_dim: ql.head_dim as i32,
        reserved: 0,
        rope,
    }
}

/// Validates a RoPE backward call and lowers it to its two exact backwards and its passes.
fn rope_plan(args: &RawBackward, rope: &RawRope) -> Result<RopePlan> {
    let mask = args.options.mask;
    if !mask.causal || mask.sink_tokens != 0 || mask.window_right.is_some_and(|w| w != 0) {
        return Err(Error::InvalidMask {
            arg: "mask",
            value: format!("{mask:?}"),
            expected: "causal, optionally with a left window: the RoPE forward's mask",
        });
    }
    // The whole call as the exact backward sees it (shapes, strides, alignment, aliasing,
    // scale, workspace size at least the exact backward's), and the rotation as the forward
    // sees it (its key workspaces against q, k, v and o).
    args.validate()?;
    let fwd = forward_view(args);
    let lf_rope = rope.validate(&fwd)?;
    if (args.q_layout.batch * args.q_layout.seqlen * args.q_layout.heads) as u64
        * (args.q_layout.head_dim as u64 / 2)
        > 256 * i32::MAX as u64
    {
        return Err(Error::InvalidArgument {
            arg: "q",
            value: format!("{:?}", args.q_layout),
            expected: "at most 256 * i32::MAX element pairs (the passes' grid)".into(),
        });
    }
    let (q, k) = (&args.q_layout, &args.k_layout);
    let two_sided = rope.mode != RawRopeMode::Rope;
    let ws = rope_workspace(q, k, two_sided, args.options.deterministic)?;
    if args.workspace_bytes < ws.bytes {
        return Err(Error::InvalidArgument {
            arg: "workspace_bytes",
            value: args.workspace_bytes.to_string(),
            expected: format!(
                "at least {} bytes (rope_backward_workspace_bytes)",
                ws.bytes
            ),
        });
    }
    // The workspace (all of it: validate() checked the exact backward's part only) and the key
    // workspaces are written: nothing else the call writes or reads may overlap them.
    let ws_range = (
        args.workspace as i128,
        args.workspace as i128 + ws.bytes as i128,
    );
    let lse_range = (
        args.lse as i128,
        args.lse as i128 + (q.batch * q.heads * q.seqlen) as i128 * 4,
    );
    for (other, range) in [
        ("q", byte_range(args.q, q, 2)),
        ("k", byte_range(args.k, k, 2)),
        ("v", byte_range(args.v, &args.v_layout, 2)),
        ("o", byte_range(args.o, &args.o_layout, 2)),
        ("dout", byte_range(args.dout, &args.dout_layout, 2)),
        ("lse", lse_range),
        ("dq", byte_range(args.dq, &args.dq_layout, 2)),
        ("dk", byte_range(args.dk, &args.dk_layout, 2)),
        ("dv", byte_range(args.dv, &args.dv_layout, 2)),
    ] {
        if overlaps(ws_range, range) {
            return Err(Error::Aliasing {
                output: "workspace",
                other,
            });
        }
    }
    let kws = Layout::bshd(k.batch, k.seqlen, k.heads, k.head_dim);
    let written = [
        ("dout", byte_range(args.dout, &args.dout_layout, 2)),
        ("dq", byte_range(args.dq, &args.dq_layout, 2)),
        ("dk", byte_range(args.dk, &args.dk_layout, 2)),
        ("dv", byte_range(args.dv, &args.dv_layout, 2)),
        ("workspace", ws_range),
        ("lse", lse_range),
    ];
    for (name, ptr) in [("rope.k_rot", rope.k_rot), ("rope.k_alt", rope.k_alt)] {
        if ptr == 0 || (name == "rope.k_alt" && !two_sided) {
            continue;
        }
        let r = byte_range(ptr, &kws, 2);
        for (other, range) in written {
            if overlaps(r, range) {
                return Err(Error::Aliasing {
                    output: name,
                    other,
                });
            }
        }
    }

    let at = |offset: usize| args.workspace + offset as u64;
    let qws = Layout::bshd(q.batch, q.seqlen, q.heads, q.head_dim);
    let window = match rope.mode {
        RawRopeMode::Rope => None,
        RawRopeMode::ReRope { window } | RawRopeMode::LeakyReRope { window, .. } => Some(window),
    };
    let inside_mask = match (window, mask.window_left) {
        (None, _) => mask,
        (Some(w), wl) => MaskSpec::causal_window(wl.map_or(w - 1, |wl| wl.min(w - 1))),
    };
    let inside = RawBackward {
        q: at(ws.q_in),
        q_layout: qws,
        k: rope.k_rot,
        k_layout: kws,
        options: BackwardOptions {
            mask: inside_mask,
            ..args.options
        },
        ..*args
    };
    let inside_params = inside.validate()?;
    // The outside pairs: j <= p_i - w, the causal mask over the first seqlen_k - w keys
    // (with the forward's left window wl, keys down to p_i - wl: a left window of wl - w).
    let outside = match (window, ws.outside) {
        (Some(w), Some([q_out, dq_out, dk_out, dv_out]))
            if (w as usize) < k.seqlen && mask.window_left.is_none_or(|wl| wl >= w) =>
        {
            let kept = k.seqlen - w as usize;
            let truncated = |l: &Layout| Layout { seqlen: kept, ..*l };
            let raw = RawBackward {
                q: at(q_out),
                q_layout: qws,
                k: rope.k_alt,
                k_layout: truncated(&kws),
                v_layout: truncated(&args.v_layout),
                dq: at(dq_out),
                dq_layout: qws,
                dk: at(dk_out),
                dk_layout: Layout::bshd(k.batch, kept, k.heads, k.head_dim),
                dv: at(dv_out),
                dv_layout: Layout::bshd(k.batch, kept, k.heads, k.head_dim),
                options: BackwardOptions {
                    mask: match mask.window_left {
                        Some(wl) => MaskSpec::causal_window(wl - w),
                        None => MaskSpec::causal(),
                    },
                    ..args.options
                },
                ..*args
            };
            let params = raw.validate()?;
            Some(((raw, params), [q_out, dq_out, dk_out, dv_out], kept))
        }
        _ => None,
    };

    let q_out = ws.outside.map_or(0, |o| at(o[0]));
    let queries = rope_queries_params((args.q, q), (at(ws.q_in), q_out), 0, k.seqlen, lf_rope);
    let grads = |ptr: u64, l: &Layout, rows: usize, queries: bool| LfRopeGradsParams {
        g: ptr as *mut _,
        g_batch_stride: l.batch_stride,
        g_head_stride: l.head_stride,
        g_row_stride: l.seq_stride,
        g_out: std::ptr::null(),
        dv: std::ptr::null_mut(),
        dv_out: std::ptr::null(),
        dv_batch_stride: 0,
        dv_head_stride: 0,
        dv_row_stride: 0,
        batch: l.batch as i32,
        rows: rows as i32,
        rows_out: 0,
        heads: l.heads as i32,
        head_dim: l.head_dim as i32,
        queries: queries as i32,
        seqlen_q: q.seqlen as i32,
        seqlen_k: k.seqlen as i32,
        rope: lf_rope,
    };
    let mut q_grads = grads(args.dq, &args.dq_layout, q.seqlen, true);
    let mut k_grads = grads(args.dk, &args.dk_layout, k.seqlen, false);
    if let Some((_, [_, dq_out, dk_out, dv_out], kept)) = &outside {
        q_grads.g_out = at(*dq_out) as *const _;
        q_grads.rows_out = q.seqlen as i32;
        k_grads.g_out = at(*dk_out) as *const _;
        k_grads.rows_out = *kept as i32;
        k_grads.dv = args.dv as *mut _;
        k_grads.dv_out = at(*dv_out) as *const _;
        k_grads.dv_batch_stride = args.dv_layout.batch_stride;
        k_grads.dv_head_stride = args.dv_layout.head_stride;
        k_grads.dv_row_stride = args.dv_layout.seq_stride;
    }
    Ok(RopePlan {
        lf_rope,
        inside: (inside, inside_params),
        outside: outside.map(|(call, _, _)| call),
        queries,
        q_grads,
        k_grads,
    })
}

impl RawBackward {
    /// Checks a RoPE backward call ([`Attention::backward_rope_raw`]) without launching
    /// anything: everything [`RawBackward::validate`] and [`RawRope::validate`] check for it, the
    /// mask (causal, optionally with a left window), the workspace size
    /// ([`rope_backward_workspace_bytes`]) and that the key workspaces overlap nothing the call
    /// writes or reads, and both halves' exact backwards.
    pub fn validate_rope(&self, rope: &RawRope) -> Result<()> {
        rope_plan(self, rope).map(|_| ())
    }
}

/// The forward call a backward's arguments describe (for the rotation's checks and the key
/// pass).
fn forward_view(args: &RawBackward) -> RawForward {
    RawForward {
        dtype: args.dtype,
        q: args.q,
        k: args.k,
        v: args.v,
        o: args.o,
        lse: args.lse,
        q_layout: args.q_layout,
        k_layout: args.k_layout,
        v_layout: args.v_layout,
        o_layout: args.o_layout,
        options: ForwardOptions {
            mask: args.options.mask,
            softmax_scale: args.options.softmax_scale,
        },
        block_mask: None,
    }
}
