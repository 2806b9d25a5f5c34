"""Threading model: the owner thread calls `start`, `drain` (blocks up to its timeout)
and `stop` (idempotent; joins the supervisor and blocks until PortAudio has stopped).
`stats`, `output_time`, `stream_time` and `output_latency_s` may be called from any
thread and only wait for a short Python lock. The C callback runs on PortAudio's audio
thread, never takes the GIL or a lock, and is the ring's only consumer while the sink
is started. One supervisor thread (started by `start`, joined by `stop`) polls the
ring action every few ms, restarts it after an underrun and fetches the status-flag
counts; it and the public methods share that Python lock, which the audio thread never
sees. Device lookup (`list_output_devices`, the constructor) and `release_portaudio`
change PortAudio's global state under a module lock; the device list is rescanned (so a
JACK server started after import is found) only while no sink stream is open.

Plays an `AudioRing` on a PortAudio output device through rtmixer's C callback.

The audio callback is rtmixer's, written in C: each period it copies what the ring
holds into the device buffer without the GIL, so Python threads (the model, the
controllers) can hold the GIL as long as they like without starving the device. Devices
are looked up with sounddevice; when a JACK server runs, its device is the default.

rtmixer on a short ring (read from its C source, 0.1.7, and checked on JACK): the
PLAY_RINGBUFFER action copies the frames that are there into the block (the block was
zeroed first, so the rest is silence) and then *ends the action*; the stream keeps
running and plays silence, but nothing reads the ring any more. A supervisor thread
here turns that into "play what is there, zero-fill, count one underrun, carry on": it
notices the ended action, counts one underrun, and starts a new action on the same ring
as soon as `resume_frames` are buffered again. The silence played in between (the
rest of the short block plus the silent blocks until the restart) is measured from the
actions' DAC times and counted as underrun frames once playback resumes. Playback
never stops because the producer was late; only the restart after an underrun needs
the GIL, for a moment.

At the end of a stream, `drain()` plays out what is left (even below `resume_frames`)
and does not count the ring running empty as an underrun.

Timing: within one action frames play back to back, and each action records the
`outputBufferDacTime` of its first frame (`actual_time`), so `output_time(i)` gives the
PortAudio stream time (the clock of `stream_time()`, `Pa_GetStreamTime`) at which ring
frame `i` reaches the DAC. On JACK, PortAudio computes it as the JACK frame clock plus
the latency of the playback port it is connected to (512 frames, 16 ms, on the dummy
backend at -p 256), while `output_latency_s` (the stream's reported latency) says one
period (8 ms). DAC times carry a few frames of jitter (JACK's frame clock is
interpolated).

Status flags: rtmixer counts PortAudio's callback flags (paOutputUnderflow etc.; on
JACK, every xrun of the graph sets paOutputUnderflow) in the callback's state; the
supervisor fetches and resets them every STATS_EVERY_S and sums them.

The stream is mono on the device's first output channel (on JACK, PortAudio connects
`PortAudio:out_0` to `system:playback_1` only).

This module knows nothing of the model or of how the ring is filled.
"""

from __future__ import annotations

import collections
import logging
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from musicsteer.errors import MusicsteerError
from musicsteer.live.ring_buffer import AudioRing

log = logging.getLogger(__name__)

JACK_HOSTAPI = "JACK Audio Connection Kit"
NO_DEVICE_HINT = "use --out FILE.wav or --null"
POLL_PLAYING_S = 0.005  # how soon an ended (starved) ring action is noticed
POLL_STARVED_S = 0.002  # how often a starved ring is checked for enough audio to resume
STATS_EVERY_S = 0.25  # how often status-flag counts are fetched from the callback
MAX_SEGMENTS = 256  # playback segments (one per underrun) kept for output_time()


class AudioDeviceError(MusicsteerError):
    """No usable audio output device; the message is one line for the user."""


@dataclass(frozen=True)
class SinkStats:
    frames_played: int  # frames the callback took from the ring
    underruns: int  # times the ring ran dry while playing (one per stretch of silence)
    underrun_frames: int  # silent frames played in place of audio (counted on resume/stop)
    output_latency_s: float | None  # PortAudio's reported output latency of the stream
    callbacks: int  # audio callbacks (blocks) run
    min_blocksize: int
    max_blocksize: int
    output_underflows: int  # callbacks PortAudio flagged paOutputUnderflow (JACK xruns)
    output_overflows: int
    active: bool  # the PortAudio stream is running
    starved: bool  # playback is paused until the ring holds `resume_frames` again
    error: str | None  # why the stream stopped by itself, if it did


# --- device lookup ---------------------------------------------------------------------

_pa_lock = threading.Lock()
_open_streams = 0


def _portaudio() -> Any:
    """sounddevice, with PortAudio's device list fresh if no sink stream is open."""
    with _pa_lock:
        imported = "sounddevice" in sys.modules
        try:
            import sounddevice as sd  # the first import initialises PortAudio (a scan)
        except OSError as e:  # libportaudio missing
            raise AudioDeviceError(
                f"no audio output device: PortAudio is not installed ({e}); {NO_DEVICE_HINT}"
            ) from None
        if not sd._initialized:  # terminated by release_portaudio()
            sd._initialize()
        elif imported and _open_streams == 0:
            # Pa_Terminate + Pa_Initialize is PortAudio's only rescan; it would close
            # open streams, hence only when none of ours is open.
            sd._terminate()
            sd._initialize()
        return sd


def release_portaudio() -> None:
    """Terminate PortAudio (closing its JACK client) while no sink stream is open.

    Call it before a JACK server this process used goes away: PortAudio's JACK host API
    keeps a client on the server from initialisation to termination, and terminating
    after the server died fails an assertion in pa_jack.c (Debian's libportaudio2
    19.6.0) and aborts the process. The next device lookup initialises PortAudio again.
    """
    with _pa_lock:
        sd = sys.modules.get("sounddevice")
        if sd is None or not sd._initialized:
            return
        if _open_streams:
            raise RuntimeError("release_portaudio() while a PortAudioSink is open")
        while sd._initialized:
            sd._terminate()


def _describe(sd: Any, index: int) -> str:
    info = sd.query_devices(index)
    return f"{info['name']}, {sd.query_hostapis(info['hostapi'])['name']}"


def _output_indices(sd: Any) -> list[int]:
    return [i for i, d in enumerate(sd.query_devices()) if d["max_output_channels"] > 0]


def list_output_devices() -> list[str]:
    """Output devices as "device name, host API name" (each is a valid `device`)."""
    sd = _portaudio()
    return [_describe(sd, i) for i in _output_indices(sd)]


def _resolve(sd: Any, device: str | int | None) -> int:
    outputs = _output_indices(sd)
    if not outputs:
        raise AudioDeviceError(
            f"no audio output device: PortAudio finds none (no sound card, no JACK server); "
            f"{NO_DEVICE_HINT}"
        )
    available = "; ".join(_describe(sd, i) for i in outputs)
    if device is None:
        for api in sd.query_hostapis():
            if api["name"] == JACK_HOSTAPI and api["default_output_device"] in outputs:
                return api["default_output_device"]
        default = sd.default.device[1]
        return default if default in outputs else outputs[0]
    if isinstance(device, str) and device.strip().isdigit():
        device = int(device)
    if isinstance(device, int):
        if device in outputs:
            return device
        raise AudioDeviceError(
            f"no audio output device number {device} (outputs: {available}); {NO_DEVICE_HINT}"
        )
    try:
        return int(sd.query_devices(device, "output")["index"])
    except ValueError as e:
        what = "ambiguous" if str(e).startswith("Multiple") else "not found"
        raise AudioDeviceError(
            f"no audio output device: {device!r} {what} (outputs: {available}); {NO_DEVICE_HINT}"
        ) from None


def _check_rate(sd: Any, index: int, sample_rate: int) -> None:
    try:
        sd.check_output_settings(index, channels=1, dtype="float32", samplerate=sample_rate)
    except sd.PortAudioError as e:
        info = sd.query_devices(index)
        hint = ""
        if sd.query_hostapis(info["hostapi"])["name"] == JACK_HOSTAPI:
            rate = info["default_samplerate"]
            hint = f"; JACK runs at {rate:.0f} Hz: start it with -r {sample_rate}"
        raise AudioDeviceError(
            f"audio output {_describe(sd, index)!r} cannot play {sample_rate} Hz ({e}){hint}"
        ) from None


# --- the sink --------------------------------------------------------------------------


@dataclass
class _Segment:
    """One ring action: ring frames [first, first + action.done_frames) played back to back."""

    first: int
    action: Any  # rtmixer's `struct action*`; done_frames/actual_time written by the callback


class PortAudioSink:
    """Plays a mono float32 `AudioRing` on a PortAudio output device (rtmixer, C callback).

    `device`: None (JACK's device when a JACK server runs, else PortAudio's default
    output), a device number, or a name substring as sounddevice matches it (one of
    `list_output_devices()` works). `blocksize` 0 lets the host choose (JACK: its
    period). Raises AudioDeviceError when there is no such device or it cannot play
    `sample_rate`; no resampling is done here.
    """

    def __init__(
        self,
        device: str | int | None = None,
        sample_rate: int = 32000,
        blocksize: int = 0,
        latency: str | float = "low",
    ):
        self.sample_rate = int(sample_rate)
        self.blocksize = int(blocksize)
        self.latency = latency
        sd = _portaudio()
        self.device_index = _resolve(sd, device)
        self.device_name = _describe(sd, self.device_index)
        _check_rate(sd, self.device_index, self.sample_rate)
        self._state_lock = threading.Lock()  # start/stop
        self._lock = threading.Lock()  # supervisor vs. public readers; never the audio thread
        self._mixer: Any = None
        self._ring: AudioRing | None = None
        self._final: SinkStats | None = None
        self._reset_counters()

    def _reset_counters(self) -> None:
        self._action: Any = None
        self._segments: collections.deque[_Segment] = collections.deque(maxlen=MAX_SEGMENTS)
        self._played_once = False
        self._ran_short: tuple[float, int] | None = None  # (actual_time, done_frames) of
        # the action that ran short, until the silence after it is counted
        self._underruns = 0
        self._underrun_frames = 0
        self._flags = dict(blocks=0, output_underflows=0, output_overflows=0)
        self._min_block = 0
        self._max_block = 0
        self._fetch: Any = None
        self._next_fetch = 0.0  # time.monotonic() of the next status-flag fetch
        self._latency: float | None = None
        self._draining = False  # the producer is done: running empty is the end, not an underrun
        self._frames_before = 0  # ring frames read before this sink started
        self._error: str | None = None
        self._stop_evt = threading.Event()
        self._thread: threading.Thread | None = None

    # --- owner thread ----------------------------------------------------------------

    def start(
        self, ring: AudioRing, prefill_frames: int | None = None, resume_frames: int | None = None
    ) -> None:
        """Open the stream and play `ring` once it holds `prefill_frames` (default half).

        After an underrun, playback resumes once the ring holds `resume_frames` again
        (default: `prefill_frames`).
        """
        global _open_streams
        with self._state_lock:
            if self._mixer is not None:
                raise RuntimeError("PortAudioSink is already started")
            self._prefill = ring.capacity // 2 if prefill_frames is None else prefill_frames
            self._resume = self._prefill if resume_frames is None else resume_frames
            if not 1 <= self._resume <= ring.capacity or not 1 <= self._prefill <= ring.capacity:
                raise ValueError("prefill_frames and resume_frames must be in [1, capacity]")
            import rtmixer

            self._reset_counters()
            self._final = None
            owner = f"PortAudioSink({self.device_name})"
            self._pa_ring = ring.attach_consumer(owner)
            try:
                mixer = rtmixer.Mixer(
                    device=self.device_index,
                    channels=1,
                    samplerate=self.sample_rate,
                    blocksize=self.blocksize,
                    latency=self.latency,
                )
            except Exception as e:  # sounddevice.PortAudioError, or ValueError from it
                ring.detach_consumer(owner)
                raise AudioDeviceError(
                    f"cannot open audio output {self.device_name!r}: {e}"
                ) from None
            with _pa_lock:
                _open_streams += 1
            self._mixer, self._ring, self._owner = mixer, ring, owner
            self._latency = float(mixer.latency)
            self._frames_before = ring.metrics().frames_read
            try:
                mixer.start()
                with self._lock:
                    self._poll()
                self._thread = threading.Thread(
                    target=self._supervise, name="portaudio-sink", daemon=True
                )
                self._thread.start()
            except BaseException:
                self._teardown()
                raise

    def stop(self) -> None:
        """Stop playback and close the stream; safe to call in any state, any number of times."""
        with self._state_lock:
            if self._mixer is None:
                return
            self._stop_evt.set()
            if self._thread is not None:
                self._thread.join()
            self._teardown()

    def _teardown(self) -> None:
        global _open_streams
        mixer, ring = self._mixer, self._ring
        try:
            try:
                mixer.stop()  # Pa_StopStream: lets the buffers already queued play out
                with self._lock:
                    self._finish_accounting()
            except Exception as e:  # the device went away (e.g. JACK server shut down)
                log.warning("stopping audio output %s: %s", self.device_name, e)
                self._error = self._error or f"stop failed: {e}"
            with self._lock:
                self._final = self._snapshot(active=False)
        finally:
            mixer.close(ignore_errors=True)
            ring.detach_consumer(self._owner)
            self._mixer = None
            with _pa_lock:
                _open_streams -= 1

    def drain(self, timeout: float = 30.0) -> bool:
        """Wait until all audio written so far has reached the DAC; True if it did in time.

        For the end of a stream, after the producer's last write: while draining, the
        rest of the ring plays even below `resume_frames`, and running empty is not
        counted as an underrun. Writing again afterwards resumes normal playback.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            if self._mixer is None:
                return True
            self._draining = True
        try:
            while time.monotonic() < deadline:
                with self._lock:
                    ring, mixer = self._ring, self._mixer
                    if mixer is None or not mixer.active:  # stopped meanwhile, or failed
                        return False
                    last = ring.metrics().frames_written - 1
                    if ring.read_available() == 0 and self._action is None:
                        if last < 0 or not self._played_once:
                            return True
                        end = self._output_time(last)
                        if end is None or mixer.time >= end + 1 / self.sample_rate:
                            return True
                time.sleep(POLL_PLAYING_S)
            return False
        finally:
            with self._lock:
                self._draining = False

    def __enter__(self) -> PortAudioSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- any thread ------------------------------------------------------------------

    @property
    def output_latency_s(self) -> float | None:
        """PortAudio's output latency of the open stream (None when not started)."""
        return None if self._mixer is None else self._latency

    def stream_time(self) -> float | None:
        """PortAudio stream time now (`Pa_GetStreamTime`), the clock of `output_time`."""
        mixer = self._mixer
        return None if mixer is None else float(mixer.time)

    def output_time(self, frame_index: int) -> float | None:
        """Stream time at which ring frame `frame_index` (counted from the ring's first
        write) reaches the DAC; None if the callback has not taken it yet or it is older
        than the last MAX_SEGMENTS underruns."""
        with self._lock:
            return self._output_time(frame_index)

    def _output_time(self, frame_index: int) -> float | None:
        for seg in reversed(self._segments):
            if frame_index >= seg.first:
                if frame_index < seg.first + seg.action.done_frames:
                    return seg.action.actual_time + (frame_index - seg.first) / self.sample_rate
                return None
        return None

    def stats(self) -> SinkStats:
        with self._lock:
            if self._mixer is None:
                return self._final or self._snapshot(active=False)
            return self._snapshot(active=bool(self._mixer.active))

    # --- supervisor thread -------------------------------------------------------------

    def _supervise(self) -> None:
        delay = POLL_STARVED_S
        while not self._stop_evt.wait(delay):
            try:
                with self._lock:
                    delay = self._poll()
            except Exception as e:  # a bug here would silently end resumption: say so
                log.exception("audio output supervisor failed")
                self._error = f"supervisor failed: {e!r}"
                return
            if delay is None:
                return

    def _poll(self) -> float | None:
        """One look at the stream; returns the delay before the next, None to end."""
        mixer, ring = self._mixer, self._ring
        if not mixer.active:
            self._error = self._error or "the stream stopped (device lost or callback aborted)"
            log.error("audio output %s: %s", self.device_name, self._error)
            return None
        self._poll_flags(mixer)
        if self._action is not None:
            if self._action in mixer.actions:  # (this also drains rtmixer's result queue)
                self._settle_gap()
                return POLL_PLAYING_S
            # A ring action has no end of its own: it ended because the ring ran short.
            self._settle_gap()
            act = self._action
            self._action = None
            if not (self._draining and ring.read_available() == 0):
                self._ran_short = (act.actual_time, act.done_frames)
                self._underruns += 1
                ring.count_underrun(0, events=1)
        need = self._resume if self._played_once else self._prefill
        if self._draining:
            need = 1
        if ring.read_available() >= need:
            # No consumer runs now, so frames_read is stable and is the first frame's index.
            first = ring.metrics().frames_read
            self._action = mixer.play_ringbuffer(self._pa_ring)
            self._segments.append(_Segment(first, self._action))
            self._played_once = True
            return POLL_PLAYING_S
        return POLL_STARVED_S

    def _settle_gap(self) -> None:
        """Count the silence between the action that ran short and the next one's first frame."""
        if self._ran_short is None or self._action is None or self._action.done_frames == 0:
            return
        self._count_silence(self._action.actual_time)

    def _count_silence(self, until: float) -> None:
        """Count the frames of silence from the end of the short action to DAC time `until`.

        An action starts at the beginning of a block, so with a fixed callback size B it
        took whole blocks and then r = done % B frames in the block where it ran short;
        the silence is that block's rest plus whole blocks up to `until`, which is a
        block start too: counting blocks cancels the jitter of the DAC times. With a
        variable callback size the times are used directly.
        """
        start, done = self._ran_short
        sr, block = self.sample_rate, self._fixed_block()
        if block:
            r = done % block
            last_block = start + (done - r) / sr
            gap = max(1, round((until - last_block) * sr / block)) * block - r
        else:
            gap = max(0, round((until - start) * sr) - done)
        self._underrun_frames += gap
        self._ring.count_underrun(gap, events=0)
        self._ran_short = None

    def _fixed_block(self) -> int:
        """The callback's frame count if it is known to be constant, else 0."""
        if self.blocksize:
            return self.blocksize  # PortAudio then calls back with exactly this many
        if self._flags["blocks"] and self._min_block == self._max_block:
            return self._min_block  # the host's own constant size (JACK: its period)
        return 0

    def _poll_flags(self, mixer: Any) -> None:
        now = time.monotonic()
        if self._fetch is not None and self._fetch not in mixer.actions:
            self._add_flags(self._fetch.stats)
            self._fetch = None
        if self._fetch is None and now >= self._next_fetch:
            self._fetch = mixer.fetch_and_reset_stats()
            self._next_fetch = now + STATS_EVERY_S

    def _add_flags(self, s: Any) -> None:
        if s.blocks:
            self._min_block = min(self._min_block or s.min_blocksize, s.min_blocksize)
            self._max_block = max(self._max_block, s.max_blocksize)
        for k in self._flags:
            self._flags[k] += getattr(s, k)

    def _finish_accounting(self) -> None:
        """After the stream stopped: collect the last counts from the callback's state."""
        mixer = self._mixer
        if self._fetch is not None and self._fetch not in mixer.actions:
            self._add_flags(self._fetch.stats)  # served before the stop
        self._fetch = None
        self._add_flags(mixer.stats)  # counted since the last served fetch
        if self._action is not None and self._action not in mixer.actions:
            self._settle_gap()
            act, self._action = self._action, None
            if act.done_frames:  # it ran short just before the stop
                self._ran_short = (act.actual_time, act.done_frames)
                self._underruns += 1
                self._ring.count_underrun(0, events=1)
        self._settle_gap()
        if self._ran_short is not None:  # starved until the stop: silence up to about now
            self._count_silence(mixer.time + self._latency)

    def _snapshot(self, active: bool) -> SinkStats:
        ring = self._ring
        return SinkStats(
            frames_played=0 if ring is None else ring.metrics().frames_read - self._frames_before,
            underruns=self._underruns,
            underrun_frames=self._underrun_frames,
            output_latency_s=self._latency,
            callbacks=self._flags["blocks"],
            min_blocksize=self._min_block,
            max_blocksize=self._max_block,
            output_underflows=self._flags["output_underflows"],
            output_overflows=self._flags["output_overflows"],
            active=active,
            starved=self._played_once and self._action is None,
            error=self._error,
        )
