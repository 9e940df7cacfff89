//! Checks every entry point shares: the byte ranges a layout reaches (for aliasing), shape
//! agreement, pointer and stride alignment, and the names those errors carry.

use crate::attention::{head_dim_kernel, SUPPORTED_HEAD_DIMS};
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

/// A caller's workspace for one call, before any launch: at least `need` bytes (`sized_by` names
/// what says so), 16-byte aligned, and apart from every non-empty byte range the call reads or
/// writes (`others`). `ptr_arg` and `bytes_arg` name the pointer and the size arguments in the
/// errors.
pub(crate) fn workspace(
    (ptr_arg, bytes_arg): (&'static str, &'static str),
    (ptr, bytes): (u64, usize),
    need: usize,
    sized_by: &str,
    others: impl IntoIterator<Item = (&'static str, (i128, i128))>,
) -> Result<()> {
    if bytes < need {
        return Err(Error::InvalidArgument {
            arg: bytes_arg,
            value: bytes.to_string(),
            expected: format!("at least {need} bytes ({sized_by})"),
        });
    }
    aligned(ptr_arg, ptr, 16, true)?;
    let ws = (ptr as i128, ptr as i128 + need as i128);
    for (other, range) in others {
        if range.1 > range.0 && overlaps(ws, range) {
            return Err(Error::Aliasing {
                output: ptr_arg,
                other,
            });
        }
    }
    Ok(())
}

/// Every stride of `l` (tensor `tensor`) must be a multiple of 8 elements (16 bytes of 16-bit
/// elements), so that each row starts 16-byte aligned when the base pointer does.
pub(crate) fn strides_of_16_bytes(tensor: &str, l: &Layout) -> Result<()> {
    strides_multiple_of(tensor, l, 8)
}

/// Every stride of `l` (tensor `tensor`) must be a multiple of `elems` elements.
pub(crate) fn strides_multiple_of(tensor: &str, l: &Layout, elems: i64) -> Result<()> {
    for (field, s) in [
        ("batch_stride", l.batch_stride),
        ("seq_stride", l.seq_stride),
        ("head_stride", l.head_stride),
    ] {
        if s % elems != 0 {
            return Err(Error::Misaligned {
                arg: stride_name(tensor, field),
                value: s,
                multiple_of: elems as u32,
            });
        }
    }
    Ok(())
}

/// The error label of a stride: `"{tensor}.{field}"` as a `&'static str`.
fn stride_name(tensor: &str, field: &str) -> &'static str {
    // A fixed table, so error labels stay `&'static str`.
    const TENSORS: [&str; 12] = [
        "q",
        "k",
        "v",
        "o",
        "acc",
        "part",
        "dout",
        "dq",
        "dk",
        "dv",
        "memory.keys",
        "memory.values",
    ];
    const NAMES: [[&str; 3]; 12] = [
        ["q.batch_stride", "q.seq_stride", "q.head_stride"],
        ["k.batch_stride", "k.seq_stride", "k.head_stride"],
        ["v.batch_stride", "v.seq_stride", "v.head_stride"],
        ["o.batch_stride", "o.seq_stride", "o.head_stride"],
        ["acc.batch_stride", "acc.seq_stride", "acc.head_stride"],
        ["part.batch_stride", "part.seq_stride", "part.head_stride"],
        ["dout.batch_stride", "dout.seq_stride", "dout.head_stride"],
        ["dq.batch_stride", "dq.seq_stride", "dq.head_stride"],
        ["dk.batch_stride", "dk.seq_stride", "dk.head_stride"],
        ["dv.batch_stride", "dv.seq_stride", "dv.head_stride"],
        [
            "memory.keys.batch_stride",
            "memory.keys.seq_stride",
            "memory.keys.head_stride",
        ],
        [
            "memory.values.batch_stride",
            "memory.values.seq_stride",
            "memory.values.head_stride",
        ],
    ];
    let t = TENSORS.iter().position(|x| *x == tensor).unwrap_or(0);
    let f = ["batch_stride", "seq_stride", "head_stride"]
        .iter()
        .position(|x| *x == field)
        .unwrap_or(0);
    NAMES[t][f]
}

/// The shape rules of an attention call's Q, K, V and O: no zero dimension, a supported head dim
/// shared by all four (64, 128 or 256; with `narrow_heads`, any multiple of 4 up to 256, which
/// runs in padded kernels), V shaped like K, O like Q, query heads a whole multiple of key/value
/// heads, and, when `k_batch_is_q_batch`, K's batch equal to Q's (a paged cache's "batch" counts
/// pages).
pub(crate) fn attention_shapes(
    [q, k, v, o]: [&Layout; 4],
    k_batch_is_q_batch: bool,
    narrow_heads: bool,
) -> Result<()> {
    q.check_dims("q")?;
    k.check_dims("k")?;
    v.check_dims("v")?;
    o.check_dims("o")?;
    if narrow_heads {
        if head_dim_kernel(q.head_dim).is_none() {
            return Err(Error::InvalidArgument {
                arg: "q.head_dim",
                value: q.head_dim.to_string(),
                expected: "a multiple of 4 from 4 to 256".into(),
            });
        }
    } else if !SUPPORTED_HEAD_DIMS.contains(&q.head_dim) {
        return Err(Error::UnsupportedHeadDim {
            arg: "q.head_dim",
            value: q.head_dim,
            supported: SUPPORTED_HEAD_DIMS,
        });
    }
    mismatch("k.head_dim", k.head_dim, "q.head_dim", q.head_dim)?;
    mismatch("v.head_dim", v.head_dim, "q.head_dim", q.head_dim)?;
    mismatch("o.head_dim", o.head_dim, "q.head_dim", q.head_dim)?;
    if k_batch_is_q_batch {
        mismatch("k.batch", k.batch, "q.batch", q.batch)?;
    }
    mismatch("v.batch", v.batch, "k.batch", k.batch)?;
    mismatch("o.batch", o.batch, "q.batch", q.batch)?;
    mismatch("v.seqlen", v.seqlen, "k.seqlen", k.seqlen)?;
    mismatch("o.seqlen", o.seqlen, "q.seqlen", q.seqlen)?;
    mismatch("v.heads", v.heads, "k.heads", k.heads)?;
    mismatch("o.heads", o.heads, "q.heads", q.heads)?;
    if q.heads % k.heads != 0 {
        return Err(Error::HeadsNotDivisible {
            heads_q: q.heads,
            heads_kv: k.heads,
        });
    }
    Ok(())
}

/// The alignment rows of 16-bit elements need at head dim `head_dim`: (bytes of a pointer,
/// elements of a stride). 16 bytes (8 elements), or 8 bytes (4 elements) for a head narrower
/// than its kernel's tile, which is copied 8 bytes at a time (a head dim of 100 is 200 bytes).
pub(crate) fn row_alignment(head_dim: usize) -> (u64, i64) {
    if head_dim_kernel(head_dim).is_some_and(|(_, padded)| padded) {
        (8, 4)
    } else {
        (16, 8)
    }
}

/// The memory rules of Q, K, V and O at `ptrs` (16-bit elements) and an optional f32
/// log-sum-exp of `batch * heads_q * seqlen_q` values at `lse` (0 for none): 16-byte aligned
/// pointers and strides (every row starts 16-byte aligned; 8-byte for a head narrower than its
/// kernel's tile), an output that does not overlap
/// itself or an input, and an LSE that overlaps none of the four. Returns the LSE's byte range.
pub(crate) fn attention_memory(
    [q, k, v, o]: [&Layout; 4],
    [qp, kp, vp, op]: [u64; 4],
    lse: u64,
) -> Result<(i128, i128)> {
    let (bytes, elems) = row_alignment(q.head_dim);
    for (arg, ptr) in [("q.ptr", qp), ("k.ptr", kp), ("v.ptr", vp), ("o.ptr", op)] {
        aligned(arg, ptr, bytes, false)?;
    }
    aligned("lse.ptr", lse, 4, false)?;
    for (name, l) in [("q", q), ("k", k), ("v", v), ("o", o)] {
        strides_multiple_of(name, l, elems)?;
    }
    if !o.is_non_overlapping() {
        return Err(Error::OverlappingOutput { arg: "o" });
    }
    let o_range = byte_range(op, o, 2);
    for (other, ptr, l) in [("q", qp, q), ("k", kp, k), ("v", vp, v)] {
        if overlaps(o_range, byte_range(ptr, l, 2)) {
            return Err(Error::Aliasing { output: "o", other });
        }
    }
    let n = (q.batch * q.heads * q.seqlen) as i128 * 4;
    let lse_range = (lse as i128, lse as i128 + n);
    if lse != 0 {
        for (other, ptr, l) in [("q", qp, q), ("k", kp, k), ("v", vp, v), ("o", op, o)] {
            if overlaps(lse_range, byte_range(ptr, l, 2)) {
                return Err(Error::Aliasing {
                    output: "lse",
                    other,
                });
            }
        }
    }
    Ok(lse_range)
}

/// The softmax scale of a call: the given one or `1 / sqrt(head_dim)`, finite and positive (the
/// kernels keep the running row maximum of the unscaled scores, which is the maximum of the
/// scaled ones only for a positive scale).
pub(crate) fn softmax_scale(given: Option<f32>, head_dim: usize) -> Result<f32> {
    let scale = given.unwrap_or(1.0 / (head_dim as f32).sqrt());
    if !(scale.is_finite() && scale > 0.0) {
        return Err(Error::InvalidArgument {
            arg: "options.softmax_scale",
            value: format!("{scale}"),
            expected: "a finite number > 0".into(),
        });
    }
    Ok(scale)
}
