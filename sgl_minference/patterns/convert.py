"""Vertical-slash style indices (key columns + diagonal offsets) -> ``SparseLayout``, vectorised, no host sync.

Shared by the estimated vertical-slash pattern and the static A-shape / dense ones (a local band or the whole
causal triangle is a run of diagonals). Steps, per (request, head), relative to a query block's first row r0:
1. each diagonal offset ``o`` covers keys ``[r0 - o, r0 - o + 64)`` for that block;
2. overlapping or touching ranges merge into maximal intervals; each interval is cut into 64-key ranges from its
   left end (an interval merged from ``m`` diagonals is at most ``64 m`` keys wide, so it needs at most ``m`` ranges:
   the ranges are written at the slots of the interval's own members, no capacity beyond the slash budget);
3. a coverage map over relative positions marks keys inside the ranges, so columns inside them are dropped;
4. the Triton kernel shifts everything per query block and splits full / partial ranges.
"""

from __future__ import annotations

import torch

from ..kernels.materialise import SENTINEL, _materialise_kernel
from ..layout import BLOCK, BatchGeometry, SparseLayout


def relative_ranges(offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merged 64-key ranges relative to a block's first row, from diagonal offsets.

    Args:
        offsets: ``[B, H, S]`` int32 diagonal offsets (query position - key position), sorted descending per row,
            unused entries ``-1`` at the end (duplicates allowed).
    Returns:
        ``(start, end)`` each ``[B, H, S]`` int32, ascending among used entries; unused entries ``SENTINEL``.
    """
    valid = offsets >= 0
    rel = -offsets.long()
    idx = torch.arange(offsets.shape[-1], device=offsets.device).expand_as(rel)
    prev = torch.cat([torch.full_like(rel[..., :1], -(1 << 40)), rel[..., :-1]], dim=-1)
    new = valid & (rel > prev + BLOCK)  # a gap before this range: a new interval starts here
    first = torch.cummax(torch.where(new, idx, torch.zeros_like(idx)), dim=-1).values
    start = torch.gather(rel, -1, first)
    interval = torch.cumsum(new.long(), dim=-1) - 1
    end = torch.full_like(rel, -(1 << 40)).scatter_reduce(
        -1, interval.clamp(min=0), torch.where(valid, rel + BLOCK, torch.full_like(rel, -(1 << 40))), reduce="amax")
    end = torch.gather(end, -1, interval.clamp(min=0))
    pos = idx - first
    emit = valid & (pos * BLOCK < end - start)
    bs = start + BLOCK * pos
    be = torch.minimum(bs + BLOCK, end)
    return (torch.where(emit, bs, SENTINEL).to(torch.int32), torch.where(emit, be, SENTINEL).to(torch.int32))


def coverage(start: torch.Tensor, end: torch.Tensor, max_seqlen_k: int) -> tuple[torch.Tensor, int]:
    """int8 map ``[B, H, W]`` of relative key positions inside a range, and its lowest position ``lo``.

    Position ``d`` (key - r0) is at index ``d - lo``; ``lo = -max_seqlen_k`` so every causal key fits.
    """
    lo = -max_seqlen_k
    width = max_seqlen_k + BLOCK + 1
    used = start != SENTINEL
    s = torch.where(used, start.long().clamp(min=lo) - lo, width)
    e = torch.where(used, end.long().clamp(min=lo) - lo, width)
    diff = torch.zeros(*start.shape[:2], width + 1, dtype=torch.int32, device=start.device)
    diff.scatter_add_(-1, s, torch.ones_like(s, dtype=torch.int32))
    diff.scatter_add_(-1, e, torch.full_like(e, -1, dtype=torch.int32))
    return (diff.cumsum(-1, dtype=torch.int32)[..., :width] > 0).to(torch.int8), lo


def indices_to_layout(columns: torch.Tensor, offsets: torch.Tensor, geom: BatchGeometry) -> SparseLayout:
    """Layout of every query block of the batch from per-request columns and diagonals.

    Args:
        columns: ``[B, H, V]`` int32 key columns sorted ascending, unused entries ``SENTINEL`` at the end.
        offsets: ``[B, H, S]`` int32 diagonal offsets sorted descending, unused entries ``-1`` at the end.
        geom: batch geometry (``B`` requests).
    Returns:
        ``SparseLayout`` over ``H`` heads with ``MAXB = S`` and ``MAXC = V``.
    """
    B, H = columns.shape[:2]
    rel_start, rel_end = relative_ranges(offsets)
    cover, lo = coverage(rel_start, rel_end, geom.max_seqlen_k)
    nqb, dev = geom.num_query_blocks, columns.device
    n_rel, n_col = rel_start.shape[-1], columns.shape[-1]
    block_start = torch.empty(nqb, H, n_rel, dtype=torch.int32, device=dev)
    block_end = torch.empty_like(block_start)
    col_index = torch.empty(nqb, H, n_col, dtype=torch.int32, device=dev)
    counts = torch.empty(3, nqb, H, dtype=torch.int32, device=dev)
    _materialise_kernel[(nqb, H)](
        rel_start.contiguous(), rel_end.contiguous(), columns.contiguous(), cover, geom.qb_request, geom.qb_row,
        geom.cu_seqlens_q, geom.seq_lens_k, block_start, block_end, counts[0], counts[1], col_index, counts[2],
        n_rel, n_col, cover.shape[-1], lo, BLOCK=BLOCK, CHUNK=64)
    return SparseLayout(block_start=block_start, block_end=block_end, block_count=counts[0], full_count=counts[1],
                        col_index=col_index, col_count=counts[2])
