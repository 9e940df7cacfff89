//! Memory attention (`Attention::forward_memory`) against `reference::memory_attention_f64`
//! under the correctness rule, with `memory_attention_lowp` as the naive budget: dtypes, head
//! dims (100 in the padded kernel), GQA, memory lengths across tile edges and zero, the memory
//! mask, RoPE on and off, a left window, strided memory views; and the errors of bad memory
//! arguments.

use cudarc::driver::CudaSlice;
use half::{bf16, f16};
use longflash::reference::{
    compare, memory_attention_f64, memory_attention_lowp, memory_attention_two_pass_lowp,
    RefMemory, RefShape,
};
use longflash::rope::{PositionMode, RopeConfig, RopeOptions};
use longflash::{
    Attention, DType, Element, Error, Input, Layout, MainloopChoice, MemoryForward, MemoryInput,
    Output,
};

use crate::common::Rng;
use crate::common::*;

#[derive(Clone, Debug)]
pub(crate) struct MemCase {
    pub(crate) dtype: DType,
    pub(crate) batch: usize,
    pub(crate) seqlen_q: usize,
    pub(crate) seqlen_k: usize,
    pub(crate) mem_len: usize,
    pub(crate) heads_q: usize,
    pub(crate) heads_kv: usize,
    pub(crate) head_dim: usize,
    pub(crate) rope: Option<RopeOptions>,
    /// Fraction of memory entries the mask hides (`None`: no mask).
    pub(crate) hidden: Option<f64>,
    /// The memory as a view into a wider buffer: extra elements per memory row.
    pub(crate) mem_row_pad: usize,
    /// Each row's top-k memory entries (`forward_memory_top_k`), or every entry (`None`).
    pub(crate) top_k: Option<usize>,
    pub(crate) seed: u64,
}

pub(crate) fn case(head_dim: usize, (sq, sk, mem): (usize, usize, usize)) -> MemCase {
    MemCase {
        dtype: DType::Bf16,
        batch: 2,
        seqlen_q: sq,
        seqlen_k: sk,
        mem_len: mem,
        heads_q: 4,
        heads_kv: 2,
        head_dim,
        rope: Some(RopeOptions::new(
            RopeConfig::llama(head_dim),
            PositionMode::Rope,
        )),
        hidden: Some(0.25),
        mem_row_pad: 0,
        top_k: None,
        seed: 7,
    }
}

/// Whether `attn` runs this case in passes merged by LSE: the top-k path always, and the
/// two-pass path (the Hopper forward twice, with a per-key mask for a masked memory, and the
/// merge) on a Hopper device without the sm_80 mainloop forced, at head dim 64 or 128, or at a
/// padded one (68 to 124) whose rows are whole 16 bytes (its flat tensor maps' rule).
fn two_pass(attn: &Attention, c: &MemCase) -> bool {
    let d = c.head_dim;
    let rows = [
        c.heads_q * d,
        c.heads_kv * d,
        c.heads_kv * d + c.mem_row_pad,
    ];
    let hopper_dim = matches!(d, 64 | 128)
        || (68..=124).contains(&d) && d % 4 == 0 && rows.iter().all(|r| r % 8 == 0);
    c.top_k.is_some()
        || attn.compute_capability() == (9, 0)
            && attn.mainloop() != MainloopChoice::Sm80
            && hopper_dim
}

fn run_t<T: Element>(g: &Gpu, attn: &Attention, c: &MemCase) -> longflash::reference::Comparison {
    let mut rng = Rng(c.seed);
    let gen = |n: usize, rng: &mut Rng, s: f64| -> Vec<T> {
        (0..n)
            .map(|_| T::from_f32((rng.normal() * s) as f32))
            .collect()
    };
    let (b, hk, d) = (c.batch, c.heads_kv, c.head_dim);
    let ql = Layout::bshd(b, c.seqlen_q, c.heads_q, d);
    let kl = Layout::bshd(b, c.seqlen_k, hk, d);
    let (q, k, v) = (
        gen(ql.numel(), &mut rng, 1.0),
        gen(kl.numel(), &mut rng, 1.0),
        gen(kl.numel(), &mut rng, 1.0),
    );
    // The memory, dense for the reference; on the device each row padded by mem_row_pad.
    let nm = b * c.mem_len * hk * d;
    let (mk, mv) = (gen(nm, &mut rng, 1.0), gen(nm, &mut rng, 1.0));
    let visible: Option<Vec<bool>> = c
        .hidden
        .map(|f| (0..b * c.mem_len).map(|_| rng.uniform() >= f).collect());
    let shape = RefShape {
        batch: b,
        seqlen_q: c.seqlen_q,
        seqlen_k: c.seqlen_k,
        heads_q: c.heads_q,
        heads_kv: hk,
        head_dim: d,
    };
    let scale = 1.0 / (d as f32).sqrt();
    let wide = |x: &[T]| -> Vec<f64> { x.iter().map(|t| t.to_f32() as f64).collect() };
    let (mk64, mv64) = (wide(&mk), wide(&mv));
    let ref64 = memory_attention_f64(
        &shape,
        (&wide(&q), &wide(&k), &wide(&v)),
        &RefMemory {
            mem_len: c.mem_len,
            keys: &mk64,
            values: &mv64,
            visible: visible.as_deref(),
        },
        c.rope.as_ref(),
        c.top_k,
        scale as f64,
    )
    .unwrap();
    let low_mem = RefMemory {
        mem_len: c.mem_len,
        keys: &mk,
        values: &mv,
        visible: visible.as_deref(),
    };
    // The budget: the naive form of the path that runs (the two-pass one rounds its partial
    // outputs before the merge, as the ring does).
    let lowp = if two_pass(attn, c) {
        memory_attention_two_pass_lowp(
            &shape,
            (&q, &k, &v),
            &low_mem,
            c.rope.as_ref(),
            c.top_k,
            scale,
        )
    } else {
        memory_attention_lowp(&shape, (&q, &k, &v), &low_mem, c.rope.as_ref(), None, scale)
    }
    .unwrap();

    let row = hk * d + c.mem_row_pad;
    let pad = |x: &[T]| -> Vec<T> {
        let mut out = vec![T::from_f32(f32::NAN); b * c.mem_len * row];
        for r in 0..b * c.mem_len {
            out[r * row..r * row + hk * d].copy_from_slice(&x[r * hk * d..(r + 1) * hk * d]);
        }
        out
    };
    let ml = Layout {
        batch_stride: (c.mem_len * row) as i64,
        seq_stride: row as i64,
        ..Layout::bshd(b, c.mem_len, hk, d)
    };
    let s = &g.stream;
    let (dq, dk, dv) = (
        s.clone_htod(&q).unwrap(),
        s.clone_htod(&k).unwrap(),
        s.clone_htod(&v).unwrap(),
    );
    // A zero-length buffer cannot be allocated: one element stands in for an empty memory.
    let (dmk, dmv) = (
        s.clone_htod(&pad(&mk))
            .unwrap_or_else(|_| s.alloc_zeros(1).unwrap()),
        s.clone_htod(&pad(&mv))
            .unwrap_or_else(|_| s.alloc_zeros(1).unwrap()),
    );
    let dmask: Option<CudaSlice<u8>> = visible.as_ref().filter(|v| !v.is_empty()).map(|v| {
        s.clone_htod(&v.iter().map(|&x| x as u8).collect::<Vec<_>>())
            .unwrap()
    });
    let mut d_o: CudaSlice<T> = s
        .clone_htod(&vec![T::from_f32(f32::NAN); ql.numel()])
        .unwrap();
    let mut d_lse: CudaSlice<f32> = s
        .clone_htod(&vec![f32::NAN; b * c.heads_q * c.seqlen_q])
        .unwrap();
    {
        let (qv, kv, vv, mkv, mvv) = (
            dq.as_view(),
            dk.as_view(),
            dv.as_view(),
            dmk.as_view(),
            dmv.as_view(),
        );
        let maskv = dmask.as_ref().map(|m| m.as_view());
        let (mut ov, mut lv) = (d_o.as_view_mut(), d_lse.as_view_mut());
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
        let memory = MemoryInput {
            keys: Input {
                data: &mkv,
                layout: ml,
            },
            values: Input {
                data: &mvv,
                layout: ml,
            },
            mask: maskv.as_ref(),
        };
        let out = Output {
            data: &mut ov,
            layout: ql,
            lse: Some(&mut lv),
        };
        let opts = MemoryForward {
            rope: c.rope.as_ref(),
            softmax_scale: None,
        };
        match c.top_k {
            Some(top_k) => attn.forward_memory_top_k(s, qi, ki, vi, memory, out, &opts, top_k),
            None => attn.forward_memory(s, qi, ki, vi, memory, out, &opts),
        }
        .unwrap_or_else(|e| panic!("memory attention failed on {c:?}: {e}"));
    }
    s.synchronize().unwrap();
    let out = wide(&s.clone_dtoh(&d_o).unwrap());
    let lse: Vec<f32> = s.clone_dtoh(&d_lse).unwrap();
    compare(&out, Some(&lse), &ref64, &lowp)
}

fn run(g: &Gpu, c: &MemCase) {
    run_on(g, &g.attn, c);
}

pub(crate) fn run_on(g: &Gpu, attn: &Attention, c: &MemCase) {
    let cmp = match c.dtype {
        DType::F16 => run_t::<f16>(g, attn, c),
        DType::Bf16 => run_t::<bf16>(g, attn, c),
    };
    let path = if c.top_k.is_some() {
        "top k"
    } else if two_pass(attn, c) {
        "two passes"
    } else {
        "one kernel"
    };
    assert!(cmp.passes, "{c:?} ({path})\n  {cmp}");
}

#[test]
fn memory_attention_matches_reference() {
    let g = gpu_or_skip!();
    // (queries, local keys, memory entries): tile edges of both parts, a memory shorter than a
    // tile, an empty memory, more queries than local keys (early rows see only the memory).
    let sizes = [
        (128, 128, 256),
        (200, 200, 77),
        (65, 300, 129),
        (300, 100, 64),
        (64, 64, 0),
        (1, 190, 500),
    ];
    for d in [64, 128, 100] {
        for (i, &sz) in sizes.iter().enumerate() {
            let mut c = case(d, sz);
            c.dtype = if i % 2 == 0 { DType::Bf16 } else { DType::F16 };
            c.seed = 11 + i as u64;
            run(g, &c);
        }
    }
}

#[test]
fn memory_attention_options() {
    let g = gpu_or_skip!();
    for d in [64, 128] {
        let base = case(d, (150, 150, 300));
        // No rotation (FoT's positionals = False), no mask, every entry hidden but a few, MHA,
        // a left window with position offsets, a strided memory view.
        let mut cases = Vec::new();
        let mut c = base.clone();
        c.rope = None;
        cases.push(c);
        let mut c = base.clone();
        c.hidden = None;
        cases.push(c);
        let mut c = base.clone();
        c.hidden = Some(0.97);
        cases.push(c);
        let mut c = base.clone();
        c.heads_kv = 4;
        c.dtype = DType::F16;
        cases.push(c);
        let mut c = base.clone();
        let mut rope = RopeOptions::new(RopeConfig::llama(d), PositionMode::Rope);
        rope.window_left = Some(40);
        rope.position_offsets = Some(vec![3, 1000]);
        c.rope = Some(rope);
        cases.push(c);
        let mut c = base.clone();
        c.mem_row_pad = 8;
        cases.push(c);
        for c in &cases {
            run(g, c);
        }
    }
}

#[test]
fn memory_attention_rejects_bad_memory() {
    let g = gpu_or_skip!();
    let s = &g.stream;
    let (b, sq, hq, hk, d, m) = (1usize, 64usize, 2usize, 1usize, 64usize, 100usize);
    let ql = Layout::bshd(b, sq, hq, d);
    let kl = Layout::bshd(b, sq, hk, d);
    let ml = Layout::bshd(b, m, hk, d);
    let q: CudaSlice<bf16> = s.alloc_zeros(ql.numel()).unwrap();
    let k: CudaSlice<bf16> = s.alloc_zeros(kl.numel()).unwrap();
    let mk: CudaSlice<bf16> = s.alloc_zeros(ml.numel()).unwrap();
    let short_mask: CudaSlice<u8> = s.alloc_zeros(m - 1).unwrap();
    let mut o: CudaSlice<bf16> = s.alloc_zeros(ql.numel()).unwrap();
    let rerope = RopeOptions::new(RopeConfig::llama(d), PositionMode::ReRope { window: 16 });
    let (qv, kv, mkv) = (q.as_view(), k.as_view(), mk.as_view());
    let maskv = short_mask.as_view();
    let mut call = |mem_layout: Layout, mask: bool, rope: Option<&RopeOptions>| -> Error {
        let mut ov = o.as_view_mut();
        g.attn
            .forward_memory(
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
                    mask: mask.then_some(&maskv),
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
            )
            .expect_err("a bad memory argument must be refused")
    };
    // Heads other than the local keys', a memory longer than its buffer, a short mask, ReRoPE.
    assert!(matches!(
        call(Layout::bshd(b, m / 2, 2, d), false, None),
        Error::ShapeMismatch { .. }
    ));
    assert!(matches!(
        call(Layout::bshd(b, 2 * m, hk, d), false, None),
        Error::OutOfBounds { .. }
    ));
    assert!(matches!(
        call(ml, true, None),
        Error::OutOfBounds {
            arg: "memory.mask",
            ..
        }
    ));
    assert!(matches!(
        call(ml, false, Some(&rerope)),
        Error::InvalidArgument {
            arg: "rope.mode",
            ..
        }
    ));
    // Nothing ran: the output is still zero.
    let back: Vec<bf16> = s.clone_dtoh(&o).unwrap();
    assert!(back.iter().all(|x| x.to_f32() == 0.0));
}

/// The two-pass path on Hopper devices, unmasked and masked: the same cases through the one
/// kernel (the sm_80 mainloop forced) and, on a Hopper device, through the two passes of the
/// Hopper forward (the memory's with its per-key mask) and the merge, each under its own path's
/// budget.
#[test]
fn memory_two_pass_matches_reference() {
    let g = gpu_or_skip!();
    let sizes = [
        (128, 128, 256),
        (200, 200, 77),
        (65, 300, 129),
        (300, 100, 64),
        (64, 64, 0),
        (1, 190, 500),
    ];
    // A masked memory: some entries hidden, none (the mask read, every tile visible), all but a
    // few, all (rows see only their local keys).
    let mut masked: Vec<(usize, Option<f64>)> = (0..sizes.len()).map(|i| (i, Some(0.3))).collect();
    masked.extend([(0, Some(0.0)), (5, Some(0.97)), (2, Some(1.0))]);
    let unmasked = (0..sizes.len()).map(|i| (i, None));
    for d in [64, 128, 100] {
        for (n, (i, hidden)) in unmasked.clone().chain(masked.iter().copied()).enumerate() {
            let mut c = case(d, sizes[i]);
            c.hidden = hidden;
            c.dtype = if i % 2 == 0 { DType::Bf16 } else { DType::F16 };
            c.seed = 31 + n as u64;
            match i {
                1 => c.rope = None,
                2 => c.heads_kv = 4,
                3 => {
                    let mut rope = RopeOptions::new(RopeConfig::llama(d), PositionMode::Rope);
                    rope.window_left = Some(40);
                    rope.position_offsets = Some(vec![3, 1000]);
                    c.rope = Some(rope);
                }
                5 => c.mem_row_pad = 8,
                _ => {}
            }
            run_on(g, &g.sm80, &c);
            if let Some(h) = &g.hopper {
                assert!(two_pass(h, &c));
                run_on(g, h, &c);
            }
        }
    }
}

/// `memory_workspace_bytes` says which path a call takes (at placeholder addresses: nothing is
/// launched), and a raw call's two-pass workspace is checked before any launch: too small,
/// misaligned, over another tensor.
#[test]
fn memory_workspace_and_its_errors() {
    let g = gpu_or_skip!();
    let (b, sq, hq, hk, d, m) = (1usize, 64usize, 2usize, 1usize, 64usize, 100usize);
    let ql = Layout::bshd(b, sq, hq, d);
    let kl = Layout::bshd(b, sq, hk, d);
    let ml = Layout::bshd(b, m, hk, d);
    let fwd = raw_placeholder(ql, kl, longflash::ForwardOptions::causal());
    let mem = longflash::RawMemory {
        keys: 5 << 30,
        values: 6 << 30,
        mask: 0,
        keys_layout: ml,
        values_layout: ml,
        workspace: 0,
        workspace_bytes: 0,
    };
    let masked = longflash::RawMemory {
        mask: 7 << 30,
        ..mem
    };
    assert_eq!(g.sm80.memory_workspace_bytes(&fwd, &mem, None).unwrap(), 0);
    let Some(h) = &g.hopper else {
        return;
    };
    let need = h.memory_workspace_bytes(&fwd, &mem, None).unwrap();
    // The memory pass's output and two LSEs (the call gives none), each part 256-aligned.
    let out_bytes = b * sq * hq * d * 2;
    assert!(need >= out_bytes + 2 * b * hq * sq * 4, "{need} bytes");
    // A masked memory takes the same passes (the memory's with a per-key mask).
    assert_eq!(h.memory_workspace_bytes(&fwd, &masked, None).unwrap(), need);
    // Head dim 100 (LongLLaMA-3B's) takes the padded Hopper kernels where every row is whole
    // 16 bytes (two key heads: 400 bytes), and the one kernel where a row is not (one: 200).
    for (hk, takes) in [(2, true), (1, false)] {
        let padded = Layout::bshd(b, sq, hq, 100);
        let fwd100 = raw_placeholder(padded, Layout::bshd(b, sq, hk, 100), fwd.options);
        let mem100 = longflash::RawMemory {
            keys_layout: Layout::bshd(b, m, hk, 100),
            values_layout: Layout::bshd(b, m, hk, 100),
            ..mem
        };
        let bytes = h.memory_workspace_bytes(&fwd100, &mem100, None).unwrap();
        assert_eq!(bytes > 0, takes, "{hk} key heads: {bytes} bytes");
    }
    let call = |workspace: u64, workspace_bytes: usize| -> Error {
        let m = longflash::RawMemory {
            workspace,
            workspace_bytes,
            ..mem
        };
        // SAFETY: every call below is refused by validation before any launch.
        unsafe { h.forward_memory_raw(g.stream.cu_stream(), &fwd, &m, None) }
            .expect_err("a bad workspace must be refused")
    };
    let ws = 8u64 << 30;
    assert!(matches!(
        call(ws, need - 1),
        Error::InvalidArgument {
            arg: "memory.workspace_bytes",
            ..
        }
    ));
    assert!(matches!(
        call(ws + 8, need),
        Error::Misaligned {
            arg: "memory.workspace",
            ..
        }
    ));
    assert!(matches!(
        call(fwd.o - 64, need),
        Error::Aliasing {
            output: "memory.workspace",
            other: "o"
        }
    ));
    assert!(matches!(
        call(mem.keys + 256, need),
        Error::Aliasing {
            output: "memory.workspace",
            other: "memory.keys"
        }
    ));
}
