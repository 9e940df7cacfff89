//! The decoding entry points: the safe ones over cudarc views (`decode`, and what the RoPE
//! decoding shares with it), the raw one, the plan query and the launches.

use cudarc::driver::{
    result, sys, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceSlice,
    LaunchConfig,
};

use super::validate::{place_workspace, prefill_params, split_counters};
use super::{
    decode_smem_bytes, BlockTable, DecodeOptions, DecodePlan, KvCache, RawDecode, SplitCounters,
};
use crate::attention::{sized_module, Attention, Input, Output, Scratch};
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::loader::CtxGuard;
use crate::sys::{LfDecodeParams, LF_DECODE_WARPS};

impl Attention {
    /// The decoding CTAs a split plan aims to fill the device with: one per SM. Timed on an H100
    /// at batch 1 (GQA 32:8, 8k and 32k tokens), 16 splits of 8 KV heads (one CTA per SM)
    /// beat the 33 that fill every SM with the two CTAs it holds by 5-7%: each CTA's fixed
    /// latencies (cache length, first loads, publishing its rows) are paid once per 512 keys
    /// rather than per 256, and the last CTA merges half as many splits; batches that already
    /// give every SM a CTA timed the same either way.
    pub(in crate::attention) fn decode_slots(&self) -> usize {
        self.sm_count as usize
    }

    /// The split plan [`decode_raw`](Self::decode_raw) would use for `args` on this device (its
    /// workspace size in particular), after the same validation but for the workspace itself.
    pub fn decode_plan(&self, args: &RawDecode) -> Result<DecodePlan> {
        self.plan_for(args, false)
    }

    /// The plan of [`decode_rope_raw`](Self::decode_rope_raw) for `args` (its workspace size in
    /// particular): RoPE decoding always runs the decoding kernel.
    pub fn decode_rope_plan(&self, args: &RawDecode) -> Result<DecodePlan> {
        self.plan_for(args, true)
    }

    fn plan_for(&self, args: &RawDecode, rope: bool) -> Result<DecodePlan> {
        args.validate_with(self.decode_slots(), false, rope)
            .map(|(_, plan)| plan)
    }

    /// The decoding forward on the caller's stream (see the [module](self) docs): `q` the new
    /// query tokens, `cache` the keys and values to attend, `out` O and optionally the
    /// log-sum-exp. Validated before launch like [`forward`](Self::forward); the workspace of a
    /// split plan is allocated on `stream` and freed after the launch (stream-ordered). The
    /// kernel clamps cache lengths and table entries and, when `error_flag` is given, ORs 1 into
    /// it if it had to. The call does not synchronize.
    pub fn decode<T: Element>(
        &self,
        stream: &CudaStream,
        q: Input<'_, '_, T>,
        cache: &KvCache<'_, '_, T>,
        out: Output<'_, '_, T>,
        error_flag: Option<&mut CudaViewMut<'_, i32>>,
        options: &DecodeOptions,
    ) -> Result<()> {
        self.decode_counted(stream, q, cache, out, error_flag, options, None)
    }

    /// [`decode`](Self::decode) with split counters kept across calls (made once, e.g. with
    /// [`SplitCounters::for_shape`]): no memset of the workspace's counters per call, and the
    /// split workspace kept in the set (allocated by the first call that needs more than it
    /// holds), so that a loop's calls allocate nothing after the first. Too few counters for the
    /// call's plan is [`Error::OutOfBounds`].
    #[allow(clippy::too_many_arguments)]
    pub fn decode_kept<T: Element>(
        &self,
        stream: &CudaStream,
        q: Input<'_, '_, T>,
        cache: &KvCache<'_, '_, T>,
        out: Output<'_, '_, T>,
        error_flag: Option<&mut CudaViewMut<'_, i32>>,
        options: &DecodeOptions,
        counters: &mut SplitCounters,
    ) -> Result<()> {
        self.decode_counted(stream, q, cache, out, error_flag, options, Some(counters))
    }

    /// [`decode`](Self::decode) and [`decode_kept`](Self::decode_kept): the workspace's
    /// counters, zeroed by the launch, or the caller's.
    #[allow(clippy::too_many_arguments)]
    fn decode_counted<T: Element>(
        &self,
        stream: &CudaStream,
        q: Input<'_, '_, T>,
        cache: &KvCache<'_, '_, T>,
        out: Output<'_, '_, T>,
        error_flag: Option<&mut CudaViewMut<'_, i32>>,
        options: &DecodeOptions,
        counters: Option<&mut SplitCounters>,
    ) -> Result<()> {
        self.decode_views(
            stream,
            q,
            cache,
            out,
            (error_flag, counters),
            options,
            (false, true),
            |args, params, plan| {
                // SAFETY: decode_views validated the call, checked every buffer against what the
                // kernel reads (caller's counters too: enough of them, apart from the device
                // indices, zero as every completed call leaves them) and holds their stream
                // guards and the workspace while this runs.
                unsafe { self.launch_validated(stream.cu_stream(), args, params, plan) }
            },
        )
    }

    /// Checks the device arrays a cache call reads besides the tensors: the block table holds
    /// `batch * max_pages_per_seq` entries, the lengths `batch`, the flag one, all in this
    /// context.
    pub(in crate::attention) fn check_cache_indices(
        &self,
        batch: usize,
        block_table: Option<&BlockTable<'_, '_>>,
        cache_seqlens: Option<&CudaView<'_, i32>>,
        error_flag: Option<&CudaViewMut<'_, i32>>,
    ) -> Result<()> {
        if let Some(bt) = block_table {
            self.same_context("block_table", bt.table.stream().context().cu_ctx())?;
            let need = (batch as u128) * (bt.max_pages_per_seq as u128);
            if need > bt.table.len() as u128 || bt.max_pages_per_seq == 0 {
                return Err(Error::OutOfBounds {
                    arg: "block_table",
                    required: need.max(1),
                    len: bt.table.len(),
                });
            }
        }
        if let Some(cs) = cache_seqlens {
            self.same_context("cache_seqlens", cs.stream().context().cu_ctx())?;
            if cs.len() < batch {
                return Err(Error::OutOfBounds {
                    arg: "cache_seqlens",
                    required: batch as u128,
                    len: cs.len(),
                });
            }
        }
        if let Some(f) = error_flag {
            self.same_context("error_flag", f.stream().context().cu_ctx())?;
            if f.is_empty() {
                return Err(Error::OutOfBounds {
                    arg: "error_flag",
                    required: 1,
                    len: 0,
                });
            }
        }
        Ok(())
    }

    /// What the safe decoding entries share: checks the views (contexts, lengths against the
    /// layouts, the table's and lengths' sizes), lowers them to a [`RawDecode`], validates it once
    /// (the RoPE plan with `rope`), places the split partials in a stream-ordered workspace of the
    /// plan's size (with `with_workspace`: a caller that carves its own passes false and gets
    /// none), and calls `run` with the arguments, the kernel's parameters and the plan.
    ///
    /// `run` may launch on `stream` with the arguments it gets: every buffer holds what
    /// [`Attention::decode_raw`] requires, guarded for the stream until `run` returns, and the
    /// workspace is freed after the work queued on the stream.
    #[allow(clippy::too_many_arguments)]
    pub(in crate::attention) fn decode_views<T: Element>(
        &self,
        stream: &CudaStream,
        q: Input<'_, '_, T>,
        cache: &KvCache<'_, '_, T>,
        out: Output<'_, '_, T>,
        (error_flag, counters): (
            Option<&mut CudaViewMut<'_, i32>>,
            Option<&mut SplitCounters>,
        ),
        options: &DecodeOptions,
        (rope, with_workspace): (bool, bool),
        run: impl FnOnce(&RawDecode, LfDecodeParams, &DecodePlan) -> Result<()>,
    ) -> Result<()> {
        self.same_context("stream", stream.context().cu_ctx())?;
        self.check_view("q", q.data, &q.layout)?;
        self.check_view("k", cache.k.data, &cache.k.layout)?;
        self.check_view("v", cache.v.data, &cache.v.layout)?;
        self.check_view("o", &*out.data, &out.layout)?;
        let batch = q.layout.batch;
        if let Some(lse) = &out.lse {
            self.same_context("lse", lse.stream().context().cu_ctx())?;
            let need = (batch as u128) * (q.layout.heads as u128) * (q.layout.seqlen as u128);
            if need > lse.len() as u128 {
                return Err(Error::OutOfBounds {
                    arg: "lse",
                    required: need,
                    len: lse.len(),
                });
            }
        }
        self.check_cache_indices(
            batch,
            cache.block_table.as_ref(),
            cache.cache_seqlens,
            error_flag.as_deref(),
        )?;

        let (qp, _gq) = q.data.device_ptr(stream);
        let (kp, _gk) = cache.k.data.device_ptr(stream);
        let (vp, _gv) = cache.v.data.device_ptr(stream);
        let (op, _go) = out.data.device_ptr_mut(stream);
        let (lp, _gl) = match out.lse {
            Some(l) => {
                let (p, g) = l.device_ptr_mut(stream);
                (p, Some(g))
            }
            None => (0, None),
        };
        let (bp, _gb) = match &cache.block_table {
            Some(bt) => {
                let (p, g) = bt.table.device_ptr(stream);
                (p, Some(g))
            }
            None => (0, None),
        };
        let (cp, _gc) = match &cache.cache_seqlens {
            Some(cs) => {
                let (p, g) = cs.device_ptr(stream);
                (p, Some(g))
            }
            None => (0, None),
        };
        let (fp, _gf) = match error_flag {
            Some(f) => {
                let (p, g) = f.device_ptr_mut(stream);
                (p, Some(g))
            }
            None => (0, None),
        };
        let (counters, kept) = match counters.map(|c| c.parts_mut()) {
            Some((c, k)) => (Some(c), Some(k)),
            None => (None, None),
        };
        if let Some(c) = &counters {
            self.same_context("counters", c.stream().context().cu_ctx())?;
        }
        // The set's stream, which allocates its workspace.
        let set_stream = counters.as_ref().map(|c| c.stream().clone());
        let counters_len = counters.as_ref().map_or(0, |c| c.len());
        let (sp, _gs) = match counters {
            Some(c) => {
                let (p, g) = c.device_ptr_mut(stream);
                (p, Some(g))
            }
            None => (0, None),
        };
        let mut args = RawDecode {
            dtype: T::DTYPE,
            q: qp,
            k: kp,
            v: vp,
            o: op,
            lse: lp,
            q_layout: q.layout,
            k_layout: cache.k.layout,
            v_layout: cache.v.layout,
            o_layout: out.layout,
            block_table: bp,
            max_pages_per_seq: cache.block_table.map_or(0, |bt| bt.max_pages_per_seq),
            cache_seqlens: cp,
            error_flag: fp,
            options: *options,
            workspace: 0,
            workspace_bytes: 0,
            split_counters: sp,
            split_counters_len: counters_len,
        };
        let (mut params, plan) = args.validate_with(self.decode_slots(), false, rope)?;
        if sp != 0 && plan.counters > 0 {
            if counters_len < plan.counters {
                return Err(Error::OutOfBounds {
                    arg: "counters",
                    required: plan.counters as u128,
                    len: counters_len,
                });
            }
            // Their own allocation, so apart from the device indices; checked as the raw
            // entry's are, since the kernel writes them.
            args.counters_apart_from_indices(&plan)?;
        }
        let need = plan.workspace_bytes;
        let mut scratch = None;
        let mut kept_guard = None;
        if with_workspace && need > 0 {
            let (ptr, bytes) = match (kept, set_stream) {
                // The caller's set: its workspace, grown to the plan's size when smaller.
                (Some(kept), Some(set_stream)) => {
                    if kept.as_ref().is_none_or(|p| p.len() < need) {
                        // The smaller one (if any) is released after the work queued on it.
                        *kept = None;
                        *kept = Some(
                            set_stream
                                .alloc_zeros::<u8>(need)
                                .map_err(Error::driver("allocating the split workspace"))?,
                        );
                    }
                    let buf = kept.as_mut().expect("allocated above");
                    let bytes = buf.len();
                    let (p, g) = buf.device_ptr_mut(stream);
                    kept_guard = Some(g);
                    (p, bytes)
                }
                _ => {
                    // SAFETY: a stream of this value's context (checked above); the scratch is
                    // freed on the same stream after the launches that use it.
                    let w = unsafe { Scratch::new(self.ctx, stream.cu_stream(), need) }?;
                    let at = (w.ptr, w.bytes);
                    scratch = Some(w);
                    at
                }
            };
            args.workspace = ptr;
            args.workspace_bytes = bytes;
            // Its own allocation of at least the plan's size (a fresh one, or the set's, which
            // no view can reach): it overlaps none of the call's buffers.
            place_workspace(&mut params, ptr, sp);
        }
        // Every buffer was checked against its layout (or the lengths the kernel reads: batch
        // cache lengths, batch * max_pages_per_seq table entries, one flag) and context, and is
        // guarded for the stream while `run` runs; the workspace is a stream-ordered allocation
        // of the plan's size on this stream, freed after the launches, or the caller's set's,
        // guarded for the stream like the views.
        let r = run(&args, params, &plan);
        // Held until `run` has queued its launches.
        drop((scratch, kept_guard));
        r
    }

    /// The decoding forward from raw pointers. Validates everything [`RawDecode::validate`] can
    /// before launch; runs on every device of compute capability 8.0 or newer.
    ///
    /// # Safety
    /// - `stream` is a stream of this value's context (or null for its legacy default stream).
    /// - Every pointer in `args` is device memory of that context that holds every element its
    ///   layout addresses (`lse`, when not 0, `batch * heads_q * seqlen_q` f32 values; the block
    ///   table, when not 0, `batch * max_pages_per_seq` i32; `cache_seqlens`, when not 0, `batch`
    ///   i32; `error_flag`, when not 0, one i32; `workspace` its `workspace_bytes`;
    ///   `split_counters`, when not 0, `split_counters_len` i32), and stays allocated until the
    ///   kernels have finished. The device values (lengths, table entries) may be anything: the
    ///   kernel clamps them. The caller's split counters are zero when the kernel starts (as every
    ///   completed call leaves them; other values give unspecified outputs, never an access
    ///   outside these buffers).
    /// - Nothing else writes those inputs, or reads or writes the outputs, the workspace and the
    ///   split counters, until the kernels have finished (order other streams with events).
    pub unsafe fn decode_raw(&self, stream: sys::CUstream, args: &RawDecode) -> Result<()> {
        let (params, plan) = args.validate(self.decode_slots())?;
        // SAFETY: this fn's contract, and `params` and `plan` came from `args.validate`.
        unsafe { self.launch_validated(stream, args, params, &plan) }
    }

    /// The launches of a validated decoding call: the chunked-prefill kernel, or the decoding
    /// kernel and, with several splits, the split merge.
    ///
    /// # Safety
    /// As [`decode_raw`](Self::decode_raw), with `params` and `plan` from validating `args` (the
    /// split partials placed in a workspace that holds the plan's bytes).
    pub(in crate::attention) unsafe fn launch_validated(
        &self,
        stream: sys::CUstream,
        args: &RawDecode,
        mut params: LfDecodeParams,
        plan: &DecodePlan,
    ) -> Result<()> {
        let d = args.q_layout.head_dim;
        if plan.prefill {
            let mut paged = prefill_params(&params);
            let tiles = self.sm80_tiles(d, 1, "chunked-prefill kernel")?;
            // SAFETY: `paged` is the validated call's LfPagedFwdParams (params.h), the kernel's
            // one by-value parameter; pointers and stream per this fn's contract; the grid covers
            // every (query tile, head, sequence) once.
            return unsafe {
                self.launch_sm80(
                    stream,
                    &sized_module("paged_fwd", args.dtype.name(), d),
                    tiles,
                    (
                        args.q_layout.seqlen,
                        args.q_layout.heads,
                        args.q_layout.batch,
                    ),
                    &mut paged,
                    "launching the chunked-prefill kernel",
                )
            };
        }
        let base = params;
        // SAFETY: `params` was validated and is the kernel's one by-value parameter
        // (LfDecodeParams from params.h); pointers, workspace and stream are valid per this fn's
        // contract.
        unsafe {
            self.launch_decode(
                stream,
                args,
                plan,
                ("decode", decode_smem_bytes(d)),
                &mut params,
                &base,
            )
        }
    }

    /// Launches the decoding kernel `lf_{kind}_{dtype}_d{d}` with `params`, one CTA per (split,
    /// row block, sequence and KV head) of `plan`, after zeroing, with several splits, the split
    /// counters of `base` (the same call's LfDecodeParams) on the stream, unless the caller keeps
    /// them (`args.split_counters`): the last split of each group to finish merges them in the
    /// kernel and zeroes its counter.
    ///
    /// # Safety
    /// As [`Attention::launch`]: `params` is the kernel's parameter struct made from `args`
    /// validated with `plan`, and every pointer in it satisfies [`decode_raw`](Self::decode_raw)'s
    /// contract.
    pub(in crate::attention) unsafe fn launch_decode<P>(
        &self,
        stream: sys::CUstream,
        args: &RawDecode,
        plan: &DecodePlan,
        (kind, smem): (&str, usize),
        params: &mut P,
        base: &LfDecodeParams,
    ) -> Result<()> {
        let d = args.q_layout.head_dim;
        let smem = smem as u32;
        if smem > self.max_smem_optin {
            return Err(Error::InvalidArgument {
                arg: "q.head_dim",
                value: d.to_string(),
                expected: format!(
                    "a head dim whose {kind} kernel fits the device's {} bytes of shared memory \
                     per block (needs {smem})",
                    self.max_smem_optin
                ),
            });
        }
        let dtype = args.dtype.name();
        let module = sized_module(kind, dtype, d);
        // SAFETY: the context is kept alive by `_owner` or by the caller of from_raw_context.
        let kernel = unsafe { self.cache.kernel(&module, &format!("lf_{module}"), smem) }?;
        let config = LaunchConfig {
            grid_dim: (
                plan.num_splits as u32,
                plan.row_blocks as u32,
                (args.q_layout.batch * args.k_layout.heads) as u32,
            ),
            block_dim: (LF_DECODE_WARPS * 32, 1, 1),
            shared_mem_bytes: smem,
        };
        let (counters, bytes) = split_counters(base, plan.row_blocks, args.split_counters);
        if bytes > 0 {
            // SAFETY: the context is kept alive by `_owner` or by the caller of
            // from_raw_context.
            let _g = unsafe { CtxGuard::bind(self.ctx) }?;
            // SAFETY: the counters lie inside the call's workspace (place_workspace, sized by the
            // plan), device memory of this context per this fn's contract; stream-ordered.
            unsafe { result::memset_d8_async(counters, 0, bytes, stream) }
                .map_err(Error::driver("zeroing the decoding split counters"))?;
        }
        // SAFETY: this fn's contract; the grid covers every (split, row block, sequence and KV
        // head) once, and the counters the last split of each group reads are zero.
        unsafe {
            self.launch(
                &kernel,
                config,
                stream,
                params,
                "launching the decoding kernel",
            )
        }?;
        Ok(())
    }
}
