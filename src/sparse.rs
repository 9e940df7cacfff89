//! Block-sparse attention masks: for each (batch, head, query block) the sorted list of key
//! blocks to compute, stored as CSR, with each listed block marked full or partial.
//!
//! Blocks are [`Q_BLOCK`] = 128 query rows by [`K_BLOCK`] = 64 keys for every head dimension
//! (the head-dim-256 kernel, whose query tile is 64 rows, runs each query block as two tiles
//! over the same list). Token-level semantics: query `i` of (batch `b`, head `h`) attends key
//! `j` iff the block `(i / 128, j / 64)` is listed for `(b, h)` **and** the element mask
//! ([`MaskSpec`]: causal, sliding window, attention sinks; bottom-right aligned) allows `(i, j)`.
//! A listed block is *full* when the element mask allows every element of it and it lies wholly
//! inside the keys; only partial blocks pay for the element mask. The flags are always computed
//! here, from the element mask, never taken from the caller.
//!
//! A mask is built for one `(batch, heads, seqlen_q, seqlen_k)`; `batch` and `heads` may be 1 to
//! share the pattern across batch entries or heads. Heads are query heads (GQA kernels map
//! them to key/value heads themselves).

mod key_major;
pub mod patterns;
mod select;

pub use key_major::{DeviceKeyMajorMask, KeyMajorMask};
pub use select::select_blocks;

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};

use crate::error::{Error, Result};
use crate::mask::MaskSpec;
use crate::plan::{Plan, TileShape};
use crate::sys::{LF_SPARSE_K_BLOCK, LF_SPARSE_Q_BLOCK};

/// Query rows per mask block.
pub const Q_BLOCK: usize = LF_SPARSE_Q_BLOCK as usize;
/// Keys per mask block.
pub const K_BLOCK: usize = LF_SPARSE_K_BLOCK as usize;

/// The problem a mask was built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MaskShape {
    /// Batch entries with their own pattern (1 = shared by every batch entry).
    pub batch: usize,
    /// Heads with their own pattern (1 = shared by every query head).
    pub heads: usize,
    /// Query tokens.
    pub seqlen_q: usize,
    /// Key tokens.
    pub seqlen_k: usize,
}

impl MaskShape {
    /// Query blocks, `ceil(seqlen_q / 128)`.
    pub fn num_q_blocks(&self) -> usize {
        self.seqlen_q.div_ceil(Q_BLOCK)
    }
    /// Key blocks, `ceil(seqlen_k / 64)`.
    pub fn num_k_blocks(&self) -> usize {
        self.seqlen_k.div_ceil(K_BLOCK)
    }
    /// CSR rows: `batch * heads * num_q_blocks`.
    pub fn rows(&self) -> usize {
        self.batch * self.heads * self.num_q_blocks()
    }
    fn row(&self, b: usize, h: usize, qb: usize) -> usize {
        (b * self.heads + h) * self.num_q_blocks() + qb
    }
    pub(crate) fn check(&self) -> Result<()> {
        for (dim, v) in [
            ("batch", self.batch),
            ("heads", self.heads),
            ("seqlen_q", self.seqlen_q),
            ("seqlen_k", self.seqlen_k),
        ] {
            if v == 0 {
                return Err(Error::ZeroSized { arg: "mask", dim });
            }
        }
        for (arg, v) in [
            ("mask.seqlen_q", self.seqlen_q),
            ("mask.seqlen_k", self.seqlen_k),
        ] {
            if v > i32::MAX as usize {
                return Err(Error::InvalidArgument {
                    arg,
                    value: v.to_string(),
                    expected: "at most i32::MAX".into(),
                });
            }
        }
        let blocks = self
            .batch
            .checked_mul(self.heads)
            .and_then(|x| x.checked_mul(self.num_q_blocks()))
            .and_then(|x| x.checked_mul(self.num_k_blocks()));
        if blocks.is_none_or(|n| n >= i32::MAX as usize) {
            return Err(Error::InvalidArgument {
                arg: "mask",
                value: format!(
                    "batch {} x heads {} x {} x {} blocks",
                    self.batch,
                    self.heads,
                    self.num_q_blocks(),
                    self.num_k_blocks()
                ),
                expected: "fewer than i32::MAX blocks (batch * heads * query blocks * key blocks)"
                    .into(),
            });
        }
        Ok(())
    }
}

/// A block-sparse attention mask on the host (see the module docs for its semantics).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockMask {
    shape: MaskShape,
    element: MaskSpec,
    row_offsets: Vec<i32>,
    col_indices: Vec<i32>,
    full: Vec<u8>,
}

impl BlockMask {
    /// Builds a mask by asking `keep(b, h, query_block, key_block)` for every block. Blocks in
    /// which the element mask hides every element are dropped (they would be work with no
    /// effect), so the list holds only blocks that contribute.
    pub fn from_fn(
        shape: MaskShape,
        element: MaskSpec,
        mut keep: impl FnMut(usize, usize, usize, usize) -> bool,
    ) -> Result<Self> {
        shape.check()?;
        let plan = element_plan(&shape, &element)?;
        let (nqb, nkb) = (shape.num_q_blocks(), shape.num_k_blocks());
        let mut row_offsets = Vec::with_capacity(shape.rows() + 1);
        let mut col_indices = Vec::new();
        row_offsets.push(0i32);
        for b in 0..shape.batch {
            for h in 0..shape.heads {
                for qb in 0..nqb {
                    for kb in 0..nkb {
                        if block_has_visible(&plan, &shape, qb, kb) && keep(b, h, qb, kb) {
                            col_indices.push(kb as i32);
                        }
                    }
                    let n = i32::try_from(col_indices.len()).map_err(|_| too_many())?;
                    row_offsets.push(n);
                }
            }
        }
        Ok(Self::with_flags(
            shape,
            element,
            plan,
            row_offsets,
            col_indices,
        ))
    }

    /// Builds a mask from a dense block layout: `layout[((b * heads + h) * nqb + qb) * nkb + kb]`
    /// says whether block `(qb, kb)` of `(b, h)` is computed. Blocks the element mask hides
    /// entirely are dropped, as in [`from_fn`](Self::from_fn).
    pub fn from_dense_layout(shape: MaskShape, element: MaskSpec, layout: &[bool]) -> Result<Self> {
        shape.check()?;
        let (nqb, nkb) = (shape.num_q_blocks(), shape.num_k_blocks());
        let expected = shape.rows() * nkb;
        if layout.len() != expected {
            return Err(Error::InvalidArgument {
                arg: "layout.len",
                value: layout.len().to_string(),
                expected: format!(
                    "batch * heads * {nqb} query blocks * {nkb} key blocks = {expected}"
                ),
            });
        }
        Self::from_fn(shape, element, |b, h, qb, kb| {
            layout[((b * shape.heads + h) * nqb + qb) * nkb + kb]
        })
    }

    /// Builds a mask from CSR arrays the caller made: `row_offsets` has `rows + 1` entries
    /// starting at 0 and never decreasing, and each row's `col_indices` are strictly increasing
    /// key blocks below `num_k_blocks`. Listed blocks are kept as given (a block that the element
    /// mask hides entirely costs time but changes nothing). Each malformed input is a typed
    /// error naming the first offending entry.
    pub fn from_csr(
        shape: MaskShape,
        element: MaskSpec,
        row_offsets: Vec<i32>,
        col_indices: Vec<i32>,
    ) -> Result<Self> {
        shape.check()?;
        let plan = element_plan(&shape, &element)?;
        let rows = shape.rows();
        if row_offsets.len() != rows + 1 {
            return Err(Error::InvalidArgument {
                arg: "row_offsets.len",
                value: row_offsets.len().to_string(),
                expected: format!("rows + 1 = {} (batch * heads * query blocks + 1)", rows + 1),
            });
        }
        if row_offsets[0] != 0 {
            return Err(Error::InvalidArgument {
                arg: "row_offsets[0]",
                value: row_offsets[0].to_string(),
                expected: "0".into(),
            });
        }
        for r in 0..rows {
            if row_offsets[r + 1] < row_offsets[r] {
                return Err(Error::InvalidArgument {
                    arg: "row_offsets",
                    value: format!(
                        "row_offsets[{}] = {} < row_offsets[{r}] = {}",
                        r + 1,
                        row_offsets[r + 1],
                        row_offsets[r]
                    ),
                    expected: "non-decreasing offsets".into(),
                });
            }
        }
        if row_offsets[rows] as usize != col_indices.len() {
            return Err(Error::InvalidArgument {
                arg: "row_offsets[rows]",
                value: row_offsets[rows].to_string(),
                expected: format!("col_indices.len() = {}", col_indices.len()),
            });
        }
        let nkb = shape.num_k_blocks() as i32;
        for r in 0..rows {
            let row = &col_indices[row_offsets[r] as usize..row_offsets[r + 1] as usize];
            for (n, &c) in row.iter().enumerate() {
                if c < 0 || c >= nkb {
                    return Err(Error::InvalidArgument {
                        arg: "col_indices",
                        value: format!("{c} in row {r}"),
                        expected: format!("a key block in 0..{nkb}"),
                    });
                }
                if n > 0 && c <= row[n - 1] {
                    return Err(Error::InvalidArgument {
                        arg: "col_indices",
                        value: format!("{c} after {} in row {r}", row[n - 1]),
                        expected:
                            "strictly increasing key blocks in each row (sorted, no duplicates)"
                                .into(),
                    });
                }
            }
        }
        Ok(Self::with_flags(
            shape,
            element,
            plan,
            row_offsets,
            col_indices,
        ))
    }

    fn with_flags(
        shape: MaskShape,
        element: MaskSpec,
        plan: Plan,
        row_offsets: Vec<i32>,
        col_indices: Vec<i32>,
    ) -> Self {
        let nqb = shape.num_q_blocks();
        let mut full = vec![0u8; col_indices.len()];
        for r in 0..shape.rows() {
            let qb = r % nqb;
            for n in row_offsets[r] as usize..row_offsets[r + 1] as usize {
                full[n] = plan.tile_is_full(qb, col_indices[n] as usize) as u8;
            }
        }
        BlockMask {
            shape,
            element,
            row_offsets,
            col_indices,
            full,
        }
    }

    /// The problem this mask was built for.
    pub fn shape(&self) -> MaskShape {
        self.shape
    }
    /// The element mask applied inside partial blocks.
    pub fn element_mask(&self) -> MaskSpec {
        self.element
    }
    /// CSR row offsets (`rows + 1` entries).
    pub fn row_offsets(&self) -> &[i32] {
        &self.row_offsets
    }
    /// CSR key-block indices.
    pub fn col_indices(&self) -> &[i32] {
        &self.col_indices
    }
    /// Per listed block: 1 when full, 0 when partial.
    pub fn full_flags(&self) -> &[u8] {
        &self.full
    }
    /// Listed blocks, over all rows.
    pub fn nnz(&self) -> usize {
        self.col_indices.len()
    }
    /// Listed blocks over all blocks (`rows * num_k_blocks`).
    pub fn density(&self) -> f64 {
        self.nnz() as f64 / (self.shape.rows() * self.shape.num_k_blocks()) as f64
    }

    /// The key blocks listed for query block `qb` of `(b, h)` (indices reduced for a shared
    /// batch or head); empty for a query block past the end.
    pub fn row(&self, b: usize, h: usize, qb: usize) -> &[i32] {
        if qb >= self.shape.num_q_blocks() {
            return &[];
        }
        let r = self
            .shape
            .row(b % self.shape.batch, h % self.shape.heads, qb);
        &self.col_indices[self.row_offsets[r] as usize..self.row_offsets[r + 1] as usize]
    }

    /// Whether block `(qb, kb)` of `(b, h)` is listed.
    pub fn contains(&self, b: usize, h: usize, qb: usize, kb: usize) -> bool {
        qb < self.shape.num_q_blocks() && self.row(b, h, qb).binary_search(&(kb as i32)).is_ok()
    }

    /// Whether query `i` of `(b, h)` attends key `j` (the token-level semantics).
    pub fn is_visible(&self, b: usize, h: usize, i: usize, j: usize) -> bool {
        i < self.shape.seqlen_q
            && j < self.shape.seqlen_k
            && self
                .element
                .is_visible(self.shape.seqlen_q, self.shape.seqlen_k, i, j)
            && self.contains(b, h, i / Q_BLOCK, j / K_BLOCK)
    }

    /// Checks that this mask fits a call: same sequence lengths, batch 1 or the call's, heads 1
    /// or the call's query heads.
    pub fn check_for(
        &self,
        batch: usize,
        heads_q: usize,
        seqlen_q: usize,
        seqlen_k: usize,
    ) -> Result<()> {
        let s = self.shape;
        let same = |arg, value, other, expected| {
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
        };
        same("mask.seqlen_q", s.seqlen_q, "q.seqlen", seqlen_q)?;
        same("mask.seqlen_k", s.seqlen_k, "k.seqlen", seqlen_k)?;
        if s.batch != 1 {
            same("mask.batch", s.batch, "q.batch", batch)?;
        }
        if s.heads != 1 {
            same("mask.heads", s.heads, "q.heads", heads_q)?;
        }
        Ok(())
    }

    /// Copies the mask to the device for [`crate::Attention::forward_sparse`].
    pub fn to_device(&self, stream: &Arc<CudaStream>) -> Result<DeviceBlockMask> {
        const WHAT: &str = "copying the block mask to the device";
        Ok(DeviceBlockMask {
            mask: self.clone(),
            row_offsets: upload_list(stream, &self.row_offsets, WHAT)?,
            col_indices: upload_list(stream, &self.col_indices, WHAT)?,
            full: upload_list(stream, &self.full, WHAT)?,
        })
    }

    /// The blocks listed in `self` or in `other`, per row: token by token, `(i, j)` is visible in
    /// the union iff it is visible in either mask.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] naming `"other"` when the masks differ in shape (batch, heads,
    /// sequence lengths) or element mask. A shared mask (batch or heads 1) is not broadcast
    /// against a per-head or per-batch one: build both for the same shape.
    pub fn union(&self, other: &BlockMask) -> Result<BlockMask> {
        self.combine(other, true)
    }

    /// The blocks listed in both `self` and `other`, per row: token by token, `(i, j)` is
    /// visible in the intersection iff it is visible in both masks.
    ///
    /// # Errors
    ///
    /// As [`union`](Self::union).
    pub fn intersection(&self, other: &BlockMask) -> Result<BlockMask> {
        self.combine(other, false)
    }

    fn combine(&self, other: &BlockMask, union: bool) -> Result<BlockMask> {
        if other.shape != self.shape {
            return Err(Error::InvalidArgument {
                arg: "other",
                value: format!("a mask of shape {:?}", other.shape),
                expected: format!(
                    "the same shape as this mask, {:?} (shared masks are not broadcast)",
                    self.shape
                ),
            });
        }
        if other.element != self.element {
            return Err(Error::InvalidArgument {
                arg: "other",
                value: format!("a mask with element mask {:?}", other.element),
                expected: format!("the same element mask as this mask, {:?}", self.element),
            });
        }
        let plan = element_plan(&self.shape, &self.element)?;
        let rows = self.shape.rows();
        let mut row_offsets = Vec::with_capacity(rows + 1);
        let mut col_indices = Vec::new();
        row_offsets.push(0i32);
        for r in 0..rows {
            let a =
                &self.col_indices[self.row_offsets[r] as usize..self.row_offsets[r + 1] as usize];
            let b = &other.col_indices
                [other.row_offsets[r] as usize..other.row_offsets[r + 1] as usize];
            let (mut x, mut y) = (0, 0);
            loop {
                match (a.get(x).copied(), b.get(y).copied()) {
                    (Some(p), Some(q)) if p == q => {
                        col_indices.push(p);
                        x += 1;
                        y += 1;
                    }
                    (Some(p), Some(q)) if p < q => {
                        if union {
                            col_indices.push(p);
                        }
                        x += 1;
                    }
                    (Some(_), Some(q)) => {
                        if union {
                            col_indices.push(q);
                        }
                        y += 1;
                    }
                    (Some(p), None) => {
                        if union {
                            col_indices.push(p);
                        }
                        x += 1;
                    }
                    (None, Some(q)) => {
                        if union {
                            col_indices.push(q);
                        }
                        y += 1;
                    }
                    (None, None) => break,
                }
            }
            row_offsets.push(i32::try_from(col_indices.len()).map_err(|_| too_many())?);
        }
        Ok(Self::with_flags(
            self.shape,
            self.element,
            plan,
            row_offsets,
            col_indices,
        ))
    }

    /// A picture of the blocks of `(b, h)` (indices reduced for a shared batch or head, as in
    /// [`row`](Self::row)): a header line with the shape, `nnz` and density of the whole mask,
    /// then one line per query block with one character per key block: `#` a listed full block,
    /// `+` a listed partial block, `.` a block not listed.
    pub fn render(&self, b: usize, h: usize) -> String {
        let s = self.shape;
        let (nqb, nkb) = (s.num_q_blocks(), s.num_k_blocks());
        let mut out = format!(
            "BlockMask batch={} heads={} seqlen_q={} seqlen_k={} blocks={nqb}x{nkb} ({Q_BLOCK}x{K_BLOCK}) nnz={} density={:.4} element={:?}; b={b} h={h}\n",
            s.batch,
            s.heads,
            s.seqlen_q,
            s.seqlen_k,
            self.nnz(),
            self.density(),
            self.element,
        );
        out.reserve(nqb * (nkb + 1));
        for qb in 0..nqb {
            let r = s.row(b % s.batch, h % s.heads, qb);
            let mut line = vec!['.'; nkb];
            for n in self.row_offsets[r] as usize..self.row_offsets[r + 1] as usize {
                line[self.col_indices[n] as usize] = if self.full[n] != 0 { '#' } else { '+' };
            }
            out.extend(line);
            out.push('\n');
        }
        out
    }
}

/// A [`BlockMask`] on the device, ready for launches (keeps the host copy for validation).
pub struct DeviceBlockMask {
    pub(crate) mask: BlockMask,
    pub(crate) row_offsets: CudaSlice<i32>,
    pub(crate) col_indices: CudaSlice<i32>,
    pub(crate) full: CudaSlice<u8>,
}

impl DeviceBlockMask {
    /// The host mask this was made from.
    pub fn host(&self) -> &BlockMask {
        &self.mask
    }
}

fn too_many() -> Error {
    Error::InvalidArgument {
        arg: "mask",
        value: "more than i32::MAX blocks".into(),
        expected: "at most i32::MAX listed blocks".into(),
    }
}

/// The element mask's plan at block granularity (its tile_is_full classifies blocks).
fn element_plan(shape: &MaskShape, element: &MaskSpec) -> Result<Plan> {
    Plan::new(
        element,
        shape.seqlen_q,
        shape.seqlen_k,
        TileShape {
            br: Q_BLOCK,
            bc: K_BLOCK,
        },
    )
}

/// Whether any element of block (qb, kb) is visible under the element mask, in O(1): the window
/// part of the rows' keys is the plan's key-tile range, and the sink keys a block's rows see
/// are those below the last row's bound.
fn block_has_visible(plan: &Plan, shape: &MaskShape, qb: usize, kb: usize) -> bool {
    let last_row = ((qb + 1) * Q_BLOCK).min(shape.seqlen_q) - 1;
    plan.key_tile_range(qb).contains(&(kb as i64))
        || ((kb * K_BLOCK) as i64) < plan.row_keys(last_row).sinks.end
}

/// One of a mask's lists in device memory; an empty list still gets one (never read) element, so
/// that its pointer is a real one.
pub(crate) fn upload_list<T: cudarc::driver::DeviceRepr + Copy + Default>(
    stream: &Arc<CudaStream>,
    list: &[T],
    what: &'static str,
) -> Result<CudaSlice<T>> {
    let one = [T::default()];
    stream
        .clone_htod(if list.is_empty() { &one[..] } else { list })
        .map_err(Error::driver(what))
}
