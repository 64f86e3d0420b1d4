"""GPU memory in use, sampled with ``nvidia-smi`` while a server runs (it sees every process on the GPU,
which is the point: the server's scheduler processes are not ours to instrument).

Nothing here touches CUDA: a CUDA context in the client process would itself take GPU memory.
"""

from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Callable

from benchmarks.multiturn.stats import linear_slope

QUERY_MEMORY = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
QUERY_DEVICE = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]


def parse_memory_used(text: str) -> list[int]:
    """MiB in use per GPU from ``nvidia-smi --query-gpu=memory.used --format=csv,noheader[,nounits]``
    (one line per GPU, ``"1234"`` or ``"1234 MiB"``)."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        value = line[:-3].strip() if line.endswith("MiB") else line
        if not value.isdigit():
            raise ValueError(f"text: cannot read a memory.used value from {line!r}")
        out.append(int(value))
    if not out:
        raise ValueError("text: no memory.used lines")
    return out


def _run_nvidia_smi(cmd: list[str]) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=True).stdout


def read_memory_text() -> str:
    """``nvidia-smi``'s ``memory.used`` lines (raises ``OSError``/``SubprocessError`` without a GPU)."""
    return _run_nvidia_smi(QUERY_MEMORY)


def device_description() -> list[str]:
    """One ``name, memory.total, driver`` line per GPU; ``["no GPU (...)"]`` when nvidia-smi fails."""
    try:
        lines = [line.strip() for line in _run_nvidia_smi(QUERY_DEVICE).splitlines() if line.strip()]
        return lines or ["no GPU (nvidia-smi listed none)"]
    except (OSError, subprocess.SubprocessError) as e:
        return [f"no GPU ({type(e).__name__}: {e})"]


class MemoryPoller:
    """Samples ``memory.used`` of GPU ``gpu`` every ``interval_s`` in a thread, inside a ``with`` block.

    ``samples``: ``(seconds since start, MiB)`` pairs; ``error``: the last failed reading's reason. A reading
    that fails is skipped (one nvidia-smi hiccup must not end a 20-minute series); ``max_failures`` in a row
    end the sampling.
    """

    max_failures = 5

    def __init__(self, *, gpu: int = 0, interval_s: float = 0.5, read: Callable[[], str] | None = None) -> None:
        self.gpu, self.interval_s = gpu, interval_s
        self._read = read or read_memory_text
        self.samples: list[tuple[float, int]] = []
        self.started_at: float | None = None  # time.time() of the first sample's clock zero
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="nvidia-smi poller", daemon=True)

    def _loop(self) -> None:
        t0 = time.monotonic()
        self.started_at = time.time()
        failures = 0
        while not self._stop.is_set():
            try:
                used = parse_memory_used(self._read())
                self.samples.append((time.monotonic() - t0, used[self.gpu]))
                failures = 0
            except (OSError, subprocess.SubprocessError, ValueError, IndexError) as e:
                self.error = f"{type(e).__name__}: {e}"
                failures += 1
                if failures >= self.max_failures:
                    return
            self._stop.wait(self.interval_s)

    def __enter__(self) -> MemoryPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def values(self) -> list[int]:
        return [mib for _, mib in self.samples]


@dataclass(kw_only=True)
class MemoryVerdict:
    status: str  # "PASS", "FAIL" or "INCONCLUSIVE"
    peak_mib: int | None
    early_peak_mib: int | None  # highest sample in the first half of the run
    late_peak_mib: int | None  # highest sample in the last quarter
    samples: int
    message: str


def bounded_memory(values: list[int], *, slack_mib: int) -> MemoryVerdict:
    """Memory is bounded when the last quarter of a steady load peaks no more than ``slack_mib`` above the
    first half (SGLang preallocates its KV pool, so growth under a repeating load means something leaks)."""
    n = len(values)
    if n < 4:
        return MemoryVerdict(status="INCONCLUSIVE", peak_mib=max(values, default=None), early_peak_mib=None,
                             late_peak_mib=None, samples=n, message=f"only {n} memory samples")
    early, late = max(values[: n // 2]), max(values[(3 * n) // 4:])
    growth = late - early
    status = "PASS" if growth <= slack_mib else "FAIL"
    return MemoryVerdict(status=status, peak_mib=max(values), early_peak_mib=early, late_peak_mib=late, samples=n,
                         message=f"peak {max(values)} MiB; last-quarter peak {late} MiB vs first-half peak {early} MiB "
                                 f"(growth {growth:+d} MiB, allowed {slack_mib}) over {n} samples")


@dataclass(kw_only=True)
class TrendVerdict:
    status: str  # "PASS", "FAIL" or "INCONCLUSIVE"
    slope_mib_per_min: float | None  # least-squares slope over the second half of the samples
    window_s: float  # time the second half spans
    projected_growth_mib: float | None  # slope x window: how much the fit says memory grew in that half
    samples: int
    message: str


def memory_trend(samples: list[tuple[float, int]], *, slack_mib: int, min_samples: int = 8) -> TrendVerdict:
    """No growth over a long run: a line fitted to the second half of ``(seconds, MiB)`` samples may rise by at
    most ``slack_mib`` across that half. The first half is left out because the allocator's pools and the
    radix cache fill up early in a run; a leak keeps growing after that."""
    n = len(samples)
    if n < min_samples:
        return TrendVerdict(status="INCONCLUSIVE", slope_mib_per_min=None, window_s=0.0, projected_growth_mib=None,
                            samples=n, message=f"only {n} memory samples (need {min_samples})")
    half = samples[n // 2:]
    ts, mib = [t for t, _ in half], [m for _, m in half]
    slope = linear_slope(ts, mib)
    window = ts[-1] - ts[0]
    if slope is None or window <= 0:
        return TrendVerdict(status="INCONCLUSIVE", slope_mib_per_min=None, window_s=window,
                            projected_growth_mib=None, samples=n, message="samples span no time")
    growth = slope * window
    status = "PASS" if growth <= slack_mib else "FAIL"
    return TrendVerdict(status=status, slope_mib_per_min=slope * 60, window_s=window, projected_growth_mib=growth,
                        samples=n, message=f"second-half trend {slope * 60:+.1f} MiB/min over {window:.0f} s "
                                           f"(fitted growth {growth:+.0f} MiB, allowed {slack_mib}); "
                                           f"range {min(mib)}..{max(mib)} MiB over {n} samples")


def wait_for_memory(read: Callable[[], str], *, gpu: int, limit_mib: int, timeout_s: float,
                    interval_s: float = 1.0) -> tuple[bool, list[int], float]:
    """Poll ``memory.used`` of ``gpu`` until it is at most ``limit_mib`` or ``timeout_s`` passes.
    Returns (reached, readings, seconds waited); a failing ``read`` ends the wait unreached."""
    t0 = time.monotonic()
    readings: list[int] = []
    while True:
        try:
            readings.append(parse_memory_used(read())[gpu])
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            return False, readings, time.monotonic() - t0
        if readings[-1] <= limit_mib:
            return True, readings, time.monotonic() - t0
        if time.monotonic() - t0 >= timeout_s:
            return False, readings, time.monotonic() - t0
        time.sleep(interval_s)
