//! GPU tests: the forward kernel against the CPU reference under the correctness rule of
//! DESIGN.md section 5, over dtypes, head dims, batch, heads, GQA ratios, sequence lengths, masks
//! and strides. Without a GPU each test prints that it skipped; with LONGFLASH_REQUIRE_GPU=1 a
//! missing GPU fails.

use std::sync::{Arc, OnceLock};

use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use half::{bf16, f16};
use longflash::reference::{
    attention_f64, attention_lowp, compare, Comparison, RefShape, Visibility,
};
use longflash::{
    Attention, BlockMask, DType, Element, Error, ForwardOptions, Input, Layout, MaskShape,
    MaskSpec, Output, SparseOptions,
};
use proptest::prelude::*;

struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    attn: Attention,
}

fn gpu() -> Option<&'static Gpu> {
    static GPU: OnceLock<Option<Gpu>> = OnceLock::new();
    GPU.get_or_init(|| {
        let required = std::env::var("LONGFLASH_REQUIRE_GPU").is_ok_and(|v| v == "1");
        match longflash::open_device(0) {
            Ok(ctx) => {
                let attn = Attention::new(&ctx).expect("Attention::new");
                let stream = ctx.default_stream();
                Some(Gpu { ctx, stream, attn })
            }
            Err(e) => {
                assert!(!required, "LONGFLASH_REQUIRE_GPU=1 but no GPU: {e}");
                None
            }
        }
    })
    .as_ref()
}

/// Says a test skipped, on the process's stderr (not the captured test output), so it shows.
fn say_skipped(test: &str) {
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

macro_rules! gpu_or_skip {
    () => {
        match gpu() {
            Some(g) => g,
            None => {
                say_skipped(std::thread::current().name().unwrap_or("gpu test"));
                return;
            }
        }
    };
}

/// SplitMix64: small, seedable, good enough for test data.
struct Rng(u64);
impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Standard normal (Box-Muller).
    fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// How a tensor is laid out in device memory.
#[derive(Clone, Copy, Debug)]
enum Mem {
    Bshd,
    Bhsd,
    /// bshd with every stride padded by `8 * pad` elements.
    PaddedBshd(i64),
    /// bhsd with every stride padded by `8 * pad` elements.
    PaddedBhsd(i64),
}

fn layout(mem: Mem, b: usize, s: usize, h: usize, d: usize) -> Layout {
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
fn scatter<T: Copy>(bshd: &[T], l: &Layout, fill: T) -> Vec<T> {
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
fn gather<T: Copy>(buf: &[T], l: &Layout) -> Vec<T> {
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
struct Case {
    dtype: DType,
    batch: usize,
    seqlen_q: usize,
    seqlen_k: usize,
    heads_q: usize,
    heads_kv: usize,
    head_dim: usize,
    mask: MaskSpec,
    scale: Option<f32>,
    q_mem: Mem,
    kv_mem: Mem,
    o_mem: Mem,
    lse: bool,
    seed: u64,
    /// Run the block-sparse kernel with a random block mask (and `mask` as its element mask).
    sparse: Option<SparseSpec>,
}

/// A random block mask: each block listed with probability `density`, per head and batch entry
/// or shared.
#[derive(Clone, Copy, Debug)]
struct SparseSpec {
    density: f64,
    per_head: bool,
    per_batch: bool,
    seed: u64,
}

impl SparseSpec {
    fn build(&self, c: &Case) -> BlockMask {
        let shape = MaskShape {
            batch: if self.per_batch { c.batch } else { 1 },
            heads: if self.per_head { c.heads_q } else { 1 },
            seqlen_q: c.seqlen_q,
            seqlen_k: c.seqlen_k,
        };
        let seed = self.seed;
        let density = self.density;
        BlockMask::from_fn(shape, c.mask, |b, h, qb, kb| {
            let mut r = Rng(seed
                ^ ((b as u64) << 48)
                ^ ((h as u64) << 40)
                ^ ((qb as u64) << 20)
                ^ kb as u64);
            r.uniform() < density
        })
        .unwrap()
    }
}

impl Case {
    fn new(
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

struct RunResult {
    cmp: Comparison,
    out: Vec<f64>,
    lse: Option<Vec<f32>>,
}

fn run_case_t<T: Element>(g: &Gpu, c: &Case) -> RunResult {
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
            None => g.attn.forward(&g.stream, qi, ki, vi, out, &opts),
            Some(b) => {
                let dm = b.to_device(&g.stream).unwrap();
                let r = g.attn.forward_sparse(
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
    RunResult { cmp, out, lse }
}

fn run_case(g: &Gpu, c: &Case) -> RunResult {
    match c.dtype {
        DType::F16 => run_case_t::<f16>(g, c),
        DType::Bf16 => run_case_t::<bf16>(g, c),
    }
}

fn check(g: &Gpu, c: &Case) -> RunResult {
    let r = run_case(g, c);
    assert!(r.cmp.passes, "{c:?}\n  {}", r.cmp);
    r
}

const DTYPES: [DType; 2] = [DType::F16, DType::Bf16];
const DIMS: [usize; 3] = [64, 128, 256];

#[test]
fn dense_and_causal_every_dtype_and_head_dim() {
    let g = gpu_or_skip!();
    for dtype in DTYPES {
        for d in DIMS {
            for mask in [MaskSpec::none(), MaskSpec::causal()] {
                check(g, &Case::new(dtype, (2, 257, 257), (3, 3), d, mask));
            }
        }
    }
}

#[test]
fn single_token_and_tile_edges() {
    let g = gpu_or_skip!();
    for d in DIMS {
        for (sq, sk) in [
            (1, 1),
            (1, 200),
            (200, 1),
            (63, 65),
            (64, 64),
            (65, 63),
            (127, 129),
            (128, 128),
            (129, 127),
            (31, 700),
        ] {
            for mask in [MaskSpec::none(), MaskSpec::causal()] {
                check(g, &Case::new(DType::Bf16, (1, sq, sk), (2, 1), d, mask));
            }
        }
    }
}

#[test]
fn causal_rows_with_no_key_give_zero_and_neg_inf_lse() {
    let g = gpu_or_skip!();
    // seqlen_q > seqlen_k with a bottom-right diagonal: the first sq - sk rows see nothing.
    let c = Case::new(DType::F16, (1, 300, 100), (2, 2), 128, MaskSpec::causal());
    let r = check(g, &c);
    let lse = r.lse.unwrap();
    for h in 0..2 {
        for i in 0..300 {
            let l = lse[h * 300 + i];
            if i < 200 {
                assert_eq!(l, f32::NEG_INFINITY, "row {i} sees no key");
                for x in &r.out[(i * 2 + h) * 128..(i * 2 + h + 1) * 128] {
                    assert_eq!(*x, 0.0);
                }
            } else {
                assert!(l.is_finite(), "row {i} sees keys");
            }
        }
    }
}

#[test]
fn sliding_windows() {
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
                check(g, &Case::new(DType::Bf16, (1, sq, sk), (2, 2), d, mask));
            }
        }
    }
}

#[test]
fn gqa_and_mqa() {
    let g = gpu_or_skip!();
    for (hq, hkv) in [(8, 1), (8, 2), (6, 3), (4, 4)] {
        for mask in [MaskSpec::none(), MaskSpec::causal()] {
            check(
                g,
                &Case::new(DType::F16, (2, 190, 190), (hq, hkv), 128, mask),
            );
        }
    }
}

#[test]
fn strided_layouts_match_contiguous_bit_for_bit() {
    let g = gpu_or_skip!();
    for d in DIMS {
        let base = Case::new(DType::Bf16, (2, 211, 300), (4, 2), d, MaskSpec::causal());
        let r0 = check(g, &base);
        for (q_mem, kv_mem, o_mem) in [
            (Mem::Bhsd, Mem::Bhsd, Mem::Bhsd),
            (Mem::Bshd, Mem::Bhsd, Mem::PaddedBshd(1)),
            (Mem::PaddedBhsd(3), Mem::PaddedBshd(2), Mem::Bhsd),
        ] {
            let c = Case {
                q_mem,
                kv_mem,
                o_mem,
                ..base.clone()
            };
            let r = check(g, &c);
            assert!(r.out == r0.out, "{c:?}: layout changed the result");
            assert!(r.lse == r0.lse, "{c:?}: layout changed the lse");
        }
    }
}

#[test]
fn repeated_calls_are_deterministic_and_lse_is_optional() {
    let g = gpu_or_skip!();
    let c = Case::new(DType::F16, (1, 500, 500), (2, 2), 64, MaskSpec::none());
    let a = check(g, &c);
    let b = check(g, &c);
    assert!(a.out == b.out);
    let no_lse = check(g, &Case { lse: false, ..c });
    assert!(no_lse.out == a.out);
}

#[test]
fn explicit_softmax_scale() {
    let g = gpu_or_skip!();
    for scale in [1e-3f32, 0.02, 0.5, 3.0] {
        check(
            g,
            &Case {
                scale: Some(scale),
                ..Case::new(DType::Bf16, (1, 130, 260), (2, 2), 128, MaskSpec::causal())
            },
        );
    }
}

#[test]
fn long_sequence() {
    let g = gpu_or_skip!();
    for mask in [
        MaskSpec::none(),
        MaskSpec::causal(),
        MaskSpec::causal_window(700),
    ] {
        check(
            g,
            &Case::new(DType::Bf16, (1, 2100, 2100), (1, 1), 128, mask),
        );
    }
}

#[test]
fn safe_api_rejects_bad_buffers_before_launch() {
    let g = gpu_or_skip!();
    let l = Layout::bshd(1, 64, 2, 64);
    let n = l.numel();
    let q: CudaSlice<f16> = g.stream.alloc_zeros(n).unwrap();
    let k: CudaSlice<f16> = g.stream.alloc_zeros(n).unwrap();
    let mut o: CudaSlice<f16> = g.stream.alloc_zeros(n).unwrap();
    let short: CudaSlice<f16> = g.stream.alloc_zeros(n - 1).unwrap();
    let opts = ForwardOptions::dense();
    let (qv, kv, sv) = (q.as_view(), k.as_view(), short.as_view());
    // A buffer shorter than its layout.
    let mut ov = o.as_view_mut();
    let e = g
        .attn
        .forward(
            &g.stream,
            Input {
                data: &qv,
                layout: l,
            },
            Input {
                data: &sv,
                layout: l,
            },
            Input {
                data: &kv,
                layout: l,
            },
            Output {
                data: &mut ov,
                layout: l,
                lse: None,
            },
            &opts,
        )
        .unwrap_err();
    assert!(matches!(e, Error::OutOfBounds { arg: "k", .. }), "{e}");
    // A view that starts one element in is not 16-byte aligned.
    let big: CudaSlice<f16> = g.stream.alloc_zeros(n + 8).unwrap();
    let off = big.slice(1..n + 1);
    let e = g
        .attn
        .forward(
            &g.stream,
            Input {
                data: &off,
                layout: l,
            },
            Input {
                data: &kv,
                layout: l,
            },
            Input {
                data: &kv,
                layout: l,
            },
            Output {
                data: &mut ov,
                layout: l,
                lse: None,
            },
            &opts,
        )
        .unwrap_err();
    assert!(matches!(e, Error::Misaligned { arg: "q.ptr", .. }), "{e}");
    // An LSE buffer too small.
    let mut lse: CudaSlice<f32> = g.stream.alloc_zeros(10).unwrap();
    let mut lv = lse.as_view_mut();
    let e = g
        .attn
        .forward(
            &g.stream,
            Input {
                data: &qv,
                layout: l,
            },
            Input {
                data: &kv,
                layout: l,
            },
            Input {
                data: &kv,
                layout: l,
            },
            Output {
                data: &mut ov,
                layout: l,
                lse: Some(&mut lv),
            },
            &opts,
        )
        .unwrap_err();
    assert!(matches!(e, Error::OutOfBounds { arg: "lse", .. }), "{e}");
    // The output overlapping an input: safe Rust cannot express it (a &mut and a & of the
    // same memory), so go through the raw layer with the same pointer for q and o.
    let (qp, _) = cudarc::driver::DevicePtr::device_ptr(&qv, &g.stream);
    let raw = longflash::RawForward {
        dtype: DType::F16,
        q: qp,
        k: qp,
        v: qp,
        o: qp,
        lse: 0,
        q_layout: l,
        k_layout: l,
        v_layout: l,
        o_layout: l,
        options: opts,
        block_mask: None,
    };
    // SAFETY: validation rejects the call before any launch.
    let e = unsafe { g.attn.forward_raw(g.stream.cu_stream(), &raw) }.unwrap_err();
    assert!(
        matches!(
            e,
            Error::Aliasing {
                output: "o",
                other: "q"
            }
        ),
        "{e}"
    );
    // A stream of the same context is accepted, so the checks above were about the buffers.
    assert!(std::sync::Arc::ptr_eq(g.stream.context(), &g.ctx));
}

fn arb_mem() -> impl Strategy<Value = Mem> {
    prop_oneof![
        Just(Mem::Bshd),
        Just(Mem::Bhsd),
        (1i64..3).prop_map(Mem::PaddedBshd),
        (1i64..3).prop_map(Mem::PaddedBhsd),
    ]
}

fn arb_seqlen() -> impl Strategy<Value = usize> {
    prop_oneof![
        Just(1usize),
        prop::sample::select(vec![2usize, 3, 7, 13, 61, 67, 127, 131, 251, 257]),
        prop::sample::select(vec![
            63usize, 64, 65, 127, 128, 129, 191, 192, 193, 255, 256, 257, 383, 384, 385
        ]),
        1usize..520,
    ]
}

fn arb_window() -> impl Strategy<Value = Option<u32>> {
    prop_oneof![
        3 => Just(None),
        1 => Just(Some(0u32)),
        2 => (1u32..200).prop_map(Some),
        1 => (500u32..5000).prop_map(Some),
    ]
}

fn arb_case() -> impl Strategy<Value = Case> {
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

/// A sparse case: any dense case's shape and layouts, an element mask that may carry attention
/// sinks, and a random block mask whose density ranges from empty to full.
fn arb_sparse_case() -> impl Strategy<Value = Case> {
    (
        arb_case(),
        prop_oneof![Just(0.0f64), Just(0.05), 0.05f64..0.6, Just(1.0)],
        any::<bool>(),
        any::<bool>(),
        prop_oneof![3 => Just(0u32), 1 => 1u32..300],
        any::<u64>(),
    )
        .prop_map(|(mut c, density, per_head, per_batch, sinks, seed)| {
            if sinks > 0 {
                c.mask = MaskSpec {
                    sink_tokens: sinks,
                    causal: true,
                    window_left: Some(sinks / 2),
                    window_right: None,
                };
            }
            c.sparse = Some(SparseSpec {
                density,
                per_head,
                per_batch,
                seed,
            });
            c
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn sparse_kernel_matches_reference(c in arb_sparse_case()) {
        let Some(g) = gpu() else {
            say_skipped("sparse_kernel_matches_reference");
            return Ok(());
        };
        let r = run_case(g, &c);
        prop_assert!(r.cmp.passes, "{:?}\n  {}", c, r.cmp);
    }
}

fn sparse_case(d: usize, (sq, sk): (usize, usize), mask: MaskSpec, density: f64) -> Case {
    Case {
        sparse: Some(SparseSpec {
            density,
            per_head: true,
            per_batch: true,
            seed: 7,
        }),
        ..Case::new(DType::Bf16, (2, sq, sk), (4, 2), d, mask)
    }
}

#[test]
fn sparse_edge_cases() {
    let g = gpu_or_skip!();
    for d in DIMS {
        // Every row empty: zeros and LSE -inf everywhere.
        let r = check(g, &sparse_case(d, (300, 300), MaskSpec::none(), 0.0));
        assert!(r.out.iter().all(|x| *x == 0.0));
        assert!(r.lse.unwrap().iter().all(|x| *x == f32::NEG_INFINITY));
        // Full density, the last blocks partial (sequence ends inside a block), causal, sinks.
        for mask in [
            MaskSpec::none(),
            MaskSpec::causal(),
            MaskSpec::causal_window(100).with_sinks(70),
        ] {
            for (sq, sk) in [(1, 1), (129, 65), (200, 331), (256, 256), (255, 257)] {
                check(g, &sparse_case(d, (sq, sk), mask, 1.0));
                check(g, &sparse_case(d, (sq, sk), mask, 0.3));
            }
        }
    }
    // A single listed block.
    let c = Case::new(DType::F16, (1, 500, 700), (2, 2), 128, MaskSpec::none());
    let shape = MaskShape {
        batch: 1,
        heads: 1,
        seqlen_q: 500,
        seqlen_k: 700,
    };
    let one =
        BlockMask::from_fn(shape, MaskSpec::none(), |_, _, qb, kb| qb == 2 && kb == 5).unwrap();
    assert_eq!(one.nnz(), 1);
    check_with_mask(g, &c, &one);
}

/// Runs `c` through the sparse kernel with an explicit mask and checks it.
fn check_with_mask(g: &Gpu, c: &Case, m: &BlockMask) -> RunResult {
    // Encode the mask as an exact-density spec is not possible in general: run it directly.
    let mut rng = Rng(c.seed);
    let n_q = c.batch * c.seqlen_q * c.heads_q * c.head_dim;
    let n_kv = c.batch * c.seqlen_k * c.heads_kv * c.head_dim;
    let gen = |n: usize, rng: &mut Rng| -> Vec<f16> {
        (0..n).map(|_| f16::from_f32(rng.normal() as f32)).collect()
    };
    let (q, k, v) = (gen(n_q, &mut rng), gen(n_kv, &mut rng), gen(n_kv, &mut rng));
    let shape = RefShape {
        batch: c.batch,
        seqlen_q: c.seqlen_q,
        seqlen_k: c.seqlen_k,
        heads_q: c.heads_q,
        heads_kv: c.heads_kv,
        head_dim: c.head_dim,
    };
    let scale = 1.0 / (c.head_dim as f32).sqrt();
    let wide = |x: &[f16]| -> Vec<f64> { x.iter().map(|t| t.to_f32() as f64).collect() };
    let ref64 = attention_f64(&shape, &wide(&q), &wide(&k), &wide(&v), m, scale as f64).unwrap();
    let lowp = attention_lowp(&shape, &q, &k, &v, m, scale).unwrap();
    let (ql, kl) = (
        Layout::bshd(c.batch, c.seqlen_q, c.heads_q, c.head_dim),
        Layout::bshd(c.batch, c.seqlen_k, c.heads_kv, c.head_dim),
    );
    let (dq, dk, dv) = (
        g.stream.clone_htod(&q).unwrap(),
        g.stream.clone_htod(&k).unwrap(),
        g.stream.clone_htod(&v).unwrap(),
    );
    let mut d_o: CudaSlice<f16> = g.stream.clone_htod(&vec![f16::NAN; n_q]).unwrap();
    let mut d_lse: CudaSlice<f32> = g
        .stream
        .alloc_zeros(c.batch * c.heads_q * c.seqlen_q)
        .unwrap();
    let dm = m.to_device(&g.stream).unwrap();
    {
        let (qv, kv, vv) = (dq.as_view(), dk.as_view(), dv.as_view());
        let (mut ov, mut lv) = (d_o.as_view_mut(), d_lse.as_view_mut());
        g.attn
            .forward_sparse(
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
                &SparseOptions {
                    mask: &dm,
                    softmax_scale: None,
                },
            )
            .unwrap();
    }
    let out: Vec<f64> = wide(&g.stream.clone_dtoh(&d_o).unwrap());
    let lse: Vec<f32> = g.stream.clone_dtoh(&d_lse).unwrap();
    let cmp = compare(&out, Some(&lse), &ref64, &lowp);
    assert!(cmp.passes, "{c:?} with {} listed blocks\n  {cmp}", m.nnz());
    RunResult {
        cmp,
        out,
        lse: Some(lse),
    }
}

#[test]
fn dense_block_mask_equals_the_exact_kernel_bit_for_bit() {
    let g = gpu_or_skip!();
    for d in DIMS {
        for mask in [
            MaskSpec::none(),
            MaskSpec::causal(),
            MaskSpec::causal_window(150),
            MaskSpec::sliding_window(Some(40), Some(90)),
        ] {
            for (sq, sk) in [(300, 300), (129, 520), (520, 129)] {
                let dense = check(g, &Case::new(DType::Bf16, (2, sq, sk), (4, 2), d, mask));
                let c = Case {
                    sparse: Some(SparseSpec {
                        density: 1.0,
                        per_head: false,
                        per_batch: false,
                        seed: 0,
                    }),
                    ..Case::new(DType::Bf16, (2, sq, sk), (4, 2), d, mask)
                };
                let sparse = check(g, &c);
                assert!(
                    dense.out == sparse.out,
                    "d {d} {mask:?} {sq}x{sk}: outputs differ"
                );
                assert!(
                    dense.lse == sparse.lse,
                    "d {d} {mask:?} {sq}x{sk}: LSEs differ"
                );
            }
        }
    }
}

#[test]
fn merging_two_sparse_passes_equals_one_pass_over_their_union() {
    let g = gpu_or_skip!();
    for (d, mask) in [
        (64, MaskSpec::none()),
        (128, MaskSpec::causal()),
        (256, MaskSpec::causal_window(300)),
    ] {
        let (b, sq, sk, hq, hkv) = (2, 333, 777, 4, 2);
        let shape = MaskShape {
            batch: b,
            heads: hq,
            seqlen_q: sq,
            seqlen_k: sk,
        };
        let split = |b: usize, h: usize, qb: usize, kb: usize| {
            Rng(((b * 131 + h) * 1031 + qb) as u64 * 7919 + kb as u64).uniform() < 0.5
        };
        let a = BlockMask::from_fn(shape, mask, split).unwrap();
        let bm = BlockMask::from_fn(shape, mask, |b, h, qb, kb| !split(b, h, qb, kb)).unwrap();
        let mut rng = Rng(99);
        let gen = |n: usize, rng: &mut Rng| -> Vec<bf16> {
            (0..n)
                .map(|_| bf16::from_f32(rng.normal() as f32))
                .collect()
        };
        let (ql, kl) = (Layout::bshd(b, sq, hq, d), Layout::bshd(b, sk, hkv, d));
        let (q, k, v) = (
            gen(ql.numel(), &mut rng),
            gen(kl.numel(), &mut rng),
            gen(kl.numel(), &mut rng),
        );
        let rs = RefShape {
            batch: b,
            seqlen_q: sq,
            seqlen_k: sk,
            heads_q: hq,
            heads_kv: hkv,
            head_dim: d,
        };
        let scale = 1.0 / (d as f32).sqrt();
        let wide = |x: &[bf16]| -> Vec<f64> { x.iter().map(|t| t.to_f32() as f64).collect() };
        // The union of the two masks is the element mask alone.
        let ref64 =
            attention_f64(&rs, &wide(&q), &wide(&k), &wide(&v), &mask, scale as f64).unwrap();
        let lowp = attention_lowp(&rs, &q, &k, &v, &mask, scale).unwrap();
        let (dq, dk, dv) = (
            g.stream.clone_htod(&q).unwrap(),
            g.stream.clone_htod(&k).unwrap(),
            g.stream.clone_htod(&v).unwrap(),
        );
        let run = |m: &BlockMask| -> (CudaSlice<bf16>, CudaSlice<f32>) {
            let mut o: CudaSlice<bf16> = g.stream.alloc_zeros(ql.numel()).unwrap();
            let mut l: CudaSlice<f32> = g.stream.alloc_zeros(b * hq * sq).unwrap();
            let dm = m.to_device(&g.stream).unwrap();
            let (qv, kv, vv) = (dq.as_view(), dk.as_view(), dv.as_view());
            let (mut ov, mut lv) = (o.as_view_mut(), l.as_view_mut());
            g.attn
                .forward_sparse(
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
                    &SparseOptions {
                        mask: &dm,
                        softmax_scale: None,
                    },
                )
                .unwrap();
            g.stream.synchronize().unwrap();
            (o, l)
        };
        let (mut oa, mut la) = run(&a);
        let (ob, lb) = run(&bm);
        {
            let (mut oav, mut lav) = (oa.as_view_mut(), la.as_view_mut());
            let (obv, lbv) = (ob.as_view(), lb.as_view());
            g.attn
                .merge(
                    &g.stream,
                    Output {
                        data: &mut oav,
                        layout: ql,
                        lse: Some(&mut lav),
                    },
                    Input {
                        data: &obv,
                        layout: ql,
                    },
                    &lbv,
                )
                .unwrap();
        }
        let out = wide(&g.stream.clone_dtoh(&oa).unwrap());
        let lse: Vec<f32> = g.stream.clone_dtoh(&la).unwrap();
        let cmp = compare(&out, Some(&lse), &ref64, &lowp);
        assert!(cmp.passes, "d {d} {mask:?}: {cmp}");
    }
}

#[test]
fn sparse_api_rejects_masks_for_other_problems() {
    let g = gpu_or_skip!();
    let l = Layout::bshd(1, 256, 2, 64);
    let q: CudaSlice<f16> = g.stream.alloc_zeros(l.numel()).unwrap();
    let mut o: CudaSlice<f16> = g.stream.alloc_zeros(l.numel()).unwrap();
    let qv = q.as_view();
    let mut ov = o.as_view_mut();
    for (shape, arg) in [
        (
            MaskShape {
                batch: 1,
                heads: 1,
                seqlen_q: 255,
                seqlen_k: 256,
            },
            "mask.seqlen_q",
        ),
        (
            MaskShape {
                batch: 1,
                heads: 1,
                seqlen_q: 256,
                seqlen_k: 300,
            },
            "mask.seqlen_k",
        ),
        (
            MaskShape {
                batch: 1,
                heads: 3,
                seqlen_q: 256,
                seqlen_k: 256,
            },
            "mask.heads",
        ),
        (
            MaskShape {
                batch: 2,
                heads: 1,
                seqlen_q: 256,
                seqlen_k: 256,
            },
            "mask.batch",
        ),
    ] {
        let m = BlockMask::from_fn(shape, MaskSpec::none(), |_, _, _, _| true)
            .unwrap()
            .to_device(&g.stream)
            .unwrap();
        let e = g
            .attn
            .forward_sparse(
                &g.stream,
                Input {
                    data: &qv,
                    layout: l,
                },
                Input {
                    data: &qv,
                    layout: l,
                },
                Input {
                    data: &qv,
                    layout: l,
                },
                Output {
                    data: &mut ov,
                    layout: l,
                    lse: None,
                },
                &SparseOptions {
                    mask: &m,
                    softmax_scale: None,
                },
            )
            .unwrap_err();
        assert!(
            matches!(e, Error::ShapeMismatch { arg: a, .. } if a == arg),
            "{arg}: {e}"
        );
    }
    // Sinks need a block mask.
    let e = g
        .attn
        .forward(
            &g.stream,
            Input {
                data: &qv,
                layout: l,
            },
            Input {
                data: &qv,
                layout: l,
            },
            Input {
                data: &qv,
                layout: l,
            },
            Output {
                data: &mut ov,
                layout: l,
                lse: None,
            },
            &ForwardOptions::causal().with_mask(MaskSpec::causal().with_sinks(4)),
        )
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidMask {
                arg: "mask.sink_tokens",
                ..
            }
        ),
        "{e}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn kernel_matches_reference(c in arb_case()) {
        let Some(g) = gpu() else {
            say_skipped("kernel_matches_reference");
            return Ok(());
        };
        let r = run_case(g, &c);
        prop_assert!(r.cmp.passes, "{:?}\n  {}", c, r.cmp);
    }
}

// ---- RoPE / ReRoPE / Leaky ReRoPE inside the kernel ---------------------------------------------

use longflash::reference::{
    rope_attention_f64, rope_attention_f64_sparse, rope_attention_lowp, rope_attention_lowp_sparse,
};
use longflash::rope::{PositionMode, RopeConfig, RopeLayout, RopeOptions, RopeScaling};
use longflash::RopeForward;

#[derive(Clone, Debug)]
struct RopeCase {
    dtype: DType,
    batch: usize,
    seqlen_q: usize,
    seqlen_k: usize,
    heads_q: usize,
    heads_kv: usize,
    head_dim: usize,
    rope: RopeOptions,
    seed: u64,
}

/// Runs the fused kernel on `c` and returns its output (bshd, f64), LSE and the comparison with
/// the two-matrix reference.
fn run_rope_t<T: Element>(g: &Gpu, c: &RopeCase, blocks: Option<&BlockMask>) -> RunResult {
    let mut rng = Rng(c.seed);
    let gen = |n: usize, rng: &mut Rng| -> Vec<T> {
        (0..n).map(|_| T::from_f32(rng.normal() as f32)).collect()
    };
    let ql = Layout::bshd(c.batch, c.seqlen_q, c.heads_q, c.head_dim);
    let kl = Layout::bshd(c.batch, c.seqlen_k, c.heads_kv, c.head_dim);
    let (q, k, v) = (
        gen(ql.numel(), &mut rng),
        gen(kl.numel(), &mut rng),
        gen(kl.numel(), &mut rng),
    );
    let shape = RefShape {
        batch: c.batch,
        seqlen_q: c.seqlen_q,
        seqlen_k: c.seqlen_k,
        heads_q: c.heads_q,
        heads_kv: c.heads_kv,
        head_dim: c.head_dim,
    };
    let scale = 1.0 / (c.head_dim as f32).sqrt();
    let wide = |x: &[T]| -> Vec<f64> { x.iter().map(|t| t.to_f32() as f64).collect() };
    let (q64, k64, v64) = (wide(&q), wide(&k), wide(&v));
    let (ref64, lowp) = match blocks {
        None => (
            rope_attention_f64(&shape, &q64, &k64, &v64, &c.rope, scale as f64).unwrap(),
            rope_attention_lowp(&shape, &q, &k, &v, &c.rope, scale).unwrap(),
        ),
        Some(bm) => (
            rope_attention_f64_sparse(&shape, &q64, &k64, &v64, &c.rope, bm, scale as f64).unwrap(),
            rope_attention_lowp_sparse(&shape, &q, &k, &v, &c.rope, bm, scale).unwrap(),
        ),
    };
    let dm = blocks.map(|bm| bm.to_device(&g.stream).unwrap());
    let (dq, dk, dv) = (
        g.stream.clone_htod(&q).unwrap(),
        g.stream.clone_htod(&k).unwrap(),
        g.stream.clone_htod(&v).unwrap(),
    );
    let mut d_o: CudaSlice<T> = g
        .stream
        .clone_htod(&vec![T::from_f32(f32::NAN); ql.numel()])
        .unwrap();
    let mut d_lse: CudaSlice<f32> = g
        .stream
        .clone_htod(&vec![f32::NAN; c.batch * c.heads_q * c.seqlen_q])
        .unwrap();
    {
        let (qv, kv, vv) = (dq.as_view(), dk.as_view(), dv.as_view());
        let (mut ov, mut lv) = (d_o.as_view_mut(), d_lse.as_view_mut());
        g.attn
            .forward_rope(
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
                &RopeForward {
                    rope: &c.rope,
                    block_mask: dm.as_ref(),
                    softmax_scale: None,
                },
            )
            .unwrap_or_else(|e| panic!("forward_rope failed on {c:?}: {e}"));
    }
    g.stream.synchronize().unwrap();
    let out = wide(&g.stream.clone_dtoh(&d_o).unwrap());
    let lse: Vec<f32> = g.stream.clone_dtoh(&d_lse).unwrap();
    let cmp = compare(&out, Some(&lse), &ref64, &lowp);
    RunResult {
        cmp,
        out,
        lse: Some(lse),
    }
}

fn run_rope(g: &Gpu, c: &RopeCase) -> RunResult {
    run_rope_masked(g, c, None)
}

fn run_rope_masked(g: &Gpu, c: &RopeCase, blocks: Option<&BlockMask>) -> RunResult {
    match c.dtype {
        DType::F16 => run_rope_t::<f16>(g, c, blocks),
        DType::Bf16 => run_rope_t::<bf16>(g, c, blocks),
    }
}

#[test]
fn rope_modes_over_block_masks() {
    let g = gpu_or_skip!();
    for d in DIMS {
        for mode in [
            PositionMode::Rope,
            PositionMode::ReRope { window: 65 },
            PositionMode::LeakyReRope {
                window: 100,
                leak: 4.0,
            },
        ] {
            for window_left in [None, Some(150)] {
                for (sq, sk) in [(300, 300), (129, 520)] {
                    let mut c = rope_case(d, (sq, sk), mode);
                    c.rope.window_left = window_left;
                    let shape = MaskShape {
                        batch: c.batch,
                        heads: c.heads_q,
                        seqlen_q: sq,
                        seqlen_k: sk,
                    };
                    // A full layout must equal the unmasked call bit for bit.
                    let full = BlockMask::from_fn(shape, c.rope.mask(), |_, _, _, _| true).unwrap();
                    let plain = run_rope(g, &c);
                    let masked = run_rope_masked(g, &c, Some(&full));
                    assert!(masked.cmp.passes, "{c:?} full mask: {}", masked.cmp);
                    assert!(
                        masked.out == plain.out && masked.lse == plain.lse,
                        "{c:?}: full block mask differs"
                    );
                    for density in [0.0, 0.4] {
                        let bm = BlockMask::from_fn(shape, c.rope.mask(), |b, h, qb, kb| {
                            Rng(((b * 31 + h) * 977 + qb) as u64 * 7919 + kb as u64).uniform()
                                < density
                        })
                        .unwrap();
                        let r = run_rope_masked(g, &c, Some(&bm));
                        assert!(r.cmp.passes, "{c:?} density {density}: {}", r.cmp);
                    }
                }
            }
        }
    }
    // A block mask whose element mask is not the call's is rejected.
    let c = rope_case(64, (200, 200), PositionMode::ReRope { window: 10 });
    let shape = MaskShape {
        batch: 1,
        heads: 1,
        seqlen_q: 200,
        seqlen_k: 200,
    };
    let wrong = BlockMask::from_fn(shape, MaskSpec::none(), |_, _, _, _| true)
        .unwrap()
        .to_device(&g.stream)
        .unwrap();
    let l = Layout::bshd(2, 200, 4, 64);
    let kl = Layout::bshd(2, 200, 2, 64);
    let x: CudaSlice<bf16> = g.stream.alloc_zeros(l.numel()).unwrap();
    let mut o: CudaSlice<bf16> = g.stream.alloc_zeros(l.numel()).unwrap();
    let (xv, mut ov) = (x.as_view(), o.as_view_mut());
    let e = g
        .attn
        .forward_rope(
            &g.stream,
            Input {
                data: &xv,
                layout: l,
            },
            Input {
                data: &xv,
                layout: kl,
            },
            Input {
                data: &xv,
                layout: kl,
            },
            Output {
                data: &mut ov,
                layout: l,
                lse: None,
            },
            &RopeForward {
                rope: &c.rope,
                block_mask: Some(&wrong),
                softmax_scale: None,
            },
        )
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidMask {
                arg: "block_mask.element_mask",
                ..
            }
        ),
        "{e}"
    );
}

fn rope_case(d: usize, (sq, sk): (usize, usize), mode: PositionMode) -> RopeCase {
    RopeCase {
        dtype: DType::Bf16,
        batch: 2,
        seqlen_q: sq,
        seqlen_k: sk,
        heads_q: 4,
        heads_kv: 2,
        head_dim: d,
        rope: RopeOptions::new(RopeConfig::llama(d), mode),
        seed: 5,
    }
}

#[test]
fn rope_modes_match_the_two_matrix_reference() {
    let g = gpu_or_skip!();
    for d in DIMS {
        for mode in [
            PositionMode::Rope,
            PositionMode::ReRope { window: 1 },
            PositionMode::ReRope { window: 63 },
            PositionMode::ReRope { window: 65 },
            PositionMode::ReRope { window: 200 },
            PositionMode::LeakyReRope {
                window: 65,
                leak: 16.0,
            },
            PositionMode::LeakyReRope {
                window: 100,
                leak: 2.5,
            },
        ] {
            for (sq, sk) in [(333, 333), (100, 400), (257, 129)] {
                for window_left in [None, Some(0), Some(90), Some(150)] {
                    let mut c = rope_case(d, (sq, sk), mode);
                    c.rope.window_left = window_left;
                    let r = run_rope(g, &c);
                    assert!(r.cmp.passes, "{c:?}\n  {}", r.cmp);
                }
            }
        }
    }
}

#[test]
fn rerope_with_a_window_past_the_sequence_is_plain_rope_bit_for_bit() {
    let g = gpu_or_skip!();
    for d in DIMS {
        let rope = run_rope(g, &rope_case(d, (300, 300), PositionMode::Rope));
        for mode in [
            PositionMode::ReRope { window: 300 },
            PositionMode::LeakyReRope {
                window: 5000,
                leak: 8.0,
            },
        ] {
            let r = run_rope(g, &rope_case(d, (300, 300), mode));
            assert!(r.cmp.passes, "{mode:?}: {}", r.cmp);
            assert!(
                r.out == rope.out && r.lse == rope.lse,
                "d {d} {mode:?} differs from RoPE"
            );
        }
    }
}

#[test]
fn fused_rope_equals_the_exact_kernel_on_rotated_inputs() {
    let g = gpu_or_skip!();
    for d in DIMS {
        let c = rope_case(d, (250, 410), PositionMode::Rope);
        let fused = run_rope(g, &c);
        assert!(fused.cmp.passes, "{}", fused.cmp);
        // Rotate on the host (f64), round to bf16, and run the plain causal kernel.
        let mut rng = Rng(c.seed);
        let gen = |n: usize, rng: &mut Rng| -> Vec<bf16> {
            (0..n)
                .map(|_| bf16::from_f32(rng.normal() as f32))
                .collect()
        };
        let ql = Layout::bshd(c.batch, c.seqlen_q, c.heads_q, d);
        let kl = Layout::bshd(c.batch, c.seqlen_k, c.heads_kv, d);
        let (q, k, v) = (
            gen(ql.numel(), &mut rng),
            gen(kl.numel(), &mut rng),
            gen(kl.numel(), &mut rng),
        );
        let inv_freq = c.rope.config.inv_freq(d, c.seqlen_k).unwrap();
        let rot = |x: &[bf16], l: &Layout, pos: &dyn Fn(usize, usize) -> i64| -> Vec<bf16> {
            let mut out = x.to_vec();
            for b in 0..l.batch {
                for s in 0..l.seqlen {
                    for h in 0..l.heads {
                        let o = l.offset(b, s, h) as usize;
                        let mut row: Vec<f64> =
                            x[o..o + d].iter().map(|t| t.to_f32() as f64).collect();
                        longflash::rope::rotate(
                            &mut row,
                            pos(b, s) as f64,
                            &inv_freq,
                            RopeLayout::HalfSplit,
                            1.0,
                        );
                        for (y, r) in out[o..o + d].iter_mut().zip(&row) {
                            *y = bf16::from_f64(*r);
                        }
                    }
                }
            }
            out
        };
        let qr = rot(&q, &ql, &|b, i| {
            c.rope.query_position(b, i, c.seqlen_q, c.seqlen_k)
        });
        let kr = rot(&k, &kl, &|b, j| c.rope.key_position(b, j));
        let (dq, dk, dv) = (
            g.stream.clone_htod(&qr).unwrap(),
            g.stream.clone_htod(&kr).unwrap(),
            g.stream.clone_htod(&v).unwrap(),
        );
        let mut d_o: CudaSlice<bf16> = g.stream.alloc_zeros(ql.numel()).unwrap();
        {
            let (qv, kv, vv) = (dq.as_view(), dk.as_view(), dv.as_view());
            let mut ov = d_o.as_view_mut();
            g.attn
                .forward(
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
                        lse: None,
                    },
                    &ForwardOptions::causal(),
                )
                .unwrap();
        }
        let exact: Vec<f64> = g
            .stream
            .clone_dtoh(&d_o)
            .unwrap()
            .iter()
            .map(|t| t.to_f32() as f64)
            .collect();
        let diff = exact
            .iter()
            .zip(&fused.out)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f64, f64::max);
        // Both are bf16 outputs of the same attention; they may differ by the rounding of the
        // rotated inputs, which the correctness bound already allows for.
        assert!(
            diff <= fused.cmp.bound,
            "d {d}: fused vs exact-on-rotated differ by {diff} (bound {})",
            fused.cmp.bound
        );
    }
}

fn arb_rope_case() -> impl Strategy<Value = RopeCase> {
    let scaling = prop_oneof![
        Just(RopeScaling::None),
        Just(RopeScaling::Linear { factor: 4.0 }),
        Just(RopeScaling::NtkAware { factor: 8.0 }),
        Just(RopeScaling::DynamicNtk {
            factor: 2.0,
            original_max_position: 128
        }),
        Just(RopeScaling::Yarn {
            factor: 8.0,
            original_max_position: 128,
            beta_fast: 32.0,
            beta_slow: 1.0,
            attention_factor: None
        }),
        Just(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position: 128
        }),
    ];
    let mode = prop_oneof![
        Just(PositionMode::Rope),
        (1u32..400).prop_map(|window| PositionMode::ReRope { window }),
        ((1u32..400), prop::sample::select(vec![1.5f64, 4.0, 16.0]))
            .prop_map(|(window, leak)| PositionMode::LeakyReRope { window, leak }),
    ];
    (
        prop::sample::select(vec![DType::F16, DType::Bf16]),
        prop::sample::select(vec![64usize, 128, 256]),
        prop::sample::select(vec![(1usize, 1usize), (4, 2), (3, 3), (4, 1)]),
        arb_seqlen(),
        arb_seqlen(),
        (scaling, mode, any::<bool>(), any::<bool>()),
        (
            any::<bool>(),
            prop::option::of(prop::sample::select(vec![2usize, 64, 4096])),
            prop::option::of(0u32..5000),
        ),
        any::<u64>(),
    )
        .prop_map(
            |(
                dtype,
                d,
                (hq, hkv),
                sq,
                sk,
                (scaling, mode, interleaved, half_rotary),
                (two_batch, log_n, offset),
                seed,
            )| {
                let batch = if two_batch { 2 } else { 1 };
                let config = RopeConfig {
                    base: 10000.0,
                    rotary_dim: if half_rotary { d / 2 } else { d },
                    layout: if interleaved {
                        RopeLayout::Interleaved
                    } else {
                        RopeLayout::HalfSplit
                    },
                    scaling,
                };
                let mut rope = RopeOptions::new(config, mode);
                rope.log_n_train_len = log_n;
                rope.position_offsets =
                    offset.map(|o| (0..batch as u32).map(|b| o + 977 * b).collect());
                // A sliding window on top of causal in some cases (from the seed, so shrinking
                // keeps it).
                rope.window_left = (seed % 3 == 0).then_some((seed >> 8) as u32 % 300);
                RopeCase {
                    dtype,
                    batch,
                    seqlen_q: sq,
                    seqlen_k: sk,
                    heads_q: hq,
                    heads_kv: hkv,
                    head_dim: d,
                    rope,
                    seed,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn rope_kernel_matches_reference(c in arb_rope_case()) {
        let Some(g) = gpu() else {
            say_skipped("rope_kernel_matches_reference");
            return Ok(());
        };
        let r = run_rope(g, &c);
        prop_assert!(r.cmp.passes, "{:?}\n  {}", c, r.cmp);
    }
}
