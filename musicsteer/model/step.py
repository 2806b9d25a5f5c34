"""Threading model: called from one thread (the producer's, or the caller's offline).

The one decoder step every loop calls: the last column of codes in, the next column
out (decoder, classifier-free guidance, sampling, the delay pattern's mask).

Offline generation (generate.py) and the live producer (live/producer.py) both step
through `DecodeStep`; they differ only in what they do around it (a fixed clip, or a
window that is re-primed while the stream goes on). Each step is either the eager
one-token forward over the filled part of the cache (where the CPU backend runs whole
blocks as C calls), or the replay of a graphed static step (graph_step.py), one per
self-attention cache set, since a graph bakes in the addresses it was captured over.

It knows nothing of audio, controllers or threads beyond its caller's.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .graph_step import GraphedStep
from .kv_cache import KVCache
from .musicgen import MusicGen
from .sampling import SamplingSettings, guided_logits, sample


class DecodeStep:
    def __init__(self, decoder: MusicGen, batch: int) -> None:
        """For a decoder whose caches are set up (`setup_caches`) for `batch` rows."""
        self.decoder, self.batch = decoder, batch
        cfg = decoder.cfg
        self.K, self.special = cfg.codebooks, cfg.special_token
        device = decoder.embed.weight.device
        self.positions = torch.arange(decoder.caches[0].max_len, device=device)  # (L,)
        self.codebooks = torch.arange(self.K, device=device)  # (K,)
        self.graphs: dict[int, GraphedStep] | None = None

    def capture(self, cache_sets: Iterable[list[KVCache]]) -> None:
        """Step through one graphed static step per self-attention cache set from now on (captured on
        CUDA; elsewhere the same static path, eagerly). Attach steering first: its hooks are part of
        the graph, its strengths stay live in its buffers."""
        decoder = self.decoder
        current, graphs = decoder.caches, {}
        try:
            for caches in cache_sets:
                decoder.use_caches(caches)
                graphs[id(caches[0])] = GraphedStep(decoder, self.batch)
        finally:
            decoder.use_caches(current)
        self.graphs = graphs

    def logits(self, column: torch.Tensor, pos: int) -> torch.Tensor:
        """Logits (B, K, V) for the codes `column` (K,) at cache position `pos`."""
        codes = column.view(1, self.K, 1).expand(self.batch, self.K, 1)  # (B, K, 1)
        if self.graphs is not None:  # the graph of the cache set in use
            return self.graphs[id(self.decoder.blocks[0].self_attn.cache)](codes, pos)
        return self.decoder.step(codes, self.positions[pos : pos + 1], kv_len=pos + 1)

    def __call__(self, column: torch.Tensor, pos: int, sampling: SamplingSettings, generator: torch.Generator,
                 valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(next column (K,), guided logits (K, V)); `valid` (K,) marks the codebooks the delay
        pattern lets this step emit (the others get the special token)."""
        guided = guided_logits(self.logits(column, pos), sampling)  # (K, V)
        token = sample(guided, sampling, generator)  # (K,)
        if valid is not None:
            token = torch.where(valid, token, self.special)
        return token, guided

    def opening(self, step: int) -> torch.Tensor | None:
        """The delay pattern's opening at stream step `step`: codebooks k > step have no frame yet."""
        return self.codebooks <= step if step < self.K - 1 else None
