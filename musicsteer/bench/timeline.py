"""Threading model: the producer thread writes (through the observer calls); the benchmark
reads after the producer has stopped.

Stamps (time.monotonic) of what a live producer did, for control-to-sound latency: a
`StepObserver` the benchmark adds to the producer before it starts.
"""

from __future__ import annotations

import time

import numpy as np

from ..controllers.state import ControlChange
from ..live.producer import StepObserver


class Timeline(StepObserver):
    """Preallocated for `steps` steps: when each step started and when its frame was complete,
    every push of audio into the ring, every control change taken."""

    def __init__(self, steps: int) -> None:
        self.step_start = np.full(steps, np.nan)
        self.step_end = np.full(steps, np.nan)
        self.pushes: list[tuple[int, int, int, float]] = []  # (first sample, samples, ring index, time)
        self.changes: list[tuple[str, float, int, int]] = []  # (param, received, received_step, applied step)

    def step_started(self, step: int) -> None:
        if step < len(self.step_start):
            self.step_start[step] = time.monotonic()

    def step_computed(self, step: int) -> None:
        if step < len(self.step_end):
            self.step_end[step] = time.monotonic()  # frame step - (K - 1) is complete

    def control_applied(self, change: ControlChange, step: int) -> None:
        self.changes.append((change.param, change.received, change.received_step, step))

    def audio_pushed(self, first_sample: int, samples: int, ring_index: int) -> None:
        self.pushes.append((first_sample, samples, ring_index, time.monotonic()))

    def sample_pushed(self, sample: int) -> tuple[int, float] | None:
        """(ring index of stream sample `sample`, time it entered the ring), if pushed."""
        for first, n, ring_index, t in self.pushes:
            if first <= sample < first + n:
                return ring_index + (sample - first), t
        return None
