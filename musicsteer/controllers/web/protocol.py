"""Threading model: one `WebRouter` serves every connection from the web server's event
loop thread alone; what it calls (`ControlState.set`, the SceneBank) is thread-safe and
O(1), so a message never waits on the producer. `describe` and `values` read the
immutable parameter table and a snapshot of the control state.

The web surface's protocol: JSON text messages to the control state, scenes and
queries, and the frames sent back (docs/web.md).

In (one JSON object per message):
  {"set": PATH, "value": V}                      any parameter of the table (params.py)
  {"prompt": SLOT, "text": "..."}                slot 0 is the prompt (the table's prompt/1), slot
                                                 k the table's prompt/<k+1>
  {"scene": "store", "name": N}
  {"scene": "recall", "name": N, "seconds": S}   seconds optional (the scene's own)
  {"panic": true}                                every concept's strength to 0 at once
  {"get": PATH}                                  replies {"path": PATH, "value": V}
Out: on connect {"hello": {...}} (the parameters to draw, concepts, scenes, values);
then frames {"meters": {...}, "stats": {...}, "level": {...}, "spectrum": [...],
"values": {...}} (values only when something changed, scenes when they did); errors
{"error": "..."}. A numbers' change is smoothed as OSC's are (`smooth_ms`).

The router knows nothing of sockets or aiohttp; the server knows nothing of parameters.
"""

from __future__ import annotations

import json
import logging
import math

from ...errors import MusicsteerError
from .. import params
from ..limits import MAX_MESSAGE_BYTES
from ..scenes import SceneBank
from ..state import ControlState

log = logging.getLogger("musicsteer.web")
KEYS = {"set": ("set", "value"), "prompt": ("prompt", "text"), "scene": ("scene", "name", "seconds"),
        "panic": ("panic",), "get": ("get",)}


class WebError(MusicsteerError):
    pass


def decode(data) -> dict:
    """One message as a dict; WebError for anything that is not a JSON object of a known kind."""
    if isinstance(data, (bytes, bytearray)):
        raise WebError("send text messages (JSON), not binary ones")
    if len(data) > MAX_MESSAGE_BYTES:
        raise WebError(f"message of {len(data)} characters is over the {MAX_MESSAGE_BYTES} limit")
    try:
        msg = json.loads(data, parse_constant=_constant)
    except (ValueError, RecursionError) as exc:
        raise WebError(f"not JSON: {str(exc)[:200]}") from None
    if not isinstance(msg, dict):
        raise WebError(f"a message is a JSON object, got {type(msg).__name__}")
    kinds = [k for k in KEYS if k in msg]
    if len(kinds) != 1:
        raise WebError(f"a message has one of {', '.join(KEYS)}; got keys {', '.join(map(str, msg)) or 'none'}")
    extra = [k for k in msg if k not in KEYS[kinds[0]]]
    if extra:
        raise WebError(f"unknown key {extra[0]!r} in a {kinds[0]} message; it takes {', '.join(KEYS[kinds[0]])}")
    return msg


def _constant(name: str):
    raise ValueError(f"{name} is not a number JSON has")  # NaN, Infinity: Python's json would take them


class WebRouter:
    def __init__(self, controls: ControlState, concepts: list[str], scenes: SceneBank | None = None,
                 smooth_ms: float = 0.0) -> None:
        self.controls, self.concepts, self.scenes, self.smooth_ms = controls, list(concepts), scenes, smooth_ms

    def handle(self, msg: dict, source: str = "web") -> list[dict]:
        """Apply one decoded message; the replies to its sender. Raises MusicsteerError on bad input."""
        if "set" in msg:
            self._set(self._path(msg["set"], "set"), msg.get("value"), source)
            return []
        if "prompt" in msg:
            slot = msg["prompt"]
            if isinstance(slot, bool) or not isinstance(slot, int) or slot < 0:
                raise WebError(f"prompt takes a slot number (0 is the prompt), got {slot!r}")
            self._set("prompt" if slot == 0 else f"prompt/{slot + 1}", msg.get("text"), source)  # table: from 1
            return []
        if "get" in msg:
            path = self._path(msg["get"], "get")
            ref = params.resolve(path, frozenset(self.concepts))
            if ref.param.event:
                raise WebError(f"{path} is an event: it has no value to get")
            value = self.controls.current(path)
            return [{"path": path, "value": ref.param.default if value is None else value}]
        if self.scenes is None:
            raise WebError("this session has no scenes")
        if "panic" in msg:
            if msg["panic"] is True:
                self.scenes.panic(source=source)
            return []
        action, name = msg["scene"], msg.get("name")
        if action == "store":
            scene = self.scenes.store(name)
            return [{"stored": scene.name, "scenes": self.scenes.names()}]
        if action == "recall":
            self.scenes.recall(name, msg.get("seconds"), source=source)
            return []
        raise WebError(f"scene takes \"store\" or \"recall\", got {action!r}")

    def _set(self, path: str, value, source: str) -> None:
        ref = params.resolve(path, frozenset(self.concepts))
        if value is None:
            raise WebError(f"{path}: the message has no value")
        smooth = self.smooth_ms if ref.param.numeric and ref.param.smoothed else 0.0
        self.controls.set(path, value, source=source, smooth_ms=smooth)

    @staticmethod
    def _path(path, kind: str) -> str:
        if not isinstance(path, str) or not path:
            raise WebError(f"{kind} takes a parameter path like \"cfg\" or \"concept/NAME/strength\", got {path!r}")
        return path

    # -- what the page draws -------------------------------------------------------------

    def describe(self) -> list[dict]:
        """Every parameter path of the table for the loaded concepts, with what a control needs."""
        out = []
        for p in params.PARAMS:
            for path in p.paths(self.concepts):
                entry = {"path": path, "type": p.type.__name__, "target": p.target, "event": p.event}
                if p.numeric:
                    entry.update(limits=list(p.limits), knob=list(p.knob))
                else:
                    entry["example"] = p.example
                out.append(entry)
        return out

    def values(self) -> dict:
        """The newest target of every parameter, finite numbers and strings as JSON takes them."""
        return {k: v for k, v in self.controls.snapshot().items()
                if isinstance(v, str) or (isinstance(v, (int, float)) and math.isfinite(v))}

    def hello(self, token_required: bool) -> dict:
        return {"hello": {"params": self.describe(), "concepts": self.concepts,
                          "scenes": self.scenes.names() if self.scenes is not None else [],
                          "values": self.values(), "token": token_required,
                          "max_message_bytes": MAX_MESSAGE_BYTES}}
