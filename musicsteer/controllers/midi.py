"""Threading model: three threads of ours. The reader thread drains both inputs' RtMidi
queues (every 1 ms while messages flow, every 4 ms after 0.5 s of quiet), decodes each
message, feeds an armed learner or the mapping, and calls `ControlState.set` (a dict
write under a lock; it never blocks on the producer). It is the only thread that uses
the mapping; a learned binding's file write (a few ms, rare) happens there too. The
watcher thread (only with `port`) lists JACK's MIDI sources once per `poll_s` and
closes or reopens the link client. `_ports_lock` is held by the reader while draining
and by the watcher while it lists or swaps ports; JACK's process thread never takes it
and never runs Python. `start`, `stop`, `stats`, `learn` and `set_mapping` are called
from any other thread (the CLI, the OSC server). Each counter has one writing thread.
If the JACK server itself dies, messages stop (nothing crashes); restart the session.

MIDI input on JACK or the platform's MIDI system: knobs, notes and wheels into ControlState through a mapping, and MIDI learn.

`MidiController` opens a virtual MIDI input, `<client_name>:in`, that any JACK MIDI
source can be connected to (a DAW, a2jmidid's bridge of a USB controller, a test
client). Given `port`, it also follows an existing MIDI source whose name contains it:
a second JACK client, `<client_name>-link:in`, is connected to that source, and when the
source disappears (unplugged, its program quit) and comes back, it is reconnected.
Each message goes through the `Mapping` into `ControlState.set(..., source="midi:<port>")`.
`MidiLearner` binds the next knob moved to an armed parameter and writes the binding
into the mapping file, inside a running controller (`controller.learn(...)`) or fed by
hand.

The MIDI system is python-rtmidi's API named by `api` (`live --midi-api`): "jack",
"alsa" (Linux's sequencer), "coremidi" (macOS), "winmm" (Windows, which has no virtual
ports: name an input to follow), or "auto": JACK when a JACK server runs, else the
platform's own (`resolve_api`); what is missing is a one-line MidiError. The machines
this is tested on have JACK and no ALSA sequencer. mido is used for message objects only: its rtmidi backend always
installs a Python callback, and RtMidi calls that callback in JACK's process thread,
which would then wait for the GIL while holding up the whole JACK graph (the audio sink
included). Here RtMidi queues messages in C++ and a Python thread drains the queue.

This module knows nothing of tensors or the engine; ControlState validates values.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import mido

from ..errors import MusicsteerError
from .bindings import CCBinding, MappingError
from .mapping import Mapping, SceneAction, add_cc_binding
from .mapping_toml import cc_binding
from .params import default_range
from .state import ControlState

log = logging.getLogger("musicsteer.midi")

NO_MIDI = "no MIDI system: start JACK (jackd -d alsa, or jackd -d dummy without a sound card) and try again"
ACTIVE_POLL_S, IDLE_POLL_S, QUIET_S = 0.001, 0.004, 0.5
LEARN_PAIR_S = 0.1  # an LSB (cc N + 32) this soon after cc N makes the learned binding 14-bit


class MidiError(MusicsteerError):
    pass


API_NAMES = ("auto", "jack", "alsa", "coremidi", "winmm")
_API_CONSTANTS = {"jack": "API_UNIX_JACK", "alsa": "API_LINUX_ALSA", "coremidi": "API_MACOSX_CORE",
                  "winmm": "API_WINDOWS_MM"}
NATIVE = {"linux": "alsa", "darwin": "coremidi", "win32": "winmm"}  # sys.platform -> its own MIDI system
ALSA_SEQ = "/dev/snd/seq"
REBUILD = ("install libjack-jackd2-dev and libasound2-dev, then pip install --force-reinstall --no-cache-dir "
           "--no-binary python-rtmidi python-rtmidi")


def _rtmidi():
    try:
        import rtmidi
    except ImportError:
        raise MidiError("no MIDI system: python-rtmidi is not installed (pip install python-rtmidi)") from None
    return rtmidi


def compiled_apis() -> list[str]:
    """The MIDI systems this python-rtmidi was built with, by our names."""
    rtmidi = _rtmidi()
    have = set(rtmidi.get_compiled_api())
    return [n for n, c in _API_CONSTANTS.items() if getattr(rtmidi, c) in have]


@contextlib.contextmanager
def quiet_stderr():
    """fd 2 to /dev/null for a moment: libjack prints its failed connection attempts there,
    and the error we raise says it in one line. Used while a session starts, before its
    threads write anything."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def jack_running() -> bool:
    """Whether a JACK server answers (a client of RtMidi's opens on it; none is started)."""
    rtmidi = _rtmidi()
    if "jack" not in compiled_apis():
        return False
    try:
        with quiet_stderr():
            probe = rtmidi.MidiIn(rtapi=rtmidi.API_UNIX_JACK, name="musicsteer-probe")
    except rtmidi.RtMidiError:
        return False
    probe.delete()
    return True


def resolve_api(name: str = "auto") -> str:
    """The MIDI system `name` (API_NAMES) stands for here; MidiError naming what is missing."""
    if name not in API_NAMES:
        raise MidiError(f"unknown MIDI API {name!r}; choose one of {', '.join(API_NAMES)}")
    have = compiled_apis()
    if name == "auto":
        if jack_running():
            return "jack"
        native = NATIVE.get(sys.platform)
        if native is None or native not in have:
            raise MidiError(f"{NO_MIDI}; this python-rtmidi has no {native or 'native MIDI'} API for "
                            f"{sys.platform} (it has {', '.join(have) or 'none'})")
        if native == "alsa" and not os.path.exists(ALSA_SEQ):
            raise MidiError(f"{NO_MIDI}, or make ALSA's sequencer available ({ALSA_SEQ} is missing: modprobe snd-seq)")
        return native
    if name not in have:
        hint = f"; {REBUILD}" if name in ("jack", "alsa") else f" (it runs on {_platform_of(name)})"
        raise MidiError(f"no MIDI system: this python-rtmidi has no {name} API (it has {', '.join(have) or 'none'})"
                        + hint)
    return name


def _platform_of(api: str) -> str:
    return {"coremidi": "macOS", "winmm": "Windows"}.get(api, "Linux")


def _client(name: str, output: bool = False, api: str = "jack"):
    """A MIDI client of RtMidi's on `api` (a resolved name); MidiError with what to do if its
    system is not there (JACK not running, no ALSA sequencer)."""
    rtmidi = _rtmidi()
    if api not in compiled_apis():
        resolve_api(api)  # says what is missing
    try:
        client = (rtmidi.MidiOut if output else rtmidi.MidiIn)(rtapi=getattr(rtmidi, _API_CONSTANTS[api]), name=name)
    except rtmidi.RtMidiError as exc:
        if api == "jack":
            raise MidiError(f"{NO_MIDI} ({exc})") from None
        raise MidiError(f"no MIDI system: cannot open {api} MIDI ({exc})") from None
    client.set_error_callback(lambda kind, message, data: log.warning("rtmidi: %s", message))
    if not output:
        client.ignore_types(sysex=True, timing=True, active_sense=True)
    return client


def list_input_ports(api: str = "jack") -> list[str]:
    """The MIDI sources on `api` (the names `port` and `--midi-in` match against)."""
    client = _client("musicsteer-list", api=resolve_api(api))
    try:
        return client.get_ports()
    finally:
        client.delete()


def find_ports(pattern: str, names: list[str]) -> list[str]:
    """Names equal to `pattern`, else those containing it (case-insensitive)."""
    if pattern in names:
        return [pattern]
    return [n for n in names if pattern.lower() in n.lower()]


@dataclass(frozen=True)
class MidiStats:
    received: int  # MIDI messages read
    applied: int  # settings ControlState took
    rejected: int  # settings ControlState refused (logged)
    ignored: int  # messages that set nothing (unbound, held by pickup, a held note's release)
    errors: int  # undecodable messages and unexpected failures (logged)
    reconnects: int  # times the followed port came back and was reopened
    learned: int  # bindings MIDI learn wrote
    port: str | None  # the followed source now connected, or None


class MidiController:
    """MIDI in, through `mapping`, into `controls` (see the module docstring)."""

    def __init__(self, controls: ControlState, mapping: Mapping, port: str | None = None,
                 client_name: str = "musicsteer", *, poll_s: float = 1.0, api: str = "auto",
                 scenes=None) -> None:
        """`api` is the MIDI system (API_NAMES; resolved at start); `scenes` the SceneBank a
        mapping's scene bindings store and recall through (None: they are refused)."""
        self.controls, self.mapping, self.port = controls, mapping, port
        self.api_choice, self.api, self.scenes = api, None, scenes
        self.client_name, self.poll_s = client_name, poll_s
        self.virtual_port = f"{client_name}:in"
        self._virtual = self._link = None
        self._link_name: str | None = None
        self._lost = False
        self._learner: MidiLearner | None = None
        self._ports_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._received = self._applied = self._rejected = self._ignored = self._errors = 0
        self._reconnects = self._learned = self._watch_errors = 0

    # -- life cycle ------------------------------------------------------------------------

    def start(self) -> MidiController:
        if self._threads:
            return self
        self.api = resolve_api(self.api_choice)
        if self.api == "winmm" and self.port is None:
            raise MidiError("Windows MIDI (winmm) has no virtual inputs: name the input to follow with --midi-in NAME")
        probe = _client(f"{self.client_name}-probe", output=True, api=self.api)  # lists the inputs already there
        try:
            if any(n == self.virtual_port or n.startswith(self.virtual_port + " ") for n in probe.get_ports()):
                raise MidiError(f"a MIDI input named {self.virtual_port} exists already (another musicsteer?); "
                                f"choose another client name")
        finally:
            probe.delete()
        self._virtual = _client(self.client_name, api=self.api)
        try:
            if self.api != "winmm":
                self._virtual.open_virtual_port("in")
            if self.port is not None:
                names = self._virtual.get_ports()
                matches = find_ports(self.port, names)
                if len(matches) != 1:
                    what = "no MIDI input matches" if not matches else "several MIDI inputs match"
                    raise MidiError(f"{what} {self.port!r}; inputs: {', '.join(matches or names) or 'none'}")
                self._open_link(matches[0])
        except BaseException:
            self._close_ports()
            raise
        self._stop.clear()
        self._threads = [threading.Thread(target=self._read_loop, name="midi-reader", daemon=True)]
        if self.port is not None:
            self._threads.append(threading.Thread(target=self._watch_loop, name="midi-watcher", daemon=True))
        for t in self._threads:
            t.start()
        log.info("MIDI (%s) in on %s%s", self.api, self.virtual_port, f", following {self._link_name}" if self._link else "")
        return self

    def stop(self) -> None:
        """Stop the threads and close the JACK clients; safe to call twice."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5.0)
        self._threads = []
        self._close_ports()

    def __enter__(self) -> MidiController:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def stats(self) -> MidiStats:
        return MidiStats(self._received, self._applied, self._rejected, self._ignored,
                         self._errors + self._watch_errors,
                         self._reconnects, self._learned, self._link_name if self._link is not None else None)

    def set_mapping(self, mapping: Mapping) -> None:
        """Use another mapping from the next message on (its binding states start fresh)."""
        self.mapping = mapping

    def learn(self, param: str, path: Path | str | None = None, **options) -> MidiLearner:
        """Arm MIDI learn: the next knob moved binds `param` (options as `MidiLearner.arm`),
        is written to `path` (default: the mapping's file) and takes effect at once.
        While armed, control changes go to the learner only (notes and bends still play).
        Wait on the returned learner (`wait(timeout)`) or poll its `done`."""
        path = path if path is not None else self.mapping.path
        if path is None:
            raise MidiError("MIDI learn needs a mapping file to write to")
        learner = MidiLearner(path, self.controls.concepts)
        learner.arm(param, **options)
        return self.attach_learner(learner)

    def attach_learner(self, learner: MidiLearner) -> MidiLearner:
        """Give the next control changes to an armed learner (it replaces one armed before)."""
        self._learner = learner
        return learner

    # -- ports -----------------------------------------------------------------------------

    def _open_link(self, name: str) -> None:
        link = _client(f"{self.client_name}-link", api=self.api)
        try:
            link.open_port(link.get_ports().index(name), "in")
        except (ValueError, OSError) as exc:  # it went away between the listing and now
            link.delete()
            raise MidiError(f"cannot open MIDI input {name!r}: {exc}") from None
        self._link, self._link_name = link, name

    def _close_link(self) -> None:
        if self._link is not None:
            self._link.close_port()
            self._link.delete()
            self._link = None

    def _close_ports(self) -> None:
        with self._ports_lock:
            self._close_link()
            if self._virtual is not None:
                self._virtual.close_port()
                self._virtual.delete()
                self._virtual = None

    def _watch_loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self._check_port()
            except Exception:  # keep watching; the next poll tries again
                self._watch_errors += 1
                log.exception("MIDI port watcher")

    def _check_port(self) -> None:
        with self._ports_lock:
            if self._virtual is None:
                return
            names = self._virtual.get_ports()
            if self._link is not None:
                if self._link_name in names:
                    return
                log.warning("MIDI input %s disappeared; reconnecting when it comes back", self._link_name)
                self._close_link()
                self._lost = True
            matches = find_ports(self.port, names)
            if not matches:
                return
            self._open_link(matches[0])
            if self._lost:
                self._reconnects += 1
                self._lost = False
                log.warning("MIDI input %s is back", self._link_name)

    # -- messages --------------------------------------------------------------------------

    def _read_loop(self) -> None:
        last = time.monotonic()
        while not self._stop.is_set():
            got = self._drain()
            learner = self._learner
            if learner is not None and learner.armed:
                self._learned_from(learner, learner.poll(time.monotonic()))
            now = time.monotonic()
            if got:
                last = now
            time.sleep(ACTIVE_POLL_S if now - last < QUIET_S else IDLE_POLL_S)

    def _drain(self) -> bool:
        batch = []
        with self._ports_lock:
            for source, client in ((self.virtual_port, self._virtual), (self._link_name, self._link)):
                while client is not None:
                    item = client.get_message()
                    if item is None:
                        break
                    batch.append((source, item[0]))
        for source, data in batch:
            try:
                self._dispatch(source, data)
            except Exception:  # a bug, not bad input: say so and keep the stream of knobs alive
                self._errors += 1
                log.exception("MIDI message %s from %s", data, source)
        return bool(batch)

    def _dispatch(self, source: str, data: list[int]) -> None:
        self._received += 1
        try:
            msg = mido.Message.from_bytes(data)
        except ValueError as exc:
            self._errors += 1
            log.warning("midi:%s: cannot decode %s (%s)", source, data, exc)
            return
        learner = self._learner
        if learner is not None and learner.armed and msg.type == "control_change":
            self._learned_from(learner, learner.feed(msg, time.monotonic()))
            return
        settings = self.mapping.handle(msg, self.controls.current)
        if not settings:
            self._ignored += 1
        for s in settings:
            try:
                if isinstance(s, SceneAction):
                    self._scene(s, source)
                else:
                    self.controls.set(s.param, s.value, source=f"midi:{source}", smooth_ms=s.smooth_ms)
                self._applied += 1
            except MusicsteerError as exc:  # ControlError, SceneError: the setting is refused
                self._rejected += 1
                log.warning("midi:%s: %s", source, exc)

    def _scene(self, action: SceneAction, source: str) -> None:
        if self.scenes is None:
            raise MidiError("this session has no scenes")
        if action.scene is None:
            self.scenes.panic(source=f"midi:{source}")
        else:
            self.scenes.recall(action.scene, action.seconds, source=f"midi:{source}")

    def _learned_from(self, learner: MidiLearner, mapping: Mapping | None) -> None:
        if mapping is not None:
            self.mapping = mapping
            self._learned += 1
            log.info("MIDI learn: %s", describe(learner.binding))
        if learner.done:
            self._learner = None


def describe(b: CCBinding) -> str:
    ch = f"channel {b.channel}" if b.channel is not None else "any channel"
    cc = f"cc {b.cc}/{b.cc + 32} (14-bit)" if b.bits == 14 else f"cc {b.cc}"
    return f"{cc} on {ch} -> {b.param}"


class MidiLearner:
    """Binds the next control change to an armed parameter and saves it in a mapping file.

    A CC N in 0..31 followed within `pair_window_s` by CC N + 32 on the same channel
    binds a 14-bit pair; any other CC binds 7-bit (`bits` forces one or the other). The
    binding listens on the channel the knob sent on (or any, with `any_channel`). It
    replaces the file's bindings of the same parameter and of the same knob
    (`mapping.conflicts`). Feed it messages (`feed`) and call `poll` now and then (it
    settles a lone CC as 7-bit once the window has passed); a MidiController does both.

    Threading: `arm`, `cancel` and `wait` from any thread; `feed` and `poll` from one."""

    def __init__(self, path: Path | str, concepts=None, pair_window_s: float = LEARN_PAIR_S) -> None:
        self.path, self.concepts, self.pair_window_s = Path(path), concepts, pair_window_s
        self.binding: CCBinding | None = None
        self.mapping: Mapping | None = None
        self.error: Exception | None = None
        self._table: dict | None = None
        self._bits: int | None = None
        self._any = False
        self._pending: tuple[int, int, float] | None = None  # (cc, channel, time) waiting for its LSB
        self._done = threading.Event()
        self._lock = threading.Lock()

    @property
    def armed(self) -> bool:
        return self._table is not None

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def arm(self, param: str, *, range: tuple[float, float] | None = None, curve: str = "linear",
            shape: float | None = None, takeover: str = "pickup", smooth_ms: float = 0.0, bits: int | None = None,
            any_channel: bool = False) -> None:
        """Wait for a knob for `param`; the options are checked now (MappingError)."""
        if bits not in (None, 7, 14):
            raise MappingError(f"bits must be 7 or 14, got {bits!r}")
        table = {"cc": 0, "param": param}
        if param != "prompt_slot":
            # a parameter without a knob range gets [0, 1]; cc_binding then says why it cannot be bound
            knob = default_range(param) or (0.0, 1.0)
            table.update(range=list(range) if range is not None else list(knob),
                         curve=curve, smooth_ms=smooth_ms, takeover=takeover)
            if shape is not None:
                table["shape"] = shape
        prompts = Mapping.load(self.path).prompts if self.path.exists() else ()
        cc_binding(table, prompts, self.concepts)  # raises with the reason
        with self._lock:
            self._table, self._bits, self._any = table, bits, any_channel
            self._pending, self.binding, self.mapping, self.error = None, None, None, None
            self._done.clear()

    def cancel(self) -> None:
        with self._lock:
            self._table = self._pending = None
            self._done.set()

    def wait(self, timeout: float | None = None) -> CCBinding:
        """The learned binding; MidiError if none came within `timeout` s or saving failed."""
        if not self._done.wait(timeout):
            raise MidiError(f"no control change arrived within {timeout:g} s")
        if self.error is not None:
            raise self.error
        if self.binding is None:
            raise MidiError("MIDI learn was cancelled")
        return self.binding

    def feed(self, msg, now: float | None = None) -> Mapping | None:
        """Offer a message; returns the file's new mapping when it completed a binding."""
        if msg.type != "control_change":
            return None
        now = time.monotonic() if now is None else now
        cc, channel = msg.control, msg.channel + 1
        with self._lock:
            if self._table is None:
                return None
            if self._pending is not None:
                msb, msb_channel, t0 = self._pending
                if cc == msb + 32 and channel == msb_channel and now - t0 <= self.pair_window_s:
                    return self._bind(msb, channel, 14)
                if self._bits != 14:
                    return self._bind(msb, msb_channel, 7)  # the knob moved on without an LSB
            if self._bits == 7 or (cc > 31 and self._bits is None):
                return self._bind(cc, channel, 7)
            if cc <= 31:
                self._pending = (cc, channel, now)
            return None

    def poll(self, now: float | None = None) -> Mapping | None:
        """Settle a lone CC as 7-bit once its LSB's window has passed."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if self._pending is None or self._bits == 14 or now - self._pending[2] <= self.pair_window_s:
                return None
            return self._bind(self._pending[0], self._pending[1], 7)

    def _bind(self, cc: int, channel: int, bits: int) -> Mapping | None:
        table = dict(self._table, cc=cc, bits=bits)
        if not self._any:
            table["channel"] = channel
        self._table = self._pending = None
        try:
            prompts = Mapping.load(self.path).prompts if self.path.exists() else ()
            binding = cc_binding(table, prompts, self.concepts)
            self.mapping = add_cc_binding(self.path, binding, self.concepts)
            self.binding = next(b for b in self.mapping.cc_bindings if b.param == binding.param and b.cc == cc)
        except (MusicsteerError, OSError) as exc:
            self.error = exc if isinstance(exc, MusicsteerError) else MidiError(f"cannot write {self.path}: {exc}")
            log.warning("MIDI learn: %s", self.error)
            self.mapping = None
        self._done.set()
        return self.mapping
