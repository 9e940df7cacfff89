//! Checks every entry point shares: the byte ranges a layout reaches (for aliasing), shape
//! agreement, pointer and stride alignment, and the names those errors carry.

use crate::error::{Error, Result};
use crate::layout::Layout;

/// Byte range `[lo, hi)` a layout addresses from `ptr` (signed strides allowed).
pub(crate) fn byte_range(ptr: u64, l: &Layout, elem: u64) -> (i128, i128) {
    let mut lo: i128 = 0;
    let mut hi: i128 = l.head_dim as i128;
    for (n, s) in [
        (l.batch, l.batch_stride),
        (l.seqlen, l.seq_stride),
        (l.heads, l.head_stride),
    ] {
        let reach = (n as i128 - 1) * s as i128;
        if reach < 0 {
            lo += reach;
        } else {
            hi += reach;
        }
    }
    (
        ptr as i128 + lo * elem as i128,
        ptr as i128 + hi * elem as i128,
    )
}

/// Whether two byte ranges share a byte.
pub(crate) fn overlaps(a: (i128, i128), b: (i128, i128)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

/// `Ok` when `value == expected`, else a [`Error::ShapeMismatch`] naming both arguments.
pub(crate) fn mismatch(
    arg: &'static str,
    value: usize,
    other: &'static str,
    expected: usize,
) -> Result<()> {
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
}

/// A device pointer must be a multiple of `multiple` bytes (and, when `required`, not null).
pub(crate) fn aligned(arg: &'static str, ptr: u64, multiple: u64, required: bool) -> Result<()> {
    if (required && ptr == 0) || ptr % multiple != 0 {
        return Err(Error::Misaligned {
            arg,
            value: ptr as i64,
            multiple_of: multiple as u32,
        });
    }
    Ok(())
}

/// Every stride of `l` (tensor `tensor`) must be a multiple of 8 elements (16 bytes of 16-bit
/// elements), so that each row starts 16-byte aligned when the base pointer does.
pub(crate) fn strides_of_16_bytes(tensor: &str, l: &Layout) -> Result<()> {
    for (field, s) in [
        ("batch_stride", l.batch_stride),
        ("seq_stride", l.seq_stride),
        ("head_stride", l.head_stride),
    ] {
        if s % 8 != 0 {
            return Err(Error::Misaligned {
                arg: stride_name(tensor, field),
                value: s,
                multiple_of: 8,
            });
        }
    }
    Ok(())
}

/// The error label of a stride: `"{tensor}.{field}"` as a `&'static str`.
fn stride_name(tensor: &str, field: &str) -> &'static str {
    // A fixed table, so error labels stay `&'static str`.
    const TENSORS: [&str; 6] = ["q", "k", "v", "o", "acc", "part"];
    const NAMES: [[&str; 3]; 6] = [
        ["q.batch_stride", "q.seq_stride", "q.head_stride"],
        ["k.batch_stride", "k.seq_stride", "k.head_stride"],
        ["v.batch_stride", "v.seq_stride", "v.head_stride"],
        ["o.batch_stride", "o.seq_stride", "o.head_stride"],
        ["acc.batch_stride", "acc.seq_stride", "acc.head_stride"],
        ["part.batch_stride", "part.seq_stride", "part.head_stride"],
    ];
    let t = TENSORS.iter().position(|x| *x == tensor).unwrap_or(0);
    let f = ["batch_stride", "seq_stride", "head_stride"]
        .iter()
        .position(|x| *x == field)
        .unwrap_or(0);
    NAMES[t][f]
}
