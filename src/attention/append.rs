//! KV append: writes new tokens' keys and values into a KV cache (paged or contiguous, as
//! [`Attention::decode`] reads it), at each sequence's current length, the keys optionally
//! rotated to their positions on the way (for caches that store rotated keys; a cache read by
//! [`Attention::decode_rope`] stores them as they are).
//!
//! Token `t` of sequence `b` goes to slot `cache_seqlens[b] + t`: row `slot % page_size` of page
//! `block_table[b][slot / page_size]`, or row `slot` of batch entry `b` of a contiguous cache.
//! `cache_seqlens` is read, not updated (the caller advances it, as with FlashAttention's
//! `flash_attn_with_kvcache`). Appending into a page that other sequences share changes it for
//! them too.
//!
//! The lengths and table entries live on the device: a token whose slot falls outside the
//! sequence's capacity, or whose page entry is not a page of the cache, is not written and sets
//! the optional error flag.

use std::sync::Arc;

use cudarc::driver::{
    sys, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, LaunchConfig,
};

use super::decode::{cache_capacity, BlockTable};
use super::rope::{RawRope, RopeTables};
use super::Attention;
use crate::check::{aligned, byte_range, mismatch, overlaps};
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::rope::RopeOptions;
use crate::sys::{LfAppendParams, LfRope};

/// A KV cache to write into: the mutable counterpart of [`KvCache`](super::KvCache).
pub struct KvCacheMut<'a, 'b, T> {
    /// Cached keys: pages `[num_pages, page_size, heads_kv, head_dim]` with a block table,
    /// `[batch, capacity, heads_kv, head_dim]` without.
    pub k: &'a mut CudaViewMut<'b, T>,
    /// Layout of the keys.
    pub k_layout: Layout,
    /// Cached values.
    pub v: &'a mut CudaViewMut<'b, T>,
    /// Layout of the values, the same shape as the keys'.
    pub v_layout: Layout,
    /// The block table of a paged cache, `None` for a contiguous one.
    pub block_table: Option<BlockTable<'a, 'b>>,
    /// Keys each sequence holds before the append, `[batch]` i32 (where the new tokens go).
    pub cache_seqlens: &'a CudaView<'b, i32>,
}

/// Arguments of the raw KV append.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RawAppend {
    /// Element type of the new tokens and the cache.
    pub dtype: DType,
    /// New keys, `[batch, seqlen_new, heads_kv, head_dim]`.
    pub k_new: sys::CUdeviceptr,
    /// New values, the same shape.
    pub v_new: sys::CUdeviceptr,
    /// Key cache.
    pub k_cache: sys::CUdeviceptr,
    /// Value cache.
    pub v_cache: sys::CUdeviceptr,
    /// Layout of `k_new`.
    pub k_new_layout: Layout,
    /// Layout of `v_new`.
    pub v_new_layout: Layout,
    /// Layout of the key cache (as [`KvCacheMut::k_layout`]).
    pub k_cache_layout: Layout,
    /// Layout of the value cache.
    pub v_cache_layout: Layout,
    /// Device pointer to the `[batch, max_pages_per_seq]` i32 block table, or 0 for a
    /// contiguous cache.
    pub block_table: sys::CUdeviceptr,
    /// Columns of the block table (ignored without one).
    pub max_pages_per_seq: usize,
    /// Device pointer to `batch` i32 cache lengths (required).
    pub cache_seqlens: sys::CUdeviceptr,
    /// Device pointer to an i32 the kernel ORs 1 into for a token it could not place, or 0.
    pub error_flag: sys::CUdeviceptr,
}

impl RawAppend {
    /// Checks everything that can be checked without reading device values and lowers the call;
    /// `rope`, when given, rotates the keys (its mode, window and key workspaces are not used).
    pub fn validate(&self, rope: Option<&RawRope>) -> Result<LfAppendParams> {
        let (kn, vn, kc, vc) = (
            &self.k_new_layout,
            &self.v_new_layout,
            &self.k_cache_layout,
            &self.v_cache_layout,
        );
        kn.check_dims("k_new")?;
        vn.check_dims("v_new")?;
        kc.check_dims("k")?;
        vc.check_dims("v")?;
        let d = kn.head_dim;
        if d % 2 != 0 || d > 256 {
            return Err(Error::InvalidArgument {
                arg: "k_new.head_dim",
                value: d.to_string(),
                expected: "an even head dim up to 256".into(),
            });
        }
        for (arg, l) in [("v_new", vn), ("k", kc), ("v", vc)] {
            mismatch(
                match arg {
                    "v_new" => "v_new.head_dim",
                    "k" => "k.head_dim",
                    _ => "v.head_dim",
                },
                l.head_dim,
                "k_new.head_dim",
                d,
            )?;
        }
        mismatch("v_new.batch", vn.batch, "k_new.batch", kn.batch)?;
        mismatch("v_new.seqlen", vn.seqlen, "k_new.seqlen", kn.seqlen)?;
        mismatch("v_new.heads", vn.heads, "k_new.heads", kn.heads)?;
        mismatch("k.heads", kc.heads, "k_new.heads", kn.heads)?;
        mismatch("v.batch", vc.batch, "k.batch", kc.batch)?;
        mismatch("v.seqlen", vc.seqlen, "k.seqlen", kc.seqlen)?;
        mismatch("v.heads", vc.heads, "k.heads", kc.heads)?;
        let paged = self.block_table != 0;
        if !paged {
            mismatch("k.batch", kc.batch, "k_new.batch", kn.batch)?;
        }
        let capacity = cache_capacity(kc, paged, self.max_pages_per_seq, 1)?;
        let threads =
            (kn.batch as u128) * (kn.seqlen as u128) * (kn.heads as u128) * (d as u128 / 2);
        if threads > 256 * i32::MAX as u128 || kn.seqlen > i32::MAX as usize {
            return Err(Error::InvalidArgument {
                arg: "k_new",
                value: format!("{threads} element pairs"),
                expected: "at most 256 * i32::MAX (the launch's grid)".into(),
            });
        }
        aligned("cache_seqlens.ptr", self.cache_seqlens, 4, true)?;
        for (arg, ptr) in [
            ("block_table.ptr", self.block_table),
            ("error_flag.ptr", self.error_flag),
        ] {
            aligned(arg, ptr, 4, false)?;
        }
        for (arg, ptr) in [
            ("k_new.ptr", self.k_new),
            ("v_new.ptr", self.v_new),
            ("k.ptr", self.k_cache),
            ("v.ptr", self.v_cache),
        ] {
            aligned(arg, ptr, 2, true)?;
        }
        // The caches are written: neither may overlap itself, the other, or an input.
        for (arg, l) in [("k", kc), ("v", vc)] {
            if !l.is_non_overlapping() {
                return Err(Error::OverlappingOutput { arg });
            }
        }
        let (kr, vr) = (
            byte_range(self.k_cache, kc, 2),
            byte_range(self.v_cache, vc, 2),
        );
        if overlaps(kr, vr) {
            return Err(Error::Aliasing {
                output: "v",
                other: "k",
            });
        }
        for (out, r) in [("k", kr), ("v", vr)] {
            for (other, ptr, l) in [("k_new", self.k_new, kn), ("v_new", self.v_new, vn)] {
                if overlaps(r, byte_range(ptr, l, 2)) {
                    return Err(Error::Aliasing { output: out, other });
                }
            }
        }
        let (rotate, lf_rope) = match rope {
            Some(r) => (1, r.lower_rotation(d)?),
            None => (0, LfRope::default()),
        };
        Ok(LfAppendParams {
            k_new: self.k_new as *const _,
            v_new: self.v_new as *const _,
            k_cache: self.k_cache as *mut _,
            v_cache: self.v_cache as *mut _,
            block_table: self.block_table as *const i32,
            cache_seqlens: self.cache_seqlens as *const i32,
            error_flag: self.error_flag as *mut i32,
            k_new_batch_stride: kn.batch_stride,
            k_new_row_stride: kn.seq_stride,
            k_new_head_stride: kn.head_stride,
            v_new_batch_stride: vn.batch_stride,
            v_new_row_stride: vn.seq_stride,
            v_new_head_stride: vn.head_stride,
            k_page_stride: kc.batch_stride,
            k_row_stride: kc.seq_stride,
            k_head_stride: kc.head_stride,
            v_page_stride: vc.batch_stride,
            v_row_stride: vc.seq_stride,
            v_head_stride: vc.head_stride,
            block_table_stride: if paged {
                self.max_pages_per_seq as i64
            } else {
                0
            },
            batch: kn.batch as i32,
            seqlen_new: kn.seqlen as i32,
            heads_kv: kn.heads as i32,
            head_dim: d as i32,
            num_pages: if paged { kc.batch as i32 } else { 0 },
            page_size: if paged { kc.seqlen as i32 } else { 1 },
            page_shift: if paged {
                kc.seqlen.trailing_zeros() as i32
            } else {
                0
            },
            capacity: capacity as i32,
            rotate,
            reserved: 0,
            rope: lf_rope,
        })
    }
}

impl Attention {
    /// Writes `k_new` and `v_new` (`[batch, seqlen_new, heads_kv, head_dim]`) into `cache` at
    /// each sequence's length (see the [module](self) docs), the keys as they are. Validated
    /// before launch; tokens the device values would place outside the cache are skipped and
    /// reported through `error_flag`. The call does not synchronize.
    pub fn append_kv<T: Element>(
        &self,
        stream: &Arc<CudaStream>,
        k_new: (&CudaView<'_, T>, Layout),
        v_new: (&CudaView<'_, T>, Layout),
        cache: &mut KvCacheMut<'_, '_, T>,
        error_flag: Option<&mut CudaViewMut<'_, i32>>,
    ) -> Result<()> {
        self.append_views(stream, k_new, v_new, cache, error_flag, None)
    }

    /// [`append_kv`](Self::append_kv) with the keys rotated to their positions (`rope`'s
    /// configuration and position offsets: key `slot` of sequence `b` at `off_b + slot`), for
    /// caches that store rotated keys. The table is that of the configuration at the cache's
    /// capacity plus the largest offset.
    pub fn append_kv_rope<T: Element>(
        &self,
        stream: &Arc<CudaStream>,
        k_new: (&CudaView<'_, T>, Layout),
        v_new: (&CudaView<'_, T>, Layout),
        cache: &mut KvCacheMut<'_, '_, T>,
        error_flag: Option<&mut CudaViewMut<'_, i32>>,
        rope: &RopeOptions,
    ) -> Result<()> {
        self.append_views(stream, k_new, v_new, cache, error_flag, Some(rope))
    }

    fn append_views<T: Element>(
        &self,
        stream: &Arc<CudaStream>,
        (kn, kn_layout): (&CudaView<'_, T>, Layout),
        (vn, vn_layout): (&CudaView<'_, T>, Layout),
        cache: &mut KvCacheMut<'_, '_, T>,
        error_flag: Option<&mut CudaViewMut<'_, i32>>,
        rope: Option<&RopeOptions>,
    ) -> Result<()> {
        self.same_context("stream", stream.context().cu_ctx())?;
        self.check_view("k_new", kn, &kn_layout)?;
        self.check_view("v_new", vn, &vn_layout)?;
        self.check_view("k", &*cache.k, &cache.k_layout)?;
        self.check_view("v", &*cache.v, &cache.v_layout)?;
        let batch = kn_layout.batch;
        self.check_cache_indices(
            batch,
            cache.block_table.as_ref(),
            Some(cache.cache_seqlens),
            error_flag.as_deref(),
        )?;
        let tables = match rope {
            Some(r) => {
                let capacity = match &cache.block_table {
                    Some(bt) => bt.max_pages_per_seq.saturating_mul(cache.k_layout.seqlen),
                    None => cache.k_layout.seqlen,
                };
                r.validate(kn_layout.head_dim, batch, 1, capacity.max(1))?;
                Some(RopeTables::upload(
                    stream,
                    r,
                    kn_layout.head_dim,
                    capacity.max(1) + r.max_offset() as usize,
                )?)
            }
            None => None,
        };
        let raw_rope = match (rope, &tables) {
            (Some(r), Some(t)) => Some(t.raw(stream, r, (0, 0))),
            _ => None,
        };
        let (knp, _g1) = kn.device_ptr(stream);
        let (vnp, _g2) = vn.device_ptr(stream);
        let (kcp, _g3) = cache.k.device_ptr_mut(stream);
        let (vcp, _g4) = cache.v.device_ptr_mut(stream);
        let (csp, _g5) = cache.cache_seqlens.device_ptr(stream);
        let (btp, _g6) = match &cache.block_table {
            Some(bt) => {
                let (p, g) = bt.table.device_ptr(stream);
                (p, Some(g))
            }
            None => (0, None),
        };
        let (fp, _g7) = match error_flag {
            Some(f) => {
                let (p, g) = f.device_ptr_mut(stream);
                (p, Some(g))
            }
            None => (0, None),
        };
        let args = RawAppend {
            dtype: T::DTYPE,
            k_new: knp,
            v_new: vnp,
            k_cache: kcp,
            v_cache: vcp,
            k_new_layout: kn_layout,
            v_new_layout: vn_layout,
            k_cache_layout: cache.k_layout,
            v_cache_layout: cache.v_layout,
            block_table: btp,
            max_pages_per_seq: cache.block_table.map_or(0, |bt| bt.max_pages_per_seq),
            cache_seqlens: csp,
            error_flag: fp,
        };
        // SAFETY: every buffer was checked against its layout (the lengths and the table against
        // the entries the kernel reads) and context, and is guarded for the stream while this
        // runs; the rotation's tables were copied above on this stream and outlive the call.
        unsafe {
            self.append_kv_raw(
                stream.cu_stream(),
                &args,
                raw_rope.as_ref().map(|(r, _, _)| r),
            )
        }
    }

    /// The KV append from raw pointers (see the [module](self) docs): validates everything
    /// [`RawAppend::validate`] can, then launches one thread per (sequence, token, KV head,
    /// element pair); with `rope` the keys are rotated (its mode, window and key workspaces are
    /// not used).
    ///
    /// # Safety
    /// - `stream` is a stream of this value's context (or null for its legacy default stream).
    /// - Every pointer in `args` is device memory of that context holding every element its
    ///   layout addresses (`cache_seqlens` `batch` i32, the block table, when not 0,
    ///   `batch * max_pages_per_seq` i32, `error_flag`, when not 0, one i32); `rope`'s tables
    ///   as in [`forward_rope_raw`](Self::forward_rope_raw). All stay allocated, and nothing else
    ///   reads or writes the caches, until the kernel has finished. The device values may be
    ///   anything: a token they would place outside the cache is not written.
    pub unsafe fn append_kv_raw(
        &self,
        stream: sys::CUstream,
        args: &RawAppend,
        rope: Option<&RawRope>,
    ) -> Result<()> {
        let mut params = args.validate(rope)?;
        let dt = args.dtype.name();
        let module = format!("append_kv_{dt}");
        // SAFETY: the context is kept alive by `_owner` or by the caller of from_raw_context.
        let kernel = unsafe { self.cache.kernel(&module, &format!("lf_{module}"), 0) }?;
        let l = &args.k_new_layout;
        let pairs = (l.batch * l.seqlen * l.heads * l.head_dim / 2) as u64;
        // SAFETY: validated parameters (LfAppendParams from params.h); one thread per (sequence,
        // token, KV head, pair), covered once; pointers and stream per this fn's contract.
        unsafe {
            self.launch(
                &kernel,
                LaunchConfig {
                    grid_dim: (pairs.div_ceil(256) as u32, 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                },
                stream,
                &mut params,
                "launching the KV append kernel",
            )
        }
    }
}
