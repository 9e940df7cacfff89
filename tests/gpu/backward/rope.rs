//! The RoPE / ReRoPE / Leaky ReRoPE backward: the GPU RoPE forward (for O and the LSE) then
//! `backward_rope` (or `backward_rope_raw` with a NaN-filled workspace of the test's own), dQ,
//! dK and dV with respect to the un-rotated inputs against `rope_attention_backward_f64` under
//! `compare_gradient`, with the naive two-matrix backward in the element type from the GPU
//! forward's output (`rope_attention_backward_lowp_given`) as the budget; that output is checked
//! under the forward's rule.

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use half::{bf16, f16};
use longflash::reference::{
    compare, compare_gradient, rope_attention_backward_f64, rope_attention_backward_lowp_given,
    rope_attention_f64, rope_attention_lowp, Comparison, GradComparison, RefShape,
};
use longflash::rope::{PositionMode, RopeConfig, RopeLayout, RopeOptions, RopeScaling};
use longflash::{
    rope_backward_workspace_bytes, BackwardInputs, DType, Element, Gradient, Gradients, Input,
    Layout, Output, RawBackward, RawRopeMode, RopeBackward, RopeForward,
};

use proptest::prelude::*;

use crate::common::Rng;
use crate::common::*;
use crate::rope::arb_rope_case;

#[derive(Clone, Debug)]
struct RopeBwdCase {
    dtype: DType,
    batch: usize,
    seqlen_q: usize,
    seqlen_k: usize,
    heads_q: usize,
    heads_kv: usize,
    head_dim: usize,
    rope: RopeOptions,
    /// Layouts of q, k/v (and dk/dv), and dq.
    q_mem: Mem,
    kv_mem: Mem,
    dq_mem: Mem,
    deterministic: bool,
    /// Through `backward_rope_raw` with the test's own workspaces (NaN-filled).
    raw: bool,
    seed: u64,
}

fn case(d: usize, (sq, sk): (usize, usize), mode: PositionMode) -> RopeBwdCase {
    RopeBwdCase {
        dtype: DType::Bf16,
        batch: 2,
        seqlen_q: sq,
        seqlen_k: sk,
        heads_q: 4,
        heads_kv: 2,
        head_dim: d,
        rope: RopeOptions::new(RopeConfig::llama(d), mode),
        q_mem: Mem::Bshd,
        kv_mem: Mem::Bshd,
        dq_mem: Mem::Bshd,
        deterministic: false,
        raw: false,
        seed: 11,
    }
}

/// The forward's output under the forward's rule, and dQ, dK, dV under the backward's.
struct Outcome {
    fwd: Comparison,
    cmp: [GradComparison; 3],
}

impl Outcome {
    fn passes(&self) -> bool {
        self.fwd.passes && self.cmp.iter().all(|x| x.passes)
    }
    fn report(&self) -> String {
        format!(
            "forward {}\n  dq {}\n  dk {}\n  dv {}",
            self.fwd, self.cmp[0], self.cmp[1], self.cmp[2]
        )
    }
}

fn run_t<T: Element>(g: &Gpu, c: &RopeBwdCase) -> Outcome {
    let shape = RefShape {
        batch: c.batch,
        seqlen_q: c.seqlen_q,
        seqlen_k: c.seqlen_k,
        heads_q: c.heads_q,
        heads_kv: c.heads_kv,
        head_dim: c.head_dim,
    };
    let mut rng = Rng(c.seed);
    let gen = |n: usize, rng: &mut Rng| -> Vec<T> {
        (0..n).map(|_| T::from_f32(rng.normal() as f32)).collect()
    };
    let (nq, nkv) = (shape.q_len().unwrap(), shape.kv_len().unwrap());
    let (q, k, v, dout) = (
        gen(nq, &mut rng),
        gen(nkv, &mut rng),
        gen(nkv, &mut rng),
        gen(nq, &mut rng),
    );
    let scale = 1.0 / (c.head_dim as f32).sqrt();
    let wide = |x: &[T]| -> Vec<f64> { x.iter().map(|t| f64::from(t.to_f32())).collect() };
    let ref64 = rope_attention_backward_f64(
        &shape,
        &wide(&q),
        &wide(&k),
        &wide(&v),
        &wide(&dout),
        &c.rope,
        f64::from(scale),
    )
    .unwrap();

    let ql = layout(c.q_mem, c.batch, c.seqlen_q, c.heads_q, c.head_dim);
    let kl = layout(c.kv_mem, c.batch, c.seqlen_k, c.heads_kv, c.head_dim);
    let ol = Layout::bshd(c.batch, c.seqlen_q, c.heads_q, c.head_dim);
    let dql = layout(c.dq_mem, c.batch, c.seqlen_q, c.heads_q, c.head_dim);
    let nan = T::from_f32(f32::NAN);
    let len = |l: &Layout| l.required_len("t").unwrap() as usize;
    let d_q = g.stream.clone_htod(&scatter(&q, &ql, nan)).unwrap();
    let d_k = g.stream.clone_htod(&scatter(&k, &kl, nan)).unwrap();
    let d_v = g.stream.clone_htod(&scatter(&v, &kl, nan)).unwrap();
    let d_do = g.stream.clone_htod(&dout).unwrap();
    let mut d_o: CudaSlice<T> = g.stream.clone_htod(&vec![nan; len(&ol)]).unwrap();
    let mut d_lse: CudaSlice<f32> = g
        .stream
        .clone_htod(&vec![f32::NAN; shape.lse_len().unwrap()])
        .unwrap();
    let mut d_dq: CudaSlice<T> = g.stream.clone_htod(&vec![nan; len(&dql)]).unwrap();
    let mut d_dk: CudaSlice<T> = g.stream.clone_htod(&vec![nan; len(&kl)]).unwrap();
    let mut d_dv: CudaSlice<T> = g.stream.clone_htod(&vec![nan; len(&kl)]).unwrap();
    let (qv, kv, vv) = (d_q.as_view(), d_k.as_view(), d_v.as_view());
    let input = |data, layout| Input { data, layout };
    {
        let mut ov = d_o.as_view_mut();
        let mut lv = d_lse.as_view_mut();
        let out = Output {
            data: &mut ov,
            layout: ol,
            lse: Some(&mut lv),
        };
        let opts = RopeForward {
            rope: &c.rope,
            block_mask: None,
            softmax_scale: None,
        };
        g.attn
            .forward_rope(
                &g.stream,
                input(&qv, ql),
                input(&kv, kl),
                input(&vv, kl),
                out,
                &opts,
            )
            .unwrap_or_else(|e| panic!("RoPE forward failed on {c:?}: {e}"));
    }
    let opts = RopeBackward {
        rope: &c.rope,
        softmax_scale: None,
        deterministic: c.deterministic,
    };
    if c.raw {
        // The rotation's tables and key workspaces as the safe API would make them, and a
        // workspace of the documented size, all NaN.
        let inv_freq = c
            .rope
            .config
            .inv_freq(c.head_dim, c.seqlen_k + c.rope.max_offset() as usize)
            .unwrap();
        let d_freq = g.stream.clone_htod(&inv_freq).unwrap();
        let offsets: Option<CudaSlice<i32>> = c.rope.position_offsets.as_ref().map(|o| {
            let o: Vec<i32> = o.iter().map(|&x| x as i32).collect();
            g.stream.clone_htod(&o).unwrap()
        });
        let mode = match c.rope.mode {
            PositionMode::Rope => RawRopeMode::Rope,
            PositionMode::ReRope { window } => RawRopeMode::ReRope { window },
            PositionMode::LeakyReRope { window, leak } => RawRopeMode::LeakyReRope { window, leak },
        };
        let ws_bytes = rope_backward_workspace_bytes(&ql, &kl, mode, c.deterministic).unwrap();
        let ws: CudaSlice<f32> = g.stream.clone_htod(&vec![f32::NAN; ws_bytes / 4]).unwrap();
        let k_rot: CudaSlice<T> = g.stream.clone_htod(&vec![nan; nkv]).unwrap();
        let k_alt: CudaSlice<T> = g.stream.clone_htod(&vec![nan; nkv]).unwrap();
        let (fp, _a) = d_freq.device_ptr(&g.stream);
        let (op_off, _b) = match &offsets {
            Some(o) => {
                let (p, guard) = o.device_ptr(&g.stream);
                (p, Some(guard))
            }
            None => (0, None),
        };
        let (rp, _c) = k_rot.device_ptr(&g.stream);
        let (ap, _d) = k_alt.device_ptr(&g.stream);
        let (qp, _e) = d_q.device_ptr(&g.stream);
        let (kp, _f) = d_k.device_ptr(&g.stream);
        let (vp, _g) = d_v.device_ptr(&g.stream);
        let (op, _h) = d_o.device_ptr(&g.stream);
        let (dop, _i) = d_do.device_ptr(&g.stream);
        let (lp, _j) = d_lse.device_ptr(&g.stream);
        let (wp, _k) = ws.device_ptr(&g.stream);
        let (dqp, _l) = d_dq.device_ptr_mut(&g.stream);
        let (dkp, _m) = d_dk.device_ptr_mut(&g.stream);
        let (dvp, _n) = d_dv.device_ptr_mut(&g.stream);
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
            dout_layout: ol,
            dq_layout: dql,
            dk_layout: kl,
            dv_layout: kl,
            options: longflash::BackwardOptions {
                mask: c.rope.mask(),
                softmax_scale: None,
                deterministic: c.deterministic,
            },
        };
        let rope = longflash::RawRope {
            inv_freq: fp,
            position_offsets: op_off,
            k_rot: rp,
            k_alt: if mode == RawRopeMode::Rope { 0 } else { ap },
            rotary_dim: c.rope.config.rotary_dim,
            interleaved: c.rope.config.layout == longflash::rope::RopeLayout::Interleaved,
            mode,
            attention_factor: c.rope.config.attention_factor() as f32,
            log_n_train_len: c.rope.log_n_train_len,
        };
        // SAFETY: every buffer is this context's, holds what its layout (or the contract)
        // addresses, and lives with its guard until the synchronize below.
        unsafe { g.attn.backward_rope_raw(g.stream.cu_stream(), &raw, &rope) }
            .unwrap_or_else(|e| panic!("raw RoPE backward failed on {c:?}: {e}"));
        g.stream.synchronize().unwrap();
    } else {
        let (ov, dov, lv) = (d_o.as_view(), d_do.as_view(), d_lse.as_view());
        let (mut dqv, mut dkv, mut dvv) =
            (d_dq.as_view_mut(), d_dk.as_view_mut(), d_dv.as_view_mut());
        let inputs = BackwardInputs {
            q: input(&qv, ql),
            k: input(&kv, kl),
            v: input(&vv, kl),
            o: input(&ov, ol),
            dout: input(&dov, ol),
            lse: &lv,
        };
        let grads = Gradients {
            dq: Gradient {
                data: &mut dqv,
                layout: dql,
            },
            dk: Gradient {
                data: &mut dkv,
                layout: kl,
            },
            dv: Gradient {
                data: &mut dvv,
                layout: kl,
            },
        };
        g.attn
            .backward_rope(&g.stream, inputs, grads, &opts)
            .unwrap_or_else(|e| panic!("RoPE backward failed on {c:?}: {e}"));
    }
    g.stream.synchronize().unwrap();
    let widen = |buf: &[T], l: &Layout| -> Vec<f64> {
        gather(buf, l)
            .iter()
            .map(|x| f64::from(x.to_f32()))
            .collect()
    };
    let dq = widen(&g.stream.clone_dtoh(&d_dq).unwrap(), &dql);
    let dk = widen(&g.stream.clone_dtoh(&d_dk).unwrap(), &kl);
    let dv = widen(&g.stream.clone_dtoh(&d_dv).unwrap(), &kl);
    let o_host: Vec<T> = gather(&g.stream.clone_dtoh(&d_o).unwrap(), &ol);
    let lse_host: Vec<f32> = g.stream.clone_dtoh(&d_lse).unwrap();
    let fwd = compare(
        &o_host
            .iter()
            .map(|x| f64::from(x.to_f32()))
            .collect::<Vec<_>>(),
        Some(&lse_host),
        &rope_attention_f64(
            &shape,
            &wide(&q),
            &wide(&k),
            &wide(&v),
            &c.rope,
            f64::from(scale),
        )
        .unwrap(),
        &rope_attention_lowp(&shape, &q, &k, &v, &c.rope, scale).unwrap(),
    );
    let lowp =
        rope_attention_backward_lowp_given(&shape, (&q, &k, &v, &dout), &o_host, &c.rope, scale)
            .unwrap();
    Outcome {
        fwd,
        cmp: [
            compare_gradient(&dq, &ref64.dq, &lowp.dq, c.dtype),
            compare_gradient(&dk, &ref64.dk, &lowp.dk, c.dtype),
            compare_gradient(&dv, &ref64.dv, &lowp.dv, c.dtype),
        ],
    }
}

fn check(g: &Gpu, c: &RopeBwdCase) {
    let r = match c.dtype {
        DType::F16 => run_t::<f16>(g, c),
        DType::Bf16 => run_t::<bf16>(g, c),
    };
    assert!(r.passes(), "{c:?}\n  {}", r.report());
}

fn modes() -> [PositionMode; 5] {
    [
        PositionMode::Rope,
        PositionMode::ReRope { window: 1 },
        PositionMode::ReRope { window: 48 },
        PositionMode::ReRope { window: 130 },
        PositionMode::LeakyReRope {
            window: 40,
            leak: 8.0,
        },
    ]
}

#[test]
fn rope_backward_every_mode_dtype_and_head_dim() {
    let g = gpu_or_skip!();
    for d in DIMS {
        for mode in modes() {
            for dtype in DTYPES {
                check(
                    g,
                    &RopeBwdCase {
                        dtype,
                        ..case(d, (150, 150), mode)
                    },
                );
            }
        }
    }
}

/// Position offsets, log-n scaling, NTK scaling and interleaved pairs, the forward's own left
/// window (wider and narrower than ReRoPE's), chunks over longer caches and queries past the
/// keys, strided layouts, the deterministic dQ and the raw API over NaN-filled workspaces.
#[test]
fn rope_backward_positions_windows_layouts_and_raw() {
    let g = gpu_or_skip!();
    let re = PositionMode::ReRope { window: 32 };
    let leaky = PositionMode::LeakyReRope {
        window: 24,
        leak: 4.0,
    };
    let mut cases = Vec::new();
    for mode in [re, leaky] {
        for (sq, sk) in [(70, 300), (200, 90), (1, 257), (129, 129)] {
            cases.push(case(64, (sq, sk), mode));
        }
        let mut c = case(128, (100, 180), mode);
        c.rope.position_offsets = Some(vec![0, 700]);
        c.rope.log_n_train_len = Some(64);
        cases.push(c);
        let mut c = case(64, (160, 160), mode);
        c.rope.config = RopeConfig {
            layout: longflash::rope::RopeLayout::Interleaved,
            rotary_dim: 32,
            scaling: RopeScaling::NtkAware { factor: 4.0 },
            ..RopeConfig::llama(64)
        };
        cases.push(c);
        for wl in [10, 60] {
            let mut c = case(64, (150, 150), mode);
            c.rope.window_left = Some(wl);
            cases.push(c);
        }
        cases.push(RopeBwdCase {
            q_mem: Mem::PaddedBshd(1),
            kv_mem: Mem::Bhsd,
            dq_mem: Mem::PaddedBhsd(2),
            dtype: DType::F16,
            ..case(128, (140, 200), mode)
        });
        cases.push(RopeBwdCase {
            deterministic: true,
            ..case(64, (150, 150), mode)
        });
        cases.push(RopeBwdCase {
            raw: true,
            ..case(128, (120, 200), mode)
        });
        let mut c = RopeBwdCase {
            raw: true,
            deterministic: true,
            heads_q: 6,
            heads_kv: 1,
            ..case(64, (90, 250), mode)
        };
        c.rope.position_offsets = Some(vec![5, 0]);
        cases.push(c);
    }
    cases.push(RopeBwdCase {
        raw: true,
        ..case(64, (100, 100), PositionMode::Rope)
    });
    for c in &cases {
        check(g, c);
    }
}

/// A long ReRoPE problem: many tiles on each side of the window and straddling it.
/// A case the property test found (H100, 2026-12-06): one query row over two keys, the other
/// 62 rows seeing one key or none. dQ and dK came out at 1.8x and 2.2x of an allowance whose
/// naive backward recomputed the output without rounding P: the kernels' forward rounds P
/// before P V, and those roundings reach dK and dQ through D = dO . O. The budget now takes the
/// output the backward was given.
#[test]
fn rope_backward_two_keys_yarn() {
    let g = gpu_or_skip!();
    let config = RopeConfig {
        base: 10000.0,
        rotary_dim: 128,
        layout: RopeLayout::HalfSplit,
        scaling: RopeScaling::Yarn {
            factor: 8.0,
            original_max_position: 128,
            beta_fast: 32.0,
            beta_slow: 1.0,
            attention_factor: None,
        },
    };
    let mut rope = RopeOptions::new(config, PositionMode::Rope);
    rope.window_left = Some(230);
    let c = RopeBwdCase {
        dtype: DType::F16,
        batch: 1,
        heads_q: 1,
        heads_kv: 1,
        rope,
        seed: 9408611679099469446,
        ..case(128, (63, 2), PositionMode::Rope)
    };
    check(g, &c);
    check(
        g,
        &RopeBwdCase {
            deterministic: true,
            ..c
        },
    );
}

#[test]
fn rope_backward_long_rerope() {
    let g = gpu_or_skip!();
    let c = RopeBwdCase {
        batch: 1,
        heads_q: 2,
        heads_kv: 1,
        ..case(128, (1024, 1536), PositionMode::ReRope { window: 300 })
    };
    check(g, &c);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, failure_persistence: None, ..ProptestConfig::default() })]
    /// The forward's RoPE shape space (every mode, scaling, layout of the pairs, partial rotary
    /// dims, log-n, offsets, GQA, lengths around the tiles) with random layouts, dQ modes and
    /// entry points.
    #[test]
    fn rope_backward_matches_reference(
        c in arb_rope_case(),
        (q_mem, kv_mem, dq_mem) in (arb_mem(), arb_mem(), arb_mem()),
        (deterministic, raw) in (any::<bool>(), any::<bool>()),
    ) {
        let Some(g) = gpu() else {
            say_skipped("rope_backward_matches_reference");
            return Ok(());
        };
        let bc = RopeBwdCase {
            dtype: c.dtype,
            batch: c.batch,
            seqlen_q: c.seqlen_q,
            seqlen_k: c.seqlen_k,
            heads_q: c.heads_q,
            heads_kv: c.heads_kv,
            head_dim: c.head_dim,
            rope: c.rope,
            q_mem,
            kv_mem,
            dq_mem,
            deterministic,
            raw,
            seed: c.seed,
        };
        let r = match bc.dtype {
            DType::F16 => run_t::<f16>(g, &bc),
            DType::Bf16 => run_t::<bf16>(g, &bc),
        };
        prop_assert!(r.passes(), "{bc:?}\n  {}", r.report());
    }
}
