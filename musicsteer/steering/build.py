"""What turns a concept pack and the steering flags (`--concepts`, `--steer`,
`--schedule`, the settings) into a steerer and its plan, for render and live alike.

It knows the flags' meaning and reports bad ones as usage errors (a strength outside the
mode's range, a pack steered at a point it was not extracted at where the mode reads
that point's quantities); the buffers and hooks
are `build_steering`'s (plan.py), the schedules' meaning is schedules.py's. It knows
nothing of generation, audio or controllers.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UsageError
from . import modes
from .plan import Steerer, SteeringPlan, SteeringSettings, build_steering
from .schedules import Crossfade, ScheduleError, apply_schedule, parse_schedule

if TYPE_CHECKING:
    from ..model.loading.load import LoadedModel
    from .pack import ConceptPack

log = logging.getLogger("musicsteer.steering")


def pack_point(pack: ConceptPack) -> str | None:
    """The hook point a pack's probes were trained at (None: not trained on features, e.g. random)."""
    return pack.meta.get("data", {}).get("point", "out" if "features" in pack.meta.get("data", {}) else None)


def check_point(pack: ConceptPack, settings: SteeringSettings) -> None:
    """Refuse steering at a point other than the pack's where the mode reads that point's own
    quantities (clamp's targets, norm's |h|); for the others, say that the point differs."""
    trained = pack_point(pack)
    if trained is None or trained == settings.point:
        return
    mode = modes.get(settings.mode)
    if mode.uses_targets or mode.name == "norm":
        raise UsageError(f"the pack was trained on the {trained!r} hook point, and {mode.name} mode at "
                         f"--steer-point {settings.point} would use its {'targets' if mode.uses_targets else 'norms'}"
                         f" there: steer at --steer-point {trained}, or extract at {settings.point} "
                         f"(probes extract --point {settings.point})")
    log.warning("steering at %s with directions trained at %s", settings.point, trained)


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
    check_point(pack, settings)
    mode = modes.get(settings.mode)
    for name, value in steer.items():
        why = mode.out_of_range(value)
        if why is not None:
            raise UsageError(f"--steer {name}={value:g}: {why}")
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
