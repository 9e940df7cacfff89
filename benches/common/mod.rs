//! What the benches share: the GPU setup, input data, CUDA-event timing and medians.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use cudarc::driver::{sys::CUevent_flags, CudaContext, CudaSlice, CudaStream, CudaView};
use half::bf16;
use longflash::{Attention, ForwardOptions, Input, Layout, MainloopChoice, Output};

pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub attn: Attention,
}

/// The GPU, or `None` after saying it skipped (a panic under LONGFLASH_REQUIRE_GPU=1).
/// `LONGFLASH_BENCH_MAINLOOP=sm80|sm90` picks the forward mainloop (default: the library's).
pub fn gpu() -> Option<Gpu> {
    match longflash::open_device(0) {
        Ok(ctx) => {
            let choice = match std::env::var("LONGFLASH_BENCH_MAINLOOP").as_deref() {
                Ok("sm80") => MainloopChoice::Sm80,
                Ok("sm90") => MainloopChoice::Sm90,
                Ok(other) if !other.is_empty() => {
                    panic!("LONGFLASH_BENCH_MAINLOOP={other}: expected sm80 or sm90")
                }
                _ => MainloopChoice::Auto,
            };
            // LONGFLASH_BENCH_SM90_CTAS=N: a persistent grid of N CTAs for the Hopper kernels
            // of a build with LF_SM90_PERSISTENT=1 (see Attention::with_sm90_persistent).
            let ctas = std::env::var("LONGFLASH_BENCH_SM90_CTAS").ok().map(|v| {
                v.parse()
                    .expect("LONGFLASH_BENCH_SM90_CTAS: a number of CTAs")
            });
            // LONGFLASH_BENCH_SM90_ZIGZAG=0|1: the persistent zigzag grid for no dense Hopper
            // call or for every one (see Attention::with_sm90_zigzag; default: the library's).
            let zigzag = match std::env::var("LONGFLASH_BENCH_SM90_ZIGZAG").as_deref() {
                Ok("0") => Some(false),
                Ok("1") => Some(true),
                Ok(other) if !other.is_empty() => {
                    panic!("LONGFLASH_BENCH_SM90_ZIGZAG={other}: expected 0 or 1")
                }
                _ => None,
            };
            let attn = Attention::new(&ctx)
                .expect("Attention::new")
                .with_mainloop(choice)
                .with_sm90_persistent(ctas)
                .with_sm90_zigzag(zigzag);
            let stream = ctx.new_stream().expect("stream");
            Some(Gpu { ctx, stream, attn })
        }
        Err(e) => {
            if std::env::var("LONGFLASH_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("LONGFLASH_REQUIRE_GPU=1 but no GPU: {e}");
            }
            eprintln!("skipped: no CUDA GPU ({e})");
            None
        }
    }
}

/// A bf16 input view with its layout.
pub fn input<'a, 'b>(data: &'a CudaView<'b, bf16>, layout: Layout) -> Input<'a, 'b, bf16> {
    Input { data, layout }
}

/// One exact forward over q, k, v and o that all have `layout`, without the LSE.
pub fn forward_same_layout(
    g: &Gpu,
    (q, k, v): (
        &CudaView<'_, bf16>,
        &CudaView<'_, bf16>,
        &CudaView<'_, bf16>,
    ),
    o: &mut CudaSlice<bf16>,
    layout: Layout,
    opts: &ForwardOptions,
) {
    let mut ov = o.as_view_mut();
    let out = Output {
        data: &mut ov,
        layout,
        lse: None,
    };
    g.attn
        .forward(
            &g.stream,
            input(q, layout),
            input(k, layout),
            input(v, layout),
            out,
            opts,
        )
        .unwrap();
}

/// Roughly normal bf16 data (a centred sum of uniforms), never zeros.
pub fn random_bf16(n: usize, seed: u64) -> Vec<bf16> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let u = ((s >> 40) & 0xffff) as f32 / 65536.0
                + ((s >> 20) & 0xfffff) as f32 / 1048576.0
                - 1.0;
            bf16::from_f32(u * 1.7)
        })
        .collect()
}

pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// A comma list of numbers from an environment variable, or the default.
pub fn parse_list(var: &str, default: &[usize]) -> Vec<usize> {
    std::env::var(var)
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| default.to_vec())
}

/// The causal settings to time: `LONGFLASH_BENCH_CAUSAL=no|yes|both` (default both, non-causal
/// first), so a profiler can reach one shape's launches without counting the other's.
pub fn causal_list() -> Vec<bool> {
    match std::env::var("LONGFLASH_BENCH_CAUSAL").as_deref() {
        Err(_) | Ok("both") => vec![false, true],
        Ok("no") => vec![false],
        Ok("yes") => vec![true],
        Ok(other) => panic!("LONGFLASH_BENCH_CAUSAL={other}: expected no, yes or both"),
    }
}

/// Times `iters` calls of `f` with CUDA events around each one, pushing each time (ms) to
/// `samples`; returns the total for criterion's `iter_custom`. The calls are queued one after
/// the other and the stream synchronized once at the end, as the PyTorch peers time theirs
/// (benches/peer_timing.py): each call's host work (checks, tensor maps, launches) overlaps the
/// previous call's kernels, so an event pair measures the GPU's time for the call, not the host's
/// latency in front of an idle GPU. `LONGFLASH_BENCH_SYNC_EACH=1` synchronizes after every call
/// instead (the latency one isolated call sees).
pub fn time_calls(g: &Gpu, mut f: impl FnMut(), samples: &mut Vec<f64>, iters: u64) -> Duration {
    let sync_each = std::env::var("LONGFLASH_BENCH_SYNC_EACH").is_ok_and(|v| v == "1");
    let event = || {
        g.ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .unwrap()
    };
    let mut pairs = Vec::with_capacity(iters as usize);
    for _ in 0..iters {
        let (start, end) = (event(), event());
        start.record(&g.stream).unwrap();
        f();
        end.record(&g.stream).unwrap();
        if sync_each {
            end.synchronize().unwrap();
        }
        pairs.push((start, end));
    }
    g.stream.synchronize().unwrap();
    let mut total = 0.0;
    for (start, end) in &pairs {
        let ms = start.elapsed_ms(end).unwrap() as f64;
        samples.push(ms);
        total += ms;
    }
    Duration::from_secs_f64(total / 1e3)
}

/// The host's time to queue one call of `f` (microseconds, the mean of `n` calls queued without
/// waiting, the GPU drained before and after): when it is near the time a call takes on the
/// GPU, the queued timing measures the host, not the kernels.
pub fn host_us_per_call(g: &Gpu, mut f: impl FnMut(), n: usize) -> f64 {
    g.stream.synchronize().unwrap();
    let t = std::time::Instant::now();
    for _ in 0..n {
        f();
    }
    let us = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    g.stream.synchronize().unwrap();
    us
}

/// How a bench times a shape without criterion, as the PyTorch peers do (benches/peer_sdpa.py,
/// benches/peer_flex.py), so that both sides run the same calls at the same clocks: a power-capped
/// H100 runs its SMs up to a quarter slower after a second or two of calls, so compare a peer's
/// numbers only with ours taken the same way (README, "Benchmarks"). From the environment:
/// - `LONGFLASH_BENCH_BURST=warmup,reps,gap_ms` (the peers' `--warmup`, `--reps`, `--gap-ms`):
///   the GPU idle for `gap_ms`, `warmup` untimed calls, then `reps` queued calls timed one by one;
/// - `LONGFLASH_BENCH_SUSTAINED=warmup_ms,reps` (the peers' `--warmup-ms`): 5 untimed calls, then
///   calls for `warmup_ms` of wall time, then `reps` timed calls, at the clock the power limit
///   leaves.
///
/// Without either, the benches time through criterion (about two seconds of calls per shape).
#[derive(Clone, Copy, Debug)]
pub struct Protocol {
    pub name: &'static str,
    pub gap_ms: u64,
    pub warmup: usize,
    pub warmup_ms: u64,
    pub reps: usize,
}

impl Protocol {
    pub fn from_env() -> Option<Protocol> {
        let nums = |var: &str, n: usize| -> Option<Vec<u64>> {
            let v = std::env::var(var).ok()?;
            let x: Vec<u64> = v
                .split(',')
                .map(|x| {
                    x.trim()
                        .parse()
                        .unwrap_or_else(|_| panic!("{var}={v}: numbers"))
                })
                .collect();
            // reps is the second number of either
            assert!(x.len() == n && x[1] > 0, "{var}={v}: {n} numbers, reps > 0");
            Some(x)
        };
        if let Some(x) = nums("LONGFLASH_BENCH_BURST", 3) {
            return Some(Protocol {
                name: "burst",
                gap_ms: x[2],
                warmup: x[0] as usize,
                warmup_ms: 0,
                reps: x[1] as usize,
            });
        }
        let x = nums("LONGFLASH_BENCH_SUSTAINED", 2)?;
        Some(Protocol {
            name: "sustained",
            gap_ms: 0,
            warmup: 5,
            warmup_ms: x[0],
            reps: x[1] as usize,
        })
    }

    /// Each timed call's milliseconds.
    pub fn time(&self, g: &Gpu, mut f: impl FnMut()) -> Vec<f64> {
        g.stream.synchronize().unwrap();
        std::thread::sleep(Duration::from_millis(self.gap_ms));
        for _ in 0..self.warmup {
            f();
        }
        let until = std::time::Instant::now() + Duration::from_millis(self.warmup_ms);
        while std::time::Instant::now() < until {
            for _ in 0..8 {
                f();
            }
            g.stream.synchronize().unwrap();
        }
        g.stream.synchronize().unwrap();
        let mut samples = Vec::with_capacity(self.reps);
        time_calls(g, f, &mut samples, self.reps as u64);
        samples
    }
}

/// The samples (ms) of one shape: through criterion's `group` as `id`, or under `burst`
/// under `protocol` ([`Protocol::from_env`]) without it. Empty when criterion's name filter leaves
/// the shape out.
pub fn sample_shape(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    id: criterion::BenchmarkId,
    g: &Gpu,
    protocol: Option<Protocol>,
    mut f: impl FnMut(),
) -> Vec<f64> {
    if let Some(protocol) = protocol {
        return protocol.time(g, f);
    }
    let mut samples = Vec::new();
    group.bench_function(id, |bench| {
        bench.iter_custom(|iters| time_calls(g, &mut f, &mut samples, iters))
    });
    samples
}
