"""Threading model: a `SceneBank` is shared by every controller thread (the OSC receive
thread, the MIDI reader, the web server's event loop); `store`, `recall`, `panic` and
`names` hold its lock for a dict operation and, for a store, the write of the scenes
file. They never wait on the producer: a recall is a handful of `ControlState.set`
calls, which the producer takes at its next step like any other change.

Scenes: named sets of parameter targets, stored from the control state and recalled
with a transition; the panic control; the scenes file.

A scene is what `ControlState.snapshot()` holds when it is stored: every parameter of
the table (params.py) with a target: concept strengths, sampling settings, the prompt
and, once they exist, prompt weights; and the schedules started last (events, restarted
on recall). A recall sets them again through `ControlState.set`, so it goes through the
same table, smoothing and control log as OSC and MIDI, and replays. A recall with a
transition of T seconds ramps every number in a straight line from where it is to the
stored value, landing on it exactly n = max(1, round(T * 50)) steps later (Smoother);
strings (the prompt) and schedules are set at once, and a prompt equal to the current
one is left alone (no re-encoding). Parameters the scene does not name are left as they
are. `panic` sets every loaded concept's strength to 0 at once, at the next step.

The scenes file (`live --scenes FILE`; a store writes it back, atomically)::

    version = 1

    [scene.verse]
    transition = 2.0                     # optional: seconds a recall takes when it names none
    "concept/cmaj/strength" = 0.5        # any parameter of the table, by its path
    cfg = 3.0
    topk = 250
    prompt = "lofi hip hop, mellow rhodes piano"
    "concept/fast/schedule" = "sine:4s"  # a schedule, started again on recall

A malformed file is refused with its line (`SceneError`: "scenes.toml, line 7: ...").

This module knows nothing of sockets, MIDI ports or tensors.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import tomllib
from dataclasses import dataclass
from pathlib import Path

from . import params
from .bindings import MappingError
from .mapping import toml_value
from .mapping_toml import scan
from .params import ControlError
from .state import ControlState

log = logging.getLogger("musicsteer.scenes")
TRANSITION = "transition"  # a scene's key for its default transition, seconds
MAX_TRANSITION_S = 600.0
HEADER = "# musicsteer scenes (format: musicsteer/controllers/scenes.py)\nversion = 1\n"
_BARE = re.compile(r"[A-Za-z0-9_-]+")
_SYNTAX_AT = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")


class SceneError(MappingError):
    """A malformed scenes file (with its line) or a bad store/recall request."""


@dataclass(frozen=True)
class Scene:
    name: str
    values: dict  # parameter path -> stored target (numbers, strings, schedule specs)
    transition: float = 0.0  # seconds a recall takes when it names none


def check_name(name) -> str:
    if not isinstance(name, str) or not name.strip() or len(name) > 100 or any(c in name for c in "\n\r\t"):
        raise SceneError(f"a scene name is a non-empty line of at most 100 characters, got {name!r}")
    return name


def check_seconds(seconds) -> float:
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) \
            or not 0 <= seconds <= MAX_TRANSITION_S:
        raise SceneError(f"a transition is a number of seconds in 0..{MAX_TRANSITION_S:g}, got {seconds!r}")
    return float(seconds)


class SceneBank:
    """Named scenes over one ControlState; `path` is the scenes file a store writes."""

    def __init__(self, controls: ControlState, scenes=(), path: Path | str | None = None) -> None:
        self.controls = controls
        self.path = Path(path) if path is not None else None
        self._scenes: dict[str, Scene] = {s.name: s for s in scenes}
        self._lock = threading.Lock()
        self.recalls = self.stores = self.panics = 0

    @classmethod
    def load(cls, controls: ControlState, path: Path | str, create: bool = True) -> SceneBank:
        """The bank of the file at `path`; a missing file is an empty bank that a store creates."""
        path = Path(path)
        if not path.exists() and create:
            if not path.parent.is_dir():
                raise SceneError(f"directory {path.parent} does not exist", str(path))
            return cls(controls, (), path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise SceneError(f"cannot read the scenes file ({exc})", str(path)) from None
        return cls(controls, parse_scenes(text, str(path), controls.concepts), path)

    def names(self) -> list[str]:
        with self._lock:
            return list(self._scenes)

    def get(self, name: str) -> Scene | None:
        with self._lock:
            return self._scenes.get(name)

    def store(self, name: str) -> Scene:
        """The control state's targets now, as scene `name` (replacing one of that name);
        the scenes file is rewritten when the bank has one."""
        name = check_name(name)
        values = {p: v for p, v in self.controls.snapshot().items() if params.find(p) is not None}
        with self._lock:
            old = self._scenes.get(name)
            scene = Scene(name, values, old.transition if old is not None else 0.0)
            self._scenes[name] = scene
            self.stores += 1
            if self.path is not None:
                write_scenes(self.path, list(self._scenes.values()))
        log.info("scene %r stored (%d parameters)", name, len(values))
        return scene

    def recall(self, name: str, seconds: float | None = None, source: str = "scene") -> Scene:
        """Set scene `name`'s values, numbers ramping over `seconds` (None: the scene's own)."""
        scene = self.get(check_name(name))
        if scene is None:
            known = ", ".join(self.names()) or "none stored"
            raise SceneError(f"unknown scene {name!r}; scenes: {known}")
        ramp_ms = 1000.0 * (scene.transition if seconds is None else check_seconds(seconds))
        for param, value in scene.values.items():
            ref = params.find(param)
            if ref is None:
                continue
            if ref.concept is not None and self.controls.concepts is not None \
                    and ref.concept not in self.controls.concepts:
                log.warning("scene %r: %s names a concept that is not loaded; left out", name, param)
                continue
            if ref.param.numeric:
                self.controls.set(param, value, source=f"{source}:{name}", ramp_ms=ramp_ms if ref.param.smoothed else 0)
            elif ref.param.event or self.controls.current(param) != value:
                self.controls.set(param, value, source=f"{source}:{name}")
        with self._lock:
            self.recalls += 1
        log.info("scene %r recalled over %.2f s", name, ramp_ms / 1000)
        return scene

    def panic(self, source: str = "panic") -> int:
        """Every loaded concept's strength to 0 at the next step, at once; returns how many."""
        concepts = sorted(self.controls.concepts or ())
        for c in concepts:
            self.controls.set(f"concept/{c}/strength", 0.0, source=source)
        with self._lock:
            self.panics += 1
        log.info("panic: %d concepts to 0", len(concepts))
        return len(concepts)


# -- the file ----------------------------------------------------------------------------------

def parse_scenes(text: str, path: str = "<scenes>", concepts: frozenset[str] | None = None) -> list[Scene]:
    """The scenes of a scenes file's text; SceneError with the line if malformed."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        m = _SYNTAX_AT.search(msg)
        line = int(m.group(1)) if m else max(len(text.splitlines()), 1)
        raise SceneError(f"TOML syntax: {msg[:m.start()] if m else msg}", path, line) from None
    top, tables = scan(text)
    lines = {t.name: t for t in tables}

    def bad(reason: str, scene: str | None = None, key: str | None = None) -> SceneError:
        t, parent = lines.get(f"scene.{scene}"), lines.get("scene")
        if t is not None:  # a key of [scene.NAME]
            line = t.keys.get(key, t.line)
        elif scene is not None and parent is not None:  # NAME = ... under [scene]
            line = parent.keys.get(scene, parent.line)
        else:
            line = top.get(key) or (lines[key].line if key in lines else 1)
        return SceneError(reason, path, line)

    for key in data:
        if key not in ("version", "scene"):
            raise bad(f"unknown key {key!r}; a scenes file has version and [scene.NAME] tables", key=key)
    if data.get("version", 1) != 1:
        raise bad(f"unknown scenes version {data['version']!r}; this musicsteer reads version 1", key="version")
    table = data.get("scene", {})
    if not isinstance(table, dict):
        raise bad("write each scene as a [scene.NAME] table", key="scene")
    scenes = []
    for name, body in table.items():
        if not isinstance(body, dict):
            raise bad(f"scene {name!r} must be a table: [scene.{name}]", name)
        try:
            check_name(name)
        except SceneError as exc:
            raise bad(exc.reason, name) from None
        values, transition = {}, 0.0
        for key, value in body.items():
            if key == TRANSITION:
                try:
                    transition = check_seconds(value)
                except SceneError as exc:
                    raise bad(exc.reason, name, key) from None
                continue
            try:
                values[key] = params.validate(key, value, concepts)
            except ControlError as exc:
                raise bad(f"scene {name!r}: {exc}", name, key) from None
        scenes.append(Scene(name, values, transition))
    return scenes


def _key(k: str) -> str:
    return k if _BARE.fullmatch(k) else toml_value(k)


def format_scenes(scenes: list[Scene]) -> str:
    out = [HEADER]
    for s in scenes:
        out.append(f"\n[scene.{_key(s.name)}]\n")
        if s.transition:
            out.append(f"{TRANSITION} = {toml_value(s.transition)}\n")
        for k, v in s.values.items():
            out.append(f"{_key(k)} = {toml_value(v)}\n")
    return "".join(out)


def write_scenes(path: Path, scenes: list[Scene]) -> None:
    """The scenes file, replaced atomically."""
    text = format_scenes(scenes)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        raise SceneError(f"cannot write the scenes file ({exc.strerror or exc})", str(path)) from None
