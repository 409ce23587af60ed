"""Training clocks that count only the time spent in training steps.

The engine calls ``resume`` before a stretch of steps, ``mark`` after each step and ``pause``
before evaluation or store writes. ``pause`` returns the cumulative training seconds at each
mark since the last pause. On CUDA the marks are CUDA events recorded on the stream, so the
steps run without a host synchronisation; ``pause`` synchronises once per stretch.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


class CpuClock:
    """Wall-clock timer for devices whose kernels run synchronously with the host.

    ``timer`` returns seconds from an arbitrary origin; it defaults to ``time.perf_counter``.
    """

    def __init__(self, timer: Callable[[], float] = time.perf_counter) -> None:
        self.total = 0.0
        self._timer = timer
        self._start: float | None = None
        self._marks: list[float] = []

    def resume(self) -> None:
        self._start = self._timer()

    def mark(self) -> None:
        self._marks.append(self._timer())

    def pause(self) -> list[float]:
        """Stop the clock; return the training seconds at each mark since ``resume``."""
        if self._start is None:
            return []
        end = self._timer()
        seconds = [self.total + (mark - self._start) for mark in self._marks]
        self.total += end - self._start
        self._start = None
        self._marks = []
        return seconds


class CudaClock:
    """CUDA-event timer: one event per step, read back once per stretch."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.total = 0.0
        self._start: torch.cuda.Event | None = None
        self._marks: list[torch.cuda.Event] = []

    def _event(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def resume(self) -> None:
        self._start = self._event()

    def mark(self) -> None:
        self._marks.append(self._event())

    def pause(self) -> list[float]:
        if self._start is None:
            return []
        end = self._event()
        end.synchronize()
        seconds = [self.total + self._start.elapsed_time(mark) / 1000 for mark in self._marks]
        self.total += self._start.elapsed_time(end) / 1000
        self._start = None
        self._marks = []
        return seconds


def make_clock(device: torch.device) -> CpuClock | CudaClock:
    """Return the clock for ``device``: CUDA events on a GPU, ``perf_counter`` elsewhere."""
    return CudaClock(device) if device.type == "cuda" else CpuClock()
