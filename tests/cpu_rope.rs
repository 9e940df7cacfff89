//! Rotary embeddings (`longflash::rope`) and the ReRoPE references
//! (`longflash::reference::rope_attention_*`): frequency tables against the transformers
//! formulas, rotation identities, the two-matrix definition against the relative-position one,
//! and validation. CPU only.

use std::f64::consts::PI;

use half::{bf16, f16};
use longflash::dtype::Element;
use longflash::error::Error;
use longflash::mask::MaskSpec;
use longflash::reference::{
    attention_f64, attention_lowp, rope_attention_f64, rope_attention_lowp, rope_rotate_k,
    rope_rotate_q, RefOutput, RefShape,
};
use longflash::rope::{rotate, PositionMode, RopeConfig, RopeLayout, RopeOptions, RopeScaling};

// ---------------------------------------------------------------------------------------------
// Helpers

/// Deterministic uniform numbers in [-1, 1) (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (x >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }

    fn vec(&mut self, n: usize) -> Vec<f64> {
        (0..n).map(|_| self.next()).collect()
    }
}

fn shape(
    batch: usize,
    seqlen_q: usize,
    seqlen_k: usize,
    heads_q: usize,
    heads_kv: usize,
    head_dim: usize,
) -> RefShape {
    RefShape {
        batch,
        seqlen_q,
        seqlen_k,
        heads_q,
        heads_kv,
        head_dim,
    }
}

/// `|a - b| <= tol * max(1, |b|)` for every element (equal infinities pass).
fn assert_close(got: &[f64], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (n, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ok = g == w || (g - w).abs() <= tol * w.abs().max(1.0);
        assert!(ok, "{what}: element {n}: got {g}, want {w} (tol {tol})");
    }
}

/// `|a - b| <= tol * |b|` for every element: for frequency tables, whose entries are tiny.
fn assert_rel(got: &[f64], want: &[f64], tol: f64, what: &str) {
    assert_eq!(
        got.len(),
        want.len(),
        "{what}: lengths ({got:?} vs {want:?})"
    );
    for (n, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * w.abs(),
            "{what}: element {n}: got {g:e}, want {w:e} ({got:?} vs {want:?})"
        );
    }
}

fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| if x == y { 0.0 } else { (x - y).abs() })
        .fold(0.0, f64::max)
}

fn assert_outputs_close(got: &RefOutput, want: &RefOutput, tol: f64, what: &str) {
    assert_close(&got.out, &want.out, tol, &format!("{what}: out"));
    assert_close(&got.lse, &want.lse, tol, &format!("{what}: lse"));
}

fn config(rotary_dim: usize, layout: RopeLayout, scaling: RopeScaling) -> RopeConfig {
    RopeConfig {
        base: 10000.0,
        rotary_dim,
        layout,
        scaling,
    }
}

fn cfg_scaling(rotary_dim: usize, base: f64, scaling: RopeScaling) -> RopeConfig {
    RopeConfig {
        base,
        rotary_dim,
        layout: RopeLayout::HalfSplit,
        scaling,
    }
}

/// The argument an error names.
fn arg_of(e: &Error) -> &'static str {
    match e {
        Error::InvalidArgument { arg, .. } | Error::ShapeMismatch { arg, .. } => arg,
        other => panic!("unexpected error kind: {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Frequency tables, written out as transformers' `modeling_rope_utils.py` computes them
// (`arange(0, dim, 2) / dim`, then the per-scaling rule), independently of `longflash::rope`.

fn arange_over_dim(dim: usize) -> Vec<f64> {
    let mut v = Vec::new();
    let mut i = 0;
    while i < dim {
        v.push(i as f64 / dim as f64);
        i += 2;
    }
    v
}

fn hf_default(base: f64, dim: usize) -> Vec<f64> {
    arange_over_dim(dim)
        .into_iter()
        .map(|e| 1.0 / base.powf(e))
        .collect()
}

fn hf_linear(base: f64, dim: usize, factor: f64) -> Vec<f64> {
    hf_default(base, dim)
        .into_iter()
        .map(|x| x / factor)
        .collect()
}

fn hf_ntk(base: f64, dim: usize, factor: f64) -> Vec<f64> {
    let d = dim as f64;
    hf_default(base * factor.powf(d / (d - 2.0)), dim)
}

fn hf_dynamic(base: f64, dim: usize, factor: f64, max_pos: usize, seq_len: usize) -> Vec<f64> {
    let seq_len = if seq_len > max_pos { seq_len } else { max_pos };
    let d = dim as f64;
    let base =
        base * ((factor * seq_len as f64 / max_pos as f64) - (factor - 1.0)).powf(d / (d - 2.0));
    hf_default(base, dim)
}

fn hf_yarn(
    base: f64,
    dim: usize,
    factor: f64,
    max_pos: usize,
    beta_fast: f64,
    beta_slow: f64,
) -> Vec<f64> {
    let find_correction_dim = |num_rotations: f64| {
        (dim as f64 * (max_pos as f64 / (num_rotations * 2.0 * PI)).ln()) / (2.0 * base.ln())
    };
    let low = (find_correction_dim(beta_fast).floor() as i64).max(0);
    let high = (find_correction_dim(beta_slow).ceil() as i64).min(dim as i64 - 1);
    let (min, mut max) = (low as f64, high as f64);
    if min == max {
        max += 0.001;
    }
    let ramp: Vec<f64> = (0..dim / 2)
        .map(|i| ((i as f64 - min) / (max - min)).clamp(0.0, 1.0))
        .collect();
    let pos_freqs: Vec<f64> = arange_over_dim(dim)
        .into_iter()
        .map(|e| base.powf(e))
        .collect();
    pos_freqs
        .iter()
        .zip(&ramp)
        .map(|(&pf, &r)| {
            let extrapolation = 1.0 / pf;
            let interpolation = 1.0 / (factor * pf);
            let extrapolation_factor = 1.0 - r;
            interpolation * (1.0 - extrapolation_factor) + extrapolation * extrapolation_factor
        })
        .collect()
}

fn hf_llama3(base: f64, dim: usize, factor: f64, low: f64, high: f64, old: usize) -> Vec<f64> {
    let old = old as f64;
    let (low_wl, high_wl) = (old / low, old / high);
    hf_default(base, dim)
        .into_iter()
        .map(|inv| {
            let wavelen = 2.0 * PI / inv;
            let llama = if wavelen > low_wl { inv / factor } else { inv };
            let smooth = (old / wavelen - low) / (high - low);
            let smoothed = (1.0 - smooth) * llama / factor + smooth * llama;
            let medium = wavelen >= high_wl && wavelen <= low_wl;
            if medium {
                smoothed
            } else {
                llama
            }
        })
        .collect()
}

const TABLE_TOL: f64 = 1e-13;

#[test]
fn inv_freq_default() {
    let c = cfg_scaling(4, 10000.0, RopeScaling::None);
    assert_rel(
        &c.inv_freq(4, 1).unwrap(),
        &[1.0, 0.01],
        TABLE_TOL,
        "d=4 by hand",
    );
    let c = cfg_scaling(8, 10000.0, RopeScaling::None);
    assert_rel(
        &c.inv_freq(8, 1).unwrap(),
        &[1.0, 0.1, 0.01, 0.001],
        TABLE_TOL,
        "d=8 by hand",
    );
    for (base, dim) in [(10000.0, 128), (500000.0, 64), (1e6, 80)] {
        let c = cfg_scaling(dim, base, RopeScaling::None);
        assert_rel(
            &c.inv_freq(dim, 77).unwrap(),
            &hf_default(base, dim),
            TABLE_TOL,
            "default",
        );
    }
    // Partial rotary: the table is over rotary_dim, not head_dim.
    let c = cfg_scaling(4, 10000.0, RopeScaling::None);
    assert_rel(
        &c.inv_freq(64, 1).unwrap(),
        &[1.0, 0.01],
        TABLE_TOL,
        "partial",
    );
    assert_eq!(
        RopeConfig::llama(64).inv_freq(64, 1).unwrap(),
        hf_default(10000.0, 64)
    );
}

#[test]
fn inv_freq_linear() {
    let c = cfg_scaling(4, 10000.0, RopeScaling::Linear { factor: 2.0 });
    assert_rel(
        &c.inv_freq(4, 1).unwrap(),
        &[0.5, 0.005],
        TABLE_TOL,
        "by hand",
    );
    let c = cfg_scaling(128, 10000.0, RopeScaling::Linear { factor: 4.5 });
    assert_rel(
        &c.inv_freq(128, 1).unwrap(),
        &hf_linear(10000.0, 128, 4.5),
        TABLE_TOL,
        "formula",
    );
}

#[test]
fn inv_freq_ntk_aware() {
    // base' = 10000 * 4^(4/2) = 160000; inv_freq = [1, 160000^(-1/2)] = [1, 1/400].
    let c = cfg_scaling(4, 10000.0, RopeScaling::NtkAware { factor: 4.0 });
    assert_rel(
        &c.inv_freq(4, 1).unwrap(),
        &[1.0, 0.0025],
        TABLE_TOL,
        "by hand",
    );
    let c = cfg_scaling(128, 10000.0, RopeScaling::NtkAware { factor: 8.0 });
    assert_rel(
        &c.inv_freq(128, 1).unwrap(),
        &hf_ntk(10000.0, 128, 8.0),
        TABLE_TOL,
        "formula",
    );
    // rotary_dim 2: the exponent d / (d - 2) is infinite, but the only frequency is 1.
    let c = cfg_scaling(2, 10000.0, RopeScaling::NtkAware { factor: 4.0 });
    assert_eq!(c.inv_freq(2, 1).unwrap(), vec![1.0]);
    let dynamic = RopeScaling::DynamicNtk {
        factor: 4.0,
        original_max_position: 4,
    };
    assert_eq!(
        cfg_scaling(2, 10000.0, dynamic).inv_freq(2, 100).unwrap(),
        vec![1.0]
    );
    // Factor 1 is no scaling.
    let c = cfg_scaling(64, 10000.0, RopeScaling::NtkAware { factor: 1.0 });
    assert_rel(
        &c.inv_freq(64, 1).unwrap(),
        &hf_default(10000.0, 64),
        TABLE_TOL,
        "factor 1",
    );
}

#[test]
fn inv_freq_dynamic_ntk() {
    let scaling = RopeScaling::DynamicNtk {
        factor: 2.0,
        original_max_position: 100,
    };
    let c = cfg_scaling(4, 10000.0, scaling);
    // seq_len 200: bracket 2 * 200 / 100 - 1 = 3, base' = 10000 * 3^2 = 90000, 1/sqrt = 1/300.
    assert_rel(
        &c.inv_freq(4, 200).unwrap(),
        &[1.0, 1.0 / 300.0],
        TABLE_TOL,
        "by hand",
    );
    // Up to the original length the table is the default one.
    for seq_len in [1, 50, 100] {
        assert_rel(
            &c.inv_freq(4, seq_len).unwrap(),
            &[1.0, 0.01],
            TABLE_TOL,
            "short",
        );
    }
    let scaling = RopeScaling::DynamicNtk {
        factor: 4.0,
        original_max_position: 4096,
    };
    let c = cfg_scaling(128, 10000.0, scaling);
    for seq_len in [1, 4096, 4097, 10000, 65536] {
        assert_rel(
            &c.inv_freq(128, seq_len).unwrap(),
            &hf_dynamic(10000.0, 128, 4.0, 4096, seq_len),
            TABLE_TOL,
            &format!("formula, seq_len {seq_len}"),
        );
    }
    // The table changes past the original length.
    assert!(c.inv_freq(128, 8192).unwrap()[1] < c.inv_freq(128, 4096).unwrap()[1]);
}

#[test]
fn inv_freq_yarn() {
    let yarn = |original_max_position, factor, attention_factor| RopeScaling::Yarn {
        factor,
        original_max_position,
        beta_fast: 32.0,
        beta_slow: 1.0,
        attention_factor,
    };
    // d = 8, base 10000, original 4096: find_correction_dim(32) = 1.309 -> low 1,
    // find_correction_dim(1) = 2.814 -> high 3; ramp over f = 0..4 is [0, 0, 0.5, 1].
    // Default table [1, 0.1, 0.01, 0.001], interpolated (/4) [0.25, 0.025, 0.0025, 0.00025].
    let c = cfg_scaling(8, 10000.0, yarn(4096, 4.0, None));
    assert_rel(
        &c.inv_freq(8, 1).unwrap(),
        &[1.0, 0.1, 0.5 * 0.0025 + 0.5 * 0.01, 0.00025],
        TABLE_TOL,
        "by hand",
    );
    // 0.1 * ln 4 + 1.
    assert!((c.attention_factor() - 1.138_629_436_111_989).abs() < 1e-15);
    // Original length 1: both correction dims are negative, low = high = 0, the ramp is
    // (f - 0) / 0.001 clamped: [0, 1, 1, 1].
    let c = cfg_scaling(8, 10000.0, yarn(1, 4.0, None));
    assert_rel(
        &c.inv_freq(8, 1).unwrap(),
        &[1.0, 0.025, 0.0025, 0.00025],
        TABLE_TOL,
        "low == high",
    );
    // Original length 65536: find_correction_dim(32) = 2.51 -> low 2, find_correction_dim(1) =
    // 4.02 -> high 5 (below the clamp at d - 1 = 7); ramp [0, 0, 0, 1/3]; the last frequency is
    // 0.00025 / 3 + 0.001 * 2 / 3 = 0.00075.
    let c = cfg_scaling(8, 10000.0, yarn(65536, 4.0, None));
    assert_rel(
        &c.inv_freq(8, 1).unwrap(),
        &[1.0, 0.1, 0.01, 0.00075],
        TABLE_TOL,
        "high above d / 2",
    );
    // Original length 2^30 with beta_fast 1e6: find_correction_dim(1e6) = 2.23 -> low 2,
    // find_correction_dim(1) = 8.23 -> ceil 9, clamped to d - 1 = 7; ramp (f - 2) / 5 =
    // [0, 0, 0, 0.2]; the last frequency is 0.00025 * 0.2 + 0.001 * 0.8 = 0.00085.
    let c = cfg_scaling(
        8,
        10000.0,
        RopeScaling::Yarn {
            factor: 4.0,
            original_max_position: 1 << 30,
            beta_fast: 1e6,
            beta_slow: 1.0,
            attention_factor: None,
        },
    );
    assert_rel(
        &c.inv_freq(8, 1).unwrap(),
        &[1.0, 0.1, 0.01, 0.00085],
        TABLE_TOL,
        "high clamped to d - 1",
    );
    // An explicit attention factor wins; factor 1 gives 1.
    assert_eq!(
        cfg_scaling(8, 1e4, yarn(64, 4.0, Some(0.7))).attention_factor(),
        0.7
    );
    assert_eq!(
        cfg_scaling(8, 1e4, yarn(64, 1.0, None)).attention_factor(),
        1.0
    );
    // Realistic configurations against the transcription.
    for (dim, base, factor, orig, bf, bs) in [
        (64, 10000.0, 40.0, 4096, 32.0, 1.0),
        (128, 10000.0, 16.0, 4096, 32.0, 1.0),
        (128, 1e6, 4.0, 32768, 32.0, 1.0),
        (96, 10000.0, 8.0, 2048, 16.0, 2.0),
        (8, 10000.0, 4.0, 1 << 30, 32.0, 1.0),
        (16, 10000.0, 4.0, 1 << 20, 32.0, 1.0),
    ] {
        let c = cfg_scaling(
            dim,
            base,
            RopeScaling::Yarn {
                factor,
                original_max_position: orig,
                beta_fast: bf,
                beta_slow: bs,
                attention_factor: None,
            },
        );
        assert_rel(
            &c.inv_freq(dim, 1).unwrap(),
            &hf_yarn(base, dim, factor, orig, bf, bs),
            TABLE_TOL,
            &format!("formula d={dim} base={base} factor={factor}"),
        );
        assert!((c.attention_factor() - (0.1 * factor.ln() + 1.0)).abs() < 1e-15);
    }
}

#[test]
fn inv_freq_llama3() {
    let llama3 = |original_max_position| RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position,
    };
    // d = 8, base 10000, original 1000: wavelengths 2 pi * [1, 10, 100, 1000] against the bands
    // 250 (high) and 1000 (low): keep, keep, smooth, divide by 8. Smooth factor of f = 2:
    // (1000 / (200 pi) - 1) / 3 = 0.19718...; inv = 0.01 * ((1 - s) / 8 + s).
    let c = cfg_scaling(8, 10000.0, llama3(1000));
    let s = (1000.0 / (200.0 * PI) - 1.0) / 3.0;
    let by_hand = [1.0, 0.1, 0.01 * ((1.0 - s) / 8.0 + s), 0.001 / 8.0];
    assert_rel(&c.inv_freq(8, 1).unwrap(), &by_hand, TABLE_TOL, "by hand");
    assert!((by_hand[2] - 0.002_975_352_506_846_947).abs() < 1e-15);
    // LLaMA 3.1's own configuration.
    let c = cfg_scaling(128, 500000.0, llama3(8192));
    assert_rel(
        &c.inv_freq(128, 1).unwrap(),
        &hf_llama3(500000.0, 128, 8.0, 1.0, 4.0, 8192),
        TABLE_TOL,
        "formula",
    );
    assert_eq!(c.attention_factor(), 1.0);
}

// ---------------------------------------------------------------------------------------------
// Rotation

fn rotated(x: &[f64], position: f64, inv_freq: &[f64], layout: RopeLayout, af: f64) -> Vec<f64> {
    let mut y = x.to_vec();
    rotate(&mut y, position, inv_freq, layout, af);
    y
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[test]
fn rotation_by_hand() {
    // HalfSplit, rotary_dim 4: pairs (0, 2) at inv_freq 1 and (1, 3) at 0.5; position pi.
    // Pair (0, 2) turns by pi: (1, 0) -> (-1, 0). Pair (1, 3) turns by pi/2: (0, 1) -> (-1, 0).
    let y = rotated(
        &[1.0, 0.0, 0.0, 1.0],
        PI,
        &[1.0, 0.5],
        RopeLayout::HalfSplit,
        1.0,
    );
    assert_close(&y, &[-1.0, -1.0, 0.0, 0.0], 1e-15, "half split");
    // Interleaved: pairs (0, 1) and (2, 3). (1, 0) by pi -> (-1, 0); (0, 1) by pi/2 -> (-1, 0).
    let y = rotated(
        &[1.0, 0.0, 0.0, 1.0],
        PI,
        &[1.0, 0.5],
        RopeLayout::Interleaved,
        1.0,
    );
    assert_close(&y, &[-1.0, 0.0, -1.0, 0.0], 1e-15, "interleaved");
    // x' = x cos - y sin, y' = x sin + y cos at pi/2: (1, 0) -> (0, 1).
    let y = rotated(&[1.0, 0.0], PI / 2.0, &[1.0], RopeLayout::HalfSplit, 1.0);
    assert_close(&y, &[0.0, 1.0], 1e-15, "quarter turn");
    // The attention factor scales the rotated part.
    let y = rotated(
        &[1.0, 0.0, 5.0],
        PI / 2.0,
        &[1.0],
        RopeLayout::HalfSplit,
        3.0,
    );
    assert_close(&y, &[0.0, 3.0, 5.0], 1e-15, "attention factor");
}

#[test]
fn rotation_preserves_norm_and_tail() {
    let mut rng = Rng(7);
    for layout in [RopeLayout::HalfSplit, RopeLayout::Interleaved] {
        for (head_dim, rotary_dim) in [(64, 64), (64, 32), (80, 20), (6, 2)] {
            let inv = config(rotary_dim, layout, RopeScaling::None)
                .inv_freq(head_dim, 1)
                .unwrap();
            for position in [0.0, 1.0, 17.0, 4095.0, 123456.5] {
                let x = rng.vec(head_dim);
                let y = rotated(&x, position, &inv, layout, 1.0);
                let (nx, ny) = (dot(&x, &x).sqrt(), dot(&y, &y).sqrt());
                assert!(
                    (nx - ny).abs() <= 1e-13 * nx,
                    "{layout:?} {position}: {nx} vs {ny}"
                );
                assert_eq!(&y[rotary_dim..], &x[rotary_dim..], "tail untouched");
                // Rotated part scaled by the attention factor, tail not.
                let z = rotated(&x, position, &inv, layout, 1.5);
                assert_eq!(
                    &z[rotary_dim..],
                    &x[rotary_dim..],
                    "tail untouched by factor"
                );
                let scaled: Vec<f64> = y[..rotary_dim].iter().map(|a| a * 1.5).collect();
                assert_close(&z[..rotary_dim], &scaled, 1e-15, "factor");
                if position != 0.0 {
                    assert!(
                        max_diff(&y[..rotary_dim], &x[..rotary_dim]) > 1e-3,
                        "it rotates"
                    );
                }
            }
        }
    }
}

#[test]
fn rotations_compose_and_depend_on_differences() {
    let mut rng = Rng(11);
    for layout in [RopeLayout::HalfSplit, RopeLayout::Interleaved] {
        let inv = config(24, layout, RopeScaling::None)
            .inv_freq(32, 1)
            .unwrap();
        for (a, b) in [(3.0, 5.0), (100.0, -7.0), (1234.0, 4321.0), (0.25, 0.5)] {
            let x = rng.vec(32);
            // R_a R_b = R_{a+b}.
            let ab = rotated(&rotated(&x, b, &inv, layout, 1.0), a, &inv, layout, 1.0);
            let sum = rotated(&x, a + b, &inv, layout, 1.0);
            assert_close(&ab, &sum, 1e-11, "R_a R_b = R_(a+b)");
            // R_{-a} undoes R_a.
            let back = rotated(&rotated(&x, a, &inv, layout, 1.0), -a, &inv, layout, 1.0);
            assert_close(&back, &x, 1e-11, "inverse");
            // (R_a q).(R_b k) = (R_{a+t} q).(R_{b+t} k) = (R_{a-b} q).k.
            let (q, k) = (rng.vec(32), rng.vec(32));
            let s = dot(
                &rotated(&q, a, &inv, layout, 1.0),
                &rotated(&k, b, &inv, layout, 1.0),
            );
            for t in [1.0, 77.0, 5000.0] {
                let st = dot(
                    &rotated(&q, a + t, &inv, layout, 1.0),
                    &rotated(&k, b + t, &inv, layout, 1.0),
                );
                assert!((s - st).abs() < 1e-10, "shift {t}: {s} vs {st}");
            }
            let rel = dot(&rotated(&q, a - b, &inv, layout, 1.0), &k);
            assert!((s - rel).abs() < 1e-10, "relative: {s} vs {rel}");
        }
    }
}

#[test]
fn half_split_and_interleaved_agree_after_permutation() {
    let mut rng = Rng(13);
    let (head_dim, rotary_dim) = (40, 32);
    let half = rotary_dim / 2;
    let inv = config(rotary_dim, RopeLayout::HalfSplit, RopeScaling::None)
        .inv_freq(head_dim, 1)
        .unwrap();
    // Interleaved element 2f is half-split element f, 2f + 1 is f + half; the tail stays.
    let perm = |x: &[f64]| -> Vec<f64> {
        let mut y = x.to_vec();
        for f in 0..half {
            y[2 * f] = x[f];
            y[2 * f + 1] = x[f + half];
        }
        y
    };
    for position in [0.0, 3.0, 999.0] {
        let x = rng.vec(head_dim);
        let h = rotated(&x, position, &inv, RopeLayout::HalfSplit, 1.3);
        let i = rotated(&perm(&x), position, &inv, RopeLayout::Interleaved, 1.3);
        assert_eq!(perm(&h), i, "position {position}");
    }
}

// ---------------------------------------------------------------------------------------------
// The references

fn opts(config: RopeConfig, mode: PositionMode) -> RopeOptions {
    RopeOptions::new(config, mode)
}

struct Problem {
    shape: RefShape,
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
}

fn problem(shape: RefShape, seed: u64) -> Problem {
    let mut rng = Rng(seed);
    let q = rng.vec(shape.q_len().unwrap());
    let k = rng.vec(shape.kv_len().unwrap());
    let v = rng.vec(shape.kv_len().unwrap());
    Problem { shape, q, k, v }
}

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

fn to_t<T: Element>(x: &[f64]) -> Vec<T> {
    x.iter().map(|&a| T::from_f32(a as f32)).collect()
}

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

// ---------------------------------------------------------------------------------------------
// Validation

fn base_cfg() -> RopeConfig {
    RopeConfig::llama(64)
}

fn cfg_err(c: RopeConfig) -> &'static str {
    let e = c
        .validate(64)
        .expect_err(&format!("{c:?} should be rejected"));
    // inv_freq reports the same error.
    assert_eq!(c.inv_freq(64, 1).unwrap_err(), e);
    arg_of(&e)
}

#[test]
fn validation_rejects_bad_configs() {
    assert!(base_cfg().validate(64).is_ok());
    for rotary_dim in [0, 1, 3, 63, 66, 128] {
        let c = RopeConfig {
            rotary_dim,
            ..base_cfg()
        };
        assert_eq!(cfg_err(c), "rope.rotary_dim", "rotary_dim {rotary_dim}");
    }
    for rotary_dim in [2, 4, 32, 64] {
        assert!(RopeConfig {
            rotary_dim,
            ..base_cfg()
        }
        .validate(64)
        .is_ok());
    }
    for base in [1.0, 0.5, 0.0, -10.0, f64::NAN, f64::INFINITY] {
        assert_eq!(
            cfg_err(RopeConfig { base, ..base_cfg() }),
            "rope.base",
            "base {base}"
        );
    }
    let with = |scaling| RopeConfig {
        scaling,
        ..base_cfg()
    };
    let yarn =
        |factor, original_max_position, beta_fast, beta_slow, attention_factor| RopeScaling::Yarn {
            factor,
            original_max_position,
            beta_fast,
            beta_slow,
            attention_factor,
        };
    let llama3 =
        |factor, low_freq_factor, high_freq_factor, original_max_position| RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position,
        };
    for factor in [0.5, 0.0, -2.0, f64::NAN, f64::INFINITY] {
        for scaling in [
            RopeScaling::Linear { factor },
            RopeScaling::NtkAware { factor },
            RopeScaling::DynamicNtk {
                factor,
                original_max_position: 10,
            },
            yarn(factor, 10, 32.0, 1.0, None),
            llama3(factor, 1.0, 4.0, 10),
        ] {
            assert_eq!(cfg_err(with(scaling)), "rope.scaling.factor", "{scaling:?}");
        }
    }
    for scaling in [
        RopeScaling::DynamicNtk {
            factor: 2.0,
            original_max_position: 0,
        },
        yarn(2.0, 0, 32.0, 1.0, None),
        llama3(2.0, 1.0, 4.0, 0),
    ] {
        assert_eq!(
            cfg_err(with(scaling)),
            "rope.scaling.original_max_position",
            "{scaling:?}"
        );
    }
    for beta_slow in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        assert_eq!(
            cfg_err(with(yarn(2.0, 10, 32.0, beta_slow, None))),
            "rope.scaling.beta_slow"
        );
    }
    for beta_fast in [1.0, 0.5, f64::NAN, f64::INFINITY] {
        assert_eq!(
            cfg_err(with(yarn(2.0, 10, beta_fast, 1.0, None))),
            "rope.scaling.beta_fast"
        );
    }
    for a in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        assert_eq!(
            cfg_err(with(yarn(2.0, 10, 32.0, 1.0, Some(a)))),
            "rope.scaling.attention_factor"
        );
    }
    for low in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        assert_eq!(
            cfg_err(with(llama3(8.0, low, 4.0, 10))),
            "rope.scaling.low_freq_factor"
        );
    }
    for high in [1.0, 0.5, f64::NAN, f64::INFINITY] {
        assert_eq!(
            cfg_err(with(llama3(8.0, 1.0, high, 10))),
            "rope.scaling.high_freq_factor"
        );
    }
    // The boundaries that are fine.
    for scaling in [
        RopeScaling::Linear { factor: 1.0 },
        RopeScaling::NtkAware { factor: 1.0 },
        RopeScaling::DynamicNtk {
            factor: 1.0,
            original_max_position: 1,
        },
        yarn(1.0, 1, 1.5, 1.0, Some(0.5)),
        llama3(1.0, 0.5, 0.75, 1),
    ] {
        assert!(with(scaling).validate(64).is_ok(), "{scaling:?}");
    }
}

#[test]
fn validation_rejects_bad_options() {
    let ok = |mode| opts(RopeConfig::llama(8), mode);
    let err = |o: &RopeOptions, batch, sq, sk| -> &'static str {
        arg_of(
            &o.validate(8, batch, sq, sk)
                .expect_err(&format!("{o:?} should be rejected")),
        )
    };
    assert!(ok(PositionMode::Rope).validate(8, 2, 5, 5).is_ok());
    assert!(ok(PositionMode::ReRope { window: 1 })
        .validate(8, 2, 5, 5)
        .is_ok());
    for mode in [
        PositionMode::ReRope { window: 0 },
        PositionMode::LeakyReRope {
            window: 0,
            leak: 2.0,
        },
    ] {
        assert_eq!(err(&ok(mode), 1, 4, 4), "rope.window");
    }
    for leak in [1.0, 0.5, 0.0, -3.0, f64::NAN, f64::INFINITY] {
        assert_eq!(
            err(&ok(PositionMode::LeakyReRope { window: 2, leak }), 1, 4, 4),
            "rope.leak",
            "leak {leak}"
        );
    }
    for l in [0, 1] {
        let mut o = ok(PositionMode::Rope);
        o.log_n_train_len = Some(l);
        assert_eq!(err(&o, 1, 4, 4), "rope.log_n_train_len");
    }
    let mut o = ok(PositionMode::Rope);
    o.log_n_train_len = Some(2);
    assert!(o.validate(8, 1, 4, 4).is_ok());

    // One offset per batch entry.
    let mut o = ok(PositionMode::Rope);
    o.position_offsets = Some(vec![0, 1]);
    assert!(o.validate(8, 2, 4, 4).is_ok());
    let e = o.validate(8, 3, 4, 4).unwrap_err();
    assert!(
        matches!(
            e,
            Error::ShapeMismatch {
                arg: "rope.position_offsets",
                value: 2,
                expected: 3,
                ..
            }
        ),
        "{e:?}"
    );
    // Positions (plus the window) must fit in i32.
    let top = i32::MAX as u32;
    o.position_offsets = Some(vec![top - 3]);
    assert!(
        o.validate(8, 1, 4, 4).is_ok(),
        "largest position exactly i32::MAX"
    );
    o.position_offsets = Some(vec![top - 2]);
    assert_eq!(err(&o, 1, 4, 4), "rope.position_offsets");
    o.position_offsets = Some(vec![u32::MAX]);
    assert_eq!(err(&o, 1, 1, 1), "rope.position_offsets");
    let mut o = ok(PositionMode::ReRope { window: 1 });
    o.position_offsets = Some(vec![top - 3]);
    assert_eq!(
        err(&o, 1, 4, 4),
        "rope.position_offsets",
        "position + window"
    );
    o.position_offsets = Some(vec![top - 4]);
    assert!(o.validate(8, 1, 4, 4).is_ok());
    // A config error comes through the options.
    let mut o = ok(PositionMode::Rope);
    o.config.rotary_dim = 10;
    assert_eq!(err(&o, 1, 4, 4), "rope.rotary_dim");
}

#[test]
fn references_report_errors() {
    let s = shape(1, 4, 4, 2, 1, 8);
    let p = problem(s, 1100);
    let bad = opts(RopeConfig::llama(8), PositionMode::ReRope { window: 0 });
    let e = rope_attention_f64(&s, &p.q, &p.k, &p.v, &bad, 1.0).unwrap_err();
    assert_eq!(arg_of(&e), "rope.window");
    let (q, k, v) = (to_t::<f16>(&p.q), to_t::<f16>(&p.k), to_t::<f16>(&p.v));
    let e = rope_attention_lowp(&s, &q, &k, &v, &bad, 1.0).unwrap_err();
    assert_eq!(arg_of(&e), "rope.window");
    assert_eq!(
        arg_of(&rope_rotate_q(&s, &p.q, &bad).unwrap_err()),
        "rope.window"
    );
    assert_eq!(
        arg_of(&rope_rotate_k(&s, &p.k, &bad).unwrap_err()),
        "rope.window"
    );

    let good = opts(RopeConfig::llama(8), PositionMode::Rope);
    let e = rope_attention_f64(&s, &p.q[1..], &p.k, &p.v, &good, 1.0).unwrap_err();
    assert_eq!(arg_of(&e), "q.len");
    let e = rope_attention_f64(&s, &p.q, &p.k, &p.v[1..], &good, 1.0).unwrap_err();
    assert_eq!(arg_of(&e), "v.len");
    assert_eq!(
        arg_of(&rope_rotate_q(&s, &p.q[1..], &good).unwrap_err()),
        "q.len"
    );
    assert_eq!(
        arg_of(&rope_rotate_k(&s, &p.k[1..], &good).unwrap_err()),
        "k.len"
    );
    let mut off = good.clone();
    off.position_offsets = Some(vec![0, 0]);
    let e = rope_attention_f64(&s, &p.q, &p.k, &p.v, &off, 1.0).unwrap_err();
    assert_eq!(arg_of(&e), "rope.position_offsets");
    let gqa = shape(1, 4, 4, 3, 2, 8);
    let e = rope_attention_f64(&gqa, &[0.0; 96], &[0.0; 64], &[0.0; 64], &good, 1.0).unwrap_err();
    assert!(matches!(e, Error::HeadsNotDivisible { .. }), "{e:?}");
}
