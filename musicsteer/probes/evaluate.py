"""`musicsteer probes eval`: MusicRFM's "probe accuracy on generations".

A multiclass probe for one family is fitted on the training features at the family's
best layer (the pack's multiclass evaluation, else the concepts' best mean score),
and beside it one class-balanced one-vs-rest detector per concept. Then, for each
strength and each concept of the family, the model generates clips steered toward
that concept (strength 0: unsteered); each clip is decoded to audio, re-encoded by
EnCodec, run through the decoder exactly as the training clips were (the feature
store's conditioning and layout), pooled, and judged with steering detached (the
hooks would otherwise add the last step's strengths to the features judged).

Two rates per strength: `accuracy`, the fraction of generations the multiclass probe
classifies as the concept they were steered toward (MusicRFM's figure; at strength 0
it is 1/C by construction, since every clip gets exactly one label), and `detected`,
the fraction for which the target concept's own detector fires. At strength 0 the
detected rate is the unsteered baseline toward each target, which a steered row is
compared with. The gate is drawn per layer and concept (MusicRFM's code) unless told.

A CLAP text-adherence column needs a CLAP model in the local Hugging Face cache;
without one the column is absent and the record says why.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..model.generate import generate
from ..model.loading.load import LoadedModel, hf_cache_snapshot
from ..model.sampling import SamplingSettings
from ..steering.plan import SteeringSettings, build_steering
from .common import ProbeError
from .extract import ExtractSettings, hidden_states, layout
from .features import concept_name, families_of, load_features
from ..steering.pack import ConceptPack

CLAP_REPOS = ("laion/larger_clap_music", "laion/clap-htsat-unfused")


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


class ClapScorer:
    """Text adherence: cosine of CLAP's text and audio embeddings (audio resampled to 48 kHz)."""

    def __init__(self, directory: Path, source: str) -> None:
        from transformers import ClapModel, ClapProcessor

        self.model = ClapModel.from_pretrained(directory, local_files_only=True).eval()
        self.processor = ClapProcessor.from_pretrained(directory, local_files_only=True)
        self.source = source

    @torch.inference_mode()
    def score(self, text: str, audio: np.ndarray, sample_rate: int) -> float:
        from math import gcd

        from scipy.signal import resample_poly

        rate = self.processor.feature_extractor.sampling_rate
        g = gcd(rate, sample_rate)
        audio = resample_poly(audio, rate // g, sample_rate // g).astype(np.float32)
        inputs = self.processor(text=[text], audio=[audio], sampling_rate=rate, return_tensors="pt", padding=True)
        t = self.model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        a = self.model.get_audio_features(input_features=inputs["input_features"],
                                          is_longer=inputs.get("is_longer"))
        t, a = (getattr(x, "pooler_output", x) for x in (t, a))  # tensors, or outputs holding them
        return float(torch.nn.functional.cosine_similarity(t, a).item())


def clap_scorer() -> tuple[ClapScorer | None, str]:
    """The CLAP model in the local cache, or why there is none."""
    for repo in CLAP_REPOS:
        snapshot = hf_cache_snapshot(repo)
        if snapshot is not None:
            return ClapScorer(snapshot, repo), f"CLAP text adherence with {repo} (Hugging Face cache)"
    return None, ("no CLAP column: no CLAP model (" + ", ".join(CLAP_REPOS) +
                  ") in the local Hugging Face cache, and none can be downloaded here")


def run_generation_eval(model: LoadedModel, features: Path, pack_dir: Path, family: str, strengths: list[float],
                        per_concept: int, duration: float, prompt: str, gate: float, seed: int,
                        gate_per: str = "layer") -> dict:
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
    layer = best_layer(pack, family, names)
    X = store.layer(layer, fam.rows)
    classifier = OneHotRidge(X, fam.label_ids, len(fam.labels))
    detectors = BalancedRidge(X, fam.label_ids, len(fam.labels))
    meta = store.meta
    settings = ExtractSettings(prompt=meta["conditioning"].get("prompt") or "",
                               text=meta["conditioning"].get("prompt") is not None,
                               delay=meta.get("layout", "delay") == "delay", point=meta.get("point", "out"))
    frames = max(int(duration * 50), 8)
    sampling = SamplingSettings(seed=seed)
    steering = SteeringSettings(gate=gate, seed=seed, gate_per=gate_per, point=settings.point)  # steer where extracted
    steerer, plan = build_steering(model.decoder, pack, steering, sampling.batch, names)

    clap, clap_note = clap_scorer()
    clap_scores: list[float] = []

    def judge(codes: torch.Tensor) -> tuple[int, np.ndarray]:
        """(multiclass label, which detectors fire) of one generation; steering is detached here."""
        assert not steerer.attached
        audio = model.codec.decode(codes)
        if clap is not None:
            clap_scores.append(clap.score(prompt, audio, model.codec.sample_rate))
        recoded = model.codec.encode(audio, model.cfg.codebooks)
        states = hidden_states(model, layout(recoded, model.cfg.special_token, settings.delay)[None], settings)
        pooled = states[layer, 0, 1:].float().mean(0).cpu().numpy()[None]  # (1, D)
        return int(classifier.predict(pooled)[0]), detectors.fires(pooled)[0]

    def generations(strength: float, name: str | None) -> list[torch.Tensor]:
        """`per_concept` generations steered toward `name` at `strength` (None: unsteered)."""
        if name is None:
            return [generate(model.decoder, model.text, prompt, frames, SamplingSettings(seed=seed + i)).codes
                    for i in range(per_concept)]
        for n in names:
            plan.set_strength(n, strength if n == name else 0.0)
        with steerer:
            return [generate(model.decoder, model.text, prompt, frames, SamplingSettings(seed=seed + i),
                             before_step=lambda s: plan.write(s, steerer)).codes for i in range(per_concept)]

    t0 = time.monotonic()
    table = []
    for strength in strengths:
        clap_scores.clear()
        unsteered = [judge(c) for c in generations(0.0, None)] if strength == 0.0 else None
        per_concept_acc, per_concept_det = {}, {}
        for k, name in enumerate(names):
            verdicts = unsteered if unsteered is not None else [judge(c) for c in generations(strength, name)]
            per_concept_acc[name] = sum(label == k for label, _ in verdicts) / per_concept
            per_concept_det[name] = sum(bool(fired[k]) for _, fired in verdicts) / per_concept
        row = {"strength": strength, "accuracy": float(np.mean(list(per_concept_acc.values()))),
               "detected": float(np.mean(list(per_concept_det.values()))),
               "per_concept": per_concept_acc, "per_concept_detected": per_concept_det}
        if clap is not None:
            row["clap"] = float(np.mean(clap_scores))
        table.append(row)
    return {"evaluation": "generation", "family": family, "layer": layer, "labels": list(fam.labels),
            "chance": 1.0 / len(fam.labels), "per_concept": per_concept, "duration_s": frames / 50,
            "gate": gate, "gate_per": gate_per, "prompt": prompt, "table": table, "clap": clap.source if clap else None,
            "clap_note": clap_note,
            "held_out": pack.meta.get("evaluation", {}).get(family), "seconds": time.monotonic() - t0}


def format_eval(record: dict) -> str:
    lines = [f"probe accuracy on generations: family {record['family']} (layer {record['layer']}, "
             f"{len(record['labels'])} labels, chance {record['chance']:.3f}, {record['per_concept']} clips per cell)",
             f"gate {record['gate']:g} per {record.get('gate_per', 'step')}; accuracy: classified as the target "
             "(1/C at strength 0 by construction); detected: the target's detector fires (at 0: the unsteered "
             "baseline)",
             f"{'strength':>9} {'accuracy':>9} {'detected':>9}" + (f" {'CLAP':>7}" if record["clap"] else "")]
    for row in record["table"]:
        lines.append(f"{row['strength']:9.3f} {row['accuracy']:9.3f} {row['detected']:9.3f}" +
                     (f" {row['clap']:7.3f}" if "clap" in row else ""))
    lines.append(record["clap_note"])
    return "\n".join(lines)
