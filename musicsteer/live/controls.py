"""Threading model: producer thread only. Controllers never call in here: they write
targets into their ControlState from their own threads, and the producer hands what it
took to `apply` once per step.

The engine side of the controls: takes the changes a step reads (controllers/state.py)
and applies them through the one parameter table (controllers/params.py): numbers
through the smoother into the sampling settings, a concept's strength or the prompt
slots' weights; a prompt slot's text to whoever builds prompts (the producer's prompt
worker); a schedule into the steering plan.

Prompt weights: every slot has a weight (`prompt/<n>/weight`), and `prompt/morph f` sets
slots 1 and 2 to (1 - f, f) and the others to 0. The weights of slots that hold no prompt
yet (one still being built) count as 0 until it is swapped in (`slot_filled`), so a morph
sent right after a new slot's text waits for it instead of failing.

It knows the parameter table, the steering plan and the callables that set a prompt and
the weights; not the decoder's insides, the stream or the audio.
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
    def __init__(self, sampling: SamplingSettings, prompt: str, plan, set_prompt: Callable[[int, str, object], None],
                 set_weights: Callable[[tuple[float, ...]], object] | None = None, slots: int = 1) -> None:
        """`plan` is the SteeringPlan or None; `set_prompt(slot, text, change)` asks for a prompt in a
        slot (from 0; `change` is the ControlChange that asked, or None); `set_weights(weights)` blends
        the slots (one weight per slot; None: a single slot)."""
        self.sampling, self.plan = sampling, plan
        self._set_prompt, self._set_weights = set_prompt, set_weights
        self.slots = slots
        self.prompts: list[str | None] = [prompt] + [None] * (slots - 1)  # each slot's text in force
        self.weights = [1.0] + [0.0] * (slots - 1)  # each slot's weight as set (the mix counts filled ones)
        self.smoother = Smoother()

    @property
    def prompt(self) -> str:
        """Slot 1's text in force."""
        return self.prompts[0]

    def slot_filled(self, slot: int, text: str) -> None:
        """Slot `slot` (from 0) holds `text` from this step on (the weights it had now count)."""
        self.prompts[slot] = text
        self._push_weights()

    def _push_weights(self) -> None:
        if self._set_weights is not None:
            self._set_weights(tuple(w if self.prompts[p] is not None else 0.0 for p, w in enumerate(self.weights)))

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

    @staticmethod
    def deferred(change: ControlChange) -> bool:
        """Whether a taken change takes effect later than the step that took it (a prompt's text:
        whoever builds it reports the step it is swapped in at)."""
        ref = params.find(change.param)
        return ref is not None and ref.param.target == "prompt"

    def _accept(self, change: ControlChange, step: int) -> None:
        """Take a target (params.py): numbers through the smoother (a parameter that is not
        smoothed jumps there this step), a prompt or a schedule now."""
        ref = self._check_param(change.param)
        if ref.param.numeric:  # targets "sampling" and "strength"
            smooth_ms = change.smooth_ms if ref.param.smoothed else 0.0
            self.smoother.set_target(change.param, float(change.value), smooth_ms, self._current(ref),
                                     ramp_ms=change.ramp_ms if ref.param.smoothed else 0.0)
        elif ref.param.target == "prompt":
            self._set_prompt(self._slot(ref), str(change.value), change)
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
        if ref.param.slot is not None:
            self._slot(ref)
        elif ref.param.target == "weight" and self.slots < 2:
            raise KeyError("prompt/morph fades between prompt slots 1 and 2: this session holds one slot")
        return ref

    def _slot(self, ref: params.ParamRef) -> int:
        """The slot (from 0) a prompt or weight parameter names; KeyError past the session's slots."""
        if ref.param.slot > self.slots:
            raise KeyError(f"prompt slot {ref.param.slot} is past the {self.slots} this session holds "
                           f"(live --prompt-slots)")
        return ref.param.slot - 1

    def _current(self, ref: params.ParamRef) -> float:
        """The value a smoothed parameter has in the engine now."""
        if ref.param.target == "sampling":
            return float(getattr(self.sampling, ref.param.field))
        if ref.param.target == "weight":
            if ref.param.slot is None:  # the morph: how far slot 2 is along
                total = self.weights[0] + self.weights[1]
                return self.weights[1] / total if total > 0 else 0.0
            return self.weights[ref.param.slot - 1]
        return float(self.plan.strengths[self.plan.concept(ref.concept)])  # "strength"

    def _apply(self, p: str, v: float) -> None:
        """One smoothed value into the engine: a sampling field, or a concept's strength."""
        ref = params.find(p)  # checked when its target was set
        if ref.param.target == "sampling":
            self.sampling = replace(self.sampling, **{ref.param.field: ref.param.coerce(v)})
        elif ref.param.target == "weight":
            if ref.param.slot is None:  # prompt/morph
                self.weights = [1.0 - v, v] + [0.0] * (self.slots - 2)
            else:
                self.weights[ref.param.slot - 1] = float(v)
            self._push_weights()
        else:  # "strength"
            self.plan.set_strength(ref.concept, float(v))
