//! RoPE / ReRoPE / Leaky ReRoPE on un-rotated q and k, both pair layouts, against two score
//! matrices written with candle's ops.

use crate::common::*;

/// `x` `(b, s, h, d)` f32 with each row `s` rotated by `positions[s]` (per batch entry), as
/// `config` pairs and scales it, using the library's frequency table.
pub(crate) fn rotate(
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
pub(crate) fn rope_reference(
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
            let sel = Tensor::from_vec(sel, (b, 1, sq, sk), dev)?.broadcast_as(inside.shape())?;
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
