"""Threading model: exactly one producer thread calls `write` (and only it changes
`frames_written` and `rejected_writes`). Exactly one consumer reads: either one
Python thread calling `read_into`, or a C callback whose Python owner (the PortAudio
sink) has called `attach_consumer` and reports the underruns the C side saw through
`count_underrun` from one thread of its own. `read_into` refuses to run while a C
consumer is attached. `metrics`, `read_available` and `write_available` may be called
from any thread. Nothing here blocks or takes a lock; the C side never touches the
GIL. The consistency of `metrics()` (frames_read = frames_written - fill, read with a
sequence counter) relies on the GIL making attribute reads and writes atomic.

The ring between the stream's producer and its audio sink: mono float32 PCM frames.

A single-producer single-consumer ring backed by PortAudio's lock-free ring buffer
(PaUtilRingBuffer, compiled into rtmixer's `_rtmixer` extension), so the consumer can
be rtmixer's C audio callback, which reads it without the GIL, or a Python thread
(WAV and null sinks) through `read_into`. Semantics: power-of-two capacity in frames;
writes are all-or-nothing and never block; a short read plays what is there,
zero-fills the rest and counts one underrun; `metrics()` returns a snapshot object.

This module knows nothing of devices, PortAudio streams or the model; importing it does
not initialise PortAudio.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pa_ringbuffer
from _rtmixer import ffi as _ffi
from _rtmixer import lib as _lib

# The same class rtmixer builds as `rtmixer.RingBuffer`, from the same CFFI instance,
# so `rtmixer.Mixer.play_ringbuffer` accepts it; made here without importing rtmixer,
# which would import sounddevice and initialise PortAudio.
_PaRingBuffer = pa_ringbuffer.init(_ffi, _lib)

FRAME_BYTES = 4  # one mono float32 sample


@dataclass(frozen=True)
class RingMetrics:
    capacity: int
    fill: int  # frames readable at the time of the snapshot
    frames_written: int
    frames_read: int
    underruns: int  # short reads (Python consumer) or stretches of silence (C consumer)
    underrun_frames: int  # frames of silence played in place of missing audio
    rejected_writes: int  # writes refused for lack of room


class AudioRing:
    """SPSC ring of mono float32 frames; `capacity` must be a power of two."""

    def __init__(self, capacity: int):
        if (
            isinstance(capacity, bool)
            or not isinstance(capacity, (int, np.integer))
            or capacity < 1
            or capacity & (capacity - 1)
        ):
            raise ValueError(f"ring capacity must be a power of two, got {capacity!r}")
        self.capacity = int(capacity)
        self._rb = _PaRingBuffer(FRAME_BYTES, self.capacity)
        self._ptr = self._rb._ptr
        self._frames_written = 0
        self._write_seq = 0  # odd while a write is in flight; lets metrics() retry
        self._rejected_writes = 0
        self._underruns = 0
        self._underrun_frames = 0
        self._consumer: str | None = None

    # --- producer side ---------------------------------------------------------------

    def write(self, block: np.ndarray) -> bool:
        """Append a whole block, or nothing (returns False) if it does not fit now.

        `block` is 1-D; float32 C-contiguous blocks are written without a copy (other
        dtypes are converted first). A block longer than the capacity can never fit
        and raises ValueError.
        """
        block = np.ascontiguousarray(block, dtype=np.float32)
        if block.ndim != 1:
            raise ValueError(f"ring blocks are 1-D mono frames, got shape {block.shape}")
        n = block.shape[0]
        if n > self.capacity:
            raise ValueError(f"block of {n} frames exceeds the ring capacity {self.capacity}")
        if n == 0:
            return True
        if _lib.PaUtil_GetRingBufferWriteAvailable(self._ptr) < n:
            self._rejected_writes += 1
            return False
        self._write_seq += 1
        written = _lib.PaUtil_WriteRingBuffer(self._ptr, _ffi.from_buffer(block), n)
        self._frames_written += written
        self._write_seq += 1
        # Room only grows between the check and the write unless a second producer wrote.
        assert written == n, "AudioRing.write called from more than one thread"
        return True

    def write_available(self) -> int:
        return _lib.PaUtil_GetRingBufferWriteAvailable(self._ptr)

    # --- consumer side ---------------------------------------------------------------

    def read_available(self) -> int:
        return _lib.PaUtil_GetRingBufferReadAvailable(self._ptr)

    def read_into(self, out: np.ndarray) -> int:
        """Copy up to len(out) frames into `out` and zero-fill the rest; never blocks.

        A short read counts one underrun and the missing frames. Returns the number of
        frames read. `out` is a writable 1-D float32 C-contiguous array.
        """
        if self._consumer is not None:
            raise RuntimeError(f"ring is already read by {self._consumer}")
        if (
            not isinstance(out, np.ndarray)
            or out.dtype != np.float32
            or out.ndim != 1
            or not out.flags.c_contiguous
            or not out.flags.writeable
        ):
            raise TypeError("read_into needs a writable 1-D C-contiguous float32 array")
        want = out.shape[0]
        if want == 0:
            return 0
        got = _lib.PaUtil_ReadRingBuffer(self._ptr, _ffi.from_buffer(out), want)
        if got < want:
            out[got:] = 0.0
            self._underruns += 1
            self._underrun_frames += want - got
        return got

    def attach_consumer(self, owner: str) -> _PaRingBuffer:
        """Hand the ring to a C consumer; returns the PaUtilRingBuffer wrapper it reads.

        Until `detach_consumer`, `read_into` raises, and the owner reports underruns
        with `count_underrun`.
        """
        if self._consumer is not None:
            raise RuntimeError(f"ring is already read by {self._consumer}")
        self._consumer = owner
        return self._rb

    def detach_consumer(self, owner: str) -> None:
        if self._consumer != owner:
            raise RuntimeError(f"ring is read by {self._consumer}, not {owner}")
        self._consumer = None

    def count_underrun(self, frames: int, events: int = 1) -> None:
        """For an attached C consumer's owner: record underrun events and silent frames."""
        self._underruns += events
        self._underrun_frames += frames

    # --- any thread ------------------------------------------------------------------

    def metrics(self) -> RingMetrics:
        for _ in range(1000):
            seq = self._write_seq
            if seq & 1:  # a write is between advancing the index and counting it
                os.sched_yield()
                continue
            written = self._frames_written
            fill = _lib.PaUtil_GetRingBufferReadAvailable(self._ptr)
            if self._write_seq == seq:
                break
        else:  # the producer never paused; fall back to an unpaired reading
            written = self._frames_written
            fill = min(_lib.PaUtil_GetRingBufferReadAvailable(self._ptr), written)
        return RingMetrics(
            capacity=self.capacity,
            fill=fill,
            frames_written=written,
            frames_read=written - fill,
            underruns=self._underruns,
            underrun_frames=self._underrun_frames,
            rejected_writes=self._rejected_writes,
        )

    def __repr__(self) -> str:
        m = self.metrics()
        return f"AudioRing(capacity={m.capacity}, fill={m.fill}, underruns={m.underruns})"
