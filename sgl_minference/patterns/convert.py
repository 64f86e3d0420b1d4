"""Vertical-slash style indices (key columns + diagonal offsets) -> ``SparseLayout``, two kernels, no host sync.

Shared by the estimated vertical-slash pattern and the static A-shape / dense ones (a local band or the whole
causal triangle is a run of diagonals). Per (request, head), relative to a query block's first row r0 (see
``kernels.materialise``): each diagonal offset ``o`` covers keys ``[r0 - o, r0 - o + 64)``; overlapping or
touching windows merge into intervals, cut into 64-key ranges from their left ends (an interval merged from
``m`` diagonals needs at most ``m`` ranges, so no capacity beyond the slash budget), split into relatively full
and partial lists, with a coverage map for the columns. Per query block, slices of those lists, shifted.
"""

from __future__ import annotations

import torch

from ..kernels.materialise import _materialise_kernel, _relative_kernel, search_steps
from ..layout import BLOCK, BatchGeometry, SparseLayout


def indices_to_layout(columns: torch.Tensor, offsets: torch.Tensor, geom: BatchGeometry) -> SparseLayout:
    """Layout of every query block of the batch from per-request columns and diagonals.

    Args:
        columns: ``[B, H, V]`` int32 key columns sorted ascending, unused entries ``SENTINEL`` at the end.
        offsets: ``[B, H, S]`` int32 diagonal offsets sorted descending, unused entries ``-1`` at the end
            (duplicates allowed).
        geom: batch geometry (``B`` requests).
    Returns:
        ``SparseLayout`` over ``H`` heads with ``MAXB = S`` and ``MAXC = V``.
    """
    B, H, n_off = offsets.shape
    n_col = columns.shape[-1]
    nqb, dev = geom.num_query_blocks, columns.device
    offsets, columns = offsets.contiguous(), columns.contiguous()
    max_sk = geom.max_seqlen_k
    cover_lo, cover_w = -max_sk, max_sk + BLOCK + 1  # relative positions [-max Sk, 64]: every causal key
    rel = torch.empty(6, B * H, n_off, dtype=torch.int32, device=dev)
    rel_counts = torch.empty(B * H, 2, dtype=torch.int32, device=dev)
    cover = torch.zeros(B * H, cover_w, dtype=torch.int8, device=dev)
    # 8 warps: with 4 the [256, 64] coverage store spills (sm_90 ptxas, 32 bytes)
    _relative_kernel[(B * H,)](offsets, rel, rel_counts, cover, n_off, cover_w, cover_lo, BLOCK=BLOCK, CH=256,
                               num_warps=8)
    block_start = torch.empty(nqb, H, n_off, dtype=torch.int32, device=dev)
    block_end = torch.empty_like(block_start)
    col_index = torch.empty(nqb, H, n_col, dtype=torch.int32, device=dev)
    # Separate tensors, each 16-byte aligned (slices of one would not be for odd NQB x H: a compile per alignment).
    counts = [torch.empty(nqb, H, dtype=torch.int32, device=dev) for _ in range(3)]
    _materialise_kernel[(nqb, H)](
        rel, rel_counts, columns, cover, geom.qb_request, geom.qb_row, geom.cu_seqlens_q, geom.seq_lens_k,
        block_start, block_end, counts[0], counts[1], col_index, counts[2], n_off, n_col, cover_w, cover_lo,
        B * H * n_off, BLOCK=BLOCK, CHUNK=256, LOG=search_steps(n_off), num_warps=4)
    return SparseLayout(block_start=block_start, block_end=block_end, block_count=counts[0], full_count=counts[1],
                        col_index=col_index, col_count=counts[2])


__all__ = ["indices_to_layout"]
