//! Memory decoding (`Attention::decode_memory`) against `reference::memory_attention_f64`, sequence
//! by sequence on the keys gathered from the cache, with `memory_attention_two_pass_lowp` (the
//! two partial outputs rounded before the merge) as the naive budget: paged and contiguous
//! caches of different lengths, RoPE on and off (with position offsets), speculative tokens and
//! a chunk of 64 queries, GQA and MHA, memories empty, shorter than a split and long enough for
//! many splits, masked memories (a sequence with every entry hidden among them); and the errors
//! of bad arguments.

use cudarc::driver::CudaSlice;
use half::{bf16, f16};
use longflash::mask::MaskSpec;
use longflash::reference::{
    compare, memory_attention_f64, memory_attention_two_pass_lowp, paged_gather, Comparison,
    RefMemory, RefOutput, RefShape,
};
use longflash::rope::{PositionMode, RopeConfig, RopeOptions};
use longflash::{DType, Element, Error, Input, Layout, MemoryDecode, MemoryInput};

use crate::common::*;
use crate::decode::{case, case_data, run_on_gpu, DecodeCase, Overrides};

/// A memory decoding problem: the local cache (its lengths, pages, heads), the memory's length
/// and the rotation.
#[derive(Clone, Debug)]
struct MemDecodeCase {
    base: DecodeCase,
    mem_len: usize,
    rope: Option<RopeOptions>,
    /// A per-entry memory mask: about a third of the entries hidden, all of sequence 1's.
    masked: bool,
}

/// The masked case's visibility, `[batch, mem_len]`.
fn visibility(batch: usize, mem_len: usize, seed: u64) -> Vec<bool> {
    let mut rng = Rng(seed ^ 0x3a5c);
    (0..batch * mem_len)
        .map(|i| i / mem_len.max(1) != 1 && rng.uniform() > 0.33)
        .collect()
}

fn run_t<T: Element>(g: &Gpu, c: &MemDecodeCase) -> Comparison {
    let bc = &c.base;
    let data = case_data::<T>(bc);
    let shape = &data.shape;
    let (b_n, hk, d) = (shape.batch, bc.heads_kv, bc.head_dim);
    let mut rng = Rng(bc.seed ^ 0x5eed);
    let nm = b_n * c.mem_len * hk * d;
    let mut gen =
        |n: usize| -> Vec<T> { (0..n).map(|_| T::from_f32(rng.normal() as f32)).collect() };
    let (mk, mv) = (gen(nm), gen(nm));
    let vis = c.masked.then(|| visibility(b_n, c.mem_len, bc.seed));
    let wide = |x: &[T]| -> Vec<f64> { x.iter().map(|t| t.to_f32() as f64).collect() };
    let scale = 1.0 / (d as f32).sqrt();
    // The references, sequence by sequence (batch 1, its own length and offset), joined.
    let q_seq = bc.seqlen_q * bc.heads_q * d;
    let m_seq = c.mem_len * hk * d;
    let mut ref64 = RefOutput::default();
    let mut lowp = RefOutput {
        dtype: Some(T::DTYPE),
        ..RefOutput::default()
    };
    for b in 0..b_n {
        let len = shape.seqlen_k(b);
        let (kb, vb) = paged_gather(shape, &data.k, &data.v, b).unwrap();
        let qb = &data.q[b * q_seq..(b + 1) * q_seq];
        let (mkb, mvb) = (
            &mk[b * m_seq..(b + 1) * m_seq],
            &mv[b * m_seq..(b + 1) * m_seq],
        );
        let vis_b = vis.as_ref().map(|v| &v[b * c.mem_len..(b + 1) * c.mem_len]);
        let rope_b = c.rope.as_ref().map(|r| RopeOptions {
            position_offsets: r.position_offsets.as_ref().map(|o| vec![o[b]]),
            ..r.clone()
        });
        let sb = RefShape {
            batch: 1,
            seqlen_q: bc.seqlen_q,
            seqlen_k: len,
            heads_q: bc.heads_q,
            heads_kv: hk,
            head_dim: d,
        };
        let (mk64, mv64) = (wide(mkb), wide(mvb));
        let r64 = memory_attention_f64(
            &sb,
            (&wide(qb), &wide(&kb), &wide(&vb)),
            &RefMemory {
                mem_len: c.mem_len,
                keys: &mk64,
                values: &mv64,
                visible: vis_b,
            },
            rope_b.as_ref(),
            None,
            scale as f64,
        )
        .unwrap_or_else(|e| panic!("{c:?}: reference: {e}"));
        let low = memory_attention_two_pass_lowp(
            &sb,
            (qb, &kb, &vb),
            &RefMemory {
                mem_len: c.mem_len,
                keys: mkb,
                values: mvb,
                visible: vis_b,
            },
            rope_b.as_ref(),
            None,
            scale,
        )
        .unwrap();
        ref64.out.extend(r64.out);
        ref64.lse.extend(r64.lse);
        lowp.out.extend(low.out);
        lowp.lse.extend(low.lse);
    }
    let ml = Layout::bshd(b_n, c.mem_len, hk, d);
    // A zero-length buffer cannot be allocated: one element stands in for an empty memory.
    let dmk = g
        .stream
        .clone_htod(&mk)
        .unwrap_or_else(|_| g.stream.alloc_zeros(1).unwrap());
    let dmv = g
        .stream
        .clone_htod(&mv)
        .unwrap_or_else(|_| g.stream.alloc_zeros(1).unwrap());
    let (mkv, mvv) = (dmk.as_view(), dmv.as_view());
    let dmask: Option<CudaSlice<u8>> = vis.as_ref().map(|v| {
        let bytes: Vec<u8> = v.iter().map(|&x| x as u8).collect();
        g.stream
            .clone_htod(&bytes)
            .unwrap_or_else(|_| g.stream.alloc_zeros(1).unwrap())
    });
    let maskv = dmask.as_ref().map(|m| m.as_view());
    let opts = MemoryDecode {
        rope: c.rope.as_ref(),
        softmax_scale: None,
    };
    let (out, lse, flag) = run_on_gpu(g, bc, &data, &Overrides::default(), |q, cache, out, f| {
        g.attn.decode_memory(
            &g.stream,
            q,
            cache,
            MemoryInput {
                keys: Input {
                    data: &mkv,
                    layout: ml,
                },
                values: Input {
                    data: &mvv,
                    layout: ml,
                },
                mask: maskv.as_ref(),
            },
            out,
            Some(f),
            &opts,
        )
    });
    assert_eq!(flag, 0, "{c:?}: valid cache reported");
    compare(&out, Some(&lse), &ref64, &lowp)
}

fn check(g: &Gpu, c: &MemDecodeCase) {
    let cmp = match c.base.dtype {
        DType::F16 => run_t::<f16>(g, c),
        DType::Bf16 => run_t::<bf16>(g, c),
    };
    assert!(cmp.passes, "{c:?}\n  {cmp}");
}

fn mem_case(d: usize, mem_len: usize) -> MemDecodeCase {
    let mut base = case(d, MaskSpec::causal());
    // Every sequence holds keys (the reference's local part needs one).
    base.lens = vec![1, 700, 129, 64];
    MemDecodeCase {
        base,
        mem_len,
        rope: Some(RopeOptions::new(RopeConfig::llama(d), PositionMode::Rope)),
        masked: false,
    }
}

#[test]
fn memory_decoding_matches_reference() {
    let g = gpu_or_skip!();
    for d in [64, 128] {
        for (i, mem_len) in [0usize, 37, 1000, 5000, 3000].into_iter().enumerate() {
            let mut c = mem_case(d, mem_len);
            c.base.dtype = if i % 2 == 0 { DType::Bf16 } else { DType::F16 };
            c.base.seed = 100 + i as u64 + d as u64;
            match i {
                1 => {
                    c.rope = None;
                    c.masked = true;
                }
                2 => {
                    // A contiguous cache, speculative tokens, MHA, position offsets.
                    c.base.page_size = None;
                    c.base.seqlen_q = 3;
                    c.base.heads_kv = c.base.heads_q;
                    let mut r = RopeOptions::new(RopeConfig::llama(d), PositionMode::Rope);
                    r.position_offsets = Some(vec![5, 0, 1000, 17]);
                    c.rope = Some(r);
                }
                3 => {
                    c.base.seqlen_q = 2;
                    let mut r = RopeOptions::new(RopeConfig::llama(d), PositionMode::Rope);
                    r.window_left = Some(100);
                    c.rope = Some(r);
                    c.masked = true;
                }
                4 => {
                    // A chunk of 64 queries over a masked memory (the memory part splits even
                    // where plain decoding would run the chunked-prefill kernel).
                    c.base.seqlen_q = 64;
                    c.base.lens = vec![64, 700, 129, 100];
                    c.masked = true;
                    if d == 64 {
                        c.rope = None;
                    }
                }
                _ => {}
            }
            check(g, &c);
        }
    }
}

#[test]
fn memory_decoding_rejects_bad_arguments() {
    let g = gpu_or_skip!();
    let s = &g.stream;
    let (b, hq, hk, d, cap, m) = (2usize, 4usize, 2usize, 64usize, 32usize, 50usize);
    let ql = Layout::bshd(b, 1, hq, d);
    let kl = Layout::bshd(b, cap, hk, d);
    let ml = Layout::bshd(b, m, hk, d);
    let q: CudaSlice<bf16> = s.alloc_zeros(ql.numel()).unwrap();
    let k: CudaSlice<bf16> = s.alloc_zeros(kl.numel()).unwrap();
    let mk: CudaSlice<bf16> = s.alloc_zeros(ml.numel()).unwrap();
    let mask: CudaSlice<u8> = s.alloc_zeros(b * m - 1).unwrap(); // one byte short
    let mut o: CudaSlice<bf16> = s.alloc_zeros(ql.numel()).unwrap();
    let (qv, kv, mkv, maskv) = (q.as_view(), k.as_view(), mk.as_view(), mask.as_view());
    let rerope = RopeOptions::new(RopeConfig::llama(d), PositionMode::ReRope { window: 8 });
    let mut call = |mem: Layout, masked: bool, rope: Option<&RopeOptions>| -> Error {
        let mut ov = o.as_view_mut();
        let cache = longflash::KvCache {
            k: Input {
                data: &kv,
                layout: kl,
            },
            v: Input {
                data: &kv,
                layout: kl,
            },
            block_table: None,
            cache_seqlens: None,
        };
        g.attn
            .decode_memory(
                s,
                Input {
                    data: &qv,
                    layout: ql,
                },
                &cache,
                MemoryInput {
                    keys: Input {
                        data: &mkv,
                        layout: mem,
                    },
                    values: Input {
                        data: &mkv,
                        layout: mem,
                    },
                    mask: masked.then_some(&maskv),
                },
                longflash::Output {
                    data: &mut ov,
                    layout: ql,
                    lse: None,
                },
                None,
                &MemoryDecode {
                    rope,
                    softmax_scale: None,
                },
            )
            .expect_err("a bad argument must be refused")
    };
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
    assert!(matches!(
        call(Layout::bshd(b, m / 2, hq, d), false, None),
        Error::ShapeMismatch { .. }
    ));
    assert!(matches!(
        call(Layout::bshd(b, 2 * m, hk, d), false, None),
        Error::OutOfBounds { .. }
    ));
}

/// The raw entry with the caller's workspace gives the safe entry's bits (the safe one calls
/// it with a workspace of its own), and refuses a short, misplaced or doubled workspace.
#[test]
fn memory_decoding_raw_takes_the_callers_workspace() {
    let g = gpu_or_skip!();
    let s = &g.stream;
    let (b, hq, hk, d, cap, m) = (2usize, 8usize, 2usize, 64usize, 300usize, 1000usize);
    let ql = Layout::bshd(b, 2, hq, d);
    let kl = Layout::bshd(b, cap, hk, d);
    let ml = Layout::bshd(b, m, hk, d);
    let mut rng = Rng(77);
    let mut gen = |n: usize| -> Vec<bf16> {
        (0..n)
            .map(|_| bf16::from_f32(rng.normal() as f32))
            .collect()
    };
    let (hq_, hk_, hv_, hmk, hmv) = (
        gen(ql.numel()),
        gen(kl.numel()),
        gen(kl.numel()),
        gen(ml.numel()),
        gen(ml.numel()),
    );
    let vis = visibility(b, m, 5);
    let mask_bytes: Vec<u8> = vis.iter().map(|&x| x as u8).collect();
    let up = |x: &[bf16]| s.clone_htod(x).unwrap();
    let (q, k, v, mk, mv) = (up(&hq_), up(&hk_), up(&hv_), up(&hmk), up(&hmv));
    let mask = s.clone_htod(&mask_bytes).unwrap();
    let lens = s.clone_htod(&[37i32, 300]).unwrap();
    let (qv, kv, vv, mkv, mvv, maskv, lensv) = (
        q.as_view(),
        k.as_view(),
        v.as_view(),
        mk.as_view(),
        mv.as_view(),
        mask.as_view(),
        lens.as_view(),
    );
    let cache = longflash::KvCache {
        k: Input {
            data: &kv,
            layout: kl,
        },
        v: Input {
            data: &vv,
            layout: kl,
        },
        block_table: None,
        cache_seqlens: Some(&lensv),
    };
    let rows = b * hq * ql.seqlen;
    // The safe entry.
    let mut o1: CudaSlice<bf16> = s.alloc_zeros(ql.numel()).unwrap();
    let mut l1: CudaSlice<f32> = s.alloc_zeros(rows).unwrap();
    {
        let (mut ov, mut lv) = (o1.as_view_mut(), l1.as_view_mut());
        g.attn
            .decode_memory(
                s,
                Input {
                    data: &qv,
                    layout: ql,
                },
                &cache,
                MemoryInput {
                    keys: Input {
                        data: &mkv,
                        layout: ml,
                    },
                    values: Input {
                        data: &mvv,
                        layout: ml,
                    },
                    mask: Some(&maskv),
                },
                longflash::Output {
                    data: &mut ov,
                    layout: ql,
                    lse: Some(&mut lv),
                },
                None,
                &MemoryDecode::default(),
            )
            .unwrap();
    }
    // The raw entry with the caller's workspace (and no LSE asked for: the workspace holds it).
    let o2: CudaSlice<bf16> = s.alloc_zeros(ql.numel()).unwrap();
    let ptr = |x: &CudaSlice<bf16>| -> u64 {
        let (p, _g) = cudarc::driver::DevicePtr::device_ptr(x, s);
        p
    };
    let (qp, kp, vp, mkp, mvp, o2p) = (ptr(&q), ptr(&k), ptr(&v), ptr(&mk), ptr(&mv), ptr(&o2));
    let (maskp, _g1) = cudarc::driver::DevicePtr::device_ptr(&mask, s);
    let (lensp, _g2) = cudarc::driver::DevicePtr::device_ptr(&lens, s);
    let mut raw = longflash::RawMemoryDecode {
        local: longflash::RawDecode {
            dtype: DType::Bf16,
            q: qp,
            k: kp,
            v: vp,
            o: o2p,
            lse: 0,
            q_layout: ql,
            k_layout: kl,
            v_layout: kl,
            o_layout: ql,
            block_table: 0,
            max_pages_per_seq: 0,
            cache_seqlens: lensp,
            error_flag: 0,
            options: longflash::DecodeOptions {
                mask: MaskSpec::causal(),
                ..Default::default()
            },
            workspace: 0,
            workspace_bytes: 0,
            split_counters: 0,
            split_counters_len: 0,
        },
        mem_k: mkp,
        mem_v: mvp,
        mem_k_layout: ml,
        mem_v_layout: ml,
        mem_mask: maskp,
        workspace: 0,
        workspace_bytes: 0,
    };
    let plan = g.attn.decode_memory_plan(&raw, None).unwrap();
    assert!(plan.memory.is_some() && plan.workspace_bytes >= rows * (d * 2 + 8));
    let ws: CudaSlice<u8> = s.alloc_zeros(plan.workspace_bytes).unwrap();
    let (wsp, _g3) = cudarc::driver::DevicePtr::device_ptr(&ws, s);
    let call = |r: &longflash::RawMemoryDecode| -> longflash::Result<()> {
        // SAFETY: every pointer is a live allocation of this context holding what its layout
        // addresses (the workspace the plan's bytes); the stream is the test's, synchronized
        // before the buffers are read or freed.
        unsafe { g.attn.decode_memory_raw(s.cu_stream(), r, None) }
    };
    raw.workspace = wsp;
    raw.workspace_bytes = plan.workspace_bytes - 1;
    assert!(matches!(
        call(&raw),
        Err(Error::InvalidArgument {
            arg: "workspace_bytes",
            ..
        })
    ));
    raw.workspace = qp;
    raw.workspace_bytes = plan.workspace_bytes;
    assert!(matches!(call(&raw), Err(Error::Aliasing { .. })));
    let mut doubled = raw;
    doubled.local.workspace = wsp;
    assert!(matches!(
        call(&doubled),
        Err(Error::InvalidArgument {
            arg: "local.workspace",
            ..
        })
    ));
    raw.workspace = wsp;
    call(&raw).unwrap();
    s.synchronize().unwrap();
    let (h1, h2) = (s.clone_dtoh(&o1).unwrap(), s.clone_dtoh(&o2).unwrap());
    assert!(
        h1.iter().zip(&h2).all(|(a, b)| a.to_bits() == b.to_bits()),
        "the raw entry's output differs from the safe entry's"
    );
    assert!(h1.iter().any(|x| x.to_f32() != 0.0));
}
