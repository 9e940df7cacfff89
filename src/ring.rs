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
//! Under a causal mask a pair of chunks is fully visible (the key chunk ends before the query
//! chunk starts: no mask), causal (the same chunk: the causal mask of equal lengths) or invisible
//! (the key chunk starts after the query chunk ends), and invisible pairs are skipped; a step with
//! no visible pair computes nothing (its shard is still passed on). Without a mask every pair is
//! full. Sliding windows are not planned yet.
//!
//! [`Attention::merge`]: crate::Attention::merge

use std::ops::Range;

use crate::error::{Error, Result};

/// How the sequence is cut over the ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Sharding {
    /// Rank `r` holds chunk `r` of `ranks` consecutive chunks.
    Contiguous,
    /// Rank `r` holds chunks `r` and `2 * ranks - 1 - r` of `2 * ranks` (balanced under a causal
    /// mask).
    Zigzag,
}

/// The mask of one (query chunk, key chunk) pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PairMask {
    /// Every query sees every key.
    Full,
    /// The same chunk on both sides: the causal mask (equal lengths).
    Causal,
}

/// One visible (query chunk, key chunk) pair of a step: global token ranges, the same ranges as
/// rows of the shards that hold them (the query rank's and the key owner's), and its mask.
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
    /// Which of the pair's (query, key) elements are visible.
    pub mask: PairMask,
}

/// The ring schedule of one sequence over `ranks` ranks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RingPlan {
    ranks: usize,
    seqlen: usize,
    sharding: Sharding,
    causal: bool,
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
            causal,
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
        self.causal
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
        for (q, q_rows) in &qs {
            for (k, k_rows) in &ks {
                let mask = if !self.causal || k.end <= q.start {
                    PairMask::Full
                } else if k == q {
                    PairMask::Causal
                } else {
                    // Chunks never overlap: a key chunk not before the query chunk and not the
                    // same one starts after it ends.
                    debug_assert!(k.start >= q.end);
                    continue;
                };
                out.push(PairWork {
                    q: q.clone(),
                    k: k.clone(),
                    q_rows: q_rows.clone(),
                    k_rows: k_rows.clone(),
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
            .map(|p| {
                let (lq, lk) = (p.q.len() as u128, p.k.len() as u128);
                match p.mask {
                    PairMask::Full => lq * lk,
                    PairMask::Causal => lq * (lq + 1) / 2,
                }
            })
            .sum()
    }
}
