//! The block-sparse backward: patterns and random block masks against the f64 gradients over
//! the same mask, and a full block mask against the dense backward's bits.

use longflash::sparse::patterns;
use longflash::{BlockMask, DType, MaskShape, MaskSpec};

use super::{check_bwd, BwdCase};
use crate::common::*;

/// The block-sparse backward: the long-context patterns and random block masks (sinks in the
/// element mask included), every head dim, GQA, both dQ modes, against the f64 gradients over
/// the same block mask.
#[test]
fn backward_sparse_patterns_and_random_masks() {
    let g = gpu_or_skip!();
    let (b, s, hq, hkv) = (1, 520, 4, 2);
    let shape = MaskShape {
        batch: b,
        heads: hq,
        seqlen_q: s,
        seqlen_k: s,
    };
    let blocks: Vec<BlockMask> = vec![
        patterns::causal(shape).unwrap(),
        patterns::sliding_window(shape, Some(200), Some(0)).unwrap(),
        patterns::bigbird(shape, 1, 3, 2, 11, true).unwrap(),
        patterns::strided(shape, 2, 3).unwrap(),
    ];
    for d in [64, 128, 256] {
        for (i, block) in blocks.iter().enumerate() {
            // The block mask carries its element mask; the case's is the same.
            let mask = block.element_mask();
            let mut bc = BwdCase::new(DType::Bf16, (b, s, s), (hq, hkv), d, mask);
            bc.block = Some(block.clone());
            check_bwd(g, &bc);
            if i == 0 {
                check_bwd(g, &bc.deterministic());
            }
        }
        let mut bc = BwdCase::new(DType::F16, (2, 333, 517), (4, 1), d, MaskSpec::causal());
        bc.c.sparse = Some(SparseSpec {
            density: 0.4,
            per_head: true,
            per_batch: true,
            seed: 5,
            one_block: false,
        });
        check_bwd(g, &bc);
        check_bwd(g, &bc.deterministic());
    }
}

/// A block mask that lists every block the dense plan visits (all of them, or the causal ones)
/// runs the same tiles in the same order as the dense backward: from the same O and LSE (the
/// dense forward's, for both), the deterministic mode's dQ, dK and dV are the same bits (head
/// dims 128 and 256, where the two use the same key tiles).
#[test]
fn backward_sparse_full_block_mask_equals_dense_bit_for_bit() {
    let g = gpu_or_skip!();
    for d in [128, 256] {
        for mask in [MaskSpec::none(), MaskSpec::causal()] {
            let dense = BwdCase::new(DType::Bf16, (2, 450, 450), (4, 2), d, mask).deterministic();
            let shape = MaskShape {
                batch: 1,
                heads: 1,
                seqlen_q: 450,
                seqlen_k: 450,
            };
            let full = if mask.causal {
                patterns::causal(shape).unwrap()
            } else {
                patterns::dense(shape).unwrap()
            };
            assert_eq!(full.element_mask(), mask);
            let mut sparse = dense.clone();
            sparse.block = Some(full);
            sparse.dense_forward = true;
            let (a, s) = (check_bwd(g, &dense), check_bwd(g, &sparse));
            for (what, x, y) in [
                ("dq", &a.dq, &s.dq),
                ("dk", &a.dk, &s.dk),
                ("dv", &a.dv, &s.dv),
            ] {
                let same = x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits());
                assert!(
                    same,
                    "d {d}, {mask:?}: sparse {what} differs from the dense one"
                );
            }
        }
    }
}
