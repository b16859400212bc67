r"""Sufficient statistics: the per-group sums a random-intercept likelihood depends on, in one pass.

Sits between specification and compilation: the design's rows are reduced to :math:`O(G p^2)` numbers,
after which no step of the fit touches the :math:`n` rows again. For (1|g) the log-likelihood (Eq. 10-12)
sees the data only through :math:`n_g`, :math:`X_g^\top \mathbf{1}`, :math:`X_g^\top y`,
:math:`X_g^\top X_g`, :math:`y_g^\top y_g` and :math:`\mathbf{1}^\top y_g`.

The pass is a handful of ``np.bincount`` calls over blocks of rows (no Python loop over rows or groups;
the blocks bound the temporaries, so :math:`10^7` rows need no :math:`n`-sized scratch arrays). Sums of
squares are taken of the response shifted by its mean and divided by its SD, so
:math:`y^\top y - \hat\beta^\top X^\top y` style differences do not cancel for a response around
:math:`10^8`, or of size :math:`10^{-8}`.

The same sums are a group-by aggregation, so a Dask DataFrame is reduced partition by partition
(:func:`specify_dask`), on a local or distributed cluster, and then fitted as usual; so are the per-group
:math:`q \times q` sums of :class:`BlockStatistics` (:math:`Z_g^\top Z_g`, :math:`Z_g^\top X_g`,
:math:`Z_g^\top y_g`) when the random terms share one grouping factor, as in (Days|Subject).
"""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from .errors import DataError, FormulaError, LMMWarning, ModelError
from .progress import logger, stage
from .formula import Frame, Node, Terms, evaluate_terms, model_matrix, names_in, response_values, split_formula
from .specification import (Design, RandomTerm, _check_identifiable, _check_response_not_predictor, _group_values,
                            _random_parts, _sorted_codes)

#: rows per block of the one pass (at least 16 rows per group, so each G-sized bincount is amortised)
CHUNK_ROWS = 1 << 17


@dataclass(frozen=True)
class GroupStatistics:
    r"""Per-group sums of a random-intercept design, of the shifted and scaled response.

    The response is used as :math:`(y - \text{shift}) / \text{scale}`, so sums of squares do not cancel for a
    response far from 0 or of extreme size; ``beta_shift`` is the change that shift makes to :math:`\beta`
    (:math:`\text{shift} \cdot e_\text{intercept}`).
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
        r"""One vectorised pass over the rows: a bincount per statistic and block, no loop over rows or
        groups. Columns of :math:`X` that are all ones (the intercept) cost nothing: their sums are
        :math:`n_g`, :math:`\mathbf{1}^\top y_g` and :math:`X_g^\top \mathbf{1}`."""
        y = np.asarray(y, dtype=float)
        X = np.asarray(X, dtype=float)
        codes = np.asarray(codes)
        if codes.dtype != np.intp:
            codes = codes.astype(np.intp)
        shift, scale, beta_shift = response_scaling(y, X)
        ones = _ones_columns(X)
        sums = _block_sums(y, X, codes, G, shift, scale, ones)
        return _from_sums(sums, X.shape[1], ones, shift, scale, beta_shift)

    @classmethod
    def of(cls, design: Design) -> "GroupStatistics":
        if not design.is_random_intercept:
            raise ModelError("the per-group statistics need one random intercept (1|g)")
        if isinstance(design, DaskDesign):
            return design.statistics
        term = design.terms[0]
        with stage("computing group statistics (%d rows, %d groups)", design.n, term.n_levels):
            return cls.from_arrays(design.y, design.X, term.codes, term.n_levels)


@dataclass(frozen=True)
class SpectralStatistics(GroupStatistics):
    r""":math:`\Sigma = \sigma_s^2 K + \sigma^2 I` rotated by :math:`K = U \operatorname{diag}(\lambda) U^\top` (the
    FaST-LMM idea).

    After :math:`y^* = U^\top y`, :math:`X^* = U^\top X` the rotated observations are independent;
    observation :math:`i` is a group of one whose :math:`Z` is :math:`\sqrt{\lambda_i}`, so
    :math:`Z^\top Z = \lambda_i` stands where :math:`m` stands for a random intercept and the same per-group
    closed forms give :math:`|\Sigma| = \prod_i (\sigma^2 + \lambda_i \sigma_s^2)` and the quadratic form
    :math:`\sum_i (U^\top r)_i^2 / (\sigma^2 + \lambda_i \sigma_s^2)`. ``n_obs`` is the number of observations."""

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
        shift, scale, beta_shift = response_scaling(design.y, X)
        y_rot = U.T @ ((design.y - shift) / scale)
        X_rot = U.T @ X
        root = np.sqrt(lam)
        return cls(m=lam, Xt1=X_rot * root[:, None], Xty=X_rot * y_rot[:, None],
                   XtX=np.einsum("ik,il->ikl", X_rot, X_rot), yty=y_rot**2, one_y=root * y_rot, shift=shift,
                   scale=scale, beta_shift=beta_shift, n_obs=design.n, eigenvectors=U)


#: one grouping factor with at most this many random effects per level is fitted from BlockStatistics
#: (the per-group closed forms are derived for a symbolic :math:`q \times q` block; beyond this, the sparse form)
BLOCK_Q = 3


def single_factor(design: Design) -> bool:
    r"""True when every random term has the same grouping factor ((Days|Subject), (1|S) + (0 + Days|S)):
    :math:`\Sigma` is then block-diagonal by that factor's levels, one :math:`q \times q` block of random
    effects per group. (A Dask design is refused at specification otherwise, and its codes are not
    computed to compare.)"""
    terms = design.terms
    if design.kinship is not None or not terms:
        return False
    if isinstance(design, DaskDesign):
        return all(t.group == terms[0].group for t in terms[1:])
    first = np.asarray(terms[0].codes)
    return all(t.group == terms[0].group and np.array_equal(np.asarray(t.codes), first) for t in terms[1:])


@dataclass(frozen=True)
class BlockStatistics:
    r"""Per-group sums of a design whose random terms share one grouping factor (:math:`q` columns of
    :math:`Z` in all): :math:`S_g = Z_g^\top Z_g`, :math:`Z_g^\top X_g` and :math:`Z_g^\top y_g`, plus the
    totals :math:`X^\top X`, :math:`X^\top y` and :math:`y^\top y`, of the shifted and scaled response as in
    :class:`GroupStatistics`. A likelihood evaluation then costs :math:`O\bigl(G (q^3 + q p^2)\bigr)`,
    whatever the groups' sizes."""

    S: np.ndarray          # (G, q, q)  Z_g^T Z_g
    ZtX: np.ndarray        # (G, q, p)  Z_g^T X_g
    Zty: np.ndarray        # (G, q)     Z_g^T y_g
    XtX: np.ndarray        # (p, p)
    Xty: np.ndarray        # (p,)
    yty: float
    n: int
    shift: float
    scale: float
    beta_shift: np.ndarray  # (p,)

    @property
    def p(self) -> int:
        return self.ZtX.shape[2]

    @property
    def q(self) -> int:
        return self.S.shape[1]

    @property
    def G(self) -> int:
        return self.S.shape[0]

    @classmethod
    def from_arrays(cls, y: np.ndarray, X: np.ndarray, Z: np.ndarray, codes: np.ndarray, G: int, shift: float,
                    scale: float, beta_shift: np.ndarray) -> "BlockStatistics":
        r"""The sums over rows (:math:`y`, :math:`X`, :math:`Z`, level codes in :math:`0, \dots, G-1`) of
        the response :math:`y_w = (y - \text{shift}) / \text{scale}`:

        .. math::

            (S_g)_{ab} = \sum_{i \in g} Z_{ia} Z_{ib}, \quad
            (Z_g^\top X_g)_{ak} = \sum_{i \in g} Z_{ia} X_{ik}, \quad
            (Z_g^\top y_g)_a = \sum_{i \in g} Z_{ia}\, y_{w,i},

        one bincount each (no loop over rows or groups), plus :math:`X^\top X`, :math:`X^\top y_w` and
        :math:`y_w^\top y_w`. A Dask DataFrame's statistics are these sums of its partitions, added."""
        codes = np.asarray(codes).astype(np.intp, copy=False)
        (n, p), q = X.shape, Z.shape[1]
        yw = (y - shift) / scale
        count = lambda w: np.bincount(codes, weights=w, minlength=G)  # noqa: E731
        S = np.empty((G, q, q))
        for a in range(q):
            for b in range(a, q):
                S[:, a, b] = S[:, b, a] = count(Z[:, a] * Z[:, b])
        ZtX = np.empty((G, q, p))
        for a in range(q):
            for k in range(p):
                ZtX[:, a, k] = count(Z[:, a] * X[:, k])
        Zty = np.stack([count(Z[:, a] * yw) for a in range(q)], axis=1)
        return cls(S=S, ZtX=ZtX, Zty=Zty, XtX=X.T @ X, Xty=X.T @ yw, yty=float(yw @ yw), n=n, shift=float(shift),
                   scale=float(scale), beta_shift=np.asarray(beta_shift, dtype=float))

    def __add__(self, other: "BlockStatistics") -> "BlockStatistics":
        """The sums over two disjoint sets of rows (of the same shifted and scaled response)."""
        if (self.shift, self.scale) != (other.shift, other.scale):
            raise ValueError("block statistics of differently shifted or scaled responses do not add")
        return replace(self, S=self.S + other.S, ZtX=self.ZtX + other.ZtX, Zty=self.Zty + other.Zty,
                       XtX=self.XtX + other.XtX, Xty=self.Xty + other.Xty, yty=self.yty + other.yty,
                       n=self.n + other.n)

    @classmethod
    def of_intercept(cls, stats: GroupStatistics) -> "BlockStatistics":
        r"""(1|g) has :math:`Z_g = \mathbf{1}`: :math:`S_g = n_g`, :math:`Z_g^\top X_g = X_g^\top \mathbf{1}`,
        :math:`Z_g^\top y_g = \mathbf{1}^\top y_g`."""
        return cls(S=stats.m[:, None, None].astype(float), ZtX=stats.Xt1[:, None, :], Zty=stats.one_y[:, None],
                   XtX=stats.XtX.sum(0), Xty=stats.Xty.sum(0), yty=float(stats.yty.sum()), n=stats.n,
                   shift=stats.shift, scale=stats.scale, beta_shift=stats.beta_shift)

    @classmethod
    def of(cls, design: Design) -> "BlockStatistics":
        if not single_factor(design):
            raise ModelError("the per-group block statistics need random terms with one grouping factor")
        if isinstance(design, DaskDesign):   # computed by specify_dask, partition by partition
            stats = design.statistics
            return stats if isinstance(stats, BlockStatistics) else cls.of_intercept(stats)
        y = np.asarray(design.y, dtype=float)
        X = np.asarray(design.X, dtype=float)
        Z = np.hstack([np.asarray(t.Z, dtype=float) for t in design.terms])
        G, q = design.terms[0].n_levels, Z.shape[1]
        shift, scale, beta_shift = response_scaling(y, X)
        with stage("computing block statistics (%d rows, %d groups, q = %d)", len(y), G, q):
            return cls.from_arrays(y, X, Z, design.terms[0].codes, G, shift, scale, beta_shift)


# ------------------------------------------------------------------------------------ the one pass
def _layout(p: int) -> tuple[dict, int]:
    """Row of each statistic in the (J, G) table of sums: m, 1^T y, y^T y, X^T 1, X^T y, X^T X (k <= l)."""
    rows = {"m": 0, "one_y": 1, "yty": 2}
    j = 3
    for k in range(p):
        rows["Xt1", k] = j
        rows["Xty", k] = j + 1
        j += 2
    for k in range(p):
        for l in range(k, p):
            rows["XtX", k, l] = j
            j += 1
    return rows, j


def _ones_columns(X: np.ndarray) -> tuple[int, ...]:
    """Columns that are exactly 1 in every row (checked cheaply on the first row first)."""
    if X.shape[0] == 0:
        return ()
    return tuple(k for k in range(X.shape[1]) if X[0, k] == 1.0 and bool(np.all(X[:, k] == 1.0)))


def _block_sums(y: np.ndarray, X: np.ndarray, codes: np.ndarray, G: int, shift: float, scale: float,
                ones: tuple[int, ...], out: np.ndarray | None = None) -> np.ndarray:
    """The (J, G) table of per-group sums of rows, block by block (columns in ``ones`` are skipped)."""
    n, p = X.shape
    rows, J = _layout(p)
    S = np.zeros((J, G)) if out is None else out
    free = [k for k in range(p) if k not in ones]
    chunk = max(CHUNK_ROWS, 16 * G)
    for start in range(0, n, chunk):
        c = codes[start:start + chunk]
        yc = (y[start:start + chunk] - shift) / scale
        Xc = X[start:start + chunk]
        count = lambda w=None: np.bincount(c, weights=w, minlength=G)  # noqa: E731
        S[0] += count()
        S[1] += count(yc)
        S[2] += count(yc * yc)
        cols = {k: np.ascontiguousarray(Xc[:, k]) for k in free}
        for k in free:
            S[rows["Xt1", k]] += count(cols[k])
            S[rows["Xty", k]] += count(cols[k] * yc)
        for i, k in enumerate(free):
            for l in free[i:]:
                S[rows["XtX", k, l]] += count(cols[k] * cols[l])
    return S


def _from_sums(S: np.ndarray, p: int, ones: tuple[int, ...], shift: float, scale: float,
               beta_shift: np.ndarray) -> GroupStatistics:
    """GroupStatistics from the table of sums; the all-ones columns' sums are n_g, 1^T y_g, X_g^T 1."""
    rows, _ = _layout(p)
    G = S.shape[1]
    m = S[0]
    Xt1 = np.empty((G, p))
    Xty = np.empty((G, p))
    for k in range(p):
        Xt1[:, k] = m if k in ones else S[rows["Xt1", k]]
        Xty[:, k] = S[1] if k in ones else S[rows["Xty", k]]
    XtX = np.empty((G, p, p))
    for k in range(p):
        for l in range(k, p):
            if k in ones:
                v = Xt1[:, l]
            elif l in ones:
                v = Xt1[:, k]
            else:
                v = S[rows["XtX", k, l]]
            XtX[:, k, l] = XtX[:, l, k] = v
    return GroupStatistics(m=m.copy(), Xt1=Xt1, Xty=Xty, XtX=XtX, yty=S[2].copy(), one_y=S[1].copy(),
                           shift=float(shift), scale=float(scale), beta_shift=np.asarray(beta_shift, float))


def response_scaling(y: np.ndarray, X: np.ndarray) -> tuple[float, float, np.ndarray]:
    r"""(``shift``, ``scale``, ``beta_shift``): the response is used as :math:`(y - \text{shift}) / \text{scale}`,
    centred on its mean when the constant lies in :math:`\operatorname{col}(X)` (:math:`\beta` then absorbs
    the shift exactly: ``beta_shift``) and divided by its SD, so sums of squares do not cancel for a response
    far from 0 or of extreme size."""
    p = X.shape[1]
    scale = (float(np.std(y)) or 1.0) if len(y) else 1.0     # the SD does not depend on the shift
    if p == 0 or len(y) == 0:
        return 0.0, scale, np.zeros(p)
    ones = _ones_columns(X)
    if ones:
        delta = np.zeros(p)
        delta[ones[0]] = 1.0
    else:
        delta, *_ = np.linalg.lstsq(X, np.ones(len(y)), rcond=None)
        if np.linalg.norm(X @ delta - 1.0) > 1e-8 * np.sqrt(len(y)):
            return 0.0, scale, np.zeros(p)
    c = float(np.mean(y))
    return c, scale, c * delta


# ------------------------------------------------------------------ row-wise quantities for results
def spans_constant(X) -> bool:
    r"""True when the constant column lies in :math:`\operatorname{col}(X)` (an intercept, explicit or by
    cell-means coding)."""
    if isinstance(X, Design):
        if isinstance(X, DaskDesign):
            return X.has_constant
        X = X.X
    X = np.asarray(X, dtype=float)
    if X.shape[1] == 0:
        return False
    if _ones_columns(X):
        return True
    ones = np.ones(X.shape[0])
    coef, *_ = np.linalg.lstsq(X, ones, rcond=None)
    return bool(np.linalg.norm(X @ coef - ones) <= 1e-8 * np.sqrt(X.shape[0]))


def constant_within_groups(design: Design, term: RandomTerm | None = None) -> np.ndarray:
    r"""For each column of :math:`X`: is it constant within every level of ``term``'s grouping factor (nlme's
    between-group covariates)? ``np.isclose`` of each row to its group's mean, block by block."""
    term = design.terms[0] if term is None else term
    if isinstance(design, DaskDesign):
        return design.within_constant
    X = np.asarray(design.X, dtype=float)
    codes = np.asarray(term.codes)
    G, p = term.n_levels, X.shape[1]
    counts = np.maximum(np.bincount(codes, minlength=G), 1)
    constant = np.ones(p, dtype=bool)
    ones = _ones_columns(X)
    for k in range(p):
        if k in ones:
            continue
        x = np.ascontiguousarray(X[:, k])
        means = np.bincount(codes, weights=x, minlength=G) / counts
        for start in range(0, len(codes), CHUNK_ROWS):   # stops at the first block with a varying group
            block = slice(start, start + CHUNK_ROWS)
            mean = means[codes[block]]
            # np.isclose(x, mean) for finite values (X is finite)
            if not np.all(np.abs(x[block] - mean) <= 1e-8 + 1e-5 * np.abs(mean)):
                constant[k] = False
                break
    return constant


def fitted_values(design: Design, beta: np.ndarray, modes) -> np.ndarray:
    r""":math:`X\hat\beta + \sum_k Z_k \hat b_k`, ``modes`` holding each term's conditional modes as a
    :math:`(G_k, q_k)` array: row :math:`i` of level :math:`j` adds :math:`(Z_k)_i \cdot \hat b_{k,j}`
    (:math:`\hat b_{k,j}` for a random intercept, whose :math:`Z` is 1). A lazy Dask array, block by block,
    for a Dask design."""
    lazy = isinstance(design, DaskDesign)
    fitted = design.X @ np.asarray(beta, dtype=float)
    for term, b in zip(design.terms, modes):
        b = np.asarray(b, dtype=float).reshape(term.n_levels, term.q)
        if term.is_intercept:
            u = b[:, 0]
            rows = term.codes.map_blocks(_take, u, dtype=float) if lazy else _take(np.asarray(term.codes), u)
        elif lazy:
            import dask.array as da

            rows = da.blockwise(_slope_rows, "i", term.Z, "ij", term.codes, "i", b, None, dtype=float,
                                concatenate=True)
        else:
            rows = _slope_rows(np.asarray(term.Z), np.asarray(term.codes), b)
        fitted = fitted + rows
    return fitted


def _slope_rows(Z: np.ndarray, codes: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(Z)_i . b[codes_i] for every row i."""
    return np.einsum("ij,ij->i", Z, b[codes])


def constant_response(design: Design) -> bool:
    """True when every response value is the same (nothing to split between groups and residual)."""
    if isinstance(design, DaskDesign):
        return design.y_range == 0
    return bool(np.ptp(design.y) == 0)


def _take(codes: np.ndarray, u: np.ndarray) -> np.ndarray:
    return u[codes]


# ------------------------------------------------------------------------------------------- Dask
@dataclass(frozen=True)
class DaskDesign(Design):
    """A Design over a Dask DataFrame: y, X, Z and the codes are lazy Dask arrays (one block per
    partition), and the statistics, computed with Dask, come with it: GroupStatistics for (1|g),
    BlockStatistics for random terms sharing one grouping factor."""

    statistics: GroupStatistics | BlockStatistics | None = field(default=None, repr=False)
    within_constant: np.ndarray | None = field(default=None, repr=False)
    has_constant: bool = False
    y_range: float = math.nan
    npartitions: int = 0


def is_dask_dataframe(data) -> bool:
    """Duck-typed, so dask is imported only when the data are a Dask collection."""
    mod = type(data).__module__ or ""
    return mod.split(".")[0] == "dask" and hasattr(data, "npartitions") and hasattr(data, "to_delayed")


#: transformations that need a whole column at once (not a partition)
_STATEFUL = frozenset({"scale", "poly"})
#: calls that make a factor of their column
_FACTOR_CALLS = frozenset({"factor", "as.factor", "ordered", "as.ordered", "C"})


def _calls(node: Node) -> list[Node]:
    """Every function call in an expression."""
    out = [node] if node.kind == "call" else []
    for a in node.args:
        out += _calls(a)
    for _, v in node.kwargs:
        out += _calls(v)
    return out


#: the models a Dask DataFrame can be fitted with (from per-group statistics)
DASK_MODELS = ("random terms that share one grouping factor, with at most 3 random effects per level: "
               "(1|g), (x|g), (x||g), (1|g) + (0 + x|g)")


@dataclass(frozen=True)
class _Plan:
    """What each partition needs to become rows of y, X, Z and group codes (picklable for the workers)."""

    columns: tuple
    formula: str
    response: Node
    fixed: Terms
    group: str
    categories: dict          # column -> its global (sorted) categories
    levels: tuple = ()        # the grouping factor's values, in level order
    names: tuple = ()         # X's columns as built (before aliased ones are dropped)
    keep: tuple | None = None  # X's columns kept after the rank check
    random: tuple = ()        # (Terms, Z's column names) of each random term

    @property
    def intercept_only(self) -> bool:
        """One (1|g) term: the per-group sums of :class:`GroupStatistics`, else :class:`BlockStatistics`."""
        return len(self.random) == 1 and self.random[0][1] == ("(Intercept)",)


def _clean(part: pd.DataFrame, plan: _Plan) -> pd.DataFrame:
    """The partition's used columns, rows with NA dropped, categorical columns given global levels."""
    part = part[list(plan.columns)]
    na = part.isna().any(axis=1).to_numpy()
    if na.any():
        part = part.loc[~na]
    if plan.categories:
        part = part.assign(**{c: pd.Categorical(part[c], categories=cats) for c, cats in plan.categories.items()})
    return part.reset_index(drop=True)


def _moments(y: np.ndarray) -> tuple:
    if len(y) == 0:
        return 0, 0.0, 0.0, math.inf, -math.inf
    mean = float(np.mean(y))
    return len(y), mean, float(np.sum((y - mean) ** 2)), float(y.min()), float(y.max())


def _merge_moments(a: tuple, b: tuple) -> tuple:
    """Chan et al.'s pairwise update of (count, mean, M2, min, max): no cancellation."""
    na, ma, sa, lo_a, hi_a = a
    nb, mb, sb, lo_b, hi_b = b
    n = na + nb
    if n == 0:
        return a
    d = mb - ma
    return n, ma + d * nb / n, sa + sb + d * d * na * nb / n, min(lo_a, lo_b), max(hi_a, hi_b)


def _scan(part: pd.DataFrame, plan: _Plan, numeric: tuple, unknown: tuple) -> dict:
    """First pass over a partition: rows, the response's moments, infinite values, distinct labels."""
    n_raw = len(part)
    na = {str(c): int(k) for c, k in part[list(plan.columns)].isna().sum().items() if k}
    part = _clean(part, plan)
    infinite = tuple(c for c in numeric
                     if not np.all(np.isfinite(part[c].to_numpy(dtype=float))))
    return {"n_raw": n_raw, "n": len(part), "na": na, "moments": _moments(_response(part, plan)),
            "infinite": infinite, "groups": pd.Series(_group_values(part, plan.group).unique()),
            "labels": {c: pd.Series(part[c].unique()) for c in unknown}}


def _matrix_block(part: pd.DataFrame, terms: Terms, names: tuple | None, formula: str) -> tuple[np.ndarray, tuple]:
    """A model matrix (X, or a random term's Z) of a cleaned partition, built as in memory
    (:func:`lmm_symbolic.formula.model_matrix`, factors with their global levels)."""
    X, built = model_matrix(evaluate_terms(terms, Frame(part, formula)))
    if names is not None and tuple(built) != names:
        raise DataError(f"the partitions of the Dask DataFrame give different columns for {formula!r} "
                        f"({list(built)} vs {list(names)}); give categorical columns known categories "
                        "(ddf.categorize())")
    return X, tuple(built)


def _response(part: pd.DataFrame, plan: _Plan) -> np.ndarray:
    return response_values(plan.response, Frame(part, plan.formula))


def _fixed_block(part: pd.DataFrame, plan: _Plan) -> np.ndarray:
    """X of a cleaned partition, with the columns the plan keeps."""
    X = _matrix_block(part, plan.fixed, plan.names, plan.formula)[0]
    return X if plan.keep is None else X[:, list(plan.keep)]


def _random_block(part: pd.DataFrame, plan: _Plan) -> np.ndarray:
    """Z = [Z_1 ... Z_K] of a cleaned partition, the terms' columns side by side (q columns in all)."""
    return np.hstack([_matrix_block(part, terms, names, plan.formula)[0] for terms, names in plan.random])


def _codes_block(part: pd.DataFrame, plan: _Plan) -> np.ndarray:
    values = _group_values(part, plan.group)
    codes = pd.Index(plan.levels).get_indexer(np.asarray(values.to_numpy(), dtype=object)
                                                if isinstance(values.dtype, pd.CategoricalDtype) else values)
    if len(codes) and codes.min() < 0:
        raise DataError(f"a partition holds a level of {plan.group!r} that the first pass did not see")
    return codes.astype(np.intp, copy=False)


def _partition_sums(part: pd.DataFrame, plan: _Plan, shift: float, scale: float, ones: tuple) -> tuple:
    """Second pass over a partition: its additive sums -- the (J, G) table of :func:`_block_sums` for
    (1|g); else its BlockStatistics and the (G, 1 + p) table [n_g, X_g^T 1] -- then the per-group min and
    max of X and max |X|."""
    part = _clean(part, plan)
    G = len(plan.levels)
    X = _fixed_block(part, plan)
    codes = _codes_block(part, plan)
    y = _response(part, plan)
    p = X.shape[1]
    if plan.intercept_only:
        sums = (_block_sums(y, X, codes, G, shift, scale, ones),)
    else:
        block = BlockStatistics.from_arrays(y, X, _random_block(part, plan), codes, G, shift, scale, np.zeros(p))
        count = lambda w=None: np.bincount(codes, weights=w, minlength=G)  # noqa: E731
        sums = (block, np.column_stack([count()] + [count(X[:, k]) for k in range(p)]))
    lo = np.full((G, p), np.inf)
    hi = np.full((G, p), -np.inf)
    if len(part):
        grouped = pd.DataFrame(X).groupby(codes, sort=False)
        mins, maxs = grouped.min(), grouped.max()
        lo[mins.index.to_numpy()] = mins.to_numpy()
        hi[maxs.index.to_numpy()] = maxs.to_numpy()
    absmax = float(max(X.max(), -X.min())) if X.size else 0.0
    return sums, lo, hi, absmax


def _add_sums(a: tuple, b: tuple) -> tuple:
    return (tuple(x + y for x, y in zip(a[0], b[0])), np.minimum(a[1], b[1]), np.maximum(a[2], b[2]),
            max(a[3], b[3]))


def _all_columns(sums: tuple, p: int, ones: tuple, shift: float, scale: float) -> tuple:
    """The added-up sums as statistics of all of X's columns, with n_g, X_g^T 1 and X^T X."""
    if isinstance(sums[0], BlockStatistics):
        stats, table = sums
        return stats, table[:, 0], table[:, 1:], stats.XtX
    stats = _from_sums(sums[0], p, ones, shift, scale, np.zeros(p))
    return stats, stats.m, stats.Xt1, stats.XtX.sum(0)


def _kept_columns(stats: GroupStatistics | BlockStatistics, keep: list[int],
                  beta_shift: np.ndarray) -> GroupStatistics | BlockStatistics:
    """The statistics of X's columns ``keep`` (aliased ones dropped), with the shift's change to beta."""
    k = np.asarray(keep, dtype=np.intp)
    if isinstance(stats, BlockStatistics):
        return replace(stats, ZtX=stats.ZtX[:, :, k], XtX=stats.XtX[np.ix_(k, k)], Xty=stats.Xty[k],
                       beta_shift=beta_shift)
    return replace(stats, Xt1=stats.Xt1[:, k], Xty=stats.Xty[:, k], XtX=stats.XtX[:, k][:, :, k],
                   beta_shift=beta_shift)


def _response_block(part: pd.DataFrame, plan: _Plan) -> np.ndarray:
    return _response(_clean(part, plan), plan)


def _fixed_rows(part: pd.DataFrame, plan: _Plan) -> np.ndarray:
    return _fixed_block(_clean(part, plan), plan)


def _codes_rows(part: pd.DataFrame, plan: _Plan) -> np.ndarray:
    return _codes_block(_clean(part, plan), plan)


def _random_rows(part: pd.DataFrame, plan: _Plan) -> np.ndarray:
    return _random_block(_clean(part, plan), plan)


def _tree_reduce(items: list, combine):
    import dask

    merge = dask.delayed(combine, pure=True)
    while len(items) > 1:
        items = [merge(items[i], items[i + 1]) if i + 1 < len(items) else items[i]
                 for i in range(0, len(items), 2)]
    return items[0]


def _level_values(values: pd.Series) -> list:
    """The grouping factor's levels in the order specification._grouping gives them."""
    if isinstance(values.dtype, pd.CategoricalDtype):
        return list(values.cat.remove_unused_categories().cat.categories)
    return _sorted_codes(values.reset_index(drop=True))[1]


def _drop_aliased_gram(XtX: np.ndarray, n: int, absmax: float, names: list[str]) -> list[int]:
    """specification._drop_aliased from the Gram matrix: the singular values of X / scale are the square
    roots of the eigenvalues of X^T X / scale^2 (the tolerance, 1e-7 n, is far above their error)."""
    scale = max(1.0, absmax)
    keep: list[int] = []
    for k in range(len(names)):
        idx = keep + [k]
        lam = np.linalg.eigvalsh(XtX[np.ix_(idx, idx)] / scale**2)
        sv = np.sqrt(np.clip(lam, 0.0, None))
        if int(np.sum(sv > 1e-7 * max(n, len(idx)))) == len(idx):
            keep.append(k)
    return keep


def specify_dask(formula: str, ddf, kinship=None) -> DaskDesign:
    """A Dask DataFrame + formula -> a DaskDesign with its statistics computed by Dask.

    The random terms must share one grouping factor (:data:`DASK_MODELS`): the likelihood then sees the
    rows only through per-group sums, which add over partitions. Two passes over the partitions (with the
    active scheduler: a ``dask.distributed`` Client if one exists): the first finds the rows, the response's
    mean and SD and the grouping factor's levels; the second adds up each partition's sums in a tree --
    for (1|g) the one-pass bincounts of :class:`GroupStatistics`, else those of
    :meth:`BlockStatistics.from_arrays`, both as in memory. X and Z are built per partition by the same
    code as in memory (formulaic's ModelSpec, fitted on the first partition, after categorical columns are
    given their global levels), so the result equals the in-memory fit's to rounding. Stateful transforms
    (center, scale, poly) need whole columns and are refused.
    """
    import dask
    import dask.array as da

    if kinship is not None:
        raise ModelError(f"a kinship matrix needs the data in memory (ddf.compute()); a Dask DataFrame "
                         f"supports {DASK_MODELS}")
    parsed = split_formula(formula)
    if not parsed.random:
        raise FormulaError(f"the formula {formula!r} has no random-effect term such as (1|group)")
    if parsed.fixed.offsets:
        raise ModelError("offsets are not supported with a Dask DataFrame yet; compute the data into pandas "
                         "first")
    _check_response_not_predictor(parsed)
    random_parts = _random_parts(parsed, ddf._meta)
    groups = list(dict.fromkeys(g for _, g in random_parts))
    if len(groups) != 1:
        raise ModelError(f"a Dask DataFrame is fitted from per-group statistics, which need {DASK_MODELS}; "
                         f"this formula's random terms group by {', '.join(groups)} (crossed or nested "
                         "factors): fit it in memory (ddf.compute())")
    group = groups[0]
    exprs = tuple(t for t, _ in random_parts)
    nodes = list(parsed.fixed.variables) + [v for t in exprs for v in t.variables] + [parsed.response]
    calls = [c for node in nodes for c in _calls(node)]
    if any(c.value in _STATEFUL for c in calls):
        raise ModelError("scale() and poly() need a whole column at once; with a Dask DataFrame compute the "
                         "transformed column first")
    used = set().union(*(names_in(v) for v in nodes), set(group.split(":")))
    cols = tuple(c for c in ddf.columns if str(c) in used)
    meta = ddf._meta[list(cols)]
    in_c = {str(a.value) for c in calls if c.value in _FACTOR_CALLS for a in c.args[:1] if a.kind == "name"}
    group_cols = set(group.split(":"))
    response_cols = names_in(parsed.response)
    factor_cols = [c for c in cols if str(c) not in response_cols and str(c) not in group_cols
                   and (str(c) in in_c or not pd.api.types.is_numeric_dtype(meta[c]))]
    known = {c: list(meta[c].cat.categories) for c in factor_cols
             if isinstance(meta[c].dtype, pd.CategoricalDtype) and len(meta[c].cat.categories)}
    unknown = tuple(c for c in factor_cols if c not in known)
    numeric = tuple(c for c in cols if pd.api.types.is_numeric_dtype(meta[c])
                    and not pd.api.types.is_bool_dtype(meta[c]))
    plan = _Plan(columns=cols, formula=formula, response=parsed.response, fixed=parsed.fixed, group=group,
                 categories={})
    parts = ddf.to_delayed()
    npart = len(parts)

    # pass 1: rows, the response's moments, infinite values, the labels of factors and groups
    with stage("scanning %d Dask partitions (rows, levels, the response's mean and SD)", npart):
        scans = dask.compute(*[dask.delayed(_scan, pure=True)(p, plan, numeric, unknown) for p in parts])
    n_raw = sum(s["n_raw"] for s in scans)
    n = sum(s["n"] for s in scans)
    lengths = tuple(s["n"] for s in scans)
    if n_raw == 0:
        raise DataError("the data are empty: no rows to fit")
    if n == 0:
        raise DataError("no rows left after dropping rows with missing values")
    bad = sorted({c for s in scans for c in s["infinite"]}, key=str)
    if bad:
        raise DataError(f"column {bad[0]!r} holds an infinite value; remove or correct those rows")
    moments = scans[0]["moments"]
    for s in scans[1:]:
        moments = _merge_moments(moments, s["moments"])
    categories = dict(known)
    for c in unknown:
        labels = pd.concat([s["labels"][c] for s in scans], ignore_index=True).drop_duplicates()
        categories[c] = _sorted_codes(labels.reset_index(drop=True))[1]
    groups = pd.concat([s["groups"] for s in scans], ignore_index=True).drop_duplicates()
    levels = tuple(_level_values(groups))
    first = next(i for i, s in enumerate(scans) if s["n"])
    plan = replace(plan, categories=categories, levels=levels)
    sample = _clean(parts[first].compute(), plan)
    names = _matrix_block(sample, parsed.fixed, None, formula)[1]
    random = tuple((t, _matrix_block(sample, t, None, formula)[1]) for t in exprs)
    for t, z_names in random:
        if not z_names:
            raise FormulaError(f"a random-effect term of {group!r} in {formula!r} has no columns")
    q = sum(len(z_names) for _, z_names in random)
    if q > BLOCK_Q:
        raise ModelError(f"a Dask DataFrame is fitted from per-group statistics, which need {DASK_MODELS}; "
                         f"this formula has {q} random effects per level of {group!r}: fit it in memory "
                         "(ddf.compute())")
    plan = replace(plan, names=names, random=random)

    # pass 2: the per-group sums, added up in a tree. The response is centred when the constant lies in
    # col(X): always with an intercept column; for cell-means coding when the first partition says so,
    # checked on the whole X^T X afterwards (and the pass repeated without the shift if it fails)
    ones = tuple(k for k, name in enumerate(names) if name == "(Intercept)")
    spans = bool(ones) or spans_constant(_fixed_block(sample, plan))
    scale = math.sqrt(moments[2] / n) or 1.0
    p_all = len(names)

    def group_sums(shift: float) -> tuple:
        what = "group" if plan.intercept_only else f"block (q = {q})"
        with stage("computing %s statistics with Dask (%d rows, %d groups, %d partitions)", what, n,
                   len(levels), npart):
            sums, lo, hi, absmax = _tree_reduce(
                [dask.delayed(_partition_sums, pure=True)(p, plan, shift, scale, ones) for p in parts],
                _add_sums).compute()
        return _all_columns(sums, p_all, ones, shift, scale) + (lo, hi, absmax)

    shift = moments[1] if spans else 0.0
    raw, m, Xt1, XtX, lo, hi, absmax = group_sums(shift)
    fixed_names = list(names)
    keep = _drop_aliased_gram(XtX, n, absmax, fixed_names)
    A, b = XtX[np.ix_(keep, keep)], Xt1.sum(0)[keep]
    if ones:
        delta = np.zeros(len(keep))
        delta[keep.index(ones[0])] = 1.0
    elif spans:
        delta = np.linalg.solve(A, b) if keep else np.zeros(0)
        if not keep or n - float(b @ delta) > 1e-10 * n:
            spans, shift, delta = False, 0.0, np.zeros(len(keep))
            raw, m, Xt1, XtX, lo, hi, absmax = group_sums(shift)
    else:
        delta = np.zeros(len(keep))
    stats = _kept_columns(raw, keep, shift * delta)
    messages: list[str] = []
    if n_raw > n:
        na = {}
        for sc in scans:
            for c, k in sc["na"].items():
                na[c] = na.get(c, 0) + k
        detail = "; ".join(f"{c} missing in {na[c]}" for c in sorted(na))
        messages.append(f"{n_raw - n} row(s) with missing values dropped ({n} of {n_raw} used): {detail}")
    dropped = [fixed_names[k] for k in range(p_all) if k not in keep]
    if dropped:
        s_ = "" if len(dropped) == 1 else "s"
        messages.append(f"fixed-effect model matrix is rank deficient so dropping {len(dropped)} column{s_} / "
                        f"coefficient{s_} ({', '.join(dropped)})")
        plan = replace(plan, keep=tuple(keep))
    means = Xt1[:, keep] / m[:, None]
    within = np.all(np.isclose(lo[:, keep], means) & np.isclose(hi[:, keep], means), axis=0)

    # the rows, lazily: one block per partition
    def rows(fn, shape, dtype):
        return da.concatenate([da.from_delayed(dask.delayed(fn, pure=True)(prt, plan), (k,) + shape, dtype)
                               for prt, k in zip(parts, lengths)])

    y, codes = rows(_response_block, (), float), rows(_codes_rows, (), np.intp)
    X, Z = rows(_fixed_rows, (len(keep),), float), rows(_random_rows, (q,), float)
    terms, col = [], 0
    for t, z_names in random:
        label = " + ".join(t.labels) or "1"
        expr = label if t.intercept or not t.terms else f"0 + {label}"
        terms.append(RandomTerm(expr=expr, group=group, codes=codes, levels=tuple(str(v) for v in levels),
                                names=tuple(z_names), Z=Z[:, col:col + len(z_names)]))
        col += len(z_names)
    _check_identifiable(tuple(terms), n)
    for msg in messages:
        warnings.warn(msg, LMMWarning, stacklevel=3)
    logger.info("Dask design: %d rows, %d fixed effects, %d groups, q = %d", n, len(keep), len(levels), q)
    return DaskDesign(formula=formula, response=str(parsed.response), y=y, X=X,
                      fixed_names=tuple(fixed_names[k] for k in keep), terms=tuple(terms), frame=ddf[list(cols)],
                      messages=tuple(messages), dropped_columns=tuple(dropped), n_dropped_rows=n_raw - n,
                      statistics=stats, within_constant=within, has_constant=spans,
                      y_range=moments[4] - moments[3], npartitions=npart)
