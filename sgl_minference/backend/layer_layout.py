"""Where a chunk's index is built: one layer's ``SparseLayout`` for a batch the planner made sparse.

Per layer, :func:`layer_layout` launches each head group's builder (the group's pattern type looked up in
:data:`~sgl_minference.registry.PATTERNS`, or a :data:`GroupBuilder` hook in its place), merges the groups'
layouts over the layer's heads (:func:`~sgl_minference.patterns.concat_heads`), and puts the plan's exact dense
layout on the query blocks of the requests that are not sparse (:func:`overlay_query_blocks`). Nothing here
syncs with the device; what is decided once per batch (geometry, which requests are sparse) is the planner's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..config import Estimation, MInferenceConfig
from ..layout import BatchGeometry, KVSource, SparseLayout
from ..patterns import concat_heads
from ..patterns.blocks import pad_last
from ..registry import PATTERNS
from .planner import HeadGroup, LayerHeads, SparsePlan

# (q, kv, geom, group, *, sm_scale, est, layer_id) -> the group's layout [NQB, len(group.heads.heads), ...]
GroupBuilder = Callable[..., SparseLayout]


def build_group(q: torch.Tensor, kv: KVSource, geom: BatchGeometry, group: HeadGroup, *, sm_scale: float,
                est: Estimation, layer_id: int) -> SparseLayout:
    """The default :data:`GroupBuilder`: the group's registered builder (``layer_id`` is for hooks that vary by
    layer, such as the benchmarks' synthetic indices)."""
    return PATTERNS[group.kind].build(q, kv, geom, group.heads, sm_scale=sm_scale, est=est)


def overlay_query_blocks(base: SparseLayout, rows: torch.Tensor, part: SparseLayout) -> SparseLayout:
    """``base`` with query blocks ``rows`` replaced by ``part`` (``part``'s block ``i`` goes to ``rows[i]``).

    ``rows``: ``[NQB_part]`` int64 on the layouts' device. Range/column capacities are padded to the larger;
    padded slots lie beyond the counts, where the kernels never read.
    """
    maxb = max(base.block_start.shape[2], part.block_start.shape[2])
    maxc = max(base.col_index.shape[2], part.col_index.shape[2])

    def merged(name: str, cap: int | None) -> torch.Tensor:
        a, b = getattr(base, name), getattr(part, name)
        if cap is not None:
            a, b = pad_last(a, cap), pad_last(b, cap)
        return a.index_copy(0, rows, b)

    return SparseLayout(block_start=merged("block_start", maxb), block_end=merged("block_end", maxb),
                        block_count=merged("block_count", None), full_count=merged("full_count", None),
                        col_index=merged("col_index", maxc), col_count=merged("col_count", None))


def layer_layout(q: torch.Tensor, kv: KVSource, plan: SparsePlan, heads: LayerHeads, config: MInferenceConfig, *,
                 sm_scale: float, build: GroupBuilder = build_group) -> SparseLayout:
    """The layout of one layer over all of ``q``'s heads and all requests of the plan.

    q: ``[T, Hq, D]`` fp16/bf16 chunk queries of the batch (RoPE applied); kv: the layer's paged KV source, the
    chunk's keys already written; build: how one head group's layout is made (default :func:`build_group`).
    Returns a layout ``[NQB, Hq, ...]`` for ``plan.geom``.
    """
    est = config.estimation
    parts = [build(q, kv, plan.geom, g, sm_scale=sm_scale, est=est, layer_id=heads.layer_id) for g in heads.groups]
    layout = concat_heads(parts, [g.heads.heads for g in heads.groups], heads.num_q_heads,
                          index=[g.heads.q_index for g in heads.groups])
    if plan.dense_layout is not None:
        layout = overlay_query_blocks(layout, plan.dense_blocks, plan.dense_layout)
    return layout
