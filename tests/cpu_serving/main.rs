//! The serving-path references (`longflash::reference`'s varlen and paged-cache attention):
//! agreement with the dense reference, page order and sharing, decoding shapes, and the typed
//! rejections. CPU only. One binary: the shared helpers and strategies here, the varlen and the
//! paged-cache tests in modules.

use half::{bf16, f16};
use longflash::dtype::Element;
use longflash::error::Error;
use longflash::mask::MaskSpec;
use longflash::reference::{
    attention_f64, attention_lowp, compare, paged_attention_f64, paged_attention_lowp,
    paged_gather, varlen_attention_f64, varlen_attention_lowp, PagedLayout, PagedShape, RefOutput,
    RefShape, VarlenShape,
};
use proptest::prelude::*;

const LAYOUTS: [PagedLayout; 2] = [PagedLayout::TokensMajor, PagedLayout::HeadsMajor];

#[path = "../support/rng.rs"]
mod rng;
use rng::Rng;

fn round<T: Element>(x: &[f64]) -> Vec<T> {
    x.iter().map(|&x| T::from_f32(x as f32)).collect()
}

fn widen<T: Element>(x: &[T]) -> Vec<f64> {
    x.iter().map(|&x| f64::from(x.to_f32())).collect()
}

/// Random data of `n` elements in `T`, and the same values widened to f64: the f64 and the
/// low-precision references then see the same inputs.
fn data<T: Element>(rng: &mut Rng, n: usize, a: f64) -> (Vec<T>, Vec<f64>) {
    let low = round::<T>(&rng.vec(n, a));
    let wide = widen(&low);
    (low, wide)
}

/// Where two slices first differ bit for bit (or their lengths), `None` when identical.
fn first_diff(got: &[f64], want: &[f64]) -> Option<String> {
    if got.len() != want.len() {
        return Some(format!("length {} vs {}", got.len(), want.len()));
    }
    got.iter()
        .zip(want)
        .position(|(a, b)| a.to_bits() != b.to_bits())
        .map(|i| format!("element {i}: {} vs {}", got[i], want[i]))
}

/// Whether two reference outputs are bit for bit the same (out, lse, unrounded, spread, dtype).
fn same_output(got: &RefOutput, want: &RefOutput) -> Option<String> {
    for (what, a, b) in [
        ("out", &got.out, &want.out),
        ("lse", &got.lse, &want.lse),
        ("unrounded", &got.unrounded, &want.unrounded),
        ("spread", &got.spread, &want.spread),
    ] {
        if let Some(d) = first_diff(a, b) {
            return Some(format!("{what}: {d}"));
        }
    }
    (got.dtype != want.dtype).then(|| format!("dtype {:?} vs {:?}", got.dtype, want.dtype))
}

fn assert_same(got: &RefOutput, want: &RefOutput, context: &str) {
    if let Some(d) = same_output(got, want) {
        panic!("{context}: {d}");
    }
}

#[track_caller]
fn arg_of<T: std::fmt::Debug>(r: Result<T, Error>) -> &'static str {
    match r {
        Err(Error::InvalidArgument { arg, .. }) => arg,
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

fn seq_len() -> impl Strategy<Value = usize> {
    prop_oneof![
        Just(0usize),
        Just(1),
        prop::sample::select(vec![2usize, 3, 5, 7, 11, 13, 17]),
        0usize..=24,
    ]
}

fn mask() -> impl Strategy<Value = MaskSpec> {
    prop::sample::select(vec![
        MaskSpec::none(),
        MaskSpec::causal(),
        MaskSpec::causal_window(2),
        MaskSpec::sliding_window(Some(3), Some(1)),
        MaskSpec::sliding_window(None, Some(0)),
    ])
}

fn heads() -> impl Strategy<Value = (usize, usize)> {
    (1usize..=2, prop::sample::select(vec![1usize, 2, 4])).prop_map(|(hkv, g)| (hkv * g, hkv))
}

mod append;
mod decode;
mod paged;
mod varlen;
