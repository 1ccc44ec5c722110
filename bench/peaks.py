"""The peak of what a reading returns ({name: GiB}), sampled in a thread while a run goes on: the
benchmark's resident memory per process role, the GPU check's used memory per GPU."""

from __future__ import annotations

import threading
from collections.abc import Callable


class PeakSampler(threading.Thread):
    def __init__(self, read: Callable[[], dict[str, float]], period_s: float = 0.5):
        super().__init__(daemon=True)
        self.read, self.period_s = read, period_s
        self.peaks: dict[str, float] = {}
        self.stopped = threading.Event()
        self.start()

    def run(self) -> None:
        while not self.stopped.wait(self.period_s):
            for name, value in self.read().items():
                self.peaks[name] = max(self.peaks.get(name, 0.0), value)

    def take(self) -> dict[str, float]:
        """The peaks so far (rounded), and start over."""
        peaks, self.peaks = {k: round(v, 2) for k, v in self.peaks.items()}, {}
        return peaks

    def stop(self) -> dict[str, float]:
        self.stopped.set()
        return self.take()
