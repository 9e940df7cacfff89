//! Block-mask pattern builders (`longflash::sparse::patterns`) against token-level definitions
//! written out here from the documented rules, the CSR invariants and full flags of the masks
//! they make, `union` / `intersection` against element-wise OR / AND, `render`, and the
//! rejections of `from_csr`, `check_for` and every builder's parameters. CPU only. One binary:
//! the definitions here, the property tests, the by-hand cases and the rejections in modules.

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

mod by_hand;
mod properties;
mod rejections;
mod select;
