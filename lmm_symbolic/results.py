r"""Results: inference from an optimum, and the immutable fit object with lmer-style output.

Standard errors from :math:`(X^\top \Sigma^{-1} X)^{-1}` (lme4's); p values with nlme's between/within
degrees of freedom and nlme's t (for ML fits lme scales the fixed-effects covariance by :math:`n/(n-p)`,
which is why lmer's and lme's ML standard errors differ), and with Satterthwaite's degrees of freedom as
lmerTest computes them,

.. math:: \nu = \frac{2\,(L V L^\top)^2}{g^\top A g},

where :math:`A = 2 H^{-1}` is the covariance of the variance parameters :math:`(\theta, \sigma)` and
:math:`g` the gradient of :math:`L V(\theta, \sigma) L^\top`; log-likelihood, AIC and BIC as lme4; conditional modes
(BLUPs) :math:`\hat u_g = w_g \mathbf{1}^\top r_g` with conditional variance :math:`\sigma^2 w_g`.
"""
from __future__ import annotations

import dataclasses
import functools
import html
import json
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.special
import scipy.stats
import sympy as sp

from .compilation import LogLikelihood, ThetaDeviance, profiled_deviance
from .statistics import (GroupStatistics, constant_response, constant_within_groups, fitted_values,
                         spans_constant)
from .errors import LMMWarning, ModelError, NumericalError
from .optimisation import SINGULAR_TOL, ExactOptimum, Optimum, exact_optimum, optimise
from .progress import stage
from .specification import Conditioning, Design, conditioned, whitened

SINGULAR_ADVICE = ("boundary (singular) fit: the estimated random-effect variance is zero, so the groups "
                   "differ no more than the residual noise predicts; the model is over-fitted for these data "
                   "-- consider dropping the random term (see lme4's ?isSingular)")


ZERO_RESIDUAL_ADVICE = ("the residual variance is estimated as (nearly) 0: the fixed and random effects fit "
                        "the response (almost) exactly, so sigma is at the edge of its range and its standard "
                        "errors and df mean little (lme4 warns 'nearly unidentifiable' here); the model has more "
                        "parameters than these data can support")


@dataclass(frozen=True)
class FitResult:
    r"""A fitted linear mixed model; nothing in it changes after it is made.

    ``sigma_s`` is the SD of the first random term's first column (the tutorial's :math:`\sigma_s` for (1|g));
    ``variance_components`` lists every term's variances and SDs (lme4's VarCorr) and ``correlations``
    the correlations within correlated terms. ``random_effects`` holds the conditional modes (BLUPs):
    one DataFrame indexed by level when the model has one grouping factor, else a dict of them by factor.
    """

    design: Design = field(repr=False)
    method: str
    params: pd.Series
    bse: pd.Series
    tvalues: pd.Series
    df: pd.Series
    pvalues: pd.Series
    df_satterthwaite: pd.Series
    pvalues_satterthwaite: pd.Series
    vcov: pd.DataFrame = field(repr=False)
    sigma: float
    sigma_s: float
    loglik: float
    aic: float
    bic: float
    deviance: float
    converged: bool
    singular: bool
    random_effects: pd.DataFrame | dict = field(repr=False)
    variance_components: pd.DataFrame = field(repr=False)
    correlations: pd.DataFrame = field(repr=False)
    fitted: np.ndarray = field(repr=False)
    opt: object = field(repr=False)
    messages: tuple[str, ...] = ()
    #: how the exact estimates are had: ("auto" | "requested", None) derives them on first use of ``exact``
    #: (bounded as :data:`~lmm_symbolic.optimisation.EXACT_LIMITS` says; the numeric fit never waits for
    #: them), or (None, the reason there are none)
    exact_request: tuple[str | None, str | None] = (None, "not requested (exact=False)")
    _memo: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def exact(self) -> ExactOptimum | None:
        r""":math:`\sigma^2` and :math:`\sigma_s^2` that solve the score equations exactly (sympy), derived on
        first use for a balanced random-intercept design when that is cheap; None otherwise (``exact_reason`` says why)."""
        if "exact" not in self._memo:
            bound, reason = self.exact_request
            self._memo["exact"] = ((None, reason) if bound is None else
                                   exact_optimum(self.design, self.method == "REML", bound))
        return self._memo["exact"][0]

    @property
    def theta(self) -> pd.Series:
        r"""lme4's :math:`\theta`, named and ordered as ``getME(fit, "theta")`` (terms by decreasing number of
        levels; within a term the lower triangle of its relative Cholesky factor :math:`T_k`, column by
        column). ``opt.theta`` is the same vector in the formula's order of terms."""
        order, names = lme4_theta_order(self.design, len(self.opt.theta))
        return pd.Series([float(self.opt.theta[k]) for k in order], index=names, name="theta")

    @property
    def exact_reason(self) -> str | None:
        """Why ``exact`` is None (not balanced, too many digits, not requested); None when it was derived."""
        self.exact
        return self._memo["exact"][1]

    # ------------------------------------------------------------------------------ accessors
    @property
    def group(self) -> str:
        return self.design.terms[0].group if self.design.terms else "kinship"

    @property
    def n_obs(self) -> int:
        return self.design.n

    @property
    def residuals(self) -> np.ndarray:
        r"""Conditional residuals :math:`y - X\hat\beta - K\hat u`."""
        return self.design.y - self.fitted

    @property
    def groups(self) -> dict[str, int]:
        """Each grouping factor and its number of levels."""
        return {t.group: t.n_levels for t in self.design.terms}

    # -------------------------------------------------------------------------------- output
    @property
    def _between_within(self) -> bool:
        """nlme's between/within df exist (not for crossed factors or a kinship matrix)."""
        return not bool(np.isnan(self.df.to_numpy(dtype=float)).all())

    @property
    def _tvalues_nlme(self) -> pd.Series:
        r"""nlme's t: for an ML fit lme scales the fixed-effects covariance by :math:`n/(n-p)`, so its t
        is lme4's t times :math:`\sqrt{(n-p)/n}`; for REML the two agree. nlme's p values follow from this t."""
        if self.method == "REML":
            return self.tvalues
        return self.tvalues * np.sqrt((self.design.n - self.design.p) / self.design.n)

    def _fixed_table(self) -> pd.DataFrame:
        """One row per coefficient: lme4's estimate, standard error and t; then, each with the t its p
        follows from, Satterthwaite's df and p (lmerTest) and nlme's between/within df and p. The column
        level 0 names the rule the df come from; nlme's block is absent where its rule does not apply
        (crossed factors, a kinship matrix)."""
        cols = {("lme4", "Estimate"): self.params, ("lme4", "Std. Error"): self.bse,
                ("lme4", "t value"): self.tvalues,
                ("Satterthwaite (lmerTest)", "df"): self.df_satterthwaite,
                ("Satterthwaite (lmerTest)", "Pr(>|t|)"): self.pvalues_satterthwaite}
        if self._between_within:
            if self.method == "ML":
                cols[("between/within (nlme)", "t value")] = self._tvalues_nlme
            cols[("between/within (nlme)", "df")] = self.df
            cols[("between/within (nlme)", "Pr(>|t|)")] = self.pvalues
        return pd.DataFrame(cols)

    def _fixed_lines(self) -> list[str]:
        """The fixed-effects table as text: a header naming each df rule over its columns."""
        table = self._fixed_table()
        fmt = lambda v: f"{v:.6g}" if np.isfinite(v) else "Inf"  # noqa: E731
        wn = max(len(str(n)) for n in table.index) + 1
        cells = {c: [fmt(float(v)) for v in table[c]] for c in table.columns}
        width = {c: max(len(c[1]), *(len(x) for x in cells[c])) + 2 for c in table.columns}
        blocks: dict[str, list] = {}
        for c in table.columns:
            blocks.setdefault(c[0], []).append(c)
        top, sub = " " * wn, " " * wn
        for name, cs in blocks.items():
            w = sum(width[c] for c in cs)
            label = "" if name == "lme4" else name
            if len(label) > w:
                width[cs[0]] += len(label) - w
                w = len(label)
            top += (" | " + f"{label:^{w - 1}}") if name != "lme4" else f"{label:>{w}}"
            sub += (" |" if name != "lme4" else "") + "".join(f"{c[1]:>{width[c]}}" for c in cs)
        lines = [top.rstrip(), sub]
        for k, n in enumerate(table.index):
            row = f"{str(n):<{wn}}"
            for name, cs in blocks.items():
                row += (" |" if name != "lme4" else "") + "".join(f"{cells[c][k]:>{width[c]}}" for c in cs)
            lines.append(row)
        return lines

    def _df_notes(self) -> list[str]:
        """Where the df come from, in words, below the table."""
        notes = ["Estimate, Std. Error, t value: lme4's. Each Pr(>|t|) = 2 P(T_df > |t|), t and df beside it.",
                 "Satterthwaite df (lmerTest): 2 var(beta_k)^2 / var(var(beta_k))."]
        if self._between_within:
            notes.append("between/within df (nlme): G - 1 - p_between for a column constant within groups, "
                         "else n - G - p_within.")
            if self.method == "ML":
                factor = np.sqrt(self.design.n / (self.design.n - self.design.p))
                notes.append(f"nlme's ML t = lme4's t / sqrt(n/(n - p)) = t / {factor:.4g}: lme scales the "
                             "standard errors by sqrt(n/(n - p)).")
        else:
            notes.append("nlme's between/within rule has no crossed factors or kinship: Satterthwaite's only.")
        return notes

    def summary(self) -> str:
        """lmer's summary layout; fixed effects with Satterthwaite's df and p and nlme's between/within df
        and p, each p following from the t printed beside it."""
        crit = "REML criterion at convergence" if self.method == "REML" else "Deviance"
        fit_by = "REML" if self.method == "REML" else "maximum likelihood"
        lines = [f"Linear mixed model fit by {fit_by} (lmm_symbolic)", f"Formula: {self.design.formula}"]
        if self.method == "ML":
            lines += ["", f"{'AIC':>10}{'BIC':>10}{'logLik':>10}{'deviance':>10}",
                      f"{self.aic:10.1f}{self.bic:10.1f}{self.loglik:10.1f}{self.deviance:10.1f}"]
        else:
            lines += [f"{crit}: {self.deviance:.4f}"]
        vc = self.variance_components
        wg = max([10] + [len(str(g)) + 2 for g in vc["group"]])
        wt = max([13] + [len(str(t)) + 2 for t in vc["term"]])
        lines += ["", "Random effects:", f" {'Groups':<{wg}}{'Name':<{wt}}{'Variance':>12}{'Std.Dev.':>12}"]
        for _, r in vc.iterrows():
            lines.append(f" {r['group']:<{wg}}{r['term']:<{wt}}{r['variance']:12.4f}{r['sd']:12.4f}")
        for _, r in self.correlations.iterrows():
            lines.append(f" Corr({r['term1']}, {r['term2']}) in {r['group']}: {r['corr']:.3f}")
        groups = "; ".join(f"{g}, {k}" for g, k in self.groups.items())
        lines.append(f"Number of obs: {self.n_obs}" + (f", groups:  {groups}" if groups else ""))
        lines += ["", "Fixed effects:", *self._fixed_lines()]
        lines += [f"  {note}" for note in self._df_notes()]
        if self.exact is not None:
            lines += ["", "Exact estimates (score equations solved with sympy):",
                      f"  sigma^2 = {self.exact.sigma2},  sigma_s^2 = {self.exact.sigma_s2}"]
        if self.messages:
            lines += [""] + [f"note: {m}" for m in self.messages]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def _repr_html_(self) -> str:
        vc = self.variance_components.to_html(index=False, float_format=lambda v: f"{v:.4f}")
        fx = self._fixed_table().to_html(float_format=lambda v: f"{v:.6g}")
        fx += "<p style='font-size:smaller'>" + "<br>".join(html.escape(n) for n in self._df_notes()) + "</p>"
        head = (f"<b>Linear mixed model fit by {self.method}</b><br><code>{html.escape(self.design.formula)}"
                f"</code><br>logLik {self.loglik:.4f}, AIC {self.aic:.2f}, BIC {self.bic:.2f}, "
                f"n = {self.n_obs}, groups: "
                + html.escape(", ".join(f"{g} {k}" for g, k in self.groups.items())))
        extra = ""
        if self.exact is not None:
            extra += (f"<p>Exact: \\(\\sigma^2 = {sp.latex(self.exact.sigma2)}\\), "
                      f"\\(\\sigma_s^2 = {sp.latex(self.exact.sigma_s2)}\\)</p>")
        if self.singular:
            extra += f"<p><b>Singular fit.</b> {html.escape(SINGULAR_ADVICE)}</p>"
        if not self.converged:
            extra += f"<p><b>Not converged:</b> {html.escape(self.opt.message)}</p>"
        return f"<div>{head}<h4>Random effects</h4>{vc}<h4>Fixed effects</h4>{fx}{extra}</div>"

    def _core_dict(self) -> dict:
        """The JSON of ``lmm-symbolic fit --json`` (``to_dict`` adds the after-the-fit tables). Each p value names its t and df: ``p_value`` follows from
        ``t_value_nlme`` and ``df`` (nlme), ``p_value_satterthwaite`` from ``t_value`` and
        ``df_satterthwaite`` (lmerTest); ``df_rules`` says so in the JSON itself. A quantity that does not exist for the model (nlme's df
        for crossed factors, say) is null, so the text is standard JSON."""
        num = lambda v: float(v) if np.isfinite(v) else None  # noqa: E731
        fixed = [{"name": name, "estimate": float(self.params[name]), "std_error": float(self.bse[name]),
                  "t_value": float(self.tvalues[name]), "df": num(self.df[name]),
                  "t_value_nlme": float(self._tvalues_nlme[name]), "p_value": num(self.pvalues[name]),
                  "df_satterthwaite": num(self.df_satterthwaite[name]),
                  "p_value_satterthwaite": num(self.pvalues_satterthwaite[name])}
                 for name in self.params.index]
        random = [{"group": r["group"], "term": r["term"] or None, "variance": float(r["variance"]),
                   "sd": float(r["sd"])} for _, r in self.variance_components.iterrows()]
        return {
            "formula": self.design.formula, "method": self.method, "n_obs": self.n_obs,
            "groups": self.groups, "fixed_effects": fixed,
            "df_rules": {"df": "between/within (nlme); p_value from t_value_nlme",
                         "df_satterthwaite": "Satterthwaite (lmerTest); p_value_satterthwaite from t_value"}, "random_effects": random,
            "correlations": [{"group": r["group"], "term1": r["term1"], "term2": r["term2"],
                              "corr": float(r["corr"])} for _, r in self.correlations.iterrows()],
            "theta": self.theta.tolist(),
            "theta_names": list(self.theta.index),
            "loglik": self.loglik, "aic": self.aic, "bic": self.bic, "deviance": self.deviance,
            "converged": self.converged, "singular": self.singular,
            "exact": None if self.exact is None else {"sigma2": str(self.exact.sigma2),
                                                       "sigma_s2": str(self.exact.sigma_s2)},
            "messages": list(self.messages),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    # ================================================ after the fit (issue 16): delegates to inference.py
    # Thin methods only; the work is in lmm_symbolic/inference.py. One block, kept at the class's end.
    def to_dict(self) -> dict:
        """The JSON of ``lmm-symbolic fit --json``: the fit, its coefficient table, fixef, ranef (with
        conditional SDs), VarCorr and the parameters as lme4's confint names them."""
        from . import inference
        return {**self._core_dict(), **inference.to_dict_extra(self)}

    def conf_int(self, alpha: float = 0.05, method: str = "profile", nsim: int = 500, seed=None,
                 which=None) -> pd.DataFrame:
        r"""Intervals for every parameter as lme4's confint: method "profile" (the default, as lme4's),
        "wald" (:math:`\hat\beta \pm z_{1-\alpha/2}\,\mathrm{se}`; NaN for the variance parameters) or "boot" (percentile)."""
        from . import inference
        return inference.conf_int(self, alpha=alpha, method=method, nsim=nsim, seed=seed, which=which)

    def predict(self, newdata=None, re_form=None, offset=None) -> np.ndarray:
        """lme4's predict(fit, newdata, re.form, allow.new.levels = TRUE); re_form "~0" (or NA) for the
        population level."""
        from . import inference
        return inference.predict(self, newdata, re_form=re_form, offset=offset)

    @property
    def marginal_fitted(self) -> np.ndarray:
        r"""Population-level fitted values :math:`X\hat\beta` (+ offset)."""
        from . import inference
        return inference.marginal_fitted(self)

    @property
    def marginal_residuals(self) -> np.ndarray:
        r""":math:`y - X\hat\beta` (- offset): the residuals from the population-level fit."""
        return self.design.y - self.marginal_fitted

    def simulate(self, nsim: int = 1, seed=None, use_u: bool = False) -> pd.DataFrame:
        """lme4's simulate(fit, nsim, seed): responses from the fitted model."""
        from . import inference
        return inference.simulate(self, nsim, seed, use_u=use_u)

    def refit(self, y, method: str | None = None) -> "FitResult":
        """The same design fitted to a new response (lme4's refit)."""
        from . import inference
        return inference.refit(self, y, method=method)

    def bootstrap(self, nsim: int = 200, seed=None, use_u: bool = False):
        """lme4's bootMer: a parametric bootstrap of every parameter (percentile intervals, boundary share)."""
        from . import inference
        return inference.bootstrap(self, nsim, seed, use_u=use_u)

    def profile(self, which=None, points: int = 13, level: float = 0.99) -> pd.DataFrame:
        r"""lme4's profile: :math:`\zeta` on a grid of each parameter (the data of lme4's ``xyplot`` of the profile)."""
        from . import inference
        return inference.profile(self, which=which, points=points, level=level)

    def update(self, formula: str | None = None, data=None, method: str | None = None) -> "FitResult":
        """lme4's update(fit, ". ~ . + x"): the updated formula refitted."""
        from . import inference
        return inference.update(self, formula, data=data, method=method)

    def coef_table(self) -> pd.DataFrame:
        """Estimate, Std. Error, df, t value, Pr(>|t|) (lmerTest's Satterthwaite df)."""
        from . import inference
        return inference.coef_table(self)

    def fixef(self) -> pd.Series:
        """lme4's fixef: the fixed-effect estimates."""
        return self.params.copy()

    def ranef(self) -> dict:
        """lme4's ranef(condVar = TRUE): per grouping factor, the modes and their conditional SDs."""
        from . import inference
        return inference.ranef(self)

    def VarCorr(self) -> pd.DataFrame:  # noqa: N802 (lme4's name)
        """lme4's as.data.frame(VarCorr(fit)): grp, var1, var2, vcov, sdcor."""
        from . import inference
        return inference.varcorr(self)

    def _repr_latex_(self) -> str:
        from . import inference
        return inference.latex_equation(self)
    # ====================================================================== end of the after-the-fit block


def lme4_theta_order(design: Design, n_theta: int) -> tuple[list[int], list[str]]:
    r"""lme4's order of :math:`\theta` and its names (``getME(fit, "theta")``) from the formula-order :math:`\theta`.

    mkReTrms sorts the random terms by their grouping factor's number of levels, decreasing, when any term
    has more levels than the one before it: ``ord <- rev(order(nl))`` (so terms with equal counts come out
    in reverse formula order). Within a term :math:`\theta` is the lower triangle of its Cholesky factor, column by
    column, named ``g.a`` on the diagonal and ``g.b.a`` below it. Returns the permutation of formula-order
    indices and the names, in lme4's order; a kinship design keeps its single :math:`\theta`."""
    terms = list(design.terms)
    sizes = [t.q * (t.q + 1) // 2 for t in terms]
    if not terms or sum(sizes) != n_theta:
        return list(range(n_theta)), ["kinship" if design.kinship is not None else f"theta{k + 1}"
                                      for k in range(n_theta)]
    starts = np.cumsum([0] + sizes[:-1])
    nl = [t.n_levels for t in terms]
    ordered = list(range(len(terms)))
    if any(b > a for a, b in zip(nl, nl[1:])):
        ordered = sorted(ordered, key=lambda k: nl[k], reverse=False)[::-1]   # R's rev(order(nl)), stable
    order, names = [], []
    for k in ordered:
        t, pos = terms[k], int(starts[k])
        for j in range(t.q):
            for i in range(j, t.q):
                order.append(pos)
                pos += 1
                names.append(f"{t.group}.{t.names[i]}" if i == j else f"{t.group}.{t.names[i]}.{t.names[j]}")
    return order, names


# ------------------------------------------------------------------------------------ inference
def _between_within_df(design: Design) -> np.ndarray:
    r"""nlme's rule: a column constant within every group gets :math:`G - 1 - p_\text{between}`, every other column
    (and the intercept) n - G - p_within, with G the innermost grouping factor's levels. Crossed factors
    have no such rule (lme cannot fit them): NaN, use the Satterthwaite df."""
    if not design.terms:
        return np.full(design.p, np.nan)
    inner = max(design.terms, key=lambda t: t.n_levels)
    G = inner.n_levels
    for t in design.terms:   # every factor must be constant within the innermost one's groups
        if t.group == inner.group:   # the same factor (for a Dask design: its codes stay uncomputed)
            continue
        codes = np.asarray(inner.codes)
        outer_of_inner = np.full(G, -1)
        outer_of_inner[codes] = t.codes
        if np.any(outer_of_inner[codes] != t.codes):
            return np.full(design.p, np.nan)
    constant = constant_within_groups(design, inner)   # one bincount pass; Dask designs bring it
    intercept = np.array([name in ("(Intercept)", "Intercept") for name in design.fixed_names])
    between = constant & ~intercept
    within_count = int((~constant).sum())
    between_count = int(between.sum())
    if not intercept.any() and spans_constant(design):
        # an implicit intercept (cell-means coding): one of its columns is the intercept
        if within_count:
            within_count -= 1
        else:
            between_count -= 1
    return np.where(between, G - 1 - between_count, design.n - G - within_count).astype(float)


def _assemble(design: Design, method: str, beta: np.ndarray, vcov: np.ndarray, df_s: np.ndarray, sigma: float,
              sigma_s: float, deviance: float, singular: bool, summary,
              variance_components: pd.DataFrame, correlations: pd.DataFrame, ranef, fitted: np.ndarray,
              messages: tuple[str, ...]) -> FitResult:
    """The inference every fit shares: t, both kinds of df and p, logLik, AIC, BIC, messages."""
    names = pd.Index(list(design.fixed_names), dtype=object)      # one index shared by every table
    reml = method == "REML"
    bse = np.sqrt(np.diag(vcov))
    t = beta / bse
    df_bw = _between_within_df(design)
    # nlme's t: for ML fits lme scales the fixed-effect covariance by n / (n - p)
    t_nlme = t if reml else t * np.sqrt((design.n - design.p) / design.n)
    p_bw = 2 * scipy.special.stdtr(df_bw, -np.abs(t_nlme))      # 2 P(T_df > |t|)
    p_s = 2 * scipy.special.stdtr(df_s, -np.abs(t))
    # log-likelihood in the response's units: the deviance is -2 log L (REML: the REML criterion)
    loglik = -deviance / 2
    k = n_parameters(design)
    aic, bic = -2 * loglik + 2 * k, -2 * loglik + k * np.log(design.n)
    msgs = list(messages)
    if singular:
        msgs.append(SINGULAR_ADVICE)
        warnings.warn(SINGULAR_ADVICE, LMMWarning, stacklevel=4)
    if not summary.converged:
        msgs.append(f"not converged: {summary.message}")
        warnings.warn(f"the fit did not converge: {summary.message}", LMMWarning, stacklevel=4)
    series = lambda v: pd.Series(np.asarray(v, dtype=float), index=names, copy=False)  # noqa: E731
    return FitResult(
        design=design, method=method, params=series(beta), bse=series(bse), tvalues=series(t),
        df=series(df_bw), pvalues=series(p_bw), df_satterthwaite=series(df_s), pvalues_satterthwaite=series(p_s),
        vcov=pd.DataFrame(vcov, index=names, columns=names), sigma=float(sigma), sigma_s=float(sigma_s),
        loglik=float(loglik), aic=float(aic), bic=float(bic), deviance=float(deviance),
        converged=summary.converged, singular=bool(singular), random_effects=ranef,
        variance_components=variance_components, correlations=correlations, fitted=fitted, opt=summary,
        messages=tuple(msgs))


def n_parameters(design: Design) -> int:
    r"""Fixed effects, the :math:`q(q+1)/2` covariance parameters of each random term, and :math:`\sigma`
    (lme4's df)."""
    kinship = 1 if design.kinship is not None else 0
    return design.p + sum(t.q * (t.q + 1) // 2 for t in design.terms) + kinship + 1


_NO_CORRELATIONS = pd.DataFrame({"group": [], "term1": [], "term2": [], "corr": []})


def make_result(design: Design, opt: Optimum, messages: tuple[str, ...] = (),
                cond: Conditioning | None = None) -> FitResult:
    r"""Everything a user reads off a fit, computed once from the optimum of the one profiled deviance:
    VarCorr from the relative factors (:math:`D_k = \sigma^2 T_k T_k^\top`), the conditional modes with their
    SDs, Satterthwaite's df, then the inference every fit shares (``_assemble``). ``opt`` is the optimum of
    the design the core fitted (``opt.objective.design``: :func:`conditioned`'s basis), ``cond`` the maps
    from it to ``design``'s parametrisation: :math:`\beta = C_X \tilde\beta`, :math:`T_k` the lower factor of
    :math:`C_k \tilde T_k`, :math:`b = C_k \tilde b`."""
    ob = opt.objective
    cond = Conditioning() if cond is None else cond
    work = ob.design
    qs = [lay.q for lay in ob.layouts]
    theta = cond.theta(opt.theta, qs)
    beta = cond.beta(opt.beta)
    deviance = opt.deviance - (2.0 * cond.logdet if ob.reml else 0.0)
    summary = opt.summary
    if not cond.identity:
        summary = dataclasses.replace(
            summary, theta=tuple(map(float, theta)), initial=tuple(map(float, cond.theta(summary.initial, qs))),
            fmin=summary.fmin - (2.0 * cond.logdet if ob.reml else 0.0),
            path=tuple(tuple(map(float, cond.theta(p, qs))) for p in summary.path))
    sig_w = opt.sigma / ob.scale
    if sig_w < 1e-6:
        messages = (*messages, ZERO_RESIDUAL_ADVICE)
        warnings.warn(ZERO_RESIDUAL_ADVICE, LMMWarning, stacklevel=3)
    try:
        df_s, vcov_w = _satterthwaite(ob, opt, sig_w, cond)
    except NumericalError:
        # the criterion cannot be evaluated beside theta (lme4's theta ill-conditioned: a slope covariate far
        # from 0): the standard errors from X^T V^-1 X at theta, no Satterthwaite df
        df_s, vcov_w = np.full(ob.p, np.nan), cond.vcov((sig_w**2) * np.linalg.inv(opt.state.A))
        note = ("Satterthwaite's df are not available: the criterion's curvature cannot be evaluated beside "
                "this theta (lme4's theta is ill-conditioned here; centre the slope covariates)")
        messages = (*messages, note)
        warnings.warn(note, LMMWarning, stacklevel=3)
    variances = _conditional_variances(design, opt, cond, theta)
    Ts = ob.terms(theta)
    if design.kinship is not None:
        sd = opt.sigma * float(Ts[0][0, 0])
        vc = pd.DataFrame({"group": ["kinship", "Residual"], "term": ["K", ""],
                           "variance": [sd**2, opt.sigma**2], "sd": [sd, opt.sigma]})
        ranef = pd.DataFrame({"kinship": opt.b}, index=pd.RangeIndex(design.n, name="observation"))
        return _assemble(design, summary.method, beta, vcov_w * ob.scale**2, df_s, opt.sigma, sd,
                         deviance, float(theta[0]) < SINGULAR_TOL, summary, vc, _NO_CORRELATIONS,
                         ranef, work.X @ opt.beta + opt.b, messages)
    rows, corr_rows, seen = [], [], {}
    for term, T in zip(design.terms, Ts):
        D = opt.sigma**2 * T @ T.T
        sd = np.sqrt(np.diag(D))
        label = term.group if term.group not in seen else f"{term.group}.{seen[term.group]}"
        seen[term.group] = seen.get(term.group, 0) + 1
        rows += [(label, name, D[c, c], sd[c]) for c, name in enumerate(term.names)]
        corr_rows += [(label, term.names[a], term.names[b], D[a, b] / (sd[a] * sd[b]) if sd[a] * sd[b] > 0 else 0.0)
                      for a in range(term.q) for b in range(a + 1, term.q)]
    rows.append(("Residual", "", opt.sigma**2, opt.sigma))
    modes_t = [opt.b[lay.offset: lay.offset + lay.width].reshape(lay.n_levels, lay.q) for lay in ob.layouts]
    fitted = fitted_values(work, opt.beta, modes_t)      # lazy for a Dask design
    modes = [cond.modes(b, k) for k, b in enumerate(modes_t)]
    frames: dict[str, list[pd.DataFrame]] = {}
    for term, lay, b in zip(design.terms, ob.layouts, modes):
        sd = opt.sigma * np.sqrt(variances[lay.offset: lay.offset + lay.width].reshape(lay.n_levels, lay.q))
        index = pd.Index(term.levels, name=term.group)
        frames.setdefault(term.group, []).append((term, b, sd, index))
    ranef: dict[str, pd.DataFrame] = {}
    for group, parts in frames.items():
        # the tutorial's (1|g): columns "(Intercept)", "cond_sd"; otherwise "cond_sd <name>" per column
        short = design.is_random_intercept
        data = {}
        for term, b, sd, _ in parts:
            data.update({name: b[:, c] for c, name in enumerate(term.names)})
        for term, b, sd, _ in parts:
            data.update({("cond_sd" if short else f"cond_sd {name}"): sd[:, c] for c, name in enumerate(term.names)})
        ranef[group] = pd.DataFrame(data, index=parts[0][3], copy=False)
    if len(ranef) == 1:
        ranef = next(iter(ranef.values()))
    diag = [T[c, c] for T in Ts for c in range(T.shape[0])]
    columns = lambda rs, names: {k: [r[j] for r in rs] for j, k in enumerate(names)}  # noqa: E731
    vc = pd.DataFrame(columns(rows, ("group", "term", "variance", "sd")))
    corr = pd.DataFrame(columns(corr_rows, ("group", "term1", "term2", "corr"))) if corr_rows else _NO_CORRELATIONS
    return _assemble(design, summary.method, beta, vcov_w * ob.scale**2, df_s, opt.sigma,
                     rows[0][3], deviance, min(diag) < SINGULAR_TOL, summary, vc, corr, ranef, fitted,
                     messages)


def _conditional_variances(design: Design, opt: Optimum, cond: Conditioning, theta: np.ndarray) -> np.ndarray:
    """diag Var(b | y) / sigma^2 in Z's layout for the user's columns. Where a term was fitted in another
    basis (b = C_k b~) the diagonal needs Var(b~ | y)'s off-diagonal entries, so it is read off the criterion
    of the user's Z (the fitted X basis kept) at the mapped theta; NaN if that cannot be evaluated."""
    ob = opt.objective
    if all(C is None for C in cond.terms):
        return ob.conditional_variances(opt.state)
    own = profiled_deviance(dataclasses.replace(ob.design, terms=design.terms), ob.reml)
    try:
        return np.asarray(own.conditional_variances(own.state(theta)), dtype=float)
    except (NumericalError, np.linalg.LinAlgError):
        return np.full(len(opt.b), np.nan)


def _satterthwaite(ob: ThetaDeviance, opt: Optimum, sig_w: float,
                   cond: Conditioning | None = None) -> tuple[np.ndarray, np.ndarray]:
    """lmerTest's Satterthwaite df: A = 2 H^-1 from the Hessian of the (theta, sigma) deviance (from the
    optimiser's Hessian of the profiled deviance, :meth:`ThetaDeviance.varpar_hessian`), and the gradient of
    V_beta = sigma^2 (X^T V^-1 X)^-1 in closed form: dV_beta/dtheta_k = -sigma^2 A^-1 dA_k A^-1,
    dV_beta/dsigma = 2 sigma A^-1. In the core's basis (theta~ and beta~, :func:`conditioned`): the df do
    not depend on how the variance parameters are parametrised (g^T A g is invariant under a change of
    variables), and V_beta and its derivatives map to the user's beta as C_X V C_X^T."""
    cond = Conditioning() if cond is None else cond
    H, st, dA = ob.varpar_hessian(opt.theta, sig_w, hessian=opt.hessian, st=opt.state)
    cov_varpar = 2.0 * np.linalg.pinv(H)
    Ainv = ob.a_inverse(st)
    vcov = cond.vcov(sig_w**2 * Ainv)
    jac = [cond.vcov(-sig_w**2 * Ainv @ dAk @ Ainv) for dAk in dA] + [cond.vcov(2.0 * sig_w * Ainv)]
    df = np.empty(ob.p)
    for c in range(ob.p):
        g = np.array([J[c, c] for J in jac])
        denom = float(g @ cov_varpar @ g)
        df[c] = 2.0 * vcov[c, c] ** 2 / denom if denom > 0 else np.inf
    return df, vcov


def fit_design(design: Design, method: str = "REML", exact: bool | str = "auto") -> FitResult:
    r"""Fit a design by ML or REML (lme4's default, REML): the one profiled deviance in :math:`\theta`
    (:func:`~lmm_symbolic.compilation.profiled_deviance`), minimised
    (:func:`~lmm_symbolic.optimisation.optimise`), and the result
    assembled (:func:`make_result`). ``exact`` ("auto", True, False): the bound of the exact estimates, which
    are derived on first use of ``fit.exact``, never during the fit."""
    method = method.upper() if isinstance(method, str) else method
    if method not in ("ML", "REML"):
        raise ModelError(f"method must be 'ML' or 'REML', not {method!r}")
    if constant_response(design):
        raise ModelError("the response is constant: there is no variance to split between groups and "
                         "residual")
    reml = method == "REML"
    if design.weights is not None or design.offset is not None:
        return _with_weights_and_offset(fit_design(whitened(design), method, exact=False), design)
    work, cond = conditioned(design)
    objective = profiled_deviance(work, reml)
    if design.is_random_intercept and design.kinship is None:
        _check_group_variance_estimable(work, objective.stats)
    with stage("optimising the profiled %s criterion over theta", method), _blas_threads(objective):
        opt = optimise(objective)
        fit = make_result(design, opt, design.messages, cond)
    if not exact:
        return fit
    if not design.is_random_intercept or design.kinship is not None:
        return dataclasses.replace(fit, exact_request=(None, "exact estimates are derived for one random "
                                                             "intercept (1|g)"))
    return dataclasses.replace(fit, exact_request=("auto" if exact == "auto" else "requested", None))


@functools.lru_cache(maxsize=1)
def _threadpools():
    from threadpoolctl import ThreadpoolController
    return ThreadpoolController()


def _blas_threads(objective: ThetaDeviance):
    """One BLAS thread while the optimiser runs: OpenBLAS's thread hand-offs cost more than the arithmetic of
    the small solves (and of L-BFGS-B's own calls), and on a busy machine even a 1000 x 1000 Cholesky factor
    is several times slower with threads than without; one thread also makes every fit bit-identical
    from run to run."""
    return _threadpools().limit(limits=1, user_api="blas")


def _with_weights_and_offset(fit: FitResult, design: Design) -> FitResult:
    """A fit of the whitened design (:func:`whitened`) as the fit of ``design``: the deviance gains
    -sum log w_i (log|Sigma| = log|Sigma*| - sum log w_i), the fitted values return to the response's
    scale with the offset added."""
    shift = -float(np.log(design.weights).sum()) if design.weights is not None else 0.0
    r = np.sqrt(design.weights) if design.weights is not None else 1.0
    fitted = np.asarray(fit.fitted) / r + (design.offset if design.offset is not None else 0.0)
    return dataclasses.replace(fit, design=design, deviance=fit.deviance + shift, loglik=fit.loglik - shift / 2,
                               aic=fit.aic + shift, bic=fit.bic + shift, fitted=fitted,
                               exact_request=(None, "exact estimates are not derived with prior weights or an offset"))


def _check_group_variance_estimable(design: Design, stats: GroupStatistics) -> None:
    """The groups' indicator columns K must not lie in col(X): if the fixed effects already give every
    group its own mean, no error contrast sees sigma_s (the REML criterion is flat in it, ML puts it at 0)
    and nlme's between-group df is 0. K in col(X) <=> diag(m) - (X^T K)^T (X^T X)^-1 X^T K = 0."""
    if stats.G > stats.p:
        return
    XtX = stats.XtX.sum(0)
    try:
        schur = np.diag(stats.m) - stats.Xt1 @ np.linalg.solve(XtX, stats.Xt1.T)
    except np.linalg.LinAlgError:
        return
    if np.max(np.abs(schur)) <= 1e-8 * float(stats.m.max()):
        term = design.terms[0]
        raise ModelError(f"the variance of the random intercept of {term.group!r} cannot be estimated: the "
                         f"fixed effects ({', '.join(design.fixed_names)}) already fit a separate mean to each "
                         f"of its {term.n_levels} groups; drop the fixed effects that are constant within "
                         "groups, or use more groups")


def likelihood_ratio_test(restricted: FitResult, full: FitResult) -> dict:
    r"""anova(m0, m1): :math:`\chi^2 = 2\,(\ell_1 - \ell_0)` (the two logLik) on the difference in
    parameters, ML fits only."""
    for f in (restricted, full):
        if f.method != "ML":
            raise ModelError("a likelihood-ratio test of fixed effects compares ML fits; refit with "
                             "method='ML' (lme4's anova refits for you)")
    if restricted.design.n != full.design.n:
        raise ModelError("the two fits use different observations")
    k0, k1 = n_parameters(restricted.design), n_parameters(full.design)
    if k1 <= k0:
        raise ModelError("the second model must have more parameters than the first")
    chisq = max(0.0, 2 * (full.loglik - restricted.loglik))
    return {"chisq": chisq, "df": k1 - k0, "p_value": float(scipy.stats.chi2.sf(chisq, k1 - k0)),
            "loglik_restricted": restricted.loglik, "loglik_full": full.loglik,
            "aic": [restricted.aic, full.aic], "bic": [restricted.bic, full.bic]}


def full_loglik(fit: FitResult) -> LogLikelihood:
    """Eq. 10 compiled for this fit's data (for its gradient and Hessian at the estimates)."""
    return LogLikelihood(GroupStatistics.of(fit.design))


def deviance_function(design: Design, method: str = "REML"):
    r"""The profiled criterion of ``design`` as a function of lme4's :math:`\theta`, in the response's own
    units: :math:`-2 \log L` (ML) or the REML criterion, with :math:`\beta` and :math:`\sigma^2` profiled out
    (lme4's devfun). The function takes :math:`\theta` as a sequence (length 1 for (1|g) and kinship) and has ``n_theta`` and ``lower_bounds``."""
    method = method.upper()
    reml = method == "REML"
    if design.weights is not None or design.offset is not None:
        inner = deviance_function(whitened(design), method)
        shift = -float(np.log(design.weights).sum()) if design.weights is not None else 0.0

        def weighted(theta):
            return inner(theta) + shift
        weighted.n_theta, weighted.lower_bounds = inner.n_theta, inner.lower_bounds
        return weighted
    work, cond = conditioned(design)
    ob = profiled_deviance(work, reml)
    qs = [lay.q for lay in ob.layouts]
    const = 2 * ob.n_eff * np.log(ob.scale) - (2.0 * cond.logdet if reml else 0.0)

    def general(theta):
        return ob(cond.theta_tilde(np.asarray(theta, dtype=float), qs)) + const
    general.n_theta, general.lower_bounds = ob.n_theta, ob.lower_bounds
    return general
