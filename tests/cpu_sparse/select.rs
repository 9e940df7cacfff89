//! `sparse::select_blocks` (dynamic top-k block selection) against a brute-force ranking of the
//! block summaries, and its errors.

use longflash::error::Error;
use longflash::mask::MaskSpec;
use longflash::reference::RefShape;
use longflash::sparse::{select_blocks, BlockMask, MaskShape};
use proptest::prelude::*;

/// Mean of rows [lo, hi) of head `h`, batch `b` of a `[batch, rows, heads, d]` tensor, in f64.
fn mean(
    x: &[f32],
    (rows, heads, d): (usize, usize, usize),
    b: usize,
    h: usize,
    lo: usize,
    hi: usize,
) -> Vec<f64> {
    (0..d)
        .map(|t| {
            (lo..hi)
                .map(|r| f64::from(x[((b * rows + r) * heads + h) * d + t]))
                .sum::<f64>()
                / (hi - lo) as f64
        })
        .collect()
}

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut z = seed | 1;
    (0..n)
        .map(|_| {
            z ^= z << 13;
            z ^= z >> 7;
            z ^= z << 17;
            ((z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
        })
        .collect()
}

proptest! {
    /// Each row lists the blocks the element mask cuts and the `top_k` whole blocks of largest
    /// `mean(q) . mean(k)` (ties to the lower block), nothing else.
    #[test]
    fn selection_is_the_top_k_of_the_summaries(
        batch in 1usize..3, sq in 1usize..400, sk in 1usize..600, group in 1usize..3,
        heads_kv in 1usize..3, d in 1usize..5, top_k in 1usize..5, causal in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let s = RefShape {
            batch, seqlen_q: sq, seqlen_k: sk, heads_q: heads_kv * group, heads_kv, head_dim: d,
        };
        let q = values(batch * sq * s.heads_q * d, seed);
        let k = values(batch * sk * heads_kv * d, seed ^ 0x9e37);
        let element = if causal { MaskSpec::causal() } else { MaskSpec::none() };
        let got = select_blocks(&s, &q, &k, element, top_k).unwrap();
        let shape = MaskShape { batch, heads: s.heads_q, seqlen_q: sq, seqlen_k: sk };
        let all = BlockMask::from_fn(shape, element, |_, _, _, _| true).unwrap();
        let mut row = 0;
        for b in 0..batch {
            for h in 0..s.heads_q {
                for qb in 0..shape.num_q_blocks() {
                    let qm = mean(&q, (sq, s.heads_q, d), b, h, qb * 128, ((qb + 1) * 128).min(sq));
                    let listed = all.row(b, h, qb);
                    let start = all.row_offsets()[row] as usize;
                    let flags = &all.full_flags()[start..start + listed.len()];
                    let mut want: Vec<i32> = Vec::new();
                    let mut whole: Vec<(f64, i32)> = Vec::new();
                    for (&kb, &full) in listed.iter().zip(flags) {
                        if full == 0 {
                            want.push(kb);
                        } else {
                            let km = mean(&k, (sk, heads_kv, d), b, h / group, kb as usize * 64,
                                ((kb as usize + 1) * 64).min(sk));
                            whole.push((qm.iter().zip(&km).map(|(x, y)| x * y).sum(), kb));
                        }
                    }
                    // Brute force: a whole block is kept iff fewer than top_k whole blocks beat it.
                    for &(sc, kb) in &whole {
                        let beaten_by = whole
                            .iter()
                            .filter(|&&(o, okb)| o > sc || (o == sc && okb < kb))
                            .count();
                        if beaten_by < top_k {
                            want.push(kb);
                        }
                    }
                    want.sort_unstable();
                    prop_assert_eq!(got.row(b, h, qb), &want[..], "row {} {} {}", b, h, qb);
                    row += 1;
                }
            }
        }
    }
}

/// With `top_k` at least the key blocks, the selection is every block the element mask leaves
/// anything of.
#[test]
fn large_top_k_keeps_every_visible_block() {
    let s = RefShape {
        batch: 2,
        seqlen_q: 300,
        seqlen_k: 700,
        heads_q: 4,
        heads_kv: 2,
        head_dim: 8,
    };
    let q = values(2 * 300 * 4 * 8, 1);
    let k = values(2 * 700 * 2 * 8, 2);
    let shape = MaskShape {
        batch: 2,
        heads: 4,
        seqlen_q: 300,
        seqlen_k: 700,
    };
    for element in [MaskSpec::causal(), MaskSpec::none()] {
        let got = select_blocks(&s, &q, &k, element, 11).unwrap();
        assert_eq!(
            got,
            BlockMask::from_fn(shape, element, |_, _, _, _| true).unwrap()
        );
    }
}

#[test]
fn selection_errors_are_typed() {
    let s = RefShape {
        batch: 1,
        seqlen_q: 10,
        seqlen_k: 10,
        heads_q: 3,
        heads_kv: 2,
        head_dim: 4,
    };
    let (q, k) = (vec![0f32; 120], vec![0f32; 80]);
    let arg = |e: Error| match e {
        Error::InvalidArgument { arg, .. } => arg,
        other => panic!("unexpected {other:?}"),
    };
    assert_eq!(
        arg(select_blocks(&s, &q, &k, MaskSpec::none(), 1).unwrap_err()),
        "shape.heads_kv"
    );
    let s = RefShape { heads_q: 2, ..s };
    assert_eq!(
        arg(select_blocks(&s, &q[..80], &k, MaskSpec::none(), 0).unwrap_err()),
        "top_k"
    );
    assert_eq!(
        arg(select_blocks(&s, &q, &k, MaskSpec::none(), 1).unwrap_err()),
        "q"
    );
    assert_eq!(
        arg(select_blocks(&s, &q[..80], &k[..7], MaskSpec::none(), 1).unwrap_err()),
        "k"
    );
    let z = RefShape { seqlen_k: 0, ..s };
    assert_eq!(
        arg(select_blocks(&z, &q[..80], &[], MaskSpec::none(), 1).unwrap_err()),
        "shape"
    );
}
