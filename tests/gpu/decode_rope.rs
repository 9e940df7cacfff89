//! RoPE / ReRoPE / Leaky ReRoPE decoding over a cache of un-rotated keys against the CPU
//! reference: for each sequence, `reference::rope_attention_*` (the two-matrix definition) on
//! the keys gathered from the pages, with the sequence's position offset. Over position modes,
//! windows shorter and longer than the cache, both rotation layouts, partial rotary dims, log-n
//! scaling, YaRN's attention factor, position offsets, speculative tokens, GQA packing, page
//! sizes and split counts.

use half::{bf16, f16};
use longflash::reference::{
    compare, paged_gather, rope_attention_f64, rope_attention_lowp, Comparison, RefOutput, RefShape,
};
use longflash::rope::{PositionMode, RopeConfig, RopeLayout, RopeOptions, RopeScaling};
use longflash::{Attention, DType, DecodeOptions, Element};
use proptest::prelude::*;

use crate::common::*;
use crate::decode::{case, case_data, poison_past_lengths, run_on_gpu, DecodeCase, Overrides};

/// A decoding case and its rotation (offsets: one per sequence, or none).
#[derive(Clone, Debug)]
struct RopeDecodeCase {
    base: DecodeCase,
    rope: RopeOptions,
}

/// The reference of one sequence: `seqlen_q` queries over its `len` gathered keys, or zeros and
/// `-inf` when it holds none.
#[allow(clippy::too_many_arguments)]
fn reference_of<T: Element>(
    c: &RopeDecodeCase,
    b: usize,
    len: usize,
    q: &[T],
    k: &[T],
    v: &[T],
    scale: f32,
    lowp: bool,
) -> RefOutput {
    let d = c.base.head_dim;
    let rows = c.base.seqlen_q * c.base.heads_q;
    if len == 0 {
        return RefOutput {
            out: vec![0.0; rows * d],
            lse: vec![f64::NEG_INFINITY; rows],
            unrounded: if lowp {
                vec![0.0; rows * d]
            } else {
                Vec::new()
            },
            spread: if lowp {
                vec![0.0; rows * d]
            } else {
                Vec::new()
            },
            dtype: lowp.then_some(T::DTYPE),
        };
    }
    let shape = RefShape {
        batch: 1,
        seqlen_q: c.base.seqlen_q,
        seqlen_k: len,
        heads_q: c.base.heads_q,
        heads_kv: c.base.heads_kv,
        head_dim: d,
    };
    let rope = RopeOptions {
        position_offsets: c.rope.position_offsets.as_ref().map(|o| vec![o[b]]),
        ..c.rope.clone()
    };
    if lowp {
        rope_attention_lowp(&shape, q, k, v, &rope, scale).unwrap()
    } else {
        let w = |x: &[T]| -> Vec<f64> { x.iter().map(|t| t.to_f32() as f64).collect() };
        rope_attention_f64(&shape, &w(q), &w(k), &w(v), &rope, scale as f64).unwrap()
    }
}

/// The case on the GPU against its references; with `poison`, the GPU's cache holds NaN past
/// each sequence's length and its table points outside the cache past each last page
/// ([`poison_past_lengths`]), the references the clean cache.
fn run_t<T: Element>(
    g: &Gpu,
    attn: &Attention,
    c: &RopeDecodeCase,
    poison: bool,
) -> (Comparison, i32) {
    let bc = &c.base;
    let data = case_data::<T>(bc);
    let shape = &data.shape;
    let scale = 1.0 / (bc.head_dim as f32).sqrt();
    // The references, sequence by sequence, joined in the batch's layout.
    let q_seq = bc.seqlen_q * bc.heads_q * bc.head_dim;
    let mut ref64 = RefOutput::default();
    let mut lowp = RefOutput {
        dtype: Some(T::DTYPE),
        ..RefOutput::default()
    };
    for b in 0..shape.batch {
        let len = shape.seqlen_k(b);
        let (kb, vb) = paged_gather(shape, &data.k, &data.v, b).unwrap();
        let qb = &data.q[b * q_seq..(b + 1) * q_seq];
        for (acc, low) in [(&mut ref64, false), (&mut lowp, true)] {
            let r = reference_of(c, b, len, qb, &kb, &vb, scale, low);
            acc.out.extend(r.out);
            acc.lse.extend(r.lse);
            acc.unrounded.extend(r.unrounded);
            acc.spread.extend(r.spread);
        }
    }
    let opts = DecodeOptions {
        mask: c.rope.mask(),
        num_splits: bc.num_splits,
        ..DecodeOptions::default()
    };
    let (poisoned, table) = poison_past_lengths(bc, &data);
    let (gpu_data, ov) = if poison {
        let ov = Overrides {
            block_table: Some(&table),
            ..Overrides::default()
        };
        (&poisoned, ov)
    } else {
        (&data, Overrides::default())
    };
    let (out, lse, flag) = run_on_gpu(g, bc, gpu_data, &ov, |q, cache, out, f| {
        attn.decode_rope(&g.stream, q, cache, out, Some(f), &opts, &c.rope)
    });
    (compare(&out, Some(&lse), &ref64, &lowp), flag)
}

fn check_on(g: &Gpu, c: &RopeDecodeCase, poison: bool) {
    let (cmp, flag) = match c.base.dtype {
        DType::F16 => run_t::<f16>(g, &g.attn, c, poison),
        DType::Bf16 => run_t::<bf16>(g, &g.attn, c, poison),
    };
    assert!(
        cmp.passes,
        "{c:?} (poisoned past the lengths: {poison})\n  {cmp}"
    );
    assert_eq!(flag, 0, "{c:?}: valid cache reported");
}

fn check(g: &Gpu, c: &RopeDecodeCase) {
    check_on(g, c, false)
}

fn rope_case(d: usize, mode: PositionMode) -> RopeDecodeCase {
    let rope = RopeOptions::new(RopeConfig::llama(d), mode);
    RopeDecodeCase {
        base: DecodeCase {
            lens: vec![1, 700, 90, 300],
            mask: rope.mask(),
            ..case(d, rope.mask())
        },
        rope,
    }
}

const MODES: [PositionMode; 4] = [
    PositionMode::Rope,
    PositionMode::ReRope { window: 64 },
    PositionMode::ReRope { window: 200 },
    PositionMode::LeakyReRope {
        window: 100,
        leak: 16.0,
    },
];

#[test]
fn rope_decode_by_hand() {
    let g = gpu_or_skip!();
    for dtype in DTYPES {
        for d in DIMS {
            for mode in MODES {
                for num_splits in [Some(1), Some(3)] {
                    let mut c = rope_case(d, mode);
                    c.base.dtype = dtype;
                    c.base.num_splits = num_splits;
                    check(g, &c);
                }
            }
        }
    }
}

/// Decoding over caches of tens of thousands of un-rotated keys with SmolLM2's rotation (base
/// 100000, interleaved pairs, head dim 64, f16, 9 query heads over 3), one and four new tokens,
/// as an engine's decoding steps after a long prefill.
#[test]
fn rope_decode_long_caches() {
    let g = gpu_or_skip!();
    for mode in crate::rope_long::SMOLLM2_MODES {
        for seqlen_q in [1, 4] {
            let rope = crate::rope_long::smollm2_rope(mode);
            let c = RopeDecodeCase {
                base: DecodeCase {
                    dtype: DType::F16,
                    lens: vec![32752 + seqlen_q, 32768 + seqlen_q, 65536 + seqlen_q],
                    seqlen_q,
                    heads_q: 9,
                    heads_kv: 3,
                    page_size: None,
                    mask: rope.mask(),
                    ..case(64, rope.mask())
                },
                rope,
            };
            check(g, &c);
        }
    }
}

/// NaN in every cache row past each sequence's length and table entries past each last page
/// pointing outside the cache (`decode::poison_past_lengths`), sequences of 0 to 700 keys in one
/// launch: the output is the clean cache's and nothing is reported, every mode, one and several
/// splits, paged and contiguous.
#[test]
fn rope_decode_ignores_rows_past_the_length() {
    let g = gpu_or_skip!();
    for (d, page_size) in [(64, Some(16)), (128, None), (100, Some(64))] {
        for mode in MODES {
            for num_splits in [Some(1), Some(5), None] {
                let mut c = rope_case(d, mode);
                c.base.lens = vec![700, 37, 0, 129, 16];
                c.base.page_size = page_size;
                c.base.share_first_page = false;
                c.base.num_splits = num_splits;
                check_on(g, &c, true);
            }
        }
    }
}

/// Head dims narrower than the tile widths (padded kernels), every mode, partial rotary dims.
#[test]
fn rope_decode_narrow_head_dims() {
    let g = gpu_or_skip!();
    for d in [80, 96, 100, 160] {
        for mode in MODES {
            let mut c = rope_case(d, mode);
            c.base.num_splits = Some(2);
            check(g, &c);
            c.rope.config.rotary_dim = d / 2;
            check(g, &c);
        }
    }
}

/// Speculative tokens, GQA packing, windows on top of the causal mask, position offsets, both
/// layouts and partial rotary dims, log-n scaling and YaRN's attention factor.
#[test]
fn rope_decode_options() {
    let g = gpu_or_skip!();
    let mut cases = Vec::new();
    for mode in MODES {
        for (seqlen_q, heads_q, heads_kv) in [(1, 32, 8), (5, 6, 2), (16, 4, 1), (20, 1, 1)] {
            let mut c = rope_case(128, mode);
            c.base.seqlen_q = seqlen_q;
            c.base.heads_q = heads_q;
            c.base.heads_kv = heads_kv;
            c.base.lens = vec![3, 257, 1000];
            c.base.num_splits = Some(2);
            cases.push(c);
        }
        let mut c = rope_case(64, mode);
        c.rope.config.layout = RopeLayout::Interleaved;
        c.rope.config.rotary_dim = 32;
        c.rope.position_offsets = Some(vec![5, 1000, 70_000, 0]);
        c.rope.log_n_train_len = Some(128);
        cases.push(c);
        let mut c = rope_case(128, mode);
        c.rope.config.scaling = RopeScaling::Yarn {
            factor: 4.0,
            original_max_position: 256,
            beta_fast: 32.0,
            beta_slow: 1.0,
            attention_factor: None,
        };
        c.rope.window_left = Some(150);
        c.base.mask = c.rope.mask();
        c.base.page_size = Some(16);
        cases.push(c);
    }
    for c in &cases {
        check(g, c);
    }
}

fn arb_rope_decode_case() -> impl Strategy<Value = RopeDecodeCase> {
    (
        prop_oneof![Just(DType::F16), Just(DType::Bf16)],
        proptest::collection::vec(prop_oneof![Just(1usize), 1usize..1500], 1..4),
        1usize..9,
        prop_oneof![Just((1usize, 1usize)), Just((8, 2)), Just((32, 4))],
        prop_oneof![Just(64usize), Just(128), Just(256)],
        prop_oneof![Just(None), Just(Some(16usize)), Just(Some(64))],
        prop_oneof![
            Just(PositionMode::Rope),
            (1u32..600).prop_map(|window| PositionMode::ReRope { window }),
            (1u32..600, 2.0f64..32.0)
                .prop_map(|(window, leak)| PositionMode::LeakyReRope { window, leak }),
        ],
        prop_oneof![Just(None), (1usize..12).prop_map(Some)],
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(
            |(dtype, lens, seqlen_q, (heads_q, heads_kv), d, page_size, mode, ns, offs, seed)| {
                let mut rope = RopeOptions::new(RopeConfig::llama(d), mode);
                if offs {
                    rope.position_offsets = Some(
                        (0..lens.len() as u64)
                            .map(|i| ((seed >> (8 * i)) & 0xfff) as u32)
                            .collect(),
                    );
                }
                let mut base = case(d, rope.mask());
                base.dtype = dtype;
                base.lens = lens;
                base.seqlen_q = seqlen_q;
                base.heads_q = heads_q;
                base.heads_kv = heads_kv;
                base.page_size = page_size;
                base.num_splits = ns;
                base.seed = seed;
                RopeDecodeCase { base, rope }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn rope_decode_matches_reference(c in arb_rope_decode_case()) {
        let Some(g) = gpu() else {
            say_skipped("rope_decode_matches_reference");
            return Ok(());
        };
        let (cmp, flag) = match c.base.dtype {
            DType::F16 => run_t::<f16>(g, &g.attn, &c, false),
            DType::Bf16 => run_t::<bf16>(g, &g.attn, &c, false),
        };
        prop_assert!(cmp.passes, "{:?}\n  {}", c, cmp);
        prop_assert_eq!(flag, 0);
    }
}
