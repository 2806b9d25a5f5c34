"""Threading model: plain immutable values and pure functions, shared freely between
threads (the MIDI reader uses them, MIDI learn builds them on another); nothing here
holds state or blocks.

Mapping bindings as values: which MIDI control sets which parameter, through what scale.

`Scale` turns a control position into a parameter value (a curve into a range);
`CCBinding`, `NoteBinding`, `SceneBinding` and `BendBinding` are one binding each, as a mapping file
declares it (mapping.py documents the format, mapping_toml.py reads it);
`check_param` is the rule for which parameters of the table (params.py) a binding may
set. This module knows nothing of ports, files or tensors.
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass

from ..errors import MusicsteerError
from . import params
from .params import ControlError

PITCH_CLASSES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
PROMPT_SLOT = "prompt_slot"  # a binding's pseudo-parameter: it picks one of the mapping's prompts
CURVES = {"linear": None, "exp": 4.0, "log": 4.0, "s": 2.0}  # curve -> default shape
TAKEOVERS = ("pickup", "jump")


class MappingError(MusicsteerError):
    def __init__(self, reason: str, path: str | None = None, line: int | None = None) -> None:
        where = f"{path}, line {line}: " if path is not None and line is not None else f"{path}: " if path else ""
        super().__init__(where + reason)
        self.path, self.line, self.reason = path, line, reason


# -- curves and scales -------------------------------------------------------------------------

@dataclass(frozen=True)
class Scale:
    """A control position x in [0, 1] -> a parameter value, through a curve into a range."""
    lo: float
    hi: float
    curve: str = "linear"
    shape: float = 0.0
    integer: bool = False  # an int parameter (topk): values round

    def shaped(self, x: float) -> float:
        k = self.shape
        if self.curve == "exp":
            return math.expm1(k * x) / math.expm1(k)
        if self.curve == "log":
            return math.log1p(math.expm1(k) * x) / k
        if self.curve == "s":
            a, b = x ** k, (1.0 - x) ** k
            return a / (a + b)
        return x

    def unshaped(self, y: float) -> float:
        """The inverse of `shaped`."""
        k = self.shape
        if self.curve == "exp":
            return math.log1p(math.expm1(k) * y) / k
        if self.curve == "log":
            return math.expm1(k * y) / math.expm1(k)
        if self.curve == "s":
            a, b = y ** (1.0 / k), (1.0 - y) ** (1.0 / k)
            return a / (a + b)
        return y

    def value(self, x: float) -> float | int:
        v = self.lo + (self.hi - self.lo) * self.shaped(min(max(x, 0.0), 1.0))
        return int(round(v)) if self.integer else v

    def position(self, value: float) -> float:
        """The position whose value is `value`, a value outside the range clamped to its end."""
        y = min(max((value - self.lo) / (self.hi - self.lo), 0.0), 1.0)
        return self.unshaped(y)


# -- bindings ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class CCBinding:
    cc: int
    param: str
    scale: Scale | None  # None for prompt_slot
    channel: int | None = None  # 1..16, None = any
    bits: int = 7
    smooth_ms: float = 0.0
    takeover: str = "pickup"
    line: int = 0

    @property
    def lsb(self) -> int | None:
        return self.cc + 32 if self.bits == 14 else None

    def to_table(self) -> dict:
        """The binding as the TOML table that describes it (what MIDI learn writes)."""
        t: dict = {"cc": self.cc}
        if self.channel is not None:
            t["channel"] = self.channel
        t["bits"] = self.bits
        t["param"] = self.param
        if self.scale is not None:
            s = self.scale
            t["range"] = [s.lo, s.hi]
            t["curve"] = s.curve
            if s.curve != "linear":
                t["shape"] = s.shape
            t["smooth_ms"] = self.smooth_ms
            t["takeover"] = self.takeover
        return t


@dataclass(frozen=True)
class NoteBinding:
    param: str | None  # one note: its target; None with a concept template
    note: int | None = None  # one note, or None for every note in `notes` (pitch-class mode)
    concepts: tuple[str | None, ...] | None = None  # pitch class -> concept (None: not loaded)
    notes: tuple[int, int] = (0, 127)
    channel: int | None = None
    scale: Scale | None = None  # velocity -> value (velocity-driven bindings)
    value: float | int | str | None = None  # the value a note-on sets (schedule spec, slot number, number)
    note_off: float | None = None  # None = hold
    mono: bool = False
    smooth_ms: float = 0.0
    line: int = 0


@dataclass(frozen=True)
class SceneBinding:
    """A note or a program change that recalls a scene (or, with scene None, is the panic)."""
    kind: str  # "note" or "program"
    number: int  # the note or program number, 0..127
    scene: str | None  # None: panic
    seconds: float | None = None  # the recall's transition; None: the scene's own
    channel: int | None = None
    line: int = 0


@dataclass(frozen=True)
class BendBinding:
    param: str
    scale: Scale | None
    channel: int | None = None
    smooth_ms: float = 0.0
    takeover: str = "jump"
    line: int = 0


def pitch_class_names(template: str) -> list[str]:
    """The 12 concept names a template gives ({pc}, {pc_s}, {pc_num}); ValueError if malformed."""
    fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    unknown = [f for f in fields if f not in ("pc", "pc_s", "pc_num")]
    if unknown:
        raise ValueError(f"unknown placeholder {{{unknown[0]}}} in {template!r}; use {{pc}}, {{pc_s}} or {{pc_num}}")
    if not fields:
        raise ValueError(f"concept template {template!r} has no {{pc}}, {{pc_s}} or {{pc_num}}")
    return [template.format(pc=pc, pc_s=pc.replace("#", "s"), pc_num=i) for i, pc in enumerate(PITCH_CLASSES)]


def check_param(param: str, concepts: frozenset[str] | None, *, numeric: bool) -> params.Param:
    """The table's entry for `param` if a binding can set it, else ControlError. Numbers
    (numeric: cc, pitch bend, velocity) and events (a note with a value) can be bound; a
    text parameter is bound through prompt_slot."""
    ref = params.find(param)
    if ref is not None and not ref.param.numeric:
        if not ref.param.event:
            raise ControlError(f"bind prompt_slot (and list prompts), not {param}")
        if numeric:
            raise ControlError(f"{param} takes a {ref.param.target} spec: bind it to a note with "
                               f"value = \"{ref.param.example}\"")
    return params.resolve(param, concepts).param
