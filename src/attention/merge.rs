//! The LSE merge: combines two attention results over disjoint (or overlapping) key sets by their
//! log-sum-exps, in place. Its raw arguments and validation, and the safe and raw entry points.

use cudarc::driver::{
    sys, CudaStream, CudaView, DevicePtr, DevicePtrMut, DeviceSlice, LaunchConfig,
};

use super::{Attention, Input, Output};
use crate::check::{aligned, byte_range, mismatch, overlaps, strides_multiple_of};
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::sys::LfMergeParams;

/// Arguments of the raw LSE merge: `acc` (O and LSE, updated in place) absorbs `part`.
/// O pointers address element `(0, 0, 0, 0)`; LSEs are contiguous f32 `[batch, heads, seqlen]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RawMerge {
    /// Element type of both O tensors.
    pub dtype: DType,
    /// Accumulated output (read and written).
    pub acc_o: sys::CUdeviceptr,
    /// Accumulated log-sum-exp (read and written).
    pub acc_lse: sys::CUdeviceptr,
    /// Partial output (read).
    pub part_o: sys::CUdeviceptr,
    /// Partial log-sum-exp (read).
    pub part_lse: sys::CUdeviceptr,
    /// Layout of `acc_o`.
    pub acc_layout: Layout,
    /// Layout of `part_o` (same shape).
    pub part_layout: Layout,
}

/// The f32 an LSE of `l`'s `[batch, heads, seqlen]` rows reaches with its (batch, head) rows
/// `stride` apart: the last row ends `seqlen` past its start (0 for an empty tensor, which
/// validation refuses).
fn lse_reach(l: &Layout, stride: usize) -> u128 {
    let bh = l.batch as u128 * l.heads as u128;
    match bh {
        0 => 0,
        _ => (bh - 1) * stride as u128 + l.seqlen as u128,
    }
}

impl RawMerge {
    /// Checks shapes, head dim (a multiple of 8 up to 256, or of 4 up to 128: LongLLaMA-3B's
    /// 100), alignment (rows of whole 16-byte chunks, or 8-byte ones at a head dim of an odd
    /// multiple of 4) and overlap, and lowers the call to the kernel's parameters.
    pub fn validate(&self) -> Result<LfMergeParams> {
        let s = self.acc_layout.seqlen;
        self.validate_lse_strides(s, self.part_layout.seqlen)
    }

    /// [`validate`](Self::validate) with LSEs whose consecutive (batch, head) rows lie
    /// `acc_lse_stride` and `part_lse_stride` f32 apart (at least `seqlen`): the LSEs of a range
    /// of rows of longer `[batch, heads, rows]` tensors, as a ring's sub-chunk merges use.
    pub(crate) fn validate_lse_strides(
        &self,
        acc_lse_stride: usize,
        part_lse_stride: usize,
    ) -> Result<LfMergeParams> {
        let (a, p) = (&self.acc_layout, &self.part_layout);
        a.check_dims("acc")?;
        p.check_dims("part")?;
        mismatch("part.batch", p.batch, "acc.batch", a.batch)?;
        mismatch("part.seqlen", p.seqlen, "acc.seqlen", a.seqlen)?;
        mismatch("part.heads", p.heads, "acc.heads", a.heads)?;
        mismatch("part.head_dim", p.head_dim, "acc.head_dim", a.head_dim)?;
        // The kernel's chunk: 8 elements (16 bytes), or 4 (8 bytes) where 8 do not divide the
        // head; a warp's 32 lanes take one chunk each.
        let chunk = if a.head_dim % 8 == 0 { 8 } else { 4 };
        if a.head_dim % 4 != 0 || a.head_dim > 32 * chunk {
            return Err(Error::InvalidArgument {
                arg: "acc.head_dim",
                value: a.head_dim.to_string(),
                expected: "a multiple of 8 up to 256 or of 4 up to 128".into(),
            });
        }
        for (arg, v) in [
            ("acc.seqlen", a.seqlen),
            ("acc.heads", a.heads),
            ("acc.batch", a.batch),
        ] {
            if v > i32::MAX as usize {
                return Err(Error::InvalidArgument {
                    arg,
                    value: v.to_string(),
                    expected: "at most i32::MAX".into(),
                });
            }
        }
        for (arg, stride) in [
            ("acc_lse_stride", acc_lse_stride),
            ("part_lse_stride", part_lse_stride),
        ] {
            if stride < a.seqlen || stride > i64::MAX as usize {
                return Err(Error::InvalidArgument {
                    arg,
                    value: stride.to_string(),
                    expected: format!("at least seqlen ({}) and at most i64::MAX", a.seqlen),
                });
            }
        }
        let rows = a.batch as u128 * a.heads as u128 * a.seqlen as u128;
        if rows.div_ceil(8) > u32::MAX as u128 {
            return Err(Error::InvalidArgument {
                arg: "acc",
                value: format!("{rows} rows"),
                expected: "at most 8 * u32::MAX rows".into(),
            });
        }
        aligned("acc.ptr", self.acc_o, 2 * chunk as u64, false)?;
        aligned("part.ptr", self.part_o, 2 * chunk as u64, false)?;
        aligned("acc_lse.ptr", self.acc_lse, 4, true)?;
        aligned("part_lse.ptr", self.part_lse, 4, true)?;
        strides_multiple_of("acc", a, chunk as i64)?;
        strides_multiple_of("part", p, chunk as i64)?;
        if !a.is_non_overlapping() {
            return Err(Error::OverlappingOutput { arg: "acc" });
        }
        let acc_range = byte_range(self.acc_o, a, 2);
        let span = |stride: usize| lse_reach(a, stride) as i128 * 4;
        let acc_lse = (
            self.acc_lse as i128,
            self.acc_lse as i128 + span(acc_lse_stride),
        );
        let part_lse = (
            self.part_lse as i128,
            self.part_lse as i128 + span(part_lse_stride),
        );
        let part_range = byte_range(self.part_o, p, 2);
        if overlaps(acc_range, part_range) {
            return Err(Error::Aliasing {
                output: "acc",
                other: "part",
            });
        }
        if overlaps(acc_range, part_lse) {
            return Err(Error::Aliasing {
                output: "acc",
                other: "part_lse",
            });
        }
        for (other, r) in [
            ("acc", acc_range),
            ("part", part_range),
            ("part_lse", part_lse),
        ] {
            if overlaps(acc_lse, r) {
                return Err(Error::Aliasing {
                    output: "acc_lse",
                    other,
                });
            }
        }
        Ok(LfMergeParams {
            acc_o: self.acc_o as *mut _,
            acc_lse: self.acc_lse as *mut f32,
            part_o: self.part_o as *const _,
            part_lse: self.part_lse as *const f32,
            acc_batch_stride: a.batch_stride,
            acc_head_stride: a.head_stride,
            acc_row_stride: a.seq_stride,
            part_batch_stride: p.batch_stride,
            part_head_stride: p.head_stride,
            part_row_stride: p.seq_stride,
            batch: a.batch as i32,
            heads: a.heads as i32,
            seqlen: a.seqlen as i32,
            head_dim: a.head_dim as i32,
            acc_lse_stride: acc_lse_stride as i64,
            part_lse_stride: part_lse_stride as i64,
        })
    }
}

impl Attention {
    /// Merges a partial attention result into an accumulated one, in place, by their
    /// log-sum-exps: after the call `acc` holds the attention over the union of both key sets
    /// (LongNet and MoBA combine sparse branches this way). Both results must come with their
    /// LSE (`acc.lse` is required). Rows where both LSEs are `-inf` stay 0 and `-inf`.
    pub fn merge<T: Element>(
        &self,
        stream: &CudaStream,
        acc: Output<'_, '_, T>,
        part: Input<'_, '_, T>,
        part_lse: &CudaView<'_, f32>,
    ) -> Result<()> {
        let (sa, sp) = (acc.layout.seqlen, part.layout.seqlen);
        self.merge_strided(stream, (acc, sa), part, (part_lse, sp))
    }

    /// [`merge`](Self::merge) with LSEs whose consecutive (batch, head) rows lie the given
    /// number of f32 apart (at least `seqlen`): a range of rows of longer results, whose O views
    /// carry their strides in their layouts.
    pub(in crate::attention) fn merge_strided<T: Element>(
        &self,
        stream: &CudaStream,
        (acc, acc_lse_stride): (Output<'_, '_, T>, usize),
        part: Input<'_, '_, T>,
        (part_lse, part_lse_stride): (&CudaView<'_, f32>, usize),
    ) -> Result<()> {
        self.same_context("stream", stream.context().cu_ctx())?;
        let Some(acc_lse) = acc.lse else {
            return Err(Error::InvalidArgument {
                arg: "acc.lse",
                value: "None".into(),
                expected: "the accumulated result's log-sum-exp".into(),
            });
        };
        let lse_len = |stride: usize| lse_reach(&acc.layout, stride.max(acc.layout.seqlen));
        for (arg, ctx, required, len) in [
            (
                "acc",
                acc.data.stream().context().cu_ctx(),
                acc.layout.required_len("acc")?,
                acc.data.len(),
            ),
            (
                "part",
                part.data.stream().context().cu_ctx(),
                part.layout.required_len("part")?,
                part.data.len(),
            ),
            (
                "acc_lse",
                acc_lse.stream().context().cu_ctx(),
                lse_len(acc_lse_stride),
                acc_lse.len(),
            ),
            (
                "part_lse",
                part_lse.stream().context().cu_ctx(),
                lse_len(part_lse_stride),
                part_lse.len(),
            ),
        ] {
            self.same_context(arg, ctx)?;
            if required > len as u128 {
                return Err(Error::OutOfBounds { arg, required, len });
            }
        }
        let (ao, _g1) = acc.data.device_ptr_mut(stream);
        let (al, _g2) = acc_lse.device_ptr_mut(stream);
        let (po, _g3) = part.data.device_ptr(stream);
        let (pl, _g4) = part_lse.device_ptr(stream);
        let raw = RawMerge {
            dtype: T::DTYPE,
            acc_o: ao,
            acc_lse: al,
            part_o: po,
            part_lse: pl,
            acc_layout: acc.layout,
            part_layout: part.layout,
        };
        // SAFETY: the buffers belong to this context and hold what their layouts reach (checked
        // above); the guards order the launch against other streams.
        unsafe {
            self.merge_raw_strided(stream.cu_stream(), &raw, (acc_lse_stride, part_lse_stride))
        }
    }

    /// The LSE merge from raw device pointers; validates as [`RawMerge::validate`].
    ///
    /// # Safety
    /// `stream` belongs to this value's context; every pointer is device memory of that context
    /// holding what its layout (or `batch * heads * seqlen` f32 for the LSEs) addresses, alive and
    /// not used by anything else until the kernel has finished.
    pub unsafe fn merge_raw(&self, stream: sys::CUstream, args: &RawMerge) -> Result<()> {
        let strides = (args.acc_layout.seqlen, args.part_layout.seqlen);
        // SAFETY: this fn's contract, with the contiguous LSEs it states.
        unsafe { self.merge_raw_strided(stream, args, strides) }
    }

    /// [`merge_raw`](Self::merge_raw) with LSE row strides, validated as
    /// [`RawMerge::validate_lse_strides`].
    ///
    /// # Safety
    /// As [`merge_raw`](Self::merge_raw), each LSE holding what its stride reaches:
    /// `(batch * heads - 1) * stride + seqlen` f32.
    unsafe fn merge_raw_strided(
        &self,
        stream: sys::CUstream,
        args: &RawMerge,
        (acc_lse_stride, part_lse_stride): (usize, usize),
    ) -> Result<()> {
        let mut params = args.validate_lse_strides(acc_lse_stride, part_lse_stride)?;
        let name = format!("lf_merge_{}", args.dtype.name());
        let module = format!("merge_{}", args.dtype.name());
        // SAFETY: the context is kept alive by `_owner` or by the caller of from_raw_context.
        let kernel = unsafe { self.cache.kernel(&module, &name, 0) }?;
        let rows = args.acc_layout.batch as u64
            * args.acc_layout.heads as u64
            * args.acc_layout.seqlen as u64;
        let grid = (rows.div_ceil(8) as u32, 1, 1); // 8 warps of 256 threads, one row each
                                                    // SAFETY: `params` was validated and is the kernel's one by-value parameter; pointers and
                                                    // stream are valid per this fn's contract; one warp per row covers every row once.
        unsafe {
            self.launch(
                &kernel,
                LaunchConfig {
                    grid_dim: grid,
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                },
                stream,
                &mut params,
                "launching the merge kernel",
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(seqlen: usize) -> RawMerge {
        let l = Layout::bshd(2, seqlen, 3, 64);
        RawMerge {
            dtype: DType::Bf16,
            acc_o: 1 << 20,
            acc_lse: 2 << 20,
            part_o: 3 << 20,
            part_lse: 4 << 20,
            acc_layout: l,
            part_layout: l,
        }
    }

    #[test]
    fn lse_strides_reach_the_last_row() {
        // Rows 10 of a chunk of 40: strides of 40 for the accumulator, 10 for the partial.
        let p = raw(10).validate_lse_strides(40, 10).unwrap();
        assert_eq!((p.acc_lse_stride, p.part_lse_stride), (40, 10));
        let c = raw(10).validate().unwrap();
        assert_eq!((c.acc_lse_stride, c.part_lse_stride), (10, 10));
        // A stride shorter than a row would overlap the rows.
        assert!(matches!(
            raw(10).validate_lse_strides(9, 10),
            Err(Error::InvalidArgument {
                arg: "acc_lse_stride",
                ..
            })
        ));
        // The accumulator's LSE spans (2 * 3 - 1) * 40 + 10 floats: a partial LSE starting
        // inside that span aliases it, one starting right after does not.
        let mut r = raw(10);
        r.part_lse = r.acc_lse + (5 * 40 + 10 - 1) * 4;
        assert!(matches!(
            r.validate_lse_strides(40, 10),
            Err(Error::Aliasing {
                output: "acc_lse",
                ..
            })
        ));
        r.part_lse = r.acc_lse + (5 * 40 + 10) * 4;
        assert!(r.validate_lse_strides(40, 10).is_ok());
    }
}
