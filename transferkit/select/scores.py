"""Transferability scores of frozen features: how well a target's labels can be read off them.

Both take features `[N, D]` and targets `[N, K]` (one column per one-hot class, per label of a
multi-label task, or per standardized regression output) and need no training:

- `logme`: LogME (You et al., ICML 2021, "LogME: Practical Assessment of Pre-trained Models for
  Transfer Learning"). Each target column is modelled as a Bayesian linear regression on the
  features, `y = F w + noise` with prior `w ~ N(0, I/alpha)` and noise `N(0, 1/beta)`; the score
  is the log marginal likelihood (the evidence) per sample at the `alpha, beta` that maximize
  it, found by MacKay's fixed-point iteration, averaged over the columns. One SVD of `F` makes
  every iteration cost O(min(N, D)).
- `knn_score`: a leave-one-out k-nearest-neighbour probe (cosine similarity): the accuracy of a
  majority vote of each sample's k nearest other samples, or R^2 for regression targets.

No installed library provides LogME (nothing in the venv implements it), so it is written here
from the paper's algorithm; the nearest-neighbour search is scikit-learn's.
"""

from __future__ import annotations

import math

import numpy as np

from transferkit.errors import UserError

KNN_K = 5  # neighbours per vote: few enough for 10 labelled images per class
_TOLERANCE = 1e-7  # relative change of alpha/beta that ends the fixed-point iteration
_MAX_ITERATIONS = 100  # it typically converges in under 10 (the paper stops after 11)
_TINY = 1e-12  # keeps the updates finite when a column is exactly fitted or exactly zero


def _checked(features: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(targets, dtype=np.float64)
    y = y.reshape(len(y), -1)
    if f.ndim != 2 or len(f) != len(y):
        raise UserError(f"scores need features [N, D] and targets [N, K]; got {f.shape}, {y.shape}")
    if len(f) < 2:
        raise UserError(f"scores need at least 2 labelled samples, got {len(f)}")
    if not (np.isfinite(f).all() and np.isfinite(y).all()):
        raise UserError("the features or targets hold NaN or inf values; the backbone diverged?")
    return f, y


def evidence(
    sigma: np.ndarray, x2: np.ndarray, residual: float, n: int, d: int, alpha: float, beta: float
):
    """log p(y | F, alpha, beta) per sample, and the pieces the fixed point updates use.

    In the eigenbasis of `F^T F` (eigenvalues `sigma`, k = min(N, D) of them, the other D - k
    are zero): `x2` are the squared projections of y on the left singular vectors and
    `residual` the part of |y|^2 outside their span. With `t = alpha / beta`, the posterior mean
    `m` has `|m|^2 = sum sigma x2 / (sigma + t)^2` and `|y - F m|^2 = sum x2 t^2 / (sigma + t)^2
    + residual`; the evidence is Bishop's (PRML eq. 3.86).
    """
    t = alpha / beta
    m2 = float((sigma * x2 / (sigma + t) ** 2).sum())
    res2 = float((x2 * (t / (sigma + t)) ** 2).sum()) + residual
    gamma = float((sigma / (sigma + t)).sum())  # the effective number of parameters
    log_det = float(np.log(alpha + beta * sigma).sum()) + (d - len(sigma)) * math.log(alpha)
    value = (
        d / 2 * math.log(alpha)
        + n / 2 * math.log(beta)
        - beta / 2 * res2
        - alpha / 2 * m2
        - log_det / 2
        - n / 2 * math.log(2 * math.pi)
    )
    return value / n, m2, res2, gamma


def logme_column(
    u: np.ndarray, sigma: np.ndarray, y: np.ndarray, d: int
) -> tuple[float, float, float]:
    """(evidence per sample, alpha, beta) at the fixed point for one target column `y`."""
    n = len(y)
    x = u.T @ y
    x2 = x**2
    residual = max(float(y @ y - x2.sum()), 0.0)
    alpha, beta = 1.0, 1.0
    for _ in range(_MAX_ITERATIONS):
        _, m2, res2, gamma = evidence(sigma, x2, residual, n, d, alpha, beta)
        new_alpha = gamma / max(m2, _TINY)
        new_beta = max(n - gamma, _TINY) / max(res2, _TINY)
        done = abs(new_alpha / new_beta - alpha / beta) <= _TOLERANCE * (alpha / beta)
        alpha, beta = max(new_alpha, _TINY), new_beta
        if done:
            break
    return evidence(sigma, x2, residual, n, d, alpha, beta)[0], alpha, beta


def logme(features: np.ndarray, targets: np.ndarray) -> float:
    """LogME of `features` `[N, D]` for `targets` `[N, K]`: the mean over columns of the
    maximized evidence per sample (higher: the labels are a more likely linear read-out)."""
    f, y = _checked(features, targets)
    u, s, _ = np.linalg.svd(f, full_matrices=False)  # F = U diag(s) V^T, k = min(N, D)
    sigma = s**2
    return float(np.mean([logme_column(u, sigma, column, f.shape[1])[0] for column in y.T]))


def knn_score(features: np.ndarray, targets: np.ndarray, kind: str, k: int = KNN_K) -> float:
    """Leave-one-out kNN probe on cosine similarity: accuracy for `multiclass` (one-hot
    targets) and `binary` / `multilabel` (0/1 columns, per-label accuracy), R^2 averaged over
    the columns for `regression`. Ties of a vote go to the nearer neighbours."""
    from sklearn.neighbors import NearestNeighbors

    f, y = _checked(features, targets)
    n = len(f)
    k = min(k, n - 1)
    norms = np.linalg.norm(f, axis=1, keepdims=True)
    unit = f / np.maximum(norms, _TINY)
    _, found = NearestNeighbors(n_neighbors=k + 1).fit(unit).kneighbors(unit)
    # Leave one out: drop each sample from its own neighbours (usually first, but an exact
    # duplicate may come before it), keeping the k nearest others in order.
    others = found != np.arange(n)[:, None]
    order = np.argsort(~others, axis=1, kind="stable")[:, :k]
    neighbours = np.take_along_axis(found, order, axis=1)
    # Nearer neighbours weigh a little more, which only ever breaks ties.
    weights = 1.0 + 1e-3 * np.arange(k, 0, -1) / k
    votes = (y[neighbours] * weights[None, :, None]).sum(axis=1) / weights.sum()
    if kind == "multiclass":
        return float((votes.argmax(axis=1) == y.argmax(axis=1)).mean())
    if kind in ("binary", "multilabel"):
        return float(((votes >= 0.5) == (y >= 0.5)).mean())
    if kind == "regression":
        total = ((y - y.mean(axis=0)) ** 2).sum(axis=0)
        errors = ((y - votes) ** 2).sum(axis=0)
        return float(np.mean(1.0 - errors / np.maximum(total, _TINY)))
    raise UserError(f"knn_score: unknown task kind {kind!r}")
