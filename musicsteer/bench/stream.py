"""Threading model: the calling thread runs the session (live/session.py) and waits for it;
a watcher thread samples memory and load once a second; with meters on, a listener thread
receives the OSC meters. The producer thread writes the split timer (split.py).

`musicsteer bench stream`: a long stream through the live producer, as a live session
has it.

It plays a stream for minutes through the real session (producer, ring, a sink paced
like a sound card), with K steered concepts of a random concept pack and, with meters
on, the OSC server and a subscribed listener (so the Meter + MeterPublisher path runs
every frame), across many window re-primes. It reports gaps (underruns), where each
frame's time goes (decoder step, codec, the re-prime's share, the rest) over whole
window cycles, what a re-prime costs, the decoder step early and late in the window,
the time to first sound from the process's start, and resident memory over time. The
codec alone is in codec.py.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from ..codec.stream import StreamingCodecSettings
from ..live.producer import StreamConfig
from ..live.session import LiveParts, LiveRequest, start_session
from ..model.config import FRAME_RATE
from ..model.loading.load import LoadedModel
from ..model.sampling import SamplingSettings
from .latency import git_commit, machine_info
from .split import SplitTimer, summarize

BUDGET_MS = 14.0  # per 20 ms frame, over a window cycle: the margin a shared, noisy host needs


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def process_started() -> float | None:
    """When this process started (time.time()), from /proc; None where there is no /proc."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, of this process) so far, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    busy = sum(int(v) for i, v in enumerate(fields[:8]) if i not in (3, 4))  # all but idle and iowait
    own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return busy / tick, (int(own[11]) + int(own[12])) / tick  # fields 14, 15: utime, stime


def tree_changes() -> list[str]:
    """Files changed in the working tree against the commit (others' work in progress shows here)."""
    try:
        out = subprocess.run(["git", "-c", "status.relativePaths=false", "status", "--short", "--untracked-files=no"],
                             check=False,
                             capture_output=True, text=True, timeout=5, cwd=Path(__file__).resolve().parent)
        return [line[3:] for line in out.stdout.splitlines()]
    except (OSError, subprocess.SubprocessError):
        return []


def random_pack(model: LoadedModel, k: int, directory: Path) -> list[str]:
    """A random concept pack of `k` concepts written to `directory`; their names."""
    from ..steering.pack import ConceptPack

    names = [f"c{i}" for i in range(k)]
    ConceptPack.random(names, model.cfg, model.model_id, seed=0).save(directory)
    return names


class MeterListener:
    """A UDP client subscribed to the session's meters: counts what arrives."""

    def __init__(self, port: int) -> None:
        from pythonosc.osc_message_builder import OscMessageBuilder

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port, self.meters, self.stats = port, 0, 0
        self._builder = OscMessageBuilder
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-meters", daemon=True)

    def _message(self, on: int) -> bytes:
        builder = self._builder("/musicsteer/listen")
        builder.add_arg(on)
        return builder.build().dgram

    def start(self) -> "MeterListener":
        self._thread.start()
        self.sock.sendto(self._message(1), ("127.0.0.1", self.port))
        return self

    def stop(self) -> None:
        self.sock.sendto(self._message(0), ("127.0.0.1", self.port))
        self._stop.set()
        self._thread.join(2.0)
        self.sock.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if data.startswith(b"/musicsteer/meter/"):
                self.meters += 1
            elif data.startswith(b"/musicsteer/stats"):
                self.stats += 1


def run_stream_bench(model: LoadedModel, seconds: float, realtime: bool, window_s: float, keep_s: float,
                     buffer_ms: float, concepts: int = 0, strength: float = 1.0, meters: bool = False,
                     reprime_chunk: int = 32, loaded_at: float | None = None, note: str | None = None,
                     precision: dict | None = None, window_cost: bool = False,
                     reprime_budget_ms: float | None = None, codec_precision: str = "float32",
                     codec_threads: int = 1, codec_overlap: bool = True) -> dict:
    """One stream of `seconds`; `loaded_at` (time.time()) is when the model was ready, `precision`
    what it was loaded with (dtype, weights, KV cache), for the record; `codec_precision` and
    `codec_threads` and `codec_overlap` the stateful codec's. `window_cost` adds, after the stream, the decoder step by window position and the
    re-prime's prefill by slice size (positions.py)."""
    begun = time.time()
    samples: list[tuple[float, float, float, float]] = []  # (wall s, audio s, rss MB, others' cores busy)
    stop = threading.Event()
    t0 = time.monotonic()
    holder: dict = {}

    def sample_memory():
        last_cpu, last_t = cpu_seconds(), time.monotonic()
        while not stop.wait(1.0):
            st = holder.get("producer")
            cpu, now = cpu_seconds(), time.monotonic()
            others = ((cpu[0] - last_cpu[0]) - (cpu[1] - last_cpu[1])) / (now - last_t)  # cores busy elsewhere
            last_cpu, last_t = cpu, now
            samples.append((now - t0, st.audio_pushed / model.codec.sample_rate if st else 0.0, rss_mb(), others))

    step_times: list[float] = []
    last = [time.perf_counter()]

    def hook(step):  # records the time between step starts: includes re-prime slices and pacing
        now = time.perf_counter()
        step_times.append(now - last[0])
        last[0] = now

    timer = SplitTimer(int(seconds * FRAME_RATE) + 64)
    with tempfile.TemporaryDirectory(prefix="musicsteer-bench-") as tmp:
        names = random_pack(model, concepts, Path(tmp)) if concepts else []
        request = LiveRequest("benchmark stream", SamplingSettings(seed=0), null="realtime" if realtime else "fast",
                              seconds=seconds, window_s=window_s, keep_s=keep_s, reprime_chunk=reprime_chunk,
                              reprime_budget_ms=reprime_budget_ms,
                              buffer_ms=buffer_ms, status=False, concepts=Path(tmp) if concepts else None,
                              steer={name: strength for name in names}, osc_port=0 if meters else None,
                              codec=StreamingCodecSettings(precision=codec_precision, threads=codec_threads,
                                                           overlap=codec_overlap))
        watcher = threading.Thread(target=sample_memory, daemon=True)
        watcher.start()
        listener = MeterListener(0) if meters else None
        try:
            parts = start_session(model, request, step_hook=hook, observers=[timer],
                                  on_start=lambda p: holder.update(producer=p))
            playing = time.monotonic()
            result = play(parts, listener)
        finally:
            stop.set()
    record = stream_record(model, result, timer, holder["producer"], step_times, samples, t0, begun, playing)
    producer = holder["producer"]
    record.update(seconds=seconds, window_s=window_s, keep_s=keep_s, reprime_chunk=result.stats.reprime_chunk,
                  reprime_budget_ms=reprime_budget_ms,
                  reprime_slice_cost_ms=list(producer.slice_cost) if producer.slice_cost else None,
                  buffer_ms=buffer_ms, concepts_steered=concepts, strength=strength if concepts else None,
                  paced="realtime" if realtime else "fast", precision=precision, note=note,
                  meters={"on": meters, "meter_messages": listener.meters if listener else 0,
                          "stats_messages": listener.stats if listener else 0})
    started = process_started()
    first = record["time_to_first_sound_s"]
    first["model_load"] = loaded_at - started if loaded_at and started else None
    wall = first.pop("_wall")
    first["from_process_start"] = wall - started if wall and started else None
    if window_cost:
        record["window_cost"] = window_costs(model, window_s, keep_s, result.stats.reprime_chunk)
    return record


def window_costs(model: LoadedModel, window_s: float, keep_s: float, chunk: int) -> dict:
    """positions.py's figures at this stream's window, and its predictions for other windows."""
    from .positions import cycle_cost, position_costs

    cfg = model.cfg
    window, keep = StreamConfig("", window_s=window_s, keep_s=keep_s, reprime_chunk=chunk).positions(
        cfg.max_positions, cfg.codebooks)
    positions = sorted({25, *range(250, window - 10, 250), window - 10})
    costs = position_costs(model, positions, [2, 4, 8, 16, 32, 64], depth=keep // 2)
    predicted = []
    for w, k in [(30, 10), (25, 10), (20, 10), (20, 5), (15, 5), (12, 4), (10, 4)]:
        try:
            predicted.append(cycle_cost(costs, w, k, chunk, cfg.codebooks, cfg.max_positions))
        except ValueError:  # a window that leaves this model no room to re-prime
            continue
    costs["predicted_per_frame"] = predicted
    costs["predicted_note"] = ("decoder step + re-prime share only (add the codec and the rest from the stream's "
                               "split); from the fits, at this reprime_chunk")
    return costs


def stream_record(model, result, timer, producer, step_times, samples, t0, begun, playing) -> dict:
    st = result.stats
    times = np.array(step_times[10:]) * 1e3
    rss = [s[2] for s in samples]
    third = max(len(rss) // 3, 1)
    first = producer.first_audio_at  # time.monotonic() of the first audio in the ring
    first_wall = time.time() - (time.monotonic() - first) if first is not None else None
    return {
        "benchmark": "stream", "commit": git_commit(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(model.decoder.embed.weight.device), "model": model.model_id,
        "working_tree_changes": tree_changes(),
        "frames": st.frames, "audio_s": st.audio_s, "underruns": st.underruns,
        "reprimes": st.reprimes, "error": st.error,
        "split": summarize(timer, BUDGET_MS, window_positions=producer.window),
        "time_to_first_sound_s": {
            "_wall": first_wall,
            "from_session_start": first_wall - begun if first_wall else None,
            "playback_started_after_session_start": playing - t0,
            "what": "first audio pushed into the ring (the sink's input); playback starts once the ring holds "
                    "the prebuffer",
        },
        "step_interval_ms": {"p50": float(np.median(times)), "p99": float(np.percentile(times, 99)),
                             "max": float(times.max())} if len(times) else {},
        "rss_mb": {"first_third_mean": float(np.mean(rss[:third])), "last_third_mean": float(np.mean(rss[-third:])),
                   "max": float(max(rss)), "samples": len(rss)} if rss else {},
        "other_processes_cores_busy": {
            "mean": float(np.mean([s[3] for s in samples])), "p90": float(np.percentile([s[3] for s in samples], 90)),
            "of_cores": os.cpu_count(),
            "what": "CPU the rest of the machine used while the stream ran (cores), sampled each second: a shared "
                    "host's other work, which the stream's figures include"} if samples else {},
        "wall_s": time.monotonic() - t0,
    }


def play(parts: LiveParts, listener: MeterListener | None):
    """Subscribe the listener to the session's meters, wait for the time limit (or the producer's
    end), then drain and finish the session; the listener is stopped in every case."""
    try:
        if listener is not None:
            listener.port = parts.osc.port
            listener.start()
        while parts.producer.running:
            time.sleep(0.02)
    finally:
        result = parts.finish(drain=True)
        if listener is not None:
            listener.stop()
    return result
