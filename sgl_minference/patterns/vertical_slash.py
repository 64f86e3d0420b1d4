"""Vertical-slash: top-k key columns + top-k diagonals, estimated online from the chunk's last queries."""

from __future__ import annotations

import torch

from ..config import DEFAULT_ESTIMATION as _EST  # the estimation settings' one home
from ..kernels.estimate import lastq_scores
from ..kernels.materialise import SENTINEL
from ..layout import BatchGeometry, KVSource, SparseLayout, check
from .convert import indices_to_layout
from .heads import HeadSet

FORCED = 1.0e6  # forced sink columns / local diagonals score FORCED - rank: above any sum (<= 64), exact in fp32


def _top_sorted(scores: torch.Tensor, budget: torch.Tensor, k: int, descending: bool, unused: int) -> torch.Tensor:
    """Per-head top-``budget`` positions of ``scores`` [B, H, N] (entries < 0 are invalid), sorted."""
    vals, idx = scores.topk(k, dim=-1)
    rank = torch.arange(k, device=scores.device)
    keep = (vals >= 0) & (rank.view(1, 1, -1) < budget.view(1, -1, 1))
    return torch.where(keep, idx, unused).sort(dim=-1, descending=descending).values.to(torch.int32)


def _force(scores: torch.Tensor, n: int) -> None:
    """Give the first ``n`` valid positions of ``scores`` [B, H, N] top scores, nearer ones first (budget < n)."""
    head = scores[..., :n]
    rank = torch.arange(head.shape[-1], device=scores.device, dtype=scores.dtype)
    head.copy_(torch.where(head >= 0, FORCED - rank, head))


def estimate_vertical_slash(q: torch.Tensor, kv: KVSource, geom: BatchGeometry, heads: HeadSet, *, sm_scale: float,
                            last_q: int = _EST.last_q, forced_sink: int = _EST.forced_sink,
                            forced_local: int = _EST.forced_local) -> tuple[torch.Tensor, torch.Tensor]:
    """The vertical and slash indices of every request and head, as the online method picks them.

    Args:
        q: ``[T, Hq, D]`` fp16/bf16 chunk queries packed by ``geom.cu_seqlens_q``; kv: the requests' keys.
        heads: query heads to estimate, with budgets ``vertical`` and ``slash`` (clamped to each context).
    Returns:
        ``columns [B, Hs, min(max vertical, max Sk)]`` int32 ascending (unused ``SENTINEL``) and
        ``offsets [B, Hs, min(max slash, max Sk)]`` int32 descending (unused ``-1``); the first ``forced_sink``
        columns and the ``forced_local`` nearest diagonals are always in (inside the budget, as in the reference).
    """
    check("vertical" in heads.budgets and "slash" in heads.budgets, "heads", "needs budgets vertical and slash")
    check(forced_sink >= 0 and forced_local >= 0, "forced_sink", "forced sink / local must be >= 0")
    col, diag = lastq_scores(q, kv, geom, heads.q_head, heads.kv_head, sm_scale=sm_scale, last_q=last_q)
    _force(col, forced_sink)
    _force(diag, forced_local)
    max_sk = geom.max_seqlen_k
    columns = _top_sorted(col, heads.budgets["vertical"], min(heads.budget_max["vertical"], max_sk), False, SENTINEL)
    offsets = _top_sorted(diag, heads.budgets["slash"], min(heads.budget_max["slash"], max_sk), True, -1)
    return columns, offsets


def build_vertical_slash(q: torch.Tensor, kv: KVSource, geom: BatchGeometry, heads: HeadSet, *, sm_scale: float,
                         last_q: int = _EST.last_q, forced_sink: int = _EST.forced_sink,
                         forced_local: int = _EST.forced_local) -> SparseLayout:
    """Vertical-slash layout over ``len(heads.heads)`` heads (see ``estimate_vertical_slash`` for the arguments)."""
    columns, offsets = estimate_vertical_slash(q, kv, geom, heads, sm_scale=sm_scale, last_q=last_q,
                                               forced_sink=forced_sink, forced_local=forced_local)
    return indices_to_layout(columns, offsets, geom)
