//! The backward's kernel choice and launches: which main kernel a call runs (its tiles, shared
//! memory, and the taller query steps where the device allows them), whether the device can run
//! it, and the kernels queued on the stream (pre-pass, main kernel, then the dQ conversion or the
//! deterministic dQ pass). Validation and the entry points are in `backward.rs`.

use cudarc::driver::{sys, LaunchConfig};

use super::backward::RawBackward;
use super::{Attention, SUPPORTED_HEAD_DIMS};
use crate::error::{Error, Result};
use crate::plan::{backward_dq_tile_shape, backward_tall_tile_shape, backward_tile_shape};
use crate::sys::{
    LfBlockSparse, LfBwdParams, LfBwdSparseParams, LF_BWD_AUX_THREADS, LF_BWD_DQ_BR,
    LF_BWD_DQ_WARPS, LF_BWD_ROW_PAD, LF_BWD_SPARSE_BC, LF_BWD_WARPS,
};

/// Dynamic shared memory of a main kernel of tile shape `t` at head dim `d` (tile_plan.h's
/// LF_BWD_SMEM_BYTES).
fn main_smem(d: usize, t: crate::plan::TileShape) -> u32 {
    (((2 * t.bc + 4 * t.br) * d + 2 * t.bc * t.br) * 2 + 16 * t.br) as u32
}

/// Whether dense backward calls may take the kernels with taller query steps
/// (`backward_tall_tile_shape`): with `LONGFLASH_BWD_TALL=1` in the environment, read once. They are
/// off by default until they have passed the GPU suite and its sanitizers on a Hopper device and
/// their benchmark has measured them against the shorter steps; the switch lets one build time
/// both in one run.
fn tall_kernels_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("LONGFLASH_BWD_TALL").is_ok_and(|v| v == "1"))
}

/// The main kernel a backward call runs.
#[derive(Clone, Copy, Debug)]
pub(super) struct MainKernel {
    /// Its tiles.
    pub shape: crate::plan::TileShape,
    /// Its dynamic shared memory in bytes.
    pub smem: u32,
    /// The dense kernel with taller query steps (module `bwd_<dtype>_d<D>_tall`).
    pub tall: bool,
}

/// Dynamic shared memory of the deterministic dQ pass at head dim `d` (LF_BWD_DQ_SMEM_BYTES).
fn dq_smem(d: usize) -> Option<u32> {
    let t = backward_dq_tile_shape(d)?;
    Some(((2 * t.br + 4 * t.bc) * d * 2) as u32)
}

impl Attention {
    /// The main kernel's tile shape and shared memory for `args` (the block-sparse kernel's with
    /// `sparse`) and the dQ pass's shared memory, or the error that says why this device cannot
    /// run them (a head dim without kernels, or more shared
    /// memory than the device gives a block): what a launch checks first, and what a caller that
    /// launches other kernels before the backward's checks before any of them.
    pub(super) fn backward_fits(
        &self,
        args: &RawBackward,
        sparse: bool,
    ) -> Result<(MainKernel, u32)> {
        let d = args.q_layout.head_dim;
        let unsupported = Error::UnsupportedHeadDim {
            arg: "q.head_dim",
            value: d,
            supported: SUPPORTED_HEAD_DIMS,
        };
        let (Some(mut shape), Some(smem_dq)) = (backward_tile_shape(d), dq_smem(d)) else {
            return Err(unsupported);
        };
        if sparse {
            shape.bc = LF_BWD_SPARSE_BC as usize;
        }
        let mut main = MainKernel {
            shape,
            smem: main_smem(d, shape),
            tall: false,
        };
        // The taller query steps where the device gives a block their shared memory, when
        // switched on (see `tall_kernels_on`).
        if let Some(tall) = backward_tall_tile_shape(d).filter(|_| !sparse && tall_kernels_on()) {
            let smem = main_smem(d, tall);
            if smem <= self.max_smem_optin {
                main = MainKernel {
                    shape: tall,
                    smem,
                    tall: true,
                };
            }
        }
        let smem = main.smem;
        let needed = if args.options.deterministic {
            smem.max(smem_dq)
        } else {
            smem
        };
        if needed > self.max_smem_optin {
            return Err(Error::InvalidArgument {
                arg: "q.head_dim",
                value: d.to_string(),
                expected: format!(
                    "a head dim whose backward fits the device's {} bytes of shared memory per \
                     block (needs {needed})",
                    self.max_smem_optin
                ),
            });
        }
        Ok((main, smem_dq))
    }

    /// Launches the backward's kernels for validated `params` (of `args`): the dense plan's, or
    /// with `sparse` (the block mask's CSR rows and key-major columns, lowered for this call) the
    /// block-sparse main kernel and dQ pass.
    ///
    /// # Safety
    /// As [`backward_raw`](Self::backward_raw), with `params` from `args`'s validation, and the
    /// arrays of `sparse` a well-formed block mask and its key-major view for this call's shape.
    pub(super) unsafe fn launch_backward(
        &self,
        stream: sys::CUstream,
        args: &RawBackward,
        mut params: LfBwdParams,
        sparse: Option<(LfBlockSparse, LfBlockSparse)>,
    ) -> Result<()> {
        let d = args.q_layout.head_dim;
        let (main_kernel, smem_dq) = self.backward_fits(args, sparse.is_some())?;
        let (shape, smem) = (main_kernel.shape, main_kernel.smem);
        let deterministic = args.options.deterministic;
        let module = format!("bwd_{}_d{d}", args.dtype.name());
        let (q, k) = (&args.q_layout, &args.k_layout);
        let row_blocks = (params.rows_pad as u32) / LF_BWD_ROW_PAD;
        let aux = |name: &str| -> Result<_> {
            // SAFETY: the context is kept alive by `_owner` or by the caller of
            // from_raw_context.
            let kernel = unsafe { self.cache.kernel(&module, &format!("lf_{module}{name}"), 0) }?;
            Ok((
                kernel,
                LaunchConfig {
                    grid_dim: (row_blocks, q.heads as u32, q.batch as u32),
                    block_dim: (LF_BWD_AUX_THREADS, 1, 1),
                    shared_mem_bytes: 0,
                },
            ))
        };

        let (pre, pre_cfg) = aux("_pre")?;
        // SAFETY: `params` came from `args.validate()` and is each kernel's one by-value
        // parameter (LfBwdParams of params.h); its pointers and the stream are valid per this
        // fn's contract, the workspace holds the rows the grid covers (rows_pad per head), and
        // each grid covers the work its kernel expects (cuda/bwd.cuh).
        unsafe {
            self.launch(
                &pre,
                pre_cfg,
                stream,
                &mut params,
                "launching the backward pre-pass",
            )
        }?;

        // The block-sparse kernels take the dense parameters and the mask in both orders.
        let main_module = match sparse {
            Some(_) => format!("bwd_sparse_{}_d{d}", args.dtype.name()),
            None if main_kernel.tall => format!("{module}_tall"),
            None => module.clone(),
        };
        let mut sparse_params = sparse.map(|(rows, cols)| LfBwdSparseParams {
            bwd: params,
            rows,
            cols,
        });
        // SAFETY: as above (LfBwdSparseParams of params.h for the block-sparse kernels).
        let mut run = |kernel: &_, cfg, params: &mut LfBwdParams, what| unsafe {
            match sparse_params.as_mut() {
                Some(sp) => self.launch(kernel, cfg, stream, sp, what),
                None => self.launch(kernel, cfg, stream, params, what),
            }
        };
        let key_tiles = match sparse {
            Some(_) => k.seqlen.div_ceil(LF_BWD_SPARSE_BC as usize),
            None => k.seqlen.div_ceil(shape.bc),
        };
        // SAFETY: as above.
        let main = unsafe {
            self.cache
                .kernel(&main_module, &format!("lf_{main_module}"), smem)
        }?;
        let main_cfg = LaunchConfig {
            grid_dim: (key_tiles as u32, k.heads as u32, q.batch as u32),
            block_dim: (LF_BWD_WARPS * 32, 1, 1),
            shared_mem_bytes: smem,
        };
        run(
            &main,
            main_cfg,
            &mut params,
            "launching the backward kernel",
        )?;

        if deterministic {
            // The dQ pass lives beside the 64-row main kernel, dense or sparse.
            let dq_module = match sparse {
                Some(_) => &main_module,
                None => &module,
            };
            // SAFETY: as above.
            let dq = unsafe {
                self.cache
                    .kernel(dq_module, &format!("lf_{dq_module}_dq"), smem_dq)
            }?;
            let dq_cfg = LaunchConfig {
                grid_dim: (
                    q.seqlen.div_ceil(LF_BWD_DQ_BR as usize) as u32,
                    q.heads as u32,
                    q.batch as u32,
                ),
                block_dim: (LF_BWD_DQ_WARPS * 32, 1, 1),
                shared_mem_bytes: smem_dq,
            };
            run(&dq, dq_cfg, &mut params, "launching the backward dQ pass")
        } else {
            let (convert, cfg) = aux("_convert")?;
            // SAFETY: as above; the main kernel, queued before on the same stream, has filled
            // the accumulator.
            unsafe {
                self.launch(
                    &convert,
                    cfg,
                    stream,
                    &mut params,
                    "launching the dQ conversion",
                )
            }
        }
    }
}
