//! The decoding forward over a KV cache (paged or contiguous) against the CPU reference
//! (`reference::paged_attention_*`: the dense reference on each sequence's gathered keys), over
//! page sizes, both cache layouts, shared and shuffled pages, GQA packing, speculative query
//! counts, masks and split counts (the raw entry's workspace and kept split counters:
//! `decode_splits.rs`); and cache lengths and block-table entries that point outside the cache:
//! clamped, reported through the error flag, never read out of bounds (run under
//! compute-sanitizer memcheck).

use cudarc::driver::{CudaSlice, CudaViewMut, DevicePtr};
use half::{bf16, f16};
use longflash::reference::{
    compare, paged_attention_f64, paged_attention_lowp, Comparison, PagedLayout, PagedShape,
    RefOutput,
};
use longflash::{
    Attention, BlockTable, DType, DecodeOptions, DeviceErrorFlag, Element, Error, Input, KvCache,
    Layout, MaskSpec, Output,
};
use proptest::prelude::*;

use crate::common::Rng;
use crate::common::*;

/// A decoding problem. `page_size: None` is a contiguous cache of `capacity` keys per sequence.
#[derive(Clone, Debug)]
pub(crate) struct DecodeCase {
    pub(crate) dtype: DType,
    pub(crate) lens: Vec<usize>,
    pub(crate) seqlen_q: usize,
    pub(crate) heads_q: usize,
    pub(crate) heads_kv: usize,
    pub(crate) head_dim: usize,
    pub(crate) page_size: Option<usize>,
    pub(crate) layout: PagedLayout,
    /// Sequence 1 (when there is one) starts with sequence 0's first page (a shared prefix).
    pub(crate) share_first_page: bool,
    pub(crate) mask: MaskSpec,
    pub(crate) num_splits: Option<usize>,
    pub(crate) seed: u64,
}

pub(crate) struct DecodeRun {
    cmp: Comparison,
    pub(crate) out: Vec<f64>,
    pub(crate) lse: Vec<f32>,
    flag: i32,
}

/// Device values to use instead of the case's own (for the clamping tests).
#[derive(Default)]
pub(crate) struct Overrides<'a> {
    pub(crate) cache_seqlens: Option<&'a [i32]>,
    pub(crate) block_table: Option<&'a [i32]>,
}

/// The cache of a case: its reference description, and the layout of K and V as the kernel
/// reads them.
pub(crate) fn cache_shape(c: &DecodeCase, rng: &mut Rng) -> (PagedShape, Layout) {
    let max_len = c.lens.iter().copied().max().unwrap_or(0).max(1);
    let (ps, max_pages) = match c.page_size {
        Some(ps) => (ps, max_len.div_ceil(ps) + 1),
        None => (max_len + 5, 1),
    };
    let batch = c.lens.len();
    let num_pages = batch * max_pages + 3;
    // Pages in a shuffled order (a contiguous cache: sequence b is "page" b).
    let mut pages: Vec<i32> = (0..num_pages as i32).collect();
    if c.page_size.is_some() {
        for i in (1..pages.len()).rev() {
            let j = (rng.next_u64() % (i as u64 + 1)) as usize;
            pages.swap(i, j);
        }
    }
    let mut block_table: Vec<i32> = pages[..batch * max_pages].to_vec();
    if c.share_first_page && batch > 1 && c.page_size.is_some() {
        block_table[max_pages] = block_table[0];
    }
    let shape = PagedShape {
        batch,
        seqlen_q: c.seqlen_q,
        heads_q: c.heads_q,
        heads_kv: c.heads_kv,
        head_dim: c.head_dim,
        num_pages: if c.page_size.is_some() {
            num_pages
        } else {
            batch
        },
        page_size: ps,
        max_pages_per_seq: max_pages,
        layout: c.layout,
        block_table,
        cache_seqlens: c.lens.iter().map(|&l| l as i32).collect(),
    };
    let layout = match c.layout {
        PagedLayout::TokensMajor => Layout::bshd(shape.num_pages, ps, c.heads_kv, c.head_dim),
        PagedLayout::HeadsMajor => Layout::bhsd(shape.num_pages, ps, c.heads_kv, c.head_dim),
    };
    (shape, layout)
}

/// A case's host data: its cache description and layout, and Q, K and V drawn from its seed.
pub(crate) struct CaseData<T> {
    pub(crate) shape: PagedShape,
    pub(crate) layout: Layout,
    pub(crate) q: Vec<T>,
    pub(crate) k: Vec<T>,
    pub(crate) v: Vec<T>,
}

pub(crate) fn case_data<T: Element>(c: &DecodeCase) -> CaseData<T> {
    let mut rng = Rng(c.seed);
    let (shape, layout) = cache_shape(c, &mut rng);
    let mut gen =
        |n: usize| -> Vec<T> { (0..n).map(|_| T::from_f32(rng.normal() as f32)).collect() };
    let cache_len = shape.cache_len().unwrap();
    let (q, k, v) = (gen(shape.q_len().unwrap()), gen(cache_len), gen(cache_len));
    CaseData {
        shape,
        layout,
        q,
        k,
        v,
    }
}

/// `data` with every cache row no sequence reads below its length set to NaN, and the case's
/// block table with every entry past a sequence's last page pointing outside the cache: what an
/// engine's cache holds past its lengths (stale or never written rows, unassigned pages). A
/// correct kernel neither uses those rows nor reports those entries.
pub(crate) fn poison_past_lengths<T: Element>(
    c: &DecodeCase,
    data: &CaseData<T>,
) -> (CaseData<T>, Vec<i32>) {
    let s = &data.shape;
    let lay = data.layout;
    let (ps, mp) = (s.page_size, s.max_pages_per_seq);
    let mut used = vec![false; s.num_pages * ps];
    for (b, &len) in c.lens.iter().enumerate() {
        for j in 0..len {
            used[s.block_table[b * mp + j / ps] as usize * ps + j % ps] = true;
        }
    }
    let nan = T::from_f32(f32::NAN);
    let (mut k, mut v) = (data.k.clone(), data.v.clone());
    for page in 0..s.num_pages {
        for row in (0..ps).filter(|&row| !used[page * ps + row]) {
            for h in 0..c.heads_kv {
                let off = page as i64 * lay.batch_stride
                    + row as i64 * lay.seq_stride
                    + h as i64 * lay.head_stride;
                for e in 0..c.head_dim {
                    k[off as usize + e] = nan;
                    v[off as usize + e] = nan;
                }
            }
        }
    }
    let mut table = s.block_table.clone();
    if c.page_size.is_some() {
        for (b, &len) in c.lens.iter().enumerate() {
            for p in len.div_ceil(ps)..mp {
                table[b * mp + p] = [-3, i32::MAX, s.num_pages as i32 + 5][p % 3];
            }
        }
    }
    let poisoned = CaseData {
        shape: s.clone(),
        layout: lay,
        q: data.q.clone(),
        k,
        v,
    };
    (poisoned, table)
}

/// The GPU's output for `data`: uploads it (with the device lengths and table of `ov`) and runs
/// `call` with Q, the cache, the output (O and LSE) and the error flag; returns O widened, the
/// LSE and 1 when the flag's check gave `Error::DeviceIndexOutOfRange` (0 when it passed).
pub(crate) fn run_on_gpu<T: Element>(
    g: &Gpu,
    c: &DecodeCase,
    data: &CaseData<T>,
    ov: &Overrides,
    call: impl FnOnce(
        Input<'_, '_, T>,
        &KvCache<'_, '_, T>,
        Output<'_, '_, T>,
        &mut CudaViewMut<'_, i32>,
    ) -> longflash::Result<()>,
) -> (Vec<f64>, Vec<f32>, i32) {
    let shape = &data.shape;
    let ql = Layout::bshd(shape.batch, c.seqlen_q, c.heads_q, c.head_dim);
    let (dq, dk, dv) = (
        g.stream.clone_htod(&data.q).unwrap(),
        g.stream.clone_htod(&data.k).unwrap(),
        g.stream.clone_htod(&data.v).unwrap(),
    );
    let table = ov.block_table.unwrap_or(&shape.block_table);
    let lens = ov.cache_seqlens.unwrap_or(&shape.cache_seqlens);
    let (dt, dl) = (
        g.stream.clone_htod(table).unwrap(),
        g.stream.clone_htod(lens).unwrap(),
    );
    let mut d_o: CudaSlice<T> = g.stream.alloc_zeros(data.q.len()).unwrap();
    let mut d_lse: CudaSlice<f32> = g
        .stream
        .alloc_zeros(shape.batch * c.heads_q * c.seqlen_q)
        .unwrap();
    let mut flag = DeviceErrorFlag::new(&g.stream).unwrap();
    {
        let (qv, kv, vv, tv, lv) = (
            dq.as_view(),
            dk.as_view(),
            dv.as_view(),
            dt.as_view(),
            dl.as_view(),
        );
        let (mut o, mut l, mut f) = (d_o.as_view_mut(), d_lse.as_view_mut(), flag.view_mut());
        let cache = KvCache {
            k: Input {
                data: &kv,
                layout: data.layout,
            },
            v: Input {
                data: &vv,
                layout: data.layout,
            },
            block_table: c.page_size.map(|_| BlockTable {
                table: &tv,
                max_pages_per_seq: shape.max_pages_per_seq,
            }),
            cache_seqlens: Some(&lv),
        };
        call(
            Input {
                data: &qv,
                layout: ql,
            },
            &cache,
            Output {
                data: &mut o,
                layout: ql,
                lse: Some(&mut l),
            },
            &mut f,
        )
        .unwrap_or_else(|e| panic!("{c:?}: {e}"));
    }
    let out = g
        .stream
        .clone_dtoh(&d_o)
        .unwrap()
        .iter()
        .map(|t| t.to_f32() as f64)
        .collect();
    let lse: Vec<f32> = g.stream.clone_dtoh(&d_lse).unwrap();
    // The flag as the typed error a caller gets; a check clears it.
    let flag = match flag.check(&g.stream, "decode test") {
        Ok(()) => 0,
        Err(Error::DeviceIndexOutOfRange {
            during: "decode test",
        }) => {
            assert!(flag.check(&g.stream, "decode test").is_ok(), "not cleared");
            1
        }
        Err(e) => panic!("{c:?}: {e}"),
    };
    (out, lse, flag)
}

/// The f64 reference of a case's data and its low-precision budget.
fn references<T: Element>(c: &DecodeCase, data: &CaseData<T>) -> (RefOutput, RefOutput) {
    let wide = |x: &[T]| -> Vec<f64> { x.iter().map(|t| t.to_f32() as f64).collect() };
    let scale = 1.0 / (c.head_dim as f32).sqrt();
    let ref64 = paged_attention_f64(
        &data.shape,
        &wide(&data.q),
        &wide(&data.k),
        &wide(&data.v),
        &c.mask,
        scale as f64,
    )
    .unwrap_or_else(|e| panic!("{c:?}: reference: {e}"));
    let lowp =
        paged_attention_lowp(&data.shape, &data.q, &data.k, &data.v, &c.mask, scale).unwrap();
    (ref64, lowp)
}

fn run_t<T: Element>(g: &Gpu, attn: &Attention, c: &DecodeCase, ov: &Overrides) -> DecodeRun {
    let data = case_data::<T>(c);
    let (ref64, lowp) = references(c, &data);
    let opts = c.options();
    let (out, lse, flag) = run_on_gpu(g, c, &data, ov, |q, cache, out, f| {
        attn.decode(&g.stream, q, cache, out, Some(f), &opts)
    });
    let cmp = compare(&out, Some(&lse), &ref64, &lowp);
    DecodeRun {
        cmp,
        out,
        lse,
        flag,
    }
}

/// The device address of `s` (the raw entry's arguments).
pub(crate) fn dev_ptr<T>(g: &Gpu, s: &CudaSlice<T>) -> u64 {
    let (p, _guard) = s.device_ptr(&g.stream);
    p
}

fn run(g: &Gpu, attn: &Attention, c: &DecodeCase, ov: &Overrides) -> DecodeRun {
    match c.dtype {
        DType::F16 => run_t::<f16>(g, attn, c, ov),
        DType::Bf16 => run_t::<bf16>(g, attn, c, ov),
    }
}

impl DecodeCase {
    /// The decoding options of the case: its mask and split count, the default scale.
    pub(crate) fn options(&self) -> DecodeOptions {
        DecodeOptions {
            mask: self.mask,
            num_splits: self.num_splits,
            ..DecodeOptions::default()
        }
    }
}

pub(crate) fn check(g: &Gpu, c: &DecodeCase) -> DecodeRun {
    let r = run(g, &g.attn, c, &Overrides::default());
    assert!(r.cmp.passes, "{c:?}\n  {}", r.cmp);
    assert_eq!(r.flag, 0, "{c:?}: valid cache reported");
    r
}

pub(crate) fn case(head_dim: usize, mask: MaskSpec) -> DecodeCase {
    DecodeCase {
        dtype: DType::Bf16,
        lens: vec![1, 700, 0, 129, 64],
        seqlen_q: 1,
        heads_q: 8,
        heads_kv: 2,
        head_dim,
        page_size: Some(64),
        layout: PagedLayout::TokensMajor,
        share_first_page: true,
        mask,
        num_splits: None,
        seed: head_dim as u64,
    }
}

#[test]
fn decode_by_hand() {
    let g = gpu_or_skip!();
    for dtype in DTYPES {
        for d in DIMS {
            for mask in [
                MaskSpec::none(),
                MaskSpec::causal(),
                MaskSpec::causal_window(100),
            ] {
                for (page_size, layout) in [
                    (Some(16), PagedLayout::TokensMajor),
                    (Some(64), PagedLayout::HeadsMajor),
                    (Some(256), PagedLayout::TokensMajor),
                    (None, PagedLayout::TokensMajor),
                ] {
                    for num_splits in [None, Some(1), Some(3)] {
                        check(
                            g,
                            &DecodeCase {
                                dtype,
                                page_size,
                                layout,
                                num_splits,
                                ..case(d, mask)
                            },
                        );
                    }
                }
            }
        }
    }
}

/// Head dims narrower than the tile widths (padded kernels), paged and contiguous, with splits.
#[test]
fn decode_narrow_head_dims() {
    let g = gpu_or_skip!();
    for d in [16, 80, 96, 100, 112, 160, 192] {
        for (page_size, num_splits) in [(Some(16), Some(3)), (None, Some(1)), (Some(64), None)] {
            check(
                g,
                &DecodeCase {
                    page_size,
                    num_splits,
                    ..case(d, MaskSpec::causal())
                },
            );
        }
    }
}

/// Many splits (17 to 47; one split per 64 keys at most, so caches of 1k to 3k keys), at every
/// kind of head width: the merge takes the splits 32 at a time across the warp's lanes while
/// the lanes also cover the head's elements, four each, so heads narrower than 128 leave lanes
/// without elements that must still take part (the short caches above make at most 11 splits).
#[test]
fn decode_many_splits_every_head_dim() {
    let g = gpu_or_skip!();
    for d in [64, 80, 100, 128, 256] {
        for num_splits in [17, 33, 47] {
            check(
                g,
                &DecodeCase {
                    lens: vec![1, 3000, 0, 1100, 2100],
                    num_splits: Some(num_splits),
                    ..case(d, MaskSpec::causal())
                },
            );
        }
    }
}

/// Several query tokens per sequence (speculative decoding, chunked prefill) and group sizes
/// whose packed rows take one, several or a part of a 16-row tile.
#[test]
fn speculative_tokens_and_gqa_packing() {
    let g = gpu_or_skip!();
    for (seqlen_q, heads_q, heads_kv) in [
        (1, 32, 8),
        (4, 32, 8),
        (16, 32, 8),
        (3, 7, 7),
        (5, 6, 1),
        (16, 8, 1),
        (40, 2, 2),
    ] {
        for mask in [
            MaskSpec::causal(),
            MaskSpec::none(),
            MaskSpec::causal_window(37),
        ] {
            check(
                g,
                &DecodeCase {
                    seqlen_q,
                    heads_q,
                    heads_kv,
                    // A sequence shorter than its query count: its first rows see no key.
                    lens: vec![300, 2, 1000],
                    num_splits: Some(2),
                    ..case(128, mask)
                },
            );
        }
    }
}

/// Many query tokens per sequence (chunked prefill: from 64 tokens the plan runs the dense
/// forward's tiles over rows gathered from the pages) over every page size, both page layouts,
/// contiguous caches, masks, GQA, narrow heads, and sequences shorter than their query count or
/// empty.
#[test]
fn chunked_prefill_over_the_cache() {
    let g = gpu_or_skip!();
    for (page_size, layout) in [
        (Some(16), PagedLayout::TokensMajor),
        (Some(64), PagedLayout::HeadsMajor),
        (Some(256), PagedLayout::TokensMajor),
        (None, PagedLayout::TokensMajor),
    ] {
        for (seqlen_q, d) in [(64, 128), (100, 64), (300, 96), (80, 100), (129, 256)] {
            for mask in [
                MaskSpec::causal(),
                MaskSpec::none(),
                MaskSpec::causal_window(90),
            ] {
                check(
                    g,
                    &DecodeCase {
                        seqlen_q,
                        page_size,
                        layout,
                        mask,
                        heads_q: 6,
                        heads_kv: 2,
                        lens: vec![700, 0, 30, 1000],
                        ..case(d, mask)
                    },
                );
            }
        }
    }
}

/// Rows past each sequence's length hold NaN and the table entries past its last page point
/// outside the cache, sequences of 0 to 700 keys sharing one launch (so most splits of the
/// short ones cover keys past their length): the output matches the reference of the clean
/// cache and nothing is reported, for single and several splits, paged and contiguous caches,
/// GQA and MHA, and a padded head dim.
#[test]
fn rows_and_pages_past_the_length_are_never_used() {
    let g = gpu_or_skip!();
    for (d, page_size, heads_kv) in [
        (64, Some(16), 2),
        (128, Some(64), 8),
        (128, None, 2),
        (100, None, 1),
    ] {
        for (seqlen_q, num_splits) in [(1, None), (1, Some(4)), (3, Some(1)), (2, Some(16))] {
            let c = DecodeCase {
                lens: vec![700, 37, 0, 256, 129, 16],
                seqlen_q,
                heads_kv,
                page_size,
                share_first_page: false,
                num_splits,
                ..case(d, MaskSpec::causal())
            };
            let data = case_data::<bf16>(&c);
            let (poisoned, table) = poison_past_lengths(&c, &data);
            let (ref64, lowp) = references(&c, &data);
            let opts = c.options();
            let ov = Overrides {
                block_table: Some(&table),
                ..Overrides::default()
            };
            let (out, lse, flag) = run_on_gpu(g, &c, &poisoned, &ov, |q, cache, out, f| {
                g.attn.decode(&g.stream, q, cache, out, Some(f), &opts)
            });
            let cmp = compare(&out, Some(&lse), &ref64, &lowp);
            assert!(cmp.passes, "{c:?}\n  {cmp}");
            assert_eq!(flag, 0, "{c:?}: entries past the lengths reported");
        }
    }
}

/// Cache lengths and table entries the kernel cannot trust: negative, past the table's
/// capacity, pages past the cache. The call stays inside the cache (memcheck checks that under
/// compute-sanitizer), sets the flag, writes finite values, and leaves the valid sequence 0
/// as it was.
#[test]
fn bad_lengths_and_pages_are_clamped_and_reported() {
    let g = gpu_or_skip!();
    let c = DecodeCase {
        lens: vec![200, 150, 90],
        seqlen_q: 2,
        share_first_page: false,
        ..case(64, MaskSpec::causal())
    };
    let shape = case_data::<bf16>(&c).shape;
    let good = check(g, &c);
    let mp = shape.max_pages_per_seq;
    let capacity = (mp * 64) as i32;
    let mut table_bad_page = shape.block_table.clone();
    table_bad_page[mp] = shape.num_pages as i32; // sequence 1, first page: one past the cache
    let mut table_negative = shape.block_table.clone();
    table_negative[2 * mp + 1] = -7; // sequence 2, second page
    let mut table_huge = shape.block_table.clone();
    table_huge[mp + 2] = i32::MAX; // sequence 1, third page
    let lens_neg = [200, -1, 90];
    let lens_over = [200, 150, capacity + 1];
    let lens_huge = [200, i32::MAX, i32::MIN];
    let cases: [Overrides; 6] = [
        Overrides {
            block_table: Some(&table_bad_page),
            ..Overrides::default()
        },
        Overrides {
            block_table: Some(&table_negative),
            ..Overrides::default()
        },
        Overrides {
            block_table: Some(&table_huge),
            ..Overrides::default()
        },
        Overrides {
            cache_seqlens: Some(&lens_neg),
            ..Overrides::default()
        },
        Overrides {
            cache_seqlens: Some(&lens_over),
            ..Overrides::default()
        },
        Overrides {
            cache_seqlens: Some(&lens_huge),
            ..Overrides::default()
        },
    ];
    for (i, ov) in cases.iter().enumerate() {
        // The decoding kernel (2 tokens, fixed splits) and the chunked-prefill kernel (70
        // tokens, the plan's choice).
        for (seqlen_q, num_splits) in [(2, Some(1)), (2, Some(4)), (70, None)] {
            let cs = DecodeCase {
                seqlen_q,
                num_splits,
                ..c.clone()
            };
            let r = run(g, &g.attn, &cs, ov);
            assert_eq!(
                r.flag, 1,
                "case {i} {seqlen_q} {num_splits:?}: not reported"
            );
            assert!(
                r.out.iter().all(|x| x.is_finite()),
                "case {i}: non-finite output"
            );
            let n = cs.seqlen_q * cs.heads_q * cs.head_dim;
            let rg = run(g, &g.attn, &cs, &Overrides::default());
            assert!(r.out[..n] == rg.out[..n], "case {i}: sequence 0 changed");
        }
    }
    assert!(good.out.iter().all(|x| x.is_finite()));
}

fn arb_decode_case() -> impl Strategy<Value = DecodeCase> {
    let len = prop_oneof![
        Just(0usize),
        Just(1),
        Just(15),
        Just(16),
        Just(17),
        Just(64),
        1usize..2000
    ];
    (
        prop_oneof![Just(DType::F16), Just(DType::Bf16)],
        proptest::collection::vec(len, 1..5),
        prop_oneof![Just(1usize), Just(2), 1usize..17],
        prop_oneof![
            Just((1usize, 1usize)),
            Just((4, 1)),
            Just((8, 2)),
            Just((6, 3)),
            Just((32, 4))
        ],
        prop_oneof![Just(64usize), Just(128), Just(256)],
        prop_oneof![
            Just(None),
            Just(Some(16usize)),
            Just(Some(32)),
            Just(Some(128))
        ],
        any::<bool>(),
        prop_oneof![
            Just(MaskSpec::none()),
            Just(MaskSpec::causal()),
            (1u32..300).prop_map(MaskSpec::causal_window),
        ],
        prop_oneof![Just(None), (1usize..40).prop_map(Some)],
        any::<u64>(),
    )
        .prop_map(
            |(
                dtype,
                lens,
                seqlen_q,
                (heads_q, heads_kv),
                head_dim,
                page_size,
                hm,
                mask,
                ns,
                seed,
            )| {
                DecodeCase {
                    dtype,
                    lens,
                    seqlen_q,
                    heads_q,
                    heads_kv,
                    head_dim,
                    page_size,
                    layout: if hm {
                        PagedLayout::HeadsMajor
                    } else {
                        PagedLayout::TokensMajor
                    },
                    share_first_page: hm,
                    mask,
                    num_splits: ns,
                    seed,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn decode_kernel_matches_reference(c in arb_decode_case()) {
        let Some(g) = gpu() else {
            say_skipped("decode_kernel_matches_reference");
            return Ok(());
        };
        let r = run(g, &g.attn, &c, &Overrides::default());
        prop_assert!(r.cmp.passes, "{:?}\n  {}", c, r.cmp);
        prop_assert_eq!(r.flag, 0);
    }
}
