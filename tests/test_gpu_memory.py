"""The package's GPU-memory peak poller (``sgl_minference.gpu_memory.MemoryPeak``) with a scripted reader."""

import threading

from sgl_minference.gpu_memory import MemoryPeak


class Script:
    """Readings in order, the last one repeated; ``polled`` is set once the poller's thread has read one."""

    def __init__(self, *values):
        self.values, self.calls, self.polled = list(values), 0, threading.Event()

    def __call__(self):
        value = self.values[min(self.calls, len(self.values) - 1)]
        self.calls += 1
        if self.calls > 1:
            self.polled.set()
        return value


def test_the_peak_covers_the_start_the_polls_and_the_stop():
    read = Script(5, 9, 7)  # start reads 5, the thread 9, then 7 until the stop
    with MemoryPeak(read, interval_s=0.001) as watch:
        assert read.polled.wait(30)
    assert watch.peak == 9
    late = Script(1)
    with MemoryPeak(late, interval_s=60) as quiet:  # no poll inside the window: start and stop readings only
        late.values.append(4)
    assert quiet.peak == 4 and late.calls == 2


def test_reset_peak_restarts_from_a_fresh_reading():
    read = Script(10, 3)
    watch = MemoryPeak(read, interval_s=60).start()
    assert watch.peak == 10
    assert watch.reset_peak() == 3 and watch.peak == 3
    watch.stop()
    assert watch.peak == 3
