"""Timing shared by the PyTorch peer scripts (benches/peer_decode.py, benches/peer_varlen.py)."""

import statistics

import torch


def median_ms(fn, warmup, reps):
    """Median milliseconds of fn(), each call timed with CUDA events after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))
