//! The candle-flash-attn drop-ins (dense, causal, windows, GQA, strided views, varlen), LSE and
//! merge, block-sparse masks, and errors on the device.

use crate::common::*;

#[test]
fn dense_causal_windowed_gqa() -> Result<()> {
    let dev = gpu_or_skip!("dense_causal_windowed_gqa");
    for dtype in [DType::F16, DType::BF16] {
        for (b, sq, sk, hq, hk, d) in [
            (2, 128, 128, 4, 4, 64),
            (1, 77, 200, 8, 2, 128),
            (2, 1, 300, 6, 1, 96),
            (1, 64, 64, 2, 2, 256),
        ] {
            let q = randn(&[b, sq, hq, d], dtype, &dev)?;
            let k = randn(&[b, sk, hk, d], dtype, &dev)?;
            let v = randn(&[b, sk, hk, d], dtype, &dev)?;
            let scale = 1.0 / (d as f32).sqrt();
            let cases: Vec<(&str, MaskSpec, Tensor)> = vec![
                (
                    "dense",
                    MaskSpec::none(),
                    flash_attn(&q, &k, &v, scale, false)?,
                ),
                (
                    "causal",
                    MaskSpec::causal(),
                    flash_attn(&q, &k, &v, scale, true)?,
                ),
                (
                    "window 16/0",
                    MaskSpec::sliding_window(Some(16), Some(0)),
                    flash_attn_windowed(&q, &k, &v, scale, Some(16), Some(0))?,
                ),
                (
                    "window 8/5",
                    MaskSpec::sliding_window(Some(8), Some(5)),
                    flash_attn_windowed(&q, &k, &v, scale, Some(8), Some(5))?,
                ),
            ];
            for (name, mask, got) in cases {
                assert_eq!(got.dims(), q.dims());
                assert_eq!(got.dtype(), dtype);
                let (want, _) = reference(&q, &k, &v, scale, &mask)?;
                let diff = max_diff(&got, &want)?;
                assert!(
                    diff <= tol(dtype),
                    "{name} {dtype:?} b{b} sq{sq} sk{sk} hq{hq} hk{hk} d{d}: max diff {diff}"
                );
            }
        }
    }
    Ok(())
}

#[test]
fn strided_views() -> Result<()> {
    let dev = gpu_or_skip!("strided_views");
    let (b, s, h, d) = (2, 96, 4, 64);
    // q, k, v as views of one fused projection, and a (b, h, s, d) tensor transposed.
    let fused = randn(&[b, s, 3 * h, d], DType::F16, &dev)?;
    let q = fused.narrow(2, 0, h)?;
    let k = fused.narrow(2, h, h)?;
    let v = fused.narrow(2, 2 * h, h)?;
    assert!(!q.is_contiguous());
    let got = flash_attn(&q, &k, &v, 0.125, true)?;
    let (want, _) = reference(&q, &k, &v, 0.125, &MaskSpec::causal())?;
    let diff = max_diff(&got, &want)?;
    assert!(diff <= tol(DType::F16), "fused views: max diff {diff}");

    let bhsd = randn(&[b, h, s, d], DType::F16, &dev)?;
    let kt = bhsd.transpose(1, 2)?;
    let got = flash_attn(&q, &kt, &kt, 0.125, false)?;
    let (want, _) = reference(&q, &kt, &kt, 0.125, &MaskSpec::none())?;
    let diff = max_diff(&got, &want)?;
    assert!(diff <= tol(DType::F16), "transposed k, v: max diff {diff}");
    Ok(())
}

#[test]
fn varlen_matches_per_sequence_calls() -> Result<()> {
    let dev = gpu_or_skip!("varlen_matches_per_sequence_calls");
    let (hq, hk, d) = (4, 2, 64);
    let lens_q = [5usize, 40, 17];
    let lens_k = [9usize, 40, 60];
    let (tq, tk) = (lens_q.iter().sum(), lens_k.iter().sum());
    let q = randn(&[tq, hq, d], DType::BF16, &dev)?;
    let k = randn(&[tk, hk, d], DType::BF16, &dev)?;
    let v = randn(&[tk, hk, d], DType::BF16, &dev)?;
    let prefix = |l: &[usize]| {
        let mut acc = vec![0u32];
        for &x in l {
            acc.push(acc.last().unwrap() + x as u32);
        }
        acc
    };
    let cu_q = Tensor::new(prefix(&lens_q).as_slice(), &dev)?;
    let cu_k = Tensor::new(prefix(&lens_k).as_slice(), &dev)?;
    for (name, mask, got) in [
        (
            "causal",
            MaskSpec::causal(),
            flash_attn_varlen(&q, &k, &v, &cu_q, &cu_k, 40, 60, 0.125, true)?,
        ),
        (
            "window 7/0",
            MaskSpec::sliding_window(Some(7), Some(0)),
            flash_attn_varlen_windowed(&q, &k, &v, &cu_q, &cu_k, 40, 60, 0.125, Some(7), Some(0))?,
        ),
    ] {
        assert_eq!(got.dims(), q.dims());
        let (mut oq, mut ok) = (0, 0);
        for (&lq, &lk) in lens_q.iter().zip(&lens_k) {
            let qs = q.narrow(0, oq, lq)?.unsqueeze(0)?;
            let ks = k.narrow(0, ok, lk)?.unsqueeze(0)?;
            let vs = v.narrow(0, ok, lk)?.unsqueeze(0)?;
            let (want, _) = reference(&qs, &ks, &vs, 0.125, &mask)?;
            let diff = max_diff(&got.narrow(0, oq, lq)?, &want.squeeze(0)?)?;
            assert!(
                diff <= tol(DType::BF16),
                "{name} lq{lq} lk{lk}: max diff {diff}"
            );
            oq += lq;
            ok += lk;
        }
    }
    Ok(())
}

#[test]
fn lse_and_merge() -> Result<()> {
    let dev = gpu_or_skip!("lse_and_merge");
    let (b, sq, sk, hq, hk, d) = (2, 64, 256, 4, 2, 128);
    let q = randn(&[b, sq, hq, d], DType::F16, &dev)?;
    let k = randn(&[b, sk, hk, d], DType::F16, &dev)?;
    let v = randn(&[b, sk, hk, d], DType::F16, &dev)?;
    let scale = 1.0 / (d as f32).sqrt();
    let (o, lse) = flash_attn_lse(&q, &k, &v, scale, MaskSpec::none())?;
    let (want_o, want_lse) = reference(&q, &k, &v, scale, &MaskSpec::none())?;
    assert_eq!(lse.dims(), [b, hq, sq]);
    assert!(max_diff(&o, &want_o)? <= tol(DType::F16));
    let lse_diff = max_diff(&lse, &want_lse)?;
    assert!(lse_diff <= 1e-3, "LSE max diff {lse_diff}");

    // The two halves of the keys, merged, give attention over all of them.
    let half = sk / 2;
    let (k1, v1) = (k.narrow(1, 0, half)?, v.narrow(1, 0, half)?);
    let (k2, v2) = (k.narrow(1, half, half)?, v.narrow(1, half, half)?);
    let (o1, l1) = flash_attn_lse(&q, &k1, &v1, scale, MaskSpec::none())?;
    let (o2, l2) = flash_attn_lse(&q, &k2, &v2, scale, MaskSpec::none())?;
    let (o1_before, l1_before) = (o1.copy()?, l1.copy()?);
    let (om, lm) = merge_lse(&o1, &l1, &o2, &l2)?;
    let diff = max_diff(&om, &want_o)?;
    assert!(diff <= tol(DType::F16), "merged output: max diff {diff}");
    let lse_diff = max_diff(&lm, &want_lse)?;
    assert!(lse_diff <= 1e-3, "merged LSE: max diff {lse_diff}");
    // The inputs are left as they were, and the merge did change something.
    assert_eq!(max_diff(&o1, &o1_before)?, 0.0);
    assert_eq!(max_diff(&l1, &l1_before)?, 0.0);
    assert!(max_diff(&om, &o1)? > 1e-2);
    Ok(())
}

#[test]
fn block_sparse() -> Result<()> {
    let dev = gpu_or_skip!("block_sparse");
    let (b, s, hq, hk, d) = (2, 512, 4, 2, 64);
    let q = randn(&[b, s, hq, d], DType::BF16, &dev)?;
    let k = randn(&[b, s, hk, d], DType::BF16, &dev)?;
    let v = randn(&[b, s, hk, d], DType::BF16, &dev)?;
    let shape = MaskShape {
        batch: 1,
        heads: hq,
        seqlen_q: s,
        seqlen_k: s,
    };
    let mask: BlockMask = patterns::strided(shape, 2, 3).map_err(candle_core::Error::wrap)?;
    let (got, lse) = flash_attn_block_sparse_lse(&q, &k, &v, 0.125, &mask)?;
    assert_eq!(lse.dims(), [b, hq, s]);
    // Reference: a per-head bias from the mask's own visibility rule.
    let bias: Vec<f32> = (0..hq)
        .flat_map(|h| {
            let mask = &mask;
            (0..s).flat_map(move |i| {
                (0..s).map(move |j| {
                    if mask.is_visible(0, h, i, j) {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
        })
        .collect();
    let bias = Tensor::from_vec(bias, (1, hq, s, s), &Device::Cpu)?;
    let f = |x: &Tensor| {
        x.to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .transpose(1, 2)?
            .contiguous()
    };
    let (qf, kf, vf) = (f(&q)?, repeat_kv(&f(&k)?, hq)?, repeat_kv(&f(&v)?, hq)?);
    let scores = (qf.matmul(&kf.t()?)? * 0.125)?.broadcast_add(&bias)?;
    let (want, want_lse) = softmax_attend(&scores, &vf)?;
    let diff = max_diff(&got, &want.transpose(1, 2)?)?;
    assert!(
        diff <= tol(DType::BF16),
        "strided block mask: max diff {diff}"
    );
    let lse_diff = max_diff(&lse, &want_lse)?;
    assert!(
        lse_diff <= 1e-2,
        "strided block mask: LSE max diff {lse_diff}"
    );
    Ok(())
}

#[test]
fn errors_on_the_device() -> Result<()> {
    let dev = gpu_or_skip!("errors_on_the_device");
    let q = randn(&[1, 8, 2, 64], DType::F16, &dev)?;
    // f32 on the GPU, and CUDA q with CPU k.
    let q32 = q.to_dtype(DType::F32)?;
    assert!(flash_attn(&q32, &q32, &q32, 0.125, true).is_err());
    let kc = q.to_device(&Device::Cpu)?;
    let e = flash_attn(&q, &kc, &kc, 0.125, true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("same device"), "{e}");
    // A view whose start breaks the 16-byte rule is refused by longflash, not run.
    let flat = randn(&[8 * 2 * 64 + 4], DType::F16, &dev)?;
    let odd = flat.narrow(0, 4, 8 * 2 * 64)?.reshape((1, 8, 2, 64));
    if let Ok(odd) = odd {
        assert!(flash_attn(&odd, &q, &q, 0.125, true).is_err());
    }
    Ok(())
}
