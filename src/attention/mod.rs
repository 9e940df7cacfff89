//! The attention entry points, one module per kernel family: [`forward`] (exact), [`backward`]
//! (its gradients), [`sparse`]
//! (block-sparse), [`rope`] (RoPE / ReRoPE inside the kernel), [`varlen`] (packed sequences),
//! [`decode`] (a few queries over a paged or contiguous KV cache) and [`merge`] (the LSE merge).
//! Each family has a safe layer over cudarc views that validates everything and a raw layer over
//! device pointers for engines with their own allocators. This module holds what they share:
//! [`Attention`] (the loaded kernels of one context), the device opener, the view types and the
//! lowering of checked views to raw pointers.

use std::sync::Arc;

use cudarc::driver::{
    result, sys, CudaContext, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut,
    DeviceSlice, LaunchConfig,
};

use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::loader::{CtxGuard, Kernel, ModuleCache};

pub mod append;
pub mod backward;
mod backward_launch;
pub mod decode;
mod decode_rope;
pub mod error_flag;
pub mod forward;
pub mod memory;
pub mod merge;
pub mod ring;
pub mod ring_rope;
pub mod rope;
pub mod rope_backward;
pub mod select;
mod sm90;
pub mod sparse;
pub mod sparse_backward;
pub mod varlen;
mod varlen_rope;

pub use append::{KvCacheMut, RawAppend};
pub use backward::{
    backward_workspace_bytes, BackwardInputs, BackwardOptions, Gradient, Gradients, RawBackward,
};
pub use decode::{
    BlockTable, DecodeOptions, DecodePlan, DecodeProblem, KvCache, RawDecode, SplitCounters,
};
pub use error_flag::DeviceErrorFlag;
pub use forward::{ForwardOptions, RawForward};
pub use memory::{
    AppendSource, MemoryBuffer, MemoryDecode, MemoryDecodePlan, MemoryForward, MemoryGrowth,
    MemoryInput, MemoryViews, RawMemory, RawMemoryDecode, RawMemorySelect, MAX_MEM_LEN, MAX_TOP_K,
    MEMORY_HEAD_DIMS,
};
pub use merge::RawMerge;
pub use ring::{RingAccumulator, RowOrder};
pub use ring_rope::RopeShard;
pub use rope::{RawRope, RawRopeMode, RopeForward};
pub use rope_backward::{rope_backward_workspace_bytes, RopeBackward};
pub use select::{
    BlockSelectPlan, BlockSelector, RawBlockSelect, SelectedBlocks, SelectedOptions, MAX_SELECT_ROW,
};
pub use sparse::{RawBlockMask, SparseOptions};
pub use sparse_backward::SparseBackwardOptions;
pub use varlen::{RawVarlenForward, VarlenOptions};

/// Head dimensions that have kernels of their own width (every family, and the Hopper path).
pub const SUPPORTED_HEAD_DIMS: &[usize] = &[64, 128, 256];

/// The kernel a head dim runs in: its tile width (64, 128 or 256) and whether the head is
/// narrower than it. The exact, variable-length and decoding forwards take any multiple of 4 up
/// to 256 (80, 96, 100, 112, 160, 192, ...) in the next tile width, its columns past the head
/// zero on load and not stored, its rows copied 8 bytes at a time; `None` for other head dims.
pub fn head_dim_kernel(head_dim: usize) -> Option<(usize, bool)> {
    if SUPPORTED_HEAD_DIMS.contains(&head_dim) {
        return Some((head_dim, false));
    }
    if head_dim == 0 || head_dim % 4 != 0 || head_dim > 256 {
        return None;
    }
    let width = SUPPORTED_HEAD_DIMS
        .iter()
        .copied()
        .find(|&w| w >= head_dim)?;
    Some((width, true))
}

/// The module of kernel `family` for `dtype` at head dim `d`: `{family}_{dtype}_d{width}`, with a
/// `p` for a head narrower than the width.
pub(crate) fn sized_module(family: &str, dtype: &str, d: usize) -> String {
    match head_dim_kernel(d) {
        Some((w, true)) => format!("{family}_{dtype}_d{w}p"),
        _ => format!("{family}_{dtype}_d{d}"),
    }
}

/// File names the CUDA driver library may have: the names cudarc's loader tries for it (CUDA
/// 13.0 on a 64-bit target), so that a `true` here means the loader will find one of them.
fn driver_library_names() -> Vec<String> {
    use std::env::consts::{DLL_PREFIX as P, DLL_SUFFIX as S};
    let mut names = Vec::new();
    for lib in ["cuda", "nvcuda"] {
        for stem in [
            "", "64", "64_13", "64_130", "64_130_0", "64_10", "64_11", "64_12", "64_9",
        ] {
            names.push(format!("{P}{lib}{stem}{S}"));
        }
        for version in ["13", "12", "11", "10", "9", "1"] {
            names.push(format!("{P}{lib}{S}.{version}"));
        }
    }
    names
}

/// Whether the CUDA driver library can be loaded. Works the same whichever way cudarc reaches
/// the driver: loaded at run time (cudarc's `dynamic-loading`, the default here, where a missing
/// library would panic inside cudarc) or linked at build time (`dynamic-linking`, which
/// candle-core turns on; the process then only starts with the library present, so this is
/// `true`).
fn driver_library_present() -> bool {
    driver_library_names().into_iter().any(|name| {
        // SAFETY: loading the driver library runs its initializers, which have no
        // preconditions; the handle is dropped (unloaded) at once and no symbol is used.
        unsafe { libloading::Library::new(name) }.is_ok()
    })
}

/// Checks that a CUDA driver can be loaded, then opens device `ordinal`. Unlike calling cudarc
/// directly, a machine without a driver gets [`Error::NoDriver`] instead of a panic.
pub fn open_device(ordinal: usize) -> Result<Arc<CudaContext>> {
    if !driver_library_present() {
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

/// A forward mainloop: the part of a kernel that moves tiles and runs the tensor cores. The
/// policies (tile iterators, masks, scores, Q preparation) are the same for every mainloop.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mainloop {
    /// `mma.sync`, `ldmatrix` and `cp.async` (`cuda/sm80/`): devices of compute capability 8.0
    /// and newer.
    Sm80,
    /// `wgmma`, TMA, mbarriers and warp specialization (`cuda/sm90/`): compute capability 9.0
    /// (H100, H200).
    Sm90,
}

/// Which mainloop an [`Attention`] runs ([`Attention::with_mainloop`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum MainloopChoice {
    /// The library's choice: the Hopper mainloop on a compute capability 9.0 device for every
    /// call it runs, the sm_80 mainloop for the rest (other devices, RoPE at head dim 256,
    /// strides a tensor map cannot describe, a build without sm_90a kernels).
    #[default]
    Auto,
    /// Always the sm_80 mainloop.
    Sm80,
    /// The Hopper mainloop (exact, block-sparse and RoPE forwards; RoPE at head dims 64 and 128);
    /// a call it cannot run (another device, RoPE at head dim 256, strides a tensor map cannot
    /// describe) is an error, not a fallback.
    Sm90,
}

/// Attention kernels loaded into one CUDA context.
///
/// Modules load on first use of each kernel and stay loaded until this value is dropped, so
/// repeated calls cost one launch each. Create one per context and share it (`&self` methods,
/// `Send + Sync`).
pub struct Attention {
    cache: ModuleCache,
    ctx: sys::CUcontext,
    max_smem_optin: u32,
    sm_count: u32,
    compute_capability: (i32, i32),
    mainloop: MainloopChoice,
    // A persistent grid of this many CTAs for the Hopper kernels (with_sm90_persistent).
    sm90_ctas: Option<u32>,
    // Tall (192-row) Hopper query tiles at head dim 64: None where they gain (with_sm90_tall_tiles).
    sm90_tall: Option<bool>,
    // The persistent zigzag grid for short dense calls: None where it gains (with_sm90_zigzag).
    sm90_zigzag: Option<bool>,
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
        let sms = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(Error::driver("reading the SM count"))?;
        Ok(Attention {
            cache: ModuleCache::new(ctx.cu_ctx()),
            ctx: ctx.cu_ctx(),
            max_smem_optin: smem.max(0) as u32,
            sm_count: sms.max(1) as u32,
            compute_capability: (major, minor),
            mainloop: MainloopChoice::Auto,
            sm90_ctas: None,
            sm90_tall: None,
            sm90_zigzag: None,
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
        let attr = |a| {
            // SAFETY: `dev` came from the driver.
            unsafe { result::device::get_attribute(dev, a) }
                .map_err(Error::driver("reading the compute capability"))
        };
        let major = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
        let minor = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
        let sms = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
        Ok(Attention {
            cache: ModuleCache::new(ctx),
            ctx,
            max_smem_optin: smem.max(0) as u32,
            sm_count: sms.max(1) as u32,
            compute_capability: (major, minor),
            mainloop: MainloopChoice::Auto,
            sm90_ctas: None,
            sm90_tall: None,
            sm90_zigzag: None,
            _owner: None,
        })
    }

    /// The same kernels with another mainloop choice.
    pub fn with_mainloop(mut self, choice: MainloopChoice) -> Self {
        self.mainloop = choice;
        self
    }

    /// Development aid, not a stable API: launches the Hopper kernels as a persistent grid of at
    /// most `ctas` CTAs (`None`: one CTA per query tile, head and batch entry, the default, or
    /// one per SM for the zigzag kernels), each running every `ctas`-th work item. The zigzag
    /// kernels ([`Self::with_sm90_zigzag`]) always can; the others only when built with
    /// `NVCC_FLAGS=-DLF_SM90_PERSISTENT=1` (loaded through `LONGFLASH_KERNEL_DIR`), and with
    /// other builds their launch is an error.
    #[doc(hidden)]
    pub fn with_sm90_persistent(mut self, ctas: Option<u32>) -> Self {
        self.sm90_ctas = ctas.filter(|&c| c > 0);
        self
    }

    /// Development aid, not a stable API: whether the dense Hopper kernel at head dim 64 takes
    /// its tall (192-row, three consumer warpgroups) query tiles: `Some(true)` for every call
    /// that can, `Some(false)` for none, `None` (the default) where they measured faster (every
    /// call without a causal or window mask; masked calls from 8192 query rows). Tests use it to
    /// run both tile shapes on small problems.
    #[doc(hidden)]
    pub fn with_sm90_tall_tiles(mut self, tall: Option<bool>) -> Self {
        self.sm90_tall = tall;
        self
    }

    /// Development aid, not a stable API: whether a dense Hopper call without a block mask (and
    /// not on the tall tiles) runs its 128-row kernel as a persistent grid in zigzag slots:
    /// `Some(true)` for every such call, `Some(false)` for none, `None` (the default) for the
    /// calls where it measured faster: with a causal or window mask up to 8192 query rows and
    /// keys, without one up to 4096 (at head dim 256 from 1024 query rows). With
    /// [`Self::with_sm90_persistent`] that grid has its count of CTAs (tests use it to run many
    /// rounds per CTA).
    #[doc(hidden)]
    pub fn with_sm90_zigzag(mut self, zigzag: Option<bool>) -> Self {
        self.sm90_zigzag = zigzag;
        self
    }

    /// The mainloop choice of this value ([`with_mainloop`](Self::with_mainloop)).
    pub fn mainloop(&self) -> MainloopChoice {
        self.mainloop
    }

    /// The device's compute capability (major, minor).
    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }

    /// Launches `kernel` on `stream` with `params` as its one by-value parameter, in this
    /// value's context; `what` names the launch in the error.
    ///
    /// # Safety
    /// `P` is the parameter struct the kernel takes (its params.h declaration), every pointer in
    /// it and the stream satisfy the calling entry point's contract, and the grid covers the work
    /// the kernel expects it to.
    pub(crate) unsafe fn launch<P>(
        &self,
        kernel: &Kernel,
        cfg: LaunchConfig,
        stream: sys::CUstream,
        params: &mut P,
        what: &'static str,
    ) -> Result<()> {
        // SAFETY: the context is kept alive by `_owner` or by the caller of from_raw_context.
        let _g = unsafe { CtxGuard::bind(self.ctx) }?;
        let mut kernel_params = [(params as *mut P).cast::<std::ffi::c_void>()];
        // SAFETY: per this fn's contract.
        unsafe {
            result::launch_kernel(
                kernel.func,
                cfg.grid_dim,
                cfg.block_dim,
                cfg.shared_mem_bytes,
                stream,
                &mut kernel_params,
            )
        }
        .map_err(Error::driver(what))
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

    /// `arg`'s device memory belongs to this value's context and holds every element `layout`
    /// addresses (the safe entries' check of each view before anything is lowered).
    fn check_view<T>(
        &self,
        arg: &'static str,
        data: &impl DeviceSlice<T>,
        layout: &Layout,
    ) -> Result<()> {
        self.same_context(arg, data.stream().context().cu_ctx())?;
        let required = layout.required_len(arg)?;
        let len = data.len();
        if required > len as u128 {
            return Err(Error::OutOfBounds { arg, required, len });
        }
        Ok(())
    }

    fn forward_impl<T: Element>(
        &self,
        stream: &CudaStream,
        [q, k, v]: [Input<'_, '_, T>; 3],
        out: Output<'_, '_, T>,
        options: ForwardOptions,
        block_mask: Option<sparse::DeviceCsr<'_>>,
        launch: impl FnOnce(&RawForward) -> Result<()>,
    ) -> Result<()> {
        self.same_context("stream", stream.context().cu_ctx())?;
        self.check_view("q", q.data, &q.layout)?;
        self.check_view("k", k.data, &k.layout)?;
        self.check_view("v", v.data, &v.layout)?;
        self.check_view("o", &*out.data, &out.layout)?;
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
            RawBlockMask {
                row_offsets,
                col_indices,
                full,
                batch: m.batch,
                heads: m.heads,
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
}

/// Device scratch memory allocated in stream order and freed in stream order on drop: the
/// kernels launched on the stream in between may use it, and nothing waits for them.
pub(crate) struct Scratch {
    pub(crate) ptr: sys::CUdeviceptr,
    pub(crate) bytes: usize,
    stream: sys::CUstream,
    ctx: sys::CUcontext,
}

impl Scratch {
    /// `bytes` (rounded up to 16) on `stream`, 16-byte aligned (as every allocation is).
    ///
    /// # Safety
    /// `stream` is a stream of the live context `ctx` (or null for its legacy default stream),
    /// and stays valid until the value is dropped.
    pub(crate) unsafe fn new(
        ctx: sys::CUcontext,
        stream: sys::CUstream,
        bytes: usize,
    ) -> Result<Self> {
        let bytes = bytes.next_multiple_of(16);
        // SAFETY: the caller guarantees the context is live.
        let _g = unsafe { CtxGuard::bind(ctx) }?;
        // SAFETY: a stream of the bound context; the pointer is freed on the same stream.
        let ptr = unsafe { result::malloc_async(stream, bytes) }
            .map_err(Error::driver("allocating scratch memory on the stream"))?;
        Ok(Scratch {
            ptr,
            bytes,
            stream,
            ctx,
        })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // SAFETY: the context and stream outlive this value (see `new`); the memory was
        // allocated on this stream and is freed after the work queued on it so far. A failure
        // here can only leak the block.
        unsafe {
            if let Ok(_g) = CtxGuard::bind(self.ctx) {
                let _ = result::free_async(self.ptr, self.stream);
            }
        }
    }
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
