//! Attention masks: causal, sliding window, and their token-level semantics.

use crate::error::{Error, Result};
use crate::sys::LfMask;

/// Which keys each query may attend.
///
/// Query row `i` (of `seqlen_q`) may attend key `j` (of `seqlen_k`) when
/// `i + off - left <= j <= i + off + right`, with `off = seqlen_k - seqlen_q`: the diagonal is
/// aligned **bottom-right**, so the last query sees the last key, as in FlashAttention >= 2.1.
/// When `seqlen_q > seqlen_k` and the mask is causal, the first `seqlen_q - seqlen_k` queries
/// see no key: their output is zero and their log-sum-exp is `-inf`.
///
/// `causal` is the window `right = 0`. A side that is `None` is unbounded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MaskSpec {
    /// Causal: no query attends a key to its right of the (bottom-right aligned) diagonal.
    pub causal: bool,
    /// Keys at most this far left of the diagonal are visible; `None` = unbounded.
    pub window_left: Option<u32>,
    /// Keys at most this far right of the diagonal are visible; `None` = unbounded.
    /// Must be `None` or `Some(0)` when `causal` is set.
    pub window_right: Option<u32>,
    /// The first `sink_tokens` keys stay visible however far left of the window they are
    /// (StreamingLLM's attention sinks; Xiao et al. 2023), still subject to `causal` and the
    /// right window. Only block-sparse masks take sinks (see `sparse::patterns::sinks_window`):
    /// the dense forward needs 0.
    pub sink_tokens: u32,
}

impl MaskSpec {
    /// Every query sees every key.
    pub const fn none() -> Self {
        MaskSpec {
            causal: false,
            window_left: None,
            window_right: None,
            sink_tokens: 0,
        }
    }

    /// Causal attention (bottom-right aligned diagonal).
    pub const fn causal() -> Self {
        MaskSpec {
            causal: true,
            window_left: None,
            window_right: None,
            sink_tokens: 0,
        }
    }

    /// A sliding window of `left` keys left of the diagonal and `right` keys right of it
    /// (`None` = unbounded on that side), as FlashAttention's `window_size`.
    pub const fn sliding_window(left: Option<u32>, right: Option<u32>) -> Self {
        MaskSpec {
            causal: false,
            window_left: left,
            window_right: right,
            sink_tokens: 0,
        }
    }

    /// Causal attention that also drops keys more than `left` tokens back (Mistral-style).
    pub const fn causal_window(left: u32) -> Self {
        MaskSpec {
            causal: true,
            window_left: Some(left),
            window_right: None,
            sink_tokens: 0,
        }
    }

    /// The same mask with `n` attention-sink tokens.
    pub const fn with_sinks(self, n: u32) -> Self {
        MaskSpec {
            sink_tokens: n,
            ..self
        }
    }

    /// The window's left and right reach, `None` for unbounded, with `causal` folded in.
    pub fn window(&self) -> (Option<u32>, Option<u32>) {
        let right = if self.causal {
            Some(0)
        } else {
            self.window_right
        };
        (self.window_left, right)
    }

    /// Checks the mask and lowers it to the kernel's form for the given sequence lengths.
    pub fn resolve(&self, seqlen_q: usize, seqlen_k: usize) -> Result<LfMask> {
        if self.causal {
            if let Some(r) = self.window_right {
                if r != 0 {
                    return Err(Error::InvalidMask {
                        arg: "mask.window_right",
                        value: format!("Some({r}) with causal = true"),
                        expected:
                            "None or Some(0): causal attention sees no key right of the diagonal",
                    });
                }
            }
        }
        let side = |arg: &'static str, w: Option<u32>| -> Result<i32> {
            match w {
                None => Ok(-1),
                Some(w) => i32::try_from(w).map_err(|_| Error::InvalidMask {
                    arg,
                    value: format!("Some({w})"),
                    expected: "at most i32::MAX (use None for an unbounded side)",
                }),
            }
        };
        let (l, r) = self.window();
        let window_left = side("mask.window_left", l)?;
        let window_right = side("mask.window_right", r)?;
        let seq = |arg: &'static str, s: usize| -> Result<i32> {
            if s == 0 {
                return Err(Error::ZeroSized { arg, dim: "seqlen" });
            }
            i32::try_from(s).map_err(|_| Error::InvalidArgument {
                arg,
                value: s.to_string(),
                expected: "a sequence length of at most i32::MAX".into(),
            })
        };
        let sink_tokens = i32::try_from(self.sink_tokens).map_err(|_| Error::InvalidMask {
            arg: "mask.sink_tokens",
            value: self.sink_tokens.to_string(),
            expected: "at most i32::MAX",
        })?;
        Ok(LfMask {
            seqlen_q: seq("q", seqlen_q)?,
            seqlen_k: seq("k", seqlen_k)?,
            window_left,
            window_right,
            sink_tokens,
            reserved: 0,
        })
    }

    /// Whether query `i` may attend key `j` (the definition above, in plain Rust; the reference
    /// and the tests use this, independently of the kernels' tile plan).
    pub fn is_visible(&self, seqlen_q: usize, seqlen_k: usize, i: usize, j: usize) -> bool {
        if i >= seqlen_q || j >= seqlen_k {
            return false;
        }
        let (l, r) = self.window();
        let diag = i as i128 + seqlen_k as i128 - seqlen_q as i128;
        let j = j as i128;
        (l.is_none_or(|l| j >= diag - l as i128) || j < self.sink_tokens as i128)
            && r.is_none_or(|r| j <= diag + r as i128)
    }

    /// Number of visible (query, key) pairs for the given sequence lengths, in O(seqlen_q):
    /// the FLOPs a mask needs are `4 * head_dim` per pair (per batch and head).
    pub fn visible_pairs(&self, seqlen_q: usize, seqlen_k: usize) -> u64 {
        let (l, r) = self.window();
        let off = seqlen_k as i128 - seqlen_q as i128;
        (0..seqlen_q as i128)
            .map(|i| {
                let lo = l.map_or(0, |l| (i + off - l as i128).max(0));
                let hi = r.map_or(seqlen_k as i128, |r| {
                    (i + off + r as i128 + 1).min(seqlen_k as i128)
                });
                // Sinks add the keys [0, min(sinks, hi)) that lie left of the window.
                let sinks = (self.sink_tokens as i128).min(hi).min(lo).max(0);
                (hi - lo).max(0) as u64 + sinks as u64
            })
            .sum()
    }
}
