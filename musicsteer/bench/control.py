"""`musicsteer bench control`: control-to-sound latency, end to end, from the engine's
own stamps.

An OSC client sends strength changes to a running stream at random moments. For each
change, two latencies are followed to the device's output time for a ring index
(PortAudio's stamp, moved onto the engine's clock):

- first dependent sample: step s that applied the change generates codebook K-1 of
  frame s-K+1, and the codec is not causal (a sample depends on codes up to 3.75
  frames ahead: the streaming decoder's `lookahead_samples`, 2402 for the 32 kHz
  codec), so the first sample whose value depends on step s lies that many samples
  before frame s-K+1 starts. Parts: waiting for the step, compute (from the step to the
  codec pushing that sample into the ring), ring buffer, device.
- first steered frame: frame s, the first frame whose every codebook was generated at
  or after step s, and its final audio. Parts: waiting for the step, delay pattern
  (until step s+K-1 completes frame s), codec look-ahead (until its audio is pushed),
  ring buffer, device.
Each breakdown adds up to its total by construction.
"""

from __future__ import annotations

import random
import socket
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from pythonosc.osc_message_builder import OscMessageBuilder

from ..codec.stream import StreamingCodecSettings
from ..controllers.state import ControlState
from ..errors import MusicsteerError
from .timeline import Timeline
from ..live.session import LiveRequest, run_live
from ..live.window import default_window
from ..model.loading.load import LoadedModel
from ..model.sampling import SamplingSettings
from ..steering.pack import ConceptPack
from .latency import git_commit, machine_info

PARTS = ("wait_for_step", "delay_pattern", "codec_lookahead", "ring_buffer", "device")
DEPENDENT_PARTS = ("wait_for_step", "compute", "ring_buffer", "device")


def clock_offset(sink, tries: int = 20) -> float:
    """monotonic - stream time, from the tightest of a few paired readings."""
    best = None
    for _ in range(tries):
        t1 = time.monotonic()
        st = sink.stream_time()
        t2 = time.monotonic()
        if st is not None and (best is None or t2 - t1 < best[0]):
            best = (t2 - t1, (t1 + t2) / 2 - st)
    if best is None:
        raise MusicsteerError("the audio device reports no stream time")
    return best[1]


def measure(timeline: Timeline, sink, K: int, hop: int, horizon: int) -> list[dict]:
    """Latencies of every change in `timeline`; `horizon`: samples of codes the codec reads ahead."""
    offset = clock_offset(sink)
    device = sink.output_latency_s or 0.0

    def played(sample: int):
        """(ring index, push time, output time on our clock) of stream sample `sample`."""
        pushed = timeline.sample_pushed(sample)
        if pushed is None:
            return None
        ring_index = pushed[0]
        out = sink.output_time(ring_index)
        return None if out is None else (ring_index, pushed[1], out + offset)

    rows = []
    for _, received, _, s in timeline.changes:
        if s + K - 1 >= len(timeline.step_end) or np.isnan(timeline.step_end[s + K - 1]):
            continue
        steered = played(s * hop)
        dependent = played(max((s - (K - 1)) * hop - horizon, 0))
        if steered is None or dependent is None:
            continue
        t_step, t_frame = timeline.step_start[s], timeline.step_end[s + K - 1]
        _, t_push, t_out = steered
        _, d_push, d_out = dependent
        rows.append({
            "step": s,
            "steered_frame": {"total": t_out - received, "wait_for_step": t_step - received,
                              "delay_pattern": t_frame - t_step, "codec_lookahead": t_push - t_frame,
                              "ring_buffer": (t_out - device) - t_push, "device": device},
            # the push can precede the step's end when the sample came out of an earlier chunk
            "dependent_sample": {"total": d_out - received, "wait_for_step": t_step - received,
                                 "compute": max(d_push, t_step) - t_step,
                                 "ring_buffer": (d_out - device) - max(d_push, t_step), "device": device},
        })
    return rows


def run_control_bench(model: LoadedModel, device: str | None, messages: int, interval_s: float,
                      buffer_ms: float, seed: int = 0, codec_chunk: int = 1, codec_precision: str = "float32",
                      codec_overlap: bool = True) -> dict:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        pack = Path(tmp) / "pack"
        ConceptPack.random(["c0"], model.cfg, model.model_id, seed=seed).save(pack)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        timeline = Timeline(steps=int((messages * interval_s * 2 + 30) * 50))
        stop, holder, result = threading.Event(), {}, {}
        window_s, keep_s = default_window(model.decoder.embed.weight.device.type)  # as live has them
        request = LiveRequest("benchmark", SamplingSettings(seed=seed), device=device, concepts=pack,
                              osc_port=port, buffer_ms=buffer_ms, window_s=window_s, keep_s=keep_s,
                              codec=StreamingCodecSettings(chunk=codec_chunk, precision=codec_precision,
                                                           overlap=codec_overlap),
                              status=False)

        def on_start(producer):
            producer.observers.append(timeline)
            holder["producer"] = producer

        def play():
            try:
                result["live"] = run_live(model, request, ControlState(["c0"]), stop=stop, on_start=on_start,
                                          on_sink=lambda sink: holder.update(sink=sink))
            except Exception as exc:  # reported below, in this thread's caller
                result["error"] = exc

        thread = threading.Thread(target=play, daemon=True)
        thread.start()
        deadline = time.monotonic() + 120
        while "sink" not in holder:
            if "error" in result:
                raise result["error"]
            if time.monotonic() > deadline:
                raise MusicsteerError("the stream did not start playing within 120 s")
            time.sleep(0.01)
        time.sleep(1.0)  # past start-up
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            for i in range(messages):
                b = OscMessageBuilder("/musicsteer/concept/c0/strength")
                b.add_arg(float(i % 10) / 10 + 0.05)
                client.sendto(b.build().dgram, ("127.0.0.1", port))
                time.sleep(interval_s * rng.uniform(0.5, 1.5))
        time.sleep(1.0 + buffer_ms / 1000)  # let the last changes reach the device
        rows = measure(timeline, holder["sink"], model.cfg.codebooks, model.codec.hop,
                       holder["producer"].codec_stream.lookahead_samples)
        stats = holder["producer"].stats()
        stop.set()
        thread.join(30)
    if not rows:
        raise MusicsteerError("no control change could be followed to the device")
    summary = {}
    for kind, parts in (("dependent_sample", DEPENDENT_PARTS), ("steered_frame", PARTS)):
        summary[kind] = {}
        for key in ("total", *parts):
            ms = np.array([r[kind][key] for r in rows]) * 1e3
            summary[kind][key] = {"p50": float(np.median(ms)), "p95": float(np.percentile(ms, 95)),
                                  "p99": float(np.percentile(ms, 99)), "max": float(ms.max()),
                                  "mean": float(ms.mean())}
    return {"benchmark": "control", "commit": git_commit(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": machine_info(model.decoder.embed.weight.device), "model": model.model_id,
            "device": device, "buffer_ms": buffer_ms, "codec": asdict(request.codec), "messages": messages,
            "followed": len(rows),
            "underruns": stats.underruns, "ms": summary,
            "definitions": {
                "dependent_sample": "OSC arrival -> device output time of the first sample whose value depends "
                                    "on the step s that applied the change",
                "steered_frame": "OSC arrival -> device output time of the first sample of frame s, the first "
                                 "frame whose every codebook was generated at or after step s"}}


def format_control(record: dict) -> str:
    lines = [f"bench control: {record['model']}, buffer {record['buffer_ms']:.0f} ms, "
             f"{record['followed']}/{record['messages']} changes followed, {record['underruns']} underruns"]
    for kind, parts in (("dependent_sample", DEPENDENT_PARTS), ("steered_frame", PARTS)):
        lines.append(f"{kind.replace('_', ' ')}: {record['definitions'][kind]}")
        lines.append(f"{'part':>16} {'p50':>7} {'p95':>7} {'p99':>7} {'max':>7}  (ms)")
        table = record["ms"][kind]
        for key in ("total", *parts):
            m = table[key]
            lines.append(f"{key:>16} {m['p50']:7.1f} {m['p95']:7.1f} {m['p99']:7.1f} {m['max']:7.1f}")
        lines.append(f"{'':>16} the parts' means add up to {sum(table[k]['mean'] for k in parts):.1f} ms "
                     f"(mean total {table['total']['mean']:.1f})")
    return "\n".join(lines)
