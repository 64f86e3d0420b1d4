"""Per layer and batch: the sparse path, or the dense backend when the sparse path would cost more.

Why: the sparse kernel spends about 2-2.8x FA3's time per key tile (H200, 2026-12-03, BENCHMARKS.md), so a layer
whose layouts keep more than ~40% of the causal keys is slower sparse than dense (on dummy weights nearly every
layer; with real structure the early chunks of a long prompt). The index costs too: 1-12 ms per layer on Gemma-3 /
SmolLM2 at 8K-32K against FA3's 0.2-1.3 ms (H200, 2026-12-03, ``chunk_bench --data captured``), so a layer with few
keys can still lose. Which layers lose depends on the input, and the dense backend's call shape is a host decision,
so it is decided on the host, from what the sparse path measured on the device in earlier batches, without waiting
for the device:

* per sparse layer run, the wrappers of :meth:`DenseRouter.timed` add the layout's visited keys (64 per key range
  plus the gathered columns) and its (query block, head) count to a device counter (three small reductions, no
  sync), and mark the index's start, its end and the attention's end on the device's timeline (``Clock``);
* after the batch's last layer that ran sparse the counters go to pinned host memory with a non-blocking copy and an
  event; :meth:`DenseRouter.poll` (at the next batch's planning) reads them and the layers' index and attention
  times if the event is done, else keeps the earlier figures (SGLang may plan a batch while the previous one runs);
* :meth:`DenseRouter.plan` predicts each layer's cost per query block for the new batch in keys of the sparse
  kernel: the last measured visited keys (the budgets bound them in absolute keys, so they stay about constant as
  the context grows), capped by the new batch's causal keys, plus the index time converted to keys at the attention's
  measured rate. It sends the layer to the dense backend when ``cost_ratio`` times that exceeds the causal keys. A
  layer never measured runs sparse. A dense-routed layer is measured again once the context has grown enough that
  its last figures predict a win, so the choice corrects itself.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..layout import BLOCK, BatchGeometry, SparseLayout
from .clock import Clock


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
        self._closing: int | None = None  # the batch's last layer that runs sparse: its attention starts the copy
        self.cost_ratio = cost_ratio
        self.device = torch.device(device)
        self._clock = Clock(self.device)
        cuda = self.device.type == "cuda"
        # [visited keys, (query block, head) pairs] per layer, accumulated over one batch
        self._counts = torch.zeros(2, len(layer_ids), dtype=torch.int64, device=self.device)
        self._host = torch.zeros(2, len(layer_ids), dtype=torch.int64, pin_memory=cuda)
        self._marks: list[tuple] = []  # (slot, index start, index end, attention end) per layer run this batch
        self._pending_marks: list[tuple] = []  # the copied batch's, read with its counts
        self._event: torch.cuda.Event | None = None
        self._recorded = False  # the counters hold a batch not yet copied
        self._pending = False  # a copy was started and not read yet
        self.keys_per_block: list[float | None] = [None] * len(layer_ids)  # last measured, per layer
        # last measured index time per layer, in keys per query block at that batch's attention rate
        self.index_keys: list[float] = [0.0] * len(layer_ids)

    def timed(self, layer_id: int, build: Callable[[], SparseLayout], attend: Callable[[SparseLayout], object]
              ) -> tuple[Callable[[], SparseLayout], Callable[[SparseLayout], object]]:
        """``build`` (the layer's layout) and ``attend`` (its sparse attention) wrapped to count the layout's
        visited keys on the device and mark both phases on the timeline; call the two in that order, once. After
        the batch's last sparse layer's attention, the copy starts."""
        i = self.slot[layer_id]
        marks: list = []

        def timed_build() -> SparseLayout:
            marks.append(self._clock.mark())
            layout = build()
            marks.append(self._clock.mark())
            visited = BLOCK * layout.block_count.sum(dtype=torch.int64) + layout.col_count.sum(dtype=torch.int64)
            self._counts[0, i] += visited
            self._counts[1, i] += layout.block_count.numel()
            self._recorded = True
            return layout

        def timed_attend(layout: SparseLayout):
            out = attend(layout)
            self._marks.append((i, *marks, self._clock.mark()))
            if layer_id == self._closing:
                self._close()
            return out

        return timed_build, timed_attend

    def _close(self) -> None:
        """Start the non-blocking copy of the counters (stream-ordered after the batch's layers) and reset them."""
        self._host.copy_(self._counts, non_blocking=self.device.type == "cuda")
        if self.device.type == "cuda":
            self._event = torch.cuda.Event()
            self._event.record()
        self._counts.zero_()
        self._pending_marks, self._marks = self._marks, []
        self._recorded, self._pending = False, True

    def poll(self) -> None:
        """Take the last batch's figures if its copy has landed (never waits)."""
        if not self._pending or (self._event is not None and not self._event.query()):
            return
        visited, pairs = self._host.tolist()
        for i, (v, n) in enumerate(zip(visited, pairs)):
            if n > 0:
                self.keys_per_block[i] = v / n
        index_ms, attn_ms = [0.0] * len(self.slot), [0.0] * len(self.slot)
        for i, t0, t1, t2 in self._pending_marks:
            index_ms[i] += self._clock.ms(t0, t1)
            attn_ms[i] += self._clock.ms(t1, t2)
        for i, (index, attn) in enumerate(zip(index_ms, attn_ms)):
            if attn > 0 and pairs[i] > 0:
                self.index_keys[i] = self.keys_per_block[i] * index / attn
        self._pending, self._pending_marks = False, []

    def plan(self, geom: BatchGeometry) -> set[int]:
        """The layers of this batch that go to the dense backend: those whose sparse run is predicted to cost
        more. Call once per sparse batch, before its layers run."""
        if self._recorded:  # the previous batch's closing layer did not run sparse: copy its counts now
            self._close()
        self.poll()
        causal = causal_keys_per_block(geom.seq_lens_q_cpu, geom.seq_lens_k_cpu)
        dense = {layer for layer, i in self.slot.items()
                 if self.keys_per_block[i] is not None
                 and self.cost_ratio * (min(self.keys_per_block[i], causal) + self.index_keys[i]) > causal}
        self._closing = max((layer for layer in self.slot if layer not in dense), default=None)
        return dense


__all__ = ["DenseRouter", "causal_keys_per_block"]
