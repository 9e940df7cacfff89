//! Argument checks on candle tensors, done before anything touches a device: ranks, element
//! types, shapes, strides and devices. They run the same with and without the `cuda` feature, so
//! the CPU tests exercise exactly the code the CUDA path runs first.

use candle_core::{bail, DType, Result, Tensor};
use longflash::{Layout, MaskSpec, SUPPORTED_HEAD_DIMS};

/// Which head dims a call accepts.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum HeadDims {
    /// Any multiple of 4 up to 256 (the exact and variable-length forwards).
    Padded,
    /// Exactly 64, 128 or 256 (the RoPE forward).
    Native,
}

/// A checked dense call: the element type and the longflash layouts of q, k and v, which are
/// 4-D `(batch, seqlen, heads, head_dim)` candle tensors.
// Read by the CUDA path only.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dense {
    pub(crate) dtype: DType,
    pub(crate) q: Layout,
    pub(crate) k: Layout,
    pub(crate) v: Layout,
}

/// A checked variable-length call: packed 3-D q, k, v as batch-1 layouts, and the sequence count.
// Read by the CUDA path only.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
#[derive(Clone, Copy, Debug)]
pub(crate) struct Varlen {
    pub(crate) dtype: DType,
    pub(crate) q: Layout,
    pub(crate) k: Layout,
    pub(crate) v: Layout,
    pub(crate) batch: usize,
}

fn rank(what: &str, name: &str, t: &Tensor, want: usize, dims: &str) -> Result<()> {
    if t.rank() != want {
        bail!(
            "{what}: `{name}` must have rank {want} {dims}, got shape {:?}",
            t.dims()
        )
    }
    Ok(())
}

fn half_dtype(what: &str, q: &Tensor, others: &[(&str, &Tensor)]) -> Result<DType> {
    let dtype = q.dtype();
    if dtype != DType::F16 && dtype != DType::BF16 {
        bail!("{what}: `q` has dtype {dtype:?}; longflash runs f16 and bf16 only")
    }
    for (name, t) in others {
        if t.dtype() != dtype {
            bail!(
                "{what}: `{name}` has dtype {:?} but `q` has {dtype:?}; they must match",
                t.dtype()
            )
        }
    }
    Ok(dtype)
}

/// The longflash layout of a tensor whose dims are `(batch, seqlen, heads, head_dim)` (rank 4)
/// or `(seqlen, heads, head_dim)` (rank 3, as batch 1), from its candle strides. The head dim
/// must be contiguous; a dim of size 1 gets stride 0 (it is never stepped over, and whatever
/// stride candle left there must not trip the 16-byte stride rule).
pub(crate) fn layout_of(what: &str, name: &str, t: &Tensor) -> Result<Layout> {
    let dims = t.dims();
    let strides = t.stride();
    let (dims4, strides4): ([usize; 4], [usize; 4]) = match *dims {
        [b, s, h, d] => (
            [b, s, h, d],
            [strides[0], strides[1], strides[2], strides[3]],
        ),
        [s, h, d] => ([1, s, h, d], [0, strides[0], strides[1], strides[2]]),
        _ => bail!("{what}: `{name}` must have rank 3 or 4, got shape {dims:?}"),
    };
    if dims4[3] > 1 && strides4[3] != 1 {
        bail!(
            "{what}: the last dim of `{name}` must be contiguous (stride 1), got strides {strides:?}"
        )
    }
    let mut s = [0i64; 3];
    for i in 0..3 {
        s[i] = if dims4[i] <= 1 {
            0
        } else {
            match i64::try_from(strides4[i]) {
                Ok(v) => v,
                Err(_) => bail!("{what}: `{name}` has a stride too large: {strides:?}"),
            }
        };
    }
    Ok(Layout {
        batch: dims4[0],
        seqlen: dims4[1],
        heads: dims4[2],
        head_dim: dims4[3],
        batch_stride: s[0],
        seq_stride: s[1],
        head_stride: s[2],
    })
}

fn head_dim_ok(what: &str, d: usize, dims: HeadDims) -> Result<()> {
    let ok = match dims {
        HeadDims::Padded => longflash::attention::head_dim_kernel(d).is_some(),
        HeadDims::Native => SUPPORTED_HEAD_DIMS.contains(&d),
    };
    if !ok {
        match dims {
            HeadDims::Padded => {
                bail!("{what}: head dim {d} is not supported: expected a multiple of 4 up to 256")
            }
            HeadDims::Native => bail!(
                "{what}: head dim {d} is not supported: expected one of {SUPPORTED_HEAD_DIMS:?}"
            ),
        }
    }
    Ok(())
}

fn shapes(what: &str, q: &Layout, k: &Layout, v: &Layout, dims: HeadDims) -> Result<()> {
    for (name, l) in [("q", q), ("k", k), ("v", v)] {
        if l.batch == 0 || l.seqlen == 0 || l.heads == 0 || l.head_dim == 0 {
            bail!("{what}: `{name}` has a zero dimension; every dimension must be at least 1")
        }
    }
    if (k.batch, k.seqlen, k.heads, k.head_dim) != (v.batch, v.seqlen, v.heads, v.head_dim) {
        bail!(
            "{what}: `k` and `v` must have the same shape, got k {:?} and v {:?}",
            [k.batch, k.seqlen, k.heads, k.head_dim],
            [v.batch, v.seqlen, v.heads, v.head_dim]
        )
    }
    if q.batch != k.batch {
        bail!(
            "{what}: `q` has batch {} but `k` has {}; they must match",
            q.batch,
            k.batch
        )
    }
    if q.head_dim != k.head_dim {
        bail!(
            "{what}: `q` has head dim {} but `k` has {}; they must match",
            q.head_dim,
            k.head_dim
        )
    }
    if q.heads % k.heads != 0 {
        bail!(
            "{what}: the {} query heads are not a multiple of the {} key/value heads",
            q.heads,
            k.heads
        )
    }
    head_dim_ok(what, q.head_dim, dims)
}

/// Every tensor on one CUDA device (candle's notion: the same `CudaDevice`, hence one stream).
pub(crate) fn devices(what: &str, q: &Tensor, others: &[(&str, &Tensor)]) -> Result<()> {
    if !q.device().is_cuda() {
        bail!(
            "{what}: longflash needs CUDA tensors, `q` is on {:?}",
            q.device().location()
        )
    }
    for (name, t) in others {
        if !t.device().same_device(q.device()) {
            bail!(
                "{what}: `{name}` is on {:?} but `q` is on {:?}; they must be on the same device",
                t.device().location(),
                q.device().location()
            )
        }
    }
    Ok(())
}

/// Checks q, k, v of a dense call: `(batch, seqlen, heads, head_dim)` each, f16 or bf16, k and v
/// of one shape, query heads a multiple of the key/value heads, a supported head dim, the last
/// dim contiguous. The caller checks the devices ([`devices`]) after its own checks.
pub(crate) fn dense(
    what: &str,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    dims: HeadDims,
) -> Result<Dense> {
    const DIMS: &str = "(batch, seqlen, heads, head_dim)";
    rank(what, "q", q, 4, DIMS)?;
    rank(what, "k", k, 4, DIMS)?;
    rank(what, "v", v, 4, DIMS)?;
    let dtype = half_dtype(what, q, &[("k", k), ("v", v)])?;
    let (ql, kl, vl) = (
        layout_of(what, "q", q)?,
        layout_of(what, "k", k)?,
        layout_of(what, "v", v)?,
    );
    shapes(what, &ql, &kl, &vl, dims)?;
    Ok(Dense {
        dtype,
        q: ql,
        k: kl,
        v: vl,
    })
}

/// Checks a variable-length call: packed `(total, heads, head_dim)` q, k, v as [`dense`] checks
/// them, and `seqlens_q`, `seqlens_k` as u32 vectors of `batch + 1` prefix sums, contiguous, on
/// the same device; `max_seqlen_q` and `max_seqlen_k` at least 1.
#[allow(clippy::too_many_arguments)]
pub(crate) fn varlen(
    what: &str,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seqlens_q: &Tensor,
    seqlens_k: &Tensor,
    max_seqlen_q: usize,
    max_seqlen_k: usize,
) -> Result<Varlen> {
    const DIMS: &str = "(total, heads, head_dim)";
    rank(what, "q", q, 3, DIMS)?;
    rank(what, "k", k, 3, DIMS)?;
    rank(what, "v", v, 3, DIMS)?;
    let dtype = half_dtype(what, q, &[("k", k), ("v", v)])?;
    let (ql, kl, vl) = (
        layout_of(what, "q", q)?,
        layout_of(what, "k", k)?,
        layout_of(what, "v", v)?,
    );
    shapes(what, &ql, &kl, &vl, HeadDims::Padded)?;
    for (name, s) in [("seqlens_q", seqlens_q), ("seqlens_k", seqlens_k)] {
        rank(what, name, s, 1, "(batch + 1)")?;
        if s.dtype() != DType::U32 {
            bail!(
                "{what}: `{name}` has dtype {:?}; the prefix sums are u32",
                s.dtype()
            )
        }
        if s.dim(0)? < 2 {
            bail!(
                "{what}: `{name}` holds {} prefix sums; at least 2 (one sequence) are needed",
                s.dim(0)?
            )
        }
        if !s.is_contiguous() {
            bail!("{what}: `{name}` must be contiguous")
        }
    }
    if seqlens_q.dim(0)? != seqlens_k.dim(0)? {
        bail!(
            "{what}: `seqlens_q` holds {} prefix sums but `seqlens_k` holds {}; they must match",
            seqlens_q.dim(0)?,
            seqlens_k.dim(0)?
        )
    }
    for (name, m, total) in [
        ("max_seqlen_q", max_seqlen_q, ql.seqlen),
        ("max_seqlen_k", max_seqlen_k, kl.seqlen),
    ] {
        if m == 0 || m > total {
            bail!("{what}: `{name}` = {m}: expected 1 to the packed length {total}")
        }
    }
    devices(
        what,
        q,
        &[
            ("k", k),
            ("v", v),
            ("seqlens_q", seqlens_q),
            ("seqlens_k", seqlens_k),
        ],
    )?;
    Ok(Varlen {
        dtype,
        q: ql,
        k: kl,
        v: vl,
        batch: seqlens_q.dim(0)? - 1,
    })
}

/// Checks the two results of an LSE merge: outputs `(batch, seqlen, heads, head_dim)` of one
/// shape and dtype (f16/bf16, head dim a multiple of 8 up to 256), LSEs f32
/// `(batch, heads, seqlen)`, everything on one CUDA device. Returns the outputs' dtype and
/// layout (of `acc_o` as it will be copied: contiguous).
pub(crate) fn merge(
    what: &str,
    acc_o: &Tensor,
    acc_lse: &Tensor,
    part_o: &Tensor,
    part_lse: &Tensor,
) -> Result<(DType, Layout)> {
    const DIMS: &str = "(batch, seqlen, heads, head_dim)";
    rank(what, "acc_o", acc_o, 4, DIMS)?;
    rank(what, "part_o", part_o, 4, DIMS)?;
    rank(what, "acc_lse", acc_lse, 3, "(batch, heads, seqlen)")?;
    rank(what, "part_lse", part_lse, 3, "(batch, heads, seqlen)")?;
    let dtype = acc_o.dtype();
    if dtype != DType::F16 && dtype != DType::BF16 {
        bail!("{what}: `acc_o` has dtype {dtype:?}; longflash runs f16 and bf16 only")
    }
    if part_o.dtype() != dtype {
        bail!(
            "{what}: `part_o` has dtype {:?} but `acc_o` has {dtype:?}; they must match",
            part_o.dtype()
        )
    }
    for (name, t) in [("acc_lse", acc_lse), ("part_lse", part_lse)] {
        if t.dtype() != DType::F32 {
            bail!("{what}: `{name}` has dtype {:?}; LSEs are f32", t.dtype())
        }
    }
    if acc_o.dims() != part_o.dims() {
        bail!(
            "{what}: `acc_o` {:?} and `part_o` {:?} must have the same shape",
            acc_o.dims(),
            part_o.dims()
        )
    }
    let (b, s, h, d) = acc_o.dims4()?;
    if b == 0 || s == 0 || h == 0 || d == 0 {
        bail!("{what}: `acc_o` has a zero dimension; every dimension must be at least 1")
    }
    for (name, t) in [("acc_lse", acc_lse), ("part_lse", part_lse)] {
        if t.dims() != [b, h, s] {
            bail!(
                "{what}: `{name}` has shape {:?}; expected (batch, heads, seqlen) = {:?}",
                t.dims(),
                [b, h, s]
            )
        }
    }
    if d % 8 != 0 || d > 256 {
        bail!("{what}: head dim {d} is not supported: expected a multiple of 8 up to 256")
    }
    layout_of(what, "part_o", part_o)?;
    devices(
        what,
        acc_o,
        &[
            ("acc_lse", acc_lse),
            ("part_o", part_o),
            ("part_lse", part_lse),
        ],
    )?;
    Ok((dtype, Layout::bshd(b, s, h, d)))
}

/// candle-flash-attn's window arguments as a longflash mask: a side of `None` is unbounded, and a
/// side that reaches `seqlen_k` keys or more counts as unbounded too (as flash-attn clamps it);
/// no left window with a right window of 0 is causal.
pub(crate) fn window_mask(left: Option<usize>, right: Option<usize>, seqlen_k: usize) -> MaskSpec {
    let side = |w: Option<usize>| {
        w.filter(|&w| w < seqlen_k)
            .and_then(|w| u32::try_from(w).ok())
    };
    let (l, r) = (side(left), side(right));
    if l.is_none() && r == Some(0) {
        MaskSpec::causal()
    } else {
        MaskSpec::sliding_window(l, r)
    }
}

/// The softmax scale as longflash takes it: finite and positive.
pub(crate) fn scale(what: &str, softmax_scale: f32) -> Result<f32> {
    if !(softmax_scale.is_finite() && softmax_scale > 0.0) {
        bail!("{what}: softmax_scale = {softmax_scale}: expected a finite number > 0")
    }
    Ok(softmax_scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_follow_flash_attn() {
        assert_eq!(window_mask(None, Some(0), 10), MaskSpec::causal());
        assert_eq!(window_mask(None, None, 10), MaskSpec::none());
        assert_eq!(
            window_mask(Some(3), Some(0), 10),
            MaskSpec::sliding_window(Some(3), Some(0))
        );
        // A side that covers every key is unbounded; a left one that does makes it causal.
        assert_eq!(window_mask(Some(10), Some(0), 10), MaskSpec::causal());
        assert_eq!(
            window_mask(Some(2), Some(usize::MAX), 10),
            MaskSpec::sliding_window(Some(2), None)
        );
    }
}
