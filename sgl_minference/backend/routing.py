"""Per layer and batch: the sparse path, or the dense backend when the sparse path would cost more.

Why: the sparse kernel spends about 2-2.7x FA3's time per key tile (H200, 2026-12-02, BENCHMARKS.md), so a layer
whose layouts keep more than ~40% of the causal keys is slower sparse than dense (on dummy weights nearly every
layer; with real structure the early chunks of a long prompt). Which layers those are depends on the input, and
the dense backend's call shape is a host decision, so it is decided on the host, from what the sparse path
measured on the device in earlier batches, without waiting for the device:

* per sparse layer run, :meth:`DenseRouter.record` adds the layout's visited keys (64 per key range plus the
  gathered columns) and its (query block, head) count to a device counter: three small reductions, no sync;
* after the batch's last layer that ran sparse the counters go to pinned host memory with a non-blocking copy and an
  event; :meth:`DenseRouter.poll` (at the next batch's planning) reads them if the event is done, else keeps
  the earlier figures (SGLang may plan a batch while the previous one runs);
* :meth:`DenseRouter.plan` predicts each layer's visited keys per query block for the new batch as the
  last measured figure (the budgets bound it in absolute keys, so it stays about constant as the context grows),
  capped by the new batch's causal keys, and sends the layer to the dense backend when ``cost_ratio`` times that
  exceeds the causal keys. A layer never measured runs sparse. A dense-routed layer is measured again once the
  context has grown enough that its last figure predicts a win, so the choice corrects itself.
"""

from __future__ import annotations

import torch

from ..layout import BLOCK, BatchGeometry, SparseLayout


def causal_keys_per_block(seq_lens_q: list[int], seq_lens_k: list[int]) -> float:
    """Mean causal keys per (query block, head) of the requests' chunks (host lengths only)."""
    keys = blocks = 0
    for sq, sk in zip(seq_lens_q, seq_lens_k):
        prefix = sk - sq
        for row in range(0, sq, BLOCK):
            rows = min(BLOCK, sq - row)
            keys += prefix + row + (rows + 1) / 2  # the block's rows see prefix + row + 1 .. + rows keys
            blocks += 1
    return keys / blocks if blocks else 0.0


class DenseRouter:
    """Host-side routing state of one backend (one per tensor-parallel rank).

    Args:
        layer_ids: the layers that can run sparse, in forward order.
        cost_ratio: the sparse kernel's time per key over the dense backend's (measured, per head_dim).
        device: where the layouts live.
    """

    def __init__(self, layer_ids: list[int], *, cost_ratio: float, device):
        self.slot = {layer: i for i, layer in enumerate(layer_ids)}
        self._closing: int | None = None  # the batch's last layer that runs sparse: its record starts the copy
        self.cost_ratio = cost_ratio
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        # [visited keys, (query block, head) pairs] per layer, accumulated over one batch
        self._counts = torch.zeros(2, len(layer_ids), dtype=torch.int64, device=self.device)
        self._host = torch.zeros(2, len(layer_ids), dtype=torch.int64, pin_memory=cuda)
        self._event: torch.cuda.Event | None = None
        self._recorded = False  # the counters hold a batch not yet copied
        self._pending = False  # a copy was started and not read yet
        self.keys_per_block: list[float | None] = [None] * len(layer_ids)  # last measured, per layer

    def record(self, layer_id: int, layout: SparseLayout) -> None:
        """Count one sparse layer's visited keys on the device; after the batch's last layer, start the copy."""
        i = self.slot[layer_id]
        visited = BLOCK * layout.block_count.sum(dtype=torch.int64) + layout.col_count.sum(dtype=torch.int64)
        self._counts[0, i] += visited
        self._counts[1, i] += layout.block_count.numel()
        self._recorded = True
        if layer_id == self._closing:
            self._close()

    def _close(self) -> None:
        """Start the non-blocking copy of the counters (stream-ordered after the batch's layers) and reset them."""
        self._host.copy_(self._counts, non_blocking=self.device.type == "cuda")
        if self.device.type == "cuda":
            self._event = torch.cuda.Event()
            self._event.record()
        self._counts.zero_()
        self._recorded, self._pending = False, True

    def poll(self) -> None:
        """Take the last batch's figures if its copy has landed (never waits)."""
        if not self._pending or (self._event is not None and not self._event.query()):
            return
        visited, pairs = self._host.tolist()
        for i, (v, n) in enumerate(zip(visited, pairs)):
            if n > 0:
                self.keys_per_block[i] = v / n
        self._pending = False

    def plan(self, geom: BatchGeometry) -> set[int]:
        """The layers of this batch that go to the dense backend: those whose sparse run is predicted to cost
        more. Call once per sparse batch, before its layers run."""
        if self._recorded:  # the previous batch's closing layer did not run sparse: copy its counts now
            self._close()
        self.poll()
        causal = causal_keys_per_block(geom.seq_lens_q_cpu, geom.seq_lens_k_cpu)
        dense = {layer for layer, i in self.slot.items()
                 if self.keys_per_block[i] is not None
                 and self.cost_ratio * min(self.keys_per_block[i], causal) > causal}
        self._closing = max((layer for layer in self.slot if layer not in dense), default=None)
        return dense


__all__ = ["DenseRouter", "causal_keys_per_block"]
