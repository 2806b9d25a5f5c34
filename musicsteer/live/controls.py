"""Threading model: producer thread only. Controllers never call in here: they write
targets into their ControlState from their own threads, and the producer hands what it
took to `apply` once per step.

The engine side of the controls: takes the changes a step reads (controllers/state.py)
and applies them through the one parameter table (controllers/params.py): numbers
through the smoother into the sampling settings or a concept's strength, a prompt
into the decoder's cross-attention cache, a schedule into the steering plan.

It knows the parameter table, the steering plan and a way to set the prompt; not the
decoder's insides, the stream or the audio.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

from ..controllers import params
from ..controllers.state import ControlChange, Smoother
from ..model.sampling import SamplingSettings
from ..steering.schedules import apply_schedule, parse_schedule

log = logging.getLogger("musicsteer.stream")


class EngineControls:
    def __init__(self, sampling: SamplingSettings, prompt: str, plan, set_prompt: Callable[[str], None]) -> None:
        """`plan` is the SteeringPlan or None; `set_prompt(text)` conditions the decoder on a prompt."""
        self.sampling, self.prompt, self.plan = sampling, prompt, plan
        self._set_prompt = set_prompt
        self.smoother = Smoother()

    def set_prompt(self, prompt: str) -> None:
        self._set_prompt(prompt)
        self.prompt = prompt

    def apply(self, changes: list[ControlChange], step: int) -> list[ControlChange]:
        """Take the changes effective at `step`, then advance the smoothing; returns the changes
        taken (a refused one is logged and dropped: a controller's mistake never stops the music)."""
        taken = []
        for change in changes:
            try:
                self._accept(change, step)
            except (KeyError, ValueError) as exc:
                log.warning("control %s=%r rejected: %s", change.param, change.value, exc)
                continue
            taken.append(change)
        for param, value in self.smoother.advance().items():
            self._apply(param, value)
        return taken

    def _accept(self, change: ControlChange, step: int) -> None:
        """Take a target (params.py): numbers through the smoother (a parameter that is not
        smoothed jumps there this step), a prompt or a schedule now."""
        ref = self._check_param(change.param)
        if ref.param.numeric:  # targets "sampling" and "strength"
            smooth_ms = change.smooth_ms if ref.param.smoothed else 0.0
            self.smoother.set_target(change.param, float(change.value), smooth_ms, self._current(ref),
                                     ramp_ms=change.ramp_ms if ref.param.smoothed else 0.0)
        elif ref.param.target == "prompt":
            self.set_prompt(str(change.value))
        else:  # "schedule"
            if self.plan is None:
                raise KeyError("no concept pack is loaded")
            apply_schedule(self.plan, ref.concept, parse_schedule(str(change.value)), start=step)

    def _check_param(self, p: str) -> params.ParamRef:
        """The table's entry for `p`; KeyError if there is none or its concept is not loaded."""
        ref = params.find(p)
        if ref is None:
            raise KeyError(f"unknown parameter {p!r}")
        if ref.concept is not None:
            if self.plan is None:
                raise KeyError("no concept pack is loaded")
            self.plan.concept(ref.concept)
        return ref

    def _current(self, ref: params.ParamRef) -> float:
        """The value a smoothed parameter has in the engine now."""
        if ref.param.target == "sampling":
            return float(getattr(self.sampling, ref.param.field))
        return float(self.plan.strengths[self.plan.concept(ref.concept)])  # "strength"

    def _apply(self, p: str, v: float) -> None:
        """One smoothed value into the engine: a sampling field, or a concept's strength."""
        ref = params.find(p)  # checked when its target was set
        if ref.param.target == "sampling":
            self.sampling = replace(self.sampling, **{ref.param.field: ref.param.coerce(v)})
        else:  # "strength"
            self.plan.set_strength(ref.concept, float(v))
