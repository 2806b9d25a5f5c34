"""Threading model: called on the decoder's forward thread; the strength buffer it reads is
rewritten in place between steps by that same thread.

The steering update bound to its buffers, as a hook `h -> steered h`: what a backend
recognises (`isinstance(hook, KernelHook)`) and may apply itself, reading the same
buffers (the fused CPU blocks apply it inside their C call).

It knows the kernels' dispatch and a mode id, not the decoder nor the mode registry
(steering/hooks.py builds these from a registered mode).
"""

from __future__ import annotations

import torch

from .dispatch import steer
from .reference import steer_positions

STEERING, OBSERVER = 0, 1  # hook orders; the decoder treats a hook without `order` as OBSERVER


class KernelHook:
    """h (B, T, D) -> steered h. alpha (B, K) is read at every call (rewritten in place between
    steps), directions (K, D) are unit vectors, targets (K,) are read by modes that use them,
    `kernel` is the mode id (kernels/ids.py). `positions`, when set (B, T, K), gives a
    strength per position of a T-position forward instead (a re-prime of recorded steps);
    backends that apply steering themselves leave such a hook to its call."""

    order = STEERING
    __slots__ = ("alpha", "directions", "targets", "kernel", "positions")

    def __init__(self, alpha: torch.Tensor, directions: torch.Tensor, targets: torch.Tensor, kernel: int) -> None:
        assert alpha.dim() == 2 and directions.dim() == 2 and alpha.shape[1] == directions.shape[0]
        assert targets.shape == (directions.shape[0],)
        self.alpha, self.directions, self.targets, self.kernel = alpha, directions, targets, kernel
        self.positions: torch.Tensor | None = None

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        if self.positions is not None and self.positions.shape[1] == h.shape[1]:
            return steer_positions(h, self.positions, self.directions, self.targets, self.kernel)
        return steer(h, self.alpha, self.directions, self.targets, self.kernel)


class RowTap:
    """h (B, T, D) -> h, copying the conditional row's newest state h[0, -1] into `dest` (D,): an
    observer a backend may run itself (the fused CPU blocks copy it inside their call, so a live
    meter does not split the step's one call in two)."""

    order = OBSERVER
    __slots__ = ("dest",)

    def __init__(self, dest: torch.Tensor) -> None:
        assert dest.dim() == 1
        self.dest = dest

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        self.dest.copy_(h[0, -1])
        return h
