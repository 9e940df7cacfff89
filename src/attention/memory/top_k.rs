//! Top-k memory attention (the Focused Transformer paper's kNN memory, Memorizing-Transformer
//! style): each query row attends its local keys and the `top_k` visible memory entries with the
//! largest scores, ties to the lower entry index, as
//! [`reference::memory_attention_f64`](crate::reference::memory_attention_f64) with `top_k`.
//!
//! On the GPU, with no host round trip and no `[queries x memory]` score matrix: the RoPE key and
//! query passes (with a rotation), the local pass (the forward over the rotated queries and
//! keys, causal, into `o` and the LSE), the selection kernel (`cuda/topk.cuh`: per query tile, the
//! memory's key tiles streamed through tensor-core scores into per-row candidate slots, kept to
//! the top k whenever they fill), and one warp per row that gathers its selected keys and values
//! and merges that softmax into `o` and the LSE. The selection alone is
//! [`Attention::memory_select_top_k`]: a GPU top-k retrieval for any queries and keys.

use std::sync::Arc;

use cudarc::driver::{
    sys, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceSlice, LaunchConfig,
};

use super::two_pass::check_workspace_of;
use super::{
    memory_module, Attention, Carve, Input, MemoryForward, MemoryInput, Output, RawForward,
    RawMemory, RawRope, Scratch, MAX_MEM_LEN,
};
use crate::attention::rope::rope_keys_params;
use crate::attention::rope_backward::rope_queries_params;
use crate::attention::sm90::{tensor_map_zero_padded, unsupported};
use crate::attention::{Mainloop, MainloopChoice};
use crate::check::{aligned, byte_range, mismatch, overlaps, row_alignment, strides_multiple_of};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::loader::{CtxGuard, ModuleCache};
use crate::sys::{
    LfMemoryTopkParams, LfMemoryTopkSm90Params, LF_TOPK_CAP, LF_TOPK_KEYS, LF_TOPK_MAX_K,
    LF_TOPK_ROWS, LF_TOPK_SM90_KEYS, LF_TOPK_SM90_ROWS, LF_TOPK_SM90_STAGES, LF_TOPK_SM90_THREADS,
};
use crate::Element;

/// The most memory entries a top-k call selects per query row.
pub const MAX_TOP_K: usize = LF_TOPK_MAX_K as usize;

/// Candidate slots per query row in the selection's workspace (8 bytes each).
const CAP: usize = LF_TOPK_CAP as usize;

/// The top-k selection alone from raw device pointers (see
/// [`Attention::memory_select_top_k_raw`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RawMemorySelect {
    /// Element type of the queries and keys.
    pub dtype: DType,
    /// Queries `[batch, seqlen_q, heads_q, head_dim]`, used as given (rotate them first where
    /// the scores need it).
    pub q: sys::CUdeviceptr,
    /// Layout of the queries.
    pub q_layout: Layout,
    /// Keys `[batch, mem_len, heads_kv, head_dim]` (`heads_q` a multiple of `heads_kv`).
    pub keys: sys::CUdeviceptr,
    /// Layout of the keys; its `seqlen` is the memory's length.
    pub keys_layout: Layout,
    /// `[batch, mem_len]` visibility bytes (0: never selected), or 0 for every entry visible.
    pub mask: sys::CUdeviceptr,
    /// Entries per query row, 1 to [`MAX_TOP_K`] and at most the memory's length.
    pub top_k: usize,
    /// Output: i32 `[batch, heads_q, seqlen_q, top_k]`, each row's entries by descending score
    /// (equal scores: ascending index), -1 after the row's count where fewer are visible.
    pub indices: sys::CUdeviceptr,
    /// Device workspace of [`Attention::memory_select_workspace_bytes`] bytes, 16-byte aligned.
    pub workspace: sys::CUdeviceptr,
    /// Bytes at `workspace`.
    pub workspace_bytes: usize,
}

/// `top_k` against the memory's length.
fn check_top_k(top_k: usize, mem_len: usize) -> Result<()> {
    if top_k == 0 || top_k > MAX_TOP_K {
        return Err(Error::InvalidArgument {
            arg: "top_k",
            value: top_k.to_string(),
            expected: format!("1 to {MAX_TOP_K}"),
        });
    }
    if top_k > mem_len {
        return Err(Error::InvalidArgument {
            arg: "top_k",
            value: top_k.to_string(),
            expected: format!("at most the memory's {mem_len} entries"),
        });
    }
    Ok(())
}

/// Query rows of a call (`batch * heads_q * seqlen_q`).
fn rows(q: &Layout) -> usize {
    q.batch * q.heads * q.seqlen
}

/// Bytes of the selection's candidate slots for queries `q`.
fn cand_bytes(q: &Layout) -> usize {
    rows(q) * CAP * 8
}

/// Dynamic shared memory of the Hopper selection kernel at tile width `width`
/// (`cuda/topk_sm90.cuh`, TopkSm90Traits): the Q tile, the key ring, the barriers, a count and a
/// threshold per row, and 1 KiB to align the base to a swizzle atom.
fn sm90_smem_bytes(width: usize) -> u32 {
    let (rows, keys, stages) = (
        LF_TOPK_SM90_ROWS as usize,
        LF_TOPK_SM90_KEYS as usize,
        LF_TOPK_SM90_STAGES as usize,
    );
    ((rows + stages * keys) * width * 2 + (1 + 2 * stages) * 8 + rows * 8 + 1024) as u32
}

/// The Hopper selection kernel of a call: its module, shared memory and parameters.
struct Sm90Select {
    module: String,
    smem: u32,
    params: LfMemoryTopkSm90Params,
}

/// The selection kernel's module for `dtype` at head dim `d` (validated by `memory_module`).
fn select_module(dtype: &str, d: usize) -> String {
    match d {
        64 | 128 => format!("topk_select_{dtype}_d{d}"),
        _ => format!("topk_select_{dtype}_d128p"),
    }
}

impl RawMemorySelect {
    /// Checks the selection and lowers it to the kernels' parameters (no output or LSE): every
    /// error [`Attention::memory_select_top_k_raw`] returns before its launch.
    pub fn validate(&self) -> Result<LfMemoryTopkParams> {
        let (q, kl) = (&self.q_layout, &self.keys_layout);
        q.check_dims("q")?;
        for (name, v) in [
            ("batch", kl.batch),
            ("heads", kl.heads),
            ("head_dim", kl.head_dim),
        ] {
            if v == 0 {
                return Err(Error::ZeroSized {
                    arg: "keys",
                    dim: name,
                });
            }
        }
        mismatch("keys.batch", kl.batch, "q.batch", q.batch)?;
        mismatch("keys.head_dim", kl.head_dim, "q.head_dim", q.head_dim)?;
        if q.heads % kl.heads != 0 {
            return Err(Error::InvalidArgument {
                arg: "q.heads",
                value: q.heads.to_string(),
                expected: format!("a multiple of keys.heads ({})", kl.heads),
            });
        }
        memory_module(self.dtype.name(), q.head_dim)?;
        let mem_len = kl.seqlen;
        if mem_len > MAX_MEM_LEN {
            return Err(Error::InvalidArgument {
                arg: "keys.seqlen",
                value: mem_len.to_string(),
                expected: format!("at most {MAX_MEM_LEN} memory entries"),
            });
        }
        check_top_k(self.top_k, mem_len)?;
        check_grid(q)?;
        let (bytes, elems) = row_alignment(q.head_dim);
        aligned("q.ptr", self.q, bytes, true)?;
        aligned("keys.ptr", self.keys, bytes, true)?;
        strides_multiple_of("q", q, elems)?;
        strides_multiple_of("keys", kl, elems)?;
        aligned("indices", self.indices, 4, true)?;
        aligned("workspace", self.workspace, 16, true)?;
        let need = cand_bytes(q);
        if self.workspace_bytes < need {
            return Err(Error::InvalidArgument {
                arg: "workspace_bytes",
                value: self.workspace_bytes.to_string(),
                expected: format!(
                    "at least {need} bytes (Attention::memory_select_workspace_bytes)"
                ),
            });
        }
        let indices = (
            self.indices as i128,
            self.indices as i128 + (rows(q) * self.top_k * 4) as i128,
        );
        let workspace = (
            self.workspace as i128,
            self.workspace as i128 + need as i128,
        );
        let mut reads = vec![
            ("q", byte_range(self.q, q, 2)),
            ("keys", byte_range(self.keys, kl, 2)),
        ];
        if self.mask != 0 {
            let m = self.mask as i128;
            reads.push(("mask", (m, m + (q.batch * mem_len) as i128)));
        }
        for (output, range) in [("indices", indices), ("workspace", workspace)] {
            for &(other, r) in &reads {
                if overlaps(range, r) {
                    return Err(Error::Aliasing { output, other });
                }
            }
        }
        if overlaps(indices, workspace) {
            return Err(Error::Aliasing {
                output: "indices",
                other: "workspace",
            });
        }
        Ok(LfMemoryTopkParams {
            q: self.q as *const _,
            mem_k: self.keys as *const _,
            mem_v: std::ptr::null(),
            mem_mask: self.mask as *const u8,
            cand: self.workspace as *mut _,
            indices: self.indices as *mut i32,
            o: std::ptr::null_mut(),
            lse: std::ptr::null_mut(),
            q_batch_stride: q.batch_stride,
            q_row_stride: q.seq_stride,
            q_head_stride: q.head_stride,
            mem_k_batch_stride: kl.batch_stride,
            mem_k_row_stride: kl.seq_stride,
            mem_k_head_stride: kl.head_stride,
            mem_v_batch_stride: 0,
            mem_v_row_stride: 0,
            mem_v_head_stride: 0,
            o_batch_stride: 0,
            o_row_stride: 0,
            o_head_stride: 0,
            softmax_scale_log2: 0.0,
            batch: q.batch as i32,
            heads_q: q.heads as i32,
            heads_kv: kl.heads as i32,
            seqlen_q: q.seqlen as i32,
            head_dim: q.head_dim as i32,
            mem_len: mem_len as i32,
            top_k: self.top_k as i32,
        })
    }
}

/// The two kernels' grids for queries `q`: query tiles on grid.x, heads on y, batch on z; one
/// warp per row in blocks of 8.
fn check_grid(q: &Layout) -> Result<()> {
    if q.heads > 65535 || q.batch > 65535 {
        return Err(Error::InvalidArgument {
            arg: "q",
            value: format!("{} heads, batch {}", q.heads, q.batch),
            expected: "at most 65535 heads and 65535 batch entries".into(),
        });
    }
    if q.seqlen > i32::MAX as usize || rows(q).div_ceil(8) > i32::MAX as usize {
        return Err(Error::InvalidArgument {
            arg: "q",
            value: format!("{} rows", rows(q)),
            expected: "at most 8 * i32::MAX query rows in all".into(),
        });
    }
    Ok(())
}

/// Byte offsets of the top-k attention's workspace parts from its start.
#[derive(Clone, Copy, Debug)]
struct Parts {
    /// The rotated queries, contiguous `[batch, seqlen_q, heads_q, head_dim]` (with a rotation).
    q_rot: Option<usize>,
    /// The local pass's LSE when the call asks for none.
    lse_local: Option<usize>,
    /// The selection's candidate slots.
    cand: usize,
    /// The selected indices, `[batch, heads_q, seqlen_q, top_k]`.
    indices: usize,
    /// Bytes in all.
    total: usize,
}

impl Parts {
    fn of(fwd: &RawForward, rotate: bool, top_k: usize) -> Parts {
        let q = &fwd.q_layout;
        let mut c = Carve::default();
        let q_rot = rotate.then(|| c.take(rows(q) * q.head_dim * 2));
        let lse_local = (fwd.lse == 0).then(|| c.take(rows(q) * 4));
        let cand = c.take(cand_bytes(q));
        let indices = c.take(rows(q) * top_k * 4);
        Parts {
            q_rot,
            lse_local,
            cand,
            indices,
            total: c.total(),
        }
    }
}

impl Attention {
    /// Bytes of device workspace [`memory_select_top_k_raw`](Self::memory_select_top_k_raw)
    /// needs for queries shaped `q` (`batch * heads_q * seqlen_q * 4096`: each row's candidate
    /// slots).
    pub fn memory_select_workspace_bytes(&self, q: &Layout) -> usize {
        cand_bytes(q)
    }

    /// For each query row, the `top_k` visible entries of `keys` with the largest scores `q . k`
    /// (the softmax scale does not change the order), ties to the lower index, written to
    /// `indices` (i32 `[batch, heads_q, seqlen_q, top_k]`) by descending score, -1 after the
    /// row's count where fewer entries are visible. Query head `h` reads key head `h / (heads_q /
    /// heads_kv)`. Exact: scores are the tensor cores' f32 dot products of the given elements
    /// (+0 and -0 equal). The candidate workspace is allocated on `stream` and freed after the
    /// kernel; the call does not synchronize.
    pub fn memory_select_top_k<T: Element>(
        &self,
        stream: &Arc<CudaStream>,
        q: Input<'_, '_, T>,
        keys: Input<'_, '_, T>,
        mask: Option<&CudaView<'_, u8>>,
        top_k: usize,
        indices: &mut CudaViewMut<'_, i32>,
    ) -> Result<()> {
        self.same_context("stream", stream.context().cu_ctx())?;
        self.check_view("q", q.data, &q.layout)?;
        self.check_view("keys", keys.data, &keys.layout)?;
        self.same_context("indices", indices.stream().context().cu_ctx())?;
        let (ql, kl) = (q.layout, keys.layout);
        let need = rows(&ql) as u128 * top_k as u128;
        if need > indices.len() as u128 {
            return Err(Error::OutOfBounds {
                arg: "indices",
                required: need,
                len: indices.len(),
            });
        }
        if let Some(m) = mask {
            self.same_context("mask", m.stream().context().cu_ctx())?;
            let need = (ql.batch as u128) * (kl.seqlen as u128);
            if need > m.len() as u128 {
                return Err(Error::OutOfBounds {
                    arg: "mask",
                    required: need,
                    len: m.len(),
                });
            }
        }
        let (qp, _g1) = q.data.device_ptr(stream);
        let (kp, _g2) = keys.data.device_ptr(stream);
        let (mp, _g3) = match mask {
            Some(m) => {
                let (p, g) = m.device_ptr(stream);
                (p, Some(g))
            }
            None => (0, None),
        };
        let (ip, _g4) = indices.device_ptr_mut(stream);
        let mut args = RawMemorySelect {
            dtype: T::DTYPE,
            q: qp,
            q_layout: ql,
            keys: kp,
            keys_layout: kl,
            mask: mp,
            top_k,
            indices: ip,
            workspace: 0,
            workspace_bytes: 0,
        };
        // Everything but the workspace, before allocating it.
        RawMemorySelect {
            workspace: 16,
            workspace_bytes: usize::MAX,
            ..args
        }
        .validate()?;
        // SAFETY: `stream` belongs to this context (checked above).
        let scratch = unsafe { Scratch::new(self.ctx, stream.cu_stream(), cand_bytes(&ql)) }?;
        args.workspace = scratch.ptr;
        args.workspace_bytes = scratch.bytes;
        // SAFETY: the views were checked against their layouts and this context above, the
        // workspace was just allocated on the same stream (freed after the kernel in stream
        // order), and the guards order the launch against other streams.
        unsafe { self.memory_select_top_k_raw(stream.cu_stream(), &args) }
    }

    /// The top-k selection from raw pointers (see [`memory_select_top_k`](Self::memory_select_top_k));
    /// validates as [`RawMemorySelect::validate`]. Allocates nothing.
    ///
    /// # Safety
    /// `stream` belongs to this value's context; `q`, `keys` and (when not 0) `mask` hold every
    /// element their layouts (and `batch * mem_len` bytes) address, `indices` `batch * heads_q *
    /// seqlen_q * top_k` i32 and `workspace` `workspace_bytes` bytes, all device memory of this
    /// context that nothing else writes (nor, for the outputs, reads) until the kernel has
    /// finished.
    pub unsafe fn memory_select_top_k_raw(
        &self,
        stream: sys::CUstream,
        args: &RawMemorySelect,
    ) -> Result<()> {
        let mut params = args.validate()?;
        // SAFETY: this fn's contract; `params` was validated above.
        unsafe { self.launch_select(stream, args.dtype, &args.q_layout, &mut params) }
    }

    /// The mainloop the selection of these arguments runs on this device under this value's
    /// [`MainloopChoice`] (validating them first): the Hopper kernel (wgmma scores, TMA key
    /// loads) on a compute capability 9.0 device at head dims up to 128 whose tensors a tensor
    /// map describes (16-byte aligned strides), the sm_80 kernel otherwise. With
    /// [`MainloopChoice::Sm90`], a selection the Hopper kernel cannot run is an error that says
    /// why. The top-k layer's selection runs where this says for its rotated queries.
    pub fn memory_select_mainloop(&self, args: &RawMemorySelect) -> Result<Mainloop> {
        let params = args.validate()?;
        Ok(
            match self.select_sm90(args.dtype, &args.q_layout, &params)? {
                Some(_) => Mainloop::Sm90,
                None => Mainloop::Sm80,
            },
        )
    }

    /// The Hopper selection kernel for validated parameters `p` over queries `q`, or `None` for
    /// the sm_80 kernel (see [`Self::memory_select_mainloop`]).
    fn select_sm90(
        &self,
        dtype: DType,
        q: &Layout,
        p: &LfMemoryTopkParams,
    ) -> Result<Option<Sm90Select>> {
        if self.mainloop == MainloopChoice::Sm80 {
            return Ok(None);
        }
        let forced = self.mainloop == MainloopChoice::Sm90;
        let fail = |why: String| {
            if forced {
                Err(unsupported(why))
            } else {
                Ok(None)
            }
        };
        if self.compute_capability != (9, 0) {
            return fail(format!(
                "a device of compute capability 9.0 (this one is {}.{})",
                self.compute_capability.0, self.compute_capability.1
            ));
        }
        let d = q.head_dim;
        let width = match d {
            0..=64 => 64,
            65..=128 => 128,
            _ => return fail(format!("a selection at head dim 128 or below, not {d}")),
        };
        let module = format!("topk_select_sm90_{}_d{width}", dtype.name());
        if !ModuleCache::has_module(&module) {
            return fail(format!(
                "a kernel built for this call ({module} is not in this build)"
            ));
        }
        let smem = sm90_smem_bytes(width);
        if smem > self.max_smem_optin {
            return fail(format!(
                "{smem} bytes of shared memory per block (the device allows {})",
                self.max_smem_optin
            ));
        }
        let keys = Layout {
            batch: q.batch,
            seqlen: p.mem_len as usize,
            heads: p.heads_kv as usize,
            head_dim: d,
            batch_stride: p.mem_k_batch_stride,
            seq_stride: p.mem_k_row_stride,
            head_stride: p.mem_k_head_stride,
        };
        // Encoding a tensor map needs a current context: this thread may never have had one.
        // SAFETY: the context is kept alive by `_owner` or by the caller of from_raw_context.
        let _g = unsafe { CtxGuard::bind(self.ctx) }?;
        // The selection kernel has no padded form: a narrower head reaches it through the 4-D
        // maps' zeros past the head (never a flat map, whose columns past a head are the next
        // head's).
        let map = tensor_map_zero_padded;
        let maps = map(p.q as u64, q, dtype, LF_TOPK_SM90_ROWS as usize).and_then(|tq| {
            let tk = map(p.mem_k as u64, &keys, dtype, LF_TOPK_SM90_KEYS as usize)?;
            Ok((tq, tk))
        });
        let (tma_q, tma_k) = match maps {
            Ok(m) => m,
            Err(e) if forced => return Err(e),
            Err(_) => return Ok(None),
        };
        Ok(Some(Sm90Select {
            module,
            smem,
            params: LfMemoryTopkSm90Params {
                topk: *p,
                tma_q,
                tma_k,
                ..LfMemoryTopkSm90Params::default()
            },
        }))
    }

    /// Launches the selection kernel: on Hopper where [`Self::select_sm90`] says so (one CTA per
    /// tile of LF_TOPK_SM90_ROWS query rows, query head and batch entry), else the sm_80 kernel
    /// (one CTA per tile of LF_TOPK_ROWS rows).
    ///
    /// # Safety
    /// As [`Attention::launch`]: `params` was validated for queries `q` and its buffers and the
    /// stream are valid for the launch.
    unsafe fn launch_select(
        &self,
        stream: sys::CUstream,
        dtype: DType,
        q: &Layout,
        params: &mut LfMemoryTopkParams,
    ) -> Result<()> {
        let what = "launching the top-k selection kernel";
        if let Some(mut hopper) = self.select_sm90(dtype, q, params)? {
            // SAFETY: the context is kept alive by `_owner` or by the caller of
            // from_raw_context.
            let kernel = unsafe {
                self.cache.kernel(
                    &hopper.module,
                    &format!("lf_{}", hopper.module),
                    hopper.smem,
                )
            }?;
            let config = LaunchConfig {
                grid_dim: (
                    q.seqlen.div_ceil(LF_TOPK_SM90_ROWS as usize) as u32,
                    q.heads as u32,
                    q.batch as u32,
                ),
                block_dim: (LF_TOPK_SM90_THREADS, 1, 1),
                shared_mem_bytes: hopper.smem,
            };
            // SAFETY: this fn's contract; the grid covers every query row once, and the tensor
            // maps describe the validated queries and keys.
            return unsafe { self.launch(&kernel, config, stream, &mut hopper.params, what) };
        }
        let d = q.head_dim;
        let width = if d == 64 { 64 } else { 128 };
        let tile = width * 2 * (LF_TOPK_ROWS + 2 * LF_TOPK_KEYS) as usize;
        let smem = (tile + LF_TOPK_ROWS as usize * 8) as u32;
        let module = select_module(dtype.name(), d);
        // SAFETY: the context is kept alive by `_owner` or by the caller of from_raw_context.
        let kernel = unsafe { self.cache.kernel(&module, &format!("lf_{module}"), smem) }?;
        let config = LaunchConfig {
            grid_dim: (
                q.seqlen.div_ceil(LF_TOPK_ROWS as usize) as u32,
                q.heads as u32,
                q.batch as u32,
            ),
            block_dim: (128, 1, 1),
            shared_mem_bytes: smem,
        };
        // SAFETY: this fn's contract; the grid covers every query row once.
        unsafe { self.launch(&kernel, config, stream, params, what) }
    }

    /// Bytes of device workspace [`forward_memory_top_k_raw`](Self::forward_memory_top_k_raw)
    /// needs for this call: the rotated queries (with a rotation), the local LSE (when the call
    /// asks for none), the selection's candidate slots (4 KiB per query row) and the selected
    /// indices. Validates the call first, as `forward_memory_top_k_raw` does.
    pub fn memory_top_k_workspace_bytes(
        &self,
        fwd: &RawForward,
        memory: &RawMemory,
        rope: Option<&RawRope>,
        top_k: usize,
    ) -> Result<usize> {
        let params = memory.validate(fwd, rope)?;
        check_top_k(top_k, memory.keys_layout.seqlen)?;
        check_grid(&fwd.q_layout)?;
        Ok(Parts::of(fwd, params.rotate != 0, top_k).total)
    }

    /// Top-k memory attention: each query attends, in one softmax, its local keys (causal,
    /// aligned bottom-right; queries and local keys rotated with plain RoPE when `opts.rope` is
    /// given) and the `top_k` visible entries of `memory` with the largest scores (its rotated
    /// query against the raw keys; ties to the lower index), 1 to [`MAX_TOP_K`] and at most the
    /// memory's length. Output and LSE as [`forward_memory`](Self::forward_memory). The rotated
    /// local keys and the workspace ([`memory_top_k_workspace_bytes`]) are allocated on `stream`
    /// and freed after the kernels; the call does not synchronize.
    ///
    /// [`memory_top_k_workspace_bytes`]: Self::memory_top_k_workspace_bytes
    #[allow(clippy::too_many_arguments)]
    pub fn forward_memory_top_k<T: Element>(
        &self,
        stream: &Arc<CudaStream>,
        q: Input<'_, '_, T>,
        k: Input<'_, '_, T>,
        v: Input<'_, '_, T>,
        memory: MemoryInput<'_, '_, T>,
        out: Output<'_, '_, T>,
        opts: &MemoryForward<'_>,
        top_k: usize,
    ) -> Result<()> {
        check_top_k(top_k, memory.keys.layout.seqlen)?;
        self.memory_call(stream, [q, k, v], memory, out, opts, |raw, mem, rope| {
            let bytes = self.memory_top_k_workspace_bytes(raw, mem, rope, top_k)?;
            // SAFETY: `stream` belongs to this context (forward_impl checked it).
            let scratch = unsafe { Scratch::new(self.ctx, stream.cu_stream(), bytes) }?;
            let memory = RawMemory {
                workspace: scratch.ptr,
                workspace_bytes: scratch.bytes,
                ..*mem
            };
            // SAFETY: memory_call hands over a call whose tensors forward_impl checked against
            // their layouts and this context, whose memory views it checked, and whose tables
            // and rotated-key workspace it allocated on `stream`; the scratch was allocated
            // above on the same stream with the size the contract asks for; all live until the
            // call returns (frees are ordered after the kernels).
            unsafe { self.forward_memory_top_k_raw(stream.cu_stream(), raw, &memory, rope, top_k) }
        })
    }

    /// Top-k memory attention from raw pointers (see
    /// [`forward_memory_top_k`](Self::forward_memory_top_k)): `memory.workspace` must hold
    /// [`memory_top_k_workspace_bytes`](Self::memory_top_k_workspace_bytes) bytes, 16-byte
    /// aligned, apart from every tensor of the call. With `rope`, runs the RoPE key pass into
    /// `rope.k_rot` and the query pass into the workspace; then the local pass, the selection
    /// and the merged memory part. Everything on `stream`; allocates nothing.
    ///
    /// # Safety
    /// As [`forward_memory_raw`](Self::forward_memory_raw), with the workspace as above.
    pub unsafe fn forward_memory_top_k_raw(
        &self,
        stream: sys::CUstream,
        fwd: &RawForward,
        memory: &RawMemory,
        rope: Option<&RawRope>,
        top_k: usize,
    ) -> Result<()> {
        let params = memory.validate(fwd, rope)?;
        check_top_k(top_k, memory.keys_layout.seqlen)?;
        check_grid(&fwd.q_layout)?;
        let rotate = params.rotate != 0;
        let parts = Parts::of(fwd, rotate, top_k);
        check_workspace_of(
            fwd,
            memory,
            &params,
            parts.total,
            "Attention::memory_top_k_workspace_bytes",
        )?;
        let at = |off: usize| memory.workspace + off as u64;
        let (q, q_layout) = match parts.q_rot {
            Some(off) => {
                let l = &fwd.q_layout;
                (
                    at(off),
                    Layout::bshd(l.batch, l.seqlen, l.heads, l.head_dim),
                )
            }
            None => (fwd.q, fwd.q_layout),
        };
        let (k, k_layout) = if rotate {
            let kl = &fwd.k_layout;
            (
                params.rope.k_rot as u64,
                Layout::bshd(kl.batch, kl.seqlen, kl.heads, kl.head_dim),
            )
        } else {
            (fwd.k, fwd.k_layout)
        };
        let lse = parts.lse_local.map_or(fwd.lse, at);
        let local = RawForward {
            q,
            k,
            q_layout,
            k_layout,
            lse,
            block_mask: None,
            ..*fwd
        };
        local.validate()?;
        let (ml, vl) = (&memory.keys_layout, &memory.values_layout);
        let mut topk = LfMemoryTopkParams {
            q: q as *const _,
            mem_k: memory.keys as *const _,
            mem_v: memory.values as *const _,
            mem_mask: memory.mask as *const u8,
            cand: at(parts.cand) as *mut _,
            indices: at(parts.indices) as *mut i32,
            o: fwd.o as *mut _,
            lse: lse as *mut f32,
            q_batch_stride: q_layout.batch_stride,
            q_row_stride: q_layout.seq_stride,
            q_head_stride: q_layout.head_stride,
            mem_k_batch_stride: ml.batch_stride,
            mem_k_row_stride: ml.seq_stride,
            mem_k_head_stride: ml.head_stride,
            mem_v_batch_stride: vl.batch_stride,
            mem_v_row_stride: vl.seq_stride,
            mem_v_head_stride: vl.head_stride,
            o_batch_stride: fwd.o_layout.batch_stride,
            o_row_stride: fwd.o_layout.seq_stride,
            o_head_stride: fwd.o_layout.head_stride,
            softmax_scale_log2: params.fwd.softmax_scale_log2,
            batch: q_layout.batch as i32,
            heads_q: q_layout.heads as i32,
            heads_kv: ml.heads as i32,
            seqlen_q: q_layout.seqlen as i32,
            head_dim: q_layout.head_dim as i32,
            mem_len: ml.seqlen as i32,
            top_k: top_k as i32,
        };
        let dt = fwd.dtype.name();
        if rotate {
            let (mut keys, pairs) = rope_keys_params(fwd, params.rope)?;
            // SAFETY: validated parameters; the rotated-key workspace is disjoint from every
            // input and output (validated) and sized per this fn's contract.
            unsafe { self.launch_rope_keys(stream, &format!("rope_keys_{dt}"), pairs, &mut keys) }?;
            let mut queries = rope_queries_params(
                (fwd.q, &fwd.q_layout),
                (q, 0),
                0,
                fwd.k_layout.seqlen,
                params.rope,
            );
            // SAFETY: as above; the rotated queries go to their own part of the checked
            // workspace.
            unsafe { self.launch_rope_queries(stream, dt, &mut queries) }?;
        }
        // SAFETY: the local pass reads the call's validated tensors and parts of the checked
        // workspace written above on this stream, and writes `o` and the local LSE.
        unsafe { self.forward_raw(stream, &local) }?;
        // SAFETY: `topk` holds the validated call's pointers and the workspace's parts; the
        // selection writes only the candidate slots and the indices.
        unsafe { self.launch_select(stream, fwd.dtype, &q_layout, &mut topk) }?;
        let kernel_rows = rows(&q_layout) as u64;
        let module = format!("topk_attend_{dt}");
        // SAFETY: the context is kept alive by `_owner` or by the caller of from_raw_context.
        let kernel = unsafe { self.cache.kernel(&module, &format!("lf_{module}"), 0) }?;
        let config = LaunchConfig {
            grid_dim: (kernel_rows.div_ceil(8) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: as the selection; one warp per query row reads its indices (written above on
        // this stream) and updates its row of `o` and the LSE.
        unsafe {
            self.launch(
                &kernel,
                config,
                stream,
                &mut topk,
                "launching the top-k attention kernel",
            )
        }
    }
}

const _: () = assert!(LF_TOPK_ROWS == 64 && LF_TOPK_KEYS == 64 && CAP >= MAX_TOP_K + 64);
