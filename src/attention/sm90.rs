//! The Hopper mainloop's host side: which calls it can run, the TMA tensor maps of Q, K and V,
//! and the launch (`cuda/sm90/`, `cuda/fwd_sm90.cuh`).

use cudarc::driver::{sys, LaunchConfig};

use super::{Attention, Mainloop, MainloopChoice, RawForward, RawRope};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::loader::ModuleCache;
use crate::sys::{
    LfFwdParams, LfFwdSm90Params, LfRope, LfRopeFwdSm90Params, LfTensorMap, LF_FWD_SM90_BC_D128,
    LF_FWD_SM90_BC_D256, LF_FWD_SM90_BC_D64, LF_FWD_SM90_BC_SPARSE, LF_FWD_SM90_BR,
    LF_FWD_SM90_STAGES, LF_FWD_SM90_THREADS,
};

/// Key tile of the Hopper kernel for a head dim.
fn key_tile(head_dim: usize) -> Option<usize> {
    match head_dim {
        64 => Some(LF_FWD_SM90_BC_D64 as usize),
        128 => Some(LF_FWD_SM90_BC_D128 as usize),
        256 => Some(LF_FWD_SM90_BC_D256 as usize),
        _ => None,
    }
}

/// Dynamic shared memory of the Hopper kernel (cuda/sm90/mainloop.cuh, Sm90Traits): the Q tiles,
/// the K/V ring, the barriers and 1 KiB to align the base to a swizzle atom.
fn smem_bytes(head_dim: usize, bc: usize, q_variants: usize) -> u32 {
    let stages = LF_FWD_SM90_STAGES as usize;
    let tiles = (q_variants * LF_FWD_SM90_BR as usize + 2 * stages * bc) * head_dim * 2;
    (tiles + (1 + 3 * stages) * 8 + 1024) as u32
}

/// A 4-D tensor map (head_dim, seqlen, heads, batch) of a 16-bit tensor at `ptr` with layout
/// `l`: boxes of 64 columns by `box_rows` rows, 128-byte swizzle, zeros outside. `Err` says why
/// a tensor map cannot describe the layout.
fn tensor_map(ptr: u64, l: &Layout, dtype: DType, box_rows: usize) -> Result<LfTensorMap> {
    // Strides in bytes of the seqlen, heads and batch dimensions. A dimension of extent 1 is
    // never stepped over, so any valid stride stands in for it.
    let mut strides = [0u64; 3];
    for (i, (n, s, name)) in [
        (l.seqlen, l.seq_stride, "seq_stride"),
        (l.heads, l.head_stride, "head_stride"),
        (l.batch, l.batch_stride, "batch_stride"),
    ]
    .into_iter()
    .enumerate()
    {
        strides[i] = if n == 1 {
            16
        } else if s > 0 && (s as u64) * 2 < (1 << 40) {
            s as u64 * 2
        } else {
            return Err(unsupported(format!(
                "{name} {s}: a tensor map needs positive strides below 2^40 bytes"
            )));
        };
    }
    let dims = [
        l.head_dim as u64,
        l.seqlen as u64,
        l.heads as u64,
        l.batch as u64,
    ];
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

/// What the Hopper kernel needs beyond the validated parameters.
struct Plan {
    module: String,
    kernel: String,
    smem: u32,
    params: LfFwdSm90Params,
}

/// The same for the Hopper RoPE kernel.
pub(super) struct RopePlan {
    module: String,
    kernel: String,
    smem: u32,
    params: LfRopeFwdSm90Params,
}

/// The error of a call `MainloopChoice::Sm90` asked for that the Hopper kernels cannot run.
fn unsupported(why: String) -> Error {
    Error::InvalidArgument {
        arg: "mainloop",
        value: "MainloopChoice::Sm90".into(),
        expected: format!("a call the Hopper mainloop runs: {why}"),
    }
}

/// One CTA of LF_FWD_SM90_THREADS threads per (query tile, head, batch).
fn grid(args: &RawForward, smem: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (
            args.q_layout.seqlen.div_ceil(LF_FWD_SM90_BR as usize) as u32,
            args.q_layout.heads as u32,
            args.q_layout.batch as u32,
        ),
        block_dim: (LF_FWD_SM90_THREADS, 1, 1),
        shared_mem_bytes: smem,
    }
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

    /// The Hopper module `{family}_sm90_{dtype}_d{head_dim}` and its shared memory for a call with
    /// key tiles of `bc` keys and `q_variants` Q tiles, when this value's choice is
    /// [`MainloopChoice::Sm90`] (`None` otherwise); an error that says why when the device or the
    /// build cannot run it.
    fn hopper_module(
        &self,
        args: &RawForward,
        family: &str,
        bc: usize,
        q_variants: usize,
    ) -> Result<Option<(String, u32)>> {
        if self.mainloop != MainloopChoice::Sm90 {
            return Ok(None);
        }
        if self.compute_capability != (9, 0) {
            return Err(unsupported(format!(
                "a device of compute capability 9.0 (this one is {}.{})",
                self.compute_capability.0, self.compute_capability.1
            )));
        }
        let d = args.q_layout.head_dim;
        let module = format!("{family}_sm90_{}_d{d}", args.dtype.name());
        if !ModuleCache::has_module(&module) {
            return Err(unsupported(format!(
                "a kernel built for this call ({module} is not in this build: sm_90a targets, \
                 head dims 64/128/256, 64/128 with RoPE)"
            )));
        }
        let smem = smem_bytes(d, bc, q_variants);
        if smem > self.max_smem_optin {
            return Err(unsupported(format!(
                "{smem} bytes of shared memory per block (the device allows {})",
                self.max_smem_optin
            )));
        }
        Ok(Some((module, smem)))
    }

    /// The Hopper launch of a validated call, or `None` for the sm_80 mainloop.
    fn sm90_plan(&self, args: &RawForward, fwd: LfFwdParams) -> Result<Option<Plan>> {
        let d = args.q_layout.head_dim;
        // A block mask's key blocks are the sparse kernel's key tiles.
        let (family, bc) = match args.block_mask {
            None => ("fwd", key_tile(d).unwrap_or(LF_FWD_SM90_BC_SPARSE as usize)),
            Some(_) => ("sparse", LF_FWD_SM90_BC_SPARSE as usize),
        };
        let Some((module, smem)) = self.hopper_module(args, family, bc, 1)? else {
            return Ok(None);
        };
        let params = LfFwdSm90Params {
            fwd,
            tma_q: tensor_map(args.q, &args.q_layout, args.dtype, LF_FWD_SM90_BR as usize)?,
            tma_k: tensor_map(args.k, &args.k_layout, args.dtype, bc)?,
            tma_v: tensor_map(args.v, &args.v_layout, args.dtype, bc)?,
            ..LfFwdSm90Params::default()
        };
        Ok(Some(Plan {
            kernel: format!("lf_{module}"),
            module,
            smem,
            params,
        }))
    }

    /// The Hopper launch of a validated RoPE call (`fwd` its validated parameters, `lf_rope` the
    /// rotation, `rope` its raw arguments with the workspaces), or `None` for the sm_80 mainloop.
    pub(super) fn rope_sm90_plan(
        &self,
        args: &RawForward,
        fwd: LfFwdParams,
        lf_rope: LfRope,
        rope: &RawRope,
    ) -> Result<Option<RopePlan>> {
        let d = args.q_layout.head_dim;
        let (family, bc) = match args.block_mask {
            None => (
                "rope",
                key_tile(d).unwrap_or(LF_FWD_SM90_BC_SPARSE as usize),
            ),
            Some(_) => ("rope_sparse", LF_FWD_SM90_BC_SPARSE as usize),
        };
        let Some((module, smem)) = self.hopper_module(args, family, bc, 2)? else {
            return Ok(None);
        };
        let k = &args.k_layout;
        let workspace = Layout::bshd(k.batch, k.seqlen, k.heads, k.head_dim);
        let tma_k = tensor_map(rope.k_rot, &workspace, args.dtype, bc)?;
        let tma_k_alt = if rope.k_alt != 0 {
            tensor_map(rope.k_alt, &workspace, args.dtype, bc)?
        } else {
            tma_k
        };
        let params = LfRopeFwdSm90Params {
            base: LfFwdSm90Params {
                fwd,
                tma_q: tensor_map(args.q, &args.q_layout, args.dtype, LF_FWD_SM90_BR as usize)?,
                tma_k,
                tma_v: tensor_map(args.v, &args.v_layout, args.dtype, bc)?,
                ..LfFwdSm90Params::default()
            },
            tma_k_alt,
            rope: lf_rope,
        };
        Ok(Some(RopePlan {
            kernel: format!("lf_{module}"),
            module,
            smem,
            params,
        }))
    }

    /// Launches a planned Hopper RoPE forward (after the key pass, on the same stream).
    ///
    /// # Safety
    /// As [`Attention::forward_rope_raw`], with `plan` made from its validated arguments.
    pub(super) unsafe fn launch_rope_sm90(
        &self,
        stream: sys::CUstream,
        args: &RawForward,
        plan: &mut RopePlan,
    ) -> Result<()> {
        // SAFETY: the context is kept alive by `_owner` or by the caller of from_raw_context.
        let kernel = unsafe { self.cache.kernel(&plan.module, &plan.kernel, plan.smem) }?;
        let cfg = grid(args, plan.smem);
        // SAFETY: as forward_rope_raw's sm_80 launch: validated parameters whose tensor maps
        // describe exactly the validated layouts and workspaces; LfRopeFwdSm90Params is the
        // kernel's one by-value parameter; the grid covers every (query tile, head, batch) once.
        unsafe {
            self.launch(
                &kernel,
                cfg,
                stream,
                &mut plan.params,
                "launching the Hopper RoPE forward kernel",
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
        // SAFETY: the context is kept alive by `_owner` or by the caller of from_raw_context.
        let kernel = unsafe { self.cache.kernel(&plan.module, &plan.kernel, plan.smem) }?;
        let cfg = grid(args, plan.smem);
        // SAFETY: the parameters were validated (the tensor maps describe exactly the validated
        // layouts, whose buffers the caller guarantees); LfFwdSm90Params is the kernel's one
        // by-value parameter; the grid covers every (query tile, head, batch) once.
        unsafe {
            self.launch(
                &kernel,
                cfg,
                stream,
                &mut plan.params,
                "launching the Hopper forward kernel",
            )
        }?;
        Ok(true)
    }
}
