"""Sufficient statistics: the per-group sums a random-intercept likelihood depends on, in one pass.

Sits between specification and compilation: the design's rows are reduced to O(G p^2) numbers, after
which no step of the fit touches the n rows again. For (1|g) the log-likelihood (Eq. 10-12) sees the data
only through n_g, X_g^T 1, X_g^T y, X_g^T X_g, y_g^T y_g and 1^T y_g.

The pass is a handful of ``np.bincount`` calls over blocks of rows (no Python loop over rows or groups;
the blocks bound the temporaries, so 10^7 rows need no n-sized scratch arrays). Sums of squares are taken
of the response shifted by its mean and divided by its SD, so y^T y - beta^T X^T y style differences do
not cancel for a response around 1e8, or of size 1e-8.

The same sums are a group-by aggregation, so a Dask DataFrame is reduced partition by partition
(:func:`specify_dask`), on a local or distributed cluster, and then fitted as usual.
"""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .errors import DataError, FormulaError, LMMWarning, ModelError
from .progress import logger, stage
from .specification import (Design, RandomTerm, _check_identifiable, _float_matrix, _group_values,
                            _numeric_response, _plain_model_matrix, _sorted_codes, _used_columns,
                            parse_formula)

#: rows per block of the one pass (at least 16 rows per group, so each G-sized bincount is amortised)
CHUNK_ROWS = 1 << 17


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
        """One vectorised pass over the rows: a bincount per statistic and block, no loop over rows or
        groups. Columns of X that are all ones (the intercept) cost nothing: their sums are n_g, 1^T y_g
        and X_g^T 1."""
        y = np.asarray(y, dtype=float)
        X = np.asarray(X, dtype=float)
        codes = np.asarray(codes)
        if codes.dtype != np.intp:
            codes = codes.astype(np.intp)
        shift, beta_shift = response_shift(y, X)
        scale = float(np.std(y)) or 1.0   # = std(y - shift): the shift is 0 or the mean
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
        shift, beta_shift = response_shift(design.y, X)
        scale = float(np.std(design.y - shift)) or 1.0
        y_rot = U.T @ ((design.y - shift) / scale)
        X_rot = U.T @ X
        root = np.sqrt(lam)
        return cls(m=lam, Xt1=X_rot * root[:, None], Xty=X_rot * y_rot[:, None],
                   XtX=np.einsum("ik,il->ikl", X_rot, X_rot), yty=y_rot**2, one_y=root * y_rot, shift=shift,
                   scale=scale, beta_shift=beta_shift, n_obs=design.n, eigenvectors=U)


def single_factor(design: Design) -> bool:
    """True when every random term has the same grouping factor ((Days|Subject), (1|S) + (0 + Days|S)):
    Sigma is then block-diagonal by that factor's levels, one q x q block of random effects per group."""
    terms = design.terms
    if design.kinship is not None or not terms or isinstance(design, DaskDesign):
        return False
    first = np.asarray(terms[0].codes)
    return all(t.group == terms[0].group and np.array_equal(np.asarray(t.codes), first) for t in terms[1:])


@dataclass(frozen=True)
class BlockStatistics:
    """Per-group sums of a design whose random terms share one grouping factor (q columns of Z in all):
    S_g = Z_g^T Z_g, Z_g^T X_g and Z_g^T y_g, plus the totals X^T X, X^T y and y^T y, of the shifted and
    scaled response as in :class:`GroupStatistics`. A likelihood evaluation then costs O(G (q^3 + q p^2)),
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
    def of(cls, design: Design) -> "BlockStatistics":
        if not single_factor(design):
            raise ModelError("the per-group block statistics need random terms with one grouping factor")
        y = np.asarray(design.y, dtype=float)
        X = np.asarray(design.X, dtype=float)
        Z = np.hstack([np.asarray(t.Z, dtype=float) for t in design.terms])
        codes = np.asarray(design.terms[0].codes).astype(np.intp, copy=False)
        G, (n, p), q = design.terms[0].n_levels, X.shape, Z.shape[1]
        shift, beta_shift = response_shift(y, X)
        scale = float(np.std(y)) or 1.0
        yc = (y - shift) / scale
        with stage("computing block statistics (%d rows, %d groups, q = %d)", n, G, q):
            count = lambda w: np.bincount(codes, weights=w, minlength=G)  # noqa: E731
            S = np.empty((G, q, q))
            for a in range(q):
                for b in range(a, q):
                    S[:, a, b] = S[:, b, a] = count(Z[:, a] * Z[:, b])
            ZtX = np.stack([np.stack([count(Z[:, a] * X[:, k]) for k in range(p)], axis=-1)
                            if p else np.zeros((G, 0)) for a in range(q)], axis=1)
            Zty = np.stack([count(Z[:, a] * yc) for a in range(q)], axis=1)
        return cls(S=S, ZtX=ZtX, Zty=Zty, XtX=X.T @ X, Xty=X.T @ yc, yty=float(yc @ yc), n=n, shift=shift,
                   scale=scale, beta_shift=beta_shift)


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


def response_shift(y: np.ndarray, X: np.ndarray) -> tuple[float, np.ndarray]:
    """Centre y on its mean when the constant lies in col(X) (then beta absorbs it exactly)."""
    p = X.shape[1]
    if p == 0 or len(y) == 0:
        return 0.0, np.zeros(p)
    ones = _ones_columns(X)
    if ones:
        delta = np.zeros(p)
        delta[ones[0]] = 1.0
    else:
        delta, *_ = np.linalg.lstsq(X, np.ones(len(y)), rcond=None)
        if np.linalg.norm(X @ delta - 1.0) > 1e-8 * np.sqrt(len(y)):
            return 0.0, np.zeros(p)
    c = float(np.mean(y))
    return c, c * delta


# ------------------------------------------------------------------ row-wise quantities for results
def spans_constant(X) -> bool:
    """True when the constant column lies in col(X) (an intercept, explicit or by cell-means coding)."""
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
    """For each column of X: is it constant within every level of ``term``'s grouping factor (nlme's
    between-group covariates)? np.isclose of each row to its group's mean, block by block."""
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


def fitted_values(design: Design, beta: np.ndarray, u: np.ndarray, term: RandomTerm | None = None):
    """X beta + Z u for a random intercept (a lazy Dask array for a Dask design)."""
    term = design.terms[0] if term is None else term
    if isinstance(design, DaskDesign):
        u = np.asarray(u, dtype=float)
        return design.X @ np.asarray(beta, dtype=float) + term.codes.map_blocks(_take, u, dtype=float)
    return design.X @ beta + u[np.asarray(term.codes)]


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
    partition), and the per-group statistics, computed with Dask, come with it."""

    statistics: GroupStatistics | None = field(default=None, repr=False)
    within_constant: np.ndarray | None = field(default=None, repr=False)
    has_constant: bool = False
    y_range: float = math.nan
    npartitions: int = 0


def is_dask_dataframe(data) -> bool:
    """Duck-typed, so dask is imported only when the data are a Dask collection."""
    mod = type(data).__module__ or ""
    return mod.split(".")[0] == "dask" and hasattr(data, "npartitions") and hasattr(data, "to_delayed")


_STATEFUL = re.compile(r"\b(center|scale|poly)\s*\(")
_IN_C = re.compile(r"\bC\(\s*([A-Za-z_.][\w.]*)")


@dataclass(frozen=True)
class _Plan:
    """What each partition needs to become rows of y, X and group codes (picklable for the workers)."""

    columns: tuple
    response: str
    fixed: str
    group: str
    categories: dict          # column -> its global (sorted) categories
    levels: tuple = ()        # the grouping factor's values, in level order
    names: tuple = ()         # X's columns as built (before aliased ones are dropped)
    model_spec: object = None  # formulaic's ModelSpec, or None for a plain sum of numeric columns
    keep: tuple | None = None  # X's columns kept after the rank check


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
    part = _clean(part, plan)
    infinite = tuple(c for c in numeric
                     if not np.all(np.isfinite(part[c].to_numpy(dtype=float))))
    return {"n_raw": n_raw, "n": len(part), "moments": _moments(part[plan.response].to_numpy(dtype=float)),
            "infinite": infinite, "groups": pd.Series(_group_values(part, plan.group).unique()),
            "labels": {c: pd.Series(part[c].unique()) for c in unknown}}


def _fixed_block(part: pd.DataFrame, plan: _Plan) -> np.ndarray:
    """X of a cleaned partition, with the columns the plan keeps."""
    if plan.model_spec is None:
        columns = _plain_model_matrix(plan.fixed, part)
    else:
        columns = pd.DataFrame(plan.model_spec.get_model_matrix(part, na_action="raise"))
        if tuple(str(c) for c in columns.columns) != plan.names:
            raise DataError("the partitions of the Dask DataFrame give different fixed-effect columns "
                            f"({list(columns.columns)} vs {list(plan.names)}); give categorical columns "
                            "known categories (ddf.categorize())")
    X = _float_matrix(columns, len(part))
    return X if plan.keep is None else X[:, list(plan.keep)]


def _codes_block(part: pd.DataFrame, plan: _Plan) -> np.ndarray:
    values = _group_values(part, plan.group)
    codes = pd.Index(plan.levels).get_indexer(np.asarray(values.to_numpy(), dtype=object)
                                                if isinstance(values.dtype, pd.CategoricalDtype) else values)
    if len(codes) and codes.min() < 0:
        raise DataError(f"a partition holds a level of {plan.group!r} that the first pass did not see")
    return codes.astype(np.intp, copy=False)


def _partition_sums(part: pd.DataFrame, plan: _Plan, shift: float, scale: float, ones: tuple) -> tuple:
    """Second pass over a partition: the (J, G) table of sums, per-group min and max of X, max |X|."""
    part = _clean(part, plan)
    G = len(plan.levels)
    X = _fixed_block(part, plan)
    codes = _codes_block(part, plan)
    y = part[plan.response].to_numpy(dtype=float)
    S = _block_sums(y, X, codes, G, shift, scale, ones)
    p = X.shape[1]
    lo = np.full((G, p), np.inf)
    hi = np.full((G, p), -np.inf)
    if len(part):
        grouped = pd.DataFrame(X).groupby(codes, sort=False)
        mins, maxs = grouped.min(), grouped.max()
        lo[mins.index.to_numpy()] = mins.to_numpy()
        hi[maxs.index.to_numpy()] = maxs.to_numpy()
    absmax = float(max(X.max(), -X.min())) if X.size else 0.0
    return S, lo, hi, absmax


def _add_sums(a: tuple, b: tuple) -> tuple:
    return a[0] + b[0], np.minimum(a[1], b[1]), np.maximum(a[2], b[2]), max(a[3], b[3])


def _response_block(part: pd.DataFrame, plan: _Plan) -> np.ndarray:
    return _clean(part, plan)[plan.response].to_numpy(dtype=float)


def _fixed_rows(part: pd.DataFrame, plan: _Plan) -> np.ndarray:
    return _fixed_block(_clean(part, plan), plan)


def _codes_rows(part: pd.DataFrame, plan: _Plan) -> np.ndarray:
    return _codes_block(_clean(part, plan), plan)


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


def _model_spec(fixed: str, part: pd.DataFrame):
    """formulaic's ModelSpec of the fixed part, built on one partition (None for the plain fast path)."""
    if _plain_model_matrix(fixed, part) is not None:
        columns = _plain_model_matrix(fixed, part)
        return None, tuple(columns.keys())
    from formulaic import model_matrix
    from formulaic.errors import FormulaicError

    try:
        mm = model_matrix(fixed, part, na_action="raise")
    except FormulaicError as exc:
        raise FormulaError(f"cannot build the fixed-effects matrix X from {fixed!r}: "
                           f"{str(exc).splitlines()[0]}") from None
    except (ValueError, TypeError) as exc:
        raise DataError(f"cannot build the fixed-effects matrix X from {fixed!r}: "
                        f"{str(exc).splitlines()[0]}") from None
    return mm.model_spec, tuple(str(c) for c in mm.columns)


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


def specify_dask(formula: str, ddf) -> DaskDesign:
    """A Dask DataFrame + formula -> a DaskDesign with its per-group statistics computed by Dask.

    Two passes over the partitions (with the active scheduler: a ``dask.distributed`` Client if one
    exists): the first finds the rows, the response's mean and SD and the grouping factor's levels; the
    second adds up each partition's per-group sums (the same one-pass bincounts as in memory) in a tree.
    The fixed part is built per partition by the same code as in memory (formulaic's ModelSpec, fitted on
    the first partition, after categorical columns are given their global levels), so the result equals
    the in-memory fit's to rounding. Stateful transforms (center, scale, poly) need whole columns and are
    refused.
    """
    import dask
    import dask.array as da

    columns = {str(c) for c in ddf.columns}
    parsed = parse_formula(formula, columns)
    if len(parsed.random) != 1 or parsed.random[0][0].strip() != "1":
        raise ModelError("a Dask DataFrame is fitted from its per-group statistics, which need a single "
                         "random intercept (1|g); fit models with slopes or several terms in memory "
                         "(ddf.compute())")
    if _STATEFUL.search(parsed.fixed):
        raise ModelError("center(), scale() and poly() need a whole column at once; with a Dask DataFrame "
                         "compute the transformed column first")
    group = parsed.random[0][1]
    used = _used_columns(parsed, columns)
    cols = tuple(c for c in ddf.columns if str(c) in used)
    meta = ddf._meta[list(cols)]
    _numeric_response(meta, parsed.response)
    in_c = set(_IN_C.findall(parsed.fixed))
    group_cols = set(group.split(":"))
    factor_cols = [c for c in cols if str(c) != parsed.response and str(c) not in group_cols
                   and (str(c) in in_c or not pd.api.types.is_numeric_dtype(meta[c]))]
    known = {c: list(meta[c].cat.categories) for c in factor_cols
             if isinstance(meta[c].dtype, pd.CategoricalDtype) and len(meta[c].cat.categories)}
    unknown = tuple(c for c in factor_cols if c not in known)
    numeric = tuple(c for c in cols if pd.api.types.is_numeric_dtype(meta[c])
                    and not pd.api.types.is_bool_dtype(meta[c]))
    plan = _Plan(columns=cols, response=parsed.response, fixed=parsed.fixed, group=group, categories={})
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
    plan = _Plan(columns=cols, response=parsed.response, fixed=parsed.fixed, group=group,
                 categories=categories, levels=levels)
    sample = _clean(parts[first].compute(), plan)
    model_spec, names = _model_spec(parsed.fixed, sample)
    plan = _Plan(columns=cols, response=parsed.response, fixed=parsed.fixed, group=group,
                 categories=categories, levels=levels, names=names, model_spec=model_spec)

    # pass 2: the per-group sums, added up in a tree. The response is centred when the constant lies in
    # col(X): always with an intercept column; for cell-means coding when the first partition says so,
    # checked on the whole X^T X afterwards (and the pass repeated without the shift if it fails)
    ones = tuple(k for k, name in enumerate(names) if name == "Intercept")
    spans = bool(ones) or spans_constant(_fixed_block(sample, plan))
    scale = math.sqrt(moments[2] / n) or 1.0

    def group_sums(shift: float) -> tuple:
        with stage("computing group statistics with Dask (%d rows, %d groups, %d partitions)", n,
                   len(levels), npart):
            return _tree_reduce([dask.delayed(_partition_sums, pure=True)(p, plan, shift, scale, ones)
                                 for p in parts], _add_sums).compute()

    shift = moments[1] if spans else 0.0
    S, lo, hi, absmax = group_sums(shift)
    p_all = len(names)
    fixed_names = [("(Intercept)" if c == "Intercept" else c) for c in names]
    raw = _from_sums(S, p_all, ones, 0.0, scale, np.zeros(p_all))
    keep = _drop_aliased_gram(raw.XtX.sum(0), n, absmax, fixed_names)
    A, b = raw.XtX.sum(0)[np.ix_(keep, keep)], raw.Xt1.sum(0)[keep]
    if ones:
        delta = np.zeros(len(keep))
        delta[keep.index(ones[0])] = 1.0
    elif spans:
        delta = np.linalg.solve(A, b) if keep else np.zeros(0)
        if not keep or n - float(b @ delta) > 1e-10 * n:
            spans, shift, delta = False, 0.0, np.zeros(len(keep))
            S, lo, hi, absmax = group_sums(shift)
            raw = _from_sums(S, p_all, ones, 0.0, scale, np.zeros(p_all))
    else:
        delta = np.zeros(len(keep))
    stats = GroupStatistics(m=raw.m, Xt1=raw.Xt1[:, keep], Xty=raw.Xty[:, keep],
                            XtX=raw.XtX[:, keep][:, :, keep], yty=raw.yty, one_y=raw.one_y,
                            shift=shift, scale=scale, beta_shift=shift * delta)
    lo, hi = lo[:, keep], hi[:, keep]
    messages: list[str] = []
    if n_raw > n:
        messages.append(f"{n_raw - n} row(s) with missing values dropped")
    dropped = [fixed_names[k] for k in range(p_all) if k not in keep]
    if dropped:
        messages.append(f"fixed-effect model matrix is rank deficient so dropping {len(dropped)} "
                        f"column(s): {', '.join(dropped)}")
        plan = _Plan(columns=cols, response=parsed.response, fixed=parsed.fixed, group=group,
                     categories=categories, levels=levels, names=names, model_spec=model_spec, keep=tuple(keep))
    means = stats.Xt1 / stats.m[:, None]
    within = np.all(np.isclose(lo, means) & np.isclose(hi, means), axis=0)
    has_constant = spans

    # the rows, lazily: one block per partition
    cleaned = ddf[list(cols)]
    y = da.concatenate([da.from_delayed(dask.delayed(_response_block, pure=True)(prt, plan), (k,), float)
                        for prt, k in zip(parts, lengths)])
    X = da.concatenate([da.from_delayed(dask.delayed(_fixed_rows, pure=True)(prt, plan), (k, len(keep)), float)
                        for prt, k in zip(parts, lengths)])
    codes = da.concatenate([da.from_delayed(dask.delayed(_codes_rows, pure=True)(prt, plan), (k,), np.intp)
                            for prt, k in zip(parts, lengths)])
    Z = da.ones((n, 1), chunks=(lengths, 1))
    term = RandomTerm(expr="1", group=group, names=("(Intercept)",), Z=Z, codes=codes,
                      levels=tuple(str(v) for v in levels))
    _check_identifiable((term,), n)
    for msg in messages:
        warnings.warn(msg, LMMWarning, stacklevel=3)
    logger.info("Dask design: %d rows, %d fixed effects, %d groups", n, len(keep), len(levels))
    return DaskDesign(formula=formula, response=parsed.response, y=y, X=X,
                      fixed_names=tuple(fixed_names[k] for k in keep), terms=(term,), frame=cleaned,
                      messages=tuple(messages), dropped_columns=tuple(dropped), n_dropped_rows=n_raw - n,
                      statistics=stats, within_constant=within, has_constant=has_constant,
                      y_range=moments[4] - moments[3], npartitions=npart)

