//! The references

use super::*;

impl Problem {
    fn run(&self, rope: &RopeOptions, scale: f64) -> RefOutput {
        rope_attention_f64(&self.shape, &self.q, &self.k, &self.v, rope, scale).unwrap()
    }
}

/// Shapes covering GQA, seqlen_q < seqlen_k (prefill chunk), seqlen_q > seqlen_k (rows with no
/// key), single tokens.
fn shapes() -> Vec<RefShape> {
    vec![
        shape(2, 9, 9, 4, 2, 16),
        shape(1, 5, 13, 2, 1, 8),
        shape(2, 7, 4, 2, 2, 8),
        shape(1, 1, 1, 1, 1, 4),
        shape(1, 1, 11, 3, 1, 6),
    ]
}

fn scalings() -> Vec<RopeScaling> {
    vec![
        RopeScaling::None,
        RopeScaling::Linear { factor: 2.0 },
        RopeScaling::Yarn {
            factor: 4.0,
            original_max_position: 8,
            beta_fast: 32.0,
            beta_slow: 1.0,
            attention_factor: None,
        },
        RopeScaling::DynamicNtk {
            factor: 2.0,
            original_max_position: 6,
        },
    ]
}

#[test]
fn rope_matches_plain_attention_on_prerotated_inputs() {
    for (n, s) in shapes().into_iter().enumerate() {
        let p = problem(s, 100 + n as u64);
        let (d, sq, sk) = (s.head_dim, s.seqlen_q, s.seqlen_k);
        for (layout, rotary_dim) in [(RopeLayout::HalfSplit, d), (RopeLayout::Interleaved, d - 2)] {
            for scaling in scalings() {
                let mut rope = opts(config(rotary_dim, layout, scaling), PositionMode::Rope);
                rope.position_offsets = Some((0..s.batch as u32).map(|b| 3 * b + 1).collect());
                rope.log_n_train_len = Some(4);
                // A sliding window on top of causal for some shapes.
                rope.window_left = [None, Some(1), Some(3)][n % 3];
                let mask = rope.mask();
                assert_eq!(mask.window_left, rope.window_left);
                let scale = 0.7;
                let got = p.run(&rope, scale);

                // Pre-rotate by hand: q_i at off_b + sk - sq + i, scaled by the log-n factor,
                // k_j at off_b + j; both rotated parts times the attention factor.
                let max_off = rope
                    .position_offsets
                    .as_ref()
                    .unwrap()
                    .iter()
                    .max()
                    .unwrap();
                let inv = rope.config.inv_freq(d, sk + *max_off as usize).unwrap();
                let af = rope.config.attention_factor();
                let (mut q, mut k) = (p.q.clone(), p.k.clone());
                for b in 0..s.batch {
                    let off = rope.position_offsets.as_ref().unwrap()[b] as f64;
                    for i in 0..sq {
                        let pos = off + sk as f64 - sq as f64 + i as f64;
                        let logn = if pos > 0.0 {
                            ((pos + 1.0).ln() / 4f64.ln()).max(1.0)
                        } else {
                            1.0
                        };
                        for h in 0..s.heads_q {
                            let o = ((b * sq + i) * s.heads_q + h) * d;
                            let x = &mut q[o..o + d];
                            x.iter_mut().for_each(|a| *a *= logn);
                            rotate(x, pos, &inv, layout, af);
                        }
                    }
                    for j in 0..sk {
                        for h in 0..s.heads_kv {
                            let o = ((b * sk + j) * s.heads_kv + h) * d;
                            rotate(&mut k[o..o + d], off + j as f64, &inv, layout, af);
                        }
                    }
                }
                let want = attention_f64(&s, &q, &k, &p.v, &mask, scale).unwrap();
                assert_outputs_close(&got, &want, 1e-12, &format!("{s:?} {layout:?} {scaling:?}"));

                // The library's pre-rotation helpers do the same.
                let q2 = rope_rotate_q(&s, &p.q, &rope).unwrap();
                let k2 = rope_rotate_k(&s, &p.k, &rope).unwrap();
                assert_close(&q2, &q, 1e-14, "rope_rotate_q");
                assert_close(&k2, &k, 1e-14, "rope_rotate_k");
            }
        }
    }
}

/// The relative position DESIGN.md gives for each mode (causal, `rel >= 0`).
fn relative_position(mode: PositionMode, rel: f64) -> f64 {
    match mode {
        PositionMode::Rope => rel,
        PositionMode::ReRope { window } => rel.min(window as f64),
        PositionMode::LeakyReRope { window, leak } => {
            let w = window as f64;
            if rel < w {
                rel
            } else {
                w + (rel - w) / leak
            }
        }
    }
}

/// Attention from relative positions alone: `s_ij = scale * (R_{relpos(p_i - p_j)} q_i) . k_j`
/// (no log-n, no attention factor), the form a decoder with an un-rotated key cache computes.
fn relative_reference(p: &Problem, rope: &RopeOptions, scale: f64) -> RefOutput {
    let s = p.shape;
    let (d, sq, sk) = (s.head_dim, s.seqlen_q, s.seqlen_k);
    let inv = rope
        .config
        .inv_freq(d, sk + rope.max_offset() as usize)
        .unwrap();
    let group = s.heads_q / s.heads_kv;
    let mut out = vec![0.0; p.q.len()];
    let mut lse = Vec::new();
    for b in 0..s.batch {
        for h in 0..s.heads_q {
            for i in 0..sq {
                let qo = ((b * sq + i) * s.heads_q + h) * d;
                let mut scores = Vec::new();
                for j in 0..sk {
                    if !MaskSpec::causal().is_visible(sq, sk, i, j) {
                        continue;
                    }
                    let rel = (rope.query_position(b, i, sq, sk) - rope.key_position(b, j)) as f64;
                    let r = relative_position(rope.mode, rel);
                    let ko = ((b * sk + j) * s.heads_kv + h / group) * d;
                    let qr = rotated(&p.q[qo..qo + d], r, &inv, rope.config.layout, 1.0);
                    scores.push((j, scale * dot(&qr, &p.k[ko..ko + d])));
                }
                if scores.is_empty() {
                    lse.push(f64::NEG_INFINITY);
                    continue;
                }
                let m = scores.iter().map(|x| x.1).fold(f64::NEG_INFINITY, f64::max);
                let l: f64 = scores.iter().map(|x| (x.1 - m).exp()).sum();
                for &(j, sc) in &scores {
                    let w = (sc - m).exp() / l;
                    let vo = ((b * sk + j) * s.heads_kv + h / group) * d;
                    for c in 0..d {
                        out[qo + c] += w * p.v[vo + c];
                    }
                }
                lse.push(m + l.ln());
            }
        }
    }
    RefOutput {
        out,
        lse,
        ..RefOutput::default()
    }
}

#[test]
fn two_matrix_definition_matches_relative_positions() {
    for (n, s) in shapes().into_iter().enumerate() {
        let p = problem(s, 200 + n as u64);
        for mode in [
            PositionMode::Rope,
            PositionMode::ReRope { window: 1 },
            PositionMode::ReRope { window: 3 },
            PositionMode::LeakyReRope {
                window: 2,
                leak: 4.0,
            },
            PositionMode::LeakyReRope {
                window: 5,
                leak: 1.5,
            },
        ] {
            for layout in [RopeLayout::HalfSplit, RopeLayout::Interleaved] {
                let mut rope = opts(config(s.head_dim, layout, RopeScaling::None), mode);
                rope.position_offsets = Some((0..s.batch as u32).map(|b| 10 * b).collect());
                let got = p.run(&rope, 0.5);
                let want = relative_reference(&p, &rope, 0.5);
                assert_outputs_close(&got, &want, 1e-11, &format!("{s:?} {mode:?} {layout:?}"));
            }
        }
    }
}

#[test]
fn rerope_scores_by_hand() {
    // One head, head_dim 2 (one frequency, inv_freq 1), q = k = (1, 0): the score of a pair is
    // scale * cos(relative position). Three tokens, window 1, so query 2 sees key 2 (rel 0),
    // key 1 (rel 1, at the window: outside) and key 0 (rel 2).
    let s = shape(1, 3, 3, 1, 1, 2);
    let q = vec![1.0, 0.0, 1.0, 0.0, 1.0, 0.0];
    let k = q.clone();
    let v = vec![1.0, 0.0, 0.0, 1.0, 2.0, 3.0];
    let scale = 2.0;
    let row2 = |rel: [f64; 3]| -> (f64, [f64; 2]) {
        let e: Vec<f64> = rel.iter().map(|r| (scale * r.cos()).exp()).collect();
        let l: f64 = e.iter().sum();
        let out = [
            (e[0] * v[0] + e[1] * v[2] + e[2] * v[4]) / l,
            (e[0] * v[1] + e[1] * v[3] + e[2] * v[5]) / l,
        ];
        (l.ln(), out)
    };
    let base = RopeConfig::llama(2);
    for (mode, rel) in [
        (PositionMode::Rope, [2.0, 1.0, 0.0]),
        (PositionMode::ReRope { window: 1 }, [1.0, 1.0, 0.0]),
        // w + (rel - w) / k with k = 2: key 1 -> 1, key 0 -> 1.5.
        (
            PositionMode::LeakyReRope {
                window: 1,
                leak: 2.0,
            },
            [1.5, 1.0, 0.0],
        ),
        (PositionMode::ReRope { window: 2 }, [2.0, 1.0, 0.0]),
    ] {
        let got = rope_attention_f64(&s, &q, &k, &v, &opts(base, mode), scale).unwrap();
        let (lse, out) = row2(rel);
        assert!(
            (got.lse[2] - lse).abs() < 1e-14,
            "{mode:?}: lse {} vs {lse}",
            got.lse[2]
        );
        assert_close(&got.out[4..6], &out, 1e-14, &format!("{mode:?}: out"));
        // Query 0 sees only key 0: score scale * cos 0, output v_0.
        assert!((got.lse[0] - scale).abs() < 1e-14);
        assert_close(&got.out[0..2], &[1.0, 0.0], 1e-14, "row 0");
    }
}

#[test]
fn rerope_with_window_covering_the_sequence_is_rope() {
    for (n, s) in shapes().into_iter().enumerate() {
        let p = problem(s, 300 + n as u64);
        for scaling in scalings() {
            // Partial rotary, so that the attention factor meets an unrotated tail.
            let mut rope = opts(
                config(s.head_dim - 2, RopeLayout::HalfSplit, scaling),
                PositionMode::Rope,
            );
            rope.log_n_train_len = Some(3);
            let plain = p.run(&rope, 0.4);
            // Visible pairs have rel <= seqlen_k - 1 < window.
            let w = s.seqlen_k as u32;
            for mode in [
                PositionMode::ReRope { window: w },
                PositionMode::ReRope { window: w + 100 },
                PositionMode::LeakyReRope {
                    window: w,
                    leak: 3.0,
                },
            ] {
                rope.mode = mode;
                assert_eq!(p.run(&rope, 0.4), plain, "{s:?} {scaling:?} {mode:?}");
            }
            // Window seqlen_k - 1: the pair (last query, key 0) is outside but at relative
            // position exactly w, where both modes are continuous: equal up to rounding.
            if s.seqlen_k >= 2 {
                for mode in [
                    PositionMode::ReRope { window: w - 1 },
                    PositionMode::LeakyReRope {
                        window: w - 1,
                        leak: 3.0,
                    },
                ] {
                    rope.mode = mode;
                    let at_edge = p.run(&rope, 0.4);
                    assert_outputs_close(&at_edge, &plain, 1e-12, &format!("{s:?} {mode:?}"));
                }
            }
            // Window seqlen_k - 2: that pair is clamped to w = rel - 1.
            if s.seqlen_k >= 3 {
                rope.mode = PositionMode::ReRope { window: w - 2 };
                let d = max_diff(&p.run(&rope, 0.4).out, &plain.out);
                assert!(
                    d > 1e-6,
                    "{s:?} {scaling:?}: window {} changed nothing",
                    w - 2
                );
            }
        }
    }
}

#[test]
fn leaky_rerope_with_huge_leak_is_rerope() {
    for (n, s) in shapes().into_iter().enumerate() {
        let p = problem(s, 400 + n as u64);
        for window in [1, 2, 4] {
            let cfg = config(s.head_dim, RopeLayout::Interleaved, RopeScaling::None);
            let mut rerope = opts(cfg, PositionMode::ReRope { window });
            rerope.log_n_train_len = Some(2);
            let mut leaky = rerope.clone();
            leaky.mode = PositionMode::LeakyReRope { window, leak: 1e9 };
            let (a, b) = (p.run(&rerope, 1.0), p.run(&leaky, 1.0));
            assert_outputs_close(&b, &a, 1e-6, &format!("{s:?} window {window}"));
            // A moderate leak is different (where some pair is beyond the window).
            leaky.mode = PositionMode::LeakyReRope { window, leak: 2.0 };
            if s.seqlen_k > window as usize + 1 {
                assert!(max_diff(&p.run(&leaky, 1.0).out, &a.out) > 1e-6, "{s:?}");
            }
        }
    }
}

#[test]
fn outputs_are_invariant_to_position_offsets() {
    for (n, s) in shapes().into_iter().enumerate() {
        let p = problem(s, 500 + n as u64);
        for mode in [
            PositionMode::Rope,
            PositionMode::ReRope { window: 2 },
            PositionMode::LeakyReRope {
                window: 3,
                leak: 2.5,
            },
        ] {
            let cfg = config(s.head_dim, RopeLayout::HalfSplit, RopeScaling::None);
            let at0 = p.run(&opts(cfg, mode), 0.9);
            let mut shifted = opts(cfg, mode);
            shifted.position_offsets = Some((0..s.batch as u32).map(|b| 1000 + 37 * b).collect());
            let moved = p.run(&shifted, 0.9);
            assert_outputs_close(&moved, &at0, 1e-9, &format!("{s:?} {mode:?}"));
            // Log-n scaling depends on absolute positions, so offsets do matter with it.
            let mut logn = opts(cfg, mode);
            logn.log_n_train_len = Some(2);
            let mut logn_shifted = shifted.clone();
            logn_shifted.log_n_train_len = Some(2);
            let (a, b) = (p.run(&logn, 0.9), p.run(&logn_shifted, 0.9));
            // (A row with a single key has output v whatever its scores.)
            assert!(
                s.seqlen_k < 2 || max_diff(&a.out, &b.out) > 1e-6,
                "{s:?} {mode:?}: log-n ignored offsets"
            );
        }
    }
}

#[test]
fn log_n_scaling_is_off_within_the_training_length() {
    for (n, s) in shapes().into_iter().enumerate() {
        let p = problem(s, 600 + n as u64);
        for mode in [PositionMode::Rope, PositionMode::ReRope { window: 2 }] {
            let cfg = config(s.head_dim, RopeLayout::HalfSplit, RopeScaling::None);
            let mut rope = opts(cfg, mode);
            rope.position_offsets = Some((0..s.batch as u32).map(|b| 2 * b).collect());
            let off = p.run(&rope, 1.1);
            // Largest position + 1 = seqlen_k + max offset.
            let longest = s.seqlen_k + rope.max_offset() as usize;
            rope.log_n_train_len = Some(longest.max(2));
            assert_eq!(p.run(&rope, 1.1), off, "{s:?} {mode:?}: L = {longest}");
            rope.log_n_train_len = Some(longest + 50);
            assert_eq!(p.run(&rope, 1.1), off, "{s:?} {mode:?}: L = {longest} + 50");
            // One shorter and the last query (at position longest - 1 >= 2) is scaled.
            if longest >= 3 {
                rope.log_n_train_len = Some(longest - 1);
                let d = max_diff(&p.run(&rope, 1.1).out, &off.out);
                assert!(
                    d > 1e-9,
                    "{s:?} {mode:?}: L = {} changed nothing",
                    longest - 1
                );
            }
        }
    }
}

#[test]
fn yarn_attention_factor_scales_every_score() {
    // With attention factor a, every score (inside and outside the window) is a^2 times the
    // score without it: the same as multiplying `scale` by a^2.
    let s = shape(1, 6, 10, 2, 1, 8);
    let p = problem(s, 700);
    for mode in [
        PositionMode::Rope,
        PositionMode::ReRope { window: 3 },
        PositionMode::LeakyReRope {
            window: 2,
            leak: 3.0,
        },
    ] {
        let yarn = |attention_factor| RopeScaling::Yarn {
            factor: 4.0,
            original_max_position: 4,
            beta_fast: 32.0,
            beta_slow: 1.0,
            attention_factor,
        };
        let with = p.run(
            &opts(config(8, RopeLayout::HalfSplit, yarn(Some(1.3))), mode),
            0.5,
        );
        let without = p.run(
            &opts(config(8, RopeLayout::HalfSplit, yarn(Some(1.0))), mode),
            0.5 * 1.3 * 1.3,
        );
        assert_outputs_close(&with, &without, 1e-12, &format!("{mode:?}"));
    }
}

#[test]
fn rows_without_keys_are_zero_and_minus_infinity() {
    let s = shape(1, 6, 3, 1, 1, 4);
    let p = problem(s, 800);
    let rope = opts(RopeConfig::llama(4), PositionMode::ReRope { window: 1 });
    let r = p.run(&rope, 1.0);
    for i in 0..3 {
        assert_eq!(r.lse[i], f64::NEG_INFINITY);
        assert!(r.out[i * 4..i * 4 + 4].iter().all(|&x| x == 0.0));
    }
    assert!(r.lse[3..].iter().all(|x| x.is_finite()));
    let qt: Vec<bf16> = p.q.iter().map(|&x| bf16::from_f64(x)).collect();
    let kt: Vec<bf16> = p.k.iter().map(|&x| bf16::from_f64(x)).collect();
    let vt: Vec<bf16> = p.v.iter().map(|&x| bf16::from_f64(x)).collect();
    let l = rope_attention_lowp(&s, &qt, &kt, &vt, &rope, 1.0).unwrap();
    assert_eq!(&l.lse[..3], &[f64::NEG_INFINITY; 3]);
    assert!(l.out[..12].iter().all(|&x| x == 0.0));
}

// ---------------------------------------------------------------------------------------------
// Low precision

/// Rotates in f32 from f32 `af cos`/`af sin` of an f64 angle, then rounds to `T`.
fn rotate_lowp<T: Element>(
    x: &[T],
    mul: f32,
    position: f64,
    inv: &[f64],
    layout: RopeLayout,
    af: f64,
) -> Vec<T> {
    let mut y: Vec<f32> = x.iter().map(|t| t.to_f32() * mul).collect();
    let half = inv.len();
    for (f, &w) in inv.iter().enumerate() {
        let (a, b) = match layout {
            RopeLayout::HalfSplit => (f, f + half),
            RopeLayout::Interleaved => (2 * f, 2 * f + 1),
        };
        let (c, s) = (
            (af * (position * w).cos()) as f32,
            (af * (position * w).sin()) as f32,
        );
        let (xa, xb) = (y[a], y[b]);
        y[a] = xa * c - xb * s;
        y[b] = xa * s + xb * c;
    }
    y.into_iter().map(T::from_f32).collect()
}

fn lowp_rope_is_lowp_attention_on_prerotated<T: Element>() {
    for (n, s) in shapes().into_iter().enumerate() {
        let p = problem(s, 900 + n as u64);
        let (d, sq, sk) = (s.head_dim, s.seqlen_q, s.seqlen_k);
        let yarn = RopeScaling::Yarn {
            factor: 3.0,
            original_max_position: 4,
            beta_fast: 32.0,
            beta_slow: 1.0,
            attention_factor: Some(1.25),
        };
        for (layout, scaling) in [
            (RopeLayout::HalfSplit, RopeScaling::Linear { factor: 1.5 }),
            (RopeLayout::Interleaved, RopeScaling::Linear { factor: 1.5 }),
            (RopeLayout::HalfSplit, yarn),
        ] {
            let mut rope = opts(config(d - 2, layout, scaling), PositionMode::Rope);
            rope.position_offsets = Some((0..s.batch as u32).map(|b| 5 * b).collect());
            rope.log_n_train_len = Some(3);
            let (q, k, v) = (to_t::<T>(&p.q), to_t::<T>(&p.k), to_t::<T>(&p.v));
            let got = rope_attention_lowp(&s, &q, &k, &v, &rope, 0.6).unwrap();

            let inv = rope
                .config
                .inv_freq(d, sk + rope.max_offset() as usize)
                .unwrap();
            let af = rope.config.attention_factor();
            let (mut qr, mut kr) = (q.clone(), k.clone());
            for b in 0..s.batch {
                for i in 0..sq {
                    let pos = rope.query_position(b, i, sq, sk);
                    let mul = rope.log_n_scale(pos) as f32;
                    for h in 0..s.heads_q {
                        let o = ((b * sq + i) * s.heads_q + h) * d;
                        let r = rotate_lowp(&q[o..o + d], mul, pos as f64, &inv, layout, af);
                        qr[o..o + d].copy_from_slice(&r);
                    }
                }
                for j in 0..sk {
                    let pos = rope.key_position(b, j) as f64;
                    for h in 0..s.heads_kv {
                        let o = ((b * sk + j) * s.heads_kv + h) * d;
                        let r = rotate_lowp(&k[o..o + d], 1.0, pos, &inv, layout, af);
                        kr[o..o + d].copy_from_slice(&r);
                    }
                }
            }
            let want = attention_lowp(&s, &qr, &kr, &v, &MaskSpec::causal(), 0.6).unwrap();
            assert_eq!(got, want, "{s:?} {layout:?} {scaling:?}");
        }
    }
}

#[test]
fn lowp_rope_is_lowp_attention_on_prerotated_inputs() {
    lowp_rope_is_lowp_attention_on_prerotated::<f16>();
    lowp_rope_is_lowp_attention_on_prerotated::<bf16>();
}

#[test]
fn lowp_rerope_is_close_to_f64() {
    let s = shape(2, 33, 40, 4, 2, 32);
    let p = problem(s, 1000);
    for mode in [
        PositionMode::ReRope { window: 7 },
        PositionMode::LeakyReRope {
            window: 5,
            leak: 4.0,
        },
    ] {
        let mut rope = opts(RopeConfig::llama(32), mode);
        rope.log_n_train_len = Some(16);
        let exact = p.run(&rope, 0.3);
        for (name, err) in [
            ("f16", {
                let (q, k, v) = (to_t::<f16>(&p.q), to_t::<f16>(&p.k), to_t::<f16>(&p.v));
                let l = rope_attention_lowp(&s, &q, &k, &v, &rope, 0.3).unwrap();
                max_diff(&l.out, &exact.out)
            }),
            ("bf16", {
                let (q, k, v) = (to_t::<bf16>(&p.q), to_t::<bf16>(&p.k), to_t::<bf16>(&p.v));
                let l = rope_attention_lowp(&s, &q, &k, &v, &rope, 0.3).unwrap();
                max_diff(&l.out, &exact.out)
            }),
        ] {
            // Rounding error, not a different formula: f16 keeps 11 bits, bf16 8.
            let bound = if name == "f16" { 4e-3 } else { 3e-2 };
            assert!(err > 0.0 && err < bound, "{mode:?} {name}: {err}");
        }
    }
}
