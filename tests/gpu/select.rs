//! Dynamic block selection on the GPU (`Attention::select_blocks`) against
//! `sparse::select_blocks`: exactly on integer inputs whose f32 block means and scores are exact
//! (whole blocks only; some key blocks repeated, so that scores tie and the lower block must
//! win), and by the ranking rule on random inputs with short last blocks (every selected whole
//! block scores at least every dropped one, up to f32 rounding); `forward_selected` bit for bit
//! as `forward_sparse` over the same mask; the device-side checks of the raw entry; errors.

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use half::{bf16, f16};
use longflash::attention::select::{BlockSelectPlan, RawBlockSelect};
use longflash::reference::RefShape;
use longflash::sparse::{select_blocks, BlockMask, MaskShape};
use longflash::{
    DType, DeviceErrorFlag, Element, Error, Input, Layout, MaskSpec, Output, SelectedOptions,
    SparseOptions,
};

use crate::common::*;

#[derive(Clone, Copy, Debug)]
struct SelCase {
    dtype: DType,
    batch: usize,
    seqlen_q: usize,
    seqlen_k: usize,
    heads_q: usize,
    heads_kv: usize,
    head_dim: usize,
    mask: MaskSpec,
    top_k: usize,
    /// Integers in [-2, 2] with key blocks repeating every 3 blocks (exact scores, ties), or
    /// normal values.
    integers: bool,
    seed: u64,
}

/// Mean of rows [lo, hi) of head `h`, batch `b` of a contiguous `[batch, rows, heads, d]` tensor.
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

/// Runs the selection of `c` and checks it; returns the selection on the host.
fn run_t<T: Element>(g: &Gpu, c: &SelCase) -> BlockMask {
    let mut rng = Rng(c.seed);
    let (b, sq, sk, hq, hk, d) = (
        c.batch, c.seqlen_q, c.seqlen_k, c.heads_q, c.heads_kv, c.head_dim,
    );
    let ql = Layout::bshd(b, sq, hq, d);
    let kl = Layout::bshd(b, sk, hk, d);
    let int = |rng: &mut Rng| ((rng.uniform() * 5.0).floor().min(4.0) - 2.0) as f32;
    let q: Vec<f32> = (0..ql.numel())
        .map(|_| {
            if c.integers {
                int(&mut rng)
            } else {
                rng.normal() as f32
            }
        })
        .collect();
    let mut k: Vec<f32> = (0..kl.numel())
        .map(|_| {
            if c.integers {
                int(&mut rng)
            } else {
                rng.normal() as f32
            }
        })
        .collect();
    if c.integers {
        // Key block kb repeats block kb % 3: equal scores, the lower block first.
        let row = hk * d;
        for bi in 0..b {
            for r in 192..sk {
                let src = ((bi * sk) + r % 192) * row;
                let dst = ((bi * sk) + r) * row;
                let (a, z) = k.split_at_mut(dst);
                z[..row].copy_from_slice(&a[src..src + row]);
            }
        }
    }
    // The element type's values, so that the reference sees what the GPU reads.
    let round = |x: &[f32]| -> (Vec<T>, Vec<f32>) {
        let t: Vec<T> = x.iter().map(|&v| T::from_f32(v)).collect();
        let back = t.iter().map(|v| v.to_f32()).collect();
        (t, back)
    };
    let ((qt, q), (kt, k)) = (round(&q), round(&k));
    let rs = RefShape {
        batch: b,
        seqlen_q: sq,
        seqlen_k: sk,
        heads_q: hq,
        heads_kv: hk,
        head_dim: d,
    };
    let expected = select_blocks(&rs, &q, &k, c.mask, c.top_k).unwrap();
    let shape = MaskShape {
        batch: b,
        heads: hq,
        seqlen_q: sq,
        seqlen_k: sk,
    };
    let plan = BlockSelectPlan::new(shape, c.mask, c.top_k).unwrap();
    assert_eq!(
        plan.row_offsets(),
        expected.row_offsets(),
        "{c:?}: row offsets"
    );
    let s = &g.stream;
    let selector = g.attn.block_selector(s, plan).unwrap();
    let (dq, dk) = (s.clone_htod(&qt).unwrap(), s.clone_htod(&kt).unwrap());
    let got = {
        let (qv, kv) = (dq.as_view(), dk.as_view());
        g.attn
            .select_blocks(
                s,
                &selector,
                Input {
                    data: &qv,
                    layout: ql,
                },
                Input {
                    data: &kv,
                    layout: kl,
                },
            )
            .unwrap()
    };
    assert_eq!(got.nnz(), expected.nnz());
    let host = got.to_host(s).unwrap();
    if c.integers && sq % 128 == 0 && sk % 64 == 0 {
        assert_eq!(host, expected, "{c:?}: exact selection");
    } else {
        check_ranking(c, &host, &expected, &q, &k);
    }
    // The forward over the device selection is the sparse forward over its host copy (at the
    // block-sparse forward's head dims).
    if !longflash::SUPPORTED_HEAD_DIMS.contains(&d) {
        return host;
    }
    let v: Vec<T> = (0..kl.numel())
        .map(|_| T::from_f32(rng.normal() as f32))
        .collect();
    let dv = s.clone_htod(&v).unwrap();
    let dm = host.to_device(s).unwrap();
    let mut outs = Vec::new();
    for selected in [true, false] {
        let mut o: CudaSlice<T> = s.alloc_zeros(ql.numel()).unwrap();
        let mut lse: CudaSlice<f32> = s.alloc_zeros(b * hq * sq).unwrap();
        {
            let (qv, kv, vv) = (dq.as_view(), dk.as_view(), dv.as_view());
            let (mut ov, mut lv) = (o.as_view_mut(), lse.as_view_mut());
            let (qi, ki, vi) = (
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
            );
            let out = Output {
                data: &mut ov,
                layout: ql,
                lse: Some(&mut lv),
            };
            if selected {
                let opts = SelectedOptions {
                    blocks: &got,
                    softmax_scale: None,
                };
                g.attn.forward_selected(s, qi, ki, vi, out, &opts).unwrap();
            } else {
                let opts = SparseOptions {
                    mask: &dm,
                    softmax_scale: None,
                };
                g.attn.forward_sparse(s, qi, ki, vi, out, &opts).unwrap();
            }
        }
        let o: Vec<f32> = s
            .clone_dtoh(&o)
            .unwrap()
            .iter()
            .map(|x| x.to_f32())
            .collect();
        outs.push((o, s.clone_dtoh(&lse).unwrap()));
    }
    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&outs[0].0), bits(&outs[1].0), "{c:?}: output");
    assert_eq!(bits(&outs[0].1), bits(&outs[1].1), "{c:?}: LSE");
    host
}

/// The selection `got` against the reference `expected` on inexact scores: the same partial
/// blocks and counts, and in each row every kept whole block scores (in f64) at least every
/// dropped one, less a rounding allowance.
fn check_ranking(c: &SelCase, got: &BlockMask, expected: &BlockMask, q: &[f32], k: &[f32]) {
    let (sq, sk, hq, hk, d) = (c.seqlen_q, c.seqlen_k, c.heads_q, c.heads_kv, c.head_dim);
    let shape = got.shape();
    let all = BlockMask::from_fn(shape, c.mask, |_, _, _, _| true).unwrap();
    let nqb = shape.num_q_blocks();
    for b in 0..c.batch {
        for h in 0..hq {
            for qb in 0..nqb {
                let (g_row, e_row) = (got.row(b, h, qb), expected.row(b, h, qb));
                assert_eq!(g_row.len(), e_row.len());
                let qm = mean(q, (sq, hq, d), b, h, qb * 128, ((qb + 1) * 128).min(sq));
                let mut kept = f64::INFINITY;
                let mut dropped = f64::NEG_INFINITY;
                let mut scale = 0f64;
                for &kb in all.row(b, h, qb) {
                    let kb = kb as usize;
                    let lo = kb * 64;
                    let km = mean(k, (sk, hk, d), b, h / (hq / hk), lo, (lo + 64).min(sk));
                    let s: f64 = qm.iter().zip(&km).map(|(a, z)| a * z).sum();
                    let mag: f64 = qm.iter().zip(&km).map(|(a, z)| (a * z).abs()).sum();
                    scale = scale.max(mag);
                    let full = all.full_flags()[all.row_offsets()[((b * hq + h) * nqb) + qb]
                        as usize
                        + all
                            .row(b, h, qb)
                            .iter()
                            .position(|&x| x as usize == kb)
                            .unwrap()]
                        != 0;
                    let listed = got.contains(b, h, qb, kb);
                    if !full {
                        assert!(
                            listed,
                            "{c:?}: partial block {kb} of row ({b}, {h}, {qb}) dropped"
                        );
                    } else if listed {
                        kept = kept.min(s);
                    } else {
                        dropped = dropped.max(s);
                    }
                }
                assert!(
                    kept >= dropped - 1e-5 * scale.max(1e-30),
                    "{c:?}: row ({b}, {h}, {qb}) keeps a score {kept} below a dropped {dropped}"
                );
            }
        }
    }
}

fn run(g: &Gpu, c: &SelCase) -> BlockMask {
    match c.dtype {
        DType::F16 => run_t::<f16>(g, c),
        DType::Bf16 => run_t::<bf16>(g, c),
    }
}

fn case(
    dtype: DType,
    (sq, sk): (usize, usize),
    (hq, hk): (usize, usize),
    d: usize,
    mask: MaskSpec,
    top_k: usize,
    integers: bool,
) -> SelCase {
    SelCase {
        dtype,
        batch: 2,
        seqlen_q: sq,
        seqlen_k: sk,
        heads_q: hq,
        heads_kv: hk,
        head_dim: d,
        mask,
        top_k,
        integers,
        seed: (sq * 31 + sk * 7 + d + top_k) as u64,
    }
}

#[test]
fn block_selection_is_exact_on_integer_inputs() {
    let g = gpu_or_skip!();
    for (dtype, d) in [
        (DType::Bf16, 64),
        (DType::F16, 128),
        (DType::Bf16, 256),
        (DType::F16, 96),
    ] {
        for mask in [
            MaskSpec::none(),
            MaskSpec::causal(),
            MaskSpec::causal_window(700).with_sinks(64),
        ] {
            for (sq, sk) in [(256, 1024), (512, 2048), (128, 4096)] {
                for top_k in [1, 3, 8, 40] {
                    run(g, &case(dtype, (sq, sk), (4, 2), d, mask, top_k, true));
                }
            }
        }
    }
}

#[test]
fn block_selection_ranks_random_inputs() {
    let g = gpu_or_skip!();
    for (dtype, d) in [(DType::F16, 64), (DType::Bf16, 128)] {
        for mask in [
            MaskSpec::none(),
            MaskSpec::causal(),
            MaskSpec::causal_window(300),
        ] {
            for (sq, sk) in [(1, 1), (100, 900), (300, 333), (1000, 3000)] {
                for top_k in [1, 4, 100] {
                    run(g, &case(dtype, (sq, sk), (3, 1), d, mask, top_k, false));
                }
            }
        }
    }
    // A long row: 8192 key blocks seen by one query block (512k keys).
    let long = SelCase {
        batch: 1,
        heads_q: 1,
        heads_kv: 1,
        ..case(
            DType::Bf16,
            (128, 1 << 19),
            (1, 1),
            64,
            MaskSpec::none(),
            16,
            false,
        )
    };
    run(g, &long);
}

#[test]
fn block_selection_rejects_bad_calls() {
    let g = gpu_or_skip!();
    let s = &g.stream;
    let shape = MaskShape {
        batch: 1,
        heads: 2,
        seqlen_q: 256,
        seqlen_k: 512,
    };
    let plan = BlockSelectPlan::new(shape, MaskSpec::causal(), 2).unwrap();
    let selector = g.attn.block_selector(s, plan.clone()).unwrap();
    let dq: CudaSlice<bf16> = s.alloc_zeros(256 * 2 * 64).unwrap();
    let dk: CudaSlice<bf16> = s.alloc_zeros(512 * 64).unwrap();
    let (qv, kv) = (dq.as_view(), dk.as_view());
    let ql = Layout::bshd(1, 256, 2, 64);
    // A call whose shape is not the plan's.
    let short = Layout::bshd(1, 128, 1, 64);
    match g.attn.select_blocks(
        s,
        &selector,
        Input {
            data: &qv,
            layout: ql,
        },
        Input {
            data: &kv,
            layout: short,
        },
    ) {
        Err(Error::ShapeMismatch {
            arg: "k.seqlen", ..
        }) => {}
        other => panic!("expected a shape mismatch, got {:?}", other.map(|_| ())),
    }
    // The raw entry's device-side checks: a universe block outside the keys and offsets that
    // promise more blocks than a row keeps set the error flag, and nothing is written outside.
    let mut flag = DeviceErrorFlag::new(s).unwrap();
    let u = plan.universe();
    let mut cols = u.col_indices().to_vec();
    cols[0] = 1 << 20;
    let bad_offsets: Vec<i32> = plan
        .row_offsets()
        .iter()
        .map(|&x| x + (x > 0) as i32)
        .collect();
    for (cols, offsets) in [
        (cols, plan.row_offsets().to_vec()),
        (u.col_indices().to_vec(), bad_offsets),
    ] {
        let d_uo = s.clone_htod(u.row_offsets()).unwrap();
        let d_uc = s.clone_htod(&cols).unwrap();
        let d_uf = s.clone_htod(u.full_flags()).unwrap();
        let d_oo = s.clone_htod(&offsets).unwrap();
        let n = plan.nnz();
        let mut d_oc: CudaSlice<i32> = s.alloc_zeros(n + 1).unwrap();
        let mut d_of: CudaSlice<u8> = s.alloc_zeros(n + 1).unwrap();
        let ws_bytes = plan.workspace_bytes(1, 64);
        let mut ws: CudaSlice<u8> = s.alloc_zeros(ws_bytes).unwrap();
        {
            let mut fv = flag.view_mut();
            let (fp, _gf) = fv.device_ptr_mut(s);
            let (qp, _g1) = qv.device_ptr(s);
            let (kp, _g2) = kv.device_ptr(s);
            let (uo, _g3) = d_uo.device_ptr(s);
            let (uc, _g4) = d_uc.device_ptr(s);
            let (uf, _g5) = d_uf.device_ptr(s);
            let (oo, _g6) = d_oo.device_ptr(s);
            let (oc, _g7) = d_oc.device_ptr_mut(s);
            let (of, _g8) = d_of.device_ptr_mut(s);
            let (wp, _g9) = ws.device_ptr_mut(s);
            let args = RawBlockSelect {
                dtype: DType::Bf16,
                q: qp,
                q_layout: ql,
                k: kp,
                k_layout: Layout::bshd(1, 512, 1, 64),
                universe_offsets: uo,
                universe_cols: uc,
                universe_full: uf,
                universe_len: u.nnz(),
                max_row: plan.max_row(),
                top_k: 2,
                out_offsets: oo,
                out_cols: oc,
                out_full: of,
                out_len: n,
                workspace: wp,
                workspace_bytes: ws_bytes,
                error_flag: fp,
            };
            // SAFETY: every pointer addresses a live allocation of this context of the sizes
            // the fields give; nothing else touches them until the stream has run the kernels.
            unsafe { g.attn.select_blocks_raw(s.cu_stream(), &args) }.unwrap();
        }
        match flag.check(s, "block selection") {
            Err(Error::DeviceIndexOutOfRange { .. }) => {}
            other => panic!("expected the device error flag, got {other:?}"),
        }
        // The slot past the lists stays untouched.
        assert_eq!(s.clone_dtoh(&d_oc).unwrap()[n], 0);
    }
}
