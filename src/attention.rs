//! The forward attention entry points: a safe layer over cudarc views that validates everything,
//! and a raw layer over device pointers for engines with their own allocators.

use std::sync::Arc;

use cudarc::driver::{
    result, sys, CudaContext, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr,
    DevicePtrMut, DeviceSlice,
};

use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::loader::{CtxGuard, ModuleCache};
use crate::mask::MaskSpec;
use crate::plan::forward_tile_shape;
use crate::rope::{PositionMode, RopeLayout, RopeOptions};
use crate::sparse::DeviceBlockMask;
use crate::sys::{
    LfBlockSparse, LfFwdParams, LfMergeParams, LF_FWD_WARPS, LF_SPARSE_K_BLOCK, LF_SPARSE_Q_BLOCK,
};

/// Head dimensions that have a forward kernel.
pub const SUPPORTED_HEAD_DIMS: &[usize] = &[64, 128, 256];

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

/// A block-sparse layout in device memory, in the CSR form of [`crate::sparse::BlockMask`]:
/// `row_offsets` (i32, `batch * heads * ceil(seqlen_q / 128) + 1` entries), `col_indices` (i32)
/// and `full` (u8, one per listed block). `batch` and `heads` are 1 when the pattern is shared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawBlockMask {
    /// CSR row offsets.
    pub row_offsets: sys::CUdeviceptr,
    /// Key-block indices, sorted within each row.
    pub col_indices: sys::CUdeviceptr,
    /// Full (1) or partial (0) flag of each listed block.
    pub full: sys::CUdeviceptr,
    /// Batch entries with their own rows (1 or the call's batch).
    pub batch: usize,
    /// Heads with their own rows (1 or the call's query heads).
    pub heads: usize,
}

/// Byte range `[lo, hi)` a layout addresses from `ptr` (signed strides allowed).
fn byte_range(ptr: u64, l: &Layout, elem: u64) -> (i128, i128) {
    let mut lo: i128 = 0;
    let mut hi: i128 = l.head_dim as i128;
    for (n, s) in [
        (l.batch, l.batch_stride),
        (l.seqlen, l.seq_stride),
        (l.heads, l.head_stride),
    ] {
        let reach = (n as i128 - 1) * s as i128;
        if reach < 0 {
            lo += reach;
        } else {
            hi += reach;
        }
    }
    (
        ptr as i128 + lo * elem as i128,
        ptr as i128 + hi * elem as i128,
    )
}

fn overlaps(a: (i128, i128), b: (i128, i128)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

fn mismatch(arg: &'static str, value: usize, other: &'static str, expected: usize) -> Result<()> {
    if value == expected {
        Ok(())
    } else {
        Err(Error::ShapeMismatch {
            arg,
            value,
            other,
            expected,
        })
    }
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
        q.check_dims("q")?;
        k.check_dims("k")?;
        v.check_dims("v")?;
        o.check_dims("o")?;
        if !SUPPORTED_HEAD_DIMS.contains(&q.head_dim) {
            return Err(Error::UnsupportedHeadDim {
                arg: "q.head_dim",
                value: q.head_dim,
                supported: SUPPORTED_HEAD_DIMS,
            });
        }
        mismatch("k.head_dim", k.head_dim, "q.head_dim", q.head_dim)?;
        mismatch("v.head_dim", v.head_dim, "q.head_dim", q.head_dim)?;
        mismatch("o.head_dim", o.head_dim, "q.head_dim", q.head_dim)?;
        mismatch("k.batch", k.batch, "q.batch", q.batch)?;
        mismatch("v.batch", v.batch, "q.batch", q.batch)?;
        mismatch("o.batch", o.batch, "q.batch", q.batch)?;
        mismatch("v.seqlen", v.seqlen, "k.seqlen", k.seqlen)?;
        mismatch("o.seqlen", o.seqlen, "q.seqlen", q.seqlen)?;
        mismatch("v.heads", v.heads, "k.heads", k.heads)?;
        mismatch("o.heads", o.heads, "q.heads", q.heads)?;
        if q.heads % k.heads != 0 {
            return Err(Error::HeadsNotDivisible {
                heads_q: q.heads,
                heads_kv: k.heads,
            });
        }
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
            Some(bm) => {
                for (arg, value, call) in [
                    ("mask.batch", bm.batch, q.batch),
                    ("mask.heads", bm.heads, q.heads),
                ] {
                    if value != 1 && value != call {
                        return Err(Error::InvalidArgument {
                            arg,
                            value: value.to_string(),
                            expected: format!("1 (shared) or the call's {call}"),
                        });
                    }
                }
                for (arg, ptr, align) in [
                    ("mask.row_offsets", bm.row_offsets, 4),
                    ("mask.col_indices", bm.col_indices, 4),
                    ("mask.full", bm.full, 1),
                ] {
                    if ptr == 0 || ptr % align != 0 {
                        return Err(Error::Misaligned {
                            arg,
                            value: ptr as i64,
                            multiple_of: align as u32,
                        });
                    }
                }
                let nqb = q.seqlen.div_ceil(LF_SPARSE_Q_BLOCK as usize);
                let nkb = k.seqlen.div_ceil(LF_SPARSE_K_BLOCK as usize);
                LfBlockSparse {
                    row_offsets: bm.row_offsets as *const i32,
                    col_indices: bm.col_indices as *const i32,
                    full: bm.full as *const u8,
                    batch_stride: if bm.batch == 1 {
                        0
                    } else {
                        (bm.heads * nqb) as i64
                    },
                    head_stride: if bm.heads == 1 { 0 } else { nqb as i64 },
                    q_block: LF_SPARSE_Q_BLOCK as i32,
                    k_block: LF_SPARSE_K_BLOCK as i32,
                    num_q_blocks: nqb as i32,
                    num_k_blocks: nkb as i32,
                }
            }
        };

        // 16-byte accesses: every row start must be 16-byte aligned.
        for (arg, ptr) in [
            ("q.ptr", self.q),
            ("k.ptr", self.k),
            ("v.ptr", self.v),
            ("o.ptr", self.o),
        ] {
            if ptr % 16 != 0 {
                return Err(Error::Misaligned {
                    arg,
                    value: ptr as i64,
                    multiple_of: 16,
                });
            }
        }
        if self.lse % 4 != 0 {
            return Err(Error::Misaligned {
                arg: "lse.ptr",
                value: self.lse as i64,
                multiple_of: 4,
            });
        }
        for (name, l) in [("q", q), ("k", k), ("v", v), ("o", o)] {
            for (field, s) in [
                ("batch_stride", l.batch_stride),
                ("seq_stride", l.seq_stride),
                ("head_stride", l.head_stride),
            ] {
                if s % 8 != 0 {
                    return Err(Error::Misaligned {
                        arg: stride_name(name, field),
                        value: s,
                        multiple_of: 8,
                    });
                }
            }
        }
        if !o.is_non_overlapping() {
            return Err(Error::OverlappingOutput { arg: "o" });
        }
        let o_range = byte_range(self.o, o, 2);
        for (other, ptr, l) in [("q", self.q, q), ("k", self.k, k), ("v", self.v, v)] {
            if overlaps(o_range, byte_range(ptr, l, 2)) {
                return Err(Error::Aliasing { output: "o", other });
            }
        }
        if self.lse != 0 {
            let n = (q.batch * q.heads * q.seqlen) as i128 * 4;
            let lse_range = (self.lse as i128, self.lse as i128 + n);
            for (other, ptr, l) in [
                ("q", self.q, q),
                ("k", self.k, k),
                ("v", self.v, v),
                ("o", self.o, o),
            ] {
                if overlaps(lse_range, byte_range(ptr, l, 2)) {
                    return Err(Error::Aliasing {
                        output: "lse",
                        other,
                    });
                }
            }
        }

        let scale = self
            .options
            .softmax_scale
            .unwrap_or(1.0 / (q.head_dim as f32).sqrt());
        // The kernels keep the running row maximum of the unscaled scores, which is the maximum
        // of the scaled ones only for a positive scale.
        if !(scale.is_finite() && scale > 0.0) {
            return Err(Error::InvalidArgument {
                arg: "options.softmax_scale",
                value: format!("{scale}"),
                expected: "a finite number > 0".into(),
            });
        }
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

fn stride_name(tensor: &str, field: &str) -> &'static str {
    // A fixed table, so error labels stay `&'static str`.
    const NAMES: [[&str; 3]; 4] = [
        ["q.batch_stride", "q.seq_stride", "q.head_stride"],
        ["k.batch_stride", "k.seq_stride", "k.head_stride"],
        ["v.batch_stride", "v.seq_stride", "v.head_stride"],
        ["o.batch_stride", "o.seq_stride", "o.head_stride"],
    ];
    let t = ["q", "k", "v", "o"]
        .iter()
        .position(|x| *x == tensor)
        .unwrap_or(0);
    let f = ["batch_stride", "seq_stride", "head_stride"]
        .iter()
        .position(|x| *x == field)
        .unwrap_or(0);
    NAMES[t][f]
}

/// Checks that a CUDA driver can be loaded, then opens device `ordinal`. Unlike calling cudarc
/// directly, a machine without a driver gets [`Error::NoDriver`] instead of a panic.
pub fn open_device(ordinal: usize) -> Result<Arc<CudaContext>> {
    // SAFETY: only tries to dlopen the driver library; no driver call is made.
    if !unsafe { sys::is_culib_present() } {
        return Err(Error::NoDriver);
    }
    let count = CudaContext::device_count().map_err(Error::driver("counting devices"))?;
    if count <= 0 {
        return Err(Error::NoDevice);
    }
    if ordinal >= count as usize {
        return Err(Error::InvalidArgument {
            arg: "ordinal",
            value: ordinal.to_string(),
            expected: format!("a device index below {count}"),
        });
    }
    CudaContext::new(ordinal).map_err(Error::driver("creating the device context"))
}

// SAFETY: the raw context handle is only passed to the driver, which accepts it from any thread;
// the module cache is Send + Sync itself.
unsafe impl Send for Attention {}
// SAFETY: as above; `&self` methods only read the handle and use the cache's lock.
unsafe impl Sync for Attention {}

/// Attention kernels loaded into one CUDA context.
///
/// Modules load on first use of each kernel and stay loaded until this value is dropped, so
/// repeated calls cost one launch each. Create one per context and share it (`&self` methods,
/// `Send + Sync`).
pub struct Attention {
    cache: ModuleCache,
    ctx: sys::CUcontext,
    max_smem_optin: u32,
    // Keeps the context alive while modules are loaded in it (None for a raw context).
    _owner: Option<Arc<CudaContext>>,
}

impl Attention {
    /// Loads nothing yet; checks that the device is sm_80 or newer.
    pub fn new(ctx: &Arc<CudaContext>) -> Result<Self> {
        let (major, minor) = ctx
            .compute_capability()
            .map_err(Error::driver("reading the compute capability"))?;
        if major < 8 {
            return Err(Error::UnsupportedDevice {
                compute_capability: (major, minor),
            });
        }
        let smem = ctx
            .attribute(
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )
            .map_err(Error::driver("reading the shared-memory limit"))?;
        Ok(Attention {
            cache: ModuleCache::new(ctx.cu_ctx()),
            ctx: ctx.cu_ctx(),
            max_smem_optin: smem.max(0) as u32,
            _owner: Some(ctx.clone()),
        })
    }

    /// Attention kernels for a context the caller manages.
    ///
    /// # Safety
    /// `ctx` must be a live CUDA context on a device of compute capability 8.0 or newer, and must
    /// outlive the returned value (modules are unloaded from it on drop).
    pub unsafe fn from_raw_context(ctx: sys::CUcontext) -> Result<Self> {
        // SAFETY: the caller guarantees the context is live.
        let _g = unsafe { CtxGuard::bind(ctx) }?;
        let mut dev: sys::CUdevice = 0;
        // SAFETY: out-pointer to a local; a context is current.
        unsafe { sys::cuCtxGetDevice(&mut dev) }
            .result()
            .map_err(Error::driver("reading the context's device"))?;
        // SAFETY: `dev` came from the driver.
        let smem = unsafe {
            result::device::get_attribute(
                dev,
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )
        }
        .map_err(Error::driver("reading the shared-memory limit"))?;
        Ok(Attention {
            cache: ModuleCache::new(ctx),
            ctx,
            max_smem_optin: smem.max(0) as u32,
            _owner: None,
        })
    }

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

    /// Block-sparse forward on the caller's stream: as [`forward`](Self::forward), computing
    /// only the key blocks `sparse.mask` lists for each query block, with the mask's element
    /// mask (causal / window / sinks) applied inside its partial blocks. Rows with no block give
    /// 0 and LSE `-inf`. The LSE lets several sparse passes be merged exactly
    /// ([`merge`](Self::merge)).
    pub fn forward_sparse<T: Element>(
        &self,
        stream: &CudaStream,
        q: Input<'_, '_, T>,
        k: Input<'_, '_, T>,
        v: Input<'_, '_, T>,
        out: Output<'_, '_, T>,
        sparse: &SparseOptions<'_>,
    ) -> Result<()> {
        let m = sparse.mask.host();
        m.check_for(
            q.layout.batch,
            q.layout.heads,
            q.layout.seqlen,
            k.layout.seqlen,
        )?;
        for (arg, ctx) in [
            (
                "mask.row_offsets",
                sparse.mask.row_offsets.stream().context().cu_ctx(),
            ),
            (
                "mask.col_indices",
                sparse.mask.col_indices.stream().context().cu_ctx(),
            ),
            ("mask.full", sparse.mask.full.stream().context().cu_ctx()),
        ] {
            self.same_context(arg, ctx)?;
        }
        let options = ForwardOptions {
            mask: m.element_mask(),
            softmax_scale: sparse.softmax_scale,
        };
        self.forward_impl(stream, [q, k, v], out, options, Some(sparse.mask), |raw| {
            // SAFETY: as in forward; the block mask came from a validated BlockMask checked
            // against this call's shape, so its CSR indices stay in range and its flags match
            // its element mask.
            unsafe { self.forward_raw(stream.cu_stream(), raw) }
        })
    }

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
        ql.check_dims("q")?;
        kl.check_dims("k")?;
        rope.validate(ql.head_dim, ql.batch, ql.seqlen, kl.seqlen)?;
        let inv_freq = rope
            .config
            .inv_freq(ql.head_dim, kl.seqlen + rope.max_offset() as usize)?;
        let copy_err = Error::driver("copying RoPE tables to the device");
        let d_freq = stream.clone_htod(&inv_freq).map_err(copy_err)?;
        let d_offsets = match &rope.position_offsets {
            Some(o) => {
                let o: Vec<i32> = o.iter().map(|&x| x as i32).collect();
                Some(
                    stream
                        .clone_htod(&o)
                        .map_err(Error::driver("copying RoPE position offsets"))?,
                )
            }
            None => None,
        };
        let ws_len = kl.batch * kl.seqlen * kl.heads * kl.head_dim;
        let alloc_err = || Error::driver("allocating the rotated-key workspace");
        let k_rot: CudaSlice<T> = stream.alloc_zeros(ws_len).map_err(alloc_err())?;
        let k_alt: Option<CudaSlice<T>> = match rope.mode {
            PositionMode::Rope => None,
            _ => Some(stream.alloc_zeros(ws_len).map_err(alloc_err())?),
        };
        let (fp, _g1) = d_freq.device_ptr(stream);
        let (op, _g2) = match &d_offsets {
            Some(o) => {
                let (p, g) = o.device_ptr(stream);
                (p, Some(g))
            }
            None => (0, None),
        };
        let (rp, _g3) = k_rot.device_ptr(stream);
        let (ap, _g4) = match &k_alt {
            Some(a) => {
                let (p, g) = a.device_ptr(stream);
                (p, Some(g))
            }
            None => (0, None),
        };
        let raw_rope = RawRope {
            inv_freq: fp,
            position_offsets: op,
            k_rot: rp,
            k_alt: ap,
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
            for (arg, ctx) in [
                (
                    "mask.row_offsets",
                    bm.row_offsets.stream().context().cu_ctx(),
                ),
                (
                    "mask.col_indices",
                    bm.col_indices.stream().context().cu_ctx(),
                ),
                ("mask.full", bm.full.stream().context().cu_ctx()),
            ] {
                self.same_context(arg, ctx)?;
            }
        }
        self.forward_impl(stream, [q, k, v], out, options, opts.block_mask, |raw| {
            // SAFETY: as in forward (block mask included); the tables and workspaces were allocated above in this
            // context with the sizes the contract asks for, and live until the call returns
            // (the driver orders their frees after the kernels on this stream).
            unsafe { self.forward_rope_raw(stream.cu_stream(), raw, &raw_rope) }
        })
    }

    fn same_context(&self, arg: &'static str, ctx: sys::CUcontext) -> Result<()> {
        if ctx == self.ctx {
            Ok(())
        } else {
            Err(Error::InvalidArgument {
                arg,
                value: "memory or a stream of another context".into(),
                expected: "the context this Attention was created for".into(),
            })
        }
    }

    fn forward_impl<T: Element>(
        &self,
        stream: &CudaStream,
        [q, k, v]: [Input<'_, '_, T>; 3],
        out: Output<'_, '_, T>,
        options: ForwardOptions,
        block_mask: Option<&DeviceBlockMask>,
        launch: impl FnOnce(&RawForward) -> Result<()>,
    ) -> Result<()> {
        self.same_context("stream", stream.context().cu_ctx())?;
        for (arg, ctx, layout, len) in [
            (
                "q",
                q.data.stream().context().cu_ctx(),
                q.layout,
                q.data.len(),
            ),
            (
                "k",
                k.data.stream().context().cu_ctx(),
                k.layout,
                k.data.len(),
            ),
            (
                "v",
                v.data.stream().context().cu_ctx(),
                v.layout,
                v.data.len(),
            ),
            (
                "o",
                out.data.stream().context().cu_ctx(),
                out.layout,
                out.data.len(),
            ),
        ] {
            self.same_context(arg, ctx)?;
            let required = layout.required_len(arg)?;
            if required > len as u128 {
                return Err(Error::OutOfBounds { arg, required, len });
            }
        }
        let lse_needed =
            (q.layout.batch as u128) * (q.layout.heads as u128) * (q.layout.seqlen as u128);
        if let Some(lse) = &out.lse {
            self.same_context("lse", lse.stream().context().cu_ctx())?;
            if lse_needed > lse.len() as u128 {
                return Err(Error::OutOfBounds {
                    arg: "lse",
                    required: lse_needed,
                    len: lse.len(),
                });
            }
        }
        let (qp, _gq) = q.data.device_ptr(stream);
        let (kp, _gk) = k.data.device_ptr(stream);
        let (vp, _gv) = v.data.device_ptr(stream);
        let (op, _go) = out.data.device_ptr_mut(stream);
        let (lp, _gl) = match out.lse {
            Some(l) => {
                let (p, g) = l.device_ptr_mut(stream);
                (p, Some(g))
            }
            None => (0, None),
        };
        let mut _mask_guards = Vec::new();
        let raw_mask = block_mask.map(|m| {
            let (row_offsets, g1) = m.row_offsets.device_ptr(stream);
            let (col_indices, g2) = m.col_indices.device_ptr(stream);
            let (full, g3) = m.full.device_ptr(stream);
            _mask_guards.extend([g1, g2, g3]);
            let s = m.mask.shape();
            RawBlockMask {
                row_offsets,
                col_indices,
                full,
                batch: s.batch,
                heads: s.heads,
            }
        });
        let raw = RawForward {
            dtype: T::DTYPE,
            q: qp,
            k: kp,
            v: vp,
            o: op,
            lse: lp,
            q_layout: q.layout,
            k_layout: k.layout,
            v_layout: v.layout,
            o_layout: out.layout,
            options,
            block_mask: raw_mask,
        };
        launch(&raw)
    }

    /// Forward attention from raw device pointers on a raw stream; allocates nothing.
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
        let d = args.q_layout.head_dim;
        let shape = forward_tile_shape(d).ok_or(Error::UnsupportedHeadDim {
            arg: "q.head_dim",
            value: d,
            supported: SUPPORTED_HEAD_DIMS,
        })?;
        let smem = ((shape.br + 2 * shape.bc) * d * 2) as u32;
        if smem > self.max_smem_optin {
            return Err(Error::InvalidArgument {
                arg: "q.head_dim",
                value: d.to_string(),
                expected: format!(
                    "a head dim whose kernel fits the device's {} bytes of shared memory per block (needs {smem})",
                    self.max_smem_optin
                ),
            });
        }
        let kind = if args.block_mask.is_some() {
            "sparse"
        } else {
            "fwd"
        };
        let module = format!("{kind}_{}_d{d}", args.dtype.name());
        let name = format!("lf_{module}");
        // SAFETY: the context is kept alive by `_owner` or by the caller of from_raw_context.
        let kernel = unsafe { self.cache.kernel(&module, &name, smem) }?;
        let q_tiles = args.q_layout.seqlen.div_ceil(shape.br);
        let grid = (
            q_tiles as u32,
            args.q_layout.heads as u32,
            args.q_layout.batch as u32,
        );
        let block = (LF_FWD_WARPS * 32, 1, 1);
        let mut params = params;
        let mut kernel_params = [(&mut params as *mut LfFwdParams).cast::<std::ffi::c_void>()];
        // SAFETY: the context is live (see above).
        let _g = unsafe { CtxGuard::bind(self.ctx) }?;
        // SAFETY: `params` was validated and matches the kernel's one by-value parameter (the
        // struct both sides take from params.h); pointers and stream are valid per this fn's
        // contract; the grid covers every (query tile, head, batch) once.
        unsafe { result::launch_kernel(kernel.func, grid, block, smem, stream, &mut kernel_params) }
            .map_err(Error::driver("launching the forward kernel"))
    }
}

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

/// Options of a block-sparse forward call.
#[derive(Clone, Copy)]
pub struct SparseOptions<'a> {
    /// The block mask (with its element mask), on the device.
    pub mask: &'a DeviceBlockMask,
    /// Multiplies Q K^T before the softmax; `None` means `1 / sqrt(head_dim)`.
    pub softmax_scale: Option<f32>,
}

/// An input tensor: a device view and its layout.
#[derive(Clone, Copy)]
pub struct Input<'a, 'b, T> {
    /// The elements.
    pub data: &'a CudaView<'b, T>,
    /// Shape and strides.
    pub layout: Layout,
}

/// The outputs of a forward call: O and, optionally, the log-sum-exp.
pub struct Output<'a, 'b, T> {
    /// The output elements.
    pub data: &'a mut CudaViewMut<'b, T>,
    /// Shape and strides of O.
    pub layout: Layout,
    /// Optional `[batch, heads_q, seqlen_q]` f32 log-sum-exp.
    pub lse: Option<&'a mut CudaViewMut<'b, f32>>,
}

/// Arguments of the raw LSE merge: `acc` (O and LSE, updated in place) absorbs `part`.
/// O pointers address element `(0, 0, 0, 0)`; LSEs are contiguous f32 `[batch, heads, seqlen]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RawMerge {
    /// Element type of both O tensors.
    pub dtype: DType,
    /// Accumulated output (read and written).
    pub acc_o: sys::CUdeviceptr,
    /// Accumulated log-sum-exp (read and written).
    pub acc_lse: sys::CUdeviceptr,
    /// Partial output (read).
    pub part_o: sys::CUdeviceptr,
    /// Partial log-sum-exp (read).
    pub part_lse: sys::CUdeviceptr,
    /// Layout of `acc_o`.
    pub acc_layout: Layout,
    /// Layout of `part_o` (same shape).
    pub part_layout: Layout,
}

impl RawMerge {
    /// Checks shapes, head dim (a multiple of 8, at most 256), alignment and overlap, and lowers
    /// the call to the kernel's parameters.
    pub fn validate(&self) -> Result<LfMergeParams> {
        let (a, p) = (&self.acc_layout, &self.part_layout);
        a.check_dims("acc")?;
        p.check_dims("part")?;
        mismatch("part.batch", p.batch, "acc.batch", a.batch)?;
        mismatch("part.seqlen", p.seqlen, "acc.seqlen", a.seqlen)?;
        mismatch("part.heads", p.heads, "acc.heads", a.heads)?;
        mismatch("part.head_dim", p.head_dim, "acc.head_dim", a.head_dim)?;
        if a.head_dim % 8 != 0 || a.head_dim > 256 {
            return Err(Error::InvalidArgument {
                arg: "acc.head_dim",
                value: a.head_dim.to_string(),
                expected: "a multiple of 8 up to 256".into(),
            });
        }
        for (arg, v) in [
            ("acc.seqlen", a.seqlen),
            ("acc.heads", a.heads),
            ("acc.batch", a.batch),
        ] {
            if v > i32::MAX as usize {
                return Err(Error::InvalidArgument {
                    arg,
                    value: v.to_string(),
                    expected: "at most i32::MAX".into(),
                });
            }
        }
        let rows = a.batch as u128 * a.heads as u128 * a.seqlen as u128;
        if rows.div_ceil(8) > u32::MAX as u128 {
            return Err(Error::InvalidArgument {
                arg: "acc",
                value: format!("{rows} rows"),
                expected: "at most 8 * u32::MAX rows".into(),
            });
        }
        for (arg, ptr) in [("acc.ptr", self.acc_o), ("part.ptr", self.part_o)] {
            if ptr % 16 != 0 {
                return Err(Error::Misaligned {
                    arg,
                    value: ptr as i64,
                    multiple_of: 16,
                });
            }
        }
        for (arg, ptr) in [
            ("acc_lse.ptr", self.acc_lse),
            ("part_lse.ptr", self.part_lse),
        ] {
            if ptr == 0 || ptr % 4 != 0 {
                return Err(Error::Misaligned {
                    arg,
                    value: ptr as i64,
                    multiple_of: 4,
                });
            }
        }
        const STRIDES: [[&str; 3]; 2] = [
            ["acc.batch_stride", "acc.seq_stride", "acc.head_stride"],
            ["part.batch_stride", "part.seq_stride", "part.head_stride"],
        ];
        for (names, l) in STRIDES.iter().zip([a, p]) {
            for (name, s) in names
                .iter()
                .zip([l.batch_stride, l.seq_stride, l.head_stride])
            {
                if s % 8 != 0 {
                    return Err(Error::Misaligned {
                        arg: name,
                        value: s,
                        multiple_of: 8,
                    });
                }
            }
        }
        if !a.is_non_overlapping() {
            return Err(Error::OverlappingOutput { arg: "acc" });
        }
        let acc_range = byte_range(self.acc_o, a, 2);
        let lse_bytes = rows as i128 * 4;
        let acc_lse = (self.acc_lse as i128, self.acc_lse as i128 + lse_bytes);
        let part_lse = (self.part_lse as i128, self.part_lse as i128 + lse_bytes);
        let part_range = byte_range(self.part_o, p, 2);
        if overlaps(acc_range, part_range) {
            return Err(Error::Aliasing {
                output: "acc",
                other: "part",
            });
        }
        if overlaps(acc_range, part_lse) {
            return Err(Error::Aliasing {
                output: "acc",
                other: "part_lse",
            });
        }
        for (other, r) in [
            ("acc", acc_range),
            ("part", part_range),
            ("part_lse", part_lse),
        ] {
            if overlaps(acc_lse, r) {
                return Err(Error::Aliasing {
                    output: "acc_lse",
                    other,
                });
            }
        }
        Ok(LfMergeParams {
            acc_o: self.acc_o as *mut _,
            acc_lse: self.acc_lse as *mut f32,
            part_o: self.part_o as *const _,
            part_lse: self.part_lse as *const f32,
            acc_batch_stride: a.batch_stride,
            acc_head_stride: a.head_stride,
            acc_row_stride: a.seq_stride,
            part_batch_stride: p.batch_stride,
            part_head_stride: p.head_stride,
            part_row_stride: p.seq_stride,
            batch: a.batch as i32,
            heads: a.heads as i32,
            seqlen: a.seqlen as i32,
            head_dim: a.head_dim as i32,
        })
    }
}

impl Attention {
    /// Merges a partial attention result into an accumulated one, in place, by their
    /// log-sum-exps: after the call `acc` holds the attention over the union of both key sets
    /// (LongNet and MoBA combine sparse branches this way). Both results must come with their
    /// LSE (`acc.lse` is required). Rows where both LSEs are `-inf` stay 0 and `-inf`.
    pub fn merge<T: Element>(
        &self,
        stream: &CudaStream,
        acc: Output<'_, '_, T>,
        part: Input<'_, '_, T>,
        part_lse: &CudaView<'_, f32>,
    ) -> Result<()> {
        self.same_context("stream", stream.context().cu_ctx())?;
        let Some(acc_lse) = acc.lse else {
            return Err(Error::InvalidArgument {
                arg: "acc.lse",
                value: "None".into(),
                expected: "the accumulated result's log-sum-exp".into(),
            });
        };
        let rows =
            (acc.layout.batch as u128) * (acc.layout.heads as u128) * (acc.layout.seqlen as u128);
        for (arg, ctx, required, len) in [
            (
                "acc",
                acc.data.stream().context().cu_ctx(),
                acc.layout.required_len("acc")?,
                acc.data.len(),
            ),
            (
                "part",
                part.data.stream().context().cu_ctx(),
                part.layout.required_len("part")?,
                part.data.len(),
            ),
            (
                "acc_lse",
                acc_lse.stream().context().cu_ctx(),
                rows,
                acc_lse.len(),
            ),
            (
                "part_lse",
                part_lse.stream().context().cu_ctx(),
                rows,
                part_lse.len(),
            ),
        ] {
            self.same_context(arg, ctx)?;
            if required > len as u128 {
                return Err(Error::OutOfBounds { arg, required, len });
            }
        }
        let (ao, _g1) = acc.data.device_ptr_mut(stream);
        let (al, _g2) = acc_lse.device_ptr_mut(stream);
        let (po, _g3) = part.data.device_ptr(stream);
        let (pl, _g4) = part_lse.device_ptr(stream);
        let raw = RawMerge {
            dtype: T::DTYPE,
            acc_o: ao,
            acc_lse: al,
            part_o: po,
            part_lse: pl,
            acc_layout: acc.layout,
            part_layout: part.layout,
        };
        // SAFETY: the buffers belong to this context and hold what their layouts reach (checked
        // above); the guards order the launch against other streams.
        unsafe { self.merge_raw(stream.cu_stream(), &raw) }
    }

    /// The LSE merge from raw device pointers; validates as [`RawMerge::validate`].
    ///
    /// # Safety
    /// `stream` belongs to this value's context; every pointer is device memory of that context
    /// holding what its layout (or `batch * heads * seqlen` f32 for the LSEs) addresses, alive and
    /// not used by anything else until the kernel has finished.
    pub unsafe fn merge_raw(&self, stream: sys::CUstream, args: &RawMerge) -> Result<()> {
        let mut params = args.validate()?;
        let name = format!("lf_merge_{}", args.dtype.name());
        let module = format!("merge_{}", args.dtype.name());
        // SAFETY: the context is kept alive by `_owner` or by the caller of from_raw_context.
        let kernel = unsafe { self.cache.kernel(&module, &name, 0) }?;
        let rows = args.acc_layout.batch as u64
            * args.acc_layout.heads as u64
            * args.acc_layout.seqlen as u64;
        let grid = (rows.div_ceil(8) as u32, 1, 1); // 8 warps of 256 threads, one row each
        let mut kernel_params = [(&mut params as *mut LfMergeParams).cast::<std::ffi::c_void>()];
        // SAFETY: the context is live (see above).
        let _g = unsafe { CtxGuard::bind(self.ctx) }?;
        // SAFETY: `params` was validated and is the kernel's one by-value parameter; pointers and
        // stream are valid per this fn's contract; one warp per row covers every row once.
        unsafe {
            result::launch_kernel(
                kernel.func,
                grid,
                (256, 1, 1),
                0,
                stream,
                &mut kernel_params,
            )
        }
        .map_err(Error::driver("launching the merge kernel"))
    }
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
            ("rope.k_rot", self.k_rot, 16, true),
            ("rope.k_alt", self.k_alt, 16, mode != 0),
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
            inv_freq: self.inv_freq as *const f64,
            position_offsets: self.position_offsets as *const i32,
            k_rot: self.k_rot as *const _,
            k_alt: if mode == 0 {
                std::ptr::null()
            } else {
                self.k_alt as *const _
            },
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

impl Attention {
    /// Causal forward with rotary positions applied inside (RoPE, ReRoPE, Leaky ReRoPE) from
    /// raw pointers: Q and K arrive un-rotated. Runs the key-rotation pass into the caller's
    /// workspaces, then the attention kernel, both on `stream`; allocates nothing.
    ///
    /// `fwd.options.mask` must be causal (a left window may be added); with `fwd.block_mask`
    /// only the listed blocks are computed.
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
        let shape = forward_tile_shape(d).ok_or(Error::UnsupportedHeadDim {
            arg: "q.head_dim",
            value: d,
            supported: SUPPORTED_HEAD_DIMS,
        })?;
        let smem = ((2 * shape.br + 2 * shape.bc) * d * 2) as u32;
        if smem > self.max_smem_optin {
            return Err(Error::InvalidArgument {
                arg: "q.head_dim",
                value: d.to_string(),
                expected: format!("a head dim whose RoPE kernel fits the device's {} bytes of shared memory per block (needs {smem})", self.max_smem_optin),
            });
        }
        let dt = fwd.dtype.name();
        let k = &fwd.k_layout;
        let mut keys = crate::sys::LfRopeKeysParams {
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
        let pairs = (k.batch * k.seqlen * k.heads * d / 2) as u64;
        if pairs.div_ceil(256) > u32::MAX as u64 {
            return Err(Error::InvalidArgument {
                arg: "k",
                value: format!("{pairs} element pairs"),
                expected: "at most 256 * u32::MAX".into(),
            });
        }
        // SAFETY: the context is kept alive by `_owner` or by the caller of from_raw_context.
        let keys_kernel = unsafe {
            self.cache
                .kernel(&format!("rope_keys_{dt}"), &format!("lf_rope_keys_{dt}"), 0)
        }?;
        // SAFETY: as above.
        let module = if fwd.block_mask.is_some() {
            format!("rope_sparse_{dt}_d{d}")
        } else {
            format!("rope_{dt}_d{d}")
        };
        let kernel = unsafe { self.cache.kernel(&module, &format!("lf_{module}"), smem) }?;
        let mut params = crate::sys::LfRopeFwdParams {
            fwd: base,
            rope: lf_rope,
        };
        // SAFETY: the context is live (see above).
        let _g = unsafe { CtxGuard::bind(self.ctx) }?;
        let mut kp = [(&mut keys as *mut crate::sys::LfRopeKeysParams).cast::<std::ffi::c_void>()];
        // SAFETY: validated parameters; one thread per (batch, key, head, pair), covered once; the
        // workspaces are disjoint from every input and each other (validated) and sized per the
        // contract.
        unsafe {
            result::launch_kernel(
                keys_kernel.func,
                (pairs.div_ceil(256) as u32, 1, 1),
                (256, 1, 1),
                0,
                stream,
                &mut kp,
            )
        }
        .map_err(Error::driver("launching the key-rotation kernel"))?;
        let q_tiles = fwd.q_layout.seqlen.div_ceil(shape.br);
        let grid = (
            q_tiles as u32,
            fwd.q_layout.heads as u32,
            fwd.q_layout.batch as u32,
        );
        let mut fp = [(&mut params as *mut crate::sys::LfRopeFwdParams).cast::<std::ffi::c_void>()];
        // SAFETY: as forward_raw, with the rotated-key workspaces written by the launch above on
        // the same stream.
        unsafe {
            result::launch_kernel(
                kernel.func,
                grid,
                (LF_FWD_WARPS * 32, 1, 1),
                smem,
                stream,
                &mut fp,
            )
        }
        .map_err(Error::driver("launching the RoPE forward kernel"))
    }
}
