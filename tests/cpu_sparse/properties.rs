//! Property tests: every builder against its token-level definition, CSR invariants, exact full flags, union and intersection.

use super::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn dense_matches(s in shapes(2, 4)) {
        let m = patterns::dense(s).unwrap();
        check_mask(&m, s, &|_, _, _, _| true, true);
        prop_assert_eq!(m.nnz(), s.rows() * s.num_k_blocks());
        prop_assert_eq!(m.element_mask(), MaskSpec::none());
    }

    #[test]
    fn causal_matches(s in shapes(2, 4)) {
        let m = patterns::causal(s).unwrap();
        check_mask(&m, s, &|_, _, i, j| j as i64 <= pos(&s, i), true);
        prop_assert_eq!(m.element_mask(), MaskSpec::causal());
    }

    #[test]
    fn sliding_window_matches(s in shapes(2, 3), left in window_side(), right in window_side()) {
        let m = patterns::sliding_window(s, left, right).unwrap();
        let want = |_: usize, _: usize, i: usize, j: usize| {
            let (d, j) = (pos(&s, i), j as i64);
            left.is_none_or(|l| j >= d - l as i64) && right.is_none_or(|r| j <= d + r as i64)
        };
        check_mask(&m, s, &want, true);
    }

    #[test]
    fn causal_sliding_window_matches(s in shapes(2, 3), left in 0..=900u32) {
        let m = patterns::causal_sliding_window(s, left).unwrap();
        let want = |_: usize, _: usize, i: usize, j: usize| {
            let (d, j) = (pos(&s, i), j as i64);
            d - left as i64 <= j && j <= d
        };
        check_mask(&m, s, &want, true);
    }

    #[test]
    fn sinks_window_matches(s in shapes(2, 3), sinks in 0..=300u32, window in 1..=900u32) {
        let m = patterns::sinks_window(s, sinks, window).unwrap();
        // The window's `window` keys end at the diagonal; sinks are the first keys.
        let want = |_: usize, _: usize, i: usize, j: usize| {
            let (d, j) = (pos(&s, i), j as i64);
            j <= d && ((d - window as i64) < j || j < sinks as i64)
        };
        check_mask(&m, s, &want, true);
    }

    #[test]
    fn strided_matches(s in shapes(2, 3), local in 1..=6usize, stride in 1..=8usize) {
        let m = patterns::strided(s, local, stride).unwrap();
        let want = |_: usize, _: usize, i: usize, j: usize| {
            let last = last_pos_of_block(&s, i);
            if last < 0 || j as i64 > pos(&s, i) {
                return false;
            }
            let (kd, kb) = (last / 64, (j / 64) as i64);
            kb <= kd && (kd - kb < local as i64 || (kd - kb) % stride as i64 == 0)
        };
        check_mask(&m, s, &want, true);
    }

    #[test]
    fn fixed_matches(
        s in shapes(2, 3),
        (block, summary) in (1..=6usize).prop_flat_map(|b| (Just(b), 1..=b)),
    ) {
        let m = patterns::fixed(s, block, summary).unwrap();
        let want = |_: usize, _: usize, i: usize, j: usize| {
            let last = last_pos_of_block(&s, i);
            if last < 0 || j as i64 > pos(&s, i) {
                return false;
            }
            let (kd, kb) = (last as usize / 64, j / 64);
            // The summary blocks are the last `summary` of each group of `block`.
            kb <= kd && (kd / block == kb / block || block - kb % block <= summary)
        };
        check_mask(&m, s, &want, true);
    }

    #[test]
    fn dilated_matches(
        s in shapes(2, 4),
        (segment, ratio) in (1..=6usize).prop_flat_map(|seg| {
            let divisors: Vec<usize> = (1..=seg).filter(|r| seg % r == 0).collect();
            (Just(seg), proptest::sample::select(divisors))
        }),
    ) {
        let m = patterns::dilated(s, segment, ratio).unwrap();
        let want = |_: usize, h: usize, i: usize, j: usize| {
            let last = last_pos_of_block(&s, i);
            if last < 0 || j as i64 > pos(&s, i) {
                return false;
            }
            let (p, kb, o) = (last as usize / 128, j / 64, h % ratio);
            // 128-token block index of the key, within its segment.
            let key_block128 = (kb % (2 * segment)) / 2;
            kb <= last as usize / 64
                && p / segment == kb / (2 * segment)
                && p % ratio == o
                && key_block128 % ratio == o
        };
        check_mask(&m, s, &want, true);
        if ratio == 1 && s.seqlen_q == s.seqlen_k {
            // One dense causal branch per segment: every row sees its own diagonal.
            for i in 0..s.seqlen_q {
                prop_assert!(m.is_visible(0, 0, i, i));
            }
        }
    }

    #[test]
    fn bigbird_matches(
        s in shapes(2, 3),
        global in 0..=4usize,
        window in 0..=4usize,
        random in 0..=5usize,
        seed in any::<u64>(),
        causal in any::<bool>(),
    ) {
        let m = patterns::bigbird(s, global, window, random, seed, causal).unwrap();
        let table = bigbird_table(&s, global, window, random, seed, causal);
        let nqb = s.num_q_blocks();
        let want = |b: usize, h: usize, i: usize, j: usize| {
            table[(b * s.heads + h) * nqb + i / 128][j / 64]
                && (!causal || j as i64 <= pos(&s, i))
        };
        check_mask(&m, s, &want, true);
        prop_assert_eq!(m.element_mask(), if causal { MaskSpec::causal() } else { MaskSpec::none() });
        // A pure function of its arguments.
        prop_assert_eq!(&m, &patterns::bigbird(s, global, window, random, seed, causal).unwrap());
    }

    #[test]
    fn longformer_matches(
        s in shapes(2, 3),
        window in prop_oneof![0..=500u32, (0..=6u32).prop_map(|w| w * 64)],
        fractions in proptest::collection::vec(0.0..1.0f64, 0..=4),
    ) {
        let globals: Vec<usize> =
            fractions.iter().map(|f| ((f * s.seqlen_k as f64) as usize).min(s.seqlen_k - 1)).collect();
        let m = patterns::longformer(s, window, &globals).unwrap();
        let table = longformer_table(&s, window, &globals);
        let want = |_: usize, _: usize, i: usize, j: usize| table[i / 128][j / 64];
        check_mask(&m, s, &want, true);
        prop_assert_eq!(m.element_mask(), MaskSpec::none());
    }

    /// Union and intersection of random layouts equal OR and AND of their visibility.
    #[test]
    fn union_and_intersection_are_or_and_and(
        s in shapes(2, 3),
        element in prop_oneof![
            Just(MaskSpec::none()),
            Just(MaskSpec::causal()),
            Just(MaskSpec::causal_window(200).with_sinks(70)),
            Just(MaskSpec::sliding_window(Some(100), Some(300))),
        ],
        seed in any::<u64>(),
        density in 0.0..1.0f64,
    ) {
        let n = s.rows() * s.num_k_blocks();
        let mut st = seed;
        let mut layout = || -> Vec<bool> {
            (0..n).map(|_| (splitmix_next(&mut st) >> 11) as f64 / (1u64 << 53) as f64 <= density)
                .collect()
        };
        let (la, lb) = (layout(), layout());
        let a = BlockMask::from_dense_layout(s, element, &la).unwrap();
        let b = BlockMask::from_dense_layout(s, element, &lb).unwrap();
        let u = a.union(&b).unwrap();
        let x = a.intersection(&b).unwrap();
        check_mask(&u, s, &|bi, h, i, j| a.is_visible(bi, h, i, j) || b.is_visible(bi, h, i, j), true);
        check_mask(&x, s, &|bi, h, i, j| a.is_visible(bi, h, i, j) && b.is_visible(bi, h, i, j), true);
        // Block level too: listed in either / both.
        let (nqb, nkb) = (s.num_q_blocks(), s.num_k_blocks());
        for bi in 0..s.batch {
            for h in 0..s.heads {
                for qb in 0..nqb {
                    for kb in 0..nkb {
                        let (ca, cb) = (a.contains(bi, h, qb, kb), b.contains(bi, h, qb, kb));
                        prop_assert_eq!(u.contains(bi, h, qb, kb), ca || cb);
                        prop_assert_eq!(x.contains(bi, h, qb, kb), ca && cb);
                    }
                }
            }
        }
        prop_assert_eq!(&a.union(&a).unwrap(), &a);
        prop_assert_eq!(&a.intersection(&a).unwrap(), &a);
        prop_assert_eq!(&u, &b.union(&a).unwrap());
        prop_assert_eq!(&x, &b.intersection(&a).unwrap());
    }

    /// Union of two builders' masks, and union / intersection with blocks the element mask
    /// hides (kept as listed by from_csr).
    #[test]
    fn union_of_patterns_and_of_csr_masks(s in shapes(1, 2), local in 1..=4usize, stride in 1..=5usize) {
        let st = patterns::strided(s, local, stride).unwrap();
        let fx = patterns::fixed(s, 3, 1).unwrap();
        let u = st.union(&fx).unwrap();
        check_mask(&u, s, &|b, h, i, j| st.is_visible(b, h, i, j) || fx.is_visible(b, h, i, j), true);
        // Every block listed through from_csr, including causally hidden ones.
        let nkb = s.num_k_blocks() as i32;
        let offsets: Vec<i32> = (0..=s.rows() as i32).map(|r| r * nkb).collect();
        let cols: Vec<i32> = (0..s.rows()).flat_map(|_| 0..nkb).collect();
        let all = BlockMask::from_csr(s, MaskSpec::causal(), offsets, cols).unwrap();
        check_mask(&all, s, &|_, _, i, j| j as i64 <= pos(&s, i), false);
        prop_assert_eq!(&u.union(&all).unwrap(), &all);
        prop_assert_eq!(&u.intersection(&all).unwrap(), &u);
    }

    /// The key-major view lists exactly the row-major mask's blocks, each once, with its flag,
    /// query blocks ascending in every column.
    #[test]
    fn key_major_view_is_the_transpose(s in shapes(2, 3), keep in any::<u64>(), window in 0..=700u32) {
        let m = BlockMask::from_fn(s, MaskSpec::causal_window(window), |b, h, qb, kb| {
            (keep >> ((b * 7 + h * 5 + qb * 3 + kb) % 64)) & 1 == 1
        })
        .unwrap();
        let t = m.key_major();
        prop_assert_eq!(t.shape(), s);
        prop_assert_eq!(t.row_indices().len(), m.nnz());
        prop_assert_eq!(t.col_offsets().len(), s.batch * s.heads * s.num_k_blocks() + 1);
        for b in 0..s.batch {
            for h in 0..s.heads {
                for kb in 0..s.num_k_blocks() {
                    let (rows, flags) = t.column(b, h, kb);
                    prop_assert!(rows.windows(2).all(|w| w[0] < w[1]), "column {:?}", rows);
                    let want: Vec<i32> = (0..s.num_q_blocks())
                        .filter(|&qb| m.contains(b, h, qb, kb))
                        .map(|qb| qb as i32)
                        .collect();
                    prop_assert_eq!(rows, &want[..]);
                    for (&qb, &f) in rows.iter().zip(flags) {
                        let row = m.row(b, h, qb as usize);
                        let e = row.binary_search(&(kb as i32)).unwrap();
                        let r = (b * s.heads + h) * s.num_q_blocks() + qb as usize;
                        let flag = m.full_flags()[m.row_offsets()[r] as usize + e];
                        prop_assert_eq!(f, flag);
                    }
                }
            }
        }
        prop_assert_eq!(t.column(0, 0, s.num_k_blocks()), (&[][..], &[][..]));
    }
}
