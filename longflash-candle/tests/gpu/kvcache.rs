//! KV caches: contiguous and paged attention (plain and with RoPE over un-rotated keys), appends,
//! decoding steps as an engine runs them, and errors on the device.

use crate::common::*;
use crate::rope::{rope_reference, rotate};

/// A deterministic permutation of `0..n` (a fixed LCG), so that pages land out of order.
fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut p: Vec<usize> = (0..n).collect();
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    for i in (1..n).rev() {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        p.swap(i, ((x >> 33) as usize) % (i + 1));
    }
    p
}

/// A contiguous cache `(b, pages_per_seq * page, h, d)` (CPU) as pages: a pool of
/// `b * pages_per_seq + spare` pages of `page` rows in shuffled order, the spare ones random,
/// and the `(b, pages_per_seq)` i32 table that maps each sequence's pages into the pool.
fn to_pages(
    cont: &Tensor,
    page: usize,
    spare: usize,
    seed: u64,
) -> Result<(Tensor, Vec<Vec<i32>>)> {
    let (b, cap, h, d) = cont.dims4()?;
    let per_seq = cap / page;
    let n = b * per_seq + spare;
    let perm = permutation(n, seed);
    let mut pool: Vec<Option<Tensor>> = vec![None; n];
    let mut table = vec![vec![0i32; per_seq]; b];
    for (bi, row) in table.iter_mut().enumerate() {
        for (p, entry) in row.iter_mut().enumerate() {
            let phys = perm[bi * per_seq + p];
            *entry = phys as i32;
            pool[phys] = Some(cont.i(bi)?.narrow(0, p * page, page)?);
        }
    }
    let pages = pool
        .into_iter()
        .map(|p| match p {
            Some(t) => Ok(t),
            None => Tensor::randn(0f32, 1.0, (page, h, d), &Device::Cpu)?.to_dtype(cont.dtype()),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((Tensor::stack(&pages, 0)?, table))
}

fn i32_tensor(v: &[i32], dev: &Device) -> Result<Tensor> {
    Tensor::new(v, dev)
}

fn table_tensor(t: &[Vec<i32>], dev: &Device) -> Result<Tensor> {
    let cols = t.first().map_or(0, Vec::len);
    let flat: Vec<i32> = t.iter().flatten().copied().collect();
    Tensor::from_vec(flat, (t.len(), cols), dev)
}

/// Checks a KV-cache result (output `(b, sq, hq, d)`, LSE `(b, hq, sq)`) against the
/// reference of each sequence over its first `lens[b]` cached keys (`want(b, len)` gives
/// it); a sequence of 0 keys must get zeros and an LSE of -inf.
fn check_per_sequence(
    what: &str,
    got: &Tensor,
    lse: &Tensor,
    lens: &[i32],
    tol_o: f32,
    mut want: impl FnMut(usize, usize) -> Result<(Tensor, Tensor)>,
) -> Result<()> {
    for (bi, &len) in lens.iter().enumerate() {
        let g = got.i(bi)?.unsqueeze(0)?;
        let gl = lse.i(bi)?.to_device(&Device::Cpu)?;
        if len == 0 {
            let zeros = g.zeros_like()?;
            assert_eq!(max_diff(&g, &zeros)?, 0.0, "{what}: empty sequence {bi}");
            let all_neg_inf = gl
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .all(|&x| x == f32::NEG_INFINITY);
            assert!(all_neg_inf, "{what}: empty sequence {bi}: LSE not -inf");
            continue;
        }
        let (wo, wl) = want(bi, len as usize)?;
        let diff = max_diff(&g, &wo)?;
        assert!(
            diff <= tol_o,
            "{what}: sequence {bi} (len {len}): max diff {diff}"
        );
        let ldiff = max_diff(&gl.unsqueeze(0)?, &wl)?;
        assert!(ldiff <= 2e-2, "{what}: sequence {bi}: LSE max diff {ldiff}");
    }
    Ok(())
}

#[test]
fn kvcache_contiguous_and_paged() -> Result<()> {
    let dev = gpu_or_skip!("kvcache_contiguous_and_paged");
    let cpu = Device::Cpu;
    for dtype in [DType::F16, DType::BF16] {
        for (hq, hk, d, page) in [(6, 2, 64, 16), (8, 8, 128, 64), (4, 1, 80, 32)] {
            let per_seq = 320 / page;
            let cap = per_seq * page;
            // Lengths: a page boundary, a partial page, the whole capacity, and empty.
            let lens = [page as i32 * 4, 137, cap as i32, 0];
            let b = lens.len();
            let kc = Tensor::randn(0f32, 1.0, (b, cap, hk, d), &cpu)?.to_dtype(dtype)?;
            let vc = Tensor::randn(0f32, 1.0, (b, cap, hk, d), &cpu)?.to_dtype(dtype)?;
            let (kp, table) = to_pages(&kc, page, 3, 11)?;
            let (vp, table_v) = to_pages(&vc, page, 3, 11)?;
            assert_eq!(table, table_v);
            let seqlens = i32_tensor(&lens, &dev)?;
            let (kcd, vcd) = (kc.to_device(&dev)?, vc.to_device(&dev)?);
            let (kpd, vpd) = (kp.to_device(&dev)?, vp.to_device(&dev)?);
            let tabd = table_tensor(&table, &dev)?;
            let contiguous = KvCache::contiguous(&kcd, &vcd, &seqlens);
            let paged = KvCache::paged(&kpd, &vpd, &tabd, &seqlens);
            let scale = 1.0 / (d as f32).sqrt();
            // One token, a speculative burst, and a chunk of prefill (the chunked-prefill
            // kernel from 64 queries on); causal and not.
            for sq in [1usize, 5, 64] {
                let q = randn(&[b, sq, hq, d], dtype, &dev)?;
                for (name, cache) in [("contiguous", &contiguous), ("paged", &paged)] {
                    for mask in [MaskSpec::causal(), MaskSpec::none()] {
                        let what = format!("{dtype:?} h{hq}/{hk} d{d} {name} sq{sq} {mask:?}");
                        let (o, lse) = flash_attn_with_kvcache_lse(&q, cache, scale, mask)?;
                        let causal = mask == MaskSpec::causal();
                        let o2 = flash_attn_with_kvcache(&q, cache, scale, causal)?;
                        assert_eq!(max_diff(&o, &o2)?, 0.0, "{what}: with and without LSE");
                        check_per_sequence(&what, &o, &lse, &lens, tol(dtype), |bi, len| {
                            if causal && len < sq {
                                // Rows before the first key see nothing: compare the rest.
                                candle_core::bail!("{what}: the test needs len >= sq")
                            }
                            reference(
                                &q.i(bi)?.unsqueeze(0)?,
                                &kc.i(bi)?.narrow(0, 0, len)?.unsqueeze(0)?,
                                &vc.i(bi)?.narrow(0, 0, len)?.unsqueeze(0)?,
                                scale,
                                &mask,
                            )
                        })?;
                    }
                }
                // A causal sliding window of 40 keys.
                let got = flash_attn_with_kvcache_windowed(&q, &paged, scale, Some(40), Some(0))?;
                let mask = MaskSpec::sliding_window(Some(40), Some(0));
                for (bi, &len) in lens.iter().enumerate() {
                    if len == 0 {
                        continue;
                    }
                    let len = len as usize;
                    let (want, _) = reference(
                        &q.i(bi)?.unsqueeze(0)?,
                        &kc.i(bi)?.narrow(0, 0, len)?.unsqueeze(0)?,
                        &vc.i(bi)?.narrow(0, 0, len)?.unsqueeze(0)?,
                        scale,
                        &mask,
                    )?;
                    let diff = max_diff(&got.i(bi)?.unsqueeze(0)?, &want)?;
                    assert!(diff <= tol(dtype), "window: sequence {bi}: max diff {diff}");
                }
            }
        }
    }
    Ok(())
}

#[test]
fn kvcache_rope_over_unrotated_keys() -> Result<()> {
    let dev = gpu_or_skip!("kvcache_rope_over_unrotated_keys");
    let cpu = Device::Cpu;
    for dtype in [DType::F16, DType::BF16] {
        for layout in [RopeLayout::HalfSplit, RopeLayout::Interleaved] {
            for mode in [
                PositionMode::Rope,
                PositionMode::ReRope { window: 48 },
                PositionMode::LeakyReRope {
                    window: 32,
                    leak: 8.0,
                },
            ] {
                let (hq, hk, d, page) = (9, 3, 64, 16);
                let cap = 400usize;
                let lens = [399i32, 64, 200];
                let offsets = [0u32, 7, 1000];
                let b = lens.len();
                let kc = Tensor::randn(0f32, 1.0, (b, cap, hk, d), &cpu)?.to_dtype(dtype)?;
                let vc = Tensor::randn(0f32, 1.0, (b, cap, hk, d), &cpu)?.to_dtype(dtype)?;
                let (kp, table) = to_pages(&kc, page, 2, 5)?;
                let (vp, _) = to_pages(&vc, page, 2, 5)?;
                let seqlens = i32_tensor(&lens, &dev)?;
                let (kcd, vcd) = (kc.to_device(&dev)?, vc.to_device(&dev)?);
                let (kpd, vpd) = (kp.to_device(&dev)?, vp.to_device(&dev)?);
                let tabd = table_tensor(&table, &dev)?;
                let mut config = RopeConfig::llama(d);
                config.layout = layout;
                config.base = 100000.0;
                let mut rope = RopeOptions::new(config, mode);
                rope.position_offsets = Some(offsets.to_vec());
                let scale = 1.0 / (d as f32).sqrt();
                for sq in [1usize, 3, 16] {
                    let q = randn(&[b, sq, hq, d], dtype, &dev)?;
                    for (name, cache) in [
                        ("contiguous", KvCache::contiguous(&kcd, &vcd, &seqlens)),
                        ("paged", KvCache::paged(&kpd, &vpd, &tabd, &seqlens)),
                    ] {
                        let what = format!("{dtype:?} {layout:?} {mode:?} {name} sq{sq}");
                        let (o, lse) = flash_attn_with_kvcache_rope_lse(&q, &cache, scale, &rope)?;
                        check_per_sequence(&what, &o, &lse, &lens, tol(dtype), |bi, len| {
                            let mut one = rope.clone();
                            one.position_offsets = Some(vec![offsets[bi]]);
                            rope_reference(
                                &q.i(bi)?.unsqueeze(0)?,
                                &kc.i(bi)?.narrow(0, 0, len)?.unsqueeze(0)?,
                                &vc.i(bi)?.narrow(0, 0, len)?.unsqueeze(0)?,
                                scale,
                                &one,
                            )
                        })?;
                    }
                }
            }
        }
    }
    Ok(())
}

#[test]
fn append_into_contiguous_and_paged_caches() -> Result<()> {
    let dev = gpu_or_skip!("append_into_contiguous_and_paged_caches");
    let cpu = Device::Cpu;
    for dtype in [DType::F16, DType::BF16] {
        let (hk, d, page, cap) = (2, 64, 16, 128);
        let lens = [0i32, 17, 126];
        let b = lens.len();
        let s = 5;
        let kc = Tensor::randn(0f32, 1.0, (b, cap, hk, d), &cpu)?.to_dtype(dtype)?;
        let vc = Tensor::randn(0f32, 1.0, (b, cap, hk, d), &cpu)?.to_dtype(dtype)?;
        let kn = Tensor::randn(0f32, 1.0, (b, s, hk, d), &cpu)?.to_dtype(dtype)?;
        let vn = Tensor::randn(0f32, 1.0, (b, s, hk, d), &cpu)?.to_dtype(dtype)?;
        let (knd, vnd) = (kn.to_device(&dev)?, vn.to_device(&dev)?);
        let seqlens = i32_tensor(&lens, &dev)?;
        let mut config = RopeConfig::llama(d);
        config.layout = RopeLayout::Interleaved;
        let mut rope = RopeOptions::new(config, PositionMode::Rope);
        rope.position_offsets = Some(vec![3, 0, 9]);
        for rotated in [false, true] {
            // What each sequence's rows must hold afterwards: the old rows, with slots
            // len..len + s (those within the capacity) replaced by the new ones, rotated to
            // their positions when asked.
            let new_rows = |bi: usize, x: &Tensor, keys: bool| -> Result<Tensor> {
                let rows = x.i(bi)?.unsqueeze(0)?.to_dtype(DType::F32)?;
                if !(rotated && keys) {
                    return Ok(rows);
                }
                let off = f64::from(rope.offset(bi));
                let pos: Vec<f64> = (0..s)
                    .map(|t| off + f64::from(lens[bi]) + t as f64)
                    .collect();
                rotate(&rows, &[pos], &config, cap + 9)
            };
            let expected = |cache: &Tensor, x: &Tensor, keys: bool| -> Result<Vec<Tensor>> {
                (0..b)
                    .map(|bi| {
                        let old = cache.i(bi)?.to_dtype(DType::F32)?;
                        let at = lens[bi] as usize;
                        let fits = s.min(cap - at);
                        let new = new_rows(bi, x, keys)?.squeeze(0)?.narrow(0, 0, fits)?;
                        let mut parts = vec![old.narrow(0, 0, at)?, new];
                        if at + fits < cap {
                            parts.push(old.narrow(0, at + fits, cap - at - fits)?);
                        }
                        Tensor::cat(&parts, 0)
                    })
                    .collect()
            };
            let (want_k, want_v) = (expected(&kc, &kn, true)?, expected(&vc, &vn, false)?);
            let tol_k = if rotated { tol(dtype) } else { 0.0 };
            // Contiguous.
            let (kcd, vcd) = (kc.to_device(&dev)?, vc.to_device(&dev)?);
            let cache = KvCache::contiguous(&kcd, &vcd, &seqlens);
            if rotated {
                append_kv_rope(&knd, &vnd, &cache, &rope)?;
            } else {
                append_kv(&knd, &vnd, &cache)?;
            }
            for bi in 0..b {
                let dk = max_diff(&kcd.i(bi)?, &want_k[bi])?;
                let dv = max_diff(&vcd.i(bi)?, &want_v[bi])?;
                assert!(
                    dk <= tol_k && dv == 0.0,
                    "contiguous rotated={rotated} {dtype:?} seq {bi}: k {dk}, v {dv}"
                );
            }
            // Paged: read each sequence's rows back through the table.
            let (kp, table) = to_pages(&kc, page, 1, 3)?;
            let (vp, _) = to_pages(&vc, page, 1, 3)?;
            let (kpd, vpd) = (kp.to_device(&dev)?, vp.to_device(&dev)?);
            let tabd = table_tensor(&table, &dev)?;
            let cache = KvCache::paged(&kpd, &vpd, &tabd, &seqlens);
            if rotated {
                append_kv_rope(&knd, &vnd, &cache, &rope)?;
            } else {
                append_kv(&knd, &vnd, &cache)?;
            }
            let (kpc, vpc) = (kpd.to_device(&cpu)?, vpd.to_device(&cpu)?);
            for (bi, row) in table.iter().enumerate() {
                let gather = |pool: &Tensor| -> Result<Tensor> {
                    let pages = row
                        .iter()
                        .map(|&p| pool.i(p as usize))
                        .collect::<Result<Vec<_>>>()?;
                    Tensor::cat(&pages, 0)
                };
                let dk = max_diff(&gather(&kpc)?, &want_k[bi])?;
                let dv = max_diff(&gather(&vpc)?, &want_v[bi])?;
                assert!(
                    dk <= tol_k && dv == 0.0,
                    "paged rotated={rotated} {dtype:?} seq {bi}: k {dk}, v {dv}"
                );
            }
        }
    }
    Ok(())
}

/// Decoding steps as an engine runs them: append each token's k and v at the cache's
/// length, then attend over the cache holding it; every step against the reference over the
/// keys so far.
#[test]
fn append_then_decode_steps() -> Result<()> {
    let dev = gpu_or_skip!("append_then_decode_steps");
    let cpu = Device::Cpu;
    let (hq, hk, d, cap, steps) = (6, 2, 64, 64, 20);
    let dtype = DType::BF16;
    let kd = Tensor::zeros((1, cap, hk, d), dtype, &dev)?;
    let vd = Tensor::zeros((1, cap, hk, d), dtype, &dev)?;
    let ks = Tensor::randn(0f32, 1.0, (1, steps, hk, d), &cpu)?.to_dtype(dtype)?;
    let vs = Tensor::randn(0f32, 1.0, (1, steps, hk, d), &cpu)?.to_dtype(dtype)?;
    for step in 0..steps {
        let before = i32_tensor(&[step as i32], &dev)?;
        let after = i32_tensor(&[step as i32 + 1], &dev)?;
        let k1 = ks.narrow(1, step, 1)?.to_device(&dev)?;
        let v1 = vs.narrow(1, step, 1)?.to_device(&dev)?;
        append_kv(&k1, &v1, &KvCache::contiguous(&kd, &vd, &before))?;
        let q = randn(&[1, 1, hq, d], dtype, &dev)?;
        let got = flash_attn_with_kvcache(&q, &KvCache::contiguous(&kd, &vd, &after), 0.125, true)?;
        let (want, _) = reference(
            &q,
            &ks.narrow(1, 0, step + 1)?,
            &vs.narrow(1, 0, step + 1)?,
            0.125,
            &MaskSpec::causal(),
        )?;
        let diff = max_diff(&got, &want)?;
        assert!(diff <= tol(dtype), "step {step}: max diff {diff}");
    }
    Ok(())
}

#[test]
fn kvcache_errors_on_the_device() -> Result<()> {
    let dev = gpu_or_skip!("kvcache_errors_on_the_device");
    let kv = Tensor::zeros((1, 32, 4, 64), DType::F16, &dev)?;
    let lens = i32_tensor(&[3], &dev)?;
    // k and v caches as views of one buffer, and new rows that are a view of the cache:
    // errors, not a hang on the buffer's lock.
    let (k, v) = (kv.narrow(2, 0, 2)?, kv.narrow(2, 2, 2)?);
    let kn = Tensor::zeros((1, 1, 2, 64), DType::F16, &dev)?;
    let e = append_kv(&kn, &kn, &KvCache::contiguous(&k, &v, &lens))
        .unwrap_err()
        .to_string();
    assert!(e.contains("share"), "{e}");
    let kc = Tensor::zeros((1, 32, 2, 64), DType::F16, &dev)?;
    let vc = Tensor::zeros((1, 32, 2, 64), DType::F16, &dev)?;
    let view = kc.narrow(1, 0, 1)?;
    let e = append_kv(&view, &kn, &KvCache::contiguous(&kc, &vc, &lens))
        .unwrap_err()
        .to_string();
    assert!(e.contains("k_new"), "{e}");
    // Lengths on the CPU with the cache on the GPU.
    let lens_cpu = Tensor::new(&[3i32], &Device::Cpu)?;
    let q = Tensor::zeros((1, 1, 4, 64), DType::F16, &dev)?;
    let e = flash_attn_with_kvcache(&q, &KvCache::contiguous(&kc, &vc, &lens_cpu), 0.125, true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("same device"), "{e}");
    // k and v caches that are distinct buffers work, and a length past the capacity is
    // clamped on the device, not read out of bounds.
    append_kv(
        &kn,
        &kn.clone().contiguous()?,
        &KvCache::contiguous(&kc, &vc, &lens),
    )?;
    let far = i32_tensor(&[1000], &dev)?;
    let o = flash_attn_with_kvcache(&q, &KvCache::contiguous(&kc, &vc, &far), 0.125, true)?;
    assert_eq!(o.dims(), [1, 1, 4, 64]);
    o.to_device(&Device::Cpu)?;
    Ok(())
}
