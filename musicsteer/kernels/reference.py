"""The torch reference of the steering update, for every device and as the oracle
the Triton and C kernels are tested against: one formula per kernel id (kernels/ids.py).

For one hidden vector x (D,), strengths a (K,) and unit directions V (K, D):
- ADD:    x + sum_k a_k v_k                                  (MusicRFM)
- NORM:   (x + |x| sum_k a_k v_k) / (1 + sum_k |a_k|)        (linear-probe steering; a negative
          a_k steers toward -v_k: the divisor is never below 1, so |y| <= |x|, and the
          components off the directions keep their sign, whatever the strengths' signs)
- CLAMP:  x + sum_k a_k (c_k - <x, v_k>) v_k                  (move the component along
          v_k toward the target c_k; a_k = 1 sets it, 0 leaves x alone)
- ABLATE: x - sum_k a_k <x, v_k> v_k                          (directional ablation; a_k = 1
          removes the component along v_k, 0 leaves x alone)
Arithmetic is in float32 whatever the storage dtype; a strength of 0 returns x exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .ids import ABLATE, ADD, CLAMP, NORM

# x (B, T, D) float32, a (B, 1, K), v (K, D), c (K,) or None -> y (B, T, D) float32
Formula = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def _add(x, a, v, c):
    return x + a @ v


def _norm(x, a, v, c):
    norm = x.norm(dim=-1, keepdim=True)  # (B, T, 1)
    return (x + norm * (a @ v)) / (1.0 + a.abs().sum(-1, keepdim=True))


def _clamp(x, a, v, c):
    proj = x @ v.T  # (B, T, K)
    return x + (a * (c.float() - proj)) @ v


def _ablate(x, a, v, c):
    proj = x @ v.T  # (B, T, K)
    return x - (a * proj) @ v


FORMULAS: dict[int, Formula] = {ADD: _add, NORM: _norm, CLAMP: _clamp, ABLATE: _ablate}


def steer_reference(h: torch.Tensor, alpha: torch.Tensor, directions: torch.Tensor,
                    targets: torch.Tensor | None, mode: int) -> torch.Tensor:
    """h (B, T, D), alpha (B, K) per row, directions (K, D), targets (K,) -> steered h (B, T, D)."""
    formula = FORMULAS.get(mode)
    if formula is None:
        raise ValueError(f"unknown steering kernel id {mode}; the kernels implement {sorted(FORMULAS)}")
    y = formula(h.float(), alpha.float()[:, None, :], directions.float(), targets)  # (B, T, D)
    return y.to(h.dtype)


def steer_positions(h: torch.Tensor, alpha: torch.Tensor, directions: torch.Tensor,
                    targets: torch.Tensor | None, mode: int) -> torch.Tensor:
    """As `steer_reference` with a strength per position: alpha (B, T, K) -> steered h (B, T, D)."""
    y = FORMULAS[mode](h.float(), alpha.to(device=h.device, dtype=torch.float32), directions.float(), targets)
    return y.to(h.dtype)
