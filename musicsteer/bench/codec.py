"""`musicsteer bench codec`: the streaming decoder's cost per frame, early and late in a
long stream of random codes. It needs neither the model's decoder nor the live stream.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ..codec.stream import StreamingCodecSettings, StreamingDecoder
from ..model.loading.load import LoadedModel
from .latency import git_commit, machine_info


def run_codec_bench(model: LoadedModel, frames: int, chunk: int, method: str = "state") -> dict:
    gen = torch.Generator().manual_seed(0)
    per_frame = []
    with torch.inference_mode():
        settings = StreamingCodecSettings(chunk=chunk, method=method)
        warm = StreamingDecoder(model.codec, model.cfg.codebooks, settings)
        for _ in range(60):  # warm the allocator and kernels, then time a fresh stream
            warm.push(torch.randint(0, model.cfg.vocab, (model.cfg.codebooks,), generator=gen))
        dec = StreamingDecoder(model.codec, model.cfg.codebooks, settings)
        for _ in range(frames):
            code = torch.randint(0, model.cfg.vocab, (model.cfg.codebooks,), generator=gen)
            t = time.perf_counter()
            dec.push(code)
            per_frame.append(time.perf_counter() - t)
    ms = np.array(per_frame) * 1e3

    def window(lo: int) -> float:  # mean cost per frame over 50 frames from `lo` (includes the decodes)
        return float(ms[lo:lo + 50].mean())

    return {"benchmark": "codec", "commit": git_commit(), "machine": machine_info(torch.device("cpu")),
            "model": model.model_id, "codec": model.codec.source, "method": type(dec).__name__, "chunk": chunk,
            "lookahead_samples": dec.lookahead_samples, "frames": frames,
            "ms_per_frame_at_10": window(10), "ms_per_frame_at_end": window(frames - 50),
            "ms_per_frame_mean": float(ms[10:].mean())}
