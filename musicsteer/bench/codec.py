"""`musicsteer bench codec`: the streaming decoder's cost per frame, early and late in a
long stream of random codes, for the native plan where each stage's time goes, and, for a
reduced precision, how far its audio is from the offline float32 decode. It needs neither the
model's decoder nor the live stream.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from ..codec.stream import StreamingCodecSettings, StreamingDecoder
from ..model.loading.load import LoadedModel
from .latency import git_commit, machine_info

FIDELITY_FRAMES = 200  # frames decoded both ways for the SNR against the offline float32 decode


def run_codec_bench(model: LoadedModel, frames: int, chunk: int, method: str = "state",
                    precision: str = "float32", native: bool = True, threads: int = 1) -> dict:
    gen = torch.Generator().manual_seed(0)
    per_frame = []
    settings = StreamingCodecSettings(chunk=chunk, method=method, precision=precision, native=native, threads=threads)
    with torch.inference_mode():
        warm = StreamingDecoder(model.codec, model.cfg.codebooks, settings)
        for _ in range(60):  # warm the allocator and kernels, then time a fresh stream
            warm.push(torch.randint(0, model.cfg.vocab, (model.cfg.codebooks,), generator=gen))
        dec = StreamingDecoder(model.codec, model.cfg.codebooks, settings)
        stages = getattr(dec, "stage_seconds", None)  # the native plan's clocks, per stage
        if stages:
            stages()
        for _ in range(frames):
            code = torch.randint(0, model.cfg.vocab, (model.cfg.codebooks,), generator=gen)
            t = time.perf_counter()
            dec.push(code)
            per_frame.append(time.perf_counter() - t)
    ms = np.array(per_frame) * 1e3
    steady = ms[10:]
    calls = steady[: len(steady) // chunk * chunk].reshape(-1, chunk).sum(1)  # per decode call (chunk frames)

    def window(lo: int) -> float:  # mean cost per frame over 50 frames from `lo` (includes the decodes)
        return float(ms[lo:lo + 50].mean())

    record = {"benchmark": "codec", "commit": git_commit(), "machine": machine_info(torch.device("cpu")),
              "model": model.model_id, "codec": model.codec.source, "method": type(dec).__name__, "chunk": chunk,
              "precision": precision, "threads": threads if type(dec).__name__ == "NativeDecoder" else None,
              "lookahead_samples": dec.lookahead_samples,
              "latency_frames": dec.latency_frames, "frames": frames,
              "ms_per_frame_at_10": window(10), "ms_per_frame_at_end": window(frames - 50),
              "ms_per_frame_mean": float(steady.mean()),
              "ms_per_call_p50": float(np.percentile(calls, 50)),
              "ms_per_call_p99": float(np.percentile(calls, 99)),
              "load_average_1min": os.getloadavg()[0]}  # the host's load when timed: other work on the cores
    if stages:
        record["stage_ms_per_frame"] = stage_split(stages(), frames)
    if precision != "float32":
        record["snr_db_vs_offline_float32"] = fidelity_snr(model, settings)
    return record


def stage_split(times: list[tuple[str, float]], frames: int) -> dict:
    """Milliseconds per frame by kind of stage (the LSTM, convolutions, transposed convolutions, the
    pointwise and residual sums), and the transposed convolutions and residual blocks one by one."""
    split: dict = {}
    convt, blocks, depth = [], [], 0
    for kind, seconds in times:
        ms = seconds * 1e3 / frames
        group = {"elu": "pointwise", "open": "pointwise", "close": "pointwise"}.get(kind, kind)
        split[group] = split.get(group, 0.0) + ms
        if kind == "convt":
            convt.append(ms)
        depth += {"open": 1, "close": -1}.get(kind, 0)
        if kind == "open":
            blocks.append(0.0)
        if depth or kind == "close":
            blocks[-1] += ms
    return {**{k: round(v, 4) for k, v in split.items()}, "convt_each": [round(v, 4) for v in convt],
            "residual_each": [round(v, 4) for v in blocks]}


def fidelity_snr(model: LoadedModel, settings: StreamingCodecSettings) -> float:
    """SNR (dB) of a streamed decode of random codes against the offline float32 decode."""
    codes = torch.randint(0, model.cfg.vocab, (model.cfg.codebooks, FIDELITY_FRAMES),
                          generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        reference = model.codec.decode(codes).astype(np.float64)
        dec = StreamingDecoder(model.codec, model.cfg.codebooks, settings)
        parts = [a for f in range(FIDELITY_FRAMES) if (a := dec.push(codes[:, f])) is not None]
        audio = np.concatenate(parts + [dec.flush()]).astype(np.float64)
    return float(10 * np.log10((reference ** 2).sum() / ((audio - reference) ** 2).sum()))
