//! The backward tests' harness: a case (the forward's case plus the gradients' layouts and the
//! dQ mode), its run through the GPU forward and the safe or raw backward over NaN-poisoned
//! buffers, and the comparison of each gradient with the f64 reference under the rule (the naive
//! budget computed from the output the GPU forward gave the backward, that output itself
//! checked under the forward's rule).

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use half::{bf16, f16};
use longflash::reference::{
    attention_backward_f64, attention_backward_lowp_given, attention_f64, attention_lowp, compare,
    compare_gradient, Comparison, GradComparison, RefShape, Visibility,
};
use longflash::{
    backward_workspace_bytes, Attention, BackwardInputs, BackwardOptions, BlockMask, DType,
    Element, ForwardOptions, Gradient, Gradients, Input, Layout, MaskSpec, Output, RawBackward,
    SparseBackwardOptions, SparseOptions,
};

use crate::common::Rng;
use crate::common::*;

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
    pub(crate) fn new(
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
    pub(crate) fn deterministic(self) -> Self {
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
    /// The forward's output and LSE (the backward's inputs) under the forward's rule.
    pub(crate) fwd: Comparison,
}

impl BwdResult {
    pub(crate) fn passes(&self) -> bool {
        self.fwd.passes && self.cmp.iter().all(|c| c.passes)
    }
    pub(crate) fn report(&self) -> String {
        format!(
            "forward {}\n  dq {}\n  dk {}\n  dv {}",
            self.fwd, self.cmp[0], self.cmp[1], self.cmp[2]
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

pub(crate) fn run_bwd_t<T: Element>(g: &Gpu, attn: &Attention, bc: &BwdCase) -> BwdResult {
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
    let o_host: Vec<T> = gather(&g.stream.clone_dtoh(&d_o).unwrap(), &ol);
    let lse_host: Vec<f32> = g.stream.clone_dtoh(&d_lse).unwrap();
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
    // The forward's output under its own rule, then the naive backward from that output.
    let fwd = compare(
        &o_host.iter().map(|x| x.to_f32() as f64).collect::<Vec<_>>(),
        Some(&lse_host),
        &attention_f64(&shape, &wide(&q), &wide(&k), &wide(&v), vis, scale as f64).unwrap(),
        &attention_lowp(&shape, &q, &k, &v, vis, scale).unwrap(),
    );
    let lowp =
        attention_backward_lowp_given(&shape, (&q, &k, &v, &o_host), &dout, vis, scale).unwrap();
    let cmp = [
        compare_gradient(&dq, &ref64.dq, &lowp.dq, c.dtype),
        compare_gradient(&dk, &ref64.dk, &lowp.dk, c.dtype),
        compare_gradient(&dv, &ref64.dv, &lowp.dv, c.dtype),
    ];
    BwdResult {
        dq,
        dk,
        dv,
        cmp,
        fwd,
    }
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
