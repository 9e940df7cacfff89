//! Rotary position embeddings (RoPE), their frequency scalings, and the position modes of
//! ReRoPE (DESIGN.md section 3).
//!
//! # Rotation
//!
//! A head vector `x` of `head_dim` elements has its first `rotary_dim` elements rotated; the
//! rest (partial rotary, `rotary_dim < head_dim`) is left as it is. The rotated part holds
//! `rotary_dim / 2` pairs, one per frequency index `f in 0..rotary_dim / 2`; pair `f` is turned by
//! the angle `position * inv_freq[f]`:
//!
//! ```text
//! x' = x cos - y sin
//! y' = x sin + y cos
//! ```
//!
//! Which elements form pair `f` is the [`RopeLayout`]: `(f, f + rotary_dim / 2)` for
//! [`RopeLayout::HalfSplit`] (LLaMA, GPT-NeoX; Hugging Face's `rotate_half`) and `(2f, 2f + 1)` for
//! [`RopeLayout::Interleaved`] (GPT-J).
//!
//! # Frequencies
//!
//! `inv_freq[f] = base^(-2f / rotary_dim)` before scaling ([`RopeConfig::inv_freq`]); every
//! [`RopeScaling`] is expressed as a change of this table (plus YaRN's attention factor), following
//! the functions of Hugging Face transformers' `modeling_rope_utils.py`. Tables are computed in
//! f64 (transformers computes them in f32).
//!
//! # Positions
//!
//! With `off_b` the position offset of batch entry `b` ([`RopeOptions::position_offsets`], 0 by
//! default), key `j` sits at position `p_j = off_b + j` and query `i` at position
//! `p_i = off_b + (seqlen_k - seqlen_q) + i`: the same bottom-right alignment as the causal mask
//! ([`crate::mask::MaskSpec`]), so the last query and the last key share a position. Under the
//! causal mask a visible pair has `p_i - p_j >= 0`.
//!
//! # Position modes
//!
//! With `rel = p_i - p_j`, window `w` and leak `k > 1` ([`PositionMode`]), the score of a pair
//! (before the softmax scale) is
//!
//! - RoPE: `(R_{p_i} q_i) . (R_{p_j} k_j)`, a function of `rel` only.
//! - ReRoPE: as RoPE when `rel < w`, else `(R_w q_i) . k_j` (the key is not rotated), i.e. the
//!   relative position is `min(rel, w)`.
//! - Leaky ReRoPE: as RoPE when `rel < w`, else `(R_{p_i / k + w - w / k} q_i) . (R_{p_j / k} k_j)`,
//!   i.e. the relative position is `w + (rel - w) / k`.
//!
//! Log-n scaling ([`RopeOptions::log_n_train_len`]) multiplies `q_i` by its factor before the
//! rotation, in every branch. YaRN's attention factor scales the rotated part of q and k in
//! every branch, ReRoPE's unrotated key included, so all branches agree with plain RoPE inside
//! the window.
//!
//! This is Jianlin Su's two-matrix formulation (bojone/rerope): one score matrix from the inside
//! rotation, one from the outside rotation, selected per element by `rel < w`.
//! [`crate::reference::rope_attention_f64`] computes exactly that.

use crate::error::{Error, Result};

/// Which elements of a head vector a frequency rotates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum RopeLayout {
    /// Pair `f` is `(f, f + rotary_dim / 2)`: LLaMA and GPT-NeoX, Hugging Face's `rotate_half`
    /// (`x * cos + rotate_half(x) * sin` with `cos`, `sin` repeated over both halves).
    #[default]
    HalfSplit,
    /// Pair `f` is `(2f, 2f + 1)`: GPT-J (`rotate_every_two`), and complex-number formulations
    /// that view consecutive elements as one complex value.
    Interleaved,
}

/// How the inverse-frequency table (and the attention factor) are rescaled for context
/// extension. Each variant matches the Hugging Face transformers function named in its
/// documentation (`modeling_rope_utils.py`), computed in f64.
///
/// Below, `d = rotary_dim`, `base` is [`RopeConfig::base`] and `inv_freq_default[f] =
/// 1 / base^(2f / d)` for `f in 0..d/2`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum RopeScaling {
    /// No scaling: `inv_freq_default` (`_compute_default_rope_parameters`).
    #[default]
    None,
    /// Position interpolation: positions divided by `factor`, expressed as `inv_freq_default /
    /// factor` (`_compute_linear_scaling_rope_parameters`).
    Linear {
        /// Scaling factor, finite and `>= 1`.
        factor: f64,
    },
    /// NTK-aware scaling: the base becomes `base * factor^(d / (d - 2))`, the rule of the
    /// original NTK-aware scaled RoPE post (bloc97), static over all sequence lengths. It is the
    /// base that `_compute_dynamic_ntk_parameters` produces when its bracket `factor * seq_len /
    /// original_max_position - (factor - 1)` equals `factor`.
    NtkAware {
        /// Scaling factor, finite and `>= 1`.
        factor: f64,
    },
    /// Dynamic NTK scaling (`_compute_dynamic_ntk_parameters`): for a current sequence length
    /// `seq_len > original_max_position`, the base becomes
    /// `base * ((factor * seq_len / original_max_position) - (factor - 1))^(d / (d - 2))`;
    /// otherwise the table is `inv_freq_default`.
    DynamicNtk {
        /// Scaling factor, finite and `>= 1`.
        factor: f64,
        /// Context length the model was trained with (`max_position_embeddings` in
        /// transformers), `>= 1`.
        original_max_position: usize,
    },
    /// YaRN (`_compute_yarn_parameters`, Peng et al. 2023).
    ///
    /// With `find_correction_dim(r) = d * ln(original_max_position / (2 pi r)) / (2 ln base)`,
    /// `low = max(floor(find_correction_dim(beta_fast)), 0)` and `high =
    /// min(ceil(find_correction_dim(beta_slow)), d - 1)` (`find_correction_range`; `high` gets
    /// `+ 0.001` when equal to `low`), the linear ramp is `ramp[f] = clamp((f - low) / (high -
    /// low), 0, 1)` and `inv_freq_extrapolation_factor = 1 - ramp`. Then
    /// `inv_freq = inv_freq_interpolation * (1 - inv_freq_extrapolation_factor) +
    /// inv_freq_extrapolation * inv_freq_extrapolation_factor`, with `inv_freq_extrapolation =
    /// inv_freq_default` and `inv_freq_interpolation = inv_freq_default / factor`.
    ///
    /// The attention factor ([`RopeConfig::attention_factor`]) is `attention_factor`, or by
    /// default `0.1 * ln(factor) + 1` (`get_mscale`). Transformers' `truncate = false` and
    /// `mscale`/`mscale_all_dim` options are not modelled.
    Yarn {
        /// Scaling factor, finite and `>= 1`.
        factor: f64,
        /// Pre-training context length (`original_max_position_embeddings`), `>= 1`.
        original_max_position: usize,
        /// Rotations above which a frequency is left alone (transformers' default 32).
        beta_fast: f64,
        /// Rotations below which a frequency is fully interpolated (transformers' default 1).
        beta_slow: f64,
        /// Multiplier of `cos` and `sin` (so of the rotated q and k); `None` for `0.1 *
        /// ln(factor) + 1`. Finite and `> 0` when given.
        attention_factor: Option<f64>,
    },
    /// LLaMA 3.1 scaling (`_compute_llama3_parameters`). With `wavelen = 2 pi / inv_freq_default`,
    /// `low_freq_wavelen = original_max_position / low_freq_factor` and `high_freq_wavelen =
    /// original_max_position / high_freq_factor`: frequencies with `wavelen > low_freq_wavelen`
    /// are divided by `factor`; those with `wavelen < high_freq_wavelen` are kept; in between,
    /// `smooth = (original_max_position / wavelen - low_freq_factor) / (high_freq_factor -
    /// low_freq_factor)` and `inv_freq = (1 - smooth) * inv_freq_default / factor + smooth *
    /// inv_freq_default`.
    Llama3 {
        /// Scaling factor (8 for LLaMA 3.1), finite and `>= 1`.
        factor: f64,
        /// Low-frequency factor (1 for LLaMA 3.1), finite, `> 0` and `< high_freq_factor`.
        low_freq_factor: f64,
        /// High-frequency factor (4 for LLaMA 3.1), finite.
        high_freq_factor: f64,
        /// Pre-training context length (8192 for LLaMA 3.1), `>= 1`.
        original_max_position: usize,
    },
}

/// A rotary embedding: base, how many elements rotate, their pairing, and the frequency
/// scaling.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeConfig {
    /// Frequency base (`rope_theta`), finite and `> 1`; 10000 in LLaMA 1/2.
    pub base: f64,
    /// Leading elements of each head vector that rotate: even, `>= 2`, `<= head_dim`.
    pub rotary_dim: usize,
    /// Which elements pair up.
    pub layout: RopeLayout,
    /// Frequency scaling.
    pub scaling: RopeScaling,
}

fn invalid(arg: &'static str, value: impl ToString, expected: &str) -> Error {
    Error::InvalidArgument {
        arg,
        value: value.to_string(),
        expected: expected.into(),
    }
}

fn check_factor(factor: f64) -> Result<()> {
    if factor.is_finite() && factor >= 1.0 {
        Ok(())
    } else {
        Err(invalid(
            "rope.scaling.factor",
            factor,
            "a finite scaling factor >= 1",
        ))
    }
}

fn check_original_max_position(n: usize) -> Result<()> {
    if n >= 1 {
        Ok(())
    } else {
        Err(invalid(
            "rope.scaling.original_max_position",
            n,
            "a context length of at least 1",
        ))
    }
}

impl RopeConfig {
    /// LLaMA's rotary embedding: base 10000, the whole head rotates, [`RopeLayout::HalfSplit`],
    /// no scaling.
    pub fn llama(head_dim: usize) -> Self {
        RopeConfig {
            base: 10000.0,
            rotary_dim: head_dim,
            layout: RopeLayout::HalfSplit,
            scaling: RopeScaling::None,
        }
    }

    /// Checks the configuration for heads of `head_dim` elements.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] naming the offending field: `rope.rotary_dim` (odd, below 2 or
    /// above `head_dim`), `rope.base` (not finite or `<= 1`), `rope.scaling.factor` (not finite
    /// or `< 1`), `rope.scaling.original_max_position` (0), `rope.scaling.beta_fast` /
    /// `rope.scaling.beta_slow` (not finite, or not `beta_fast > beta_slow > 0`),
    /// `rope.scaling.attention_factor` (given but not finite and `> 0`),
    /// `rope.scaling.low_freq_factor` / `rope.scaling.high_freq_factor` (not finite, or not
    /// `0 < low_freq_factor < high_freq_factor`).
    pub fn validate(&self, head_dim: usize) -> Result<()> {
        let d = self.rotary_dim;
        if d < 2 || d % 2 != 0 || d > head_dim {
            return Err(invalid(
                "rope.rotary_dim",
                d,
                &format!("an even number of rotated elements, at least 2 and at most head_dim = {head_dim}"),
            ));
        }
        if !(self.base.is_finite() && self.base > 1.0) {
            return Err(invalid("rope.base", self.base, "a finite base > 1"));
        }
        match self.scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } | RopeScaling::NtkAware { factor } => {
                check_factor(factor)?;
            }
            RopeScaling::DynamicNtk {
                factor,
                original_max_position,
            } => {
                check_factor(factor)?;
                check_original_max_position(original_max_position)?;
            }
            RopeScaling::Yarn {
                factor,
                original_max_position,
                beta_fast,
                beta_slow,
                attention_factor,
            } => {
                check_factor(factor)?;
                check_original_max_position(original_max_position)?;
                if !(beta_slow.is_finite() && beta_slow > 0.0) {
                    return Err(invalid(
                        "rope.scaling.beta_slow",
                        beta_slow,
                        "a finite number of rotations > 0",
                    ));
                }
                if !(beta_fast.is_finite() && beta_fast > beta_slow) {
                    return Err(invalid(
                        "rope.scaling.beta_fast",
                        beta_fast,
                        &format!("a finite number of rotations > beta_slow = {beta_slow}"),
                    ));
                }
                if let Some(a) = attention_factor {
                    if !(a.is_finite() && a > 0.0) {
                        return Err(invalid(
                            "rope.scaling.attention_factor",
                            format!("Some({a})"),
                            "None or a finite factor > 0",
                        ));
                    }
                }
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position,
            } => {
                check_factor(factor)?;
                check_original_max_position(original_max_position)?;
                if !(low_freq_factor.is_finite() && low_freq_factor > 0.0) {
                    return Err(invalid(
                        "rope.scaling.low_freq_factor",
                        low_freq_factor,
                        "a finite factor > 0",
                    ));
                }
                if !(high_freq_factor.is_finite() && high_freq_factor > low_freq_factor) {
                    return Err(invalid(
                        "rope.scaling.high_freq_factor",
                        high_freq_factor,
                        &format!("a finite factor > low_freq_factor = {low_freq_factor}"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The inverse-frequency table, `rotary_dim / 2` entries, computed in f64 from the formulas
    /// of [`RopeScaling`]. `seq_len` (the current sequence length: largest position + 1) matters
    /// only for [`RopeScaling::DynamicNtk`].
    ///
    /// # Errors
    ///
    /// As [`RopeConfig::validate`].
    pub fn inv_freq(&self, head_dim: usize, seq_len: usize) -> Result<Vec<f64>> {
        self.validate(head_dim)?;
        let d = self.rotary_dim;
        let dim = d as f64;
        // `1 / base^(2f / d)`, as transformers writes it.
        let table = |base: f64| -> Vec<f64> {
            (0..d / 2)
                .map(|f| 1.0 / base.powf((2 * f) as f64 / dim))
                .collect()
        };
        let default = table(self.base);
        Ok(match self.scaling {
            RopeScaling::None => default,
            RopeScaling::Linear { factor } => default.iter().map(|x| x / factor).collect(),
            RopeScaling::NtkAware { factor } => table(self.base * factor.powf(dim / (dim - 2.0))),
            RopeScaling::DynamicNtk {
                factor,
                original_max_position,
            } => {
                if seq_len > original_max_position {
                    let ratio = factor * seq_len as f64 / original_max_position as f64;
                    table(self.base * (ratio - (factor - 1.0)).powf(dim / (dim - 2.0)))
                } else {
                    default
                }
            }
            RopeScaling::Yarn {
                factor,
                original_max_position,
                beta_fast,
                beta_slow,
                ..
            } => {
                let correction_dim = |rotations: f64| -> f64 {
                    dim * (original_max_position as f64 / (rotations * 2.0 * std::f64::consts::PI))
                        .ln()
                        / (2.0 * self.base.ln())
                };
                let low = correction_dim(beta_fast).floor().max(0.0);
                let mut high = correction_dim(beta_slow).ceil().min(dim - 1.0);
                if low == high {
                    high += 0.001;
                }
                default
                    .iter()
                    .enumerate()
                    .map(|(f, &extrapolation)| {
                        let ramp = ((f as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        let extrapolation_factor = 1.0 - ramp;
                        let interpolation = extrapolation / factor;
                        interpolation * (1.0 - extrapolation_factor)
                            + extrapolation * extrapolation_factor
                    })
                    .collect()
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position,
            } => {
                let old_context_len = original_max_position as f64;
                let low_freq_wavelen = old_context_len / low_freq_factor;
                let high_freq_wavelen = old_context_len / high_freq_factor;
                default
                    .iter()
                    .map(|&inv| {
                        let wavelen = 2.0 * std::f64::consts::PI / inv;
                        if wavelen > low_freq_wavelen {
                            inv / factor
                        } else if wavelen < high_freq_wavelen {
                            inv
                        } else {
                            let smooth = (old_context_len / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * inv / factor + smooth * inv
                        }
                    })
                    .collect()
            }
        })
    }

    /// The factor transformers multiplies `cos` and `sin` by (so the rotated parts of q and k,
    /// and the scores by its square): YaRN's `attention_factor`, by default `0.1 * ln(factor) +
    /// 1` (`get_mscale`); 1 for every other scaling.
    pub fn attention_factor(&self) -> f64 {
        match self.scaling {
            RopeScaling::Yarn {
                factor,
                attention_factor,
                ..
            } => attention_factor.unwrap_or_else(|| {
                if factor <= 1.0 {
                    1.0
                } else {
                    0.1 * factor.ln() + 1.0
                }
            }),
            _ => 1.0,
        }
    }
}

/// How relative positions enter the scores (DESIGN.md section 3; see the module
/// documentation for the formulas).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum PositionMode {
    /// Plain RoPE.
    #[default]
    Rope,
    /// ReRoPE: relative positions at or beyond `window` are clamped to `window`.
    ReRope {
        /// Window `w >= 1`: pairs with `p_i - p_j < w` use plain RoPE.
        window: u32,
    },
    /// Leaky ReRoPE: relative positions beyond `window` grow `leak` times slower.
    LeakyReRope {
        /// Window `w >= 1`: pairs with `p_i - p_j < w` use plain RoPE.
        window: u32,
        /// Leak `k`, finite and `> 1`: outside the window the relative position is
        /// `w + (p_i - p_j - w) / k`.
        leak: f64,
    },
}

impl PositionMode {
    /// The window, 0 for [`PositionMode::Rope`].
    pub fn window(&self) -> u32 {
        match *self {
            PositionMode::Rope => 0,
            PositionMode::ReRope { window } | PositionMode::LeakyReRope { window, .. } => window,
        }
    }

    /// Checks the window and leak.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for `rope.window` (0) or `rope.leak` (not finite or `<= 1`).
    pub fn validate(&self) -> Result<()> {
        match *self {
            PositionMode::Rope => Ok(()),
            PositionMode::ReRope { window } | PositionMode::LeakyReRope { window, .. }
                if window == 0 =>
            {
                Err(invalid("rope.window", window, "a window of at least 1"))
            }
            PositionMode::LeakyReRope { leak, .. } if !(leak.is_finite() && leak > 1.0) => {
                Err(invalid("rope.leak", leak, "a finite leak > 1"))
            }
            _ => Ok(()),
        }
    }
}

/// Everything that decides the rotary part of a ReRoPE-style attention call.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeOptions {
    /// The rotary embedding.
    pub config: RopeConfig,
    /// Plain RoPE, ReRoPE or Leaky ReRoPE.
    pub mode: PositionMode,
    /// Log-n query scaling: query `i` at position `p_i` is multiplied by `max(1, ln(p_i + 1) /
    /// ln(L))` (before rotation) with `L` this training length, `>= 2`. `None` turns it off.
    pub log_n_train_len: Option<usize>,
    /// Position of key 0 of each batch entry (chunked prefill), one per batch entry; `None` for
    /// all 0.
    pub position_offsets: Option<Vec<u32>>,
    /// A sliding window on top of the causal mask: keys more than this many tokens left of the
    /// (bottom-right aligned) diagonal are masked, whatever the position mode. `None`: causal
    /// only.
    pub window_left: Option<u32>,
}

impl RopeOptions {
    /// Options with the given rotary embedding and position mode, no log-n scaling and no
    /// position offsets.
    pub fn new(config: RopeConfig, mode: PositionMode) -> Self {
        RopeOptions {
            config,
            mode,
            log_n_train_len: None,
            position_offsets: None,
            window_left: None,
        }
    }

    /// The position offset of batch entry `b` (0 when no offsets are given).
    pub fn offset(&self, b: usize) -> u32 {
        self.position_offsets
            .as_ref()
            .and_then(|o| o.get(b).copied())
            .unwrap_or(0)
    }

    /// The largest position offset (0 when none are given).
    pub fn max_offset(&self) -> u32 {
        self.position_offsets
            .as_ref()
            .and_then(|o| o.iter().copied().max())
            .unwrap_or(0)
    }

    /// Position of key `j` of batch entry `b`: `off_b + j`.
    pub fn key_position(&self, b: usize, j: usize) -> i64 {
        i64::from(self.offset(b)) + j as i64
    }

    /// Position of query `i` of batch entry `b`: `off_b + (seqlen_k - seqlen_q) + i`
    /// (bottom-right aligned, as the causal mask). Negative only for queries that see no key
    /// under the causal mask.
    pub fn query_position(&self, b: usize, i: usize, seqlen_q: usize, seqlen_k: usize) -> i64 {
        i64::from(self.offset(b)) + seqlen_k as i64 - seqlen_q as i64 + i as i64
    }

    /// The log-n multiplier of a query at `position`: `max(1, ln(position + 1) / ln(L))`, and 1
    /// when log-n scaling is off or `position <= 0`.
    pub fn log_n_scale(&self, position: i64) -> f64 {
        match self.log_n_train_len {
            Some(l) if position > 0 => ((position as f64 + 1.0).ln() / (l as f64).ln()).max(1.0),
            _ => 1.0,
        }
    }

    /// Checks the options for a problem of `batch` entries, `seqlen_q` queries, `seqlen_k` keys
    /// and heads of `head_dim` elements.
    ///
    /// # Errors
    ///
    /// As [`RopeConfig::validate`] and [`PositionMode::validate`]; [`Error::InvalidArgument`]
    /// for `rope.log_n_train_len` (below 2); [`Error::ShapeMismatch`] for
    /// `rope.position_offsets` when it does not hold one offset per batch entry;
    /// [`Error::InvalidArgument`] for `rope.position_offsets` when some position, or the largest
    /// position plus the window, does not fit in an i32.
    pub fn validate(
        &self,
        head_dim: usize,
        batch: usize,
        seqlen_q: usize,
        seqlen_k: usize,
    ) -> Result<()> {
        self.config.validate(head_dim)?;
        self.mode.validate()?;
        if let Some(l) = self.log_n_train_len {
            if l < 2 {
                return Err(invalid(
                    "rope.log_n_train_len",
                    format!("Some({l})"),
                    "None or a training length of at least 2",
                ));
            }
        }
        let (min_off, max_off) = match &self.position_offsets {
            None => (0u32, 0u32),
            Some(o) => {
                if o.len() != batch {
                    return Err(Error::ShapeMismatch {
                        arg: "rope.position_offsets",
                        value: o.len(),
                        other: "batch",
                        expected: batch,
                    });
                }
                (
                    o.iter().copied().min().unwrap_or(0),
                    o.iter().copied().max().unwrap_or(0),
                )
            }
        };
        let (sq, sk) = (seqlen_q as i128, seqlen_k as i128);
        let window = i128::from(self.mode.window());
        // Largest position (key or query) plus the window, and the smallest query position.
        let highest = i128::from(max_off) + sk - 1 + window;
        let lowest = i128::from(min_off) + sk - sq;
        let fits = |x: i128| x >= i128::from(i32::MIN) && x <= i128::from(i32::MAX);
        if !fits(highest) || !fits(lowest) {
            return Err(invalid(
                "rope.position_offsets",
                format!(
                    "offsets {min_off}..={max_off} with seqlen_q = {seqlen_q}, seqlen_k = {seqlen_k}, window = {window}"
                ),
                "positions (offset + seqlen_k - 1 + window at most, offset + seqlen_k - seqlen_q at least) that fit in i32",
            ));
        }
        Ok(())
    }
}

/// Rotates one head vector in place.
///
/// The first `rotary_dim = 2 * inv_freq.len()` elements of `x` are turned pair by pair (pairs
/// as `layout` says) by the angles `position * inv_freq[f]` (computed in f64): `x' = x cos - y
/// sin`, `y' = x sin + y cos`. The rotated part is then multiplied by `attention_factor` (as
/// transformers multiplies `cos` and `sin` by it: only the rotated part scales); elements from
/// `rotary_dim` on are untouched.
///
/// # Panics
///
/// When `x` holds fewer than `2 * inv_freq.len()` elements.
pub fn rotate(
    x: &mut [f64],
    position: f64,
    inv_freq: &[f64],
    layout: RopeLayout,
    attention_factor: f64,
) {
    let half = inv_freq.len();
    assert!(
        x.len() >= 2 * half,
        "rotate: head vector of {} elements, rotary_dim = {}",
        x.len(),
        2 * half
    );
    for (f, &w) in inv_freq.iter().enumerate() {
        let (a, b) = match layout {
            RopeLayout::HalfSplit => (f, f + half),
            RopeLayout::Interleaved => (2 * f, 2 * f + 1),
        };
        let (sin, cos) = (position * w).sin_cos();
        let (xa, xb) = (x[a], x[b]);
        x[a] = (xa * cos - xb * sin) * attention_factor;
        x[b] = (xa * sin + xb * cos) * attention_factor;
    }
}

impl RopeOptions {
    /// The element mask these options attend with: causal, plus the sliding window if set.
    pub fn mask(&self) -> crate::mask::MaskSpec {
        match self.window_left {
            Some(w) => crate::mask::MaskSpec::causal_window(w),
            None => crate::mask::MaskSpec::causal(),
        }
    }
}
