//! Head dims narrower than the kernels' tile widths (multiples of 4 up to 256: 80, 96, 100, 112,
//! 160, 192, ...), run in the next width's padded kernels (8-byte copies, so a 100-element head's
//! 200-byte rows need no padding by the caller): the exact forward over masks, layouts and
//! GQA against the reference, the sm_80 mainloop serving them on every device, and a property
//! test. The variable-length and decoding forwards test their own narrow heads in their modules.

use longflash::{DType, Mainloop, MaskSpec};
use proptest::prelude::*;

use crate::common::*;

const NARROW: [usize; 12] = [4, 8, 20, 56, 80, 96, 100, 112, 136, 160, 192, 252];

#[test]
fn narrow_head_dims_match_reference() {
    let g = gpu_or_skip!();
    for dtype in DTYPES {
        for d in NARROW {
            for mask in [
                MaskSpec::none(),
                MaskSpec::causal(),
                MaskSpec::causal_window(70),
            ] {
                check(g, &Case::new(dtype, (2, 200, 333), (4, 2), d, mask));
            }
        }
    }
}

#[test]
fn narrow_head_dims_with_strides_and_tile_edges() {
    let g = gpu_or_skip!();
    for d in [24, 100, 200] {
        for (sq, sk) in [(1, 1), (1, 300), (129, 127), (300, 64)] {
            let mut c = Case::new(DType::Bf16, (1, sq, sk), (3, 1), d, MaskSpec::causal());
            c.q_mem = Mem::PaddedBshd(3);
            c.kv_mem = Mem::Bhsd;
            c.o_mem = Mem::PaddedBhsd(1);
            check(g, &c);
        }
    }
}

/// A narrow head runs on the sm_80 mainloop whatever the choice allows (the Hopper kernels have
/// no padded widths): the default falls back to it, an explicit Sm90 choice is refused.
#[test]
fn narrow_head_dims_run_on_the_sm80_mainloop() {
    let g = gpu_or_skip!();
    let c = Case::new(DType::Bf16, (1, 256, 256), (2, 2), 96, MaskSpec::causal());
    assert_eq!(mainloop_of(g, &g.sm80, &c), Mainloop::Sm80);
    if let Some(h) = &g.hopper {
        assert_eq!(mainloop_of(g, &g.attn, &c), Mainloop::Sm80);
        let e = with_raw_case(g, &c, |raw| h.mainloop_for(raw)).unwrap_err();
        assert!(e.to_string().contains("head dim"), "{e}");
    }
}

fn arb_narrow_case() -> impl Strategy<Value = Case> {
    (arb_case(), (1usize..=32).prop_map(|x| 8 * x)).prop_map(|(mut c, d)| {
        c.head_dim = d;
        c.sparse = None;
        c
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn narrow_kernel_matches_reference(c in arb_narrow_case()) {
        let Some(g) = gpu() else {
            say_skipped("narrow_kernel_matches_reference");
            return Ok(());
        };
        let r = run_case(g, &c);
        prop_assert!(r.cmp.passes, "{:?}\n  {}", c, r.cmp);
    }
}
