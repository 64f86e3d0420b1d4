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


def kernel_times(fn: Callable[[], object], calls: int) -> tuple[dict[str, float], int]:
    """Device ms per call of every kernel ``fn`` launches, by kernel name (longest first), and the number of kernel
    launches per call, from torch.profiler after one untimed call (GPU only)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    out: dict[str, float] = {}
    launches = 0
    for ev in prof.key_averages():
        us = getattr(ev, "self_device_time_total", None)
        if us is None:
            us = getattr(ev, "self_cuda_time_total", 0.0)
        if us and getattr(ev, "device_type", None) == torch.autograd.DeviceType.CUDA:
            out[ev.key[:120]] = out.get(ev.key[:120], 0.0) + us / 1e3 / calls
            launches += ev.count
    return dict(sorted(out.items(), key=lambda kv: -kv[1])), launches // calls


def host_ms(fn: Callable[[], object], reps: int) -> float:
    """Median host ms of issuing ``fn()`` (the device synchronised before each call, not after): the launch and
    Python cost a caller waits for before the device can run ahead of it."""
    fn()
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return float(statistics.median(times))
