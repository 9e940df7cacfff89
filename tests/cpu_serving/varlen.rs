//! Variable-length (packed) batches: each sequence is the dense reference's on it alone, and
//! malformed descriptions are typed rejections.

use super::*;

fn prefix_sums(lens: &[usize]) -> Vec<i32> {
    let mut cu = vec![0i32];
    for &n in lens {
        cu.push(cu.last().unwrap() + n as i32);
    }
    cu
}

/// The packed `[heads_q, total_q]` LSE of a dense `[batch, heads_q, seqlen_q]` one whose
/// sequences all have `seqlen_q` queries.
fn pack_lse(lse: &[f64], batch: usize, heads_q: usize, seqlen_q: usize) -> Vec<f64> {
    let total = batch * seqlen_q;
    let mut packed = vec![f64::NAN; heads_q * total];
    for b in 0..batch {
        for h in 0..heads_q {
            for i in 0..seqlen_q {
                packed[h * total + b * seqlen_q + i] = lse[(b * heads_q + h) * seqlen_q + i];
            }
        }
    }
    packed
}

/// The output of one sequence of a packed result, as the dense reference lays it out for batch
/// 1: its rows of `out` (and `unrounded`, `spread`) and its columns of the `[heads_q, total_q]` LSE.
fn unpack_sequence(v: &VarlenShape, r: &RefOutput, b: usize) -> RefOutput {
    let (sq, _) = v.seqlens(b);
    let q0 = v.cu_seqlens_q[b] as usize;
    let row = v.heads_q * v.head_dim;
    let rows = |x: &Vec<f64>| {
        if x.is_empty() {
            Vec::new()
        } else {
            x[q0 * row..(q0 + sq) * row].to_vec()
        }
    };
    let total = v.total_q();
    let lse = (0..v.heads_q)
        .flat_map(|h| r.lse[h * total + q0..h * total + q0 + sq].to_vec())
        .collect();
    RefOutput {
        out: rows(&r.out),
        lse,
        unrounded: rows(&r.unrounded),
        spread: rows(&r.spread),
        dtype: r.dtype,
    }
}

/// A packed problem over the given (queries, keys) per sequence: the shape, and q, k, v in `T`
/// and widened.
struct Packed<T> {
    shape: VarlenShape,
    low: [Vec<T>; 3],
    wide: [Vec<f64>; 3],
}

fn packed<T: Element>(
    lens: &[(usize, usize)],
    heads_q: usize,
    heads_kv: usize,
    head_dim: usize,
    seed: u64,
) -> Packed<T> {
    let shape = VarlenShape {
        cu_seqlens_q: prefix_sums(&lens.iter().map(|l| l.0).collect::<Vec<_>>()),
        cu_seqlens_k: prefix_sums(&lens.iter().map(|l| l.1).collect::<Vec<_>>()),
        heads_q,
        heads_kv,
        head_dim,
    };
    let mut rng = Rng(seed);
    let (lq, q) = data::<T>(&mut rng, shape.total_q() * heads_q * head_dim, 1.0);
    let (lk, k) = data::<T>(&mut rng, shape.total_k() * heads_kv * head_dim, 1.0);
    let (lv, v) = data::<T>(&mut rng, shape.total_k() * heads_kv * head_dim, 2.0);
    Packed {
        shape,
        low: [lq, lk, lv],
        wide: [q, k, v],
    }
}

/// The dense reference (f64 and low precision) of sequence `b` of a packed problem, run on
/// that sequence alone.
fn dense_sequence<T: Element>(
    p: &Packed<T>,
    b: usize,
    mask: &MaskSpec,
    scale: f32,
) -> (RefOutput, RefOutput) {
    let v = &p.shape;
    let s = v.ref_shape(b);
    let (q0, k0) = (v.cu_seqlens_q[b] as usize, v.cu_seqlens_k[b] as usize);
    let (qr, kr) = (v.heads_q * v.head_dim, v.heads_kv * v.head_dim);
    let qs = q0 * qr..(q0 + s.seqlen_q) * qr;
    let ks = k0 * kr..(k0 + s.seqlen_k) * kr;
    let [q, k, vv] = &p.wide;
    let r64 = attention_f64(
        &s,
        &q[qs.clone()],
        &k[ks.clone()],
        &vv[ks.clone()],
        mask,
        f64::from(scale),
    )
    .unwrap();
    let [lq, lk, lv] = &p.low;
    let low = attention_lowp(&s, &lq[qs], &lk[ks.clone()], &lv[ks], mask, scale).unwrap();
    (r64, low)
}

/// Checks every sequence of a packed problem against the dense reference on that sequence
/// alone, in f64 and in `T`; sequences without keys must give 0 and `-inf`.
fn check_varlen<T: Element>(p: &Packed<T>, mask: &MaskSpec, scale: f32) -> Result<(), String> {
    let v = &p.shape;
    let [q, k, vv] = &p.wide;
    let r64 =
        varlen_attention_f64(v, q, k, vv, mask, f64::from(scale)).map_err(|e| e.to_string())?;
    let [lq, lk, lv] = &p.low;
    let low = varlen_attention_lowp(v, lq, lk, lv, mask, scale).map_err(|e| e.to_string())?;
    if r64.out.len() != q.len() || r64.lse.len() != v.heads_q * v.total_q() {
        return Err("packed output of the wrong size".into());
    }
    if low.dtype != Some(T::DTYPE) || low.unrounded.len() != q.len() {
        return Err("low-precision output without its dtype or unrounded values".into());
    }
    for b in 0..v.batch() {
        let (want64, want_low) = dense_sequence(p, b, mask, scale);
        for (got, want, what) in [(&r64, &want64, "f64"), (&low, &want_low, "lowp")] {
            if let Some(d) = same_output(&unpack_sequence(v, got, b), want) {
                return Err(format!("sequence {b} ({:?}), {what}: {d}", v.seqlens(b)));
            }
        }
        if v.seqlens(b).1 == 0 {
            let got = unpack_sequence(v, &r64, b);
            if got.out.iter().any(|&x| x != 0.0) || got.lse.iter().any(|&l| l != f64::NEG_INFINITY)
            {
                return Err(format!("sequence {b} has no key but a nonzero output"));
            }
        }
    }
    Ok(())
}

#[test]
fn equal_lengths_match_the_dense_batched_reference() {
    let masks = [
        MaskSpec::none(),
        MaskSpec::causal(),
        MaskSpec::sliding_window(Some(2), Some(1)),
        MaskSpec::causal_window(3),
    ];
    let batch = 3;
    for (sq, sk) in [(5, 7), (6, 3), (1, 9)] {
        for (heads_q, heads_kv) in [(4, 2), (4, 1), (2, 2)] {
            for (m, mask) in masks.iter().enumerate() {
                let d = 8;
                let dense = RefShape {
                    batch,
                    seqlen_q: sq,
                    seqlen_k: sk,
                    heads_q,
                    heads_kv,
                    head_dim: d,
                };
                // Equal lengths: the packed arrays are the dense bshd arrays as they stand.
                let p = packed::<bf16>(&[(sq, sk); 3], heads_q, heads_kv, d, (sq * 31 + m) as u64);
                let ctx = format!("sq {sq} sk {sk} heads {heads_q}/{heads_kv} {mask:?}");
                let [q, k, v] = &p.wide;
                let mut want = attention_f64(&dense, q, k, v, mask, 0.4).unwrap();
                want.lse = pack_lse(&want.lse, batch, heads_q, sq);
                let got = varlen_attention_f64(&p.shape, q, k, v, mask, 0.4).unwrap();
                assert_same(&got, &want, &ctx);

                let [lq, lk, lv] = &p.low;
                let mut want = attention_lowp(&dense, lq, lk, lv, mask, 0.4).unwrap();
                want.lse = pack_lse(&want.lse, batch, heads_q, sq);
                let got = varlen_attention_lowp(&p.shape, lq, lk, lv, mask, 0.4).unwrap();
                assert_same(&got, &want, &ctx);

                let (lq, lk, lv) = (round::<f16>(q), round::<f16>(k), round::<f16>(v));
                let mut want = attention_lowp(&dense, &lq, &lk, &lv, mask, 0.4).unwrap();
                want.lse = pack_lse(&want.lse, batch, heads_q, sq);
                let got = varlen_attention_lowp(&p.shape, &lq, &lk, &lv, mask, 0.4).unwrap();
                assert_same(&got, &want, &ctx);
            }
        }
    }
}

#[test]
fn varlen_sequences_are_attended_independently() {
    // Empty sequences on both sides, a single key, primes, and more queries than keys.
    let lens = [
        (0, 4),
        (1, 0),
        (3, 1),
        (1, 1),
        (7, 7),
        (0, 0),
        (2, 13),
        (5, 2),
    ];
    let p = packed::<bf16>(&lens, 4, 2, 16, 7);
    for mask in [MaskSpec::none(), MaskSpec::causal()] {
        check_varlen(&p, &mask, 0.25).unwrap();
    }

    let [q, k, v] = &p.wide;
    let s = &p.shape;
    let r = varlen_attention_f64(s, q, k, v, &MaskSpec::none(), 0.25).unwrap();
    // Sequence 1 has a query and no key: output 0, LSE -inf, for every head.
    let one = unpack_sequence(s, &r, 1);
    assert!(one.out.iter().all(|&x| x == 0.0));
    assert!(one.lse.iter().all(|&l| l == f64::NEG_INFINITY));
    // Sequence 3 has one query and one key (packed key row 5): its output is that key's value
    // row and its LSE that key's scaled score, per head; nothing of the other sequences leaks in.
    let (row_q, row_k) = (s.cu_seqlens_q[3] as usize, s.cu_seqlens_k[3] as usize);
    assert_eq!((row_q, row_k), (4, 5));
    let d = s.head_dim;
    for h in 0..s.heads_q {
        let hk = h / 2;
        let qo = (row_q * s.heads_q + h) * d;
        let ko = (row_k * s.heads_kv + hk) * d;
        assert_eq!(&r.out[qo..qo + d], &v[ko..ko + d], "head {h}");
        let dot: f64 = (0..d).map(|c| q[qo + c] * k[ko + c]).sum();
        let lse = r.lse[h * s.total_q() + row_q];
        assert!(
            (lse - 0.25 * dot).abs() <= 1e-14,
            "head {h}: {lse} vs {}",
            0.25 * dot
        );
    }

    // The packed outputs go through `compare` as they stand: the naive implementation passes.
    let [lq, lk, lv] = &p.low;
    for mask in [MaskSpec::none(), MaskSpec::causal()] {
        let r64 = varlen_attention_f64(s, q, k, v, &mask, 0.25).unwrap();
        let low = varlen_attention_lowp(s, lq, lk, lv, &mask, 0.25).unwrap();
        let lse: Vec<f32> = low.lse.iter().map(|&x| x as f32).collect();
        let c = compare(&low.out, Some(&lse), &r64, &low);
        assert!(c.passes, "{c}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn each_varlen_sequence_matches_the_dense_reference_on_it_alone(
        lens in prop::collection::vec((seq_len(), seq_len()), 1..=6),
        (heads_q, heads_kv) in heads(),
        d in prop::sample::select(vec![8usize, 16]),
        m in mask(),
        seed in any::<u64>(),
        use_f16 in any::<bool>(),
    ) {
        let scale = 1.0 / (d as f32).sqrt();
        let r = if use_f16 {
            check_varlen(&packed::<f16>(&lens, heads_q, heads_kv, d, seed), &m, scale)
        } else {
            check_varlen(&packed::<bf16>(&lens, heads_q, heads_kv, d, seed), &m, scale)
        };
        prop_assert!(r.is_ok(), "{:?}", r);
    }
}

#[test]
fn varlen_rejects_malformed_descriptions() {
    let good = VarlenShape {
        cu_seqlens_q: vec![0, 2, 5],
        cu_seqlens_k: vec![0, 3, 3],
        heads_q: 4,
        heads_kv: 2,
        head_dim: 8,
    };
    good.validate().unwrap();
    assert_eq!((good.batch(), good.total_q(), good.total_k()), (2, 5, 3));
    assert_eq!((good.seqlens(0), good.seqlens(1)), ((2, 3), (3, 0)));
    let with = |f: &dyn Fn(&mut VarlenShape)| {
        let mut s = good.clone();
        f(&mut s);
        s
    };
    let cases: Vec<(&str, VarlenShape)> = vec![
        ("cu_seqlens_q.len", with(&|s| s.cu_seqlens_q = vec![0])),
        ("cu_seqlens_q.len", with(&|s| s.cu_seqlens_q.clear())),
        ("cu_seqlens_k.len", with(&|s| s.cu_seqlens_k = vec![0, 3])),
        ("cu_seqlens_q[0]", with(&|s| s.cu_seqlens_q[0] = 1)),
        ("cu_seqlens_k[0]", with(&|s| s.cu_seqlens_k = vec![2, 3, 4])),
        ("cu_seqlens_q", with(&|s| s.cu_seqlens_q = vec![0, 5, 2])),
        ("cu_seqlens_k", with(&|s| s.cu_seqlens_k = vec![0, 3, 1])),
        ("cu_seqlens_q", with(&|s| s.cu_seqlens_q = vec![0, -1, 5])),
        ("cu_seqlens_k", with(&|s| s.cu_seqlens_k = vec![0, -3, -3])),
        ("heads_q", with(&|s| s.heads_q = 3)),
        ("heads_q", with(&|s| s.heads_q = 0)),
        ("heads_kv", with(&|s| s.heads_kv = 0)),
        ("head_dim", with(&|s| s.head_dim = 0)),
        ("shape", with(&|s| s.heads_q = usize::MAX - 1)),
    ];
    for (arg, s) in &cases {
        assert_eq!(arg_of(s.validate()), *arg, "{s:?}");
        // The attention functions validate first, whatever the slices.
        let x = vec![0.0f64; 40];
        assert_eq!(
            arg_of(varlen_attention_f64(s, &x, &x, &x, &MaskSpec::none(), 1.0)),
            *arg
        );
        let y = vec![bf16::ZERO; 40];
        assert_eq!(
            arg_of(varlen_attention_lowp(s, &y, &y, &y, &MaskSpec::none(), 1.0)),
            *arg
        );
    }
    if let Err(Error::InvalidArgument { expected, .. }) = cases[7].1.validate() {
        assert!(expected.contains("non-negative"), "{expected}");
    }

    // Slices of the wrong length: q is 5 * 4 * 8 = 160 elements, k and v 3 * 2 * 8 = 48.
    let (q, kv) = (vec![0.0f64; 160], vec![0.0f64; 48]);
    let m = MaskSpec::none();
    varlen_attention_f64(&good, &q, &kv, &kv, &m, 1.0).unwrap();
    assert_eq!(
        arg_of(varlen_attention_f64(&good, &q[1..], &kv, &kv, &m, 1.0)),
        "q.len"
    );
    assert_eq!(
        arg_of(varlen_attention_f64(&good, &q, &q, &kv, &m, 1.0)),
        "k.len"
    );
    assert_eq!(
        arg_of(varlen_attention_f64(&good, &q, &kv, &kv[..47], &m, 1.0)),
        "v.len"
    );
    let (lq, lkv) = (round::<f16>(&q), round::<f16>(&kv));
    assert_eq!(
        arg_of(varlen_attention_lowp(&good, &lq, &lkv, &lq, &m, 1.0)),
        "v.len"
    );
}
