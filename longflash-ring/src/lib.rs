//! Ring attention across GPUs over NCCL (context parallelism) on longflash's kernels.
//!
//! Each rank holds a shard of Q, K and V as `longflash::ring::RingPlan` cuts the sequence
//! (contiguous or zigzag chunks). At every step a rank computes its queries against the key /
//! value shard it holds (`Attention::ring_step`: the visible chunk pairs, merged by log-sum-exp)
//! while, on the communicator's stream, it sends that shard to the next rank and receives the
//! one the previous rank held; after `ranks` steps its rows hold exact attention over the whole
//! sequence. [`ring_forward`] is one rank's part (the caller's communicator, one call per rank,
//! as engines that own their communicators run it); [`run_local_ring`] drives the GPUs of one
//! process, one thread each.
//!
//! NCCL is loaded at run time: without `libnccl` a ring is [`Error::NoNccl`], never a panic.
//! Keep NCCL's NVLink multicast off (`NCCL_NVLS_ENABLE=0`) on machines that require it;
//! [`run_local_ring`] sets it unless the environment already does.
//!
//! Forward only, under the plan's mask (none, causal, sliding windows: a step whose shard no
//! query of the rank reaches computes nothing and still passes the shard on), and under rotary
//! positions with [`ring_rope_forward`] (RoPE, ReRoPE, Leaky ReRoPE at global positions: each
//! rank rotates its own shard, the rotated keys travel); the backward is not in the plan yet.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, CudaView};
use cudarc::nccl::safe::{group_end, group_start, Comm, Id, NcclType};
use longflash::attention::ring::RowOrder;
use longflash::ring::RingPlan;
use longflash::rope::RopeOptions;
use longflash::{Attention, Element, Input, Layout, RingAccumulator};

/// What can go wrong in a ring.
#[derive(Debug)]
pub enum Error {
    /// No NCCL library (`libnccl.so.2`) could be loaded.
    NoNccl,
    /// An NCCL call failed.
    Nccl(String),
    /// longflash refused an argument or a launch failed.
    Attention(longflash::Error),
    /// A shard's buffer or shape does not fit the plan.
    Shard(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::NoNccl => f.write_str("no NCCL library (libnccl) could be loaded"),
            Error::Nccl(e) => write!(f, "NCCL: {e}"),
            Error::Attention(e) => write!(f, "{e}"),
            Error::Shard(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<longflash::Error> for Error {
    fn from(e: longflash::Error) -> Self {
        Error::Attention(e)
    }
}

/// The crate's result.
pub type Result<T> = std::result::Result<T, Error>;

fn nccl(e: impl std::fmt::Debug) -> Error {
    Error::Nccl(format!("{e:?}"))
}

fn driver(during: &'static str) -> impl FnOnce(cudarc::driver::DriverError) -> Error {
    move |source| Error::Attention(longflash::Error::Driver { during, source })
}

/// Whether an NCCL library can be loaded (the names cudarc's loader tries).
pub fn nccl_present() -> bool {
    cudarc::get_lib_name_candidates("nccl")
        .into_iter()
        .any(|name| {
            // SAFETY: loading a shared library runs its initializers; NCCL's only set up its own
            // state. The handle is dropped at once (cudarc loads its own).
            unsafe { libloading::Library::new(name) }.is_ok()
        })
}

/// One rank's shard: Q `[batch, shard_len, heads_q, head_dim]`, K and V `[batch, shard_len,
/// heads_kv, head_dim]`, contiguous, the rows of the rank's chunks in shard order
/// (`RingPlan::shard`).
pub struct Shard<'a, T> {
    /// Queries.
    pub q: &'a CudaSlice<T>,
    /// Keys.
    pub k: &'a CudaSlice<T>,
    /// Values.
    pub v: &'a CudaSlice<T>,
    /// `(batch, heads_q, heads_kv, head_dim)`.
    pub dims: (usize, usize, usize, usize),
}

/// One rank's output: O `[batch, shard_len, heads_q, head_dim]` and the log-sum-exp `[batch,
/// heads_q, shard_len]`, contiguous, in shard order.
pub struct ShardOutput<'a, T> {
    /// The output.
    pub o: &'a mut CudaSlice<T>,
    /// Its log-sum-exp (natural log).
    pub lse: &'a mut CudaSlice<f32>,
}

/// Rank `comm.rank()`'s part of ring attention over `plan` (whose rank count is the
/// communicator's world size): its shard's queries over every key shard, the shards passed
/// around the ring on `comm`'s stream while `compute` runs the kernels, the result into `out`.
/// Every rank of the communicator must make the call with the same plan and dims.
pub fn ring_forward<T: Element + NcclType>(
    attn: &Attention,
    compute: &Arc<CudaStream>,
    comm: &Comm,
    plan: &RingPlan,
    shard: Shard<'_, T>,
    out: ShardOutput<'_, T>,
    softmax_scale: Option<f32>,
) -> Result<()> {
    let (b, hq, hk, d) = shard.dims;
    let rank = check_shard(comm, plan, &shard, &out)?;
    let n = plan.shard_len(rank);
    run_ring(
        compute,
        comm,
        plan,
        (b, hq, d),
        &[shard.k, shard.v],
        out,
        |step, held_len, held, acc| {
            let qv = shard.q.as_view();
            let kl = Layout::bshd(b, held_len, hk, d);
            attn.ring_step(
                compute,
                plan,
                (rank, step),
                Input {
                    data: &qv,
                    layout: Layout::bshd(b, n, hq, d),
                },
                Input {
                    data: &held[0],
                    layout: kl,
                },
                Input {
                    data: &held[1],
                    layout: kl,
                },
                acc,
                softmax_scale,
            )
        },
    )
}

/// [`ring_forward`] under rotary positions: causal attention of the un-rotated shard with the
/// scores of `rope` (RoPE, ReRoPE or Leaky ReRoPE; `plan`'s mask must be `rope.mask()`). The rank
/// rotates its queries and keys to their global positions for both branches of the position
/// mode where they live (`Attention::ring_rope_rotate`); the rotated key halves travel around the
/// ring with the values (three tensors instead of two for ReRoPE and Leaky ReRoPE), and each step
/// runs the parts of `RingPlan::rope_pairs` (`Attention::ring_rope_step`).
#[allow(clippy::too_many_arguments)]
pub fn ring_rope_forward<T: Element + NcclType>(
    attn: &Attention,
    compute: &Arc<CudaStream>,
    comm: &Comm,
    plan: &RingPlan,
    rope: &RopeOptions,
    shard: Shard<'_, T>,
    out: ShardOutput<'_, T>,
    softmax_scale: Option<f32>,
) -> Result<()> {
    let (b, hq, hk, d) = shard.dims;
    let rank = check_shard(comm, plan, &shard, &out)?;
    let n = plan.shard_len(rank);
    let (qv, kv) = (shard.q.as_view(), shard.k.as_view());
    let mine = attn.ring_rope_rotate(
        compute,
        plan,
        rank,
        rope,
        Input {
            data: &qv,
            layout: Layout::bshd(b, n, hq, d),
        },
        Input {
            data: &kv,
            layout: Layout::bshd(b, n, hk, d),
        },
    )?;
    let mut travelling = vec![&mine.k_in, shard.v];
    travelling.extend(mine.k_out.as_ref());
    run_ring(
        compute,
        comm,
        plan,
        (b, hq, d),
        &travelling,
        out,
        |step, held_len, held, acc| {
            let (qa, qb) = (
                mine.q_in.as_view(),
                mine.q_out.as_ref().map(|x| x.as_view()),
            );
            let (ql, kl) = (Layout::bshd(b, n, hq, d), Layout::bshd(b, held_len, hk, d));
            attn.ring_rope_step(
                compute,
                plan,
                (rank, step),
                &rope.mode,
                (
                    Input {
                        data: &qa,
                        layout: ql,
                    },
                    qb.as_ref().map(|data| Input { data, layout: ql }),
                ),
                (
                    Input {
                        data: &held[0],
                        layout: kl,
                    },
                    held.get(2).map(|data| Input { data, layout: kl }),
                ),
                Input {
                    data: &held[1],
                    layout: kl,
                },
                acc,
                softmax_scale,
            )
        },
    )
}

/// The checks of one rank's call: the plan's ranks the communicator's, every buffer its shard's
/// size. Returns the rank.
fn check_shard<T>(
    comm: &Comm,
    plan: &RingPlan,
    shard: &Shard<'_, T>,
    out: &ShardOutput<'_, T>,
) -> Result<usize> {
    let (ranks, rank) = (comm.world_size(), comm.rank());
    if plan.ranks() != ranks {
        return Err(Error::Shard(format!(
            "the plan has {} ranks, the communicator {ranks}",
            plan.ranks()
        )));
    }
    let (b, hq, hk, d) = shard.dims;
    let n = plan.shard_len(rank);
    for (what, len, want) in [
        ("q", shard.q.len(), b * n * hq * d),
        ("k", shard.k.len(), b * n * hk * d),
        ("v", shard.v.len(), b * n * hk * d),
        ("o", out.o.len(), b * n * hq * d),
        ("lse", out.lse.len(), b * hq * n),
    ] {
        if len != want {
            return Err(Error::Shard(format!(
                "rank {rank}'s {what} holds {len} elements, its shard {want}"
            )));
        }
    }
    Ok(rank)
}

/// The ring of one rank: the key / value shards `travelling` (each `[batch, shard_len, heads_kv,
/// head_dim]`, the rank's own) passed around on `comm`'s stream, one step ahead of `step`, which
/// computes on the held ones (`step(step, held_len, held, acc)`) on `compute`; the rank's result
/// into `out`.
fn run_ring<T: Element + NcclType>(
    compute: &Arc<CudaStream>,
    comm: &Comm,
    plan: &RingPlan,
    (b, hq, d): (usize, usize, usize),
    travelling: &[&CudaSlice<T>],
    out: ShardOutput<'_, T>,
    mut step: impl FnMut(
        usize,
        usize,
        &[CudaView<'_, T>],
        &mut RingAccumulator<T>,
    ) -> longflash::Result<()>,
) -> Result<()> {
    let (ranks, rank) = (comm.world_size(), comm.rank());
    let n = plan.shard_len(rank);
    // Elements per shard row across the batch (every travelling tensor has the shard's rows).
    let row = travelling.first().map_or(0, |x| x.len() / n.max(1));
    let longest = (0..ranks).map(|r| plan.shard_len(r)).max().unwrap_or(0);
    let net = comm.stream();
    let alloc = || -> Result<CudaSlice<T>> {
        compute
            .alloc_zeros(longest * row)
            .map_err(driver("allocating a ring buffer"))
    };
    // Two buffers per tensor: the shard held this step, the one arriving for the next.
    let mut held = Vec::with_capacity(travelling.len());
    let mut next = Vec::with_capacity(travelling.len());
    for x in travelling {
        let mut h = alloc()?;
        compute
            .memcpy_dtod(*x, &mut h.slice_mut(..n * row))
            .map_err(driver("copying the shard"))?;
        held.push(h);
        next.push(alloc()?);
    }
    let mut acc = RingAccumulator::<T>::new(compute, plan, rank, (b, hq, d))?;
    let (to, from) = ((rank + 1) % ranks, (rank + ranks - 1) % ranks);
    for t in 0..ranks {
        let held_len = plan.shard_len(plan.kv_owner(rank, t));
        if t + 1 < ranks {
            // The transfer for the next step, behind everything the compute stream did so far
            // (the last reader of `next` was the step before this one).
            net.join(compute)
                .map_err(driver("ordering the ring streams"))?;
            let incoming = plan.shard_len(plan.kv_owner(rank, t + 1));
            group_start().map_err(nccl)?;
            for (h, x) in held.iter().zip(next.iter_mut()) {
                comm.send(&h.slice(..held_len * row), to as i32)
                    .map_err(nccl)?;
                comm.recv(&mut x.slice_mut(..incoming * row), from as i32)
                    .map_err(nccl)?;
            }
            group_end().map_err(nccl)?;
        }
        {
            let views: Vec<_> = held.iter().map(|h| h.slice(..held_len * row)).collect();
            step(t, held_len, &views, &mut acc)?;
        }
        if t + 1 < ranks {
            // The next step computes on what arrived.
            compute
                .join(&net)
                .map_err(driver("ordering the ring streams"))?;
            std::mem::swap(&mut held, &mut next);
        }
    }
    // The chunks' results into the shard's rows.
    acc.write_rows(
        compute,
        RowOrder::Shard,
        &mut out.o.as_view_mut(),
        &mut out.lse.as_view_mut(),
    )?;
    Ok(())
}

/// One rank of [`run_local_ring`]: its device's context, a compute stream, its communicator and
/// its attention.
pub struct LocalRank {
    /// The device's context.
    pub ctx: Arc<CudaContext>,
    /// The stream the kernels run on (the communicator has its own).
    pub compute: Arc<CudaStream>,
    /// The communicator.
    pub comm: Comm,
    /// The kernels.
    pub attn: Attention,
}

/// Runs `work(rank)` on one thread per GPU of `ordinals` (rank `i` on device `ordinals[i]`),
/// each with a communicator of a ring over them all, and returns their results in rank order.
pub fn run_local_ring<R: Send>(
    ordinals: &[usize],
    work: impl Fn(&LocalRank) -> Result<R> + Sync,
) -> Result<Vec<R>> {
    if !nccl_present() {
        return Err(Error::NoNccl);
    }
    if std::env::var_os("NCCL_NVLS_ENABLE").is_none() {
        // Set before this call's threads start; NCCL reads it when the communicators are made
        // below. (A caller that reads the environment from other threads at the same time should
        // set it itself.)
        std::env::set_var("NCCL_NVLS_ENABLE", "0");
    }
    let id = Id::new().map_err(nccl)?;
    let ranks = ordinals.len();
    std::thread::scope(|scope| {
        let handles: Vec<_> = ordinals
            .iter()
            .enumerate()
            .map(|(rank, &ordinal)| {
                let work = &work;
                let id = Id::uninit(*id.internal());
                scope.spawn(move || -> Result<R> {
                    let ctx = longflash::open_device(ordinal)?;
                    let compute = ctx.new_stream().map_err(driver("making a stream"))?;
                    let net = ctx.new_stream().map_err(driver("making a stream"))?;
                    let comm = Comm::from_rank(net, rank, ranks, id).map_err(nccl)?;
                    let attn = Attention::new(&ctx)?;
                    let me = LocalRank {
                        ctx,
                        compute,
                        comm,
                        attn,
                    };
                    let r = work(&me)?;
                    me.compute
                        .synchronize()
                        .map_err(driver("finishing the ring"))?;
                    Ok(r)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}
