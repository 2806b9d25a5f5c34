"""The torch reference of the steering update, for every device and as the oracle
the Triton kernel is tested against.

For one hidden vector x (D,), strengths a (K,) and unit directions V (K, D):
- ADD:   x + sum_k a_k v_k                                  (MusicRFM)
- NORM:  (x + |x| sum_k a_k v_k) / (1 + sum_k a_k)          (linear-probe steering)
- CLAMP: x + sum_k a_k (c_k - <x, v_k>) v_k                  (move the component along
         v_k toward the target c_k; a_k = 1 sets it, 0 leaves x alone)
Arithmetic is in float32 whatever the storage dtype; a strength of 0 returns x exactly.
"""

from __future__ import annotations

import torch

ADD, NORM, CLAMP = 0, 1, 2
MODES = {"add": ADD, "norm": NORM, "clamp": CLAMP}


def steer_reference(h: torch.Tensor, alpha: torch.Tensor, directions: torch.Tensor,
                    targets: torch.Tensor | None, mode: int) -> torch.Tensor:
    """h (B, T, D), alpha (B, K) per row, directions (K, D), targets (K,) -> steered h (B, T, D)."""
    x = h.float()
    a = alpha.float()[:, None, :]  # (B, 1, K)
    v = directions.float()  # (K, D)
    if mode == ADD:
        y = x + a @ v
    elif mode == NORM:
        norm = x.norm(dim=-1, keepdim=True)  # (B, T, 1)
        y = (x + norm * (a @ v)) / (1.0 + a.sum(-1, keepdim=True))
    elif mode == CLAMP:
        proj = x @ v.T  # (B, T, K)
        y = x + (a * (targets.float() - proj)) @ v
    else:
        raise ValueError(f"unknown steering mode {mode}")
    return y.to(h.dtype)
