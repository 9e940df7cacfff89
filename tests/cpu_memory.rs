//! The memory-attention reference (`reference::memory_attention_f64`): one softmax over the local
//! window and the memory against the LSE merge of a local pass and a memory pass, the top-k
//! selection against a brute-force ranking (ties to the lower index), the memory mask, and its
//! errors. CPU only.

use half::{bf16, f16};
use longflash::dtype::Element;
use longflash::error::Error;
use longflash::mask::MaskSpec;
use longflash::reference::{
    attention_f64, compare, memory_attention_f64, memory_attention_lowp,
    memory_attention_two_pass_lowp, memory_top_k, merge, rope_attention_f64, rope_attention_lowp,
    rope_rotate_q, RefMemory, RefOutput, RefShape, Visibility,
};
use longflash::rope::{PositionMode, RopeConfig, RopeOptions};
use proptest::prelude::*;

#[path = "support/rng.rs"]
mod rng;
use rng::Rng;

/// A memory-attention problem: the local window, the memory and its mask.
struct Problem {
    shape: RefShape,
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    mem_len: usize,
    mk: Vec<f64>,
    mv: Vec<f64>,
    visible: Vec<bool>,
}

impl Problem {
    fn new(shape: RefShape, mem_len: usize, hidden: f64, seed: u64) -> Self {
        let mut rng = Rng(seed | 1);
        let (nq, nkv) = (shape.q_len().unwrap(), shape.kv_len().unwrap());
        let nm = shape.batch * mem_len * shape.heads_kv * shape.head_dim;
        let q = rng.vec(nq, 1.5);
        let (k, v) = (rng.vec(nkv, 1.5), rng.vec(nkv, 1.0));
        let (mk, mv) = (rng.vec(nm, 1.5), rng.vec(nm, 1.0));
        let visible = (0..shape.batch * mem_len)
            .map(|_| rng.sym(1.0).abs() >= hidden)
            .collect();
        Problem {
            shape,
            q,
            k,
            v,
            mem_len,
            mk,
            mv,
            visible,
        }
    }

    fn memory(&self) -> RefMemory<'_> {
        RefMemory {
            mem_len: self.mem_len,
            keys: &self.mk,
            values: &self.mv,
            visible: Some(&self.visible),
        }
    }

    /// The memory as a key/value problem of its own: the queries of `shape` over `mem_len` keys.
    fn memory_shape(&self) -> RefShape {
        RefShape {
            seqlen_k: self.mem_len,
            ..self.shape
        }
    }
}

/// The memory mask as a visibility over the memory pass (every query of a batch entry sees the
/// same entries).
struct MemoryMask<'a> {
    mem_len: usize,
    visible: &'a [bool],
}

impl Visibility for MemoryMask<'_> {
    fn visible(&self, _shape: &RefShape, b: usize, _h: usize, _i: usize, j: usize) -> bool {
        self.visible[b * self.mem_len + j]
    }
}

fn assert_close(got: &RefOutput, want: &RefOutput, what: &str) {
    assert_eq!(got.out.len(), want.out.len(), "{what}: output length");
    for (i, (a, b)) in got.out.iter().zip(&want.out).enumerate() {
        assert!((a - b).abs() <= 1e-12, "{what}: out[{i}] {a} vs {b}");
    }
    for (i, (a, b)) in got.lse.iter().zip(&want.lse).enumerate() {
        assert!(
            a == b || (a - b).abs() <= 1e-12 * a.abs().max(1.0),
            "{what}: lse[{i}] {a} vs {b}"
        );
    }
}

fn rope(d: usize) -> RopeOptions {
    RopeOptions::new(RopeConfig::llama(d), PositionMode::Rope)
}

fn shapes() -> impl Strategy<Value = RefShape> {
    (
        1usize..3,
        1usize..12,
        0usize..14,
        1usize..4,
        1usize..3,
        1usize..4,
    )
        .prop_map(|(batch, seqlen_q, extra, group, heads_kv, half)| RefShape {
            batch,
            seqlen_q,
            seqlen_k: seqlen_q + extra,
            heads_q: heads_kv * group,
            heads_kv,
            head_dim: 2 * half,
        })
}

proptest! {
    /// One softmax over `[local | memory]` is the LSE merge of the local pass (causal, RoPE at
    /// window-relative positions) and the memory pass (the rotated queries against the raw
    /// memory keys, the memory mask, no causality): the identity the kernel's two key sources
    /// sharing one online softmax rest on.
    #[test]
    fn one_softmax_is_the_merge_of_local_and_memory(
        shape in shapes(), mem_len in 0usize..20, hidden in 0.0f64..1.0, seed in any::<u64>(),
        positionals in any::<bool>(),
    ) {
        let p = Problem::new(shape, mem_len, hidden, seed);
        let r = rope(shape.head_dim);
        let rope_opt = positionals.then_some(&r);
        let scale = 0.7;
        let got =
            memory_attention_f64(&shape, (&p.q, &p.k, &p.v), &p.memory(), rope_opt, None, scale)
                .unwrap();
        let (local, q_mem) = if positionals {
            (
                rope_attention_f64(&shape, &p.q, &p.k, &p.v, &r, scale).unwrap(),
                rope_rotate_q(&shape, &p.q, &r).unwrap(),
            )
        } else {
            (
                attention_f64(&shape, &p.q, &p.k, &p.v, &MaskSpec::causal(), scale).unwrap(),
                p.q.clone(),
            )
        };
        let mask = MemoryMask { mem_len, visible: &p.visible };
        let mem = attention_f64(&p.memory_shape(), &q_mem, &p.mk, &p.mv, &mask, scale).unwrap();
        assert_close(&got, &merge(&shape, &local, &mem), "merge");
    }

    /// With `top_k` at least the number of visible entries, the top-k layer is the full one; with
    /// fewer, it is the full layer over a memory whose mask also hides the entries a row did not
    /// select (checked on one query row, where the selection is one set).
    #[test]
    fn top_k_selects_then_attends(
        shape in shapes(), mem_len in 1usize..20, hidden in 0.0f64..0.6, seed in any::<u64>(),
        k in 1usize..24,
    ) {
        let shape = RefShape { seqlen_q: 1, heads_q: shape.heads_kv, ..shape };
        let p = Problem::new(shape, mem_len, hidden, seed);
        let r = rope(shape.head_dim);
        let scale = 0.5;
        let run = |m: &RefMemory, top_k| {
            memory_attention_f64(&shape, (&p.q, &p.k, &p.v), m, Some(&r), top_k, scale).unwrap()
        };
        let full = run(&p.memory(), None);
        let visible_count = |b: usize| p.visible[b * mem_len..(b + 1) * mem_len].iter().filter(|&&x| x).count();
        if (0..shape.batch).all(|b| visible_count(b) <= k) {
            assert_close(&run(&p.memory(), Some(k)), &full, "k >= visible");
        }
        // Per (batch entry, head): the selection by brute force, then the full layer over it.
        let qr = rope_rotate_q(&shape, &p.q, &r).unwrap();
        let d = shape.head_dim;
        let topk = run(&p.memory(), Some(k));
        for b in 0..shape.batch {
            for h in 0..shape.heads_q {
                let qo = (b * shape.heads_q + h) * d; // one query row
                let scores: Vec<Option<f64>> = (0..mem_len)
                    .map(|j| {
                        let ko = ((b * mem_len + j) * shape.heads_kv + h) * d;
                        p.visible[b * mem_len + j].then(|| {
                            scale * (0..d).map(|t| qr[qo + t] * p.mk[ko + t]).sum::<f64>()
                        })
                    })
                    .collect();
                let mut ranked: Vec<usize> = (0..mem_len).filter(|&j| scores[j].is_some()).collect();
                ranked.sort_by(|&x, &y| {
                    scores[y].unwrap().partial_cmp(&scores[x].unwrap()).unwrap().then(x.cmp(&y))
                });
                ranked.truncate(k);
                let chosen = memory_top_k(&scores, Some(k));
                let mut want_set = ranked.clone();
                want_set.sort_unstable();
                prop_assert_eq!(&chosen, &want_set);
                // The layer over only the chosen entries, for this (b, h).
                let mut vis = vec![false; shape.batch * mem_len];
                for &j in &chosen {
                    vis[b * mem_len + j] = true;
                }
                let m = RefMemory { visible: Some(&vis), ..p.memory() };
                let want = run(&m, None);
                let o = qo;
                for t in 0..d {
                    prop_assert!((topk.out[o + t] - want.out[o + t]).abs() <= 1e-12);
                }
                let l = (b * shape.heads_q + h) * shape.seqlen_q;
                prop_assert!(topk.lse[l] == want.lse[l] || (topk.lse[l] - want.lse[l]).abs() <= 1e-12);
            }
        }
    }
}

/// Equal scores: the lower memory index wins, whatever order the entries sit in.
#[test]
fn top_k_ties_go_to_the_lower_index() {
    let s = |x: f64| Some(x);
    let scores = [s(1.0), None, s(3.0), s(1.0), s(3.0), s(1.0), s(0.5)];
    assert_eq!(memory_top_k(&scores, Some(1)), vec![2]);
    assert_eq!(memory_top_k(&scores, Some(2)), vec![2, 4]);
    assert_eq!(memory_top_k(&scores, Some(3)), vec![0, 2, 4]);
    assert_eq!(memory_top_k(&scores, Some(4)), vec![0, 2, 3, 4]);
    assert_eq!(memory_top_k(&scores, Some(6)), vec![0, 2, 3, 4, 5, 6]);
    assert_eq!(memory_top_k(&scores, Some(60)), vec![0, 2, 3, 4, 5, 6]);
    assert_eq!(memory_top_k(&scores, None), vec![0, 2, 3, 4, 5, 6]);
    assert_eq!(memory_top_k(&[None, None], Some(1)), Vec::<usize>::new());
    // Duplicate memory keys give equal scores in the layer too: the first copy is taken.
    let shape = RefShape {
        batch: 1,
        seqlen_q: 1,
        seqlen_k: 1,
        heads_q: 1,
        heads_kv: 1,
        head_dim: 2,
    };
    let (q, k, v) = ([1.0, 0.0], [0.0, 0.0], [0.0, 0.0]);
    let mk = [0.5, 0.0, 2.0, 0.0, 2.0, 0.0];
    let mv = [0.0, 0.0, 1.0, 0.0, 5.0, 0.0];
    let mem = RefMemory {
        mem_len: 3,
        keys: &mk,
        values: &mv,
        visible: None,
    };
    let r = memory_attention_f64(&shape, (&q, &k, &v), &mem, None, Some(1), 1.0).unwrap();
    // The local key (score 0) and memory entry 1 (score 2): entry 2's value 5 is not seen.
    let p = 2f64.exp() / (1.0 + 2f64.exp());
    assert!((r.out[0] - p).abs() < 1e-15, "{:?}", r.out);
}

/// A memory whose entries are all hidden adds nothing; a row before the local window's first
/// key (more queries than keys) sees only the memory; an empty memory is the local pass.
#[test]
fn memory_mask_and_empty_rows() {
    let shape = RefShape {
        batch: 2,
        seqlen_q: 5,
        seqlen_k: 3,
        heads_q: 2,
        heads_kv: 1,
        head_dim: 4,
    };
    let p = Problem::new(shape, 4, 2.0, 9); // hidden 2.0: every entry hidden
    assert!(p.visible.iter().all(|&x| !x));
    let r = rope(4);
    let local = rope_attention_f64(&shape, &p.q, &p.k, &p.v, &r, 0.5).unwrap();
    let run = |m: &RefMemory| {
        memory_attention_f64(&shape, (&p.q, &p.k, &p.v), m, Some(&r), None, 0.5).unwrap()
    };
    assert_close(&run(&p.memory()), &local, "all hidden");
    let empty = RefMemory {
        mem_len: 0,
        keys: &[],
        values: &[],
        visible: None,
    };
    assert_close(&run(&empty), &local, "empty memory");
    // Rows 0 and 1 see no local key (5 queries over 3 keys, bottom-right): -inf without memory,
    // finite with a visible one.
    assert_eq!(local.lse[0], f64::NEG_INFINITY);
    let open = RefMemory {
        visible: None,
        ..p.memory()
    };
    let with = run(&open);
    assert!(with.lse[0].is_finite() && with.out[..4].iter().any(|&x| x != 0.0));
}

#[test]
fn memory_errors_are_typed() {
    let shape = RefShape {
        batch: 1,
        seqlen_q: 2,
        seqlen_k: 2,
        heads_q: 1,
        heads_kv: 1,
        head_dim: 2,
    };
    let p = Problem::new(shape, 3, 0.0, 5);
    let arg = |e: Error| match e {
        Error::InvalidArgument { arg, .. } => arg,
        other => panic!("unexpected {other:?}"),
    };
    let run = |m: &RefMemory, rope: Option<&RopeOptions>, k| {
        memory_attention_f64(&shape, (&p.q, &p.k, &p.v), m, rope, k, 1.0)
    };
    let short = RefMemory {
        keys: &p.mk[1..],
        ..p.memory()
    };
    assert_eq!(arg(run(&short, None, None).unwrap_err()), "memory.keys.len");
    let short = RefMemory {
        values: &p.mv[1..],
        ..p.memory()
    };
    assert_eq!(
        arg(run(&short, None, None).unwrap_err()),
        "memory.values.len"
    );
    let bad_mask = [true];
    let short = RefMemory {
        visible: Some(&bad_mask),
        ..p.memory()
    };
    assert_eq!(
        arg(run(&short, None, None).unwrap_err()),
        "memory.visible.len"
    );
    assert_eq!(arg(run(&p.memory(), None, Some(0)).unwrap_err()), "top_k");
    let rerope = RopeOptions::new(RopeConfig::llama(2), PositionMode::ReRope { window: 4 });
    assert_eq!(
        arg(run(&p.memory(), Some(&rerope), None).unwrap_err()),
        "rope.mode"
    );
}

/// The low-precision memory layer: with an empty memory it is `rope_attention_lowp` bit for bit
/// (the same roundings), and it stays near the f64 layer (full and top-k) on random problems.
fn lowp_memory<T: Element>(seed: u64) {
    let shape = RefShape {
        batch: 2,
        seqlen_q: 7,
        seqlen_k: 11,
        heads_q: 4,
        heads_kv: 2,
        head_dim: 16,
    };
    let p = Problem::new(shape, 13, 0.3, seed);
    let to_t = |x: &[f64]| -> Vec<T> { x.iter().map(|&a| T::from_f32(a as f32)).collect() };
    let wide = |x: &[T]| -> Vec<f64> { x.iter().map(|t| f64::from(t.to_f32())).collect() };
    let (q, k, v, mk, mv) = (to_t(&p.q), to_t(&p.k), to_t(&p.v), to_t(&p.mk), to_t(&p.mv));
    let r = rope(16);
    let empty = RefMemory::<T> {
        mem_len: 0,
        keys: &[],
        values: &[],
        visible: None,
    };
    let got = memory_attention_lowp(&shape, (&q, &k, &v), &empty, Some(&r), None, 0.4).unwrap();
    assert_eq!(
        got,
        rope_attention_lowp(&shape, &q, &k, &v, &r, 0.4).unwrap()
    );
    let low_mem = RefMemory {
        mem_len: 13,
        keys: &mk,
        values: &mv,
        visible: Some(&p.visible),
    };
    let (qw, kw, vw, mkw, mvw) = (wide(&q), wide(&k), wide(&v), wide(&mk), wide(&mv));
    let mem64 = RefMemory {
        mem_len: 13,
        keys: &mkw,
        values: &mvw,
        visible: Some(&p.visible),
    };
    for top_k in [None, Some(3)] {
        if top_k.is_some() && !clear_top_k(&shape, &qw, &r, &mem64, 3, 0.4) {
            continue;
        }
        let low =
            memory_attention_lowp(&shape, (&q, &k, &v), &low_mem, Some(&r), top_k, 0.4).unwrap();
        let r64 =
            memory_attention_f64(&shape, (&qw, &kw, &vw), &mem64, Some(&r), top_k, 0.4).unwrap();
        let c = compare(&low.out, None, &r64, &low);
        assert!(c.passes, "{c}");
        assert!(
            c.naive_abs_err < 0.05,
            "top_k {top_k:?}: naive error {}",
            c.naive_abs_err
        );
        assert!(low
            .lse
            .iter()
            .zip(&r64.lse)
            .all(|(a, b)| (a - b).abs() < 0.05));
    }
}

/// Whether every row's `k`-th and `k+1`-th memory scores (f64) are at least 0.05 apart: a top-k
/// selection that rounding cannot change. (Where they are closer, a low-precision selection may
/// take the other entry, and the outputs differ by that entry's weight: the top-k layer is not
/// continuous in its inputs there.)
fn clear_top_k(
    shape: &RefShape,
    q: &[f64],
    rope: &RopeOptions,
    mem: &RefMemory,
    k: usize,
    scale: f64,
) -> bool {
    let qr = rope_rotate_q(shape, q, rope).unwrap();
    let d = shape.head_dim;
    let group = shape.heads_q / shape.heads_kv;
    (0..shape.batch).all(|b| {
        (0..shape.heads_q).all(|h| {
            (0..shape.seqlen_q).all(|i| {
                let qo = ((b * shape.seqlen_q + i) * shape.heads_q + h) * d;
                let mut s: Vec<f64> = (0..mem.mem_len)
                    .filter(|&j| mem.visible.is_none_or(|v| v[b * mem.mem_len + j]))
                    .map(|j| {
                        let ko = ((b * mem.mem_len + j) * shape.heads_kv + h / group) * d;
                        scale * (0..d).map(|t| qr[qo + t] * mem.keys[ko + t]).sum::<f64>()
                    })
                    .collect();
                s.sort_by(|x, y| y.total_cmp(x));
                s.len() <= k || s[k - 1] - s[k] >= 0.05
            })
        })
    })
}

#[test]
fn lowp_memory_layer() {
    for seed in 1..6 {
        lowp_memory::<f16>(seed);
        lowp_memory::<bf16>(seed);
    }
}

/// The top-k comparison of `lowp_memory_layer` runs at all: one query row over a memory of
/// three well-separated entries per head.
#[test]
fn lowp_memory_top_k_on_separated_scores() {
    let shape = RefShape {
        batch: 1,
        seqlen_q: 1,
        seqlen_k: 2,
        heads_q: 1,
        heads_kv: 1,
        head_dim: 2,
    };
    let (q, k, v) = ([1.0, 0.0], [0.5, 0.5, -0.5, 0.25], [1.0, 2.0, 3.0, 4.0]);
    let (mk, mv) = (
        [2.0, 0.0, -1.0, 0.0, 1.0, 0.0],
        [5.0, 6.0, 7.0, 8.0, 9.0, 10.0],
    );
    let mem = RefMemory {
        mem_len: 3,
        keys: &mk,
        values: &mv,
        visible: None,
    };
    let r = rope(2);
    assert!(clear_top_k(&shape, &q, &r, &mem, 2, 1.0));
    let t = |x: &[f64]| -> Vec<bf16> { x.iter().map(|&a| bf16::from_f64(a)).collect() };
    let (qt, kt, vt, mkt, mvt) = (t(&q), t(&k), t(&v), t(&mk), t(&mv));
    let low_mem = RefMemory {
        mem_len: 3,
        keys: &mkt,
        values: &mvt,
        visible: None,
    };
    let low =
        memory_attention_lowp(&shape, (&qt, &kt, &vt), &low_mem, Some(&r), Some(2), 1.0).unwrap();
    let r64 = memory_attention_f64(&shape, (&q, &k, &v), &mem, Some(&r), Some(2), 1.0).unwrap();
    let c = compare(&low.out, None, &r64, &low);
    assert!(c.passes && c.naive_abs_err < 0.05, "{c}");
    // Entry 1 (score -1) is not selected: the output is the local keys' and entries 0 and 2's.
    let full = memory_attention_f64(&shape, (&q, &k, &v), &mem, Some(&r), None, 1.0).unwrap();
    assert!((full.out[0] - r64.out[0]).abs() > 1e-3);
}

/// The two-pass layer (a local pass and a memory pass, each rounded to `T`, merged by LSE as
/// the GPU's merge does), the budget of the Hopper path: with an empty memory it is the local
/// pass bit for bit, and on the GPU tests' kind of problems (normal inputs, head dims 64 and 128,
/// memories across tile edges, RoPE on and off, a left window, more queries than local keys,
/// GQA and MHA) it stays near the f64 layer, its error of the one-kernel layer's order; the
/// same with each row's top third of the memory (the top-k path's budget).
fn two_pass_layer<T: Element>(seed: u64) {
    let mut rng = Rng(seed);
    let cases = [
        (64, 128, 128, 256, 2),
        (128, 200, 200, 77, 4),
        (64, 65, 300, 129, 2),
        (128, 300, 100, 64, 1),
        (64, 64, 64, 0, 2),
        (128, 1, 190, 500, 4),
    ];
    for (c, &(d, sq, sk, mem_len, group)) in cases.iter().enumerate() {
        let shape = RefShape {
            batch: 1,
            seqlen_q: sq,
            seqlen_k: sk,
            heads_q: 2 * group,
            heads_kv: 2,
            head_dim: d,
        };
        let gen = |n: usize, rng: &mut Rng| -> Vec<T> {
            (0..n).map(|_| T::from_f32(rng.normal() as f32)).collect()
        };
        let (nq, nkv) = (shape.q_len().unwrap(), shape.kv_len().unwrap());
        let nm = mem_len * shape.heads_kv * d;
        let (q, k, v) = (gen(nq, &mut rng), gen(nkv, &mut rng), gen(nkv, &mut rng));
        let (mk, mv) = (gen(nm, &mut rng), gen(nm, &mut rng));
        let wide = |x: &[T]| -> Vec<f64> { x.iter().map(|t| f64::from(t.to_f32())).collect() };
        let mut r = rope(d);
        if c == 3 {
            r.window_left = Some(40);
        }
        let rope_opt = (c != 2).then_some(&r);
        let scale = 1.0 / (d as f32).sqrt();
        let low = RefMemory {
            mem_len,
            keys: &mk,
            values: &mv,
            visible: None,
        };
        let empty = RefMemory::<T> {
            mem_len: 0,
            keys: &[],
            values: &[],
            visible: None,
        };
        let (mk64, mv64) = (wide(&mk), wide(&mv));
        let mem64 = RefMemory {
            mem_len,
            keys: &mk64,
            values: &mv64,
            visible: None,
        };
        let local =
            memory_attention_two_pass_lowp(&shape, (&q, &k, &v), &empty, rope_opt, None, scale)
                .unwrap();
        let local_one =
            memory_attention_lowp(&shape, (&q, &k, &v), &empty, rope_opt, None, scale).unwrap();
        assert_eq!(local.out, local_one.out, "case {c}: empty memory");
        assert_eq!(local.lse, local_one.lse, "case {c}: empty memory, LSE");
        // Every entry, and (the top-k path's budget) each row's top third of the memory.
        let top = (mem_len > 0).then(|| (mem_len / 3).max(1));
        for top_k in [None, top]
            .into_iter()
            .collect::<std::collections::BTreeSet<_>>()
        {
            let r64 = memory_attention_f64(
                &shape,
                (&wide(&q), &wide(&k), &wide(&v)),
                &mem64,
                rope_opt,
                top_k,
                scale as f64,
            )
            .unwrap();
            let one =
                memory_attention_lowp(&shape, (&q, &k, &v), &low, rope_opt, top_k, scale).unwrap();
            let two =
                memory_attention_two_pass_lowp(&shape, (&q, &k, &v), &low, rope_opt, top_k, scale)
                    .unwrap();
            let err = |x: &RefOutput| -> f64 {
                x.out
                    .iter()
                    .zip(&r64.out)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f64::max)
            };
            let (e1, e2) = (err(&one), err(&two));
            let ulp = if T::DTYPE == longflash::DType::Bf16 {
                1.0 / 128.0
            } else {
                1.0 / 1024.0
            };
            assert!(
                e2 <= 2.0 * e1 + ulp,
                "case {c}, top {top_k:?}: two-pass error {e2}, one kernel {e1}"
            );
            let lse_err = |x: &RefOutput| -> f64 {
                x.lse
                    .iter()
                    .zip(&r64.lse)
                    .map(|(a, b)| {
                        if a == b {
                            0.0
                        } else {
                            (a - b).abs() / b.abs().max(1.0)
                        }
                    })
                    .fold(0.0, f64::max)
            };
            let (l1, l2) = (lse_err(&one), lse_err(&two));
            assert!(
                l2 <= 2.0 * l1 + 1e-5,
                "case {c}, top {top_k:?}: two-pass LSE error {l2}, one kernel {l1}"
            );
        }
    }
}

#[test]
fn two_pass_memory_layer() {
    for seed in [1, 2, 3] {
        two_pass_layer::<bf16>(seed);
        two_pass_layer::<f16>(seed);
    }
}
