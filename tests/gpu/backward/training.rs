//! A training loop in miniature on the backward's gradients.

use cudarc::driver::CudaSlice;
use half::bf16;
use longflash::reference::{
    attention_backward_f64, attention_backward_lowp, compare_gradient, rope_attention_backward_f64,
    rope_attention_backward_lowp, rope_attention_f64, RefGrads, RefShape,
};
use longflash::rope::{PositionMode, RopeConfig, RopeOptions};
use longflash::{
    BackwardInputs, BackwardOptions, DType, ForwardOptions, Gradient, Gradients, Input, Layout,
    MaskSpec, Output, RopeBackward, RopeForward,
};

use crate::common::{Gpu, Rng};

/// A training loop in miniature: a causal GQA attention layer whose q, k and v (f32 master
/// weights, bf16 on the device) descend the loss `0.5 * |attention(q, k, v) - target|^2` with
/// gradients from the GPU backward (upstream gradient `O - target` from the GPU forward). Every
/// step's gradients pass the rule against the f64 gradients at the same point, and the loss (the
/// f64 forward of the rounded weights) goes down at every step.
#[test]
fn backward_training_steps_decrease_the_loss() {
    let g = gpu_or_skip!();
    training_steps(g, None);
}

/// The same with ReRoPE inside the kernels (a window of 24 over 96 tokens, so both sides of the
/// window carry gradients): the layer's q and k are the un-rotated inputs of `forward_rope`, and
/// `backward_rope` gives their gradients.
#[test]
fn rope_backward_training_steps_decrease_the_loss() {
    let g = gpu_or_skip!();
    let rope = RopeOptions::new(RopeConfig::llama(64), PositionMode::ReRope { window: 24 });
    training_steps(g, Some(&rope));
}

fn training_steps(g: &Gpu, rope: Option<&RopeOptions>) {
    let shape = RefShape {
        batch: 1,
        seqlen_q: 96,
        seqlen_k: 96,
        heads_q: 2,
        heads_kv: 1,
        head_dim: 64,
    };
    let mask = MaskSpec::causal();
    let scale = 0.125f32;
    let (ql, kl) = (Layout::bshd(1, 96, 2, 64), Layout::bshd(1, 96, 1, 64));
    let mut rng = Rng(11);
    let mut normal =
        |n: usize, s: f64| -> Vec<f32> { (0..n).map(|_| (s * rng.normal()) as f32).collect() };
    let (nq, nkv) = (shape.q_len().unwrap(), shape.kv_len().unwrap());
    let mut w = [normal(nq, 1.0), normal(nkv, 1.0), normal(nkv, 1.0)];
    let target: Vec<f64> = normal(nq, 0.5).into_iter().map(f64::from).collect();
    let lr = 0.1f32;
    let round = |x: &[f32]| -> Vec<bf16> { x.iter().map(|&a| bf16::from_f32(a)).collect() };
    let wide = |x: &[bf16]| -> Vec<f64> { x.iter().map(|t| t.to_f64()).collect() };
    let loss = |q: &[bf16], k: &[bf16], v: &[bf16]| -> f64 {
        let (q, k, v) = (wide(q), wide(k), wide(v));
        let o = match rope {
            None => longflash::reference::attention_f64(&shape, &q, &k, &v, &mask, 0.125),
            Some(r) => rope_attention_f64(&shape, &q, &k, &v, r, 0.125),
        }
        .unwrap()
        .out;
        0.5 * o
            .iter()
            .zip(&target)
            .map(|(a, t)| (a - t) * (a - t))
            .sum::<f64>()
    };
    let mut losses = Vec::new();
    for step in 0..6 {
        let (q, k, v) = (round(&w[0]), round(&w[1]), round(&w[2]));
        losses.push(loss(&q, &k, &v));
        if step == 5 {
            break;
        }
        let (d_q, d_k, d_v) = (
            g.stream.clone_htod(&q).unwrap(),
            g.stream.clone_htod(&k).unwrap(),
            g.stream.clone_htod(&v).unwrap(),
        );
        let mut d_o: CudaSlice<bf16> = g.stream.alloc_zeros(nq).unwrap();
        let mut d_lse: CudaSlice<f32> = g.stream.alloc_zeros(shape.lse_len().unwrap()).unwrap();
        let (qv, kv, vv) = (d_q.as_view(), d_k.as_view(), d_v.as_view());
        let (qi, ki, vi) = (
            Input {
                data: &qv,
                layout: ql,
            },
            Input {
                data: &kv,
                layout: kl,
            },
            Input {
                data: &vv,
                layout: kl,
            },
        );
        {
            let (mut ov, mut lv) = (d_o.as_view_mut(), d_lse.as_view_mut());
            let out = Output {
                data: &mut ov,
                layout: ql,
                lse: Some(&mut lv),
            };
            match rope {
                None => {
                    let opts = ForwardOptions::causal().with_scale(scale);
                    g.attn.forward(&g.stream, qi, ki, vi, out, &opts)
                }
                Some(r) => {
                    let opts = RopeForward {
                        rope: r,
                        block_mask: None,
                        softmax_scale: Some(scale),
                    };
                    g.attn.forward_rope(&g.stream, qi, ki, vi, out, &opts)
                }
            }
            .unwrap();
        }
        let o: Vec<bf16> = g.stream.clone_dtoh(&d_o).unwrap();
        let dout: Vec<bf16> = o
            .iter()
            .zip(&target)
            .map(|(a, &t)| bf16::from_f64(a.to_f64() - t))
            .collect();
        let d_dout = g.stream.clone_htod(&dout).unwrap();
        let mut grads: [CudaSlice<bf16>; 3] = [
            g.stream.alloc_zeros(nq).unwrap(),
            g.stream.alloc_zeros(nkv).unwrap(),
            g.stream.alloc_zeros(nkv).unwrap(),
        ];
        {
            let (ov, dov, lv) = (d_o.as_view(), d_dout.as_view(), d_lse.as_view());
            let [gq, gk, gv] = &mut grads;
            let (mut gqv, mut gkv, mut gvv) =
                (gq.as_view_mut(), gk.as_view_mut(), gv.as_view_mut());
            let inputs = BackwardInputs {
                q: qi,
                k: ki,
                v: vi,
                o: Input {
                    data: &ov,
                    layout: ql,
                },
                dout: Input {
                    data: &dov,
                    layout: ql,
                },
                lse: &lv,
            };
            let grads = Gradients {
                dq: Gradient {
                    data: &mut gqv,
                    layout: ql,
                },
                dk: Gradient {
                    data: &mut gkv,
                    layout: kl,
                },
                dv: Gradient {
                    data: &mut gvv,
                    layout: kl,
                },
            };
            match rope {
                None => g.attn.backward(
                    &g.stream,
                    inputs,
                    grads,
                    &BackwardOptions::causal().with_scale(scale),
                ),
                Some(r) => g.attn.backward_rope(
                    &g.stream,
                    inputs,
                    grads,
                    &RopeBackward {
                        rope: r,
                        softmax_scale: Some(scale),
                        deterministic: false,
                    },
                ),
            }
            .unwrap();
        }
        g.stream.synchronize().unwrap();
        let (ref64, lowp): (RefGrads, RefGrads) = match rope {
            None => (
                attention_backward_f64(
                    &shape,
                    &wide(&q),
                    &wide(&k),
                    &wide(&v),
                    &wide(&dout),
                    &mask,
                    0.125,
                )
                .unwrap(),
                attention_backward_lowp(&shape, &q, &k, &v, &dout, &mask, scale).unwrap(),
            ),
            Some(r) => (
                rope_attention_backward_f64(
                    &shape,
                    &wide(&q),
                    &wide(&k),
                    &wide(&v),
                    &wide(&dout),
                    r,
                    0.125,
                )
                .unwrap(),
                rope_attention_backward_lowp(&shape, (&q, &k, &v, &dout), r, scale).unwrap(),
            ),
        };
        for (i, (name, r64, naive)) in [
            ("dq", &ref64.dq, &lowp.dq),
            ("dk", &ref64.dk, &lowp.dk),
            ("dv", &ref64.dv, &lowp.dv),
        ]
        .into_iter()
        .enumerate()
        {
            let gr: Vec<bf16> = g.stream.clone_dtoh(&grads[i]).unwrap();
            let c = compare_gradient(&wide(&gr), r64, naive, DType::Bf16);
            assert!(c.passes, "{rope:?}: step {step} {name}: {c}");
            for (x, d) in w[i].iter_mut().zip(&gr) {
                *x -= lr * d.to_f32();
            }
        }
    }
    for s in 1..losses.len() {
        assert!(
            losses[s] < losses[s - 1],
            "{rope:?}: the loss must go down at every step: {losses:?}"
        );
    }
}
