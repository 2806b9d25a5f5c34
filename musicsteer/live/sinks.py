"""Threading model: each sink runs one consumer thread that reads the ring with
`read_into` (never blocking the producer); `start`/`stop` are called from the
controlling thread. A real-time sink that finds the ring short plays (writes)
silence for the missing part, and the ring counts the underrun.

Python-side consumers of the ring buffer: a WAV file played in real time (a stand-in
for a sound card) and a null sink (real-time paced, or as fast as audio comes).
The PortAudio sink, whose consumer is a C callback, is in `portaudio_sink.py`.
"""

from __future__ import annotations

import threading
import time
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .ring_buffer import AudioRing


@dataclass(frozen=True)
class PlaybackStats:
    frames_played: int
    underruns: int
    started: bool


class PacedSink:
    """Consumes the ring in blocks, paced by the clock (`realtime`) or as fast as audio arrives."""

    def __init__(self, sample_rate: int, block: int = 640, realtime: bool = True) -> None:
        self.sample_rate, self.block, self.realtime = sample_rate, block, realtime
        self._stop = threading.Event()
        self._draining = threading.Event()  # the producer is done: play what is left, then end
        self._thread: threading.Thread | None = None
        self.frames_played = 0
        self.ring: AudioRing | None = None

    def write_block(self, block: np.ndarray) -> None:
        """Where a block goes; the null sink drops it."""

    def close(self) -> None:
        """Release what write_block wrote to."""

    def start(self, ring: AudioRing, prefill_frames: int | None = None, resume_frames: int | None = None) -> None:
        """Start consuming `ring` now (the caller waits for its prefill; a paced sink plays
        silence through underruns rather than pausing, so `resume_frames` is not used)."""
        self.ring = ring
        self._thread = threading.Thread(target=self._run, name=f"musicsteer-{type(self).__name__}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        buf = np.zeros(self.block, dtype=np.float32)
        t_next = time.monotonic()
        try:
            while not self._stop.is_set():
                if self._draining.is_set() and self.ring.read_available() < self.block:
                    break  # the stream ended: a short last read is not an underrun
                if self.realtime:
                    t_next += self.block / self.sample_rate
                    delay = t_next - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    self.ring.read_into(buf)  # short: zero-filled and counted as an underrun
                    self.write_block(buf)
                    self.frames_played += len(buf)
                elif self.ring.read_available() >= self.block:
                    self.ring.read_into(buf)
                    self.write_block(buf)
                    self.frames_played += len(buf)
                else:
                    time.sleep(0.001)
        finally:
            self.close()

    def drain(self, timeout: float = 30.0) -> None:
        """The stream has ended: play every whole block left in the ring, then stop consuming."""
        self._draining.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None

    def stats(self) -> PlaybackStats:
        m = self.ring.metrics() if self.ring is not None else None
        return PlaybackStats(self.frames_played, m.underruns if m else 0, self.ring is not None)


class NullSink(PacedSink):
    pass


class WavSink(PacedSink):
    """Plays into a 16-bit WAV file at the pace of a sound card (or as fast as audio comes)."""

    def __init__(self, path: Path, sample_rate: int, block: int = 640, realtime: bool = True) -> None:
        super().__init__(sample_rate, block, realtime)
        self.wav = wave.open(str(path), "wb")
        self.wav.setnchannels(1)
        self.wav.setsampwidth(2)
        self.wav.setframerate(sample_rate)

    def write_block(self, block: np.ndarray) -> None:
        self.wav.writeframes((np.clip(block, -1.0, 1.0) * 32767.0).astype("<i2").tobytes())

    def close(self) -> None:
        self.wav.close()
