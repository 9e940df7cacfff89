//! The LLaMA forward of SmolLM2 on candle-core ops, from a GGUF file: quantized projections
//! (`QMatMul`), RMSNorm, SwiGLU, grouped-query attention through [`crate::attention`], tied
//! embeddings.
//!
//! GGUF LLaMA files store Q and K permuted for rotary pairs `(2f, 2f + 1)` (llama.cpp's
//! convention), so every rotation here uses [`RopeLayout::Interleaved`].

use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{bail, DType, Device, Module, Result, Tensor, D};
use longflash_candle::{RopeConfig, RopeLayout, RopeScaling};

use crate::attention::{Attention, KvCache};

/// The hyper-parameters read from the GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub eps: f64,
    pub rope_base: f64,
    pub rotary_dim: usize,
    pub context_length: usize,
    pub vocab: usize,
}

fn md<'a>(ct: &'a Content, key: &str) -> Result<&'a Value> {
    match ct.metadata.get(key) {
        Some(v) => Ok(v),
        None => bail!("the GGUF file has no `{key}`"),
    }
}

impl Config {
    /// Reads the `llama.*` keys (the architecture must be `llama`).
    pub fn from_gguf(ct: &Content) -> Result<Self> {
        let arch = md(ct, "general.architecture")?.to_string()?;
        if arch != "llama" {
            bail!("general.architecture is `{arch}`; this program runs LLaMA models");
        }
        let u =
            |k: &str| -> Result<usize> { Ok(md(ct, &format!("llama.{k}"))?.to_u32()? as usize) };
        let hidden = u("embedding_length")?;
        let heads = u("attention.head_count")?;
        let kv_heads = u("attention.head_count_kv").unwrap_or(heads);
        if heads == 0 || kv_heads == 0 || hidden % heads != 0 || heads % kv_heads != 0 {
            bail!("{heads} heads over {kv_heads} KV heads do not divide hidden size {hidden}");
        }
        let head_dim = hidden / heads;
        let vocab = match ct.metadata.get("llama.vocab_size") {
            Some(v) => v.to_u32()? as usize,
            None => md(ct, "tokenizer.ggml.tokens")?.to_vec()?.len(),
        };
        Ok(Config {
            layers: u("block_count")?,
            hidden,
            heads,
            kv_heads,
            head_dim,
            ffn: u("feed_forward_length")?,
            eps: f64::from(md(ct, "llama.attention.layer_norm_rms_epsilon")?.to_f32()?),
            rope_base: match ct.metadata.get("llama.rope.freq_base") {
                Some(v) => f64::from(v.to_f32()?),
                None => 10000.0,
            },
            rotary_dim: u("rope.dimension_count").unwrap_or(head_dim),
            context_length: u("context_length")?,
            vocab,
        })
    }

    /// The rotary embedding of this model with `scaling`, in the GGUF pair layout.
    pub fn rope(&self, scaling: RopeScaling) -> RopeConfig {
        RopeConfig {
            base: self.rope_base,
            rotary_dim: self.rotary_dim,
            layout: RopeLayout::Interleaved,
            scaling,
        }
    }
}

struct Layer {
    attn_norm: Tensor,
    wq: QMatMul,
    wk: QMatMul,
    wv: QMatMul,
    wo: QMatMul,
    ffn_norm: Tensor,
    gate: QMatMul,
    up: QMatMul,
    down: QMatMul,
}

/// SmolLM2 (any LLaMA GGUF of this layout) with its attention back end.
pub struct Model {
    pub config: Config,
    embed: QMatMul,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: QMatMul,
    attention: Attention,
    device: Device,
}

/// Which rows of logits a forward returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// `(1, vocab)`: the last position only.
    Last,
    /// `(tokens, vocab)`: every position.
    All,
}

/// Root-mean-square normalization over the last dimension, times `weight`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(weight)
}

impl Model {
    /// Builds the model from GGUF content whose tensors `reader` holds.
    pub fn from_content<R: std::io::Read + std::io::Seek>(
        ct: &Content,
        reader: &mut R,
        device: &Device,
        attention: Attention,
    ) -> Result<Self> {
        let config = Config::from_gguf(ct)?;
        let mut q = |name: &str| -> Result<QTensor> { ct.tensor(reader, name, device) };
        let embed = Arc::new(q("token_embd.weight")?);
        let lm_head = if ct.tensor_infos.contains_key("output.weight") {
            QMatMul::from_qtensor(q("output.weight")?)?
        } else {
            QMatMul::from_arc(embed.clone())?
        };
        let norm = q("output_norm.weight")?.dequantize(device)?;
        let mut layers = Vec::with_capacity(config.layers);
        for l in 0..config.layers {
            let mut m = |w: &str| -> Result<QMatMul> {
                QMatMul::from_qtensor(q(&format!("blk.{l}.{w}.weight"))?)
            };
            let (wq, wk, wv, wo) = (m("attn_q")?, m("attn_k")?, m("attn_v")?, m("attn_output")?);
            let (gate, up, down) = (m("ffn_gate")?, m("ffn_up")?, m("ffn_down")?);
            layers.push(Layer {
                attn_norm: q(&format!("blk.{l}.attn_norm.weight"))?.dequantize(device)?,
                wq,
                wk,
                wv,
                wo,
                ffn_norm: q(&format!("blk.{l}.ffn_norm.weight"))?.dequantize(device)?,
                gate,
                up,
                down,
            });
        }
        let embed = QMatMul::from_arc(embed)?;
        attention.check(&config)?;
        Ok(Model {
            config,
            embed,
            layers,
            norm,
            lm_head,
            attention,
            device: device.clone(),
        })
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The attention back end.
    pub fn attention(&self) -> &Attention {
        &self.attention
    }

    /// Replaces the attention back end (the weights stay); caches made before do not fit it.
    pub fn set_attention(&mut self, attention: Attention) -> Result<()> {
        attention.check(&self.config)?;
        self.attention = attention;
        Ok(())
    }

    /// A KV cache for up to `capacity` tokens.
    pub fn cache(&self, capacity: usize) -> Result<KvCache> {
        self.attention.cache(&self.config, &self.device, capacity)
    }

    /// Runs `tokens` (at the positions after what `cache` holds), appends their keys and values
    /// to `cache`, and returns f32 logits as `which` says.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache, which: Logits) -> Result<Tensor> {
        let t = tokens.len();
        if t == 0 {
            bail!("forward: no tokens");
        }
        if cache.len() + t > cache.capacity() {
            bail!(
                "forward: {} cached + {t} new tokens exceed the cache's {}",
                cache.len(),
                cache.capacity()
            );
        }
        let c = &self.config;
        let ids = Tensor::new(tokens, &self.device)?;
        let mut x = self
            .embed
            .embedding(&ids)?
            .to_dtype(DType::F32)?
            .unsqueeze(0)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let h = rms_norm(&x, &layer.attn_norm, c.eps)?;
            let q = layer.wq.forward(&h)?.reshape((1, t, c.heads, c.head_dim))?;
            let k = layer
                .wk
                .forward(&h)?
                .reshape((1, t, c.kv_heads, c.head_dim))?;
            let v = layer
                .wv
                .forward(&h)?
                .reshape((1, t, c.kv_heads, c.head_dim))?;
            let o = self.attention.forward(l, &q, &k, &v, cache)?;
            x = (x + layer.wo.forward(&o.reshape((1, t, c.hidden))?)?)?;
            let h = rms_norm(&x, &layer.ffn_norm, c.eps)?;
            let g = layer.gate.forward(&h)?.silu()?;
            let u = layer.up.forward(&h)?;
            x = (x + layer.down.forward(&(g * u)?)?)?;
        }
        cache.advance(t);
        let x = match which {
            Logits::Last => x.narrow(1, t - 1, 1)?,
            Logits::All => x,
        };
        let x = rms_norm(&x, &self.norm, c.eps)?;
        self.lm_head.forward(&x)?.squeeze(0)?.to_dtype(DType::F32)
    }

    /// Runs `tokens` in chunks of at most `chunk` tokens; calls `each(done, logits)` after every
    /// chunk with the chunk's logits (as `which` says).
    pub fn prefill(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        chunk: usize,
        which: Logits,
        mut each: impl FnMut(usize, &Tensor) -> Result<()>,
    ) -> Result<()> {
        let chunk = chunk.max(1);
        let mut done = 0;
        for part in tokens.chunks(chunk) {
            let logits = self.forward(part, cache, which)?;
            done += part.len();
            each(done, &logits)?;
        }
        Ok(())
    }
}
