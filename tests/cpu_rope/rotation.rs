//! Rotation

use super::*;

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
