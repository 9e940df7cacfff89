//! longflash's attention kernels as candle operations.
//!
//! - Drop-ins for candle-flash-attn, with its signatures and semantics: [`flash_attn`],
//!   [`flash_attn_windowed`], [`flash_attn_varlen`], [`flash_attn_varlen_windowed`]. Tensors are
//!   `(batch, seqlen, heads, head_dim)` (packed `(total, heads, head_dim)` for varlen), f16 or
//!   bf16; causal and window masks are aligned bottom-right (the last query sees the last key);
//!   k and v may have fewer heads than q (grouped-query attention, no `repeat_kv`); strided views
//!   are read in place as long as the head dim is contiguous.
//! - longflash's own: [`flash_attn_lse`] (the output and its log-sum-exp), [`merge_lse`] (two
//!   results over different keys combined by their LSEs), and [`flash_attn_rope`] /
//!   [`flash_attn_rope_lse`] (RoPE, ReRoPE or Leaky ReRoPE applied inside the kernel to
//!   un-rotated q and k, half-split or interleaved pairs, see [`RopeOptions`]), and
//!   [`flash_attn_block_sparse_lse`] (only the key blocks a [`BlockMask`] lists).
//! - The serving path, over a contiguous or paged [`KvCache`] with the lengths on the device:
//!   [`flash_attn_with_kvcache`] (decoding and chunked prefill, FlashAttention's
//!   `flash_attn_with_kvcache`; `_windowed`, `_lse`), [`flash_attn_with_kvcache_rope`] (RoPE,
//!   ReRoPE or Leaky ReRoPE over a cache of un-rotated keys), and [`append_kv`] /
//!   [`append_kv_rope`] (new tokens' keys and values written into the cache in place).
//!
//! Every call runs on the stream of the tensors' candle device and does not synchronize; its
//! outputs are ordinary candle tensors allocated on that device. One [`longflash::Attention`]
//! per CUDA context is loaded on first use and kept ([`attention_for`]).
//!
//! What longflash does not run (CPU or Metal tensors, f32, wrong ranks or shapes, mismatched
//! dtypes or devices, unsupported head dims, a non-positive scale) is a [`candle_core::Error`]
//! that says what was wrong; no argument makes a call panic. Without the `cuda` feature (on by
//! default) the argument checks still run, and a call that passes them returns an error saying
//! the crate was built without CUDA.

#![warn(missing_docs)]

mod args;
#[cfg(feature = "cuda")]
mod cuda;

use candle_core::{Result, Tensor};

pub use longflash::rope::{PositionMode, RopeConfig, RopeLayout, RopeOptions, RopeScaling};
pub use longflash::sparse::patterns;
pub use longflash::{BlockMask, MaskShape, MaskSpec};

#[cfg(feature = "cuda")]
pub use cuda::attention_for;

use args::HeadDims;

#[cfg(not(feature = "cuda"))]
fn no_cuda<T>(what: &str) -> Result<T> {
    candle_core::bail!("{what}: longflash-candle was built without its `cuda` feature")
}

/// The kernels beyond the exact forward that the 4-D entry points reach.
#[derive(Clone, Copy)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
enum Special<'a> {
    None,
    Rope(&'a RopeOptions),
    Sparse(&'a BlockMask),
}

/// The forward behind every 4-D entry point: checks, then runs on the device.
fn dense(
    what: &'static str,
    [q, k, v]: [&Tensor; 3],
    softmax_scale: f32,
    mask: impl FnOnce(usize) -> MaskSpec,
    special: Special<'_>,
    with_lse: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    // The RoPE and block-sparse kernels have no padded head dims.
    let dims = match special {
        Special::None => HeadDims::Padded,
        Special::Rope(_) | Special::Sparse(_) => HeadDims::Native,
    };
    let scale = args::scale(what, softmax_scale)?;
    let checked = args::dense(what, q, k, v, dims)?;
    if let Special::Sparse(m) = special {
        let (ql, kl) = (&checked.q, &checked.k);
        m.check_for(ql.batch, ql.heads, ql.seqlen, kl.seqlen)
            .map_err(|e| candle_core::Error::msg(format!("{what}: {e}")))?;
    }
    args::devices(what, q, &[("k", k), ("v", v)])?;
    let mask = mask(checked.k.seqlen);
    #[cfg(feature = "cuda")]
    {
        cuda::forward(what, &checked, [q, k, v], scale, mask, special, with_lse)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (checked, scale, mask, with_lse);
        no_cuda(what)
    }
}

/// Scaled dot-product attention, `softmax(q k^T * softmax_scale) v`, as candle-flash-attn's
/// `flash_attn`.
///
/// `q` is `(batch, seqlen_q, heads_q, head_dim)`, `k` and `v` `(batch, seqlen_kv, heads_kv,
/// head_dim)` with `heads_q` a multiple of `heads_kv`; f16 or bf16, all on one CUDA device, the
/// head dim contiguous (other strides free) and a multiple of 4 up to 256 (candle-flash-attn
/// needs a multiple of 8). With `causal`, query `i` sees keys up to `i + seqlen_kv - seqlen_q`
/// (bottom-right alignment; queries with no key get zeros). Returns a contiguous
/// `(batch, seqlen_q, heads_q, head_dim)` tensor. `softmax_scale` must be finite and positive.
pub fn flash_attn(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    softmax_scale: f32,
    causal: bool,
) -> Result<Tensor> {
    let mask = move |_| {
        if causal {
            MaskSpec::causal()
        } else {
            MaskSpec::none()
        }
    };
    Ok(dense(
        "flash_attn",
        [q, k, v],
        softmax_scale,
        mask,
        Special::None,
        false,
    )?
    .0)
}

/// [`flash_attn`] with a sliding window, as candle-flash-attn's `flash_attn_windowed`: query `i`
/// sees key `j` when `d - left <= j <= d + right` with `d = i + seqlen_kv - seqlen_q`; a side of
/// `None` is unbounded, and so is a side of `seqlen_kv` or more. `(None, Some(0))` is causal.
pub fn flash_attn_windowed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    softmax_scale: f32,
    window_size_left: Option<usize>,
    window_size_right: Option<usize>,
) -> Result<Tensor> {
    let mask = move |seqlen_k| args::window_mask(window_size_left, window_size_right, seqlen_k);
    Ok(dense(
        "flash_attn_windowed",
        [q, k, v],
        softmax_scale,
        mask,
        Special::None,
        false,
    )?
    .0)
}

/// [`flash_attn`] over packed sequences of different lengths, as candle-flash-attn's
/// `flash_attn_varlen`.
///
/// `q` is `(total_q, heads_q, head_dim)`, `k` and `v` `(total_kv, heads_kv, head_dim)`;
/// `seqlens_q` and `seqlens_k` hold `batch + 1` u32 prefix sums of the sequences' lengths
/// (`0, len_0, len_0 + len_1, ...`) on the same device; `max_seqlen_q` and `max_seqlen_k` are the
/// longest sequences (at least 1, at most the packed lengths). Each sequence is attended alone,
/// its causal diagonal aligned bottom-right at its own lengths. Returns `(total_q, heads_q,
/// head_dim)`.
///
/// The prefix sums stay on the device and are not read back (no synchronization): sums that do
/// not start at 0, decrease, pass the packed lengths or exceed the maxima are clamped by the
/// kernel, which then never reads or writes outside the tensors, but the output is unspecified.
#[allow(clippy::too_many_arguments)]
pub fn flash_attn_varlen(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seqlens_q: &Tensor,
    seqlens_k: &Tensor,
    max_seqlen_q: usize,
    max_seqlen_k: usize,
    softmax_scale: f32,
    causal: bool,
) -> Result<Tensor> {
    let window_right = if causal { Some(0) } else { None };
    varlen(
        "flash_attn_varlen",
        [q, k, v],
        (seqlens_q, seqlens_k),
        (max_seqlen_q, max_seqlen_k),
        softmax_scale,
        (None, window_right),
    )
}

/// [`flash_attn_varlen`] with a sliding window, as candle-flash-attn's
/// `flash_attn_varlen_windowed`; the window is as in [`flash_attn_windowed`], a side of
/// `max_seqlen_k` or more counting as unbounded.
#[allow(clippy::too_many_arguments)]
pub fn flash_attn_varlen_windowed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seqlens_q: &Tensor,
    seqlens_k: &Tensor,
    max_seqlen_q: usize,
    max_seqlen_k: usize,
    softmax_scale: f32,
    window_size_left: Option<usize>,
    window_size_right: Option<usize>,
) -> Result<Tensor> {
    varlen(
        "flash_attn_varlen_windowed",
        [q, k, v],
        (seqlens_q, seqlens_k),
        (max_seqlen_q, max_seqlen_k),
        softmax_scale,
        (window_size_left, window_size_right),
    )
}

fn varlen(
    what: &'static str,
    [q, k, v]: [&Tensor; 3],
    (seqlens_q, seqlens_k): (&Tensor, &Tensor),
    (max_seqlen_q, max_seqlen_k): (usize, usize),
    softmax_scale: f32,
    (left, right): (Option<usize>, Option<usize>),
) -> Result<Tensor> {
    let scale = args::scale(what, softmax_scale)?;
    let checked = args::varlen(
        what,
        q,
        k,
        v,
        seqlens_q,
        seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
    )?;
    let mask = args::window_mask(left, right, max_seqlen_k);
    #[cfg(feature = "cuda")]
    {
        cuda::varlen(
            what,
            &checked,
            [q, k, v],
            (seqlens_q, seqlens_k),
            (max_seqlen_q, max_seqlen_k),
            scale,
            mask,
        )
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (checked, scale, mask);
        no_cuda(what)
    }
}

/// Attention with any longflash mask (dense, causal, sliding window; see [`MaskSpec`]), returning
/// the output `(batch, seqlen_q, heads_q, head_dim)` and the natural-log log-sum-exp of each
/// query row's scaled scores, f32 `(batch, heads_q, seqlen_q)` (`-inf` for a row that sees no
/// key). Arguments as [`flash_attn`]. The pair is what [`merge_lse`] combines.
pub fn flash_attn_lse(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    softmax_scale: f32,
    mask: MaskSpec,
) -> Result<(Tensor, Tensor)> {
    let (o, lse) = dense(
        "flash_attn_lse",
        [q, k, v],
        softmax_scale,
        move |_| mask,
        Special::None,
        true,
    )?;
    with_lse("flash_attn_lse", o, lse)
}

fn with_lse(what: &str, o: Tensor, lse: Option<Tensor>) -> Result<(Tensor, Tensor)> {
    match lse {
        Some(l) => Ok((o, l)),
        None => candle_core::bail!("{what}: the log-sum-exp was not produced"),
    }
}

/// Combines two attention results over different key sets by their log-sum-exps: returns the
/// output and LSE of attention over both key sets together (new tensors; the inputs are not
/// changed). `acc_o` and `part_o` are `(batch, seqlen, heads, head_dim)` of one dtype (f16 or
/// bf16, head dim a multiple of 8 up to 256), `acc_lse` and `part_lse` f32
/// `(batch, heads, seqlen)`, as [`flash_attn_lse`] returns them. Rows where both LSEs are
/// `-inf` stay 0 and `-inf`.
pub fn merge_lse(
    acc_o: &Tensor,
    acc_lse: &Tensor,
    part_o: &Tensor,
    part_lse: &Tensor,
) -> Result<(Tensor, Tensor)> {
    const WHAT: &str = "merge_lse";
    let (dtype, layout) = args::merge(WHAT, acc_o, acc_lse, part_o, part_lse)?;
    #[cfg(feature = "cuda")]
    {
        cuda::merge(WHAT, dtype, layout, [acc_o, acc_lse, part_o, part_lse])
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (dtype, layout);
        no_cuda(WHAT)
    }
}

/// Causal attention with rotary positions applied inside the kernel: `q` and `k` arrive
/// un-rotated, and the scores follow `rope.mode` (RoPE, ReRoPE with a window, Leaky ReRoPE),
/// with the frequency scaling, pair layout (half-split or interleaved), partial rotary dim,
/// position offsets, log-n scaling and left window of `rope` (see [`RopeOptions`]). The causal
/// diagonal and the positions are aligned bottom-right: query `i` sits at position
/// `offset + seqlen_kv - seqlen_q + i`, key `j` at `offset + j`.
///
/// Shapes as [`flash_attn`]; the head dim must be 64, 128 or 256. The keys are rotated once into
/// a workspace allocated on the device's stream (two for ReRoPE and Leaky ReRoPE), and the RoPE
/// tables are copied there from the host, without waiting. Returns `(batch, seqlen_q, heads_q,
/// head_dim)`.
pub fn flash_attn_rope(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    softmax_scale: f32,
    rope: &RopeOptions,
) -> Result<Tensor> {
    Ok(dense(
        "flash_attn_rope",
        [q, k, v],
        softmax_scale,
        |_| rope.mask(),
        Special::Rope(rope),
        false,
    )?
    .0)
}

/// [`flash_attn_rope`] that also returns the log-sum-exp, f32 `(batch, heads_q, seqlen_q)`, as
/// [`flash_attn_lse`] does.
pub fn flash_attn_rope_lse(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    softmax_scale: f32,
    rope: &RopeOptions,
) -> Result<(Tensor, Tensor)> {
    let (o, lse) = dense(
        "flash_attn_rope_lse",
        [q, k, v],
        softmax_scale,
        |_| rope.mask(),
        Special::Rope(rope),
        true,
    )?;
    with_lse("flash_attn_rope_lse", o, lse)
}

/// Block-sparse attention: only the key blocks `mask` lists for each query block are computed,
/// with its element mask (causal, window, sinks) inside partial blocks; see [`BlockMask`] and
/// the builders in [`patterns`] (sliding window, sinks, strided, dilated, BigBird, Longformer,
/// ...). Returns the output `(batch, seqlen_q, heads_q, head_dim)` and the f32 LSE
/// `(batch, heads_q, seqlen_q)` (`-inf` for rows with no block), which [`merge_lse`] combines
/// across passes. Shapes as [`flash_attn`], head dim 64, 128 or 256; the mask must be built for
/// the call's sequence lengths, with batch and heads 1 (shared) or the call's. The mask is
/// copied to the device on each call, on the stream, without waiting.
pub fn flash_attn_block_sparse_lse(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    softmax_scale: f32,
    mask: &BlockMask,
) -> Result<(Tensor, Tensor)> {
    let (o, lse) = dense(
        "flash_attn_block_sparse_lse",
        [q, k, v],
        softmax_scale,
        |_| mask.element_mask(),
        Special::Sparse(mask),
        true,
    )?;
    with_lse("flash_attn_block_sparse_lse", o, lse)
}

/// A KV cache of candle tensors, as FlashAttention's `flash_attn_with_kvcache` takes it, for
/// [`flash_attn_with_kvcache`], [`flash_attn_with_kvcache_rope`] and [`append_kv`].
///
/// - contiguous (no `block_table`): `k_cache` and `v_cache` are `(batch, capacity, heads_kv,
///   head_dim)`; key `j` of sequence `b` is row `(b, j)`;
/// - paged: `k_cache` and `v_cache` are `(num_pages, page_size, heads_kv, head_dim)` and
///   `block_table` `(batch, max_pages)` i32 page indices: key `j` of sequence `b` is row
///   `j % page_size` of page `block_table[b][j / page_size]`. The page size is a power of two, at
///   least 16 for attention (any for [`append_kv`]); pages may come in any order and be shared.
///
/// `cache_seqlens` `(batch,)` i32 holds the keys of each sequence: for attention, every key the
/// new queries see (the new tokens' included), for [`append_kv`] the keys before the append
/// (where the new ones go). Both stay on the device and are never read back: an entry outside
/// the cache (a length past the capacity, a page index past the pages) is clamped by the kernel,
/// which then reads and writes only inside the tensors, but leaves that sequence's result
/// unspecified. k and v must be separate buffers; the head dim must be contiguous, other strides
/// are free.
#[derive(Clone, Copy, Debug)]
pub struct KvCache<'a> {
    /// Cached keys.
    pub k_cache: &'a Tensor,
    /// Cached values, the keys' shape and dtype.
    pub v_cache: &'a Tensor,
    /// Keys held by each sequence, `(batch,)` i32.
    pub cache_seqlens: &'a Tensor,
    /// `(batch, max_pages)` i32 page indices of a paged cache; `None` for a contiguous one.
    pub block_table: Option<&'a Tensor>,
}

impl<'a> KvCache<'a> {
    /// A contiguous cache: `k_cache`, `v_cache` `(batch, capacity, heads_kv, head_dim)`.
    pub fn contiguous(k_cache: &'a Tensor, v_cache: &'a Tensor, cache_seqlens: &'a Tensor) -> Self {
        KvCache {
            k_cache,
            v_cache,
            cache_seqlens,
            block_table: None,
        }
    }

    /// A paged cache: pages `(num_pages, page_size, heads_kv, head_dim)` and a `(batch,
    /// max_pages)` block table.
    pub fn paged(
        k_cache: &'a Tensor,
        v_cache: &'a Tensor,
        block_table: &'a Tensor,
        cache_seqlens: &'a Tensor,
    ) -> Self {
        KvCache {
            k_cache,
            v_cache,
            cache_seqlens,
            block_table: Some(block_table),
        }
    }
}

/// What a KV-cache attention call computes besides the cached keys.
#[derive(Clone, Copy)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
enum CacheScores<'a> {
    /// Plain scores with a mask (causal and windows aligned bottom-right at each sequence's
    /// length).
    Mask(MaskSpec),
    /// RoPE / ReRoPE / Leaky ReRoPE over un-rotated keys.
    Rope(&'a RopeOptions),
}

/// The KV-cache attention behind every entry point: checks, then runs on the device; `scores`
/// gets the cache's capacity (per sequence).
fn kvcache<'r>(
    what: &'static str,
    q: &Tensor,
    cache: &KvCache<'_>,
    softmax_scale: f32,
    scores: impl FnOnce(usize) -> CacheScores<'r>,
    with_lse: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let scale = args::scale(what, softmax_scale)?;
    let checked = args::decode(what, q, cache)?;
    let scores = scores(checked.cache.capacity);
    if let CacheScores::Rope(r) = scores {
        let (l, capacity) = (&checked.q, checked.cache.capacity);
        args::rope_ok(what, r, l.head_dim, l.batch, l.seqlen, capacity)?;
    }
    args::cache_devices(what, ("q", q), &[], cache)?;
    #[cfg(feature = "cuda")]
    {
        cuda::kvcache(what, &checked, q, cache, scale, scores, with_lse)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (checked, scale, scores, with_lse);
        no_cuda(what)
    }
}

/// Attention of new queries over a KV cache, FlashAttention's `flash_attn_with_kvcache` (the
/// cache already holding the new tokens' keys and values: write them first with [`append_kv`]):
/// decoding (one query token per sequence, or a few for speculative decoding) and chunked
/// prefill (many), over a contiguous or paged cache (see [`KvCache`]).
///
/// `q` is `(batch, seqlen_q, heads_q, head_dim)`, f16 or bf16 like the cache, `heads_q` a
/// multiple of the cache's KV heads (grouped-query heads share one tile, no `repeat_kv`), the
/// head dim a multiple of 4 up to 256. Query `i` of sequence `b` sits at key position
/// `cache_seqlens[b] - seqlen_q + i`: with `causal` it sees keys up to there (bottom-right
/// alignment), without, every key the sequence holds. A sequence of 0 keys gets zeros. Long
/// caches are split across thread blocks and the parts merged by log-sum-exp; nothing waits for
/// the device. Returns `(batch, seqlen_q, heads_q, head_dim)`.
pub fn flash_attn_with_kvcache(
    q: &Tensor,
    cache: &KvCache<'_>,
    softmax_scale: f32,
    causal: bool,
) -> Result<Tensor> {
    let mask = if causal {
        MaskSpec::causal()
    } else {
        MaskSpec::none()
    };
    Ok(kvcache(
        "flash_attn_with_kvcache",
        q,
        cache,
        softmax_scale,
        move |_| CacheScores::Mask(mask),
        false,
    )?
    .0)
}

/// [`flash_attn_with_kvcache`] with a sliding window, as [`flash_attn_windowed`]: query `i`
/// sees key `j` when `d - left <= j <= d + right`, `d = cache_seqlens[b] - seqlen_q + i`; a side
/// of `None` is unbounded, and so is a side that reaches the cache's capacity.
pub fn flash_attn_with_kvcache_windowed(
    q: &Tensor,
    cache: &KvCache<'_>,
    softmax_scale: f32,
    window_size_left: Option<usize>,
    window_size_right: Option<usize>,
) -> Result<Tensor> {
    let scores = move |capacity| {
        CacheScores::Mask(args::window_mask(
            window_size_left,
            window_size_right,
            capacity,
        ))
    };
    Ok(kvcache(
        "flash_attn_with_kvcache_windowed",
        q,
        cache,
        softmax_scale,
        scores,
        false,
    )?
    .0)
}

/// [`flash_attn_with_kvcache`] with any longflash mask (dense, causal, sliding window; no
/// attention sinks), returning the output and the natural-log log-sum-exp of each query row,
/// f32 `(batch, heads_q, seqlen_q)` (`-inf` for a row that sees no key), as [`flash_attn_lse`]
/// does; [`merge_lse`] combines it with another pass.
pub fn flash_attn_with_kvcache_lse(
    q: &Tensor,
    cache: &KvCache<'_>,
    softmax_scale: f32,
    mask: MaskSpec,
) -> Result<(Tensor, Tensor)> {
    const WHAT: &str = "flash_attn_with_kvcache_lse";
    let scores = move |_| CacheScores::Mask(mask);
    let (o, lse) = kvcache(WHAT, q, cache, softmax_scale, scores, true)?;
    with_lse(WHAT, o, lse)
}

/// Decoding with RoPE, ReRoPE or Leaky ReRoPE over a cache of **un-rotated** keys (longflash's
/// `decode_rope`): [`flash_attn_with_kvcache`], causal, with positions and scores as
/// [`flash_attn_rope`] computes them. Key `j` of sequence `b` sits at position `off_b + j`, query
/// `i` at `off_b + cache_seqlens[b] - seqlen_q + i` (`off_b` from `rope.position_offsets`); the
/// queries are rotated once per call and each step of cached keys is turned in shared memory by
/// the side of the window it is on, so the cache can be read with any position mode, window or
/// scaling, and ReRoPE needs no second copy of it. The frequency table and offsets are copied to
/// the device on the stream, without waiting. Returns `(batch, seqlen_q, heads_q, head_dim)`.
pub fn flash_attn_with_kvcache_rope(
    q: &Tensor,
    cache: &KvCache<'_>,
    softmax_scale: f32,
    rope: &RopeOptions,
) -> Result<Tensor> {
    Ok(kvcache(
        "flash_attn_with_kvcache_rope",
        q,
        cache,
        softmax_scale,
        |_| CacheScores::Rope(rope),
        false,
    )?
    .0)
}

/// [`flash_attn_with_kvcache_rope`] that also returns the log-sum-exp, f32 `(batch, heads_q,
/// seqlen_q)`.
pub fn flash_attn_with_kvcache_rope_lse(
    q: &Tensor,
    cache: &KvCache<'_>,
    softmax_scale: f32,
    rope: &RopeOptions,
) -> Result<(Tensor, Tensor)> {
    const WHAT: &str = "flash_attn_with_kvcache_rope_lse";
    let (o, lse) = kvcache(
        WHAT,
        q,
        cache,
        softmax_scale,
        |_| CacheScores::Rope(rope),
        true,
    )?;
    with_lse(WHAT, o, lse)
}

fn append(
    what: &'static str,
    k_new: &Tensor,
    v_new: &Tensor,
    cache: &KvCache<'_>,
    rope: Option<&RopeOptions>,
) -> Result<()> {
    let checked = args::append(what, k_new, v_new, cache, rope)?;
    args::cache_devices(what, ("k_new", k_new), &[("v_new", v_new)], cache)?;
    #[cfg(feature = "cuda")]
    {
        cuda::append(what, &checked, [k_new, v_new], cache, rope)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (checked, rope);
        no_cuda(what)
    }
}

/// Writes new tokens' keys and values into a KV cache in place (the KV append of
/// `flash_attn_with_kvcache`): token `t` of sequence `b` goes to key slot `cache_seqlens[b] + t`
/// of `cache` (see [`KvCache`]; here `cache_seqlens` holds the lengths *before* the append, and
/// is not updated: the caller advances it). `k_new` and `v_new` are `(batch, seqlen_new,
/// heads_kv, head_dim)`, the cache's dtype and KV heads, an even head dim up to 256. The keys
/// are stored as they are, as [`flash_attn_with_kvcache_rope`] reads them.
///
/// A token whose slot falls outside its sequence's capacity (or whose page index is not a page
/// of the cache) is not written. The cache tensors must not share a buffer with each other or
/// with the new tokens. The write is queued on the device's stream; nothing waits for it.
pub fn append_kv(k_new: &Tensor, v_new: &Tensor, cache: &KvCache<'_>) -> Result<()> {
    append("append_kv", k_new, v_new, cache, None)
}

/// [`append_kv`] with the keys rotated to their positions on the way (`rope`'s rotary
/// configuration and position offsets: slot `s` of sequence `b` at position `off_b + s`; its
/// mode and window are not used), for caches that store rotated keys and are read by
/// [`flash_attn_with_kvcache`].
pub fn append_kv_rope(
    k_new: &Tensor,
    v_new: &Tensor,
    cache: &KvCache<'_>,
    rope: &RopeOptions,
) -> Result<()> {
    append("append_kv_rope", k_new, v_new, cache, Some(rope))
}
