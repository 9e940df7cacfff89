//! The correctness rule (`longflash::reference::compare`) by hand: which outputs pass against a
//! given reference and naive output, the half-ulp term of each type, and the naive output's
//! spread (probabilities at a rounding tie). Its behaviour on random problems is in
//! `tests/cpu_reference.rs`. CPU only.

use half::{bf16, f16};
use longflash::dtype::DType;
use longflash::mask::MaskSpec;
use longflash::reference::{attention_lowp, compare, half_ulp, RefOutput, RefShape};

#[test]
fn compare_by_hand() {
    let reference = RefOutput {
        out: vec![0.0, 1.0],
        lse: vec![2.0, f64::NEG_INFINITY],
        ..RefOutput::default()
    };
    let naive = RefOutput {
        out: vec![0.1, 1.0],
        lse: vec![2.0, f64::NEG_INFINITY],
        ..RefOutput::default()
    };
    let lse = [2.001f32, f32::NEG_INFINITY];
    let c = compare(&[0.2, 1.0], Some(&lse), &reference, &naive);
    assert!(c.passes, "{c}");
    assert!((c.bound - 0.20001).abs() < 1e-12);
    assert!(!compare(&[0.0, 1.20002], Some(&lse), &reference, &naive).passes);
    assert!(!compare(&[0.21, 1.0], None, &reference, &naive).passes);
    assert!(
        !compare(
            &[0.0, 1.0],
            Some(&[2.003, f32::NEG_INFINITY]),
            &reference,
            &naive
        )
        .passes
    );
    assert!(!compare(&[0.0, 1.0], Some(&[2.0, -1e30]), &reference, &naive).passes);
    assert!(!compare(&[0.0, 1.0], Some(&[2.0]), &reference, &naive).passes);
    assert!(!compare(&[0.0], None, &reference, &naive).passes);
    assert!(!compare(&[f64::NAN, 1.0], None, &reference, &naive).passes);
    let shown = c.to_string();
    assert!(shown.starts_with("pass"), "{shown}");
    assert!(!shown.contains('\n'));
    let failed = compare(&[f64::NAN, 1.0], None, &reference, &naive).to_string();
    assert!(
        failed.starts_with("FAIL") && failed.contains("NaN"),
        "{failed}"
    );

    // A typed naive output: its unrounded values set the computed part, and each element may
    // also be off by half an ulp of the type at its own magnitude.
    let exact_naive = RefOutput {
        out: vec![0.0, 1.0],
        lse: vec![2.0, f64::NEG_INFINITY],
        unrounded: vec![0.0, 1.0],
        spread: Vec::new(),
        dtype: Some(DType::Bf16),
    };
    let one_half_ulp = 2f64.powi(-8); // bf16 at 1.0
    let c = compare(&[0.0, 1.0 + one_half_ulp], None, &reference, &exact_naive);
    assert!(c.passes, "{c}");
    assert!(
        !compare(
            &[0.0, 1.0 + 2.0 * one_half_ulp],
            None,
            &reference,
            &exact_naive
        )
        .passes
    );
    // Half an ulp at 1.0 does not carry over to an element near 0.
    assert!(!compare(&[1e-3, 1.0], None, &reference, &exact_naive).passes);
    assert!(compare(&[5e-6, 1.0], None, &reference, &exact_naive).passes);

    // A spread counts as naive error: 1 + 2 half-ulps passes once element 1 may move by half
    // an ulp (2 * half-ulp + half-ulp + 1e-5 >= 2 half-ulps), but only with the spread there.
    let spread_naive = RefOutput {
        spread: vec![0.0, one_half_ulp],
        ..exact_naive.clone()
    };
    let c = compare(
        &[0.0, 1.0 + 2.0 * one_half_ulp],
        None,
        &reference,
        &spread_naive,
    );
    assert!(c.passes, "{c}");
    assert_eq!(c.naive_abs_err, one_half_ulp);
    // A spread of the wrong length is not read as zeros: the comparison fails.
    let bad = RefOutput {
        spread: vec![0.0],
        ..exact_naive.clone()
    };
    assert!(!compare(&[0.0, 1.0], None, &reference, &bad).passes);
}

/// The naive output's spread: a probability that lands within f32 noise of a tie between two
/// values of the type may round either way in another order of the same arithmetic, and the
/// spread is how far that moves the output; a probability clear of any tie adds nothing.
#[test]
fn naive_spread_from_probabilities_at_a_tie() {
    // One query (1.0) over two keys (-1.0 and 1.0) at head dim 1: x_1 = scale * log2(e), the
    // exponent base is 1, P_1 = 2^(x_1 - 1) and P_0 = 2^(-x_1 - 1).
    let shape = RefShape {
        batch: 1,
        seqlen_q: 1,
        seqlen_k: 2,
        heads_q: 1,
        heads_kv: 1,
        head_dim: 1,
    };
    let (q, k) = ([bf16::ONE], [bf16::NEG_ONE, bf16::ONE]);
    let v = [bf16::from_f32(-2.5), bf16::from_f32(1.75)];
    let run = |p1: f64| {
        // The scale that puts P_1 at p1 (to f32 precision).
        let scale = ((1.0 + p1.log2()) / std::f64::consts::LOG2_E) as f32;
        attention_lowp(&shape, &q, &k, &v, &MaskSpec::none(), scale).unwrap()
    };
    // 152.5 / 256 is the tie between the bf16 values 152/256 and 153/256.
    let tie = run(152.5 / 256.0);
    let clear = run(152.2 / 256.0);
    assert_eq!(clear.spread, vec![0.0]);
    // Rounded up or down, P_1 moves by 1/256 and the output by about dP (v_1 - o) / sum.
    let (p1, p0) = (
        152.5f64 / 256.0,
        2f64.powf(-1.0 - (1.0 + (152.5f64 / 256.0).log2())),
    );
    let o = (p1 * 1.75 - p0 * 2.5) / (p1 + p0);
    let expect = (1.0 / 256.0) * (1.75 - o) / (p1 + p0);
    let w = tie.spread[0];
    assert!(
        (w - expect).abs() <= 0.05 * expect,
        "spread {w}, expected about {expect}"
    );
}

#[test]
fn half_ulp_of_each_type() {
    assert_eq!(half_ulp(DType::Bf16, 1.0), 2f64.powi(-8));
    assert_eq!(half_ulp(DType::Bf16, 0.999), 2f64.powi(-9));
    assert_eq!(half_ulp(DType::Bf16, -3.0), 2f64.powi(-7));
    assert_eq!(half_ulp(DType::F16, 1.0), 2f64.powi(-11));
    assert_eq!(half_ulp(DType::F16, 1.5e-6), 2f64.powi(-25)); // subnormal: a fixed step
    assert_eq!(half_ulp(DType::F16, 0.0), 0.0);
    // Rounding any value to the type moves it by at most this much.
    let mut x = 1e-7f64;
    while x < 1e4 {
        for t in [DType::Bf16, DType::F16] {
            let r = match t {
                DType::Bf16 => f64::from(bf16::from_f64(x).to_f32()),
                DType::F16 => f64::from(f16::from_f64(x).to_f32()),
            };
            if r.is_finite() {
                assert!((r - x).abs() <= half_ulp(t, x), "{t:?} {x}");
            }
        }
        x *= 1.0137;
    }
}
