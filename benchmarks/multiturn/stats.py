"""Summary statistics of measured series: percentiles of latencies and the slope of a memory series."""

from __future__ import annotations

import math

from benchmarks.multiturn.argcheck import check


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
