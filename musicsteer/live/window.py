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
column 0 is all special. The window starts at global column `base`.

It knows nothing of audio, controllers or sampling.
"""

from __future__ import annotations

import logging

import torch

from ..model.musicgen import MusicGen

log = logging.getLogger("musicsteer.stream")


class Window:
    def __init__(self, decoder: MusicGen, window: int, keep: int, chunk: int, margin: int) -> None:
        """`window` positions at most in the cache, `keep` kept at a re-prime, `chunk` positions
        re-primed per step, starting `margin` steps before the window fills."""
        self.decoder = decoder
        cfg = decoder.cfg
        self.K, self.special = cfg.codebooks, cfg.special_token
        self.window, self.keep, self.chunk, self.margin = window, keep, chunk, margin
        self.device = decoder.embed.weight.device
        decoder.setup_caches(2, max_len=window)  # always the CFG batch: cfg may change live
        self.spare = decoder.make_caches(2, window)
        self.positions = torch.arange(window, device=self.device)  # (window,)
        # Keep the last `keep` + a margin columns of the stream.
        self.retain = keep + margin + 2 * self.K + 8
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

    def advance(self, step: int) -> None:
        """After step `step - 1`: start, continue or finish filling the spare cache set (a few
        positions per step); the next input column is `step`."""
        if self._reprime is None:
            if step - self.base + self.margin < self.window:
                return
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
        try:
            decoder.hidden_states(cols.unsqueeze(0).expand(2, K, n), self.positions[start : start + n],
                                  kv_len=start + n)
        finally:
            decoder.use_caches(current)
