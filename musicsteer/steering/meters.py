"""Threading model: the hooks and `read` run on the producer thread only.

Live meters: what the concept probes read in the stream right now.

For each concept, the conditional row's hidden state after its best layer (highest
validation score) at the newest position, projected on the concept's direction.
Observer hooks copy that state into a preallocated buffer on the device (no sync);
`read()` does the projection and the one copy to the host, once per step, and only
while someone listens.
"""

from __future__ import annotations

import numpy as np
import torch

from ..kernels.hook import RowTap
from ..model.musicgen import MusicGen


class Meter:
    def __init__(self, decoder: MusicGen, names: list[str], directions: torch.Tensor, scores: np.ndarray) -> None:
        """`directions` (L, K, D) and `scores` (K, L) as the steering plan holds them."""
        p = decoder.embed.weight
        self.decoder, self.names = decoder, list(names)
        best = [int(np.argmax(s)) for s in scores]  # per concept
        self.layers = sorted(set(best))
        self.states = torch.zeros((len(self.layers), decoder.cfg.hidden), dtype=p.dtype, device=p.device)
        row = {layer: i for i, layer in enumerate(self.layers)}
        self.rows = torch.tensor([row[b] for b in best], device=p.device)  # concept -> state row
        self.V = torch.stack([directions[b, k] for k, b in enumerate(best)]).to(p.device, p.dtype)  # (K, D)
        self._hooks: dict[int, object] = {}

    def attach(self) -> "Meter":
        for i, layer in enumerate(self.layers):
            observe = RowTap(self.states[i])  # conditional row, newest position (in the fused CPU call itself)
            self.decoder.add_hook(f"blocks.{layer}.out", observe)
            self._hooks[layer] = observe
        return self

    def detach(self) -> None:
        for layer, hook in self._hooks.items():
            self.decoder.remove_hook(f"blocks.{layer}.out", hook)
        self._hooks = {}

    def read(self) -> dict[str, float]:
        values = (self.states[self.rows].float() * self.V.float()).sum(-1)  # (K,)
        return dict(zip(self.names, values.cpu().tolist()))
