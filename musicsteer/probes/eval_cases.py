"""What `probes eval` steers and how its verdicts add up: the steering cases and the rates
read from the judged generations.

A case is one way of steering a set of the family's concepts at a strength η: toward one
concept (the per-target sweep, with `--schedule`'s multiplier if given), a crossfade from
one concept to another over the clip (`--crossfade A,B`: A from η down to 0, B from 0 up
to η, through `schedules.apply_schedule`, as render and live run it), or several at once
(`--together A,B`: each at η). `install` puts a case on a `SteeringPlan`; `summarise`
turns the verdicts on a case's generations into its rates toward each of its targets.

It knows nothing of models, audio or probes' fitting: verdicts in, rates out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..steering.schedules import Constant, Crossfade, ScheduleError, apply_schedule, parse_schedule
from .common import ProbeError
from .features import concept_name


@dataclass(frozen=True)
class Verdict:
    """The judges' reading of one generation."""
    label: int  # the family's multiclass probe: index into the family's labels
    fires: np.ndarray  # (C,) bool, which one-vs-rest detectors fire
    program: str | None = None  # the program probe's class (None: no program probe)
    pitch: object | None = None  # pitch.ClassShares (None: no CREPE judge)
    clap: float | None = None  # CLAP text-audio cosine (None: no CLAP model)
    segment_labels: np.ndarray | None = None  # (S,) the multiclass probe on each time segment's pooled states
    segment_fires: np.ndarray | None = None  # (S, C) the detectors on each segment's pooled states


@dataclass(frozen=True)
class Case:
    name: str  # "toward notes-C", "crossfade notes-C -> notes-G", "together notes-C + notes-E"
    kind: str  # target | crossfade | together
    targets: tuple[str, ...]  # the concepts steered and measured, concept names
    schedule: object = field(default_factory=Constant)  # target and together: the strengths' multiplier


def resolve(family: str, names: list[str], item: str) -> str:
    """A label (`C`) or a concept name (`notes-C`) of the family -> the concept name."""
    item = item.strip()
    for name in (item, concept_name(family, item)):
        if name in names:
            return name
    raise ProbeError(f"{item!r} is not a concept of family {family!r}; its labels: "
                     + ", ".join(n[len(family) + 1:] for n in names))


def parse_group(family: str, names: list[str], text: str, kind: str, exactly: int | None = None) -> tuple[str, ...]:
    items = tuple(resolve(family, names, t) for t in text.split(",") if t.strip())
    if exactly is not None and len(items) != exactly:
        raise ProbeError(f"--{kind} takes {exactly} concepts of the family, like C,G (got {text!r})")
    if len(items) < 2 or len(set(items)) != len(items):
        raise ProbeError(f"--{kind} takes two or more different concepts of the family, like C,E (got {text!r})")
    return items


def target_schedule(spec: str | None):
    """`--schedule SPEC` -> the multiplier of every target's strength (a crossfade is `--crossfade`)."""
    if not spec:
        return Constant()
    try:
        schedule = parse_schedule(spec)
    except ScheduleError as exc:
        raise ProbeError(f"--schedule {spec!r}: {exc}") from None
    if isinstance(schedule, Crossfade):
        raise ProbeError("--schedule crossfade:...: a crossfade has two concepts; use --crossfade A,B")
    return schedule


def build_cases(family: str, names: list[str], targets: list[str] | None, schedule: str | None,
                crossfades: list[str] = (), together: list[str] = ()) -> tuple[list[Case], list[Case]]:
    """(the per-target sweep, the other cases) from the command's options."""
    multiplier = target_schedule(schedule)
    swept = [resolve(family, names, t) for t in targets] if targets else list(names)
    if len(set(swept)) != len(swept):
        raise ProbeError(f"--targets names a concept twice: {', '.join(swept)}")
    sweep = [Case(f"toward {n}", "target", (n,), multiplier) for n in swept]
    extra = []
    for text in crossfades:
        a, b = parse_group(family, names, text, "crossfade", exactly=2)
        extra.append(Case(f"crossfade {a} -> {b}", "crossfade", (a, b)))
    for text in together:
        group = parse_group(family, names, text, "together")
        extra.append(Case("together " + " + ".join(group), "together", group, multiplier))
    return sweep, extra


def install(plan, case: Case, strength: float, frames: int) -> None:
    """Set `plan`'s strengths and schedules for `case` at `strength` (every other concept off)."""
    for n in plan.names:
        plan.set_strength(n, 0.0)
        plan.set_schedule(n, Constant())
    if case.kind == "crossfade":
        a, b = case.targets
        plan.set_strength(a, strength)
        plan.set_strength(b, strength)
        apply_schedule(plan, a, Crossfade(b, max(frames, 1)))  # over the whole clip
        return
    for n in case.targets:
        plan.set_strength(n, strength)
        plan.set_schedule(n, case.schedule)


def summarise(case_targets: tuple[str, ...], verdicts: list[Verdict], names: list[str],
              pitch_classes: dict[str, int] | None, program: str | None) -> dict:
    """Rates of a case's generations toward each target (and toward any of them)."""
    ks = [names.index(n) for n in case_targets]
    out = {"accuracy": {n: float(np.mean([v.label == k for v in verdicts])) for n, k in zip(case_targets, ks)},
           "detected": {n: float(np.mean([bool(v.fires[k]) for v in verdicts])) for n, k in zip(case_targets, ks)}}
    if len(ks) > 1:
        out["accuracy_any"] = float(np.mean([v.label in ks for v in verdicts]))
    if verdicts[0].segment_fires is not None:
        out["accuracy_segments"] = {n: np.mean([v.segment_labels == k for v in verdicts], axis=0).tolist()
                                    for n, k in zip(case_targets, ks)}
        out["detected_segments"] = {n: np.mean([v.segment_fires[:, k] for v in verdicts], axis=0).tolist()
                                    for n, k in zip(case_targets, ks)}
    if pitch_classes is not None:
        pcs = [pitch_classes[n] for n in case_targets]
        out["pitch"] = {n: float(np.mean([v.pitch.shares[pc] for v in verdicts])) for n, pc in zip(case_targets, pcs)}
        out["pitch_segments"] = {n: np.mean([v.pitch.segments[:, pc] for v in verdicts], axis=0).tolist()
                                 for n, pc in zip(case_targets, pcs)}
        if len(pcs) > 1:
            distinct = sorted(set(pcs))
            out["pitch_any"] = float(np.mean([v.pitch.shares[distinct].sum() for v in verdicts]))
            out["pitch_any_segments"] = np.mean([v.pitch.segments[:, distinct].sum(1) for v in verdicts],
                                                axis=0).tolist()
        out["voiced"] = float(np.mean([v.pitch.voiced for v in verdicts]))
    if program is not None:
        out["program"] = float(np.mean([v.program == program for v in verdicts]))
    clap = [v.clap for v in verdicts if v.clap is not None]
    if clap:
        out["clap"] = float(np.mean(clap))
    return out


def sweep_row(strength: float, per_case: dict[str, dict]) -> dict:
    """One strength's row of the per-target sweep: each target's rates and their means."""
    def per(key: str) -> dict:
        return {n: r[key][n] for r in per_case.values() for n in r[key]}

    row = {"strength": strength, "per_concept": per("accuracy"), "per_concept_detected": per("detected")}
    row["accuracy"] = float(np.mean(list(row["per_concept"].values())))
    row["detected"] = float(np.mean(list(row["per_concept_detected"].values())))
    first = next(iter(per_case.values()))
    if "detected_segments" in first:
        row["accuracy_segments"] = np.mean([s for r in per_case.values() for s in r["accuracy_segments"].values()],
                                           axis=0).tolist()
        row["detected_segments"] = np.mean([s for r in per_case.values() for s in r["detected_segments"].values()],
                                           axis=0).tolist()
    if "pitch" in first:
        row["per_concept_pitch"] = per("pitch")
        row["pitch"] = float(np.mean(list(row["per_concept_pitch"].values())))
        row["pitch_segments"] = np.mean([s for r in per_case.values() for s in r["pitch_segments"].values()],
                                        axis=0).tolist()
    for key in ("voiced", "program", "clap"):
        if key in first:
            row[key] = float(np.mean([r[key] for r in per_case.values()]))
    return row
