//! The variable-length forward with RoPE / ReRoPE / Leaky ReRoPE inside against the two-matrix
//! reference run on each sequence alone (its own lengths and position offset), over modes,
//! windows, layouts, GQA, empty and one-token sequences and tile edges.

use cudarc::driver::CudaSlice;
use half::{bf16, f16};
use longflash::reference::{compare, rope_attention_f64, rope_attention_lowp, RefOutput, RefShape};
use longflash::rope::{PositionMode, RopeConfig, RopeLayout, RopeOptions};
use longflash::{DType, Element, Input, Layout, Output, VarlenOptions};

use crate::common::Rng;
use crate::common::*;

#[derive(Clone, Debug)]
struct Case {
    dtype: DType,
    lens: Vec<(usize, usize)>,
    heads_q: usize,
    heads_kv: usize,
    head_dim: usize,
    rope: RopeOptions,
    seed: u64,
}

fn prefix(lens: impl Iterator<Item = usize>) -> Vec<i32> {
    let mut cu = vec![0i32];
    for l in lens {
        cu.push(cu.last().unwrap() + l as i32);
    }
    cu
}

/// Runs `c` (with the device prefix sums `bad` instead of its own when given) and checks it
/// against the reference; with `bad`, returns the output and the flag without checking.
fn run_t<T: Element>(g: &Gpu, c: &Case, bad: Option<(&[i32], &[i32])>) -> (Vec<f64>, i32) {
    let cu_q = prefix(c.lens.iter().map(|l| l.0));
    let cu_k = prefix(c.lens.iter().map(|l| l.1));
    let (total_q, total_k) = (
        *cu_q.last().unwrap() as usize,
        *cu_k.last().unwrap() as usize,
    );
    let (hq, hk, d) = (c.heads_q, c.heads_kv, c.head_dim);
    let mut rng = Rng(c.seed);
    let mut gen =
        |n: usize| -> Vec<T> { (0..n).map(|_| T::from_f32(rng.normal() as f32)).collect() };
    let (q, k, v) = (
        gen(total_q * hq * d),
        gen(total_k * hk * d),
        gen(total_k * hk * d),
    );
    let scale = 1.0 / (d as f32).sqrt();

    // The references, sequence by sequence, scattered into the packed layouts (LSE [hq, total_q]).
    let mut ref64 = RefOutput {
        out: vec![0.0; total_q * hq * d],
        lse: vec![f64::NEG_INFINITY; hq * total_q],
        ..RefOutput::default()
    };
    let mut lowp = RefOutput {
        out: vec![0.0; total_q * hq * d],
        lse: vec![f64::NEG_INFINITY; hq * total_q],
        unrounded: vec![0.0; total_q * hq * d],
        spread: vec![0.0; total_q * hq * d],
        dtype: Some(T::DTYPE),
    };
    for (b, &(lq, lk)) in c.lens.iter().enumerate() {
        if lq == 0 || lk == 0 {
            continue; // no row, or rows that see nothing: 0 and -inf
        }
        let (q0, k0) = (cu_q[b] as usize, cu_k[b] as usize);
        let shape = RefShape {
            batch: 1,
            seqlen_q: lq,
            seqlen_k: lk,
            heads_q: hq,
            heads_kv: hk,
            head_dim: d,
        };
        let rope = RopeOptions {
            position_offsets: c.rope.position_offsets.as_ref().map(|o| vec![o[b]]),
            ..c.rope.clone()
        };
        let qs = &q[q0 * hq * d..(q0 + lq) * hq * d];
        let ks = &k[k0 * hk * d..(k0 + lk) * hk * d];
        let vs = &v[k0 * hk * d..(k0 + lk) * hk * d];
        let w = |x: &[T]| -> Vec<f64> { x.iter().map(|t| t.to_f32() as f64).collect() };
        let r64 = rope_attention_f64(&shape, &w(qs), &w(ks), &w(vs), &rope, scale as f64).unwrap();
        let rlo = rope_attention_lowp(&shape, qs, ks, vs, &rope, scale).unwrap();
        let span = q0 * hq * d..(q0 + lq) * hq * d;
        ref64.out[span.clone()].copy_from_slice(&r64.out);
        lowp.out[span.clone()].copy_from_slice(&rlo.out);
        lowp.unrounded[span.clone()].copy_from_slice(&rlo.unrounded);
        lowp.spread[span].copy_from_slice(&rlo.spread);
        for h in 0..hq {
            for i in 0..lq {
                ref64.lse[h * total_q + q0 + i] = r64.lse[h * lq + i];
                lowp.lse[h * total_q + q0 + i] = rlo.lse[h * lq + i];
            }
        }
    }

    let (ql, kl) = (
        Layout::bshd(1, total_q, hq, d),
        Layout::bshd(1, total_k, hk, d),
    );
    let (dq, dk, dv) = (
        g.stream.clone_htod(&q).unwrap(),
        g.stream.clone_htod(&k).unwrap(),
        g.stream.clone_htod(&v).unwrap(),
    );
    let (hq_cu, hk_cu) = bad.unwrap_or((&cu_q, &cu_k));
    let (dcq, dck) = (
        g.stream.clone_htod(hq_cu).unwrap(),
        g.stream.clone_htod(hk_cu).unwrap(),
    );
    let mut d_o: CudaSlice<T> = g.stream.alloc_zeros(q.len()).unwrap();
    let mut d_lse: CudaSlice<f32> = g.stream.alloc_zeros(hq * total_q).unwrap();
    let mut d_flag: CudaSlice<i32> = g.stream.alloc_zeros(1).unwrap();
    let max = |cu: &[i32]| {
        cu.windows(2)
            .map(|w| (w[1] - w[0]) as usize)
            .max()
            .unwrap_or(1)
    };
    {
        let (qv, kv, vv, cqv, ckv) = (
            dq.as_view(),
            dk.as_view(),
            dv.as_view(),
            dcq.as_view(),
            dck.as_view(),
        );
        let (mut ov, mut lv, mut fv) =
            (d_o.as_view_mut(), d_lse.as_view_mut(), d_flag.as_view_mut());
        g.attn
            .forward_varlen_rope(
                &g.stream,
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
                Output {
                    data: &mut ov,
                    layout: ql,
                    lse: Some(&mut lv),
                },
                (&cqv, &ckv),
                Some(&mut fv),
                &VarlenOptions {
                    mask: c.rope.mask(),
                    softmax_scale: None,
                    max_seqlen_q: max(&cu_q).clamp(1, total_q),
                    max_seqlen_k: max(&cu_k).clamp(1, total_k),
                },
                &c.rope,
            )
            .unwrap_or_else(|e| panic!("{c:?}: {e}"));
    }
    let out: Vec<f64> = g
        .stream
        .clone_dtoh(&d_o)
        .unwrap()
        .iter()
        .map(|t| t.to_f32() as f64)
        .collect();
    let lse: Vec<f32> = g.stream.clone_dtoh(&d_lse).unwrap();
    let flag = g.stream.clone_dtoh(&d_flag).unwrap()[0];
    if bad.is_none() {
        let cmp = compare(&out, Some(&lse), &ref64, &lowp);
        assert!(cmp.passes, "{c:?}\n  {cmp}");
        assert_eq!(flag, 0, "{c:?}: valid prefix sums reported");
    }
    (out, flag)
}

fn check(g: &Gpu, c: &Case) {
    match c.dtype {
        DType::F16 => run_t::<f16>(g, c, None),
        DType::Bf16 => run_t::<bf16>(g, c, None),
    };
}

#[test]
fn varlen_rope_by_hand() {
    let g = gpu_or_skip!();
    for dtype in DTYPES {
        for d in DIMS {
            for mode in [
                PositionMode::Rope,
                PositionMode::ReRope { window: 100 },
                PositionMode::LeakyReRope {
                    window: 64,
                    leak: 8.0,
                },
            ] {
                let rope = RopeOptions::new(RopeConfig::llama(d), mode);
                check(
                    g,
                    &Case {
                        dtype,
                        // Empty sequences, one token, tile edges, more queries than keys.
                        lens: vec![(1, 1), (0, 5), (129, 300), (64, 0), (257, 130), (7, 7)],
                        heads_q: 4,
                        heads_kv: 2,
                        head_dim: d,
                        rope,
                        seed: d as u64,
                    },
                );
            }
        }
    }
}

/// Position offsets per sequence, a left window, interleaved pairs and a partial rotary dim,
/// log-n scaling.
#[test]
fn varlen_rope_options() {
    let g = gpu_or_skip!();
    for mode in [
        PositionMode::Rope,
        PositionMode::ReRope { window: 50 },
        PositionMode::LeakyReRope {
            window: 50,
            leak: 4.0,
        },
    ] {
        let mut rope = RopeOptions::new(RopeConfig::llama(64), mode);
        rope.config.layout = RopeLayout::Interleaved;
        rope.config.rotary_dim = 32;
        rope.position_offsets = Some(vec![0, 1000, 70_000]);
        rope.window_left = Some(120);
        rope.log_n_train_len = Some(64);
        check(
            g,
            &Case {
                dtype: DType::Bf16,
                lens: vec![(200, 200), (30, 250), (100, 100)],
                heads_q: 6,
                heads_kv: 3,
                head_dim: 64,
                rope,
                seed: 9,
            },
        );
    }
}

/// A static scaling (YaRN: its ramp and attention factor) with per-sequence offsets.
#[test]
fn varlen_rope_yarn() {
    let g = gpu_or_skip!();
    let mut rope = RopeOptions::new(RopeConfig::llama(128), PositionMode::ReRope { window: 80 });
    rope.config.scaling = longflash::rope::RopeScaling::Yarn {
        factor: 4.0,
        original_max_position: 256,
        beta_fast: 32.0,
        beta_slow: 1.0,
        attention_factor: None,
    };
    rope.position_offsets = Some(vec![3, 500, 0, 9000]);
    check(
        g,
        &Case {
            dtype: DType::F16,
            lens: vec![(90, 300), (1, 1), (0, 0), (200, 200)],
            heads_q: 4,
            heads_kv: 4,
            head_dim: 128,
            rope,
            seed: 5,
        },
    );
}

/// Prefix sums that point outside the tensors: the key pass and the attention stay inside them
/// (memcheck checks that under compute-sanitizer), the flag is set and the output is finite.
#[test]
fn varlen_rope_bad_prefix_sums_are_clamped_and_reported() {
    let g = gpu_or_skip!();
    let c = Case {
        dtype: DType::Bf16,
        lens: vec![(100, 120), (50, 60), (70, 80)],
        heads_q: 2,
        heads_kv: 1,
        head_dim: 64,
        rope: RopeOptions::new(RopeConfig::llama(64), PositionMode::ReRope { window: 30 }),
        seed: 3,
    };
    let bad: [(&[i32], &[i32]); 3] = [
        (&[0, 100, 150, 220 + 1000], &[0, 120, 180, 260]),
        (&[0, 100, 150, 220], &[0, 120, -5, 260]),
        (&[i32::MIN, i32::MAX, 0, -1], &[i32::MAX, i32::MIN, 7, 3]),
    ];
    for (q, k) in bad {
        let (out, flag) = run_t::<bf16>(g, &c, Some((q, k)));
        assert_eq!(flag, 1, "{q:?} {k:?}: not reported");
        assert!(
            out.iter().all(|x| x.is_finite()),
            "{q:?} {k:?}: non-finite output"
        );
    }
}
