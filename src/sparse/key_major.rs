//! The key-major view of a [`BlockMask`]: for each (batch, head, key block), the query blocks
//! whose rows list it, with the same full/partial flags. A backward pass that accumulates dK and
//! dV per key block walks this view, so that it visits exactly the blocks the forward computed.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};

use super::{upload_list, BlockMask, MaskShape};
use crate::error::{Error, Result};

/// A [`BlockMask`] transposed: CSC by key block (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyMajorMask {
    shape: MaskShape,
    col_offsets: Vec<i32>,
    row_indices: Vec<i32>,
    full: Vec<u8>,
}

impl KeyMajorMask {
    /// The transpose of `mask`: each listed block `(qb, kb)` of `(b, h)` appears in column
    /// `kb` of `(b, h)` at query block `qb`, query blocks ascending, with its flag.
    pub fn new(mask: &BlockMask) -> Self {
        let shape = mask.shape();
        let (nqb, nkb) = (shape.num_q_blocks(), shape.num_k_blocks());
        let pairs = shape.batch * shape.heads;
        // Count per column, then place entries walking rows in order (query blocks ascend).
        let mut col_offsets = vec![0i32; pairs * nkb + 1];
        for p in 0..pairs {
            for qb in 0..nqb {
                let r = p * nqb + qb;
                let (lo, hi) = (
                    mask.row_offsets[r] as usize,
                    mask.row_offsets[r + 1] as usize,
                );
                for &kb in &mask.col_indices[lo..hi] {
                    col_offsets[p * nkb + kb as usize + 1] += 1;
                }
            }
        }
        for c in 0..pairs * nkb {
            col_offsets[c + 1] += col_offsets[c];
        }
        let nnz = mask.nnz();
        let mut row_indices = vec![0i32; nnz];
        let mut full = vec![0u8; nnz];
        let mut next: Vec<i32> = col_offsets[..pairs * nkb].to_vec();
        for p in 0..pairs {
            for qb in 0..nqb {
                let r = p * nqb + qb;
                let (lo, hi) = (
                    mask.row_offsets[r] as usize,
                    mask.row_offsets[r + 1] as usize,
                );
                for e in lo..hi {
                    let c = p * nkb + mask.col_indices[e] as usize;
                    let at = next[c] as usize;
                    row_indices[at] = qb as i32;
                    full[at] = mask.full[e];
                    next[c] += 1;
                }
            }
        }
        KeyMajorMask {
            shape,
            col_offsets,
            row_indices,
            full,
        }
    }

    /// The problem the mask was built for.
    pub fn shape(&self) -> MaskShape {
        self.shape
    }
    /// CSC column offsets (`batch * heads * num_k_blocks + 1` entries).
    pub fn col_offsets(&self) -> &[i32] {
        &self.col_offsets
    }
    /// CSC query-block indices, ascending within a column.
    pub fn row_indices(&self) -> &[i32] {
        &self.row_indices
    }
    /// Per listed block: 1 when full, 0 when partial (the row-major mask's flag).
    pub fn full_flags(&self) -> &[u8] {
        &self.full
    }
    /// The query blocks that list key block `kb` of `(b, h)` (indices reduced for a shared batch
    /// or head), with their flags; empty for a key block past the end.
    pub fn column(&self, b: usize, h: usize, kb: usize) -> (&[i32], &[u8]) {
        let nkb = self.shape.num_k_blocks();
        if kb >= nkb {
            return (&[], &[]);
        }
        let p = (b % self.shape.batch) * self.shape.heads + h % self.shape.heads;
        let c = p * nkb + kb;
        let (lo, hi) = (
            self.col_offsets[c] as usize,
            self.col_offsets[c + 1] as usize,
        );
        (&self.row_indices[lo..hi], &self.full[lo..hi])
    }
}

impl KeyMajorMask {
    /// Checks that this is the key-major view of `mask` as far as it can be checked without
    /// rebuilding it: the same problem and the same number of listed blocks.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] naming `"key_major"` otherwise.
    pub fn check_view_of(&self, mask: &BlockMask) -> Result<()> {
        if self.shape != mask.shape() || self.row_indices.len() != mask.nnz() {
            return Err(Error::InvalidArgument {
                arg: "key_major",
                value: format!("{:?} with {} blocks", self.shape, self.row_indices.len()),
                expected: format!(
                    "the key-major view of the block mask ({:?} with {} blocks): \
                     BlockMask::key_major",
                    mask.shape(),
                    mask.nnz()
                ),
            });
        }
        Ok(())
    }

    /// Copies the view to the device (with `stream`, in its context) for the block-sparse
    /// backward.
    ///
    /// # Errors
    ///
    /// [`Error::Driver`] when a copy fails.
    pub fn to_device(&self, stream: &Arc<CudaStream>) -> Result<DeviceKeyMajorMask> {
        const WHAT: &str = "copying the key-major mask to the device";
        Ok(DeviceKeyMajorMask {
            mask: self.clone(),
            col_offsets: upload_list(stream, &self.col_offsets, WHAT)?,
            row_indices: upload_list(stream, &self.row_indices, WHAT)?,
            full: upload_list(stream, &self.full, WHAT)?,
        })
    }
}

/// A [`KeyMajorMask`] in device memory, with the host copy it was made from.
pub struct DeviceKeyMajorMask {
    pub(crate) mask: KeyMajorMask,
    pub(crate) col_offsets: CudaSlice<i32>,
    pub(crate) row_indices: CudaSlice<i32>,
    pub(crate) full: CudaSlice<u8>,
}

impl DeviceKeyMajorMask {
    /// The host view this was made from.
    pub fn host(&self) -> &KeyMajorMask {
        &self.mask
    }
}

impl BlockMask {
    /// The key-major view of this mask ([`KeyMajorMask`]), for passes over key blocks.
    pub fn key_major(&self) -> KeyMajorMask {
        KeyMajorMask::new(self)
    }
}
