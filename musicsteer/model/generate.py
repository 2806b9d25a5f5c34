"""Offline generation: prompt -> codes, one decoder step per token position.

The loop is the one the live producer runs, without the stream around it: encode
the prompt once, cache cross-attention K/V, then per step the one `DecodeStep`
(step.py): read the last tokens, run the decoder, guide, sample, and keep only the
codebooks the delay pattern allows at that step. It knows nothing of files, audio devices or controllers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .delay import deinterleave, steps_for, valid_mask
from .musicgen import MusicGen
from .sampling import SamplingSettings, make_generator
from .step import DecodeStep
from .text import TextEncoder, condition_rows


@dataclass
class Generation:
    codes: torch.Tensor  # (K, F) int64, complete frames
    sequence: torch.Tensor  # (K, steps + 1) int64, the delayed sequence fed to the model
    logits: torch.Tensor | None  # (steps, K, V) float32 guided logits, when recorded


def prepare(decoder: MusicGen, text: TextEncoder, prompt: str, settings: SamplingSettings, max_len: int,
            blend: tuple[str, ...] = ()) -> None:
    """Allocate caches for the CFG batch and cache the prompt's cross-attention K/V; with `blend`,
    those prompts too, in slots 2.., every slot at the same weight."""
    prompts = (prompt, *blend)
    decoder.setup_caches(settings.batch, max_len=max_len, prompts=len(prompts))
    for slot, p in enumerate(prompts):
        states, mask = text.encode(p)
        decoder.set_condition(*condition_rows(states, mask, settings.batch), slot=slot)
    if blend:
        decoder.set_prompt_weights([1.0] * len(prompts))


@torch.no_grad()
def generate(decoder: MusicGen, text: TextEncoder, prompt: str, frames: int, settings: SamplingSettings,
             *, record_logits: bool = False, before_step: Callable[[int], None] | None = None,
             on_step: Callable[[int], None] | None = None, graph: bool = False,
             blend: tuple[str, ...] = ()) -> Generation:
    """Generate `frames` complete frames. `before_step(s)` runs before step s (steering
    writes its strengths there); `on_step(s)` after it (progress). `graph` runs each step as
    a replay of one captured CUDA graph (graph_step.py; off CUDA, the same static path eagerly);
    attach steering before calling. `blend`: more prompts, mixed with `prompt` at equal weights."""
    cfg = decoder.cfg
    K, special = cfg.codebooks, cfg.special_token
    steps = steps_for(frames, K)
    if steps + 1 > cfg.max_positions:
        raise ValueError(f"{frames} frames need {steps + 1} positions; the model holds {cfg.max_positions}")
    device = decoder.embed.weight.device
    prepare(decoder, text, prompt, settings, max_len=steps + 1, blend=blend)

    generator = make_generator(settings.seed, device)
    sequence = torch.full((K, steps + 1), special, dtype=torch.long, device=device)
    valid = torch.stack([valid_mask(s, K, frames, device) for s in range(steps)])  # (steps, K)
    recorded = torch.empty((steps, K, cfg.vocab), dtype=torch.float32) if record_logits else None
    step = DecodeStep(decoder, settings.batch)
    if graph:
        step.capture([decoder.caches])
    for s in range(steps):
        if before_step is not None:
            before_step(s)
        sequence[:, s + 1], guided = step(sequence[:, s], s, settings, generator, valid[s])
        if recorded is not None:
            recorded[s] = guided.cpu()
        if on_step is not None:
            on_step(s)
    return Generation(deinterleave(sequence).cpu(), sequence.cpu(), recorded)
