"""Scenes: store and recall through the control state, a recall's ramp against its
formula on a running stream (and in replay), panic, and the scenes file (round trip,
malformed files refused with their line)."""

import numpy as np
import pytest

from musicsteer.controllers.scenes import Scene, SceneBank, SceneError, format_scenes, parse_scenes
from musicsteer.controllers.state import ControlState, Smoother
from musicsteer.live.recorder import load_session
from musicsteer.live.session import LiveRequest, replay, run_live
from musicsteer.model.sampling import SamplingSettings
from musicsteer.steering.pack import ConceptPack


def controls():
    cs = ControlState(["cmaj", "gmaj"])
    for p, v in {"cfg": 3.0, "topk": 250, "prompt": "lofi", "concept/cmaj/strength": 0.0,
                 "concept/gmaj/strength": 0.0}.items():
        cs.seed(p, v)
    return cs


def test_ramp_lands_on_the_target_after_n_steps():
    s = Smoother()
    s.set_target("cfg", 5.0, 0.0, current=1.0, ramp_ms=100.0)  # 5 steps
    got = [s.advance()["cfg"] for _ in range(5)]
    assert got == [1.0 + 4.0 * k / 5 for k in range(1, 6)]
    assert s.advance() == {}  # settled
    s.set_target("cfg", 0.0, 0.0, ramp_ms=1000.0)
    s.advance()
    s.set_target("cfg", 2.0, 0.0)  # a new target replaces the ramp
    assert s.advance() == {"cfg": 2.0} and not s.ramps


def test_store_recall_and_panic_go_through_the_control_state(tmp_path):
    cs = controls()
    bank = SceneBank.load(cs, tmp_path / "scenes.toml")
    cs.set("concept/cmaj/strength", 0.7)
    cs.set("cfg", 4.5)
    cs.set("concept/gmaj/schedule", "sine:4s")
    bank.store("verse")
    assert (tmp_path / "scenes.toml").exists()  # a store writes the file
    cs.take(0)
    cs.set("concept/cmaj/strength", 0.1)
    cs.set("cfg", 2.0)
    cs.take(1)
    bank.recall("verse", 2.0)
    changes = {c.param: c for c in cs.take(2)}
    assert changes["concept/cmaj/strength"].value == 0.7 and changes["concept/cmaj/strength"].ramp_ms == 2000.0
    assert changes["cfg"].value == 4.5 and changes["cfg"].source == "scene:verse"
    assert changes["concept/gmaj/schedule"].value == "sine:4s"  # schedules start again
    assert "prompt" not in changes  # the same prompt is not set again
    assert bank.panic() == 2
    assert {c.param: (c.value, c.ramp_ms) for c in cs.take(3)} == {
        "concept/cmaj/strength": (0.0, 0.0), "concept/gmaj/strength": (0.0, 0.0)}
    again = SceneBank.load(cs, tmp_path / "scenes.toml")  # what the store wrote reads back
    assert again.get("verse").values == bank.get("verse").values
    with pytest.raises(SceneError, match="unknown scene 'chorus'; scenes: verse"):
        bank.recall("chorus")
    with pytest.raises(SceneError, match="transition"):
        bank.recall("verse", float("nan"))


def test_scenes_file_round_trip():
    scenes = [Scene("verse", {"concept/cmaj/strength": 0.5, "cfg": 3.0, "topk": 40, "prompt": 'say "hi"'}, 1.5),
              Scene("big chorus", {"concept/gmaj/schedule": "decay:0.99"})]
    assert parse_scenes(format_scenes(scenes), concepts=frozenset(["cmaj", "gmaj"])) == scenes


@pytest.mark.parametrize("text, line, reason", [
    ('version = 1\n[scene.a]\ncfg = 2.0\n"concept/nope/strength" = 1.0\n', 4, "unknown concept 'nope'"),
    ('[scene.a]\ncfg = "high"\n', 2, "cfg needs a number"),
    ('[scene.a]\ncfg = 2.0\n\n[scene.b]\ntransition = -1\n', 5, "transition"),
    ('[scene.a]\nvolume = 1\n', 2, "unknown parameter 'volume'"),
    ('version = 2\n', 1, "version"),
    ('[scene.a]\ncfg = nan\n', 2, "finite"),
    ('[scene.a]\ncfg = 1.0\ncfg = 2.0\n', 3, "TOML syntax"),
    ('colour = 1\n', 1, "unknown key 'colour'"),
    ('\n\n[scene]\na = 1\n', 4, "must be a table"),
])
def test_a_malformed_scenes_file_is_refused_with_its_line(tmp_path, text, line, reason):
    path = tmp_path / "s.toml"
    path.write_text(text)
    with pytest.raises(SceneError) as exc:
        SceneBank.load(ControlState(["cmaj"]), path)
    assert exc.value.line == line and reason in str(exc.value) and str(exc.value).startswith(f"{path}, line {line}:")


def test_recall_on_a_stream_reaches_the_stored_values_on_schedule(tiny, tmp_path):
    """A recall over 0.5 s (25 steps) from the producer's step 10: taken at step 11, the
    k-th step after it holds v0 + (v - v0) * k / 25 and step 35 the stored value; the
    recording replays to the same tokens."""
    pack = tmp_path / "pack"
    ConceptPack.random(["cmaj", "gmaj"], tiny.cfg, "tiny", seed=1).save(pack)
    cs = ControlState(["cmaj", "gmaj"])
    bank = SceneBank(cs, [Scene("A", {"concept/cmaj/strength": 2.0, "cfg": 5.0, "concept/gmaj/strength": -1.0})])
    seen = {}

    def hook(step):  # producer thread, after the step's controls were applied
        p = holder["p"]
        seen[step] = (float(p.plan.strengths[0]), float(p.plan.strengths[1]), p.sampling.cfg)
        if step == 10:
            bank.recall("A", 0.5)

    holder = {}
    request = LiveRequest("warm lofi piano", SamplingSettings(seed=3, cfg=3.0), null="fast", seconds=1.2,
                          concepts=pack, steer={"cmaj": 0.5}, record=tmp_path / "rec", status=False)
    run_live(tiny, request, controls=cs, step_hook=hook, on_start=lambda p: holder.update(p=p))
    for k in range(0, 26):
        cmaj, gmaj, cfg = seen[10 + k]
        assert cmaj == pytest.approx(0.5 + 1.5 * k / 25, abs=1e-6)
        assert gmaj == pytest.approx(-1.0 * k / 25, abs=1e-6)
        assert cfg == pytest.approx(3.0 + 2.0 * k / 25, abs=1e-6)
    assert seen[35] == (2.0, -1.0, 5.0) and seen[50] == (2.0, -1.0, 5.0)
    _, entries, recorded = load_session(tmp_path / "rec")
    assert {e["param"]: (e["step"], e["ramp_ms"], e["source"]) for e in entries} == {
        p: (11, 500.0, "scene:A") for p in ("concept/cmaj/strength", "concept/gmaj/strength", "cfg")}
    tokens, _, _ = replay(tiny, tmp_path / "rec")
    np.testing.assert_array_equal(tokens, recorded)
