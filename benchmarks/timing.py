"""Timing one call on the GPU or the host; imports torch only, so a benchmark can load the package from another
checkout afterwards (``estimate_bench --src``)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def time_ms(fn: Callable[[], object], reps: int, *, cuda: bool | None = None) -> float:
    """Median ms of ``fn()`` over ``reps`` calls after one untimed call: CUDA events on the GPU (``cuda``: default
    whether one is available), the wall clock otherwise."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    fn()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return float(statistics.median(times))
