//! The CUDA path: candle tensors to cudarc views, one cached [`Attention`] per CUDA context, the
//! launches on candle's stream, and the results wrapped as ordinary candle tensors.
//!
//! Nothing here synchronizes: inputs are read through cudarc views, which order them on the
//! device's stream (and record the events cudarc uses across streams when candle tracks them);
//! outputs are allocated on that stream and returned without waiting for the kernels.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaStream, CudaView, DeviceRepr};
use candle_core::cuda_backend::CudaDType;
use candle_core::op::BackpropOp;
use candle_core::{
    bail, CpuStorage, CudaDevice, CudaStorage, DType, InplaceOp1, Result, Shape, Storage, Tensor,
};
use half::{bf16, f16};
use longflash::attention::{BlockTable, DecodeOptions, ForwardOptions, KvCacheMut};
use longflash::rope::RopeOptions;
use longflash::{
    Attention, BlockMask, Element, Input, Layout, MaskSpec, Output, RopeForward, SparseOptions,
    VarlenOptions,
};

use crate::args::{CacheCall, Dense, Varlen};
use crate::{CacheScores, KvCache};

/// A longflash error as a candle error, naming the call.
fn lf(what: &'static str) -> impl FnOnce(longflash::Error) -> candle_core::Error {
    move |e| candle_core::Error::msg(format!("{what}: {e}"))
}

/// A cudarc error as a candle error, naming what was being done.
fn driver(
    what: &'static str,
) -> impl FnOnce(candle_core::cuda_backend::cudarc::driver::DriverError) -> candle_core::Error {
    move |e| candle_core::Error::msg(format!("{what}: CUDA driver error {e:?}"))
}

type Cache = Mutex<HashMap<usize, Arc<Attention>>>;

/// The longflash kernels of `device`'s CUDA context, loaded once per context and shared by every
/// call (and thread) after that. The entry keeps the context alive for the life of the process,
/// so its handle, the key, is never reused by another context.
pub fn attention_for(device: &CudaDevice) -> Result<Arc<Attention>> {
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let stream = device.cuda_stream();
    let ctx = stream.context();
    let key = ctx.cu_ctx() as usize;
    // A panic while the lock was held cannot leave the map half-updated (insert is the only
    // write), so a poisoned lock is still good to use.
    let mut map = CACHE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if let Some(a) = map.get(&key) {
        return Ok(a.clone());
    }
    let a = Arc::new(Attention::new(ctx).map_err(lf("loading longflash for the device"))?);
    map.insert(key, a.clone());
    Ok(a)
}

/// The CUDA device of a tensor that the argument checks found on one.
fn device_of(t: &Tensor) -> Result<&CudaDevice> {
    t.device().as_cuda_device()
}

/// Element types longflash runs that candle stores on CUDA.
trait Half: Element + CudaDType + DeviceRepr {}
impl Half for f16 {}
impl Half for bf16 {}

/// A view of a CUDA tensor's storage from its first element (the layout's start offset on).
fn view<'a, T: Half>(
    what: &str,
    name: &str,
    storage: &'a Storage,
    start: usize,
) -> Result<CudaView<'a, T>> {
    let Storage::Cuda(c) = storage else {
        bail!("{what}: `{name}` is not a CUDA tensor")
    };
    let slice = c.as_cuda_slice::<T>()?;
    match slice.try_slice(start..) {
        Some(v) => Ok(v),
        None => bail!(
            "{what}: `{name}` starts at element {start} of a buffer of {}",
            slice.len()
        ),
    }
}

/// A view of `n` elements of a CUDA tensor's storage from element `start`.
fn view_n<'a, T: CudaDType + DeviceRepr>(
    what: &str,
    name: &str,
    storage: &'a Storage,
    start: usize,
    n: usize,
) -> Result<CudaView<'a, T>> {
    let Storage::Cuda(c) = storage else {
        bail!("{what}: `{name}` is not a CUDA tensor")
    };
    match c.as_cuda_slice::<T>()?.try_slice(start..start + n) {
        Some(v) => Ok(v),
        None => bail!("{what}: `{name}` does not hold {n} elements from element {start}"),
    }
}

/// `len` uninitialized elements on `dev`'s stream, for an output every element of which the
/// kernel writes.
///
/// # Safety
/// The caller writes every element before anything reads it.
unsafe fn alloc_out<T: Half>(dev: &CudaDevice, len: usize) -> Result<CudaSlice<T>> {
    // SAFETY: passed on to the caller.
    unsafe { dev.alloc::<T>(len) }
}

/// A device buffer as a contiguous candle tensor of `shape` on `dev`.
fn tensor<T: CudaDType>(slice: CudaSlice<T>, dev: &CudaDevice, shape: impl Into<Shape>) -> Tensor {
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, dev.clone()));
    Tensor::from_storage(storage, shape, BackpropOp::none(), false)
}

/// The outputs of a forward: O `(batch, seqlen_q, heads_q, head_dim)` and, when asked for, the
/// f32 LSE `(batch, heads_q, seqlen_q)`.
fn forward_outputs<T: Half>(
    dev: &CudaDevice,
    ql: &Layout,
    with_lse: bool,
) -> Result<(CudaSlice<T>, Option<CudaSlice<f32>>)> {
    // SAFETY: the forward kernels write every row of O (rows that see no key get zeros) and
    // every LSE entry (-inf for those rows).
    let o = unsafe { alloc_out::<T>(dev, ql.numel()) }?;
    let lse = if with_lse {
        // SAFETY: as above.
        Some(unsafe { dev.alloc::<f32>(ql.batch * ql.heads * ql.seqlen) }?)
    } else {
        None
    };
    Ok((o, lse))
}

/// O and the LSE of [`forward_outputs`]' shapes as candle tensors.
fn output_tensors<T: Half>(
    o: CudaSlice<T>,
    lse: Option<CudaSlice<f32>>,
    dev: &CudaDevice,
    ql: &Layout,
) -> (Tensor, Option<Tensor>) {
    let out = tensor(o, dev, (ql.batch, ql.seqlen, ql.heads, ql.head_dim));
    let lse = lse.map(|l| tensor(l, dev, (ql.batch, ql.heads, ql.seqlen)));
    (out, lse)
}

/// Which forward to run: the exact one with a mask, or the RoPE one with its options.
enum Kind<'r> {
    Dense(MaskSpec),
    Rope(&'r RopeOptions),
    Sparse(&'r BlockMask),
}

fn forward_t<T: Half>(
    what: &'static str,
    args: &Dense,
    [q, k, v]: [&Tensor; 3],
    softmax_scale: f32,
    kind: Kind<'_>,
    with_lse: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let dev = device_of(q)?;
    let stream: Arc<CudaStream> = dev.cuda_stream();
    let attn = attention_for(dev)?;
    let (q_s, q_l) = q.storage_and_layout();
    let (k_s, k_l) = k.storage_and_layout();
    let (v_s, v_l) = v.storage_and_layout();
    let qv = view::<T>(what, "q", &q_s, q_l.start_offset())?;
    let kv = view::<T>(what, "k", &k_s, k_l.start_offset())?;
    let vv = view::<T>(what, "v", &v_s, v_l.start_offset())?;
    let ql = args.q;
    let ol = Layout::bshd(ql.batch, ql.seqlen, ql.heads, ql.head_dim);
    let (mut o, mut lse) = forward_outputs::<T>(dev, &ql, with_lse)?;
    {
        let mut ov = o.slice_mut(..);
        let mut lv = lse.as_mut().map(|l| l.slice_mut(..));
        let out = Output {
            data: &mut ov,
            layout: ol,
            lse: lv.as_mut(),
        };
        let (qi, ki, vi) = (
            Input {
                data: &qv,
                layout: args.q,
            },
            Input {
                data: &kv,
                layout: args.k,
            },
            Input {
                data: &vv,
                layout: args.v,
            },
        );
        match kind {
            Kind::Dense(mask) => {
                let options = ForwardOptions {
                    mask,
                    softmax_scale: Some(softmax_scale),
                };
                attn.forward(&stream, qi, ki, vi, out, &options)
            }
            Kind::Sparse(mask) => {
                // Copied on the stream like any host-to-device copy: nothing waits for it.
                let mask = mask
                    .to_device(&stream)
                    .map_err(lf("copying the block mask to the device"))?;
                let options = SparseOptions {
                    mask: &mask,
                    softmax_scale: Some(softmax_scale),
                };
                attn.forward_sparse(&stream, qi, ki, vi, out, &options)
            }
            Kind::Rope(rope) => {
                let options = RopeForward {
                    rope,
                    block_mask: None,
                    softmax_scale: Some(softmax_scale),
                };
                attn.forward_rope(&stream, qi, ki, vi, out, &options)
            }
        }
        .map_err(lf(what))?;
    }
    Ok(output_tensors(o, lse, dev, &ql))
}

/// The exact forward (with `mask`), or the RoPE or block-sparse one as `special` says, over
/// checked arguments.
pub(crate) fn forward(
    what: &'static str,
    args: &Dense,
    qkv: [&Tensor; 3],
    softmax_scale: f32,
    mask: MaskSpec,
    special: crate::Special<'_>,
    with_lse: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let kind = match special {
        crate::Special::Rope(r) => Kind::Rope(r),
        crate::Special::Sparse(m) => Kind::Sparse(m),
        crate::Special::None => Kind::Dense(mask),
    };
    match args.dtype {
        DType::F16 => forward_t::<f16>(what, args, qkv, softmax_scale, kind, with_lse),
        DType::BF16 => forward_t::<bf16>(what, args, qkv, softmax_scale, kind, with_lse),
        other => bail!("{what}: dtype {other:?} is not supported"),
    }
}

#[allow(clippy::too_many_arguments)]
fn varlen_t<T: Half>(
    what: &'static str,
    args: &Varlen,
    [q, k, v]: [&Tensor; 3],
    (seqlens_q, seqlens_k): (&Tensor, &Tensor),
    (max_seqlen_q, max_seqlen_k): (usize, usize),
    softmax_scale: f32,
    mask: MaskSpec,
) -> Result<Tensor> {
    let dev = device_of(q)?;
    let stream = dev.cuda_stream();
    let attn = attention_for(dev)?;
    let (q_s, q_l) = q.storage_and_layout();
    let (k_s, k_l) = k.storage_and_layout();
    let (v_s, v_l) = v.storage_and_layout();
    let (sq_s, sq_l) = seqlens_q.storage_and_layout();
    let (sk_s, sk_l) = seqlens_k.storage_and_layout();
    let qv = view::<T>(what, "q", &q_s, q_l.start_offset())?;
    let kv = view::<T>(what, "k", &k_s, k_l.start_offset())?;
    let vv = view::<T>(what, "v", &v_s, v_l.start_offset())?;
    let n = args.batch + 1;
    let sqv = view_n::<u32>(what, "seqlens_q", &sq_s, sq_l.start_offset(), n)?;
    let skv = view_n::<u32>(what, "seqlens_k", &sk_s, sk_l.start_offset(), n)?;
    // SAFETY: every u32 bit pattern is a valid i32 and the views keep their length. A sum of
    // 2^31 or more reads as negative, which the kernel treats as a bad prefix sum: it clamps
    // it and cannot read or write outside the tensors.
    let (sqi, ski) = unsafe { (sqv.transmute::<i32>(n), skv.transmute::<i32>(n)) };
    let (Some(sqi), Some(ski)) = (sqi, ski) else {
        bail!("{what}: the prefix sums could not be read as i32")
    };
    let ql = args.q;
    let ol = Layout::bshd(1, ql.seqlen, ql.heads, ql.head_dim);
    // Zeroed: rows of q that no prefix sum covers are not written by the kernel.
    let mut o = dev.alloc_zeros::<T>(ql.numel())?;
    {
        let mut ov = o.slice_mut(..);
        let out = Output {
            data: &mut ov,
            layout: ol,
            lse: None,
        };
        let options = VarlenOptions {
            mask,
            softmax_scale: Some(softmax_scale),
            max_seqlen_q,
            max_seqlen_k,
        };
        attn.forward_varlen(
            &stream,
            Input {
                data: &qv,
                layout: args.q,
            },
            Input {
                data: &kv,
                layout: args.k,
            },
            Input {
                data: &vv,
                layout: args.v,
            },
            out,
            &sqi,
            &ski,
            None,
            &options,
        )
        .map_err(lf(what))?;
    }
    Ok(tensor(o, dev, (ql.seqlen, ql.heads, ql.head_dim)))
}

/// The variable-length forward over checked arguments.
#[allow(clippy::too_many_arguments)]
pub(crate) fn varlen(
    what: &'static str,
    args: &Varlen,
    qkv: [&Tensor; 3],
    seqlens: (&Tensor, &Tensor),
    max_seqlens: (usize, usize),
    softmax_scale: f32,
    mask: MaskSpec,
) -> Result<Tensor> {
    match args.dtype {
        DType::F16 => varlen_t::<f16>(what, args, qkv, seqlens, max_seqlens, softmax_scale, mask),
        DType::BF16 => varlen_t::<bf16>(what, args, qkv, seqlens, max_seqlens, softmax_scale, mask),
        other => bail!("{what}: dtype {other:?} is not supported"),
    }
}

/// A copy of a tensor's elements in a fresh buffer, on the device's stream; the tensor is made
/// contiguous first (a no-op when it is).
fn copy_of<T: CudaDType + DeviceRepr>(
    what: &'static str,
    name: &str,
    t: &Tensor,
) -> Result<CudaSlice<T>> {
    let t = t.contiguous()?;
    let dev = device_of(&t)?;
    let stream = dev.cuda_stream();
    let (s, l) = t.storage_and_layout();
    let n = t.elem_count();
    let src = view_n::<T>(what, name, &s, l.start_offset(), n)?;
    // SAFETY: fully written by the copy below before it is returned.
    let mut dst = unsafe { dev.alloc::<T>(n) }?;
    stream
        .memcpy_dtod(&src, &mut dst)
        .map_err(driver("copying the accumulated result"))?;
    Ok(dst)
}

fn merge_t<T: Half>(
    what: &'static str,
    acc_layout: Layout,
    [acc_o, acc_lse, part_o, part_lse]: [&Tensor; 4],
) -> Result<(Tensor, Tensor)> {
    let dev = device_of(acc_o)?;
    let stream = dev.cuda_stream();
    let attn = attention_for(dev)?;
    let mut o = copy_of::<T>(what, "acc_o", acc_o)?;
    let mut lse = copy_of::<f32>(what, "acc_lse", acc_lse)?;
    let part_lse = part_lse.contiguous()?;
    {
        let (p_s, p_l) = part_o.storage_and_layout();
        let pv = view::<T>(what, "part_o", &p_s, p_l.start_offset())?;
        let part_layout = crate::args::layout_of(what, "part_o", part_o)?;
        let (pl_s, pl_l) = part_lse.storage_and_layout();
        let rows = part_lse.elem_count();
        let plv = view_n::<f32>(what, "part_lse", &pl_s, pl_l.start_offset(), rows)?;
        let mut ov = o.slice_mut(..);
        let mut lv = lse.slice_mut(..);
        attn.merge(
            &stream,
            Output {
                data: &mut ov,
                layout: acc_layout,
                lse: Some(&mut lv),
            },
            Input {
                data: &pv,
                layout: part_layout,
            },
            &plv,
        )
        .map_err(lf(what))?;
    }
    let l = acc_layout;
    Ok((
        tensor(o, dev, (l.batch, l.seqlen, l.heads, l.head_dim)),
        tensor(lse, dev, (l.batch, l.heads, l.seqlen)),
    ))
}

/// The LSE merge over checked arguments: fresh tensors holding `acc` merged with `part`.
pub(crate) fn merge(
    what: &'static str,
    dtype: DType,
    acc_layout: Layout,
    tensors: [&Tensor; 4],
) -> Result<(Tensor, Tensor)> {
    match dtype {
        DType::F16 => merge_t::<f16>(what, acc_layout, tensors),
        DType::BF16 => merge_t::<bf16>(what, acc_layout, tensors),
        other => bail!("{what}: dtype {other:?} is not supported"),
    }
}

/// Runs `f` on the CUDA storage of `t` with the tensor's storage locked for writing (candle's
/// in-place op), so that nothing else reads or writes it meanwhile.
fn with_storage_mut<F>(t: &Tensor, what: &'static str, f: F) -> Result<()>
where
    F: FnOnce(&mut CudaStorage, &candle_core::Layout) -> Result<()>,
{
    struct Op<F>(Cell<Option<F>>, &'static str);
    impl<F> InplaceOp1 for Op<F>
    where
        F: FnOnce(&mut CudaStorage, &candle_core::Layout) -> Result<()>,
    {
        fn name(&self) -> &'static str {
            self.1
        }
        fn cpu_fwd(&self, _: &mut CpuStorage, _: &candle_core::Layout) -> Result<()> {
            bail!("{}: longflash needs CUDA tensors", self.1)
        }
        fn cuda_fwd(&self, s: &mut CudaStorage, l: &candle_core::Layout) -> Result<()> {
            match self.0.take() {
                Some(f) => f(s, l),
                None => bail!("{}: the in-place write ran twice", self.1),
            }
        }
    }
    t.inplace_op1(&Op(Cell::new(Some(f)), what))
}

/// An address that identifies the storage (the buffer) behind a tensor: two tensors share a
/// buffer exactly when they share the storage.
fn storage_id(t: &Tensor) -> usize {
    let (s, _) = t.storage_and_layout();
    &*s as *const Storage as usize
}

/// The block table's view and width, for a paged cache.
fn table_view<'a>(
    what: &str,
    table: Option<(&'a Storage, usize)>,
    max_pages: Option<usize>,
    batch: usize,
) -> Result<Option<(CudaView<'a, i32>, usize)>> {
    match (table, max_pages) {
        (Some((s, start)), Some(p)) => {
            let v = view_n::<i32>(what, "block_table", s, start, batch * p)?;
            Ok(Some((v, p)))
        }
        (None, None) => Ok(None),
        _ => bail!("{what}: the block table and the checked cache disagree"),
    }
}

fn kvcache_t<T: Half>(
    what: &'static str,
    args: &CacheCall,
    q: &Tensor,
    cache: &KvCache<'_>,
    softmax_scale: f32,
    scores: CacheScores<'_>,
    with_lse: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let dev = device_of(q)?;
    let stream = dev.cuda_stream();
    let attn = attention_for(dev)?;
    let (q_s, q_l) = q.storage_and_layout();
    let (k_s, k_l) = cache.k_cache.storage_and_layout();
    let (v_s, v_l) = cache.v_cache.storage_and_layout();
    let (sl_s, sl_l) = cache.cache_seqlens.storage_and_layout();
    let table = cache.block_table.map(|t| t.storage_and_layout());
    let ql = args.q;
    let qv = view::<T>(what, "q", &q_s, q_l.start_offset())?;
    let kv = view::<T>(what, "k_cache", &k_s, k_l.start_offset())?;
    let vv = view::<T>(what, "v_cache", &v_s, v_l.start_offset())?;
    let slv = view_n::<i32>(what, "cache_seqlens", &sl_s, sl_l.start_offset(), ql.batch)?;
    let tv = table_view(
        what,
        table.as_ref().map(|(s, l)| (&**s, l.start_offset())),
        args.cache.max_pages,
        ql.batch,
    )?;
    let lf_cache = longflash::attention::KvCache {
        k: Input {
            data: &kv,
            layout: args.cache.k,
        },
        v: Input {
            data: &vv,
            layout: args.cache.v,
        },
        block_table: tv.as_ref().map(|(t, p)| BlockTable {
            table: t,
            max_pages_per_seq: *p,
        }),
        cache_seqlens: Some(&slv),
    };
    // Zeroed rather than left uninitialized: nothing here relies on which rows the kernels of
    // a clamped sequence write.
    let mut o = dev.alloc_zeros::<T>(ql.numel())?;
    let mut lse = if with_lse {
        Some(dev.alloc_zeros::<f32>(ql.batch * ql.heads * ql.seqlen)?)
    } else {
        None
    };
    {
        let mut ov = o.slice_mut(..);
        let mut lv = lse.as_mut().map(|l| l.slice_mut(..));
        let out = Output {
            data: &mut ov,
            layout: Layout::bshd(ql.batch, ql.seqlen, ql.heads, ql.head_dim),
            lse: lv.as_mut(),
        };
        let qi = Input {
            data: &qv,
            layout: ql,
        };
        match scores {
            CacheScores::Mask(mask) => {
                let options = DecodeOptions {
                    mask,
                    softmax_scale: Some(softmax_scale),
                    max_seqlen_k: None,
                    num_splits: None,
                };
                attn.decode(&stream, qi, &lf_cache, out, None, &options)
            }
            CacheScores::Rope(rope) => {
                let options = DecodeOptions {
                    mask: rope.mask(),
                    softmax_scale: Some(softmax_scale),
                    max_seqlen_k: None,
                    num_splits: None,
                };
                attn.decode_rope(&stream, qi, &lf_cache, out, None, &options, rope)
            }
        }
        .map_err(lf(what))?;
    }
    Ok(output_tensors(o, lse, dev, &ql))
}

/// Attention over a KV cache (plain or with RoPE) over checked arguments.
pub(crate) fn kvcache(
    what: &'static str,
    args: &CacheCall,
    q: &Tensor,
    cache: &KvCache<'_>,
    softmax_scale: f32,
    scores: CacheScores<'_>,
    with_lse: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    match args.dtype {
        DType::F16 => kvcache_t::<f16>(what, args, q, cache, softmax_scale, scores, with_lse),
        DType::BF16 => kvcache_t::<bf16>(what, args, q, cache, softmax_scale, scores, with_lse),
        other => bail!("{what}: dtype {other:?} is not supported"),
    }
}

fn append_t<T: Half>(
    what: &'static str,
    args: &CacheCall,
    [k_new, v_new]: [&Tensor; 2],
    cache: &KvCache<'_>,
    rope: Option<&RopeOptions>,
) -> Result<()> {
    let Some(vn_layout) = args.v_new else {
        bail!("{what}: the new values were not checked")
    };
    let dev = device_of(k_new)?;
    let stream = dev.cuda_stream();
    let attn = attention_for(dev)?;
    // The caches are locked for writing below, one inside the other, and the new rows read
    // inside both: a buffer shared between them would wait on itself.
    let (kc, vc) = (storage_id(cache.k_cache), storage_id(cache.v_cache));
    if kc == vc {
        bail!("{what}: `k_cache` and `v_cache` share one buffer; pass them as separate tensors")
    }
    for (name, t) in [("k_new", k_new), ("v_new", v_new)] {
        let id = storage_id(t);
        if id == kc || id == vc {
            bail!("{what}: `{name}` shares its buffer with the cache it is written into")
        }
    }
    let batch = args.q.batch;
    with_storage_mut(cache.k_cache, what, |k_store, k_l| {
        with_storage_mut(cache.v_cache, what, |v_store, v_l| {
            let (kn_s, kn_l) = k_new.storage_and_layout();
            let (vn_s, vn_l) = v_new.storage_and_layout();
            let (sl_s, sl_l) = cache.cache_seqlens.storage_and_layout();
            let table = cache.block_table.map(|t| t.storage_and_layout());
            let knv = view::<T>(what, "k_new", &kn_s, kn_l.start_offset())?;
            let vnv = view::<T>(what, "v_new", &vn_s, vn_l.start_offset())?;
            let slv = view_n::<i32>(what, "cache_seqlens", &sl_s, sl_l.start_offset(), batch)?;
            let tv = table_view(
                what,
                table.as_ref().map(|(s, l)| (&**s, l.start_offset())),
                args.cache.max_pages,
                batch,
            )?;
            let Some(mut kcv) = k_store
                .as_cuda_slice_mut::<T>()?
                .try_slice_mut(k_l.start_offset()..)
            else {
                bail!("{what}: `k_cache` starts past its buffer")
            };
            let Some(mut vcv) = v_store
                .as_cuda_slice_mut::<T>()?
                .try_slice_mut(v_l.start_offset()..)
            else {
                bail!("{what}: `v_cache` starts past its buffer")
            };
            let mut target = KvCacheMut {
                k: &mut kcv,
                k_layout: args.cache.k,
                v: &mut vcv,
                v_layout: args.cache.v,
                block_table: tv.as_ref().map(|(t, p)| BlockTable {
                    table: t,
                    max_pages_per_seq: *p,
                }),
                cache_seqlens: &slv,
            };
            let (kn, vn) = ((&knv, args.q), (&vnv, vn_layout));
            match rope {
                None => attn.append_kv(&stream, kn, vn, &mut target, None),
                Some(r) => attn.append_kv_rope(&stream, kn, vn, &mut target, None, r),
            }
            .map_err(lf(what))
        })
    })
}

/// The KV append (keys as they are, or rotated with `rope`) over checked arguments.
pub(crate) fn append(
    what: &'static str,
    args: &CacheCall,
    new: [&Tensor; 2],
    cache: &KvCache<'_>,
    rope: Option<&RopeOptions>,
) -> Result<()> {
    match args.dtype {
        DType::F16 => append_t::<f16>(what, args, new, cache, rope),
        DType::BF16 => append_t::<bf16>(what, args, new, cache, rope),
        other => bail!("{what}: dtype {other:?} is not supported"),
    }
}
