//! The first thing to run: forward attention on the GPU on a default workload, checked against
//! the CPU reference on a slice, with a table of shapes, times and TFLOP/s.
//!
//!     cargo run --release --example quickstart
//!
//! Without a GPU it says so and exits with status 1.

use std::process::ExitCode;

use cudarc::driver::CudaSlice;
use half::bf16;
use longflash::reference::{attention_f64, attention_lowp, compare, RefShape};
use longflash::{Attention, ForwardOptions, Input, Layout, MaskSpec, Output};

struct Workload {
    name: &'static str,
    batch: usize,
    seqlen: usize,
    heads_q: usize,
    heads_kv: usize,
    head_dim: usize,
    mask: MaskSpec,
}

fn random(n: usize, seed: u64) -> Vec<bf16> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            bf16::from_f32(((s >> 11) as f64 / (1u64 << 53) as f64 * 4.0 - 2.0) as f32)
        })
        .collect()
}

fn main() -> ExitCode {
    let ctx = match longflash::open_device(0) {
        Ok(ctx) => ctx,
        Err(e) => {
            eprintln!("longflash quickstart: no usable CUDA GPU here ({e}).");
            eprintln!("Run it on a machine with an NVIDIA GPU (sm_80 or newer) and its driver.");
            return ExitCode::FAILURE;
        }
    };
    match run(&ctx) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("longflash quickstart: a check against the CPU reference FAILED");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("longflash quickstart: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(
    ctx: &std::sync::Arc<cudarc::driver::CudaContext>,
) -> Result<bool, Box<dyn std::error::Error>> {
    let attn = Attention::new(ctx)?;
    let stream = ctx.new_stream()?;
    println!(
        "device: {} (kernels built for {})",
        ctx.name()?,
        longflash::COMPILED_ARCHS
    );
    let workloads = [
        Workload {
            name: "dense",
            batch: 2,
            seqlen: 4096,
            heads_q: 16,
            heads_kv: 16,
            head_dim: 128,
            mask: MaskSpec::none(),
        },
        Workload {
            name: "causal",
            batch: 2,
            seqlen: 4096,
            heads_q: 16,
            heads_kv: 16,
            head_dim: 128,
            mask: MaskSpec::causal(),
        },
        Workload {
            name: "causal GQA 32:8",
            batch: 1,
            seqlen: 8192,
            heads_q: 32,
            heads_kv: 8,
            head_dim: 128,
            mask: MaskSpec::causal(),
        },
        Workload {
            name: "sliding window 1024",
            batch: 1,
            seqlen: 16384,
            heads_q: 16,
            heads_kv: 16,
            head_dim: 64,
            mask: MaskSpec::causal_window(1024),
        },
    ];
    println!(
        "{:<20} {:>5} {:>6} {:>8} {:>4} {:>9} {:>9}  check (last 128 queries of batch 0, head 0)",
        "workload", "batch", "seqlen", "heads", "d", "ms", "TFLOP/s"
    );
    let mut all_ok = true;
    for w in &workloads {
        let ql = Layout::bshd(w.batch, w.seqlen, w.heads_q, w.head_dim);
        let kl = Layout::bshd(w.batch, w.seqlen, w.heads_kv, w.head_dim);
        let (q, k, v) = (
            random(ql.numel(), 1),
            random(kl.numel(), 2),
            random(kl.numel(), 3),
        );
        let dq: CudaSlice<bf16> = stream.clone_htod(&q)?;
        let dk: CudaSlice<bf16> = stream.clone_htod(&k)?;
        let dv: CudaSlice<bf16> = stream.clone_htod(&v)?;
        let mut d_o: CudaSlice<bf16> = stream.alloc_zeros(ql.numel())?;
        let opts = ForwardOptions::default().with_mask(w.mask);
        let (qv, kv, vv) = (dq.as_view(), dk.as_view(), dv.as_view());
        let launch = |d_o: &mut CudaSlice<bf16>| -> longflash::Result<()> {
            let mut ov = d_o.as_view_mut();
            attn.forward(
                &stream,
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
                &opts,
            )
        };
        launch(&mut d_o)?; // warm-up (loads the module)
        let start = ctx.new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))?;
        let end = ctx.new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))?;
        let reps = 20;
        start.record(&stream)?;
        for _ in 0..reps {
            launch(&mut d_o)?;
        }
        end.record(&stream)?;
        end.synchronize()?;
        let ms = start.elapsed_ms(&end)? as f64 / reps as f64;

        // FLOPs actually needed by the mask: 4 * d per visible (query, key) pair.
        let visible = w.mask.visible_pairs(w.seqlen, w.seqlen);
        let flops = 4.0 * (w.batch * w.heads_q) as f64 * visible as f64 * w.head_dim as f64;

        // Check: batch 0, head 0, the last 128 queries against every key. With the diagonal
        // aligned bottom-right, those rows are the same rows as in the full problem.
        let out = stream.clone_dtoh(&d_o)?;
        let rows = 128;
        let d = w.head_dim;
        let q0 = w.seqlen - rows;
        let pick = |src: &[bf16], l: &Layout, s0: usize, n: usize| -> Vec<bf16> {
            (s0..s0 + n)
                .flat_map(|s| src[l.offset(0, s, 0) as usize..][..d].to_vec())
                .collect()
        };
        let (qs, ks, vs) = (
            pick(&q, &ql, q0, rows),
            pick(&k, &kl, 0, w.seqlen),
            pick(&v, &kl, 0, w.seqlen),
        );
        let shape = RefShape {
            batch: 1,
            seqlen_q: rows,
            seqlen_k: w.seqlen,
            heads_q: 1,
            heads_kv: 1,
            head_dim: d,
        };
        let scale = 1.0 / (d as f32).sqrt();
        let wide = |x: &[bf16]| x.iter().map(|t| t.to_f32() as f64).collect::<Vec<_>>();
        let ref64 = attention_f64(
            &shape,
            &wide(&qs),
            &wide(&ks),
            &wide(&vs),
            &w.mask,
            scale as f64,
        )?;
        let lowp = attention_lowp(&shape, &qs, &ks, &vs, &w.mask, scale)?;
        let got: Vec<f64> = wide(&pick(&out, &ql, q0, rows));
        let cmp = compare(&got, None, &ref64, &lowp);
        all_ok &= cmp.passes;
        println!(
            "{:<20} {:>5} {:>6} {:>8} {:>4} {:>9.3} {:>9.1}  {}",
            w.name,
            w.batch,
            w.seqlen,
            format!("{}:{}", w.heads_q, w.heads_kv),
            d,
            ms,
            flops / ms / 1e9,
            cmp
        );
    }
    Ok(all_ok)
}
