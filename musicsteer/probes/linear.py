"""Linear probes: ridge regression (MSE), logistic regression, and difference of means,
plus their multiclass forms for evaluation.

Each `fit_*(X_train, y_train, X_val, y_val)` returns a `LinearProbe` whose `.predict`
is affine in the features and whose `.direction()` is its normalised weight row, signed
by `common.signed_unit`. Ridge is the steering default of the linear-probe paper
(regression targets: 0/1 for a class, the value for a regression family). The
regularisation of ridge and logistic regression is picked on the validation split from
a fixed grid, relative to the mean eigenvalue of the training covariance (so the grid
means the same at every layer). Closed forms in float64 numpy; logistic regression by
L-BFGS in torch. Nothing here knows of layers, feature stores or packs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .common import (
    ProbeError,
    auc,
    check_features,
    check_xy,
    infer_task,
    mse,
    score,
    signed_unit,
)

RIDGE_ALPHAS = tuple(float(a) for a in np.logspace(-6, 2, 17))
LOGISTIC_ALPHAS = tuple(float(a) for a in np.logspace(-4, 1, 6))


@dataclass
class LinearProbe:
    kind: str  # linear | logistic | diffmean
    w: np.ndarray  # (D,) weights on the model's own coordinates
    b: float
    task: str
    val_score: float  # AUC (classification) or R^2 (regression) on the validation split
    val_loss: float | None  # what picked the regularisation (val MSE or log-loss); None for diffmean
    unit: np.ndarray  # (D,) signed unit direction
    hyper: dict = field(default_factory=dict)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Affine output (N,): a 0/1 or value estimate (ridge, diffmean), a logit (logistic)."""
        return (np.asarray(X, dtype=np.float64) @ self.w + self.b).astype(np.float64)

    def direction(self) -> np.ndarray:
        return self.unit.copy()


def _ridge_path(Xc: np.ndarray, Yc: np.ndarray, alphas) -> tuple[list[np.ndarray], float]:
    """Ridge weights (D, C) for every alpha, from one SVD of the centred data Xc (n, D)."""
    U, s, Vt = np.linalg.svd(Xc, full_matrices=False)  # (n, r), (r,), (r, D)
    mean_eig = float((s ** 2).sum() / Xc.shape[1])
    if not np.isfinite(mean_eig) or mean_eig <= np.finfo(np.float64).tiny:
        raise ProbeError("the features do not vary across clips: nothing for a probe to learn")
    UtY = U.T @ Yc  # (r, C)
    return [Vt.T @ ((s / (s ** 2 + a * mean_eig))[:, None] * UtY) for a in alphas], mean_eig


def fit_ridge(X_train, y_train, X_val, y_val, task: str | None = None, alphas=RIDGE_ALPHAS) -> LinearProbe:
    """Ridge regression on 0/1 or numeric targets; alpha picked by validation MSE."""
    task = infer_task(y_train, task)
    Xt, yt = check_xy(X_train, y_train, "ridge training data", task)
    Xv, yv = check_xy(X_val, y_val, "ridge validation data", task)
    mu, ym = Xt.mean(0, dtype=np.float64), yt.mean()
    path, mean_eig = _ridge_path(Xt - mu, (yt - ym)[:, None], alphas)
    losses = [mse(yv, (Xv - mu) @ w[:, 0] + ym) for w in path]
    k = int(np.argmin(losses))
    w = path[k][:, 0]
    b = ym - float(mu @ w)
    pred = Xv @ w + b
    return LinearProbe("linear", w, b, task, score(task, yv, pred), losses[k], signed_unit(w, Xt, yt),
                       {"alpha": alphas[k], "reg": alphas[k] * mean_eig, "alphas": list(alphas)})


def _logistic(Xc: np.ndarray, Y: np.ndarray, n_out: int, lam: float, weights: np.ndarray,
              init: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted L2 logistic (n_out == 1, Y 0/1) or softmax (Y class ids) regression by L-BFGS."""
    X = torch.from_numpy(Xc)
    D = X.shape[1]
    W = torch.zeros(D, n_out, dtype=torch.float64) if init is None else init[0].clone()
    b = torch.zeros(n_out, dtype=torch.float64) if init is None else init[1].clone()
    W.requires_grad_(True)
    b.requires_grad_(True)
    wts = torch.from_numpy(weights / weights.sum())
    target = torch.from_numpy(Y)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=300, tolerance_grad=1e-10, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = X @ W + b  # (n, n_out)
        if n_out == 1:
            per = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], target, reduction="none")
        else:
            per = torch.nn.functional.cross_entropy(logits, target, reduction="none")
        loss = (wts * per).sum() + 0.5 * lam * (W * W).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach(), b.detach()


def _balanced_weights(labels: np.ndarray) -> np.ndarray:
    """Per-sample weights giving every class the same total weight."""
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    return (1.0 / counts)[inverse]


def fit_logistic(X_train, y_train, X_val, y_val, task: str | None = None,
                 alphas=LOGISTIC_ALPHAS) -> LinearProbe:
    """Class-balanced L2 logistic regression; alpha picked by class-balanced validation log-loss."""
    task = infer_task(y_train, task)
    if task != "classification":
        raise ProbeError("logistic probes need 0/1 labels; use linear, rfm or diffmean for a regression family")
    Xt, yt = check_xy(X_train, y_train, "logistic training data", task)
    Xv, yv = check_xy(X_val, y_val, "logistic validation data", task)
    mu = Xt.mean(0, dtype=np.float64)
    Xc, Xvc = Xt - mu, Xv - mu
    mean_eig = float((Xc ** 2).sum() / Xc.shape[0] / Xc.shape[1])
    wt, wv = _balanced_weights(yt), _balanced_weights(yv)
    best, init = None, None
    for a in sorted(alphas, reverse=True):  # strong to weak, each warm-started from the last
        W, b = _logistic(Xc, yt, 1, a * mean_eig, wt, init)
        init = (W, b)
        logit = torch.from_numpy(Xvc) @ W[:, 0] + b[0]
        per = torch.nn.functional.binary_cross_entropy_with_logits(logit, torch.from_numpy(yv), reduction="none")
        loss = float((per.numpy() * wv).sum() / wv.sum())
        if best is None or loss < best[0]:
            best = (loss, a, W[:, 0].numpy().copy(), float(b[0]))
    loss, a, w, b0 = best
    b = b0 - float(mu @ w)
    return LinearProbe("logistic", w, b, task, auc(yv, Xv @ w + b), loss, signed_unit(w, Xt, yt),
                       {"alpha": a, "reg": a * mean_eig, "alphas": list(alphas), "class_weights": "balanced"})


def fit_diffmean(X_train, y_train, X_val, y_val, task: str | None = None) -> LinearProbe:
    """Difference of class means (classification) or the feature-target covariance
    (regression); the output is that projection, calibrated by least squares on the
    training split."""
    task = infer_task(y_train, task)
    Xt, yt = check_xy(X_train, y_train, "difference-of-means training data", task)
    Xv, yv = check_xy(X_val, y_val, "difference-of-means validation data", task)
    if task == "classification":
        v = Xt[yt == 1].mean(0, dtype=np.float64) - Xt[yt == 0].mean(0, dtype=np.float64)
    else:
        v = (Xt - Xt.mean(0, dtype=np.float64)).T @ (yt - yt.mean()) / len(yt)
    proj = Xt @ v
    var = float(proj.var())
    slope = float(((proj - proj.mean()) * (yt - yt.mean())).mean() / var) if var > 0 else 0.0
    w = slope * v
    b = float(yt.mean() - slope * proj.mean())
    pred = Xv @ w + b
    return LinearProbe("diffmean", w, b, task, score(task, yv, pred), None, signed_unit(v, Xt, yt),
                       {"calibration": "least squares on the training projection"})


# -- multiclass, for evaluation -------------------------------------------------------------


def fit_multiclass(kind: str, X_train, labels_train, X_val, labels_val, n_classes: int) -> tuple[float, dict]:
    """A multiclass linear probe of `kind` (linear: one-hot ridge; logistic: softmax;
    diffmean: nearest class mean): (validation accuracy, chosen hyper-parameters)."""
    lt, lv = np.asarray(labels_train, dtype=int), np.asarray(labels_val, dtype=int)
    if len(np.unique(lt)) < 2:
        raise ProbeError("multiclass probe: the training labels hold a single class")
    Xt = check_features(X_train, len(lt), "multiclass training data").astype(np.float64)
    Xv = check_features(X_val, len(lv), "multiclass validation data").astype(np.float64)
    mu = Xt.mean(0)
    Xc, Xvc = Xt - mu, Xv - mu
    if kind == "linear":
        Y = np.eye(n_classes)[lt]
        path, _ = _ridge_path(Xc, Y - Y.mean(0), RIDGE_ALPHAS)
        Yv = np.eye(n_classes)[lv]
        losses = [float(((Xvc @ W + Y.mean(0) - Yv) ** 2).mean()) for W in path]
        k = int(np.argmin(losses))
        return float(((Xvc @ path[k]).argmax(1) == lv).mean()), {"alpha": RIDGE_ALPHAS[k]}
    if kind == "logistic":
        mean_eig = float((Xc ** 2).sum() / Xc.shape[0] / Xc.shape[1])
        wt = _balanced_weights(lt)
        best, init = None, None
        for a in sorted(LOGISTIC_ALPHAS, reverse=True):
            W, b = _logistic(Xc, lt.astype(np.int64), n_classes, a * mean_eig, wt, init)
            init = (W, b)
            logits = torch.from_numpy(Xvc) @ W + b
            loss = float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(lv.astype(np.int64))))
            if best is None or loss < best[0]:
                best = (loss, a, float((logits.argmax(1).numpy() == lv).mean()))
        return best[2], {"alpha": best[1]}
    if kind == "diffmean":
        present = np.array([(lt == c).any() for c in range(n_classes)])
        means = np.stack([Xc[lt == c].mean(0) if present[c] else np.zeros(Xc.shape[1])
                          for c in range(n_classes)])  # (C, D)
        d2 = (means ** 2).sum(1)[None, :] - 2.0 * Xvc @ means.T  # (m, C): squared distance less |x|^2
        d2[:, ~present] = np.inf
        return float((d2.argmin(1) == lv).mean()), {"rule": "nearest class mean"}
    raise ProbeError(f"unknown probe method {kind!r}")
