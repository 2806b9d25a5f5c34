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
so a knob never clicks, and replay reproduces it exactly from the logged targets. A
change may instead ask for a ramp (`ramp_ms`, what a scene recall's transition uses):
the value then moves in a straight line and lands on the target exactly on schedule.
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
    ramp_ms: float = 0.0  # a straight line to the new value over this long instead (see Smoother)

    def to_json(self, step: int) -> dict:
        entry = {"step": step, "param": self.param, "value": self.value, "source": self.source}
        if self.smooth_ms:
            entry["smooth_ms"] = self.smooth_ms
        if self.ramp_ms:
            entry["ramp_ms"] = self.ramp_ms
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

    def snapshot(self) -> dict[str, float | int | str]:
        """The newest target of every parameter that has one (a scene stores this)."""
        with self._lock:
            return dict(self._latest)

    def set(self, param: str, value, source: str = "api", smooth_ms: float = 0.0,
            ramp_ms: float = 0.0) -> ControlChange:
        for what, ms in (("smoothing", smooth_ms), ("a ramp", ramp_ms)):
            if isinstance(ms, bool) or not (isinstance(ms, (int, float)) and math.isfinite(ms) and ms >= 0):
                raise ControlError(f"{what} must be a non-negative number of ms, got {ms!r}")
        change = ControlChange(param, validate(param, value, self.concepts), source, time.monotonic(),
                               float(smooth_ms), self.step_now, float(ramp_ms))
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
    Values within 1e-6 of the target snap to it, so a settled parameter costs nothing.
    A ramp instead: from the value v0 it has when the change is taken, over
    n = max(1, round(ramp_ms / frame_ms)) steps, the k-th advance (k = 1..n) gives
    v0 + (target - v0) * k / n, so the n-th lands on the target exactly. A new target
    for a parameter replaces its ramp or its smoothing, whichever it had."""

    def __init__(self, frame_ms: float = 20.0) -> None:
        self.frame_ms = frame_ms
        self.values: dict[str, float] = {}
        self.targets: dict[str, tuple[float, float]] = {}  # param -> (target, coefficient)
        self.ramps: dict[str, list] = {}  # param -> [start, target, steps, steps done]

    def set_target(self, param: str, target: float, smooth_ms: float, current: float | None = None,
                   ramp_ms: float = 0.0) -> None:
        if param not in self.values:
            self.values[param] = float(target if current is None else current)
        self.ramps.pop(param, None)
        self.targets.pop(param, None)
        if ramp_ms > 0:
            self.ramps[param] = [self.values[param], float(target), max(1, round(ramp_ms / self.frame_ms)), 0]
            return
        coef = 1.0 if smooth_ms <= 0 else 1.0 - math.exp(-self.frame_ms / smooth_ms)
        self.targets[param] = (float(target), coef)

    def advance(self) -> dict[str, float]:
        """Move every unsettled parameter one step; return those that changed."""
        changed = {}
        for param, ramp in list(self.ramps.items()):
            start, target, n, k = ramp
            ramp[3] = k = k + 1
            v = target if k >= n else start + (target - start) * k / n
            if k >= n:
                del self.ramps[param]
            self.values[param] = changed[param] = v
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
                ControlChange(e["param"], e["value"], e.get("source", "replay"), 0.0, e.get("smooth_ms", 0.0),
                              ramp_ms=e.get("ramp_ms", 0.0)))

    def take(self, step: int) -> list[ControlChange]:
        return self._by_step.pop(step, [])
