//! Argument checks on CPU tensors: every bad call is an `Err` naming what was wrong, and a call
//! whose arguments are all right still fails on the CPU (longflash needs CUDA tensors). These
//! run without a GPU and without the CUDA libraries (`--no-default-features`).

use candle_core::{DType, Device, Result, Tensor};
use longflash_candle::{
    flash_attn, flash_attn_block_sparse_lse, flash_attn_lse, flash_attn_rope, flash_attn_varlen,
    flash_attn_varlen_windowed, flash_attn_windowed, merge_lse, patterns, MaskShape, MaskSpec,
    PositionMode, RopeConfig, RopeOptions,
};

fn t(dims: &[usize], dtype: DType) -> Tensor {
    Tensor::zeros(dims, dtype, &Device::Cpu).unwrap()
}

fn qkv(dtype: DType) -> (Tensor, Tensor, Tensor) {
    (
        t(&[2, 16, 8, 64], dtype),
        t(&[2, 32, 2, 64], dtype),
        t(&[2, 32, 2, 64], dtype),
    )
}

/// The call failed, and its message holds every one of `words`.
#[track_caller]
fn fails_with<T: std::fmt::Debug>(r: Result<T>, words: &[&str]) {
    let e = r.expect_err("the call must fail").to_string();
    for w in words {
        assert!(e.contains(w), "error {e:?} does not mention {w:?}");
    }
}

#[test]
fn well_formed_cpu_tensors_are_refused_for_the_device() {
    let (q, k, v) = qkv(DType::F16);
    let r = flash_attn(&q, &k, &v, 0.125, true);
    let e = r.expect_err("CPU tensors").to_string().to_lowercase();
    assert!(e.contains("cuda"), "{e}");
    let (q, k, v) = qkv(DType::BF16);
    let e = flash_attn_windowed(&q, &k, &v, 0.125, Some(4), Some(0))
        .expect_err("CPU tensors")
        .to_string()
        .to_lowercase();
    assert!(e.contains("cuda"), "{e}");
}

#[test]
fn dtypes() {
    let (q, k, v) = qkv(DType::F32);
    fails_with(
        flash_attn(&q, &k, &v, 0.125, false),
        &["F32", "f16 and bf16"],
    );
    let (q, _, _) = qkv(DType::F16);
    let (_, k, v) = qkv(DType::BF16);
    fails_with(
        flash_attn(&q, &k, &v, 0.125, false),
        &["`k`", "BF16", "F16"],
    );
}

#[test]
fn ranks_and_shapes() {
    let (q, k, v) = qkv(DType::F16);
    let q3 = t(&[16, 8, 64], DType::F16);
    fails_with(flash_attn(&q3, &k, &v, 0.125, false), &["`q`", "rank 4"]);
    // k and v of different shapes.
    let v2 = t(&[2, 31, 2, 64], DType::F16);
    fails_with(flash_attn(&q, &k, &v2, 0.125, false), &["same shape"]);
    // Batch and head dim must agree with q.
    let kb = t(&[3, 32, 2, 64], DType::F16);
    fails_with(flash_attn(&q, &kb, &kb, 0.125, false), &["batch"]);
    let kd = t(&[2, 32, 2, 128], DType::F16);
    fails_with(flash_attn(&q, &kd, &kd, 0.125, false), &["head dim"]);
    // 8 query heads over 3 key/value heads.
    let k3 = t(&[2, 32, 3, 64], DType::F16);
    fails_with(flash_attn(&q, &k3, &k3, 0.125, false), &["multiple"]);
    // A zero dimension.
    let q0 = t(&[2, 0, 8, 64], DType::F16);
    fails_with(flash_attn(&q0, &k, &v, 0.125, false), &["zero"]);
}

#[test]
fn head_dims() {
    for d in [6usize, 260] {
        let q = t(&[1, 4, 2, d], DType::F16);
        fails_with(flash_attn(&q, &q, &q, 0.125, false), &["head dim"]);
    }
    // 80 runs in the padded kernels of the exact forward, not in the RoPE forward.
    let q = t(&[1, 4, 2, 80], DType::F16);
    let e = flash_attn(&q, &q, &q, 0.125, false)
        .unwrap_err()
        .to_string();
    assert!(!e.contains("head dim"), "{e}");
    let rope = RopeOptions::new(RopeConfig::llama(80), PositionMode::Rope);
    fails_with(flash_attn_rope(&q, &q, &q, 0.125, &rope), &["head dim 80"]);
}

#[test]
fn last_dim_must_be_contiguous() {
    // (batch, seqlen, heads, head_dim) viewed from (batch, seqlen, head_dim, heads).
    let q = t(&[1, 4, 64, 2], DType::F16).transpose(2, 3).unwrap();
    fails_with(flash_attn(&q, &q, &q, 0.125, false), &["contiguous"]);
}

#[test]
fn strided_views_pass_the_checks() {
    // q, k, v as views of one fused (batch, seqlen, 3 * heads, head_dim) tensor, and a
    // (batch, heads, seqlen, head_dim) tensor seen as (batch, seqlen, heads, head_dim): these get
    // as far as the device check.
    let fused = t(&[1, 8, 12, 64], DType::F16);
    let q = fused.narrow(2, 0, 4).unwrap();
    let k = fused.narrow(2, 4, 4).unwrap();
    let v = fused.narrow(2, 8, 4).unwrap();
    let e = flash_attn(&q, &k, &v, 0.125, true).unwrap_err().to_string();
    assert!(e.to_lowercase().contains("cuda"), "{e}");
    let bhsd = t(&[1, 4, 8, 64], DType::F16).transpose(1, 2).unwrap();
    let e = flash_attn(&bhsd, &bhsd, &bhsd, 0.125, true)
        .unwrap_err()
        .to_string();
    assert!(e.to_lowercase().contains("cuda"), "{e}");
}

#[test]
fn softmax_scale() {
    let (q, k, v) = qkv(DType::F16);
    for s in [0.0f32, -1.0, f32::NAN, f32::INFINITY] {
        fails_with(flash_attn(&q, &k, &v, s, true), &["softmax_scale"]);
    }
}

#[test]
fn varlen() {
    let q = t(&[20, 8, 64], DType::F16);
    let k = t(&[30, 2, 64], DType::F16);
    let cu = Tensor::new(&[0u32, 10, 20], &Device::Cpu).unwrap();
    let cuk = Tensor::new(&[0u32, 15, 30], &Device::Cpu).unwrap();
    let e = flash_attn_varlen(&q, &k, &k, &cu, &cuk, 10, 15, 0.125, true)
        .unwrap_err()
        .to_string();
    assert!(e.to_lowercase().contains("cuda"), "{e}");
    // Prefix sums of the wrong type, count or rank.
    let cuf = cu.to_dtype(DType::F32).unwrap();
    fails_with(
        flash_attn_varlen(&q, &k, &k, &cuf, &cuk, 10, 15, 0.125, true),
        &["seqlens_q", "u32"],
    );
    let cu3 = Tensor::new(&[0u32, 5, 10, 20], &Device::Cpu).unwrap();
    fails_with(
        flash_attn_varlen(&q, &k, &k, &cu3, &cuk, 10, 15, 0.125, true),
        &["must match"],
    );
    let one = Tensor::new(&[0u32], &Device::Cpu).unwrap();
    fails_with(
        flash_attn_varlen(&q, &k, &k, &one, &one, 10, 15, 0.125, true),
        &["at least 2"],
    );
    let cu2d = cu.reshape((1, 3)).unwrap();
    fails_with(
        flash_attn_varlen(&q, &k, &k, &cu2d, &cuk, 10, 15, 0.125, true),
        &["rank 1"],
    );
    // Maxima of 0 or past the packed lengths.
    fails_with(
        flash_attn_varlen(&q, &k, &k, &cu, &cuk, 0, 15, 0.125, true),
        &["max_seqlen_q"],
    );
    fails_with(
        flash_attn_varlen_windowed(&q, &k, &k, &cu, &cuk, 10, 31, 0.125, Some(3), Some(0)),
        &["max_seqlen_k"],
    );
    // Packed tensors are rank 3.
    let q4 = t(&[1, 20, 8, 64], DType::F16);
    fails_with(
        flash_attn_varlen(&q4, &k, &k, &cu, &cuk, 10, 15, 0.125, true),
        &["rank 3"],
    );
}

#[test]
fn lse_and_merge() {
    let (q, k, v) = qkv(DType::F16);
    let e = flash_attn_lse(&q, &k, &v, 0.125, MaskSpec::causal())
        .unwrap_err()
        .to_string();
    assert!(e.to_lowercase().contains("cuda"), "{e}");

    let o = t(&[2, 16, 8, 64], DType::F16);
    let lse = t(&[2, 8, 16], DType::F32);
    let e = merge_lse(&o, &lse, &o, &lse).unwrap_err().to_string();
    assert!(e.to_lowercase().contains("cuda"), "{e}");
    // LSE of the wrong dtype or shape; outputs of different shapes or dtypes.
    let lse16 = t(&[2, 8, 16], DType::F16);
    fails_with(merge_lse(&o, &lse16, &o, &lse), &["acc_lse", "f32"]);
    let lse_t = t(&[2, 16, 8], DType::F32);
    fails_with(merge_lse(&o, &lse, &o, &lse_t), &["part_lse"]);
    let o2 = t(&[2, 16, 8, 32], DType::F16);
    fails_with(merge_lse(&o, &lse, &o2, &lse), &["same shape"]);
    let ob = t(&[2, 16, 8, 64], DType::BF16);
    fails_with(merge_lse(&o, &lse, &ob, &lse), &["part_o"]);
    let o12 = t(&[2, 16, 8, 12], DType::F16);
    fails_with(merge_lse(&o12, &lse, &o12, &lse), &["head dim 12"]);
}

#[test]
fn rope() {
    let (q, k, v) = qkv(DType::BF16);
    for mode in [
        PositionMode::Rope,
        PositionMode::ReRope { window: 8 },
        PositionMode::LeakyReRope {
            window: 8,
            leak: 16.0,
        },
    ] {
        let rope = RopeOptions::new(RopeConfig::llama(64), mode);
        let e = flash_attn_rope(&q, &k, &v, 0.125, &rope)
            .unwrap_err()
            .to_string();
        assert!(e.to_lowercase().contains("cuda"), "{e}");
    }
    let rope = RopeOptions::new(RopeConfig::llama(64), PositionMode::Rope);
    let q32 = q.to_dtype(DType::F32).unwrap();
    fails_with(flash_attn_rope(&q32, &k, &v, 0.125, &rope), &["F32"]);
}

#[test]
fn block_sparse() {
    let (q, k, v) = qkv(DType::F16);
    let shape = |seqlen_q, seqlen_k, heads| MaskShape {
        batch: 1,
        heads,
        seqlen_q,
        seqlen_k,
    };
    let mask = patterns::causal(shape(16, 32, 1)).unwrap();
    let e = flash_attn_block_sparse_lse(&q, &k, &v, 0.125, &mask)
        .unwrap_err()
        .to_string();
    assert!(e.to_lowercase().contains("cuda"), "{e}");
    // A mask built for other lengths or another head count.
    let other = patterns::causal(shape(16, 64, 1)).unwrap();
    fails_with(
        flash_attn_block_sparse_lse(&q, &k, &v, 0.125, &other),
        &["mask.seqlen_k"],
    );
    let heads = patterns::causal(shape(16, 32, 3)).unwrap();
    fails_with(
        flash_attn_block_sparse_lse(&q, &k, &v, 0.125, &heads),
        &["mask.heads"],
    );
    // No padded head dims in the block-sparse kernels.
    let q80 = t(&[1, 16, 2, 80], DType::F16);
    fails_with(
        flash_attn_block_sparse_lse(&q80, &q80, &q80, 0.125, &mask),
        &["head dim 80"],
    );
}
