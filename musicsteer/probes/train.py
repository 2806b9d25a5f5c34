"""`musicsteer probes train`: per-layer probes on a feature store -> a concept pack.

For each family and each layer: every concept gets a probe (one-vs-rest and class-
balanced for a label, the numeric value for a regression family), scored on the
validation split, whose signed unit direction becomes that layer's row of the concept;
and (with `evaluate`) one multiclass probe per classification family gives the
family's held-out accuracy per layer, for evaluation only.

Scores: ROC AUC of the one-vs-rest probe's output on a class-balanced validation split;
R^2 for a regression family; multiclass accuracy on the whole validation split. Targets
(for the clamp mode): the mean projection of the concept's training clips on the
direction, per layer (none for a regression concept).

Nothing here knows of the decoder: the pack is checked against a model when loaded.
"""

from __future__ import annotations

import csv
import functools
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .common import ProbeError
from .features import (
    ConceptSpec,
    Family,
    Split,
    concepts_of,
    families_of,
    load_features,
    split_family,
    strata,
)
from .linear import RIDGE_ALPHAS, fit_diffmean, fit_logistic, fit_multiclass, fit_ridge
from ..steering.pack import SIGN, Concept, ConceptPack
from .rfm import RECIPES, RfmSearch, fit_rfm, fit_rfm_multiclass, recipe

__all__ = ["METHODS", "ProbeError", "RECIPES", "evaluation_table", "plot_scores", "train_pack"]

METHODS = ("rfm", "linear", "logistic", "diffmean")
DIRECTION_RULE = {
    "rfm": "top eigenvector of the AGOP of the best-iteration xrfm predictor",
    "linear": "normalised weight row of ridge regression (MSE on 0/1 or numeric targets)",
    "logistic": "normalised weight row of class-balanced L2 logistic regression",
    "diffmean": "difference of class means (regression: feature-target covariance), normalised",
}
SCORES = {"classification": "ROC AUC of the one-vs-rest probe output on a class-balanced validation split",
          "regression": "R^2 on the validation split",
          "multiclass": "accuracy of a multiclass probe of the same method on the whole validation split"}


@dataclass(frozen=True)
class _Job:
    """One concept's training and validation rows (positions within its family) and targets."""
    spec: ConceptSpec
    task: str
    train: np.ndarray
    val: np.ndarray
    y_train: np.ndarray
    y_val: np.ndarray


def _balanced(pos: np.ndarray, neg: np.ndarray, rng, cap: int | None) -> np.ndarray:
    n = min(len(pos), len(neg)) if cap is None else min(len(pos), len(neg), max(1, cap // 2))
    return np.sort(np.concatenate([rng.choice(pos, n, replace=False), rng.choice(neg, n, replace=False)]))


def _capped(idx: np.ndarray, cap: int | None, rng) -> np.ndarray:
    return idx if cap is None or len(idx) <= cap else np.sort(rng.choice(idx, cap, replace=False))


def _jobs(fam: Family, specs: list[ConceptSpec], split: Split, seed: int, max_train: int | None) -> list[_Job]:
    jobs = []
    for spec in specs:
        rng = np.random.default_rng([seed, zlib.crc32(fam.name.encode()), 0 if spec.label_id is None else spec.label_id + 1])
        if fam.task == "regression":
            tr, va = _capped(split.train, max_train, rng), split.val
            jobs.append(_Job(spec, "regression", tr, va, fam.values[tr], fam.values[va]))
            continue
        hit = fam.label_ids == spec.label_id
        tr = _balanced(split.train[hit[split.train]], split.train[~hit[split.train]], rng, max_train)
        va = _balanced(split.val[hit[split.val]], split.val[~hit[split.val]], rng, None)
        jobs.append(_Job(spec, "classification", tr, va, hit[tr].astype(float), hit[va].astype(float)))
    return jobs


@dataclass(frozen=True)
class FitResult:
    """One concept's probe at one layer, as the pack keeps it."""
    direction: np.ndarray  # (D,) float32, signed unit vector
    score: float
    target: float  # mean projection of the concept's training clips (regression: of all)
    hyper: dict


def fit_concept(X: np.ndarray, method: str, job: _Job, layer: int, search: RfmSearch, device) -> FitResult:
    """The search for one concept at one layer, on that layer's features X (n, D)."""
    probe = _fit(method, X, job, search, device)
    if not np.isfinite(probe.val_score):
        raise ProbeError(f"concept {job.spec.name!r} layer {layer}: the validation score is not finite")
    v = probe.direction()
    pos = job.train[job.y_train == 1] if job.task == "classification" else job.train
    return FitResult(v, float(probe.val_score), float((X[pos] @ v).mean()), _compact_hyper(method, probe))


def fit_family(X: np.ndarray, method: str, fam: Family, train, val, search: RfmSearch, device) -> float:
    """The family's multiclass evaluation probe at one layer: its validation accuracy."""
    return _multiclass(method, X, fam, train, val, search, device)


def run_local(groups, bar) -> list[list]:
    """The local engine: each group's features loaded in turn, its fits run here, in order.
    A group is (load: () -> X (n, D), [(fn, args)]); each fit is fn(X, *args)."""
    out = []
    for load, calls in groups:
        X = load()
        fitted = []
        for fn, args in calls:
            fitted.append(fn(X, *args))
            bar.update()
        out.append(fitted)
    return out


def _fit(method: str, X: np.ndarray, job: _Job, search: RfmSearch, device):
    args = (X[job.train], job.y_train, X[job.val], job.y_val)
    if method == "rfm":
        return fit_rfm(*args, params=search, task=job.task, device=device)
    if method == "linear":
        return fit_ridge(*args, task=job.task)
    if method == "logistic":
        return fit_logistic(*args, task=job.task)
    return fit_diffmean(*args, task=job.task)


def _compact_hyper(method: str, probe) -> dict:
    if method == "rfm":
        h = probe.hyper
        return {k: h[k] for k in ("reg", "bandwidth", "exponent", "center_grads", "best_iter", "scale")} | {
            "val_loss": probe.val_loss}
    return {k: v for k, v in probe.hyper.items() if k in ("alpha",)}


def train_pack(features_dir: Path | str, concepts: list[str] | None = None, method: str = "rfm",
               families: list[str] | None = None, val_fraction: float = 0.2, seed: int = 0,
               budget: int | None = None,
               out_dir: Path | str | None = None, model_id: str | None = None, *,
               max_train: int | None = 4000, evaluate: bool = True, device: str | None = None,
               progress: bool = True, recipe_name: str = "musicsteer", engine=None) -> ConceptPack:
    """Train per-layer probes for the chosen concepts (all by default) and return the pack;
    with `out_dir`, also save it there with `evaluation.csv` and `scores.png`.

    `budget` is the number of RFM configurations tried per concept and layer (None: the
    recipe's, 8 or 100; ignored by the linear methods, whose regularisation grid is fixed);
    `recipe_name` picks the RFM search (rfm.RECIPES: the project's, or MusicRFM's code);
    `max_train` caps the training clips per probe (None: no cap); `device` None runs RFM on
    CUDA when present. `engine`
    runs the fits (`run_local` by default; `probes.distributed.train_ray` on Ray): every
    fit is seeded by its concept and layer, so the pack does not depend on the engine."""
    from tqdm import tqdm

    if method not in METHODS:
        raise ProbeError(f"probe method {method!r}; use one of {', '.join(METHODS)}")
    store = load_features(features_dir)
    fams = families_of(store, families)
    specs = concepts_of(fams)
    if concepts:
        names = [s.name for s in specs]
        unknown = [c for c in concepts if c not in names]
        if unknown:
            shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
            raise ProbeError(f"no concept {', '.join(map(repr, unknown))} in these families; they have: {shown}")
        specs = [s for s in specs if s.name in concepts]
        fams = [f for f in fams if any(s.family == f.name for s in specs)]
    if method == "logistic":
        for f in fams:
            if f.task == "regression":
                raise ProbeError(f"family {f.name!r} is a regression family and logistic probes need labels; "
                                 "leave it out (--families) or use rfm, linear or diffmean")
    if recipe_name != "musicsteer" and method != "rfm":
        raise ProbeError(f"the {recipe_name} recipe is an RFM search: use it with method rfm")
    search = recipe(recipe_name, budget, seed)
    L, D = store.layers, store.hidden
    directions = {s.name: np.zeros((L, D), np.float32) for s in specs}
    scores = {s.name: np.zeros(L, np.float32) for s in specs}
    targets = {s.name: np.zeros(L, np.float32) for s in specs}
    hyper: dict[str, list] = {s.name: [] for s in specs}
    info, fam_summary, evaluation = {}, {}, {}
    plans = []  # per family: its split, jobs and multiclass training rows
    for fam in fams:
        split = split_family(fam, val_fraction, seed)
        jobs = _jobs(fam, [s for s in specs if s.family == fam.name], split, seed, max_train)
        mc_rng = np.random.default_rng([seed, zlib.crc32(fam.name.encode()), 1 << 20])
        plans.append((fam, split, jobs, _stratified_cap(split.train, strata(fam), max_train, mc_rng)))
    groups = []  # one per family and layer: its features, loaded when its fits run, and the fits
    for fam, split, jobs, mc_train in plans:
        for layer in range(L):
            layer_search = search.for_layer(layer)
            calls = [(fit_concept, (method, job, layer, layer_search, device)) for job in jobs]
            if evaluate and fam.task == "classification":
                calls.append((fit_family, (method, fam, mc_train, split.val, layer_search, device)))
            groups.append((functools.partial(store.layer, layer, fam.rows), calls))
    n_fits = sum(len(calls) for _, calls in groups)
    with tqdm(total=n_fits, desc=f"probes ({method})", unit="fit", disable=not progress) as bar:
        results = iter((engine or run_local)(groups, bar))
    for fam, split, jobs, mc_train in plans:
        fam_summary[fam.name] = _family_summary(fam, split)
        if evaluate and fam.task == "classification":
            evaluation[fam.name] = {"metric": "accuracy", "classes": len(fam.labels), "train": len(mc_train),
                                    "val": len(split.val), "scores": []}
        for layer in range(L):
            fitted = next(results)
            for job, fit in zip(jobs, fitted):
                directions[job.spec.name][layer] = fit.direction
                scores[job.spec.name][layer] = fit.score
                targets[job.spec.name][layer] = fit.target
                hyper[job.spec.name].append(fit.hyper)
            if evaluate and fam.task == "classification":
                evaluation[fam.name]["scores"].append(fitted[-1])
        for job in jobs:
            s = scores[job.spec.name]
            info[job.spec.name] = {
                "family": fam.name, "label": job.spec.label, "task": job.task,
                "score": "auc" if job.task == "classification" else "r2",
                "best_layer": int(np.argmax(s)), "best_score": float(s.max()),
                "train_clips": len(job.train), "val_clips": len(job.val), "layers": hyper[job.spec.name]}
    concepts_out = {
        s.name: Concept(s.name, torch.from_numpy(directions[s.name]), torch.from_numpy(scores[s.name]),
                        torch.from_numpy(targets[s.name]) if info[s.name]["task"] == "classification" else None)
        for s in specs}
    meta = {
        "model": {"id": model_id or store.meta["model"].get("id", "unknown"), "layers": L, "hidden": D},
        "method": method,
        "hyperparameters": _hyper_summary(method, search, max_train, recipe_name),
        "sign": SIGN,
        "sign_rule": "each layer's direction is flipped so that the projection of the training clips on it "
                     "correlates positively with the concept's 0/1 label or value",
        "direction": DIRECTION_RULE[method],
        "scores": SCORES,
        "targets": "mean projection of the concept's training clips on the direction (classification only)",
        "data": {"features": str(Path(features_dir)), "dataset": store.meta.get("dataset"),
                 "conditioning": store.meta.get("conditioning"), "layout": store.meta.get("layout"),
                 "point": store.meta.get("point", "out"),
                 "clips": int(store.pooled.shape[1]), "val_fraction": val_fraction, "seed": seed,
                 "balance": "one-vs-rest: the larger side subsampled to the smaller, in both splits",
                 "families": fam_summary},
        "evaluation": evaluation,
        "concept_info": info,
    }
    pack = ConceptPack(concepts_out, meta)
    if out_dir is not None:
        out = Path(out_dir)
        pack.save(out)
        _write_evaluation(pack, out / "evaluation.csv")
        plot_scores(pack, out / "scores.png")
    return pack


def _stratified_cap(idx: np.ndarray, s: np.ndarray, cap: int | None, rng) -> np.ndarray:
    """At most `cap` of `idx`, keeping each stratum's share (at least one clip each)."""
    if cap is None or len(idx) <= cap:
        return idx
    keep = []
    for k in np.unique(s[idx]):
        members = idx[s[idx] == k]
        n = max(1, round(cap * len(members) / len(idx)))
        keep.append(rng.choice(members, min(n, len(members)), replace=False))
    return np.sort(np.concatenate(keep))


def _multiclass(method, X, fam: Family, train, val, search, device) -> float:
    args = (X[train], fam.label_ids[train], X[val], fam.label_ids[val], len(fam.labels))
    if method == "rfm":
        return fit_rfm_multiclass(*args, params=search, device=device)[0]
    return fit_multiclass(method, *args)[0]


def _family_summary(fam: Family, split: Split) -> dict:
    out = {"task": fam.task, "clips": len(fam.rows), "programs": len(np.unique(fam.programs)),
           "split": {"grouped_by_program": split.grouped, "note": split.note, "train": len(split.train),
                     "val": len(split.val)}}
    if fam.task == "classification":
        out["labels"] = {lab: int((fam.label_ids == i).sum()) for i, lab in enumerate(fam.labels)}
    else:
        out["values"] = [float(fam.values.min()), float(fam.values.max())]
    return out


def _hyper_summary(method: str, search: RfmSearch, max_train, recipe_name: str) -> dict:
    out = {"max_train": max_train}
    if method == "rfm":
        selection = ("per concept and layer, the configuration with the lowest validation MSE (xrfm keeps its "
                     "best iteration by the same metric)") if search.select == "loss" else (
                     "per concept and layer, the configuration with the best validation score (AUC; R^2 for a "
                     "regression concept, accuracy for the multiclass evaluation); xrfm keeps its best iteration "
                     f"by validation {search.base.tuning_metric} (MSE where there are no labels)")
        out |= {"recipe": recipe_name, "search": search.describe(), "library": _xrfm_version(),
                "selection": selection,
                "per_layer": "concepts[*].layers: reg, bandwidth, exponent, center_grads, best_iter, scale"}
    elif method in ("linear", "logistic"):
        out |= {"alpha_grid": list(RIDGE_ALPHAS) if method == "linear" else "logspace(-4, 1, 6)",
                "reg": "alpha x mean eigenvalue of the training covariance, alpha picked by validation "
                       + ("MSE" if method == "linear" else "class-balanced log-loss")}
    return out


def _xrfm_version() -> str:
    try:
        import xrfm

        return f"xrfm {xrfm.__version__}"
    except (ImportError, AttributeError):
        return "xrfm"


def _info(pack: ConceptPack) -> dict:
    """Per-concept info: `concept_info` before saving, the `concepts` entries after loading."""
    if "concept_info" in pack.meta:
        return pack.meta["concept_info"]
    return {c["name"]: c for c in pack.meta.get("concepts", []) if isinstance(c, dict) and "name" in c}


def evaluation_table(pack: ConceptPack) -> list[dict]:
    """Rows {family, layer, metric, score}: multiclass accuracy per classification family,
    R^2 per regression concept."""
    rows = []
    for fam, e in pack.meta.get("evaluation", {}).items():
        rows += [{"family": fam, "layer": i, "metric": e["metric"], "score": float(s)}
                 for i, s in enumerate(e["scores"])]
    info = _info(pack)
    for name, c in pack.concepts.items():
        ci = info.get(name, {})
        if ci.get("task") == "regression":
            rows += [{"family": ci["family"], "layer": i, "metric": "r2", "score": float(s)}
                     for i, s in enumerate(c.scores.tolist())]
    return rows


def _write_evaluation(pack: ConceptPack, path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["family", "layer", "metric", "score"])
        w.writeheader()
        w.writerows(evaluation_table(pack))


def plot_scores(pack: ConceptPack, path: Path | str) -> None:
    """A PNG: validation score per layer, one panel per family, one line per concept and
    (dashed, black) the family's multiclass accuracy."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    info = _info(pack)
    fams = list(dict.fromkeys(info.get(n, {}).get("family", "concepts") for n in pack.names))
    fig = Figure(figsize=(6.5, 3.2 * len(fams)), layout="constrained")
    FigureCanvasAgg(fig)
    for i, fam in enumerate(fams):
        ax = fig.add_subplot(len(fams), 1, i + 1)
        names = [n for n in pack.names if info.get(n, {}).get("family", "concepts") == fam]
        for n in names:
            ax.plot(pack[n].scores.numpy(), marker=".", lw=1, alpha=0.8, label=n)
        ev = pack.meta.get("evaluation", {}).get(fam)
        if ev:
            ax.plot(ev["scores"], "k--", lw=2, label="multiclass accuracy")
        metric = info.get(names[0], {}).get("score", "score")
        ax.set(title=f"{fam} ({pack.meta.get('method', '')}, {metric})", xlabel="layer", ylabel="validation score")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if len(names) <= 12:
            ax.legend(fontsize=7, ncol=2)
    fig.savefig(str(path), dpi=110)
