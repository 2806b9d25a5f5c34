"""Mapping files: curves, ranges, 14-bit pairs, soft takeover, notes, pitch bend, prompt
slots, errors with their lines, and MIDI learn's writer and pairing rule (no MIDI I/O)."""

import math

import mido
import pytest

from musicsteer.controllers.mapping import (
    Mapping,
    MappingError,
    Scale,
    Setting,
    add_cc_binding,
    bend_position,
)
from musicsteer.controllers.mapping_toml import cc_binding
from musicsteer.controllers.midi import MidiLearner
from musicsteer.controllers.state import ControlState

CONCEPTS = ["cmaj", "gmaj", "note_C", "note_C#", "note_E", "note_G"]


def cc(control, value, channel=1):
    return mido.Message("control_change", channel=channel - 1, control=control, value=value)


def on(note, velocity=100, channel=1):
    return mido.Message("note_on", channel=channel - 1, note=note, velocity=velocity)


def off(note, channel=1):
    return mido.Message("note_off", channel=channel - 1, note=note)


class Rig:
    """A mapping applied to a real ControlState, as MidiController does."""

    def __init__(self, text, concepts=CONCEPTS):
        self.mapping = Mapping.parse(text, "test.toml", concepts)
        self.controls = ControlState(concepts)

    def send(self, msg):
        out = self.mapping.handle(msg, self.controls.current)
        for s in out:
            self.controls.set(s.param, s.value, source="test", smooth_ms=s.smooth_ms)
        return out

    def value(self, param):
        return self.controls.current(param)


# -- curves and ranges -------------------------------------------------------------------------

def test_curve_formulas():
    e = math.e
    assert Scale(0, 1, "linear").value(0.3) == pytest.approx(0.3, abs=1e-15)
    assert Scale(0, 1, "exp", 4.0).value(0.5) == pytest.approx((e ** 2 - 1) / (e ** 4 - 1), rel=1e-12)
    assert Scale(0, 1, "log", 4.0).value(0.5) == pytest.approx(math.log(1 + (e ** 4 - 1) * 0.5) / 4, rel=1e-12)
    assert Scale(0, 1, "s", 2.0).value(0.25) == pytest.approx(0.1, rel=1e-12)
    assert Scale(0, 1, "s", 3.0).value(0.25) == pytest.approx(1 / 28, rel=1e-12)
    assert Scale(0, 1, "s", 2.0).value(0.5) == 0.5
    for curve, k in (("linear", 0.0), ("exp", 4.0), ("log", 2.5), ("s", 2.0)):
        s = Scale(-1.0, 3.0, curve, k)
        assert s.value(0.0) == pytest.approx(-1.0) and s.value(1.0) == pytest.approx(3.0)
        for x in (0.1, 0.37, 0.5, 0.93):  # position() inverts value()
            assert s.position(s.value(x)) == pytest.approx(x, abs=1e-12)


def test_cc_ranges_curves_and_inversion():
    rig = Rig("""
[[cc]]
cc = 1
param = "concept/cmaj/strength"
range = [0.0, 4.0]
takeover = "jump"
smooth_ms = 25

[[cc]]
cc = 2
param = "concept/gmaj/strength"
range = [4.0, 0.0]
takeover = "jump"

[[cc]]
cc = 3
param = "temperature"
range = [0.5, 1.5]
curve = "exp"
shape = 3.0
takeover = "jump"

[[cc]]
cc = 4
param = "topk"
range = [0, 500]
takeover = "jump"
""")
    assert rig.send(cc(1, 64)) == [Setting("concept/cmaj/strength", 4.0 * 64 / 127, 25.0)]
    assert rig.send(cc(1, 127))[0].value == 4.0
    assert rig.send(cc(2, 0))[0].value == 4.0
    assert rig.send(cc(2, 32))[0].value == pytest.approx(4.0 - 4.0 * 32 / 127, rel=1e-12)
    assert rig.send(cc(2, 127))[0].value == 0.0
    x = 100 / 127
    assert rig.send(cc(3, 100))[0].value == pytest.approx(0.5 + math.expm1(3 * x) / math.expm1(3), rel=1e-12)
    assert rig.send(cc(4, 33)) == [Setting("topk", round(500 * 33 / 127), 0.0)]
    assert isinstance(rig.value("topk"), int)
    assert rig.send(cc(5, 64)) == []  # unbound


def test_channels():
    rig = Rig('[[cc]]\ncc = 1\nchannel = 3\nparam = "cfg"\nrange = [0.0, 10.0]\ntakeover = "jump"\n')
    assert rig.send(cc(1, 127, channel=2)) == []
    assert rig.send(cc(1, 127, channel=3))[0].value == 10.0


def test_14_bit_pairs():
    rig = Rig("""
[[cc]]
cc = 7
bits = 14
param = "cfg"
range = [0.0, 16.0]
takeover = "jump"
""")
    assert rig.send(cc(39, 5)) == []  # an LSB before any MSB
    assert rig.send(cc(7, 64)) == [Setting("cfg", 16.0 * 8192 / 16383, 0.0)]  # MSB: coarse at once
    assert rig.send(cc(39, 0)) == []  # LSB 0 completes it to the same value
    assert rig.send(cc(39, 127))[0].value == pytest.approx(16.0 * 8319 / 16383, rel=1e-12)  # fine tuning
    assert rig.send(cc(7, 127))[0].value == pytest.approx(16.0 * 16256 / 16383, rel=1e-12)
    assert rig.send(cc(39, 127))[0].value == 16.0
    assert rig.send(cc(39, 1, channel=2)) == []  # channel 2 has no MSB yet


# -- soft takeover -----------------------------------------------------------------------------

PICKUP = '[[cc]]\ncc = 1\nparam = "cfg"\nrange = [0.0, 10.0]\n'


def test_pickup_from_below_and_then_follows():
    rig = Rig(PICKUP)
    rig.controls.seed("cfg", 5.0)  # the knob is at 0, the parameter at 5 (position 63.5)
    for v in (0, 20, 50, 60):
        assert rig.send(cc(1, v)) == [] and rig.value("cfg") == 5.0
    assert rig.send(cc(1, 70)) == [Setting("cfg", 700 / 127, 0.0)]  # passed 63.5: caught
    assert rig.send(cc(1, 30))[0].value == pytest.approx(300 / 127)  # follows, both ways
    assert rig.send(cc(1, 0))[0].value == 0.0


def test_pickup_from_above():
    rig = Rig(PICKUP)
    rig.controls.seed("cfg", 3.0)  # position 38.1
    for v in (127, 90, 50):
        assert rig.send(cc(1, v)) == []
    assert rig.send(cc(1, 30))[0].value == pytest.approx(300 / 127)


def test_pickup_within_tolerance_and_after_a_change_from_elsewhere():
    rig = Rig(PICKUP)
    rig.controls.seed("cfg", 5.0)
    assert rig.send(cc(1, 65))[0].value == pytest.approx(650 / 127)  # 1.5 steps away: close enough
    rig.controls.set("cfg", 9.0, source="osc")  # someone else moves it: the knob lets go
    assert rig.send(cc(1, 70)) == [] and rig.value("cfg") == 9.0
    assert rig.send(cc(1, 112))[0].value == pytest.approx(1120 / 127)  # 114.3 is within 2.5 steps


def test_pickup_outside_the_range_catches_at_the_nearest_end_and_strength_starts_at_0():
    rig = Rig(PICKUP.replace("[0.0, 10.0]", "[0.0, 4.0]") +
              '[[cc]]\ncc = 2\nparam = "concept/cmaj/strength"\nrange = [1.0, 3.0]\n')
    rig.controls.seed("cfg", 9.0)
    assert rig.send(cc(1, 100)) == []
    assert rig.send(cc(1, 126))[0].value == pytest.approx(4.0 * 126 / 127)
    assert rig.send(cc(2, 100)) == []  # never set: 0, below the range: caught at the bottom
    assert rig.send(cc(2, 1))[0].value == pytest.approx(1.0 + 2.0 / 127)


def test_jump_applies_at_once():
    rig = Rig(PICKUP + 'takeover = "jump"\n')
    rig.controls.seed("cfg", 5.0)
    assert rig.send(cc(1, 0)) == [Setting("cfg", 0.0, 0.0)]


# -- notes, pitch bend, prompt slots -----------------------------------------------------------

NOTES = """
prompts = ["calm piano", "busy drums", "warm pads"]

[[note]]
concept = "note_{pc}"
channel = 1
notes = [36, 96]
range = [0.0, 2.0]
smooth_ms = 10

[[note]]
note = 100
param = "concept/cmaj/schedule"
value = "crossfade:gmaj:4s"

[[note]]
note = 101
param = "prompt_slot"
value = 3

[[note]]
note = 102
param = "cfg"
range = [1.0, 8.0]
"""


def test_note_selects_pitch_class_concept_with_velocity_and_note_off():
    rig = Rig(NOTES)
    assert rig.send(on(60, 127)) == [Setting("concept/note_C/strength", 2.0, 10.0)]
    assert rig.send(on(61, 64)) == [Setting("concept/note_C#/strength", 2.0 * 64 / 127, 10.0)]
    assert rig.send(on(72, 32)) == [Setting("concept/note_C/strength", 2.0 * 32 / 127, 10.0)]  # C5 too
    assert rig.send(off(60)) == []  # C5 still held
    assert rig.send(on(72, 0)) == [Setting("concept/note_C/strength", 0.0, 10.0)]  # velocity 0 = off
    assert rig.send(off(61)) == [Setting("concept/note_C#/strength", 0.0, 10.0)]
    assert rig.send(on(62)) == []  # note_D is not loaded
    assert rig.send(on(30)) == [] and rig.send(on(60, channel=2)) == []  # outside notes, other channel


def test_note_hold_and_mono():
    rig = Rig('[[note]]\nconcept = "note_{pc}"\nnote_off = "hold"\nmono = true\n')
    assert rig.send(on(60, 127)) == [Setting("concept/note_C/strength", 1.0, 0.0)]
    assert rig.send(off(60)) == []  # held
    assert rig.send(on(64, 127)) == [Setting("concept/note_C/strength", 0.0, 0.0),
                                     Setting("concept/note_E/strength", 1.0, 0.0)]
    rig = Rig('[[note]]\nconcept = "note_{pc}"\nmono = true\n')
    rig.send(on(60)), rig.send(on(64))
    assert rig.send(off(60)) == []  # C already gave way to E
    assert rig.send(off(64)) == [Setting("concept/note_E/strength", 0.0, 0.0)]


def test_note_triggers_schedule_prompt_slot_and_velocity_parameter():
    rig = Rig(NOTES)
    assert rig.send(on(100)) == [Setting("concept/cmaj/schedule", "crossfade:gmaj:4s", 0.0)]
    assert rig.send(off(100)) == []
    assert rig.send(on(101)) == [Setting("prompt", "warm pads", 0.0)]
    assert rig.value("prompt") == "warm pads"
    assert rig.send(on(102, 127)) == [Setting("cfg", 8.0, 0.0)]
    assert rig.send(off(102)) == []  # cfg holds by default


def test_pitch_bend():
    rig = Rig('[[pitchbend]]\nparam = "concept/gmaj/strength"\nrange = [-2.0, 2.0]\n')
    bend = lambda p: mido.Message("pitchwheel", pitch=p)  # noqa: E731
    assert rig.send(bend(-8192)) == [Setting("concept/gmaj/strength", -2.0, 0.0)]
    assert rig.send(bend(0))[0].value == 0.0  # the centre, 8192, is exactly the middle
    assert rig.send(bend(8191))[0].value == 2.0
    assert rig.send(bend(4096))[0].value == pytest.approx(2.0 * (bend_position(4096) * 2 - 1))


def test_prompt_slot_knob_buckets():
    rig = Rig(NOTES + '[[cc]]\ncc = 9\nparam = "prompt_slot"\n')
    assert rig.send(cc(9, 0)) == [Setting("prompt", "calm piano", 0.0)]
    assert rig.send(cc(9, 42)) == []  # still the first third: no repeat
    assert rig.send(cc(9, 43)) == [Setting("prompt", "busy drums", 0.0)]
    assert rig.send(cc(9, 127)) == [Setting("prompt", "warm pads", 0.0)]


def test_example_in_the_docstring_parses():
    import musicsteer.controllers.mapping as module

    doc = module.__doc__.split("::\n\n")[1].split("\nDefaults:")[0]
    text = "\n".join(line[4:] for line in doc.splitlines())
    m = Mapping.parse(text, "example.toml", CONCEPTS)
    assert len(m.bindings) == 11  # 8, and the two scene notes and a program change and len(m.prompts) == 3


# -- errors ------------------------------------------------------------------------------------

GOOD = '[[cc]]\ncc = 1\nparam = "cfg"\n'


@pytest.mark.parametrize("text, line, reason", [
    ('prompts = ["a"]\n[[cc]]\ncc = = 1\n', 3, "TOML syntax: Invalid value (column 6)"),
    ('[[cc]]\ncc = 1\nparam = "cfg\n', 3, "TOML syntax"),
    ("\n\n[[cc]]\nparam = \"cfg\"\ncc = 130\n", 5, "cc 130 is out of 0..127"),
    (GOOD + "\n[[cc]]\ncc = 40\nbits = 14\nparam = \"cfg\"\n", 6, "a 14-bit cc is its MSB, 0..31"),
    (GOOD + "range = [1]\n", 4, "range must be two numbers [lo, hi]"),
    (GOOD + "range = [1, \"x\"]\n", 4, "range must be two numbers"),
    (GOOD + "range = [0.0, 30.0]\n", 4, "range 30 is outside what cfg accepts (0..20)"),
    (GOOD + "curve = \"cubic\"\n", 4, "unknown curve 'cubic'; known: linear, exp, log, s"),
    (GOOD + "shape = 2.0\n", 4, "shape applies to the exp, log and s curves"),
    (GOOD + "takeover = \"soft\"\n", 4, "unknown takeover 'soft'; known: pickup, jump"),
    (GOOD + "rnage = [0, 1]\n", 4, "unknown key 'rnage' in [[cc]]"),
    (GOOD + "channel = 0\n", 4, "channel 0 is out of 1..16"),
    ('[[cc]]\ncc = 1\n\nparam = "volume"\n', 4, "unknown parameter 'volume'"),
    ('[[cc]]\ncc = 1\nparam = "concept/dmin/strength"\n', 3, "unknown concept 'dmin'"),
    ('[[cc]]\ncc = 1\nparam = "prompt_slot"\n', 3, "prompt_slot needs prompts"),
    ('[[cc]]\ncc = 1\nparam = "prompt"\n', 3, "bind prompt_slot"),
    ('[[cc]]\ncc = 1\nparam = "concept/cmaj/schedule"\n', 3, "takes a schedule spec"),
    ('[[cc]]\nparam = "cfg"\n', 1, "[[cc]] needs cc = N"),
    ('[cc]\ncc = 1\nparam = "cfg"\n', 1, "write [[cc]] for each binding"),
    ('# a comment\nmidi = 1\n', 2, "unknown key 'midi'"),
    (GOOD + '\n[[note]]\nchannel = 1\n', 5, "needs either note = N"),
    ('[[note]]\nconcept = "note"\n', 2, "has no {pc}"),
    ('[[note]]\nconcept = "chord_{root}"\n', 2, "unknown placeholder {root}"),
    ('[[note]]\nconcept = "key_{pc}"\n', 2, "names no loaded concept"),
    ('prompts = ["a", "b"]\n[[note]]\nnote = 60\nparam = "prompt_slot"\nvalue = 3\n', 5,
     "value must be a prompt slot 1..2"),
    ('[[note]]\nnote = 60\nparam = "concept/cmaj/schedule"\nvalue = "wobble:3"\n', 4, "unknown schedule 'wobble'"),
    ('[[note]]\nnote = 128\nparam = "cfg"\n', 2, "note 128 is out of 0..127"),
    ('[[pitchbend]]\nparam = "cfg"\nsmooth_ms = -5\n', 3, "smooth_ms must not be negative"),
    ('[[note]]\nnote = 36\nscene = "a"\npanic = true\n', 4, "either scene = \"NAME\""),
    ('[[note]]\nnote = 36\nscene = ""\n', 3, "scene must be a scene's name"),
    ('[[note]]\nnote = 36\nscene = "a"\nseconds = 900\n', 4, "seconds must be in 0..600"),
    ('[[note]]\nnote = 36\npanic = true\nseconds = 1\n', 4, "seconds does not apply to the panic"),
    ('[[note]]\nnote = 36\nscene = "a"\nrange = [0, 1]\n', 4, "range does not apply to a note that recalls"),
    ('[[note]]\nnote = 36\nparam = "cfg"\nseconds = 1\n', 4, "seconds applies to a note that recalls a scene"),
    ('[[program]]\nscene = "a"\n', 1, "[[program]] needs program = N"),
    ('[[program]]\nprogram = 200\nscene = "a"\n', 2, "program 200 is out of 0..127"),
    ('[[program]]\nprogram = 1\npanic = false\n', 3, "panic must be true"),
    ('[[program]]\nprogram = 1\nscene = "a"\nparam = "cfg"\n', 4, "unknown key 'param' in [[program]]"),
])
def test_malformed_files_name_the_line_and_reason(text, line, reason):
    with pytest.raises(MappingError) as info:
        Mapping.parse(text, "live.toml", CONCEPTS)
    err = info.value
    assert err.line == line, str(err)
    assert reason in str(err)
    assert str(err).startswith(f"live.toml, line {line}: ") and "\n" not in str(err)


def test_load_names_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[[cc]]\ncc = 1\nparam = "cfg"\ntakeover = "later"\n')
    with pytest.raises(MappingError, match=rf"^{path}, line 4: unknown takeover 'later'"):
        Mapping.load(path)
    with pytest.raises(MappingError, match="cannot read"):
        Mapping.load(tmp_path / "missing.toml")


def test_lines_are_found_past_multiline_arrays_and_strings():
    text = ('prompts = [\n  "a [bracket",\n  """x = 1\n[[cc]]""",\n]\n'
            '[[cc]]\ncc = 1\nparam = "cfg"\n\n[[cc]]  # second\ncc = 2\nparam = "cfg"\ncurve = "bad"\n')
    with pytest.raises(MappingError) as info:
        Mapping.parse(text)
    assert info.value.line == 13


# -- MIDI learn: writer and pairing ------------------------------------------------------------

EXISTING = """# my live set
prompts = ["calm piano"]

# the big knob
[[cc]]
cc = 1
param = "concept/cmaj/strength"  # C major
range = [0.0, 2.0]

# the fader
[[cc]]
cc = 7
param = "cfg"

[[note]]
concept = "note_{pc}"
"""


def test_learned_binding_round_trips_through_the_file(tmp_path):
    path = tmp_path / "map.toml"
    path.write_text(EXISTING)
    binding = cc_binding({"cc": 21, "channel": 3, "bits": 7, "param": "concept/gmaj/strength", "range": [0.5, -0.5],
                          "curve": "s", "shape": 3.0, "smooth_ms": 30.0, "takeover": "jump"}, (), CONCEPTS)
    mapping = add_cc_binding(path, binding, CONCEPTS)
    text = path.read_text()
    assert text.startswith(EXISTING)  # everything kept, comments included
    again = Mapping.load(path, CONCEPTS)
    learned = [b for b in again.cc_bindings if b.cc == 21]
    assert len(again.cc_bindings) == 3 and len(learned) == 1
    assert learned[0] == binding.__class__(**{**binding.__dict__, "line": learned[0].line})
    assert mapping.cc_bindings == again.cc_bindings


def test_learning_replaces_the_same_parameter_and_the_same_knob_in_place(tmp_path):
    path = tmp_path / "map.toml"
    path.write_text(EXISTING)
    # cfg moves from cc 7 to the 14-bit pair 1/33, which also takes cc 1 from cmaj
    new = cc_binding({"cc": 1, "bits": 14, "param": "cfg", "range": [1.0, 9.0]})
    add_cc_binding(path, new)
    text = path.read_text()
    mapping = Mapping.load(path)
    assert [(b.cc, b.bits, b.param) for b in mapping.cc_bindings] == [(1, 14, "cfg")]
    assert "# the big knob\n[[cc]]\ncc = 1\nbits = 14\nparam = \"cfg\"" in text
    assert "# the fader\n\n[[note]]" in text and "C major" not in text
    assert len(mapping.bindings) == 2  # the note binding stays


def test_learning_creates_a_new_file(tmp_path):
    path = tmp_path / "new.toml"
    add_cc_binding(path, cc_binding({"cc": 5, "param": "topk", "range": [10, 400]}))
    (b,) = Mapping.load(path).cc_bindings
    assert (b.cc, b.param, b.scale.lo, b.scale.hi, b.takeover) == (5, "topk", 10.0, 400.0, "pickup")


def test_learner_pairs_msb_and_lsb_within_the_window(tmp_path):
    path = tmp_path / "map.toml"
    learner = MidiLearner(path, pair_window_s=0.1)
    learner.arm("cfg", range=(0.0, 10.0))
    assert learner.feed(cc(3, 64, channel=2), now=10.0) is None  # an MSB candidate
    mapping = learner.feed(cc(35, 0, channel=2), now=10.01)  # its LSB
    assert learner.wait(0) == mapping.cc_bindings[0]
    b = learner.binding
    assert (b.cc, b.bits, b.channel, b.param) == (3, 14, 2, "cfg") and not learner.armed

    learner.arm("temperature")
    learner.feed(cc(3, 10), now=20.0)
    assert learner.poll(now=20.05) is None  # still waiting for an LSB
    assert learner.poll(now=20.2) is not None  # none came: 7-bit
    assert (learner.binding.cc, learner.binding.bits) == (3, 7)
    learner.arm("topp", any_channel=True)
    learner.feed(cc(40, 10), now=30.0)  # above 31: 7-bit at once
    assert (learner.binding.cc, learner.binding.channel) == (40, None)
    learner.arm("cfg", bits=14)
    assert learner.feed(cc(40, 1), now=40.0) is None and learner.armed  # not an MSB
    learner.feed(cc(4, 1), now=40.0)
    assert learner.feed(cc(36, 1), now=40.05) is not None and learner.binding.bits == 14
    params = {b.param: (b.cc, b.bits) for b in Mapping.load(path).cc_bindings}
    assert params == {"cfg": (4, 14), "temperature": (3, 7), "topp": (40, 7)}


def test_learner_rejects_bad_options_when_armed(tmp_path):
    learner = MidiLearner(tmp_path / "map.toml", concepts=CONCEPTS)
    with pytest.raises(MappingError, match="unknown curve"):
        learner.arm("cfg", curve="cubic")
    with pytest.raises(MappingError, match="unknown concept 'dmin'"):
        learner.arm("concept/dmin/strength")
    with pytest.raises(MappingError, match="prompt_slot needs prompts"):
        learner.arm("prompt_slot")
    assert not learner.armed


def test_scene_bindings_turn_notes_and_program_changes_into_scene_actions():
    from musicsteer.controllers.mapping import SceneAction

    m = Mapping.parse('[[note]]\nnote = 36\nscene = "verse"\nseconds = 2.0\n\n[[note]]\nnote = 37\npanic = true\n\n'
                      '[[program]]\nprogram = 3\nchannel = 2\nscene = "chorus"\n\n'
                      '[[note]]\nnote = 36\nparam = "cfg"\nvalue = 4.0\n', concepts=CONCEPTS)
    assert m.handle(mido.Message("note_on", note=36, velocity=90)) == [SceneAction("verse", 2.0),
                                                                        Setting("cfg", 4.0, 0.0)]
    assert m.handle(mido.Message("note_on", note=37, velocity=90)) == [SceneAction(None, None)]
    assert m.handle(mido.Message("note_off", note=37)) == []
    assert m.handle(mido.Message("program_change", program=3, channel=1)) == [SceneAction("chorus", None)]
    assert m.handle(mido.Message("program_change", program=3, channel=0)) == []
