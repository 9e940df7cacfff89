"""Timing shared by the PyTorch peer scripts (benches/peer_sdpa.py, peer_sdpa_backward.py,
peer_flex.py, peer_decode.py, peer_varlen.py, peer_memory.py, peer_rerope.py).

The protocols of the README's "Benchmarks" (compare a peer with ours only under the same one):
burst, `gap_ms` of idle GPU then a few warm-up calls; sustained, `warmup_ms` of calls more after
them, so that the timed calls run at the clock the GPU's power limit leaves.
"""

import statistics
import time

import torch


def settle(fn, warmup, gap_ms=0.0, warmup_ms=0.0):
    """Leaves the GPU idle for gap_ms, calls fn() `warmup` times, then for warmup_ms of wall time
    more, and waits for all of it."""
    torch.cuda.synchronize()
    if gap_ms > 0:
        time.sleep(gap_ms / 1e3)
    for _ in range(warmup):
        fn()
    if warmup_ms > 0:
        t_end = time.perf_counter() + warmup_ms / 1e3
        while time.perf_counter() < t_end:
            for _ in range(4):
                fn()
            torch.cuda.synchronize()
    torch.cuda.synchronize()


def time_each(fn, reps, sync_each=False):
    """Milliseconds of `reps` calls of fn(), each between two CUDA events; the calls are queued
    one after the other (or, with sync_each, each waited for before the next)."""
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        starts[i].record()
        fn()
        ends[i].record()
        if sync_each:
            ends[i].synchronize()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def median_ms(fn, warmup, reps, gap_ms=0.0, warmup_ms=0.0):
    """Median milliseconds of fn() over `reps` timed calls after settle()."""
    settle(fn, warmup, gap_ms, warmup_ms)
    return statistics.median(time_each(fn, reps))
