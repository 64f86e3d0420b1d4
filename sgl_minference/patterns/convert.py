"""Vertical-slash style indices (key columns + diagonal offsets) -> ``SparseLayout``, no host sync.

Shared by the estimated vertical-slash pattern, the static A-shape / dense ones (a local band or the whole
causal triangle is a run of diagonals) and FlexPrefill's vertical-slash branch. Per (request, head), relative to
a query block's first row r0, each diagonal offset ``o`` covers keys ``[r0 - o, r0 - o + 64)``; overlapping or
touching windows merge into intervals cut into 64-key ranges; per query block, slices of those lists, shifted.
The two Triton kernels that do it, and their launches, are ``kernels.materialise``'s.
"""

from __future__ import annotations

import torch

from ..kernels.materialise import materialise_layout
from ..layout import BatchGeometry, SparseLayout


def indices_to_layout(columns: torch.Tensor, offsets: torch.Tensor, geom: BatchGeometry) -> SparseLayout:
    """Layout of every query block of the batch from per-request columns ``[B, H, V]`` (ascending, ``SENTINEL``
    padded) and diagonal offsets ``[B, H, S]`` (descending, ``-1`` padded), int32: a ``SparseLayout`` over ``H``
    heads, ``MAXB = S``, ``MAXC = V`` (:func:`~sgl_minference.kernels.materialise.materialise_layout`)."""
    return materialise_layout(columns, offsets, geom)


__all__ = ["indices_to_layout"]
