"""ControlState validation, the one-pole smoother, and live schedule starts."""

import math

import pytest

from musicsteer.controllers.state import (
    ControlError,
    ControlState,
    ScriptedControls,
    Smoother,
)


def test_set_and_take_latest_per_parameter():
    cs = ControlState(["cmaj"])
    cs.set("concept/cmaj/strength", 0.2)
    cs.set("concept/cmaj/strength", 0.4, source="osc")
    cs.set("temperature", 0.9)
    changes = {c.param: c for c in cs.take(7)}
    assert changes["concept/cmaj/strength"].value == 0.4 and changes["concept/cmaj/strength"].source == "osc"
    assert changes["temperature"].value == 0.9
    assert cs.take(8) == [] and cs.generation == 3


@pytest.mark.parametrize("param, value, message", [
    ("concept/gmaj/strength", 0.1, "unknown concept 'gmaj'"),
    ("concept/cmaj/volume", 0.1, "a concept has strength and schedule"),
    ("cfg", "loud", "needs a number"),
    ("cfg", float("nan"), "finite"),
    ("temperature", float("inf"), "finite"),
    ("prompt", "", "non-empty"),
    ("bogus", 1.0, "unknown parameter"),
    ("concept/cmaj/schedule", "wobble:3", "unknown schedule"),
    ("concept/cmaj/schedule", "crossfade:dmin:10", "unknown concept 'dmin' to crossfade to"),
    ("topk", True, "needs a number"),
])
def test_bad_values_are_rejected(param, value, message):
    with pytest.raises(ControlError, match=message):
        ControlState(["cmaj"]).set(param, value)


def test_out_of_range_values_are_clamped():
    cs = ControlState(["cmaj"])
    assert cs.set("cfg", 99).value == 20.0
    assert cs.set("topk", 5000).value == 2048 and cs.set("topk", 12.6).value == 13
    assert cs.set("topp", -1).value == 0.0
    assert cs.set("concept/cmaj/strength", 1e9).value == 100.0


def test_negative_smoothing_is_rejected():
    with pytest.raises(ControlError, match="smoothing"):
        ControlState().set("cfg", 3.0, smooth_ms=-5)


def test_smoother_follows_the_one_pole_formula():
    sm = Smoother(frame_ms=20.0)
    sm.set_target("x", 1.0, smooth_ms=100.0, current=0.0)
    a = 1 - math.exp(-20 / 100)
    want, got = 0.0, []
    for _ in range(5):
        want += (1.0 - want) * a
        got.append((sm.advance()["x"], want))
    for g, w in got:
        assert g == pytest.approx(w, abs=1e-12)
    assert got[0][0] == pytest.approx(a)


def test_smoother_jumps_without_smoothing_and_settles():
    sm = Smoother()
    sm.set_target("x", 0.5, smooth_ms=0.0, current=0.0)
    assert sm.advance() == {"x": 0.5}
    assert sm.advance() == {}
    sm.set_target("y", 1.0, smooth_ms=10.0, current=0.0)
    steps = 0
    while sm.advance():
        steps += 1
    assert sm.values["y"] == 1.0 and steps < 20


def test_scripted_controls_replay_smoothing():
    sc = ScriptedControls([{"step": 3, "param": "cfg", "value": 5.0, "smooth_ms": 40.0}])
    assert sc.take(2) == []
    (change,) = sc.take(3)
    assert change.param == "cfg" and change.smooth_ms == 40.0
