"""Threading model: the calling thread runs the session (live/session.py) and waits for it; a sender
thread runs liblo's `oscsend` every few seconds; the producer thread calls the step recorder
(`StepCosts`), which only stores floats, and the prompt worker builds the prompts.

`musicsteer bench prompts`: what a prompt change costs the producer.

A live session (real-time paced, no audio device) receives a new prompt over OSC every
`every` seconds of audio, sent by `oscsend` (a client nobody here wrote), and the same session runs
again without prompt changes; both are measured for `seconds` of audio from the moment their
prompt worker is ready (a worker process first imports torch and transformers). For every prompt swapped in it reports the step it was
swapped in at and the next one against their neighbours: a step is "clean" when it is no
longer than the p99 of the steps around it (50 before and after, the swap's own steps
left out) plus 1 ms. It also reports the underruns of both sessions and what each prompt
cost the worker (which a step used to pay in full).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time

import numpy as np

from ..codec.stream import StreamingCodecSettings
from ..errors import UsageError
from ..live.producer import StepObserver
from ..live.session import LiveRequest, start_session
from ..model.config import FRAME_RATE
from ..model.loading.load import LoadedModel
from ..model.sampling import SamplingSettings
from .latency import git_commit, machine_info

PROMPTS = ("warm lofi piano", "ambient pads, slow and evolving",  # 15 to 82 bytes, as in issue 16's figures
           "drum and bass with fast breakbeats, deep sub bass, dark atmosphere and a chopped vocal",
           "solo cello, baroque")
NEIGHBOURS = 50  # steps each side a swap's step is compared with
SLACK_MS = 1.0


class StepCosts(StepObserver):
    """Each step's cost (the producer's own time, ring wait excluded) and the steps prompts took effect at."""

    def __init__(self, steps: int) -> None:
        self.total = np.full(steps + 64, np.nan)
        self.swaps: list[tuple[int, int, str]] = []  # (step swapped in at, step asked at, text)
        self.install_ms: list[float] = []  # what each swap itself cost the producer
        self.build_ms: list[float] = []  # what building each prompt cost the worker (a step's cost before)
        self.producer = None

    def control_applied(self, change, step: int) -> None:
        if change.param.startswith("prompt") and not change.param.endswith(("weight", "morph")):
            self.swaps.append((step, change.received_step, str(change.value)))
            self.install_ms.append(self.producer.last_install_ms if self.producer is not None else float("nan"))
            self.build_ms.append(self.producer.last_build_ms if self.producer is not None else float("nan"))

    def step_timed(self, step: int, split) -> None:
        if step < len(self.total):
            self.total[step] = split.total


def send_prompts(port: int, every: float, stop: threading.Event, sent: list, audio_s, start: float = 0.0) -> None:
    """Every `every` seconds of audio after `start` (`audio_s()`, so a host too slow for real time still
    gets one change per `every` seconds of music), the next prompt to /musicsteer/prompt through oscsend."""
    i = 0
    while not stop.wait(0.01):
        if audio_s() < start + (i + 1) * every:
            continue
        text = f"{PROMPTS[i % len(PROMPTS)]} {i}"
        subprocess.run(["oscsend", "127.0.0.1", str(port), "/musicsteer/prompt", "s", text], check=True,
                       capture_output=True, timeout=10)
        sent.append((time.monotonic(), text))
        i += 1


def worker_ready(worker) -> bool:
    """Whether the session's prompt worker takes requests now (a worker process once its child answered)."""
    return worker.kind == "thread" or worker.child_pid is not None or getattr(worker, "fallback", False)


def run_session(model: LoadedModel, seconds: float, every: float | None, buffer_ms: float,
                codec_precision: str = "float32", prompt_worker: str = "auto", ready_timeout: float = 300.0) -> dict:
    """One session, measured for `seconds` of audio from the moment its prompt worker is ready (a child
    process imports torch and transformers first: seconds at the lowest priority on a busy host)."""
    costs = StepCosts(int((seconds + ready_timeout) * FRAME_RATE) + model.cfg.codebooks)
    request = LiveRequest(PROMPTS[0], SamplingSettings(seed=0), null="realtime", seconds=None,
                          buffer_ms=buffer_ms, osc_port=0, status=False,
                          codec=StreamingCodecSettings(precision=codec_precision), prompt_worker=prompt_worker)
    t0 = time.monotonic()
    parts = start_session(model, request, observers=[costs], on_start=lambda p: setattr(costs, "producer", p))
    stop, sent = threading.Event(), []
    sender = None
    producer = parts.producer
    try:
        while not worker_ready(producer.prompt_worker) and producer.running:
            if time.monotonic() - t0 > ready_timeout:
                raise UsageError(f"the prompt worker was not ready within {ready_timeout:g} s")
            time.sleep(0.05)
        ready_s = time.monotonic() - t0
        at = producer.stats()
        if every is not None:
            audio_s = lambda: producer.stats().audio_s  # noqa: E731
            sender = threading.Thread(target=send_prompts, args=(parts.osc.port, every, stop, sent, audio_s, at.audio_s),
                                      daemon=True)
            sender.start()
        while producer.running and producer.stats().audio_s < at.audio_s + seconds:
            time.sleep(0.05)
    finally:
        stop.set()
        result = parts.finish(drain=False)
        if sender is not None:
            sender.join(15)
    st = result.stats
    costs.total[:at.steps] = np.nan  # the steps before the worker was ready are not compared
    return {"underruns": st.underruns - at.underruns, "underruns_before_ready": at.underruns,
            "steps": st.steps - at.steps, "error": st.error, "sent": len(sent), "costs": costs,
            "first_audio_s": result.first_audio_s, "worker_ready_s": ready_s, "worker": producer.prompt_worker.kind}


def judge(total: np.ndarray, swaps: list[tuple[int, int, str]], install_ms: list[float],
          build_ms: list[float] | None = None) -> list[dict]:
    """Each swap's step and the next against the p99 of their neighbours plus SLACK_MS."""
    ms = total * 1e3
    out = []
    build_ms = build_ms if build_ms is not None else [float("nan")] * len(swaps)
    for (at, asked, text), swap_ms, built_ms in zip(swaps, install_ms, build_ms):
        lo, hi = max(at - NEIGHBOURS, 0), min(at + NEIGHBOURS + 2, len(ms))
        around = np.concatenate([ms[lo:at], ms[at + 2:hi]])
        around = around[~np.isnan(around)]
        p99 = float(np.percentile(around, 99)) if len(around) else float("nan")
        worst = float(np.nanmax(ms[at:at + 2]))
        out.append({"step": at, "asked_at": asked, "waited_steps": at - asked, "text_bytes": len(text.encode()),
                    "step_ms": worst, "neighbours_p99_ms": p99, "swap_ms": swap_ms, "build_ms": built_ms,
                    "clean": worst <= p99 + SLACK_MS})
    return out


def run_prompt_bench(model: LoadedModel, seconds: float = 30.0, every: float = 2.0, buffer_ms: float = 60.0,
                     codec_precision: str = "float32", prompt_worker: str = "auto") -> dict:
    if shutil.which("oscsend") is None:
        raise UsageError("bench prompts sends through liblo's oscsend: install liblo-tools "
                         "(scripts/debian-packages.txt)")
    load = [os.getloadavg()[0]] if hasattr(os, "getloadavg") else []
    plain = run_session(model, seconds, None, buffer_ms, codec_precision, prompt_worker)
    changed = run_session(model, seconds, every, buffer_ms, codec_precision, prompt_worker)
    costs = changed["costs"]
    swaps = judge(costs.total, costs.swaps, costs.install_ms, costs.build_ms)
    if load:
        load.append(os.getloadavg()[0])

    def summary(run: dict) -> dict:
        ms = run["costs"].total[~np.isnan(run["costs"].total)] * 1e3
        return {"underruns": run["underruns"], "steps": run["steps"], "error": run["error"],
                "first_audio_s": run["first_audio_s"], "worker_ready_s": run["worker_ready_s"],
                "underruns_before_ready": run["underruns_before_ready"],
                "step_ms_p50": float(np.median(ms)), "step_ms_p99": float(np.percentile(ms, 99)),
                "step_ms_max": float(ms.max())}

    device = model.decoder.embed.weight.device
    return {
        "benchmark": "prompts", "commit": git_commit(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(device), "model": model.model_id,
        "backend": model.backend.name if model.backend is not None else None,
        "load_average_1min": load,  # before and after: the rest of the host's demand
        "seconds": seconds, "every_s": every, "buffer_ms": buffer_ms, "slack_ms": SLACK_MS,
        "codec_precision": codec_precision, "prompt_worker": changed["worker"],
        "without_changes": summary(plain), "with_changes": dict(summary(changed), sent=changed["sent"]),
        "swaps": swaps, "clean": all(s["clean"] for s in swaps) and len(swaps) > 0,
    }


def first(run: dict) -> str:
    """When a session's first audio was in the ring and its worker ready, from its start."""
    audio = f"{run['first_audio_s']:.2f} s" if run.get("first_audio_s") is not None else "?"
    return (f"first audio {audio}, worker ready {run.get('worker_ready_s', float('nan')):.1f} s "
            f"({run.get('underruns_before_ready', 0)} underruns before)")


def format_report(record: dict) -> str:
    a, b = record["without_changes"], record["with_changes"]
    lines = [f"bench prompts: {record['model']} ({record['backend']}), {record['seconds']:g} s real time, a prompt "
             f"over OSC (oscsend) every {record['every_s']:g} s, built on a {record.get('prompt_worker', '?')}, "
             f"buffer {record['buffer_ms']:g} ms, host load {'/'.join(f'{x:.1f}' for x in record['load_average_1min']) or '?'}",
             f"  without changes: step p50 {a['step_ms_p50']:.1f} ms, p99 {a['step_ms_p99']:.1f}, max "
             f"{a['step_ms_max']:.1f}; {a['underruns']} underruns; {first(a)}",
             f"  with {b['sent']} changes:   step p50 {b['step_ms_p50']:.1f} ms, p99 {b['step_ms_p99']:.1f}, max "
             f"{b['step_ms_max']:.1f}; {b['underruns']} underruns; {first(b)}"]
    for s in record["swaps"]:
        lines.append(f"  swap at step {s['step']} ({s['waited_steps']} steps after it arrived, {s['text_bytes']} "
                     f"bytes, built in {s['build_ms']:.0f} ms, the swap {s['swap_ms']:.2f} ms): {s['step_ms']:.1f} ms vs neighbours' p99 "
                     f"{s['neighbours_p99_ms']:.1f} ms "
                     f"{'ok' if s['clean'] else 'LONGER'}")
    lines.append(f"every swap within its neighbours' p99 + {record['slack_ms']:g} ms: {record['clean']}")
    return "\n".join(lines)
