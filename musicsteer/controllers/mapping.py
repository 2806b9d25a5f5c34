"""Threading model: a `Mapping` keeps per-binding state (takeover, 14-bit MSB, held
notes) and is used by one thread at a time (the MIDI reader thread). It never blocks.

Mapping files: which MIDI knob, note or wheel sets which ControlState parameter.

A mapping is a TOML file. It turns each MIDI message into zero or more settings
`(param, value, smooth_ms)` for `ControlState.set`. Everything here is pure logic: no
ports, no threads, no clock. `MidiController` (midi.py) feeds it messages; MIDI learn
writes new `[[cc]]` bindings into the same file (`add_cc_binding`).

The format, by example (every key shown; most are optional)::

    version = 1                          # optional; the only version is 1
    prompts = [                          # prompt slots, numbered from 1
      "lofi hip hop, mellow rhodes piano",
      "ambient pads, slow and evolving",
      "drum and bass, fast breakbeats",
    ]

    [[cc]]                               # a knob or fader (Control Change)
    cc = 1                               # controller number 0..127
    channel = 1                          # MIDI channel 1..16; leave out for every channel
    bits = 7                             # 7 (default) or 14 (see "14-bit pairs")
    param = "concept/cmaj/strength"      # concept/<name>/strength, cfg, temperature, topk,
                                         # topp, or prompt_slot
    range = [0.0, 4.0]                   # value at the knob's minimum and maximum; [4.0, 0.0]
                                         # inverts the knob
    curve = "exp"                        # linear (default), exp, log, s
    shape = 4.0                          # steepness of exp, log (default 4) and s (default 2)
    smooth_ms = 40                       # ControlState smoothing, ms (default 0: jump)
    takeover = "pickup"                  # pickup (default) or jump (see "Soft takeover")

    [[cc]]                               # a 14-bit fader: MSB cc 7, LSB cc 39
    cc = 7
    bits = 14
    param = "cfg"
    range = [1.0, 8.0]

    [[cc]]                               # a knob picks a prompt slot: its travel is cut into
    cc = 20                              # len(prompts) equal buckets; takes no range, curve,
    param = "prompt_slot"                # shape, smooth_ms or takeover

    [[note]]                             # every note drives its pitch class's concept
    concept = "note_{pc}"                # {pc}: C C# D D# E F F# G G# A A# B; {pc_s}: the
                                         # same with s for # (Cs); {pc_num}: 0..11
    channel = 10                         # optional, as for cc
    notes = [36, 96]                     # lowest and highest note, inclusive (default all)
    range = [0.0, 3.0]                   # velocity 1..127 through curve, into this range
    curve = "linear"                     # (and shape), as for cc
    smooth_ms = 20
    note_off = 0.0                       # value set when the last note of that pitch class
                                         # is released, or "hold" to keep it
    mono = false                         # true: a new pitch class sets the previous one to
                                         # note_off's value (0 when "hold"): one note at a time

    [[note]]                             # one note starts a schedule on a concept
    note = 60                            # note number 0..127 (60 is middle C)
    param = "concept/cmaj/schedule"
    value = "decay:0.99"                 # a schedule spec (crossfade:gmaj:4s, linear-up:2s, ...)

    [[note]]                             # one note picks prompt slot 2
    note = 62
    param = "prompt_slot"
    value = 2

    [[note]]                             # one note, velocity as a parameter's value
    note = 64
    param = "concept/gmaj/strength"      # numeric param and no `value`: velocity through
    range = [0.0, 2.0]                   # curve into range; note_off on release

    [[note]]                             # one note recalls a scene (scenes.py) over 2 s
    note = 36
    scene = "verse"
    seconds = 2.0                        # optional: the scene's own transition otherwise

    [[note]]                             # one note is the panic: every concept to 0 at once
    note = 37
    panic = true

    [[program]]                          # a program change recalls a scene (or panic = true)
    program = 3                          # 0..127, as sent (some devices show it as 1..128)
    channel = 1                          # optional, as for cc
    scene = "chorus"
    seconds = 0.5

    [[pitchbend]]                        # the pitch wheel
    channel = 1
    param = "concept/gmaj/strength"
    range = [-2.0, 2.0]                  # the wheel's centre (8192) gives the middle exactly
    takeover = "jump"                    # default jump for the wheel (it springs back)

Defaults: `range` is the parameter's knob range in the parameter table (params.py):
[0, 1] for a concept strength, [1, 10] for cfg, [0.1, 2] for temperature, [1, 500] for
topk, [0, 1] for topp; a range must stay inside the table's limits for the parameter
(what ControlState accepts). `note_off` defaults to the parameter's default in the table
(0 for concept strengths) and to "hold" for one without (it applies only to numeric
parameters). Integer parameters (topk) are rounded. A note-on with velocity 0 is a
note-off.

Curves map the control's position x in [0, 1] to y in [0, 1]; the value is
lo + (hi - lo) * y. With k = shape:
    linear: y = x
    exp:    y = (e^(k x) - 1) / (e^k - 1)          slow start, fast end
    log:    y = ln(1 + (e^k - 1) x) / k            fast start (the inverse of exp)
    s:      y = x^k / (x^k + (1 - x)^k)            slow at both ends, y(0.5) = 0.5
Positions: 7-bit CC x = v / 127; 14-bit CC x = v / 16383; velocity x = v / 127;
pitch bend (b in -8192..8191) x = 0.5 + b / 16384 for b <= 0, 0.5 + b / 16382 for b > 0,
so the centre is exactly 0.5 and both ends reach 0 and 1.

14-bit pairs (MIDI 1.0: MSB on cc N in 0..31, LSB on cc N + 32). An MSB sets the value
to MSB * 128 at once (the receiver takes the LSB as 0, as the spec says) and the LSB
that follows completes it: MSB * 128 + LSB. An LSB alone fine-tunes the last MSB of its
channel; an LSB before any MSB is ignored. Controllers send MSB then LSB; one that sends
the LSB first loses its fine part.

Soft takeover ("pickup"). A knob's position rarely matches a parameter someone else has
set (OSC, another knob, the starting value). With pickup, a knob follows only once it
has caught the parameter's current value: it applies when its position is within 0.02
(2 % of its travel, about 2.5 steps of a 7-bit knob) of the position that gives the
current value, or when it passes through it (the previous and the new position lie on
both sides of it, or either one on it). A value outside the binding's range is caught at
the nearest end. Once caught it follows until the parameter changes from elsewhere
(the current value is no longer what this binding last set). A parameter never set
counts as its default in the table (0 for a concept strength); one without a default
is caught at once. With "jump" every
position applies at once. Prompt slots and notes have no takeover.

MIDI learn (`add_cc_binding`) writes a `[[cc]]` block in this format. The learned knob
then controls only its parameter and the parameter only that knob: the file's cc bindings
of the same parameter, or on the same controller numbers (cc, and cc + 32 for 14-bit) on
a shared channel, are replaced; the rest of the file, comments included, is kept.

Errors: a malformed file raises `MappingError` naming the file, the line and the reason
in one line ("map.toml, line 7: cc 130 is out of 0..127").

This module knows nothing of ports, JACK or tensors.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from . import params
from .bindings import (
    CURVES,
    PROMPT_SLOT,
    TAKEOVERS,
    BendBinding,
    CCBinding,
    MappingError,
    NoteBinding,
    Scale,
    SceneBinding,
)
from .mapping_toml import block_spans, parse_mapping

__all__ = ["CURVES", "PROMPT_SLOT", "TAKEOVERS", "BendBinding", "CCBinding", "Mapping", "MappingError", "NoteBinding",
           "Scale", "SceneAction", "SceneBinding", "Setting", "add_cc_binding", "bend_position", "conflicts", "format_table", "toml_value"]

PICKUP_TOLERANCE = 0.02  # of the knob's travel
HEADER = "# musicsteer MIDI mapping (format: musicsteer/controllers/mapping.py)\n"


class Setting(NamedTuple):
    param: str
    value: float | int | str
    smooth_ms: float = 0.0


class SceneAction(NamedTuple):
    """What a scene binding asks for: recall `scene` (None: panic) over `seconds`."""
    scene: str | None
    seconds: float | None = None


def bend_position(pitch: int) -> float:
    return 0.5 + pitch / 16384.0 if pitch <= 0 else 0.5 + pitch / 16382.0


# -- binding state -----------------------------------------------------------------------------

@dataclass
class _Knob:  # state of a continuous binding (cc, pitch bend)
    prev: float | None = None  # the last position seen
    sent: float | int | None = None  # the last value set
    slot: int | None = None  # prompt_slot: the last bucket
    msb: dict[int, int] = field(default_factory=dict)  # 14-bit: channel -> last MSB


@dataclass
class _Keys:  # state of a note binding
    held: dict[int, set[int]] = field(default_factory=dict)  # pitch class (or note) -> held notes
    last: int | None = None  # mono: the pitch class sounding


# -- the mapping -------------------------------------------------------------------------------

class Mapping:
    """Bindings and prompt slots; `handle(msg)` turns a mido message into settings."""

    def __init__(self, bindings=(), prompts=(), path: Path | str | None = None) -> None:
        self.bindings = tuple(bindings)
        self.prompts = tuple(prompts)
        self.path = Path(path) if path is not None else None
        self._by_cc: dict[int, list[int]] = {}
        for i, b in enumerate(self.bindings):
            if isinstance(b, CCBinding):
                self._by_cc.setdefault(b.cc, []).append(i)
                if b.lsb is not None:
                    self._by_cc.setdefault(b.lsb, []).append(i)
        self._notes = [i for i, b in enumerate(self.bindings) if isinstance(b, NoteBinding)]
        self._scenes = [b for b in self.bindings if isinstance(b, SceneBinding)]
        self._bends = [i for i, b in enumerate(self.bindings) if isinstance(b, BendBinding)]
        self.reset()

    @property
    def cc_bindings(self) -> list[CCBinding]:
        return [b for b in self.bindings if isinstance(b, CCBinding)]

    def reset(self) -> None:
        """Forget every binding's state (positions, pickups, held notes)."""
        self._state = [_Keys() if isinstance(b, (NoteBinding, SceneBinding)) else _Knob() for b in self.bindings]

    @classmethod
    def load(cls, path: Path | str, concepts=None) -> Mapping:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise MappingError(f"cannot read the mapping file ({exc})", str(path)) from None
        return cls.parse(text, path, concepts)

    @classmethod
    def parse(cls, text: str, path: Path | str = "<mapping>", concepts=None) -> Mapping:
        """Parse and check a mapping; `concepts` (names) also checks the concepts it names."""
        prompts, bindings = parse_mapping(text, str(path), frozenset(concepts) if concepts is not None else None)
        return cls(bindings, prompts, path if str(path) != "<mapping>" else None)

    def handle(self, msg, current: Callable[[str], object] | None = None) -> list[Setting | SceneAction]:
        """The settings a mido message makes, and the scene actions (SceneAction) of its scene
        bindings. `current(param)` gives a parameter's value now (ControlState.current), for
        soft takeover; without it every binding jumps."""
        kind = msg.type
        if kind == "control_change":
            return self._cc(msg.channel + 1, msg.control, msg.value, current)
        if kind == "program_change":
            return self._scene_actions("program", msg.channel + 1, msg.program)
        if kind == "note_on" and msg.velocity > 0:
            return self._scene_actions("note", msg.channel + 1, msg.note) + \
                self._note_on(msg.channel + 1, msg.note, msg.velocity)
        if kind in ("note_off", "note_on"):
            return self._note_off(msg.channel + 1, msg.note)
        if kind == "pitchwheel":
            out = []
            for i in self._bends:
                b = self.bindings[i]
                if b.channel is None or b.channel == msg.channel + 1:
                    out += self._continuous(b, self._state[i], bend_position(msg.pitch), current)
            return out
        return []

    def _scene_actions(self, kind: str, channel: int, number: int) -> list[SceneAction]:
        return [SceneAction(b.scene, b.seconds) for b in self._scenes
                if b.kind == kind and b.number == number and (b.channel is None or b.channel == channel)]

    # -- continuous controls ---------------------------------------------------------------

    def _cc(self, channel: int, control: int, value: int, current) -> list[Setting]:
        out = []
        for i in self._by_cc.get(control, ()):
            b, st = self.bindings[i], self._state[i]
            if b.channel is not None and b.channel != channel:
                continue
            if b.bits == 7:
                x = value / 127.0
            elif control == b.cc:  # MSB: the LSB counts as 0 until it comes
                st.msb[channel] = value
                x = (value << 7) / 16383.0
            else:  # LSB completes the last MSB of this channel
                msb = st.msb.get(channel)
                if msb is None:
                    continue
                x = ((msb << 7) | value) / 16383.0
            out += self._continuous(b, st, x, current)
        return out

    def _continuous(self, b, st: _Knob, x: float, current) -> list[Setting]:
        if b.param == PROMPT_SLOT:
            n = len(self.prompts)
            slot = min(int(x * n), n - 1)
            if slot == st.slot:
                return []
            st.slot = slot
            return [Setting("prompt", self.prompts[slot], 0.0)]
        value = b.scale.value(x)
        cur = _number(current(b.param), b.param) if current is not None else None  # None: no takeover
        prev, st.prev = st.prev, x
        if st.sent is not None and cur == st.sent:  # still ours: follow
            if value == st.sent:
                return []  # nothing would change (an LSB of 0 after its MSB)
        elif b.takeover == "pickup" and cur is not None and not _catches(b.scale, prev, x, cur):
            return []
        st.sent = value
        return [Setting(b.param, value, b.smooth_ms)]

    # -- notes -----------------------------------------------------------------------------

    def _note_on(self, channel: int, note: int, velocity: int) -> list[Setting]:
        out = []
        for i in self._notes:
            b, st = self.bindings[i], self._state[i]
            if b.channel is not None and b.channel != channel:
                continue
            if b.note is not None:
                if note != b.note:
                    continue
                st.held.setdefault(note, set()).add(note)
                if b.value is None:
                    out.append(Setting(b.param, b.scale.value(velocity / 127.0), b.smooth_ms))
                elif b.param == PROMPT_SLOT:
                    out.append(Setting("prompt", self.prompts[b.value - 1], 0.0))
                else:
                    out.append(Setting(b.param, b.value, b.smooth_ms if not isinstance(b.value, str) else 0.0))
                continue
            if not b.notes[0] <= note <= b.notes[1] or b.concepts[note % 12] is None:
                continue
            pc = note % 12
            if b.mono and st.last is not None and st.last != pc:
                out.append(Setting(_strength(b.concepts[st.last]), b.note_off or 0.0, b.smooth_ms))
                st.held.pop(st.last, None)
            st.last = pc
            st.held.setdefault(pc, set()).add(note)
            out.append(Setting(_strength(b.concepts[pc]), b.scale.value(velocity / 127.0), b.smooth_ms))
        return out

    def _note_off(self, channel: int, note: int) -> list[Setting]:
        out = []
        for i in self._notes:
            b, st = self.bindings[i], self._state[i]
            if b.channel is not None and b.channel != channel:
                continue
            key = note if b.note is not None else note % 12
            held = st.held.get(key)
            if held is None or note not in held:
                continue
            held.discard(note)
            if held or b.note_off is None:
                continue
            if b.note is not None:
                out.append(Setting(b.param, b.note_off, b.smooth_ms))
            elif not b.mono or st.last == key:
                out.append(Setting(_strength(b.concepts[key]), b.note_off, b.smooth_ms))
                if b.mono:
                    st.last = None
        return out

    # -- learn -----------------------------------------------------------------------------

    def with_cc(self, binding: CCBinding) -> Mapping:
        """A new mapping where `binding` replaces the cc bindings it conflicts with (see
        `conflicts`); the other bindings keep their places."""
        kept = [b for b in self.bindings if not (isinstance(b, CCBinding) and conflicts(b, binding))]
        return Mapping([*kept, binding], self.prompts, self.path)


def conflicts(old: CCBinding, new: CCBinding) -> bool:
    """MIDI learn's rule: the learned knob controls only its parameter, and the parameter
    is controlled only by the learned knob. So a learned binding replaces bindings of the
    same parameter, and bindings on any of its controller numbers on a shared channel."""
    if old.param == new.param:
        return True
    same_channel = old.channel is None or new.channel is None or old.channel == new.channel
    numbers = {old.cc, old.lsb} - {None}
    return same_channel and bool(numbers & ({new.cc, new.lsb} - {None}))


def _number(cur, param: str) -> float | None:
    """A parameter's current value for takeover; one never set counts as its default (a
    strength's 0), or as nothing to catch when it has none."""
    if cur is None:
        ref = params.find(param)
        cur = ref.param.default if ref is not None else None
    if isinstance(cur, bool) or not isinstance(cur, (int, float)):
        return None  # nothing to catch
    return float(cur)


def _catches(scale: Scale, prev: float | None, x: float, cur: float) -> bool:
    """Pickup: the knob at `x` (before at `prev`) is at or passes the position of `cur`."""
    target = scale.position(cur)
    if abs(x - target) <= PICKUP_TOLERANCE:
        return True
    return prev is not None and (prev - target) * (x - target) <= 0.0


def _strength(concept: str) -> str:
    return f"concept/{concept}/strength"


def format_table(name: str, table: dict) -> str:
    """A `[[name]]` TOML block for a flat table of numbers, strings, booleans and lists."""
    lines = [f"[[{name}]]"] + [f"{k} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"{v} cannot be written to a mapping")
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # a JSON string is a TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to a mapping")


def add_cc_binding(path: Path | str, binding: CCBinding, concepts=None) -> Mapping:
    """Write a learned binding into the mapping file at `path` (created if missing) and
    return the file's new mapping. Bindings it conflicts with (`conflicts`) are replaced:
    the new block takes the place of the first of them, else it is appended. Everything
    else in the file (other bindings, prompts, comments) is kept as written; comments
    inside a replaced block go with it. The file is replaced atomically."""
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.exists() else HEADER
    old = Mapping.parse(text, path, concepts)  # never rewrite a file we cannot read
    lines = text.splitlines(keepends=True)
    spans = block_spans(text, "cc")
    olds = old.cc_bindings
    if len(spans) != len(olds):
        raise MappingError("cannot update this file: write its cc bindings as [[cc]] tables", str(path))
    drop = [span for span, b in zip(spans, olds, strict=True) if conflicts(b, binding)]
    block = format_table("cc", binding.to_table())
    if drop:
        at = drop[0][0]
        for start, end in reversed(drop):
            del lines[start:end]
        lines.insert(at, block)
    else:
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        if lines and lines[-1].strip():
            lines.append("\n")
        lines.append(block)
    new_text = "".join(lines)
    mapping = Mapping.parse(new_text, path, concepts)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(new_text, encoding="utf-8")
    os.replace(tmp, path)
    return mapping

