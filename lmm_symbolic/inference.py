r"""After the fit: prediction, simulation, the parametric bootstrap, profile intervals, model comparison
and the result in the shapes lme4 users know (``predict``, ``simulate``, ``bootMer``, ``confint``,
``anova``, ``update``, ``fixef``, ``ranef``, ``VarCorr``).

Everything here works from a fitted :class:`~lmm_symbolic.results.FitResult`, its Design and the public
numeric core (:func:`~lmm_symbolic.results.fit_design`, :func:`~lmm_symbolic.results.deviance_function`):

* prediction: a new row goes through the fit's formula (:mod:`lmm_symbolic.formula`) with the fit's
  scale()/poly() parameters, factor levels and contrasts, so
  :math:`y_\text{new} = x_\text{new}^\top \hat\beta + z_\text{new}^\top \hat b_j`, with :math:`\hat b_j = 0`
  for a level the fit never saw (lme4's ``allow.new.levels = TRUE``);
* simulation: :math:`y^* = X\hat\beta + Z b^* + \varepsilon^*`, :math:`b^* \sim N(0, D)`,
  :math:`\varepsilon^* \sim N(0, \sigma^2 W^{-1})` (lme4's
  ``simulate``), and refits of the same design with a new response (no re-specification);
* profile intervals (lme4's ``confint``, method "profile"): the ML deviance of the model, as lme4 profiles
  it, in the parameters (SDs and correlations of each term, :math:`\sigma`, :math:`\beta`); for a parameter
  :math:`\psi`, :math:`\zeta(\psi) = \operatorname{sign}(\psi - \hat\psi) \sqrt{D(\psi) - D(\hat\psi)}` with
  :math:`D(\psi)` the deviance minimised over the others, and the interval
  :math:`\{\psi : |\zeta(\psi)| \le z_{1-\alpha/2}\}`;
* likelihood-ratio tests of nested models (lme4's ``anova``).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.optimize
import scipy.sparse
import scipy.sparse.linalg
import scipy.stats

from .errors import DataError, FormulaError, ModelError
from .formula import (Evaluated, Factor, Frame, Node, Numeric, _factor_of_values, deparse, evaluate_terms,
                      expand_terms, missing_rows, model_matrix, parse, split_formula, take_rows)
from .progress import REPORT_AFTER, logger, stage
from .specification import Design, _group_values, _random_parts, random_effects_matrix, read_data, whitened

ML_REFIT_MESSAGE = "refitting model(s) with ML (instead of REML)"


# ============================================================================================ helpers
def _level_key(label) -> str:
    """A level's label compared as text, 1 and 1.0 alike (a CSV may read an integer column as float)."""
    text = str(label)
    try:
        v = float(text)
    except ValueError:
        return text
    return str(int(v)) if v.is_integer() else text


def _theta_blocks(design: Design, theta) -> list[np.ndarray]:
    """lme4's theta as each term's relative Cholesky factor T_k (lower triangle, column by column)."""
    theta = np.asarray(theta, dtype=float)
    out, k = [], 0
    for t in design.terms:
        T = np.zeros((t.q, t.q))
        rows, cols = np.tril_indices(t.q)
        order = np.lexsort((rows, cols))          # column-wise
        m = t.q * (t.q + 1) // 2
        T[rows[order], cols[order]] = theta[k:k + m]
        out.append(T)
        k += m
    return out


def _tril_colwise(M: np.ndarray) -> np.ndarray:
    rows, cols = np.tril_indices(M.shape[0])
    order = np.lexsort((rows, cols))
    return M[rows[order], cols[order]]


def _ranef_blocks(fit) -> list[np.ndarray]:
    """Each term's conditional modes b_k (levels x q_k), in the term's level order."""
    out = []
    for t in fit.design.terms:
        frame = fit.random_effects[t.group] if isinstance(fit.random_effects, dict) else fit.random_effects
        out.append(frame.loc[list(t.levels), list(t.names)].to_numpy(dtype=float))
    return out


def varpar_names(design: Design) -> list[str]:
    """lme4's names of the variance parameters on the SD/correlation scale: ``.sig01``, ``.sig02``, ...
    (each term's lower triangle column by column: an SD on the diagonal, a correlation below it),
    ``.sigma``."""
    m = sum(t.q * (t.q + 1) // 2 for t in design.terms)
    return [f".sig{k:02d}" for k in range(1, m + 1)] + [".sigma"]


def varpar_labels(design: Design) -> list[str]:
    """What each ``.sigNN`` is, in words: ``sd_(Intercept)|Subject``, ``cor_Days.(Intercept)|Subject``,
    ``sigma``."""
    out = []
    for t in design.terms:
        rows, cols = np.tril_indices(t.q)
        for r, c in sorted(zip(rows, cols), key=lambda rc: (rc[1], rc[0])):
            out.append(f"sd_{t.names[r]}|{t.group}" if r == c else f"cor_{t.names[r]}.{t.names[c]}|{t.group}")
    return out + ["sigma"]


def sdcor_of_theta(design: Design, theta, sigma: float) -> np.ndarray:
    r"""(SDs and correlations of each term, :math:`\sigma`) from lme4's :math:`\theta` and :math:`\sigma`:
    :math:`D_k = \sigma^2 T_k T_k^\top`."""
    out = []
    for T in _theta_blocks(design, theta):
        D = sigma**2 * T @ T.T
        sd = np.sqrt(np.diag(D))
        with np.errstate(invalid="ignore", divide="ignore"):
            C = D / np.outer(sd, sd)
        C[~np.isfinite(C)] = 0.0
        np.fill_diagonal(C, sd)
        out.append(_tril_colwise(C))
    return np.concatenate(out + [[sigma]])


def theta_of_sdcor(design: Design, par) -> np.ndarray | None:
    r"""lme4's :math:`\theta` from (SDs, correlations, :math:`\sigma`):
    :math:`T_k = \operatorname{diag}(\mathrm{sd})\, \operatorname{chol}(C) / \sigma`; None when a
    correlation matrix is not positive definite."""
    par = np.asarray(par, dtype=float)
    sigma = par[-1]
    out, k = [], 0
    for t in design.terms:
        m = t.q * (t.q + 1) // 2
        rows, cols = np.tril_indices(t.q)
        order = np.lexsort((rows, cols))
        M = np.zeros((t.q, t.q))
        M[rows[order], cols[order]] = par[k:k + m]
        sd = np.diag(M).copy()
        C = M + M.T - np.diag(np.diag(M) * 2) + np.eye(t.q)
        try:
            L = np.linalg.cholesky(C)
        except np.linalg.LinAlgError:
            return None
        out.append(_tril_colwise(sd[:, None] * L / sigma))
        k += m
    return np.concatenate(out)


def sdcor_bounds(design: Design) -> list[tuple[float, float]]:
    r"""SDs in :math:`[0, \infty)`, correlations in :math:`[-1, 1]`, :math:`\sigma` in :math:`(0, \infty)`."""
    out = []
    for t in design.terms:
        rows, cols = np.tril_indices(t.q)
        for r, c in sorted(zip(rows, cols), key=lambda rc: (rc[1], rc[0])):
            out.append((0.0, np.inf) if r == c else (-1.0, 1.0))
    return out + [(0.0, np.inf)]


def _require_terms(fit, what: str) -> None:
    if fit.design.kinship is not None or not fit.design.terms:
        raise ModelError(f"{what} works on models with random-effect terms (lme4's Z); a kinship model has "
                         "none: use the Wald intervals (method='wald')")


# ========================================================================================= prediction
def _reference_frame(design: Design):
    """The fit's own rows evaluated again (with the fit's scale()/poly() parameters): each variable's
    factor levels as the fit coded them."""
    parsed = split_formula(design.formula)
    frame = Frame(design.frame, design.formula, design.formula_parameters)
    rows = np.arange(len(design.frame))
    fixed = take_rows(evaluate_terms(parsed.fixed, frame), rows)
    random = [take_rows(evaluate_terms(t, frame), rows) for t, _ in _random_parts(parsed, design.frame)]
    return parsed, fixed, random


def _conform(new: Evaluated, ref: Evaluated) -> Evaluated:
    """New rows' variables coded as the fit coded its own: each factor on the fit's levels (a level the fit
    never saw is an error, as R's 'factor has new levels'), numeric stays numeric."""
    values = []
    for node, v_new, v_ref in zip(ref.terms.variables, new.values, ref.values):
        if isinstance(v_ref, Factor):
            if not isinstance(v_new, Factor):
                v_new = _factor_of_values(pd.Series(v_new.values[:, 0]))
            lookup = {_level_key(lv): k for k, lv in enumerate(v_ref.levels)}
            mapped = np.array([lookup.get(_level_key(lv), -2) for lv in v_new.levels], dtype=np.int64)
            codes = np.where(v_new.codes >= 0, mapped[np.maximum(v_new.codes, 0)] if len(mapped) else -1, -1)
            if (codes == -2).any():
                unseen = sorted({v_new.levels[c] for c, m in zip(v_new.codes, codes) if m == -2})
                raise DataError(f"factor {deparse(node)!r} has new level(s) {', '.join(map(str, unseen))} in "
                                f"the new data; the fit knows {', '.join(v_ref.levels)}")
            values.append(Factor(codes, v_ref.levels, v_ref.ordered))
        else:
            if isinstance(v_new, Factor):
                raise DataError(f"the variable {deparse(node)!r} is numeric in the fit but not in the new data")
            values.append(v_new)
    return Evaluated(ref.terms, tuple(values), new.n, new.offset)


def _columns(ev: Evaluated, wanted) -> np.ndarray:
    """The model-matrix columns ``wanted`` (by R's names) for the rows of ``ev``; NaN rows where a
    variable is missing (predict's na.pass)."""
    bad = missing_rows(ev)
    filled = tuple(Factor(np.where(v.codes < 0, 0, v.codes), v.levels, v.ordered) if isinstance(v, Factor)
                   else Numeric(np.nan_to_num(v.values), v.suffixes) for v in ev.values)
    M, names = model_matrix(Evaluated(ev.terms, filled, ev.n, ev.offset))
    where = {name: k for k, name in enumerate(names)}
    missing = [w for w in wanted if w not in where]
    if missing:
        raise DataError(f"the new data do not give the model's column(s) {', '.join(missing)}")
    out = M[:, [where[w] for w in wanted]] if len(wanted) else np.zeros((ev.n, 0))
    out[bad] = np.nan
    return out


def _selected_terms(design: Design, re_form) -> list[int]:
    """Which random terms a prediction includes: all (re_form None), none ('~0', 'NA', NaN, False), or
    those whose grouping factor a formula of random terms names ('~ (1|Subject)')."""
    if re_form is None:
        return list(range(len(design.terms)))
    if re_form is False or (isinstance(re_form, float) and np.isnan(re_form)):
        return []
    text = str(re_form).strip()
    if text.replace(" ", "") in ("~0", "~-1", "NA", "0", ""):
        return []
    if not text.startswith("~"):
        raise FormulaError(f"re_form must be None, '~0' (or NA) or a formula of random terms like "
                           f"'~ (1|g)', not {re_form!r}")
    tree = parse("y " + text, formula=True)
    groups = set()

    def walk(n: Node):
        if n.kind == "paren" and n.args[0].kind == "binary" and n.args[0].value in ("|", "||"):
            groups.add(deparse(n.args[0].args[1]).replace(" ", ""))
        for a in n.args:
            if isinstance(a, Node):
                walk(a)
    walk(tree.args[1])
    return [k for k, t in enumerate(design.terms) if t.group in groups
            or any(t.group in _expand(g) for g in groups)]


def _expand(group: str) -> list[str]:
    """a/b as b:a and a (lme4's nesting)."""
    if "/" not in group:
        return [group]
    parts = group.split("/")
    return [":".join(reversed(parts[:k])) for k in range(len(parts), 0, -1)]


def _argument_offset(design: Design, parsed, ref_fixed_offset) -> bool:
    """True when the fit's offset came (also) from fit(..., offset=): it cannot be recomputed from new rows."""
    if design.offset is None:
        return False
    if ref_fixed_offset is None:
        return True
    return not np.allclose(design.offset, ref_fixed_offset)


def predict(fit, newdata=None, re_form=None, offset=None) -> np.ndarray:
    r"""lme4's predict(fit, newdata, re.form, allow.new.levels = TRUE):
    :math:`x^\top \hat\beta + o + \sum_k z_k^\top \hat b_{k,j}` with the conditional modes :math:`\hat b`
    (re_form None), without them ('~0' or NA: the population level), or with
    the terms of the grouping factors a formula like '~(1|g)' names. A level of a grouping factor the fit
    did not see gets :math:`\hat b = 0` (its population-level prediction); a row with a missing variable gets NaN."""
    design = fit.design
    if design.kinship is not None:
        if newdata is not None:
            raise ModelError("a kinship model predicts its own rows only (the genetic values of new rows need "
                             "their kinship with the old ones)")
    chosen = _selected_terms(design, re_form) if design.kinship is None else ([0] if re_form is None else [])
    beta = fit.params.to_numpy(dtype=float)
    if newdata is None:
        eta = design.X @ beta + (design.offset if design.offset is not None else 0.0)
        if design.kinship is not None:
            return eta + (fit.random_effects["kinship"].to_numpy() if chosen else 0.0)
        for k, b in zip(range(len(design.terms)), _ranef_blocks(fit)):
            if k in chosen:
                t = design.terms[k]
                eta = eta + np.einsum("nq,nq->n", t.Z, b[t.codes])
        return eta
    frame = read_data(newdata)
    parsed, ref_fixed, ref_random = _reference_frame(design)
    new_frame = Frame(frame, design.formula, design.formula_parameters)
    fixed = _conform(evaluate_terms(parsed.fixed, new_frame), ref_fixed)
    X = _columns(fixed, list(design.fixed_names))
    eta = X @ beta
    if _argument_offset(design, parsed, ref_fixed.offset) and offset is None:
        raise ModelError("the fit has an offset given to fit(..., offset=): give the new rows' offset "
                         "(predict(newdata, offset=...))")
    if fixed.offset is not None:
        eta = eta + fixed.offset
    if offset is not None:
        eta = eta + (frame[offset].to_numpy(dtype=float) if isinstance(offset, str)
                     else np.asarray(offset, dtype=float))
    if chosen:
        parts = _random_parts(parsed, frame)
        blocks = _ranef_blocks(fit)
        for k in chosen:
            t = design.terms[k]
            terms, group = parts[k]
            ev = _conform(evaluate_terms(terms, new_frame), ref_random[k])
            Z = _columns(ev, list(t.names))
            lookup = {_level_key(lv): j for j, lv in enumerate(t.levels)}
            values = _group_values(frame, group)
            missing = frame[group.split(":")].isna().any(axis=1).to_numpy()
            codes = np.array([lookup.get(_level_key(v), -1) for v in values.astype(str)], dtype=np.int64)
            b = np.vstack([blocks[k], np.zeros((1, t.q))])           # row -1: a new level, b = 0
            contrib = np.einsum("nq,nq->n", Z, b[codes])
            contrib[missing] = np.nan
            eta = eta + contrib
    return eta


def marginal_fitted(fit) -> np.ndarray:
    r""":math:`X\hat\beta + o`: the population-level fitted values (lme4's predict(fit, re.form = NA))."""
    return predict(fit, re_form=np.nan)


# ============================================================================= simulation and refits
def _rng(seed):
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def simulate(fit, nsim: int = 1, seed=None, use_u: bool = False) -> pd.DataFrame:
    r"""lme4's simulate(fit, nsim, seed): responses from the fitted model,
    :math:`y^* = X\hat\beta + o + Z b^* + \varepsilon^*`, :math:`b^*_{kj} \sim N(0, \sigma^2 T_k T_k^\top)` new
    for every simulation (use_u=False; use_u=True keeps the conditional modes),
    :math:`\varepsilon^*_i \sim N(0, \sigma^2 / w_i)`. Columns sim_1 ... sim_nsim, one row per observation."""
    design = fit.design
    rng = _rng(seed)
    n = design.n
    eta = predict(fit, re_form=np.nan)
    sd_eps = fit.sigma / (np.sqrt(design.weights) if design.weights is not None else 1.0)
    Y = np.empty((n, nsim))
    if design.kinship is not None:
        lam, U = np.linalg.eigh(design.kinship)
        root = U * np.sqrt(np.maximum(lam, 0.0))
    blocks = _theta_blocks(design, fit.opt.theta) if design.kinship is None else []
    modes = _ranef_blocks(fit) if use_u and design.kinship is None else None
    for s in range(nsim):
        y = eta.copy()
        if design.kinship is not None:
            y += (fit.random_effects["kinship"].to_numpy() if use_u else fit.sigma_s * root @ rng.standard_normal(n))
        else:
            for k, (t, T) in enumerate(zip(design.terms, blocks)):
                b = modes[k] if use_u else fit.sigma * rng.standard_normal((t.n_levels, t.q)) @ T.T
                y += np.einsum("nq,nq->n", t.Z, b[t.codes])
        y += sd_eps * rng.standard_normal(n)
        Y[:, s] = y
    return pd.DataFrame(Y, columns=[f"sim_{k + 1}" for k in range(nsim)])


def marginal_variance(fit) -> np.ndarray:
    r""":math:`\operatorname{Var}(y_i)` under the fitted model: :math:`\sum_k z_{ik}^\top D_k z_{ik} + \sigma^2 / w_i`
    (what simulate's draws spread by)."""
    design = fit.design
    v = fit.sigma**2 / (design.weights if design.weights is not None else 1.0) * np.ones(design.n)
    if design.kinship is not None:
        return v + fit.sigma_s**2 * np.diag(design.kinship)
    for t, T in zip(design.terms, _theta_blocks(design, fit.opt.theta)):
        D = fit.sigma**2 * T @ T.T
        v = v + np.einsum("nq,qr,nr->n", t.Z, D, t.Z)
    return v


def refit(fit, y, method: str | None = None):
    """The same design fitted to a new response (lme4's refit): dataclasses.replace on the Design, then
    fit_design; nothing is specified again."""
    from .results import fit_design
    y = np.asarray(y, dtype=float).ravel()
    if y.shape != (fit.design.n,):
        raise DataError(f"the new response has {y.size} values, the design {fit.design.n} rows")
    if not np.all(np.isfinite(y)):
        raise DataError("the new response holds missing or infinite values")
    y = y.copy()
    y.setflags(write=False)
    design = dataclasses.replace(fit.design, y=y)
    return fit_design(design, method=method or fit.method, exact=False)


def parameters(fit) -> pd.Series:
    r"""Every parameter as lme4's confint names it: ``.sig01``, ... (SDs and correlations), ``.sigma``,
    then :math:`\beta`."""
    if fit.design.kinship is not None:
        var = pd.Series([fit.sigma_s, fit.sigma], index=[".sig01", ".sigma"])
    else:
        var = pd.Series(sdcor_of_theta(fit.design, fit.opt.theta, fit.sigma), index=varpar_names(fit.design))
    return pd.concat([var, fit.params])


# ============================================================================================ bootstrap
@dataclass(frozen=True)
class Bootstrap:
    """A parametric bootstrap (lme4's bootMer): ``draws`` holds one row per refit (NaN where a refit
    failed), ``estimates`` the fit's own values, ``boundary`` which refits are singular (a variance at 0)."""

    estimates: pd.Series
    draws: pd.DataFrame = field(repr=False)
    boundary: np.ndarray = field(repr=False)
    seed: object = None

    @property
    def nsim(self) -> int:
        return len(self.draws)

    @property
    def boundary_share(self) -> float:
        r"""The share of refits on the boundary (some :math:`\sigma_k = 0`: a singular fit)."""
        return float(np.mean(self.boundary)) if len(self.boundary) else 0.0

    @property
    def n_failed(self) -> int:
        return int(self.draws.isna().all(axis=1).sum())

    def conf_int(self, alpha: float = 0.05) -> pd.DataFrame:
        r"""Percentile intervals: the :math:`\alpha/2` and :math:`1 - \alpha/2` quantiles of the draws (boot's type 'perc')."""
        lo, hi = _percent_labels(alpha)
        q = self.draws.quantile([alpha / 2, 1 - alpha / 2]).T
        q.columns = [lo, hi]
        return q

    def summary(self) -> pd.DataFrame:
        """original, bias and std. error of each parameter (boot's print)."""
        return pd.DataFrame({"original": self.estimates, "bias": self.draws.mean() - self.estimates,
                             "std. error": self.draws.std(ddof=1)})

    def __str__(self) -> str:
        return (f"Parametric bootstrap, {self.nsim} refits ({self.n_failed} failed); "
                f"{100 * self.boundary_share:.1f} % on the boundary (a random-effect SD estimated as 0)\n"
                + self.summary().to_string(float_format=lambda v: f"{v:.6g}"))


def bootstrap(fit, nsim: int = 200, seed=None, use_u: bool = False) -> Bootstrap:
    r"""lme4's bootMer(fit, FUN = every parameter, nsim, type = 'parametric'): simulate nsim responses from
    the fit, refit each by the fit's method, keep (SDs, correlations, :math:`\sigma`, :math:`\beta`). Progress lines under
    the ``lmm_symbolic`` logger (``lmm_symbolic.progress.enable()``) every tenth of the way once it takes
    longer than REPORT_AFTER seconds."""
    import warnings

    from .errors import LMMWarning
    if nsim < 1:
        raise ModelError("nsim must be at least 1")
    est = parameters(fit)
    rows, boundary = np.full((nsim, len(est)), np.nan), np.zeros(nsim, dtype=bool)
    rng = _rng(seed)
    start, reported = time.perf_counter(), 0
    with stage("parametric bootstrap: %d refits", nsim):
        Y = simulate(fit, nsim, rng, use_u=use_u).to_numpy()
        for s in range(nsim):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", LMMWarning)
                try:
                    r = refit(fit, Y[:, s])
                except Exception:        # a failed refit is counted, as bootMer counts them
                    continue
            rows[s] = parameters(r).to_numpy()
            boundary[s] = r.singular
            step = max(nsim // 10, 1)
            if logger.isEnabledFor(logging.INFO) and (s + 1) % step == 0 and \
                    time.perf_counter() - start >= REPORT_AFTER and s + 1 > reported:
                reported = s + 1
                logger.info("parametric bootstrap: %d of %d refits (%.0f %%), %.1f s", s + 1, nsim,
                            100 * (s + 1) / nsim, time.perf_counter() - start)
    return Bootstrap(estimates=est, draws=pd.DataFrame(rows, columns=est.index), boundary=boundary, seed=seed)


# ============================================================================================== profile
def _percent_labels(alpha: float) -> tuple[str, str]:
    return f"{100 * alpha / 2:.3g} %", f"{100 * (1 - alpha / 2):.3g} %"


class _Profiler:
    """The ML deviance as lme4's profile sees it (lme4 refits a REML fit by ML first).

    Variance parameters psi = (SDs, correlations, sigma):
        D(theta, sigma) = log|L_theta|^2 + r^2(theta) / sigma^2 + n log(2 pi sigma^2),
    with theta from psi, log|L_theta|^2 = log|Lambda^T Z^T Z Lambda + I| and the penalised residual sum of
    squares r^2(theta) read off the profiled deviance d(theta) = log|L_theta|^2 + n (1 + log(2 pi r^2 / n))
    (:func:`deviance_function`). A fixed effect beta_j = b: the profiled deviance of the design with column
    j moved into the offset (y - b x_j), minimised over theta."""

    def __init__(self, fit):
        from .results import deviance_function, fit_design
        _require_terms(fit, "profiling")
        self.fit = fit
        self.ml = fit if fit.method == "ML" else fit_design(fit.design, "ML", exact=False)
        self.design = fit.design
        self.white = whitened(fit.design)
        self.d = deviance_function(self.white, "ML")
        self.n = self.design.n
        Z = random_effects_matrix(self.white)
        self.ZtZ = (Z.T @ Z).tocsc()
        self.theta_hat = np.asarray(self.ml.opt.theta, dtype=float)
        self.par_hat = sdcor_of_theta(self.design, self.theta_hat, self.ml.sigma)
        self.bounds = sdcor_bounds(self.design)
        self.names = varpar_names(self.design)
        self.base = float(self.d(self.theta_hat))
        check = self.deviance_sdcor(self.par_hat)
        if not abs(check - self.base) <= 1e-6 * max(1.0, abs(self.base)):   # lme4's basecheck in profile()
            raise ModelError(f"profiling over (theta, sigma) gives deviance {check:.10g} at the optimum, the "
                             f"profiled deviance {self.base:.10g}: not numerically consistent")
        self.theta_lower = [(-np.inf if b is None else b) for b in self.d.lower_bounds]

    def _lambda_pattern(self):
        """Lambda's non-zeros (lme4's Lind): row, column and the theta entry each one holds."""
        rows, cols, idx, offset, k = [], [], [], 0, 0
        for t in self.design.terms:
            r, c = np.tril_indices(t.q)
            order = np.lexsort((r, c))
            r, c = r[order], c[order]
            base = offset + np.arange(t.n_levels)[:, None] * t.q
            rows.append((base + r).ravel())
            cols.append((base + c).ravel())
            idx.append(np.tile(k + np.arange(len(r)), t.n_levels))
            offset += t.q * t.n_levels
            k += len(r)
        return np.concatenate(rows), np.concatenate(cols), np.concatenate(idx), offset

    def logdet(self, theta) -> float:
        """log|Lambda^T Z^T Z Lambda + I| (lme4's log|L_theta|^2), by a Cholesky factor."""
        if not hasattr(self, "_pattern"):
            self._pattern = self._lambda_pattern()
            self._dense = self._pattern[3] <= 2000
            if self._dense:
                self._ZtZ = self.ZtZ.toarray()
        rows, cols, idx, q = self._pattern
        theta = np.asarray(theta, dtype=float)
        if self._dense:
            Lam = np.zeros((q, q))
            Lam[rows, cols] = theta[idx]
            M = Lam.T @ self._ZtZ @ Lam
            M[np.diag_indices(q)] += 1.0
            try:
                return float(2 * np.log(np.diag(np.linalg.cholesky(M))).sum())
            except np.linalg.LinAlgError:          # rounding at extreme theta: the determinant still exists
                return float(np.linalg.slogdet(M)[1])
        Lam = scipy.sparse.csc_matrix((theta[idx], (rows, cols)), shape=(q, q))
        M = (Lam.T @ self.ZtZ @ Lam + scipy.sparse.identity(q)).tocsc()
        lu = scipy.sparse.linalg.splu(M)
        return float(np.log(np.abs(lu.U.diagonal())).sum())

    def deviance_sdcor(self, par) -> float:
        par = np.asarray(par, dtype=float)
        sigma = par[-1]
        if sigma <= 0:
            return np.inf
        theta = theta_of_sdcor(self.design, par)
        if theta is None:
            return np.inf
        from .errors import NumericalError
        try:
            ld = self.logdet(theta)
            s2 = np.exp((self.d(theta) - ld) / self.n - 1) / (2 * np.pi)        # r^2(theta) / n
        except (NumericalError, np.linalg.LinAlgError):       # far outside the region a profile visits
            return self.base + 1e12
        return ld + self.n * (s2 / sigma**2 + np.log(2 * np.pi * sigma**2))

    def _minimise(self, fun, x0, bounds):
        if len(x0) == 0:
            return float(fun(np.array([]))), np.array([])
        res = scipy.optimize.minimize(fun, x0, method="L-BFGS-B", bounds=bounds,
                                      options={"ftol": 1e-15, "gtol": 1e-9, "maxiter": 2000, "maxls": 50})
        return float(res.fun), res.x

    def _kind(self, name: str) -> str:
        if name not in self.names:
            return "beta"
        if name == ".sigma":
            return "sigma"
        return "cor" if self.bounds[self.names.index(name)][0] == -1 else "sd"

    def zeta(self, name: str, value: float) -> float:
        """sign(value - estimate) sqrt(D_min(value) - D_hat): the signed root of the deviance increase when
        the parameter is held at ``value`` and every other one is re-estimated."""
        kind = self._kind(name)
        if kind != "beta":
            w = self.names.index(name)
            free = [k for k in range(len(self.par_hat)) if k != w]
            kinds = [self._kind(self.names[k]) for k in free]
            bounds = [(-1 + 1e-9, 1 - 1e-9) if kd == "cor" else (1e-2 * self.par_hat[-1], None) if kd == "sigma"
                      else (0.0, None) for kd in kinds]
            x0 = np.array([min(max(self.par_hat[k], lo), np.inf if hi is None else hi)
                           for k, (lo, hi) in zip(free, bounds)])

            def fun(x):
                par = self.par_hat.copy()
                par[w] = value
                par[free] = x
                return self.deviance_sdcor(par)
            dev, _ = self._minimise(fun, x0, bounds)
        else:
            from .results import deviance_function
            j = list(self.design.fixed_names).index(name)
            W = self.white
            keep = [k for k in range(W.p) if k != j]
            Wj = dataclasses.replace(W, X=W.X[:, keep], y=W.y - value * W.X[:, j],
                                     fixed_names=tuple(W.fixed_names[k] for k in keep))
            dj = deviance_function(Wj, "ML")
            bounds = [(lo, None) if np.isfinite(lo) else (None, None) for lo in self.theta_lower]
            dev, _ = self._minimise(lambda th: dj(th), self.theta_hat, bounds)
        return float(np.sign(value - self.estimate(name)) * np.sqrt(max(dev - self.base, 0.0)))

    def estimate(self, name: str) -> float:
        return float(self.par_hat[self.names.index(name)]) if name in self.names else float(self.ml.params[name])

    def limits(self, name: str, z: float) -> tuple[float, float]:
        """The values where zeta = -z and +z, found by bracketing and Brent's method (lme4 interpolates a
        spline through the profile's points). Where the profile stays inside |zeta| < z up to a bound, the
        limit is the bound, as lme4 gives it: 0 for an SD, -1 or 1 for a correlation."""
        est, kind = self.estimate(name), self._kind(name)
        scale = {"beta": lambda: z * float(self.ml.bse[name]), "sigma": lambda: 0.2 * est,
                 "sd": lambda: 0.5 * est if est > 0 else 0.1 * self.par_hat[-1], "cor": lambda: 0.0}[kind]()
        out = []
        for side in (-1, 1):
            target = side * z

            def f(v):
                return self.zeta(name, v) - target
            edge = side * (1 - 1e-9) if kind == "cor" else (0.0 if kind == "sd" and side < 0 else None)
            if edge is not None:
                bound = float(round(edge))
                if abs(edge - est) < 1e-12 or side * f(edge) <= 0:
                    out.append(bound)
                    continue
                a, b = est, edge
            else:
                a, step = est, scale
                b = est + side * step
                for _ in range(80):
                    if side * f(b) >= 0:
                        break
                    a, step = b, 2 * step
                    b = est + side * step
                    if kind == "sigma" and b <= 0:
                        b = a / 2
                else:
                    raise ModelError(f"the profile of {name} never reaches |zeta| = {z:.3g}")
            lo, hi = sorted((a, b))
            out.append(float(scipy.optimize.brentq(f, lo, hi, xtol=1e-8 * max(1.0, abs(est)), rtol=1e-10)))
        return out[0], out[1]

    def all_names(self) -> list[str]:
        return self.names + list(self.design.fixed_names)


def profile(fit, which=None, points: int = 13, level: float = 0.99) -> pd.DataFrame:
    r"""lme4's profile(fit): :math:`\zeta(\psi)` on a grid of each parameter between its limits at ``level`` (lme4's
    alphamax = 0.01); columns ``.par``, ``value``, ``.zeta`` (the data of lme4's ``xyplot`` of the profile)."""
    pr = _Profiler(fit)
    z = scipy.stats.norm.ppf(1 - (1 - level) / 2)
    rows = []
    for name in (which or pr.all_names()):
        lo, hi = pr.limits(name, z)
        est = pr.estimate(name)
        grid = np.unique(np.concatenate([np.linspace(lo, est, points // 2 + 1), np.linspace(est, hi, points // 2 + 1)]))
        for v in grid:
            rows.append({".par": name, "value": float(v), ".zeta": pr.zeta(name, v) if v != est else 0.0})
    return pd.DataFrame(rows)


def conf_int(fit, alpha: float = 0.05, method: str = "profile", nsim: int = 500, seed=None,
             which=None) -> pd.DataFrame:
    r"""Intervals for every parameter (lme4's confint): 'profile' (lme4's default: the likelihood-ratio
    interval :math:`\{\psi : |\zeta(\psi)| \le z_{1-\alpha/2}\}` of the ML profile), 'wald'
    (:math:`\hat\beta \pm z_{1-\alpha/2}\, \mathrm{se}`; NaN for the variance parameters, as lme4) or 'boot' (percentile intervals of a parametric bootstrap of nsim
    refits). Rows ``.sig01``, ..., ``.sigma``, then the fixed effects, as lme4 prints them."""
    method = method.lower()
    lo_name, hi_name = _percent_labels(alpha)
    names = list(parameters(fit).index)
    if method == "wald":
        z = scipy.stats.norm.ppf(1 - alpha / 2)
        lo = pd.Series(np.nan, index=names)
        hi = lo.copy()
        lo[fit.params.index] = fit.params - z * fit.bse
        hi[fit.params.index] = fit.params + z * fit.bse
        out = pd.DataFrame({lo_name: lo, hi_name: hi})
    elif method == "profile":
        pr = _Profiler(fit)
        z = scipy.stats.norm.ppf(1 - alpha / 2)
        with stage("profiling the deviance for %d parameters", len(names)):
            limits = {name: pr.limits(name, z) for name in (which or names)}
        out = pd.DataFrame(limits, index=[lo_name, hi_name]).T
    elif method in ("boot", "bootstrap"):
        out = bootstrap(fit, nsim, seed).conf_int(alpha)
    else:
        raise ModelError(f"method must be 'profile', 'wald' or 'boot', not {method!r}")
    return out.loc[which] if which is not None else out


# =============================================================================================== anova
def _fixed_signature(fit) -> tuple:
    return tuple(fit.design.fixed_names)


def anova(*models, refit: bool | str = "auto", names=None) -> pd.DataFrame:
    r"""Likelihood-ratio tests of a sequence of nested models (lme4's anova(m0, m1, ...)), ordered by their
    number of parameters: :math:`\chi^2 = 2\,(\ell_k - \ell_{k-1})` (the logLik) on the difference in
    parameters.

    REML criteria of models with different fixed effects are not comparable (the REML likelihood is that of
    error contrasts, which change with X): with ``refit`` "auto" the REML fits are then refitted by ML (as
    lme4 always does, refit=True, saying "refitting model(s) with ML (instead of REML)"); when only the
    random effects differ, REML fits are compared directly (lme4's refit=False). A variance component
    tested at its boundary (:math:`\sigma_k = 0`) has the null distribution
    :math:`\tfrac12 \chi^2_{\mathrm{df}-1} + \tfrac12 \chi^2_\mathrm{df}` rather than :math:`\chi^2_\mathrm{df}`
    (Self and Liang 1987; Stram and Lee 1994): column 'Pr(>Chisq) boundary'. The table's
    ``attrs`` hold the heading and notes; ``print(anova_text(table))`` shows them."""
    from .results import fit_design, n_parameters
    if len(models) < 2:
        raise ModelError("anova compares two or more fits of the same data")
    n = {m.design.n for m in models}
    if len(n) > 1:
        raise ModelError("models were not all fitted to the same size of dataset")
    names = list(names) if names is not None else [f"m{k}" for k in range(len(models))]
    any_reml = any(m.method == "REML" for m in models)
    same_fixed = len({_fixed_signature(m) for m in models}) == 1
    if refit == "auto":
        refit = not (same_fixed and all(m.method == "REML" for m in models))
    notes = []
    if refit and any_reml:
        notes.append(ML_REFIT_MESSAGE)
        models = [fit_design(m.design, "ML", exact=False) if m.method == "REML" else m for m in models]
    elif any_reml:
        if not all(m.method == "REML" for m in models):
            raise ModelError("some models are fitted by REML, some by ML; refit them alike")
        notes.append("REML fits with the same fixed effects compared directly (no refit by ML)")
    npar = [n_parameters(m.design) for m in models]
    order = sorted(range(len(models)), key=lambda k: npar[k])
    models = [models[k] for k in order]
    names = [names[k] for k in order]
    npar = [npar[k] for k in order]
    ll = np.array([m.loglik for m in models])
    chisq = np.r_[np.nan, 2 * np.maximum(0.0, np.diff(ll))]
    dfs = np.r_[np.nan, np.diff(npar)].astype(float)
    with np.errstate(invalid="ignore"):
        p = np.where(dfs > 0, scipy.stats.chi2.sf(chisq, np.where(dfs > 0, dfs, 1)), np.nan)
    boundary = np.full(len(models), np.nan)
    for k in range(1, len(models)):
        a, b = models[k - 1], models[k]
        if _fixed_signature(a) == _fixed_signature(b) and dfs[k] >= 1:
            lower = scipy.stats.chi2.sf(chisq[k], dfs[k] - 1) if dfs[k] > 1 else float(chisq[k] <= 0)
            boundary[k] = 0.5 * lower + 0.5 * p[k]
    table = pd.DataFrame({"npar": npar, "AIC": [m.aic for m in models], "BIC": [m.bic for m in models],
                          "logLik": ll, "deviance": -2 * ll, "Chisq": chisq, "Df": dfs, "Pr(>Chisq)": p,
                          "Pr(>Chisq) boundary": boundary}, index=names)
    if np.isfinite(boundary).any():
        notes.append("Pr(>Chisq) boundary: a variance tested at 0 sits on the boundary, so the LRT's null "
                     "distribution is 1/2 chi2_(Df-1) + 1/2 chi2_Df (1/2 chi2_0 + 1/2 chi2_1 for one variance): "
                     "half of chi2_Df's p, plus half of chi2_(Df-1)'s.")
    table.attrs["heading"] = ["Models:"] + [f"{nm}: {m.design.formula}" for nm, m in zip(names, models)]
    table.attrs["notes"] = notes
    table.attrs["fits"] = models
    return table


def anova_text(table: pd.DataFrame, width: int = 96) -> str:
    """The table as lme4 prints it, with its heading and notes."""
    import textwrap
    body = table.to_string(float_format=lambda v: f"{v:.6g}", na_rep="")
    notes = [textwrap.fill(note, width, subsequent_indent="  ") for note in table.attrs.get("notes", [])]
    return "\n".join(notes + table.attrs.get("heading", []) + [body])


# ============================================================================================== update
def _terms_of_sum(node: Node, sign: int, out: list) -> None:
    """The top-level terms of a formula's right-hand side with their signs (+1, -1)."""
    if node.kind == "binary" and node.value in ("+", "-"):
        _terms_of_sum(node.args[0], sign, out)
        _terms_of_sum(node.args[1], sign if node.value == "+" else -sign, out)
    elif node.kind == "unary" and node.value in ("+", "-"):
        _terms_of_sum(node.args[0], sign if node.value == "+" else -sign, out)
    elif node.kind == "paren" and not _is_bar(node) and node.args[0].kind in ("binary", "unary", "paren") \
            and (node.args[0].value in ("+", "-") or node.args[0].kind == "paren"):
        _terms_of_sum(node.args[0], sign, out)
    else:
        out.append((sign, node))


def _is_bar(node: Node) -> bool:
    return node.kind == "paren" and node.args[0].kind == "binary" and node.args[0].value in ("|", "||")


def _substitute(node: Node, old: Node) -> Node:
    """R's update.formula: '.' stands for the old side."""
    if node.kind == "name" and node.value == ".":
        return Node("paren", args=(old,)) if old.kind == "binary" else old
    if node.kind in ("binary", "unary", "paren", "call"):
        return Node(node.kind, node.value, tuple(_substitute(a, old) for a in node.args),
                    tuple((k, _substitute(v, old)) for k, v in node.kwargs))
    return node


def update_formula(old: str, new: str) -> str:
    """R's update(old, new): '.' on each side of ``new`` is the old side, then the terms are simplified as
    terms.formula(simplify = TRUE) does ('- x' removes a term, '- 1' the intercept); random terms
    ``(expr|g)`` are terms like any other. Built on the formula parser, no text surgery."""
    old_tree = parse(old, formula=True)
    text = new.strip()
    if text.startswith("~"):
        text = ". " + text
    new_tree = parse(text, formula=True)
    lhs = _substitute(new_tree.args[0], old_tree.args[0])
    rhs = _substitute(new_tree.args[1], old_tree.args[1])
    items: list = []
    _terms_of_sum(rhs, 1, items)
    fixed_nodes, bars, drop_bars = [], [], set()
    for sign, node in items:
        if _is_bar(node):
            key = deparse(node).replace(" ", "")
            if sign > 0:
                bars.append(node)
            else:
                drop_bars.add(key)
        else:
            fixed_nodes.append(node if sign > 0 else Node("unary", "-", (node,)))
    bars = [b for b in bars if deparse(b).replace(" ", "") not in drop_bars]
    bars = list({deparse(b).replace(" ", ""): b for b in bars}.values())
    expr = None
    for node in fixed_nodes:
        if expr is None:
            expr = node if not (node.kind == "unary" and node.value == "-") else Node(
                "binary", "-", (Node("num", 1.0), node.args[0]))
        elif node.kind == "unary" and node.value == "-":
            expr = Node("binary", "-", (expr, node.args[0]))
        else:
            expr = Node("binary", "+", (expr, node))
    terms = expand_terms(expr if expr is not None else Node("num", 1.0), new)
    parts = list(terms.labels) + [f"offset({deparse(o)})" for o in terms.offsets]
    if not terms.intercept:
        parts = ["0"] + parts
    parts += [deparse(b) for b in bars]
    return f"{deparse(lhs)} ~ {' + '.join(parts) if parts else '1'}"


def update(fit, formula: str | None = None, data=None, method: str | None = None):
    """lme4's update(fit, formula, ...): the model with the formula updated (R's '.' rules), refitted to
    the same data (or ``data``) by the same method (or ``method``)."""
    from . import fit as fit_formula
    new = fit.design.formula if formula is None else update_formula(fit.design.formula, formula)
    return fit_formula(new, fit.design.frame if data is None else data, method=method or fit.method)


# =================================================================================== result accessors
def coef_table(fit) -> pd.DataFrame:
    """lmerTest's coefficient table: Estimate, Std. Error, df (Satterthwaite), t value, Pr(>|t|)."""
    return pd.DataFrame({"Estimate": fit.params, "Std. Error": fit.bse, "df": fit.df_satterthwaite,
                         "t value": fit.tvalues, "Pr(>|t|)": fit.pvalues_satterthwaite})


def ranef(fit) -> dict[str, pd.DataFrame]:
    """lme4's ranef(fit, condVar = TRUE): per grouping factor, the conditional modes of each level and
    their conditional SDs (columns 'cond_sd ...')."""
    re = fit.random_effects
    if isinstance(re, dict):
        return dict(re)
    name = fit.design.terms[0].group if fit.design.terms else "kinship"
    frame = re.copy()
    if "cond_sd" in frame.columns and fit.design.terms:
        frame = frame.rename(columns={"cond_sd": f"cond_sd {fit.design.terms[0].names[0]}"})
    return {name: frame}


def varcorr(fit) -> pd.DataFrame:
    """lme4's as.data.frame(VarCorr(fit)): grp, var1, var2, vcov (a variance or covariance), sdcor (an SD
    or a correlation)."""
    vc, corr = fit.variance_components, fit.correlations
    rows = []
    sd_of = {(r["group"], r["term"]): r["sd"] for _, r in vc.iterrows()}
    for g in dict.fromkeys(vc["group"]):
        sub = vc[vc["group"] == g]
        for _, r in sub.iterrows():
            rows.append({"grp": g, "var1": r["term"] or None, "var2": None, "vcov": float(r["variance"]),
                         "sdcor": float(r["sd"])})
        for _, r in corr[corr["group"] == g].iterrows():
            s1, s2 = sd_of[(g, r["term1"])], sd_of[(g, r["term2"])]
            rows.append({"grp": g, "var1": r["term1"], "var2": r["term2"], "vcov": float(r["corr"] * s1 * s2),
                         "sdcor": float(r["corr"])})
    out = pd.DataFrame(rows, columns=["grp", "var1", "var2", "vcov", "sdcor"])
    resid = out["grp"] == "Residual"
    return pd.concat([out[~resid], out[resid]], ignore_index=True)


def _tex_name(name: str) -> str:
    """A column or level name inside mathtext/LaTeX: upright, with LaTeX's special characters escaped."""
    special = {"\\": "", "_": r"\_", "^": r"\hat{}", "%": r"\%", "#": r"\#", "&": r"\&", "$": r"\$",
               "{": "", "}": "", "~": ""}
    return r"\mathrm{" + "".join(special.get(ch, ch) for ch in str(name)) + "}"


def latex_equation(fit) -> str:
    r"""The fitted model as a textbook writes it: :math:`y_i = b_0 + b_1 x_i + \dots` + (the random effects
    of the row's group) + :math:`e_i`, with the estimated SDs."""
    def num(v):
        return f"{v:.4g}"
    design = fit.design
    parts = []
    for k, (name, b) in enumerate(fit.params.items()):
        term = num(abs(b)) if name in ("(Intercept)", "Intercept") else rf"{num(abs(b))}\,{_tex_name(name)}_i"
        sign = "-" if b < 0 else ("+" if k else "")
        parts.append(f"{sign} {term}".strip())
    random = []
    for k, t in enumerate(design.terms):
        sup = f"^{{({k + 1})}}" if len(design.terms) > 1 else ""
        for c, name in enumerate(t.names):
            u = rf"u{sup}_{{{c if t.q > 1 else ''}j[i]}}"
            random.append(u if name == "(Intercept)" else rf"{u}\,{_tex_name(name)}_i")
    if design.kinship is not None:
        random = ["g_i"]
    sds = ", ".join(rf"\sigma_{{{_tex_name(r['group'] + (':' + r['term'] if r['term'] else ''))}}} = {num(r['sd'])}"
                    for _, r in fit.variance_components.iterrows() if r["group"] != "Residual")
    eq = f"{_tex_name(design.response)}_i = " + " ".join(parts) + "".join(f" + {u}" for u in random) \
        + r" + \varepsilon_i"
    return (r"$$\begin{aligned}" + eq + r"\\ \varepsilon_i \sim N(0, \sigma^2),\ \sigma = " + num(fit.sigma)
            + (r",\ " + sds if sds else "") + r"\end{aligned}$$")


def to_dict_extra(fit) -> dict:
    """What the after-the-fit API adds to ``to_dict()``: coef_table, fixef, ranef (with conditional SDs),
    VarCorr and the parameters as lme4's confint names them."""
    def records(frame):
        return [{k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in r.items()}
                for r in frame.reset_index().to_dict(orient="records")]
    ct = coef_table(fit)
    return {"coef_table": records(ct.rename_axis("name")),
            "fixef": {k: float(v) for k, v in fit.params.items()},
            "ranef": {g: records(f.rename_axis("level")) for g, f in ranef(fit).items()},
            "varcorr": records(varcorr(fit).set_index("grp")),
            "parameters": {k: float(v) for k, v in parameters(fit).items()}}
