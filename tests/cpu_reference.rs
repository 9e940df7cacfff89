//! The CPU reference (`longflash::reference`): hand-computed cases, invariants, and the
//! correctness rule of `compare` on random problems (its hand-made cases, the half-ulp and the
//! naive output's spread are in `tests/cpu_compare.rs`). CPU only.

use half::{bf16, f16};
use longflash::dtype::{DType, Element};
use longflash::error::Error;
use longflash::mask::MaskSpec;
use longflash::reference::{attention_f64, attention_lowp, compare, half_ulp, RefOutput, RefShape};
use proptest::prelude::*;

const LN2: f64 = std::f64::consts::LN_2;

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

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * b.abs().max(1.0)
}

fn assert_slice_close(got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "length: got {got:?}, want {want:?}");
    for (k, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            close(g, w, tol) || (g == w),
            "element {k}: got {g}, want {w} (got {got:?}, want {want:?})"
        );
    }
}

/// `d x d` identity, as `d` key/value rows of a single head.
fn identity(d: usize) -> Vec<f64> {
    let mut v = vec![0.0; d * d];
    for j in 0..d {
        v[j * d + j] = 1.0;
    }
    v
}

/// With all-zero queries every visible key scores the same, so with `v = identity` row `i` of
/// the output is `1/n` at each visible key and 0 elsewhere: the output spells out the mask.
fn visible_sets(mask: MaskSpec, sq: usize, sk: usize) -> (Vec<Vec<f64>>, Vec<f64>) {
    let s = shape(1, sq, sk, 1, 1, sk);
    let q = vec![0.0; sq * sk];
    let k = vec![0.5; sk * sk];
    let r = attention_f64(&s, &q, &k, &identity(sk), &mask, 1.0).unwrap();
    (r.out.chunks(sk).map(|c| c.to_vec()).collect(), r.lse)
}

/// Row of the expected output for a visible key set (uniform weights).
fn uniform_row(sk: usize, keys: &[usize]) -> Vec<f64> {
    let mut row = vec![0.0; sk];
    for &j in keys {
        row[j] = 1.0 / keys.len() as f64;
    }
    row
}

#[test]
fn one_key_gives_its_value_and_score() {
    let s = shape(1, 3, 1, 1, 1, 4);
    let q = [
        1.0, 0.0, 0.0, 0.0, //
        0.0, 1.0, 0.0, 0.0, //
        0.0, 0.0, 1.0, 0.0,
    ];
    let k = [2.0, 3.0, 5.0, 7.0];
    let v = [1.0, -2.0, 3.0, 0.5];
    let r = attention_f64(&s, &q, &k, &v, &MaskSpec::none(), 0.5).unwrap();
    for i in 0..3 {
        assert_eq!(&r.out[i * 4..i * 4 + 4], &v);
    }
    assert_slice_close(&r.lse, &[1.0, 1.5, 2.5], 1e-15);

    let lowq: Vec<f16> = q.iter().map(|&x| f16::from_f64(x)).collect();
    let lowk: Vec<f16> = k.iter().map(|&x| f16::from_f64(x)).collect();
    let lowv: Vec<f16> = v.iter().map(|&x| f16::from_f64(x)).collect();
    let l = attention_lowp(&s, &lowq, &lowk, &lowv, &MaskSpec::none(), 0.5).unwrap();
    assert_eq!(l.out, r.out);
    assert_eq!(l.lse, r.lse);
}

#[test]
fn equal_scores_average_the_values() {
    // Two identical keys: the softmax is (1/2, 1/2).
    let s = shape(1, 1, 2, 1, 1, 2);
    let q = [1.0, 1.0];
    let k = [1.0, 2.0, 1.0, 2.0];
    let v = [1.0, 2.0, 3.0, 6.0];
    let r = attention_f64(&s, &q, &k, &v, &MaskSpec::none(), 1.0).unwrap();
    assert_slice_close(&r.out, &[2.0, 4.0], 1e-15);
    assert_slice_close(&r.lse, &[3.0 + LN2], 1e-15);
}

#[test]
fn two_by_two_softmax_by_hand() {
    // Scores [[1, 0], [0, 1]]: weights e/(e+1) = 0.7310585786300049 and 1/(e+1) =
    // 0.2689414213699951; lse = ln(e + 1) = 1.3132616875182228.
    let s = shape(1, 2, 2, 1, 1, 2);
    let q = [1.0, 0.0, 0.0, 1.0];
    let k = [1.0, 0.0, 0.0, 1.0];
    let v = [1.0, 2.0, 3.0, 4.0];
    let r = attention_f64(&s, &q, &k, &v, &MaskSpec::none(), 1.0).unwrap();
    let (hi, lo) = (0.7310585786300049, 0.2689414213699951);
    let want = [
        hi + 3.0 * lo,
        2.0 * hi + 4.0 * lo,
        lo + 3.0 * hi,
        2.0 * lo + 4.0 * hi,
    ];
    assert_slice_close(&r.out, &want, 1e-14);
    assert_slice_close(&r.lse, &[1.3132616875182228; 2], 1e-14);
    // Row 0 by the numbers: 0.731 * 1 + 0.269 * 3 = 1.5379.
    assert!((r.out[0] - 1.5378828427399902).abs() < 1e-14);

    // Causal, square: row 0 sees key 0 only (out = v0, lse = score 1), row 1 sees both.
    let c = attention_f64(&s, &q, &k, &v, &MaskSpec::causal(), 1.0).unwrap();
    assert_slice_close(&c.out[..2], &[1.0, 2.0], 1e-15);
    assert_slice_close(&c.out[2..], &want[2..], 1e-14);
    assert_slice_close(&c.lse, &[1.0, 1.3132616875182228], 1e-14);
}

#[test]
fn causal_with_more_queries_than_keys_has_empty_rows() {
    let s = shape(1, 4, 2, 1, 1, 2);
    let q = [0.0; 8];
    let k = [1.0, -1.0, 2.0, 0.5];
    let v = [1.0, 2.0, 3.0, 4.0];
    let r = attention_f64(&s, &q, &k, &v, &MaskSpec::causal(), 1.0).unwrap();
    assert_eq!(&r.out[..4], &[0.0; 4]);
    assert_eq!(r.lse[0], f64::NEG_INFINITY);
    assert_eq!(r.lse[1], f64::NEG_INFINITY);
    assert_slice_close(&r.out[4..6], &[1.0, 2.0], 1e-15);
    assert_slice_close(&r.out[6..8], &[2.0, 3.0], 1e-15);
    assert_slice_close(&r.lse[2..], &[0.0, LN2], 1e-15);

    for (out, lse) in [
        attention_lowp(
            &s,
            &[f16::ZERO; 8],
            &k.map(f16::from_f64),
            &v.map(f16::from_f64),
            &MaskSpec::causal(),
            1.0,
        )
        .unwrap(),
        attention_lowp(
            &s,
            &[bf16::ZERO; 8],
            &k.map(bf16::from_f64),
            &v.map(bf16::from_f64),
            &MaskSpec::causal(),
            1.0,
        )
        .unwrap(),
    ]
    .map(|r| (r.out, r.lse))
    {
        assert_eq!(&out[..4], &[0.0; 4]);
        assert_eq!(&lse[..2], &[f64::NEG_INFINITY; 2]);
        assert!(lse[2..].iter().all(|x| x.is_finite()));
    }
}

#[test]
fn causal_diagonal_is_bottom_right_aligned() {
    // sq = 2, sk = 4: the last query sees every key, the first one all but the last.
    let (rows, lse) = visible_sets(MaskSpec::causal(), 2, 4);
    assert_slice_close(&rows[0], &uniform_row(4, &[0, 1, 2]), 1e-15);
    assert_slice_close(&rows[1], &uniform_row(4, &[0, 1, 2, 3]), 1e-15);
    assert_slice_close(&lse, &[3f64.ln() + 0.0, 4f64.ln()], 1e-15);

    // sq = 3, sk = 5, window (0, 0): query i sees exactly key i + 2.
    let (rows, _) = visible_sets(MaskSpec::sliding_window(Some(0), Some(0)), 3, 5);
    for (i, row) in rows.iter().enumerate() {
        assert_slice_close(row, &uniform_row(5, &[i + 2]), 1e-15);
    }
}

#[test]
fn sliding_window_picks_exactly_the_expected_keys() {
    // Window (1 left, 2 right), sq = sk = 6: row i sees [i-1, i+2] within [0, 6).
    let want: [&[usize]; 6] = [
        &[0, 1, 2],
        &[0, 1, 2, 3],
        &[1, 2, 3, 4],
        &[2, 3, 4, 5],
        &[3, 4, 5],
        &[4, 5],
    ];
    let (rows, _) = visible_sets(MaskSpec::sliding_window(Some(1), Some(2)), 6, 6);
    for (i, keys) in want.iter().enumerate() {
        assert_slice_close(&rows[i], &uniform_row(6, keys), 1e-15);
    }

    // Causal with two keys of history, sq = sk = 5: row i sees [i-2, i].
    let want: [&[usize]; 5] = [&[0], &[0, 1], &[0, 1, 2], &[1, 2, 3], &[2, 3, 4]];
    let (rows, _) = visible_sets(MaskSpec::causal_window(2), 5, 5);
    for (i, keys) in want.iter().enumerate() {
        assert_slice_close(&rows[i], &uniform_row(5, keys), 1e-15);
    }

    // Window (None, 0) is causal; window (2, None) with sq = 3 < sk = 6 (offset 3): row i sees
    // keys from i + 1 on.
    let (rows, _) = visible_sets(MaskSpec::sliding_window(Some(2), None), 3, 6);
    let want: [&[usize]; 3] = [&[1, 2, 3, 4, 5], &[2, 3, 4, 5], &[3, 4, 5]];
    for (i, keys) in want.iter().enumerate() {
        assert_slice_close(&rows[i], &uniform_row(6, keys), 1e-15);
    }
    assert_eq!(
        visible_sets(MaskSpec::sliding_window(None, Some(0)), 4, 4),
        visible_sets(MaskSpec::causal(), 4, 4)
    );
}

#[test]
fn grouped_query_heads_read_their_kv_head() {
    // 4 query heads over 2 kv heads: heads 0, 1 read kv head 0 and heads 2, 3 read kv head 1.
    // One key per kv head, so out = that head's v, and lse = scale * q . k of that head.
    let s = shape(1, 1, 1, 4, 2, 2);
    let q = [1.0, 2.0].repeat(4);
    let k = [1.0, 0.0, 0.0, 1.0];
    let v = [10.0, 11.0, 20.0, 21.0];
    let r = attention_f64(&s, &q, &k, &v, &MaskSpec::none(), 1.0).unwrap();
    assert_eq!(r.out, [10.0, 11.0, 10.0, 11.0, 20.0, 21.0, 20.0, 21.0]);
    assert_slice_close(&r.lse, &[1.0, 1.0, 2.0, 2.0], 1e-15);

    // Multi-query (one kv head) over a batch of two: each batch entry reads its own k, v.
    let s = shape(2, 1, 1, 3, 1, 1);
    let r = attention_f64(
        &s,
        &[1.0; 6],
        &[1.0, 3.0],
        &[5.0, 7.0],
        &MaskSpec::none(),
        1.0,
    )
    .unwrap();
    assert_eq!(r.out, [5.0, 5.0, 5.0, 7.0, 7.0, 7.0]);
    assert_slice_close(&r.lse, &[1.0, 1.0, 1.0, 3.0, 3.0, 3.0], 1e-15);
}

#[test]
fn lse_layout_is_batch_head_query() {
    // b = 1, sq = 2, hq = 2, one key: lse[h * sq + i] = q[i, h] . k.
    let s = shape(1, 2, 1, 2, 1, 1);
    // q is [sq, hq, d]: (i=0,h=0)=1, (0,1)=2, (1,0)=3, (1,1)=4.
    let r = attention_f64(
        &s,
        &[1.0, 2.0, 3.0, 4.0],
        &[1.0],
        &[9.0],
        &MaskSpec::none(),
        1.0,
    )
    .unwrap();
    assert_slice_close(&r.lse, &[1.0, 3.0, 2.0, 4.0], 1e-15);
}

#[test]
fn bad_lengths_and_head_ratios_are_typed_errors() {
    let s = shape(1, 2, 3, 2, 1, 4);
    let q = vec![0.0; 2 * 2 * 4];
    let kv = vec![0.0; 3 * 4];
    let m = MaskSpec::none();
    assert!(attention_f64(&s, &q, &kv, &kv, &m, 1.0).is_ok());
    assert!(matches!(
        attention_f64(&s, &q[1..], &kv, &kv, &m, 1.0),
        Err(Error::InvalidArgument { arg: "q.len", .. })
    ));
    assert!(matches!(
        attention_f64(&s, &q, &kv[1..], &kv, &m, 1.0),
        Err(Error::InvalidArgument { arg: "k.len", .. })
    ));
    assert!(matches!(
        attention_f64(&s, &q, &kv, &[0.0; 13], &m, 1.0),
        Err(Error::InvalidArgument { arg: "v.len", .. })
    ));
    let odd = shape(1, 2, 3, 3, 2, 4);
    assert!(matches!(
        attention_f64(&odd, &[0.0; 24], &[0.0; 24], &[0.0; 24], &m, 1.0),
        Err(Error::HeadsNotDivisible {
            heads_q: 3,
            heads_kv: 2
        })
    ));
    let none = shape(1, 2, 3, 2, 0, 4);
    assert!(matches!(
        attention_f64(&none, &q, &[], &[], &m, 1.0),
        Err(Error::ZeroSized { arg: "k", .. })
    ));
    let huge = shape(usize::MAX, 2, 3, 2, 1, 4);
    assert!(matches!(
        attention_f64(&huge, &q, &kv, &kv, &m, 1.0),
        Err(Error::InvalidArgument { .. })
    ));
    let lq = vec![bf16::ZERO; 15];
    let lkv = vec![bf16::ZERO; 12];
    assert!(matches!(
        attention_lowp(&s, &lq, &lkv, &lkv, &m, 1.0),
        Err(Error::InvalidArgument { arg: "q.len", .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// Properties.

#[path = "support/rng.rs"]
mod rng;
use rng::Rng;

fn window() -> impl Strategy<Value = Option<u32>> {
    prop_oneof![
        Just(None),
        Just(Some(0)),
        (1u32..=3).prop_map(Some),
        Just(Some(1000)),
    ]
}

fn mask() -> impl Strategy<Value = MaskSpec> {
    (any::<bool>(), window(), window()).prop_map(|(causal, left, right)| MaskSpec {
        sink_tokens: 0,
        causal,
        window_left: left,
        window_right: if causal {
            right.filter(|&r| r == 0)
        } else {
            right
        },
    })
}

fn ref_shape(max_seq: usize) -> impl Strategy<Value = RefShape> {
    (
        1usize..=2,
        1..=max_seq,
        1..=max_seq,
        1usize..=2,
        1usize..=3,
        1usize..=8,
    )
        .prop_map(|(b, sq, sk, hkv, group, d)| shape(b, sq, sk, hkv * group, hkv, d))
}

struct Problem {
    s: RefShape,
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
}

fn problem(s: RefShape, seed: u64) -> Problem {
    let mut rng = Rng(seed);
    let q = rng.vec(s.q_len().unwrap(), 1.0);
    let k = rng.vec(s.kv_len().unwrap(), 1.0);
    let v = rng.vec(s.kv_len().unwrap(), 2.0);
    Problem { s, q, k, v }
}

/// Visits every output row: (b, h, kv head, i, out row, lse).
fn rows<'a>(
    s: &RefShape,
    r: &'a RefOutput,
) -> impl Iterator<Item = (usize, usize, usize, usize, &'a [f64], f64)> + 'a {
    let s = *s;
    let group = s.heads_q / s.heads_kv;
    (0..s.batch).flat_map(move |b| {
        (0..s.heads_q).flat_map(move |h| {
            (0..s.seqlen_q).map(move |i| {
                let o = ((b * s.seqlen_q + i) * s.heads_q + h) * s.head_dim;
                let l = r.lse[(b * s.heads_q + h) * s.seqlen_q + i];
                (b, h, h / group, i, &r.out[o..o + s.head_dim], l)
            })
        })
    })
}

fn kv_row<'a>(s: &RefShape, x: &'a [f64], b: usize, j: usize, hk: usize) -> &'a [f64] {
    let o = ((b * s.seqlen_k + j) * s.heads_kv + hk) * s.head_dim;
    &x[o..o + s.head_dim]
}

fn q_row<'a>(s: &RefShape, x: &'a [f64], b: usize, i: usize, h: usize) -> &'a [f64] {
    let o = ((b * s.seqlen_q + i) * s.heads_q + h) * s.head_dim;
    &x[o..o + s.head_dim]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn output_is_a_convex_combination_of_visible_values(
        s in ref_shape(9), m in mask(), seed in any::<u64>(), scale in 0.1f64..3.0,
    ) {
        let p = problem(s, seed);
        let r = attention_f64(&s, &p.q, &p.k, &p.v, &m, scale).unwrap();
        prop_assert_eq!(r.out.len(), p.q.len());
        prop_assert_eq!(r.lse.len(), s.batch * s.heads_q * s.seqlen_q);
        for (b, _h, hk, i, out, lse) in rows(&s, &r) {
            let vis: Vec<usize> =
                (0..s.seqlen_k).filter(|&j| m.is_visible(s.seqlen_q, s.seqlen_k, i, j)).collect();
            if vis.is_empty() {
                prop_assert!(out.iter().all(|&x| x == 0.0));
                prop_assert_eq!(lse, f64::NEG_INFINITY);
                continue;
            }
            prop_assert!(lse.is_finite());
            for (c, &x) in out.iter().enumerate() {
                let col = vis.iter().map(|&j| kv_row(&s, &p.v, b, j, hk)[c]);
                let lo = col.clone().fold(f64::INFINITY, f64::min);
                let hi = col.fold(f64::NEG_INFINITY, f64::max);
                prop_assert!(
                    x >= lo - 1e-12 && x <= hi + 1e-12,
                    "row {} col {}: {} outside [{}, {}]", i, c, x, lo, hi
                );
            }
        }
    }

    #[test]
    fn permuting_keys_leaves_unmasked_output_unchanged(
        s in ref_shape(9), seed in any::<u64>(), perm_seed in any::<u64>(),
    ) {
        let p = problem(s, seed);
        // A random permutation of the keys (Fisher-Yates), applied to k and v alike.
        let mut perm: Vec<usize> = (0..s.seqlen_k).collect();
        let mut rng = Rng(perm_seed);
        for a in (1..perm.len()).rev() {
            perm.swap(a, (rng.next() % (a as u64 + 1)) as usize);
        }
        let row = s.heads_kv * s.head_dim;
        let shuffle = |x: &[f64]| -> Vec<f64> {
            let mut y = Vec::with_capacity(x.len());
            for b in 0..s.batch {
                for &j in &perm {
                    let o = (b * s.seqlen_k + j) * row;
                    y.extend_from_slice(&x[o..o + row]);
                }
            }
            y
        };
        let m = MaskSpec::none();
        let a = attention_f64(&s, &p.q, &p.k, &p.v, &m, 0.7).unwrap();
        let b = attention_f64(&s, &p.q, &shuffle(&p.k), &shuffle(&p.v), &m, 0.7).unwrap();
        for (x, y) in a.out.iter().zip(&b.out) {
            prop_assert!((x - y).abs() <= 1e-13, "{} vs {}", x, y);
        }
        for (x, y) in a.lse.iter().zip(&b.lse) {
            prop_assert!((x - y).abs() <= 1e-13, "{} vs {}", x, y);
        }
    }

    #[test]
    fn lse_is_the_log_of_summed_exponentials(
        s in ref_shape(9), m in mask(), seed in any::<u64>(), scale in 0.1f64..3.0,
    ) {
        let p = problem(s, seed);
        let r = attention_f64(&s, &p.q, &p.k, &p.v, &m, scale).unwrap();
        for (b, h, hk, i, out, lse) in rows(&s, &r) {
            // Straight from the definition: no max subtraction (scores are small here).
            let qi = q_row(&s, &p.q, b, i, h);
            let mut total = 0.0f64;
            let mut weighted = vec![0.0f64; s.head_dim];
            for j in 0..s.seqlen_k {
                if m.is_visible(s.seqlen_q, s.seqlen_k, i, j) {
                    let kj = kv_row(&s, &p.k, b, j, hk);
                    let score: f64 = scale * qi.iter().zip(kj).map(|(x, y)| x * y).sum::<f64>();
                    let e = score.exp();
                    total += e;
                    for (w, &x) in weighted.iter_mut().zip(kv_row(&s, &p.v, b, j, hk)) {
                        *w += e * x;
                    }
                }
            }
            let want = total.ln();
            if want == f64::NEG_INFINITY {
                prop_assert_eq!(lse, want);
            } else {
                prop_assert!(close(lse, want, 1e-12), "lse {} vs {}", lse, want);
            }
            for (&o, &w) in out.iter().zip(&weighted) {
                let w = if total > 0.0 { w / total } else { 0.0 };
                prop_assert!((o - w).abs() <= 1e-12, "out {} vs {}", o, w);
            }
        }
    }

    #[test]
    fn low_precision_reference_stays_near_f64(
        s in ref_shape(64), m in mask(), seed in any::<u64>(), sharp in 0.25f64..4.0,
    ) {
        let p = problem(s, seed);
        let scale = sharp / (s.head_dim as f64).sqrt();
        check_lowp::<f16>(&p, &m, scale, 2f64.powi(-11))?;
        check_lowp::<bf16>(&p, &m, scale, 2f64.powi(-8))?;
    }

    #[test]
    fn compare_accepts_the_naive_output_and_rejects_bad_ones(
        s in ref_shape(9), m in mask(), seed in any::<u64>(), pick in any::<u64>(),
    ) {
        let p = problem(s, seed);
        let (lq, lk, lv) = (round::<bf16>(&p.q), round::<bf16>(&p.k), round::<bf16>(&p.v));
        let (q, k, v) = (widen(&lq), widen(&lk), widen(&lv));
        let scale = 0.5f32;
        let r64 = attention_f64(&s, &q, &k, &v, &m, f64::from(scale)).unwrap();
        let low = attention_lowp(&s, &lq, &lk, &lv, &m, scale).unwrap();
        let low_lse: Vec<f32> = low.lse.iter().map(|&x| x as f32).collect();

        let own = compare(&low.out, Some(&low_lse), &r64, &low);
        prop_assert!(own.passes, "{}", own);
        // Rounding its own unrounded output costs the naive at most half an ulp per element;
        // its error before that counts the spread.
        let unrounded = max_abs(&low.unrounded, &r64.out);
        let with_spread = low
            .unrounded
            .iter()
            .zip(&r64.out)
            .zip(&low.spread)
            .map(|((a, b), w)| (a - b).abs() + w)
            .fold(0.0f64, f64::max);
        prop_assert_eq!(own.naive_abs_err, with_spread);
        let largest = low.out.iter().fold(0.0f64, |a, &x| a.max(x.abs()));
        prop_assert!(own.max_abs_err <= unrounded + half_ulp(DType::Bf16, largest));
        let exact_lse: Vec<f32> = r64.lse.iter().map(|&x| x as f32).collect();
        let exact = compare(&r64.out, Some(&exact_lse), &r64, &low);
        prop_assert!(exact.passes && exact.max_abs_err == 0.0, "{}", exact);

        let n = low.out.len();
        let at = (pick % n as u64) as usize;
        // An element's allowance is 2 e + 1e-5 plus half an ulp at its own magnitude, which a
        // deviation can push into the next binade (twice the largest half ulp of the answer):
        // three times the largest allowance is past it, whatever e is.
        let too_far = 3.0 * own.bound;
        let mut bad = low.out.clone();
        bad[at] = r64.out[at] + too_far;
        prop_assert!(!compare(&bad, None, &r64, &low).passes);
        bad[at] = r64.out[at] - too_far;
        prop_assert!(!compare(&bad, None, &r64, &low).passes);
        // Within the computed part of its allowance, an element passes at any magnitude.
        let near = 0.9 * (2.0 * own.naive_abs_err + longflash::reference::OUT_ABS_TOL);
        bad[at] = r64.out[at] + near;
        prop_assert!(compare(&bad, None, &r64, &low).passes);
        bad[at] = r64.out[at] - near;
        prop_assert!(compare(&bad, None, &r64, &low).passes);
        let mut nan = low.out.clone();
        nan[at] = f64::NAN;
        let c = compare(&nan, Some(&low_lse), &r64, &low);
        prop_assert!(!c.passes && c.max_abs_err.is_nan());

        let row = (pick / n as u64 % low_lse.len() as u64) as usize;
        let mut l = low_lse.clone();
        l[row] = f32::NAN;
        prop_assert!(!compare(&low.out, Some(&l), &r64, &low).passes);
        let mut l = low_lse.clone();
        if r64.lse[row].is_finite() {
            let b = r64.lse[row];
            l[row] = (b + 2e-3 * b.abs().max(1.0)) as f32;
            prop_assert!(!compare(&low.out, Some(&l), &r64, &low).passes);
            l[row] = (b - 0.5e-3 * b.abs().max(1.0)) as f32;
            prop_assert!(compare(&low.out, Some(&l), &r64, &low).passes);
            l[row] = f32::NEG_INFINITY;
            prop_assert!(!compare(&low.out, Some(&l), &r64, &low).passes);
        } else {
            l[row] = 0.0;
            prop_assert!(!compare(&low.out, Some(&l), &r64, &low).passes);
            l[row] = f32::MIN;
            prop_assert!(!compare(&low.out, Some(&l), &r64, &low).passes);
        }
    }
}

fn max_abs(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

fn round<T: Element>(x: &[f64]) -> Vec<T> {
    x.iter().map(|&x| T::from_f32(x as f32)).collect()
}

fn widen<T: Element>(x: &[T]) -> Vec<f64> {
    x.iter().map(|&x| f64::from(x.to_f32())).collect()
}

/// The naive low-precision output differs from the f64 output of the same (rounded) inputs by
/// at most `2u * max|v|` (`u` the unit roundoff of `T`: one rounding of each probability and
/// one of the output), plus f32 arithmetic and f16 subnormals, well under `1e-5`.
fn check_lowp<T: Element>(
    p: &Problem,
    m: &MaskSpec,
    scale: f64,
    unit_roundoff: f64,
) -> Result<(), TestCaseError> {
    let s = p.s;
    let (lq, lk, lv) = (round::<T>(&p.q), round::<T>(&p.k), round::<T>(&p.v));
    let (q, k, v) = (widen(&lq), widen(&lk), widen(&lv));
    let scale32 = scale as f32;
    let r64 = attention_f64(&s, &q, &k, &v, m, f64::from(scale32)).unwrap();
    let low = attention_lowp(&s, &lq, &lk, &lv, m, scale32).unwrap();
    let vmax = v.iter().fold(0.0f64, |a, &x| a.max(x.abs()));
    let bound = 2.0 * unit_roundoff * vmax + 1e-5;
    for (idx, (&a, &b)) in low.out.iter().zip(&r64.out).enumerate() {
        prop_assert!(
            (a - b).abs() <= bound,
            "{:?} element {}: lowp {} vs f64 {} (bound {})",
            T::DTYPE,
            idx,
            a,
            b,
            bound
        );
        // The output is rounded to T.
        prop_assert_eq!(f64::from(T::from_f32(a as f32).to_f32()), a);
    }
    for (&a, &b) in low.lse.iter().zip(&r64.lse) {
        if b == f64::NEG_INFINITY {
            prop_assert_eq!(a, b);
        } else {
            prop_assert!(close(a, b, 1e-5), "{:?} lse {} vs {}", T::DTYPE, a, b);
        }
    }
    Ok(())
}

/// For 16-bit inputs used as given, the naive implementation's LSE is within f32 rounding of the
/// f64 one, so the LSE bound of `compare` stays the fixed 1e-3 (the 2x-naive term only matters
/// where the score's inputs are themselves rounded, as with rotated q and k).
#[test]
fn lse_bound_is_the_fixed_tolerance_for_plain_inputs() {
    use half::bf16;
    use longflash::reference::LSE_REL_TOL;
    let shape = RefShape {
        batch: 1,
        seqlen_q: 200,
        seqlen_k: 300,
        heads_q: 2,
        heads_kv: 1,
        head_dim: 64,
    };
    let mut x = 0x9e37_79b9u64;
    let mut gen = |n: usize| -> Vec<bf16> {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                bf16::from_f64((x >> 11) as f64 / (1u64 << 53) as f64 * 6.0 - 3.0)
            })
            .collect()
    };
    let (q, k, v) = (gen(200 * 2 * 64), gen(300 * 64), gen(300 * 64));
    let wide = |t: &[bf16]| t.iter().map(|x| x.to_f64()).collect::<Vec<_>>();
    for mask in [MaskSpec::none(), MaskSpec::causal()] {
        let r64 = attention_f64(&shape, &wide(&q), &wide(&k), &wide(&v), &mask, 0.125).unwrap();
        let lowp = attention_lowp(&shape, &q, &k, &v, &mask, 0.125).unwrap();
        let c = compare(&lowp.out, None, &r64, &lowp);
        assert!(c.lse_bound < LSE_REL_TOL * 1.001, "bound {}", c.lse_bound);
    }
}
