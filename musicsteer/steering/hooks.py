"""The steering hook: one layer's steering at one decoder hook point, as a callable
object `h -> steered h` holding that layer's views of the steerer's buffers.

Hooks at one point run in `order` (lower first, ties in the order attached; the
decoder's hook methods keep them so): steering hooks have order STEERING, observers
(meters, probes, plain callables) OBSERVER, so an observer reads the steered state
whatever order the two were attached in. Backends recognise steering by type
(`isinstance(hook, SteeringHook)`) and may apply it themselves (the fused CPU blocks
apply it inside their C call), reading the same buffers.

It knows the kernels' dispatch and the mode registry, not the decoder or the plan.
"""

from __future__ import annotations

import torch

from ..kernels import steer
from .modes import SteeringMode

STEERING, OBSERVER = 0, 1  # hook orders; the decoder treats a hook without `order` as OBSERVER


class SteeringHook:
    """h (B, T, D) -> steered h. alpha (B, K) is read at every call (the plan rewrites it in
    place), directions (K, D) are unit vectors, targets (K,) are read by modes that use them."""

    order = STEERING
    __slots__ = ("alpha", "directions", "targets", "mode")

    def __init__(self, alpha: torch.Tensor, directions: torch.Tensor, targets: torch.Tensor,
                 mode: SteeringMode) -> None:
        assert alpha.dim() == 2 and directions.dim() == 2 and alpha.shape[1] == directions.shape[0]
        assert targets.shape == (directions.shape[0],)
        self.alpha, self.directions, self.targets, self.mode = alpha, directions, targets, mode

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return steer(h, self.alpha, self.directions, self.targets, self.mode.kernel)

    def __repr__(self) -> str:
        return f"SteeringHook({self.mode.name}, K={self.directions.shape[0]}, D={self.directions.shape[1]})"
