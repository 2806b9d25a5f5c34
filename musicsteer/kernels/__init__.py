"""Steering kernels: Triton on CUDA, a torch reference everywhere else, behind one
dispatch (`steer`). They know nothing of the model: they see a hidden-state tensor,
a strength buffer, directions and a mode id. The decoder's hook points are where they
plug in; the steering registry (steering/modes.py) names the ids.

The mode ids import without torch; the kernels load it when first used.
"""

from importlib import import_module

from .ids import ABLATE, ADD, CLAMP, KERNEL_IDS, NORM

_LAZY = {"backend_for": "dispatch", "steer": "dispatch", "use_backend": "dispatch",
         "steer_reference": "reference", "FORMULAS": "reference"}

__all__ = ["ABLATE", "ADD", "CLAMP", "FORMULAS", "KERNEL_IDS", "NORM", "backend_for", "steer", "steer_reference",
           "use_backend"]


def __getattr__(name: str):
    # torch is imported here, on first use of a kernel, not when a mode id is read
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_LAZY[name]}", __name__), name)
