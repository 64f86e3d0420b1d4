"""What the sparse path actually did: attended pairs per layer and request, index and attention time (opt-in).

Pair counting is the layout's own (:meth:`~sgl_minference.layout.SparseLayout.pairs`, closed form per key range
on the layout's device, used by the benchmarks too); :func:`request_pairs` sums it per request.

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
     "pool_run": [true],                                                # per request: read without the slot table
     "routed_dense": [3, 7],                                            # layers the routing sent dense
     "causal_pairs": [..],                                              # per request, all heads, one layer
     "layers": [{"layer": 0, "attended": [..], "visited": [..],        # per request, all heads
                 "index_ms": 4.1, "attn_ms": 6.0}, ...]}

``attended / causal_pairs`` is the share of causal (query, key) pairs the layer's layout kept for a request
(1.0 for requests the plan gave exact dense layouts); ``index_ms`` covers everything ``layer_layout`` does
(estimation kernels, top-k, conversion, head/request merges), ``attn_ms`` the sparse attention kernel.
``pool_run``: the request's KV slots are consecutive (``KVSource.run_start``), so a launch with pool runs
(``AttentionLaunch.pool_runs``, not the default yet) reads its keys by row arithmetic rather than through the slot
table (``null`` when the batch's source has no runs). ``routed_dense``: the sparse-eligible layers the per-layer routing
(``backend/routing.py``) sent to the dense
backend in this batch; they have no ``layers`` entry. A batch whose every layer was routed is written too (with
``"layers": []`` and ``num_q_heads`` null), so routing never makes a batch disappear from the record.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from ..layout import BatchGeometry, SparseLayout, causal_pairs
from .clock import Clock

logger = logging.getLogger(__name__)

ENV_VAR = "SGL_MINFERENCE_STATS"


def request_pairs(layout: SparseLayout, geom: BatchGeometry) -> tuple[torch.Tensor, torch.Tensor]:
    """``(attended, visited)`` of :meth:`SparseLayout.pairs` summed over heads and query blocks per request: ``[B]``
    int64 each, on the device."""
    attended, visited = layout.pairs(geom)
    req = geom.qb_request.long()
    zeros = torch.zeros(geom.num_requests, dtype=torch.int64, device=attended.device)
    return zeros.index_add(0, req, attended.sum(1)), zeros.index_add(0, req, visited.sum(1))


# ---- recording ----------------------------------------------------------------------------------------------


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
        self._run_start: torch.Tensor | None = None  # its plan's pool runs ([B] int32, on the device)
        self._layers: list = []  # (layer_id, attended [B], visited [B], t0, t1, t2) per recorded layer
        self._clock: Clock | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str], *, last_layer: int, structure: str) -> "SparseStats | None":
        path = environ.get(ENV_VAR, "")
        if not path:
            return None
        logger.warning("minference: recording sparse-path statistics to %s ($%s; syncs once per batch)", path,
                       ENV_VAR)
        return cls(path, last_layer=last_layer, structure=structure)

    def start_batch(self, geom: BatchGeometry, sparse: list[bool], routed_dense=(),
                    run_start: torch.Tensor | None = None) -> None:
        """A new sparse batch (``routed_dense``: the layer ids routed to the dense backend; ``run_start``: the
        plan's ``[B]`` pool runs, read when the batch is written): writes the previous one if it did not reach
        ``last_layer``."""
        self.flush()
        self._batch = {"seq_lens_q": list(geom.seq_lens_q_cpu), "seq_lens_k": list(geom.seq_lens_k_cpu),
                       "sparse": list(sparse), "routed_dense": sorted(routed_dense)}
        self._run_start = run_start

    def run_layer(self, layer_id: int, geom: BatchGeometry, build: Callable[[], SparseLayout],
                  attend: Callable[[SparseLayout], torch.Tensor]) -> torch.Tensor:
        """``attend(build())`` with both timed and the layout's pairs counted; returns what ``attend`` returns."""
        if self._clock is None:
            self._clock = Clock(geom.seq_lens_k.device)
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
        """Write the batch recorded so far (one device sync); nothing when no layer was recorded or routed."""
        if self._batch is None or not (self._layers or self._batch["routed_dense"]):
            self._batch, self._layers = None, []
            return
        if self._layers and self._clock.cuda:
            self._layers[-1][-1].synchronize()
        heads = self._layers[0][1] if self._layers else None
        runs = None if self._run_start is None else [s >= 0 for s in self._run_start.tolist()]
        line = {"pid": os.getpid(), "structure": self.structure, "num_q_heads": heads, **self._batch, "pool_run": runs,
                "causal_pairs": [causal_pairs(sq, sk, heads) if heads else None
                                 for sq, sk in zip(self._batch["seq_lens_q"], self._batch["seq_lens_k"])],
                "layers": [{"layer": layer_id, "attended": attended.tolist(), "visited": visited.tolist(),
                            "index_ms": self._clock.ms(t0, t1), "attn_ms": self._clock.ms(t1, t2)}
                           for layer_id, _, attended, visited, t0, t1, t2 in self._layers]}
        self._batch, self._layers = None, []
        with open(self.path, "a") as f:  # one write per line: lines of several processes do not interleave
            f.write(json.dumps(line) + "\n")
