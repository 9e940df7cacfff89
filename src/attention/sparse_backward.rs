//! The block-sparse backward: dQ, dK and dV of [`Attention::forward_sparse`], over the blocks a
//! [`BlockMask`](crate::sparse::BlockMask) lists. The main kernel runs one CTA per key block and
//! walks the mask's key-major view ([`KeyMajorMask`](crate::sparse::KeyMajorMask), built once on
//! the host with the mask), so it visits exactly the (query block, key block) pairs the forward
//! computed; the deterministic dQ pass walks the forward's CSR rows. The pre-pass and the dQ
//! conversion are the exact backward's.

use cudarc::driver::{sys, CudaStream};

use super::backward::{BackwardInputs, BackwardOptions, Gradients, RawBackward};
use super::sparse::RawBlockMask;
use super::Attention;
use crate::dtype::Element;
use crate::error::Result;
use crate::layout::Layout;
use crate::sparse::{DeviceBlockMask, DeviceKeyMajorMask};
use crate::sys::{LfBlockSparse, LF_SPARSE_K_BLOCK};

/// Options of a block-sparse backward call.
#[derive(Clone, Copy)]
pub struct SparseBackwardOptions<'a> {
    /// The forward's block mask (with its element mask), on the device.
    pub mask: &'a DeviceBlockMask,
    /// Its key-major view (`mask.host().key_major()`), on the device.
    pub key_major: &'a DeviceKeyMajorMask,
    /// The forward's softmax scale; `None` means `1 / sqrt(head_dim)`.
    pub softmax_scale: Option<f32>,
    /// Compute dQ without atomics, over the mask's rows in a fixed order (see
    /// [`BackwardOptions::deterministic`]).
    pub deterministic: bool,
}

impl RawBlockMask {
    /// Lowers the key-major view of a block mask (`row_offsets`: its column offsets, `batch *
    /// heads * ceil(seqlen_k / 64) + 1` entries; `col_indices`: its query-block indices; `full`:
    /// its flags) for a call with query layout `q` and key layout `k`, with the checks of
    /// [`lower`](Self::lower).
    pub(crate) fn lower_key_major(&self, q: &Layout, k: &Layout) -> Result<LfBlockSparse> {
        self.lower_lists(q, k, k.seqlen.div_ceil(LF_SPARSE_K_BLOCK as usize))
    }
}

impl Attention {
    /// The gradients of a block-sparse forward ([`forward_sparse`](Self::forward_sparse)) with
    /// respect to q, k and v, on the caller's stream: as [`backward`](Self::backward), over the
    /// blocks `sparse.mask` lists with its element mask (sinks included) inside partial blocks.
    /// Key blocks no query block lists get dK and dV 0; rows with no block get dQ 0.
    ///
    /// # Errors
    ///
    /// As [`backward`](Self::backward); [`Error::InvalidArgument`](crate::Error::InvalidArgument)
    /// when the mask was built for another problem (`check_for`) or `sparse.key_major` is not its
    /// key-major view (`check_view_of`), and a context error when either mask lives in another
    /// context.
    pub fn backward_sparse<T: Element>(
        &self,
        stream: &CudaStream,
        inputs: BackwardInputs<'_, '_, T>,
        grads: Gradients<'_, '_, T>,
        sparse: &SparseBackwardOptions<'_>,
    ) -> Result<()> {
        let m = sparse.mask.host();
        m.check_for(
            inputs.q.layout.batch,
            inputs.q.layout.heads,
            inputs.q.layout.seqlen,
            inputs.k.layout.seqlen,
        )?;
        sparse.key_major.host().check_view_of(m)?;
        self.same_context_mask(sparse.mask)?;
        let km = sparse.key_major;
        for (arg, ctx) in [
            (
                "key_major.col_offsets",
                km.col_offsets.stream().context().cu_ctx(),
            ),
            (
                "key_major.row_indices",
                km.row_indices.stream().context().cu_ctx(),
            ),
            ("key_major.full", km.full.stream().context().cu_ctx()),
        ] {
            self.same_context(arg, ctx)?;
        }
        let options = BackwardOptions {
            mask: m.element_mask(),
            softmax_scale: sparse.softmax_scale,
            deterministic: sparse.deterministic,
        };
        let shape = m.shape();
        let dm = sparse.mask;
        let (rp, _g0) = cudarc::driver::DevicePtr::device_ptr(&dm.row_offsets, stream);
        let (cp, _g1) = cudarc::driver::DevicePtr::device_ptr(&dm.col_indices, stream);
        let (fp, _g2) = cudarc::driver::DevicePtr::device_ptr(&dm.full, stream);
        let (kop, _g3) = cudarc::driver::DevicePtr::device_ptr(&km.col_offsets, stream);
        let (kip, _g4) = cudarc::driver::DevicePtr::device_ptr(&km.row_indices, stream);
        let (kfp, _g5) = cudarc::driver::DevicePtr::device_ptr(&km.full, stream);
        let rows = RawBlockMask {
            row_offsets: rp,
            col_indices: cp,
            full: fp,
            batch: shape.batch,
            heads: shape.heads,
        };
        let cols = RawBlockMask {
            row_offsets: kop,
            col_indices: kip,
            full: kfp,
            batch: shape.batch,
            heads: shape.heads,
        };
        let ws_bytes =
            super::backward::backward_workspace_bytes(&inputs.q.layout, options.deterministic)?;
        self.backward_impl(stream, inputs, grads, &options, ws_bytes, |raw| {
            // SAFETY: as in backward; the block mask came from a validated BlockMask checked
            // against this call's shape, and the key-major view from the same mask (same shape
            // and block count, built by KeyMajorMask::new), so every index stays in range and
            // the flags match the element mask.
            unsafe { self.backward_sparse_raw(stream.cu_stream(), raw, &rows, &cols) }
        })
    }

    /// The raw block-sparse backward: [`backward_raw`](Self::backward_raw) over the blocks of a
    /// block mask, given in both orders: `rows` as the sparse forward takes it, `cols` its
    /// key-major view (`row_offsets` the view's column offsets, `col_indices` its query-block
    /// indices, `full` its flags; batch and heads as `rows`). `args.options.mask` is the block
    /// mask's element mask (sink tokens allowed). Validates as `backward_raw` and checks the
    /// masks' sharing and alignment ([`RawBlockMask`]) before any launch.
    ///
    /// # Safety
    /// As [`backward_raw`](Self::backward_raw), and: `rows` and `cols` point at device arrays of
    /// this context that hold a well-formed block mask for this call's shape (as
    /// [`BlockMask`](crate::sparse::BlockMask) builds them: offsets non-decreasing from 0, key
    /// blocks below `ceil(seqlen_k / 64)`, sorted) and its key-major view
    /// ([`KeyMajorMask`](crate::sparse::KeyMajorMask): query blocks below `ceil(seqlen_q / 128)`,
    /// ascending), with the flags the element mask gives, until the kernels have finished. The
    /// kernels read these arrays as given, as the sparse forward reads its CSR; `DeviceBlockMask`
    /// and `DeviceKeyMajorMask` are well formed by construction.
    pub unsafe fn backward_sparse_raw(
        &self,
        stream: sys::CUstream,
        args: &RawBackward,
        rows: &RawBlockMask,
        cols: &RawBlockMask,
    ) -> Result<()> {
        let params = args.validate_with(true)?;
        let r = rows.lower(&args.q_layout, &args.k_layout)?;
        let c = cols.lower_key_major(&args.q_layout, &args.k_layout)?;
        if (cols.batch, cols.heads) != (rows.batch, rows.heads) {
            return Err(crate::error::Error::InvalidArgument {
                arg: "key_major.heads",
                value: format!("batch {} heads {}", cols.batch, cols.heads),
                expected: format!(
                    "the block mask's batch {} and heads {}",
                    rows.batch, rows.heads
                ),
            });
        }
        // SAFETY: per this fn's contract; `params` came from `args`'s validation and the masks
        // were lowered for this call's shape.
        unsafe { self.launch_backward(stream, args, params, Some((r, c))) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CSR rows step by query blocks per head, the key-major columns by key blocks; a shared
    /// batch or head dimension steps by nothing.
    #[test]
    fn rows_and_columns_step_by_their_own_blocks() {
        let (q, k) = (Layout::bshd(3, 300, 4, 64), Layout::bshd(3, 700, 2, 64));
        let (nqb, nkb) = (300usize.div_ceil(128) as i64, 700usize.div_ceil(64) as i64);
        for (batch, heads) in [(3, 4), (1, 4), (3, 1), (1, 1)] {
            let m = RawBlockMask {
                row_offsets: 0x1000,
                col_indices: 0x2000,
                full: 0x3000,
                batch,
                heads,
            };
            let (r, c) = (m.lower(&q, &k).unwrap(), m.lower_key_major(&q, &k).unwrap());
            for (s, per) in [(r, nqb), (c, nkb)] {
                let head = if heads == 1 { 0 } else { per };
                assert_eq!(s.head_stride, head, "{batch} x {heads}");
                let whole = if batch == 1 { 0 } else { heads as i64 * per };
                assert_eq!(s.batch_stride, whole, "{batch} x {heads}");
                assert_eq!((s.num_q_blocks, s.num_k_blocks), (nqb as i32, nkb as i32));
            }
        }
    }
}
