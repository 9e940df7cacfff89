//! Dynamic block selection on the GPU: each query block's top-k key blocks by the score of
//! mean-pooled summaries, written as the device CSR the block-sparse forward reads, with no host
//! round trip. The device counterpart of [`crate::sparse::select_blocks`], whose rule it follows
//! (MoBA's: mean-pooled keys per block of [`K_BLOCK`] keys, and here the query block of
//! [`Q_BLOCK`] rows mean-pooled too; the blocks the element mask cuts are always kept; among the
//! blocks it leaves whole, the `top_k` with the largest `mean(q) . mean(k)`, ties to the lower
//! block). It generalizes memory attention's top-k retrieval to a sequence's own past: the
//! "memory" is the earlier key blocks, retrieved per query block instead of per query.
//!
//! A [`BlockSelectPlan`] depends only on the shape, the element mask and `top_k`: its universe
//! (the key blocks the element mask leaves anything of, one row per query block, shared by every
//! head and batch entry) and the output's row offsets (each row's partial blocks plus
//! `min(top_k, whole blocks)`) are known on the host, so the kernels only fill the rows. Make it
//! once per shape ([`Attention::block_selector`] puts it on the device) and select per call
//! ([`Attention::select_blocks`], then [`Attention::forward_selected`]).
//!
//! Two kernels (`cuda/select.cuh`): a pooling pass writes the f32 means of Q's query blocks and
//! K's key blocks into a workspace; the selection pass scores each query block's whole blocks
//! (f32 dot products of the means), finds the top-k threshold exactly, and writes the row.

use std::sync::Arc;

use cudarc::driver::{sys, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig};

use super::{Attention, Input, Output, Scratch};
use crate::check::{aligned, byte_range, mismatch, overlaps, strides_multiple_of};
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::mask::MaskSpec;
use crate::sparse::{upload_list, BlockMask, MaskShape, K_BLOCK, Q_BLOCK};
use crate::sys::{LfBlockMeansParams, LfBlockSelectParams};

/// Threads of both kernels' CTAs (`kSelectThreads` in `cuda/select.cuh`).
const THREADS: u32 = 128;

/// The selection kernel's shared-memory limit, set once for every call (the kernel takes 4 bytes
/// per entry of the longest universe row): 96 KiB, which every sm_80+ device grants.
const SELECT_SMEM: usize = 96 * 1024;

/// The longest universe row the selection takes (key blocks a query block may see): 24,576
/// blocks of [`K_BLOCK`] keys, 1.5M keys.
pub const MAX_SELECT_ROW: usize = SELECT_SMEM / 4;

/// Alignment of the workspace's second part (the key means).
const PART_ALIGN: usize = 256;

/// What a dynamic block selection computes, known on the host: the shape, the element mask,
/// `top_k`, the universe and the output's row offsets (see the [module](self) docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockSelectPlan {
    shape: MaskShape,
    top_k: usize,
    universe: BlockMask,
    row_offsets: Vec<i32>,
    max_row: usize,
}

impl BlockSelectPlan {
    /// The plan for queries of `shape.heads` heads (`shape.batch` entries, `shape.seqlen_q`
    /// rows) over `shape.seqlen_k` keys under `element`, keeping `top_k` whole blocks per query
    /// block besides its partial ones.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for `top_k` 0, a universe row longer than [`MAX_SELECT_ROW`],
    /// or more than `i32::MAX` selected blocks; the errors of [`BlockMask::from_fn`] for the
    /// shape and the element mask.
    pub fn new(shape: MaskShape, element: MaskSpec, top_k: usize) -> Result<Self> {
        if top_k == 0 {
            return Err(Error::InvalidArgument {
                arg: "top_k",
                value: "0".into(),
                expected: "at least one block".into(),
            });
        }
        shape.check()?;
        let universe = BlockMask::from_fn(
            MaskShape {
                batch: 1,
                heads: 1,
                ..shape
            },
            element,
            |_, _, _, _| true,
        )?;
        let nqb = shape.num_q_blocks();
        let (offsets, full) = (universe.row_offsets(), universe.full_flags());
        let mut counts = Vec::with_capacity(nqb);
        let mut max_row = 0;
        for qb in 0..nqb {
            let (lo, hi) = (offsets[qb] as usize, offsets[qb + 1] as usize);
            let whole = full[lo..hi].iter().filter(|&&f| f != 0).count();
            counts.push((hi - lo - whole) + whole.min(top_k));
            max_row = max_row.max(hi - lo);
        }
        if max_row > MAX_SELECT_ROW {
            return Err(Error::InvalidArgument {
                arg: "shape.seqlen_k",
                value: shape.seqlen_k.to_string(),
                expected: format!(
                    "at most {MAX_SELECT_ROW} key blocks visible to a query block ({} keys)",
                    MAX_SELECT_ROW * K_BLOCK
                ),
            });
        }
        let mut row_offsets = Vec::with_capacity(shape.rows() + 1);
        row_offsets.push(0i32);
        let mut at = 0usize;
        for _ in 0..shape.batch * shape.heads {
            for &c in &counts {
                at += c;
                let n = i32::try_from(at).map_err(|_| Error::InvalidArgument {
                    arg: "shape",
                    value: format!("{shape:?}"),
                    expected: "at most i32::MAX selected blocks in all".into(),
                })?;
                row_offsets.push(n);
            }
        }
        Ok(BlockSelectPlan {
            shape,
            top_k,
            universe,
            row_offsets,
            max_row,
        })
    }

    /// The call shape (batch, query heads, query and key lengths).
    pub fn shape(&self) -> MaskShape {
        self.shape
    }

    /// The element mask.
    pub fn element_mask(&self) -> MaskSpec {
        self.universe.element_mask()
    }

    /// Whole blocks kept per query block (at most).
    pub fn top_k(&self) -> usize {
        self.top_k
    }

    /// The universe: every key block the element mask leaves anything of, one row per query
    /// block (a mask of batch 1 and 1 head, shared by every batch entry and head).
    pub fn universe(&self) -> &BlockMask {
        &self.universe
    }

    /// The output's CSR row offsets, `shape.rows() + 1` entries.
    pub fn row_offsets(&self) -> &[i32] {
        &self.row_offsets
    }

    /// Blocks the output lists in all.
    pub fn nnz(&self) -> usize {
        *self.row_offsets.last().unwrap_or(&0) as usize
    }

    /// Entries of the longest universe row.
    pub fn max_row(&self) -> usize {
        self.max_row
    }

    /// Bytes of device workspace [`Attention::select_blocks_raw`] needs for keys of `heads_kv`
    /// heads of `head_dim`: the f32 means of every query block and every key block.
    pub fn workspace_bytes(&self, heads_kv: usize, head_dim: usize) -> usize {
        let (q, k) = means_bytes(&self.shape, heads_kv, head_dim);
        q.next_multiple_of(PART_ALIGN) + k
    }
}

/// Bytes of the query means and of the key means.
fn means_bytes(s: &MaskShape, heads_kv: usize, head_dim: usize) -> (usize, usize) {
    (
        s.batch * s.heads * s.num_q_blocks() * head_dim * 4,
        s.batch * heads_kv * s.num_k_blocks() * head_dim * 4,
    )
}

/// A [`BlockSelectPlan`] on the device (the universe and the output's row offsets), made by
/// [`Attention::block_selector`].
pub struct BlockSelector {
    plan: BlockSelectPlan,
    uni_offsets: CudaSlice<i32>,
    uni_cols: CudaSlice<i32>,
    uni_full: CudaSlice<u8>,
    row_offsets: CudaSlice<i32>,
}

impl BlockSelector {
    /// The host plan.
    pub fn plan(&self) -> &BlockSelectPlan {
        &self.plan
    }
}

/// The result of a selection: a block mask of the plan's shape and element mask in device CSR
/// form (row offsets, ascending key blocks, full flags), read by
/// [`Attention::forward_selected`] or copied to the host by [`to_host`](Self::to_host).
pub struct SelectedBlocks {
    shape: MaskShape,
    element: MaskSpec,
    pub(crate) row_offsets: CudaSlice<i32>,
    pub(crate) col_indices: CudaSlice<i32>,
    pub(crate) full: CudaSlice<u8>,
    nnz: usize,
}

impl SelectedBlocks {
    /// The call shape.
    pub fn shape(&self) -> MaskShape {
        self.shape
    }

    /// The element mask.
    pub fn element_mask(&self) -> MaskSpec {
        self.element
    }

    /// Blocks listed in all.
    pub fn nnz(&self) -> usize {
        self.nnz
    }

    /// The selection as a host [`BlockMask`] (a copy to the host: waits for `stream`). The
    /// CSR is validated by [`BlockMask::from_csr`], and the device's full flags must be the ones
    /// it computes.
    pub fn to_host(&self, stream: &Arc<CudaStream>) -> Result<BlockMask> {
        let d = |what| Error::driver(what);
        let offsets = stream
            .clone_dtoh(&self.row_offsets)
            .map_err(d("copying the selection's row offsets"))?;
        let mut cols = stream
            .clone_dtoh(&self.col_indices)
            .map_err(d("copying the selection's blocks"))?;
        let mut full = stream
            .clone_dtoh(&self.full)
            .map_err(d("copying the selection's flags"))?;
        cols.truncate(self.nnz);
        full.truncate(self.nnz);
        let mask = BlockMask::from_csr(self.shape, self.element, offsets, cols)?;
        if mask.full_flags() != full.as_slice() {
            return Err(Error::InvalidArgument {
                arg: "full",
                value: "flags unlike the element mask's".into(),
                expected: "each block's flag as the element mask classifies it".into(),
            });
        }
        Ok(mask)
    }
}

/// Options of a forward over a selection (see [`Attention::forward_selected`]).
#[derive(Clone, Copy)]
pub struct SelectedOptions<'a> {
    /// The selection (with its element mask), on the device.
    pub blocks: &'a SelectedBlocks,
    /// Multiplies Q K^T before the softmax; `None` means `1 / sqrt(head_dim)`.
    pub softmax_scale: Option<f32>,
}

/// A dynamic block selection from raw device pointers (see [`Attention::select_blocks_raw`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RawBlockSelect {
    /// Element type of the queries and keys.
    pub dtype: DType,
    /// Queries `[batch, seqlen_q, heads_q, head_dim]`.
    pub q: sys::CUdeviceptr,
    /// Layout of the queries.
    pub q_layout: Layout,
    /// Keys `[batch, seqlen_k, heads_kv, head_dim]` (`heads_q` a multiple of `heads_kv`).
    pub k: sys::CUdeviceptr,
    /// Layout of the keys.
    pub k_layout: Layout,
    /// The universe's CSR (one row per query block: [`BlockSelectPlan::universe`]): row offsets
    /// (`num_q_blocks + 1` i32), ascending key blocks (i32) and full flags (u8).
    pub universe_offsets: sys::CUdeviceptr,
    /// The universe's key blocks.
    pub universe_cols: sys::CUdeviceptr,
    /// The universe's full flags.
    pub universe_full: sys::CUdeviceptr,
    /// Entries of the universe's lists ([`BlockMask::nnz`] of the universe).
    pub universe_len: usize,
    /// The longest universe row ([`BlockSelectPlan::max_row`]), at most [`MAX_SELECT_ROW`].
    pub max_row: usize,
    /// Whole blocks kept per query block.
    pub top_k: usize,
    /// The output's row offsets (`batch * heads_q * num_q_blocks + 1` i32:
    /// [`BlockSelectPlan::row_offsets`]), read.
    pub out_offsets: sys::CUdeviceptr,
    /// Output: the rows' key blocks (i32, `out_len` entries).
    pub out_cols: sys::CUdeviceptr,
    /// Output: their full flags (u8, `out_len` entries).
    pub out_full: sys::CUdeviceptr,
    /// Entries of the output lists ([`BlockSelectPlan::nnz`]).
    pub out_len: usize,
    /// Device workspace of [`BlockSelectPlan::workspace_bytes`] bytes, 16-byte aligned.
    pub workspace: sys::CUdeviceptr,
    /// Bytes at `workspace`.
    pub workspace_bytes: usize,
    /// Device pointer to an i32 the kernel ORs 1 into when the device lists disagree with the
    /// arguments (an offset outside the lists, a block outside the keys, a row whose kept count
    /// is not its room in `out_offsets`), or 0. Nothing outside the lists is read or written.
    pub error_flag: sys::CUdeviceptr,
}

/// The lowered launches of a selection: the two pooling passes and the selection.
struct Lowered {
    q_means: LfBlockMeansParams,
    k_means: LfBlockMeansParams,
    select: LfBlockSelectParams,
}

impl RawBlockSelect {
    /// Checks the selection and lowers it to the kernels' parameters: every error
    /// [`Attention::select_blocks_raw`] returns before its launches.
    fn lower(&self) -> Result<Lowered> {
        let (q, k) = (&self.q_layout, &self.k_layout);
        q.check_dims("q")?;
        k.check_dims("k")?;
        mismatch("k.batch", k.batch, "q.batch", q.batch)?;
        mismatch("k.head_dim", k.head_dim, "q.head_dim", q.head_dim)?;
        if q.heads % k.heads != 0 {
            return Err(Error::InvalidArgument {
                arg: "q.heads",
                value: q.heads.to_string(),
                expected: format!("a multiple of k.heads ({})", k.heads),
            });
        }
        let d = q.head_dim;
        if d % 2 != 0 || d > 256 {
            return Err(Error::InvalidArgument {
                arg: "q.head_dim",
                value: d.to_string(),
                expected: "an even head dim up to 256".into(),
            });
        }
        if self.top_k == 0 {
            return Err(Error::InvalidArgument {
                arg: "top_k",
                value: "0".into(),
                expected: "at least one block".into(),
            });
        }
        if self.max_row > MAX_SELECT_ROW {
            return Err(Error::InvalidArgument {
                arg: "max_row",
                value: self.max_row.to_string(),
                expected: format!("at most {MAX_SELECT_ROW}"),
            });
        }
        let shape = MaskShape {
            batch: q.batch,
            heads: q.heads,
            seqlen_q: q.seqlen,
            seqlen_k: k.seqlen,
        };
        shape.check()?;
        let (nqb, nkb) = (shape.num_q_blocks(), shape.num_k_blocks());
        if q.heads > 65535 || q.batch > 65535 || nqb > i32::MAX as usize {
            return Err(Error::InvalidArgument {
                arg: "q",
                value: format!("{} heads, batch {}", q.heads, q.batch),
                expected: "at most 65535 heads and 65535 batch entries".into(),
            });
        }
        for (arg, n) in [
            ("universe_len", self.universe_len),
            ("out_len", self.out_len),
        ] {
            if n > i32::MAX as usize {
                return Err(Error::InvalidArgument {
                    arg,
                    value: n.to_string(),
                    expected: "at most i32::MAX entries".into(),
                });
            }
        }
        aligned("q.ptr", self.q, 4, true)?;
        aligned("k.ptr", self.k, 4, true)?;
        strides_multiple_of("q", q, 2)?;
        strides_multiple_of("k", k, 2)?;
        aligned("universe_offsets", self.universe_offsets, 4, true)?;
        aligned("universe_cols", self.universe_cols, 4, true)?;
        aligned("universe_full", self.universe_full, 1, true)?;
        aligned("out_offsets", self.out_offsets, 4, true)?;
        aligned("out_cols", self.out_cols, 4, true)?;
        aligned("out_full", self.out_full, 1, true)?;
        aligned("error_flag", self.error_flag, 4, false)?;
        aligned("workspace", self.workspace, 16, true)?;
        let (q_bytes, k_bytes) = means_bytes(&shape, k.heads, d);
        let need = q_bytes.next_multiple_of(PART_ALIGN) + k_bytes;
        if self.workspace_bytes < need {
            return Err(Error::InvalidArgument {
                arg: "workspace_bytes",
                value: self.workspace_bytes.to_string(),
                expected: format!("at least {need} bytes (BlockSelectPlan::workspace_bytes)"),
            });
        }
        let span = |p: u64, bytes: usize| (p as i128, p as i128 + bytes as i128);
        let reads = [
            ("q", byte_range(self.q, q, 2)),
            ("k", byte_range(self.k, k, 2)),
            (
                "universe_offsets",
                span(self.universe_offsets, (nqb + 1) * 4),
            ),
            (
                "universe_cols",
                span(self.universe_cols, self.universe_len * 4),
            ),
            ("universe_full", span(self.universe_full, self.universe_len)),
            (
                "out_offsets",
                span(self.out_offsets, (shape.rows() + 1) * 4),
            ),
        ];
        let writes = [
            ("out_cols", span(self.out_cols, self.out_len * 4)),
            ("out_full", span(self.out_full, self.out_len)),
            ("workspace", span(self.workspace, need)),
        ];
        for (i, &(output, w)) in writes.iter().enumerate() {
            for &(other, r) in reads.iter().chain(&writes[i + 1..]) {
                if overlaps(w, r) {
                    return Err(Error::Aliasing { output, other });
                }
            }
        }
        let k_means = self.workspace + q_bytes.next_multiple_of(PART_ALIGN) as u64;
        let means = |x: u64, l: &Layout, out: u64, block: usize| LfBlockMeansParams {
            x: x as *const _,
            means: out as *mut f32,
            batch_stride: l.batch_stride,
            row_stride: l.seq_stride,
            head_stride: l.head_stride,
            batch: l.batch as i32,
            seqlen: l.seqlen as i32,
            heads: l.heads as i32,
            head_dim: l.head_dim as i32,
            block: block as i32,
            reserved: 0,
        };
        Ok(Lowered {
            q_means: means(self.q, q, self.workspace, Q_BLOCK),
            k_means: means(self.k, k, k_means, K_BLOCK),
            select: LfBlockSelectParams {
                q_means: self.workspace as *const f32,
                k_means: k_means as *const f32,
                uni_offsets: self.universe_offsets as *const i32,
                uni_cols: self.universe_cols as *const i32,
                uni_full: self.universe_full as *const u8,
                out_offsets: self.out_offsets as *const i32,
                out_cols: self.out_cols as *mut i32,
                out_full: self.out_full as *mut u8,
                error_flag: self.error_flag as *mut i32,
                batch: q.batch as i32,
                heads_q: q.heads as i32,
                heads_kv: k.heads as i32,
                head_dim: d as i32,
                num_q_blocks: nqb as i32,
                num_k_blocks: nkb as i32,
                top_k: self.top_k.min(i32::MAX as usize) as i32,
                max_row: self.max_row as i32,
                uni_len: self.universe_len as i32,
                out_len: self.out_len as i32,
            },
        })
    }

    /// Checks the selection (shapes, head dim, `top_k`, alignment, the workspace's size, outputs
    /// that overlap an input or each other): every error [`Attention::select_blocks_raw`]
    /// returns before its launches.
    pub fn validate(&self) -> Result<()> {
        self.lower().map(|_| ())
    }
}

impl Attention {
    /// Puts a [`BlockSelectPlan`] on `stream`'s device (its universe and row offsets).
    pub fn block_selector(
        &self,
        stream: &Arc<CudaStream>,
        plan: BlockSelectPlan,
    ) -> Result<BlockSelector> {
        self.same_context("stream", stream.context().cu_ctx())?;
        let u = &plan.universe;
        let uni_cols = upload_list(stream, u.col_indices(), "copying the universe's blocks")?;
        let uni_full = upload_list(stream, u.full_flags(), "copying the universe's flags")?;
        let uni_offsets = upload_list(stream, u.row_offsets(), "copying the universe's offsets")?;
        let row_offsets =
            upload_list(stream, &plan.row_offsets, "copying the selection's offsets")?;
        Ok(BlockSelector {
            plan,
            uni_offsets,
            uni_cols,
            uni_full,
            row_offsets,
        })
    }

    /// Selects each query block's key blocks on the GPU (see the [module](self) docs): `q` and
    /// `k` as the forward takes them, shaped as the selector's plan (`q.heads` its heads, the
    /// batch and lengths its own). Scores are f32 dot products of f32 block means (+0 and -0
    /// equal). The outputs and the means' workspace are allocated on `stream`; nothing waits.
    pub fn select_blocks<T: Element>(
        &self,
        stream: &Arc<CudaStream>,
        selector: &BlockSelector,
        q: Input<'_, '_, T>,
        k: Input<'_, '_, T>,
    ) -> Result<SelectedBlocks> {
        self.same_context("stream", stream.context().cu_ctx())?;
        self.same_context("selector", selector.row_offsets.stream().context().cu_ctx())?;
        self.check_view("q", q.data, &q.layout)?;
        self.check_view("k", k.data, &k.layout)?;
        let plan = &selector.plan;
        plan_matches(plan, &q.layout, &k.layout)?;
        let nnz = plan.nnz();
        let alloc = |what| Error::driver(what);
        let mut cols = stream
            .alloc_zeros::<i32>(nnz.max(1))
            .map_err(alloc("allocating the selection's blocks"))?;
        let mut full = stream
            .alloc_zeros::<u8>(nnz.max(1))
            .map_err(alloc("allocating the selection's flags"))?;
        let row_offsets = stream
            .clone_dtod(&selector.row_offsets)
            .map_err(alloc("copying the selection's offsets"))?;
        let bytes = plan.workspace_bytes(k.layout.heads, k.layout.head_dim);
        {
            let (qp, _g1) = q.data.device_ptr(stream);
            let (kp, _g2) = k.data.device_ptr(stream);
            let (uo, _g3) = selector.uni_offsets.device_ptr(stream);
            let (uc, _g4) = selector.uni_cols.device_ptr(stream);
            let (uf, _g5) = selector.uni_full.device_ptr(stream);
            let (oo, _g6) = row_offsets.device_ptr(stream);
            let (oc, _g7) = cols.device_ptr_mut(stream);
            let (of, _g8) = full.device_ptr_mut(stream);
            let mut args = RawBlockSelect {
                dtype: T::DTYPE,
                q: qp,
                q_layout: q.layout,
                k: kp,
                k_layout: k.layout,
                universe_offsets: uo,
                universe_cols: uc,
                universe_full: uf,
                universe_len: plan.universe.nnz(),
                max_row: plan.max_row,
                top_k: plan.top_k,
                out_offsets: oo,
                out_cols: oc,
                out_full: of,
                out_len: nnz,
                workspace: 16,
                workspace_bytes: usize::MAX,
                error_flag: 0,
            };
            // Everything but the workspace, before allocating it.
            args.validate()?;
            // SAFETY: `stream` belongs to this context (checked above).
            let scratch = unsafe { Scratch::new(self.ctx, stream.cu_stream(), bytes) }?;
            args.workspace = scratch.ptr;
            args.workspace_bytes = scratch.bytes;
            // SAFETY: the views were checked against their layouts and this context, the lists
            // are the selector's (made from its plan, which matches this call) and the outputs
            // were just allocated with the plan's sizes; the workspace is freed after the
            // kernels in stream order, and the guards order the launches against other streams.
            unsafe { self.select_blocks_raw(stream.cu_stream(), &args) }?;
        }
        Ok(SelectedBlocks {
            shape: plan.shape,
            element: plan.element_mask(),
            row_offsets,
            col_indices: cols,
            full,
            nnz,
        })
    }

    /// The selection from raw pointers (see [`select_blocks`](Self::select_blocks)); validates as
    /// [`RawBlockSelect::validate`]. Allocates nothing.
    ///
    /// # Safety
    /// `stream` belongs to this value's context; `q` and `k` hold every element their layouts
    /// address, the universe and output pointers the entries their fields name (the universe and
    /// offsets as a [`BlockSelectPlan`] for this shape, element mask and `top_k` gives them, or
    /// the error flag is set and the rows are left incomplete), `workspace` `workspace_bytes`
    /// bytes, all device memory of this context that nothing else writes (nor, for the outputs,
    /// reads) until the kernels have finished.
    pub unsafe fn select_blocks_raw(
        &self,
        stream: sys::CUstream,
        args: &RawBlockSelect,
    ) -> Result<()> {
        let mut lowered = args.lower()?;
        let dt = args.dtype.name();
        let q = &args.q_layout;
        let means = format!("block_means_{dt}");
        // SAFETY: the context is kept alive by `_owner` or by the caller of from_raw_context.
        let pool = unsafe { self.cache.kernel(&means, &format!("lf_{means}"), 0) }?;
        // SAFETY: as above.
        let select = unsafe {
            self.cache
                .kernel("block_select", "lf_block_select", SELECT_SMEM as u32)
        }?;
        for (params, l, block) in [
            (&mut lowered.q_means, q, Q_BLOCK),
            (&mut lowered.k_means, &args.k_layout, K_BLOCK),
        ] {
            let config = LaunchConfig {
                grid_dim: (
                    l.seqlen.div_ceil(block) as u32,
                    l.heads as u32,
                    l.batch as u32,
                ),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: this fn's contract; `params` was validated, one CTA per block of rows.
            unsafe { self.launch(&pool, config, stream, params, "launching the block means") }?;
        }
        let config = LaunchConfig {
            grid_dim: (
                q.seqlen.div_ceil(Q_BLOCK) as u32,
                q.heads as u32,
                q.batch as u32,
            ),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: (args.max_row * 4) as u32,
        };
        // SAFETY: this fn's contract; one CTA per output row, shared memory for the longest
        // universe row (at most SELECT_SMEM, the kernel's limit).
        unsafe {
            self.launch(
                &select,
                config,
                stream,
                &mut lowered.select,
                "launching the block selection",
            )
        }
    }

    /// The block-sparse forward over a selection (as [`forward_sparse`](Self::forward_sparse)
    /// with its mask): `q`, `k` and `v` shaped as the selection's plan.
    pub fn forward_selected<T: Element>(
        &self,
        stream: &CudaStream,
        q: Input<'_, '_, T>,
        k: Input<'_, '_, T>,
        v: Input<'_, '_, T>,
        out: Output<'_, '_, T>,
        options: &SelectedOptions<'_>,
    ) -> Result<()> {
        let (blocks, softmax_scale) = (options.blocks, options.softmax_scale);
        let s = blocks.shape;
        mismatch("q.batch", q.layout.batch, "blocks.batch", s.batch)?;
        mismatch("q.heads", q.layout.heads, "blocks.heads", s.heads)?;
        mismatch("q.seqlen", q.layout.seqlen, "blocks.seqlen_q", s.seqlen_q)?;
        mismatch("k.seqlen", k.layout.seqlen, "blocks.seqlen_k", s.seqlen_k)?;
        for (arg, ctx) in [
            ("blocks.row_offsets", blocks.row_offsets.stream()),
            ("blocks.col_indices", blocks.col_indices.stream()),
            ("blocks.full", blocks.full.stream()),
        ] {
            self.same_context(arg, ctx.context().cu_ctx())?;
        }
        let options = super::ForwardOptions {
            mask: blocks.element,
            softmax_scale,
        };
        let csr = super::sparse::DeviceCsr {
            row_offsets: &blocks.row_offsets,
            col_indices: &blocks.col_indices,
            full: &blocks.full,
            batch: s.batch,
            heads: s.heads,
        };
        self.forward_impl(stream, [q, k, v], out, options, Some(csr), |raw| {
            // SAFETY: as in forward; the selection was written by the selection kernels from a
            // plan of this shape and element mask, so its rows list blocks below the key blocks'
            // count, ascending, with the element mask's flags.
            unsafe { self.forward_raw(stream.cu_stream(), raw) }
        })
    }
}

/// The call's layouts against the plan's shape.
fn plan_matches(plan: &BlockSelectPlan, q: &Layout, k: &Layout) -> Result<()> {
    let s = plan.shape;
    mismatch("q.batch", q.batch, "plan.batch", s.batch)?;
    mismatch("q.heads", q.heads, "plan.heads", s.heads)?;
    mismatch("q.seqlen", q.seqlen, "plan.seqlen_q", s.seqlen_q)?;
    mismatch("k.seqlen", k.seqlen, "plan.seqlen_k", s.seqlen_k)?;
    mismatch("k.batch", k.batch, "plan.batch", s.batch)
}
