//! Frequency tables, written out as transformers' `modeling_rope_utils.py` computes them
//! (`arange(0, dim, 2) / dim`, then the per-scaling rule), independently of `longflash::rope`.

use super::*;

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
