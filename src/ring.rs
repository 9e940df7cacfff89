//! Context parallelism: how one sequence is cut over the ranks of a ring, and what each rank
//! computes at each step of ring attention. Host-side planning only: the schedule a transport
//! (NCCL send/recv around the ring) and the CPU reference (`reference::ring_attention_f64`)
//! share.
//!
//! Each rank holds a shard of Q, K and V. At step `t` (0 to `ranks - 1`) rank `r` holds the key /
//! value shard of rank `r - t` (mod `ranks`): its own at step 0, then the one its predecessor held
//! the step before, so each shard travels once around the ring. The rank computes its queries
//! against the keys it holds, as attention over the visible (query chunk, key chunk) pairs, and
//! merges the partial results by their log-sum-exp ([`Attention::merge`] on the GPU,
//! `reference::merge` on the CPU); after the last step its rows hold exact attention over the whole
//! sequence.
//!
//! Shards are made of chunks of consecutive tokens. [`Sharding::Contiguous`] cuts the sequence
//! into `ranks` chunks, one per rank. [`Sharding::Zigzag`] cuts it into `2 * ranks` chunks and
//! gives rank `r` chunks `r` and `2 * ranks - 1 - r`: under a causal mask every rank then sees
//! about the same number of (query, key) pairs (`RingPlan::work`), where contiguous shards leave
//! the last rank about `2 * ranks - 1` times the first one's. Chunk lengths differ by at most one token
//! when the sequence does not divide evenly.
//!
//! The mask is one of the whole sequence ([`RingPlan::with_mask`]: none, causal, sliding windows
//! `(left, right)`, causal with a left window): query `i` sees key `j` when `i - left <= j <= i +
//! right`. Each (query chunk, key chunk) pair is cut to the queries that see some key of the key
//! chunk and the keys some of them see; what is left is fully visible (no mask), or a band that
//! the kernels' bottom-right window describes on the cut ranges ([`PairMask`]), or nothing:
//! invisible pairs are skipped, and a step with no visible pair computes nothing (its shard is
//! still passed on). Under a causal mask a key chunk before the query chunk is fully visible, the
//! same chunk is causal and a later one invisible; under a window of `w` tokens only the chunks
//! within `w` of each other meet.
//!
//! Under rotary positions ([`RingPlan::rope_pairs`]) each pair is cut once more by the position
//! mode's window into the elements inside it and those outside ([`RopeBranch`]): each part is an
//! exact attention over queries and keys rotated to their global positions as that branch
//! rotates them, so ReRoPE and Leaky ReRoPE run on the same kernels.
//!
//! [`Attention::merge`]: crate::Attention::merge

use std::ops::Range;

use crate::error::{Error, Result};
use crate::mask::MaskSpec;
use crate::rope::PositionMode;

/// How the sequence is cut over the ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Sharding {
    /// Rank `r` holds chunk `r` of `ranks` consecutive chunks.
    Contiguous,
    /// Rank `r` holds chunks `r` and `2 * ranks - 1 - r` of `2 * ranks` (balanced under a causal
    /// mask).
    Zigzag,
}

/// The mask of one pair's (cut) query and key ranges, as the kernels take it: aligned bottom-right
/// on those ranges.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PairMask {
    /// Every query sees every key.
    Full,
    /// The causal mask, aligned bottom-right (the same chunk on both sides under a causal mask).
    Causal,
    /// A sliding window aligned bottom-right on the pair's ranges: the last query sees the keys
    /// from `left` before the last key to `right` after it (`None`: unbounded), and each earlier
    /// query the same band one key further left.
    Window {
        /// Keys left of the diagonal (`None`: every one).
        left: Option<u32>,
        /// Keys right of the diagonal (`None`: every one).
        right: Option<u32>,
    },
}

impl PairMask {
    /// The kernels' mask for the pair's ranges.
    pub fn spec(&self) -> MaskSpec {
        match *self {
            PairMask::Full => MaskSpec::none(),
            PairMask::Causal => MaskSpec::causal(),
            PairMask::Window { left, right } => MaskSpec::sliding_window(left, right),
        }
    }
}

/// Which scores of a pair under rotary positions ([`RingPlan::rope_pairs`]): the queries and keys
/// rotated as plain RoPE rotates them, to their global positions, or as the position mode's
/// outside branch does (ReRoPE: queries to the window, keys not rotated; Leaky ReRoPE: both
/// scaled down by the leak), for the (query, key) elements at least the window apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RopeBranch {
    /// Elements `i - j < w` (every element under plain RoPE).
    Inside,
    /// Elements `i - j >= w`.
    Outside,
}

/// One visible pair of a step: a range of one query chunk and a range of one key chunk (global
/// token ranges: the queries that see some key of the chunk, and the keys they see), the same
/// ranges as rows of the shards that hold them (the query rank's and the key owner's), the query
/// chunk's index in the query rank's shard, and the mask on those ranges.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PairWork {
    /// Query tokens (global positions).
    pub q: Range<usize>,
    /// Key tokens (global positions).
    pub k: Range<usize>,
    /// The query tokens as rows of the query rank's shard.
    pub q_rows: Range<usize>,
    /// The key tokens as rows of the key owner's shard.
    pub k_rows: Range<usize>,
    /// Index of the query chunk (within the query rank's shard, in its row order) that holds `q`.
    pub q_chunk: usize,
    /// Which of the pair's (query, key) elements are visible.
    pub mask: PairMask,
}

/// The pair of query chunk `q` and key chunk `k` under the band `j - i` in `[-left, right]`
/// (`None`: unbounded; a bound may be negative, e.g. `right = -w` for the keys at least `w` before
/// each query): the cut ranges and their mask, or `None` when no query of `q` sees a key of `k`.
fn cut_pair(
    q: &Range<usize>,
    k: &Range<usize>,
    (l, r): (Option<i128>, Option<i128>),
) -> Option<(Range<usize>, Range<usize>, PairMask)> {
    if let (Some(l), Some(r)) = (l, r) {
        if l + r < 0 {
            return None; // an empty band
        }
    }
    let (qs, qe, ks, ke) = (
        q.start as i128,
        q.end as i128,
        k.start as i128,
        k.end as i128,
    );
    // The queries that see some key of k: i + right >= k.start and i - left <= k.end - 1.
    let q0 = r.map_or(qs, |r| qs.max(ks - r));
    let q1 = l.map_or(qe, |l| qe.min(ke + l));
    if q0 >= q1 {
        return None;
    }
    // The keys those queries see.
    let k0 = l.map_or(ks, |l| ks.max(q0 - l));
    let k1 = r.map_or(ke, |r| ke.min(q1 + r));
    if k0 >= k1 {
        return None;
    }
    // Every query sees every key: the first key within the last query's reach and the last key
    // within the first query's.
    let full = l.is_none_or(|l| k0 >= q1 - 1 - l) && r.is_none_or(|r| k1 - 1 <= q0 + r);
    let mask = if full {
        PairMask::Full
    } else {
        // Bottom-right: the last query's diagonal is the last key, d = k1 - q1 keys right of it
        // in global terms; the cut keeps -left <= d <= right, so both reaches are >= 0. A reach
        // past every key of the pair is unbounded.
        let d = k1 - q1;
        let span = (q1 - q0) + (k1 - k0);
        let reach = |w: i128| -> Option<u32> {
            debug_assert!(w >= 0);
            // (Past u32 only on sequences the kernels refuse anyway.)
            (w < span).then_some(u32::try_from(w).unwrap_or(u32::MAX))
        };
        let (wl, wr) = (l.and_then(|l| reach(d + l)), r.and_then(|r| reach(r - d)));
        match (wl, wr) {
            (None, None) => PairMask::Full,
            (None, Some(0)) => PairMask::Causal,
            (left, right) => PairMask::Window { left, right },
        }
    };
    Some((q0 as usize..q1 as usize, k0 as usize..k1 as usize, mask))
}

/// The ring schedule of one sequence over `ranks` ranks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RingPlan {
    ranks: usize,
    seqlen: usize,
    sharding: Sharding,
    mask: MaskSpec,
    /// Global token ranges of the chunks, in sequence order.
    chunks: Vec<Range<usize>>,
}

impl RingPlan {
    /// The plan of a `seqlen`-token sequence over `ranks` ranks, causal or not.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] when `ranks` is 0 or the sequence has fewer tokens than chunks
    /// (`ranks`, or `2 * ranks` for zigzag): every chunk holds at least one token.
    pub fn new(seqlen: usize, ranks: usize, sharding: Sharding, causal: bool) -> Result<Self> {
        let mask = if causal {
            MaskSpec::causal()
        } else {
            MaskSpec::none()
        };
        Self::with_mask(seqlen, ranks, sharding, mask)
    }

    /// The plan of a `seqlen`-token sequence over `ranks` ranks under `mask` (none, causal,
    /// sliding windows, causal with a left window; over the whole sequence, where queries and
    /// keys are the same tokens).
    ///
    /// # Errors
    ///
    /// As [`new`](Self::new); [`Error::InvalidMask`] for a mask the kernels refuse (a causal one
    /// with a right window) or with sink tokens, which the ring does not plan.
    pub fn with_mask(
        seqlen: usize,
        ranks: usize,
        sharding: Sharding,
        mask: MaskSpec,
    ) -> Result<Self> {
        if mask.sink_tokens != 0 {
            return Err(Error::InvalidMask {
                arg: "mask.sink_tokens",
                value: mask.sink_tokens.to_string(),
                expected: "0: a ring does not plan sink tokens",
            });
        }
        mask.resolve(seqlen.max(1), seqlen.max(1))?;
        if ranks == 0 {
            return Err(Error::InvalidArgument {
                arg: "ranks",
                value: "0".into(),
                expected: "at least one rank".into(),
            });
        }
        let n = match sharding {
            Sharding::Contiguous => ranks,
            Sharding::Zigzag => ranks.checked_mul(2).ok_or_else(|| Error::InvalidArgument {
                arg: "ranks",
                value: ranks.to_string(),
                expected: "a rank count whose chunk count fits in usize".into(),
            })?,
        };
        if seqlen < n {
            return Err(Error::InvalidArgument {
                arg: "seqlen",
                value: seqlen.to_string(),
                expected: format!(
                    "at least {n} tokens: one per chunk ({sharding:?} over {ranks} ranks)"
                ),
            });
        }
        // The first seqlen % n chunks take one token more.
        let (base, extra) = (seqlen / n, seqlen % n);
        let mut chunks = Vec::with_capacity(n);
        let mut at = 0;
        for c in 0..n {
            let len = base + usize::from(c < extra);
            chunks.push(at..at + len);
            at += len;
        }
        Ok(RingPlan {
            ranks,
            seqlen,
            sharding,
            mask,
            chunks,
        })
    }

    /// Ranks of the ring.
    pub fn ranks(&self) -> usize {
        self.ranks
    }

    /// Tokens of the sequence.
    pub fn seqlen(&self) -> usize {
        self.seqlen
    }

    /// Whether the attention is causal.
    pub fn causal(&self) -> bool {
        self.mask.causal
    }

    /// The mask over the whole sequence.
    pub fn mask(&self) -> MaskSpec {
        self.mask
    }

    /// The sharding.
    pub fn sharding(&self) -> Sharding {
        self.sharding
    }

    /// Indices of the chunks rank `rank` holds, in the order its shard stores them.
    fn chunk_ids(&self, rank: usize) -> Vec<usize> {
        match self.sharding {
            Sharding::Contiguous => vec![rank],
            Sharding::Zigzag => vec![rank, 2 * self.ranks - 1 - rank],
        }
    }

    /// The global token ranges rank `rank`'s shard holds, in its row order (panics on a rank
    /// outside the ring).
    pub fn shard(&self, rank: usize) -> Vec<Range<usize>> {
        assert!(rank < self.ranks, "rank {rank} of a ring of {}", self.ranks);
        self.chunk_ids(rank)
            .into_iter()
            .map(|c| self.chunks[c].clone())
            .collect()
    }

    /// Rows of rank `rank`'s shard.
    pub fn shard_len(&self, rank: usize) -> usize {
        self.shard(rank).iter().map(|r| r.len()).sum()
    }

    /// The rank whose key / value shard rank `rank` holds at step `step`.
    pub fn kv_owner(&self, rank: usize, step: usize) -> usize {
        (rank + self.ranks - step % self.ranks) % self.ranks
    }

    /// The visible pairs rank `rank` computes at step `step`, query chunks in shard order, key
    /// chunks in shard order within each; empty when the step has nothing visible.
    pub fn pairs(&self, rank: usize, step: usize) -> Vec<PairWork> {
        let owner = self.kv_owner(rank, step);
        let (l, r) = self.mask.window();
        let band = (l.map(i128::from), r.map(i128::from));
        self.cut_pairs(rank, owner, band)
    }

    /// The visible pairs rank `rank` computes at step `step` under the rotary position mode `mode`
    /// ([`PositionMode`]): each pair of [`pairs`](Self::pairs) cut by the mode's window `w` into
    /// the part whose elements are less than `w` apart (`i - j < w`, [`RopeBranch::Inside`]) and
    /// the part at least `w` apart ([`RopeBranch::Outside`]), each with the mask of its cut
    /// ranges; an empty part is left out. Under plain RoPE every pair is inside. A rank rotates
    /// its queries and the keys it holds to their global positions, per branch, and runs each
    /// part as an exact attention over the rotated rows; merged by log-sum-exp, the parts give
    /// the position mode's attention over the whole sequence (`reference::ring_rope_attention_f64`).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidMask`] when the plan's mask is not causal (rotary attention is causal,
    /// optionally with a left window); [`Error::InvalidArgument`] for a window of 0.
    pub fn rope_pairs(
        &self,
        rank: usize,
        step: usize,
        mode: &PositionMode,
    ) -> Result<Vec<(PairWork, RopeBranch)>> {
        if !self.mask.causal {
            return Err(Error::InvalidMask {
                arg: "mask",
                value: format!("{:?}", self.mask),
                expected: "a causal mask (rotary attention is causal, optionally windowed)",
            });
        }
        let owner = self.kv_owner(rank, step);
        let (l, _) = self.mask.window();
        let l = l.map(i128::from);
        if matches!(mode, PositionMode::Rope) {
            let inside = self.cut_pairs(rank, owner, (l, Some(0)));
            return Ok(inside
                .into_iter()
                .map(|p| (p, RopeBranch::Inside))
                .collect());
        }
        let w = i128::from(mode.window());
        if w == 0 {
            return Err(Error::InvalidArgument {
                arg: "mode.window",
                value: "0".into(),
                expected: "a window of at least 1 token".into(),
            });
        }
        // Inside: j - i in [-(w - 1), 0] within the mask's left window; outside: j - i <= -w.
        let in_left = Some(l.map_or(w - 1, |l| l.min(w - 1)));
        let mut out: Vec<_> = self
            .cut_pairs(rank, owner, (in_left, Some(0)))
            .into_iter()
            .map(|p| (p, RopeBranch::Inside))
            .collect();
        out.extend(
            self.cut_pairs(rank, owner, (l, Some(-w)))
                .into_iter()
                .map(|p| (p, RopeBranch::Outside)),
        );
        Ok(out)
    }

    /// The pairs of rank `rank`'s query chunks and rank `owner`'s key chunks under `band` (as
    /// `cut_pair`'s).
    fn cut_pairs(
        &self,
        rank: usize,
        owner: usize,
        band: (Option<i128>, Option<i128>),
    ) -> Vec<PairWork> {
        let rows = |chunks: &[Range<usize>]| -> Vec<(Range<usize>, Range<usize>)> {
            let mut at = 0;
            chunks
                .iter()
                .map(|c| {
                    let r = at..at + c.len();
                    at += c.len();
                    (c.clone(), r)
                })
                .collect()
        };
        let (qs, ks) = (rows(&self.shard(rank)), rows(&self.shard(owner)));
        let mut out = Vec::new();
        for (c, (q, q_rows)) in qs.iter().enumerate() {
            for (k, k_rows) in &ks {
                let Some((qc, kc, mask)) = cut_pair(q, k, band) else {
                    continue;
                };
                out.push(PairWork {
                    q_rows: q_rows.start + (qc.start - q.start)..q_rows.start + (qc.end - q.start),
                    k_rows: k_rows.start + (kc.start - k.start)..k_rows.start + (kc.end - k.start),
                    q: qc,
                    k: kc,
                    q_chunk: c,
                    mask,
                });
            }
        }
        out
    }

    /// The visible (query, key) elements rank `rank` computes over all steps: its share of the
    /// attention's work.
    pub fn work(&self, rank: usize) -> u128 {
        (0..self.ranks)
            .flat_map(|t| self.pairs(rank, t))
            .map(|p| u128::from(p.mask.spec().visible_pairs(p.q.len(), p.k.len())))
            .sum()
    }
}
