"""Text conditioning: a T5 encoder and its tokenizer turn a prompt into the states
the decoder's cross-attention reads (before the decoder's own projection).

Random-weight presets have no trained tokenizer on these machines; they use
`ByteTokenizer`, which maps UTF-8 bytes to ids deterministically (fine for random
weights, meaningless for trained ones, which always bring their own tokenizer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class ByteTokenizer:
    """UTF-8 bytes -> ids in [3, 259) with EOS = 1, the T5 layout of special ids."""

    vocab_size = 259
    eos_id = 1

    def __call__(self, text: str) -> list[int]:
        return [3 + b for b in text.encode("utf-8")] + [self.eos_id]


@dataclass
class TextEncoder:
    model: torch.nn.Module  # transformers T5EncoderModel
    tokenizer: object  # a transformers tokenizer, or ByteTokenizer
    source: str  # where it came from, for messages and session files

    @property
    def hidden(self) -> int:
        return self.model.config.d_model

    @torch.no_grad()
    def encode(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt -> (states (1, S, d_model) float32, mask (1, S) int64)."""
        device = next(self.model.parameters()).device
        if isinstance(self.tokenizer, ByteTokenizer):
            ids = torch.tensor([self.tokenizer(prompt)], dtype=torch.long)
        else:
            ids = self.tokenizer([prompt], return_tensors="pt").input_ids
        ids = ids.to(device)
        mask = torch.ones_like(ids)
        states = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return states.float(), mask


def condition_rows(states: torch.Tensor, mask: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The CFG batch: [conditional; unconditional (zeros, mask 0)] for batch 2, else the prompt alone."""
    if batch == 1:
        return states, mask
    return torch.cat([states, torch.zeros_like(states)]), torch.cat([mask, torch.zeros_like(mask)])
