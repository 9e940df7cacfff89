//! Rotary embeddings (`longflash::rope`) and the ReRoPE references
//! (`longflash::reference::rope_attention_*`): frequency tables against the transformers
//! formulas, rotation identities, the two-matrix definition against the relative-position one,
//! and validation. CPU only. One binary, a module per subject.

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

fn rotated(x: &[f64], position: f64, inv_freq: &[f64], layout: RopeLayout, af: f64) -> Vec<f64> {
    let mut y = x.to_vec();
    rotate(&mut y, position, inv_freq, layout, af);
    y
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

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

fn to_t<T: Element>(x: &[f64]) -> Vec<T> {
    x.iter().map(|&a| T::from_f32(a as f32)).collect()
}

mod references;
mod rotation;
mod tables;
mod validation;
