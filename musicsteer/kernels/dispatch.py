"""Threading model: `steer` may be called from any thread; it reads the backend choice, which
`use_backend` (tests) changes process-wide for the duration of a `with` block: use it only
where no other thread steps a decoder.

The one steering entry point the model calls, and the one place a backend is chosen.

`steer` runs the Triton kernel on CUDA tensors when Triton is importable, and the
torch reference everywhere else. `MUSICSTEER_KERNELS=torch|triton|auto` or
`use_backend(...)` (for tests) overrides the choice.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

from .reference import steer_reference

_forced: str | None = None


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def backend_for(device: torch.device) -> str:
    choice = _forced or os.environ.get("MUSICSTEER_KERNELS", "auto")
    if choice not in ("auto", "torch", "triton"):
        raise ValueError(f"MUSICSTEER_KERNELS={choice!r}; use auto, torch or triton")
    if choice == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    return choice


@contextmanager
def use_backend(name: str | None):
    """Force a backend ('torch' or 'triton') inside a `with` block."""
    global _forced
    saved, _forced = _forced, name
    try:
        yield
    finally:
        _forced = saved


def steer(h: torch.Tensor, alpha: torch.Tensor, directions: torch.Tensor, targets: torch.Tensor | None,
          mode: int) -> torch.Tensor:
    """Steered h (B, T, D); may update h in place. alpha (B, K), directions (K, D), targets (K,)."""
    if backend_for(h.device) == "triton":
        from .triton_steer import steer_triton

        return steer_triton(h.contiguous(), alpha, directions, targets, mode)
    return steer_reference(h, alpha, directions, targets, mode)
