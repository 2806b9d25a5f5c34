"""Threading model: captured and replayed on one thread (the producer's, or the caller's
offline), which also owns the caches it was captured over; nothing else may swap those caches.

The decoder step as a CUDA graph: captured once over the static caches, replayed per step.

A graphed step has fixed shapes and fixed addresses: the codes and the position are
copied into static input buffers, the step runs the decoder's static path (the whole
self-attention cache under a mask built from the position tensor, the cross-attention
cache under its own mask), and the logits land in a static output buffer. Steering reads
its strengths from the steerer's device buffers, which the plan rewrites in place before
each step, so new strengths need no recapture. What must not change after capture: the
caches (no `setup_caches`, no `use_caches` swap), the prompt's cache length may change
(it is masked), and the set of attached hooks (attach steering first).

Prompts: the graph reads every prompt slot's cross-attention buffers, masks and weights
where they were at capture. Capture allocates every slot and pins the cross caches, so a
new prompt is copied into those buffers (stream-ordered before the next replay; the host
only queues the copies) and new weights are written into the mix's weight buffer in place:
a prompt change or a morph needs no recapture.

Off CUDA the same object runs the same static path eagerly; tests use that to check that
the static step gives the tokens of the eager, filled-part-only step.
"""

from __future__ import annotations

import torch

from .musicgen import MusicGen

WARMUP = 3  # eager runs on a side stream before capture, as CUDA graphs require


class GraphedStep:
    def __init__(self, decoder: MusicGen, batch: int, capture: bool | None = None) -> None:
        device = decoder.embed.weight.device
        self.decoder = decoder
        self.codes = torch.zeros(batch, decoder.cfg.codebooks, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.logits: torch.Tensor | None = None
        self.graph = None
        if capture if capture is not None else device.type == "cuda":
            self._capture()

    @torch.no_grad()
    def _capture(self) -> None:
        """Warm up and capture at position 0 (the first real step rewrites that slot)."""
        if not torch.cuda.is_available() or self.codes.device.type != "cuda":
            raise RuntimeError("CUDA graphs need the decoder on a CUDA device")
        # warm-up and capture write slot 0 of every self-attention cache: keep what is there
        saved = [(c.k[:, :, :1].clone(), c.v[:, :, :1].clone()) for c in self.decoder.caches]
        for block in self.decoder.blocks:  # every prompt slot at a fixed address, written in place from now on
            block.cross_attn.cache.allocate()
            block.cross_attn.cache.pinned = True
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP):
                self.decoder.step(self.codes, self.position)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self.decoder.step(self.codes, self.position)
        for c, (k, v) in zip(self.decoder.caches, saved):
            c.k[:, :, :1].copy_(k)
            c.v[:, :, :1].copy_(v)
        self.graph = graph
        self._bound = self._addresses()

    def _addresses(self) -> tuple[int, ...]:
        """What the graph baked in: the caches' addresses (setup_caches or use_caches change them)."""
        blocks = self.decoder.blocks
        return tuple(t.data_ptr() for b in blocks
                     for t in (b.self_attn.cache.k, *b.cross_attn.cache.keys, *b.cross_attn.cache.values))

    @property
    def captured(self) -> bool:
        return self.graph is not None

    @torch.no_grad()
    def __call__(self, codes: torch.Tensor, position: int) -> torch.Tensor:
        """Logits (B, K, V) for codes (B, K, 1) at `position`; the returned tensor is the static
        output buffer on CUDA, valid until the next call."""
        max_len = self.decoder.caches[0].max_len
        if not 0 <= position < max_len:  # on CUDA an index past the cache would poison the context
            raise ValueError(f"position {position} is outside the cache of {max_len}")
        self.codes.copy_(codes)
        self.position.fill_(position)
        if self.graph is None:
            return self.decoder.step(self.codes, self.position)
        if self._addresses() != self._bound:
            raise RuntimeError("the caches changed after capture (setup_caches or use_caches): make a new GraphedStep")
        self.graph.replay()
        return self.logits
