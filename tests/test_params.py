"""The parameter table: its entries are checked, every engine parameter the controllers set
is in it, and one entry is all a new parameter needs (ControlState, OSC, mapping files,
the producer and the session's starting values all follow it)."""

import ast
import dataclasses
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from musicsteer.controllers import params
from musicsteer.controllers.mapping import Mapping, MappingError
from musicsteer.controllers.osc import OscError, OscRouter
from musicsteer.controllers.params import PARAMS, ControlError, Param
from musicsteer.controllers.state import ControlState
from musicsteer.live.session import LiveRequest, run_live, seed_controls
from musicsteer.model.sampling import SamplingSettings
from musicsteer.steering.pack import ConceptPack

ME = ("127.0.0.1", 9)
# SamplingSettings fields a session keeps from its start (--greedy, --seed): no live parameter
FIXED_FOR_A_SESSION = {"greedy", "seed"}
OSC_COMMANDS = {"get", "listen", "learn", "concepts", "stats", "error", "listening", "meter", "scene", "panic"}


def test_the_table_lists_todays_parameters():
    slots = [name for n in range(1, params.PROMPT_SLOTS + 1) for name in (f"prompt/{n}", f"prompt/{n}/weight")]
    assert [p.name for p in PARAMS] == ["prompt", "cfg", "temperature", "topk", "topp", "concept/<name>/strength",
                                        "concept/<name>/schedule", *slots, "prompt/morph"]
    assert params.find("concept/cmaj/strength") == params.ParamRef(PARAMS.params[5], "concept/cmaj/strength", "cmaj")
    assert params.find("concept//strength") is None and params.find("concept/a/b/strength") is None
    assert params.find("volume") is None
    assert params.family("concept/cmaj/volume") == ("concept", ["strength", "schedule"])


def test_every_live_sampling_setting_is_in_the_table():
    """Each SamplingSettings field is a table entry (the OSC-settable engine parameters),
    or kept for the whole session; each sampling entry names a real field."""
    fields = {f.name for f in dataclasses.fields(SamplingSettings)}
    in_table = {p.field for p in PARAMS if p.target == "sampling"}
    assert in_table <= fields
    assert fields - FIXED_FOR_A_SESSION == in_table


def documented_addresses() -> set[str]:
    """Paths below /musicsteer/ that osc.py's docstring and docs/osc.md say take a value."""
    import musicsteer.controllers.osc as osc_module

    found = set(re.findall(r"/musicsteer/([a-z<>/]+) [fis]", osc_module.__doc__))
    doc = Path(__file__).resolve().parents[1] / "docs" / "osc.md"
    if doc.exists():
        for line in doc.read_text().splitlines():
            cells = line.split("|")
            if line.startswith("| `/musicsteer/") and len(cells) > 3 and cells[2].strip():
                found |= set(re.findall(r"`/(?:musicsteer/)?([a-z<>/]+)`", cells[1]))
    return found


def test_every_settable_osc_address_is_in_the_table():
    """The addresses the OSC docs list with a value resolve to table entries, and every
    entry is settable over OSC."""
    settable = {a for a in documented_addresses() if a.split("/")[0] not in OSC_COMMANDS}
    assert {"cfg", "temperature", "topk", "topp", "prompt", "concept/<name>/strength",
            "concept/<name>/schedule"} <= settable
    for address in sorted(settable):
        assert params.find(address.replace("<name>", "cmaj").replace("<n>", "2")) is not None, \
            f"/musicsteer/{address} is not in the parameter table"
    router = OscRouter(ControlState(["cmaj"]), ["cmaj"])
    for p in PARAMS:
        assert p.parts[0] not in OSC_COMMANDS
        value = p.example if not p.numeric else p.knob[1]
        assert router.handle(f"/musicsteer/{p.path('cmaj')}", [value], ME) == []


def test_validation_follows_the_table():
    for p in PARAMS:
        if p.numeric:
            path = p.path("cmaj")
            lo, hi = p.limits
            assert params.validate(path, hi * 10 + 1) == p.coerce(hi)
            assert params.validate(path, lo - 10) == p.coerce(lo)
            assert type(params.validate(path, 1)) is p.type
    with pytest.raises(ControlError, match="unknown concept 'x'; loaded: cmaj"):
        params.validate("concept/x/strength", 1.0, frozenset({"cmaj"}))
    with pytest.raises(ControlError, match="unknown parameter 'concept/cmaj/volume'; a concept has strength and "
                                           "schedule"):
        params.validate("concept/cmaj/volume", 1.0)


NUMBER = {"type": float, "limits": (0, 1), "knob": (0, 1)}


@pytest.mark.parametrize("entry, message", [
    ({**NUMBER, "name": "x", "target": "sampling", "field": "x", "knob": (0, 2)}, "outside the limits"),
    ({**NUMBER, "name": "x", "target": "sampling"}, "a field is given"),
    ({**NUMBER, "name": "x", "target": "volume"}, "unknown target"),
    ({"name": "x", "type": str, "target": "prompt"}, "a string has a check"),
    ({"name": "x", "type": str, "target": "strength", "check": params.non_empty_text}, "take numbers"),
    ({**NUMBER, "name": "x", "target": "strength"}, "per concept"),
    ({**NUMBER, "name": "a/<name>/<name>", "target": "strength"}, "one <name>"),
    ({"name": "x", "type": bool, "target": "sampling", "field": "greedy"}, "float, int or str"),
])
def test_malformed_entries_are_refused(entry, message):
    with pytest.raises(ValueError, match=message):
        Param(**entry)


def test_a_name_is_listed_once():
    with pytest.raises(ValueError, match="listed twice: cfg"):
        PARAMS.with_param(PARAMS.params[1])


def test_mapping_docstring_states_the_table_s_default_ranges():
    import musicsteer.controllers.mapping as module

    doc = " ".join(module.__doc__.split("\nDefaults:")[1].split("\n\n")[0].split())
    stated = re.findall(r"\[([\d.]+), ([\d.]+)\] for (?:a concept )?(\w+)", doc)
    assert {name for _, _, name in stated} == {"strength", "cfg", "temperature", "topk", "topp"}
    for lo, hi, name in stated:
        path = "concept/c/strength" if name == "strength" else name
        assert params.default_range(path) == (float(lo), float(hi)), name


def test_controllers_import_no_torch():
    modules = sorted(p.stem for p in (Path(params.__file__).parent).glob("*.py") if p.stem != "__init__")
    code = ("import sys\n" + "".join(f"import musicsteer.controllers.{m}\n" for m in modules)
            + "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('musicsteer.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    loaded = ast.literal_eval(out)
    assert "torch" not in loaded
    assert not [m for m in loaded if m.startswith(("musicsteer.live", "musicsteer.model.", "musicsteer.steering."))
                and m != "musicsteer.model.config"], loaded


# -- the engine follows the table -------------------------------------------------------------------

PROMPT = "warm lofi piano"


def engine_values(tiny, tmp_path, settings: dict):
    """Run a short live session with `settings` set before it starts; the producer after it."""
    pack = tmp_path / "pack"
    if not pack.exists():
        ConceptPack.random(["cmaj", "gmaj"], tiny.cfg, "tiny", seed=1).save(pack)
    controls = ControlState(["cmaj", "gmaj"])
    for path, value in settings.items():
        controls.set(path, value)
    held = []

    def built(step):  # the prompts are built off this thread: hold step 2 until they are
        deadline = time.monotonic() + 30
        while step == 2 and held[0].prompt_worker.pending and time.monotonic() < deadline:
            time.sleep(0.005)

    request = LiveRequest(PROMPT, SamplingSettings(seed=3), null="fast", seconds=0.2, concepts=pack, status=False,
                          prompt_slots=params.PROMPT_SLOTS)
    result = run_live(tiny, request, controls, on_start=held.append, step_hook=built)
    assert result.stats.error is None
    return held[0]


def test_every_entry_reaches_the_engine(tiny, tmp_path):
    from musicsteer.steering.schedules import ExpDecay, Started

    settings = {}
    for p in PARAMS:
        path = p.path("gmaj")
        settings[path] = p.example if not p.numeric else p.coerce((p.knob[0] + 2 * p.knob[1]) / 3)
    producer = engine_values(tiny, tmp_path, settings)
    for p in PARAMS:
        want = settings[p.path("gmaj")]
        if p.target == "sampling":
            assert getattr(producer.sampling, p.field) == pytest.approx(want), p.name
        elif p.target == "strength":
            assert producer.plan.strengths[producer.plan.concept("gmaj")] == pytest.approx(want)
        elif p.target == "prompt":  # `prompt` is slot 1, as is prompt/1, which was set after it
            assert producer.engine.prompts[p.slot - 1] == (settings["prompt/1"] if p.slot == 1 else want), p.name
        elif p.target == "weight":  # prompt/morph, taken after the slots' weights, sets slots 1 and 2
            w = producer.engine.weights
            if p.slot is None:
                assert w[1] / (w[0] + w[1]) == pytest.approx(want)
            elif p.slot > 2:
                assert w[p.slot - 1] == 0.0
        else:
            schedule = producer.plan.schedules[producer.plan.concept("gmaj")]
            assert isinstance(schedule, Started) and schedule.schedule == ExpDecay(0.99) and schedule.start == 0


GUIDANCE = Param("guidance", float, "sampling", field="cfg", limits=(0.0, 12.0), knob=(2.0, 6.0), smoothed=True)


def test_one_entry_is_all_a_new_parameter_needs(tiny, tmp_path, monkeypatch):
    """Without the entry every controller refuses `guidance`; with it (and nothing else),
    ControlState clamps it, OSC sets and gets it, a mapping binds it with its knob range and
    limits, the session seeds it and the producer applies it."""
    cs = ControlState()
    with pytest.raises(ControlError, match="unknown parameter 'guidance'"):
        cs.set("guidance", 4.0)
    with pytest.raises(OscError, match="unknown address"):
        OscRouter(cs, []).handle("/musicsteer/guidance", [4.0], ME)
    with pytest.raises(MappingError, match="unknown parameter 'guidance'"):
        Mapping.parse('[[cc]]\ncc = 1\nparam = "guidance"\n')

    monkeypatch.setattr(params, "PARAMS", PARAMS.with_param(GUIDANCE))
    cs = ControlState()
    assert cs.set("guidance", 99).value == 12.0
    router = OscRouter(cs, [], smooth_ms=30.0)
    assert router.handle("/musicsteer/guidance", [5], ME) == []
    assert router.handle("/musicsteer/get/guidance", [], ME) == [("/musicsteer/guidance", [5.0])]
    assert {c.param: (c.value, c.smooth_ms) for c in cs.take(0)} == {"guidance": (5.0, 30.0)}
    (b,) = Mapping.parse('[[cc]]\ncc = 1\nparam = "guidance"\n').bindings
    assert (b.scale.lo, b.scale.hi) == (2.0, 6.0)
    with pytest.raises(MappingError, match=r"range 20 is outside what guidance accepts \(0..12\)"):
        Mapping.parse('[[cc]]\ncc = 1\nparam = "guidance"\nrange = [0, 20]\n')

    seeded = ControlState(["cmaj"])
    seed_controls(seeded, LiveRequest(PROMPT, SamplingSettings(cfg=4.5)), ["cmaj"])
    assert seeded.current("guidance") == 4.5 and seeded.current("concept/cmaj/strength") == 0.0

    producer = engine_values(tiny, tmp_path, {"guidance": 7.25})
    assert producer.sampling.cfg == 7.25
