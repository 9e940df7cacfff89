//! The variable-length (packed) forward against the CPU reference (the dense reference one
//! sequence at a time, `reference::varlen_attention_*`), bit for bit against the dense kernel of
//! the same mainloop (sm_80, and Hopper on an H100/H200) when every sequence has the same length, and with prefix sums that would point outside
//! the tensors: clamped, reported through the error flag, never read or written out of bounds
//! (run under compute-sanitizer memcheck).

use cudarc::driver::CudaSlice;
use half::{bf16, f16};
use longflash::reference::{
    compare, varlen_attention_f64, varlen_attention_lowp, Comparison, VarlenShape,
};
use longflash::{
    Attention, DType, Element, ForwardOptions, Input, Layout, Mainloop, MaskSpec, Output,
    RawVarlenForward, VarlenOptions,
};
use proptest::prelude::*;

use crate::common::*;

/// A packed batch: per-sequence (queries, keys), heads, head dim, mask, element type.
#[derive(Clone, Debug)]
struct VarlenCase {
    dtype: DType,
    lens: Vec<(usize, usize)>,
    heads_q: usize,
    heads_kv: usize,
    head_dim: usize,
    mask: MaskSpec,
    seed: u64,
}

struct VarlenRun {
    cmp: Comparison,
    out: Vec<f64>,
    lse: Vec<f32>,
    flag: i32,
}

fn prefix(lens: impl Iterator<Item = usize>) -> Vec<i32> {
    let mut cu = vec![0i32];
    for l in lens {
        cu.push(cu.last().unwrap() + l as i32);
    }
    cu
}

/// Runs `c` through `attn` (prefix sums `cu` on the device, or the case's own) and compares with
/// the reference of the case's own lengths.
fn run_t<T: Element>(
    g: &Gpu,
    attn: &Attention,
    c: &VarlenCase,
    cu: Option<(&[i32], &[i32])>,
) -> VarlenRun {
    let cu_q = prefix(c.lens.iter().map(|l| l.0));
    let cu_k = prefix(c.lens.iter().map(|l| l.1));
    let (total_q, total_k) = (
        *cu_q.last().unwrap() as usize,
        *cu_k.last().unwrap() as usize,
    );
    let shape = VarlenShape {
        cu_seqlens_q: cu_q.clone(),
        cu_seqlens_k: cu_k.clone(),
        heads_q: c.heads_q,
        heads_kv: c.heads_kv,
        head_dim: c.head_dim,
    };
    let mut rng = Rng(c.seed);
    let mut gen =
        |n: usize| -> Vec<T> { (0..n).map(|_| T::from_f32(rng.normal() as f32)).collect() };
    let (q, k, v) = (
        gen(total_q * c.heads_q * c.head_dim),
        gen(total_k * c.heads_kv * c.head_dim),
        gen(total_k * c.heads_kv * c.head_dim),
    );
    let wide = |x: &[T]| -> Vec<f64> { x.iter().map(|t| t.to_f32() as f64).collect() };
    let scale = 1.0 / (c.head_dim as f32).sqrt();
    let ref64 = varlen_attention_f64(
        &shape,
        &wide(&q),
        &wide(&k),
        &wide(&v),
        &c.mask,
        scale as f64,
    )
    .unwrap();
    let lowp = varlen_attention_lowp(&shape, &q, &k, &v, &c.mask, scale).unwrap();
    let (ql, kl) = (
        Layout::bshd(1, total_q, c.heads_q, c.head_dim),
        Layout::bshd(1, total_k, c.heads_kv, c.head_dim),
    );
    let (dq, dk, dv) = (
        g.stream.clone_htod(&q).unwrap(),
        g.stream.clone_htod(&k).unwrap(),
        g.stream.clone_htod(&v).unwrap(),
    );
    let (hq, hk) = cu.unwrap_or((&cu_q, &cu_k));
    let (dcq, dck) = (
        g.stream.clone_htod(hq).unwrap(),
        g.stream.clone_htod(hk).unwrap(),
    );
    let mut d_o: CudaSlice<T> = g.stream.alloc_zeros(q.len()).unwrap();
    let mut d_lse: CudaSlice<f32> = g.stream.alloc_zeros(total_q * c.heads_q).unwrap();
    let mut d_flag: CudaSlice<i32> = g.stream.alloc_zeros(1).unwrap();
    let lens = |cu: &[i32]| {
        cu.windows(2)
            .map(|w| (w[1] - w[0]).max(0) as usize)
            .max()
            .unwrap_or(0)
    };
    let opts = VarlenOptions {
        mask: c.mask,
        softmax_scale: None,
        max_seqlen_q: lens(&cu_q).clamp(1, total_q),
        max_seqlen_k: lens(&cu_k).clamp(1, total_k),
    };
    {
        let (qv, kv, vv) = (dq.as_view(), dk.as_view(), dv.as_view());
        let (cqv, ckv) = (dcq.as_view(), dck.as_view());
        let (mut ov, mut lv, mut fv) =
            (d_o.as_view_mut(), d_lse.as_view_mut(), d_flag.as_view_mut());
        attn.forward_varlen(
            &g.stream,
            Input {
                data: &qv,
                layout: ql,
            },
            Input {
                data: &kv,
                layout: kl,
            },
            Input {
                data: &vv,
                layout: kl,
            },
            Output {
                data: &mut ov,
                layout: ql,
                lse: Some(&mut lv),
            },
            &cqv,
            &ckv,
            Some(&mut fv),
            &opts,
        )
        .unwrap_or_else(|e| panic!("{c:?}: {e}"));
    }
    let out = wide(&g.stream.clone_dtoh(&d_o).unwrap());
    let lse: Vec<f32> = g.stream.clone_dtoh(&d_lse).unwrap();
    let flag = g.stream.clone_dtoh(&d_flag).unwrap()[0];
    let cmp = compare(&out, Some(&lse), &ref64, &lowp);
    VarlenRun {
        cmp,
        out,
        lse,
        flag,
    }
}

fn run(g: &Gpu, attn: &Attention, c: &VarlenCase, cu: Option<(&[i32], &[i32])>) -> VarlenRun {
    match c.dtype {
        DType::F16 => run_t::<f16>(g, attn, c, cu),
        DType::Bf16 => run_t::<bf16>(g, attn, c, cu),
    }
}

fn check_varlen(g: &Gpu, c: &VarlenCase) -> VarlenRun {
    let r = run(g, &g.attn, c, None);
    assert!(r.cmp.passes, "{c:?}\n  {}", r.cmp);
    assert_eq!(r.flag, 0, "{c:?}: valid prefix sums reported");
    r
}

#[test]
fn varlen_by_hand() {
    let g = gpu_or_skip!();
    for dtype in DTYPES {
        for d in DIMS {
            for mask in [
                MaskSpec::none(),
                MaskSpec::causal(),
                MaskSpec::causal_window(100),
            ] {
                check_varlen(
                    g,
                    &VarlenCase {
                        dtype,
                        // Empty sequences, one token, tile edges, more queries than keys.
                        lens: vec![(1, 1), (0, 5), (129, 300), (64, 0), (257, 130), (7, 7)],
                        heads_q: 4,
                        heads_kv: 2,
                        head_dim: d,
                        mask,
                        seed: d as u64,
                    },
                );
            }
        }
    }
}

/// Head dims narrower than the tile widths (padded kernels) over the same packed batches.
#[test]
fn varlen_narrow_head_dims() {
    let g = gpu_or_skip!();
    for dtype in DTYPES {
        for d in [16, 80, 96, 100, 160, 192] {
            for mask in [MaskSpec::none(), MaskSpec::causal()] {
                check_varlen(
                    g,
                    &VarlenCase {
                        dtype,
                        lens: vec![(1, 1), (0, 5), (129, 300), (257, 130), (7, 7)],
                        heads_q: 4,
                        heads_kv: 2,
                        head_dim: d,
                        mask,
                        seed: d as u64,
                    },
                );
            }
        }
    }
}

/// Every sequence the same length: the packed tensors are the batch's `[b, s, h, d]` tensors, and
/// the result is the dense kernel's bit for bit on the same mainloop (the same tiles, the
/// sequence found from the prefix sums instead of the batch stride), LSE included: the sm_80
/// mainloop always, the Hopper one too on an H100/H200 (where the test asserts that both calls
/// ran on it).
#[test]
fn equal_lengths_equal_the_dense_kernel_bit_for_bit() {
    let g = gpu_or_skip!();
    equal_lengths_bit_for_bit(g, &g.sm80, Mainloop::Sm80);
    if let Some(hopper) = &g.hopper {
        equal_lengths_bit_for_bit(g, hopper, Mainloop::Sm90);
    }
}

fn equal_lengths_bit_for_bit(g: &Gpu, attn: &Attention, expected: Mainloop) {
    let (b, sq, sk, hq, hk) = (3usize, 200usize, 333usize, 4usize, 1usize);
    for d in DIMS {
        for mask in [
            MaskSpec::none(),
            MaskSpec::causal(),
            MaskSpec::causal_window(50),
        ] {
            let mut rng = Rng(d as u64);
            let mut gen = |n: usize| -> Vec<bf16> {
                (0..n)
                    .map(|_| bf16::from_f32(rng.normal() as f32))
                    .collect()
            };
            let (q, k, v) = (
                gen(b * sq * hq * d),
                gen(b * sk * hk * d),
                gen(b * sk * hk * d),
            );
            let (dq, dk, dv) = (
                g.stream.clone_htod(&q).unwrap(),
                g.stream.clone_htod(&k).unwrap(),
                g.stream.clone_htod(&v).unwrap(),
            );
            let (qv, kv, vv) = (dq.as_view(), dk.as_view(), dv.as_view());
            let mut o1: CudaSlice<bf16> = g.stream.alloc_zeros(q.len()).unwrap();
            let mut o2: CudaSlice<bf16> = g.stream.alloc_zeros(q.len()).unwrap();
            let mut l1: CudaSlice<f32> = g.stream.alloc_zeros(b * hq * sq).unwrap();
            let mut l2: CudaSlice<f32> = g.stream.alloc_zeros(b * hq * sq).unwrap();
            let (ql, kl) = (Layout::bshd(b, sq, hq, d), Layout::bshd(b, sk, hk, d));
            {
                let (mut ov, mut lv) = (o1.as_view_mut(), l1.as_view_mut());
                attn.forward(
                    &g.stream,
                    Input {
                        data: &qv,
                        layout: ql,
                    },
                    Input {
                        data: &kv,
                        layout: kl,
                    },
                    Input {
                        data: &vv,
                        layout: kl,
                    },
                    Output {
                        data: &mut ov,
                        layout: ql,
                        lse: Some(&mut lv),
                    },
                    &ForwardOptions {
                        mask,
                        softmax_scale: None,
                    },
                )
                .unwrap();
            }
            let cu_q = prefix(std::iter::repeat_n(sq, b));
            let cu_k = prefix(std::iter::repeat_n(sk, b));
            let (dcq, dck) = (
                g.stream.clone_htod(&cu_q).unwrap(),
                g.stream.clone_htod(&cu_k).unwrap(),
            );
            let (pq, pk) = (
                Layout::bshd(1, b * sq, hq, d),
                Layout::bshd(1, b * sk, hk, d),
            );
            // Both calls run on the mainloop under test.
            let options = ForwardOptions {
                mask,
                softmax_scale: None,
            };
            let packed = raw_placeholder(pq, pk, options);
            let dense = raw_placeholder(ql, kl, options);
            assert_eq!(attn.mainloop_for(&dense).unwrap(), expected, "d {d}: dense");
            let varlen = RawVarlenForward {
                forward: packed,
                cu_seqlens_q: 5 << 20,
                cu_seqlens_k: 6 << 20,
                batch: b,
                max_seqlen_q: sq,
                max_seqlen_k: sk,
                error_flag: 0,
            };
            assert_eq!(
                attn.varlen_mainloop_for(&varlen).unwrap(),
                expected,
                "d {d}: varlen"
            );
            {
                let (cqv, ckv) = (dcq.as_view(), dck.as_view());
                let (mut ov, mut lv) = (o2.as_view_mut(), l2.as_view_mut());
                attn.forward_varlen(
                    &g.stream,
                    Input {
                        data: &qv,
                        layout: pq,
                    },
                    Input {
                        data: &kv,
                        layout: pk,
                    },
                    Input {
                        data: &vv,
                        layout: pk,
                    },
                    Output {
                        data: &mut ov,
                        layout: pq,
                        lse: Some(&mut lv),
                    },
                    &cqv,
                    &ckv,
                    None,
                    &VarlenOptions {
                        mask,
                        softmax_scale: None,
                        max_seqlen_q: sq,
                        max_seqlen_k: sk,
                    },
                )
                .unwrap();
            }
            let bits = |x: Vec<bf16>| x.iter().map(|t| t.to_bits()).collect::<Vec<_>>();
            assert!(
                bits(g.stream.clone_dtoh(&o1).unwrap()) == bits(g.stream.clone_dtoh(&o2).unwrap()),
                "d {d} {mask:?}: outputs differ"
            );
            // LSE: dense [b, h, s], packed [h, b * s].
            let (dl, pl) = (
                g.stream.clone_dtoh(&l1).unwrap(),
                g.stream.clone_dtoh(&l2).unwrap(),
            );
            for bi in 0..b {
                for h in 0..hq {
                    for i in 0..sq {
                        let x = dl[(bi * hq + h) * sq + i];
                        let y = pl[h * b * sq + bi * sq + i];
                        assert!(
                            x.to_bits() == y.to_bits(),
                            "d {d} {mask:?}: LSE ({bi}, {h}, {i})"
                        );
                    }
                }
            }
        }
    }
}

/// Prefix sums that point outside the tensors (negative, decreasing, past the end, not starting
/// at 0, a sequence longer than max_seqlen_q): the call still runs inside the tensors (memcheck
/// checks that under compute-sanitizer), sets the error flag, and the valid sequences before the
/// first bad entry are still right.
#[test]
fn bad_prefix_sums_are_clamped_and_reported() {
    let g = gpu_or_skip!();
    let c = VarlenCase {
        dtype: DType::Bf16,
        lens: vec![(100, 120), (50, 60), (70, 80)],
        heads_q: 2,
        heads_kv: 2,
        head_dim: 64,
        mask: MaskSpec::causal(),
        seed: 3,
    };
    let good = run(g, &g.attn, &c, None);
    assert!(good.cmp.passes, "{}", good.cmp);
    assert_eq!(good.flag, 0);
    // (cu_seqlens_q, cu_seqlens_k, whether sequence 0's rows stay its own).
    let bad: [(&[i32], &[i32], bool); 6] = [
        (&[0, 100, 150, 220 + 1000], &[0, 120, 180, 260], true),
        (&[0, 100, 90, 220], &[0, 120, 180, 260], false),
        (&[0, 100, 150, 220], &[0, 120, -5, 260], true),
        (&[5, 100, 150, 220], &[0, 120, 180, 260], false),
        (&[0, 100, 150, 220], &[0, 120, 180, i32::MAX], true),
        (
            &[i32::MIN, i32::MAX, 0, -1],
            &[i32::MAX, i32::MIN, 7, 3],
            false,
        ),
    ];
    for (q, k, intact) in bad {
        let r = run(g, &g.attn, &c, Some((q, k)));
        assert_eq!(r.flag, 1, "{q:?} {k:?}: not reported");
        assert!(
            r.out.iter().all(|x| x.is_finite()),
            "{q:?} {k:?}: non-finite output"
        );
        if intact {
            let n = 100 * c.heads_q * c.head_dim;
            assert!(
                r.out[..n] == good.out[..n],
                "{q:?} {k:?}: sequence 0 changed"
            );
            // LSE [heads, total_q]: sequence 0's rows of every head.
            for h in 0..c.heads_q {
                let rows = h * 220..h * 220 + 100;
                assert!(
                    r.lse[rows.clone()] == good.lse[rows],
                    "{q:?} {k:?}: LSE of sequence 0"
                );
            }
        }
    }
}

fn arb_varlen_case() -> impl Strategy<Value = VarlenCase> {
    let len = prop_oneof![
        Just(0usize),
        Just(1),
        Just(127),
        Just(128),
        Just(129),
        1usize..300
    ];
    (
        prop_oneof![Just(DType::F16), Just(DType::Bf16)],
        proptest::collection::vec((len.clone(), len), 1..5),
        prop_oneof![
            Just((1usize, 1usize)),
            Just((4, 2)),
            Just((4, 1)),
            Just((3, 3))
        ],
        prop_oneof![Just(64usize), Just(128), Just(256)],
        prop_oneof![
            Just(MaskSpec::none()),
            Just(MaskSpec::causal()),
            (1u32..200).prop_map(MaskSpec::causal_window),
            (0u32..100, 0u32..100).prop_map(|(l, r)| MaskSpec::sliding_window(Some(l), Some(r))),
        ],
        any::<u64>(),
    )
        .prop_filter("at least one query and one key", |(_, lens, ..)| {
            lens.iter().any(|l| l.0 > 0) && lens.iter().any(|l| l.1 > 0)
        })
        .prop_map(
            |(dtype, lens, (heads_q, heads_kv), head_dim, mask, seed)| VarlenCase {
                dtype,
                lens,
                heads_q,
                heads_kv,
                head_dim,
                mask,
                seed,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn varlen_kernel_matches_reference(c in arb_varlen_case()) {
        let Some(g) = gpu() else {
            say_skipped("varlen_kernel_matches_reference");
            return Ok(());
        };
        let r = run(g, &g.attn, &c, None);
        prop_assert!(r.cmp.passes, "{:?}\n  {}", c, r.cmp);
        prop_assert_eq!(r.flag, 0);
    }
}
