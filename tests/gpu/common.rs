//! What every GPU test module shares: the device, test data, layouts, the dense/sparse case
//! runner and the property-test strategies.

use std::sync::{Arc, OnceLock};

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use half::{bf16, f16};
use longflash::reference::{
    attention_f64, attention_lowp, compare, Comparison, RefOutput, RefShape, Visibility,
};
use longflash::{
    Attention, BlockMask, DType, Element, ForwardOptions, Input, Layout, Mainloop, MainloopChoice,
    MaskShape, MaskSpec, Output, RawBlockMask, RawForward, RawRope, RawRopeMode, SparseOptions,
};
use proptest::prelude::*;

pub(crate) struct Gpu {
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    /// The library's default choice of mainloop (the Hopper one on a compute capability 9.0
    /// device), or the one LONGFLASH_TEST_MAINLOOP=sm80|sm90 names, so that the whole suite can
    /// run on either mainloop.
    pub(crate) attn: Attention,
    /// The same kernels with the sm_80 mainloop chosen.
    pub(crate) sm80: Attention,
    /// The same kernels with the Hopper mainloop chosen, on a compute capability 9.0 device.
    pub(crate) hopper: Option<Attention>,
}

pub(crate) fn gpu() -> Option<&'static Gpu> {
    static GPU: OnceLock<Option<Gpu>> = OnceLock::new();
    GPU.get_or_init(|| {
        let required = std::env::var("LONGFLASH_REQUIRE_GPU").is_ok_and(|v| v == "1");
        match longflash::open_device(0) {
            Ok(ctx) => {
                let choice = match std::env::var("LONGFLASH_TEST_MAINLOOP").as_deref() {
                    Ok("sm80") => MainloopChoice::Sm80,
                    Ok("sm90") => MainloopChoice::Sm90,
                    Ok("auto") | Err(_) => MainloopChoice::Auto,
                    Ok(other) => {
                        panic!("LONGFLASH_TEST_MAINLOOP={other}: expected sm80, sm90 or auto")
                    }
                };
                // LONGFLASH_TEST_SM90_CTAS=N runs the Hopper kernels as a persistent grid of N
                // CTAs (kernels of a build with LF_SM90_PERSISTENT=1, through
                // LONGFLASH_KERNEL_DIR).
                let ctas = std::env::var("LONGFLASH_TEST_SM90_CTAS").ok().map(|v| {
                    v.parse()
                        .expect("LONGFLASH_TEST_SM90_CTAS: a number of CTAs")
                });
                let attn = Attention::new(&ctx)
                    .expect("Attention::new")
                    .with_mainloop(choice)
                    .with_sm90_persistent(ctas);
                let sm80 = Attention::new(&ctx)
                    .expect("Attention::new")
                    .with_mainloop(MainloopChoice::Sm80);
                let hopper = (attn.compute_capability() == (9, 0)).then(|| {
                    Attention::new(&ctx)
                        .expect("Attention::new")
                        .with_mainloop(MainloopChoice::Sm90)
                        .with_sm90_persistent(ctas)
                });
                let stream = ctx.default_stream();
                Some(Gpu {
                    ctx,
                    stream,
                    attn,
                    sm80,
                    hopper,
                })
            }
            Err(e) => {
                assert!(!required, "LONGFLASH_REQUIRE_GPU=1 but no GPU: {e}");
                None
            }
        }
    })
    .as_ref()
}

/// Whether a call at head dim `d` through `g.attn` computes a full block mask in the same order as
/// the call without one, so that the two agree bit for bit: the block-sparse kernels' key tiles
/// are `sparse::K_BLOCK` (64) keys, as are the sm_80 dense kernels'; the Hopper dense kernels
/// take `LF_FWD_SM90_BC_D<d>`-key tiles. Which mainloop runs is the library's answer.
pub(crate) fn full_mask_is_bitwise_dense(g: &Gpu, d: usize, rope: bool) -> bool {
    let chosen = if rope {
        let (fwd, rope) = raw_rope_placeholder(d);
        g.attn.rope_mainloop_for(&fwd, &rope).unwrap()
    } else {
        let c = Case::new(DType::Bf16, (1, 256, 256), (2, 2), d, MaskSpec::causal());
        mainloop_of(g, &g.attn, &c)
    };
    let tile = match d {
        64 => longflash::sys::LF_FWD_SM90_BC_D64,
        128 => longflash::sys::LF_FWD_SM90_BC_D128,
        _ => longflash::sys::LF_FWD_SM90_BC_D256,
    } as usize;
    chosen == Mainloop::Sm80 || tile == longflash::sparse::K_BLOCK
}

/// The mainloop `attn` picks for a call of `c`'s shape and layouts (on scratch buffers).
pub(crate) fn mainloop_of(g: &Gpu, attn: &Attention, c: &Case) -> Mainloop {
    with_raw_case(g, c, |raw| attn.mainloop_for(raw)).unwrap_or_else(|e| panic!("{c:?}: {e}"))
}

/// Runs `f` on a raw forward call of `c`'s shape and layouts, on zeroed scratch buffers that
/// live until it returns (bf16).
pub(crate) fn with_raw_case<R>(g: &Gpu, c: &Case, f: impl FnOnce(&RawForward) -> R) -> R {
    let ql = layout(c.q_mem, c.batch, c.seqlen_q, c.heads_q, c.head_dim);
    let kl = layout(c.kv_mem, c.batch, c.seqlen_k, c.heads_kv, c.head_dim);
    let ol = layout(c.o_mem, c.batch, c.seqlen_q, c.heads_q, c.head_dim);
    let len = |l: &Layout| l.required_len("t").unwrap() as usize;
    let q: CudaSlice<bf16> = g.stream.alloc_zeros(len(&ql)).unwrap();
    let k: CudaSlice<bf16> = g.stream.alloc_zeros(len(&kl)).unwrap();
    let v: CudaSlice<bf16> = g.stream.alloc_zeros(len(&kl)).unwrap();
    let mut o: CudaSlice<bf16> = g.stream.alloc_zeros(len(&ol)).unwrap();
    let (qp, _a) = q.device_ptr(&g.stream);
    let (kp, _b) = k.device_ptr(&g.stream);
    let (vp, _c) = v.device_ptr(&g.stream);
    let (op, _d) = o.device_ptr_mut(&g.stream);
    let raw = RawForward {
        dtype: c.dtype,
        q: qp,
        k: kp,
        v: vp,
        o: op,
        lse: 0,
        q_layout: ql,
        k_layout: kl,
        v_layout: kl,
        o_layout: ol,
        options: ForwardOptions {
            mask: c.mask,
            softmax_scale: c.scale,
        },
        // The choice depends on whether there is a block mask, not on its contents: a
        // broadcast mask at placeholder addresses stands for the case's own.
        block_mask: c.sparse.as_ref().map(|_| RawBlockMask {
            row_offsets: 5 << 20,
            col_indices: 6 << 20,
            full: 7 << 20,
            batch: 1,
            heads: 1,
        }),
    };
    f(&raw)
}

/// A bf16 call with Q and O laid out as `q`, K and V as `k`, at placeholder addresses: for
/// asking which mainloop such a call runs (nothing is launched; the choice depends on the shapes,
/// layouts and options only).
pub(crate) fn raw_placeholder(q: Layout, k: Layout, options: ForwardOptions) -> RawForward {
    RawForward {
        dtype: DType::Bf16,
        q: 1 << 30,
        k: 2 << 30,
        v: 3 << 30,
        o: 4 << 30,
        lse: 0,
        q_layout: q,
        k_layout: k,
        v_layout: k,
        o_layout: q,
        options,
        block_mask: None,
    }
}

/// A causal ReRoPE call at head dim `d` (1 x 256 tokens, 2 heads) at placeholder addresses: for
/// asking which mainloop such a call runs (nothing is launched).
pub(crate) fn raw_rope_placeholder(d: usize) -> (RawForward, RawRope) {
    let l = Layout::bshd(1, 256, 2, d);
    let fwd = raw_placeholder(l, l, ForwardOptions::causal());
    let rope = RawRope {
        inv_freq: 5 << 30,
        position_offsets: 0,
        k_rot: 6 << 30,
        k_alt: 7 << 30,
        rotary_dim: d,
        interleaved: false,
        mode: RawRopeMode::ReRope { window: 100 },
        attention_factor: 1.0,
        log_n_train_len: None,
    };
    (fwd, rope)
}

/// Says a test skipped, on the process's stderr (not the captured test output), so it shows.
pub(crate) fn say_skipped(test: &str) {
    use std::io::Write;
    // Once per test, not once per property-test case.
    static SAID: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut said = SAID.lock().unwrap_or_else(|e| e.into_inner());
    if said.iter().any(|t| t == test) {
        return;
    }
    said.push(test.to_string());
    let _ = writeln!(
        std::io::stderr(),
        "skipped: {test}: no CUDA GPU (LONGFLASH_REQUIRE_GPU=1 makes this a failure)"
    );
}

/// SplitMix64: small, seedable, good enough for test data.
pub(crate) struct Rng(pub(crate) u64);
impl Rng {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub(crate) fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Standard normal (Box-Muller).
    pub(crate) fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// How a tensor is laid out in device memory.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Mem {
    Bshd,
    Bhsd,
    /// bshd with every stride padded by `8 * pad` elements.
    PaddedBshd(i64),
    /// bhsd with every stride padded by `8 * pad` elements.
    PaddedBhsd(i64),
}

pub(crate) fn layout(mem: Mem, b: usize, s: usize, h: usize, d: usize) -> Layout {
    match mem {
        Mem::Bshd => Layout::bshd(b, s, h, d),
        Mem::Bhsd => Layout::bhsd(b, s, h, d),
        Mem::PaddedBshd(p) => {
            let hs = d as i64 + 8 * p;
            let ss = h as i64 * hs + 8 * p;
            Layout {
                batch: b,
                seqlen: s,
                heads: h,
                head_dim: d,
                batch_stride: s as i64 * ss + 8 * p,
                seq_stride: ss,
                head_stride: hs,
            }
        }
        Mem::PaddedBhsd(p) => {
            let ss = d as i64 + 8 * p;
            let hs = s as i64 * ss + 8 * p;
            Layout {
                batch: b,
                seqlen: s,
                heads: h,
                head_dim: d,
                batch_stride: h as i64 * hs + 8 * p,
                seq_stride: ss,
                head_stride: hs,
            }
        }
    }
}

/// Scatters contiguous bshd data into a buffer of `layout`, filling the gaps with `fill`.
pub(crate) fn scatter<T: Copy>(bshd: &[T], l: &Layout, fill: T) -> Vec<T> {
    let len = l.required_len("t").unwrap() as usize;
    let mut out = vec![fill; len];
    let d = l.head_dim;
    for b in 0..l.batch {
        for s in 0..l.seqlen {
            for h in 0..l.heads {
                let src = ((b * l.seqlen + s) * l.heads + h) * d;
                let dst = l.offset(b, s, h) as usize;
                out[dst..dst + d].copy_from_slice(&bshd[src..src + d]);
            }
        }
    }
    out
}

/// Gathers a buffer of `layout` into contiguous bshd.
pub(crate) fn gather<T: Copy>(buf: &[T], l: &Layout) -> Vec<T> {
    let d = l.head_dim;
    let mut out = Vec::with_capacity(l.numel());
    for b in 0..l.batch {
        for s in 0..l.seqlen {
            for h in 0..l.heads {
                let o = l.offset(b, s, h) as usize;
                out.extend_from_slice(&buf[o..o + d]);
            }
        }
    }
    out
}

#[derive(Clone, Debug)]
pub(crate) struct Case {
    pub(crate) dtype: DType,
    pub(crate) batch: usize,
    pub(crate) seqlen_q: usize,
    pub(crate) seqlen_k: usize,
    pub(crate) heads_q: usize,
    pub(crate) heads_kv: usize,
    pub(crate) head_dim: usize,
    pub(crate) mask: MaskSpec,
    pub(crate) scale: Option<f32>,
    pub(crate) q_mem: Mem,
    pub(crate) kv_mem: Mem,
    pub(crate) o_mem: Mem,
    pub(crate) lse: bool,
    pub(crate) seed: u64,
    /// Run the block-sparse kernel with a random block mask (and `mask` as its element mask).
    pub(crate) sparse: Option<SparseSpec>,
}

/// A random block mask: each block listed with probability `density`, per head and batch entry
/// or shared.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SparseSpec {
    pub(crate) density: f64,
    pub(crate) per_head: bool,
    pub(crate) per_batch: bool,
    pub(crate) seed: u64,
    /// List exactly one key block per (batch, head, query block) row, picked from the seed,
    /// instead of each block with probability `density`.
    pub(crate) one_block: bool,
}

impl SparseSpec {
    pub(crate) fn build(&self, c: &Case) -> BlockMask {
        let shape = MaskShape {
            batch: if self.per_batch { c.batch } else { 1 },
            heads: if self.per_head { c.heads_q } else { 1 },
            seqlen_q: c.seqlen_q,
            seqlen_k: c.seqlen_k,
        };
        let seed = self.seed;
        let density = self.density;
        let key_blocks = c.seqlen_k.div_ceil(longflash::sparse::K_BLOCK) as u64;
        BlockMask::from_fn(shape, c.mask, |b, h, qb, kb| {
            let row = seed ^ ((b as u64) << 48) ^ ((h as u64) << 40) ^ ((qb as u64) << 20);
            if self.one_block {
                Rng(row).next_u64() % key_blocks == kb as u64
            } else {
                Rng(row ^ kb as u64).uniform() < density
            }
        })
        .unwrap()
    }
}

impl Case {
    pub(crate) fn new(
        dtype: DType,
        (b, sq, sk): (usize, usize, usize),
        (hq, hkv): (usize, usize),
        d: usize,
        mask: MaskSpec,
    ) -> Self {
        Case {
            dtype,
            batch: b,
            seqlen_q: sq,
            seqlen_k: sk,
            heads_q: hq,
            heads_kv: hkv,
            head_dim: d,
            mask,
            scale: None,
            q_mem: Mem::Bshd,
            kv_mem: Mem::Bshd,
            o_mem: Mem::Bshd,
            lse: true,
            seed: 1,
            sparse: None,
        }
    }
}

pub(crate) struct RunResult {
    pub(crate) cmp: Comparison,
    pub(crate) out: Vec<f64>,
    pub(crate) lse: Option<Vec<f32>>,
    /// The f64 reference and the naive low-precision one the comparison used.
    pub(crate) reference: RefOutput,
    pub(crate) naive: RefOutput,
}

pub(crate) fn run_case_t<T: Element>(g: &Gpu, attn: &Attention, c: &Case) -> RunResult {
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
    let q = gen(c.batch * c.seqlen_q * c.heads_q * c.head_dim, &mut rng);
    let k = gen(c.batch * c.seqlen_k * c.heads_kv * c.head_dim, &mut rng);
    let v = gen(c.batch * c.seqlen_k * c.heads_kv * c.head_dim, &mut rng);
    let scale = c.scale.unwrap_or(1.0 / (c.head_dim as f32).sqrt());
    let wide = |x: &[T]| -> Vec<f64> { x.iter().map(|t| t.to_f32() as f64).collect() };
    let block = c.sparse.map(|sp| sp.build(c));
    let vis: &dyn Visibility = match &block {
        Some(b) => b,
        None => &c.mask,
    };
    let ref64 = attention_f64(&shape, &wide(&q), &wide(&k), &wide(&v), vis, scale as f64).unwrap();
    let lowp = attention_lowp(&shape, &q, &k, &v, vis, scale).unwrap();

    let ql = layout(c.q_mem, c.batch, c.seqlen_q, c.heads_q, c.head_dim);
    let kl = layout(c.kv_mem, c.batch, c.seqlen_k, c.heads_kv, c.head_dim);
    let ol = layout(c.o_mem, c.batch, c.seqlen_q, c.heads_q, c.head_dim);
    // Gaps in the inputs hold NaN: reading one poisons the output. The output starts as NaN
    // everywhere: an element the kernel forgets stays NaN, a gap it writes by mistake changes.
    let nan = T::from_f32(f32::NAN);
    let dq = g.stream.clone_htod(&scatter(&q, &ql, nan)).unwrap();
    let dk = g.stream.clone_htod(&scatter(&k, &kl, nan)).unwrap();
    let dv = g.stream.clone_htod(&scatter(&v, &kl, nan)).unwrap();
    let o_len = ol.required_len("o").unwrap() as usize;
    let mut d_o: CudaSlice<T> = g.stream.clone_htod(&vec![nan; o_len]).unwrap();
    let n_lse = c.batch * c.heads_q * c.seqlen_q;
    let mut d_lse: CudaSlice<f32> = g.stream.clone_htod(&vec![f32::NAN; n_lse]).unwrap();
    let opts = ForwardOptions {
        mask: c.mask,
        softmax_scale: c.scale,
    };
    {
        let (qv, kv, vv) = (dq.as_view(), dk.as_view(), dv.as_view());
        let mut ov = d_o.as_view_mut();
        let mut lv = d_lse.as_view_mut();
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
            layout: ol,
            lse: if c.lse { Some(&mut lv) } else { None },
        };
        match &block {
            None => attn.forward(&g.stream, qi, ki, vi, out, &opts),
            Some(b) => {
                let dm = b.to_device(&g.stream).unwrap();
                let r = attn.forward_sparse(
                    &g.stream,
                    qi,
                    ki,
                    vi,
                    out,
                    &SparseOptions {
                        mask: &dm,
                        softmax_scale: c.scale,
                    },
                );
                g.stream.synchronize().unwrap();
                r
            }
        }
        .unwrap_or_else(|e| panic!("forward failed on {c:?}: {e}"));
    }
    g.stream.synchronize().unwrap();
    let o_host: Vec<T> = g.stream.clone_dtoh(&d_o).unwrap();
    let lse_host: Vec<f32> = g.stream.clone_dtoh(&d_lse).unwrap();
    // Nothing outside the output's elements was written.
    let mut addressed = vec![false; o_len];
    for b in 0..c.batch {
        for s in 0..c.seqlen_q {
            for h in 0..c.heads_q {
                let o = ol.offset(b, s, h) as usize;
                addressed[o..o + c.head_dim]
                    .iter_mut()
                    .for_each(|x| *x = true);
            }
        }
    }
    for (i, (&a, x)) in addressed.iter().zip(&o_host).enumerate() {
        assert!(
            a || x.to_f32().is_nan(),
            "{c:?}: the kernel wrote the gap element {i} of o"
        );
    }
    if !c.lse {
        assert!(
            lse_host.iter().all(|x| x.is_nan()),
            "{c:?}: lse was written though not asked for"
        );
    }
    let out: Vec<f64> = gather(&o_host, &ol)
        .iter()
        .map(|x| x.to_f32() as f64)
        .collect();
    let lse = c.lse.then_some(lse_host);
    let cmp = compare(&out, lse.as_deref(), &ref64, &lowp);
    RunResult {
        cmp,
        out,
        lse,
        reference: ref64,
        naive: lowp,
    }
}

pub(crate) fn run_case(g: &Gpu, c: &Case) -> RunResult {
    run_case_with(g, &g.attn, c)
}

/// [`run_case`] through a given `Attention` (another mainloop choice).
pub(crate) fn run_case_with(g: &Gpu, attn: &Attention, c: &Case) -> RunResult {
    match c.dtype {
        DType::F16 => run_case_t::<f16>(g, attn, c),
        DType::Bf16 => run_case_t::<bf16>(g, attn, c),
    }
}

pub(crate) fn check(g: &Gpu, c: &Case) -> RunResult {
    let r = run_case(g, c);
    assert!(r.cmp.passes, "{c:?}\n  {}", r.cmp);
    r
}

pub(crate) const DTYPES: [DType; 2] = [DType::F16, DType::Bf16];
pub(crate) const DIMS: [usize; 3] = [64, 128, 256];

pub(crate) fn arb_mem() -> impl Strategy<Value = Mem> {
    prop_oneof![
        Just(Mem::Bshd),
        Just(Mem::Bhsd),
        (1i64..3).prop_map(Mem::PaddedBshd),
        (1i64..3).prop_map(Mem::PaddedBhsd),
    ]
}

pub(crate) fn arb_seqlen() -> impl Strategy<Value = usize> {
    prop_oneof![
        Just(1usize),
        prop::sample::select(vec![2usize, 3, 7, 13, 61, 67, 127, 131, 251, 257]),
        prop::sample::select(vec![
            63usize, 64, 65, 127, 128, 129, 191, 192, 193, 255, 256, 257, 383, 384, 385
        ]),
        1usize..520,
    ]
}

pub(crate) fn arb_window() -> impl Strategy<Value = Option<u32>> {
    prop_oneof![
        3 => Just(None),
        1 => Just(Some(0u32)),
        2 => (1u32..200).prop_map(Some),
        1 => (500u32..5000).prop_map(Some),
    ]
}

pub(crate) fn arb_case() -> impl Strategy<Value = Case> {
    (
        prop::sample::select(vec![DType::F16, DType::Bf16]),
        prop::sample::select(vec![64usize, 128, 256]),
        1usize..3,
        prop::sample::select(vec![
            (1usize, 1usize),
            (2, 1),
            (4, 2),
            (3, 3),
            (6, 2),
            (4, 1),
        ]),
        arb_seqlen(),
        arb_seqlen(),
        (any::<bool>(), arb_window(), arb_window()),
        (arb_mem(), arb_mem(), arb_mem()),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(
            |(
                dtype,
                head_dim,
                batch,
                (heads_q, heads_kv),
                seqlen_q,
                seqlen_k,
                (causal, wl, wr),
                (q_mem, kv_mem, o_mem),
                lse,
                seed,
            )| {
                let mask = MaskSpec {
                    sink_tokens: 0,
                    causal,
                    window_left: wl,
                    window_right: if causal { None } else { wr },
                };
                Case {
                    dtype,
                    batch,
                    seqlen_q,
                    seqlen_k,
                    heads_q,
                    heads_kv,
                    head_dim,
                    mask,
                    scale: None,
                    q_mem,
                    kv_mem,
                    o_mem,
                    lse,
                    seed,
                    sparse: None,
                }
            },
        )
}
