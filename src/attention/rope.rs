//! The RoPE forward: causal attention with RoPE, ReRoPE or Leaky ReRoPE applied inside the
//! kernel to un-rotated Q and K. Its options, raw arguments and validation, and the safe and raw
//! entry points (the raw one runs the key-rotation pass into the caller's workspaces first).

use std::sync::Arc;

use cudarc::driver::{sys, CudaSlice, CudaStream, DevicePtr, LaunchConfig};

use super::{Attention, ForwardOptions, Input, Mainloop, Output, RawForward, SUPPORTED_HEAD_DIMS};
use crate::check::{byte_range, overlaps};
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::rope::{PositionMode, RopeLayout, RopeOptions};
use crate::sparse::DeviceBlockMask;

/// Options of a RoPE forward call (causal; see [`Attention::forward_rope`]).
#[derive(Clone, Copy)]
pub struct RopeForward<'a> {
    /// Rotary configuration, position mode, log-n scaling, position offsets, sliding window.
    pub rope: &'a RopeOptions,
    /// Restrict attention to the blocks of a block mask, whose element mask must be
    /// `rope.mask()` (causal, with the same window).
    pub block_mask: Option<&'a DeviceBlockMask>,
    /// Multiplies Q K^T before the softmax; `None` means `1 / sqrt(head_dim)`.
    pub softmax_scale: Option<f32>,
}

/// How scores use positions in the RoPE forward (see `cuda/include/longflash/params.h`, LfRope).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RawRopeMode {
    /// Plain rotary embedding.
    Rope,
    /// ReRoPE with window `w`: relative positions at or past `w` are capped at `w`.
    ReRope {
        /// Window (tokens), at least 1.
        window: u32,
    },
    /// Leaky ReRoPE: past the window, relative positions grow by `1 / leak` per token.
    LeakyReRope {
        /// Window (tokens), at least 1.
        window: u32,
        /// Leak `k > 1`.
        leak: f64,
    },
}

/// Arguments of the raw RoPE forward beyond [`RawForward`]: device tables and workspaces.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RawRope {
    /// `rotary_dim / 2` f64 angular frequencies (inverse frequencies, scaling applied).
    pub inv_freq: sys::CUdeviceptr,
    /// `batch` i32 position offsets, or 0 for none.
    pub position_offsets: sys::CUdeviceptr,
    /// Workspace for the rotated keys: `batch * seqlen_k * heads_kv * head_dim` elements.
    pub k_rot: sys::CUdeviceptr,
    /// Workspace for the outside-window keys (same size), or 0 for plain RoPE.
    pub k_alt: sys::CUdeviceptr,
    /// Rotated dimensions (even, at most head_dim).
    pub rotary_dim: usize,
    /// GPT-J interleaved pairs instead of LLaMA/NeoX half-split.
    pub interleaved: bool,
    /// Position mode.
    pub mode: RawRopeMode,
    /// YaRN's attention factor (1 otherwise): multiplies the rotated part of q and k.
    pub attention_factor: f32,
    /// Log-n query scaling's training length, or `None`.
    pub log_n_train_len: Option<usize>,
}

impl RawRope {
    /// Checks the RoPE arguments against the call and lowers them.
    pub fn validate(&self, fwd: &RawForward) -> Result<crate::sys::LfRope> {
        let d = fwd.q_layout.head_dim;
        // The RoPE forward has kernels of its own width only (no padded heads).
        if !SUPPORTED_HEAD_DIMS.contains(&d) {
            return Err(Error::UnsupportedHeadDim {
                arg: "q.head_dim",
                value: d,
                supported: SUPPORTED_HEAD_DIMS,
            });
        }
        let lowered = self.lower_rotation(d)?;
        for (arg, ptr, align, required) in [
            ("rope.k_rot", self.k_rot, 16, true),
            ("rope.k_alt", self.k_alt, 16, lowered.mode != 0),
        ] {
            if (required && ptr == 0) || ptr % align != 0 {
                return Err(Error::Misaligned {
                    arg,
                    value: ptr as i64,
                    multiple_of: align as u32,
                });
            }
        }
        // The workspaces are outputs of the key pass: they must not overlap anything.
        let k = &fwd.k_layout;
        let ws = Layout::bshd(k.batch, k.seqlen, k.heads, k.head_dim);
        let ranges = [
            ("q", fwd.q, &fwd.q_layout),
            ("k", fwd.k, &fwd.k_layout),
            ("v", fwd.v, &fwd.v_layout),
            ("o", fwd.o, &fwd.o_layout),
        ];
        for (name, ptr) in [("rope.k_rot", self.k_rot), ("rope.k_alt", self.k_alt)] {
            if ptr == 0 {
                continue;
            }
            let r = byte_range(ptr, &ws, 2);
            for (other, p, l) in ranges {
                if overlaps(r, byte_range(p, l, 2)) {
                    return Err(Error::Aliasing {
                        output: name,
                        other,
                    });
                }
            }
        }
        if self.k_alt != 0
            && overlaps(
                byte_range(self.k_rot, &ws, 2),
                byte_range(self.k_alt, &ws, 2),
            )
        {
            return Err(Error::Aliasing {
                output: "rope.k_alt",
                other: "rope.k_rot",
            });
        }
        Ok(crate::sys::LfRope {
            k_rot: self.k_rot as *const _,
            k_alt: if lowered.mode == 0 {
                std::ptr::null()
            } else {
                self.k_alt as *const _
            },
            ..lowered
        })
    }

    /// The checks and lowering of the rotation itself (rotary dim against `head_dim`, mode,
    /// window, leak, attention factor, log-n length, table pointers), without the key
    /// workspaces (left NULL): what the RoPE decoding kernel, which turns keys in shared
    /// memory, takes.
    pub(crate) fn lower_rotation(&self, d: usize) -> Result<crate::sys::LfRope> {
        if self.rotary_dim < 2 || self.rotary_dim % 2 != 0 || self.rotary_dim > d {
            return Err(Error::InvalidArgument {
                arg: "rope.rotary_dim",
                value: self.rotary_dim.to_string(),
                expected: format!("an even number in 2..={d} (the head dim)"),
            });
        }
        let (mode, window, inv_leak) = match self.mode {
            RawRopeMode::Rope => (0, 0, 1.0),
            RawRopeMode::ReRope { window } => (1, window, 1.0),
            RawRopeMode::LeakyReRope { window, leak } => {
                if !(leak.is_finite() && leak > 1.0) {
                    return Err(Error::InvalidArgument {
                        arg: "rope.leak",
                        value: leak.to_string(),
                        expected: "a finite number > 1".into(),
                    });
                }
                (2, window, 1.0 / leak)
            }
        };
        if mode != 0 && (window == 0 || window > i32::MAX as u32) {
            return Err(Error::InvalidArgument {
                arg: "rope.window",
                value: window.to_string(),
                expected: "1..=i32::MAX tokens".into(),
            });
        }
        if !(self.attention_factor.is_finite() && self.attention_factor > 0.0) {
            return Err(Error::InvalidArgument {
                arg: "rope.attention_factor",
                value: self.attention_factor.to_string(),
                expected: "a finite number > 0".into(),
            });
        }
        let log_n = match self.log_n_train_len {
            None => 0.0,
            Some(l) if l >= 2 => 1.0 / (l as f64).ln() as f32,
            Some(l) => {
                return Err(Error::InvalidArgument {
                    arg: "rope.log_n_train_len",
                    value: l.to_string(),
                    expected: "at least 2".into(),
                })
            }
        };
        for (arg, ptr, align, required) in [
            ("rope.inv_freq", self.inv_freq, 8, true),
            ("rope.position_offsets", self.position_offsets, 4, false),
        ] {
            if (required && ptr == 0) || ptr % align != 0 {
                return Err(Error::Misaligned {
                    arg,
                    value: ptr as i64,
                    multiple_of: align as u32,
                });
            }
        }
        Ok(crate::sys::LfRope {
            inv_freq: self.inv_freq as *const f64,
            position_offsets: self.position_offsets as *const i32,
            k_rot: std::ptr::null(),
            k_alt: std::ptr::null(),
            mode,
            rotary_dim: self.rotary_dim as i32,
            interleaved: self.interleaved as i32,
            window: window as i32,
            inv_leak,
            attention_factor: self.attention_factor,
            log_n_inv_ln_train: log_n,
        })
    }
}

/// A RoPE call's tables on the device: the inverse frequencies of `rope.config` at `seq_len`
/// (the current length: largest key position plus one) and the position offsets, copied on
/// `stream`.
pub(crate) struct RopeTables {
    inv_freq: CudaSlice<f64>,
    offsets: Option<CudaSlice<i32>>,
}

impl RopeTables {
    /// A safe RoPE call's checks (the shapes of q and k, the options for them) and its tables.
    pub(crate) fn for_call(
        stream: &Arc<CudaStream>,
        rope: &RopeOptions,
        ql: &Layout,
        kl: &Layout,
    ) -> Result<Self> {
        ql.check_dims("q")?;
        kl.check_dims("k")?;
        rope.validate(ql.head_dim, ql.batch, ql.seqlen, kl.seqlen)?;
        Self::upload(
            stream,
            rope,
            ql.head_dim,
            kl.seqlen + rope.max_offset() as usize,
        )
    }

    pub(crate) fn upload(
        stream: &Arc<CudaStream>,
        rope: &RopeOptions,
        head_dim: usize,
        seq_len: usize,
    ) -> Result<Self> {
        let offsets: Option<Vec<i32>> = rope
            .position_offsets
            .as_ref()
            .map(|o| o.iter().map(|&x| x as i32).collect());
        Self::with_offsets(stream, rope, head_dim, seq_len, offsets.as_deref())
    }

    /// Tables with the given position offsets instead of `rope`'s (a rotary ring's chunks: one
    /// offset per (batch entry, chunk)), or none: the inverse frequencies at `seq_len`, the
    /// current length (largest key position plus one).
    pub(crate) fn with_offsets(
        stream: &Arc<CudaStream>,
        rope: &RopeOptions,
        head_dim: usize,
        seq_len: usize,
        offsets: Option<&[i32]>,
    ) -> Result<Self> {
        let inv_freq = rope.config.inv_freq(head_dim, seq_len)?;
        let inv_freq = stream
            .clone_htod(&inv_freq)
            .map_err(Error::driver("copying RoPE tables to the device"))?;
        let offsets = offsets
            .map(|o| stream.clone_htod(o))
            .transpose()
            .map_err(Error::driver("copying RoPE position offsets"))?;
        Ok(RopeTables { inv_freq, offsets })
    }

    /// The raw rotation of `rope` over these tables, with the key workspaces `k_rot` and
    /// `k_alt` (0 for none), and the guards that order the tables' use on `stream`.
    pub(crate) fn raw<'a>(
        &'a self,
        stream: &'a Arc<CudaStream>,
        rope: &RopeOptions,
        (k_rot, k_alt): (sys::CUdeviceptr, sys::CUdeviceptr),
    ) -> (RawRope, impl Drop + 'a, Option<impl Drop + 'a>) {
        let (inv_freq, g1) = self.inv_freq.device_ptr(stream);
        let (position_offsets, g2) = match &self.offsets {
            Some(o) => {
                let (p, g) = o.device_ptr(stream);
                (p, Some(g))
            }
            None => (0, None),
        };
        let raw = RawRope {
            inv_freq,
            position_offsets,
            k_rot,
            k_alt,
            rotary_dim: rope.config.rotary_dim,
            interleaved: rope.config.layout == RopeLayout::Interleaved,
            mode: match rope.mode {
                PositionMode::Rope => RawRopeMode::Rope,
                PositionMode::ReRope { window } => RawRopeMode::ReRope { window },
                PositionMode::LeakyReRope { window, leak } => {
                    RawRopeMode::LeakyReRope { window, leak }
                }
            },
            attention_factor: rope.config.attention_factor() as f32,
            log_n_train_len: rope.log_n_train_len,
        };
        (raw, g1, g2)
    }
}

/// The rotated-key workspaces of a safe RoPE call over keys laid out as `kl`: k_rot, and k_alt
/// unless plain RoPE, contiguous `[batch, seqlen_k, heads_kv, head_dim]`, allocated on `stream`.
pub(crate) fn key_workspaces<T: Element>(
    stream: &Arc<CudaStream>,
    rope: &RopeOptions,
    kl: &Layout,
) -> Result<(CudaSlice<T>, Option<CudaSlice<T>>)> {
    let ws_len = kl.batch * kl.seqlen * kl.heads * kl.head_dim;
    let alloc_err = || Error::driver("allocating the rotated-key workspace");
    let k_rot: CudaSlice<T> = stream.alloc_zeros(ws_len).map_err(alloc_err())?;
    let k_alt = match rope.mode {
        PositionMode::Rope => None,
        _ => Some(stream.alloc_zeros(ws_len).map_err(alloc_err())?),
    };
    Ok((k_rot, k_alt))
}

impl Attention {
    /// Causal forward with rotary positions applied inside the kernel: Q and K arrive
    /// UN-rotated, and the scores follow `opts.rope.mode`: RoPE, ReRoPE or Leaky ReRoPE (see
    /// [`crate::rope`]), with the scaling of `opts.rope.config` and optional log-n query
    /// scaling and per-sequence position offsets. The keys are rotated once into a workspace
    /// (one or two K-sized buffers, allocated here); the queries are rotated in the kernel.
    pub fn forward_rope<T: Element>(
        &self,
        stream: &Arc<CudaStream>,
        q: Input<'_, '_, T>,
        k: Input<'_, '_, T>,
        v: Input<'_, '_, T>,
        out: Output<'_, '_, T>,
        opts: &RopeForward<'_>,
    ) -> Result<()> {
        let rope = opts.rope;
        let (ql, kl) = (q.layout, k.layout);
        let tables = RopeTables::for_call(stream, rope, &ql, &kl)?;
        let (k_rot, k_alt) = key_workspaces::<T>(stream, rope, &kl)?;
        let (rp, _g3) = k_rot.device_ptr(stream);
        let (ap, _g4) = match &k_alt {
            Some(a) => {
                let (p, g) = a.device_ptr(stream);
                (p, Some(g))
            }
            None => (0, None),
        };
        let (raw_rope, _g1, _g2) = tables.raw(stream, rope, (rp, ap));
        let options = ForwardOptions {
            mask: rope.mask(),
            softmax_scale: opts.softmax_scale,
        };
        if let Some(bm) = opts.block_mask {
            let m = bm.host();
            m.check_for(ql.batch, ql.heads, ql.seqlen, kl.seqlen)?;
            if m.element_mask() != rope.mask() {
                return Err(Error::InvalidMask {
                    arg: "block_mask.element_mask",
                    value: format!("{:?}", m.element_mask()),
                    expected:
                        "the RoPE call's mask: causal, with rope.window_left as its left window",
                });
            }
            self.same_context_mask(bm)?;
        }
        self.forward_impl(
            stream,
            [q, k, v],
            out,
            options,
            opts.block_mask.map(|m| m.csr()),
            |raw| {
                // SAFETY: as in forward (block mask included); the tables and workspaces were allocated above in this
                // context with the sizes the contract asks for, and live until the call returns
                // (the driver orders their frees after the kernels on this stream).
                unsafe { self.forward_rope_raw(stream.cu_stream(), raw, &raw_rope) }
            },
        )
    }

    /// The mainloop a RoPE forward call with these arguments runs (validating them first); see
    /// [`Attention::mainloop_for`].
    pub fn rope_mainloop_for(&self, fwd: &RawForward, rope: &RawRope) -> Result<Mainloop> {
        let base = fwd.validate()?;
        let lf_rope = rope.validate(fwd)?;
        Ok(match self.rope_sm90_plan(fwd, base, lf_rope, rope)? {
            Some(_) => Mainloop::Sm90,
            None => Mainloop::Sm80,
        })
    }

    /// Causal forward with rotary positions applied inside (RoPE, ReRoPE, Leaky ReRoPE) from
    /// raw pointers: Q and K arrive un-rotated. Runs the key-rotation pass into the caller's
    /// workspaces, then the attention kernel, both on `stream`; allocates nothing.
    ///
    /// `fwd.options.mask` must be causal (a left window may be added); with `fwd.block_mask`
    /// only the listed blocks are computed.
    ///
    /// Runs on the Hopper mainloop under [`MainloopChoice::Sm90`](super::MainloopChoice) (head
    /// dims 64 and 128), as [`Attention::rope_mainloop_for`] says.
    ///
    /// # Safety
    /// As [`forward_raw`](Self::forward_raw), and: `rope.inv_freq` holds `rotary_dim / 2` f64,
    /// `rope.position_offsets` (when not 0) holds `batch` i32 such that every position plus the
    /// window fits in i32, and the workspaces hold `batch * seqlen_k * heads_kv * head_dim`
    /// elements each and are not used by anything else until the kernels finish.
    pub unsafe fn forward_rope_raw(
        &self,
        stream: sys::CUstream,
        fwd: &RawForward,
        rope: &RawRope,
    ) -> Result<()> {
        if !fwd.options.mask.causal {
            return Err(Error::InvalidMask {
                arg: "mask.causal",
                value: "false".into(),
                expected: "true: the RoPE forward is causal (ReRoPE's relative positions are non-negative)",
            });
        }
        let base = fwd.validate()?;
        let lf_rope = rope.validate(fwd)?;
        let d = fwd.q_layout.head_dim;
        // Two Q tiles: the rotated query and its outside-window variant.
        let tiles = self.sm80_tiles(d, 2, "RoPE kernel")?;
        let dt = fwd.dtype.name();
        let (mut keys, pairs) = rope_keys_params(fwd, lf_rope)?;
        // The Hopper kernel, when this value's choice asks for it (checked before any launch).
        let mut hopper = self.rope_sm90_plan(fwd, base, lf_rope, rope)?;
        let mut params = crate::sys::LfRopeFwdParams {
            fwd: base,
            rope: lf_rope,
        };
        // SAFETY: validated parameters; the workspaces are disjoint from every input and each
        // other (validated) and sized per the contract.
        unsafe { self.launch_rope_keys(stream, &format!("rope_keys_{dt}"), pairs, &mut keys) }?;
        if let Some(plan) = hopper.as_mut() {
            // SAFETY: this fn's contract; the plan was made from the validated arguments and the
            // key pass above wrote its workspaces on the same stream.
            return unsafe { self.launch_plan(stream, fwd, plan) };
        }
        let module = if fwd.block_mask.is_some() {
            format!("rope_sparse_{dt}_d{d}")
        } else {
            format!("rope_{dt}_d{d}")
        };
        let l = &fwd.q_layout;
        // SAFETY: as forward_raw, with the rotated-key workspaces written by the launch above on
        // the same stream.
        unsafe {
            self.launch_sm80(
                stream,
                &module,
                tiles,
                (l.seqlen, l.heads, l.batch),
                &mut params,
                "launching the RoPE forward kernel",
            )
        }
    }
}

/// The key pass's parameters for the keys of `fwd` as its layout gives them (a packed batch is
/// one entry of `total_k` rows) with the rotation `lf_rope`, and the element pairs it covers (one
/// thread each), checked against the launch's grid.
pub(super) fn rope_keys_params(
    fwd: &RawForward,
    lf_rope: crate::sys::LfRope,
) -> Result<(crate::sys::LfRopeKeysParams, u64)> {
    let k = &fwd.k_layout;
    let d = k.head_dim;
    let pairs = (k.batch * k.seqlen * k.heads * d / 2) as u64;
    if pairs.div_ceil(256) > i32::MAX as u64 {
        return Err(Error::InvalidArgument {
            arg: "k",
            value: format!("{pairs} element pairs"),
            expected: "at most 256 * i32::MAX (the launch's grid)".into(),
        });
    }
    let params = crate::sys::LfRopeKeysParams {
        k: fwd.k as *const _,
        k_batch_stride: k.batch_stride,
        k_head_stride: k.head_stride,
        k_row_stride: k.seq_stride,
        batch: k.batch as i32,
        seqlen_k: k.seqlen as i32,
        heads_kv: k.heads as i32,
        head_dim: d as i32,
        rope: lf_rope,
    };
    Ok((params, pairs))
}

impl Attention {
    /// Launches the key-rotation kernel `lf_{module}` with one thread per element pair.
    ///
    /// # Safety
    /// As [`Attention::launch`]: `params` is the kernel's parameter struct (LfRopeKeysParams or
    /// one that starts with it) made from validated arguments covering `pairs` pairs, whose
    /// workspaces and stream are valid for the launch.
    pub(super) unsafe fn launch_rope_keys<P>(
        &self,
        stream: sys::CUstream,
        module: &str,
        pairs: u64,
        params: &mut P,
    ) -> Result<()> {
        let kernel = format!("lf_{module}");
        // SAFETY: this fn's contract.
        unsafe {
            self.launch_per_pair(
                stream,
                (module, &kernel),
                pairs,
                params,
                "launching the key-rotation kernel",
            )
        }
    }

    /// Launches `kernel` of `module` with one thread per element pair, in blocks of 256.
    ///
    /// # Safety
    /// As [`Attention::launch`]: `params` is the kernel's parameter struct, made from validated
    /// arguments covering `pairs` pairs, whose buffers and stream are valid for the launch.
    pub(super) unsafe fn launch_per_pair<P>(
        &self,
        stream: sys::CUstream,
        (module, kernel): (&str, &str),
        pairs: u64,
        params: &mut P,
        what: &'static str,
    ) -> Result<()> {
        // SAFETY: the context is kept alive by `_owner` or by the caller of from_raw_context.
        let kernel = unsafe { self.cache.kernel(module, kernel, 0) }?;
        // SAFETY: this fn's contract; one thread per pair, covered once.
        unsafe {
            self.launch(
                &kernel,
                LaunchConfig {
                    grid_dim: (pairs.div_ceil(256) as u32, 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                },
                stream,
                params,
                what,
            )
        }
    }
}
