"""Threading model: as kernels/hook.py (the decoder's forward thread).

The steering hook: one layer's steering at one decoder hook point, as a callable
object `h -> steered h` holding that layer's views of the steerer's buffers, in a
registered mode.

Hooks at one point run in `order` (lower first, ties in the order attached; the
decoder's hook methods keep them so): steering hooks have order STEERING, observers
(meters, probes, plain callables) OBSERVER, so an observer reads the steered state
whatever order the two were attached in. Backends recognise steering by its kernel type
(`isinstance(hook, kernels.hook.KernelHook)`) and may apply it themselves (the fused
CPU blocks apply it inside their C call), reading the same buffers.

It knows the kernels and the mode registry, not the decoder or the plan.
"""

from __future__ import annotations

import torch

from ..kernels.hook import OBSERVER, STEERING, KernelHook
from .modes import SteeringMode

__all__ = ["OBSERVER", "STEERING", "SteeringHook"]


class SteeringHook(KernelHook):
    """A `KernelHook` in a registered mode: h (B, T, D) -> steered h."""

    __slots__ = ("mode",)

    def __init__(self, alpha: torch.Tensor, directions: torch.Tensor, targets: torch.Tensor,
                 mode: SteeringMode) -> None:
        super().__init__(alpha, directions, targets, mode.kernel)
        self.mode = mode

    def __repr__(self) -> str:
        return f"SteeringHook({self.mode.name}, K={self.directions.shape[0]}, D={self.directions.shape[1]})"
