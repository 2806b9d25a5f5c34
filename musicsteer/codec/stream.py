"""Threading model: a streaming decoder is created, pushed to and flushed on one thread (the
producer's); it holds its layers' past and shares nothing.

Streaming EnCodec decode for the live stream: which decoder, and the windowed one.

Two ways to turn frames of codes into audio as they arrive, both equal to an offline
decode of the whole stream to float32 round-off (tests/test_codec_stream.py):

- `state` (state.py, the default): every layer keeps what it needs of the past, so
  each frame is decoded once and its audio is emitted as soon as its last sample is final.
  Where the CPU kernels build it runs as one C call per decode (native.py, `native=True`, the
  default); else, or with `native=False`, as state.py's Python stages (the reference).
- `window`: every `chunk` frames, once `lookahead` more frames exist, the codec decodes a
  fixed window of `context` frames before the chunk, the chunk and the look-ahead, and
  the chunk's audio is emitted. It runs any codec the offline decode runs, and is what
  `StreamingDecoder` falls back to for a codec the stateful decoder cannot take.

At the start of a stream both pad as an offline decode does; `flush` decodes the tail
with no look-ahead, as an offline decode ends.

It knows nothing of the decoder, the ring buffer or threads; one thread calls it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from .codec import Codec
from .native import NativeDecoder, NotNative
from .state import PRECISIONS, NotStreamable, StatefulDecoder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamingCodecSettings:
    lookahead: int = 4  # frames of future codes a chunk waits for
    context: int = 25  # frames of past codes decoded with each chunk
    chunk: int = 1  # frames per decode: larger is cheaper per frame, adds latency
    method: str = "state"  # "state" (each frame decoded once) or "window" (lookahead and context apply)
    precision: str = "float32"  # "int8": the stateful decoder's large weights in int8 (an approximation)
    native: bool = True  # the stateful decoder as one C call per decode where it builds (codec/native.py)
    threads: int = 1  # the native plan's threads (0: the OpenMP team); 1 holds up on a busy host (docs/benchmarks.md)
    # A live stream's native one-thread decode on thread 0 of the next CPU decoder step, while its other
    # threads start the step (kernels/cpu_block.c ms_blocks_side): a frame's audio leaves one step later.
    overlap: bool = True

    def __post_init__(self) -> None:
        if self.chunk < 1 or self.lookahead < 0 or self.context < 0:
            raise ValueError("codec chunk must be >= 1 and look-ahead, context >= 0")
        if self.threads < 0:
            raise ValueError("codec threads must be >= 0 (0: the OpenMP team)")
        if self.method not in METHODS:
            raise ValueError(f"codec method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"codec precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.method == "window" and self.precision != "float32":
            raise ValueError("the windowed codec decodes offline, in float32: codec precision applies to 'state'")


METHODS = ("state", "window")


def StreamingDecoder(codec: Codec, codebooks: int, settings: StreamingCodecSettings = StreamingCodecSettings()):
    """The streaming decoder `settings` ask for: stateful where the codec allows it, else windowed."""
    if settings.method == "state":
        try:
            if settings.native:
                try:
                    return NativeDecoder(codec, codebooks, settings.chunk, settings.precision, settings.threads)
                except NotNative as exc:
                    log.info("the codec runs its Python stateful decoder: %s", exc)
            return StatefulDecoder(codec, codebooks, settings.chunk, settings.precision)
        except NotStreamable as exc:
            if settings.precision != "float32":
                log.warning("codec precision %s not applied: %s; the windowed decoder runs in float32",
                            settings.precision, exc)
    return WindowedDecoder(codec, codebooks, settings)


class WindowedDecoder:
    def __init__(self, codec: Codec, codebooks: int, settings: StreamingCodecSettings = StreamingCodecSettings()):
        self.codec, self.settings = codec, settings
        s = settings
        self.window = s.context + s.chunk + s.lookahead
        self.codes = torch.zeros((codebooks, self.window), dtype=torch.long)  # the last `window` frames
        self.held = 0  # frames in `codes` (the newest at the end)
        self.total = 0  # frames pushed since reset
        self.emitted = 0  # frames whose audio has been emitted
        self.lookahead_samples = settings.lookahead * codec.hop

    @property
    def emitted_samples(self) -> int:
        return self.emitted * self.codec.hop

    def reset(self) -> None:
        self.held = self.total = self.emitted = 0

    @property
    def latency_frames(self) -> int:
        """Frames between a frame's arrival and the emission of its audio, at most."""
        return self.settings.chunk - 1 + self.settings.lookahead

    @property
    def frames_until_decode(self) -> int:
        """Pushes until one decodes (1: the next)."""
        return max(self.settings.chunk + self.settings.lookahead - (self.total - self.emitted), 1)

    def warm_up(self) -> None:
        """Decode silence once at every window length a stream meets before its window is full.

        The codec's convolutions prepare their kernels per input length on first use (over
        100 ms each on CPU); doing it here keeps that off the first seconds of playback."""
        s = self.settings
        lengths, emitted = set(), 0
        while emitted - s.context < 0:
            lengths.add(emitted + s.chunk + s.lookahead)
            emitted += s.chunk
        lengths.add(self.window)
        zeros = torch.zeros((self.codes.shape[0], max(lengths)), dtype=torch.long)
        for n in sorted(lengths):
            self.codec.decode(zeros[:, :n])

    def push(self, frame: torch.Tensor) -> np.ndarray | None:
        """Add one frame of codes (K,); return newly final audio, or None."""
        if self.held == self.window:
            self.codes[:, :-1] = self.codes[:, 1:].clone()
            self.held -= 1
        self.codes[:, self.held] = frame
        self.held += 1
        self.total += 1
        if self.total - self.emitted < self.settings.chunk + self.settings.lookahead:
            return None
        return self._emit(self.settings.chunk)

    def flush(self) -> np.ndarray:
        """Audio of every frame not yet emitted, decoded without look-ahead (end of stream)."""
        pending = self.total - self.emitted
        if pending == 0:
            return np.zeros(0, dtype=np.float32)
        return self._emit(pending)

    def _emit(self, n: int) -> np.ndarray:
        first = self.total - self.held  # stream index of codes[:, 0]
        start = max(self.emitted - self.settings.context, first)
        window = self.codes[:, start - first : self.held]
        audio = self.codec.decode(window)
        hop = self.codec.hop
        offset = (self.emitted - start) * hop
        self.emitted += n
        return audio[offset : offset + n * hop]
