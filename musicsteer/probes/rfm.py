"""RFM probes through the `xrfm` library, with MusicRFM's per-layer hyper-parameter search.

xrfm's `RFM` does the whole algorithm: kernel ridge regression with the Laplace-type
kernel K(x, z) = exp(-|x - z|_M^q / L^q) (its `LaplaceKernel`, kernel "l2": distances
are taken after x -> x @ sqrt(M)), each iteration solving (K + reg I) a = y and then
setting M to the predictor's average gradient outer product (AGOP) scaled by its
largest entry, and keeping the iteration with the best validation metric. This module
only configures it (reg = lambda, bandwidth = L, exponent = q, `center_grads`), runs a
small seeded random search over those knobs, and turns the result into a direction.

The direction is the top eigenvector of the AGOP of the kept (best-iteration)
predictor, which xrfm computes with `get_agop_best_model=True`: it is the M the next
RFM iteration would use, and it exists even when the best iteration is the first one
(where the M in use is still the identity). Its sign is fixed by `common.signed_unit`.

Features are centred and scaled by one scalar (`common.IsotropicScaler`) so that the
bandwidth range means the same thing at every layer; an isotropic scale leaves every
direction unchanged. Nothing here knows of layers, feature stores or packs.

Two recipes (`RECIPES`): the project's (`musicsteer`: 8 trials, the same at every
layer, the first at a fixed base, xrfm's `l2` kernel, features scaled to a median
distance of 10, 5 iterations, trials and iterations kept by validation MSE), and
MusicRFM's code (`musicrfm`: 100 random trials drawn afresh for every layer, kernel
`l2_high_dim` on raw features, 8 iterations with xrfm's early stop at 1.1x, iterations
and trials kept by validation AUC). Centring changes nothing for these kernels (they
depend on differences of features only), so both centre.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from .common import (
    IsotropicScaler,
    ProbeError,
    check_features,
    check_xy,
    infer_task,
    mse,
    score,
    signed_unit,
)


@dataclass(frozen=True)
class RfmParams:
    """One xrfm configuration."""

    reg: float = 1e-3  # lambda: ridge added to the kernel matrix's diagonal
    bandwidth: float = 10.0  # L
    exponent: float = 1.0  # q
    center_grads: bool = False  # AGOP of centred gradients (their covariance) or of raw gradients
    iters: int = 5  # RFM iterations (xrfm also fits and scores a final predictor after the last M)
    kernel: str = "l2"  # xrfm kernel name: "l2" (LaplaceKernel) or "l2_high_dim" (same kernel, no sqrt(M))
    median_distance: float | None = 10.0  # scale features so the median distance is this; None: raw
    tuning_metric: str = "mse"  # xrfm's metric for keeping the best iteration (and for the search)
    early_stop: bool = True  # xrfm's early stop when the metric gets 10% worse than the best
    top_k: int | None = None  # xrfm's top_k fit argument (MusicRFM passes its n_components)

    def __post_init__(self) -> None:
        if not (self.reg >= 0 and self.bandwidth > 0 and self.exponent > 0 and self.iters >= 1):
            raise ProbeError(f"RFM parameters out of range: {self}")


@dataclass(frozen=True)
class RfmSearch:
    """A seeded random search: the first trial is `base`, the others draw lambda and L
    log-uniformly, q uniformly and the gradient centring from the given ranges."""

    budget: int = 8
    seed: int = 0
    reg: tuple[float, float] = (1e-5, 10.0)
    bandwidth: tuple[float, float] = (1.0, 100.0)
    exponent: tuple[float, float] = (0.7, 1.4)
    center_grads: tuple[bool, ...] = (False, True)
    base: RfmParams = field(default_factory=RfmParams)
    first_is_base: bool = True  # the first trial is `base` itself (else every trial is drawn)
    per_layer: bool = False  # draw other trials at every layer (`for_layer`) instead of the same ones
    select: str = "loss"  # keep the trial with the best xrfm tuning metric ("loss") or validation score

    def __post_init__(self) -> None:
        if self.budget < 1:
            raise ProbeError(f"the RFM search budget must be at least 1, got {self.budget}")
        if self.select not in ("loss", "score"):
            raise ProbeError(f"RFM trial selection {self.select!r}; use loss or score")

    def for_layer(self, layer: int) -> "RfmSearch":
        """The search at one layer: itself, or (per_layer) one with that layer's own draws."""
        return replace(self, seed=int(np.random.SeedSequence([self.seed, layer]).generate_state(1)[0])) \
            if self.per_layer else self

    def trials(self) -> list[RfmParams]:
        rng = np.random.default_rng(self.seed)
        out = [self.base] if self.first_is_base else []
        while len(out) < self.budget:
            out.append(replace(
                self.base,
                reg=float(np.exp(rng.uniform(np.log(self.reg[0]), np.log(self.reg[1])))),
                bandwidth=float(np.exp(rng.uniform(np.log(self.bandwidth[0]), np.log(self.bandwidth[1])))),
                exponent=float(rng.uniform(*self.exponent)),
                center_grads=bool(self.center_grads[rng.integers(len(self.center_grads))])))
        return out

    def describe(self) -> dict:
        first = "first trial = base, then " if self.first_is_base else "every trial drawn: "
        return {"budget": self.budget, "seed": self.seed, "reg": list(self.reg), "bandwidth": list(self.bandwidth),
                "exponent": list(self.exponent), "center_grads": list(self.center_grads),
                "sampling": first + "reg and bandwidth log-uniform, exponent uniform",
                "per_layer": "other draws at every layer" if self.per_layer else "the same trials at every layer",
                "select": "best validation score (AUC, R^2, accuracy)" if self.select == "score"
                else f"best validation {self.base.tuning_metric}", "base": asdict(self.base)}


RECIPES = {
    "musicsteer": RfmSearch(),
    "musicrfm": RfmSearch(budget=100, first_is_base=False, per_layer=True, select="score",
                          base=RfmParams(kernel="l2_high_dim", median_distance=None, iters=8, tuning_metric="auc",
                                         early_stop=True, top_k=1)),
}


def recipe(name: str, budget: int | None = None, seed: int = 0) -> RfmSearch:
    """The search a recipe names, with its own budget unless one is given."""
    try:
        base = RECIPES[name]
    except KeyError:
        raise ProbeError(f"RFM recipe {name!r}; use one of {', '.join(RECIPES)}") from None
    return replace(base, budget=base.budget if budget is None else budget, seed=seed)


@dataclass
class RfmProbe:
    model: object  # the fitted xrfm.RFM, at its best iteration
    params: RfmParams
    scaler: IsotropicScaler
    task: str
    val_score: float  # AUC (classification) or R^2 (regression) on the validation split
    val_loss: float  # the tuning metric on the validation split
    best_iter: int
    agop: np.ndarray  # (D, D) AGOP of the best predictor, in scaled coordinates
    unit: np.ndarray  # (D,) signed unit direction
    trials: list[dict] = field(default_factory=list)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Raw predictor output (N,) for features X (N, D) in the model's own coordinates."""
        Xs = torch.from_numpy(self.scaler(X))
        return self.model.predict(Xs).reshape(-1).cpu().numpy()

    def direction(self) -> np.ndarray:
        return self.unit.copy()

    @property
    def hyper(self) -> dict:
        return {**asdict(self.params), "best_iter": self.best_iter, "scale": self.scaler.scale}


def xrfm_model(params: RfmParams, task: str, device: str | None = None):
    """The xrfm.RFM object for one configuration (binary classification gets xrfm's 0/1 converter)."""
    from xrfm import RFM
    from xrfm.rfm_src.class_conversion import ClassificationConverter

    converter = ClassificationConverter("zero_one", n_classes=2) if task == "classification" else None
    return RFM(kernel=params.kernel, bandwidth=params.bandwidth, exponent=params.exponent, iters=params.iters,
               device=device, verbose=False, tuning_metric=params.tuning_metric, class_converter=converter)


def xrfm_fit(model, params: RfmParams, Xt: torch.Tensor, yt: torch.Tensor, Xv: torch.Tensor,
             yv: torch.Tensor) -> None:
    """xrfm's fit with our settings; Xt (n, D), yt (n, 1) or (n, C)."""
    # `iters` is passed again here: xrfm records the final round's index from this argument.
    extra = {} if params.top_k is None else {"top_k": params.top_k}
    model.fit((Xt, yt), (Xv, yv), iters=params.iters, reg=params.reg, center_grads=params.center_grads,
              early_stop_rfm=params.early_stop, return_best_params=True, get_agop_best_model=True, **extra)


def _maximize(metric: str) -> bool:
    from xrfm.rfm_src.metrics import Metric

    return Metric.from_name(metric).should_maximize


def _fit_one(Xt, Yt, Xv, Yv, params: RfmParams, task: str, device, seed: int) -> dict:
    """Fit one configuration on scaled features Xt (n, D) with targets Yt (n, C)."""
    xtask = task if Yt.shape[1] == 1 else "regression"
    if xtask == "regression" and params.tuning_metric == "auc":  # AUC needs labels: iterations by MSE here
        params = replace(params, tuning_metric="mse")
    model = xrfm_model(params, xtask, device)
    tXt, tXv = torch.from_numpy(Xt), torch.from_numpy(Xv)
    tYt, tYv = torch.from_numpy(Yt.astype(np.float32)), torch.from_numpy(Yv.astype(np.float32))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # xrfm draws nothing on the lstsq path; this pins any future use
        xrfm_fit(model, params, tXt, tYt, tXv, tYv)
    pred = model.predict(tXv).cpu().numpy()  # (m, C)
    if not np.isfinite(pred).all():
        return {"model": None, "loss": float("nan"), "pred": pred, "best_iter": -1}
    loss = mse(Yv, pred) if params.tuning_metric == "mse" else float(
        model.score(tXv, tYv, [params.tuning_metric])[params.tuning_metric])
    return {"model": model, "loss": loss, "pred": pred, "best_iter": int(model.best_iter)}


def _search(X_train, Y_train, X_val, Y_val, params, task, device, score_fn) -> tuple[dict, RfmParams,
                                                                                       IsotropicScaler, list]:
    search = params if isinstance(params, RfmSearch) else None
    trials = search.trials() if search else [params or RfmParams()]
    seed = search.seed if search else 0
    by_score = search is not None and search.select == "score"
    maximize = True if by_score else _maximize(trials[0].tuning_metric)
    best, best_params, records, scalers = None, None, [], {}
    for p in trials:
        if p.median_distance not in scalers:
            scalers[p.median_distance] = IsotropicScaler(X_train, p.median_distance)
        sc = scalers[p.median_distance]
        r = _fit_one(sc(X_train), Y_train, sc(X_val), Y_val, p, task, device, seed)
        r["score"] = score_fn(r["pred"]) if r["model"] is not None else float("nan")
        records.append({**asdict(p), "val_loss": r["loss"], "val_score": r["score"], "best_iter": r["best_iter"]})
        key = "score" if by_score else "loss"
        if not np.isfinite(r[key]):
            continue
        if best is None or (r[key] > best[key] if maximize else r[key] < best[key]):
            best, best_params = r, p
    if best is None:
        raise ProbeError(f"every RFM fit failed (non-finite predictions) on {X_train.shape[0]} clips")
    return best, best_params, scalers[best_params.median_distance], records


def fit_rfm(X_train: np.ndarray, y_train: np.ndarray, X_val: np.ndarray, y_val: np.ndarray,
            params: RfmParams | RfmSearch | None = None, task: str | None = None,
            device: str | None = None) -> RfmProbe:
    """An RFM probe: one configuration (`RfmParams`) or the best of a search (`RfmSearch`,
    the default) by the validation tuning metric. Classification targets are 0/1 (task
    inferred when not given); `device` None picks CUDA when present, as xrfm does."""
    task = infer_task(y_train, task)
    X_train, y_train = check_xy(X_train, y_train, "RFM training data", task)
    X_val, y_val = check_xy(X_val, y_val, "RFM validation data", task)
    params = RfmSearch() if params is None else params
    best, best_params, scaler, records = _search(X_train, y_train[:, None], X_val, y_val[:, None], params, task,
                                                 device, lambda pred: score(task, y_val, pred[:, 0]))
    model = best["model"]
    agop = model.agop_best_model.double().cpu().numpy()  # (D, D)
    _, vecs = np.linalg.eigh(agop)  # ascending eigenvalues
    unit = signed_unit(vecs[:, -1], scaler(X_train), y_train)
    return RfmProbe(model, best_params, scaler, task, best["score"], best["loss"], best["best_iter"],
                    agop, unit, records)


def fit_rfm_multiclass(X_train: np.ndarray, labels_train: np.ndarray, X_val: np.ndarray, labels_val: np.ndarray,
                       n_classes: int, params: RfmParams | RfmSearch | None = None,
                       device: str | None = None) -> tuple[float, dict]:
    """Multiclass RFM on one-hot targets (for evaluation): (validation accuracy, chosen hyper-parameters)."""
    eye = np.eye(n_classes, dtype=np.float32)
    lt, lv = np.asarray(labels_train, dtype=int), np.asarray(labels_val, dtype=int)
    if len(np.unique(lt)) < 2:
        raise ProbeError("multiclass RFM: the training labels hold a single class")
    Xt = check_features(X_train, len(lt), "RFM training data")
    Xv = check_features(X_val, len(lv), "RFM validation data")
    params = RfmSearch() if params is None else params
    best, best_params, scaler, _ = _search(Xt, eye[lt], Xv, eye[lv], params, "regression", device,
                                           lambda pred: float((pred.argmax(1) == lv).mean()))
    return best["score"], {**asdict(best_params), "best_iter": best["best_iter"], "scale": scaler.scale}
