//! Tensor layouts: shape plus element strides, last (head) dimension contiguous.

use crate::error::{Error, Result};

/// Shape and element strides of one attention operand (Q, K, V or O).
///
/// The logical shape is `[batch, seqlen, heads, head_dim]` whatever the memory order: the
/// strides say where element `(b, s, h, 0)` lives (`b*batch_stride + s*seq_stride +
/// h*head_stride`), and the head dimension is always contiguous. [`Layout::bshd`] and
/// [`Layout::bhsd`] build the two common contiguous layouts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Layout {
    /// Batch size.
    pub batch: usize,
    /// Sequence length (tokens).
    pub seqlen: usize,
    /// Number of heads.
    pub heads: usize,
    /// Head dimension (contiguous).
    pub head_dim: usize,
    /// Elements between consecutive batch entries.
    pub batch_stride: i64,
    /// Elements between consecutive tokens.
    pub seq_stride: i64,
    /// Elements between consecutive heads.
    pub head_stride: i64,
}

impl Layout {
    /// Contiguous `[batch, seqlen, heads, head_dim]` (FlashAttention's layout).
    pub fn bshd(batch: usize, seqlen: usize, heads: usize, head_dim: usize) -> Self {
        let d = head_dim as i64;
        let h = heads as i64;
        let s = seqlen as i64;
        Layout {
            batch,
            seqlen,
            heads,
            head_dim,
            batch_stride: s * h * d,
            seq_stride: h * d,
            head_stride: d,
        }
    }

    /// Contiguous `[batch, heads, seqlen, head_dim]` (PyTorch SDPA's layout).
    pub fn bhsd(batch: usize, seqlen: usize, heads: usize, head_dim: usize) -> Self {
        let d = head_dim as i64;
        let h = heads as i64;
        let s = seqlen as i64;
        Layout {
            batch,
            seqlen,
            heads,
            head_dim,
            batch_stride: h * s * d,
            seq_stride: d,
            head_stride: s * d,
        }
    }

    /// Number of logical elements, `batch * seqlen * heads * head_dim`.
    pub fn numel(&self) -> usize {
        self.batch
            .saturating_mul(self.seqlen)
            .saturating_mul(self.heads)
            .saturating_mul(self.head_dim)
    }

    /// Element offset of `(b, s, h, 0)`.
    pub fn offset(&self, b: usize, s: usize, h: usize) -> i64 {
        b as i64 * self.batch_stride + s as i64 * self.seq_stride + h as i64 * self.head_stride
    }

    /// Elements the layout reaches: one past the largest offset it addresses, computed without
    /// overflow. Errors on a zero dimension or a negative stride (the safe API addresses buffers
    /// from their first element).
    pub fn required_len(&self, arg: &'static str) -> Result<u128> {
        self.check_dims(arg)?;
        let mut end: u128 = self.head_dim as u128;
        for (name, n, stride) in [
            ("batch_stride", self.batch, self.batch_stride),
            ("seq_stride", self.seqlen, self.seq_stride),
            ("head_stride", self.heads, self.head_stride),
        ] {
            if stride < 0 {
                return Err(Error::InvalidArgument {
                    arg,
                    value: format!("{name} = {stride}"),
                    expected: "non-negative strides".into(),
                });
            }
            end += (n as u128 - 1) * stride as u128;
        }
        Ok(end)
    }

    /// Whether distinct elements have distinct offsets (needed for outputs).
    pub fn is_non_overlapping(&self) -> bool {
        // Sort the strided dims by stride; each must step past everything the smaller ones span.
        let mut dims = [
            (self.batch, self.batch_stride),
            (self.seqlen, self.seq_stride),
            (self.heads, self.head_stride),
        ];
        dims.sort_by_key(|&(_, s)| s);
        let mut span: u128 = self.head_dim as u128; // elements [0, span) covered so far
        for (n, stride) in dims {
            if n <= 1 {
                continue;
            }
            if stride < 0 || (stride as u128) < span {
                return false;
            }
            span += stride as u128 * (n as u128 - 1);
        }
        true
    }

    pub(crate) fn check_dims(&self, arg: &'static str) -> Result<()> {
        for (name, v) in [
            ("batch", self.batch),
            ("seqlen", self.seqlen),
            ("heads", self.heads),
            ("head_dim", self.head_dim),
        ] {
            if v == 0 {
                return Err(Error::ZeroSized { arg, dim: name });
            }
        }
        Ok(())
    }
}
