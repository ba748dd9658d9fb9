"""Timing and peak-memory helpers the kernel benchmarks share (run from benchmarks/, imported by name)."""

from __future__ import annotations

import statistics
import time

import torch


def median_ms(fn, cuda: bool, reps: int, warmup: int) -> float:
    """Median milliseconds of ``reps`` calls of fn after ``warmup`` calls: CUDA events on a GPU, the wall
    clock on a CPU."""
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(start.elapsed_time(end) for start, end in events)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_bytes(fn) -> int:
    """Bytes allocated above the current level at the peak of one call (CUDA)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base
