"""Peak device-wide GPU memory while something runs: one poller for the TTFT tools (``sgl_minference.ttft``,
``benchmarks/e2e_ttft.py``), and the NVML / nvidia-smi reading they use when the memory is another process's.

Device-wide on purpose: SGLang allocates in its scheduler process, which is not ours to instrument. No torch and
no CUDA here (a CUDA context in the polling process would itself take GPU memory); a reader that needs torch is
the caller's.
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Callable


class MemoryPeak:
    """The highest reading of ``read()`` (used memory, any unit), polled every ``interval_s`` seconds in a daemon
    thread between :meth:`start` and :meth:`stop` (or inside a ``with`` block).

    Both ends take a reading too, so the window has a peak however short it is; :meth:`reset_peak` restarts the
    high-water mark from a fresh reading. A reading that raises ends the polling thread (the peak keeps what it
    saw).
    """

    def __init__(self, read: Callable[[], float], *, interval_s: float):
        self.read, self.interval_s = read, interval_s
        self.peak: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="gpu memory peak", daemon=True)

    def _take(self) -> float:
        value = self.read()
        self.peak = value if self.peak is None else max(self.peak, value)
        return value

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._take()

    def start(self) -> MemoryPeak:
        self.peak = self.read()
        self._thread.start()
        return self

    def reset_peak(self) -> float:
        """Restart the high-water mark from the current reading; returns that reading."""
        self.peak = self.read()
        return self.peak

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._take()

    def __enter__(self) -> MemoryPeak:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def used_mib_reader(index: int) -> Callable[[], float]:
    """MiB in use on GPU ``index`` (NVML numbering), read with NVML, or with nvidia-smi where NVML is missing."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception:  # no NVML bindings or driver: fall back to nvidia-smi
        return lambda: _smi_used_mib(index)
    return lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20


def _smi_used_mib(index: int) -> float:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", f"--id={index}"],
                         capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[0])
