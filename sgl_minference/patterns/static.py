"""Static patterns, no estimation: A-shape (sink columns + local band) and dense (every causal key).

Both are written as vertical-slash indices (sink = columns ``0..sink-1``; a band of ``w`` diagonals = offsets
``w-1, w-65, ..., 0``, whose 64-key ranges tile the band) and go through the same conversion, so they share the
kernels' full-range fast path. Layouts are per 64-row block: a row near the end of a block may see up to 63
diagonals beyond its own window, exactly what the kernel computes.
"""

from __future__ import annotations

import torch

from ..checks import check
from ..layout import BLOCK, SENTINEL, BatchGeometry, SparseLayout
from .convert import indices_to_layout
from .heads import HeadSet


def _band_offsets(widths: torch.Tensor, max_width: int) -> torch.Tensor:
    """``[H, S]`` int32 descending offsets ``w-1, w-65, ..., 0`` whose ranges tile diagonals ``[0, w)``, ``-1`` padded.

    ``widths`` is ``[H]`` int32 on the device; ``max_width`` its host maximum (sizes the output, no sync).
    """
    t = torch.arange(max_width // BLOCK + 2, device=widths.device, dtype=torch.int32)
    raw = widths.view(-1, 1) - 1 - BLOCK * t
    return torch.where(raw > 0, raw, torch.where(raw > -BLOCK, 0, -1)).to(torch.int32)


def build_a_shape(geom: BatchGeometry, heads: HeadSet) -> SparseLayout:
    """A-shape layout: budgets ``sink`` (first key columns) and ``local`` (nearest diagonals) per head.

    Both are clamped to the batch's longest context (a host int): ``max Sk`` sink columns or local diagonals
    already cover every causal key, so the work is bounded by the context, not by the budget (unclamped, a
    ``sink`` of 1e5 on a 128-key context built a ``[B, H, 100000]`` column table and took 55 s).
    """
    check("sink" in heads.budgets and "local" in heads.budgets, "heads", "needs budgets sink and local")
    dev, B, max_sk = heads.q_head.device, geom.num_requests, geom.max_seqlen_k
    sink = heads.budgets["sink"]
    cols = torch.arange(min(heads.budget_max["sink"], max_sk), device=dev, dtype=torch.int32)
    cols = torch.where(cols < sink.view(-1, 1), cols, SENTINEL)
    local_max = min(heads.budget_max["local"], max_sk)
    offsets = _band_offsets(heads.budgets["local"].clamp(max=local_max), local_max)
    return indices_to_layout(cols.expand(B, -1, -1), offsets.expand(B, -1, -1), geom)


def build_dense(geom: BatchGeometry, heads: HeadSet) -> SparseLayout:
    """Layout covering every causal key of every row (exact dense attention through the sparse kernel)."""
    dev, B, n = heads.q_head.device, geom.num_requests, len(heads.heads)
    width = torch.full((n,), geom.max_seqlen_k, dtype=torch.int32, device=dev)
    offsets = _band_offsets(width, geom.max_seqlen_k)
    cols = torch.full((B, n, 1), SENTINEL, dtype=torch.int32, device=dev)
    return indices_to_layout(cols, offsets.expand(B, -1, -1), geom)
