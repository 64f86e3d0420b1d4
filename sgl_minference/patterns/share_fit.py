"""The offline fit the adaptive patterns share (XAttention's threshold, FlexPrefill's gamma): the largest mass
share whose selection on a head stays within the search's key budget."""

from __future__ import annotations

from collections.abc import Callable

MIN_SHARE = 1e-4  # the smallest share a fit tries (XAttention: only the forced blocks and the top one)


def largest_share_within(keys: Callable[[float], float], budget: float, *, steps: int) -> float:
    """The largest share in ``[MIN_SHARE, 1]`` with ``keys(share) <= budget``, bisected in ``steps`` halvings
    (``MIN_SHARE`` when even that is over the budget). ``keys``: keys per row the selection at a share costs,
    non-decreasing in the share."""
    lo, hi = MIN_SHARE, 1.0
    if keys(hi) <= budget:
        return hi
    for _ in range(steps):  # invariant: keys(hi) > budget; lo is the best share found within the budget (or the floor)
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if keys(mid) <= budget else (lo, mid)
    return lo
