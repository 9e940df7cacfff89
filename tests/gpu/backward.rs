//! The backward of the exact forward: the GPU forward (for O and the LSE) then the GPU backward,
//! dQ, dK and dV against `reference::attention_backward_f64` under `reference::compare_gradient`
//! (each within twice the naive low-precision backward's error, plus half an ulp and
//! `GRAD_ABS_TOL`), over dtypes, head dims, batch, GQA, sequence lengths, masks, strides and both
//! dQ modes; the deterministic mode's bits; the safe API's checks.

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use half::{bf16, f16};
use longflash::reference::{
    attention_backward_f64, attention_backward_lowp, compare_gradient, GradComparison, RefShape,
    Visibility,
};
use longflash::{
    backward_workspace_bytes, Attention, BackwardInputs, BackwardOptions, BlockMask, DType,
    Element, Error, ForwardOptions, Gradient, Gradients, Input, Layout, MaskSpec, Output,
    RawBackward, SparseBackwardOptions, SparseOptions,
};
use proptest::prelude::*;

use crate::common::Rng;
use crate::common::*;

mod rope;
mod sparse;
mod training;

/// A backward case: the forward's case (shapes, mask, scale, layouts of q, k/v and o) plus the
/// layouts of the upstream gradient and of the three gradients, and the dQ mode.
#[derive(Clone, Debug)]
pub(crate) struct BwdCase {
    pub(crate) c: Case,
    pub(crate) dout_mem: Mem,
    pub(crate) dq_mem: Mem,
    pub(crate) dkv_mem: Mem,
    pub(crate) deterministic: bool,
    /// Run through `backward_raw` with a workspace of the test's own, filled with NaN first
    /// (the kernels must not rely on it being cleared), instead of the safe API.
    pub(crate) raw: bool,
    /// Run the block-sparse forward and backward over this block mask (its element mask must be
    /// `c.mask`); `c.sparse` builds a random one instead when this is `None`.
    pub(crate) block: Option<BlockMask>,
    /// With `block` set, still take O and the LSE from the dense forward (only for a block mask
    /// whose visibility is exactly `c.mask`): the backwards then start from the same bits, which
    /// the sparse forward need not reproduce (on Hopper the dense forward runs another mainloop).
    pub(crate) dense_forward: bool,
}

impl BwdCase {
    fn new(
        dtype: DType,
        bsk: (usize, usize, usize),
        heads: (usize, usize),
        d: usize,
        mask: MaskSpec,
    ) -> Self {
        BwdCase {
            c: Case::new(dtype, bsk, heads, d, mask),
            dout_mem: Mem::Bshd,
            dq_mem: Mem::Bshd,
            dkv_mem: Mem::Bshd,
            deterministic: false,
            raw: false,
            block: None,
            dense_forward: false,
        }
    }
    fn deterministic(self) -> Self {
        BwdCase {
            deterministic: true,
            ..self
        }
    }
}

pub(crate) struct BwdResult {
    /// The gradients, gathered to contiguous bshd and widened.
    pub(crate) dq: Vec<f64>,
    pub(crate) dk: Vec<f64>,
    pub(crate) dv: Vec<f64>,
    /// dQ, dK, dV under the rule.
    pub(crate) cmp: [GradComparison; 3],
}

impl BwdResult {
    fn passes(&self) -> bool {
        self.cmp.iter().all(|c| c.passes)
    }
    fn report(&self) -> String {
        format!(
            "dq {}\n  dk {}\n  dv {}",
            self.cmp[0], self.cmp[1], self.cmp[2]
        )
    }
}

/// Elements of a buffer of layout `l` that the layout does not address (the gaps of a padded
/// layout) must hold NaN still: nothing wrote them.
fn assert_gaps_untouched<T: Element>(buf: &[T], l: &Layout, what: &str, bc: &BwdCase) {
    let mut addressed = vec![false; buf.len()];
    for b in 0..l.batch {
        for s in 0..l.seqlen {
            for h in 0..l.heads {
                let o = l.offset(b, s, h) as usize;
                addressed[o..o + l.head_dim]
                    .iter_mut()
                    .for_each(|x| *x = true);
            }
        }
    }
    for (i, (&a, x)) in addressed.iter().zip(buf).enumerate() {
        assert!(
            a || x.to_f32().is_nan(),
            "{bc:?}: the backward wrote the gap element {i} of {what}"
        );
    }
}

fn run_bwd_t<T: Element>(g: &Gpu, attn: &Attention, bc: &BwdCase) -> BwdResult {
    let c = &bc.c;
    let mut rng = Rng(c.seed);
    let shape = RefShape {
        batch: c.batch,
        seqlen_q: c.seqlen_q,
        seqlen_k: c.seqlen_k,
        heads_q: c.heads_q,
        heads_kv: c.heads_kv,
        head_dim: c.head_dim,
    };
    let gen = |n: usize, rng: &mut Rng| -> Vec<T> {
        (0..n).map(|_| T::from_f32(rng.normal() as f32)).collect()
    };
    let (nq, nkv) = (shape.q_len().unwrap(), shape.kv_len().unwrap());
    let q = gen(nq, &mut rng);
    let k = gen(nkv, &mut rng);
    let v = gen(nkv, &mut rng);
    let dout = gen(nq, &mut rng);
    let scale = c.scale.unwrap_or(1.0 / (c.head_dim as f32).sqrt());
    let wide = |x: &[T]| -> Vec<f64> { x.iter().map(|t| t.to_f32() as f64).collect() };
    let block = bc.block.clone().or_else(|| c.sparse.map(|sp| sp.build(c)));
    let vis: &dyn Visibility = match &block {
        Some(b) => b,
        None => &c.mask,
    };
    let ref64 = attention_backward_f64(
        &shape,
        &wide(&q),
        &wide(&k),
        &wide(&v),
        &wide(&dout),
        vis,
        scale as f64,
    )
    .unwrap();
    let lowp = attention_backward_lowp(&shape, &q, &k, &v, &dout, vis, scale).unwrap();
    let device_block = block.as_ref().map(|b| {
        (
            b.to_device(&g.stream).unwrap(),
            b.key_major().to_device(&g.stream).unwrap(),
        )
    });
    assert!(
        device_block.is_none() || !bc.raw,
        "the sparse cases run through the safe API"
    );

    let lay = |m: Mem, kv: bool| {
        if kv {
            layout(m, c.batch, c.seqlen_k, c.heads_kv, c.head_dim)
        } else {
            layout(m, c.batch, c.seqlen_q, c.heads_q, c.head_dim)
        }
    };
    let (ql, kl, ol) = (
        lay(c.q_mem, false),
        lay(c.kv_mem, true),
        lay(c.o_mem, false),
    );
    let (dol, dql, dkl) = (
        lay(bc.dout_mem, false),
        lay(bc.dq_mem, false),
        lay(bc.dkv_mem, true),
    );
    // Gaps in the inputs hold NaN: reading one poisons a gradient. The gradients start as NaN
    // everywhere: an element the kernels forget stays NaN, a gap they write changes.
    let nan = T::from_f32(f32::NAN);
    let d_q = g.stream.clone_htod(&scatter(&q, &ql, nan)).unwrap();
    let d_k = g.stream.clone_htod(&scatter(&k, &kl, nan)).unwrap();
    let d_v = g.stream.clone_htod(&scatter(&v, &kl, nan)).unwrap();
    let d_do = g.stream.clone_htod(&scatter(&dout, &dol, nan)).unwrap();
    let len = |l: &Layout| l.required_len("t").unwrap() as usize;
    let mut d_o: CudaSlice<T> = g.stream.clone_htod(&vec![nan; len(&ol)]).unwrap();
    let mut d_lse: CudaSlice<f32> = g
        .stream
        .clone_htod(&vec![f32::NAN; shape.lse_len().unwrap()])
        .unwrap();
    let mut d_dq: CudaSlice<T> = g.stream.clone_htod(&vec![nan; len(&dql)]).unwrap();
    let mut d_dk: CudaSlice<T> = g.stream.clone_htod(&vec![nan; len(&dkl)]).unwrap();
    let mut d_dv: CudaSlice<T> = g.stream.clone_htod(&vec![nan; len(&dkl)]).unwrap();

    let (qv, kv, vv) = (d_q.as_view(), d_k.as_view(), d_v.as_view());
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
    {
        let mut ov = d_o.as_view_mut();
        let mut lv = d_lse.as_view_mut();
        let fwd = ForwardOptions {
            mask: c.mask,
            softmax_scale: c.scale,
        };
        let out = Output {
            data: &mut ov,
            layout: ol,
            lse: Some(&mut lv),
        };
        match &device_block {
            None => attn.forward(&g.stream, qi, ki, vi, out, &fwd),
            Some(_) if bc.dense_forward => attn.forward(&g.stream, qi, ki, vi, out, &fwd),
            Some((dm, _)) => attn.forward_sparse(
                &g.stream,
                qi,
                ki,
                vi,
                out,
                &SparseOptions {
                    mask: dm,
                    softmax_scale: c.scale,
                },
            ),
        }
        .unwrap_or_else(|e| panic!("forward failed on {bc:?}: {e}"));
    }
    let options = BackwardOptions {
        mask: c.mask,
        softmax_scale: c.scale,
        deterministic: bc.deterministic,
    };
    if bc.raw {
        let ws_bytes = backward_workspace_bytes(&ql, bc.deterministic).unwrap();
        let ws: CudaSlice<f32> = g.stream.clone_htod(&vec![f32::NAN; ws_bytes / 4]).unwrap();
        let (qp, _a) = d_q.device_ptr(&g.stream);
        let (kp, _b) = d_k.device_ptr(&g.stream);
        let (vp, _c) = d_v.device_ptr(&g.stream);
        let (op, _d) = d_o.device_ptr(&g.stream);
        let (dop, _e) = d_do.device_ptr(&g.stream);
        let (lp, _f) = d_lse.device_ptr(&g.stream);
        let (wp, _g) = ws.device_ptr(&g.stream);
        let (dqp, _h) = d_dq.device_ptr_mut(&g.stream);
        let (dkp, _i) = d_dk.device_ptr_mut(&g.stream);
        let (dvp, _j) = d_dv.device_ptr_mut(&g.stream);
        let raw = RawBackward {
            dtype: T::DTYPE,
            q: qp,
            k: kp,
            v: vp,
            o: op,
            dout: dop,
            lse: lp,
            dq: dqp,
            dk: dkp,
            dv: dvp,
            workspace: wp,
            workspace_bytes: ws_bytes,
            q_layout: ql,
            k_layout: kl,
            v_layout: kl,
            o_layout: ol,
            dout_layout: dol,
            dq_layout: dql,
            dk_layout: dkl,
            dv_layout: dkl,
            options,
        };
        // SAFETY: every buffer is this context's, holds its layout, and lives (with the guards
        // above) until the synchronize below; nothing else touches them meanwhile.
        unsafe { attn.backward_raw(g.stream.cu_stream(), &raw) }
            .unwrap_or_else(|e| panic!("raw backward failed on {bc:?}: {e}"));
        g.stream.synchronize().unwrap();
    } else {
        let (ov, dov, lv) = (d_o.as_view(), d_do.as_view(), d_lse.as_view());
        let (mut dqv, mut dkv, mut dvv) =
            (d_dq.as_view_mut(), d_dk.as_view_mut(), d_dv.as_view_mut());
        let inputs = BackwardInputs {
            q: qi,
            k: ki,
            v: vi,
            o: Input {
                data: &ov,
                layout: ol,
            },
            dout: Input {
                data: &dov,
                layout: dol,
            },
            lse: &lv,
        };
        let grads = Gradients {
            dq: Gradient {
                data: &mut dqv,
                layout: dql,
            },
            dk: Gradient {
                data: &mut dkv,
                layout: dkl,
            },
            dv: Gradient {
                data: &mut dvv,
                layout: dkl,
            },
        };
        match &device_block {
            None => attn.backward(&g.stream, inputs, grads, &options),
            Some((dm, dkm)) => attn.backward_sparse(
                &g.stream,
                inputs,
                grads,
                &SparseBackwardOptions {
                    mask: dm,
                    key_major: dkm,
                    softmax_scale: c.scale,
                    deterministic: bc.deterministic,
                },
            ),
        }
        .unwrap_or_else(|e| panic!("backward failed on {bc:?}: {e}"));
    }
    g.stream.synchronize().unwrap();
    let dq_host: Vec<T> = g.stream.clone_dtoh(&d_dq).unwrap();
    let dk_host: Vec<T> = g.stream.clone_dtoh(&d_dk).unwrap();
    let dv_host: Vec<T> = g.stream.clone_dtoh(&d_dv).unwrap();
    assert_gaps_untouched(&dq_host, &dql, "dq", bc);
    assert_gaps_untouched(&dk_host, &dkl, "dk", bc);
    assert_gaps_untouched(&dv_host, &dkl, "dv", bc);
    let widen = |buf: &[T], l: &Layout| -> Vec<f64> {
        gather(buf, l).iter().map(|x| x.to_f32() as f64).collect()
    };
    let (dq, dk, dv) = (
        widen(&dq_host, &dql),
        widen(&dk_host, &dkl),
        widen(&dv_host, &dkl),
    );
    let cmp = [
        compare_gradient(&dq, &ref64.dq, &lowp.dq, c.dtype),
        compare_gradient(&dk, &ref64.dk, &lowp.dk, c.dtype),
        compare_gradient(&dv, &ref64.dv, &lowp.dv, c.dtype),
    ];
    BwdResult { dq, dk, dv, cmp }
}

pub(crate) fn run_bwd(g: &Gpu, bc: &BwdCase) -> BwdResult {
    match bc.c.dtype {
        DType::F16 => run_bwd_t::<f16>(g, &g.attn, bc),
        DType::Bf16 => run_bwd_t::<bf16>(g, &g.attn, bc),
    }
}

pub(crate) fn check_bwd(g: &Gpu, bc: &BwdCase) -> BwdResult {
    let r = run_bwd(g, bc);
    assert!(r.passes(), "{bc:?}\n  {}", r.report());
    r
}

#[test]
fn backward_dense_and_causal_every_dtype_and_head_dim() {
    let g = gpu_or_skip!();
    for dtype in DTYPES {
        for d in DIMS {
            for mask in [MaskSpec::none(), MaskSpec::causal()] {
                for det in [false, true] {
                    let bc = BwdCase::new(dtype, (2, 257, 257), (3, 3), d, mask);
                    check_bwd(
                        g,
                        &BwdCase {
                            deterministic: det,
                            ..bc
                        },
                    );
                }
            }
        }
    }
}

#[test]
fn backward_single_token_and_tile_edges() {
    let g = gpu_or_skip!();
    for d in DIMS {
        for (sq, sk) in [
            (1, 1),
            (1, 200),
            (200, 1),
            (31, 33),
            (32, 32),
            (63, 65),
            (64, 64),
            (65, 63),
            (127, 129),
            (128, 128),
            (129, 127),
            (31, 700),
        ] {
            for mask in [MaskSpec::none(), MaskSpec::causal()] {
                for det in [false, true] {
                    let bc = BwdCase::new(DType::Bf16, (1, sq, sk), (2, 1), d, mask);
                    check_bwd(
                        g,
                        &BwdCase {
                            deterministic: det,
                            ..bc
                        },
                    );
                }
            }
        }
    }
}

/// A case the property test found (H100, 2026-12-05): one query row of two keys, the other 68
/// rows empty, where dK came out at 1.095 of its allowance and dQ at 0.93, both from one row's
/// dS about three of its ulps from the reference's. Kept until that is explained, with both dQ
/// modes.
#[test]
fn backward_two_keys_under_a_bottom_right_diagonal() {
    let g = gpu_or_skip!();
    let mask = MaskSpec {
        window_right: Some(0),
        ..MaskSpec::none()
    };
    let mut bc = BwdCase::new(DType::F16, (1, 70, 2), (4, 2), 64, mask);
    bc.c.seed = 104145553526547632;
    check_bwd(g, &bc);
    check_bwd(g, &bc.deterministic());
}

#[test]
fn backward_rows_and_keys_that_see_nothing_get_zero_gradients() {
    let g = gpu_or_skip!();
    // seqlen_q > seqlen_k with a bottom-right causal diagonal: the first sq - sk rows see no key
    // (LSE -inf): their dQ is exactly 0, and they add nothing to dK and dV.
    for det in [false, true] {
        let mut bc = BwdCase::new(DType::F16, (1, 300, 100), (2, 2), 128, MaskSpec::causal());
        bc.deterministic = det;
        let r = check_bwd(g, &bc);
        for i in 0..200 {
            for h in 0..2 {
                let o = (i * 2 + h) * 128;
                assert!(
                    r.dq[o..o + 128].iter().all(|&x| x == 0.0),
                    "row {i} head {h} sees no key: dq must be 0"
                );
            }
        }
    }
    // A narrow window over far more keys than queries: keys left of the window have no query,
    // so their dK and dV are exactly 0 (the CTAs of those key tiles visit nothing and still write).
    for d in DIMS {
        let mask = MaskSpec::sliding_window(Some(3), Some(2));
        let bc = BwdCase::new(DType::Bf16, (2, 50, 400), (4, 2), d, mask);
        let r = check_bwd(g, &bc);
        let first_seen = 400 - 50 - 3; // key j is seen by some row iff j >= off - left
        for b in 0..2 {
            for j in 0..first_seen {
                for h in 0..2 {
                    let o = ((b * 400 + j) * 2 + h) * d;
                    assert!(
                        r.dk[o..o + d]
                            .iter()
                            .chain(&r.dv[o..o + d])
                            .all(|&x| x == 0.0),
                        "key {j} is seen by no query: dk, dv must be 0"
                    );
                }
            }
        }
    }
}

#[test]
fn backward_sliding_windows() {
    let g = gpu_or_skip!();
    let windows = [
        MaskSpec::sliding_window(Some(0), Some(0)),
        MaskSpec::sliding_window(Some(17), Some(5)),
        MaskSpec::sliding_window(Some(64), None),
        MaskSpec::sliding_window(None, Some(63)),
        MaskSpec::causal_window(100),
        MaskSpec::causal_window(0),
        MaskSpec::sliding_window(Some(5000), Some(5000)),
    ];
    for d in DIMS {
        for mask in windows {
            for (sq, sk) in [(333, 333), (150, 401), (401, 150)] {
                let bc = BwdCase::new(DType::Bf16, (1, sq, sk), (2, 2), d, mask);
                check_bwd(g, &bc);
            }
        }
    }
}

#[test]
fn backward_gqa_and_mqa() {
    let g = gpu_or_skip!();
    for (hq, hkv) in [(8, 1), (8, 2), (6, 3), (4, 4)] {
        for mask in [MaskSpec::none(), MaskSpec::causal()] {
            for d in [64, 128] {
                let bc = BwdCase::new(DType::F16, (2, 190, 190), (hq, hkv), d, mask);
                check_bwd(g, &bc);
                check_bwd(g, &bc.deterministic());
            }
        }
    }
}

#[test]
fn backward_strided_layouts_match_contiguous_bit_for_bit() {
    let g = gpu_or_skip!();
    for d in DIMS {
        // Deterministic: the layouts are the only difference, so the bits must agree.
        let base =
            BwdCase::new(DType::Bf16, (2, 211, 300), (4, 2), d, MaskSpec::causal()).deterministic();
        let r0 = check_bwd(g, &base);
        for (q_mem, kv_mem, o_mem, dout_mem, dq_mem, dkv_mem) in [
            (
                Mem::Bhsd,
                Mem::Bhsd,
                Mem::Bhsd,
                Mem::Bhsd,
                Mem::Bhsd,
                Mem::Bhsd,
            ),
            (
                Mem::Bshd,
                Mem::Bhsd,
                Mem::PaddedBshd(1),
                Mem::PaddedBhsd(2),
                Mem::PaddedBshd(1),
                Mem::PaddedBhsd(1),
            ),
            (
                Mem::PaddedBhsd(3),
                Mem::PaddedBshd(2),
                Mem::Bhsd,
                Mem::Bshd,
                Mem::Bhsd,
                Mem::PaddedBshd(2),
            ),
        ] {
            let bc = BwdCase {
                c: Case {
                    q_mem,
                    kv_mem,
                    o_mem,
                    ..base.c.clone()
                },
                dout_mem,
                dq_mem,
                dkv_mem,
                ..base.clone()
            };
            let r = check_bwd(g, &bc);
            assert!(r.dq == r0.dq, "{bc:?}: layout changed dq");
            assert!(r.dk == r0.dk, "{bc:?}: layout changed dk");
            assert!(r.dv == r0.dv, "{bc:?}: layout changed dv");
        }
    }
}

#[test]
fn backward_deterministic_mode_repeats_its_bits() {
    let g = gpu_or_skip!();
    for d in DIMS {
        for mask in [MaskSpec::causal(), MaskSpec::none()] {
            // Long enough that many key tiles add into each dQ row.
            let det = BwdCase::new(DType::Bf16, (1, 500, 700), (4, 1), d, mask).deterministic();
            let a = check_bwd(g, &det);
            let b = check_bwd(g, &det);
            assert!(
                a.dq == b.dq && a.dk == b.dk && a.dv == b.dv,
                "{det:?}: bits differ"
            );
            // The caller's workspace, filled with NaN, gives the same bits as the safe API's.
            let raw = check_bwd(
                g,
                &BwdCase {
                    raw: true,
                    ..det.clone()
                },
            );
            assert!(
                raw.dq == a.dq && raw.dk == a.dk && raw.dv == a.dv,
                "{det:?}: raw differs"
            );
            // dK and dV never use atomics: the same bits in the atomic mode too.
            let atomic = BwdCase {
                deterministic: false,
                ..det.clone()
            };
            let x = check_bwd(g, &atomic);
            assert!(
                x.dk == a.dk && x.dv == a.dv,
                "{atomic:?}: dk, dv differ from the deterministic mode"
            );
            let y = check_bwd(
                g,
                &BwdCase {
                    raw: true,
                    ..atomic.clone()
                },
            );
            assert!(
                y.dk == x.dk && y.dv == x.dv,
                "{atomic:?}: dk, dv differ between runs"
            );
        }
    }
}

#[test]
fn backward_explicit_softmax_scale() {
    let g = gpu_or_skip!();
    for scale in [1e-3f32, 0.02, 0.5, 3.0] {
        let mut bc = BwdCase::new(DType::Bf16, (1, 130, 260), (2, 2), 128, MaskSpec::causal());
        bc.c.scale = Some(scale);
        check_bwd(g, &bc);
        check_bwd(g, &bc.deterministic());
    }
}

#[test]
fn backward_long_sequence() {
    let g = gpu_or_skip!();
    for mask in [
        MaskSpec::none(),
        MaskSpec::causal(),
        MaskSpec::causal_window(700),
    ] {
        let bc = BwdCase::new(DType::Bf16, (1, 1500, 1500), (2, 1), 128, mask);
        check_bwd(g, &bc);
    }
}

#[test]
fn backward_safe_api_rejects_bad_buffers_before_launch() {
    let g = gpu_or_skip!();
    let l = Layout::bshd(1, 64, 2, 64);
    let n = l.numel();
    let x: CudaSlice<f16> = g.stream.alloc_zeros(n).unwrap();
    let short: CudaSlice<f16> = g.stream.alloc_zeros(n - 1).unwrap();
    let lse: CudaSlice<f32> = g.stream.alloc_zeros(2 * 64).unwrap();
    let short_lse: CudaSlice<f32> = g.stream.alloc_zeros(2 * 64 - 1).unwrap();
    let mut dq: CudaSlice<f16> = g.stream.alloc_zeros(n).unwrap();
    let mut dk: CudaSlice<f16> = g.stream.alloc_zeros(n).unwrap();
    let mut dv: CudaSlice<f16> = g.stream.alloc_zeros(n - 8).unwrap();
    let (xv, sv, lv, slv) = (
        x.as_view(),
        short.as_view(),
        lse.as_view(),
        short_lse.as_view(),
    );
    let input = |data| Input { data, layout: l };
    let mut call = |dout, lse, dv_len: usize| {
        let mut dqv = dq.as_view_mut();
        let mut dkv = dk.as_view_mut();
        let mut dvv = dv.slice_mut(0..dv_len);
        g.attn.backward(
            &g.stream,
            BackwardInputs {
                q: input(&xv),
                k: input(&xv),
                v: input(&xv),
                o: input(&xv),
                dout: input(dout),
                lse,
            },
            Gradients {
                dq: Gradient {
                    data: &mut dqv,
                    layout: l,
                },
                dk: Gradient {
                    data: &mut dkv,
                    layout: l,
                },
                dv: Gradient {
                    data: &mut dvv,
                    layout: l,
                },
            },
            &BackwardOptions::causal(),
        )
    };
    let e = call(&sv, &lv, n - 8).unwrap_err();
    assert!(matches!(e, Error::OutOfBounds { arg: "dout", .. }), "{e}");
    let e = call(&xv, &slv, n - 8).unwrap_err();
    assert!(matches!(e, Error::OutOfBounds { arg: "dv", .. }), "{e}");
    // With dv long enough, the short LSE is what is wrong.
    let mut dv_full: CudaSlice<f16> = g.stream.alloc_zeros(n).unwrap();
    let (mut dqv, mut dkv, mut dvv) = (dq.as_view_mut(), dk.as_view_mut(), dv_full.as_view_mut());
    let e = g
        .attn
        .backward(
            &g.stream,
            BackwardInputs {
                q: input(&xv),
                k: input(&xv),
                v: input(&xv),
                o: input(&xv),
                dout: input(&xv),
                lse: &slv,
            },
            Gradients {
                dq: Gradient {
                    data: &mut dqv,
                    layout: l,
                },
                dk: Gradient {
                    data: &mut dkv,
                    layout: l,
                },
                dv: Gradient {
                    data: &mut dvv,
                    layout: l,
                },
            },
            &BackwardOptions::causal(),
        )
        .unwrap_err();
    assert!(matches!(e, Error::OutOfBounds { arg: "lse", .. }), "{e}");
    // An unsupported head dim is a typed error before anything is allocated or launched.
    let l100 = Layout::bshd(1, 64, 2, 100);
    let inp = |data| Input { data, layout: l100 };
    let e = g
        .attn
        .backward(
            &g.stream,
            BackwardInputs {
                q: inp(&xv),
                k: inp(&xv),
                v: inp(&xv),
                o: inp(&xv),
                dout: inp(&xv),
                lse: &lv,
            },
            Gradients {
                dq: Gradient {
                    data: &mut dqv,
                    layout: l100,
                },
                dk: Gradient {
                    data: &mut dkv,
                    layout: l100,
                },
                dv: Gradient {
                    data: &mut dvv,
                    layout: l100,
                },
            },
            &BackwardOptions::causal(),
        )
        .unwrap_err();
    assert!(
        matches!(e, Error::UnsupportedHeadDim { value: 100, .. }),
        "{e}"
    );
}

fn arb_bwd_case() -> impl Strategy<Value = BwdCase> {
    (arb_case(), (arb_mem(), arb_mem(), arb_mem()), any::<bool>()).prop_map(
        |(c, (dout_mem, dq_mem, dkv_mem), deterministic)| BwdCase {
            c,
            dout_mem,
            dq_mem,
            dkv_mem,
            deterministic,
            raw: false,
            block: None,
            dense_forward: false,
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn backward_matches_reference(bc in arb_bwd_case()) {
        let Some(g) = gpu() else {
            say_skipped("backward_matches_reference");
            return Ok(());
        };
        let r = run_bwd(g, &bc);
        prop_assert!(r.passes(), "{:?}\n  {}", bc, r.report());
    }
}
