"""Steering kernels: Triton on CUDA, a torch reference everywhere else, behind one
dispatch (`steer`). They know nothing of the model: they see a hidden-state tensor,
a strength buffer and directions. The decoder's hook points are where they plug in.
"""

from .dispatch import backend_for, steer, use_backend
from .reference import ADD, CLAMP, MODES, NORM, steer_reference

__all__ = ["ADD", "CLAMP", "MODES", "NORM", "backend_for", "steer", "steer_reference", "use_backend"]
