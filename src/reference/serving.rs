//! The serving path's references: variable-length (packed) batches and a paged key/value cache,
//! with the semantics of FlashAttention's `flash_attn_varlen_func` and
//! `flash_attn_with_kvcache`.
//!
//! Both are the dense reference applied one sequence at a time: each sequence is cut out (or
//! its keys gathered from the cache pages) into a batch-1 [`RefShape`] problem, run through
//! [`attention_f64`] or [`attention_lowp`], and its output and log-sum-exp are written back
//! into the serving layout. Nothing here computes a softmax of its own, so a sequence's result
//! is bit for bit the dense reference's for that sequence alone, with the mask aligned
//! bottom-right per sequence ([`MaskSpec::is_visible`] at that sequence's lengths).
//!
//! The masks are [`MaskSpec`]s, the same for every sequence; block-sparse masks, which are
//! built for one fixed batch of equal lengths, have no varlen or paged form.

use super::{attention_f64, attention_lowp, RefOutput, RefShape};
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::mask::MaskSpec;

/// Checks the head counts and head dimension of a serving problem: `heads_q` a positive
/// multiple of `heads_kv`, `head_dim` at least 1.
fn check_heads(heads_q: usize, heads_kv: usize, head_dim: usize) -> Result<()> {
    if heads_kv == 0 {
        return Err(Error::InvalidArgument {
            arg: "heads_kv",
            value: "0".into(),
            expected: "at least 1 key/value head".into(),
        });
    }
    if heads_q == 0 || heads_q % heads_kv != 0 {
        return Err(Error::InvalidArgument {
            arg: "heads_q",
            value: heads_q.to_string(),
            expected: format!("a positive multiple of heads_kv = {heads_kv}"),
        });
    }
    if head_dim == 0 {
        return Err(Error::InvalidArgument {
            arg: "head_dim",
            value: "0".into(),
            expected: "at least 1".into(),
        });
    }
    Ok(())
}

/// The error for a product of dimensions that does not fit in `usize`.
fn too_big(what: &impl std::fmt::Debug) -> Error {
    Error::InvalidArgument {
        arg: "shape",
        value: format!("{what:?}"),
        expected: "a shape whose element count fits in usize".into(),
    }
}

/// Checks that a slice has the `want` elements the shape implies.
fn check_len(arg: &'static str, len: usize, want: usize, formula: &str) -> Result<()> {
    if len == want {
        return Ok(());
    }
    Err(Error::InvalidArgument {
        arg,
        value: len.to_string(),
        expected: format!("{want} elements ({formula})"),
    })
}

/// Problem description of a variable-length (packed) batch, FlashAttention's varlen layout.
///
/// `q` is `[total_q, heads_q, head_dim]` and `k`, `v` are `[total_k, heads_kv, head_dim]`, the
/// sequences' rows one after the other; sequence `b` owns query rows
/// `cu_seqlens_q[b]..cu_seqlens_q[b + 1]` and key rows `cu_seqlens_k[b]..cu_seqlens_k[b + 1]`.
/// The output is packed like `q`; the log-sum-exp is `[heads_q, total_q]`, head-major over the
/// packed rows.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct VarlenShape {
    /// `batch + 1` prefix sums of the query counts: 0 first, then non-decreasing, `total_q`
    /// last.
    pub cu_seqlens_q: Vec<i32>,
    /// `batch + 1` prefix sums of the key counts: 0 first, then non-decreasing, `total_k` last.
    pub cu_seqlens_k: Vec<i32>,
    /// Query (and output) heads; a positive multiple of `heads_kv`.
    pub heads_q: usize,
    /// Key/value heads.
    pub heads_kv: usize,
    /// Head dimension.
    pub head_dim: usize,
}

impl VarlenShape {
    /// Sequences in the batch: one less than the entries of `cu_seqlens_q` (0 when it is
    /// empty).
    pub fn batch(&self) -> usize {
        self.cu_seqlens_q.len().saturating_sub(1)
    }

    /// Packed query rows: the last entry of `cu_seqlens_q` (0 when empty or negative).
    pub fn total_q(&self) -> usize {
        last_entry(&self.cu_seqlens_q)
    }

    /// Packed key rows: the last entry of `cu_seqlens_k` (0 when empty or negative).
    pub fn total_k(&self) -> usize {
        last_entry(&self.cu_seqlens_k)
    }

    /// Query and key counts of sequence `b`: `(cu_seqlens_q[b + 1] - cu_seqlens_q[b],
    /// cu_seqlens_k[b + 1] - cu_seqlens_k[b])`, 0 for a decreasing step (which
    /// [`validate`](Self::validate) rejects).
    ///
    /// # Panics
    ///
    /// When `b >= batch()` or `cu_seqlens_k` has fewer entries than `b + 2`.
    pub fn seqlens(&self, b: usize) -> (usize, usize) {
        let step = |cu: &[i32]| (i64::from(cu[b + 1]) - i64::from(cu[b])).max(0) as usize;
        (step(&self.cu_seqlens_q), step(&self.cu_seqlens_k))
    }

    /// The dense batch-1 problem of sequence `b`: its query and key counts with this shape's
    /// heads and head dimension (what the reference runs for that sequence).
    ///
    /// # Panics
    ///
    /// As [`seqlens`](Self::seqlens).
    pub fn ref_shape(&self, b: usize) -> RefShape {
        let (seqlen_q, seqlen_k) = self.seqlens(b);
        RefShape {
            batch: 1,
            seqlen_q,
            seqlen_k,
            heads_q: self.heads_q,
            heads_kv: self.heads_kv,
            head_dim: self.head_dim,
        }
    }

    /// Checks the description.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] naming the argument: `heads_kv` when it is 0, `heads_q` when
    /// it is not a positive multiple of `heads_kv`, `head_dim` when it is 0;
    /// `cu_seqlens_q.len` with fewer than 2 entries, `cu_seqlens_k.len` when it does not have
    /// as many entries as `cu_seqlens_q`; `cu_seqlens_q[0]` / `cu_seqlens_k[0]` when the first
    /// entry is not 0, and `cu_seqlens_q` / `cu_seqlens_k` for a negative entry or a decreasing
    /// step.
    pub fn validate(&self) -> Result<()> {
        check_heads(self.heads_q, self.heads_kv, self.head_dim)?;
        let q = &self.cu_seqlens_q;
        if q.len() < 2 {
            return Err(Error::InvalidArgument {
                arg: "cu_seqlens_q.len",
                value: q.len().to_string(),
                expected: "batch + 1 entries, at least 2".into(),
            });
        }
        if self.cu_seqlens_k.len() != q.len() {
            return Err(Error::InvalidArgument {
                arg: "cu_seqlens_k.len",
                value: self.cu_seqlens_k.len().to_string(),
                expected: format!("batch + 1 = {} entries, as cu_seqlens_q", q.len()),
            });
        }
        check_prefix_sums("cu_seqlens_q", "cu_seqlens_q[0]", q)?;
        check_prefix_sums("cu_seqlens_k", "cu_seqlens_k[0]", &self.cu_seqlens_k)?;
        for (rows, heads) in [
            (self.total_q(), self.heads_q),
            (self.total_k(), self.heads_kv),
        ] {
            rows.checked_mul(heads)
                .and_then(|n| n.checked_mul(self.head_dim))
                .ok_or_else(|| too_big(self))?;
        }
        Ok(())
    }

    /// Validates the description and the lengths of `q`, `k` and `v`.
    fn check(&self, q: usize, k: usize, v: usize) -> Result<()> {
        self.validate()?;
        let q_len = self.total_q() * self.heads_q * self.head_dim;
        let kv_len = self.total_k() * self.heads_kv * self.head_dim;
        check_len("q.len", q, q_len, "total_q * heads_q * head_dim")?;
        check_len("k.len", k, kv_len, "total_k * heads_kv * head_dim")?;
        check_len("v.len", v, kv_len, "total_k * heads_kv * head_dim")
    }
}

/// The last entry of a prefix-sum array as a count, 0 when there is none or it is negative.
fn last_entry(cu: &[i32]) -> usize {
    cu.last().map_or(0, |&x| x.max(0) as usize)
}

/// Checks `cu` (at least one entry) for a first entry of 0, no negative entry and no decreasing
/// step.
fn check_prefix_sums(arg: &'static str, first: &'static str, cu: &[i32]) -> Result<()> {
    if cu[0] != 0 {
        return Err(Error::InvalidArgument {
            arg: first,
            value: cu[0].to_string(),
            expected: "0".into(),
        });
    }
    for (i, w) in cu.windows(2).enumerate() {
        if w[1] < 0 {
            return Err(Error::InvalidArgument {
                arg,
                value: format!("{arg}[{}] = {}", i + 1, w[1]),
                expected: "non-negative prefix sums".into(),
            });
        }
        if w[1] < w[0] {
            return Err(Error::InvalidArgument {
                arg,
                value: format!("{arg}[{}] = {} < {arg}[{i}] = {}", i + 1, w[1], w[0]),
                expected: "non-decreasing prefix sums (sequence lengths >= 0)".into(),
            });
        }
    }
    Ok(())
}

/// Runs `run` on each sequence of a packed batch and scatters the results into the packed
/// layout; `dtype` is the low-precision type (then the unrounded output is kept) or `None`.
fn varlen_run<E>(
    shape: &VarlenShape,
    q: &[E],
    k: &[E],
    v: &[E],
    dtype: Option<DType>,
    mut run: impl FnMut(&RefShape, &[E], &[E], &[E]) -> Result<RefOutput>,
) -> Result<RefOutput> {
    shape.check(q.len(), k.len(), v.len())?;
    let (total_q, heads_q) = (shape.total_q(), shape.heads_q);
    let q_row = heads_q * shape.head_dim;
    let kv_row = shape.heads_kv * shape.head_dim;
    let mut out = vec![0.0f64; q.len()];
    let mut unrounded = if dtype.is_some() {
        vec![0.0f64; q.len()]
    } else {
        Vec::new()
    };
    let mut spread = unrounded.clone();
    let mut lse = vec![f64::NEG_INFINITY; heads_q * total_q];
    for b in 0..shape.batch() {
        let s = shape.ref_shape(b);
        let q0 = shape.cu_seqlens_q[b] as usize;
        let k0 = shape.cu_seqlens_k[b] as usize;
        let qs = q0 * q_row..(q0 + s.seqlen_q) * q_row;
        let ks = k0 * kv_row..(k0 + s.seqlen_k) * kv_row;
        let r = run(&s, &q[qs.clone()], &k[ks.clone()], &v[ks])?;
        out[qs.clone()].copy_from_slice(&r.out);
        if !unrounded.is_empty() {
            unrounded[qs.clone()].copy_from_slice(&r.unrounded);
            spread[qs].copy_from_slice(&r.spread);
        }
        // The dense LSE is [1, heads_q, seqlen_q]; the packed one is [heads_q, total_q].
        let sq = s.seqlen_q;
        for h in 0..heads_q {
            lse[h * total_q + q0..][..sq].copy_from_slice(&r.lse[h * sq..(h + 1) * sq]);
        }
    }
    Ok(RefOutput {
        out,
        lse,
        unrounded,
        spread,
        dtype,
    })
}

/// [`attention_f64`] over a packed variable-length batch (`flash_attn_varlen_func`).
///
/// Each sequence is attended independently, exactly as [`attention_f64`] attends one batch
/// entry of its query count and key count: the mask aligns bottom-right per sequence and query
/// head `h` reads key/value head `h / (heads_q / heads_kv)`. The output is `[total_q, heads_q,
/// head_dim]` and the log-sum-exp `[heads_q, total_q]` (see [`VarlenShape`]), so [`compare`]
/// applies to a kernel's packed output as it stands. A sequence with no key, or a row that sees
/// none, has output 0 and log-sum-exp `-inf`.
///
/// [`compare`]: super::compare
///
/// # Errors
///
/// Those of [`VarlenShape::validate`], and [`Error::InvalidArgument`] with `q.len`, `k.len` or
/// `v.len` when a slice does not have the elements the shape implies (`shape` when that count
/// overflows).
pub fn varlen_attention_f64(
    shape: &VarlenShape,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    mask: &MaskSpec,
    scale: f64,
) -> Result<RefOutput> {
    varlen_run(shape, q, k, v, None, |s, q, k, v| {
        attention_f64(s, q, k, v, mask, scale)
    })
}

/// [`attention_lowp`] over a packed variable-length batch: the naive low-precision
/// implementation of [`varlen_attention_f64`]'s problem, in the same packed layout, with the
/// output before its final rounding in [`RefOutput::unrounded`] and `dtype` set to `T`'s.
///
/// # Errors
///
/// As [`varlen_attention_f64`].
pub fn varlen_attention_lowp<T: Element>(
    shape: &VarlenShape,
    q: &[T],
    k: &[T],
    v: &[T],
    mask: &MaskSpec,
    scale: f32,
) -> Result<RefOutput> {
    varlen_run(shape, q, k, v, Some(T::DTYPE), |s, q, k, v| {
        attention_lowp(s, q, k, v, mask, scale)
    })
}

/// Memory order of a paged key/value cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum PagedLayout {
    /// `[num_pages, page_size, heads_kv, head_dim]`: a page is `page_size` token rows of all
    /// heads (FlashAttention's layout).
    #[default]
    TokensMajor,
    /// `[num_pages, heads_kv, page_size, head_dim]`: a page holds each head's `page_size` keys
    /// contiguously.
    HeadsMajor,
}

/// Problem description of attention over a paged key/value cache
/// (`flash_attn_with_kvcache` with a block table).
///
/// `k_cache` and `v_cache` hold `num_pages` pages of `page_size` token slots each, in
/// [`layout`](Self::layout) order. Key `j` (`0 <= j < cache_seqlens[b]`) of sequence `b` is
/// slot `j % page_size` of page `block_table[b * max_pages_per_seq + j / page_size]`. Pages may
/// come in any order and may be shared between sequences (a shared prompt prefix); table entries
/// past a sequence's last used page are never read. Queries are dense `[batch, seqlen_q,
/// heads_q, head_dim]`, the last `seqlen_q` positions of each sequence; the output has the same
/// layout and the log-sum-exp is `[batch, heads_q, seqlen_q]`, as for the dense reference.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct PagedShape {
    /// Sequences.
    pub batch: usize,
    /// Query tokens per sequence (1 for plain decoding, a few for speculative decoding).
    pub seqlen_q: usize,
    /// Query (and output) heads; a positive multiple of `heads_kv`.
    pub heads_q: usize,
    /// Key/value heads.
    pub heads_kv: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Pages in the cache.
    pub num_pages: usize,
    /// Token slots per page.
    pub page_size: usize,
    /// Columns of the block table: the most pages one sequence may use.
    pub max_pages_per_seq: usize,
    /// Memory order of the cache.
    pub layout: PagedLayout,
    /// `[batch, max_pages_per_seq]`, row-major: the pages of each sequence, in key order.
    pub block_table: Vec<i32>,
    /// `[batch]`: keys in the cache of each sequence.
    pub cache_seqlens: Vec<i32>,
}

impl PagedShape {
    /// Keys of sequence `b`: `cache_seqlens[b]` (0 when negative, which
    /// [`validate`](Self::validate) rejects).
    ///
    /// # Panics
    ///
    /// When `b >= cache_seqlens.len()`.
    pub fn seqlen_k(&self, b: usize) -> usize {
        self.cache_seqlens[b].max(0) as usize
    }

    /// The dense batch-1 problem of sequence `b`: `seqlen_q` queries over its `seqlen_k(b)` keys
    /// (what the reference runs for that sequence, on the keys [`paged_gather`] returns).
    ///
    /// # Panics
    ///
    /// As [`seqlen_k`](Self::seqlen_k).
    pub fn ref_shape(&self, b: usize) -> RefShape {
        RefShape {
            batch: 1,
            seqlen_q: self.seqlen_q,
            seqlen_k: self.seqlen_k(b),
            heads_q: self.heads_q,
            heads_kv: self.heads_kv,
            head_dim: self.head_dim,
        }
    }

    /// Elements of `k_cache` and of `v_cache`: `num_pages * page_size * heads_kv * head_dim`.
    pub fn cache_len(&self) -> Option<usize> {
        self.num_pages
            .checked_mul(self.page_size)?
            .checked_mul(self.heads_kv)?
            .checked_mul(self.head_dim)
    }

    /// Elements of `q` (and of the output): `batch * seqlen_q * heads_q * head_dim`.
    pub fn q_len(&self) -> Option<usize> {
        self.batch
            .checked_mul(self.seqlen_q)?
            .checked_mul(self.heads_q)?
            .checked_mul(self.head_dim)
    }

    /// Offset in the cache of element `(page, slot, head, 0)`, in [`layout`](Self::layout)
    /// order.
    pub fn cache_offset(&self, page: usize, slot: usize, head: usize) -> usize {
        let (ps, hk, d) = (self.page_size, self.heads_kv, self.head_dim);
        match self.layout {
            PagedLayout::TokensMajor => ((page * ps + slot) * hk + head) * d,
            PagedLayout::HeadsMajor => ((page * hk + head) * ps + slot) * d,
        }
    }

    /// Checks the description: dimensions, cache lengths and the block-table entries every
    /// sequence reads.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] naming the argument: `heads_kv`, `heads_q`, `head_dim` as
    /// [`VarlenShape::validate`]; `page_size` when it is 0; `block_table.len` when it is not
    /// `batch * max_pages_per_seq`; `cache_seqlens.len` when it is not `batch`; `cache_seqlens`
    /// for an entry that is negative or above `max_pages_per_seq * page_size`; `block_table` for
    /// an entry that a key in range refers to and that is negative or not below `num_pages`;
    /// `shape` when an element count overflows.
    pub fn validate(&self) -> Result<()> {
        check_heads(self.heads_q, self.heads_kv, self.head_dim)?;
        if self.page_size == 0 {
            return Err(Error::InvalidArgument {
                arg: "page_size",
                value: "0".into(),
                expected: "at least 1 token slot per page".into(),
            });
        }
        self.cache_len().ok_or_else(|| too_big(self))?;
        self.q_len().ok_or_else(|| too_big(self))?;
        let table_len = self
            .batch
            .checked_mul(self.max_pages_per_seq)
            .ok_or_else(|| too_big(self))?;
        if self.block_table.len() != table_len {
            return Err(Error::InvalidArgument {
                arg: "block_table.len",
                value: self.block_table.len().to_string(),
                expected: format!(
                    "batch * max_pages_per_seq = {} * {} = {table_len}",
                    self.batch, self.max_pages_per_seq
                ),
            });
        }
        if self.cache_seqlens.len() != self.batch {
            return Err(Error::InvalidArgument {
                arg: "cache_seqlens.len",
                value: self.cache_seqlens.len().to_string(),
                expected: format!("batch = {}", self.batch),
            });
        }
        let capacity = self.max_pages_per_seq.saturating_mul(self.page_size);
        for (b, &len) in self.cache_seqlens.iter().enumerate() {
            if len < 0 || len as usize > capacity {
                return Err(Error::InvalidArgument {
                    arg: "cache_seqlens",
                    value: format!("cache_seqlens[{b}] = {len}"),
                    expected: format!(
                        "0..={capacity} keys (max_pages_per_seq * page_size = {} * {})",
                        self.max_pages_per_seq, self.page_size
                    ),
                });
            }
            let used = (len as usize).div_ceil(self.page_size);
            let row = &self.block_table[b * self.max_pages_per_seq..][..used];
            for (p, &page) in row.iter().enumerate() {
                if page < 0 || page as usize >= self.num_pages {
                    return Err(Error::InvalidArgument {
                        arg: "block_table",
                        value: format!("block_table[{b}][{p}] = {page}"),
                        expected: format!(
                            "a page in 0..{} (sequence {b} reads {used} pages)",
                            self.num_pages
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    /// Validates the description and the lengths of the two caches.
    fn check_cache(&self, k_cache: usize, v_cache: usize) -> Result<()> {
        self.validate()?;
        let want = self.cache_len().unwrap_or(0);
        let formula = "num_pages * page_size * heads_kv * head_dim";
        check_len("k_cache.len", k_cache, want, formula)?;
        check_len("v_cache.len", v_cache, want, formula)
    }

    /// Sequence `b`'s keys (or values) from `cache`, dense `[seqlen_k(b), heads_kv, head_dim]`;
    /// the description and `cache`'s length must have been checked.
    fn gather<E: Copy>(&self, cache: &[E], b: usize) -> Vec<E> {
        let (d, hk, ps) = (self.head_dim, self.heads_kv, self.page_size);
        let table = &self.block_table[b * self.max_pages_per_seq..];
        let mut dense = Vec::with_capacity(self.seqlen_k(b) * hk * d);
        for j in 0..self.seqlen_k(b) {
            let page = table[j / ps] as usize;
            for h in 0..hk {
                let o = self.cache_offset(page, j % ps, h);
                dense.extend_from_slice(&cache[o..o + d]);
            }
        }
        dense
    }
}

/// The keys and values of sequence `seq` gathered from a paged cache into dense
/// `[cache_seqlens[seq], heads_kv, head_dim]` arrays (the `k` and `v` of the dense reference
/// for that sequence, batch 1).
///
/// # Errors
///
/// Those of [`PagedShape::validate`]; [`Error::InvalidArgument`] with `k_cache.len` or
/// `v_cache.len` when a cache does not hold `num_pages * page_size * heads_kv * head_dim`
/// elements, and with `seq` when `seq >= batch`.
pub fn paged_gather<T: Copy>(
    shape: &PagedShape,
    k_cache: &[T],
    v_cache: &[T],
    seq: usize,
) -> Result<(Vec<T>, Vec<T>)> {
    shape.check_cache(k_cache.len(), v_cache.len())?;
    if seq >= shape.batch {
        return Err(Error::InvalidArgument {
            arg: "seq",
            value: seq.to_string(),
            expected: format!("a sequence in 0..{}", shape.batch),
        });
    }
    Ok((shape.gather(k_cache, seq), shape.gather(v_cache, seq)))
}

/// Runs `run` on each sequence of a paged problem, on its gathered keys and values, and
/// scatters the results into the dense output layout; `dtype` as for [`varlen_run`].
fn paged_run<E: Copy>(
    shape: &PagedShape,
    q: &[E],
    k_cache: &[E],
    v_cache: &[E],
    dtype: Option<DType>,
    mut run: impl FnMut(&RefShape, &[E], &[E], &[E]) -> Result<RefOutput>,
) -> Result<RefOutput> {
    shape.check_cache(k_cache.len(), v_cache.len())?;
    let q_len = shape.q_len().unwrap_or(0);
    check_len(
        "q.len",
        q.len(),
        q_len,
        "batch * seqlen_q * heads_q * head_dim",
    )?;
    let q_seq = shape.seqlen_q * shape.heads_q * shape.head_dim;
    let lse_seq = shape.heads_q * shape.seqlen_q;
    let mut out = vec![0.0f64; q_len];
    let mut unrounded = if dtype.is_some() {
        vec![0.0f64; q_len]
    } else {
        Vec::new()
    };
    let mut spread = unrounded.clone();
    let mut lse = vec![f64::NEG_INFINITY; shape.batch * lse_seq];
    for b in 0..shape.batch {
        let (k, v) = (shape.gather(k_cache, b), shape.gather(v_cache, b));
        let qs = b * q_seq..(b + 1) * q_seq;
        let r = run(&shape.ref_shape(b), &q[qs.clone()], &k, &v)?;
        out[qs.clone()].copy_from_slice(&r.out);
        if !unrounded.is_empty() {
            unrounded[qs.clone()].copy_from_slice(&r.unrounded);
            spread[qs].copy_from_slice(&r.spread);
        }
        lse[b * lse_seq..(b + 1) * lse_seq].copy_from_slice(&r.lse);
    }
    Ok(RefOutput {
        out,
        lse,
        unrounded,
        spread,
        dtype,
    })
}

/// [`attention_f64`] over a paged key/value cache (`flash_attn_with_kvcache` with a block
/// table).
///
/// Sequence `b`'s queries attend its `cache_seqlens[b]` keys exactly as [`attention_f64`] does
/// at `seqlen_k = cache_seqlens[b]` on the keys [`paged_gather`] returns: the mask aligns
/// bottom-right, so the queries are the last `seqlen_q` positions of the sequence (causal
/// decoding). Output `[batch, seqlen_q, heads_q, head_dim]`, log-sum-exp `[batch, heads_q,
/// seqlen_q]`. A sequence with no key in the cache has output 0 and log-sum-exp `-inf`.
///
/// # Errors
///
/// Those of [`paged_gather`] (but not `seq`), and [`Error::InvalidArgument`] with `q.len` when
/// `q` does not hold `batch * seqlen_q * heads_q * head_dim` elements.
pub fn paged_attention_f64(
    shape: &PagedShape,
    q: &[f64],
    k_cache: &[f64],
    v_cache: &[f64],
    mask: &MaskSpec,
    scale: f64,
) -> Result<RefOutput> {
    paged_run(shape, q, k_cache, v_cache, None, |s, q, k, v| {
        attention_f64(s, q, k, v, mask, scale)
    })
}

/// [`attention_lowp`] over a paged key/value cache: the naive low-precision implementation of
/// [`paged_attention_f64`]'s problem, with the output before its final rounding in
/// [`RefOutput::unrounded`] and `dtype` set to `T`'s.
///
/// # Errors
///
/// As [`paged_attention_f64`].
pub fn paged_attention_lowp<T: Element>(
    shape: &PagedShape,
    q: &[T],
    k_cache: &[T],
    v_cache: &[T],
    mask: &MaskSpec,
    scale: f32,
) -> Result<RefOutput> {
    paged_run(shape, q, k_cache, v_cache, Some(T::DTYPE), |s, q, k, v| {
        attention_lowp(s, q, k, v, mask, scale)
    })
}
