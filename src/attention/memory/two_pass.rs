//! The memory layer on the Hopper mainloop: two calls of the dense forward merged by LSE.
//!
//! One softmax over `[local | memory]` is the LSE merge of a local pass and a memory pass (the
//! identity `tests/cpu_memory.rs` checks on the f64 reference). Where the dense forward runs on
//! the Hopper mainloop, the layer runs as: the RoPE key pass (local keys into the rotated-key
//! workspace) and the query pass (the queries rotated once, as the one kernel's Q preparation
//! rotates them, into this path's workspace), the local pass (causal, with the rotation's left
//! window, over the rotated keys) into `o` and the LSE, the memory pass (the same rotated
//! queries over the raw memory; with a memory mask, the Hopper forward with a per-key mask,
//! `keymask_sm90_*`) into the workspace, and the merge of the second into the first. Both
//! partial outputs are rounded to the element type before the merge, as the ring's are
//! ([`reference::memory_attention_two_pass_lowp`](crate::reference::memory_attention_two_pass_lowp)
//! is the budget). Head dims 64 and 128 run the Hopper kernels of their width, a multiple of 4
//! from 68 to 124 (LongLLaMA-3B's 100) their padded ones (`*_sm90_*_d128p`, over flat tensor
//! maps: rows of whole 16 bytes, no 16-byte head stride needed). A call the Hopper forward
//! cannot take (another head dim, such a layout, a device without it) runs the one kernel.

use cudarc::driver::sys;

use super::{call_ranges, table_ranges, Carve, RawMemory, RawRope, PART_ALIGN};
use crate::attention::rope_backward::rope_queries_params;
use crate::attention::sm90::Plan;
use crate::attention::{Attention, Mainloop, RawForward, RawMerge};
use crate::check::{self, byte_range};
use crate::error::Result;
use crate::layout::Layout;
use crate::mask::MaskSpec;
use crate::sys::{LfFwdKeyMaskSm90Params, LfMemoryFwdParams, LfRopeQueriesParams};

/// A stand-in address of the workspace, aligned as every part is, for deciding the path before
/// a workspace exists (the Hopper plan depends on the parts' alignment only).
const STAND_IN: u64 = PART_ALIGN as u64;

/// Byte offsets of the two-pass workspace's parts from its start.
#[derive(Clone, Copy, Debug)]
struct Parts {
    /// The rotated queries, contiguous `[batch, seqlen_q, heads_q, head_dim]` (with a rotation).
    q_rot: Option<usize>,
    /// The memory pass's output, contiguous like the rotated queries.
    o_mem: usize,
    /// The memory pass's LSE, f32 `[batch, heads_q, seqlen_q]`.
    lse_mem: usize,
    /// The local pass's LSE when the call asks for none.
    lse_local: Option<usize>,
    /// Bytes in all.
    total: usize,
}

impl Parts {
    fn of(fwd: &RawForward, rotate: bool) -> Parts {
        let q = &fwd.q_layout;
        let tensor = q.batch * q.seqlen * q.heads * q.head_dim * 2;
        let rows = q.batch * q.heads * q.seqlen * 4;
        let mut c = Carve::default();
        let q_rot = rotate.then(|| c.take(tensor));
        let o_mem = c.take(tensor);
        let lse_mem = c.take(rows);
        let lse_local = (fwd.lse == 0).then(|| c.take(rows));
        Parts {
            q_rot,
            o_mem,
            lse_mem,
            lse_local,
            total: c.total(),
        }
    }
}

/// The launches of one two-pass call, validated.
pub(super) struct TwoPass {
    /// The query pass (with a rotation).
    queries: Option<LfRopeQueriesParams>,
    /// The local pass: causal over the (rotated) local keys, into `o` and the LSE.
    local: RawForward,
    /// The memory pass and the merge (a memory of at least one entry).
    memory: Option<(RawForward, RawMerge)>,
    /// The memory pass's launch with the memory's mask (a masked memory of at least one entry).
    masked: Option<Plan<LfFwdKeyMaskSm90Params>>,
}

/// The contiguous layout of the rotated queries and of the memory pass's output.
fn packed(q: &Layout) -> Layout {
    Layout::bshd(q.batch, q.seqlen, q.heads, q.head_dim)
}

impl Attention {
    /// Bytes of device workspace [`forward_memory_raw`](Self::forward_memory_raw) uses to run
    /// this call as two passes of the Hopper forward (the local part, then the memory, merged by
    /// LSE), or 0 when the call runs the one memory kernel whatever workspace it is given (a
    /// call the Hopper forward does not take: a head dim other than 64, 128 and the padded 68
    /// to 124, a layout its tensor maps cannot describe, or a device or [`MainloopChoice`]
    /// without the Hopper mainloop). Validates the call first, as `forward_memory_raw` does.
    ///
    /// [`MainloopChoice`]: crate::MainloopChoice
    pub fn memory_workspace_bytes(
        &self,
        fwd: &RawForward,
        memory: &RawMemory,
        rope: Option<&RawRope>,
    ) -> Result<usize> {
        let params = memory.validate(fwd, rope)?;
        let stand_in = RawMemory {
            workspace: STAND_IN,
            workspace_bytes: usize::MAX,
            ..*memory
        };
        Ok(match self.two_pass_plan(fwd, &stand_in, &params, false)? {
            Some(_) => Parts::of(fwd, params.rotate != 0).total,
            None => 0,
        })
    }

    /// The two passes of a validated call (`params` from [`RawMemory::validate`]), or `None`
    /// when it runs the one kernel: no workspace given, or a pass the Hopper mainloop would not
    /// run (decided on the workspace's parts at a stand-in address, aligned as theirs are). With
    /// `check_workspace`, the workspace's size, alignment and aliasing are then checked.
    pub(super) fn two_pass_plan(
        &self,
        fwd: &RawForward,
        memory: &RawMemory,
        params: &LfMemoryFwdParams,
        check_workspace: bool,
    ) -> Result<Option<TwoPass>> {
        if memory.workspace == 0 {
            return Ok(None);
        }
        let parts = Parts::of(fwd, params.rotate != 0);
        let decided = passes(fwd, memory, params, parts, STAND_IN)?;
        let on_hopper = self.runs_on_hopper(&decided.local)
            && decided.memory.as_ref().is_none_or(|(mem, _)| {
                if memory.mask == 0 {
                    self.runs_on_hopper(mem)
                } else {
                    matches!(self.keymask_plan(mem, memory.mask), Ok(Some(_)))
                }
            });
        if !on_hopper {
            return Ok(None);
        }
        if check_workspace {
            check_workspace_of(
                fwd,
                memory,
                params,
                parts.total,
                "the two-pass path: Attention::memory_workspace_bytes",
            )?;
        }
        let mut plan = passes(fwd, memory, params, parts, memory.workspace)?;
        if memory.mask != 0 {
            if let Some((mem, _)) = &plan.memory {
                let Some(masked) = self.keymask_plan(mem, memory.mask)? else {
                    return Ok(None);
                };
                plan.masked = Some(masked);
            }
        }
        Ok(Some(plan))
    }

    /// The Hopper launch of the memory pass `mem` with the memory's mask at `mask` (`[batch,
    /// mem_len]` bytes), or `None` where the Hopper kernel with a per-key mask cannot run it.
    fn keymask_plan(
        &self,
        mem: &RawForward,
        mask: u64,
    ) -> Result<Option<Plan<LfFwdKeyMaskSm90Params>>> {
        let fwd = mem.validate()?;
        self.keymask_sm90_plan(mem, fwd, mask, mem.k_layout.seqlen)
    }

    /// Whether this forward call runs on the Hopper mainloop here (an argument it refuses, or a
    /// [`MainloopChoice::Sm90`](crate::MainloopChoice::Sm90) it cannot honour, reads as no).
    fn runs_on_hopper(&self, args: &RawForward) -> bool {
        matches!(self.mainloop_for(args), Ok(Mainloop::Sm90))
    }

    /// Launches the passes of `plan` on `stream`, after the RoPE key pass (which the caller has
    /// launched when the call rotates).
    ///
    /// # Safety
    /// As [`forward_memory_raw`](Self::forward_memory_raw), with `plan` made by
    /// [`two_pass_plan`](Self::two_pass_plan) with the workspace checked from the same
    /// arguments.
    pub(super) unsafe fn launch_two_pass(
        &self,
        stream: sys::CUstream,
        dtype: &str,
        plan: TwoPass,
    ) -> Result<()> {
        if let Some(mut queries) = plan.queries {
            // SAFETY: validated parameters; the rotated queries go to their own part of the
            // checked workspace.
            unsafe { self.launch_rope_queries(stream, dtype, &mut queries) }?;
        }
        // SAFETY: the forward's arguments are the call's validated tensors and parts of the
        // checked workspace, written before on this stream.
        unsafe { self.forward_raw(stream, &plan.local) }?;
        if let Some((mem, merge)) = plan.memory {
            match plan.masked {
                // SAFETY: as above; the memory pass writes its own parts of the workspace; the
                // mask holds `batch * mem_len` bytes (validated with the memory) and the kernel
                // reads the bytes of keys below mem_len only.
                Some(mut masked) => unsafe { self.launch_plan(stream, &mem, &mut masked) }?,
                // SAFETY: as above; the memory pass writes its own parts of the workspace.
                None => unsafe { self.forward_raw(stream, &mem) }?,
            }
            // SAFETY: the merge reads the memory pass's parts and updates `o` and the local
            // LSE, all written above on this stream, validated in the plan.
            unsafe { self.merge_raw(stream, &merge) }?;
        }
        Ok(())
    }
}

/// The passes of a call with the workspace's parts at `ws` (validated where they are made).
fn passes(
    fwd: &RawForward,
    memory: &RawMemory,
    params: &LfMemoryFwdParams,
    parts: Parts,
    ws: u64,
) -> Result<TwoPass> {
    let d = fwd.q_layout.head_dim;
    let at = |off: usize| ws + off as u64;
    let (q, q_layout) = match parts.q_rot {
        Some(off) => (at(off), packed(&fwd.q_layout)),
        None => (fwd.q, fwd.q_layout),
    };
    let (k, k_layout) = if params.rotate != 0 {
        let kl = &fwd.k_layout;
        (
            params.rope.k_rot as u64,
            Layout::bshd(kl.batch, kl.seqlen, kl.heads, d),
        )
    } else {
        (fwd.k, fwd.k_layout)
    };
    let lse_local = parts.lse_local.map_or(fwd.lse, at);
    let local = RawForward {
        q,
        k,
        q_layout,
        k_layout,
        lse: lse_local,
        block_mask: None,
        ..*fwd
    };
    let memory_pass = if memory.keys_layout.seqlen > 0 {
        let mem = RawForward {
            q,
            k: memory.keys,
            v: memory.values,
            o: at(parts.o_mem),
            lse: at(parts.lse_mem),
            q_layout,
            k_layout: memory.keys_layout,
            v_layout: memory.values_layout,
            o_layout: packed(&fwd.q_layout),
            options: crate::ForwardOptions {
                mask: MaskSpec::none(),
                softmax_scale: fwd.options.softmax_scale,
            },
            ..*fwd
        };
        let merge = RawMerge {
            dtype: fwd.dtype,
            acc_o: fwd.o,
            acc_lse: lse_local,
            part_o: mem.o,
            part_lse: mem.lse,
            acc_layout: fwd.o_layout,
            part_layout: mem.o_layout,
        };
        merge.validate()?;
        Some((mem, merge))
    } else {
        None
    };
    let queries = parts.q_rot.map(|off| {
        rope_queries_params(
            (fwd.q, &fwd.q_layout),
            (at(off), 0),
            0,
            fwd.k_layout.seqlen,
            params.rope,
        )
    });
    Ok(TwoPass {
        queries,
        local,
        memory: memory_pass,
        masked: None,
    })
}

/// A memory call's workspace against the call: given, large enough, aligned, apart from every
/// tensor the call reads or writes.
pub(super) fn check_workspace_of(
    fwd: &RawForward,
    memory: &RawMemory,
    params: &LfMemoryFwdParams,
    need: usize,
    sized_by: &str,
) -> Result<()> {
    let mut others = call_ranges(fwd, memory);
    if params.rotate != 0 {
        let k = &fwd.k_layout;
        let k_rot = Layout::bshd(k.batch, k.seqlen, k.heads, k.head_dim);
        others.push((
            "rope.k_rot",
            byte_range(params.rope.k_rot as u64, &k_rot, 2),
        ));
        others.extend(table_ranges(&params.rope, fwd.q_layout.batch));
    }
    check::workspace(
        ("memory.workspace", "memory.workspace_bytes"),
        (memory.workspace, memory.workspace_bytes),
        need,
        sized_by,
        others,
    )
}
