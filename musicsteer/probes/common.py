"""What every probe shares: the error type, the task rule, the validation scores, the
sign rule for directions, and the isotropic feature scaling.

Scores: ROC AUC of the probe's raw output for classification (one-vs-rest, labels in
{0, 1}), R^2 for regression. The sign rule: a direction is flipped so that the
projection of the training features on it correlates positively with the target, so
a positive projection means "more of the concept" (the pack's sign convention).

Nothing here knows of feature stores, packs or models.
"""

from __future__ import annotations

import numpy as np

from ..errors import MusicsteerError

TASKS = ("classification", "regression")


class ProbeError(MusicsteerError):
    pass


def infer_task(y: np.ndarray, task: str | None = None) -> str:
    """`task` if given; otherwise classification when the targets are all 0 or 1."""
    if task is not None:
        if task not in TASKS:
            raise ProbeError(f"probe task {task!r}; use classification or regression")
        return task
    values = np.unique(np.asarray(y))
    return "classification" if np.isin(values, (0.0, 1.0)).all() else "regression"


def check_features(X: np.ndarray, n: int | None, what: str) -> np.ndarray:
    """Float32 features (N, D), finite, with N == n when given."""
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2 or X.shape[0] < 2 or (n is not None and X.shape[0] != n):
        raise ProbeError(f"{what}: features must be [clips, hidden] with one target per clip "
                         f"(got {X.shape} for {n} targets)")
    if not np.isfinite(X).all():
        raise ProbeError(f"{what}: the features hold non-finite values")
    return X


def check_xy(X: np.ndarray, y: np.ndarray, what: str, task: str) -> tuple[np.ndarray, np.ndarray]:
    """Float arrays X (N, D) and y (N,), validated: finite, matching, two classes where needed."""
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    X = check_features(X, y.shape[0], what)
    if not np.isfinite(y).all():
        raise ProbeError(f"{what}: the targets hold non-finite values")
    if task == "classification":
        if not np.isin(y, (0.0, 1.0)).all():
            raise ProbeError(f"{what}: classification targets must be 0 or 1")
        if y.min() == y.max():
            raise ProbeError(f"{what}: the targets hold a single class; a probe needs both")
    elif y.min() == y.max():
        raise ProbeError(f"{what}: the regression targets are constant")
    return X, y


def auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC with tied scores counted half (the Mann-Whitney statistic)."""
    y = np.asarray(y).reshape(-1) > 0.5
    score = np.asarray(score, dtype=np.float64).reshape(-1)
    n1 = int(y.sum())
    n0 = y.size - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    _, inverse, counts = np.unique(score, return_inverse=True, return_counts=True)
    mean_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based average rank of each distinct score
    ranks = mean_rank[inverse]
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def r2(y: np.ndarray, pred: np.ndarray) -> float:
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    pred = np.asarray(pred, dtype=np.float64).reshape(-1)
    sst = float(((y - y.mean()) ** 2).sum())
    return float("nan") if sst == 0 else 1.0 - float(((y - pred) ** 2).sum()) / sst


def mse(y: np.ndarray, pred: np.ndarray) -> float:
    return float(np.mean((np.asarray(y, dtype=np.float64).reshape(-1) - np.asarray(pred).reshape(-1)) ** 2))


def score(task: str, y: np.ndarray, pred: np.ndarray) -> float:
    """The validation score: AUC (classification) or R^2 (regression)."""
    return auc(y, pred) if task == "classification" else r2(y, pred)


def signed_unit(v: np.ndarray, X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """v / |v|, flipped so that corr(X @ v, y) >= 0 on the given (training) data."""
    v = np.asarray(v, dtype=np.float64).reshape(-1)
    norm = np.linalg.norm(v)
    if not np.isfinite(norm) or norm == 0:
        raise ProbeError("the probe learned a zero or non-finite direction")
    v = v / norm
    proj = np.asarray(X, dtype=np.float64) @ v
    yc = np.asarray(y, dtype=np.float64) - np.mean(y)
    if float(((proj - proj.mean()) * yc).sum()) < 0:
        v = -v
    return v.astype(np.float32)


class IsotropicScaler:
    """x -> (x - mean) / s with one scalar s for all coordinates, fitted on training data.

    One shared scale keeps the geometry (directions, angles) of the residual stream, so a
    direction found on scaled features is the direction in the model's own space. With
    `median_distance`, s makes the median distance between training clips equal that
    value (computed on at most 512 evenly spaced clips, so it is deterministic).
    """

    def __init__(self, X: np.ndarray, median_distance: float | None) -> None:
        X = np.asarray(X, dtype=np.float64)
        self.mean = X.mean(axis=0)  # (D,)
        self.scale = 1.0
        if median_distance is not None:
            sub = X[np.linspace(0, X.shape[0] - 1, min(X.shape[0], 512)).round().astype(int)] - self.mean
            sq = (sub * sub).sum(1)
            d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * sub @ sub.T, 0.0)  # (n, n)
            med = float(np.median(np.sqrt(d2[np.triu_indices(sub.shape[0], k=1)])))
            self.scale = med / median_distance if med > 0 else 1.0

    def __call__(self, X: np.ndarray) -> np.ndarray:
        return ((np.asarray(X, dtype=np.float64) - self.mean) / self.scale).astype(np.float32)
