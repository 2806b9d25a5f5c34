"""`musicsteer probes eval`: MusicRFM's "probe accuracy on generations" (its Table 2),
with outside judges beside the probes.

A multiclass probe for one family is fitted on the training features at the family's
best layer (the pack's multiclass evaluation, else the concepts' best mean score),
and beside it one class-balanced one-vs-rest detector per concept. Then, for each
strength and each steering case (eval_cases.py: toward each concept of the family, and
any crossfades and concept groups asked for; strength 0: unsteered), the model generates
clips; each clip is decoded to audio, re-encoded by EnCodec, run through the decoder
exactly as the training clips were (the feature store's conditioning and layout),
pooled, and judged with steering detached (the hooks would otherwise add the last
step's strengths to the features judged).

Two probe rates per strength: `accuracy`, the fraction of generations the multiclass
probe classifies as the concept they were steered toward (MusicRFM's figure; at strength
0 it is 1/C by construction, since every clip gets exactly one label), and `detected`,
the fraction for which the target concept's own detector fires. At strength 0 the
detected rate is the unsteered baseline toward each target, which a steered row is
compared with. The gate is drawn per layer and concept (MusicRFM's code) unless told.

Outside judges, each optional: CREPE's pitch class of the audio for the notes family
(`pitch`: the share of voiced frames at the target's pitch class, per time segment too,
and `voiced`, the share of voiced frames), a program probe on the GM program as a
text-adherence stand-in (`program`: the share classified as the program the prompt
names), and CLAP's text adherence when a CLAP model is in the local Hugging Face cache
(without one the column is absent and the record says why).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..model.generate import generate
from ..model.loading.load import LoadedModel
from ..model.sampling import SamplingSettings
from ..steering.pack import ConceptPack
from ..steering.plan import SteeringSettings, build_steering
from .clap import clap_scorer
from .common import ProbeError
from .eval_cases import Verdict, build_cases, install, summarise, sweep_row
from .extract import ExtractSettings, hidden_states, layout
from .features import FeatureStore, concept_name, families_of, load_features
from .pitch import PITCH_CLASSES, class_shares, frame_classes

class OneHotRidge:
    """Multiclass ridge on one-hot targets (closed form), predicting the argmax."""

    def __init__(self, X: np.ndarray, labels: np.ndarray, n_classes: int, rel_alpha: float = 1e-2) -> None:
        X = X.astype(np.float64)
        self.mu = X.mean(0)
        Xc = X - self.mu
        Y = np.eye(n_classes)[labels]
        self.ybar = Y.mean(0)
        alpha = rel_alpha * (Xc * Xc).sum() / max(len(X), 1)
        self.W = np.linalg.solve(Xc.T @ Xc + alpha * np.eye(X.shape[1]), Xc.T @ (Y - self.ybar))

    def predict(self, X: np.ndarray) -> np.ndarray:
        return ((X.astype(np.float64) - self.mu) @ self.W + self.ybar).argmax(-1)


class BalancedRidge:
    """One-vs-rest detectors: per class, ridge on 0/1 targets with the two sides weighted
    equally (closed form); a detector fires when its output is above 1/2."""

    def __init__(self, X: np.ndarray, labels: np.ndarray, n_classes: int, rel_alpha: float = 1e-2) -> None:
        X = X.astype(np.float64)
        self.mu = X.mean(0)
        Xc = X - self.mu
        self.W, self.b = np.zeros((X.shape[1], n_classes)), np.zeros(n_classes)
        for k in range(n_classes):
            y = (labels == k).astype(np.float64)
            if y.min() == y.max():
                continue  # a class without clips (or with all of them) never fires
            w = np.where(y > 0, 0.5 / y.sum(), 0.5 / (1 - y).sum())  # each side weighs 1/2
            m = w @ Xc  # weighted mean (D,)
            Z = Xc - m
            cov = (Z * w[:, None]).T @ Z  # (D, D), weights summing to 1
            ridge = rel_alpha * np.trace(cov) / X.shape[1]  # relative to the mean eigenvalue
            self.W[:, k] = np.linalg.solve(cov + ridge * np.eye(X.shape[1]), (Z * w[:, None]).T @ (y - w @ y))
            self.b[k] = w @ y - m @ self.W[:, k]

    def fires(self, X: np.ndarray) -> np.ndarray:
        """(N, C) booleans: which detectors fire on each clip."""
        return (X.astype(np.float64) - self.mu) @ self.W + self.b > 0.5


def best_layer(pack: ConceptPack, family: str, names: list[str]) -> int:
    evaluation = pack.meta.get("evaluation", {}).get(family)
    if evaluation and evaluation.get("scores"):
        return int(np.argmax(evaluation["scores"]))
    return int(np.argmax(np.mean([pack[n].scores.numpy() for n in names], axis=0)))


@dataclass(frozen=True)
class EvalOptions:
    """How `probes eval` steers and which outside judges it runs, beyond the probe protocol."""
    rows: str = "both"  # the CFG rows steered: both, or the conditional one (SteeringSettings.rows)
    mode: str = "add"  # the steering mode (steering/modes.py): add | norm | clamp | ablate
    targets: tuple[str, ...] | None = None  # the concepts steered one at a time (None: all of the family's)
    schedule: str | None = None  # a schedule spec multiplying the targets' strengths (steering/schedules.py)
    crossfades: tuple[str, ...] = ()  # "A,B": A fades out while B fades in, over the clip
    together: tuple[str, ...] = ()  # "A,B[,...]": steered at once, each at the strength
    pitch: str | None = None  # CREPE's model (tiny | full) judging pitch classes; None: no pitch judge
    segments: int = 4  # time segments the rates are also given for (probes on each segment's pooled states)
    program: int | None = None  # the GM program the prompt names: the program probe's target; None: no probe


class ProgramProbe:
    """The text-adherence stand-in: a multiclass ridge on the GM program of every training clip
    (the feature store's `program` column), at the evaluated layer."""

    def __init__(self, store: FeatureStore, layer: int, program: int, seed: int) -> None:
        rows = np.flatnonzero(store.program != "")
        self.programs = sorted(set(store.program[rows]), key=lambda p: (len(p), p))
        if len(self.programs) < 2:
            raise ProbeError(f"{store.directory} holds clips of {len(self.programs)} program(s); a program probe "
                             "needs at least two")
        if str(program) not in self.programs:
            raise ProbeError(f"--prompt-program {program}: the feature store has no clips of program {program} "
                             f"(it has {', '.join(self.programs)})")
        self.target = str(program)
        ids = np.array([self.programs.index(p) for p in store.program[rows]])
        X = store.layer(layer, rows)
        held = np.random.default_rng(seed).random(len(rows)) < 0.2  # a held-out fifth, for the record
        probe = OneHotRidge(X[~held], ids[~held], len(self.programs))
        self.held_out = float((probe.predict(X[held]) == ids[held]).mean()) if held.any() else None
        self.ridge = OneHotRidge(X, ids, len(self.programs))

    def predict(self, pooled: np.ndarray) -> str:
        return self.programs[int(self.ridge.predict(pooled)[0])]

    def describe(self, layer: int) -> dict:
        return {"program": int(self.target), "layer": layer, "programs": [int(p) for p in self.programs],
                "held_out_accuracy": self.held_out, "chance": 1.0 / len(self.programs)}


def note_pitch_classes(family: str, labels: list[str], names: list[str]) -> dict[str, int]:
    """Each notes concept's pitch class; the CREPE judge reads pitch classes, so only `notes` fits."""
    if family != "notes" or any(label not in PITCH_CLASSES for label in labels):
        raise ProbeError(f"--pitch judges the notes family (its labels are pitch classes); family {family!r} has "
                         f"labels {', '.join(labels[:6])}{'...' if len(labels) > 6 else ''}")
    return {n: PITCH_CLASSES.index(label) for n, label in zip(names, labels)}


def run_generation_eval(model: LoadedModel, features: Path, pack_dir: Path, family: str, strengths: list[float],
                        per_concept: int, duration: float, prompt: str, gate: float, seed: int,
                        gate_per: str = "layer", options: EvalOptions = EvalOptions()) -> dict:
    store = load_features(features)
    pack = ConceptPack.load(pack_dir)
    pack.check_fits(model.cfg)
    (fam,) = families_of(store, [family])
    if fam.task != "classification":
        raise ProbeError(f"family {family!r} is a regression family; generation accuracy needs labels")
    names = [concept_name(family, label) for label in fam.labels]
    missing = [n for n in names if n not in pack.concepts]
    if missing:
        raise ProbeError(f"the pack has no concept {missing[0]!r} for family {family!r}")
    sweep, extra = build_cases(family, names, options.targets, options.schedule, options.crossfades,
                               options.together)
    pitch_classes = note_pitch_classes(family, list(fam.labels), names) if options.pitch else None
    if pitch_classes is not None and options.targets is None:
        sweep.sort(key=lambda c: pitch_classes[c.targets[0]])  # C .. B, not the store's order
    layer = best_layer(pack, family, names)
    X = store.layer(layer, fam.rows)
    classifier = OneHotRidge(X, fam.label_ids, len(fam.labels))
    detectors = BalancedRidge(X, fam.label_ids, len(fam.labels))
    programs = ProgramProbe(store, layer, options.program, seed) if options.program is not None else None
    meta = store.meta
    settings = ExtractSettings(prompt=meta["conditioning"].get("prompt") or "",
                               text=meta["conditioning"].get("prompt") is not None,
                               delay=meta.get("layout", "delay") == "delay", point=meta.get("point", "out"))
    frames = max(int(duration * 50), 8)
    if not 1 <= options.segments <= frames:
        raise ProbeError(f"{options.segments} time segments in a clip of {frames} frames; use 1 to {frames}")
    sampling = SamplingSettings(seed=seed)
    steering = SteeringSettings(gate=gate, seed=seed, gate_per=gate_per, point=settings.point,  # steer where extracted
                                rows=options.rows, mode=options.mode)
    steerer, plan = build_steering(model.decoder, pack, steering, sampling.batch, names)
    clap, clap_note = clap_scorer()

    def judge(codes: torch.Tensor) -> Verdict:
        """The judges' verdict on one generation; steering is detached here."""
        assert not steerer.attached
        audio = model.codec.decode(codes)
        recoded = model.codec.encode(audio, model.cfg.codebooks)
        states = hidden_states(model, layout(recoded, model.cfg.special_token, settings.delay)[None], settings)
        sequence = states[layer, 0, 1:].float().cpu().numpy()  # (T, D), the conditional row
        pooled = np.concatenate([sequence.mean(0)[None], [part.mean(0) for part in  # (1 + S, D): clip, segments
                                                          np.array_split(sequence, options.segments)]])
        labels, fires = classifier.predict(pooled), detectors.fires(pooled)  # (1 + S,), (1 + S, C)
        return Verdict(
            int(labels[0]), fires[0], programs.predict(pooled[:1]) if programs is not None else None,
            class_shares(frame_classes(audio, model.codec.sample_rate, options.pitch), options.segments)
            if options.pitch else None,
            clap.score(prompt, audio, model.codec.sample_rate) if clap is not None else None,
            labels[1:], fires[1:])

    def generations(strength: float, case) -> list[Verdict]:
        """`per_concept` judged generations of `case` at `strength` (None: unsteered), seeds paired."""
        if case is None:
            return [judge(generate(model.decoder, model.text, prompt, frames, SamplingSettings(seed=seed + i)).codes)
                    for i in range(per_concept)]
        install(plan, case, strength, frames)
        with steerer:
            codes = [generate(model.decoder, model.text, prompt, frames, SamplingSettings(seed=seed + i),
                              before_step=lambda s: plan.write(s, steerer)).codes for i in range(per_concept)]
        return [judge(c) for c in codes]

    t0 = time.monotonic()
    target = programs.target if programs is not None else None
    table, case_rows = [], {c.name: [] for c in extra}
    for strength in strengths:
        unsteered = generations(0.0, None) if strength == 0.0 else None
        per_case = {c.name: summarise(c.targets, generations(strength, c) if unsteered is None else unsteered, names,
                                      pitch_classes, target)
                    for c in sweep}
        table.append(sweep_row(strength, per_case))
        for c in extra:
            verdicts = generations(strength, c) if unsteered is None else unsteered
            case_rows[c.name].append({"strength": strength,
                                      **summarise(c.targets, verdicts, names, pitch_classes, target)})
    return {"evaluation": "generation", "family": family, "layer": layer, "labels": list(fam.labels),
            "chance": 1.0 / len(fam.labels), "per_concept": per_concept, "duration_s": frames / 50,
            "gate": gate, "gate_per": gate_per, "rows": options.rows, "mode": options.mode, "prompt": prompt,
            "targets": [c.targets[0] for c in sweep], "schedule": options.schedule or "constant",
            "table": table, "cases": [{"case": c.name, "kind": c.kind, "targets": list(c.targets),
                                       "table": case_rows[c.name]} for c in extra],
            "pitch": {"crepe": options.pitch, "periodicity_above": 0.5, "hop_ms": 10.0, "segments": options.segments,
                      "chance": 1.0 / 12} if options.pitch else None,
            "program_probe": programs.describe(layer) if programs is not None else None,
            "clap": clap.source if clap else None, "clap_note": clap_note,
            "held_out": pack.meta.get("evaluation", {}).get(family), "seconds": time.monotonic() - t0}


def steering_pitch_table(model: LoadedModel, features: Path, pack_dir: Path, strengths: list[float],
                         targets: list[str] | None = None, *, per_concept: int = 4, duration: float = 4.0,
                         prompt: str = "music", rows: str = "both", gate: float = 0.3, gate_per: str = "layer",
                         crepe: str = "tiny", seed: int = 0, mode: str = "add") -> dict:
    """CREPE's share of voiced frames at each target note, per strength, on any model and notes
    pack: {"strengths": [...], "chance": 1/12, "share": {concept: [share per strength]},
    "voiced": [share of voiced frames per strength], "record": the full `probes eval` record}.
    A strength of 0 gives the unsteered share toward each target (the baseline); a negative one
    steers along the flipped direction. `targets` are labels (C) or concept names (notes-C)."""
    record = run_generation_eval(model, features, pack_dir, "notes", strengths, per_concept, duration, prompt, gate,
                                 seed, gate_per, EvalOptions(rows=rows, mode=mode, targets=tuple(targets) if targets else None,
                                                             pitch=crepe))
    return {"strengths": [row["strength"] for row in record["table"]], "chance": 1.0 / 12,
            "share": {n: [row["per_concept_pitch"][n] for row in record["table"]] for n in record["targets"]},
            "voiced": [row["voiced"] for row in record["table"]], "record": record}
