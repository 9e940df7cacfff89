//! A serving loop on a paged KV cache: four sequences with prompts of different lengths share a
//! pool of 64-token pages handed out in a shuffled order; each step appends one token's keys and
//! values to every sequence (`append_kv`) and decodes its query against the cache three ways:
//! plain (`decode`), and with RoPE and with ReRoPE applied inside the kernel over the same
//! un-rotated cache (`decode_rope`). Every step is checked against the CPU reference on the
//! pages' contents (`reference::paged_attention_*`, and `rope_attention_*` on each sequence's
//! gathered keys), then a table of decoding bandwidth on larger batches is printed.
//!
//!     cargo run --release --example decode
//!
//! Without a GPU it says so and exits with status 1.

use std::process::ExitCode;
use std::sync::Arc;

use cudarc::driver::{sys::CUevent_flags, CudaContext, CudaSlice, CudaStream};
use half::bf16;
use longflash::reference::{
    compare, paged_attention_f64, paged_attention_lowp, paged_gather, rope_attention_f64,
    rope_attention_lowp, Comparison, PagedLayout, PagedShape, RefOutput, RefShape,
};
use longflash::rope::{PositionMode, RopeConfig, RopeOptions};
use longflash::{
    Attention, BlockTable, DecodeOptions, Element, Input, KvCache, KvCacheMut, Layout, MaskSpec,
    Output,
};

const PAGE: usize = 64;
const HEADS_Q: usize = 32;
const HEADS_KV: usize = 8;
const HEAD_DIM: usize = 128;
const STEPS: usize = 4;

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
    let ok = serve(&attn, &stream)?;
    bandwidth_table(ctx, &attn, &stream)?;
    Ok(ok)
}

/// The last step's output of a RoPE-mode decode against the two-matrix reference, sequence by
/// sequence on the keys gathered from the pages.
fn check_rope(
    shape: &PagedShape,
    q: &[bf16],
    k: &[bf16],
    v: &[bf16],
    rope: &RopeOptions,
    got: &[f64],
) -> Result<Comparison, Box<dyn std::error::Error>> {
    let scale = 1.0 / (HEAD_DIM as f32).sqrt();
    let q_seq = HEADS_Q * HEAD_DIM;
    let (mut ref64, mut lowp) = (
        RefOutput::default(),
        RefOutput {
            dtype: Some(bf16::DTYPE),
            ..RefOutput::default()
        },
    );
    for b in 0..shape.batch {
        let (kb, vb) = paged_gather(shape, k, v, b)?;
        let qb = &q[b * q_seq..(b + 1) * q_seq];
        let rs = RefShape {
            batch: 1,
            seqlen_q: 1,
            seqlen_k: shape.seqlen_k(b),
            heads_q: HEADS_Q,
            heads_kv: HEADS_KV,
            head_dim: HEAD_DIM,
        };
        let wide = |x: &[bf16]| -> Vec<f64> { x.iter().map(|t| t.to_f64()).collect() };
        let r = rope_attention_f64(&rs, &wide(qb), &wide(&kb), &wide(&vb), rope, scale as f64)?;
        ref64.out.extend(r.out);
        ref64.lse.extend(r.lse);
        let l = rope_attention_lowp(&rs, qb, &kb, &vb, rope, scale)?;
        lowp.out.extend(l.out);
        lowp.lse.extend(l.lse);
        lowp.unrounded.extend(l.unrounded);
    }
    Ok(compare(got, None, &ref64, &lowp))
}

/// Prefill, then a few decoding steps, each checked.
fn serve(attn: &Attention, stream: &Arc<CudaStream>) -> Result<bool, Box<dyn std::error::Error>> {
    let prompts = [700usize, 1500, 3000, 64];
    let batch = prompts.len();
    let max_len = prompts.iter().max().unwrap() + STEPS;
    let max_pages = max_len.div_ceil(PAGE);
    let num_pages = batch * max_pages;
    let mut seed = 0x2545_F491_4F6C_DD1Du64;

    // The page pool, handed out in a shuffled order, and the block table.
    let mut table: Vec<i32> = (0..num_pages as i32).collect();
    for i in (1..table.len()).rev() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        table.swap(i, (seed % (i as u64 + 1)) as usize);
    }
    let cache_layout = Layout::bshd(num_pages, PAGE, HEADS_KV, HEAD_DIM);
    let elems = cache_layout.numel();
    let mut k_cache: CudaSlice<bf16> = stream.alloc_zeros(elems)?;
    let mut v_cache: CudaSlice<bf16> = stream.alloc_zeros(elems)?;
    let d_table = stream.clone_htod(&table)?;
    let mut flag: CudaSlice<i32> = stream.alloc_zeros(1)?;

    // Prefill: the prompts' keys and values in one call, padded to the longest prompt. The
    // padding lands past each shorter prompt, where the lengths below say the sequence ends:
    // decoding overwrites it and never reads it.
    let longest = *prompts.iter().max().unwrap();
    let prompt_layout = Layout::bshd(batch, longest, HEADS_KV, HEAD_DIM);
    let kp = stream.clone_htod(&random(prompt_layout.numel(), &mut seed))?;
    let vp = stream.clone_htod(&random(prompt_layout.numel(), &mut seed))?;
    let mut lens: Vec<i32> = vec![0; batch];
    let step_layout = Layout::bshd(batch, 1, HEADS_KV, HEAD_DIM);
    let q_layout = Layout::bshd(batch, 1, HEADS_Q, HEAD_DIM);
    let rope = RopeOptions::new(RopeConfig::llama(HEAD_DIM), PositionMode::Rope);
    let rerope = RopeOptions::new(
        RopeConfig::llama(HEAD_DIM),
        PositionMode::ReRope { window: 1024 },
    );
    let mut all_pass = true;
    for step in 0..=STEPS {
        // Step 0 appends the prompts; the others one token per sequence.
        let (kn, vn, layout) = if step == 0 {
            (kp.clone(), vp.clone(), prompt_layout)
        } else {
            (
                stream.clone_htod(&random(step_layout.numel(), &mut seed))?,
                stream.clone_htod(&random(step_layout.numel(), &mut seed))?,
                step_layout,
            )
        };
        let before = stream.clone_htod(&lens)?;
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
                stream,
                (&kn.as_view(), layout),
                (&vn.as_view(), layout),
                &mut cache,
                Some(&mut fv),
            )?;
        }
        for (l, p) in lens.iter_mut().zip(prompts) {
            *l = if step == 0 { p as i32 } else { *l + 1 };
        }
        if step == 0 {
            continue;
        }
        let after = stream.clone_htod(&lens)?;
        let q = random(q_layout.numel(), &mut seed);
        let dq = stream.clone_htod(&q)?;
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
        let mut outs: Vec<CudaSlice<bf16>> = Vec::new();
        for mode in [None, Some(&rope), Some(&rerope)] {
            let mut o: CudaSlice<bf16> = stream.alloc_zeros(q_layout.numel())?;
            {
                let mut ov = o.as_view_mut();
                let qi = Input {
                    data: &qv,
                    layout: q_layout,
                };
                let out = Output {
                    data: &mut ov,
                    layout: q_layout,
                    lse: None,
                };
                match mode {
                    None => attn.decode(stream, qi, &cache, out, None, &options)?,
                    Some(r) => attn.decode_rope(stream, qi, &cache, out, None, &options, r)?,
                }
            }
            outs.push(o);
        }

        // This step against the reference, on the cache as the GPU holds it.
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
            block_table: table.clone(),
            cache_seqlens: lens.clone(),
        };
        let (k_host, v_host) = (stream.clone_dtoh(&k_cache)?, stream.clone_dtoh(&v_cache)?);
        let got = |o: &CudaSlice<bf16>| -> Result<Vec<f64>, Box<dyn std::error::Error>> {
            Ok(stream.clone_dtoh(o)?.iter().map(|x| x.to_f64()).collect())
        };
        let wide = |x: &[bf16]| -> Vec<f64> { x.iter().map(|t| t.to_f64()).collect() };
        let scale = 1.0 / (HEAD_DIM as f64).sqrt();
        let plain = compare(
            &got(&outs[0])?,
            None,
            &paged_attention_f64(
                &shape,
                &wide(&q),
                &wide(&k_host),
                &wide(&v_host),
                &MaskSpec::causal(),
                scale,
            )?,
            &paged_attention_lowp(
                &shape,
                &q,
                &k_host,
                &v_host,
                &MaskSpec::causal(),
                scale as f32,
            )?,
        );
        let with_rope = check_rope(&shape, &q, &k_host, &v_host, &rope, &got(&outs[1])?)?;
        let with_rerope = check_rope(&shape, &q, &k_host, &v_host, &rerope, &got(&outs[2])?)?;
        println!("step {step} (lengths {lens:?}):");
        for (name, c) in [
            ("plain", &plain),
            ("RoPE", &with_rope),
            ("ReRoPE w=1024", &with_rerope),
        ] {
            println!("  {name:>14}: {c}");
            all_pass &= c.passes;
        }
    }
    let flag = stream.clone_dtoh(&flag)?[0];
    println!("append error flag: {flag}");
    Ok(all_pass && flag == 0)
}

/// Decoding bandwidth on larger batches: one token per sequence, pages of 64 in a shuffled
/// order, against a device copy of the same bytes.
fn bandwidth_table(
    ctx: &Arc<CudaContext>,
    attn: &Attention,
    stream: &Arc<CudaStream>,
) -> Result<(), Box<dyn std::error::Error>> {
    println!();
    println!("| batch | cached tokens | K+V GB | decode ms | TB/s | copy TB/s | of copy |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    let mut seed = 7u64;
    let start = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    let end = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    let time = |f: &mut dyn FnMut() -> Result<(), Box<dyn std::error::Error>>| -> Result<f64, Box<dyn std::error::Error>> {
        f()?;
        start.record(stream)?;
        for _ in 0..10 {
            f()?;
        }
        end.record(stream)?;
        end.synchronize()?;
        Ok(start.elapsed_ms(&end)? as f64 / 10.0)
    };
    for (batch, len) in [(1usize, 131072usize), (8, 32768), (64, 8192), (256, 2048)] {
        let pages = len.div_ceil(PAGE);
        let cache_layout = Layout::bshd(batch * pages, PAGE, HEADS_KV, HEAD_DIM);
        // A few MB of random values repeated through the cache.
        let pattern = stream.clone_htod(&random(1 << 22, &mut seed))?;
        let mut k: CudaSlice<bf16> = stream.alloc_zeros(cache_layout.numel())?;
        let mut at = 0;
        while at < k.len() {
            let n = (1usize << 22).min(k.len() - at);
            stream.memcpy_dtod(&pattern.slice(0..n), &mut k.slice_mut(at..at + n))?;
            at += n;
        }
        let v = k.clone();
        let table: Vec<i32> = (0..(batch * pages) as i32).rev().collect();
        let (dt, dl) = (
            stream.clone_htod(&table)?,
            stream.clone_htod(&vec![len as i32; batch])?,
        );
        let q_layout = Layout::bshd(batch, 1, HEADS_Q, HEAD_DIM);
        let dq = stream.clone_htod(&random(q_layout.numel(), &mut seed))?;
        let mut o: CudaSlice<bf16> = stream.alloc_zeros(q_layout.numel())?;
        let (kv, vv, tv, lv, qv) = (
            k.as_view(),
            v.as_view(),
            dt.as_view(),
            dl.as_view(),
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
                max_pages_per_seq: pages,
            }),
            cache_seqlens: Some(&lv),
        };
        let ms = time(&mut || {
            let mut ov = o.as_view_mut();
            attn.decode(
                stream,
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
                &DecodeOptions::default(),
            )?;
            Ok(())
        })?;
        let bytes = 2 * batch * len * HEADS_KV * HEAD_DIM * 2;
        let src: CudaSlice<u8> = stream.alloc_zeros(bytes)?;
        let mut dst: CudaSlice<u8> = stream.alloc_zeros(bytes)?;
        let copy_ms = time(&mut || {
            stream.memcpy_dtod(&src, &mut dst)?;
            Ok(())
        })?;
        let (tbs, copy_tbs) = (bytes as f64 / ms / 1e9, 2.0 * bytes as f64 / copy_ms / 1e9);
        println!(
            "| {batch} | {len} | {:.2} | {ms:.3} | {tbs:.2} | {copy_tbs:.2} | {:.2}x |",
            bytes as f64 / 1e9,
            tbs / copy_tbs
        );
    }
    Ok(())
}
