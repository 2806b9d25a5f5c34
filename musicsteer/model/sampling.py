"""Choosing the next token: classifier-free guidance, temperature, top-k, top-p, greedy.

Logits arrive as (B, K, V) from one decoder step, with the CFG batch laid out as
[conditional; unconditional]. Sampling uses a seeded torch.Generator owned by the
caller, so a seed fixes the tokens. Nothing here calls `.item()` or branches on a
tensor's value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingSettings:
    cfg: float = 3.0
    temperature: float = 1.0
    top_k: int = 250
    top_p: float = 0.0  # 0 disables nucleus sampling
    greedy: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.cfg >= 0:  # also rejects NaN
            raise ValueError(f"cfg must be >= 0, got {self.cfg}")
        if not self.temperature > 0 and not self.greedy:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top-k must be >= 0, got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top-p must be in [0, 1], got {self.top_p}")

    @property
    def uses_cfg(self) -> bool:
        """CFG needs the unconditional row; a scale of 1 means the conditional row alone."""
        return self.cfg != 1.0

    @property
    def batch(self) -> int:
        return 2 if self.uses_cfg else 1


def cfg_mix(logits: torch.Tensor, scale: float) -> torch.Tensor:
    """(2, K, V) [cond; uncond] -> (K, V): uncond + scale * (cond - uncond)."""
    cond, uncond = logits[0], logits[1]
    return uncond + (cond - uncond) * scale


def guided_logits(logits: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """Per-step logits (B, K, V) -> the logits tokens are drawn from, (K, V) float32."""
    logits = logits.float()
    return cfg_mix(logits, settings.cfg) if settings.uses_cfg else logits[0]


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k and the top-p nucleus to -inf, (K, V)."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) > top_p  # keep the token that crosses top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: torch.Tensor, settings: SamplingSettings, generator: torch.Generator | None) -> torch.Tensor:
    """Guided logits (K, V) -> next token per codebook (K,) int64."""
    if settings.greedy:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits / settings.temperature, settings.top_k, settings.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)
