"""Threading model: `SurfaceTap` is a producer observer: `step_done` and `audio_block`
run on the producer thread and only store (the meters' one read per step, while someone
watches, and a copy of the block into a small array). `frame()` runs on the web
server's loop thread: it reads those stores without a lock (a frame may mix two
steps' values: a meter's glitch, never an error) and does the level and spectrum
arithmetic there, off the producer thread.

What the web surface shows of the running engine: per-concept meters, the stream's
stats, the level and a spectrum of the audio just pushed to the ring (what plays a
buffer's length later). It knows the producer's observer interface and numpy; not
the web protocol's transport.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .producer import StepObserver

WINDOW = 2048  # samples the spectrum is taken over (64 ms at 32 kHz)
BANDS = 32  # log-spaced spectrum bands from 40 Hz to half the sample rate


class SurfaceTap(StepObserver):
    def __init__(self, meter, stats: Callable[[], object], sample_rate: int, watching: Callable[[], bool]) -> None:
        """`meter` is the steering Meter or None; `stats()` the producer's StreamStats;
        `watching()` says whether a client is connected (the meters are read only then)."""
        self.meter, self.stats, self.sample_rate, self.watching = meter, stats, sample_rate, watching
        self.meters: dict[str, float] = {}
        self._audio = np.zeros(WINDOW, dtype=np.float32)
        self._last = 0  # samples in the newest block
        self.blocks = 0
        freqs = np.fft.rfftfreq(WINDOW, 1.0 / sample_rate)
        edges = np.geomspace(40.0, sample_rate / 2, BANDS + 1)
        self._band = np.clip(np.searchsorted(edges, freqs) - 1, -1, BANDS - 1)  # bin -> band (-1: below)
        self._hann = np.hanning(WINDOW).astype(np.float32)

    # -- producer thread -------------------------------------------------------------------

    def step_done(self, step: int) -> None:
        if self.meter is not None and self.watching():
            self.meters = self.meter.read()

    def audio_block(self, audio: np.ndarray) -> None:
        n = min(len(audio), WINDOW)
        buf = self._audio
        buf[:-n] = buf[n:]
        buf[-n:] = audio[-n:]
        self._last = n
        self.blocks += 1

    # -- the web server's thread -------------------------------------------------------------

    def frame(self) -> dict:
        st = self.stats()
        audio = self._audio.copy()
        last = audio[-max(self._last, 1):]
        rms = float(np.sqrt(np.mean(last * last)))
        peak = float(np.max(np.abs(last)))
        power = np.abs(np.fft.rfft(audio * self._hann)) ** 2  # (WINDOW // 2 + 1,)
        keep = self._band >= 0
        bands = np.bincount(self._band[keep], weights=power[keep], minlength=BANDS)
        spectrum = 10.0 * np.log10(bands / (WINDOW * WINDOW / 4) + 1e-12)  # dB against a full-scale sine
        return {
            "meters": {k: round(float(v), 5) for k, v in self.meters.items()},
            "stats": {"step_ms": round(st.step_ms_p50, 3), "step_ms_max": round(st.step_ms_max, 3),
                      "buffer": round(st.ring_fill, 4), "underruns": st.underruns, "rtf": round(st.realtime_factor, 3),
                      "steps": st.steps, "audio_s": round(st.audio_s, 3), "running": st.running},
            "level": {"rms": round(rms, 6), "peak": round(peak, 6),
                      "db": round(20.0 * np.log10(max(rms, 1e-6)), 2)},
            "spectrum": [round(float(x), 1) for x in np.maximum(spectrum, -120.0)],
        }


def start_web(request, controls, producer, plan, meter, scenes, sample_rate: int):
    """The web surface of a live session (`request.web_port`), started, its address (and
    token) printed on stderr; and its tap added to the producer's observers."""
    import sys

    from ..controllers.web.access import Access
    from ..controllers.web.protocol import WebRouter
    from ..controllers.web.server import WebServer

    router = WebRouter(controls, plan.names if plan is not None else [], scenes, smooth_ms=request.osc_smooth_ms)
    holder = {}
    tap = SurfaceTap(meter, producer.stats, sample_rate, lambda: holder["web"].watched)
    web = holder["web"] = WebServer(router, Access.make(request.web_host, request.web_port), tap.frame)
    producer.observers.append(tap)
    web.start()
    print(f"musicsteer: web surface at {web.url}", file=sys.stderr, flush=True)
    return web
