"""Schedules: a concept's strength multiplier as a function of the step (one step =
one 20 ms frame). The MusicRFM schedules, a crossfade between two concepts, and
piecewise-linear breakpoints. Values are plain floats; schedules are immutable.

Spec strings (`--schedule NAME=SPEC`, OSC and mapping files use the same):
  constant[:V]   linear-up:T   linear-down:T   decay[:RATE]   logistic:T   sine:T
  crossfade:OTHER:T   points:STEP=V,STEP=V,...
T and STEP are steps, or seconds with an `s` suffix (`4s` = 200 steps).
`apply_schedule` installs a parsed schedule on a plan (render flags and live triggers
both go through it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..model.config import FRAME_RATE


class ScheduleError(ValueError):
    pass


@dataclass(frozen=True)
class Constant:
    value: float = 1.0

    def __call__(self, t: int) -> float:
        return self.value


@dataclass(frozen=True)
class LinearUp:
    T: int

    def __call__(self, t: int) -> float:
        return min(max(t / self.T, 0.0), 1.0)


@dataclass(frozen=True)
class LinearDown:
    T: int

    def __call__(self, t: int) -> float:
        return min(max(1.0 - t / self.T, 0.0), 1.0)


@dataclass(frozen=True)
class ExpDecay:
    rate: float = 0.998

    def __call__(self, t: int) -> float:
        return self.rate ** max(t, 0)


@dataclass(frozen=True)
class Logistic:
    T: int

    def __call__(self, t: int) -> float:
        z = -(t - self.T / 2) / (self.T * 0.133)
        return 1.0 / (1.0 + math.exp(min(z, 700.0)))


@dataclass(frozen=True)
class Sine:
    T: int

    def __call__(self, t: int) -> float:
        return 0.5 * (1.0 + math.sin(2.0 * math.pi * t / self.T))


@dataclass(frozen=True)
class Breakpoints:
    points: tuple[tuple[int, float], ...]  # (step, value), steps increasing; held flat outside

    def __call__(self, t: int) -> float:
        pts = self.points
        if t <= pts[0][0]:
            return pts[0][1]
        for (t0, v0), (t1, v1) in zip(pts, pts[1:]):
            if t <= t1:
                return v0 + (v1 - v0) * (t - t0) / (t1 - t0)
        return pts[-1][1]


@dataclass(frozen=True)
class Started:
    """A schedule started at step `start` (live triggers): φ(t - start), φ(0) before it."""
    schedule: object
    start: int

    def __call__(self, t: int) -> float:
        return self.schedule(max(t - self.start, 0))


@dataclass(frozen=True)
class Crossfade:
    """Parsed `crossfade:OTHER:T` on concept A: A follows LinearDown(T), OTHER LinearUp(T)."""
    other: str
    T: int


def apply_schedule(plan, name: str, schedule, start: int | None = None) -> None:
    """Give concept `name` of `plan` (a SteeringPlan) its schedule, from step 0 or, for a live
    trigger, from step `start`. A `Crossfade` is split here, the one place: `name` follows
    LinearDown(T) and the other concept LinearUp(T), both from the same step, and the other
    takes `name`'s strength when it has none of its own (a crossfade carries one strength
    across). An unknown concept is a KeyError before anything is set."""
    def started(s):
        return s if start is None else Started(s, start)

    k = plan.concept(name)
    if not isinstance(schedule, Crossfade):
        plan.set_schedule(name, started(schedule))
        return
    other = plan.concept(schedule.other)
    plan.set_schedule(name, started(LinearDown(schedule.T)))
    plan.set_schedule(schedule.other, started(LinearUp(schedule.T)))
    if plan.strengths[other] == 0.0:
        plan.set_strength(schedule.other, float(plan.strengths[k]))


def parse_steps(text: str) -> int:
    text = text.strip()
    try:
        steps = round(float(text[:-1]) * FRAME_RATE) if text.endswith("s") else int(text)
    except ValueError:
        raise ScheduleError(f"{text!r} is not a step count or seconds (like 200 or 4s)") from None
    if steps < 0:
        raise ScheduleError(f"{text!r}: steps cannot be negative")
    return steps


def _length(text: str) -> int:
    steps = parse_steps(text)
    if steps == 0:
        raise ScheduleError("a schedule's length must be at least one step")
    return steps


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ScheduleError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise ScheduleError(f"{text!r} is not a finite number")
    return value


def parse_schedule(spec: str):
    """A spec string -> a schedule (or a `Crossfade` for the caller to split in two)."""
    kind, _, rest = spec.strip().partition(":")
    args = rest.split(":") if rest else []
    try:
        if kind == "constant":
            return Constant(_number(args[0]) if args else 1.0)
        if kind == "linear-up":
            return LinearUp(_length(args[0]))
        if kind == "linear-down":
            return LinearDown(_length(args[0]))
        if kind == "decay":
            rate = _number(args[0]) if args else 0.998
            if not 0.0 < rate <= 1.0:
                raise ScheduleError(f"decay rate must be in (0, 1], got {rate}")
            return ExpDecay(rate)
        if kind == "logistic":
            return Logistic(_length(args[0]))
        if kind == "sine":
            return Sine(_length(args[0]))
        if kind == "crossfade":
            if len(args) != 2 or not args[0]:
                raise ScheduleError("crossfade takes the other concept and a length: crossfade:OTHER:T")
            return Crossfade(args[0], _length(args[1]))
        if kind == "points":
            return _breakpoints(rest)
    except IndexError:
        raise ScheduleError(f"schedule {spec!r} is missing its length (like {kind}:200 or {kind}:4s)") from None
    raise ScheduleError(f"unknown schedule {kind!r}; known: constant, linear-up, linear-down, decay, logistic, "
                        f"sine, crossfade, points")


def _breakpoints(text: str) -> Breakpoints:
    points = []
    for item in filter(None, text.split(",")):
        step, eq, value = item.partition("=")
        if not eq:
            raise ScheduleError(f"breakpoint {item!r} should look like STEP=VALUE")
        points.append((parse_steps(step), _number(value)))
    if not points:
        raise ScheduleError("points: needs at least one STEP=VALUE")
    steps = [p[0] for p in points]
    if steps != sorted(set(steps)):
        raise ScheduleError(f"breakpoint steps must increase: {steps}")
    return Breakpoints(tuple(points))
