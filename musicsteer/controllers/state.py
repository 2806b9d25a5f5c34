"""Threading model: `set` may be called from any thread (OSC server, MIDI callback,
the CLI); it holds a lock for a dict assignment only. `take` is called by the
producer thread alone. Nothing here touches tensors or blocks on I/O.

ControlState: the targets controllers write and the producer reads once per step.

Parameters are named by their OSC path below `/musicsteer/`; params.py holds the one
table of them (concept/<name>/strength, concept/<name>/schedule, prompt, cfg, ...), and
its `validate` checks and clamps every value that comes in. A setter validates, stores
the latest value per parameter and bumps a generation counter: O(1), never waits on
the producer. The producer calls `take(step)` once per step and gets every change
since the last call; each change takes effect at that step and is what the control
log records. A change may ask for smoothing (a one-pole time constant in ms); the
producer's `Smoother` then moves the value toward the new target a little every step,
so a knob never clicks, and replay reproduces it exactly from the logged targets.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

from .params import ControlError, validate


@dataclass(frozen=True)
class ControlChange:
    param: str
    value: float | int | str
    source: str = "api"
    received: float = 0.0  # time.monotonic() at arrival
    smooth_ms: float = 0.0  # one-pole time constant toward the new value; 0 jumps
    received_step: int = -1  # the producer's step when the change arrived (-1: unknown)

    def to_json(self, step: int) -> dict:
        entry = {"step": step, "param": self.param, "value": self.value, "source": self.source}
        if self.smooth_ms:
            entry["smooth_ms"] = self.smooth_ms
        if self.received_step >= 0:
            entry["received_step"] = self.received_step
        return entry


class ControlState:
    def __init__(self, concepts: list[str] | None = None) -> None:
        self.concepts = frozenset(concepts) if concepts is not None else None
        self._pending: dict[str, ControlChange] = {}
        self._latest: dict[str, float | int | str] = {}  # the newest target of every parameter
        self._lock = threading.Lock()
        self.generation = 0
        self.step_now = -1  # written by the producer at the start of each step (an int store)

    def seed(self, param: str, value) -> None:
        """Make `value` the current target without it being a change (the engine's starting values)."""
        with self._lock:
            self._latest[param] = validate(param, value, self.concepts)

    def current(self, param: str):
        """The newest target of `param` (seeded or set), or None if it never had one."""
        return self._latest.get(param)

    def set(self, param: str, value, source: str = "api", smooth_ms: float = 0.0) -> ControlChange:
        if not (isinstance(smooth_ms, (int, float)) and math.isfinite(smooth_ms) and smooth_ms >= 0):
            raise ControlError(f"smoothing must be a non-negative number of ms, got {smooth_ms!r}")
        change = ControlChange(param, validate(param, value, self.concepts), source, time.monotonic(),
                               float(smooth_ms), self.step_now)
        with self._lock:
            self._pending[param] = change
            self._latest[param] = change.value
            self.generation += 1
        return change

    def take(self, step: int) -> list[ControlChange]:
        """Every change since the last call, the latest per parameter (producer thread)."""
        if not self._pending:  # a racy peek is fine: a change missed now is taken next step
            return []
        with self._lock:
            pending, self._pending = self._pending, {}
        return list(pending.values())


class Smoother:
    """Per-step values of numeric parameters, each moving toward its target (producer thread).

    One pole: v <- v + (target - v) * (1 - exp(-frame_ms / tau_ms)); tau 0 jumps at once.
    Values within 1e-6 of the target snap to it, so a settled parameter costs nothing."""

    def __init__(self, frame_ms: float = 20.0) -> None:
        self.frame_ms = frame_ms
        self.values: dict[str, float] = {}
        self.targets: dict[str, tuple[float, float]] = {}  # param -> (target, coefficient)

    def set_target(self, param: str, target: float, smooth_ms: float, current: float | None = None) -> None:
        if param not in self.values:
            self.values[param] = float(target if current is None else current)
        coef = 1.0 if smooth_ms <= 0 else 1.0 - math.exp(-self.frame_ms / smooth_ms)
        self.targets[param] = (float(target), coef)

    def advance(self) -> dict[str, float]:
        """Move every unsettled parameter one step; return those that changed."""
        changed = {}
        for param, (target, coef) in list(self.targets.items()):
            v = self.values[param]
            v = v + (target - v) * coef
            if abs(target - v) <= 1e-6:
                v = target
                del self.targets[param]
            self.values[param] = v
            changed[param] = v
        return changed


class ScriptedControls:
    """Recorded changes replayed at the steps they took effect at (session replay)."""

    def __init__(self, entries: list[dict]) -> None:
        self.step_now = -1
        self._by_step: dict[int, list[ControlChange]] = {}
        for e in entries:
            self._by_step.setdefault(int(e["step"]), []).append(
                ControlChange(e["param"], e["value"], e.get("source", "replay"), 0.0, e.get("smooth_ms", 0.0)))

    def take(self, step: int) -> list[ControlChange]:
        return self._by_step.pop(step, [])
