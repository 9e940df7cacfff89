//! Memory buffers: a memory layer's memory on the device, preallocated, that a window's raw keys
//! and values are appended to (cast from f32 or copied, with their mask) instead of the whole
//! memory being concatenated again for every window. FoT's released code appends every window
//! and never evicts (`long_llama`'s `LongLlamaMemCache` grows by concatenation); a buffer grows the
//! same way ([`MemoryGrowth::Grow`]: the capacity doubles when full), or, a generalization, keeps
//! the newest `capacity` entries ([`MemoryGrowth::EvictOldest`]: a ring, each append over the
//! oldest entries). The memory layer attends every entry in one softmax, so the ring's order does
//! not change its result; the top-k path's ties go to the lower buffer slot, not the older entry.
//!
//! Keys and values are `[batch, capacity, heads_kv, head_dim]`, the mask `[batch, capacity]`
//! bytes; [`MemoryBuffer::views`] gives the held entries as the memory calls take them
//! (`[batch, len, heads_kv, head_dim]` with the capacity's batch stride; the mask `[batch, len]`,
//! kept contiguous by a copy after appends while a batch of several sequences is not full, and
//! only once an append has given one).

use std::sync::Arc;

use cudarc::driver::{
    sys, CudaSlice, CudaStream, CudaView, DevicePtr, DevicePtrMut, DeviceRepr, DeviceSlice,
    LaunchConfig,
};

use super::{Input, MemoryInput};
use crate::attention::Attention;
use crate::check::{aligned, mismatch};
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::sys::LfMemoryAppendParams;

/// What an append does when the buffer is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryGrowth {
    /// Reallocate at twice the capacity (or what the append needs), copying the held entries:
    /// FoT's memory, which keeps every window.
    Grow,
    /// Write over the oldest entries: the buffer keeps the newest `capacity` entries.
    EvictOldest,
}

/// Element types a window may be appended from: the buffer's own type, or f32 (cast on the way).
pub trait AppendSource: DeviceRepr + Copy + 'static {
    /// The kernel's name for the type.
    #[doc(hidden)]
    const NAME: &'static str;
    /// Bytes per element.
    #[doc(hidden)]
    const BYTES: usize;
}

impl AppendSource for f32 {
    const NAME: &'static str = "f32";
    const BYTES: usize = 4;
}
impl AppendSource for half::f16 {
    const NAME: &'static str = "f16";
    const BYTES: usize = 2;
}
impl AppendSource for half::bf16 {
    const NAME: &'static str = "bf16";
    const BYTES: usize = 2;
}

/// A memory layer's memory on the device (see the [module](self) docs).
pub struct MemoryBuffer<T> {
    keys: CudaSlice<T>,
    values: CudaSlice<T>,
    mask: CudaSlice<u8>,
    /// `[batch, len]` copy of the mask's held entries, while `batch > 1` and `len < capacity`.
    compact: Option<CudaSlice<u8>>,
    batch: usize,
    heads_kv: usize,
    head_dim: usize,
    capacity: usize,
    len: usize,
    /// The slot the next entry goes to (`len` until a ring wraps).
    next: usize,
    growth: MemoryGrowth,
    /// Whether an append since the last clear gave a mask.
    masked: bool,
}

/// The held entries of a [`MemoryBuffer`] as views (see [`MemoryBuffer::views`]).
pub struct MemoryViews<'a, T> {
    /// The keys, laid out as [`layout`](Self::layout) says.
    pub keys: CudaView<'a, T>,
    /// The values, the keys' layout.
    pub values: CudaView<'a, T>,
    /// `[batch, len]` visibility bytes; `None` when no append gave a mask (every entry visible),
    /// so that the call that takes no mask (the two-pass path) takes the memory.
    pub mask: Option<CudaView<'a, u8>>,
    /// `[batch, len, heads_kv, head_dim]` with the buffer's strides.
    pub layout: Layout,
}

impl<T> MemoryViews<'_, T> {
    /// The memory as the memory-attention calls take it.
    pub fn input(&self) -> MemoryInput<'_, '_, T> {
        MemoryInput {
            keys: Input {
                data: &self.keys,
                layout: self.layout,
            },
            values: Input {
                data: &self.values,
                layout: self.layout,
            },
            mask: self.mask.as_ref(),
        }
    }
}

fn bad(arg: &'static str, value: impl ToString, expected: impl Into<String>) -> Error {
    Error::InvalidArgument {
        arg,
        value: value.to_string(),
        expected: expected.into(),
    }
}

impl<T: Element> MemoryBuffer<T> {
    /// An empty buffer on `stream`'s device for `batch` sequences of `heads_kv` heads of
    /// `head_dim` (even, at most 256), room for `capacity` entries each (at least 1), zeroed.
    pub fn new(
        stream: &Arc<CudaStream>,
        batch: usize,
        heads_kv: usize,
        head_dim: usize,
        capacity: usize,
        growth: MemoryGrowth,
    ) -> Result<Self> {
        for (dim, v) in [
            ("batch", batch),
            ("heads_kv", heads_kv),
            ("head_dim", head_dim),
            ("capacity", capacity),
        ] {
            if v == 0 {
                return Err(Error::ZeroSized { arg: "memory", dim });
            }
        }
        if head_dim % 2 != 0 || head_dim > 256 {
            return Err(bad("head_dim", head_dim, "an even head dim up to 256"));
        }
        check_capacity(capacity)?;
        let (keys, values, mask) = alloc(stream, batch, heads_kv, head_dim, capacity)?;
        Ok(MemoryBuffer {
            keys,
            values,
            mask,
            compact: None,
            batch,
            heads_kv,
            head_dim,
            capacity,
            len: 0,
            next: 0,
            growth,
            masked: false,
        })
    }

    /// Entries held per sequence.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no entry.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Entries the buffer has room for per sequence.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets every entry (keeps the allocation).
    pub fn clear(&mut self) {
        self.len = 0;
        self.next = 0;
        self.masked = false;
    }

    /// The layout of the held entries' keys and values.
    pub fn layout(&self) -> Layout {
        let row = (self.heads_kv * self.head_dim) as i64;
        Layout {
            batch: self.batch,
            seqlen: self.len,
            heads: self.heads_kv,
            head_dim: self.head_dim,
            batch_stride: row * self.capacity as i64,
            seq_stride: row,
            head_stride: self.head_dim as i64,
        }
    }

    /// The held entries as views (slot order: with [`MemoryGrowth::EvictOldest`] a wrapped ring
    /// starts anywhere).
    pub fn views(&self) -> MemoryViews<'_, T> {
        let n = (self.batch * self.len).max(1);
        let mask = self.masked.then(|| match &self.compact {
            Some(c) if self.batch > 1 && self.len < self.capacity => c.slice(0..n),
            _ => self.mask.slice(0..n),
        });
        MemoryViews {
            keys: self.keys.as_view(),
            values: self.values.as_view(),
            mask,
            layout: self.layout(),
        }
    }
}

fn check_capacity(capacity: usize) -> Result<()> {
    if capacity > super::MAX_MEM_LEN {
        return Err(bad(
            "capacity",
            capacity,
            format!("at most {} entries", super::MAX_MEM_LEN),
        ));
    }
    Ok(())
}

type Allocs<T> = (CudaSlice<T>, CudaSlice<T>, CudaSlice<u8>);

fn alloc<T: Element>(
    stream: &Arc<CudaStream>,
    batch: usize,
    heads_kv: usize,
    head_dim: usize,
    capacity: usize,
) -> Result<Allocs<T>> {
    let n = batch
        .checked_mul(capacity)
        .and_then(|x| x.checked_mul(heads_kv * head_dim))
        .ok_or_else(|| bad("capacity", capacity, "a buffer that fits in memory"))?;
    let a = |what| Error::driver(what);
    Ok((
        stream
            .alloc_zeros::<T>(n)
            .map_err(a("allocating the memory's keys"))?,
        stream
            .alloc_zeros::<T>(n)
            .map_err(a("allocating the memory's values"))?,
        stream
            .alloc_zeros::<u8>(batch * capacity)
            .map_err(a("allocating the memory's mask"))?,
    ))
}

/// A 2D copy on `stream`: `height` rows of `width` bytes, device to device.
///
/// # Safety
/// `src` and `dst` address `height` rows of at least `width` bytes at their pitches, device
/// memory of the stream's context that nothing else touches until the copy has run, not
/// overlapping.
unsafe fn copy_2d(
    stream: &CudaStream,
    (dst, dst_pitch): (sys::CUdeviceptr, usize),
    (src, src_pitch): (sys::CUdeviceptr, usize),
    width: usize,
    height: usize,
) -> Result<()> {
    if width == 0 || height == 0 {
        return Ok(());
    }
    let copy = sys::CUDA_MEMCPY2D {
        srcXInBytes: 0,
        srcY: 0,
        srcMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
        srcHost: std::ptr::null(),
        srcDevice: src,
        srcArray: std::ptr::null_mut(),
        srcPitch: src_pitch,
        dstXInBytes: 0,
        dstY: 0,
        dstMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
        dstHost: std::ptr::null_mut(),
        dstDevice: dst,
        dstArray: std::ptr::null_mut(),
        dstPitch: dst_pitch,
        WidthInBytes: width,
        Height: height,
    };
    // SAFETY: this fn's contract; `copy` describes device memory only.
    unsafe { sys::cuMemcpy2DAsync_v2(&copy, stream.cu_stream()) }
        .result()
        .map_err(Error::driver("copying the memory buffer"))
}

impl Attention {
    /// Appends a window's raw keys and values (`[batch, window, heads_kv, head_dim]`, any
    /// element strides, the buffer's type or f32, cast to the buffer's type) and its mask
    /// (`[batch, window]` bytes, 0 for an entry no query sees; `None`: every entry visible) to
    /// `buffer` on `stream`. A full buffer grows or evicts as its [`MemoryGrowth`] says; a window
    /// longer than an evicting buffer's capacity leaves its last `capacity` entries. Nothing
    /// waits; an empty window changes nothing.
    pub fn memory_append<T: Element, S: AppendSource>(
        &self,
        stream: &Arc<CudaStream>,
        buffer: &mut MemoryBuffer<T>,
        keys: Input<'_, '_, S>,
        values: Input<'_, '_, S>,
        mask: Option<&CudaView<'_, u8>>,
    ) -> Result<()> {
        self.same_context("stream", stream.context().cu_ctx())?;
        self.same_context("buffer", buffer.keys.stream().context().cu_ctx())?;
        if S::NAME != "f32" && S::NAME != T::DTYPE.name() {
            return Err(bad(
                "keys",
                S::NAME,
                format!("{} (the buffer's type) or f32", T::DTYPE.name()),
            ));
        }
        let (kl, vl) = (keys.layout, values.layout);
        for (arg, l) in [("keys", &kl), ("values", &vl)] {
            mismatch(
                if arg == "keys" {
                    "keys.batch"
                } else {
                    "values.batch"
                },
                l.batch,
                "buffer.batch",
                buffer.batch,
            )?;
            mismatch(
                if arg == "keys" {
                    "keys.heads"
                } else {
                    "values.heads"
                },
                l.heads,
                "buffer.heads_kv",
                buffer.heads_kv,
            )?;
            mismatch(
                if arg == "keys" {
                    "keys.head_dim"
                } else {
                    "values.head_dim"
                },
                l.head_dim,
                "buffer.head_dim",
                buffer.head_dim,
            )?;
        }
        mismatch("values.seqlen", vl.seqlen, "keys.seqlen", kl.seqlen)?;
        self.check_view("keys", keys.data, &kl)?;
        self.check_view("values", values.data, &vl)?;
        let window = kl.seqlen;
        if window == 0 {
            return Ok(());
        }
        if window > i32::MAX as usize {
            return Err(bad("keys.seqlen", window, "at most i32::MAX rows"));
        }
        // Pairs of elements are moved at once: even strides, pointers of two elements.
        let (kp, _g1) = keys.data.device_ptr(stream);
        let (vp, _g2) = values.data.device_ptr(stream);
        for (arg, ptr) in [("keys.ptr", kp), ("values.ptr", vp)] {
            aligned(arg, ptr, 2 * S::BYTES as u64, true)?;
        }
        for (tensor, l) in [("keys", &kl), ("values", &vl)] {
            crate::check::strides_multiple_of(tensor, l, 2)?;
        }
        if let Some(m) = mask {
            self.same_context("mask", m.stream().context().cu_ctx())?;
            let need = (buffer.batch * window) as u128;
            if need > m.len() as u128 {
                return Err(Error::OutOfBounds {
                    arg: "mask",
                    required: need,
                    len: m.len(),
                });
            }
        }
        // Room: grow, or keep the window's last `capacity` rows over the oldest entries.
        let mut skip = 0;
        if buffer.len + window > buffer.capacity {
            match buffer.growth {
                MemoryGrowth::Grow => {
                    let cap = (buffer.len + window).max(2 * buffer.capacity);
                    check_capacity(cap)?;
                    self.grow(stream, buffer, cap)?;
                }
                MemoryGrowth::EvictOldest => skip = window.saturating_sub(buffer.capacity),
            }
        }
        let rows = window - skip;
        let cap = buffer.capacity;
        let slot = buffer.next;
        let row = (buffer.heads_kv * buffer.head_dim) as i64;
        let mut params = LfMemoryAppendParams {
            src_k: kp as *const _,
            src_v: vp as *const _,
            dst_k: std::ptr::null_mut(),
            dst_v: std::ptr::null_mut(),
            src_k_batch_stride: kl.batch_stride,
            src_k_row_stride: kl.seq_stride,
            src_k_head_stride: kl.head_stride,
            src_v_batch_stride: vl.batch_stride,
            src_v_row_stride: vl.seq_stride,
            src_v_head_stride: vl.head_stride,
            dst_batch_stride: row * cap as i64,
            dst_row_stride: row,
            dst_head_stride: buffer.head_dim as i64,
            batch: buffer.batch as i32,
            rows: rows as i32,
            heads: buffer.heads_kv as i32,
            head_dim: buffer.head_dim as i32,
            src_row0: skip as i32,
            dst_row0: slot as i32,
            dst_rows: cap as i32,
            reserved: 0,
        };
        let module = format!("memory_append_{}", T::DTYPE.name());
        let name = format!("lf_memory_append_{}_{}", S::NAME, T::DTYPE.name());
        // SAFETY: the context is kept alive by `_owner` or by the caller of from_raw_context.
        let kernel = unsafe { self.cache.kernel(&module, &name, 0) }?;
        let threads = (buffer.head_dim / 2).next_multiple_of(32).min(128) as u32;
        let config = LaunchConfig {
            grid_dim: (rows as u32, buffer.heads_kv as u32, buffer.batch as u32),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        {
            let (dk, _g3) = buffer.keys.device_ptr_mut(stream);
            let (dv, _g4) = buffer.values.device_ptr_mut(stream);
            params.dst_k = dk as *mut _;
            params.dst_v = dv as *mut _;
            // SAFETY: the window's views were checked against their layouts (every row the
            // kernel reads is inside them) and the buffer's rows (dst_row0 + t) % capacity are
            // inside its allocation; the window cannot alias the buffer (it is borrowed mutably
            // here); the guards order the launch against other streams.
            unsafe {
                self.launch(
                    &kernel,
                    config,
                    stream.cu_stream(),
                    &mut params,
                    "launching the memory append",
                )
            }?;
        }
        // The mask's new bytes: per sequence, slots [slot, slot + rows) around the ring.
        let first = rows.min(cap - slot);
        let parts = [(slot, skip, first), (0, skip + first, rows - first)];
        {
            let (mp, _g5) = buffer.mask.device_ptr_mut(stream);
            let src = mask.map(|m| m.device_ptr(stream));
            for (to, from, width) in parts {
                if width == 0 {
                    continue;
                }
                match &src {
                    // SAFETY: `batch` rows of `width` bytes at pitch `cap` from slot `to` stay
                    // inside the [batch, capacity] mask; the source rows at pitch `window` from
                    // `from` inside the checked [batch, window] mask; they do not overlap.
                    Some((sp, _)) => unsafe {
                        copy_2d(
                            stream,
                            (mp + to as u64, cap),
                            (sp + from as u64, window),
                            width,
                            buffer.batch,
                        )
                    }?,
                    // SAFETY: as above, the destination only.
                    None => unsafe {
                        sys::cuMemsetD2D8Async(
                            mp + to as u64,
                            cap,
                            1,
                            width,
                            buffer.batch,
                            stream.cu_stream(),
                        )
                    }
                    .result()
                    .map_err(Error::driver("setting the memory's mask"))?,
                }
            }
        }
        buffer.len = (buffer.len + rows).min(cap);
        buffer.next = (slot + rows) % cap;
        buffer.masked |= mask.is_some();
        // Several sequences, not full: the mask's held entries copied contiguous.
        if buffer.masked && buffer.batch > 1 && buffer.len < cap {
            if buffer.compact.is_none() {
                buffer.compact = Some(
                    stream
                        .alloc_zeros::<u8>(buffer.batch * cap)
                        .map_err(Error::driver("allocating the memory's mask"))?,
                );
            }
            let len = buffer.len;
            let (mp, _g6) = buffer.mask.device_ptr(stream);
            let compact = buffer.compact.as_mut().expect("allocated above");
            let (cp, _g7) = compact.device_ptr_mut(stream);
            // SAFETY: `batch` rows of `len` bytes, at pitch `cap` in the mask and `len` in the
            // compact copy, both [batch, capacity] allocations of this context.
            unsafe { copy_2d(stream, (cp, len), (mp, cap), len, buffer.batch) }?;
        }
        Ok(())
    }

    /// Reallocates `buffer` at `cap` entries per sequence, its held entries copied.
    fn grow<T: Element>(
        &self,
        stream: &Arc<CudaStream>,
        buffer: &mut MemoryBuffer<T>,
        cap: usize,
    ) -> Result<()> {
        let (mut keys, mut values, mut mask) =
            alloc::<T>(stream, buffer.batch, buffer.heads_kv, buffer.head_dim, cap)?;
        let row = buffer.heads_kv * buffer.head_dim * std::mem::size_of::<T>();
        let (old, len) = (buffer.capacity, buffer.len);
        for (new, from, width) in [
            (&mut keys, &buffer.keys, row),
            (&mut values, &buffer.values, row),
        ] {
            let (np, _g1) = new.device_ptr_mut(stream);
            let (op, _g2) = from.device_ptr(stream);
            // SAFETY: `batch` rows of `len` entries at the old and new capacities' pitches,
            // inside both allocations (len <= old <= cap), which do not overlap.
            unsafe {
                copy_2d(
                    stream,
                    (np, width * cap),
                    (op, width * old),
                    width * len,
                    buffer.batch,
                )
            }?;
        }
        {
            let (np, _g1) = mask.device_ptr_mut(stream);
            let (op, _g2) = buffer.mask.device_ptr(stream);
            // SAFETY: as above, one byte per entry.
            unsafe { copy_2d(stream, (np, cap), (op, old), len, buffer.batch) }?;
        }
        buffer.keys = keys;
        buffer.values = values;
        buffer.mask = mask;
        buffer.compact = None;
        buffer.capacity = cap;
        buffer.next = len;
        Ok(())
    }
}
