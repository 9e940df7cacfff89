//! GPU tests: every entry point against attention written with candle's own ops (matmul,
//! softmax, explicit rotations) in f32, on random inputs. Inputs are drawn and references
//! computed on the CPU, so that the GPU side runs only longflash's kernels and candle's own
//! casts and copies (no cuBLAS or cuRAND call: the binary runs where only the driver is). Without
//! a GPU each test prints that it skipped; with LONGFLASH_REQUIRE_GPU=1 a missing GPU (or a
//! build without the `cuda` feature) fails.

#[cfg(not(feature = "cuda"))]
#[test]
fn gpu_tests_need_the_cuda_feature() {
    let required = std::env::var("LONGFLASH_REQUIRE_GPU").is_ok_and(|v| v == "1");
    assert!(
        !required,
        "LONGFLASH_REQUIRE_GPU=1 but longflash-candle was built without its `cuda` feature"
    );
    println!("skipped: the GPU tests need the `cuda` feature");
}

#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::{DType, Device, IndexOp, Result, Tensor, D};
    use longflash::rope::RopeLayout;
    use longflash_candle::{
        append_kv, append_kv_rope, flash_attn, flash_attn_block_sparse_lse, flash_attn_lse,
        flash_attn_rope, flash_attn_rope_lse, flash_attn_varlen, flash_attn_varlen_windowed,
        flash_attn_windowed, flash_attn_with_kvcache, flash_attn_with_kvcache_lse,
        flash_attn_with_kvcache_rope_lse, flash_attn_with_kvcache_windowed, merge_lse, patterns,
        BlockMask, KvCache, MaskShape, MaskSpec, PositionMode, RopeConfig, RopeOptions,
    };

    /// CUDA device 0, or a printed skip (a failure under LONGFLASH_REQUIRE_GPU=1).
    fn device(test: &str) -> Option<Device> {
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

    macro_rules! gpu_or_skip {
        ($name:expr) => {
            match device($name) {
                Some(d) => d,
                None => return Ok(()),
            }
        };
    }

    fn randn(dims: &[usize], dtype: DType, dev: &Device) -> Result<Tensor> {
        Tensor::randn(0f32, 1.0, dims, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(dev)
    }

    /// `(sq, sk)` of 0 (visible) and -inf (hidden) for `mask`.
    fn mask_bias(mask: &MaskSpec, sq: usize, sk: usize, dev: &Device) -> Result<Tensor> {
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
    fn repeat_kv(x: &Tensor, hq: usize) -> Result<Tensor> {
        let (b, hk, s, d) = x.dims4()?;
        x.unsqueeze(2)?
            .expand((b, hk, hq / hk, s, d))?
            .reshape((b, hq, s, d))
    }

    /// Softmax over the last dim of `scores + bias` in f32, the output, and the LSE
    /// `(b, h, sq)`. Every row must see at least one key.
    fn softmax_attend(scores: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let m = scores.max_keepdim(D::Minus1)?;
        let e = scores.broadcast_sub(&m)?.exp()?;
        let s = e.sum_keepdim(D::Minus1)?;
        let p = e.broadcast_div(&s)?;
        let lse = (m + s.log()?)?.squeeze(D::Minus1)?;
        Ok((p.matmul(v)?, lse))
    }

    /// Reference attention with candle ops: q `(b, sq, hq, d)`, k, v `(b, sk, hk, d)`; returns
    /// the output `(b, sq, hq, d)` and the LSE `(b, hq, sq)`, f32.
    fn reference(
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
    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        let cpu = |x: &Tensor| x.to_device(&Device::Cpu)?.to_dtype(DType::F32);
        let d = (cpu(a)? - cpu(b)?)?.abs()?;
        d.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    fn tol(dtype: DType) -> f32 {
        if dtype == DType::BF16 {
            3e-2
        } else {
            6e-3
        }
    }

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
                flash_attn_varlen_windowed(
                    &q,
                    &k,
                    &v,
                    &cu_q,
                    &cu_k,
                    40,
                    60,
                    0.125,
                    Some(7),
                    Some(0),
                )?,
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

    /// `x` `(b, s, h, d)` f32 with each row `s` rotated by `positions[s]` (per batch entry), as
    /// `config` pairs and scales it, using the library's frequency table.
    fn rotate(
        x: &Tensor,
        positions: &[Vec<f64>],
        config: &RopeConfig,
        seq_len: usize,
    ) -> Result<Tensor> {
        let (b, s, h, d) = x.dims4()?;
        let inv = config
            .inv_freq(d, seq_len)
            .map_err(candle_core::Error::wrap)?;
        let half = inv.len();
        let af = config.attention_factor();
        let dev = x.device();
        let mut rows = Vec::with_capacity(b);
        for (bi, pos) in positions.iter().enumerate().take(b) {
            let (mut c, mut sn) = (Vec::new(), Vec::new());
            for &p in pos {
                for &w in &inv {
                    c.push(((p * w).cos() * af) as f32);
                    sn.push(((p * w).sin() * af) as f32);
                }
            }
            let cos = Tensor::from_vec(c, (s, 1, half), dev)?;
            let sin = Tensor::from_vec(sn, (s, 1, half), dev)?;
            let xb = x.i(bi)?;
            let rot = xb.narrow(D::Minus1, 0, 2 * half)?;
            let (x1, x2) = match config.layout {
                RopeLayout::HalfSplit => (
                    rot.narrow(D::Minus1, 0, half)?,
                    rot.narrow(D::Minus1, half, half)?,
                ),
                RopeLayout::Interleaved => {
                    let r = rot.reshape((s, h, half, 2))?;
                    (r.i((.., .., .., 0))?, r.i((.., .., .., 1))?)
                }
            };
            let y1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
            let y2 = (x1.broadcast_mul(&sin)? + x2.broadcast_mul(&cos)?)?;
            let turned = match config.layout {
                RopeLayout::HalfSplit => Tensor::cat(&[&y1, &y2], D::Minus1)?,
                RopeLayout::Interleaved => {
                    Tensor::stack(&[&y1, &y2], D::Minus1)?.reshape((s, h, 2 * half))?
                }
            };
            let row = if 2 * half < d {
                Tensor::cat(
                    &[&turned, &xb.narrow(D::Minus1, 2 * half, d - 2 * half)?],
                    D::Minus1,
                )?
            } else {
                turned
            };
            rows.push(row);
        }
        Tensor::stack(&rows, 0)
    }

    /// Reference RoPE attention (causal, two score matrices): inside the window the scores of
    /// q and k rotated at their positions; outside, ReRoPE's `(R_w q) . k` or Leaky ReRoPE's
    /// `(R_{p_i/k + w - w/k} q) . (R_{p_j/k} k)`.
    fn rope_reference(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f32,
        rope: &RopeOptions,
    ) -> Result<(Tensor, Tensor)> {
        let (b, sq, hq, _) = q.dims4()?;
        let sk = k.dim(1)?;
        let dev = &Device::Cpu;
        let cpu = |x: &Tensor| x.to_device(dev)?.to_dtype(DType::F32);
        let (q, k, v) = (cpu(q)?, cpu(k)?, cpu(v)?);
        let seq_len = sk + rope.max_offset() as usize;
        let qpos: Vec<Vec<f64>> = (0..b)
            .map(|bi| {
                (0..sq)
                    .map(|i| rope.query_position(bi, i, sq, sk) as f64)
                    .collect()
            })
            .collect();
        let kpos: Vec<Vec<f64>> = (0..b)
            .map(|bi| (0..sk).map(|j| rope.key_position(bi, j) as f64).collect())
            .collect();
        let heads = |x: &Tensor| x.transpose(1, 2)?.contiguous();
        let kv = |x: &Tensor| -> Result<Tensor> { repeat_kv(&heads(x)?, hq) };
        let scores_of = |qr: &Tensor, kr: &Tensor| -> Result<Tensor> {
            heads(qr)?.matmul(&kv(kr)?.t()?)? * scale as f64
        };
        let inside = scores_of(
            &rotate(&q, &qpos, &rope.config, seq_len)?,
            &rotate(&k, &kpos, &rope.config, seq_len)?,
        )?;
        let scores = match rope.mode {
            PositionMode::Rope => inside,
            PositionMode::ReRope { window } | PositionMode::LeakyReRope { window, .. } => {
                let w = window as f64;
                let outside = match rope.mode {
                    PositionMode::ReRope { .. } => {
                        let wpos: Vec<Vec<f64>> = vec![vec![w; sq]; b];
                        scores_of(&rotate(&q, &wpos, &rope.config, seq_len)?, &k)?
                    }
                    PositionMode::LeakyReRope { leak, .. } => {
                        let qo: Vec<Vec<f64>> = qpos
                            .iter()
                            .map(|p| p.iter().map(|&x| x / leak + w - w / leak).collect())
                            .collect();
                        let ko: Vec<Vec<f64>> = kpos
                            .iter()
                            .map(|p| p.iter().map(|&x| x / leak).collect())
                            .collect();
                        scores_of(
                            &rotate(&q, &qo, &rope.config, seq_len)?,
                            &rotate(&k, &ko, &rope.config, seq_len)?,
                        )?
                    }
                    PositionMode::Rope => unreachable!(),
                };
                // Per batch entry: inside where p_i - p_j < w.
                let mut sel = Vec::with_capacity(b * sq * sk);
                for (qp, kp) in qpos.iter().zip(&kpos) {
                    for pi in qp {
                        sel.extend(kp.iter().map(|pj| u8::from(pi - pj < w)));
                    }
                }
                let sel =
                    Tensor::from_vec(sel, (b, 1, sq, sk), dev)?.broadcast_as(inside.shape())?;
                sel.where_cond(&inside, &outside)?
            }
        };
        let scores = scores.broadcast_add(&mask_bias(&rope.mask(), sq, sk, dev)?)?;
        let (o, lse) = softmax_attend(&scores, &kv(&v)?)?;
        Ok((o.transpose(1, 2)?, lse))
    }

    #[test]
    fn rope_modes_and_layouts() -> Result<()> {
        let dev = gpu_or_skip!("rope_modes_and_layouts");
        for dtype in [DType::F16, DType::BF16] {
            for layout in [RopeLayout::HalfSplit, RopeLayout::Interleaved] {
                for mode in [
                    PositionMode::Rope,
                    PositionMode::ReRope { window: 24 },
                    PositionMode::LeakyReRope {
                        window: 16,
                        leak: 8.0,
                    },
                ] {
                    let (b, sq, sk, hq, hk, d) = (2, 70, 150, 6, 2, 64);
                    let q = randn(&[b, sq, hq, d], dtype, &dev)?;
                    let k = randn(&[b, sk, hk, d], dtype, &dev)?;
                    let v = randn(&[b, sk, hk, d], dtype, &dev)?;
                    let mut config = RopeConfig::llama(d);
                    config.layout = layout;
                    config.base = 100000.0;
                    let mut rope = RopeOptions::new(config, mode);
                    rope.position_offsets = Some(vec![0, 37]);
                    let scale = 1.0 / (d as f32).sqrt();
                    let got = flash_attn_rope(&q, &k, &v, scale, &rope)?;
                    let (got2, lse) = flash_attn_rope_lse(&q, &k, &v, scale, &rope)?;
                    let (want, want_lse) = rope_reference(&q, &k, &v, scale, &rope)?;
                    let diff = max_diff(&got, &want)?;
                    assert!(
                        diff <= tol(dtype),
                        "{mode:?} {layout:?} {dtype:?}: max diff {diff}"
                    );
                    assert!(max_diff(&got2, &want)? <= tol(dtype));
                    let lse_diff = max_diff(&lse, &want_lse)?;
                    assert!(
                        lse_diff <= 2e-2,
                        "{mode:?} {layout:?} {dtype:?}: LSE max diff {lse_diff}"
                    );
                }
            }
        }
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

    /// A deterministic permutation of `0..n` (a fixed LCG), so that pages land out of order.
    fn permutation(n: usize, seed: u64) -> Vec<usize> {
        let mut p: Vec<usize> = (0..n).collect();
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        for i in (1..n).rev() {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            p.swap(i, ((x >> 33) as usize) % (i + 1));
        }
        p
    }

    /// A contiguous cache `(b, pages_per_seq * page, h, d)` (CPU) as pages: a pool of
    /// `b * pages_per_seq + spare` pages of `page` rows in shuffled order, the spare ones random,
    /// and the `(b, pages_per_seq)` i32 table that maps each sequence's pages into the pool.
    fn to_pages(
        cont: &Tensor,
        page: usize,
        spare: usize,
        seed: u64,
    ) -> Result<(Tensor, Vec<Vec<i32>>)> {
        let (b, cap, h, d) = cont.dims4()?;
        let per_seq = cap / page;
        let n = b * per_seq + spare;
        let perm = permutation(n, seed);
        let mut pool: Vec<Option<Tensor>> = vec![None; n];
        let mut table = vec![vec![0i32; per_seq]; b];
        for (bi, row) in table.iter_mut().enumerate() {
            for (p, entry) in row.iter_mut().enumerate() {
                let phys = perm[bi * per_seq + p];
                *entry = phys as i32;
                pool[phys] = Some(cont.i(bi)?.narrow(0, p * page, page)?);
            }
        }
        let pages = pool
            .into_iter()
            .map(|p| match p {
                Some(t) => Ok(t),
                None => {
                    Tensor::randn(0f32, 1.0, (page, h, d), &Device::Cpu)?.to_dtype(cont.dtype())
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((Tensor::stack(&pages, 0)?, table))
    }

    fn i32_tensor(v: &[i32], dev: &Device) -> Result<Tensor> {
        Tensor::new(v, dev)
    }

    fn table_tensor(t: &[Vec<i32>], dev: &Device) -> Result<Tensor> {
        let cols = t.first().map_or(0, Vec::len);
        let flat: Vec<i32> = t.iter().flatten().copied().collect();
        Tensor::from_vec(flat, (t.len(), cols), dev)
    }

    /// Checks a KV-cache result (output `(b, sq, hq, d)`, LSE `(b, hq, sq)`) against the
    /// reference of each sequence over its first `lens[b]` cached keys (`want(b, len)` gives
    /// it); a sequence of 0 keys must get zeros and an LSE of -inf.
    fn check_per_sequence(
        what: &str,
        got: &Tensor,
        lse: &Tensor,
        lens: &[i32],
        tol_o: f32,
        mut want: impl FnMut(usize, usize) -> Result<(Tensor, Tensor)>,
    ) -> Result<()> {
        for (bi, &len) in lens.iter().enumerate() {
            let g = got.i(bi)?.unsqueeze(0)?;
            let gl = lse.i(bi)?.to_device(&Device::Cpu)?;
            if len == 0 {
                let zeros = g.zeros_like()?;
                assert_eq!(max_diff(&g, &zeros)?, 0.0, "{what}: empty sequence {bi}");
                let all_neg_inf = gl
                    .flatten_all()?
                    .to_vec1::<f32>()?
                    .iter()
                    .all(|&x| x == f32::NEG_INFINITY);
                assert!(all_neg_inf, "{what}: empty sequence {bi}: LSE not -inf");
                continue;
            }
            let (wo, wl) = want(bi, len as usize)?;
            let diff = max_diff(&g, &wo)?;
            assert!(
                diff <= tol_o,
                "{what}: sequence {bi} (len {len}): max diff {diff}"
            );
            let ldiff = max_diff(&gl.unsqueeze(0)?, &wl)?;
            assert!(ldiff <= 2e-2, "{what}: sequence {bi}: LSE max diff {ldiff}");
        }
        Ok(())
    }

    #[test]
    fn kvcache_contiguous_and_paged() -> Result<()> {
        let dev = gpu_or_skip!("kvcache_contiguous_and_paged");
        let cpu = Device::Cpu;
        for dtype in [DType::F16, DType::BF16] {
            for (hq, hk, d, page) in [(6, 2, 64, 16), (8, 8, 128, 64), (4, 1, 80, 32)] {
                let per_seq = 320 / page;
                let cap = per_seq * page;
                // Lengths: a page boundary, a partial page, the whole capacity, and empty.
                let lens = [page as i32 * 4, 137, cap as i32, 0];
                let b = lens.len();
                let kc = Tensor::randn(0f32, 1.0, (b, cap, hk, d), &cpu)?.to_dtype(dtype)?;
                let vc = Tensor::randn(0f32, 1.0, (b, cap, hk, d), &cpu)?.to_dtype(dtype)?;
                let (kp, table) = to_pages(&kc, page, 3, 11)?;
                let (vp, table_v) = to_pages(&vc, page, 3, 11)?;
                assert_eq!(table, table_v);
                let seqlens = i32_tensor(&lens, &dev)?;
                let (kcd, vcd) = (kc.to_device(&dev)?, vc.to_device(&dev)?);
                let (kpd, vpd) = (kp.to_device(&dev)?, vp.to_device(&dev)?);
                let tabd = table_tensor(&table, &dev)?;
                let contiguous = KvCache::contiguous(&kcd, &vcd, &seqlens);
                let paged = KvCache::paged(&kpd, &vpd, &tabd, &seqlens);
                let scale = 1.0 / (d as f32).sqrt();
                // One token, a speculative burst, and a chunk of prefill (the chunked-prefill
                // kernel from 64 queries on); causal and not.
                for sq in [1usize, 5, 64] {
                    let q = randn(&[b, sq, hq, d], dtype, &dev)?;
                    for (name, cache) in [("contiguous", &contiguous), ("paged", &paged)] {
                        for mask in [MaskSpec::causal(), MaskSpec::none()] {
                            let what = format!("{dtype:?} h{hq}/{hk} d{d} {name} sq{sq} {mask:?}");
                            let (o, lse) = flash_attn_with_kvcache_lse(&q, cache, scale, mask)?;
                            let causal = mask == MaskSpec::causal();
                            let o2 = flash_attn_with_kvcache(&q, cache, scale, causal)?;
                            assert_eq!(max_diff(&o, &o2)?, 0.0, "{what}: with and without LSE");
                            check_per_sequence(&what, &o, &lse, &lens, tol(dtype), |bi, len| {
                                if causal && len < sq {
                                    // Rows before the first key see nothing: compare the rest.
                                    candle_core::bail!("{what}: the test needs len >= sq")
                                }
                                reference(
                                    &q.i(bi)?.unsqueeze(0)?,
                                    &kc.i(bi)?.narrow(0, 0, len)?.unsqueeze(0)?,
                                    &vc.i(bi)?.narrow(0, 0, len)?.unsqueeze(0)?,
                                    scale,
                                    &mask,
                                )
                            })?;
                        }
                    }
                    // A causal sliding window of 40 keys.
                    let got =
                        flash_attn_with_kvcache_windowed(&q, &paged, scale, Some(40), Some(0))?;
                    let mask = MaskSpec::sliding_window(Some(40), Some(0));
                    for (bi, &len) in lens.iter().enumerate() {
                        if len == 0 {
                            continue;
                        }
                        let len = len as usize;
                        let (want, _) = reference(
                            &q.i(bi)?.unsqueeze(0)?,
                            &kc.i(bi)?.narrow(0, 0, len)?.unsqueeze(0)?,
                            &vc.i(bi)?.narrow(0, 0, len)?.unsqueeze(0)?,
                            scale,
                            &mask,
                        )?;
                        let diff = max_diff(&got.i(bi)?.unsqueeze(0)?, &want)?;
                        assert!(diff <= tol(dtype), "window: sequence {bi}: max diff {diff}");
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn kvcache_rope_over_unrotated_keys() -> Result<()> {
        let dev = gpu_or_skip!("kvcache_rope_over_unrotated_keys");
        let cpu = Device::Cpu;
        for dtype in [DType::F16, DType::BF16] {
            for layout in [RopeLayout::HalfSplit, RopeLayout::Interleaved] {
                for mode in [
                    PositionMode::Rope,
                    PositionMode::ReRope { window: 48 },
                    PositionMode::LeakyReRope {
                        window: 32,
                        leak: 8.0,
                    },
                ] {
                    let (hq, hk, d, page) = (9, 3, 64, 16);
                    let cap = 400usize;
                    let lens = [399i32, 64, 200];
                    let offsets = [0u32, 7, 1000];
                    let b = lens.len();
                    let kc = Tensor::randn(0f32, 1.0, (b, cap, hk, d), &cpu)?.to_dtype(dtype)?;
                    let vc = Tensor::randn(0f32, 1.0, (b, cap, hk, d), &cpu)?.to_dtype(dtype)?;
                    let (kp, table) = to_pages(&kc, page, 2, 5)?;
                    let (vp, _) = to_pages(&vc, page, 2, 5)?;
                    let seqlens = i32_tensor(&lens, &dev)?;
                    let (kcd, vcd) = (kc.to_device(&dev)?, vc.to_device(&dev)?);
                    let (kpd, vpd) = (kp.to_device(&dev)?, vp.to_device(&dev)?);
                    let tabd = table_tensor(&table, &dev)?;
                    let mut config = RopeConfig::llama(d);
                    config.layout = layout;
                    config.base = 100000.0;
                    let mut rope = RopeOptions::new(config, mode);
                    rope.position_offsets = Some(offsets.to_vec());
                    let scale = 1.0 / (d as f32).sqrt();
                    for sq in [1usize, 3, 16] {
                        let q = randn(&[b, sq, hq, d], dtype, &dev)?;
                        for (name, cache) in [
                            ("contiguous", KvCache::contiguous(&kcd, &vcd, &seqlens)),
                            ("paged", KvCache::paged(&kpd, &vpd, &tabd, &seqlens)),
                        ] {
                            let what = format!("{dtype:?} {layout:?} {mode:?} {name} sq{sq}");
                            let (o, lse) =
                                flash_attn_with_kvcache_rope_lse(&q, &cache, scale, &rope)?;
                            check_per_sequence(&what, &o, &lse, &lens, tol(dtype), |bi, len| {
                                let mut one = rope.clone();
                                one.position_offsets = Some(vec![offsets[bi]]);
                                rope_reference(
                                    &q.i(bi)?.unsqueeze(0)?,
                                    &kc.i(bi)?.narrow(0, 0, len)?.unsqueeze(0)?,
                                    &vc.i(bi)?.narrow(0, 0, len)?.unsqueeze(0)?,
                                    scale,
                                    &one,
                                )
                            })?;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn append_into_contiguous_and_paged_caches() -> Result<()> {
        let dev = gpu_or_skip!("append_into_contiguous_and_paged_caches");
        let cpu = Device::Cpu;
        for dtype in [DType::F16, DType::BF16] {
            let (hk, d, page, cap) = (2, 64, 16, 128);
            let lens = [0i32, 17, 126];
            let b = lens.len();
            let s = 5;
            let kc = Tensor::randn(0f32, 1.0, (b, cap, hk, d), &cpu)?.to_dtype(dtype)?;
            let vc = Tensor::randn(0f32, 1.0, (b, cap, hk, d), &cpu)?.to_dtype(dtype)?;
            let kn = Tensor::randn(0f32, 1.0, (b, s, hk, d), &cpu)?.to_dtype(dtype)?;
            let vn = Tensor::randn(0f32, 1.0, (b, s, hk, d), &cpu)?.to_dtype(dtype)?;
            let (knd, vnd) = (kn.to_device(&dev)?, vn.to_device(&dev)?);
            let seqlens = i32_tensor(&lens, &dev)?;
            let mut config = RopeConfig::llama(d);
            config.layout = RopeLayout::Interleaved;
            let mut rope = RopeOptions::new(config, PositionMode::Rope);
            rope.position_offsets = Some(vec![3, 0, 9]);
            for rotated in [false, true] {
                // What each sequence's rows must hold afterwards: the old rows, with slots
                // len..len + s (those within the capacity) replaced by the new ones, rotated to
                // their positions when asked.
                let new_rows = |bi: usize, x: &Tensor, keys: bool| -> Result<Tensor> {
                    let rows = x.i(bi)?.unsqueeze(0)?.to_dtype(DType::F32)?;
                    if !(rotated && keys) {
                        return Ok(rows);
                    }
                    let off = f64::from(rope.offset(bi));
                    let pos: Vec<f64> = (0..s)
                        .map(|t| off + f64::from(lens[bi]) + t as f64)
                        .collect();
                    rotate(&rows, &[pos], &config, cap + 9)
                };
                let expected = |cache: &Tensor, x: &Tensor, keys: bool| -> Result<Vec<Tensor>> {
                    (0..b)
                        .map(|bi| {
                            let old = cache.i(bi)?.to_dtype(DType::F32)?;
                            let at = lens[bi] as usize;
                            let fits = s.min(cap - at);
                            let new = new_rows(bi, x, keys)?.squeeze(0)?.narrow(0, 0, fits)?;
                            let mut parts = vec![old.narrow(0, 0, at)?, new];
                            if at + fits < cap {
                                parts.push(old.narrow(0, at + fits, cap - at - fits)?);
                            }
                            Tensor::cat(&parts, 0)
                        })
                        .collect()
                };
                let (want_k, want_v) = (expected(&kc, &kn, true)?, expected(&vc, &vn, false)?);
                let tol_k = if rotated { tol(dtype) } else { 0.0 };
                // Contiguous.
                let (kcd, vcd) = (kc.to_device(&dev)?, vc.to_device(&dev)?);
                let cache = KvCache::contiguous(&kcd, &vcd, &seqlens);
                if rotated {
                    append_kv_rope(&knd, &vnd, &cache, &rope)?;
                } else {
                    append_kv(&knd, &vnd, &cache)?;
                }
                for bi in 0..b {
                    let dk = max_diff(&kcd.i(bi)?, &want_k[bi])?;
                    let dv = max_diff(&vcd.i(bi)?, &want_v[bi])?;
                    assert!(
                        dk <= tol_k && dv == 0.0,
                        "contiguous rotated={rotated} {dtype:?} seq {bi}: k {dk}, v {dv}"
                    );
                }
                // Paged: read each sequence's rows back through the table.
                let (kp, table) = to_pages(&kc, page, 1, 3)?;
                let (vp, _) = to_pages(&vc, page, 1, 3)?;
                let (kpd, vpd) = (kp.to_device(&dev)?, vp.to_device(&dev)?);
                let tabd = table_tensor(&table, &dev)?;
                let cache = KvCache::paged(&kpd, &vpd, &tabd, &seqlens);
                if rotated {
                    append_kv_rope(&knd, &vnd, &cache, &rope)?;
                } else {
                    append_kv(&knd, &vnd, &cache)?;
                }
                let (kpc, vpc) = (kpd.to_device(&cpu)?, vpd.to_device(&cpu)?);
                for (bi, row) in table.iter().enumerate() {
                    let gather = |pool: &Tensor| -> Result<Tensor> {
                        let pages = row
                            .iter()
                            .map(|&p| pool.i(p as usize))
                            .collect::<Result<Vec<_>>>()?;
                        Tensor::cat(&pages, 0)
                    };
                    let dk = max_diff(&gather(&kpc)?, &want_k[bi])?;
                    let dv = max_diff(&gather(&vpc)?, &want_v[bi])?;
                    assert!(
                        dk <= tol_k && dv == 0.0,
                        "paged rotated={rotated} {dtype:?} seq {bi}: k {dk}, v {dv}"
                    );
                }
            }
        }
        Ok(())
    }

    /// Decoding steps as an engine runs them: append each token's k and v at the cache's
    /// length, then attend over the cache holding it; every step against the reference over the
    /// keys so far.
    #[test]
    fn append_then_decode_steps() -> Result<()> {
        let dev = gpu_or_skip!("append_then_decode_steps");
        let cpu = Device::Cpu;
        let (hq, hk, d, cap, steps) = (6, 2, 64, 64, 20);
        let dtype = DType::BF16;
        let kd = Tensor::zeros((1, cap, hk, d), dtype, &dev)?;
        let vd = Tensor::zeros((1, cap, hk, d), dtype, &dev)?;
        let ks = Tensor::randn(0f32, 1.0, (1, steps, hk, d), &cpu)?.to_dtype(dtype)?;
        let vs = Tensor::randn(0f32, 1.0, (1, steps, hk, d), &cpu)?.to_dtype(dtype)?;
        for step in 0..steps {
            let before = i32_tensor(&[step as i32], &dev)?;
            let after = i32_tensor(&[step as i32 + 1], &dev)?;
            let k1 = ks.narrow(1, step, 1)?.to_device(&dev)?;
            let v1 = vs.narrow(1, step, 1)?.to_device(&dev)?;
            append_kv(&k1, &v1, &KvCache::contiguous(&kd, &vd, &before))?;
            let q = randn(&[1, 1, hq, d], dtype, &dev)?;
            let got =
                flash_attn_with_kvcache(&q, &KvCache::contiguous(&kd, &vd, &after), 0.125, true)?;
            let (want, _) = reference(
                &q,
                &ks.narrow(1, 0, step + 1)?,
                &vs.narrow(1, 0, step + 1)?,
                0.125,
                &MaskSpec::causal(),
            )?;
            let diff = max_diff(&got, &want)?;
            assert!(diff <= tol(dtype), "step {step}: max diff {diff}");
        }
        Ok(())
    }

    #[test]
    fn kvcache_errors_on_the_device() -> Result<()> {
        let dev = gpu_or_skip!("kvcache_errors_on_the_device");
        let kv = Tensor::zeros((1, 32, 4, 64), DType::F16, &dev)?;
        let lens = i32_tensor(&[3], &dev)?;
        // k and v caches as views of one buffer, and new rows that are a view of the cache:
        // errors, not a hang on the buffer's lock.
        let (k, v) = (kv.narrow(2, 0, 2)?, kv.narrow(2, 2, 2)?);
        let kn = Tensor::zeros((1, 1, 2, 64), DType::F16, &dev)?;
        let e = append_kv(&kn, &kn, &KvCache::contiguous(&k, &v, &lens))
            .unwrap_err()
            .to_string();
        assert!(e.contains("share"), "{e}");
        let kc = Tensor::zeros((1, 32, 2, 64), DType::F16, &dev)?;
        let vc = Tensor::zeros((1, 32, 2, 64), DType::F16, &dev)?;
        let view = kc.narrow(1, 0, 1)?;
        let e = append_kv(&view, &kn, &KvCache::contiguous(&kc, &vc, &lens))
            .unwrap_err()
            .to_string();
        assert!(e.contains("k_new"), "{e}");
        // Lengths on the CPU with the cache on the GPU.
        let lens_cpu = Tensor::new(&[3i32], &Device::Cpu)?;
        let q = Tensor::zeros((1, 1, 4, 64), DType::F16, &dev)?;
        let e = flash_attn_with_kvcache(&q, &KvCache::contiguous(&kc, &vc, &lens_cpu), 0.125, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("same device"), "{e}");
        // k and v caches that are distinct buffers work, and a length past the capacity is
        // clamped on the device, not read out of bounds.
        append_kv(
            &kn,
            &kn.clone().contiguous()?,
            &KvCache::contiguous(&kc, &vc, &lens),
        )?;
        let far = i32_tensor(&[1000], &dev)?;
        let o = flash_attn_with_kvcache(&q, &KvCache::contiguous(&kc, &vc, &far), 0.125, true)?;
        assert_eq!(o.dims(), [1, 1, 4, 64]);
        o.to_device(&Device::Cpu)?;
        Ok(())
    }
}
