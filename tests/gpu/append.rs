//! KV append against the same writes done on the host: new tokens land at each sequence's
//! length, in its pages (both page layouts) or its contiguous rows, nothing else of the cache
//! changes, rotated keys match a rotation in f64 to the element type's rounding, and tokens the
//! device values would place outside the cache are skipped and reported (run under
//! compute-sanitizer memcheck).

use cudarc::driver::CudaSlice;
use half::bf16;
use longflash::reference::PagedLayout;
use longflash::rope::{rotate, PositionMode, RopeConfig, RopeLayout, RopeOptions};
use longflash::{BlockTable, KvCacheMut, Layout};

use crate::common::Rng;
use crate::common::*;
use crate::decode::{cache_shape, case, DecodeCase};

struct AppendRun {
    k: Vec<bf16>,
    v: Vec<bf16>,
    flag: i32,
}

/// Appends `n_new` random tokens per sequence to the case's cache (lengths `lens`, table
/// `table`: the case's own unless given) and returns the caches as the GPU left them, with the
/// host's expectation of them (keys rotated by `rope` when given, in f64 then rounded).
fn run_append(
    g: &Gpu,
    c: &DecodeCase,
    n_new: usize,
    lens: Option<&[i32]>,
    table: Option<&[i32]>,
    rope: Option<&RopeOptions>,
) -> (AppendRun, AppendRun) {
    let mut rng = Rng(c.seed);
    let (shape, layout) = cache_shape(c, &mut rng);
    let mut gen = |n: usize| -> Vec<bf16> {
        (0..n)
            .map(|_| bf16::from_f32(rng.normal() as f32))
            .collect()
    };
    let cache_len = shape.cache_len().unwrap();
    let (k0, v0) = (gen(cache_len), gen(cache_len));
    let new_layout = Layout::bshd(shape.batch, n_new, c.heads_kv, c.head_dim);
    let (kn, vn) = (gen(new_layout.numel()), gen(new_layout.numel()));
    let lens = lens.unwrap_or(&shape.cache_seqlens);
    let table = table.unwrap_or(&shape.block_table);

    // The host's writes.
    let (mut ek, mut ev) = (k0.clone(), v0.clone());
    let mut eflag = 0;
    let paged = c.page_size.is_some();
    let capacity = (shape.max_pages_per_seq * shape.page_size) as i64;
    let d = c.head_dim;
    let inv_freq = rope.map(|r| {
        r.config
            .inv_freq(d, capacity as usize + r.max_offset() as usize)
            .unwrap()
    });
    for b in 0..shape.batch {
        for t in 0..n_new {
            let slot = lens[b] as i64 + t as i64;
            if slot < 0 || slot >= capacity {
                eflag = 1;
                continue;
            }
            let page = if paged {
                let e = table[b * shape.max_pages_per_seq + slot as usize / shape.page_size];
                if e < 0 || e as usize >= shape.num_pages {
                    eflag = 1;
                    continue;
                }
                e as usize
            } else {
                b
            };
            for h in 0..c.heads_kv {
                let dst = shape.cache_offset(page, slot as usize % shape.page_size, h);
                let src = (b * n_new + t) * c.heads_kv * d + h * d;
                let mut key: Vec<bf16> = kn[src..src + d].to_vec();
                if let (Some(r), Some(f)) = (rope, &inv_freq) {
                    let mut x: Vec<f64> = key.iter().map(|e| e.to_f32() as f64).collect();
                    let pos = r.key_position(b, slot as usize) as f64;
                    rotate(&mut x, pos, f, r.config.layout, r.config.attention_factor());
                    key = x.iter().map(|&e| bf16::from_f64(e)).collect();
                }
                ek[dst..dst + d].copy_from_slice(&key);
                ev[dst..dst + d].copy_from_slice(&vn[src..src + d]);
            }
        }
    }

    // The GPU's.
    let mut dk: CudaSlice<bf16> = g.stream.clone_htod(&k0).unwrap();
    let mut dv: CudaSlice<bf16> = g.stream.clone_htod(&v0).unwrap();
    let (dkn, dvn) = (
        g.stream.clone_htod(&kn).unwrap(),
        g.stream.clone_htod(&vn).unwrap(),
    );
    let (dt, dl) = (
        g.stream.clone_htod(table).unwrap(),
        g.stream.clone_htod(lens).unwrap(),
    );
    let mut dflag: CudaSlice<i32> = g.stream.alloc_zeros(1).unwrap();
    {
        let (knv, vnv, tv, lv) = (dkn.as_view(), dvn.as_view(), dt.as_view(), dl.as_view());
        let (mut kv, mut vv, mut fv) = (dk.as_view_mut(), dv.as_view_mut(), dflag.as_view_mut());
        let mut cache = KvCacheMut {
            k: &mut kv,
            k_layout: layout,
            v: &mut vv,
            v_layout: layout,
            block_table: c.page_size.map(|_| BlockTable {
                table: &tv,
                max_pages_per_seq: shape.max_pages_per_seq,
            }),
            cache_seqlens: &lv,
        };
        let r = match rope {
            None => g.attn.append_kv(
                &g.stream,
                (&knv, new_layout),
                (&vnv, new_layout),
                &mut cache,
                Some(&mut fv),
            ),
            Some(ro) => g.attn.append_kv_rope(
                &g.stream,
                (&knv, new_layout),
                (&vnv, new_layout),
                &mut cache,
                Some(&mut fv),
                ro,
            ),
        };
        r.unwrap_or_else(|e| panic!("{c:?}: {e}"));
    }
    let got = AppendRun {
        k: g.stream.clone_dtoh(&dk).unwrap(),
        v: g.stream.clone_dtoh(&dv).unwrap(),
        flag: g.stream.clone_dtoh(&dflag).unwrap()[0],
    };
    (
        got,
        AppendRun {
            k: ek,
            v: ev,
            flag: eflag,
        },
    )
}

fn append_case(page_size: Option<usize>, layout: PagedLayout, d: usize) -> DecodeCase {
    DecodeCase {
        page_size,
        layout,
        share_first_page: false,
        heads_kv: 3,
        ..case(d, longflash::MaskSpec::causal())
    }
}

const CACHES: [(Option<usize>, PagedLayout); 4] = [
    (Some(16), PagedLayout::TokensMajor),
    (Some(64), PagedLayout::HeadsMajor),
    (Some(256), PagedLayout::TokensMajor),
    (None, PagedLayout::TokensMajor),
];

#[test]
fn append_writes_the_new_tokens_and_nothing_else() {
    let g = gpu_or_skip!();
    for (ps, layout) in CACHES {
        for d in DIMS {
            for n_new in [1, 3, 5] {
                let c = append_case(ps, layout, d);
                let (got, want) = run_append(g, &c, n_new, None, None, None);
                assert_eq!(got.flag, 0, "{c:?} {n_new}: reported");
                assert_eq!(want.flag, 0);
                assert!(got.k == want.k, "{c:?} {n_new}: keys");
                assert!(got.v == want.v, "{c:?} {n_new}: values");
            }
        }
    }
}

#[test]
fn append_rope_rotates_the_keys_to_their_positions() {
    let g = gpu_or_skip!();
    for (ps, layout) in CACHES {
        for d in DIMS {
            let mut rope = RopeOptions::new(RopeConfig::llama(d), PositionMode::Rope);
            if d == 64 {
                rope.config.layout = RopeLayout::Interleaved;
                rope.config.rotary_dim = 32;
                rope.position_offsets = Some(vec![7, 100_000, 3, 0, 5]);
            }
            let c = append_case(ps, layout, d);
            let (got, want) = run_append(g, &c, 4, None, None, Some(&rope));
            assert_eq!(got.flag, 0, "{c:?}: reported");
            assert!(got.v == want.v, "{c:?}: values");
            // Keys: the same rounding up to one bf16 step (the GPU's angles are f32 sines of an
            // f64-reduced angle).
            for (i, (a, b)) in got.k.iter().zip(&want.k).enumerate() {
                let (a, b) = (a.to_f32(), b.to_f32());
                let step = b.abs().max(1e-3) * 2f32.powi(-7);
                assert!((a - b).abs() <= step, "{c:?}: key element {i}: {a} vs {b}");
            }
        }
    }
}

/// Lengths and table entries the kernel cannot trust: tokens past the capacity, negative
/// lengths, pages outside the cache. They are skipped (the rest written), and reported.
#[test]
fn append_out_of_range_tokens_are_skipped_and_reported() {
    let g = gpu_or_skip!();
    let c = append_case(Some(64), PagedLayout::TokensMajor, 64);
    let mut rng = Rng(c.seed);
    let (shape, _) = cache_shape(&c, &mut rng);
    let capacity = (shape.max_pages_per_seq * 64) as i32;
    let mp = shape.max_pages_per_seq;
    let mut bad_table = shape.block_table.clone();
    bad_table[mp + 700 / 64] = shape.num_pages as i32; // sequence 1's page for slots 700..
    bad_table[3 * mp + 2] = -1; // sequence 3's page for slots 128..192
                                // (cache lengths, block table), each with some tokens that cannot be placed.
    type Overrides = (Option<Vec<i32>>, Option<Vec<i32>>);
    let cases: [Overrides; 4] = [
        (Some(vec![1, capacity - 2, 0, 129, 64]), None),
        (Some(vec![-3, 700, i32::MIN, 129, i32::MAX]), None),
        (None, Some(bad_table)),
        (
            Some(vec![capacity, capacity + 5, 0, -1, 64]),
            Some(shape.block_table.clone()),
        ),
    ];
    for (lens, table) in &cases {
        let (got, want) = run_append(g, &c, 4, lens.as_deref(), table.as_deref(), None);
        assert_eq!(want.flag, 1, "{lens:?}: the case is not bad");
        assert_eq!(got.flag, 1, "{lens:?}: not reported");
        assert!(got.k == want.k, "{lens:?}: keys");
        assert!(got.v == want.v, "{lens:?}: values");
    }
}
