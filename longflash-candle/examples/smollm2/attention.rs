//! Attention of one layer over the KV cache, on one of two back ends:
//!
//! - longflash: q and the keys stay un-rotated (the cache holds un-rotated keys), and the new
//!   tokens' k and v are written into the cache by `append_kv` at the cache's length. A prefill
//!   chunk is `flash_attn_rope` of its queries over the cache so far, causal and aligned
//!   bottom-right, so query `i` of a chunk of `t` after `L` cached tokens sits at position
//!   `L + i` and key `j` at `j`. A decoding step (at most [`DECODE_MAX_QUERIES`] new tokens) is
//!   `flash_attn_with_kvcache_rope` over the whole cache buffer with the cache length on the
//!   device: the decoding kernel (split over the keys, grouped heads in one tile) turns the
//!   cached keys by their relative position in shared memory, so nothing is rotated into a
//!   workspace per step. RoPE, ReRoPE and Leaky ReRoPE are the kernels'.
//! - candle: the in-engine peer. q and k are rotated with candle ops at their positions (the
//!   cache holds rotated keys, as engines keep them), then `softmax(q k^T * scale + causal) v` by
//!   matmul, the softmax in f32, grouped-query heads without copying keys. Plain RoPE with any
//!   frequency scaling; on any device.

use candle_core::{bail, DType, Device, Result, Tensor, D};
use longflash_candle::{PositionMode, RopeLayout, RopeOptions};

/// The most new tokens per call that go through the decoding kernel; longer calls (prefill
/// chunks) go through the RoPE forward.
pub const DECODE_MAX_QUERIES: usize = 16;

use crate::model::Config;

/// Where attention is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Longflash,
    Candle,
}

/// Keys and values of every layer, `(1, capacity, kv_heads, head_dim)` each, filled up to
/// `len`.
pub struct KvCache {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    len: usize,
    capacity: usize,
    /// The cache length before and after the tokens of the current forward, `(2,)` i32 on the
    /// device, for the longflash calls: made once per forward and shared by every layer.
    lengths: Option<(usize, usize, Tensor)>,
}

impl KvCache {
    /// Tokens held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no token is held.
    #[allow(dead_code)] // for the tests
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Tokens it can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets every token (the buffers stay).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Counts `t` more tokens as held (after every layer has written them).
    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
    }

    /// `[past, n]` as a `(2,)` i32 tensor on `device` (kept while the pair stays the same).
    fn lengths(&mut self, past: usize, n: usize, device: &Device) -> Result<Tensor> {
        if let Some((p, m, t)) = &self.lengths {
            if (*p, *m) == (past, n) {
                return Ok(t.clone());
            }
        }
        let (Ok(a), Ok(b)) = (i32::try_from(past), i32::try_from(n)) else {
            bail!("attention: {n} tokens do not fit the kernels' 32-bit cache lengths");
        };
        let t = Tensor::new(&[a, b], device)?;
        self.lengths = Some((past, n, t.clone()));
        Ok(t)
    }

    /// Layer `l`'s keys and values so far.
    #[allow(dead_code)] // for the tests
    pub fn layer(&self, l: usize) -> Result<(Tensor, Tensor)> {
        Ok((
            self.k[l].narrow(1, 0, self.len)?,
            self.v[l].narrow(1, 0, self.len)?,
        ))
    }
}

/// One attention configuration: back end, element type, positions.
pub struct Attention {
    backend: Backend,
    dtype: DType,
    rope: RopeOptions,
    inv_freq: Vec<f64>,
    attention_factor: f64,
    head_dim: usize,
    scale: f32,
    /// Query rows of each call checked against the f64 reference, and the layers checked.
    check_rows: usize,
    check_layers: Vec<usize>,
    /// Layers (first, last) with their own position options, disjoint.
    layer_rope: Vec<(usize, usize, RopeOptions)>,
}

impl Attention {
    /// Attention on `backend` with q, k, v and the cache in `dtype`, positions as `rope` says
    /// (its layout must be the model's), heads of `head_dim`.
    pub fn new(backend: Backend, dtype: DType, rope: RopeOptions, head_dim: usize) -> Result<Self> {
        rope.config
            .validate(head_dim)
            .and_then(|()| rope.mode.validate())
            .map_err(|e| candle_core::Error::msg(format!("position options: {e}")))?;
        match backend {
            Backend::Longflash => {
                if !matches!(dtype, DType::F16 | DType::BF16) {
                    bail!("longflash attention takes f16 or bf16, not {dtype:?}");
                }
            }
            Backend::Candle => {
                if rope.mode != PositionMode::Rope {
                    bail!(
                        "candle attention computes plain RoPE only, not {:?}",
                        rope.mode
                    );
                }
                if !matches!(dtype, DType::F16 | DType::BF16 | DType::F32) {
                    bail!("candle attention takes f16, bf16 or f32, not {dtype:?}");
                }
            }
        }
        // Dynamic scalings would change the table with the length; the ones offered are static.
        let inv_freq = rope
            .config
            .inv_freq(head_dim, 0)
            .map_err(|e| candle_core::Error::msg(format!("position options: {e}")))?;
        Ok(Attention {
            backend,
            dtype,
            attention_factor: rope.config.attention_factor(),
            rope,
            inv_freq,
            head_dim,
            scale: 1.0 / (head_dim as f32).sqrt(),
            check_rows: 0,
            check_layers: Vec::new(),
            layer_rope: Vec::new(),
        })
    }

    /// Layers `first` to `last` use `rope` instead of the options of [`Attention::new`]: another
    /// position mode or log-n length over the same rotary table (longflash only).
    pub fn with_layer_rope(mut self, first: usize, last: usize, rope: RopeOptions) -> Result<Self> {
        if self.backend != Backend::Longflash {
            bail!("per-layer position modes run on longflash only");
        }
        if rope.config != self.rope.config {
            bail!(
                "per-layer position options change the mode and log-n only, not the rotary table"
            );
        }
        rope.mode
            .validate()
            .map_err(|e| candle_core::Error::msg(format!("layers {first}-{last}: {e}")))?;
        if first > last {
            bail!("layers {first}-{last}: an empty range");
        }
        if let Some((a, b, _)) = self
            .layer_rope
            .iter()
            .find(|(a, b, _)| *a <= last && first <= *b)
        {
            bail!("layers {first}-{last} overlap layers {a}-{b}");
        }
        self.layer_rope.push((first, last, rope));
        Ok(self)
    }

    /// The position options of layer `l`.
    pub fn rope_at(&self, l: usize) -> &RopeOptions {
        self.layer_rope
            .iter()
            .find(|(a, b, _)| (*a..=*b).contains(&l))
            .map_or(&self.rope, |(_, _, r)| r)
    }

    /// Checks the last `rows` query rows of every longflash call in `layers` against
    /// longflash's f64 reference on the CPU, printing the largest error of each call.
    pub fn with_check(mut self, rows: usize, layers: Vec<usize>) -> Self {
        self.check_rows = rows;
        self.check_layers = layers;
        self
    }

    /// The position options.
    pub fn rope(&self) -> &RopeOptions {
        &self.rope
    }

    /// Checks that the model's heads are the ones this attention was made for.
    pub fn check(&self, c: &Config) -> Result<()> {
        if c.head_dim != self.head_dim {
            bail!(
                "attention made for head dim {}, the model has {}",
                self.head_dim,
                c.head_dim
            );
        }
        if self.backend == Backend::Longflash && !matches!(c.head_dim, 64 | 128 | 256) {
            bail!(
                "longflash's RoPE forward takes head dims 64, 128 and 256, not {}",
                c.head_dim
            );
        }
        Ok(())
    }

    /// An empty cache of `capacity` tokens for every layer of `c`.
    pub fn cache(&self, c: &Config, device: &Device, capacity: usize) -> Result<KvCache> {
        if self.backend == Backend::Longflash && !device.is_cuda() {
            bail!("longflash attention runs on CUDA devices only");
        }
        let shape = (1, capacity.max(1), c.kv_heads, c.head_dim);
        let mut k = Vec::with_capacity(c.layers);
        let mut v = Vec::with_capacity(c.layers);
        for _ in 0..c.layers {
            k.push(Tensor::zeros(shape, self.dtype, device)?);
            v.push(Tensor::zeros(shape, self.dtype, device)?);
        }
        Ok(KvCache {
            k,
            v,
            len: 0,
            capacity,
            lengths: None,
        })
    }

    /// Attention of layer `l`: q `(1, t, heads, head_dim)`, the new k and v `(1, t, kv_heads,
    /// head_dim)`, all f32 and un-rotated, at the positions after what `cache` holds. Writes k
    /// and v into the cache (without counting them: the model does once all layers ran) and
    /// returns f32 `(1, t, heads, head_dim)`.
    pub fn forward(
        &self,
        l: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let (b, t, heads, d) = q.dims4()?;
        let (kb, kt, kv_heads, kd) = k.dims4()?;
        if b != 1 || kb != 1 || kt != t || kd != d || d != self.head_dim || v.dims() != k.dims() {
            bail!(
                "attention: q {:?}, k {:?}, v {:?} are not (1, t, heads, {}) with matching k and v",
                q.dims(),
                k.dims(),
                v.dims(),
                self.head_dim
            );
        }
        if kv_heads == 0 || heads % kv_heads != 0 {
            bail!("attention: {heads} query heads over {kv_heads} KV heads");
        }
        if l >= cache.k.len() || cache.k[l].dim(2)? != kv_heads {
            bail!("attention: layer {l} or {kv_heads} KV heads not in the cache");
        }
        let past = cache.len;
        let n = past + t;
        if n > cache.capacity {
            bail!(
                "attention: {n} tokens exceed the cache's {}",
                cache.capacity
            );
        }
        match self.backend {
            Backend::Longflash => {
                use longflash_candle::KvCache as Cache;
                let q = q.to_dtype(self.dtype)?;
                let lengths = cache.lengths(past, n, q.device())?;
                let (before, after) = (lengths.narrow(0, 0, 1)?, lengths.narrow(0, 1, 1)?);
                let (kc, vc) = (&cache.k[l], &cache.v[l]);
                longflash_candle::append_kv(
                    &k.to_dtype(self.dtype)?,
                    &v.to_dtype(self.dtype)?,
                    &Cache::contiguous(kc, vc, &before),
                )?;
                let o = if t <= DECODE_MAX_QUERIES {
                    let cache = Cache::contiguous(kc, vc, &after);
                    longflash_candle::flash_attn_with_kvcache_rope(
                        &q,
                        &cache,
                        self.scale,
                        self.rope_at(l),
                    )?
                } else {
                    let keys = kc.narrow(1, 0, n)?;
                    let values = vc.narrow(1, 0, n)?;
                    longflash_candle::flash_attn_rope(
                        &q,
                        &keys,
                        &values,
                        self.scale,
                        self.rope_at(l),
                    )?
                };
                if self.check_rows > 0 && self.check_layers.contains(&l) {
                    self.check_call(l, &q, &kc.narrow(1, 0, n)?, &vc.narrow(1, 0, n)?, &o)?;
                }
                o.to_dtype(DType::F32)
            }
            Backend::Candle => {
                let (cos, sin) = self.table(past, t, q.device())?;
                let q = rotate(q, &cos, &sin)?.to_dtype(self.dtype)?;
                let k = rotate(k, &cos, &sin)?.to_dtype(self.dtype)?;
                cache.k[l].slice_set(&k, 1, past)?;
                cache.v[l].slice_set(&v.to_dtype(self.dtype)?, 1, past)?;
                let keys = cache.k[l].narrow(1, 0, n)?.transpose(1, 2)?.contiguous()?;
                let values = cache.v[l].narrow(1, 0, n)?.transpose(1, 2)?.contiguous()?;
                let group = heads / kv_heads;
                // Query head h reads KV head h / group: heads of a group are adjacent, so their
                // rows stack into one matrix per KV head.
                let qg = q
                    .transpose(1, 2)?
                    .contiguous()?
                    .reshape((1, kv_heads, group * t, d))?;
                let scores = (qg.matmul(&keys.t()?)?.to_dtype(DType::F32)? * self.scale as f64)?;
                let scores = if t > 1 {
                    let scores = scores.reshape((1, kv_heads, group, t, n))?;
                    let mask = causal_mask(past, t, n, q.device())?.broadcast_as(scores.shape())?;
                    let neg =
                        Tensor::new(f32::NEG_INFINITY, q.device())?.broadcast_as(scores.shape())?;
                    mask.where_cond(&neg, &scores)?
                        .reshape((1, kv_heads, group * t, n))?
                } else {
                    scores
                };
                let max = scores.max_keepdim(D::Minus1)?;
                let e = scores.broadcast_sub(&max)?.exp()?;
                let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
                p.to_dtype(self.dtype)?
                    .matmul(&values)?
                    .reshape((1, heads, t, d))?
                    .transpose(1, 2)?
                    .to_dtype(DType::F32)?
                    .contiguous()
            }
        }
    }

    /// The last `check_rows` rows of `o`, longflash's attention of `q` `(1, t, heads, d)` over
    /// `keys` and `values` `(1, n, kv_heads, d)` (un-rotated keys, queries aligned bottom-right),
    /// against `reference::rope_attention_f64` of the same rounded inputs; prints the largest
    /// error, the largest reference value and where the error is.
    fn check_call(
        &self,
        l: usize,
        q: &Tensor,
        keys: &Tensor,
        values: &Tensor,
        o: &Tensor,
    ) -> Result<()> {
        use longflash::reference::{rope_attention_f64, RefShape};
        let (_, t, heads, d) = q.dims4()?;
        let (_, n, kv_heads, _) = keys.dims4()?;
        let rows = self.check_rows.min(t);
        let host = |x: &Tensor| -> Result<Vec<f64>> {
            Ok(x.to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?
                .into_iter()
                .map(f64::from)
                .collect())
        };
        let shape = RefShape {
            batch: 1,
            seqlen_q: rows,
            seqlen_k: n,
            heads_q: heads,
            heads_kv: kv_heads,
            head_dim: d,
        };
        let want = rope_attention_f64(
            &shape,
            &host(&q.narrow(1, t - rows, rows)?)?,
            &host(keys)?,
            &host(values)?,
            self.rope_at(l),
            f64::from(self.scale),
        )
        .map_err(|e| candle_core::Error::msg(format!("attention check: {e}")))?;
        let got = host(&o.narrow(1, t - rows, rows)?)?;
        let (mut worst, mut at, mut big) = (0f64, 0usize, 0f64);
        for (i, (g, w)) in got.iter().zip(&want.out).enumerate() {
            big = big.max(w.abs());
            let e = if g.is_finite() {
                (g - w).abs()
            } else {
                f64::INFINITY
            };
            if e > worst {
                (worst, at) = (e, i);
            }
        }
        let (row, head) = (at / (heads * d), at / d % heads);
        println!(
            "check-attn layer {l:>2}: {t} queries over {n} keys, last {rows} rows: max |longflash - f64| = {worst:.3e} \
             (row {}, head {head}; largest |out| {big:.3})",
            t - rows + row
        );
        Ok(())
    }

    /// `cos` and `sin` of positions `start..start + t`, `(1, t, 1, rotary_dim / 2, 1)` f32,
    /// angles in f64, times the scaling's attention factor.
    fn table(&self, start: usize, t: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(t * half);
        let mut sin = Vec::with_capacity(t * half);
        for p in start..start + t {
            for &w in &self.inv_freq {
                let (s, c) = (p as f64 * w).sin_cos();
                cos.push((c * self.attention_factor) as f32);
                sin.push((s * self.attention_factor) as f32);
            }
        }
        let shape = (1, t, 1, half, 1);
        let layout = self.rope.config.layout;
        if layout != RopeLayout::Interleaved {
            bail!("the candle path rotates interleaved pairs (the GGUF layout) only");
        }
        Ok((
            Tensor::from_vec(cos, shape, device)?,
            Tensor::from_vec(sin, shape, device)?,
        ))
    }
}

/// `(t, n)` u8, 1 where key `j` is after query `i`'s position `past + i`.
pub fn causal_mask(past: usize, t: usize, n: usize, device: &Device) -> Result<Tensor> {
    let j = Tensor::arange(0u32, n as u32, device)?.reshape((1, n))?;
    let i = Tensor::arange(past as u32, (past + t) as u32, device)?.reshape((t, 1))?;
    j.broadcast_gt(&i)
}

/// Rotates the interleaved pairs `(2f, 2f + 1)` of the first `2 * half` elements of each head
/// vector of `x` `(1, t, heads, head_dim)` by the angles whose `cos` and `sin` are given,
/// `(1, t, 1, half, 1)`; the rest of each vector is kept.
pub fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, t, h, d) = x.dims4()?;
    let half = cos.dim(3)?;
    let rot = x.narrow(3, 0, 2 * half)?.reshape((b, t, h, half, 2))?;
    let x0 = rot.narrow(4, 0, 1)?;
    let x1 = rot.narrow(4, 1, 1)?;
    let r0 = (x0.broadcast_mul(cos)? - x1.broadcast_mul(sin)?)?;
    let r1 = (x0.broadcast_mul(sin)? + x1.broadcast_mul(cos)?)?;
    let rotated = Tensor::cat(&[r0, r1], 4)?.reshape((b, t, h, 2 * half))?;
    if 2 * half == d {
        Ok(rotated)
    } else {
        Tensor::cat(&[rotated, x.narrow(3, 2 * half, d - 2 * half)?], 3)
    }
}
