"""Threading model: modes are registered at import time (and by tests or plug-ins before any
session starts); after that the registry is only read, from any thread, without a lock.

The steering modes, registered by name: what `--steer-mode`, `SteeringSettings` and
the steering hooks accept, and the one place a new mode is declared.

A mode is a small value: its name, the kernel id the Triton kernel, the C block kernel
and the torch reference all switch on (kernels/ids.py), a one-line description, whether
it reads the concepts' targets, and whether it is CUDA-graph safe (reads only device
buffers, so a captured step replays it with new strengths), and the strengths it
takes: `add` and `norm` take any sign (a negative strength steers toward -v; norm's
divisor is 1 + sum |a|, so it never divides by zero, amplifies the state or flips the
sign of its components off the directions),
`clamp` and `ablate` take [0, 1] (0 leaves h alone, 1 sets or removes the component;
outside that they would overshoot or amplify). `SteeringPlan` clamps a strength to the
range with a log line; `render` refuses one outside it, and OSC replies with an error.
Adding a mode is one `register` call here plus its formula in each kernel.

This module knows the kernels' ids, not their code: it imports no torch, so the CLI
can list the modes without loading it; `SteeringMode.reference` loads the formula when
asked. It knows nothing of the decoder, plans or packs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from ..kernels.ids import ABLATE, ADD, CLAMP, KERNEL_IDS, NORM


@dataclass(frozen=True)
class SteeringMode:
    name: str
    kernel: int  # the id the kernels switch on (kernels/ids.py)
    description: str  # one line, for help and tables
    uses_targets: bool = False  # reads the concepts' per-layer targets (c_k)
    graph_safe: bool = True  # reads only device buffers: safe inside a captured CUDA graph
    strengths: tuple[float, float] = (-math.inf, math.inf)  # the strengths that mean something

    def clamp(self, value: float) -> float:
        """`value` within the mode's strength range."""
        lo, hi = self.strengths
        return min(max(float(value), lo), hi)

    def out_of_range(self, value: float) -> str | None:
        """Why `value` is outside the mode's strengths, or None when it is inside."""
        lo, hi = self.strengths
        if lo <= value <= hi:
            return None
        return f"{self.name} mode takes strengths in [{lo:g}, {hi:g}], got {value:g}"

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("-", "").isalnum() or self.name != self.name.lower():
            raise ValueError(f"steering mode name {self.name!r}: lower-case letters, digits and dashes")
        if not self.strengths[0] <= 0.0 <= self.strengths[1]:
            raise ValueError(f"steering mode {self.name!r}: its strengths must include 0 (off)")
        if self.kernel not in KERNEL_IDS:
            raise ValueError(f"steering mode {self.name!r}: kernel id {self.kernel} is not one the kernels "
                             f"implement ({', '.join(map(str, KERNEL_IDS))})")

    @property
    def reference(self) -> Callable:
        """The torch formula of kernels/reference.py for this mode: (x, a, v, c) -> y, float32."""
        from ..kernels.reference import FORMULAS

        return FORMULAS[self.kernel]


_REGISTRY: dict[str, SteeringMode] = {}


def register(mode: SteeringMode) -> SteeringMode:
    """Add `mode` under its name; a name already taken is an error (modes are not replaced)."""
    if mode.name in _REGISTRY:
        raise ValueError(f"steering mode {mode.name!r} is already registered")
    _REGISTRY[mode.name] = mode
    return mode


def get(name: str) -> SteeringMode:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"steering mode {name!r}; use one of {', '.join(_REGISTRY)}") from None


def names() -> tuple[str, ...]:
    """Registered mode names, in registration order (the first is the default)."""
    return tuple(_REGISTRY)


def modes() -> tuple[SteeringMode, ...]:
    return tuple(_REGISTRY.values())


def describe() -> str:
    """'name: description' for every mode, one phrase each (CLI help)."""
    return "; ".join(f"{m.name}: {m.description}" for m in _REGISTRY.values())


register(SteeringMode("add", ADD, "h + a v (MusicRFM); a < 0 steers toward -v"))
register(SteeringMode("norm", NORM, "(h + a |h| v) / (1 + |a|), norm-preserving (linear-probe steering); "
                      "a < 0 steers toward -v"))
register(SteeringMode("clamp", CLAMP, "move the component along v toward the concept's target (a in [0, 1]; "
                      "1 sets it)", uses_targets=True, strengths=(0.0, 1.0)))
register(SteeringMode("ablate", ABLATE, "remove the component along v (a in [0, 1]; 1 removes it, 0 keeps it)",
                      strengths=(0.0, 1.0)))
