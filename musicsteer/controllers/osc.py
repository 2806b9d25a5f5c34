"""Threading model: one receive thread owns parsing and routing, so messages are handled
in the order they arrive (a threading server would reorder them). `publish` is called
by the producer thread and only enqueues (as does `report_error`, a late error to a client); one sender thread sends meters and those errors to
subscribers. Replies to queries go out from the receive thread.

OSC control: a router (addresses -> control state and queries) and a UDP transport.

Address space (DESIGN.md):
  /musicsteer/concept/<name>/strength f|i     target strength, applied from the next step
  /musicsteer/concept/<name>/schedule s       start a schedule (decay:0.99, crossfade:B:4s, ...)
  /musicsteer/prompt s  /musicsteer/cfg f  /musicsteer/temperature f  /musicsteer/topk i  /musicsteer/topp f
  /musicsteer/get/<path>                      replies to the sender on /musicsteer/<path>
  /musicsteer/listen i                        1 subscribes the sender to /musicsteer/meter/<concept> f
                                              and /musicsteer/stats (step ms, buffer fill, underruns,
                                              steps, real-time factor) every frame; 0 unsubscribes
  /musicsteer/learn s                         arm MIDI learn for a parameter (when MIDI is on)
  /musicsteer/scene/store s                   store the targets now as scene s (scenes.py)
  /musicsteer/scene/recall s [f]              recall scene s over f seconds (default: the scene's own)
  /musicsteer/panic [f]                       every concept's strength to 0 at once (a button's
                                              release, 0, does nothing)
  /musicsteer/get/scenes                      replies with the names of the stored scenes
Numbers may be ints or floats. Anything else (junk bytes, wrong types or counts,
unknown addresses or concepts, NaN, infinities) is logged, counted, and answered with
/musicsteer/error s; out-of-range values are clamped. A concept strength outside the
steering mode's range (`strengths`, e.g. [0, 1] for clamp and ablate) is clamped to it,
logged, and answered with /musicsteer/error s too, while the clamped value applies. Bundles are taken in arrival
order; their time tags are not waited for (a sleeping server would stall control).

The parameters it sets and gets are the entries of the parameter table (params.py);
the address of one is /musicsteer/ and its name. The router knows nothing of sockets;
the server knows nothing of parameters.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

from pythonosc.osc_message_builder import OscMessageBuilder
from pythonosc.osc_packet import OscPacket, ParseError

from ..errors import MusicsteerError
from . import params
from .limits import MAX_MESSAGE_BYTES
from .state import ControlState

log = logging.getLogger("musicsteer.osc")
PREFIX = "/musicsteer/"


class OscError(MusicsteerError):
    pass


Reply = tuple[str, list]


class OscRouter:
    def __init__(self, controls: ControlState, concepts: list[str], stats: Callable[[], object] | None = None,
                 smooth_ms: float = 0.0, learn: Callable[[str], None] | None = None, scenes=None,
                 strengths: tuple[float, float] | None = None) -> None:
        """`scenes` is the session's SceneBank (scenes.py), or None: no scene addresses; `strengths`: the
        concept strengths the steering mode takes (None: the table's limits)."""
        self.controls, self.concepts, self.stats = controls, list(concepts), stats
        self.smooth_ms, self.learn, self.scenes, self.strengths = smooth_ms, learn, scenes, strengths
        self.subscribers: set[tuple[str, int]] = set()
        self.senders: dict[str, tuple[str, int]] = {}  # text parameter -> who set it last (late errors)

    def handle(self, address: str, args: list, sender: tuple[str, int]) -> list[Reply]:
        """Apply one message; the replies go to `sender`. Raises OscError/ControlError on bad input."""
        if not address.startswith(PREFIX):
            raise OscError(f"unknown address {address!r}: addresses start with {PREFIX}")
        path = address[len(PREFIX):]
        if path.startswith("get/"):
            self._arity(address, args, 0)
            return [self.query(path[4:])]
        if path == "listen":
            (on,) = self._numbers(address, args, 1)
            (self.subscribers.add if on else self.subscribers.discard)(sender)
            return [("/musicsteer/listening", [1 if on else 0])]
        if path == "learn":
            self._arity(address, args, 1)
            if self.learn is None:
                raise OscError("MIDI learn needs MIDI input: start live with --midi-in or a mapping")
            self.learn(self._string(address, args[0]))
            return []
        if path in ("scene/store", "scene/recall", "panic"):
            return self._scene(address, path, args)
        ref = params.find(path)
        if ref is not None or params.family(path) is not None:  # ControlState names what a family has
            self._arity(address, args, 1)
            value = args[0]
            if ref is not None and not ref.param.numeric:
                value = self._string(address, value)
                self.senders[path] = sender  # a prompt fails later, on the worker: the error goes here
            elif isinstance(value, bool) or not isinstance(value, (int, float)):
                raise OscError(f"{address} needs a number, got {type(value).__name__} {value!r}")
            replies = []
            if ref is not None and ref.param.target == "strength" and self.strengths is not None:
                lo, hi = self.strengths
                if not lo <= value <= hi:  # NaN passes here and is refused by the control state
                    clamped = min(max(value, lo), hi)
                    message = f"{address}: the steering mode takes strengths in [{lo:g}, {hi:g}], " \
                              f"got {value:g}; clamped to {clamped:g}"
                    log.warning("%s", message)
                    replies.append(("/musicsteer/error", [message]))
                    value = clamped
            smoothed = ref is not None and ref.param.smoothed
            self.controls.set(path, value, source="osc", smooth_ms=self.smooth_ms if smoothed else 0.0)
            return replies
        raise OscError(f"unknown address {address!r}")

    def _scene(self, address: str, path: str, args: list) -> list[Reply]:
        if self.scenes is None:
            raise OscError(f"{address}: this session has no scenes")
        if path == "panic":
            if len(args) > 1:
                raise OscError(f"{address} takes no argument or one number, got {len(args)}")
            if not args or self._numbers(address, args, 1)[0]:
                self.scenes.panic(source="osc")
            return []
        if path == "scene/store":
            self._arity(address, args, 1)
            self.scenes.store(self._string(address, args[0]))
            return [("/musicsteer/scene/stored", [args[0]])]
        if len(args) not in (1, 2):
            raise OscError(f"{address} takes a scene name and optionally seconds, got {len(args)} arguments")
        seconds = self._numbers(address, args[1:], 1)[0] if len(args) == 2 else None
        self.scenes.recall(self._string(address, args[0]), seconds, source="osc")
        return []

    def query(self, path: str) -> Reply:
        address = PREFIX + path
        if path == "concepts":
            return address, list(self.concepts)
        if path == "scenes":
            return address, self.scenes.names() if self.scenes is not None else []
        if path == "stats":
            return address, self.stats_args()
        ref = params.find(path)
        if ref is not None and not ref.param.event:
            if ref.concept is not None and ref.concept not in self.concepts:
                raise OscError(f"unknown concept {ref.concept!r}; loaded: {', '.join(self.concepts) or 'none'}")
            value = self.controls.current(path)
            if value is None:
                value = ref.param.default if ref.param.default is not None else ""
            return address, [value]
        raise OscError(f"nothing to get at {address!r}")

    def stats_args(self) -> list:
        st = self.stats() if self.stats is not None else None
        if st is None:
            return [0.0, 0.0, 0, 0, 0.0]
        return [float(st.step_ms_p50), float(st.ring_fill), int(st.underruns), int(st.steps),
                float(st.realtime_factor)]

    @staticmethod
    def _arity(address: str, args: list, n: int) -> None:
        if len(args) != n:
            raise OscError(f"{address} takes {n} argument{'s' if n != 1 else ''}, got {len(args)}")

    def _numbers(self, address: str, args: list, n: int) -> list:
        self._arity(address, args, n)
        for a in args:
            if isinstance(a, bool) or not isinstance(a, (int, float)):
                raise OscError(f"{address} needs a number, got {type(a).__name__} {a!r}")
        return args

    @staticmethod
    def _string(address: str, value) -> str:
        if not isinstance(value, str):
            raise OscError(f"{address} needs a string, got {type(value).__name__} {value!r}")
        return value


@dataclass(frozen=True)
class OscStats:
    received: int
    errors: int
    replies: int
    published: int
    subscribers: int


class OscServer:
    def __init__(self, router: OscRouter, host: str = "127.0.0.1", port: int = 9000) -> None:
        if host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("OSC listens on %s:%d, reachable from other machines", host, port)
        self.router, self.host = router, host
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self.sock.bind((host, port))
        except OSError as exc:
            self.sock.close()
            raise OscError(f"cannot listen for OSC on {host}:{port}: {exc.strerror or exc}") from None
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.received = self.errors = self.replies = self.published = 0
        self._stop = threading.Event()
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._receive_loop, name="musicsteer-osc", daemon=True),
                         threading.Thread(target=self._send_loop, name="musicsteer-osc-out", daemon=True)]

    def start(self) -> "OscServer":
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._outbox.put(None)
        for t in self._threads:
            if t.is_alive():
                t.join(2.0)
        self.sock.close()

    def stats(self) -> OscStats:
        return OscStats(self.received, self.errors, self.replies, self.published, len(self.router.subscribers))

    # -- receive thread ------------------------------------------------------------------------

    def _receive_loop(self) -> None:
        while not self._stop.is_set():
            try:
                data, sender = self.sock.recvfrom(MAX_MESSAGE_BYTES)
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                continue
            self.received += 1
            try:
                messages = [m.message for m in OscPacket(data).messages]
            except (ParseError, ValueError, IndexError, TypeError) as exc:
                self._error(sender, f"unreadable OSC packet ({len(data)} bytes): {exc}")
                continue
            for msg in messages:
                try:
                    replies = self.router.handle(msg.address, list(msg.params), sender[:2])
                except (MusicsteerError, ValueError) as exc:  # bad input, never a dead server
                    self._error(sender, f"{msg.address}: {exc}")
                    continue
                for address, args in replies:
                    self._send(address, args, sender)
                    self.replies += 1

    def _error(self, sender, message: str) -> None:
        self.errors += 1
        log.warning("OSC from %s:%d: %s", sender[0], sender[1], message)
        self._send("/musicsteer/error", [message[:500]], sender)

    def _send(self, address: str, args: list, to) -> None:
        builder = OscMessageBuilder(address)
        for a in args:
            builder.add_arg(a)
        try:
            self.sock.sendto(builder.build().dgram, to)
        except OSError as exc:  # a listener went away: drop it, never raise into the loop
            log.info("OSC send to %s failed: %s", to, exc)
            self.router.subscribers.discard(tuple(to[:2]))

    # -- meters, from the producer thread ------------------------------------------------------------

    @property
    def listening(self) -> bool:
        return bool(self.router.subscribers)

    def publish(self, meters: dict[str, float], stats_args: list) -> None:
        """Queue one frame of meters and stats for every subscriber (never blocks)."""
        self._outbox.put((meters, stats_args))

    def report_error(self, param: str, message: str) -> None:
        """A change to `param` that failed after its message was answered (a prompt the worker
        refused): /musicsteer/error to the client that sent it, if one did (never blocks)."""
        to = self.router.senders.get(param)
        if to is not None:
            self.errors += 1
            self._outbox.put((to, f"/musicsteer/{param}: {message}"))

    def _send_loop(self) -> None:
        while True:
            item = self._outbox.get()
            if item is None or self._stop.is_set():
                return
            if isinstance(item[1], str):  # (client, error message)
                self._send("/musicsteer/error", [item[1][:500]], item[0])
                continue
            meters, stats_args = item
            for sub in list(self.router.subscribers):
                for name, value in meters.items():
                    self._send(f"/musicsteer/meter/{name}", [float(value)], sub)
                self._send("/musicsteer/stats", stats_args, sub)
            self.published += 1
