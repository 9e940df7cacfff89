"""Timing shared by the PyTorch peer scripts (benches/peer_decode.py, benches/peer_varlen.py)."""

import statistics
import time

import torch


def median_ms(fn, warmup, reps, gap_ms=0.0, warmup_ms=0.0):
    """Median milliseconds of fn(), each call timed with CUDA events after `warmup` untimed calls.

    gap_ms: the GPU left idle that long first; warmup_ms: after the warm-up calls, calls for that
    much wall time more, so that the timed ones run at the clock the GPU's power limit leaves
    (the protocols of the README's "Benchmarks": compare with ours only under the same one)."""
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
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))
