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

/// A checked KV cache (see [`crate::KvCache`]): the layouts of its keys and values, the block
/// table's width for a paged cache, and how many keys one sequence can hold.
// Read by the CUDA path only.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
#[derive(Clone, Copy, Debug)]
pub(crate) struct Cache {
    pub(crate) k: Layout,
    pub(crate) v: Layout,
    /// Columns of the block table (`Some` for a paged cache).
    pub(crate) max_pages: Option<usize>,
    pub(crate) capacity: usize,
}

/// A checked call on a KV cache: the element type, the layout of the new rows (q for a decoding
/// call, the new keys for an append; the new values' too) and the cache.
// Read by the CUDA path only.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
#[derive(Clone, Copy, Debug)]
pub(crate) struct CacheCall {
    pub(crate) dtype: DType,
    pub(crate) q: Layout,
    pub(crate) v_new: Option<Layout>,
    pub(crate) cache: Cache,
}

/// An i32 index vector or table: rank `dims.len()`, the given dims, contiguous.
fn index_tensor(what: &str, name: &str, t: &Tensor, dims: &[usize], names: &str) -> Result<()> {
    rank(what, name, t, dims.len(), names)?;
    if t.dtype() != DType::I32 {
        bail!("{what}: `{name}` has dtype {:?}; expected I32", t.dtype())
    }
    if t.dims() != dims {
        bail!(
            "{what}: `{name}` has shape {:?}; expected {names} = {dims:?}",
            t.dims()
        )
    }
    if !t.is_contiguous() {
        bail!("{what}: `{name}` must be contiguous")
    }
    Ok(())
}

/// Checks a KV cache for `batch` sequences of rows of `dtype`, `head_dim`: k and v caches of one
/// shape and dtype (the head dim contiguous), `(batch, capacity, heads_kv, head_dim)` without a
/// block table, pages `(num_pages, page_size, heads_kv, head_dim)` with one (a power of two of
/// at least `min_page` rows; the table `(batch, max_pages)` i32), and `cache_seqlens` `(batch,)`
/// i32.
pub(crate) fn cache(
    what: &str,
    c: &crate::KvCache<'_>,
    batch: usize,
    dtype: DType,
    head_dim: usize,
    min_page: usize,
) -> Result<Cache> {
    const DIMS: &str = "(batch or pages, seqlen, heads_kv, head_dim)";
    rank(what, "k_cache", c.k_cache, 4, DIMS)?;
    rank(what, "v_cache", c.v_cache, 4, DIMS)?;
    for (name, t) in [("k_cache", c.k_cache), ("v_cache", c.v_cache)] {
        if t.dtype() != dtype {
            bail!(
                "{what}: `{name}` has dtype {:?} but the new rows have {dtype:?}; they must match",
                t.dtype()
            )
        }
    }
    let (k, v) = (
        layout_of(what, "k_cache", c.k_cache)?,
        layout_of(what, "v_cache", c.v_cache)?,
    );
    if c.k_cache.dims() != c.v_cache.dims() {
        bail!(
            "{what}: `k_cache` and `v_cache` must have the same shape, got {:?} and {:?}",
            c.k_cache.dims(),
            c.v_cache.dims()
        )
    }
    if k.batch == 0 || k.seqlen == 0 || k.heads == 0 || k.head_dim == 0 {
        bail!("{what}: `k_cache` has a zero dimension; every dimension must be at least 1")
    }
    if k.head_dim != head_dim {
        bail!(
            "{what}: the cache has head dim {} but the new rows have {head_dim}; they must match",
            k.head_dim
        )
    }
    index_tensor(what, "cache_seqlens", c.cache_seqlens, &[batch], "(batch,)")?;
    let (max_pages, capacity) = match c.block_table {
        Some(table) => {
            rank(what, "block_table", table, 2, "(batch, max_pages)")?;
            let pages = table.dim(1)?;
            if pages == 0 {
                bail!("{what}: `block_table` has no column; each sequence needs at least one page")
            }
            index_tensor(
                what,
                "block_table",
                table,
                &[batch, pages],
                "(batch, max_pages)",
            )?;
            let page = k.seqlen;
            if !page.is_power_of_two() || page < min_page {
                bail!(
                    "{what}: page size {page} (dim 1 of `k_cache`): expected a power of two of at least {min_page}"
                )
            }
            (Some(pages), pages.saturating_mul(page))
        }
        None => {
            if k.batch != batch {
                bail!(
                    "{what}: the contiguous cache has batch {} but the new rows have {batch}; they must match (or pass a block table)",
                    k.batch
                )
            }
            (None, k.seqlen)
        }
    };
    if capacity > longflash::attention::decode::MAX_CACHE_KEYS {
        bail!(
            "{what}: a cache of {capacity} keys per sequence; at most {} are supported",
            longflash::attention::decode::MAX_CACHE_KEYS
        )
    }
    Ok(Cache {
        k,
        v,
        max_pages,
        capacity,
    })
}

/// Every tensor of a cache call on the CUDA device of `first`.
pub(crate) fn cache_devices(
    what: &str,
    first: (&str, &Tensor),
    rest: &[(&str, &Tensor)],
    c: &crate::KvCache<'_>,
) -> Result<()> {
    let mut others: Vec<(&str, &Tensor)> = rest.to_vec();
    others.extend([
        ("k_cache", c.k_cache),
        ("v_cache", c.v_cache),
        ("cache_seqlens", c.cache_seqlens),
    ]);
    if let Some(t) = c.block_table {
        others.push(("block_table", t));
    }
    if !first.1.device().is_cuda() {
        bail!(
            "{what}: longflash needs CUDA tensors, `{}` is on {:?}",
            first.0,
            first.1.device().location()
        )
    }
    for (name, t) in others {
        if !t.device().same_device(first.1.device()) {
            bail!(
                "{what}: `{name}` is on {:?} but `{}` is on {:?}; they must be on the same device",
                t.device().location(),
                first.0,
                first.1.device().location()
            )
        }
    }
    Ok(())
}

/// Checks a decoding (or chunked-prefill) call: q `(batch, seqlen_q, heads_q, head_dim)` f16 or
/// bf16 with a supported head dim, the cache as [`cache`] checks it for decoding (pages of at
/// least 16 rows), query heads a multiple of the cache's. The caller checks the RoPE options
/// ([`rope_ok`]) and then the devices ([`cache_devices`]).
pub(crate) fn decode(what: &str, q: &Tensor, c: &crate::KvCache<'_>) -> Result<CacheCall> {
    rank(what, "q", q, 4, "(batch, seqlen_q, heads_q, head_dim)")?;
    let dtype = half_dtype(what, q, &[])?;
    let ql = layout_of(what, "q", q)?;
    if ql.batch == 0 || ql.seqlen == 0 || ql.heads == 0 || ql.head_dim == 0 {
        bail!("{what}: `q` has a zero dimension; every dimension must be at least 1")
    }
    let cache = cache(what, c, ql.batch, dtype, ql.head_dim, DECODE_MIN_PAGE)?;
    if ql.heads % cache.k.heads != 0 {
        bail!(
            "{what}: the {} query heads are not a multiple of the cache's {} key/value heads",
            ql.heads,
            cache.k.heads
        )
    }
    head_dim_ok(what, ql.head_dim, HeadDims::Padded)?;
    Ok(CacheCall {
        dtype,
        q: ql,
        v_new: None,
        cache,
    })
}

/// The RoPE options for a call of `batch` sequences, `seqlen_q` new rows, caches of `capacity`
/// keys and heads of `head_dim` (rotary dim, mode, offsets, positions within i32), as the kernels'
/// own validation checks them.
pub(crate) fn rope_ok(
    what: &str,
    rope: &longflash::rope::RopeOptions,
    head_dim: usize,
    batch: usize,
    seqlen_q: usize,
    capacity: usize,
) -> Result<()> {
    rope.validate(head_dim, batch, seqlen_q, capacity.max(1))
        .map_err(|e| candle_core::Error::msg(format!("{what}: {e}")))
}

/// The smallest page the decoding kernels read (a step of 16 keys stays in one page).
pub(crate) const DECODE_MIN_PAGE: usize = 16;

/// Checks a KV append: `k_new`, `v_new` `(batch, seqlen_new, heads_kv, head_dim)` of one shape
/// and dtype (f16 or bf16, an even head dim up to 256), the cache as [`cache`] checks it (pages
/// of any power of two), with the new rows' KV heads, and `rope` when given. The caller checks
/// the devices ([`cache_devices`]).
pub(crate) fn append(
    what: &str,
    k_new: &Tensor,
    v_new: &Tensor,
    c: &crate::KvCache<'_>,
    rope: Option<&longflash::rope::RopeOptions>,
) -> Result<CacheCall> {
    const DIMS: &str = "(batch, seqlen_new, heads_kv, head_dim)";
    rank(what, "k_new", k_new, 4, DIMS)?;
    rank(what, "v_new", v_new, 4, DIMS)?;
    let dtype = match k_new.dtype() {
        d @ (DType::F16 | DType::BF16) => d,
        d => bail!("{what}: `k_new` has dtype {d:?}; longflash runs f16 and bf16 only"),
    };
    if v_new.dtype() != dtype {
        bail!(
            "{what}: `v_new` has dtype {:?} but `k_new` has {dtype:?}; they must match",
            v_new.dtype()
        )
    }
    let (kn, vn) = (
        layout_of(what, "k_new", k_new)?,
        layout_of(what, "v_new", v_new)?,
    );
    if k_new.dims() != v_new.dims() {
        bail!(
            "{what}: `k_new` and `v_new` must have the same shape, got {:?} and {:?}",
            k_new.dims(),
            v_new.dims()
        )
    }
    if kn.batch == 0 || kn.seqlen == 0 || kn.heads == 0 || kn.head_dim == 0 {
        bail!("{what}: `k_new` has a zero dimension; every dimension must be at least 1")
    }
    if kn.head_dim % 2 != 0 || kn.head_dim > 256 {
        bail!(
            "{what}: head dim {} is not supported: expected an even head dim up to 256",
            kn.head_dim
        )
    }
    let cache = cache(what, c, kn.batch, dtype, kn.head_dim, 1)?;
    if cache.k.heads != kn.heads {
        bail!(
            "{what}: `k_new` has {} key/value heads but the cache has {}; they must match",
            kn.heads,
            cache.k.heads
        )
    }
    if let Some(r) = rope {
        rope_ok(what, r, kn.head_dim, kn.batch, 1, cache.capacity)?;
    }
    Ok(CacheCall {
        dtype,
        q: kn,
        v_new: Some(vn),
        cache,
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
