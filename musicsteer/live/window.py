"""Threading model: producer thread only (created, advanced and read there).

The live stream's context: the delayed token history and the KV-cache window over it,
re-primed into a spare cache set while decoding goes on.

Positions in the KV cache are bounded by the model's window. Before the window fills,
the spare cache set is filled in slices of a few positions per step with the last
`keep` positions of the stream (re-interleaved so that the new window starts at a
frame boundary, exactly as if generation had started there), while the set in use
keeps decoding; once the spare has caught up, the two swap. No single step does the
whole re-prime, and the audio never stops.

Global columns: column c of the delayed stream holds codebook k of frame c - 1 - k;
column 0 is all special; it is the input of step c. The window starts at global column
`base`.

A steered stream re-primes each position with the strengths its step was generated
with (`steering(first_column, n)`, the plan's record of every step's alpha), not with
the strengths of the step the re-prime runs at: the re-primed context is the one the
music was made with, whatever the gate or the controls did since.

It knows nothing of audio, controllers or sampling.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import ContextManager

import torch

from ..model.musicgen import MusicGen

log = logging.getLogger("musicsteer.stream")

CHUNKS = range(2, 65)  # slice sizes a time budget chooses from

# The window and keep (seconds) a live session uses unless told: a GPU takes MusicGen's whole 30 s
# context; a CPU step reads the cache it has filled, so there the window is 15 s (the live
# anchors keep about 10 s of context) and the re-prime, a prefill of `keep`, 5 s.
DEFAULT_WINDOW = {"cuda": (30.0, 10.0), "cpu": (15.0, 5.0)}


def default_window(device_type: str, window_s: float | None = None, keep_s: float | None = None) -> tuple[float, float]:
    """(window, keep) in seconds for a stream on `device_type`, where None takes the default; a window
    given without a keep keeps a third of it, at most the default keep."""
    window, keep = DEFAULT_WINDOW.get(device_type, DEFAULT_WINDOW["cuda"])
    if window_s is None:
        return window, keep if keep_s is None else keep_s
    return window_s, min(keep, window_s / 3) if keep_s is None else keep_s


def reprime_margin(keep: int, chunk: int) -> int:
    """Steps before the window fills at which re-priming starts: it takes keep/(chunk-1) steps."""
    return -(-keep // (chunk - 1)) + 4


def fits(window: int, keep: int, chunk: int, codebooks: int) -> bool:
    """Whether a window that keeps `keep` positions leaves room to re-prime `chunk` per step."""
    return window - keep > 2 * reprime_margin(keep, chunk) + codebooks


def choose_chunk(step_ms: float, slice_ms: tuple[float, float], budget_ms: float, window: int, keep: int,
                 codebooks: int, fallback: int) -> int:
    """The largest slice whose step stays within `budget_ms`: a step costs `step_ms` without a slice,
    a slice of n positions `slice_ms[0] + n * slice_ms[1]`. Fewer, larger slices cost less in all
    (each reads the weights once); when not even the smallest fits, `fallback`."""
    fixed, per_position = slice_ms
    ok = [n for n in CHUNKS if step_ms + fixed + n * per_position <= budget_ms and fits(window, keep, n, codebooks)]
    return max(ok) if ok else fallback


class Window:
    def __init__(self, decoder: MusicGen, window: int, keep: int, chunk: int, margin: int,
                 retain_margin: int | None = None, steering: Callable[[int, int], ContextManager] | None = None,
                 prompts: int = 1) -> None:
        """`window` positions at most in the cache, `keep` kept at a re-prime, `chunk` positions
        re-primed per step, starting `margin` steps before the window fills; the history holds
        enough for margins up to `retain_margin` (default `margin`; see `set_chunk`). `steering`
        (first column, n) gives a context in which a forward over those columns is steered as
        their steps were (None: unsteered, or steering left as it is); `prompts` slots of
        cross-attention memory (the re-prime reads them as the step does)."""
        self.decoder = decoder
        self.steering = steering
        cfg = decoder.cfg
        self.K, self.special = cfg.codebooks, cfg.special_token
        self.window, self.keep, self.chunk, self.margin = window, keep, chunk, margin
        self.device = decoder.embed.weight.device
        decoder.setup_caches(2, max_len=window, prompts=prompts)  # always the CFG batch: cfg may change live
        self.spare = decoder.make_caches(2, window)
        self.positions = torch.arange(window, device=self.device)  # (window,)
        # Keep the last `keep` + a margin columns of the stream.
        self.retain = keep + max(margin, retain_margin or 0) + 2 * self.K + 8
        self.history = torch.full((self.K, 2 * self.retain), self.special, dtype=torch.long, device=self.device)
        self.hist_base = 0  # global column of history[:, 0]
        self.columns = 1  # global columns known (column 0 exists)
        self.base = 0  # global column at window position 0
        self.reprimes = 0
        self._reprime: dict | None = None  # {"base": new window's first column, "done": positions filled}

    @property
    def cache_sets(self) -> tuple[list, list]:
        """The set in use and the spare."""
        return self.decoder.caches, self.spare

    @property
    def reprime_due(self) -> bool:
        """Whether a re-prime is under way."""
        return self._reprime is not None

    def set_chunk(self, chunk: int) -> None:
        """Re-prime `chunk` positions per step from the next re-prime on (none may be under way)."""
        assert self._reprime is None and fits(self.window, self.keep, chunk, self.K)
        self.chunk, self.margin = chunk, reprime_margin(self.keep, chunk)
        assert self.keep + self.margin + 2 * self.K + 8 <= self.retain

    def measure_prefill(self, sizes: tuple[int, int] = (4, 16), repeats: int = 2) -> tuple[float, float]:
        """(ms per slice, ms per position) of re-prime slices into the spare set, fitted to slices of
        `sizes` positions at a depth of keep/2 (the average depth a re-prime fills at). Only while no
        re-prime is under way: the positions it writes are rewritten before a re-prime reads them."""
        assert self._reprime is None
        depth = min(self.keep // 2, self.window - max(sizes))
        best = []
        for n in sizes:
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                self._prefill_spare(self.hist_base, depth, n)
                times.append((time.perf_counter() - t0) * 1e3)
            best.append(min(times))
        per_position = max((best[1] - best[0]) / (sizes[1] - sizes[0]), 0.0)
        return max(best[0] - sizes[0] * per_position, 0.0), per_position

    def column(self, c: int) -> torch.Tensor:
        """Global column `c` (K,), while it is retained."""
        return self.history[:, c - self.hist_base]

    def push(self, col: torch.Tensor) -> None:
        """Append the next global column (K,)."""
        if self.columns - self.hist_base == self.history.shape[1]:  # keep the newest `retain` columns
            shift = self.history.shape[1] - self.retain
            self.history[:, : self.retain] = self.history[:, shift:].clone()
            self.hist_base += shift
        self.history[:, self.columns - self.hist_base] = col
        self.columns += 1

    def advance(self, step: int) -> int:
        """After step `step - 1`: start, continue or finish filling the spare cache set (a few
        positions per step); the next input column is `step`. Returns the positions filled."""
        if self._reprime is None:
            if step - self.base + self.margin < self.window:
                return 0
            self._reprime = {"base": step + 1 - self.keep, "done": 0}  # the new window starts there
        r = self._reprime
        target = step - r["base"]  # columns base .. step-1 go in; column `step` is the next input
        n = min(self.chunk, target - r["done"])
        if n > 0:
            self._prefill_spare(r["base"], r["done"], n)
            r["done"] += n
        if r["done"] == target:
            current = self.decoder.caches
            self.decoder.use_caches(self.spare)
            self.spare = current
            self.base = r["base"]
            self._reprime = None
            self.reprimes += 1
            log.debug("re-primed at step %d: window starts at column %d", step, self.base)
        return max(n, 0)

    def _prefill_spare(self, base: int, start: int, n: int) -> None:
        """Run window positions start..start+n of the new window into the spare cache set."""
        K = self.K
        cols = torch.stack([self.column(base + j) for j in range(start, start + n)], dim=1)  # (K, n)
        j = torch.arange(start, start + n, device=self.device)
        k = torch.arange(K, device=self.device)[:, None]
        cols = torch.where(j[None, :] <= k, self.special, cols)  # frames before the new start: special
        decoder = self.decoder
        current = decoder.caches
        decoder.use_caches(self.spare)
        steered = self.steering(base + start, n) if self.steering is not None else nullcontext()
        try:
            with steered:
                decoder.hidden_states(cols.unsqueeze(0).expand(2, K, n), self.positions[start : start + n],
                                      kv_len=start + n)
        finally:
            decoder.use_caches(current)
