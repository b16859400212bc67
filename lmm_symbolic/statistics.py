"""Sufficient statistics: the per-group sums a random-intercept likelihood depends on, in one pass.

Sits between specification and compilation: the design's rows are reduced to O(G p^2) numbers, after
which no step of the fit touches the n rows again.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .errors import ModelError
from .specification import Design


@dataclass(frozen=True)
class GroupStatistics:
    """Per-group sums of a random-intercept design, of the shifted and scaled response.

    The response is used as (y - shift) / scale, so sums of squares do not cancel for a response far from
    0 or of extreme size; ``beta_shift`` is the change that shift makes to beta (shift * e_intercept).
    """

    m: np.ndarray          # (G,)    n_g
    Xt1: np.ndarray        # (G, p)  X_g^T 1
    Xty: np.ndarray        # (G, p)  X_g^T y
    XtX: np.ndarray        # (G, p, p)
    yty: np.ndarray        # (G,)    y_g^T y_g
    one_y: np.ndarray      # (G,)    1^T y_g
    shift: float
    scale: float
    beta_shift: np.ndarray  # (p,)

    @property
    def n(self) -> int:
        return int(self.m.sum())

    @property
    def p(self) -> int:
        return self.Xt1.shape[1]

    @property
    def G(self) -> int:
        return len(self.m)

    @classmethod
    def from_arrays(cls, y: np.ndarray, X: np.ndarray, codes: np.ndarray, G: int) -> "GroupStatistics":
        """One vectorised pass over the rows: a bincount per statistic, no loop over rows or groups."""
        y = np.asarray(y, dtype=float)
        X = np.asarray(X, dtype=float)
        shift, beta_shift = _shift(y, X)
        scale = float(np.std(y - shift)) or 1.0
        yw = (y - shift) / scale
        p = X.shape[1]
        count = functools.partial(np.bincount, codes, minlength=G)
        XtX = np.empty((G, p, p))
        for k in range(p):
            for l in range(k, p):
                XtX[:, k, l] = XtX[:, l, k] = count(weights=X[:, k] * X[:, l])
        return cls(m=count().astype(float),
                   Xt1=np.column_stack([count(weights=X[:, k]) for k in range(p)]) if p else np.zeros((G, 0)),
                   Xty=np.column_stack([count(weights=X[:, k] * yw) for k in range(p)]) if p else np.zeros((G, 0)),
                   XtX=XtX, yty=count(weights=yw * yw), one_y=count(weights=yw),
                   shift=shift, scale=scale, beta_shift=beta_shift)

    @classmethod
    def of(cls, design: Design) -> "GroupStatistics":
        if not design.is_random_intercept:
            raise ModelError("the per-group statistics need one random intercept (1|g)")
        term = design.terms[0]
        return cls.from_arrays(design.y, design.X, term.codes, term.n_levels)


def _shift(y: np.ndarray, X: np.ndarray) -> tuple[float, np.ndarray]:
    """Centre y on its mean when the constant lies in col(X) (then beta absorbs it exactly)."""
    p = X.shape[1]
    if p == 0:
        return 0.0, np.zeros(0)
    ones = np.ones(len(y))
    delta, *_ = np.linalg.lstsq(X, ones, rcond=None)
    if np.linalg.norm(X @ delta - ones) > 1e-8 * np.sqrt(len(y)):
        return 0.0, np.zeros(p)
    c = float(np.mean(y))
    return c, c * delta




@dataclass(frozen=True)
class SpectralStatistics(GroupStatistics):
    """Sigma = sigma_s^2 K + sigma^2 I rotated by K = U diag(lambda) U^T (the FaST-LMM idea).

    After y* = U^T y, X* = U^T X the rotated observations are independent; observation i is a group of
    one whose Z is sqrt(lambda_i), so Z^T Z = lambda_i stands where m stands for a random intercept and the
    same per-group closed forms give |Sigma| = prod_i (sigma^2 + lambda_i sigma_s^2) and the quadratic form
    sum_i (U^T r)_i^2 / (sigma^2 + lambda_i sigma_s^2). ``n_obs`` is the number of observations.
    """

    n_obs: int = 0
    eigenvectors: np.ndarray | None = None

    @property
    def n(self) -> int:
        return self.n_obs

    @classmethod
    def of(cls, design: Design) -> "SpectralStatistics":
        if design.kinship is None:
            raise ModelError("spectral statistics need a kinship matrix")
        lam, U = np.linalg.eigh(design.kinship)
        lam = np.clip(lam, 0.0, None)
        X = np.asarray(design.X, dtype=float)
        shift, beta_shift = _shift(design.y, X)
        scale = float(np.std(design.y - shift)) or 1.0
        y_rot = U.T @ ((design.y - shift) / scale)
        X_rot = U.T @ X
        root = np.sqrt(lam)
        return cls(m=lam, Xt1=X_rot * root[:, None], Xty=X_rot * y_rot[:, None],
                   XtX=np.einsum("ik,il->ikl", X_rot, X_rot), yty=y_rot**2, one_y=root * y_rot, shift=shift,
                   scale=scale, beta_shift=beta_shift, n_obs=design.n, eigenvectors=U)
