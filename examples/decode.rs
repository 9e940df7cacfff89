//! A serving loop on a paged KV cache: four sequences with prompts of different lengths share a
//! pool of 64-token pages handed out in a shuffled order; each step appends one token's keys and
//! values to every sequence (`append_kv`) and decodes its query against the cache (`decode`, and
//! `decode_rope` with ReRoPE over the same un-rotated cache). The last step is checked against
//! the CPU reference on the pages' contents, and the steady-state time per step is printed.
//!
//!     cargo run --release --example decode
//!
//! Without a GPU it says so and exits with status 1.

use std::process::ExitCode;
use std::sync::Arc;

use cudarc::driver::{sys::CUevent_flags, CudaContext, CudaSlice};
use half::bf16;
use longflash::reference::{
    compare, paged_attention_f64, paged_attention_lowp, PagedLayout, PagedShape,
};
use longflash::rope::{PositionMode, RopeConfig, RopeOptions};
use longflash::{
    Attention, BlockTable, DecodeOptions, Input, KvCache, KvCacheMut, Layout, MaskSpec, Output,
};

const PAGE: usize = 64;
const HEADS_Q: usize = 32;
const HEADS_KV: usize = 8;
const HEAD_DIM: usize = 128;
const STEPS: usize = 32;

fn random(n: usize, seed: &mut u64) -> Vec<bf16> {
    (0..n)
        .map(|_| {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            bf16::from_f32(((*seed >> 11) as f64 / (1u64 << 53) as f64 * 4.0 - 2.0) as f32)
        })
        .collect()
}

fn main() -> ExitCode {
    let ctx = match longflash::open_device(0) {
        Ok(ctx) => ctx,
        Err(e) => {
            eprintln!("longflash decode example: no usable CUDA GPU here ({e}).");
            eprintln!("Run it on a machine with an NVIDIA GPU (sm_80 or newer) and its driver.");
            return ExitCode::FAILURE;
        }
    };
    match run(&ctx) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("longflash decode example: a check against the CPU reference FAILED");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("longflash decode example: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(ctx: &Arc<CudaContext>) -> Result<bool, Box<dyn std::error::Error>> {
    let attn = Attention::new(ctx)?;
    let stream = ctx.default_stream();
    let prompts = [3000usize, 517, 12_000, 64];
    let batch = prompts.len();
    let max_len = prompts.iter().max().unwrap() + STEPS;
    let max_pages = max_len.div_ceil(PAGE);
    let num_pages = batch * max_pages;
    let mut seed = 0x2545_F491_4F6C_DD1Du64;

    // The page pool, handed out in a shuffled order, and the block table.
    let mut pool: Vec<i32> = (0..num_pages as i32).collect();
    for i in (1..pool.len()).rev() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        pool.swap(i, (seed % (i as u64 + 1)) as usize);
    }
    let table: Vec<i32> = pool.clone();
    let cache_layout = Layout::bshd(num_pages, PAGE, HEADS_KV, HEAD_DIM);
    let elems = cache_layout.numel();
    let mut k_cache: CudaSlice<bf16> = stream.alloc_zeros(elems)?;
    let mut v_cache: CudaSlice<bf16> = stream.alloc_zeros(elems)?;
    let d_table = stream.clone_htod(&table)?;

    // Prefill: the prompts' keys and values in one call, padded to the longest prompt. The
    // padding lands past each shorter prompt, where the lengths below say the sequence ends:
    // decoding overwrites it and never reads it.
    let longest = *prompts.iter().max().unwrap();
    let prompt_layout = Layout::bshd(batch, longest, HEADS_KV, HEAD_DIM);
    let kp = stream.clone_htod(&random(prompt_layout.numel(), &mut seed))?;
    let vp = stream.clone_htod(&random(prompt_layout.numel(), &mut seed))?;
    let zeros = stream.clone_htod(&vec![0i32; batch])?;
    let mut flag: CudaSlice<i32> = stream.alloc_zeros(1)?;
    {
        let (tv, zv) = (d_table.as_view(), zeros.as_view());
        let (mut kc, mut vc, mut fv) = (
            k_cache.as_view_mut(),
            v_cache.as_view_mut(),
            flag.as_view_mut(),
        );
        let mut cache = KvCacheMut {
            k: &mut kc,
            k_layout: cache_layout,
            v: &mut vc,
            v_layout: cache_layout,
            block_table: Some(BlockTable {
                table: &tv,
                max_pages_per_seq: max_pages,
            }),
            cache_seqlens: &zv,
        };
        attn.append_kv(
            &stream,
            (&kp.as_view(), prompt_layout),
            (&vp.as_view(), prompt_layout),
            &mut cache,
            Some(&mut fv),
        )?;
    }

    // Decoding: one token per sequence per step.
    let mut lens: Vec<i32> = prompts.iter().map(|&p| p as i32).collect();
    let step_layout = Layout::bshd(batch, 1, HEADS_KV, HEAD_DIM);
    let q_layout = Layout::bshd(batch, 1, HEADS_Q, HEAD_DIM);
    let mut out: CudaSlice<bf16> = stream.alloc_zeros(q_layout.numel())?;
    let mut out_rerope: CudaSlice<bf16> = stream.alloc_zeros(q_layout.numel())?;
    let rerope = RopeOptions::new(
        RopeConfig::llama(HEAD_DIM),
        PositionMode::ReRope { window: 4096 },
    );
    let start = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    let end = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    let mut last_q = Vec::new();
    for step in 0..STEPS {
        if step == STEPS / 2 {
            start.record(&stream)?;
        }
        let q = random(q_layout.numel(), &mut seed);
        let dq = stream.clone_htod(&q)?;
        let dk = stream.clone_htod(&random(step_layout.numel(), &mut seed))?;
        let dv = stream.clone_htod(&random(step_layout.numel(), &mut seed))?;
        let before = stream.clone_htod(&lens)?;
        for l in lens.iter_mut() {
            *l += 1;
        }
        let after = stream.clone_htod(&lens)?;
        let tv = d_table.as_view();
        {
            let bv = before.as_view();
            let (mut kc, mut vc, mut fv) = (
                k_cache.as_view_mut(),
                v_cache.as_view_mut(),
                flag.as_view_mut(),
            );
            let mut cache = KvCacheMut {
                k: &mut kc,
                k_layout: cache_layout,
                v: &mut vc,
                v_layout: cache_layout,
                block_table: Some(BlockTable {
                    table: &tv,
                    max_pages_per_seq: max_pages,
                }),
                cache_seqlens: &bv,
            };
            attn.append_kv(
                &stream,
                (&dk.as_view(), step_layout),
                (&dv.as_view(), step_layout),
                &mut cache,
                Some(&mut fv),
            )?;
        }
        let (kv, vv, av, qv) = (
            k_cache.as_view(),
            v_cache.as_view(),
            after.as_view(),
            dq.as_view(),
        );
        let cache = KvCache {
            k: Input {
                data: &kv,
                layout: cache_layout,
            },
            v: Input {
                data: &vv,
                layout: cache_layout,
            },
            block_table: Some(BlockTable {
                table: &tv,
                max_pages_per_seq: max_pages,
            }),
            cache_seqlens: Some(&av),
        };
        let options = DecodeOptions {
            mask: MaskSpec::causal(),
            ..DecodeOptions::default()
        };
        let mut ov = out.as_view_mut();
        attn.decode(
            &stream,
            Input {
                data: &qv,
                layout: q_layout,
            },
            &cache,
            Output {
                data: &mut ov,
                layout: q_layout,
                lse: None,
            },
            None,
            &options,
        )?;
        let mut rv = out_rerope.as_view_mut();
        attn.decode_rope(
            &stream,
            Input {
                data: &qv,
                layout: q_layout,
            },
            &cache,
            Output {
                data: &mut rv,
                layout: q_layout,
                lse: None,
            },
            None,
            &options,
            &rerope,
        )?;
        last_q = q;
    }
    end.record(&stream)?;
    end.synchronize()?;
    let per_step_ms = start.elapsed_ms(&end)? as f64 / (STEPS - STEPS / 2) as f64;
    let flag = stream.clone_dtoh(&flag)?[0];

    // The last step against the reference, on the cache as the GPU holds it.
    let shape = PagedShape {
        batch,
        seqlen_q: 1,
        heads_q: HEADS_Q,
        heads_kv: HEADS_KV,
        head_dim: HEAD_DIM,
        num_pages,
        page_size: PAGE,
        max_pages_per_seq: max_pages,
        layout: PagedLayout::TokensMajor,
        block_table: table,
        cache_seqlens: lens.clone(),
    };
    let (k_host, v_host) = (stream.clone_dtoh(&k_cache)?, stream.clone_dtoh(&v_cache)?);
    let got: Vec<f64> = stream
        .clone_dtoh(&out)?
        .iter()
        .map(|x| x.to_f64())
        .collect();
    let wide = |x: &[bf16]| -> Vec<f64> { x.iter().map(|t| t.to_f64()).collect() };
    let scale = 1.0 / (HEAD_DIM as f64).sqrt();
    let ref64 = paged_attention_f64(
        &shape,
        &wide(&last_q),
        &wide(&k_host),
        &wide(&v_host),
        &MaskSpec::causal(),
        scale,
    )?;
    let lowp = paged_attention_lowp(
        &shape,
        &last_q,
        &k_host,
        &v_host,
        &MaskSpec::causal(),
        scale as f32,
    )?;
    let cmp = compare(&got, None, &ref64, &lowp);
    let kv_gb: f64 =
        lens.iter().map(|&l| l as f64).sum::<f64>() * (HEADS_KV * HEAD_DIM * 2 * 2) as f64 / 1e9;
    println!(
        "{} sequences ({:?} tokens at the end), {HEADS_Q} query heads over {HEADS_KV} KV heads, head dim {HEAD_DIM}, pages of {PAGE}",
        batch, lens
    );
    println!(
        "per step (append + decode + ReRoPE decode): {per_step_ms:.3} ms over {:.3} GB of K and V",
        kv_gb
    );
    println!("last step against the reference: {cmp}");
    println!("error flag: {flag}");
    Ok(cmp.passes && flag == 0)
}
