//! What the GPU test modules share: the device, random inputs and the references written with
//! candle's own ops.

pub(crate) use candle_core::{DType, Device, IndexOp, Result, Tensor, D};
pub(crate) use longflash::rope::RopeLayout;
pub(crate) use longflash_candle::{
    append_kv, append_kv_rope, flash_attn, flash_attn_block_sparse_lse, flash_attn_lse,
    flash_attn_rope, flash_attn_rope_lse, flash_attn_varlen, flash_attn_varlen_windowed,
    flash_attn_windowed, flash_attn_with_kvcache, flash_attn_with_kvcache_lse,
    flash_attn_with_kvcache_rope_lse, flash_attn_with_kvcache_windowed, merge_lse, patterns,
    BlockMask, KvCache, MaskShape, MaskSpec, PositionMode, RopeConfig, RopeOptions,
};

/// CUDA device 0, or a printed skip (a failure under LONGFLASH_REQUIRE_GPU=1).
pub(crate) fn device(test: &str) -> Option<Device> {
    let required = std::env::var("LONGFLASH_REQUIRE_GPU").is_ok_and(|v| v == "1");
    // longflash's probe first: it returns an error where no driver is, where candle's
    // device constructor would not get that far.
    match longflash::open_device(0) {
        Ok(_) => Some(Device::new_cuda(0).expect("candle CUDA device 0")),
        Err(e) => {
            assert!(!required, "LONGFLASH_REQUIRE_GPU=1 but no GPU: {e}");
            println!("{test}: skipped (no GPU: {e})");
            None
        }
    }
}

pub(crate) fn randn(dims: &[usize], dtype: DType, dev: &Device) -> Result<Tensor> {
    Tensor::randn(0f32, 1.0, dims, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(dev)
}

/// `(sq, sk)` of 0 (visible) and -inf (hidden) for `mask`.
pub(crate) fn mask_bias(mask: &MaskSpec, sq: usize, sk: usize, dev: &Device) -> Result<Tensor> {
    let v: Vec<f32> = (0..sq)
        .flat_map(|i| {
            (0..sk).map(move |j| {
                if mask.is_visible(sq, sk, i, j) {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_vec(v, (sq, sk), dev)
}

/// k or v `(b, hk, sk, d)` repeated to `hq` heads.
pub(crate) fn repeat_kv(x: &Tensor, hq: usize) -> Result<Tensor> {
    let (b, hk, s, d) = x.dims4()?;
    x.unsqueeze(2)?
        .expand((b, hk, hq / hk, s, d))?
        .reshape((b, hq, s, d))
}

/// Softmax over the last dim of `scores + bias` in f32, the output, and the LSE
/// `(b, h, sq)`. Every row must see at least one key.
pub(crate) fn softmax_attend(scores: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
    let m = scores.max_keepdim(D::Minus1)?;
    let e = scores.broadcast_sub(&m)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    let p = e.broadcast_div(&s)?;
    let lse = (m + s.log()?)?.squeeze(D::Minus1)?;
    Ok((p.matmul(v)?, lse))
}

/// Reference attention with candle ops: q `(b, sq, hq, d)`, k, v `(b, sk, hk, d)`; returns
/// the output `(b, sq, hq, d)` and the LSE `(b, hq, sq)`, f32.
pub(crate) fn reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    mask: &MaskSpec,
) -> Result<(Tensor, Tensor)> {
    let (_, sq, hq, _) = q.dims4()?;
    let sk = k.dim(1)?;
    let f = |x: &Tensor| {
        x.to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .transpose(1, 2)?
            .contiguous()
    };
    let (q, k, v) = (f(q)?, f(k)?, f(v)?);
    let (k, v) = (repeat_kv(&k, hq)?, repeat_kv(&v, hq)?);
    let scores = (q.matmul(&k.t()?)? * scale as f64)?;
    let scores = scores.broadcast_add(&mask_bias(mask, sq, sk, q.device())?)?;
    let (o, lse) = softmax_attend(&scores, &v)?;
    Ok((o.transpose(1, 2)?, lse))
}

/// Largest absolute difference.
pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    let cpu = |x: &Tensor| x.to_device(&Device::Cpu)?.to_dtype(DType::F32);
    let d = (cpu(a)? - cpu(b)?)?.abs()?;
    d.flatten_all()?.max(0)?.to_scalar::<f32>()
}

pub(crate) fn tol(dtype: DType) -> f32 {
    if dtype == DType::BF16 {
        3e-2
    } else {
        6e-3
    }
}
