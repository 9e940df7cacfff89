//! Memory attention (Focused Transformer / LongLLaMA memory layers): a local causal window and an
//! external memory of (key, value) pairs in one softmax. Its options, raw arguments and
//! validation, and the safe and raw entry points; the semantics are those of
//! [`reference::memory_attention_f64`](crate::reference::memory_attention_f64) with every memory
//! entry attended; `top_k.rs` has each row's top k entries instead
//! ([`Attention::forward_memory_top_k`]).
//!
//! One kernel (`cuda/memory.cuh`, on the `mma.sync` mainloop) walks a query tile's local key
//! tiles (causal, aligned bottom-right, optionally a left window) and then the memory's tiles,
//! sharing one online softmax. Queries and local keys are rotated with plain RoPE at their
//! positions when the call gives a rotation (the local keys once into a workspace by the RoPE
//! key pass, the queries in shared memory), memory keys never: FoT stores them "as if first".

use std::sync::Arc;

use cudarc::driver::{sys, CudaStream, CudaView, DevicePtr, DeviceSlice, SyncOnDrop};

use super::rope::{key_workspaces, rope_keys_params, RopeTables};
use super::{Attention, ForwardOptions, Input, Output, RawForward, RawRope, RawRopeMode, Scratch};
use crate::check::{aligned, byte_range, mismatch, overlaps, row_alignment, strides_multiple_of};
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::mask::MaskSpec;
use crate::rope::{PositionMode, RopeOptions};
use crate::Element;

mod buffer;
mod decode;
mod top_k;
mod two_pass;

pub use buffer::{AppendSource, MemoryBuffer, MemoryGrowth, MemoryViews};
pub use decode::{MemoryDecode, MemoryDecodePlan, RawMemoryDecode};
pub use top_k::{RawMemorySelect, MAX_TOP_K};

/// Head dims the memory kernel takes: 64 and 128 in kernels of their own width, and any other
/// multiple of 4 between them (LongLLaMA-3B's 100, 80, 96, 112) zero-padded to 128 inside the
/// kernel.
pub const MEMORY_HEAD_DIMS: &str = "64, 128, or a multiple of 4 between them (e.g. 100)";

/// The most memory entries per batch entry (the kernel counts them in 32 bits).
pub const MAX_MEM_LEN: usize = (1 << 31) - 256;

/// The external memory of a memory-attention call.
pub struct MemoryInput<'a, 'b, T> {
    /// Raw keys (never rotated), `[batch, mem_len, heads_kv, head_dim]`: the local keys' batch,
    /// heads and head dim.
    pub keys: Input<'a, 'b, T>,
    /// Values, shaped like `keys`.
    pub values: Input<'a, 'b, T>,
    /// `[batch, mem_len]` bytes, 0 for an entry no query sees (FoT's memory mask); `None`: every
    /// entry visible. A hidden entry still passes through the matrix products with weight 0, so
    /// its key and value must be finite (0 times an infinity or NaN is NaN), as every key and
    /// value of the other forwards must be; entries past `mem_len` are never read.
    pub mask: Option<&'a CudaView<'b, u8>>,
}

impl<T> MemoryInput<'_, '_, T> {
    /// The keys', values' and mask's device pointers (0 for no mask), with the guards that
    /// order their use on `stream` while they live.
    fn device_ptrs<'s>(
        &'s self,
        stream: &'s CudaStream,
    ) -> ((u64, u64, u64), [Option<SyncOnDrop<'s>>; 3]) {
        let (k, gk) = self.keys.data.device_ptr(stream);
        let (v, gv) = self.values.data.device_ptr(stream);
        let (m, gm) = match self.mask {
            Some(m) => {
                let (p, g) = m.device_ptr(stream);
                (p, Some(g))
            }
            None => (0, None),
        };
        ((k, v, m), [Some(gk), Some(gv), gm])
    }
}

/// Options of a memory-attention call (see [`Attention::forward_memory`]).
#[derive(Clone, Copy, Default)]
pub struct MemoryForward<'a> {
    /// Plain RoPE for the queries and the local keys at their positions (query `i` at
    /// `seqlen_k - seqlen_q + i`, local key `j` at `j`, plus the options' offsets; its
    /// `window_left` narrows the local part to a sliding window). `PositionMode::Rope` only: the
    /// memory layer has no ReRoPE. `None`: no rotation (FoT's `positionals = False`), a causal
    /// local part.
    pub rope: Option<&'a RopeOptions>,
    /// Multiplies Q K^T before the softmax (both parts); `None` means `1 / sqrt(head_dim)`.
    pub softmax_scale: Option<f32>,
}

/// The memory of the raw memory-attention call: device pointers and layouts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RawMemory {
    /// Raw memory keys, `keys_layout` (`[batch, mem_len, heads_kv, head_dim]`); may be 0 when
    /// `mem_len` is 0.
    pub keys: sys::CUdeviceptr,
    /// Memory values, `values_layout` (the keys' shape).
    pub values: sys::CUdeviceptr,
    /// `[batch, mem_len]` visibility bytes (0: hidden), or 0 for every entry visible.
    pub mask: sys::CUdeviceptr,
    /// Layout of the keys; its `seqlen` is the memory's length (0 allowed: no memory).
    pub keys_layout: Layout,
    /// Layout of the values.
    pub values_layout: Layout,
    /// Device workspace of the two-pass path (16-byte aligned, at least
    /// [`Attention::memory_workspace_bytes`] bytes when that is not 0), or 0 for the one kernel
    /// on every device.
    pub workspace: sys::CUdeviceptr,
    /// Bytes at `workspace`.
    pub workspace_bytes: usize,
}

/// The memory fields of the kernel's parameters.
struct LoweredMemory {
    keys: sys::CUdeviceptr,
    values: sys::CUdeviceptr,
    mask: sys::CUdeviceptr,
    mem_len: i32,
}

impl RawMemory {
    /// Checks a raw memory-attention call (the local part, the memory, the rotation) and lowers
    /// it to the kernel's parameters: every error [`Attention::forward_memory_raw`] returns before
    /// any launch. `fwd.options.mask` must be causal without sinks (a left window may be added),
    /// `fwd.block_mask` `None`, the head dim one of [`MEMORY_HEAD_DIMS`], and `rope` plain RoPE
    /// with an aligned rotated-key workspace that overlaps nothing else.
    pub fn validate(
        &self,
        fwd: &RawForward,
        rope: Option<&RawRope>,
    ) -> Result<crate::sys::LfMemoryFwdParams> {
        if !fwd.options.mask.causal {
            return Err(Error::InvalidMask {
                arg: "mask.causal",
                value: "false".into(),
                expected: "true: the memory layer's local part is causal",
            });
        }
        if fwd.block_mask.is_some() {
            return Err(Error::InvalidArgument {
                arg: "block_mask",
                value: "Some".into(),
                expected: "None: memory attention takes no block mask".into(),
            });
        }
        let base = fwd.validate()?;
        memory_module(fwd.dtype.name(), fwd.q_layout.head_dim)?;
        let mem = self.check_memory(fwd)?;
        let lf_rope = match rope {
            Some(r) => Some(validate_rotation(r, fwd, self)?),
            None => None,
        };
        Ok(crate::sys::LfMemoryFwdParams {
            fwd: base,
            rope: lf_rope.unwrap_or_default(),
            mem_k: mem.keys as *const _,
            mem_v: mem.values as *const _,
            mem_mask: mem.mask as *const u8,
            mem_k_batch_stride: self.keys_layout.batch_stride,
            mem_k_row_stride: self.keys_layout.seq_stride,
            mem_k_head_stride: self.keys_layout.head_stride,
            mem_v_batch_stride: self.values_layout.batch_stride,
            mem_v_row_stride: self.values_layout.seq_stride,
            mem_v_head_stride: self.values_layout.head_stride,
            mem_len: mem.mem_len,
            rotate: lf_rope.is_some() as i32,
        })
    }

    /// The memory against the call: shapes, alignment, length, aliasing with the outputs.
    fn check_memory(&self, fwd: &RawForward) -> Result<LoweredMemory> {
        let (q, k) = (&fwd.q_layout, &fwd.k_layout);
        let (kl, vl) = (&self.keys_layout, &self.values_layout);
        memory_shape(q, k.heads, kl, vl)?;
        let mem_len = kl.seqlen;
        if mem_len > MAX_MEM_LEN {
            return Err(Error::InvalidArgument {
                arg: "memory.keys.seqlen",
                value: mem_len.to_string(),
                expected: format!("at most {MAX_MEM_LEN} memory entries"),
            });
        }
        if mem_len == 0 {
            return Ok(LoweredMemory {
                keys: 0,
                values: 0,
                mask: 0,
                mem_len: 0,
            });
        }
        // As Q, K, V.
        let (bytes, elems) = row_alignment(q.head_dim);
        aligned("memory.keys.ptr", self.keys, bytes, true)?;
        aligned("memory.values.ptr", self.values, bytes, true)?;
        strides_multiple_of("memory.keys", kl, elems)?;
        strides_multiple_of("memory.values", vl, elems)?;
        // Nothing the call writes may overlap the memory.
        let mask_range = (
            self.mask as i128,
            self.mask as i128 + (q.batch * mem_len) as i128,
        );
        let lse_range = (
            fwd.lse as i128,
            fwd.lse as i128 + (q.batch * q.heads * q.seqlen) as i128 * 4,
        );
        let o_range = byte_range(fwd.o, &fwd.o_layout, 2);
        let mut reads = vec![
            ("memory.keys", byte_range(self.keys, kl, 2)),
            ("memory.values", byte_range(self.values, vl, 2)),
        ];
        if self.mask != 0 {
            reads.push(("memory.mask", mask_range));
        }
        for (other, r) in reads {
            if overlaps(o_range, r) {
                return Err(Error::Aliasing { output: "o", other });
            }
            if fwd.lse != 0 && overlaps(lse_range, r) {
                return Err(Error::Aliasing {
                    output: "lse",
                    other,
                });
            }
        }
        Ok(LoweredMemory {
            keys: self.keys,
            values: self.values,
            mask: self.mask,
            mem_len: mem_len as i32,
        })
    }
}

/// Alignment of a memory workspace's parts (bytes from its start).
const PART_ALIGN: usize = 256;

/// Lays a workspace's parts out one after another, each at a multiple of [`PART_ALIGN`] bytes
/// from its start (the two-pass and top-k paths' workspaces).
#[derive(Default)]
struct Carve {
    at: usize,
}

impl Carve {
    /// The offset of a part of `bytes` bytes.
    fn take(&mut self, bytes: usize) -> usize {
        let here = self.at;
        self.at = (self.at + bytes).next_multiple_of(PART_ALIGN);
        here
    }

    /// Bytes of all the parts taken.
    fn total(&self) -> usize {
        self.at
    }
}

/// The memory's keys `kl` and values `vl` against queries `q` and `heads_kv` local key heads:
/// the queries' batch and head dim, the local keys' heads, one length.
fn memory_shape(q: &Layout, heads_kv: usize, kl: &Layout, vl: &Layout) -> Result<()> {
    mismatch("memory.keys.batch", kl.batch, "q.batch", q.batch)?;
    mismatch("memory.keys.heads", kl.heads, "k.heads", heads_kv)?;
    mismatch(
        "memory.keys.head_dim",
        kl.head_dim,
        "q.head_dim",
        q.head_dim,
    )?;
    mismatch("memory.values.batch", vl.batch, "q.batch", q.batch)?;
    mismatch(
        "memory.values.seqlen",
        vl.seqlen,
        "memory.keys.seqlen",
        kl.seqlen,
    )?;
    mismatch("memory.values.heads", vl.heads, "k.heads", heads_kv)?;
    mismatch(
        "memory.values.head_dim",
        vl.head_dim,
        "q.head_dim",
        q.head_dim,
    )
}

/// What a memory call reads and writes besides its rotation: Q, K, V, O, the LSE when given,
/// and the memory's keys and values when it has entries (byte ranges, for aliasing checks of
/// its workspaces).
fn call_ranges(fwd: &RawForward, memory: &RawMemory) -> Vec<(&'static str, (i128, i128))> {
    let mut ranges = vec![
        ("q", byte_range(fwd.q, &fwd.q_layout, 2)),
        ("k", byte_range(fwd.k, &fwd.k_layout, 2)),
        ("v", byte_range(fwd.v, &fwd.v_layout, 2)),
        ("o", byte_range(fwd.o, &fwd.o_layout, 2)),
    ];
    if fwd.lse != 0 {
        let q = &fwd.q_layout;
        let n = (q.batch * q.heads * q.seqlen) as i128 * 4;
        ranges.push(("lse", (fwd.lse as i128, fwd.lse as i128 + n)));
    }
    if memory.keys_layout.seqlen > 0 {
        ranges.push((
            "memory.keys",
            byte_range(memory.keys, &memory.keys_layout, 2),
        ));
        ranges.push((
            "memory.values",
            byte_range(memory.values, &memory.values_layout, 2),
        ));
    }
    ranges
}

/// The rotation's tables as byte ranges: the frequencies and, when given, the position
/// offsets of `batch` sequences.
fn table_ranges(r: &crate::sys::LfRope, batch: usize) -> Vec<(&'static str, (i128, i128))> {
    let inv = r.inv_freq as i128;
    let mut ranges = vec![("rope.inv_freq", (inv, inv + (r.rotary_dim / 2) as i128 * 8))];
    if !r.position_offsets.is_null() {
        let p = r.position_offsets as i128;
        ranges.push(("rope.position_offsets", (p, p + batch as i128 * 4)));
    }
    ranges
}

/// The memory kernel's module for `dtype` at head dim `d`: 64 and 128 of their own width, the
/// multiples of 4 between them padded to 128.
fn memory_module(dtype: &str, d: usize) -> Result<String> {
    match d {
        64 | 128 => Ok(format!("memory_{dtype}_d{d}")),
        65..=127 if d % 4 == 0 => Ok(format!("memory_{dtype}_d128p")),
        _ => Err(Error::InvalidArgument {
            arg: "q.head_dim",
            value: d.to_string(),
            expected: format!("a memory-attention head dim: {MEMORY_HEAD_DIMS}"),
        }),
    }
}

/// The local part's mask: causal, with the rotation's left window when there is one.
fn local_mask(rope: Option<&RopeOptions>) -> MaskSpec {
    rope.map_or(MaskSpec::causal(), RopeOptions::mask)
}

impl Attention {
    /// The memory's views against this context and their layouts (none read for an empty
    /// memory), and its mask's `batch * mem_len` bytes.
    fn check_memory_views<T>(&self, memory: &MemoryInput<'_, '_, T>, batch: usize) -> Result<()> {
        let mem_len = memory.keys.layout.seqlen;
        if mem_len > 0 {
            self.check_view("memory.keys", memory.keys.data, &memory.keys.layout)?;
            self.check_view("memory.values", memory.values.data, &memory.values.layout)?;
        }
        if let Some(m) = memory.mask {
            self.same_context("memory.mask", m.stream().context().cu_ctx())?;
            let need = (batch as u128) * (mem_len as u128);
            if need > m.len() as u128 {
                return Err(Error::OutOfBounds {
                    arg: "memory.mask",
                    required: need,
                    len: m.len(),
                });
            }
        }
        Ok(())
    }

    /// Memory attention: each query attends, in one softmax, its local keys (causal, aligned
    /// bottom-right; queries and local keys rotated with plain RoPE when `opts.rope` is given)
    /// and every visible entry of `memory` (raw keys, not rotated, not causal). Output and LSE
    /// as [`forward`](Self::forward); a row that sees nothing gets 0 and `-inf`. The rotated
    /// local keys go to a workspace allocated here on `stream`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_memory<T: Element>(
        &self,
        stream: &Arc<CudaStream>,
        q: Input<'_, '_, T>,
        k: Input<'_, '_, T>,
        v: Input<'_, '_, T>,
        memory: MemoryInput<'_, '_, T>,
        out: Output<'_, '_, T>,
        opts: &MemoryForward<'_>,
    ) -> Result<()> {
        self.memory_call(stream, [q, k, v], memory, out, opts, |raw, mem, rope| {
            // SAFETY: memory_call hands over a call whose tensors forward_impl checked against
            // their layouts and this context, whose memory views it checked, and whose tables
            // and rotated-key workspace it allocated on `stream` with the sizes the contract
            // asks for, all live until the call returns (frees are ordered after the kernels).
            unsafe { self.memory_with_workspace(stream, raw, mem, rope) }
        })
    }

    /// What the safe memory entries share: the memory's views and the rotation checked, the
    /// rotation's tables and rotated-key workspace allocated on `stream`, the memory lowered
    /// (no workspace), and `launch` run with the lowered call inside `forward_impl` (which
    /// checks Q, K, V, O and the LSE); the local part's mask is causal with the rotation's
    /// window.
    fn memory_call<T: Element>(
        &self,
        stream: &Arc<CudaStream>,
        [q, k, v]: [Input<'_, '_, T>; 3],
        memory: MemoryInput<'_, '_, T>,
        out: Output<'_, '_, T>,
        opts: &MemoryForward<'_>,
        launch: impl FnOnce(&RawForward, &RawMemory, Option<&RawRope>) -> Result<()>,
    ) -> Result<()> {
        let (ql, kl) = (q.layout, k.layout);
        self.check_memory_views(&memory, ql.batch)?;
        let rotation = match opts.rope {
            Some(rope) => {
                if rope.mode != PositionMode::Rope {
                    return Err(not_plain_rope(rope.mode));
                }
                let tables = RopeTables::for_call(stream, rope, &ql, &kl)?;
                let (k_rot, _) = key_workspaces::<T>(stream, rope, &kl)?;
                Some((rope, tables, k_rot))
            }
            None => None,
        };
        let ((mk, mv, mm), _guards) = memory.device_ptrs(stream);
        let raw_memory = RawMemory {
            keys: mk,
            values: mv,
            mask: mm,
            keys_layout: memory.keys.layout,
            values_layout: memory.values.layout,
            workspace: 0,
            workspace_bytes: 0,
        };
        let options = ForwardOptions {
            mask: local_mask(opts.rope),
            softmax_scale: opts.softmax_scale,
        };
        match &rotation {
            Some((rope, tables, k_rot)) => {
                let (rp, _g4) = k_rot.device_ptr(stream);
                let (raw_rope, _g5, _g6) = tables.raw(stream, rope, (rp, 0));
                self.forward_impl(stream, [q, k, v], out, options, None, |raw| {
                    launch(raw, &raw_memory, Some(&raw_rope))
                })
            }
            None => self.forward_impl(stream, [q, k, v], out, options, None, |raw| {
                launch(raw, &raw_memory, None)
            }),
        }
    }

    /// The raw call with the two-pass workspace allocated on `stream` when the call takes that
    /// path (freed in stream order after its kernels).
    ///
    /// # Safety
    /// As [`forward_memory_raw`](Self::forward_memory_raw), with `memory.workspace` 0 and
    /// `stream` a live stream of this context.
    unsafe fn memory_with_workspace(
        &self,
        stream: &CudaStream,
        fwd: &RawForward,
        memory: &RawMemory,
        rope: Option<&RawRope>,
    ) -> Result<()> {
        let bytes = self.memory_workspace_bytes(fwd, memory, rope)?;
        let scratch = if bytes > 0 {
            // SAFETY: `stream` is a live stream of this context (this fn's contract).
            Some(unsafe { Scratch::new(self.ctx, stream.cu_stream(), bytes) }?)
        } else {
            None
        };
        let memory = RawMemory {
            workspace: scratch.as_ref().map_or(0, |s| s.ptr),
            workspace_bytes: scratch.as_ref().map_or(0, |s| s.bytes),
            ..*memory
        };
        // SAFETY: this fn's contract; the workspace was allocated above on the same stream and
        // is freed after the kernels, in stream order.
        unsafe { self.forward_memory_raw(stream.cu_stream(), fwd, &memory, rope) }
    }

    /// Memory attention from raw pointers (see [`forward_memory`](Self::forward_memory)). With
    /// `rope`, runs the RoPE key pass into `rope.k_rot` first (plain RoPE only; `k_alt` unused).
    /// Then, with a workspace (`memory.workspace`, [`memory_workspace_bytes`] bytes) where that
    /// size is not 0, the two passes of the Hopper forward merged by LSE; otherwise the one
    /// memory kernel. Everything on `stream`; allocates nothing.
    ///
    /// `fwd.options.mask` must be causal without sinks (a left window may be added) and
    /// `fwd.block_mask` `None`.
    ///
    /// [`memory_workspace_bytes`]: Self::memory_workspace_bytes
    ///
    /// # Safety
    /// As [`forward_raw`](Self::forward_raw) for `fwd`, and: `memory.keys` and `memory.values`
    /// hold every element their layouts address and `memory.mask` (when not 0) `batch * mem_len`
    /// bytes, all device memory of this context that nothing writes until the kernels finish;
    /// with `rope`, as [`forward_rope_raw`](Self::forward_rope_raw) for its tables and `k_rot`;
    /// `memory.workspace` (when not 0) holds `memory.workspace_bytes` bytes of device memory of
    /// this context that nothing else uses until the kernels finish.
    pub unsafe fn forward_memory_raw(
        &self,
        stream: sys::CUstream,
        fwd: &RawForward,
        memory: &RawMemory,
        rope: Option<&RawRope>,
    ) -> Result<()> {
        let mut params = memory.validate(fwd, rope)?;
        let d = fwd.q_layout.head_dim;
        let dt = fwd.dtype.name();
        let module = memory_module(dt, d)?;
        let path = match self.two_pass_plan(fwd, memory, &params, true)? {
            Some(plan) => Path::TwoPass(Box::new(plan)),
            None => Path::OneKernel(self.sm80_tiles(d, 1, "memory kernel")?),
        };
        if params.rotate != 0 {
            let (mut keys, pairs) = rope_keys_params(fwd, params.rope)?;
            // SAFETY: validated parameters; the workspace is disjoint from every input and output
            // (validated) and sized per this fn's contract.
            unsafe { self.launch_rope_keys(stream, &format!("rope_keys_{dt}"), pairs, &mut keys) }?;
        }
        match path {
            // SAFETY: this fn's contract; the plan was made from the validated call with its
            // workspace checked, and the key pass above wrote the rotated keys on this stream.
            Path::TwoPass(plan) => unsafe { self.launch_two_pass(stream, dt, *plan) },
            Path::OneKernel(tiles) => {
                let l = &fwd.q_layout;
                // SAFETY: `params` was validated above and is the kernel's one by-value
                // parameter (the struct both sides take from params.h); pointers and stream are
                // valid per this fn's contract, and the key pass wrote the workspace on the same
                // stream.
                unsafe {
                    self.launch_sm80(
                        stream,
                        &module,
                        tiles,
                        (l.seqlen, l.heads, l.batch),
                        &mut params,
                        "launching the memory-attention kernel",
                    )
                }
            }
        }
    }
}

/// How a validated memory call runs.
enum Path {
    /// Two passes of the Hopper forward and a merge.
    TwoPass(Box<two_pass::TwoPass>),
    /// The memory kernel, with its tile shape and shared memory.
    OneKernel((crate::plan::TileShape, u32)),
}

/// The error for a position mode the memory layer does not have.
fn not_plain_rope(mode: PositionMode) -> Error {
    Error::InvalidArgument {
        arg: "rope.mode",
        value: format!("{mode:?}"),
        expected: "PositionMode::Rope (the memory layer rotates plainly)".into(),
    }
}

/// `Ok` for plain RoPE, the memory layer's one raw position mode; the error of
/// [`not_plain_rope`] otherwise.
fn plain_rope(mode: RawRopeMode) -> Result<()> {
    let mode = match mode {
        RawRopeMode::Rope => return Ok(()),
        RawRopeMode::ReRope { window } => PositionMode::ReRope { window },
        RawRopeMode::LeakyReRope { window, leak } => PositionMode::LeakyReRope { window, leak },
    };
    Err(not_plain_rope(mode))
}

/// The rotation of a raw memory call: plain RoPE, the rotation's own checks, and a rotated-key
/// workspace that is aligned and overlaps none of the call's tensors.
fn validate_rotation(
    r: &RawRope,
    fwd: &RawForward,
    memory: &RawMemory,
) -> Result<crate::sys::LfRope> {
    plain_rope(r.mode)?;
    let d = fwd.q_layout.head_dim;
    let lowered = r.lower_rotation(d)?;
    aligned("rope.k_rot", r.k_rot, row_alignment(d).0, true)?;
    let k = &fwd.k_layout;
    let ws = byte_range(r.k_rot, &Layout::bshd(k.batch, k.seqlen, k.heads, d), 2);
    let mut others = call_ranges(fwd, memory);
    if memory.mask != 0 && memory.keys_layout.seqlen > 0 {
        let n = (fwd.q_layout.batch * memory.keys_layout.seqlen) as i128;
        others.push((
            "memory.mask",
            (memory.mask as i128, memory.mask as i128 + n),
        ));
    }
    // The rotation's own tables, which the key pass and the kernel read after the pass wrote.
    others.extend(table_ranges(&lowered, fwd.q_layout.batch));
    for (other, range) in others {
        if overlaps(ws, range) {
            return Err(Error::Aliasing {
                output: "rope.k_rot",
                other,
            });
        }
    }
    Ok(crate::sys::LfRope {
        k_rot: r.k_rot as *const _,
        k_alt: std::ptr::null(),
        ..lowered
    })
}
