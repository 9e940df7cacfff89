//! Top-k memory attention: the GPU selection (`Attention::memory_select_top_k`) compared exactly
//! with the reference's rule (largest scores, ties to the lower index) on integer inputs whose
//! f32 scores are exact, many of them tied, with scores that rise or fall along the memory (every
//! tile beats the threshold, or none does); the top-k layer (`forward_memory_top_k`) against
//! `reference::memory_attention_f64` with `top_k` under the correctness rule; and its errors.

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use half::{bf16, f16};
use longflash::attention::{RawMemorySelect, MAX_TOP_K};
use longflash::reference::memory_top_k;
use longflash::rope::{PositionMode, RopeConfig, RopeOptions};
use longflash::{
    Attention, DType, Element, Error, Input, Layout, Mainloop, MainloopChoice, MemoryForward,
    MemoryInput, Output,
};

use crate::common::Rng;
use crate::common::*;
use crate::memory::{case, run_on};

/// How a selection case's keys are made.
#[derive(Clone, Copy, Debug)]
enum Keys {
    /// Queries and keys uniform integers in [-3, 3]: exact scores, many ties.
    Integers,
    /// Every query all ones and key j's elements `floor((j + c) / d)`: the score of entry j is j,
    /// so each tile beats every threshold before it.
    Rising,
    /// As `Rising` with the entries reversed: after the first tiles nothing beats the threshold.
    Falling,
}

#[derive(Clone, Debug)]
struct SelectCase {
    dtype: DType,
    batch: usize,
    seqlen_q: usize,
    heads_q: usize,
    heads_kv: usize,
    head_dim: usize,
    mem_len: usize,
    top_k: usize,
    keys: Keys,
    /// Fraction of entries the mask hides (`None`: no mask).
    hidden: Option<f64>,
    seed: u64,
}

fn select_t<T: Element>(g: &Gpu, attn: &Attention, c: &SelectCase) {
    let mut rng = Rng(c.seed);
    let (b, hq, hk, d, m) = (c.batch, c.heads_q, c.heads_kv, c.head_dim, c.mem_len);
    let ql = Layout::bshd(b, c.seqlen_q, hq, d);
    let kl = Layout::bshd(b, m, hk, d);
    let int = |rng: &mut Rng| (rng.uniform() * 7.0).floor().min(6.0) - 3.0;
    let (q, keys): (Vec<f64>, Vec<f64>) = match c.keys {
        Keys::Integers => (
            (0..ql.numel()).map(|_| int(&mut rng)).collect(),
            (0..kl.numel()).map(|_| int(&mut rng)).collect(),
        ),
        Keys::Rising | Keys::Falling => {
            let mut keys = vec![0.0; kl.numel()];
            for (x, e) in keys.iter_mut().enumerate() {
                let (cix, j) = (x % d, (x / (hk * d)) % m);
                let j = if matches!(c.keys, Keys::Falling) {
                    m - 1 - j
                } else {
                    j
                };
                *e = ((j + cix) / d) as f64;
            }
            (vec![1.0; ql.numel()], keys)
        }
    };
    let visible: Option<Vec<bool>> = c
        .hidden
        .map(|f| (0..b * m).map(|_| rng.uniform() >= f).collect());
    let to_t = |x: &[f64]| -> Vec<T> { x.iter().map(|&v| T::from_f32(v as f32)).collect() };
    let (qt, kt) = (to_t(&q), to_t(&keys));
    let s = &g.stream;
    let (dq, dk) = (s.clone_htod(&qt).unwrap(), s.clone_htod(&kt).unwrap());
    let dmask: Option<CudaSlice<u8>> = visible.as_ref().map(|v| {
        s.clone_htod(&v.iter().map(|&x| x as u8).collect::<Vec<_>>())
            .unwrap()
    });
    let rows = b * hq * c.seqlen_q;
    let mut d_idx: CudaSlice<i32> = s.clone_htod(&vec![i32::MIN; rows * c.top_k]).unwrap();
    // The mainloop the call runs: the Hopper kernel on a compute capability 9.0 device at head
    // dims 64 and 128 (tensors a tensor map describes) unless the sm_80 one is chosen.
    {
        let (qp, _g1) = dq.device_ptr(s);
        let (kp, _g2) = dk.device_ptr(s);
        let (mp, _g3) = match &dmask {
            Some(m) => {
                let (p, g) = m.device_ptr(s);
                (p, Some(g))
            }
            None => (0, None),
        };
        let (ip, _g4) = d_idx.device_ptr_mut(s);
        let raw = RawMemorySelect {
            dtype: T::DTYPE,
            q: qp,
            q_layout: ql,
            keys: kp,
            keys_layout: kl,
            mask: mp,
            top_k: c.top_k,
            indices: ip,
            workspace: 16,
            workspace_bytes: usize::MAX,
        };
        let ran = attn.memory_select_mainloop(&raw);
        if attn.mainloop() == MainloopChoice::Sm80 {
            assert_eq!(ran.unwrap(), Mainloop::Sm80, "{c:?}");
        } else if attn.compute_capability() == (9, 0) && (d == 64 || d == 128) {
            assert_eq!(ran.unwrap(), Mainloop::Sm90, "{c:?}");
        }
    }
    {
        let (qv, kv) = (dq.as_view(), dk.as_view());
        let mv = dmask.as_ref().map(|x| x.as_view());
        let mut iv = d_idx.as_view_mut();
        attn.memory_select_top_k(
            s,
            Input {
                data: &qv,
                layout: ql,
            },
            Input {
                data: &kv,
                layout: kl,
            },
            mv.as_ref(),
            c.top_k,
            &mut iv,
        )
        .unwrap_or_else(|e| panic!("{c:?}: {e}"));
    }
    s.synchronize().unwrap();
    let got: Vec<i32> = s.clone_dtoh(&d_idx).unwrap();
    let group = hq / hk;
    let mut scores: Vec<Option<f64>> = vec![None; m];
    for bi in 0..b {
        for h in 0..hq {
            for i in 0..c.seqlen_q {
                let qo = ql.offset(bi, i, h) as usize;
                for (j, sc) in scores.iter_mut().enumerate() {
                    let ko = kl.offset(bi, j, h / group) as usize;
                    let vis = visible.as_ref().is_none_or(|v| v[bi * m + j]);
                    *sc = vis.then(|| (0..d).map(|x| q[qo + x] * keys[ko + x]).sum::<f64>() + 0.0);
                }
                // The reference's set, in the GPU's order: descending score, then index.
                let mut want = memory_top_k(&scores, Some(c.top_k));
                want.sort_by(|&a, &x| {
                    scores[x]
                        .unwrap()
                        .total_cmp(&scores[a].unwrap())
                        .then(a.cmp(&x))
                });
                let row = (bi * hq + h) * c.seqlen_q + i;
                let g_row = &got[row * c.top_k..(row + 1) * c.top_k];
                let mut w_row: Vec<i32> = want.iter().map(|&j| j as i32).collect();
                w_row.resize(c.top_k, -1);
                assert_eq!(g_row, &w_row[..], "{c:?}: batch {bi} head {h} row {i}");
            }
        }
    }
}

/// The case through the library's default mainloop and through the sm_80 one.
fn select(g: &Gpu, c: &SelectCase) {
    for attn in [&g.attn, &g.sm80] {
        match c.dtype {
            DType::F16 => select_t::<f16>(g, attn, c),
            DType::Bf16 => select_t::<bf16>(g, attn, c),
        }
    }
}

#[test]
fn memory_top_k_selection_is_exact() {
    let g = gpu_or_skip!();
    let base = SelectCase {
        dtype: DType::Bf16,
        batch: 2,
        seqlen_q: 70,
        heads_q: 4,
        heads_kv: 2,
        head_dim: 64,
        mem_len: 3000,
        top_k: MAX_TOP_K,
        keys: Keys::Integers,
        hidden: Some(0.3),
        seed: 5,
    };
    let cases = [
        base.clone(),
        SelectCase {
            dtype: DType::F16,
            batch: 1,
            seqlen_q: 65,
            heads_q: 2,
            heads_kv: 1,
            head_dim: 128,
            mem_len: 1000,
            top_k: 1,
            hidden: None,
            ..base.clone()
        },
        SelectCase {
            head_dim: 100,
            seqlen_q: 33,
            heads_kv: 4,
            mem_len: 777,
            top_k: 37,
            hidden: Some(0.5),
            ..base.clone()
        },
        SelectCase {
            batch: 1,
            seqlen_q: 64,
            heads_q: 1,
            heads_kv: 1,
            mem_len: 4000,
            top_k: 200,
            keys: Keys::Rising,
            hidden: None,
            ..base.clone()
        },
        SelectCase {
            batch: 1,
            seqlen_q: 20,
            heads_q: 2,
            heads_kv: 1,
            mem_len: 4001,
            keys: Keys::Falling,
            hidden: None,
            ..base.clone()
        },
        SelectCase {
            dtype: DType::F16,
            head_dim: 128,
            mem_len: 300,
            top_k: 100,
            hidden: Some(0.9),
            ..base.clone()
        },
        SelectCase {
            seqlen_q: 3,
            mem_len: MAX_TOP_K,
            hidden: None,
            ..base.clone()
        },
        SelectCase {
            keys: Keys::Rising,
            mem_len: 1500,
            top_k: 64,
            hidden: Some(0.2),
            ..base.clone()
        },
    ];
    for c in &cases {
        select(g, c);
    }
}

/// The top-k layer under the correctness rule: head dims 64, 128 and 100 (padded), RoPE on and
/// off, the mask, GQA and MHA, memories across tile edges, k from 1 to MAX_TOP_K, through the
/// library's default mainloop and the sm_80 one (the local pass's two forwards).
#[test]
fn memory_top_k_matches_reference() {
    let g = gpu_or_skip!();
    let sizes = [
        (128, 128, 600, 64),
        (200, 200, 77, 77),
        (65, 300, 1300, MAX_TOP_K),
        (300, 100, 129, 1),
        (1, 190, 500, 128),
    ];
    for d in [64, 128, 100] {
        for (i, &(sq, sk, mem, k)) in sizes.iter().enumerate() {
            let mut c = case(d, (sq, sk, mem));
            c.top_k = Some(k);
            c.dtype = if i % 2 == 0 { DType::Bf16 } else { DType::F16 };
            c.seed = 51 + i as u64;
            match i {
                1 => c.rope = None,
                2 => c.heads_kv = 4,
                3 => {
                    let mut rope = RopeOptions::new(RopeConfig::llama(d), PositionMode::Rope);
                    rope.window_left = Some(40);
                    rope.position_offsets = Some(vec![3, 1000]);
                    c.rope = Some(rope);
                    c.hidden = None;
                }
                4 => c.mem_row_pad = 8,
                _ => {}
            }
            run_on(g, &g.attn, &c);
            if i % 2 == 0 {
                run_on(g, &g.sm80, &c);
            }
        }
    }
}

#[test]
fn memory_top_k_rejects_bad_arguments() {
    let g = gpu_or_skip!();
    let s = &g.stream;
    let (b, sq, hq, hk, d, m) = (1usize, 64usize, 2usize, 1usize, 64usize, 100usize);
    let ql = Layout::bshd(b, sq, hq, d);
    let kl = Layout::bshd(b, sq, hk, d);
    let ml = Layout::bshd(b, m, hk, d);
    let q: CudaSlice<bf16> = s.alloc_zeros(ql.numel()).unwrap();
    let k: CudaSlice<bf16> = s.alloc_zeros(kl.numel()).unwrap();
    let mk: CudaSlice<bf16> = s.alloc_zeros(ml.numel()).unwrap();
    let mut o: CudaSlice<bf16> = s.alloc_zeros(ql.numel()).unwrap();
    let rerope = RopeOptions::new(RopeConfig::llama(d), PositionMode::ReRope { window: 16 });
    let (qv, kv, mkv) = (q.as_view(), k.as_view(), mk.as_view());
    let mut call = |mem_layout: Layout, top_k: usize, rope: Option<&RopeOptions>| -> Error {
        let mut ov = o.as_view_mut();
        g.attn
            .forward_memory_top_k(
                s,
                Input {
                    data: &qv,
                    layout: ql,
                },
                Input {
                    data: &kv,
                    layout: kl,
                },
                Input {
                    data: &kv,
                    layout: kl,
                },
                MemoryInput {
                    keys: Input {
                        data: &mkv,
                        layout: mem_layout,
                    },
                    values: Input {
                        data: &mkv,
                        layout: mem_layout,
                    },
                    mask: None,
                },
                Output {
                    data: &mut ov,
                    layout: ql,
                    lse: None,
                },
                &MemoryForward {
                    rope,
                    softmax_scale: None,
                },
                top_k,
            )
            .expect_err("a bad top-k argument must be refused")
    };
    let top_k_err = |e: Error| matches!(e, Error::InvalidArgument { arg: "top_k", .. });
    // k of 0, past MAX_TOP_K, past the memory (and an empty memory); memory heads other than
    // the local keys'; ReRoPE.
    assert!(top_k_err(call(ml, 0, None)));
    assert!(top_k_err(call(
        Layout::bshd(b, 1000, hk, d),
        MAX_TOP_K + 1,
        None
    )));
    assert!(top_k_err(call(ml, m + 1, None)));
    assert!(top_k_err(call(Layout::bshd(b, 0, hk, d), 1, None)));
    assert!(matches!(
        call(Layout::bshd(b, m / 2, 2, d), 4, None),
        Error::ShapeMismatch { .. }
    ));
    assert!(matches!(
        call(ml, 4, Some(&rerope)),
        Error::InvalidArgument {
            arg: "rope.mode",
            ..
        }
    ));
    // The selection alone: an index buffer too short.
    let mut idx: CudaSlice<i32> = s.alloc_zeros(ql.seqlen * hq * 4 - 1).unwrap();
    let mut iv = idx.as_view_mut();
    let e = g
        .attn
        .memory_select_top_k(
            s,
            Input {
                data: &qv,
                layout: ql,
            },
            Input {
                data: &mkv,
                layout: ml,
            },
            None,
            4,
            &mut iv,
        )
        .expect_err("a short index buffer must be refused");
    assert!(matches!(e, Error::OutOfBounds { arg: "indices", .. }));
    // Nothing ran: the output is still zero.
    let back: Vec<bf16> = s.clone_dtoh(&o).unwrap();
    assert!(back.iter().all(|x| x.to_f32() == 0.0));
}
