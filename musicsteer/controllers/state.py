"""ControlState: the targets controllers write and the producer reads once per step.

Parameters are named by their OSC path below `/musicsteer/`:
  concept/<name>/strength (float), prompt (str), cfg (float), temperature (float),
  topk (int), topp (float).
A setter validates, stores the latest value per parameter and bumps a generation
counter: O(1), never waits on the producer. The producer calls `take(step)` once per
step and gets every change since the last call; each change takes effect at that
step and is what the control log records.

Threading model: `set` may be called from any thread (OSC server, MIDI callback,
the CLI); it holds a lock for a dict assignment only. `take` is called by the
producer thread alone. Nothing here touches tensors or blocks on I/O.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

from ..errors import MusicsteerError

NUMERIC = {"cfg": (0.0, 20.0), "temperature": (1e-3, 10.0), "topk": (0, 2048), "topp": (0.0, 1.0)}


class ControlError(MusicsteerError):
    pass


@dataclass(frozen=True)
class ControlChange:
    param: str
    value: float | int | str
    source: str = "api"
    received: float = 0.0  # time.monotonic() at arrival

    def to_json(self, step: int) -> dict:
        return {"step": step, "param": self.param, "value": self.value, "source": self.source}


def validate(param: str, value, concepts: frozenset[str] | None = None):
    """The value to store for `param`, clamped to its range; ControlError if it cannot be one."""
    if param == "prompt":
        if not isinstance(value, str) or not value.strip():
            raise ControlError("prompt must be a non-empty string")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ControlError(f"{param} needs a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ControlError(f"{param} needs a finite number, got {value}")
    if param in NUMERIC:
        lo, hi = NUMERIC[param]
        value = min(max(value, lo), hi)
        return int(round(value)) if param == "topk" else float(value)
    parts = param.split("/")
    if len(parts) == 3 and parts[0] == "concept" and parts[2] == "strength":
        if concepts is not None and parts[1] not in concepts:
            raise ControlError(f"unknown concept {parts[1]!r}; loaded: {', '.join(sorted(concepts)) or 'none'}")
        return float(min(max(value, -100.0), 100.0))
    raise ControlError(f"unknown parameter {param!r}")


class ControlState:
    def __init__(self, concepts: list[str] | None = None) -> None:
        self.concepts = frozenset(concepts) if concepts is not None else None
        self._pending: dict[str, ControlChange] = {}
        self._lock = threading.Lock()
        self.generation = 0

    def set(self, param: str, value, source: str = "api") -> ControlChange:
        change = ControlChange(param, validate(param, value, self.concepts), source, time.monotonic())
        with self._lock:
            self._pending[param] = change
            self.generation += 1
        return change

    def take(self, step: int) -> list[ControlChange]:
        """Every change since the last call, the latest per parameter (producer thread)."""
        if not self._pending:  # a racy peek is fine: a change missed now is taken next step
            return []
        with self._lock:
            pending, self._pending = self._pending, {}
        return list(pending.values())


class ScriptedControls:
    """Recorded changes replayed at the steps they took effect at (session replay)."""

    def __init__(self, entries: list[dict]) -> None:
        self._by_step: dict[int, list[ControlChange]] = {}
        for e in entries:
            self._by_step.setdefault(int(e["step"]), []).append(
                ControlChange(e["param"], e["value"], e.get("source", "replay")))

    def take(self, step: int) -> list[ControlChange]:
        return self._by_step.pop(step, [])
