"""Threading model: `PARAMS` is an immutable table built at import; any thread (the OSC
receive thread, the MIDI reader, the producer, the CLI) reads it without a lock. The
functions here hold no state, never block and never touch the engine.

The one table of controllable parameters: every name a controller may set, its type,
limits, knob range, starting value, smoothing and what it changes in the engine.

Names are the OSC paths below `/musicsteer/` (DESIGN.md). An entry's name is either a
fixed path (`cfg`) or a pattern with one `<name>` segment, which stands for a loaded
concept's name (`concept/<name>/strength`). Everything that handles parameters reads
this table: ControlState's validation (`validate`), the OSC router (which addresses
set and get), mapping files (which parameters a binding may set, their default ranges
and limits), the producer (smoothing, and where a value goes) and the live session's
starting values. Adding a parameter is one entry in `PARAMS`.

An entry's `target` says where its value goes, and the producer has one way to apply
each target:
  sampling   the SamplingSettings field named by `field` (smoothed, clamped numbers)
  strength   the steering strength of the concept the pattern names
  prompt     the text of a prompt slot (`slot`, from 1; `prompt` is slot 1): encoded off the
             producer thread, in force from the step it is swapped in at
  weight     the prompt slots' blend: a slot's weight (`slot`), or, for `prompt/morph` (no
             slot), the fade from slot 1 (0) to slot 2 (1); weights are normalised to sum 1
  schedule   a schedule spec, started on the concept at the step it takes effect (an
             event: it has no current value, so OSC cannot get it)

This module knows nothing of tensors, sockets, MIDI or the engine's objects; it names
SamplingSettings fields as strings.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import MusicsteerError

TARGETS = ("sampling", "strength", "prompt", "schedule", "weight")
NUMBER_TARGETS = ("sampling", "strength", "weight")  # the others take strings
PROMPT_SLOTS = 8  # prompt slots a session may hold (model/kv_cache.py MAX_SLOTS)
CONCEPT_TARGETS = ("strength", "schedule")  # a pattern's: one parameter per concept
NAME = "<name>"  # the pattern segment that stands for a concept's name
STRENGTH_LIMIT = 100.0  # a concept strength beyond this is clamped


class ControlError(MusicsteerError):
    pass


Check = Callable[[str, object, "frozenset[str] | None"], object]


def non_empty_text(path: str, value, concepts) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ControlError(f"{path} must be a non-empty string")
    return value


def schedule_spec(path: str, value, concepts) -> str:
    """A spec `parse_schedule` reads; a crossfade's other concept must be loaded."""
    # steering.schedules is imported here, not at the top: the controllers stay importable,
    # and free of whatever the steering package loads, until a schedule is first set.
    from ..steering.schedules import Crossfade, ScheduleError, parse_schedule

    if not isinstance(value, str):
        raise ControlError("a schedule is a spec string like decay:0.99 or linear-up:4s")
    try:
        parsed = parse_schedule(value)
    except ScheduleError as exc:
        raise ControlError(str(exc)) from None
    if isinstance(parsed, Crossfade) and concepts is not None and parsed.other not in concepts:
        raise ControlError(f"unknown concept {parsed.other!r} to crossfade to")
    return value


@dataclass(frozen=True)
class Param:
    """One controllable parameter (or one per concept, for a pattern)."""
    name: str  # the OSC path below /musicsteer/, or a pattern with one <name> segment
    type: type  # float, int or str
    target: str  # where the value goes (TARGETS; see the module docstring)
    field: str | None = None  # target "sampling": the SamplingSettings field
    limits: tuple[float, float] | None = None  # numbers: what ControlState accepts (it clamps to it)
    knob: tuple[float, float] | None = None  # numbers: a mapping binding's range when it names none
    default: float | str | None = None  # the value before anything sets it; None: the engine's setting
    smoothed: bool = False  # numbers: a change moves there at the smooth_ms it asks for; False: jumps
    event: bool = False  # acts once when it arrives (no current value to get)
    check: Check | None = None  # strings: (path, value, concepts) -> the value to store, or ControlError
    example: str = ""  # strings: a value, for error messages that say what to write
    slot: int | None = None  # targets prompt and weight: the prompt slot, from 1 (None: prompt/morph)
    parts: tuple[str, ...] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "parts", tuple(self.name.split("/")))
        if self.target not in TARGETS:
            raise ValueError(f"{self.name}: unknown target {self.target!r}; known: {', '.join(TARGETS)}")
        if self.numeric != (self.target in NUMBER_TARGETS):
            raise ValueError(f"{self.name}: targets {', '.join(NUMBER_TARGETS)} take numbers, the others strings")
        if self.is_pattern != (self.target in CONCEPT_TARGETS):
            raise ValueError(f"{self.name}: targets {', '.join(CONCEPT_TARGETS)} are per concept, as patterns")
        if (self.target == "sampling") != (self.field is not None):
            raise ValueError(f"{self.name}: a field is given for the sampling target, and only for it")
        if self.slot is not None and (self.target not in ("prompt", "weight") or not 1 <= self.slot <= PROMPT_SLOTS):
            raise ValueError(f"{self.name}: a slot 1..{PROMPT_SLOTS} is given for prompts and their weights only")
        if self.parts.count(NAME) > 1 or self.parts[0] == NAME:
            raise ValueError(f"{self.name}: a pattern has one {NAME} segment, after a fixed one")
        if self.type in (int, float):
            if self.limits is None or self.knob is None or self.check is not None or self.event:
                raise ValueError(f"{self.name}: a number has limits and a knob range, no check, and is no event")
            lo, hi = self.limits
            if not (lo < hi and lo <= min(self.knob) and max(self.knob) <= hi):
                raise ValueError(f"{self.name}: knob range {self.knob} is outside the limits {self.limits}")
        elif self.type is str:
            if self.limits is not None or self.knob is not None or self.smoothed or self.check is None:
                raise ValueError(f"{self.name}: a string has a check, and no limits, knob range or smoothing")
        else:
            raise ValueError(f"{self.name}: type must be float, int or str, got {self.type!r}")

    @property
    def is_pattern(self) -> bool:
        return NAME in self.parts

    @property
    def numeric(self) -> bool:
        return self.type is not str

    def path(self, name: str | None = None) -> str:
        """The parameter's path: the name itself, or the pattern with `name` in it."""
        return self.name.replace(NAME, name) if self.is_pattern else self.name

    def paths(self, concepts) -> list[str]:
        """Every path of this entry: one, or one per concept for a pattern."""
        return [self.path(c) for c in concepts] if self.is_pattern else [self.name]

    def coerce(self, value: float) -> float | int:
        """A number as this parameter holds it (ints round)."""
        return round(value) if self.type is int else float(value)

    def clamp(self, value: float) -> float | int:
        lo, hi = self.limits
        return self.coerce(min(max(value, lo), hi))


@dataclass(frozen=True)
class ParamRef:
    """A path resolved against the table: its entry, and the concept a pattern named."""
    param: Param
    path: str
    concept: str | None = None


@dataclass(frozen=True)
class ParamTable:
    params: tuple[Param, ...]
    _fixed: dict = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        fixed = {p.name: p for p in self.params if not p.is_pattern}
        names = [p.name for p in self.params]
        if len(set(names)) != len(names):
            raise ValueError(f"a parameter is listed twice: {min(n for n in names if names.count(n) > 1)}")
        object.__setattr__(self, "_fixed", fixed)

    def __iter__(self):
        return iter(self.params)

    def with_param(self, param: Param) -> ParamTable:
        return ParamTable((*self.params, param))

    def find(self, path: str) -> ParamRef | None:
        """The entry `path` names, or None (concepts are not checked)."""
        p = self._fixed.get(path)
        if p is not None:
            return ParamRef(p, path)
        parts = path.split("/")
        for p in self.params:
            if p.is_pattern and len(parts) == len(p.parts):
                at = p.parts.index(NAME)
                if parts[at] and all(a == b for i, (a, b) in enumerate(zip(parts, p.parts)) if i != at):
                    return ParamRef(p, path, parts[at])
        return None

    def family(self, path: str) -> tuple[str, list[str]] | None:
        """For a path shaped like patterns but naming none of them: (their first segment,
        the last segments they have), e.g. ("concept", ["strength", "schedule"])."""
        parts = path.split("/")
        leaves = [p.parts[-1] for p in self.params
                  if p.is_pattern and len(p.parts) == len(parts) and p.parts[0] == parts[0]]
        return (parts[0], leaves) if leaves else None

    def resolve(self, path: str, concepts: frozenset[str] | None = None) -> ParamRef:
        """The entry `path` names, its concept among `concepts` (None: any); ControlError if not."""
        ref = self.find(path)
        if ref is None:
            family = self.family(path)
            hint = f"; a {family[0]} has {' and '.join(family[1])}" if family else ""
            raise ControlError(f"unknown parameter {path!r}{hint}")
        if ref.concept is not None and concepts is not None and ref.concept not in concepts:
            raise ControlError(f"unknown concept {ref.concept!r}; loaded: {', '.join(sorted(concepts)) or 'none'}")
        return ref

    def validate(self, path: str, value, concepts: frozenset[str] | None = None):
        """The value to store for `path`: a number clamped to its limits, a checked string."""
        p = self.resolve(path, concepts).param
        if not p.numeric:
            return p.check(path, value, concepts)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ControlError(f"{path} needs a number, got {type(value).__name__}")
        if not math.isfinite(value):
            raise ControlError(f"{path} needs a finite number, got {value}")
        return p.clamp(value)


def _prompt_slots() -> tuple[Param, ...]:
    """prompt/<n> (a slot's text) and prompt/<n>/weight for every slot, and prompt/morph."""
    out = []
    for n in range(1, PROMPT_SLOTS + 1):
        out.append(Param(f"prompt/{n}", str, "prompt", check=non_empty_text, example="ambient pads, slow", slot=n))
        out.append(Param(f"prompt/{n}/weight", float, "weight", limits=(0.0, 100.0), knob=(0.0, 1.0),
                         default=1.0 if n == 1 else 0.0, smoothed=True, slot=n))
    out.append(Param("prompt/morph", float, "weight", limits=(0.0, 1.0), knob=(0.0, 1.0), default=0.0, smoothed=True))
    return tuple(out)


PARAMS = ParamTable((
    Param("prompt", str, "prompt", check=non_empty_text, example="lofi hip hop, mellow rhodes piano", slot=1),
    Param("cfg", float, "sampling", field="cfg", limits=(0.0, 20.0), knob=(1.0, 10.0), smoothed=True),
    Param("temperature", float, "sampling", field="temperature", limits=(1e-3, 10.0), knob=(0.1, 2.0),
          smoothed=True),
    Param("topk", int, "sampling", field="top_k", limits=(0, 2048), knob=(1.0, 500.0), smoothed=True),
    Param("topp", float, "sampling", field="top_p", limits=(0.0, 1.0), knob=(0.0, 1.0), smoothed=True),
    Param("concept/<name>/strength", float, "strength", limits=(-STRENGTH_LIMIT, STRENGTH_LIMIT), knob=(0.0, 1.0),
          default=0.0, smoothed=True),
    Param("concept/<name>/schedule", str, "schedule", event=True, check=schedule_spec, example="decay:0.99"),
    *_prompt_slots(),
))


# The table's operations, on `PARAMS` as it is when they are called.

def find(path: str) -> ParamRef | None:
    return PARAMS.find(path)


def resolve(path: str, concepts: frozenset[str] | None = None) -> ParamRef:
    return PARAMS.resolve(path, concepts)


def validate(path: str, value, concepts: frozenset[str] | None = None):
    return PARAMS.validate(path, value, concepts)


def family(path: str) -> tuple[str, list[str]] | None:
    return PARAMS.family(path)


def default_range(path: str) -> tuple[float, float] | None:
    """A mapping binding's range for `path` when it names none; None for strings and unknown paths."""
    ref = PARAMS.find(path)
    return ref.param.knob if ref is not None else None
