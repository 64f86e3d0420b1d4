"""Vertical-slash: top-k key columns + top-k diagonals, estimated online from the chunk's last queries."""

from __future__ import annotations

import logging

import torch

from ..checks import check
from ..config import DEFAULT_ESTIMATION as _EST  # the estimation settings' one home
from ..kernels.estimate import LastqLaunch, lastq_sums
from ..kernels.select import dense_band_width, select_vertical_slash
from ..layout import SENTINEL, BatchGeometry, KVSource, SparseLayout
from .convert import indices_to_layout
from .heads import HeadSet

logger = logging.getLogger(__name__)

_NAN_FALLBACKS: dict[torch.device, torch.Tensor] = {}  # device -> [1] int32 count, bumped by the select kernel


def nan_fallback_counter(device) -> torch.Tensor:
    """The device-side count of (request, head) estimates that held a NaN and so ran dense (``[1]`` int32)."""
    device = torch.device(device)
    if device not in _NAN_FALLBACKS:
        _NAN_FALLBACKS[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return _NAN_FALLBACKS[device]


class NanFallbackLog:
    """Logs NaN fallbacks from the serving loop without waiting for the device.

    :meth:`poll` (once per forward batch) first reads the host snapshot that the previous poll asked for (a
    non-blocking copy into pinned memory, complete once the earlier batches ran; a copy still in flight only
    delays the report), then asks for a fresh one. The device counter is cumulative and never reset here, so no
    fallback is missed or counted twice.
    """

    def __init__(self, device):
        self.device = torch.device(device)
        self.reported = 0
        on_cuda = self.device.type == "cuda"
        self._snapshot = torch.zeros(1, dtype=torch.int32, pin_memory=on_cuda)

    def poll(self) -> int:
        """New fallbacks seen since the last report (logged as one warning when non-zero)."""
        total = int(self._snapshot[0])  # a host tensor: no device sync
        new = total - self.reported
        if new > 0:
            self.reported = total
            logger.warning("minference: %d vertical-slash head estimates held a NaN (in the last queries or the "
                           "keys) and ran dense attention instead", new)
        self._snapshot.copy_(nan_fallback_counter(self.device), non_blocking=self.device.type == "cuda")
        return max(new, 0)


def estimate_vertical_slash(q: torch.Tensor, kv: KVSource, geom: BatchGeometry, heads: HeadSet, *, sm_scale: float,
                            last_q: int = _EST.last_q, forced_sink: int = _EST.forced_sink,
                            forced_local: int = _EST.forced_local, launch: LastqLaunch | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The vertical and slash indices of every request and head, as the online method picks them.

    Args:
        q: ``[T, Hq, D]`` fp16/bf16 chunk queries packed by ``geom.cu_seqlens_q``; kv: the requests' keys.
        heads: query heads to estimate, with budgets ``vertical`` and ``slash`` (clamped to each context).
        launch: launch configuration of the last-q kernels (default: ``lastq_launch``), for benchmarks.
    Returns:
        ``columns [B, Hs, min(max vertical, max Sk)]`` int32 ascending (unused ``SENTINEL``) and
        ``offsets [B, Hs, max(min(max slash, max Sk), dense_band_width(max Sk))]`` int32 descending (unused
        ``-1``); the first ``forced_sink`` columns and the ``forced_local`` nearest diagonals are always in (inside
        the budget, as in the reference); ties break towards lower positions. A (request, head) whose scores hold
        a NaN gets no column and the diagonals of dense causal attention (hence the offsets' width), so its NaN
        reaches the output as dense attention would put it there; it is counted on the device
        (:class:`NanFallbackLog`), nothing syncs.
    """
    check("vertical" in heads.budgets and "slash" in heads.budgets, "heads", "needs budgets vertical and slash")
    check(forced_sink >= 0 and forced_local >= 0, "forced_sink", "forced sink / local must be >= 0")
    sums = lastq_sums(q, kv, geom, heads.q_head, heads.kv_head, sm_scale=sm_scale, last_q=last_q, launch=launch)
    max_sk = geom.max_seqlen_k
    return select_vertical_slash(
        sums, geom.seq_lens_k, heads.budgets["vertical"], heads.budgets["slash"],
        width_cols=min(heads.budget_max["vertical"], max_sk),
        width_offs=max(min(heads.budget_max["slash"], max_sk), dense_band_width(max_sk)),
        forced_sink=forced_sink, forced_local=forced_local, sentinel=SENTINEL,
        nan_count=nan_fallback_counter(q.device))


def build_vertical_slash(q: torch.Tensor, kv: KVSource, geom: BatchGeometry, heads: HeadSet, *, sm_scale: float,
                         last_q: int = _EST.last_q, forced_sink: int = _EST.forced_sink,
                         forced_local: int = _EST.forced_local, launch: LastqLaunch | None = None) -> SparseLayout:
    """Vertical-slash layout over ``len(heads.heads)`` heads (see ``estimate_vertical_slash`` for the arguments)."""
    columns, offsets = estimate_vertical_slash(q, kv, geom, heads, sm_scale=sm_scale, last_q=last_q,
                                               forced_sink=forced_sink, forced_local=forced_local, launch=launch)
    return indices_to_layout(columns, offsets, geom)
