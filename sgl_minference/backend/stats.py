"""What the sparse path actually did: attended pairs per layer and request, index and attention time (opt-in).

Pair counting (always available, used by the benchmarks too): :func:`layout_pairs` counts, on the layout's
device and in closed form per key range, the (query, key, head) triples a :class:`~sgl_minference.layout.SparseLayout`
attends after the causal cut and the triples its kernel loads (rows x (range lengths + columns)), per query block,
for any batch geometry, so 256K-token layouts are counted without expanding them.

Recording (off unless ``$SGL_MINFERENCE_STATS`` names a file, read once when the backend is built): the backend
hands each sparse layer forward to :meth:`SparseStats.run_layer`, which times the layout build and the attention
kernel with CUDA events and counts the layout's pairs on the device. Nothing waits for the device until the
batch is complete (its last layer, or the next batch's planning): then one synchronisation and one JSON line
per forward batch is appended to the file. SGLang runs the backend in its scheduler subprocess, so the file is
the channel back to a benchmark; the environment variable is inherited by that subprocess. The events and
the counting add a few small kernels per layer; the synchronisation at the end of each batch falls where
SGLang waits for the batch's logits anyway.

One line (``json.loads``-able, keys sorted by meaning, every number per forward batch)::

    {"pid": 1234, "structure": "dummy" | "synthetic", "num_q_heads": 32,
     "seq_lens_q": [8192], "seq_lens_k": [131072], "sparse": [true],    # per request of the batch
     "causal_pairs": [..],                                              # per request, all heads, one layer
     "layers": [{"layer": 0, "attended": [..], "visited": [..],        # per request, all heads
                 "index_ms": 4.1, "attn_ms": 6.0}, ...]}

``attended / causal_pairs`` is the share of causal (query, key) pairs the layer's layout kept for a request
(1.0 for requests the plan gave exact dense layouts); ``index_ms`` covers everything ``layer_layout`` does
(estimation kernels, top-k, conversion, head/request merges), ``attn_ms`` the sparse attention kernel.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from ..layout import BLOCK, BatchGeometry, SparseLayout

logger = logging.getLogger(__name__)

ENV_VAR = "SGL_MINFERENCE_STATS"


# ---- pair counting ------------------------------------------------------------------------------------------


def causal_pairs(seq_q: int, seq_k: int, heads: int) -> int:
    """(query, key, head) triples of bottom-right causal attention: chunk rows at the last ``seq_q`` positions."""
    prefix = seq_k - seq_q
    return heads * (seq_q * prefix + seq_q * (seq_q + 1) // 2)


def _clamped_ramp_sum(m: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """``sum_{t=0}^{m-1} clamp(t, 0, length)`` for ``m >= 0`` (elementwise, int64)."""
    inside = m * (m - 1) // 2
    beyond = length * (length + 1) // 2 + (m - length - 1) * length
    return torch.where(m <= length + 1, inside, beyond)


def range_column_pairs(*, starts: torch.Tensor, ends: torch.Tensor, counts: torch.Tensor, cols: torch.Tensor,
                       col_counts: torch.Tensor, row_pos: torch.Tensor, rows: torch.Tensor,
                       seq_k: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
    """Attended and visited (query, key) pairs of key ranges plus gathered columns, per (query block, head).

    starts, ends: [NQB, H, MAXB] int   key range [start, end) of each entry (ends clamped to ``seq_k``)
    counts:       [NQB, H] int         valid ranges
    cols:         [NQB, H, MAXC] int   gathered key columns
    col_counts:   [NQB, H] int         valid columns
    row_pos:      [NQB] int            absolute position of each block's first query row
    rows:         [NQB] int            valid query rows of each block (64, less in the last)
    seq_k:        [NQB] int or an int  keys of each block's request

    Returns ``(attended, visited)``, ``[NQB, H]`` int64 on the inputs' device (no host sync): a row at position
    ``p`` attends range key ``j`` when ``j <= p``, summed in closed form per range; visited = rows x (range
    lengths + columns), the causal cut not applied.
    """
    starts, ends, cols = starts.long(), ends.long(), cols.long()
    p0 = row_pos.long().view(-1, 1, 1)
    n = rows.long().view(-1, 1, 1)
    sk = seq_k.long().view(-1, 1, 1) if isinstance(seq_k, torch.Tensor) else torch.tensor(seq_k, device=p0.device)
    valid_b = torch.arange(starts.shape[-1], device=starts.device) < counts.long().unsqueeze(-1)
    s = starts.clamp(min=0).minimum(sk)
    length = ends.minimum(sk).maximum(s) - s
    length = torch.where(valid_b, length, torch.zeros_like(length))
    # Row p sees clamp(p + 1 - s, 0, length) keys of the range; rows p0 .. p0+n-1 give a clamped ramp.
    a = p0 + 1 - s
    ramp = _clamped_ramp_sum((a + n).clamp(min=0), length) - _clamped_ramp_sum(a.clamp(min=0), length)
    valid_c = torch.arange(cols.shape[-1], device=cols.device) < col_counts.long().unsqueeze(-1)
    col_rows = (p0 + n - cols).clamp(min=0).minimum(n)  # rows at or after the column's position
    attended = ramp.sum(-1) + torch.where(valid_c, col_rows, 0).sum(-1)
    visited = (length * n).sum(-1) + (valid_c.long() * n).sum(-1)
    return attended, visited


def layout_pairs(layout: SparseLayout, geom: BatchGeometry) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`range_column_pairs` of a layout over ``geom``: ``(attended, visited)``, ``[NQB, Hq]`` int64."""
    req = geom.qb_request.long()
    row = geom.qb_row.long()
    seq_q = (geom.cu_seqlens_q[1:] - geom.cu_seqlens_q[:-1]).long()[req]  # device-side: no host copy per layer
    return range_column_pairs(starts=layout.block_start, ends=layout.block_end, counts=layout.block_count,
                              cols=layout.col_index, col_counts=layout.col_count,
                              row_pos=row + geom.prefix_lens.long()[req], rows=(seq_q - row).clamp(max=BLOCK),
                              seq_k=geom.seq_lens_k.long()[req])


def request_pairs(layout: SparseLayout, geom: BatchGeometry) -> tuple[torch.Tensor, torch.Tensor]:
    """``(attended, visited)`` summed over heads and query blocks per request: ``[B]`` int64 each, on the device."""
    attended, visited = layout_pairs(layout, geom)
    req = geom.qb_request.long()
    zeros = torch.zeros(geom.num_requests, dtype=torch.int64, device=attended.device)
    return zeros.index_add(0, req, attended.sum(1)), zeros.index_add(0, req, visited.sum(1))


# ---- recording ----------------------------------------------------------------------------------------------


class _Clock:
    """CUDA events on a GPU (no sync to record), ``perf_counter`` on the host (CPU tests)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def ms(self, start, end) -> float:
        return start.elapsed_time(end) if self.cuda else 1e3 * (end - start)


class SparseStats:
    """Appends one JSON line per sparse forward batch to ``path`` (see the module docstring for its fields).

    Per batch: :meth:`start_batch` with the plan's geometry, :meth:`run_layer` for each sparse layer, and the
    batch is written when ``last_layer`` has run (or at the next :meth:`start_batch` / :meth:`flush`).
    """

    def __init__(self, path: str | os.PathLike, *, last_layer: int, structure: str = "dummy"):
        self.path = Path(path)
        self.last_layer = last_layer
        self.structure = structure
        self._batch: dict | None = None  # lengths of the batch being recorded
        self._layers: list = []  # (layer_id, attended [B], visited [B], t0, t1, t2) per recorded layer
        self._clock: _Clock | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str], *, last_layer: int, structure: str) -> "SparseStats | None":
        path = environ.get(ENV_VAR, "")
        if not path:
            return None
        logger.warning("minference: recording sparse-path statistics to %s ($%s; syncs once per batch)", path,
                       ENV_VAR)
        return cls(path, last_layer=last_layer, structure=structure)

    def start_batch(self, geom: BatchGeometry, sparse: list[bool]) -> None:
        """A new sparse batch: writes the previous one if it did not reach ``last_layer``."""
        self.flush()
        self._batch = {"seq_lens_q": list(geom.seq_lens_q_cpu), "seq_lens_k": list(geom.seq_lens_k_cpu),
                       "sparse": list(sparse)}

    def run_layer(self, layer_id: int, geom: BatchGeometry, build: Callable[[], SparseLayout],
                  attend: Callable[[SparseLayout], torch.Tensor]) -> torch.Tensor:
        """``attend(build())`` with both timed and the layout's pairs counted; returns what ``attend`` returns."""
        if self._clock is None:
            self._clock = _Clock(geom.seq_lens_k.device)
        t0 = self._clock.mark()
        layout = build()
        t1 = self._clock.mark()
        out = attend(layout)
        t2 = self._clock.mark()
        attended, visited = request_pairs(layout, geom)
        self._layers.append((layer_id, layout.num_heads, attended, visited, t0, t1, t2))
        if layer_id == self.last_layer:
            self.flush()
        return out

    def flush(self) -> None:
        """Write the batch recorded so far (one device sync); nothing when no layer was recorded."""
        if self._batch is None or not self._layers:
            self._batch, self._layers = None, []
            return
        if self._clock.cuda:
            self._layers[-1][-1].synchronize()
        heads = self._layers[0][1]
        line = {"pid": os.getpid(), "structure": self.structure, "num_q_heads": heads, **self._batch,
                "causal_pairs": [causal_pairs(sq, sk, heads)
                                 for sq, sk in zip(self._batch["seq_lens_q"], self._batch["seq_lens_k"])],
                "layers": [{"layer": layer_id, "attended": attended.tolist(), "visited": visited.tolist(),
                            "index_ms": self._clock.ms(t0, t1), "attn_ms": self._clock.ms(t1, t2)}
                           for layer_id, _, attended, visited, t0, t1, t2 in self._layers]}
        self._batch, self._layers = None, []
        with open(self.path, "a") as f:  # one write per line: lines of several processes do not interleave
            f.write(json.dumps(line) + "\n")
