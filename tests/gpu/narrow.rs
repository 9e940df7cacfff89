//! Head dims narrower than the kernels' tile widths (multiples of 4 up to 256: 80, 96, 100, 112,
//! 160, 192, ...), run in the next width's padded kernels (8-byte copies, so a 100-element head's
//! 200-byte rows need no padding by the caller): the exact forward over masks, layouts and
//! GQA against the reference, which mainloop serves them (on Hopper the padded Hopper kernels
//! for 68 to 124, on flat tensor maps), and a property test. The variable-length and decoding forwards test their own narrow heads in their modules.

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

/// Which mainloop a narrow head runs on: the sm_80 one where it is forced; on a Hopper device the
/// padded Hopper kernels for a multiple of 4 from 68 to 124 whose rows are whole 16 bytes (the
/// flat tensor maps need no 16-byte head stride); the sm_80 one otherwise, where an explicit
/// Sm90 choice is refused with the reason.
#[test]
fn narrow_head_dims_mainloops() {
    let g = gpu_or_skip!();
    let c = Case::new(DType::Bf16, (1, 256, 256), (2, 2), 96, MaskSpec::causal());
    assert_eq!(mainloop_of(g, &g.sm80, &c), Mainloop::Sm80);
    let Some(h) = &g.hopper else {
        return;
    };
    for d in [68, 96, 100, 124] {
        let c = Case {
            head_dim: d,
            ..c.clone()
        };
        assert_eq!(mainloop_of(g, &g.attn, &c), Mainloop::Sm90, "{c:?}");
        let kernel = with_raw_case(g, &c, |raw| h.hopper_kernel_for(raw)).unwrap();
        assert_eq!(kernel.as_deref(), Some("lf_fwd_sm90_bf16_d128p"));
    }
    // One key head of 100: 200-byte rows, which no tensor map takes.
    let odd_rows = Case::new(DType::Bf16, (1, 256, 256), (2, 1), 100, MaskSpec::causal());
    // Wider than 128: the padded 256-wide tiles are the sm_80 mainloop's alone.
    let wide = Case {
        head_dim: 160,
        ..c.clone()
    };
    for (c, why) in [(odd_rows, "seq_stride"), (wide, "head dim")] {
        assert_eq!(mainloop_of(g, &g.attn, &c), Mainloop::Sm80, "{c:?}");
        let e = with_raw_case(g, &c, |raw| h.mainloop_for(raw)).unwrap_err();
        assert!(e.to_string().contains(why), "{e}");
    }
}

/// The padded Hopper kernels against the reference: head dims across their range, masks, GQA,
/// tile edges, and heads with gaps between them filled with NaN (a head's tiles read nothing
/// outside it: its last column block ends at its last column).
#[test]
fn narrow_head_dims_on_the_hopper_mainloop() {
    let g = gpu_or_skip!();
    let Some(h) = &g.hopper else {
        say_skipped(
            "narrow_head_dims_on_the_hopper_mainloop (not a compute capability 9.0 device)",
        );
        return;
    };
    let sizes = [
        (2, 200, 333),
        (1, 1, 300),
        (1, 129, 127),
        (2, 300, 64),
        (1, 257, 1000),
    ];
    let masks = [
        MaskSpec::none(),
        MaskSpec::causal(),
        MaskSpec::causal_window(70),
    ];
    let mut n = 0;
    for d in [68, 80, 100, 112, 124] {
        for (i, &size) in sizes.iter().enumerate() {
            let mask = masks[(i + d / 4) % masks.len()];
            let dtype = DTYPES[(i + d) % 2];
            let heads = if i % 2 == 0 { (4, 2) } else { (2, 2) };
            let mut c = Case::new(dtype, size, heads, d, mask);
            if i >= 3 {
                // Gaps of 8 elements after every head and row: rows of whole 16 bytes still.
                c.q_mem = Mem::PaddedBshd(1);
                c.kv_mem = Mem::PaddedBshd(1);
                c.o_mem = Mem::PaddedBshd(1);
            }
            assert_eq!(mainloop_of(g, h, &c), Mainloop::Sm90, "{c:?}");
            let r = run_case_with(g, h, &c);
            assert!(r.cmp.passes, "padded Hopper kernel, {c:?}\n  {}", r.cmp);
            n += 1;
        }
    }
    assert_eq!(n, 25);
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
