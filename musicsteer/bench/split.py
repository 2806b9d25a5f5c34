"""Threading model: the producer thread writes (through the observer calls, with the
producer's `timing` on); the benchmark reads after the producer has stopped.

Where each step of a live stream spends its time: a `StepObserver` that keeps every
step's `StepSplit` (decoder step, re-prime slice, codec, the rest; the codec's decode where it
ran inside the decoder step) and its window
position in preallocated arrays, and the summary `bench stream` reports: the mean
frame cost over whole window cycles (re-primes included) against the frame budget,
what a re-prime costs per cycle and on the steps where it runs, and the decoder step
early and late in the window. It knows nothing of sinks, OSC or the CLI.
"""

from __future__ import annotations

import numpy as np

from ..live.producer import StepObserver, StepSplit

PARTS = ("controls", "decode", "reprime", "codec", "ring_wait", "total", "codec_hidden")


class SplitTimer(StepObserver):
    """Every step's split for `steps` steps, and the window position its decoder step ran at."""

    def __init__(self, steps: int) -> None:
        self.parts = {name: np.full(steps, np.nan) for name in PARTS}  # seconds
        self.positions = np.zeros(steps, dtype=np.int64)  # positions re-primed per step
        self.window_pos = np.full(steps, -1, dtype=np.int64)  # cache position of the step's input

    def step_timed(self, step: int, split: StepSplit) -> None:
        if step >= len(self.positions):
            return
        for name in PARTS:
            self.parts[name][step] = getattr(split, name)
        self.positions[step] = split.reprime_positions
        self.window_pos[step] = split.position

    def steps(self) -> int:
        return int(np.count_nonzero(~np.isnan(self.parts["total"])))


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of True in `mask`."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def summarize(timer: SplitTimer, budget_ms: float, skip: int = 10, window_positions: int | None = None) -> dict:
    """The split per frame, the re-prime's cost, the decoder step early and late in the window (ms).

    A window cycle runs from the end of one re-prime to the end of the next; the mean over whole
    cycles is what a stream sustains. Without two re-primes, the mean over all steps after `skip`."""
    n = timer.steps()
    ms = {name: timer.parts[name][:n] * 1e3 for name in PARTS}
    positions = timer.positions[:n]
    reprime_runs = runs(positions > 0)
    ends = [end for _, end in reprime_runs if end < n or positions[n - 1] == 0]
    if len(ends) >= 2:
        span, cycles = slice(ends[0], ends[-1]), len(ends) - 1
    else:
        span, cycles = slice(min(skip, max(n - 1, 0)), n), 0
    frame = {name: float(np.mean(ms[name][span])) for name in PARTS}
    frame["other"] = frame["total"] - frame["decode"] - frame["reprime"] - frame["codec"]
    total = ms["total"][skip:]
    out = {
        "budget_ms": budget_ms,
        "per_frame_ms": {"decode": frame["decode"], "codec": frame["codec"], "reprime_share": frame["reprime"],
                         "other": frame["other"], "total": frame["total"],
                         "of_which_controls": frame["controls"], "ring_wait_excluded": frame["ring_wait"],
                         # the codec's decode on thread 0 of the decoder step (--codec-overlap): inside `decode`
                         "codec_inside_decode": frame["codec_hidden"]},
        "averaged_over": {"window_cycles": cycles, "steps": int(span.stop - span.start),
                          "what": "whole window cycles (end of one re-prime to the end of the next)" if cycles
                          else f"all steps after the first {skip} (fewer than two re-primes)"},
        "within_budget": frame["total"] <= budget_ms,
        "step_total_ms": {"p50": float(np.median(total)), "p99": float(np.percentile(total, 99)),
                          "max": float(total.max()), "over_budget": int(np.count_nonzero(total > budget_ms)),
                          "over_20ms": int(np.count_nonzero(total > 20.0))} if len(total) else {},
    }
    on = positions > 0
    if on.any():
        slice_ms = ms["reprime"][on]
        per_pos = slice_ms / positions[on]
        complete = [(a, b) for a, b in reprime_runs if b < n or positions[n - 1] == 0]
        per_cycle = [float(ms["reprime"][a:b].sum()) for a, b in complete]
        out["reprime"] = {
            "re_primes_completed": len(complete),
            "ms_per_window_cycle": float(np.mean(per_cycle)) if per_cycle else None,
            "steps_per_re_prime": float(np.mean([b - a for a, b in complete])) if complete else None,
            "positions_per_step": int(np.median(positions[on])),
            "slice_ms": {"p50": float(np.median(slice_ms)), "max": float(slice_ms.max())},
            "ms_per_position": {"p50": float(np.median(per_pos)), "min": float(per_pos.min())},
            "step_total_ms_where_it_runs": {"p50": float(np.median(ms["total"][on])),
                                            "max": float(ms["total"][on].max())},
            "step_total_ms_elsewhere": {"p50": float(np.median(ms["total"][~on][skip:]))},
            "where": "on the producer thread, a slice per step inside the step (window.advance), after the "
                     "decoder step and before the codec",
        }
    pos = timer.window_pos[:n]
    if window_positions and (pos >= 0).any():
        late_from = int(window_positions * 2 / 3)
        bands = {"early": (pos >= 0) & (pos < min(250, late_from)), "late": pos >= late_from}
        bands["early"][:skip] = False
        out["decode_by_window_position_ms"] = {
            name: {"p50": float(np.median(ms["decode"][m])), "steps": int(m.sum()),
                   "positions": [int(pos[m].min()), int(pos[m].max())]}
            for name, m in bands.items() if m.any()}
    return out
