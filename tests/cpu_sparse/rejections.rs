//! Rejections: builder parameters, shapes and element masks that disagree, malformed CSR, masks for other problems; and merged references.

use super::*;

fn arg_of(e: Error) -> &'static str {
    match e {
        Error::InvalidArgument { arg, .. } => arg,
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

#[test]
fn builders_reject_nonsense_parameters() {
    let s = shape(1, 2, 500, 700);
    let cases: Vec<(&str, Result<BlockMask, Error>)> = vec![
        ("strided.stride", patterns::strided(s, 2, 0)),
        ("strided.local", patterns::strided(s, 0, 2)),
        ("fixed.block", patterns::fixed(s, 0, 1)),
        ("fixed.summary", patterns::fixed(s, 4, 0)),
        ("fixed.summary", patterns::fixed(s, 4, 5)),
        ("dilated.segment", patterns::dilated(s, 0, 1)),
        ("dilated.segment", patterns::dilated(s, usize::MAX, 1)),
        ("dilated.ratio", patterns::dilated(s, 4, 0)),
        ("dilated.ratio", patterns::dilated(s, 4, 3)),
        ("dilated.ratio", patterns::dilated(s, 4, 8)),
        ("sinks_window.window", patterns::sinks_window(s, 4, 0)),
        (
            "sinks_window.window",
            patterns::sinks_window(s, 4, u32::MAX),
        ),
        ("sinks_window.sinks", patterns::sinks_window(s, u32::MAX, 8)),
        (
            "sliding_window.left",
            patterns::sliding_window(s, Some(u32::MAX), None),
        ),
        (
            "sliding_window.right",
            patterns::sliding_window(s, None, Some(1 << 31)),
        ),
        (
            "causal_sliding_window.left",
            patterns::causal_sliding_window(s, 1 << 31),
        ),
        (
            "longformer.global_tokens",
            patterns::longformer(s, 8, &[3, 700]),
        ),
        (
            "longformer.global_tokens",
            patterns::longformer(s, 8, &[usize::MAX]),
        ),
    ];
    for (want, got) in cases {
        assert_eq!(arg_of(got.expect_err(want)), want);
    }
    // The largest accepted values.
    patterns::sinks_window(s, i32::MAX as u32, 1 << 31).unwrap();
    patterns::sliding_window(s, Some(i32::MAX as u32), Some(i32::MAX as u32)).unwrap();
    patterns::longformer(s, u32::MAX, &[0, 699, 699]).unwrap();
    patterns::fixed(s, 4, 4).unwrap();
    patterns::dilated(s, 4, 4).unwrap();
    // Huge counts saturate instead of overflowing: everything is global / in the band.
    let all = patterns::dense(s).unwrap();
    assert_eq!(
        patterns::bigbird(s, usize::MAX, 0, 0, 1, false)
            .unwrap()
            .nnz(),
        all.nnz()
    );
    assert_eq!(
        patterns::bigbird(s, 0, usize::MAX, 0, 1, false)
            .unwrap()
            .nnz(),
        all.nnz()
    );
    assert_eq!(
        patterns::bigbird(s, 0, 0, usize::MAX, 1, false)
            .unwrap()
            .nnz(),
        all.nnz()
    );
    let tall = shape(1, 1, 5000, 64);
    assert_eq!(
        patterns::bigbird(tall, 0, usize::MAX, 0, 1, false)
            .unwrap()
            .nnz(),
        patterns::dense(tall).unwrap().nnz()
    );
    assert_eq!(
        patterns::strided(s, usize::MAX, usize::MAX).unwrap(),
        patterns::causal(s).unwrap()
    );
    // A zero-sized shape is a typed error from every builder.
    let z = shape(1, 0, 10, 10);
    for r in [
        patterns::dense(z),
        patterns::causal(z),
        patterns::strided(z, 1, 1),
        patterns::bigbird(z, 1, 1, 1, 1, false),
        patterns::longformer(z, 1, &[]),
        patterns::dilated(z, 1, 1),
    ] {
        assert!(
            matches!(
                r,
                Err(Error::ZeroSized {
                    arg: "mask",
                    dim: "heads"
                })
            ),
            "{r:?}"
        );
    }
}

#[test]
fn union_and_intersection_reject_other_shapes_and_element_masks() {
    let s = shape(1, 2, 300, 300);
    let a = patterns::causal(s).unwrap();
    let others = [
        patterns::dense(s).unwrap(),
        patterns::causal(shape(1, 1, 300, 300)).unwrap(),
        patterns::causal(shape(2, 2, 300, 300)).unwrap(),
        patterns::causal(shape(1, 2, 301, 300)).unwrap(),
        patterns::causal(shape(1, 2, 300, 299)).unwrap(),
        patterns::causal_sliding_window(s, 10).unwrap(),
    ];
    for o in &others {
        assert_eq!(arg_of(a.union(o).unwrap_err()), "other");
        assert_eq!(arg_of(a.intersection(o).unwrap_err()), "other");
        assert_eq!(arg_of(o.union(&a).unwrap_err()), "other");
    }
}

/// A well-formed CSR mask for a 1 x 2 x 256 x 200 problem (2 query blocks, 4 key blocks).
fn csr_shape() -> MaskShape {
    shape(1, 2, 256, 200)
}

#[test]
fn from_csr_accepts_a_well_formed_mask() {
    let s = csr_shape();
    let m = BlockMask::from_csr(
        s,
        MaskSpec::causal(),
        vec![0, 2, 3, 3, 5],
        vec![0, 3, 1, 0, 2],
    )
    .unwrap();
    assert_eq!(m.row(0, 0, 0), [0, 3]);
    assert_eq!(m.row(0, 1, 0), [] as [i32; 0]);
    assert_eq!(m.row(0, 1, 1), [0, 2]);
    // Block (0, 3) is listed but causally hidden: kept, and nothing in it is visible.
    let want = |_: usize, h: usize, i: usize, j: usize| {
        let listed: &[(usize, usize)] = if h == 0 {
            &[(0, 0), (0, 3), (1, 1)]
        } else {
            &[(1, 0), (1, 2)]
        };
        listed.contains(&(i / 128, j / 64)) && j as i64 <= pos(&s, i)
    };
    check_mask(&m, s, &want, false);
}

#[test]
fn from_csr_rejects_each_malformed_class() {
    let s = csr_shape();
    let e = MaskSpec::causal();
    let cases: [(&str, &str, Vec<i32>, Vec<i32>); 10] = [
        (
            "short offsets",
            "row_offsets.len",
            vec![0, 2, 3, 5],
            vec![0, 3, 1, 0, 2],
        ),
        (
            "long offsets",
            "row_offsets.len",
            vec![0, 2, 3, 3, 5, 5],
            vec![0, 3, 1, 0, 2],
        ),
        (
            "first offset",
            "row_offsets[0]",
            vec![1, 2, 3, 3, 5],
            vec![0, 3, 1, 0, 2],
        ),
        (
            "decreasing",
            "row_offsets",
            vec![0, 3, 2, 3, 5],
            vec![0, 3, 1, 0, 2],
        ),
        (
            "negative",
            "row_offsets",
            vec![0, -1, 3, 3, 5],
            vec![0, 3, 1, 0, 2],
        ),
        (
            "last != nnz",
            "row_offsets[rows]",
            vec![0, 2, 3, 3, 4],
            vec![0, 3, 1, 0, 2],
        ),
        (
            "index too large",
            "col_indices",
            vec![0, 2, 3, 3, 5],
            vec![0, 4, 1, 0, 2],
        ),
        (
            "negative index",
            "col_indices",
            vec![0, 2, 3, 3, 5],
            vec![0, 3, -1, 0, 2],
        ),
        (
            "unsorted",
            "col_indices",
            vec![0, 2, 3, 3, 5],
            vec![3, 0, 1, 0, 2],
        ),
        (
            "duplicated",
            "col_indices",
            vec![0, 2, 3, 3, 5],
            vec![0, 3, 1, 2, 2],
        ),
    ];
    for (what, arg, offsets, cols) in cases {
        let err = BlockMask::from_csr(s, e, offsets, cols).expect_err(what);
        assert_eq!(arg_of(err), arg, "{what}");
    }
    // Too few column indices for the last offset, and an empty shape.
    assert_eq!(
        arg_of(BlockMask::from_csr(s, e, vec![0, 2, 3, 3, 5], vec![0, 3, 1, 0]).unwrap_err()),
        "row_offsets[rows]"
    );
    assert!(matches!(
        BlockMask::from_csr(shape(1, 1, 0, 10), e, vec![0], vec![]),
        Err(Error::ZeroSized { .. })
    ));
    // The dense-layout builder checks its length.
    assert_eq!(
        arg_of(BlockMask::from_dense_layout(s, e, &[true; 15]).unwrap_err()),
        "layout.len"
    );
}

#[test]
fn check_for_rejects_other_problems() {
    let per_head = patterns::causal(shape(2, 3, 300, 500)).unwrap();
    per_head.check_for(2, 3, 300, 500).unwrap();
    let mismatch = |r: Result<(), Error>| match r {
        Err(Error::ShapeMismatch { arg, .. }) => arg,
        other => panic!("expected ShapeMismatch, got {other:?}"),
    };
    assert_eq!(mismatch(per_head.check_for(1, 3, 300, 500)), "mask.batch");
    assert_eq!(mismatch(per_head.check_for(3, 3, 300, 500)), "mask.batch");
    assert_eq!(mismatch(per_head.check_for(2, 1, 300, 500)), "mask.heads");
    assert_eq!(mismatch(per_head.check_for(2, 6, 300, 500)), "mask.heads");
    assert_eq!(
        mismatch(per_head.check_for(2, 3, 301, 500)),
        "mask.seqlen_q"
    );
    assert_eq!(
        mismatch(per_head.check_for(2, 3, 300, 499)),
        "mask.seqlen_k"
    );
    // A shared mask fits any batch and head count, but only its own lengths.
    let shared = patterns::causal(shape(1, 1, 300, 500)).unwrap();
    shared.check_for(7, 5, 300, 500).unwrap();
    assert_eq!(mismatch(shared.check_for(7, 5, 500, 300)), "mask.seqlen_q");
    assert_eq!(mismatch(shared.check_for(7, 5, 300, 300)), "mask.seqlen_k");
}

/// Two references over complementary block sets, merged by their LSEs, equal the reference over
/// their union (the identity `Attention::merge` relies on), and the merge is symmetric.
#[test]
fn merging_references_of_disjoint_masks_equals_the_union() {
    use longflash::reference::{attention_f64, merge, RefShape};
    let (b, hq, hkv, sq, sk, d) = (2, 4, 2, 300, 450, 16);
    let shape = MaskShape {
        batch: b,
        heads: hq,
        seqlen_q: sq,
        seqlen_k: sk,
    };
    let element = MaskSpec::causal_window(200);
    let pick = |b: usize, h: usize, qb: usize, kb: usize| (b * 7 + h * 5 + qb * 3 + kb) % 3 == 0;
    let a = BlockMask::from_fn(shape, element, pick).unwrap();
    let c = BlockMask::from_fn(shape, element, |b, h, qb, kb| !pick(b, h, qb, kb)).unwrap();
    let rs = RefShape {
        batch: b,
        seqlen_q: sq,
        seqlen_k: sk,
        heads_q: hq,
        heads_kv: hkv,
        head_dim: d,
    };
    let mut x = 0x1234_5678u64;
    let mut gen = |n: usize| -> Vec<f64> {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
            })
            .collect()
    };
    let (q, k, v) = (
        gen(b * sq * hq * d),
        gen(b * sk * hkv * d),
        gen(b * sk * hkv * d),
    );
    let ra = attention_f64(&rs, &q, &k, &v, &a, 0.3).unwrap();
    let rc = attention_f64(&rs, &q, &k, &v, &c, 0.3).unwrap();
    let union = attention_f64(&rs, &q, &k, &v, &element, 0.3).unwrap();
    for m in [merge(&rs, &ra, &rc), merge(&rs, &rc, &ra)] {
        for (x, y) in m.out.iter().zip(&union.out) {
            assert!((x - y).abs() < 1e-12, "{x} vs {y}");
        }
        for (x, y) in m.lse.iter().zip(&union.lse) {
            assert!(x == y || (x - y).abs() < 1e-12, "{x} vs {y}");
        }
    }
}
