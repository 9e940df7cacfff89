//! Builders for published sparse-attention patterns, as [`BlockMask`]s.
//!
//! Every builder takes the [`MaskShape`] the mask is for (`batch` and `heads` may be 1 to share
//! the pattern, or the call's batch and query heads for per-head patterns) and the pattern's
//! parameters, and checks the parameters: a value that makes no sense is an
//! [`Error::InvalidArgument`] naming it (e.g. `"strided.stride"`), never a panic.
//!
//! # Vocabulary
//!
//! Blocks are the kernel's: query block `qb` holds rows `qb * 128 .. min((qb + 1) * 128,
//! seqlen_q)` and key block `kb` holds keys `kb * 64 .. min((kb + 1) * 64, seqlen_k)`. Positions
//! are aligned bottom-right, as in [`MaskSpec`]: with `off = seqlen_k - seqlen_q`, query row `i`
//! sits at position `diag(i) = i + off`, the key it meets on the diagonal (for equal lengths,
//! `diag(i) = i`). For a query block:
//!
//! - `d_first(qb) = qb * 128 + off`, the position of its first row;
//! - `d_last(qb) = min((qb + 1) * 128, seqlen_q) - 1 + off`, the position of its last row;
//! - `kb_diag(qb) = d_last(qb) / 64`, the key block holding the last row's diagonal, defined
//!   only when `d_last(qb) >= 0` (a query block whose last row has a negative position sees no
//!   key under a causal mask, and gets no block from the causal block patterns).
//!
//! Divisions of possibly negative numbers below are floor divisions.
//!
//! Each pattern is a block-level rule `keep(b, h, qb, kb)` plus an element mask; the mask then
//! lists exactly the kept blocks in which the element mask leaves at least one element visible
//! ([`BlockMask::from_fn`]), and query `i` attends key `j` iff block `(i / 128, j / 64)` is listed
//! and the element mask allows `(i, j)`.

use super::{BlockMask, MaskShape, K_BLOCK, Q_BLOCK};
use crate::error::{Error, Result};
use crate::mask::MaskSpec;

/// Every block; element mask [`MaskSpec::none`]: every query attends every key.
pub fn dense(shape: MaskShape) -> Result<BlockMask> {
    BlockMask::from_fn(shape, MaskSpec::none(), |_, _, _, _| true)
}

/// Causal attention: element mask [`MaskSpec::causal`] (query `i` attends key `j` iff
/// `j <= diag(i)`, bottom-right aligned), every block that holds a visible element.
pub fn causal(shape: MaskShape) -> Result<BlockMask> {
    BlockMask::from_fn(shape, MaskSpec::causal(), |_, _, _, _| true)
}

/// A token-exact sliding window, FlashAttention's `window_size`: element mask
/// [`MaskSpec::sliding_window`]`(left, right)`, so query `i` attends key `j` iff
/// `diag(i) - left <= j <= diag(i) + right` (a `None` side is unbounded); every block that holds
/// a visible element is listed (as in Beltagy et al. 2020, "Longformer: The Long-Document
/// Transformer", and Mistral's sliding-window attention).
///
/// # Errors
///
/// `"sliding_window.left"` / `"sliding_window.right"` past `i32::MAX` (the kernels' range).
pub fn sliding_window(
    shape: MaskShape,
    left: Option<u32>,
    right: Option<u32>,
) -> Result<BlockMask> {
    if let Some(l) = left {
        check_i32("sliding_window.left", l)?;
    }
    if let Some(r) = right {
        check_i32("sliding_window.right", r)?;
    }
    BlockMask::from_fn(
        shape,
        MaskSpec::sliding_window(left, right),
        |_, _, _, _| true,
    )
}

/// A causal sliding window (Mistral-style): element mask [`MaskSpec::causal_window`]`(left)`, so
/// query `i` attends key `j` iff `diag(i) - left <= j <= diag(i)` (`left + 1` keys, the diagonal
/// included); every block that holds a visible element is listed.
///
/// # Errors
///
/// `"causal_sliding_window.left"` past `i32::MAX`.
pub fn causal_sliding_window(shape: MaskShape, left: u32) -> Result<BlockMask> {
    check_i32("causal_sliding_window.left", left)?;
    BlockMask::from_fn(shape, MaskSpec::causal_window(left), |_, _, _, _| true)
}

/// StreamingLLM's attention sinks plus a causal window (Xiao et al. 2023, "Efficient Streaming
/// Language Models with Attention Sinks"), token exact: query `i` attends key `j` iff
/// `j <= diag(i)` and (`diag(i) - j < window` or `j < sinks`). That is, each query sees the
/// `window` most recent keys up to and including its diagonal, plus the first `sinks` keys.
///
/// The element mask is `MaskSpec { causal: true, window_left: Some(window - 1), window_right:
/// None, sink_tokens: sinks }`; every block that holds a visible element is listed.
///
/// # Errors
///
/// `"sinks_window.window"` when 0 (the window always holds the diagonal) or past
/// `i32::MAX + 1`; `"sinks_window.sinks"` past `i32::MAX`.
pub fn sinks_window(shape: MaskShape, sinks: u32, window: u32) -> Result<BlockMask> {
    if window == 0 || window - 1 > i32::MAX as u32 {
        return Err(invalid(
            "sinks_window.window",
            window,
            "1..=2^31 keys (the window holds the diagonal key)",
        ));
    }
    check_i32("sinks_window.sinks", sinks)?;
    let element = MaskSpec {
        causal: true,
        window_left: Some(window - 1),
        window_right: None,
        sink_tokens: sinks,
    };
    BlockMask::from_fn(shape, element, |_, _, _, _| true)
}

/// The strided pattern of the Sparse Transformer (Child et al. 2019, "Generating Long Sequences
/// with Sparse Transformers"), at block granularity, in key blocks, with both of its heads'
/// connectivity in one mask: block `(qb, kb)` is kept iff `kb_diag(qb)` is defined and,
/// with `t = kb_diag(qb) - kb`,
///
/// `0 <= t` and (`t < local` or `t % stride == 0`).
///
/// The element mask is [`MaskSpec::causal`]. `local` counts the key blocks of the local band
/// (ending at the diagonal block); `stride` is the distance, in key blocks, between the strided
/// "summary" columns counted back from the diagonal block (the paper takes `stride = local =
/// sqrt(n)`).
///
/// # Errors
///
/// `"strided.local"` or `"strided.stride"` when 0.
pub fn strided(shape: MaskShape, local: usize, stride: usize) -> Result<BlockMask> {
    if local == 0 {
        return Err(invalid("strided.local", local, "at least 1 key block"));
    }
    if stride == 0 {
        return Err(invalid("strided.stride", stride, "at least 1 key block"));
    }
    let g = Geometry::new(&shape);
    BlockMask::from_fn(shape, MaskSpec::causal(), |_, _, qb, kb| {
        g.kb_diag(qb).is_some_and(|kd| {
            kb <= kd && {
                let t = kd - kb;
                t < local || t % stride == 0
            }
        })
    })
}

/// The fixed pattern of the Sparse Transformer (Child et al. 2019, "Generating Long Sequences
/// with Sparse Transformers"), at block granularity, in key blocks: the keys are cut into groups
/// of `block` key blocks, and block `(qb, kb)` is kept iff `kb_diag(qb)` is defined,
/// `kb <= kb_diag(qb)`, and
///
/// `kb / block == kb_diag(qb) / block` (the query's own group) or `kb % block >= block - summary`
/// (the last `summary` key blocks of every group, the paper's `c` summary cells).
///
/// The element mask is [`MaskSpec::causal`].
///
/// # Errors
///
/// `"fixed.block"` when 0; `"fixed.summary"` outside `1..=block`.
pub fn fixed(shape: MaskShape, block: usize, summary: usize) -> Result<BlockMask> {
    if block == 0 {
        return Err(invalid("fixed.block", block, "at least 1 key block"));
    }
    if summary == 0 || summary > block {
        return Err(invalid(
            "fixed.summary",
            summary,
            format!("1..={block} (at least one and at most `block` key blocks)"),
        ));
    }
    let g = Geometry::new(&shape);
    BlockMask::from_fn(shape, MaskSpec::causal(), |_, _, qb, kb| {
        g.kb_diag(qb).is_some_and(|kd| {
            kb <= kd && (kb / block == kd / block || kb % block >= block - summary)
        })
    })
}

/// One dilated-attention branch of LongNet (Ding et al. 2023, "LongNet: Scaling Transformers to
/// 1,000,000,000 Tokens"), causal, at block granularity.
///
/// Positions are cut into segments of `segment * 128` tokens, that is `segment` query blocks or
/// `2 * segment` key blocks. Inside each segment, head `h` keeps every `ratio`-th 128-token
/// block, starting at offset `o = h % ratio` (LongNet's per-head offsets), and attends only
/// from kept blocks to kept blocks of the same segment. Precisely, with
/// `p(qb) = d_last(qb) / 128` the position block of the query block (`p(qb) = qb` when
/// `seqlen_q == seqlen_k`), block `(qb, kb)` of head `h` is kept iff `kb_diag(qb)` is defined,
/// `kb <= kb_diag(qb)`, and
///
/// - `p(qb) / segment == kb / (2 * segment)` (same segment),
/// - `(p(qb) % segment - o) % ratio == 0` (kept query block), and
/// - `(kb % (2 * segment) - 2 * o) % (2 * ratio)` is 0 or 1 (kept key block: the two 64-key
///   blocks of a kept 128-token block), both modulo taken non-negative.
///
/// The element mask is [`MaskSpec::causal`]. Offsets use `h` as given, so they differ between
/// heads only for a per-head mask (`shape.heads` = the query heads, more than 1); with
/// `heads = 1` every head uses offset 0. Rows of query blocks a head does not keep attend
/// nothing (output 0, log-sum-exp `-inf`).
///
/// The paper dilates single tokens; here the unit is the kernel's block (128 query rows, and
/// key blocks in pairs), so a branch costs whole blocks and skips whole blocks. LongNet mixes
/// several `(segment, ratio)` branches, weighting each by its softmax denominator: that is the
/// log-sum-exp merge of the branches' outputs, which the crate provides as
/// [`Attention::merge`](crate::Attention::merge) (run one sparse forward per branch with its
/// LSE, then merge). A branch with `ratio = 1` covers every row of its segments.
///
/// # Errors
///
/// `"dilated.segment"` when 0 or past `i32::MAX`; `"dilated.ratio"` when 0 or not dividing `segment`.
pub fn dilated(shape: MaskShape, segment: usize, ratio: usize) -> Result<BlockMask> {
    if segment == 0 || segment > i32::MAX as usize {
        return Err(invalid(
            "dilated.segment",
            segment,
            "1..=i32::MAX query blocks",
        ));
    }
    if ratio == 0 || segment % ratio != 0 {
        return Err(invalid(
            "dilated.ratio",
            ratio,
            format!("a divisor of the segment length, {segment} query blocks"),
        ));
    }
    let g = Geometry::new(&shape);
    BlockMask::from_fn(shape, MaskSpec::causal(), |_, h, qb, kb| {
        let Some(kd) = g.kb_diag(qb) else {
            return false;
        };
        let p = g.d_last(qb) as usize / Q_BLOCK;
        let o = h % ratio;
        let kin = kb % (2 * segment);
        kb <= kd
            && p / segment == kb / (2 * segment)
            && (p % segment + ratio - o) % ratio == 0
            && (kin + 2 * ratio - 2 * o) % (2 * ratio) <= 1
    })
}

/// BigBird's block-sparse attention (Zaheer et al. 2020, "Big Bird: Transformers for Longer
/// Sequences"), in its ITC form (global tokens taken from the sequence), in key blocks.
///
/// The first `global` key blocks (keys `0 .. 64 * global`) are global. Block `(qb, kb)` of
/// `(b, h)` is kept iff any of:
///
/// - `kb < global` (every query sees the global keys);
/// - the query block holds a global position, some row `i` with `0 <= diag(i) < 64 * global`:
///   `d_last(qb) >= 0` and `max(d_first(qb), 0) < 64 * global` (global queries see every key;
///   for `seqlen_q == seqlen_k` that is `qb < ceil(global / 2)`);
/// - `d_first(qb) / 64 - window <= kb <= d_last(qb) / 64 + window` (the sliding band:
///   `window` key blocks on either side of the key blocks the query block's diagonal crosses;
///   `window = 0` is the diagonal blocks alone);
/// - `kb` is one of the random blocks of `(b, h, qb)`.
///
/// Random blocks: the candidates are the key blocks not kept by the rules above (and, when
/// `causal`, only those with `kb <= kb_diag(qb)`; none when `kb_diag(qb)` is undefined), in
/// increasing order, `c[0..n]`. A SplitMix64 generator (Steele et al. 2014; `next()` adds
/// `0x9E3779B97F4A7C15` to the state and returns the state mixed by
/// `z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27; z *= 0x94D049BB133111EB; z ^= z >> 31`,
/// all wrapping) is seeded per row: starting from `s = seed`, for `x` in `[b, h, qb]` in turn,
/// `s ^= x` then `s = next()` on state `s` (the output replaces the state). Then for
/// `t in 0..min(random, n)`, `u = t + next() % (n - t)` and `c[t]` swaps with `c[u]` (a partial
/// Fisher–Yates shuffle); the random blocks are `c[0..min(random, n)]`. The draw is a pure
/// function of `(seed, b, h, qb)`, the shape and the parameters.
///
/// The element mask is [`MaskSpec::none`], or [`MaskSpec::causal`] when `causal` is set (kept
/// blocks the causal mask hides entirely are then dropped).
pub fn bigbird(
    shape: MaskShape,
    global: usize,
    window: usize,
    random: usize,
    seed: u64,
    causal: bool,
) -> Result<BlockMask> {
    shape.check()?;
    let g = Geometry::new(&shape);
    let nkb = shape.num_k_blocks();
    // Past these bounds a larger window or global count changes nothing (block distances stay
    // below 2^32 for sequences of at most i32::MAX tokens): clamp before any arithmetic.
    let window = window.min(1 << 40) as i64;
    let global = global.min(nkb);
    let fixed_keep = |qb: usize, kb: usize| -> bool {
        kb < global || (g.d_last(qb) >= 0 && g.d_first(qb).max(0) < (K_BLOCK * global) as i64) || {
            let kb = kb as i64;
            g.d_first(qb).div_euclid(K_BLOCK as i64) - window <= kb
                && kb <= g.d_last(qb).div_euclid(K_BLOCK as i64) + window
        }
    };
    let mut cached: Option<(usize, usize, usize)> = None;
    let mut picks: Vec<usize> = Vec::new();
    let element = if causal {
        MaskSpec::causal()
    } else {
        MaskSpec::none()
    };
    BlockMask::from_fn(shape, element, |b, h, qb, kb| {
        if fixed_keep(qb, kb) {
            return true;
        }
        if random == 0 {
            return false;
        }
        if cached != Some((b, h, qb)) {
            cached = Some((b, h, qb));
            let limit = if causal {
                g.kb_diag(qb).map_or(0, |kd| kd + 1)
            } else {
                nkb
            };
            let mut c: Vec<usize> = (0..limit).filter(|&k| !fixed_keep(qb, k)).collect();
            let mut rng = SplitMix64::for_row(seed, b, h, qb);
            let n = c.len();
            let k = random.min(n);
            for t in 0..k {
                let u = t + (rng.next() % (n - t) as u64) as usize;
                c.swap(t, u);
            }
            c.truncate(k);
            c.sort_unstable();
            picks = c;
        }
        picks.binary_search(&kb).is_ok()
    })
}

/// Longformer's attention (Beltagy et al. 2020, "Longformer: The Long-Document Transformer"):
/// a symmetric sliding window plus global tokens, at block granularity, element mask
/// [`MaskSpec::none`].
///
/// `global_tokens` are positions in the key sequence (`< seqlen_k`; order and repeats do not
/// matter); position `g` is query row `g - off` when that row exists. Block `(qb, kb)` is kept
/// iff any of:
///
/// - some query row `i` of the block and some key `j` of the block have `|j - diag(i)| <=
///   window` (the block touches the token window);
/// - `kb` holds a global token (`kb == g / 64` for some `g`): every query sees it;
/// - `qb` holds a global token (`qb == (g - off) / 128` for some `g` with `0 <= g - off <
///   seqlen_q`): it sees every key.
///
/// The window is therefore block-granular: every key of a listed block is visible, including
/// keys up to a block beyond `window`. A token-exact window together with global tokens would
/// need a per-token global mask inside the element mask, which [`MaskSpec`] does not have (a
/// token-exact element window would hide the global blocks' elements); use
/// [`sliding_window`] for a token-exact window without globals.
///
/// # Errors
///
/// `"longformer.global_tokens"` for a position `>= seqlen_k`.
pub fn longformer(shape: MaskShape, window: u32, global_tokens: &[usize]) -> Result<BlockMask> {
    shape.check()?;
    let g = Geometry::new(&shape);
    let (nqb, nkb) = (shape.num_q_blocks(), shape.num_k_blocks());
    let mut global_q = vec![false; nqb];
    let mut global_k = vec![false; nkb];
    for (n, &t) in global_tokens.iter().enumerate() {
        if t >= shape.seqlen_k {
            return Err(invalid(
                "longformer.global_tokens",
                format!("[{n}] = {t}"),
                format!("a key position below seqlen_k = {}", shape.seqlen_k),
            ));
        }
        global_k[t / K_BLOCK] = true;
        let row = t as i64 - g.off;
        if (0..g.sq).contains(&row) {
            global_q[row as usize / Q_BLOCK] = true;
        }
    }
    let w = i64::from(window);
    BlockMask::from_fn(shape, MaskSpec::none(), |_, _, qb, kb| {
        // Rows [r0, r1] and keys [c0, c1]: j - diag(i) ranges over [c0 - d_last, c1 - d_first].
        let c0 = (kb * K_BLOCK) as i64;
        let c1 = (((kb + 1) * K_BLOCK).min(shape.seqlen_k) - 1) as i64;
        global_k[kb] || global_q[qb] || (c0 - g.d_last(qb) <= w && c1 - g.d_first(qb) >= -w)
    })
}

/// Block geometry of a shape: the positions of query blocks' rows on the key axis.
struct Geometry {
    sq: i64,
    off: i64,
}

impl Geometry {
    fn new(shape: &MaskShape) -> Self {
        Geometry {
            sq: shape.seqlen_q as i64,
            off: shape.seqlen_k as i64 - shape.seqlen_q as i64,
        }
    }
    /// Position of the first row of query block `qb`.
    fn d_first(&self, qb: usize) -> i64 {
        (qb * Q_BLOCK) as i64 + self.off
    }
    /// Position of the last row of query block `qb`.
    fn d_last(&self, qb: usize) -> i64 {
        (((qb + 1) * Q_BLOCK) as i64).min(self.sq) - 1 + self.off
    }
    /// The key block of the last row's diagonal, `None` when that position is negative.
    fn kb_diag(&self, qb: usize) -> Option<usize> {
        let d = self.d_last(qb);
        (d >= 0).then_some(d as usize / K_BLOCK)
    }
}

/// SplitMix64 (Steele, Lea, Flood 2014), as documented on [`bigbird`].
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn for_row(seed: u64, b: usize, h: usize, qb: usize) -> Self {
        let mut s = seed;
        for x in [b, h, qb] {
            s = SplitMix64(s ^ x as u64).next();
        }
        SplitMix64(s)
    }
}

fn check_i32(arg: &'static str, v: u32) -> Result<()> {
    if v > i32::MAX as u32 {
        return Err(invalid(arg, v, "at most i32::MAX tokens"));
    }
    Ok(())
}

fn invalid(arg: &'static str, value: impl ToString, expected: impl Into<String>) -> Error {
    Error::InvalidArgument {
        arg,
        value: value.to_string(),
        expected: expected.into(),
    }
}
