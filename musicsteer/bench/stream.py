"""`musicsteer bench stream`: a long stream through the live producer.

It plays a stream for minutes through the real producer and a sink paced like a
sound card, across many window re-primes, and reports gaps (underruns), step times
around re-primes, and resident memory over time. The codec alone is in codec.py.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from ..live.session import LiveRequest, run_live
from ..model.loading.load import LoadedModel
from ..model.sampling import SamplingSettings
from .latency import git_commit, machine_info


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_stream_bench(model: LoadedModel, seconds: float, realtime: bool, window_s: float, keep_s: float,
                     buffer_ms: float) -> dict:
    samples: list[tuple[float, float, float]] = []  # (wall s, audio s, rss MB)
    stop = threading.Event()
    t0 = time.monotonic()
    holder = {}

    def sample_memory():
        while not stop.wait(1.0):
            st = holder.get("producer")
            samples.append((time.monotonic() - t0, st.audio_pushed / 32000 if st else 0.0, rss_mb()))

    step_times: list[float] = []
    last = [time.perf_counter()]

    def hook(step):  # records the time between step starts: includes re-prime slices
        now = time.perf_counter()
        step_times.append(now - last[0])
        last[0] = now

    request = LiveRequest("benchmark stream", SamplingSettings(seed=0), null="realtime" if realtime else "fast",
                          seconds=seconds, window_s=window_s, keep_s=keep_s, buffer_ms=buffer_ms, status=False)
    watcher = threading.Thread(target=sample_memory, daemon=True)
    watcher.start()
    try:
        result = run_live(model, request, step_hook=hook, on_start=lambda p: holder.update(producer=p))
    finally:
        stop.set()
    st = result.stats
    times = np.array(step_times[10:]) * 1e3
    rss = [s[2] for s in samples]
    third = max(len(rss) // 3, 1)
    return {
        "benchmark": "stream", "commit": git_commit(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(model.decoder.embed.weight.device), "model": model.model_id,
        "paced": "realtime" if realtime else "fast", "seconds": seconds, "window_s": window_s, "keep_s": keep_s,
        "buffer_ms": buffer_ms, "frames": st.frames, "audio_s": st.audio_s, "underruns": st.underruns,
        "reprimes": st.reprimes, "error": st.error,
        "step_interval_ms": {"p50": float(np.median(times)), "p99": float(np.percentile(times, 99)),
                             "max": float(times.max())},
        "rss_mb": {"first_third_mean": float(np.mean(rss[:third])), "last_third_mean": float(np.mean(rss[-third:])),
                   "max": float(max(rss)), "samples": len(rss)},
        "wall_s": time.monotonic() - t0,
    }
