"""Summary statistics of measured series: percentiles of latencies, the slope of a memory series, and the verdicts
on GPU memory series (sampled by ``sgl_minference.gpu_memory.MemoryPoller``): bounded, and without a trend."""

from __future__ import annotations

import math
from dataclasses import dataclass

from sgl_minference.checks import check


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) of ``values`` by linear interpolation between order statistics (as
    ``numpy.percentile``'s default); None for no values."""
    check(0.0 <= q <= 100.0, "q", f"must be in [0, 100], got {q}")
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def latency_summary(values: list[float]) -> dict:
    """``n``, ``p50``, ``p99``, ``max`` and ``mean`` of a latency series (seconds); Nones when it is empty."""
    return {"n": len(values), "p50": percentile(values, 50), "p99": percentile(values, 99),
            "max": max(values, default=None), "mean": sum(values) / len(values) if values else None}


def linear_slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of ``ys`` over ``xs``; None with fewer than two distinct ``xs``."""
    check(len(xs) == len(ys), "ys", f"{len(ys)} values for {len(xs)} points")
    n = len(xs)
    if n < 2:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx


@dataclass(kw_only=True)
class MemoryVerdict:
    status: str  # "PASS", "FAIL" or "INCONCLUSIVE"
    peak_mib: int | None
    early_peak_mib: int | None  # highest sample in the first half of the run
    late_peak_mib: int | None  # highest sample in the last quarter
    samples: int
    message: str


def bounded_memory(values: list[int], *, slack_mib: int) -> MemoryVerdict:
    """Memory is bounded when the last quarter of a steady load peaks no more than ``slack_mib`` above the
    first half (SGLang preallocates its KV pool, so growth under a repeating load means something leaks)."""
    n = len(values)
    if n < 4:
        return MemoryVerdict(status="INCONCLUSIVE", peak_mib=max(values, default=None), early_peak_mib=None,
                             late_peak_mib=None, samples=n, message=f"only {n} memory samples")
    early, late = max(values[: n // 2]), max(values[(3 * n) // 4:])
    growth = late - early
    status = "PASS" if growth <= slack_mib else "FAIL"
    return MemoryVerdict(status=status, peak_mib=max(values), early_peak_mib=early, late_peak_mib=late, samples=n,
                         message=f"peak {max(values)} MiB; last-quarter peak {late} MiB vs first-half peak {early} MiB "
                                 f"(growth {growth:+d} MiB, allowed {slack_mib}) over {n} samples")


@dataclass(kw_only=True)
class TrendVerdict:
    status: str  # "PASS", "FAIL" or "INCONCLUSIVE"
    slope_mib_per_min: float | None  # least-squares slope over the second half of the samples
    window_s: float  # time the second half spans
    projected_growth_mib: float | None  # slope x window: how much the fit says memory grew in that half
    samples: int
    message: str


def memory_trend(samples: list[tuple[float, int]], *, slack_mib: int, min_samples: int = 8) -> TrendVerdict:
    """No growth over a long run: a line fitted to the second half of ``(seconds, MiB)`` samples may rise by at
    most ``slack_mib`` across that half. The first half is left out because the allocator's pools and the
    radix cache fill up early in a run; a leak keeps growing after that."""
    n = len(samples)
    if n < min_samples:
        return TrendVerdict(status="INCONCLUSIVE", slope_mib_per_min=None, window_s=0.0, projected_growth_mib=None,
                            samples=n, message=f"only {n} memory samples (need {min_samples})")
    half = samples[n // 2:]
    ts, mib = [t for t, _ in half], [m for _, m in half]
    slope = linear_slope(ts, mib)
    window = ts[-1] - ts[0]
    if slope is None or window <= 0:
        return TrendVerdict(status="INCONCLUSIVE", slope_mib_per_min=None, window_s=window,
                            projected_growth_mib=None, samples=n, message="samples span no time")
    growth = slope * window
    status = "PASS" if growth <= slack_mib else "FAIL"
    return TrendVerdict(status=status, slope_mib_per_min=slope * 60, window_s=window, projected_growth_mib=growth,
                        samples=n, message=f"second-half trend {slope * 60:+.1f} MiB/min over {window:.0f} s "
                                           f"(fitted growth {growth:+.0f} MiB, allowed {slack_mib}); "
                                           f"range {min(mib)}..{max(mib)} MiB over {n} samples")
