//! The block-sparse backward's host side: a key-major view is accepted only for the mask it was
//! built from, and the f64 reference gradients of a block mask (the GPU tests' yardstick) equal
//! the exact ones where the mask lists every block, and leave unlisted key blocks untouched. CPU
//! only.

use longflash::reference::{attention_backward_f64, RefShape};
use longflash::sparse::patterns;
use longflash::{BlockMask, Error, MaskShape, MaskSpec};

fn shape(seqlen_q: usize, seqlen_k: usize) -> MaskShape {
    MaskShape {
        batch: 1,
        heads: 2,
        seqlen_q,
        seqlen_k,
    }
}

#[test]
fn key_major_view_must_be_the_masks() {
    let s = shape(300, 200);
    let causal = patterns::causal(s).unwrap();
    causal.key_major().check_view_of(&causal).unwrap();
    // Another problem, and another pattern of the same problem.
    let other_shape = patterns::causal(shape(300, 264)).unwrap().key_major();
    let other_blocks = patterns::strided(s, 1, 2).unwrap().key_major();
    assert_ne!(
        patterns::strided(s, 1, 2).unwrap().nnz(),
        causal.nnz(),
        "the second case differs in block count"
    );
    for view in [other_shape, other_blocks] {
        match view.check_view_of(&causal) {
            Err(Error::InvalidArgument { arg, .. }) => assert_eq!(arg, "key_major"),
            r => panic!("expected an InvalidArgument on key_major, got {r:?}"),
        }
    }
}

fn inputs(n: usize, seed: u64) -> Vec<f64> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 2001) as f64 / 1000.0 - 1.0
        })
        .collect()
}

#[test]
fn sparse_reference_gradients() {
    let rs = RefShape {
        batch: 1,
        seqlen_q: 200,
        seqlen_k: 192,
        heads_q: 2,
        heads_kv: 1,
        head_dim: 8,
    };
    let q = inputs(200 * 2 * 8, 1);
    let k = inputs(192 * 8, 2);
    let v = inputs(192 * 8, 3);
    let dout = inputs(200 * 2 * 8, 4);
    let s = shape(200, 192);
    // Every block listed: the exact gradients, bit for bit.
    let dense_blocks = patterns::causal(s).unwrap();
    let a = attention_backward_f64(&rs, &q, &k, &v, &dout, &dense_blocks, 0.3).unwrap();
    let b = attention_backward_f64(&rs, &q, &k, &v, &dout, &MaskSpec::causal(), 0.3).unwrap();
    assert_eq!((&a.dq, &a.dk, &a.dv), (&b.dq, &b.dk, &b.dv));
    // Key block 1 listed by no row: its keys get dK = dV = 0, the others do not.
    let sparse = BlockMask::from_fn(s, MaskSpec::none(), |_, _, _, kb| kb != 1).unwrap();
    let g = attention_backward_f64(&rs, &q, &k, &v, &dout, &sparse, 0.3).unwrap();
    let key = |j: usize| &g.dk[j * 8..(j + 1) * 8];
    assert!((64..128).all(|j| key(j).iter().all(|&x| x == 0.0)));
    assert!((64..128).all(|j| g.dv[j * 8..(j + 1) * 8].iter().all(|&x| x == 0.0)));
    assert!((0..64)
        .chain(128..192)
        .all(|j| key(j).iter().any(|&x| x != 0.0)));
    assert!(sparse.key_major().column(0, 0, 1).0.is_empty());
}
