"""GPU memory in use while something runs: the one poller of the TTFT tools (``sgl_minference.ttft``,
``benchmarks/e2e_ttft.py``) and of the multi-turn benchmark's reliability checks (``benchmarks/multiturn``), and
the NVML / nvidia-smi readings they use.

Device-wide on purpose: SGLang allocates in its scheduler processes, which are not ours to instrument. No torch
and no CUDA here (a CUDA context in the polling process would itself take GPU memory; the multi-turn HTTP side
must not need torch at all); a reader that needs torch is the caller's.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable

QUERY_MEMORY = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
QUERY_DEVICE = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]


class MemoryPoller:
    """Memory readings sampled every ``interval_s`` seconds in a daemon thread, inside a ``with`` block (or
    between :meth:`start` and :meth:`stop`).

    By default a reading is MiB in use on GPU ``gpu`` from ``read()``, nvidia-smi's ``memory.used`` text
    (default: nvidia-smi itself). ``samples``: ``(seconds since start, reading)`` pairs; ``peak``: the highest
    reading; ``error``: the last failed reading's reason. A reading that fails is skipped (one nvidia-smi hiccup
    must not end a 20-minute series); ``max_failures`` in a row end the sampling.
    """

    max_failures = 5
    read_at_ends = False  # whether start() and stop() take a reading in the caller's thread too

    def __init__(self, *, gpu: int = 0, interval_s: float = 0.5, read: Callable[[], str] | None = None) -> None:
        text = read or read_memory_text
        self._value: Callable[[], float] = lambda: parse_memory_used(text())[gpu]
        self.gpu, self.interval_s = gpu, interval_s
        self.samples: list[tuple[float, float]] = []
        self.peak: float | None = None
        self.started_at: float | None = None  # time.time() of the samples' clock zero
        self.error: str | None = None
        self._t0 = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="gpu memory poller", daemon=True)

    def _take(self) -> float:
        value = self._value()
        self.samples.append((time.monotonic() - self._t0, value))
        self.peak = value if self.peak is None else max(self.peak, value)
        return value

    def _poll(self) -> None:
        failures = 0
        if self.read_at_ends and self._stop.wait(self.interval_s):  # start() took the first reading
            return
        while True:
            try:
                self._take()
                failures = 0
            except Exception as e:  # noqa: BLE001 (any failed reading counts, and ends the series in the end)
                self.error = f"{type(e).__name__}: {e}"
                failures += 1
                if failures >= self.max_failures:
                    return
            if self._stop.wait(self.interval_s):
                return

    def start(self) -> MemoryPoller:
        self._t0, self.started_at = time.monotonic(), time.time()
        if self.read_at_ends:
            self._take()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)
        if self.read_at_ends:
            self._take()

    def __enter__(self) -> MemoryPoller:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def values(self) -> list[float]:
        return [value for _, value in self.samples]


class MemoryPeak(MemoryPoller):
    """The highest reading of ``read()`` (used memory, any unit), polled every ``interval_s`` seconds.

    Both ends take a reading too, so the window has a peak however short it is; :meth:`reset_peak` restarts the
    high-water mark from a fresh reading. A reading that raises ends the polling thread (the peak keeps what it
    saw).
    """

    max_failures = 1
    read_at_ends = True

    def __init__(self, read: Callable[[], float], *, interval_s: float):
        super().__init__(interval_s=interval_s)
        self._value = read

    def reset_peak(self) -> float:
        """Restart the high-water mark from the current reading; returns that reading."""
        self.peak = self._value()
        return self.peak


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


def used_mib_reader(index: int) -> Callable[[], float]:
    """MiB in use on GPU ``index`` (NVML numbering), read with NVML, or with nvidia-smi where NVML is missing."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception:  # no NVML bindings or driver: fall back to nvidia-smi
        return lambda: parse_memory_used(_run_nvidia_smi([*QUERY_MEMORY, f"--id={index}"]))[0]
    return lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20


def wait_for_memory(read: Callable[[], str], *, gpu: int, limit_mib: int, timeout_s: float,
                    interval_s: float = 1.0) -> tuple[bool, list[int], float]:
    """Poll ``memory.used`` of ``gpu`` (``read()``: nvidia-smi's text) until it is at most ``limit_mib`` or
    ``timeout_s`` passes. Returns (reached, readings, seconds waited); a failing ``read`` ends the wait unreached."""
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
