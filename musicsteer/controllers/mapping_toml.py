"""Threading model: pure functions, no state and no I/O; any thread may call them (the
CLI and the live session at start, the MIDI reader when MIDI learn writes a binding).

Reading mapping files: TOML to checked bindings, every error with its line.

tomllib parses the TOML (and gives the line of a syntax error); it forgets where each
key was, so `scan` reads the text once more, line by line, to learn the line of every
table header and key. The checks then report "file, line N: reason" for the key at
fault. `block_spans` gives the lines each `[[cc]]` block covers, for MIDI learn to
replace a block in place. The format itself is documented in mapping.py; which
parameters a binding may set, their default ranges and limits come from the parameter
table (params.py).
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass, field

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
    check_param,
    pitch_class_names,
)
from .params import ControlError

TOP_KEYS = ("version", "prompts", "cc", "note", "pitchbend", "program")
SCENE_KEYS = ("scene", "seconds", "panic")  # a note or program change that recalls a scene, or the panic
SCALE_KEYS = ("range", "curve", "shape")
KEYS = {
    "cc": ("cc", "channel", "bits", "param", *SCALE_KEYS, "smooth_ms", "takeover"),
    "note": ("note", "concept", "notes", "channel", "param", "value", *SCALE_KEYS, "smooth_ms", "note_off", "mono",
             *SCENE_KEYS),
    "pitchbend": ("channel", "param", *SCALE_KEYS, "smooth_ms", "takeover"),
    "program": ("program", "channel", *SCENE_KEYS),
}
_HEADER = re.compile(r"\s*(\[\[?)\s*([A-Za-z0-9_.\-\"' ]+?)\s*\]")
_KEY = re.compile(r"\s*(\"(?:[^\"\\]|\\.)*\"|'[^']*'|[A-Za-z0-9_\-]+)\s*[=.]")
_SYNTAX_AT = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")
_BASIC_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


# -- where things are --------------------------------------------------------------------------

@dataclass
class Table:
    name: str
    array: bool  # [[name]] rather than [name]
    line: int  # 1-based line of the header
    keys: dict[str, int] = field(default_factory=dict)  # key -> line
    end: int = 0  # 0-based index of the line after its last line


def _unquote(key: str) -> str:
    return key[1:-1] if key[:1] in "\"'" else key


def _advance(line: str, in_string: str | None, depth: int) -> tuple[str | None, int]:
    """Track multi-line strings and bracket depth through one line (comments skipped)."""
    i, n = 0, len(line)
    while i < n:
        if in_string:
            j = line.find(in_string, i)
            if j < 0:
                return in_string, depth
            i, in_string = j + 3, None
            continue
        c = line[i]
        if c == "#":
            break
        if line.startswith('"""', i) or line.startswith("'''", i):
            in_string, i = line[i:i + 3], i + 3
            continue
        if c == '"':
            m = _BASIC_STRING.match(line, i)
            i = m.end() if m else n
            continue
        if c == "'":
            j = line.find("'", i + 1)
            i = j + 1 if j >= 0 else n
            continue
        if c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
        i += 1
    return in_string, depth


def scan(text: str) -> tuple[dict[str, int], list[Table]]:
    """(top-level key -> line, the tables in order with their keys' lines)."""
    top: dict[str, int] = {}
    tables: list[Table] = []
    in_string, depth = None, 0
    lines = text.splitlines()
    for number, line in enumerate(lines, 1):
        if in_string is None and depth == 0:
            stripped = line.lstrip()
            if stripped.startswith("["):
                m = _HEADER.match(line)
                if m:
                    if tables:
                        tables[-1].end = number - 1
                    name = ".".join(_unquote(p.strip()) for p in m.group(2).split("."))
                    tables.append(Table(name, m.group(1) == "[[", number))
            else:
                m = _KEY.match(line)
                if m:
                    keys = tables[-1].keys if tables else top
                    keys.setdefault(_unquote(m.group(1)), number)
        in_string, depth = _advance(line, in_string, depth)
    if tables:
        tables[-1].end = len(lines)
    return top, tables


def block_spans(text: str, name: str) -> list[tuple[int, int]]:
    """0-based [start, end) line spans of the `[[name]]` blocks, in order; blank and
    comment lines before the next header are left out (they belong to what follows)."""
    lines = text.splitlines()
    spans = []
    for t in scan(text)[1]:
        if t.name == name and t.array:
            start, end = t.line - 1, t.end
            while end > start + 1 and (not lines[end - 1].strip() or lines[end - 1].lstrip().startswith("#")):
                end -= 1
            spans.append((start, end))
    return spans


class _Where:
    """Lines of keys and bindings, for error messages."""

    def __init__(self, path: str, text: str) -> None:
        self.path = path
        self.top, tables = scan(text)
        self.lines = max(len(text.splitlines()), 1)
        self.arrays = {name: [t for t in tables if t.name == name and t.array] for name in KEYS}
        self.tables = {t.name: t.line for t in tables}

    def line(self, kind: str | None = None, index: int | None = None, key: str | None = None) -> int:
        if kind is not None and index is not None:
            entries = self.arrays.get(kind, [])
            if index < len(entries):
                t = entries[index]
                return t.keys.get(key, t.line) if key else t.line
        name = key if kind is None else kind
        return self.top.get(name) or self.tables.get(name) or 1

    def error(self, reason: str, kind=None, index=None, key=None) -> MappingError:
        return MappingError(reason, self.path, self.line(kind, index, key))


# -- checks ------------------------------------------------------------------------------------

def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _param(param: str) -> params.Param:
    """The table's entry of a parameter `check_param` has let through."""
    return params.find(param).param


class _Fields:
    """One binding's table, read key by key; `bad(key, reason)` is the error at that key."""

    def __init__(self, where: _Where, kind: str, index: int, table: dict) -> None:
        self.where, self.kind, self.index, self.table = where, kind, index, table
        for key in table:
            if key not in KEYS[kind]:
                raise self.bad(key, f"unknown key {key!r} in [[{kind}]]; known: {', '.join(KEYS[kind])}")

    def bad(self, key: str | None, reason: str) -> MappingError:
        return self.where.error(reason, self.kind, self.index, key)

    def has(self, key: str) -> bool:
        return key in self.table

    def integer(self, key: str, lo: int, hi: int, default=None, hint: str = "") -> int | None:
        v = self.table.get(key, default)
        if key not in self.table:
            return v
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.bad(key, f"{key} must be a whole number, got {v!r}")
        if not lo <= v <= hi:
            raise self.bad(key, f"{key} {v} is out of {lo}..{hi}{hint}")
        return v

    def number(self, key: str, default: float) -> float:
        v = self.table.get(key, default)
        if not _is_number(v):
            raise self.bad(key, f"{key} must be a number, got {v!r}")
        return float(v)

    def choice(self, key: str, choices, default: str) -> str:
        v = self.table.get(key, default)
        if v not in choices:
            raise self.bad(key, f"unknown {key} {v!r}; known: {', '.join(choices)}")
        return v

    def param(self, concepts, numeric: bool) -> str:
        if "param" not in self.table:
            raise self.bad(None, f"[[{self.kind}]] needs param = \"...\" (what it sets)")
        param = self.table["param"]
        if not isinstance(param, str):
            raise self.bad("param", f"param must be a string, got {param!r}")
        if param != PROMPT_SLOT:
            try:
                check_param(param, concepts, numeric=numeric)
            except ControlError as exc:
                raise self.bad("param", str(exc)) from None
        return param

    def channel(self) -> int | None:
        return self.integer("channel", 1, 16, hint=" (leave channel out for every channel)")

    def smooth_ms(self) -> float:
        v = self.number("smooth_ms", 0.0)
        if v < 0:
            raise self.bad("smooth_ms", f"smooth_ms must not be negative, got {v:g}")
        return v

    def within(self, key: str, param: str, value: float) -> None:
        lo, hi = _param(param).limits
        if not lo <= value <= hi:
            raise self.bad(key, f"{key} {value:g} is outside what {param} accepts ({lo:g}..{hi:g})")

    def scale(self, param: str) -> Scale:
        rng = self.table.get("range")
        if rng is None:
            lo, hi = _param(param).knob
        else:
            if not (isinstance(rng, list) and len(rng) == 2 and all(_is_number(x) for x in rng)):
                raise self.bad("range", f"range must be two numbers [lo, hi], got {rng!r}")
            lo, hi = float(rng[0]), float(rng[1])
            if lo == hi:
                raise self.bad("range", f"range must be two different numbers, got [{lo:g}, {hi:g}]")
            for x in (lo, hi):
                self.within("range", param, x)
        curve = self.choice("curve", tuple(CURVES), "linear")
        if curve == "linear":
            if self.has("shape"):
                raise self.bad("shape", "shape applies to the exp, log and s curves, not linear")
            shape = 0.0
        else:
            shape = self.number("shape", CURVES[curve])
            if not 0.0 < shape <= 50.0:
                raise self.bad("shape", f"shape must be in (0, 50], got {shape:g}")
        return Scale(lo, hi, curve, shape, integer=_param(param).type is int)

    def no(self, keys, why: str) -> None:
        for key in keys:
            if self.has(key):
                raise self.bad(key, f"{key} does not apply {why}")


def _prompt_slot_ok(f: _Fields, prompts: tuple[str, ...]) -> None:
    if not prompts:
        raise f.bad("param", "prompt_slot needs prompts = [\"...\", ...] at the top of the file")


def _cc(f: _Fields, concepts, prompts) -> CCBinding:
    if not f.has("cc"):
        raise f.bad(None, "[[cc]] needs cc = N (the controller number, 0..127)")
    cc = f.integer("cc", 0, 127)
    bits = f.table.get("bits", 7)
    if bits not in (7, 14) or isinstance(bits, bool):
        raise f.bad("bits", f"bits must be 7 or 14, got {bits!r}")
    if bits == 14 and cc > 31:
        raise f.bad("cc", f"a 14-bit cc is its MSB, 0..31 (the LSB is cc + 32); got cc {cc}")
    channel, param = f.channel(), f.param(concepts, numeric=True)
    if param == PROMPT_SLOT:
        _prompt_slot_ok(f, prompts)
        f.no((*SCALE_KEYS, "smooth_ms", "takeover"), "to prompt_slot (it picks one of the prompts)")
        return CCBinding(cc, param, None, channel, bits, line=f.where.line("cc", f.index))
    return CCBinding(cc, param, f.scale(param), channel, bits, f.smooth_ms(), f.choice("takeover", TAKEOVERS, "pickup"),
                     line=f.where.line("cc", f.index))


def _bend(f: _Fields, concepts, prompts) -> BendBinding:
    channel, param = f.channel(), f.param(concepts, numeric=True)
    line = f.where.line("pitchbend", f.index)
    if param == PROMPT_SLOT:
        _prompt_slot_ok(f, prompts)
        f.no((*SCALE_KEYS, "smooth_ms", "takeover"), "to prompt_slot (it picks one of the prompts)")
        return BendBinding(param, None, channel, line=line)
    return BendBinding(param, f.scale(param), channel, f.smooth_ms(), f.choice("takeover", TAKEOVERS, "jump"),
                       line=line)


def _note_off(f: _Fields, param: str, default):
    v = f.table.get("note_off", default)
    if v == "hold" or v is None:
        return None
    if not _is_number(v):
        raise f.bad("note_off", f"note_off must be a number or \"hold\", got {v!r}")
    f.within("note_off", param, float(v))
    return _param(param).coerce(v)


def _scene(f: _Fields, kind: str, number_key: str) -> SceneBinding:
    """A `[[note]]` or `[[program]]` with scene = "NAME" (seconds optional) or panic = true."""
    line = f.where.line(kind, f.index)
    if not f.has(number_key):
        raise f.bad(None, f"[[{kind}]] needs {number_key} = N (0..127)")
    number = f.integer(number_key, 0, 127)
    if kind == "note":
        f.no(tuple(k for k in KEYS["note"] if k not in ("note", "channel", *SCENE_KEYS)),
             "to a note that recalls a scene or is the panic")
    if f.has("panic") == f.has("scene"):
        raise f.bad("panic" if f.has("panic") else None,
                    f"[[{kind}]] needs either scene = \"NAME\" (recall it) or panic = true")
    if f.has("panic"):
        if f.table["panic"] is not True:
            raise f.bad("panic", f"panic must be true, got {f.table['panic']!r}")
        f.no(("seconds",), "to the panic (it acts at once)")
        return SceneBinding(kind, number, None, None, f.channel(), line)
    name = f.table["scene"]
    if not isinstance(name, str) or not name.strip():
        raise f.bad("scene", f"scene must be a scene's name, got {name!r}")
    seconds = None
    if f.has("seconds"):
        seconds = f.number("seconds", 0.0)
        if not 0 <= seconds <= 600:
            raise f.bad("seconds", f"seconds must be in 0..600, got {seconds:g}")
    return SceneBinding(kind, number, name, seconds, f.channel(), line)


def _program(f: _Fields, concepts, prompts) -> SceneBinding:
    return _scene(f, "program", "program")


def _note(f: _Fields, concepts, prompts) -> NoteBinding | SceneBinding:
    if any(f.has(k) for k in ("scene", "panic")):
        return _scene(f, "note", "note")
    if f.has("seconds"):
        raise f.bad("seconds", "seconds applies to a note that recalls a scene (scene = \"NAME\")")
    line = f.where.line("note", f.index)
    if f.has("note") == f.has("concept"):
        raise f.bad("concept" if f.has("concept") else None,
                    "a [[note]] binding needs either note = N (one note) or concept = \"name_{pc}\" (every note)")
    channel, smooth = f.channel(), f.smooth_ms()
    mono = f.table.get("mono", False)
    if not isinstance(mono, bool):
        raise f.bad("mono", f"mono must be true or false, got {mono!r}")
    if f.has("concept"):
        f.no(("param", "value"), "with concept = ... (every note sets its pitch class's strength)")
        template = f.table["concept"]
        if not isinstance(template, str):
            raise f.bad("concept", f"concept must be a string template like \"note_{{pc}}\", got {template!r}")
        try:
            names = pitch_class_names(template)
        except ValueError as exc:
            raise f.bad("concept", str(exc)) from None
        if any("/" in n or not n for n in names):
            raise f.bad("concept", f"concept names cannot contain '/': {names[0]!r}")
        if concepts is not None:
            names = [n if n in concepts else None for n in names]
            if not any(names):
                raise f.bad("concept", f"concept template {template!r} names no loaded concept; loaded: "
                                       f"{', '.join(sorted(concepts)) or 'none'}")
        rng = f.table.get("notes", [0, 127])
        if not (isinstance(rng, list) and len(rng) == 2 and all(isinstance(n, int) and not isinstance(n, bool)
                                                                 and 0 <= n <= 127 for n in rng) and rng[0] <= rng[1]):
            raise f.bad("notes", f"notes must be [lowest, highest] note numbers in 0..127, got {rng!r}")
        probe = "concept/x/strength"  # every pitch class drives a strength
        return NoteBinding(None, None, tuple(names), (rng[0], rng[1]), channel, f.scale(probe), None,
                           _note_off(f, probe, _param(probe).default), mono, smooth, line)
    f.no(("notes", "mono"), "to a single note (use concept = \"name_{pc}\" for every note)")
    note = f.integer("note", 0, 127)
    param = f.param(concepts, numeric=False)
    event = param != PROMPT_SLOT and _param(param).event
    if not f.has("value"):
        if param == PROMPT_SLOT or event:
            raise f.bad("param", f"{param} needs value = ... (the slot number or schedule spec the note sets)")
        off = _note_off(f, param, _param(param).default)
        return NoteBinding(param, note, None, (note, note), channel, f.scale(param), None, off, False, smooth, line)
    f.no(SCALE_KEYS, "with value = ... (the note sets that value; leave value out to use velocity)")
    value = f.table["value"]
    if param == PROMPT_SLOT:
        _prompt_slot_ok(f, prompts)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= len(prompts):
            raise f.bad("value", f"value must be a prompt slot 1..{len(prompts)}, got {value!r}")
        f.no(("note_off",), "to prompt_slot")
    elif event:
        try:
            value = params.validate(param, value, concepts)
        except ControlError as exc:
            raise f.bad("value", str(exc)) from None
        f.no(("note_off",), f"to a {_param(param).target}")
    else:
        if not _is_number(value):
            raise f.bad("value", f"value must be a number for {param}, got {value!r}")
        f.within("value", param, float(value))
        value = _param(param).coerce(value)
    off = _note_off(f, param, None) if param != PROMPT_SLOT and not event else None
    return NoteBinding(param, note, None, (note, note), channel, None, value, off, False, smooth, line)


def parse_mapping(text: str, path: str, concepts: frozenset[str] | None):
    """(prompts, bindings) of a mapping file's text; MappingError with the line if malformed."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        m = _SYNTAX_AT.search(msg)
        if m:
            raise MappingError(f"TOML syntax: {msg[:m.start()]} (column {m.group(2)})", path, int(m.group(1))) from None
        line = max(len(text.splitlines()), 1)
        raise MappingError(f"TOML syntax: {re.sub(r' [(]at end of document[)]$', '', msg)} (at the end)", path,
                           line) from None
    where = _Where(path, text)
    for key in data:
        if key not in TOP_KEYS:
            raise where.error(f"unknown key {key!r}; a mapping has {', '.join(TOP_KEYS)}", key=key)
    if data.get("version", 1) != 1:
        raise where.error(f"unknown mapping version {data['version']!r}; this musicsteer reads version 1",
                          key="version")
    prompts = data.get("prompts", [])
    if not isinstance(prompts, list) or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise where.error("prompts must be a list of non-empty strings", key="prompts")
    prompts = tuple(prompts)
    makers = {"cc": _cc, "note": _note, "pitchbend": _bend, "program": _program}
    bindings = []
    for kind, make in makers.items():
        entries = data.get(kind, [])
        if isinstance(entries, dict):
            raise where.error(f"write [[{kind}]] for each binding (a list of tables), not [{kind}]", key=kind)
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise where.error(f"{kind} must be a list of [[{kind}]] tables", key=kind)
        for i, table in enumerate(entries):
            bindings.append(make(_Fields(where, kind, i, table), concepts, prompts))
    bindings.sort(key=lambda b: b.line)
    return prompts, bindings


def cc_binding(table: dict, prompts=(), concepts=None) -> CCBinding:
    """A `[[cc]]` table (as MIDI learn builds it) checked like a file's; MappingError
    with the reason alone (there is no file line)."""
    where = _Where(None, "")
    return _cc(_Fields(where, "cc", 0, table), frozenset(concepts) if concepts is not None else None, tuple(prompts))
