"""What turns a concept pack and the steering flags (`--concepts`, `--steer`,
`--schedule`, the settings) into a steerer and its plan, for render and live alike.

It knows the flags' meaning and reports bad ones as usage errors; the buffers and hooks
are `build_steering`'s (plan.py), the schedules' meaning is schedules.py's. It knows
nothing of generation, audio or controllers.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UsageError
from .plan import Steerer, SteeringPlan, SteeringSettings, build_steering
from .schedules import Crossfade, ScheduleError, apply_schedule, parse_schedule

if TYPE_CHECKING:
    from ..model.loading.load import LoadedModel


def make_steering(model: LoadedModel, concepts: Path | None, steer: dict[str, float], schedules: dict[str, str],
                  settings: SteeringSettings, batch: int) -> tuple[Steerer | None, SteeringPlan | None]:
    """Steerer and plan for a concept pack, strengths and schedule specs; (None, None) without a pack."""
    from .pack import ConceptPack

    if concepts is None:
        if steer or schedules:
            raise UsageError("--steer and --schedule need a concept pack: add --concepts PACK")
        return None, None
    pack = ConceptPack.load(concepts)
    pack.check_fits(model.cfg)
    for name in [*steer, *schedules]:
        pack[name]  # unknown names fail here, with the pack's list
    parsed = {}
    for name, spec in schedules.items():
        try:
            parsed[name] = parse_schedule(spec)
        except ScheduleError as exc:
            raise UsageError(f"--schedule {name}={spec}: {exc}") from None
        if isinstance(parsed[name], Crossfade):
            pack[parsed[name].other]  # the concept it fades into must be in the pack too
    steerer, plan = build_steering(model.decoder, pack, settings, batch)
    for name, value in steer.items():
        plan.set_strength(name, value)
    for name, schedule in parsed.items():
        apply_schedule(plan, name, schedule)
    return steerer, plan
