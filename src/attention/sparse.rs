//! The block-sparse forward: a [`crate::sparse::BlockMask`] on the device, its raw CSR form
//! and validation, and the safe entry point (the raw one is [`Attention::forward_raw`] with
//! [`RawForward::block_mask`](super::RawForward::block_mask) set).

use cudarc::driver::{sys, CudaSlice, CudaStream};

use super::{Attention, ForwardOptions, Input, Output};
use crate::check::aligned;
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::sparse::DeviceBlockMask;
use crate::sys::{LfBlockSparse, LF_SPARSE_K_BLOCK, LF_SPARSE_Q_BLOCK};

/// Options of a block-sparse forward call.
#[derive(Clone, Copy)]
pub struct SparseOptions<'a> {
    /// The block mask (with its element mask), on the device.
    pub mask: &'a DeviceBlockMask,
    /// Multiplies Q K^T before the softmax; `None` means `1 / sqrt(head_dim)`.
    pub softmax_scale: Option<f32>,
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

/// The device lists of a block mask as the forward reads them: a [`DeviceBlockMask`]'s or a
/// device selection's ([`super::select::SelectedBlocks`]).
pub(super) struct DeviceCsr<'a> {
    pub(super) row_offsets: &'a CudaSlice<i32>,
    pub(super) col_indices: &'a CudaSlice<i32>,
    pub(super) full: &'a CudaSlice<u8>,
    /// Batch entries with their own rows (1 or the call's batch).
    pub(super) batch: usize,
    /// Heads with their own rows (1 or the call's query heads).
    pub(super) heads: usize,
}

impl DeviceBlockMask {
    /// The mask's device lists.
    pub(super) fn csr(&self) -> DeviceCsr<'_> {
        let s = self.mask.shape();
        DeviceCsr {
            row_offsets: &self.row_offsets,
            col_indices: &self.col_indices,
            full: &self.full,
            batch: s.batch,
            heads: s.heads,
        }
    }
}

impl RawBlockMask {
    /// Checks the mask's sharing (batch and heads 1 or the call's) and pointer alignment for a
    /// call with query layout `q` and key layout `k`, and lowers it to the kernel's CSR
    /// parameters. The CSR contents live on the device: that they are well formed is the raw
    /// caller's contract (a `DeviceBlockMask` is, by construction).
    pub(crate) fn lower(&self, q: &Layout, k: &Layout) -> Result<LfBlockSparse> {
        self.lower_lists(q, k, q.seqlen.div_ceil(LF_SPARSE_Q_BLOCK as usize))
    }

    /// [`lower`](Self::lower) for lists of `lists_per_head` entries per (batch entry, head): query
    /// blocks for the CSR rows, key blocks for the key-major columns.
    pub(crate) fn lower_lists(
        &self,
        q: &Layout,
        k: &Layout,
        lists_per_head: usize,
    ) -> Result<LfBlockSparse> {
        for (arg, value, call) in [
            ("mask.batch", self.batch, q.batch),
            ("mask.heads", self.heads, q.heads),
        ] {
            if value != 1 && value != call {
                return Err(Error::InvalidArgument {
                    arg,
                    value: value.to_string(),
                    expected: format!("1 (shared) or the call's {call}"),
                });
            }
        }
        aligned("mask.row_offsets", self.row_offsets, 4, true)?;
        aligned("mask.col_indices", self.col_indices, 4, true)?;
        aligned("mask.full", self.full, 1, true)?;
        let nqb = q.seqlen.div_ceil(LF_SPARSE_Q_BLOCK as usize);
        let nkb = k.seqlen.div_ceil(LF_SPARSE_K_BLOCK as usize);
        Ok(LfBlockSparse {
            row_offsets: self.row_offsets as *const i32,
            col_indices: self.col_indices as *const i32,
            full: self.full as *const u8,
            batch_stride: if self.batch == 1 {
                0
            } else {
                (self.heads * lists_per_head) as i64
            },
            head_stride: if self.heads == 1 {
                0
            } else {
                lists_per_head as i64
            },
            q_block: LF_SPARSE_Q_BLOCK as i32,
            k_block: LF_SPARSE_K_BLOCK as i32,
            num_q_blocks: nqb as i32,
            num_k_blocks: nkb as i32,
        })
    }
}

impl Attention {
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
        self.same_context_mask(sparse.mask)?;
        let options = ForwardOptions {
            mask: m.element_mask(),
            softmax_scale: sparse.softmax_scale,
        };
        self.forward_impl(
            stream,
            [q, k, v],
            out,
            options,
            Some(sparse.mask.csr()),
            |raw| {
                // SAFETY: as in forward; the block mask came from a validated BlockMask checked
                // against this call's shape, so its CSR indices stay in range and its flags match
                // its element mask.
                unsafe { self.forward_raw(stream.cu_stream(), raw) }
            },
        )
    }

    /// Checks that the three device arrays of a block mask live in this value's context.
    pub(super) fn same_context_mask(&self, bm: &DeviceBlockMask) -> Result<()> {
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
        Ok(())
    }
}
