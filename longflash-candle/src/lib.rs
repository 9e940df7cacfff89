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
