//! `sparse::select_blocks` (dynamic top-k block selection) against a brute-force ranking of the
//! block summaries, and its errors.

use longflash::attention::select::{BlockSelectPlan, RawBlockSelect, MAX_SELECT_ROW};
use longflash::error::Error;
use longflash::mask::MaskSpec;
use longflash::reference::RefShape;
use longflash::sparse::{select_blocks, BlockMask, MaskShape};
use longflash::{DType, Layout};
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

proptest! {
    /// The device selection's plan: its row offsets are the reference selection's (each row's
    /// partial blocks plus `min(top_k, whole blocks)`, whatever the data), its universe every
    /// block the element mask leaves anything of, and its longest row the universe's.
    #[test]
    fn select_plan_sizes_the_reference_selection(
        batch in 1usize..3, sq in 1usize..700, sk in 1usize..1500, group in 1usize..3,
        heads_kv in 1usize..3, top_k in 1usize..6, mask in 0usize..3, seed in any::<u64>(),
    ) {
        let d = 4;
        let s = RefShape {
            batch, seqlen_q: sq, seqlen_k: sk, heads_q: heads_kv * group, heads_kv, head_dim: d,
        };
        let element = [MaskSpec::none(), MaskSpec::causal(), MaskSpec::causal_window(300).with_sinks(70)][mask];
        let q = values(batch * sq * s.heads_q * d, seed);
        let k = values(batch * sk * heads_kv * d, seed ^ 0x51);
        let reference = select_blocks(&s, &q, &k, element, top_k).unwrap();
        let shape = MaskShape { batch, heads: s.heads_q, seqlen_q: sq, seqlen_k: sk };
        let plan = BlockSelectPlan::new(shape, element, top_k).unwrap();
        prop_assert_eq!(plan.row_offsets(), reference.row_offsets());
        prop_assert_eq!(plan.nnz(), reference.nnz());
        let one = MaskShape { batch: 1, heads: 1, ..shape };
        let universe = BlockMask::from_fn(one, element, |_, _, _, _| true).unwrap();
        let longest = (0..one.num_q_blocks()).map(|qb| universe.row(0, 0, qb).len()).max();
        prop_assert_eq!(plan.max_row(), longest.unwrap_or(0));
        prop_assert_eq!(plan.universe(), &universe);
        prop_assert_eq!(plan.workspace_bytes(heads_kv, d),
            (batch * s.heads_q * sq.div_ceil(128) * d * 4).next_multiple_of(256)
                + batch * heads_kv * sk.div_ceil(64) * d * 4);
    }
}

#[test]
fn select_plan_errors_are_typed() {
    let shape = MaskShape {
        batch: 1,
        heads: 1,
        seqlen_q: 1,
        seqlen_k: 100,
    };
    match BlockSelectPlan::new(shape, MaskSpec::none(), 0) {
        Err(Error::InvalidArgument { arg: "top_k", .. }) => {}
        other => panic!("unexpected {other:?}"),
    }
    // One query block seeing more key blocks than the selection kernel holds.
    let long = MaskShape {
        seqlen_k: (MAX_SELECT_ROW + 1) * 64,
        ..shape
    };
    match BlockSelectPlan::new(long, MaskSpec::none(), 4) {
        Err(Error::InvalidArgument {
            arg: "shape.seqlen_k",
            ..
        }) => {}
        other => panic!("unexpected {other:?}"),
    }
    // Exactly the most key blocks a query block may see: accepted.
    let q_long = MaskShape {
        seqlen_q: 128,
        seqlen_k: MAX_SELECT_ROW * 64,
        ..shape
    };
    assert_eq!(
        BlockSelectPlan::new(q_long, MaskSpec::causal(), 4)
            .unwrap()
            .max_row(),
        MAX_SELECT_ROW
    );
    match BlockSelectPlan::new(MaskShape { batch: 0, ..shape }, MaskSpec::none(), 1) {
        Err(Error::InvalidArgument { .. }) | Err(Error::ZeroSized { .. }) => {}
        other => panic!("unexpected {other:?}"),
    }
}

/// The raw selection's host-side checks, on placeholder pointers (nothing is launched).
#[test]
fn raw_select_rejections() {
    let shape = MaskShape {
        batch: 1,
        heads: 2,
        seqlen_q: 256,
        seqlen_k: 512,
    };
    let plan = BlockSelectPlan::new(shape, MaskSpec::causal(), 2).unwrap();
    let ql = Layout::bshd(1, 256, 2, 64);
    let base = RawBlockSelect {
        dtype: DType::Bf16,
        q: 4096,
        q_layout: ql,
        k: 1 << 30,
        k_layout: Layout::bshd(1, 512, 1, 64),
        universe_offsets: 2 << 30,
        universe_cols: 3 << 30,
        universe_full: 4 << 30,
        universe_len: plan.universe().nnz(),
        max_row: plan.max_row(),
        top_k: 2,
        out_offsets: 5 << 30,
        out_cols: 6 << 30,
        out_full: 7 << 30,
        out_len: plan.nnz(),
        workspace: 8 << 30,
        workspace_bytes: plan.workspace_bytes(1, 64),
        error_flag: 0,
    };
    base.validate().unwrap();
    let arg = |r: RawBlockSelect| match r.validate().unwrap_err() {
        Error::InvalidArgument { arg, .. } | Error::Misaligned { arg, .. } => arg,
        Error::ShapeMismatch { arg, .. } | Error::ZeroSized { arg, .. } => arg,
        Error::Aliasing { output, .. } => output,
        other => panic!("unexpected {other:?}"),
    };
    assert_eq!(arg(RawBlockSelect { top_k: 0, ..base }), "top_k");
    assert_eq!(
        arg(RawBlockSelect {
            workspace_bytes: 16,
            ..base
        }),
        "workspace_bytes"
    );
    assert_eq!(
        arg(RawBlockSelect {
            workspace: 8 << 30 | 8,
            ..base
        }),
        "workspace"
    );
    assert_eq!(
        arg(RawBlockSelect {
            out_cols: 4096 + 64,
            ..base
        }),
        "out_cols"
    );
    assert_eq!(
        arg(RawBlockSelect {
            out_full: 6 << 30,
            ..base
        }),
        "out_cols"
    );
    assert_eq!(
        arg(RawBlockSelect {
            workspace: 5 << 30,
            ..base
        }),
        "workspace"
    );
    assert_eq!(arg(RawBlockSelect { q: 4098, ..base }), "q.ptr");
    assert_eq!(
        arg(RawBlockSelect {
            out_offsets: 0,
            ..base
        }),
        "out_offsets"
    );
    assert_eq!(
        arg(RawBlockSelect {
            max_row: MAX_SELECT_ROW + 1,
            ..base
        }),
        "max_row"
    );
    let odd_stride = RawBlockSelect {
        q_layout: Layout {
            seq_stride: 129,
            ..ql
        },
        ..base
    };
    assert_eq!(arg(odd_stride), "q.seq_stride");
    let odd = RawBlockSelect {
        q_layout: Layout::bshd(1, 256, 2, 65),
        k_layout: Layout::bshd(1, 512, 1, 65),
        ..base
    };
    assert_eq!(arg(odd), "q.head_dim");
    let wide = RawBlockSelect {
        q_layout: Layout::bshd(1, 256, 2, 264),
        k_layout: Layout::bshd(1, 512, 1, 264),
        ..base
    };
    assert_eq!(arg(wide), "q.head_dim");
    assert_eq!(
        arg(RawBlockSelect {
            k_layout: Layout::bshd(1, 512, 3, 64),
            ..base
        }),
        "q.heads"
    );
    assert_eq!(
        arg(RawBlockSelect {
            k_layout: Layout::bshd(2, 512, 1, 64),
            ..base
        }),
        "k.batch"
    );
    assert_eq!(
        arg(RawBlockSelect {
            k_layout: Layout::bshd(1, 512, 1, 32),
            ..base
        }),
        "k.head_dim"
    );
}
