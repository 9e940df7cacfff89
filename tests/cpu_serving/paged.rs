//! The paged cache: identity tables equal the contiguous cache, pages in any order or shared give
//! each sequence its own cache, decoding queries are the last positions, and malformed
//! descriptions or caches are typed rejections.

use super::*;

/// A paged problem built in the test: a pool of pages, stored token-major
/// (`[num_pages, page_size, heads_kv, head_dim]`), and the shape that describes it.
struct Paged<T> {
    shape: PagedShape,
    q: (Vec<T>, Vec<f64>),
    k_pool: (Vec<T>, Vec<f64>),
    v_pool: (Vec<T>, Vec<f64>),
}

/// `pool` (token-major) in `layout` order, by explicit index arithmetic.
fn in_layout<E: Copy>(pool: &[E], s: &PagedShape, layout: PagedLayout) -> Vec<E> {
    let (ps, hk, d) = (s.page_size, s.heads_kv, s.head_dim);
    match layout {
        PagedLayout::TokensMajor => pool.to_vec(),
        PagedLayout::HeadsMajor => {
            let mut out = Vec::with_capacity(pool.len());
            for page in 0..s.num_pages {
                for h in 0..hk {
                    for slot in 0..ps {
                        let o = ((page * ps + slot) * hk + h) * d;
                        out.extend_from_slice(&pool[o..o + d]);
                    }
                }
            }
            out
        }
    }
}

/// Sequence `b`'s keys (or values) read straight off the token-major pool: token `j` is slot
/// `j % page_size` of the `j / page_size`-th page of its table row.
fn own_cache<E: Copy>(pool: &[E], s: &PagedShape, b: usize) -> Vec<E> {
    let row = s.page_size * s.heads_kv * s.head_dim;
    let table = &s.block_table[b * s.max_pages_per_seq..(b + 1) * s.max_pages_per_seq];
    let n = s.cache_seqlens[b] as usize * s.heads_kv * s.head_dim;
    table
        .iter()
        .take_while(|&&p| p >= 0)
        .flat_map(|&p| {
            pool[p as usize * row..(p as usize + 1) * row]
                .iter()
                .copied()
        })
        .take(n)
        .collect()
}

/// Pages the sequences with the given cache lengths: each sequence gets fresh pages, except that
/// a sequence marked in `share` starts with the previous sequence's full pages, as many as it
/// uses (a shared prefix); `spare` unused pages are added, and unused table entries are -1.
#[allow(clippy::too_many_arguments)]
fn paged<T: Element>(
    lens: &[usize],
    share: &[bool],
    spare: usize,
    seqlen_q: usize,
    page_size: usize,
    (heads_q, heads_kv): (usize, usize),
    head_dim: usize,
    seed: u64,
) -> Paged<T> {
    let used: Vec<usize> = lens.iter().map(|&l| l.div_ceil(page_size)).collect();
    let max_pages = used.iter().copied().max().unwrap_or(0) + 1;
    let mut table = vec![-1i32; lens.len() * max_pages];
    let mut next = 0i32;
    for b in 0..lens.len() {
        let shared = if b > 0 && share[b] {
            used[b].min(lens[b - 1] / page_size)
        } else {
            0
        };
        for p in 0..used[b] {
            table[b * max_pages + p] = if p < shared {
                table[(b - 1) * max_pages + p]
            } else {
                next += 1;
                next - 1
            };
        }
    }
    let shape = PagedShape {
        batch: lens.len(),
        seqlen_q,
        heads_q,
        heads_kv,
        head_dim,
        num_pages: next as usize + spare,
        page_size,
        max_pages_per_seq: max_pages,
        layout: PagedLayout::TokensMajor,
        block_table: table,
        cache_seqlens: lens.iter().map(|&l| l as i32).collect(),
    };
    let mut rng = Rng(seed);
    let pool = shape.cache_len().unwrap();
    Paged {
        q: data::<T>(&mut rng, shape.q_len().unwrap(), 1.0),
        k_pool: data::<T>(&mut rng, pool, 1.0),
        v_pool: data::<T>(&mut rng, pool, 2.0),
        shape,
    }
}

/// Runs the paged references (f64 and `T`) on `p`'s pool in `layout`.
fn run_paged<T: Element>(
    p: &Paged<T>,
    layout: PagedLayout,
    mask: &MaskSpec,
    scale: f32,
) -> (RefOutput, RefOutput) {
    let s = PagedShape {
        layout,
        ..p.shape.clone()
    };
    let r64 = paged_attention_f64(
        &s,
        &p.q.1,
        &in_layout(&p.k_pool.1, &s, layout),
        &in_layout(&p.v_pool.1, &s, layout),
        mask,
        f64::from(scale),
    )
    .unwrap();
    let low = paged_attention_lowp(
        &s,
        &p.q.0,
        &in_layout(&p.k_pool.0, &s, layout),
        &in_layout(&p.v_pool.0, &s, layout),
        mask,
        scale,
    )
    .unwrap();
    (r64, low)
}

/// The rows of sequence `b` of a paged result, laid out as the dense reference's batch 1.
fn paged_sequence(s: &PagedShape, r: &RefOutput, b: usize) -> RefOutput {
    let n = s.seqlen_q * s.heads_q * s.head_dim;
    let l = s.heads_q * s.seqlen_q;
    RefOutput {
        out: r.out[b * n..(b + 1) * n].to_vec(),
        lse: r.lse[b * l..(b + 1) * l].to_vec(),
        unrounded: if r.unrounded.is_empty() {
            Vec::new()
        } else {
            r.unrounded[b * n..(b + 1) * n].to_vec()
        },
        spread: if r.spread.is_empty() {
            Vec::new()
        } else {
            r.spread[b * n..(b + 1) * n].to_vec()
        },
        dtype: r.dtype,
    }
}

/// Checks each sequence of `p` against the dense reference on its own keys (read off the pool
/// by the test), in both layouts, and checks `paged_gather` returns those keys.
fn check_paged<T: Element>(p: &Paged<T>, mask: &MaskSpec, scale: f32) -> Result<(), String> {
    let s = &p.shape;
    let n = s.seqlen_q * s.heads_q * s.head_dim;
    for layout in LAYOUTS {
        let (r64, low) = run_paged(p, layout, mask, scale);
        let sl = PagedShape {
            layout,
            ..s.clone()
        };
        let (kc, vc) = (
            in_layout(&p.k_pool.0, s, layout),
            in_layout(&p.v_pool.0, s, layout),
        );
        for b in 0..s.batch {
            let (k, v) = (own_cache(&p.k_pool.0, s, b), own_cache(&p.v_pool.0, s, b));
            let (gk, gv) = paged_gather(&sl, &kc, &vc, b).map_err(|e| e.to_string())?;
            if widen(&gk) != widen(&k) || widen(&gv) != widen(&v) {
                return Err(format!("{layout:?}: paged_gather of sequence {b} differs"));
            }
            let rs = s.ref_shape(b);
            let q = &p.q.0[b * n..(b + 1) * n];
            let want_low = attention_lowp(&rs, q, &k, &v, mask, scale).unwrap();
            let (q, k, v) = (widen(q), widen(&k), widen(&v));
            let want64 = attention_f64(&rs, &q, &k, &v, mask, f64::from(scale)).unwrap();
            for (got, want, what) in [(&r64, &want64, "f64"), (&low, &want_low, "lowp")] {
                if let Some(d) = same_output(&paged_sequence(s, got, b), want) {
                    return Err(format!(
                        "{layout:?}, sequence {b} ({} keys), {what}: {d}",
                        s.cache_seqlens[b]
                    ));
                }
            }
        }
    }
    Ok(())
}

#[test]
fn identity_block_table_matches_the_dense_reference_on_the_contiguous_cache() {
    let (batch, seqlen_k, d) = (3, 12, 8);
    for page_size in [1, 2, 3, 4, 6, 12] {
        for seqlen_q in [1, 4] {
            for mask in [MaskSpec::none(), MaskSpec::causal()] {
                let p = paged::<f16>(
                    &[seqlen_k; 3],
                    &[false; 3],
                    0,
                    seqlen_q,
                    page_size,
                    (4, 2),
                    d,
                    page_size as u64,
                );
                let s = &p.shape;
                let pages = seqlen_k / page_size;
                // Sequence b owns pages b * pages.. in order: the pool, token-major, is the
                // dense [batch, seqlen_k, heads_kv, head_dim] cache itself.
                for b in 0..batch {
                    for j in 0..pages {
                        assert_eq!(
                            s.block_table[b * s.max_pages_per_seq + j],
                            (b * pages + j) as i32
                        );
                    }
                }
                let dense = RefShape {
                    batch,
                    seqlen_q,
                    seqlen_k,
                    heads_q: 4,
                    heads_kv: 2,
                    head_dim: d,
                };
                let (q, k, v) = (&p.q.1, &p.k_pool.1, &p.v_pool.1);
                let want64 = attention_f64(&dense, q, k, v, &mask, f64::from(0.3f32)).unwrap();
                let want_low =
                    attention_lowp(&dense, &p.q.0, &p.k_pool.0, &p.v_pool.0, &mask, 0.3).unwrap();
                for layout in LAYOUTS {
                    let (r64, low) = run_paged(&p, layout, &mask, 0.3);
                    let ctx = format!("page {page_size} sq {seqlen_q} {layout:?} {mask:?}");
                    assert_same(&r64, &want64, &ctx);
                    assert_same(&low, &want_low, &ctx);
                }
            }
        }
    }
}

#[test]
fn shared_prefix_pages_serve_each_sequence_its_own_cache() {
    // Pages of 4: sequence 0 reads pages A B C (10 keys), sequence 1 reads A B D (11 keys).
    let p = paged::<bf16>(&[10, 11], &[false, true], 1, 2, 4, (2, 1), 16, 99);
    let s = &p.shape;
    assert_eq!(&s.block_table[..3], &[0, 1, 2]);
    assert_eq!(&s.block_table[4..7], &[0, 1, 3]);
    check_paged(&p, &MaskSpec::causal(), 0.25).unwrap();

    // The same problem with sequence 1's prefix copied to pages of its own (5 and 6, after the
    // spare page 4) gives bit for bit the same result.
    let row = s.page_size * s.heads_kv * s.head_dim;
    let mut copied = Paged {
        shape: PagedShape {
            num_pages: s.num_pages + 2,
            ..s.clone()
        },
        q: p.q.clone(),
        k_pool: p.k_pool.clone(),
        v_pool: p.v_pool.clone(),
    };
    copied.shape.block_table[4..6].copy_from_slice(&[5, 6]);
    for pool in [&mut copied.k_pool, &mut copied.v_pool] {
        pool.0.extend_from_within(..2 * row);
        pool.1.extend_from_within(..2 * row);
    }
    for layout in LAYOUTS {
        let (a64, alow) = run_paged(&p, layout, &MaskSpec::causal(), 0.25);
        let (b64, blow) = run_paged(&copied, layout, &MaskSpec::causal(), 0.25);
        assert_same(&a64, &b64, "copied prefix, f64");
        assert_same(&alow, &blow, "copied prefix, lowp");
        // And the two sequences do see different caches.
        assert_ne!(
            paged_sequence(s, &a64, 0).out,
            paged_sequence(s, &a64, 1).out
        );
    }

    // The paged outputs go through `compare` as they stand.
    let (r64, low) = run_paged(&p, PagedLayout::TokensMajor, &MaskSpec::causal(), 0.25);
    let lse: Vec<f32> = low.lse.iter().map(|&x| x as f32).collect();
    let c = compare(&low.out, Some(&lse), &r64, &low);
    assert!(c.passes, "{c}");
}

/// The cache lengths around a page boundary, by index: 0, 1, page_size - 1, page_size,
/// page_size + 1, and two pages and a bit.
fn boundary_len(page_size: usize, pick: usize) -> usize {
    [
        0,
        1,
        page_size - 1,
        page_size,
        page_size + 1,
        2 * page_size + 3,
    ][pick]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn pages_in_any_order_and_shared_pages_give_each_sequence_its_own_cache(
        page_size in prop::sample::select(vec![1usize, 2, 16, 64]),
        picks in prop::collection::vec((0usize..6, any::<bool>()), 1..=4),
        spare in 0usize..=2,
        seqlen_q in 1usize..=3,
        (heads_q, heads_kv) in heads(),
        m in mask(),
        seed in any::<u64>(),
    ) {
        let lens: Vec<usize> = picks.iter().map(|&(i, _)| boundary_len(page_size, i)).collect();
        let share: Vec<bool> = picks.iter().map(|&(_, s)| s).collect();
        let p = paged::<bf16>(&lens, &share, spare, seqlen_q, page_size, (heads_q, heads_kv), 8, seed);
        let r = check_paged(&p, &m, 0.35);
        prop_assert!(r.is_ok(), "{:?}", r);

        // Move every page somewhere else (page p of the pool goes to perm[p]) and rewrite the
        // table to match: the results are bit for bit the same.
        let s = &p.shape;
        let perm = Rng(seed ^ 0x5eed).perm(s.num_pages);
        let row = s.page_size * s.heads_kv * s.head_dim;
        let move_pages = |pool: &(Vec<bf16>, Vec<f64>)| {
            let mut moved = pool.clone();
            for (from, &to) in perm.iter().enumerate() {
                moved.0[to * row..(to + 1) * row].copy_from_slice(&pool.0[from * row..(from + 1) * row]);
                moved.1[to * row..(to + 1) * row].copy_from_slice(&pool.1[from * row..(from + 1) * row]);
            }
            moved
        };
        let mut shape = s.clone();
        for t in &mut shape.block_table {
            if *t >= 0 {
                *t = perm[*t as usize] as i32;
            }
        }
        let moved = Paged { shape, q: p.q.clone(), k_pool: move_pages(&p.k_pool), v_pool: move_pages(&p.v_pool) };
        for layout in LAYOUTS {
            let (a64, alow) = run_paged(&p, layout, &m, 0.35);
            let (b64, blow) = run_paged(&moved, layout, &m, 0.35);
            prop_assert!(same_output(&b64, &a64).is_none(), "{:?}", same_output(&b64, &a64));
            prop_assert!(same_output(&blow, &alow).is_none(), "{:?}", same_output(&blow, &alow));
        }
    }
}

#[test]
fn decoding_queries_are_the_last_positions_of_each_sequence() {
    let lens = [0, 1, 5, 16, 17, 40];
    let d = 16;
    for seqlen_q in 1..=16 {
        for mask in [MaskSpec::causal(), MaskSpec::causal_window(7)] {
            let p = paged::<f16>(
                &lens,
                &[false; 6],
                1,
                seqlen_q,
                16,
                (8, 2),
                d,
                seqlen_q as u64,
            );
            check_paged(&p, &mask, 0.25).unwrap();
            if mask != MaskSpec::causal() {
                continue;
            }
            // Bottom-right causal: query i of a sequence of L keys is at position
            // L - seqlen_q + i and sees exactly the keys up to it; those before the cache
            // starts see none.
            let s = &p.shape;
            let (r64, _) = run_paged(&p, PagedLayout::HeadsMajor, &mask, 0.25);
            for (b, &len) in lens.iter().enumerate() {
                let (k, v) = (own_cache(&p.k_pool.1, s, b), own_cache(&p.v_pool.1, s, b));
                for i in 0..seqlen_q {
                    let sees = (len + i + 1).saturating_sub(seqlen_q);
                    let one = RefShape {
                        batch: 1,
                        seqlen_q: 1,
                        seqlen_k: sees,
                        heads_q: 8,
                        heads_kv: 2,
                        head_dim: d,
                    };
                    let mut q = Vec::new();
                    for h in 0..8 {
                        let o = ((b * seqlen_q + i) * 8 + h) * d;
                        q.extend_from_slice(&p.q.1[o..o + d]);
                    }
                    let n = sees * 2 * d;
                    let want =
                        attention_f64(&one, &q, &k[..n], &v[..n], &MaskSpec::none(), 0.25).unwrap();
                    for h in 0..8 {
                        let o = ((b * seqlen_q + i) * 8 + h) * d;
                        assert_eq!(
                            &r64.out[o..o + d],
                            &want.out[h * d..(h + 1) * d],
                            "sq {seqlen_q} seq {b} query {i} head {h}"
                        );
                        assert_eq!(
                            r64.lse[(b * 8 + h) * seqlen_q + i].to_bits(),
                            want.lse[h].to_bits(),
                            "sq {seqlen_q} seq {b} query {i} head {h}"
                        );
                        if sees == 0 {
                            assert_eq!(want.lse[h], f64::NEG_INFINITY);
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn paged_rejects_malformed_descriptions_and_caches() {
    // Pages of 4, two sequences of 6 and 0 keys over at most 2 pages each; 3 pages in all.
    let good = PagedShape {
        batch: 2,
        seqlen_q: 1,
        heads_q: 2,
        heads_kv: 1,
        head_dim: 8,
        num_pages: 3,
        page_size: 4,
        max_pages_per_seq: 2,
        layout: PagedLayout::TokensMajor,
        block_table: vec![2, 0, -1, 7],
        cache_seqlens: vec![6, 0],
    };
    good.validate().unwrap();
    let cache = vec![0.0f64; 3 * 4 * 8];
    let q = vec![0.0f64; 2 * 2 * 8];
    let m = MaskSpec::causal();
    paged_attention_f64(&good, &q, &cache, &cache, &m, 1.0).unwrap();
    let with = |f: &dyn Fn(&mut PagedShape)| {
        let mut s = good.clone();
        f(&mut s);
        s
    };
    // Entries past a sequence's used pages are never read, whatever they hold (in `good`,
    // -1 and 7); a sequence may fill all its pages.
    for s in [
        with(&|s| {
            s.cache_seqlens = vec![4, 0];
            s.block_table[1] = i32::MIN;
        }),
        with(&|s| s.cache_seqlens = vec![8, 0]),
    ] {
        s.validate().unwrap();
        paged_attention_f64(&s, &q, &cache, &cache, &m, 1.0).unwrap();
    }
    let cases: Vec<(&str, PagedShape)> = vec![
        ("page_size", with(&|s| s.page_size = 0)),
        ("block_table.len", with(&|s| s.block_table.push(0))),
        ("block_table.len", with(&|s| s.max_pages_per_seq = 3)),
        ("cache_seqlens.len", with(&|s| s.cache_seqlens = vec![6])),
        ("cache_seqlens", with(&|s| s.cache_seqlens = vec![-1, 0])),
        ("cache_seqlens", with(&|s| s.cache_seqlens = vec![6, 9])),
        ("block_table", with(&|s| s.block_table[1] = -1)),
        ("block_table", with(&|s| s.block_table[0] = 3)),
        ("block_table", with(&|s| s.cache_seqlens = vec![6, 1])),
        (
            "heads_q",
            with(&|s| {
                s.heads_q = 3;
                s.heads_kv = 2;
            }),
        ),
        ("heads_q", with(&|s| s.heads_q = 0)),
        ("heads_kv", with(&|s| s.heads_kv = 0)),
        ("head_dim", with(&|s| s.head_dim = 0)),
        ("shape", with(&|s| s.num_pages = usize::MAX)),
    ];
    for (arg, s) in &cases {
        assert_eq!(arg_of(s.validate()), *arg, "{s:?}");
        assert_eq!(arg_of(paged_gather(s, &cache, &cache, 0)), *arg, "{s:?}");
        assert_eq!(
            arg_of(paged_attention_f64(s, &q, &cache, &cache, &m, 1.0)),
            *arg
        );
        let (lq, lc) = (round::<bf16>(&q), round::<bf16>(&cache));
        assert_eq!(
            arg_of(paged_attention_lowp(s, &lq, &lc, &lc, &m, 1.0)),
            *arg
        );
    }

    // Caches and queries of the wrong length, and a sequence out of range.
    let short = &cache[1..];
    assert_eq!(arg_of(paged_gather(&good, short, &cache, 0)), "k_cache.len");
    assert_eq!(arg_of(paged_gather(&good, &cache, short, 0)), "v_cache.len");
    assert_eq!(arg_of(paged_gather(&good, &cache, &cache, 2)), "seq");
    assert_eq!(
        arg_of(paged_attention_f64(&good, &q, short, &cache, &m, 1.0)),
        "k_cache.len"
    );
    assert_eq!(
        arg_of(paged_attention_f64(&good, &q, &cache, &q, &m, 1.0)),
        "v_cache.len"
    );
    assert_eq!(
        arg_of(paged_attention_f64(&good, &q[..8], &cache, &cache, &m, 1.0)),
        "q.len"
    );
    let (lq, lc) = (round::<f16>(&q), round::<f16>(&cache));
    assert_eq!(
        arg_of(paged_attention_lowp(&good, &lq, &lc, &lc[..95], &m, 1.0)),
        "v_cache.len"
    );
    // With the right lengths, sequence 1 (no keys) gives 0 and -inf.
    let r = paged_attention_lowp(&good, &lq, &lc, &lc, &m, 1.0).unwrap();
    assert!(r.out[16..].iter().all(|&x| x == 0.0));
    assert!(r.lse[2..].iter().all(|&l| l == f64::NEG_INFINITY));
}
