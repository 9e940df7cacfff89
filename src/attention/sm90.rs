//! The Hopper mainloop's host side: which calls it can run, the TMA tensor maps of Q, K and V,
//! and the launch (`cuda/sm90/`, `cuda/fwd_sm90.cuh`).

use cudarc::driver::{sys, LaunchConfig};

use super::{
    head_dim_kernel, Attention, Mainloop, MainloopChoice, RawForward, RawRope, RawVarlenForward,
};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::loader::{CtxGuard, ModuleCache};
use crate::sys::{
    LfFwdKeyMaskSm90Params, LfFwdParams, LfFwdSm90Params, LfRope, LfRopeFwdSm90Params, LfTensorMap,
    LfVarlenParams, LfVarlenSm90Params, LF_FWD_SM90_BC_D128, LF_FWD_SM90_BC_D256,
    LF_FWD_SM90_BC_D64, LF_FWD_SM90_BC_SPARSE, LF_FWD_SM90_BR, LF_FWD_SM90_BR_TALL,
    LF_FWD_SM90_STAGES, LF_FWD_SM90_THREADS, LF_FWD_SM90_THREADS_TALL,
};

/// Query rows from which a call with a causal or window mask takes the tall tiles at head dim 64
/// (`Attention::tall_tile`).
const TALL_MIN_ROWS_MASKED: usize = 8192;

/// Query rows and keys up to which a call without a mask takes the persistent zigzag grid
/// (`Attention::zigzag_grid`).
const ZIGZAG_MAX_ROWS: usize = 4096;

/// The same for a call with a causal or window mask, whose items differ in length.
const ZIGZAG_MAX_ROWS_MASKED: usize = 8192;

/// Query rows from which a call without a mask at head dim 256 takes the zigzag grid.
const ZIGZAG_MIN_ROWS_D256: usize = 1024;

/// Key tile of the Hopper kernel for a head dim: its own width's, and for a head narrower than
/// 128 columns (a multiple of 4 from 68 to 124) the 128-wide padded tile's.
fn key_tile(head_dim: usize) -> Option<usize> {
    match tile_width(head_dim) {
        Some(64) => Some(LF_FWD_SM90_BC_D64 as usize),
        Some(128) => Some(LF_FWD_SM90_BC_D128 as usize),
        Some(256) => Some(LF_FWD_SM90_BC_D256 as usize),
        _ => None,
    }
}

/// The width of the Hopper tiles of a head dim: 64, 128 or 256 for those head dims, 128 for a
/// multiple of 4 from 68 to 124 (`Sm90Traits`' padded heads, kernels `*_d128p`).
fn tile_width(head_dim: usize) -> Option<usize> {
    match head_dim_kernel(head_dim)? {
        (w, false) => Some(w),
        (128, true) => Some(128),
        _ => None,
    }
}

/// Whether the Hopper kernels of this head dim are the padded ones (`Sm90Traits::kPadded`).
fn padded(head_dim: usize) -> bool {
    tile_width(head_dim).is_some_and(|w| w != head_dim)
}

/// The Hopper module of kernel `family` for `dtype` at head dim `d`:
/// `{family}_sm90_{dtype}_d{d}`, or `_d128p` for a head narrower than its tile.
fn sm90_module(family: &str, dtype: DType, d: usize) -> String {
    if padded(d) {
        format!("{family}_sm90_{}_d128p", dtype.name())
    } else {
        format!("{family}_sm90_{}_d{d}", dtype.name())
    }
}

/// Dynamic shared memory of the Hopper kernel (cuda/sm90/mainloop.cuh, Sm90Traits) at head dim
/// `head_dim` with `br`-row Q tiles and `bc`-key K/V tiles: the Q tiles and the K/V ring of the
/// tile width, the barriers (one more per stage for a padded head) and 1 KiB to align the base
/// to a swizzle atom.
fn smem_bytes(head_dim: usize, br: usize, bc: usize, q_variants: usize) -> u32 {
    let stages = LF_FWD_SM90_STAGES as usize;
    let width = tile_width(head_dim).unwrap_or(head_dim);
    let tiles = (q_variants * br + 2 * stages * bc) * width * 2;
    let bars = 2 + 4 * stages + if padded(head_dim) { stages } else { 0 };
    (tiles + bars * 8 + 1024) as u32
}

/// A 4-D tensor map of a 16-bit tensor at `ptr` with layout `l`: boxes of 64 columns by
/// `box_rows` rows, 128-byte swizzle, zeros outside. `Err` says why a tensor map cannot describe
/// the layout.
///
/// Its dimensions are (head_dim, seqlen, heads, batch), or for a head narrower than the kernels'
/// tile (the padded kernels, `Sm90Traits::kPadded`) a flat map (columns, seqlen, 1, batch),
/// column `h * head_stride + j` being element j of head h, the columns ending with the last
/// head's last element (zeros past it). Unlike the 4-D maps a flat one needs no head stride of
/// whole 16 bytes (a head of 100 is 200 bytes): a box starts on 16 bytes, at or up to 4 columns
/// before a head, and the kernel keeps the neighbours' columns it reads out of every product.
pub(super) fn tensor_map(
    ptr: u64,
    l: &Layout,
    dtype: DType,
    box_rows: usize,
) -> Result<LfTensorMap> {
    map_of(ptr, l, dtype, box_rows, padded(l.head_dim))
}

/// The 4-D tensor map (head_dim, seqlen, heads, batch) of [`tensor_map`] whatever the head dim:
/// a box past the head's last column reads zeros. For the kernels that have no padded form (the
/// Hopper top-k selection), which take a head narrower than their tile only through such zeros,
/// and so only where its head stride is whole 16 bytes.
pub(super) fn tensor_map_zero_padded(
    ptr: u64,
    l: &Layout,
    dtype: DType,
    box_rows: usize,
) -> Result<LfTensorMap> {
    map_of(ptr, l, dtype, box_rows, false)
}

/// [`tensor_map`]'s map, flat when `flat`.
fn map_of(ptr: u64, l: &Layout, dtype: DType, box_rows: usize, flat: bool) -> Result<LfTensorMap> {
    let (columns, heads, head_stride) = if flat {
        // The kernel addresses columns in 32 bits, up to 127 past the last head's first.
        let last = (l.heads as i128 - 1) * l.head_stride as i128;
        if l.heads > 1 && (l.head_stride <= 0 || last + 128 > i32::MAX as i128) {
            return Err(unsupported(format!(
                "head_stride {}: a padded head's tensor map needs positive head strides below \
                 2^31 elements over all heads",
                l.head_stride
            )));
        }
        ((last + l.head_dim as i128) as u64, 1, 0)
    } else {
        (l.head_dim as u64, l.heads, l.head_stride)
    };
    let strides = map_strides([
        (l.seqlen, l.seq_stride, "seq_stride"),
        (heads, head_stride, "head_stride"),
        (l.batch, l.batch_stride, "batch_stride"),
    ])?;
    let dims = [columns, l.seqlen as u64, heads as u64, l.batch as u64];
    encode_map(ptr, dims, strides, dtype, box_rows)
}

/// The byte strides of a tensor map's dimensions 1 to 3 from their (extent, element stride,
/// name): positive, below 2^40 bytes and multiples of 16 bytes. A dimension of extent 1 is never
/// stepped over, so any valid stride stands in for it.
fn map_strides(dims: [(usize, i64, &str); 3]) -> Result<[u64; 3]> {
    let mut strides = [0u64; 3];
    for (i, (n, s, name)) in dims.into_iter().enumerate() {
        strides[i] = if n == 1 {
            16
        } else if s > 0 && (s as u64) * 2 < (1 << 40) && (s as u64 * 2) % 16 == 0 {
            s as u64 * 2
        } else {
            return Err(unsupported(format!(
                "{name} {s}: a tensor map needs positive strides below 2^40 bytes, multiples \
                 of 16 bytes"
            )));
        };
    }
    Ok(strides)
}

/// Encodes a 4-D tensor map of 16-bit elements (`dims`, byte `strides` of dimensions 1 to 3)
/// at `ptr`: boxes of 64 columns by `box_rows` rows, 128-byte swizzle, zeros outside.
fn encode_map(
    ptr: u64,
    dims: [u64; 4],
    strides: [u64; 3],
    dtype: DType,
    box_rows: usize,
) -> Result<LfTensorMap> {
    // The driver's other rule checked here, so that a layout it refuses never reaches it.
    if ptr % 16 != 0 {
        return Err(unsupported(format!(
            "base address {ptr:#x}: a tensor map needs a 16-byte aligned base"
        )));
    }
    let boxes = [64u32, box_rows as u32, 1, 1];
    let element_strides = [1u32; 4];
    let data_type = match dtype {
        DType::F16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
        DType::Bf16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
    };
    let mut map = LfTensorMap::default();
    // SAFETY: every array has the rank's length (4, and 3 strides), `map` is a writable,
    // 128-byte aligned CUtensorMap-sized value, and the driver only encodes (no device access).
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            (&mut map as *mut LfTensorMap).cast::<sys::CUtensorMap>(),
            data_type,
            4,
            ptr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            element_strides.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    if r != sys::CUresult::CUDA_SUCCESS {
        return Err(unsupported(format!(
            "a layout cuTensorMapEncodeTiled accepts ({r:?})"
        )));
    }
    Ok(map)
}

/// A Hopper launch: the module (its kernel is named after it), its query tile (rows) and threads
/// per CTA, its shared memory and its one by-value parameter (`LfFwdSm90Params`, or
/// `LfRopeFwdSm90Params` for RoPE).
pub(super) struct Plan<P> {
    module: String,
    br: usize,
    threads: u32,
    smem: u32,
    /// A persistent kernel (a CTA runs several items): launched as a grid of one CTA per SM.
    persistent: bool,
    params: P,
}

impl<P> Plan<P> {
    /// The module's kernel (`lf_` + the module's name).
    fn kernel(&self) -> String {
        format!("lf_{}", self.module)
    }
}

/// Which Hopper kernel of a family serves a call: its module, query rows and key tile per CTA,
/// threads per CTA and shared memory.
struct Shape {
    module: String,
    br: usize,
    bc: usize,
    threads: u32,
    smem: u32,
    persistent: bool,
}

/// The error of a call `MainloopChoice::Sm90` asked for that the Hopper kernels cannot run.
pub(super) fn unsupported(why: String) -> Error {
    Error::InvalidArgument {
        arg: "mainloop",
        value: "MainloopChoice::Sm90".into(),
        expected: format!("a call the Hopper mainloop runs: {why}"),
    }
}

/// The Hopper parameters of a validated call: tensor maps of Q (`br`-row boxes), of the keys at
/// `k` with layout `k_layout` (the call's K, or RoPE's rotated-key workspace) and of V, with
/// `bc`-row boxes.
fn hopper_params(
    args: &RawForward,
    fwd: LfFwdParams,
    (br, bc): (usize, usize),
    k: u64,
    k_layout: &Layout,
) -> Result<LfFwdSm90Params> {
    Ok(LfFwdSm90Params {
        fwd,
        tma_q: tensor_map(args.q, &args.q_layout, args.dtype, br)?,
        tma_k: tensor_map(k, k_layout, args.dtype, bc)?,
        tma_v: tensor_map(args.v, &args.v_layout, args.dtype, bc)?,
        ..LfFwdSm90Params::default()
    })
}

impl Attention {
    /// The mainloop a forward call with these arguments runs on this device under this value's
    /// [`MainloopChoice`] (validating the arguments first). With [`MainloopChoice::Sm90`], a call
    /// the Hopper mainloop cannot run is an error that says why.
    pub fn mainloop_for(&self, args: &RawForward) -> Result<Mainloop> {
        let params = args.validate()?;
        Ok(match self.sm90_plan(args, params)? {
            Some(_) => Mainloop::Sm90,
            None => Mainloop::Sm80,
        })
    }

    /// Development aid, not a stable API: the name of the Hopper kernel a forward call with
    /// these arguments launches on this device under this value's [`MainloopChoice`], or `None`
    /// when the call runs on the sm_80 mainloop (validating the arguments first). Tests use it to
    /// see which tile shape served a call.
    #[doc(hidden)]
    pub fn hopper_kernel_for(&self, args: &RawForward) -> Result<Option<String>> {
        let params = args.validate()?;
        Ok(self.sm90_plan(args, params)?.map(|plan| plan.kernel()))
    }

    /// The mainloop a variable-length call with these arguments runs on this device under this
    /// value's [`MainloopChoice`] (validating the arguments first), as [`Self::mainloop_for`].
    pub fn varlen_mainloop_for(&self, args: &RawVarlenForward) -> Result<Mainloop> {
        let vp = args.validate()?;
        Ok(match self.varlen_sm90_plan(args, vp)? {
            Some(_) => Mainloop::Sm90,
            None => Mainloop::Sm80,
        })
    }

    /// The Hopper module of a call (`{family}_sm90_{dtype}_d{head_dim}`: fwd, sparse, rope or
    /// rope_sparse), its key tile and its shared memory, when this value's choice is
    /// [`MainloopChoice::Sm90`] (`None` otherwise); an error that says why when the device or the
    /// build cannot run it. A block mask's 64-key blocks are the sparse kernels' key tiles; RoPE
    /// kernels hold two Q tiles.
    fn hopper_module(&self, args: &RawForward, rope: bool) -> Result<Option<(String, usize, u32)>> {
        if self.mainloop == MainloopChoice::Sm80 {
            return Ok(None);
        }
        if self.compute_capability != (9, 0) {
            return Err(unsupported(format!(
                "a device of compute capability 9.0 (this one is {}.{})",
                self.compute_capability.0, self.compute_capability.1
            )));
        }
        let d = args.q_layout.head_dim;
        let (family, bc) = match (rope, args.block_mask.is_some()) {
            (false, false) => ("fwd", key_tile(d)),
            (false, true) => ("sparse", Some(LF_FWD_SM90_BC_SPARSE as usize)),
            (true, false) => ("rope", key_tile(d)),
            (true, true) => ("rope_sparse", Some(LF_FWD_SM90_BC_SPARSE as usize)),
        };
        let bc = bc.ok_or_else(|| {
            unsupported(format!(
                "head dim 64, 128, 256 or a multiple of 4 from 68 to 124, not {d}"
            ))
        })?;
        let module = sm90_module(family, args.dtype, d);
        if !ModuleCache::has_module(&module) {
            return Err(unsupported(format!(
                "a kernel built for this call ({module} is not in this build: sm_90a targets, \
                 head dims 64/128/256, 64/128 with RoPE, 68-124 padded without a block mask)"
            )));
        }
        let smem = smem_bytes(d, LF_FWD_SM90_BR as usize, bc, if rope { 2 } else { 1 });
        if smem > self.max_smem_optin {
            return Err(unsupported(format!(
                "{smem} bytes of shared memory per block (the device allows {})",
                self.max_smem_optin
            )));
        }
        Ok(Some((module, bc, smem)))
    }

    /// The dense Hopper kernel with tall query tiles (LF_FWD_SM90_BR_TALL rows, three consumer
    /// warpgroups) for a call at head dim 64 without a block mask, when this build has it and the
    /// call gains from it: each warpgroup's softmax hides behind two others' matrix products,
    /// which are short at head dim 64. Measured on an H100 (2026-12-05, bf16, 16k tokens a call):
    /// without a mask 1.03x to 1.16x the 128-row tiles from 512 to 16k keys; causal 0.80x at 512
    /// to 0.98x at 4k (a 192-row diagonal masks more of each tile), 1.04x to 1.06x from 8k. So
    /// masked calls take them from [`TALL_MIN_ROWS_MASKED`] query rows.
    /// [`Attention::with_sm90_tall_tiles`] overrides the choice.
    fn tall_tile(&self, args: &RawForward, fwd: &LfFwdParams) -> Option<Shape> {
        let d = args.q_layout.head_dim;
        if d != 64 || args.block_mask.is_some() {
            return None;
        }
        let masked = fwd.mask.window_left >= 0 || fwd.mask.window_right >= 0;
        let gains = !masked || args.q_layout.seqlen >= TALL_MIN_ROWS_MASKED;
        if !self.sm90_tall.unwrap_or(gains) {
            return None;
        }
        let module = format!("fwd_tall_sm90_{}_d{d}", args.dtype.name());
        let bc = key_tile(d)? as u32;
        self.shape_if_built(
            module,
            d,
            (LF_FWD_SM90_BR_TALL, bc),
            LF_FWD_SM90_THREADS_TALL,
        )
    }

    /// The dense Hopper kernel with 128-row tiles as a persistent grid in zigzag slots
    /// (`cuda/sm90/schedule.cuh`: one CTA per SM, each running two items of one head at a time,
    /// query tiles n - 1 - k and k), for a call without a block mask when this build has it and
    /// the call gains: where an item has few key tiles the one-item grid pays each item's start
    /// and end on its own, and a causal mask's items differ in length. Measured on an H100
    /// (2026-12-06, bf16, 16k tokens a call, against the one-item grid in one call, twice):
    /// causal 1.16x-1.20x at 512 tokens, 1.04x-1.07x at 4k, 1.03x-1.05x at 8k (head dims 128
    /// and 256); without a mask 1.12x (head dim 128) at 512 to 1.01x at 4k and 1.00x at 8k, but
    /// 0.975x at head dim 256 and 512 tokens; head dim 64 without a mask 0.99x-1.00x (it takes
    /// the tall tiles anyway). So: masked calls up to [`ZIGZAG_MAX_ROWS_MASKED`] query rows and
    /// keys, others up to [`ZIGZAG_MAX_ROWS`], from [`ZIGZAG_MIN_ROWS_D256`] rows at head dim 256.
    /// [`Attention::with_sm90_zigzag`] overrides the choice.
    fn zigzag_grid(&self, args: &RawForward, fwd: &LfFwdParams) -> Option<Shape> {
        let q = &args.q_layout;
        let d = q.head_dim;
        if args.block_mask.is_some() {
            return None;
        }
        // The kernel counts pairs and slots in 32 bits, stepping a pair index by up to twice the
        // pair count: a quarter of i32's range keeps every step in it.
        let tiles = q.seqlen.div_ceil(LF_FWD_SM90_BR as usize);
        if tiles.checked_mul(q.heads.checked_mul(q.batch)?)? > (i32::MAX / 4) as usize {
            return None;
        }
        // Measured with as many keys as queries: few queries over many keys make long items,
        // where the one-item grid already pays its starts and ends over many key tiles.
        let masked = fwd.mask.window_left >= 0 || fwd.mask.window_right >= 0;
        let rows = q.seqlen.max(args.k_layout.seqlen);
        let gains = if masked {
            rows <= ZIGZAG_MAX_ROWS_MASKED
        } else {
            rows <= ZIGZAG_MAX_ROWS && (d != 256 || q.seqlen >= ZIGZAG_MIN_ROWS_D256)
        };
        if !self.sm90_zigzag.unwrap_or(gains) {
            return None;
        }
        let module = format!("fwd_zz_sm90_{}_d{d}", args.dtype.name());
        let bc = key_tile(d)? as u32;
        let shape = self.shape_if_built(module, d, (LF_FWD_SM90_BR, bc), LF_FWD_SM90_THREADS)?;
        Some(Shape {
            persistent: true,
            ..shape
        })
    }

    /// `module`'s shape at head dim `d` with `br` x `bc` tiles and `threads` per CTA, if this
    /// build has it and the device gives its shared memory.
    fn shape_if_built(
        &self,
        module: String,
        d: usize,
        (br, bc): (u32, u32),
        threads: u32,
    ) -> Option<Shape> {
        let (br, bc) = (br as usize, bc as usize);
        let smem = smem_bytes(d, br, bc, 1);
        (ModuleCache::has_module(&module) && smem <= self.max_smem_optin).then_some(Shape {
            module,
            br,
            bc,
            threads,
            smem,
            persistent: false,
        })
    }

    /// The Hopper launch of a validated call, or `None` for the sm_80 mainloop.
    fn sm90_plan(
        &self,
        args: &RawForward,
        fwd: LfFwdParams,
    ) -> Result<Option<Plan<LfFwdSm90Params>>> {
        self.or_sm80(|| {
            let Some((module, bc, smem)) = self.hopper_module(args, false)? else {
                return Ok(None);
            };
            let shape = self
                .tall_tile(args, &fwd)
                .or_else(|| self.zigzag_grid(args, &fwd))
                .unwrap_or(Shape {
                    module,
                    br: LF_FWD_SM90_BR as usize,
                    bc,
                    threads: LF_FWD_SM90_THREADS,
                    smem,
                    persistent: false,
                });
            // Encoding a tensor map needs a current context: this thread may never have had one.
            // SAFETY: the context is kept alive by `_owner` or by the caller of from_raw_context.
            let _g = unsafe { CtxGuard::bind(self.ctx) }?;
            let params = hopper_params(args, fwd, (shape.br, shape.bc), args.k, &args.k_layout)?;
            Ok(Some(Plan {
                module: shape.module,
                br: shape.br,
                threads: shape.threads,
                smem: shape.smem,
                persistent: shape.persistent,
                params,
            }))
        })
    }

    /// The Hopper launch of a validated call (`fwd` its validated parameters) with a per-key
    /// mask (`key_mask`: `[batch, key_mask_batch_stride]` bytes, read below the keys' length),
    /// or `None` where the Hopper kernels cannot run it under [`MainloopChoice::Auto`]: the
    /// 128-row tiles of `keymask_sm90_{dtype}_d{64,128}` (the memory pass of a masked memory).
    /// The call takes no block mask.
    pub(super) fn keymask_sm90_plan(
        &self,
        args: &RawForward,
        fwd: LfFwdParams,
        key_mask: u64,
        key_mask_batch_stride: usize,
    ) -> Result<Option<Plan<LfFwdKeyMaskSm90Params>>> {
        debug_assert!(args.block_mask.is_none());
        self.dense_tile_plan(args, fwd, "keymask", |base| LfFwdKeyMaskSm90Params {
            base,
            key_mask: key_mask as *const u8,
            key_mask_batch_stride: key_mask_batch_stride as i64,
        })
    }

    /// The launch of another family's Hopper kernel with the dense kernel's shape (128-row
    /// tiles, one item per CTA): module `{family}_sm90_{dtype}_d{head_dim}`, its one parameter
    /// `wrap`ped around the dense parameters of the call's tensors (`fwd` and the tensor maps
    /// of `args`' Q, K and V); `None` where the Hopper kernels cannot run the call under
    /// [`MainloopChoice::Auto`].
    fn dense_tile_plan<P>(
        &self,
        args: &RawForward,
        fwd: LfFwdParams,
        family: &str,
        wrap: impl FnOnce(LfFwdSm90Params) -> P,
    ) -> Result<Option<Plan<P>>> {
        self.or_sm80(|| {
            let Some((_, bc, smem)) = self.hopper_module(args, false)? else {
                return Ok(None);
            };
            let module = sm90_module(family, args.dtype, args.q_layout.head_dim);
            if !ModuleCache::has_module(&module) {
                return Err(unsupported(format!("{module} in this build")));
            }
            // SAFETY: as in `sm90_plan`: a current context for the encoding.
            let _g = unsafe { CtxGuard::bind(self.ctx) }?;
            let br = LF_FWD_SM90_BR as usize;
            let base = hopper_params(args, fwd, (br, bc), args.k, &args.k_layout)?;
            Ok(Some(Plan {
                module,
                br,
                threads: LF_FWD_SM90_THREADS,
                smem,
                persistent: false,
                params: wrap(base),
            }))
        })
    }

    /// Under [`MainloopChoice::Auto`] a call the Hopper kernels cannot run goes to the sm_80
    /// mainloop (`None`); under [`MainloopChoice::Sm90`] the reason is the error.
    fn or_sm80<P>(&self, plan: impl FnOnce() -> Result<Option<P>>) -> Result<Option<P>> {
        match plan() {
            Err(Error::InvalidArgument {
                arg: "mainloop", ..
            }) if self.mainloop == MainloopChoice::Auto => Ok(None),
            r => r,
        }
    }

    /// The Hopper launch of a validated RoPE call (`fwd` its validated parameters, `lf_rope` the
    /// rotation, `rope` its raw arguments with the workspaces the keys come from), or `None` for
    /// the sm_80 mainloop.
    pub(super) fn rope_sm90_plan(
        &self,
        args: &RawForward,
        fwd: LfFwdParams,
        lf_rope: LfRope,
        rope: &RawRope,
    ) -> Result<Option<Plan<LfRopeFwdSm90Params>>> {
        self.or_sm80(|| {
            let Some((module, bc, smem)) = self.hopper_module(args, true)? else {
                return Ok(None);
            };
            // SAFETY: as in `sm90_plan`: a current context for the encoding.
            let _g = unsafe { CtxGuard::bind(self.ctx) }?;
            let k = &args.k_layout;
            let workspace = Layout::bshd(k.batch, k.seqlen, k.heads, k.head_dim);
            let base = hopper_params(
                args,
                fwd,
                (LF_FWD_SM90_BR as usize, bc),
                rope.k_rot,
                &workspace,
            )?;
            let tma_k_alt = if rope.k_alt != 0 {
                tensor_map(rope.k_alt, &workspace, args.dtype, bc)?
            } else {
                base.tma_k
            };
            Ok(Some(Plan {
                module,
                br: LF_FWD_SM90_BR as usize,
                threads: LF_FWD_SM90_THREADS,
                smem,
                persistent: false,
                params: LfRopeFwdSm90Params {
                    base,
                    tma_k_alt,
                    rope: lf_rope,
                },
            }))
        })
    }

    /// Launches a planned Hopper kernel: one CTA of the plan's threads per (query tile of the
    /// plan's rows, head, batch), or for a persistent plan one per SM.
    ///
    /// # Safety
    /// As [`Attention::forward_raw`] (and [`Attention::forward_rope_raw`] for RoPE, after its
    /// key pass on the same stream), with `plan` made from the call's validated arguments.
    pub(super) unsafe fn launch_plan<P>(
        &self,
        stream: sys::CUstream,
        args: &RawForward,
        plan: &mut Plan<P>,
    ) -> Result<()> {
        // SAFETY: the context is kept alive by `_owner` or by the caller of from_raw_context.
        let kernel = unsafe { self.cache.kernel(&plan.module, &plan.kernel(), plan.smem) }?;
        let tiles = args.q_layout.seqlen.div_ceil(plan.br);
        let (heads, batch) = (args.q_layout.heads, args.q_layout.batch);
        let items = (tiles * heads * batch).min(u32::MAX as usize) as u32;
        let grid_dim = match self.sm90_ctas {
            // A persistent kernel by construction: one CTA per SM (the kernels take a whole SM's
            // shared memory or registers), or the development aid's count.
            _ if plan.persistent => {
                let ctas = self.sm90_ctas.unwrap_or(self.sm_count);
                (ctas.min(items).max(1), 1, 1)
            }
            None => (tiles as u32, heads as u32, batch as u32),
            Some(ctas) => {
                // Only a persistent build runs more than one item per CTA; it marks its kernels.
                let marker = format!("{}_persistent", plan.kernel());
                // SAFETY: as above; the marker is an empty kernel, looked up, never launched.
                unsafe { self.cache.kernel(&plan.module, &marker, 0) }.map_err(|_| {
                    Error::InvalidArgument {
                        arg: "with_sm90_persistent",
                        value: ctas.to_string(),
                        expected: format!(
                            "kernels built with LF_SM90_PERSISTENT=1 ({} has no {marker})",
                            plan.module
                        ),
                    }
                })?;
                (ctas.min(items).max(1), 1, 1)
            }
        };
        let cfg = LaunchConfig {
            grid_dim,
            block_dim: (plan.threads, 1, 1),
            shared_mem_bytes: plan.smem,
        };
        // SAFETY: the parameters were validated and their tensor maps describe exactly the
        // validated layouts (and workspaces), whose buffers the caller guarantees; P is the
        // kernel's one by-value parameter; the grid covers every (query tile, head, batch) once:
        // one CTA each, or, for a marked persistent kernel, CTA i runs items i, i + grid, ....
        unsafe {
            self.launch(
                &kernel,
                cfg,
                stream,
                &mut plan.params,
                "launching a Hopper forward kernel",
            )
        }
    }

    /// Runs a validated forward call on the Hopper mainloop when this value's choice and the call
    /// allow it; `Ok(false)` leaves it to the sm_80 mainloop.
    ///
    /// # Safety
    /// As [`Attention::forward_raw`], with `fwd` the result of `args.validate()`.
    pub(super) unsafe fn try_forward_sm90(
        &self,
        stream: sys::CUstream,
        args: &RawForward,
        fwd: LfFwdParams,
    ) -> Result<bool> {
        let Some(mut plan) = self.sm90_plan(args, fwd)? else {
            return Ok(false);
        };
        // SAFETY: this fn's contract; the plan was made from the validated arguments.
        unsafe { self.launch_plan(stream, args, &mut plan) }?;
        Ok(true)
    }

    /// The Hopper launch of a validated variable-length call (`vp` its validated parameters), or
    /// `None` for the sm_80 mainloop: the dense Hopper kernel's tiles, with tensor maps over the
    /// packed tensors as batch 1.
    pub(super) fn varlen_sm90_plan(
        &self,
        args: &RawVarlenForward,
        vp: LfVarlenParams,
    ) -> Result<Option<Plan<LfVarlenSm90Params>>> {
        self.dense_tile_plan(&args.forward, vp.fwd, "varlen", |maps| LfVarlenSm90Params {
            vp,
            tma_q: maps.tma_q,
            tma_k: maps.tma_k,
            tma_v: maps.tma_v,
            ..LfVarlenSm90Params::default()
        })
    }

    /// Runs a validated variable-length call on the Hopper mainloop when this value's choice and
    /// the call allow it (one CTA per query tile of `max_seqlen_q` rows, head and sequence);
    /// `Ok(false)` leaves it to the sm_80 mainloop.
    ///
    /// # Safety
    /// As [`Attention::forward_varlen_raw`], with `vp` the result of `args.validate()`.
    pub(super) unsafe fn try_varlen_sm90(
        &self,
        stream: sys::CUstream,
        args: &RawVarlenForward,
        vp: LfVarlenParams,
    ) -> Result<bool> {
        let Some(mut plan) = self.varlen_sm90_plan(args, vp)? else {
            return Ok(false);
        };
        // SAFETY: the context is kept alive by `_owner` or by the caller of from_raw_context.
        let kernel = unsafe { self.cache.kernel(&plan.module, &plan.kernel(), plan.smem) }?;
        let tiles = args.max_seqlen_q.div_ceil(plan.br);
        let cfg = LaunchConfig {
            grid_dim: (
                tiles as u32,
                args.forward.q_layout.heads as u32,
                args.batch as u32,
            ),
            block_dim: (plan.threads, 1, 1),
            shared_mem_bytes: plan.smem,
        };
        // SAFETY: the parameters were validated and their tensor maps describe exactly the
        // packed layouts, whose buffers the caller guarantees (and the prefix sums and flag);
        // the kernel clamps every sequence's rows into the packed tensors; the grid covers
        // max_seqlen_q rows of every (head, sequence), the validated batch at most 65535.
        unsafe {
            self.launch(
                &kernel,
                cfg,
                stream,
                &mut plan.params,
                "launching the Hopper variable-length forward kernel",
            )
        }?;
        Ok(true)
    }
}
