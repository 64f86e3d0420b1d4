"""Marks on the device's timeline for timing a layer's phases without a sync: CUDA events on a GPU (recorded on the
current stream, read once they have completed), ``perf_counter`` on the host (CPU tests, where ops are synchronous)."""

from __future__ import annotations

import time

import torch


class Clock:
    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"

    def mark(self):
        """A point on the timeline: a recorded ``torch.cuda.Event`` (timing on), or a host time in seconds."""
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def done(self, mark) -> bool:
        """Whether ``mark`` has been reached (never waits)."""
        return not self.cuda or mark.query()

    def ms(self, start, end) -> float:
        """Milliseconds from ``start`` to ``end`` (both reached)."""
        return start.elapsed_time(end) if self.cuda else 1e3 * (end - start)
