//! Block-mask pattern builders (`longflash::sparse::patterns`) against token-level definitions
//! written out here from the documented rules, the CSR invariants and full flags of the masks
//! they make, `union` / `intersection` against element-wise OR / AND, `render`, and the
//! rejections of `from_csr`, `check_for` and every builder's parameters. CPU only.

use longflash::error::Error;
use longflash::mask::MaskSpec;
use longflash::sparse::{patterns, BlockMask, MaskShape, K_BLOCK, Q_BLOCK};
use proptest::prelude::*;

/// The definitions below are written with the block sizes as literals.
const QB: usize = 128;
const KB: usize = 64;

#[test]
fn block_sizes_are_the_documented_ones() {
    assert_eq!((Q_BLOCK, K_BLOCK), (QB, KB));
}

/// Token-level "does query i of (b, h) see key j", the brute-force definition of a pattern.
type Want<'a> = dyn Fn(usize, usize, usize, usize) -> bool + 'a;

/// Bottom-right aligned position of query row `i`.
fn pos(s: &MaskShape, i: usize) -> i64 {
    i as i64 + s.seqlen_k as i64 - s.seqlen_q as i64
}

/// Real rows of query block `qb`.
fn block_rows(s: &MaskShape, qb: usize) -> std::ops::Range<usize> {
    qb * QB..((qb + 1) * QB).min(s.seqlen_q)
}

/// Real keys of key block `kb`.
fn block_keys(s: &MaskShape, kb: usize) -> std::ops::Range<usize> {
    kb * KB..((kb + 1) * KB).min(s.seqlen_k)
}

/// Position of the last row of the query block that holds row `i`.
fn last_pos_of_block(s: &MaskShape, i: usize) -> i64 {
    pos(s, block_rows(s, i / QB).end - 1)
}

fn shape(batch: usize, heads: usize, seqlen_q: usize, seqlen_k: usize) -> MaskShape {
    MaskShape {
        batch,
        heads,
        seqlen_q,
        seqlen_k,
    }
}

/// Checks everything a mask must satisfy against the brute-force definition `want`:
/// - the CSR arrays are well formed (offsets from 0, non-decreasing, ending at nnz; each row's
///   key blocks strictly increasing and in range; one full flag per listed block);
/// - `row`, `contains` and `is_visible` agree with the arrays, and `is_visible` equals `want`
///   for every (b, h, i, j) of the shape;
/// - each listed block's full flag is set exactly when `want` holds for every element of the
///   block and the block lies wholly inside the keys;
/// - when `drops_hidden` (masks made through `from_fn`), every listed block has a visible
///   element.
fn check_mask(mask: &BlockMask, s: MaskShape, want: &Want<'_>, drops_hidden: bool) {
    assert_eq!(mask.shape(), s);
    let (nqb, nkb) = (s.seqlen_q.div_ceil(QB), s.seqlen_k.div_ceil(KB));
    assert_eq!((s.num_q_blocks(), s.num_k_blocks()), (nqb, nkb));
    let rows = s.batch * s.heads * nqb;
    let (ro, ci, ff) = (mask.row_offsets(), mask.col_indices(), mask.full_flags());
    assert_eq!(ro.len(), rows + 1, "row_offsets length");
    assert_eq!(ro[0], 0, "first offset");
    assert!(ro.windows(2).all(|w| w[0] <= w[1]), "offsets monotone");
    assert_eq!(ro[rows] as usize, ci.len(), "last offset = nnz");
    assert_eq!(ff.len(), ci.len(), "one flag per listed block");
    assert!(ff.iter().all(|&f| f <= 1), "flags are 0 or 1");
    assert_eq!(mask.nnz(), ci.len());
    assert_eq!(mask.density(), ci.len() as f64 / (rows * nkb) as f64);
    for r in 0..rows {
        let row = &ci[ro[r] as usize..ro[r + 1] as usize];
        assert!(
            row.iter().all(|&c| 0 <= c && (c as usize) < nkb),
            "row {r}: {row:?}"
        );
        assert!(
            row.windows(2).all(|w| w[0] < w[1]),
            "row {r} sorted unique: {row:?}"
        );
    }
    for b in 0..s.batch {
        for h in 0..s.heads {
            for qb in 0..nqb {
                let r = (b * s.heads + h) * nqb + qb;
                let start = ro[r] as usize;
                let row = &ci[start..ro[r + 1] as usize];
                assert_eq!(mask.row(b, h, qb), row);
                // A shared batch or head answers for every index.
                assert_eq!(mask.row(b + s.batch, h + s.heads, qb), row);
                for kb in 0..nkb {
                    let listed = row.binary_search(&(kb as i32));
                    assert_eq!(mask.contains(b, h, qb, kb), listed.is_ok());
                    let (mut visible, mut total) = (0usize, 0usize);
                    for i in block_rows(&s, qb) {
                        for j in block_keys(&s, kb) {
                            let w = want(b, h, i, j);
                            let got = mask.is_visible(b, h, i, j);
                            assert_eq!(
                                got,
                                w,
                                "is_visible(b={b}, h={h}, i={i}, j={j}) of {s:?} \
                                 (block {qb},{kb}, listed {})",
                                listed.is_ok()
                            );
                            visible += w as usize;
                            total += 1;
                        }
                    }
                    if let Ok(n) = listed {
                        let full = visible == total && (kb + 1) * KB <= s.seqlen_k;
                        assert_eq!(
                            ff[start + n] == 1,
                            full,
                            "full flag of block ({qb}, {kb}) of (b={b}, h={h}) in {s:?}: \
                             {visible} of {total} visible"
                        );
                        if drops_hidden {
                            assert!(
                                visible > 0,
                                "block ({qb}, {kb}) of (b={b}, h={h}) listed with nothing \
                                 visible in {s:?}"
                            );
                        }
                    }
                }
            }
            // Outside the sequences nothing is visible.
            assert!(!mask.is_visible(b, h, s.seqlen_q, 0));
            assert!(!mask.is_visible(b, h, 0, s.seqlen_k));
            assert!(!mask.contains(b, h, nqb, 0));
        }
    }
}

/// Sequence lengths in 1..=1200, half of them within 2 of a multiple of 64.
fn seqlen() -> impl Strategy<Value = usize> {
    prop_oneof![
        1..=1200usize,
        (1..=18usize, 0..=4usize).prop_map(|(m, d)| (m * 64 + d).saturating_sub(2).clamp(1, 1200)),
    ]
}

/// Shapes with batch in 1..=max_batch, heads in 1..=max_heads, and equal lengths a third of
/// the time.
fn shapes(max_batch: usize, max_heads: usize) -> impl Strategy<Value = MaskShape> {
    (
        1..=max_batch,
        1..=max_heads,
        seqlen(),
        seqlen(),
        prop_oneof![Just(true), Just(false), Just(false)],
    )
        .prop_map(|(batch, heads, sq, sk, equal)| {
            shape(batch, heads, sq, if equal { sq } else { sk })
        })
}

fn window_side() -> impl Strategy<Value = Option<u32>> {
    prop_oneof![
        Just(None),
        (0..=700u32).prop_map(Some),
        (0..=8u32).prop_map(|w| Some(w * 64)),
    ]
}

// --- independent SplitMix64 and BigBird random draw, from the documented procedure ---

fn splitmix_next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[test]
fn splitmix64_matches_the_published_sequence() {
    // The first outputs of SplitMix64 from state 0 (Vigna's reference implementation).
    let mut s = 0u64;
    assert_eq!(splitmix_next(&mut s), 0xE220_A839_7B1D_CDAF);
    assert_eq!(splitmix_next(&mut s), 0x6E78_9E6A_A1B9_65F4);
    assert_eq!(splitmix_next(&mut s), 0x06C4_5D18_8009_454F);
}

fn bigbird_random(
    seed: u64,
    b: usize,
    h: usize,
    qb: usize,
    mut candidates: Vec<usize>,
    random: usize,
) -> Vec<usize> {
    let mut s = seed;
    for x in [b as u64, h as u64, qb as u64] {
        let mut t = s ^ x;
        s = splitmix_next(&mut t);
    }
    let n = candidates.len();
    let k = random.min(n);
    for t in 0..k {
        let u = t + (splitmix_next(&mut s) % (n - t) as u64) as usize;
        candidates.swap(t, u);
    }
    candidates.truncate(k);
    candidates
}

/// BigBird's block table `[(b * heads + h) * nqb + qb][kb]`, from the documented rules written
/// per row (the band and the global rows found by looking at each row of the block).
fn bigbird_table(
    s: &MaskShape,
    global: usize,
    window: usize,
    random: usize,
    seed: u64,
    causal: bool,
) -> Vec<Vec<bool>> {
    let (nqb, nkb) = (s.num_q_blocks(), s.num_k_blocks());
    let mut table = Vec::new();
    for b in 0..s.batch {
        for h in 0..s.heads {
            for qb in 0..nqb {
                let rows = block_rows(s, qb);
                let global_row = rows
                    .clone()
                    .any(|i| 0 <= pos(s, i) && pos(s, i) < (64 * global) as i64);
                let det: Vec<bool> = (0..nkb)
                    .map(|kb| {
                        kb < global
                            || global_row
                            || rows.clone().any(|i| {
                                let diag_block = pos(s, i).div_euclid(64);
                                (kb as i64 - diag_block).unsigned_abs() <= window as u64
                            })
                    })
                    .collect();
                let last = pos(s, rows.end - 1);
                let candidates: Vec<usize> = (0..nkb)
                    .filter(|&kb| !det[kb] && (!causal || (last >= 0 && kb as i64 <= last / 64)))
                    .collect();
                let mut keep = det;
                for kb in bigbird_random(seed, b, h, qb, candidates, random) {
                    keep[kb] = true;
                }
                table.push(keep);
            }
        }
    }
    table
}

/// Longformer's block table `[qb][kb]`, by looking at every row of each block.
fn longformer_table(s: &MaskShape, window: u32, globals: &[usize]) -> Vec<Vec<bool>> {
    let (nqb, nkb) = (s.num_q_blocks(), s.num_k_blocks());
    let gk: Vec<usize> = globals.iter().map(|&g| g / 64).collect();
    let gq: Vec<usize> = globals
        .iter()
        .filter_map(|&g| {
            let row = g as i64 - (s.seqlen_k as i64 - s.seqlen_q as i64);
            (0 <= row && row < s.seqlen_q as i64).then_some(row as usize / 128)
        })
        .collect();
    (0..nqb)
        .map(|qb| {
            (0..nkb)
                .map(|kb| {
                    let keys = block_keys(s, kb);
                    let (c0, c1) = (keys.start as i64, keys.end as i64 - 1);
                    let w = window as i64;
                    gk.contains(&kb)
                        || gq.contains(&qb)
                        || block_rows(s, qb).any(|i| {
                            let d = pos(s, i);
                            d - w <= c1 && c0 <= d + w
                        })
                })
                .collect()
        })
        .collect()
}

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
}

// --- by hand ---

fn block_lines(m: &BlockMask, b: usize, h: usize) -> Vec<String> {
    m.render(b, h).lines().skip(1).map(str::to_owned).collect()
}

#[test]
fn causal_and_dilated_by_hand() {
    let s = shape(1, 1, 256, 256);
    assert_eq!(
        block_lines(&patterns::causal(s).unwrap(), 0, 0),
        ["++..", "##++"]
    );

    // Segments of 2 query blocks (4 key blocks), ratio 2: head 0 keeps query blocks 0 and 2
    // and key blocks {0, 1} and {4, 5}; head 1 keeps query blocks 1 and 3 and key blocks
    // {2, 3} and {6, 7}. Each kept query block meets the diagonal in its own key blocks.
    let s = shape(1, 2, 512, 512);
    let m = patterns::dilated(s, 2, 2).unwrap();
    assert_eq!(
        block_lines(&m, 0, 0),
        ["++......", "........", "....++..", "........"]
    );
    assert_eq!(
        block_lines(&m, 0, 1),
        ["........", "..++....", "........", "......++"]
    );
    // With segments of 4 query blocks and ratio 2, query block 2 of head 0 also sees key
    // blocks 0 and 1 of the same segment, in full.
    let m = patterns::dilated(shape(1, 2, 512, 512), 4, 2).unwrap();
    assert_eq!(
        block_lines(&m, 0, 0),
        ["++......", "........", "##..++..", "........"]
    );
}

#[test]
fn strided_and_fixed_by_hand() {
    // 1024 x 1024: query block qb has kb_diag = 2 qb + 1.
    let s = shape(1, 1, 1024, 1024);
    let m = patterns::strided(s, 2, 3).unwrap();
    // qb 3: kb_diag 7; local keeps 6, 7 (partial), stride keeps 7 - 3 = 4 and 1 (full).
    assert_eq!(block_lines(&m, 0, 0)[3], ".#..#.++........");
    let m = patterns::fixed(s, 4, 1).unwrap();
    // qb 3: kb_diag 7 in group 1 (blocks 4..8); summaries are blocks 3, 7, 11, 15 (only 3 is
    // before the diagonal outside the group).
    assert_eq!(block_lines(&m, 0, 0)[3], "...###++........");
    assert_eq!(block_lines(&m, 0, 0)[0], "++..............");
}

#[test]
fn bigbird_and_longformer_by_hand() {
    // 512 x 512, no random blocks: global key block 0 (and query block 0, which holds the
    // global positions 0..64), band of 1 key block around each query block's diagonal blocks.
    let s = shape(1, 1, 512, 512);
    let m = patterns::bigbird(s, 1, 1, 0, 7, false).unwrap();
    assert_eq!(
        block_lines(&m, 0, 0),
        ["########", "#####...", "#..####.", "#....###"]
    );
    // Three random blocks per row, among the blocks not already kept.
    let m = patterns::bigbird(s, 1, 0, 3, 7, false).unwrap();
    for (qb, line) in block_lines(&m, 0, 0).iter().enumerate().skip(1) {
        let kept = line.chars().filter(|&c| c == '#').count();
        // Key block 0, the two diagonal blocks and three of the five others.
        assert_eq!(kept, 6, "query block {qb}: {line}");
    }
    // Longformer, window 10 tokens, global token 300 (key block 4, query block 2).
    let m = patterns::longformer(s, 10, &[300]).unwrap();
    assert_eq!(
        block_lines(&m, 0, 0),
        ["###.#...", ".####...", "########", "....####"]
    );
}

#[test]
fn bigbird_without_globals_has_no_global_rows() {
    // More queries than keys: query block 0 holds positions -90..=37. With no global tokens it
    // is not a global row, and its band is key block 0 alone.
    let s = shape(1, 1, 1152, 1062);
    let m = patterns::bigbird(s, 0, 0, 0, 0, false).unwrap();
    assert_eq!(m.row(0, 0, 0), [0]);
    // With one global key block it is (it holds positions 0..64).
    let m = patterns::bigbird(s, 1, 0, 0, 0, false).unwrap();
    assert_eq!(m.row(0, 0, 0).len(), s.num_k_blocks());
    // Query block 2 (positions 166..=293) is global only from three global key blocks on.
    let m = patterns::bigbird(s, 2, 0, 0, 0, false).unwrap();
    assert_eq!(m.row(0, 0, 2), [0, 1, 2, 3, 4]);
    let m = patterns::bigbird(s, 3, 0, 0, 0, false).unwrap();
    assert_eq!(m.row(0, 0, 2).len(), s.num_k_blocks());
}

#[test]
fn render_has_a_header_and_one_line_per_query_block() {
    for (sq, sk) in [(1, 1), (300, 1000), (1000, 300), (129, 65), (128, 64)] {
        let s = shape(2, 3, sq, sk);
        let m = patterns::bigbird(s, 1, 1, 2, 99, true).unwrap();
        for (b, h) in [(0, 0), (1, 2)] {
            let r = m.render(b, h);
            let lines: Vec<&str> = r.lines().collect();
            assert_eq!(lines.len(), s.num_q_blocks() + 1, "{r}");
            assert!(
                lines[0].contains(&format!("nnz={}", m.nnz())),
                "{}",
                lines[0]
            );
            assert!(lines[0].contains("density="), "{}", lines[0]);
            assert!(lines[0].contains(&format!("seqlen_q={sq} seqlen_k={sk}")));
            for (qb, line) in lines[1..].iter().enumerate() {
                assert_eq!(line.len(), s.num_k_blocks());
                assert!(line.chars().all(|c| "#+.".contains(c)), "{line}");
                for (kb, c) in line.chars().enumerate() {
                    assert_eq!(c != '.', m.contains(b, h, qb, kb));
                }
            }
            let listed: usize = lines[1..]
                .iter()
                .map(|l| l.chars().filter(|&c| c != '.').count())
                .sum();
            let want: usize = (0..s.num_q_blocks()).map(|qb| m.row(b, h, qb).len()).sum();
            assert_eq!(listed, want);
        }
    }
}

// --- rejections ---

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
