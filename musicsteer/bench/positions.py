"""Threading model: the calling thread only, with no stream running (it sets up the decoder's
own caches).

What the KV cache and the re-prime cost, like for like in one process: the decoder step
(`DecodeStep` on the CFG batch, eager, unsteered) at chosen window positions, and the
re-prime's prefill of n positions at a chosen depth, taking turns in rounds so that a
host whose speed drifts weighs on every figure alike. What the caches hold does not
matter for time: a step reads the filled length whatever it holds. From the two fits
(step = s0 + s1 * position, slice = a + b * n) it predicts the decoder's cost per frame
over a window cycle (the step's mean over the positions a cycle visits plus the
re-prime's share) for a few windows, which is the trade-off the window length sets.

It knows nothing of audio, sinks or the stream's threads.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ..live.producer import StreamConfig
from ..model.config import FRAME_RATE
from ..model.loading.load import LoadedModel
from ..model.sampling import SamplingSettings, make_generator
from ..model.step import DecodeStep
from ..model.text import condition_rows


def position_costs(model: LoadedModel, positions: list[int], slices: list[int], depth: int, steps: int = 10,
                   rounds: int = 3) -> dict:
    """p50 ms of the decoder step at each cache position and of a prefill of n positions starting
    at cache position `depth`, each timed `steps` times per round."""
    decoder = model.decoder
    cfg = decoder.cfg
    length = min(max(max(positions) + 1, depth + max(slices)), cfg.max_positions)
    device = decoder.embed.weight.device
    with torch.inference_mode():
        decoder.setup_caches(2, max_len=length)
        states, mask = model.text.encode("benchmark stream")
        decoder.set_condition(*condition_rows(states, mask, 2))
        step = DecodeStep(decoder, 2)
        sampling, generator = SamplingSettings(seed=0), make_generator(0, device)
        column = torch.full((cfg.codebooks,), cfg.special_token, dtype=torch.long, device=device)  # (K,)
        cols = torch.full((2, cfg.codebooks, max(slices)), cfg.special_token, dtype=torch.long, device=device)
        where = torch.arange(length, device=device)  # (L,)
        step(column, 0, sampling, generator)  # warm up
        step_ms = {p: [] for p in positions}
        slice_ms = {n: [] for n in slices}
        for _ in range(rounds):
            for p in positions:
                for _ in range(steps):
                    t0 = time.perf_counter()
                    step(column, p, sampling, generator)
                    step_ms[p].append((time.perf_counter() - t0) * 1e3)
            for n in slices:
                for _ in range(max(steps // 3, 2)):
                    t0 = time.perf_counter()
                    decoder.hidden_states(cols[..., :n], where[depth : depth + n], kv_len=depth + n)
                    slice_ms[n].append((time.perf_counter() - t0) * 1e3)
    steps_p50 = {p: float(np.median(v)) for p, v in step_ms.items()}
    slices_p50 = {n: float(np.median(v)) for n, v in slice_ms.items()}
    s1, s0 = np.polyfit(list(steps_p50), list(steps_p50.values()), 1)
    b, a = np.polyfit(list(slices_p50), list(slices_p50.values()), 1)
    return {
        "step_ms_by_position": {str(p): v for p, v in steps_p50.items()},
        "step_fit_ms": {"at_0": float(s0), "per_position": float(s1)},
        "prefill_depth": depth,
        "prefill_ms_by_slice": {str(n): v for n, v in slices_p50.items()},
        "prefill_ms_per_position_by_slice": {str(n): v / n for n, v in slices_p50.items()},
        "prefill_fit_ms": {"per_slice": float(a), "per_position": float(b)},
        "rounds": rounds, "steps": steps,
        "what": "decoder step (CFG batch, eager, unsteered, sampling included) by cache position and the "
                "re-prime prefill by slice size, taking turns in rounds in one process; p50 per figure",
    }


def cycle_cost(costs: dict, window_s: float, keep_s: float, chunk: int, codebooks: int,
               max_positions: int) -> dict:
    """Predicted decoder cost per frame over a window cycle from the fits in `costs` (ms)."""
    config = StreamConfig("", window_s=window_s, keep_s=keep_s, reprime_chunk=chunk)
    window, keep = config.positions(max_positions, codebooks)
    margin = config.reprime_margin(keep)
    s = costs["step_fit_ms"]
    f = costs["prefill_fit_ms"]
    start = keep + margin  # the window after a re-prime holds about keep + margin positions
    end = window - margin  # the next re-prime has caught up by here
    steps = end - start
    step_mean = s["at_0"] + s["per_position"] * (start + end) / 2
    filled = keep + margin  # positions a re-prime runs, in about `margin` slices
    reprime = filled * f["per_position"] + (filled / chunk) * f["per_slice"]
    return {"window_s": window_s, "keep_s": keep_s, "reprime_chunk": chunk,
            "cycle_s": steps / FRAME_RATE, "step_mean_ms": step_mean, "reprime_ms_per_cycle": reprime,
            "reprime_share_ms": reprime / steps, "decoder_per_frame_ms": step_mean + reprime / steps,
            "reprime_slice_ms": f["per_slice"] + chunk * f["per_position"]}
