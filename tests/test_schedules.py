"""Schedules against their formulas, the spec parser, and installing a schedule on a plan
(the one crossfade split render and live share)."""

import math

import pytest

from musicsteer.steering.schedules import (
    Breakpoints,
    Constant,
    Crossfade,
    ExpDecay,
    LinearDown,
    LinearUp,
    Logistic,
    ScheduleError,
    Sine,
    Started,
    apply_schedule,
    parse_schedule,
    parse_steps,
)


@pytest.mark.parametrize("t", [0, 1, 37, 100, 150, 199, 200, 400])
def test_formulas(t):
    T = 200
    assert LinearUp(T)(t) == pytest.approx(min(t / T, 1.0))
    assert LinearDown(T)(t) == pytest.approx(max(1 - t / T, 0.0))
    assert ExpDecay(0.998)(t) == pytest.approx(0.998 ** t)
    assert Logistic(T)(t) == pytest.approx(1 / (1 + math.exp(-(t - T / 2) / (T * 0.133))))
    assert Sine(T)(t) == pytest.approx(0.5 * (1 + math.sin(2 * math.pi * t / T)))
    assert Constant(0.4)(t) == 0.4


def test_breakpoints_interpolate_and_hold():
    b = Breakpoints(((10, 0.0), (20, 1.0), (40, 0.5)))
    assert [b(t) for t in (0, 10, 15, 20, 30, 40, 99)] == [0.0, 0.0, 0.5, 1.0, 0.75, 0.5, 0.5]


def test_started_shifts_time():
    s = Started(LinearUp(10), start=100)
    assert [s(t) for t in (0, 100, 105, 110, 200)] == [0.0, 0.0, 0.5, 1.0, 1.0]


def test_parse_specs():
    assert parse_schedule("linear-up:200") == LinearUp(200)
    assert parse_schedule("linear-down:4s") == LinearDown(200)
    assert parse_schedule("decay") == ExpDecay(0.998)
    assert parse_schedule("decay:0.99") == ExpDecay(0.99)
    assert parse_schedule("logistic:100") == Logistic(100)
    assert parse_schedule("sine:1.5s") == Sine(75)
    assert parse_schedule("crossfade:gmaj:300") == Crossfade("gmaj", 300)
    assert parse_schedule("points:0=0,1s=1,100=0.25") == Breakpoints(((0, 0.0), (50, 1.0), (100, 0.25)))
    assert parse_schedule("constant:0.5") == Constant(0.5)
    assert parse_steps("2s") == 100 and parse_steps("7") == 7


@pytest.mark.parametrize("spec, message", [
    ("wobble:3", "unknown schedule 'wobble'"),
    ("linear-up", "missing its length"),
    ("linear-up:0", "at least one step"),
    ("sine:abc", "not a step count"),
    ("decay:1.5", "decay rate must be in"),
    ("points:10=1,5=0", "must increase"),
    ("points:10", "STEP=VALUE"),
    ("points:1=nan", "not a finite number"),
    ("crossfade:200", "crossfade takes the other concept"),
    ("linear-up:-3", "cannot be negative"),
])
def test_bad_specs(spec, message):
    with pytest.raises(ScheduleError, match=message):
        parse_schedule(spec)


def _plan(names):
    import numpy as np

    from musicsteer.steering.plan import SteeringPlan, SteeringSettings

    return SteeringPlan(names, np.ones((len(names), 2)), SteeringSettings(), batch=2)


def test_apply_schedule_splits_a_crossfade_and_carries_the_strength():
    plan = _plan(["a", "b", "c"])
    plan.set_strength("a", 0.7)
    apply_schedule(plan, "a", parse_schedule("crossfade:b:10"))
    assert plan.schedules[:2] == [LinearDown(10), LinearUp(10)]
    assert plan.strengths[1] == pytest.approx(0.7)  # b had none: it takes a's
    plan.set_strength("c", 0.2)
    apply_schedule(plan, "b", parse_schedule("crossfade:c:4"), start=30)  # a live trigger at step 30
    assert plan.schedules[1:] == [Started(LinearDown(4), 30), Started(LinearUp(4), 30)]
    assert plan.strengths[2] == pytest.approx(0.2)  # c keeps its own
    apply_schedule(plan, "a", Sine(8), start=5)
    assert plan.schedules[0] == Started(Sine(8), 5)
    with pytest.raises(KeyError, match="no concept 'z'"):
        apply_schedule(plan, "a", Crossfade("z", 3))
    assert plan.schedules[0] == Started(Sine(8), 5)  # nothing set by the failed call


def test_render_and_live_split_a_crossfade_alike(tmp_path, tiny):
    from musicsteer.steering.pack import ConceptPack
    from musicsteer.steering.build import make_steering
    from musicsteer.steering.plan import SteeringSettings

    ConceptPack.random(["a", "b"], tiny.cfg, "tiny", seed=1).save(tmp_path / "pack")
    _, rendered = make_steering(tiny, tmp_path / "pack", {"a": 0.6}, {"a": "crossfade:b:12"}, SteeringSettings(), 2)
    live = _plan(["a", "b"])
    live.set_strength("a", 0.6)
    apply_schedule(live, "a", parse_schedule("crossfade:b:12"), start=0)
    assert [s.schedule for s in live.schedules] == rendered.schedules == [LinearDown(12), LinearUp(12)]
    assert list(live.strengths) == list(rendered.strengths) == pytest.approx([0.6, 0.6])
