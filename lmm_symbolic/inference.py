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
import scipy.stats

from .errors import DataError, FormulaError, ModelError
from .formula import (Evaluated, Factor, Frame, Node, Numeric, _factor_of_values, deparse, evaluate_terms,
                      expand_terms, missing_rows, model_matrix, parse, split_formula, take_rows)
from .progress import REPORT_AFTER, logger, stage
from .specification import Design, _group_values, _random_parts, read_data, whitened

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


def _blocks(design: Design) -> list[tuple[int, str, tuple[str, ...]]]:
    """(q, grouping factor, column names) of each random term in formula order; a kinship model's one
    genetic effect as (1, 'kinship', ('K',))."""
    if design.kinship is not None:
        return [(1, "kinship", ("K",))]
    return [(t.q, t.group, tuple(t.names)) for t in design.terms]


def _theta_blocks(design: Design, theta) -> list[np.ndarray]:
    """lme4's theta as each term's relative Cholesky factor T_k (lower triangle, column by column)."""
    theta = np.asarray(theta, dtype=float)
    out, k = [], 0
    for q, _, _ in _blocks(design):
        T = np.zeros((q, q))
        rows, cols = _tril_index(q)
        m = len(rows)
        T[rows, cols] = theta[k:k + m]
        out.append(T)
        k += m
    return out


def _tril_index(q: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of a q x q lower triangle, column by column (lme4's order of theta)."""
    rows, cols = np.tril_indices(q)
    order = np.lexsort((rows, cols))
    return rows[order], cols[order]


def _tril_colwise(M: np.ndarray) -> np.ndarray:
    rows, cols = _tril_index(M.shape[0])
    return M[rows, cols]


def _ranef_blocks(fit) -> list[np.ndarray]:
    """Each term's conditional modes b_k (levels x q_k), in the term's level order."""
    out = []
    for t in fit.design.terms:
        frame = fit.random_effects[t.group] if isinstance(fit.random_effects, dict) else fit.random_effects
        out.append(frame.loc[list(t.levels), list(t.names)].to_numpy(dtype=float))
    return out


def _varpar_order(design: Design) -> list[int]:
    """lme4's order of the SDs and correlations: entry k of lme4's vector (.sig0k) is entry order[k] of the
    formula-order one. lme4 sorts the random terms by their number of levels, decreasing
    (:func:`~lmm_symbolic.results.lme4_theta_order`); within a term the order is theta's."""
    from .results import lme4_theta_order
    m = sum(q * (q + 1) // 2 for q, _, _ in _blocks(design))
    return lme4_theta_order(design, m)[0]


def _formula_order_labels(design: Design) -> list[str]:
    out = []
    for q, group, names in _blocks(design):
        for r, c in zip(*_tril_index(q)):
            out.append(f"sd_{names[r]}|{group}" if r == c else f"cor_{names[r]}.{names[c]}|{group}")
    return out


def varpar_names(design: Design) -> list[str]:
    """lme4's names of the variance parameters on the SD/correlation scale, in lme4's order: ``.sig01``,
    ``.sig02``, ... (the terms sorted by number of levels, decreasing, as lme4 sorts them; within a term its
    lower triangle column by column: an SD on the diagonal, a correlation below it), then ``.sigma``."""
    m = sum(q * (q + 1) // 2 for q, _, _ in _blocks(design))
    return [f".sig{k:02d}" for k in range(1, m + 1)] + [".sigma"]


def varpar_labels(design: Design) -> list[str]:
    """What each ``.sigNN`` is, in words, in lme4's order: ``sd_(Intercept)|Subject``,
    ``cor_Days.(Intercept)|Subject``, ..., ``sigma``."""
    labels = _formula_order_labels(design)
    return [labels[k] for k in _varpar_order(design)] + ["sigma"]


def sdcor_of_theta(design: Design, theta, sigma: float) -> np.ndarray:
    r"""(SDs and correlations of each term, :math:`\sigma`) from :math:`\theta` and :math:`\sigma`, both in
    formula order: :math:`D_k = \sigma^2 T_k T_k^\top`."""
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


def _lme4_sdcor(design: Design, theta, sigma: float) -> np.ndarray:
    r"""(SDs and correlations, :math:`\sigma`) in lme4's order, :math:`\theta` in formula order."""
    par = sdcor_of_theta(design, theta, sigma)
    return np.concatenate([par[_varpar_order(design)], par[-1:]])


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
    r"""Every parameter as lme4's confint names it: ``.sig01``, ... (SDs and correlations), ``.sigma``, then
    :math:`\beta`."""
    var = pd.Series(_lme4_sdcor(fit.design, fit.opt.theta, fit.sigma), index=varpar_names(fit.design))
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
    """The ML deviance as lme4's profile sees it (lme4 refits a REML fit by ML first): the ML criterion of
    the fit's own Design (:func:`~lmm_symbolic.compilation.profiled_deviance` of the whitened design, built
    once; nothing is specified again), a REML fit's ML optimum by :func:`~lmm_symbolic.optimisation.optimise`.
    A kinship model is the same criterion with one "term" (theta = sigma_s / sigma, Sigma = sigma_s^2 K +
    sigma^2 I), so it is profiled alike: .sig01 = sigma_s, .sigma, beta.

    Variance parameters psi = (SDs and correlations of each term, sigma), with D_k = sigma^2 T_k T_k^T:
        D(theta, sigma) = log|M(theta)| + RSS(theta) / sigma^2 + n log(2 pi sigma^2),
    beta at its GLS value, minimised over everything but the parameter held fixed, in theta itself (of a
    criterion whose term has the parameter's variables first, :meth:`_setup`): no correlation matrix can
    leave the positive semi-definite ones, and the gradient is the criterion's analytic one. A fixed effect
    held at beta_j = b: minimising the quadratic RSS(theta) + (beta - beta_hat)^T A (beta - beta_hat)
    (A = X^T V^-1 X) over the other betas adds (b - beta_hat_j)^2 / (A^-1)_jj, then sigma^2 = RSS_b / n:
        D_b(theta) = log|M| + n (1 + log(2 pi RSS_b(theta) / n)),  minimised over theta.
    zeta(psi) = sign(psi - psi_hat) sqrt(D_min(psi) - D_hat). Internally everything is in the criterion's
    scaled response units (SDs, sigma and beta divided by ``objective.scale``; beta also shifted)."""

    def __init__(self, fit):
        from .compilation import profiled_deviance
        from .optimisation import optimise
        self.fit = fit
        self.design = fit.design
        ob = self.ob = profiled_deviance(whitened(fit.design), reml=False)
        self.theta_hat = (np.asarray(fit.opt.theta, dtype=float) if fit.method == "ML"
                          else np.asarray(optimise(ob).theta, dtype=float))
        self.k = float(ob.scale)
        self.shift = np.asarray(ob.beta_shift, dtype=float)
        self.qs = [lay.q for lay in ob.layouts]
        self.n = ob.n
        st = ob.state(self.theta_hat)
        self.base = float(ob.value(st))
        sig = float(np.sqrt(st.rss / self.n))
        self.psi_hat = sdcor_of_theta(self.design, self.theta_hat, sig)
        self.se_w = np.sqrt(sig**2 * np.diag(np.linalg.inv(st.A))) if ob.p else np.zeros(0)
        self.beta_hat = np.asarray(st.beta, dtype=float)
        self.m = len(self.psi_hat) - 1
        order = _varpar_order(self.design)
        self.var_index = {f".sig{pos + 1:02d}": k for pos, k in enumerate(order)}
        self.var_index[".sigma"] = self.m
        self.kinds = []
        for q in self.qs:
            self.kinds += ["sd" if r == c else "cor" for r, c in zip(*_tril_index(q))]
        self.kinds.append("sigma")
        self.fixed = list(self.design.fixed_names)
        self.points: dict[str, list[tuple[float, float]]] = {}      # (value_w, zeta) evaluated, per parameter
        self.starts: dict[str, list[tuple[float, np.ndarray]]] = {}  # (value_w, inner optimum) for warm starts
        self.evaluations = 0
        self._criteria: dict = {}
        self._setups: dict = {}
        for name in self.var_index:                     # lme4's basecheck in profile()
            check = self.var_deviance(name, self.estimate_w(name), self._setup(name)["x_hat"])[0]
            if not abs(check - self.base) <= 1e-8 * max(1.0, abs(self.base)):
                raise ModelError(f"profiling {name} gives deviance {check:.10g} at the optimum, the profiled "
                                 f"deviance {self.base:.10g}: not numerically consistent")

    # ------------------------------------------------------------------ the parametrisation
    def _where(self, w: int) -> tuple[int, int, int]:
        """Variance parameter w (formula order) as (term, row, column) of that term's covariance."""
        k = 0
        for term, q in enumerate(self.qs):
            rows, cols = _tril_index(q)
            if w < k + len(rows):
                return term, int(rows[w - k]), int(cols[w - k])
            k += len(rows)
        raise IndexError(w)

    def _criterion(self, term: int, perm: tuple[int, ...]):
        """The ML criterion with term ``term``'s columns in the order ``perm`` (the same model: Sigma_k
        permuted), its design made by dataclasses.replace of the term's Z and names (nothing specified
        again); the fit's own criterion for the identity."""
        if perm == tuple(range(len(perm))):
            return self.ob
        key = (term, perm)
        if key not in self._criteria:
            from .compilation import profiled_deviance
            W = whitened(self.design)
            terms = list(W.terms)
            t = terms[term]
            terms[term] = dataclasses.replace(t, Z=np.ascontiguousarray(t.Z[:, list(perm)]),
                                              names=tuple(t.names[i] for i in perm))
            self._criteria[key] = profiled_deviance(dataclasses.replace(W, terms=tuple(terms)), reml=False)
        return self._criteria[key]

    def _setup(self, name: str) -> dict:
        """How ``name`` is held fixed, in theta of a criterion whose term has the parameter's variables
        first (T' = chol(P Sigma_k P^T) / sigma): an SD of variable r is sigma T'_00 (r first); a correlation
        of r and c is T'_10 / |T'_1.| (c first, r second), so T'_10 = a rho, T'_11 = a sqrt(1 - rho^2) with
        a >= 0 free; sigma is sigma. Every other theta entry is free (diagonal >= 0), and sigma unless held:
        no correlation matrix can leave the positive semi-definite ones, and its bound (an SD of 0, a
        correlation of +-1) is an ordinary point."""
        if name in self._setups:
            return self._setups[name]
        w, kind = self.var_index[name], self.kind(name)
        term, r, c = self._where(w) if kind != "sigma" else (0, 0, 0)
        q = self.qs[term]
        first = [r] if kind == "sd" else [c, r] if kind == "cor" else []
        perm = tuple(first + [i for i in range(q) if i not in first])
        ob = self._criterion(term, perm)
        offset = sum(qq * (qq + 1) // 2 for qq in self.qs[:term])
        rows, cols = _tril_index(q)
        pos = {(int(i), int(j)): offset + n for n, (i, j) in enumerate(zip(rows, cols))}
        held = [] if kind == "sigma" else [pos[0, 0]] if kind == "sd" else [pos[1, 0], pos[1, 1]]
        free_theta = [i for i in range(self.m) if i not in held]
        # the estimate in this parametrisation
        T = _theta_blocks(self.design, self.theta_hat)[term] if self.m else np.zeros((0, 0))
        thetas = [_tril_colwise(B) for B in _theta_blocks(self.design, self.theta_hat)]
        if kind != "sigma" and perm != tuple(range(q)):
            S = (T @ T.T)[np.ix_(perm, perm)]
            try:
                Tp = np.linalg.cholesky(S)
            except np.linalg.LinAlgError:
                Tp = np.linalg.cholesky(S + 1e-12 * max(np.trace(S), 1e-300) * np.eye(q))
            thetas[term] = _tril_colwise(Tp)
        theta0 = np.concatenate(thetas) if thetas else np.zeros(0)
        lower = [lo if lo is not None else None for lo in ob.lower_bounds]
        bounds = [(lower[i], None) for i in free_theta]
        x0 = list(theta0[free_theta])
        if kind == "cor":
            x0.append(float(np.hypot(theta0[pos[1, 0]], theta0[pos[1, 1]])))
            bounds.append((0.0, None))
        if kind != "sigma":
            x0.append(self.psi_hat[-1])
            bounds.append((1e-8 * self.psi_hat[-1], None))
        setup = dict(ob=ob, kind=kind, held=held, free=free_theta, bounds=bounds, x_hat=np.array(x0))
        self._setups[name] = setup
        return setup

    def var_deviance(self, name: str, v: float, x) -> tuple[float, np.ndarray]:
        """D (scaled units) with ``name`` held at v, the others x (:meth:`_setup`), and its gradient:
        D = log|M(theta)| + RSS(theta) / sigma^2 + n log(2 pi sigma^2) (beta at its GLS value), dD/dtheta =
        d log|M| + dRSS / sigma^2 (the criterion's analytic derivatives), dD/dsigma = 2 n / sigma -
        2 RSS / sigma^3 (+ dD/dtheta'_00 dtheta'_00/dsigma = -v / sigma^2 for an SD held at v)."""
        from .errors import NumericalError
        su = self._setup(name)
        kind, free, held, ob = su["kind"], su["free"], su["held"], su["ob"]
        x = np.asarray(x, dtype=float)
        self.evaluations += 1
        theta = np.empty(self.m)
        theta[free] = x[:len(free)]
        s = v if kind == "sigma" else x[-1]
        if kind == "sd":
            theta[held[0]] = v / s
        elif kind == "cor":
            a = x[len(free)]
            theta[held[0]], theta[held[1]] = a * v, a * np.sqrt(max(1 - v * v, 0.0))
        try:
            st = ob.state(theta)
            dlogdet, drss, _ = ob.cached_derivatives(st)
        except (NumericalError, np.linalg.LinAlgError):
            return self.base + 1e10, np.zeros_like(x)
        D = st.logdetM + st.rss / s**2 + self.n * np.log(2 * np.pi * s**2)
        gt = np.asarray(dlogdet, dtype=float) + np.asarray(drss, dtype=float) / s**2
        g = list(gt[free])
        if kind == "cor":
            g.append(gt[held[0]] * v + gt[held[1]] * np.sqrt(max(1 - v * v, 0.0)))
        if kind != "sigma":
            gs = 2 * self.n / s - 2 * st.rss / s**3
            if kind == "sd":
                gs += gt[held[0]] * (-v / s**2)
            g.append(gs)
        return float(D), np.array(g)

    def beta_deviance(self, j: int, b: float, theta) -> float:
        """D_b(theta) (scaled units): log|M| + n (1 + log(2 pi RSS_b / n))."""
        from .errors import NumericalError
        self.evaluations += 1
        try:
            st = self.ob.state(np.asarray(theta, dtype=float))
            ainv = np.linalg.inv(st.A)[j, j]
        except (NumericalError, np.linalg.LinAlgError):
            return self.base + 1e10
        rss = st.rss + (b - st.beta[j]) ** 2 / ainv
        return float(st.logdetM + self.n * (1 + np.log(2 * np.pi * rss / self.n)))

    # ------------------------------------------------------------------ one parameter held fixed
    def kind(self, name: str) -> str:
        if name in self.var_index:
            return self.kinds[self.var_index[name]]
        if name in self.fixed:
            return "beta"
        raise ModelError(f"no parameter {name!r}; the parameters are {', '.join(self.all_names())}")

    def to_w(self, name: str, value: float) -> float:
        kind = self.kind(name)
        if kind == "cor":
            return float(value)
        if kind == "beta":
            j = self.fixed.index(name)
            return (float(value) - self.shift[j]) / self.k
        return float(value) / self.k

    def from_w(self, name: str, value: float) -> float:
        kind = self.kind(name)
        if kind == "cor":
            return float(value)
        if kind == "beta":
            return float(value) * self.k + self.shift[self.fixed.index(name)]
        return float(value) * self.k

    def estimate_w(self, name: str) -> float:
        if name in self.var_index:
            return float(self.psi_hat[self.var_index[name]])
        return float(self.beta_hat[self.fixed.index(name)])

    def estimate(self, name: str) -> float:
        return self.from_w(name, self.estimate_w(name))

    def _warm_start(self, name: str, v: float, x_hat: np.ndarray) -> np.ndarray:
        """The inner optimum at v extrapolated linearly from the two nearest ones on v's side of the
        estimate (the estimate's own among them)."""
        est = self.estimate_w(name)
        known = [(est, x_hat)] + [(u, x) for u, x in self.starts.get(name, []) if (u - est) * (v - est) > 0]
        known.sort(key=lambda ux: abs(ux[0] - v))
        if len(known) == 1 or known[0][0] == known[1][0]:
            return known[0][1].copy()
        (u1, x1), (u2, x2) = known[0], known[1]
        return x1 + (v - u1) * (x2 - x1) / (u2 - u1)

    def deviance_at(self, name: str, v: float) -> float:
        """D minimised over every other parameter with ``name`` held at v (scaled units)."""
        if name in self.var_index:
            su = self._setup(name)
            x0 = self._warm_start(name, v, su["x_hat"])
            x0 = np.array([min(max(x, -np.inf if lo is None else lo), np.inf if hi is None else hi)
                           for x, (lo, hi) in zip(x0, su["bounds"])])
            res = scipy.optimize.minimize(lambda x: self.var_deviance(name, v, x), x0, jac=True,
                                          method="L-BFGS-B", bounds=su["bounds"],
                                          options={"ftol": 1e-12, "gtol": 1e-6, "maxiter": 500, "maxls": 40})
        else:
            j = self.fixed.index(name)
            lower = [(lo, None) if lo is not None else (None, None) for lo in self.ob.lower_bounds]
            x0 = self._warm_start(name, v, self.theta_hat)
            x0 = np.array([max(x, a) if a is not None else x for x, (a, _) in zip(x0, lower)])
            res = scipy.optimize.minimize(lambda th: self.beta_deviance(j, v, th), x0, method="L-BFGS-B",
                                          bounds=lower, options={"ftol": 1e-11, "gtol": 1e-5, "maxiter": 500,
                                                                 "maxls": 40})
        self.starts.setdefault(name, []).append((v, np.asarray(res.x, dtype=float)))
        return float(res.fun)

    def zeta_w(self, name: str, v: float) -> float:
        est = self.estimate_w(name)
        if v == est:
            return 0.0
        dev = self.deviance_at(name, v)
        z = float(np.sign(v - est) * np.sqrt(max(dev - self.base, 0.0)))
        self.points.setdefault(name, []).append((v, z))
        return z

    def zeta(self, name: str, value: float) -> float:
        """sign(value - estimate) sqrt(D_min(value) - D_hat): the signed root of the deviance increase when
        the parameter is held at ``value`` and every other one is re-estimated."""
        return self.zeta_w(name, self.to_w(name, value))

    # ------------------------------------------------------------------ the roots of zeta = +-z
    def _first_step(self, name: str, z: float) -> float:
        """A first step from the estimate towards |zeta| = z on the scale the search uses: z se for beta
        (the ML Wald limit), z / sqrt(2 n) for log sigma, z / sqrt(2 G) for log sd (G levels), z / sqrt(G)
        for a correlation's Fisher z = atanh(rho)."""
        kind = self.kind(name)
        if kind == "beta":
            return z * float(self.se_w[self.fixed.index(name)])
        if kind == "sigma":
            return z / np.sqrt(2 * self.n)
        w = self.var_index[name]
        k, G = 0, self.n
        for q, lay in zip(self.qs, self.ob.layouts):
            mk = q * (q + 1) // 2
            if k <= w < k + mk:
                G = lay.n_levels
            k += mk
        return z / np.sqrt(2 * max(G, 1)) if kind == "sd" else z / np.sqrt(max(G, 1))

    def limits_w(self, name: str, z: float) -> tuple[float, float]:
        """The values (scaled units) where zeta = -z and +z, the roots themselves (lme4 reads them off a
        spline through its profile's points): from the estimate, on the scale where zeta is nearly straight
        (log for an SD and sigma, Fisher's z = atanh for a correlation), a first step (:meth:`_first_step`),
        then inverse interpolation (:meth:`_root`); each inner fit starts from its neighbours' optima, so a
        limit costs some five inner fits. Where the profile stays inside |zeta| < z up to a bound, the limit
        is the bound, as lme4 gives it: 0 for an SD, -1 or 1 for a correlation."""
        est, kind = self.estimate_w(name), self.kind(name)
        logscale = kind == "sigma" or (kind == "sd" and est > 1e-8 * self.psi_hat[-1])
        fisher = kind == "cor" and abs(est) < 1 - 1e-12
        to_u = np.log if logscale else np.arctanh if fisher else (lambda v: v)
        of_u = np.exp if logscale else np.tanh if fisher else (lambda u: u)
        h = self._first_step(name, z) if (logscale or kind != "sd") else 0.3 * self.psi_hat[-1]
        out = []
        for side in (-1, 1):
            target = side * z
            memo: dict[float, float] = {}

            def fv(v):
                if v not in memo:
                    memo[v] = self.zeta_w(name, v) - target
                return memo[v]
            edge = {("sd", -1): 0.0, ("cor", -1): -1.0, ("cor", 1): 1.0}.get((kind, side))
            if edge is not None and abs(edge - est) < 1e-12:
                out.append(float(round(edge)))          # the estimate is on the bound
                continue
            root, at_edge = self._root(fv, to_u, of_u, to_u(est), side, h, edge,
                                       1.0 if logscale or fisher else max(abs(est), h),
                                       edge_at_infinity=logscale or fisher)
            if at_edge:                                 # |zeta| < z all the way to the bound
                root = round(edge)
            out.append(float(root))
        return out[0], out[1]

    @staticmethod
    def _root(fv, to_u, of_u, u0: float, side: int, h: float, edge, scale: float,
              edge_at_infinity: bool = False) -> tuple[float, bool]:
        """The root of the increasing f(v(u)) beyond u0 on ``side`` (f(v(u0)) = -side z): inverse
        interpolation through the (up to) three evaluated points nearest the root -- a secant step from
        two --, kept inside the bracket once there is one (bisection when it would leave it) and moving at
        least a little past the last point while there is none; stops when |f| < 1e-9 or the step is
        below 1e-10 of the parameter's scale. A bound ``edge`` (an SD's 0, a correlation's +-1) caps the search:
        (edge, True) when f has not reached 0 there."""
        f0 = fv(of_u(u0))
        pts = [(u0, f0)]
        u = u0 + side * h
        edge_u = None if edge is None or edge_at_infinity else to_u(edge)
        edge_checked = False
        for _ in range(200):
            clipped = edge_u is not None and side * (u - edge_u) >= 0
            if clipped:
                u = edge_u
            if (edge is not None and edge_u is None and not edge_checked
                    and abs(of_u(u) - edge) < 1e-3 * abs(of_u(u0) - edge)):
                edge_checked = True       # the bound at u = -+inf (log sd, Fisher's z) is near: is it reached?
                if side * fv(edge) < 0:
                    return edge, True
            fu = fv(of_u(u))
            pts.append((u, fu))
            if clipped and side * fu < 0:
                return edge, True
            if abs(fu) < 1e-9:
                return float(of_u(u)), False
            short = [p for p in pts if p[1] < 0] if side > 0 else [p for p in pts if p[1] > 0]
            past = [p for p in pts if p not in short]
            a = max(short, key=lambda p: side * p[0])                      # the nearest point short of it
            b = min(past, key=lambda p: side * p[0]) if past else None      # the nearest point past it
            near = sorted(pts, key=lambda p: abs(p[1]))[:3]
            fs, us = np.array([p[1] for p in near]), np.array([p[0] for p in near])
            if len(set(fs)) < len(fs):
                fs, us = fs[:2], us[:2]
            new = float(sum(us[i] * np.prod([(0 - fs[j]) / (fs[i] - fs[j]) for j in range(len(fs)) if j != i])
                            for i in range(len(fs))))
            if b is not None:
                lo, hi = sorted((a[0], b[0]))
                if not (lo < new < hi) or not np.isfinite(new):
                    new = 0.5 * (lo + hi)
                if hi - lo < 1e-10 * scale:
                    return float(of_u(new)), False
            else:
                step = abs(a[0] - u0)
                if not np.isfinite(new) or side * (new - a[0]) <= 0:
                    new = a[0] + side * 2 * max(step, h)
                new = a[0] + side * min(max(abs(new - a[0]) * 1.02, 1e-6 * scale), 4 * step + h)
            if abs(new - u) < 1e-10 * scale:
                return float(of_u(new)), False
            u = new
        raise ModelError(f"the profile never reaches |zeta| = {abs(f0):.3g}")

    def limits(self, name: str, z: float) -> tuple[float, float]:
        lo, hi = self.limits_w(name, z)
        return self.from_w(name, lo), self.from_w(name, hi)

    def all_names(self) -> list[str]:
        return varpar_names(self.design) + self.fixed

    def curve(self, name: str) -> list[tuple[float, float]]:
        """The (value, zeta) points evaluated so far, the estimate's (estimate, 0) among them."""
        pts = dict(self.points.get(name, []))
        pts[self.estimate_w(name)] = 0.0
        values = sorted(pts)
        gap = 1e-6 * (values[-1] - values[0])
        kept = [v for k, v in enumerate(values) if k == 0 or v - values[k - 1] > gap or pts[v] == 0.0]
        return [(self.from_w(name, v), pts[v]) for v in kept]    # the root search's near-repeats dropped


def _one_blas_thread():
    from .results import _threadpools
    return _threadpools().limit(limits=1, user_api="blas")


def profile(fit, which=None, points: int = 13, level: float = 0.99) -> pd.DataFrame:
    r"""lme4's profile(fit): :math:`\zeta(\psi)` of each parameter between its limits at ``level`` (lme4's
    alphamax = 0.01); columns ``.par``, ``value``, ``.zeta`` (the data of a profile-zeta plot). The points are
    those the root search evaluated, filled in to about ``points`` per parameter, evenly spread in
    :math:`\zeta`."""
    z = scipy.stats.norm.ppf(1 - (1 - level) / 2)
    rows = []
    with _one_blas_thread(), stage("profiling the deviance for %d parameters",
                                   len(which or parameters(fit).index)):
        pr = _Profiler(fit)
        for name in (which or pr.all_names()):
            lo, hi = pr.limits_w(name, z)
            est = pr.estimate_w(name)
            for side, end in ((-1, lo), (1, hi)):
                wanted = np.linspace(0, side * z, max(points // 2, 1) + 1)[1:-1]
                for target in wanted:
                    have = sorted((v, zz) for v, zz in pr.points.get(name, []) if (v - est) * side > 0)
                    if min((abs(zz - target) for _, zz in have), default=np.inf) < z / points:
                        continue
                    vs = np.array([est] + [v for v, _ in have])
                    zs = np.array([0.0] + [zz for _, zz in have])
                    order = np.argsort(zs)
                    v = float(np.interp(target, zs[order], vs[order]))
                    if v != est and (v - end) * side < 0:
                        pr.zeta_w(name, v)
            rows += [{".par": name, "value": v, ".zeta": zz} for v, zz in pr.curve(name)]
    return pd.DataFrame(rows)


def conf_int(fit, alpha: float = 0.05, method: str = "profile", nsim: int = 500, seed=None,
             which=None) -> pd.DataFrame:
    """Intervals for every parameter (lme4's confint): 'profile' (lme4's default: the likelihood-ratio
    interval {psi : |zeta(psi)| <= z_(1 - alpha/2)} of the ML profile, its limits the roots of zeta = +-z
    themselves where lme4 interpolates a spline through its profile's points), 'wald' (beta +- z se; NaN
    for the variance parameters, as lme4) or 'boot' (percentile intervals of a parametric bootstrap of nsim
    refits). Rows .sig01, ..., .sigma, then the fixed effects, as lme4 prints them (the .sigNN in lme4's
    order: the random terms sorted by their number of levels, decreasing)."""
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
        z = scipy.stats.norm.ppf(1 - alpha / 2)
        wanted = list(which or names)
        with _one_blas_thread(), stage("profiling the deviance for %d parameters", len(wanted)):
            pr = _Profiler(fit)
            limits = {name: pr.limits(name, z) for name in wanted}
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
