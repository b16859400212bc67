"""Results: inference from an optimum, and the immutable fit object with lmer-style output.

Standard errors from (X^T Sigma^-1 X)^-1 (lme4's); p values with nlme's between/within degrees of freedom
and nlme's t (for ML fits lme scales the fixed-effects covariance by n/(n-p), which is why lmer's and lme's
ML standard errors differ), and with
Satterthwaite's (as lmerTest: df = 2 (L V L^T)^2 / (g^T A g), A = 2 H^-1 the covariance of the variance
parameters (theta, sigma), g the gradient of L V(theta, sigma) L^T); log-likelihood, AIC and BIC as lme4;
conditional modes (BLUPs) u_g = w_g 1^T r_g with conditional variance sigma^2 w_g.
"""
from __future__ import annotations

import dataclasses
import html
import json
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.stats
import sympy as sp

from .compilation import LogLikelihood, ProfiledDeviance, ThetaDeviance, profiled_deviance, weighted_gram
from .statistics import (GroupStatistics, SpectralStatistics, constant_response, constant_within_groups,
                         fitted_values, spans_constant)
from .errors import LMMWarning, ModelError
from .optimisation import (SINGULAR_TOL, ExactOptimum, GeneralOptimum, Optimum, exact_optimum, optimise,
                           optimise_general)
from .derivation import EXACT_N
from .progress import stage
from .specification import Design, whitened

SINGULAR_ADVICE = ("boundary (singular) fit: the estimated random-effect variance is zero, so the groups "
                   "differ no more than the residual noise predicts; the model is over-fitted for these data "
                   "-- consider dropping the random term (see lme4's ?isSingular)")


@dataclass(frozen=True)
class FitResult:
    """A fitted linear mixed model; nothing in it changes after it is made.

    ``sigma_s`` is the SD of the first random term's first column (the tutorial's sigma_s for (1|g));
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
    exact: ExactOptimum | None
    random_effects: pd.DataFrame | dict = field(repr=False)
    variance_components: pd.DataFrame = field(repr=False)
    correlations: pd.DataFrame = field(repr=False)
    fitted: np.ndarray = field(repr=False)
    opt: object = field(repr=False)
    messages: tuple[str, ...] = ()
    #: why ``exact`` is None (not balanced, too many digits, not requested); None when it was derived
    exact_reason: str | None = None

    # ------------------------------------------------------------------------------ accessors
    @property
    def group(self) -> str:
        return self.design.terms[0].group if self.design.terms else "kinship"

    @property
    def n_obs(self) -> int:
        return self.design.n

    @property
    def residuals(self) -> np.ndarray:
        """Conditional residuals y - X beta - K u."""
        return self.design.y - self.fitted

    @property
    def groups(self) -> dict[str, int]:
        """Each grouping factor and its number of levels."""
        return {t.group: t.n_levels for t in self.design.terms}

    def conf_int(self, alpha: float = 0.05) -> pd.DataFrame:
        """Wald intervals beta +- z_(1-alpha/2) se (lme4's confint(method = "Wald"))."""
        z = scipy.stats.norm.ppf(1 - alpha / 2)
        lo, hi = f"{100 * alpha / 2:.1f} %", f"{100 * (1 - alpha / 2):.1f} %"
        return pd.DataFrame({lo: self.params - z * self.bse, hi: self.params + z * self.bse})

    # -------------------------------------------------------------------------------- output
    @property
    def _between_within(self) -> bool:
        """nlme's between/within df exist (not for crossed factors or a kinship matrix)."""
        return not bool(np.isnan(self.df.to_numpy(dtype=float)).all())

    @property
    def _tvalues_nlme(self) -> pd.Series:
        """nlme's t: for an ML fit lme scales the fixed-effects covariance by n / (n - p), so its t is
        lme4's t times sqrt((n - p) / n); for REML the two agree. nlme's p values follow from this t."""
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

    def to_dict(self) -> dict:
        """The JSON of ``lmm-symbolic fit --json``. Each p value names its t and df: ``p_value`` follows from
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
        order, names = lme4_theta_order(self.design, len(self.opt.theta))
        random = [{"group": r["group"], "term": r["term"] or None, "variance": float(r["variance"]),
                   "sd": float(r["sd"])} for _, r in self.variance_components.iterrows()]
        return {
            "formula": self.design.formula, "method": self.method, "n_obs": self.n_obs,
            "groups": self.groups, "fixed_effects": fixed,
            "df_rules": {"df": "between/within (nlme); p_value from t_value_nlme",
                         "df_satterthwaite": "Satterthwaite (lmerTest); p_value_satterthwaite from t_value"}, "random_effects": random,
            "correlations": [{"group": r["group"], "term1": r["term1"], "term2": r["term2"],
                              "corr": float(r["corr"])} for _, r in self.correlations.iterrows()],
            "theta": [float(self.opt.theta[k]) for k in order],
            "theta_names": names,
            "loglik": self.loglik, "aic": self.aic, "bic": self.bic, "deviance": self.deviance,
            "converged": self.converged, "singular": self.singular,
            "exact": None if self.exact is None else {"sigma2": str(self.exact.sigma2),
                                                       "sigma_s2": str(self.exact.sigma_s2)},
            "messages": list(self.messages),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)


def lme4_theta_order(design: Design, n_theta: int) -> tuple[list[int], list[str]]:
    """lme4's order of theta and its names (``getME(fit, "theta")``) from the formula-order theta.

    mkReTrms sorts the random terms by their grouping factor's number of levels, decreasing, when any term
    has more levels than the one before it: ``ord <- rev(order(nl))`` (so terms with equal counts come out
    in reverse formula order). Within a term theta is the lower triangle of its Cholesky factor, column by
    column, named ``g.a`` on the diagonal and ``g.b.a`` below it. Returns the permutation of formula-order
    indices and the names, in lme4's order; a kinship design keeps its single theta."""
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
    """nlme's rule: a column constant within every group gets G - 1 - p_between, every other column
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


def _satterthwaite(opt: Optimum) -> tuple[np.ndarray, np.ndarray]:
    """Satterthwaite df per coefficient (lmerTest), and the covariance of beta."""
    objective, stats = opt.objective, opt.objective.stats
    st = objective.state(opt.theta)
    sig_w = opt.sigma / stats.scale
    Ainv = np.linalg.inv(st.A)
    vcov_w = sig_w**2 * Ainv
    H = objective.varpar_hessian(st, sig_w)
    cov_varpar = 2.0 * np.linalg.pinv(H)
    dA = -weighted_gram(st.dw, stats.Xt1)
    jac = [-sig_w**2 * Ainv @ dA @ Ainv, 2.0 * sig_w * Ainv]
    df = np.empty(stats.p)
    for k in range(stats.p):
        g = np.array([J[k, k] for J in jac])
        denom = float(g @ cov_varpar @ g)
        df[k] = 2.0 * vcov_w[k, k] ** 2 / denom if denom > 0 else np.inf
    return df, vcov_w * stats.scale**2


def _assemble(design: Design, method: str, beta: np.ndarray, vcov: np.ndarray, df_s: np.ndarray, sigma: float,
              sigma_s: float, deviance: float, singular: bool, summary, exact: ExactOptimum | None,
              variance_components: pd.DataFrame, correlations: pd.DataFrame, ranef, fitted: np.ndarray,
              messages: tuple[str, ...]) -> FitResult:
    """The inference every fit shares: t, both kinds of df and p, logLik, AIC, BIC, messages."""
    names = list(design.fixed_names)
    reml = method == "REML"
    bse = np.sqrt(np.diag(vcov))
    t = beta / bse
    df_bw = _between_within_df(design)
    # nlme's t: for ML fits lme scales the fixed-effect covariance by n / (n - p)
    t_nlme = t if reml else t * np.sqrt((design.n - design.p) / design.n)
    p_bw = 2 * scipy.stats.t.sf(np.abs(t_nlme), df_bw)
    p_s = 2 * scipy.stats.t.sf(np.abs(t), df_s)
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
    series = lambda v: pd.Series(np.asarray(v, dtype=float), index=names)  # noqa: E731
    return FitResult(
        design=design, method=method, params=series(beta), bse=series(bse), tvalues=series(t),
        df=series(df_bw), pvalues=series(p_bw), df_satterthwaite=series(df_s), pvalues_satterthwaite=series(p_s),
        vcov=pd.DataFrame(vcov, index=names, columns=names), sigma=float(sigma), sigma_s=float(sigma_s),
        loglik=float(loglik), aic=float(aic), bic=float(bic), deviance=float(deviance),
        converged=summary.converged, singular=bool(singular), exact=exact, random_effects=ranef,
        variance_components=variance_components, correlations=correlations, fitted=fitted, opt=summary,
        messages=tuple(msgs))


def n_parameters(design: Design) -> int:
    """Fixed effects, the q(q+1)/2 covariance parameters of each random term, and sigma (lme4's df)."""
    kinship = 1 if design.kinship is not None else 0
    return design.p + sum(t.q * (t.q + 1) // 2 for t in design.terms) + kinship + 1


_NO_CORRELATIONS = pd.DataFrame({"group": [], "term1": [], "term2": [], "corr": []})


def make_result(design: Design, stats: GroupStatistics, opt: Optimum, exact: ExactOptimum | None,
                messages: tuple[str, ...] = ()) -> FitResult:
    """Everything a user reads off a random-intercept fit, computed once from the optimum."""
    df_s, vcov = _satterthwaite(opt)
    st = opt.objective.state(opt.theta)
    term = design.terms[0]
    u = st.w * st.e * stats.scale
    cond_sd = opt.sigma * np.sqrt(st.w)
    ranef = pd.DataFrame({"(Intercept)": u, "cond_sd": cond_sd}, index=pd.Index(term.levels, name=term.group))
    vc = pd.DataFrame({"group": [term.group, "Residual"], "term": ["(Intercept)", ""],
                       "variance": [opt.sigma_s**2, opt.sigma**2], "sd": [opt.sigma_s, opt.sigma]})
    return _assemble(design, opt.summary.method, opt.beta, vcov, df_s, opt.sigma, opt.sigma_s, opt.deviance,
                     opt.theta < SINGULAR_TOL, opt.summary, exact, vc, _NO_CORRELATIONS, ranef,
                     fitted_values(design, opt.beta, [u]), messages)


def make_kinship_result(design: Design, stats: SpectralStatistics, opt: Optimum,
                        messages: tuple[str, ...] = ()) -> FitResult:
    """The result of Sigma = sigma_s^2 K + sigma^2 I; the conditional modes are the n genetic values
    u = sigma_s^2 K Sigma^-1 (y - X beta), i.e. U diag(sigma_s^2 lambda / (sigma^2 + sigma_s^2 lambda)) U^T r."""
    df_s, vcov = _satterthwaite(opt)
    st = opt.objective.state(opt.theta)
    u = stats.eigenvectors @ (np.sqrt(stats.m) * st.w * st.e) * stats.scale
    ranef = pd.DataFrame({"kinship": u}, index=pd.RangeIndex(design.n, name="observation"))
    vc = pd.DataFrame({"group": ["kinship", "Residual"], "term": ["K", ""],
                       "variance": [opt.sigma_s**2, opt.sigma**2], "sd": [opt.sigma_s, opt.sigma]})
    return _assemble(design, opt.summary.method, opt.beta, vcov, df_s, opt.sigma, opt.sigma_s, opt.deviance,
                     opt.theta < SINGULAR_TOL, opt.summary, None, vc, _NO_CORRELATIONS, ranef,
                     design.X @ opt.beta + u, messages)


def make_general_result(design: Design, opt: GeneralOptimum, messages: tuple[str, ...] = ()) -> FitResult:
    """The result of a model with slopes or several random terms (lme4's general formulation)."""
    ob = opt.objective
    sig_w = opt.sigma / ob.scale
    df_s, vcov_w = _satterthwaite_general(ob, opt.theta, sig_w)
    rows, corr_rows, seen = [], [], {}
    for term, T in zip(design.terms, ob.terms(opt.theta)):
        D = opt.sigma**2 * T @ T.T
        sd = np.sqrt(np.diag(D))
        label = term.group if term.group not in seen else f"{term.group}.{seen[term.group]}"
        seen[term.group] = seen.get(term.group, 0) + 1
        rows += [{"group": label, "term": name, "variance": D[c, c], "sd": sd[c]} for c, name in enumerate(term.names)]
        corr_rows += [{"group": label, "term1": term.names[a], "term2": term.names[b],
                       "corr": D[a, b] / (sd[a] * sd[b]) if sd[a] * sd[b] > 0 else 0.0}
                      for a in range(term.q) for b in range(a + 1, term.q)]
    rows.append({"group": "Residual", "term": "", "variance": opt.sigma**2, "sd": opt.sigma})
    ranef: dict[str, pd.DataFrame] = {}
    modes = [opt.b[lay.offset: lay.offset + lay.width].reshape(lay.n_levels, lay.q) for lay in ob.layouts]
    fitted = fitted_values(design, opt.beta, modes)      # lazy for a Dask design
    variances = ob.conditional_variances(opt.state)
    for term, lay, b in zip(design.terms, ob.layouts, modes):
        sd = opt.sigma * np.sqrt(variances[lay.offset: lay.offset + lay.width].reshape(lay.n_levels, lay.q))
        frame = pd.DataFrame(b, columns=list(term.names), index=pd.Index(term.levels, name=term.group))
        frame = frame.join(pd.DataFrame(sd, columns=[f"cond_sd {name}" for name in term.names], index=frame.index))
        ranef[term.group] = pd.concat([ranef[term.group], frame], axis=1) if term.group in ranef else frame
    if len(ranef) == 1:
        ranef = next(iter(ranef.values()))
    diag = [T[c, c] for T in ob.terms(opt.theta) for c in range(T.shape[0])]
    singular = min(diag) < SINGULAR_TOL
    return _assemble(design, opt.summary.method, opt.beta, vcov_w * ob.scale**2, df_s, opt.sigma,
                     rows[0]["sd"], opt.deviance, singular, opt.summary, None, pd.DataFrame(rows),
                     pd.DataFrame(corr_rows) if corr_rows else _NO_CORRELATIONS, ranef, fitted, messages)


def _satterthwaite_general(ob: ThetaDeviance, theta: np.ndarray, sig_w: float) -> tuple[np.ndarray, np.ndarray]:
    """lmerTest's Satterthwaite df: A = 2 H^-1 from the Hessian of the (theta, sigma) deviance, and the
    gradient of V_beta = sigma^2 (X^T V^-1 X)^-1 in closed form: dV_beta/dtheta_k = -sigma^2 A^-1 dA_k A^-1,
    dV_beta/dsigma = 2 sigma A^-1."""
    H, st, dA = ob.varpar_hessian(theta, sig_w)
    cov_varpar = 2.0 * np.linalg.pinv(H)
    Ainv = np.linalg.inv(st.A)
    vcov = sig_w**2 * Ainv
    jac = [-sig_w**2 * Ainv @ dAk @ Ainv for dAk in dA] + [2.0 * sig_w * Ainv]
    df = np.empty(ob.p)
    for c in range(ob.p):
        g = np.array([J[c, c] for J in jac])
        denom = float(g @ cov_varpar @ g)
        df[c] = 2.0 * vcov[c, c] ** 2 / denom if denom > 0 else np.inf
    return df, vcov


def fit_design(design: Design, method: str = "REML", exact: bool | str = "auto") -> FitResult:
    """Fit a design by ML or REML (lme4's default, REML); the closed-form route for (1|g), lme4's
    general formulation for slopes and several random terms."""
    method = method.upper()
    if method not in ("ML", "REML"):
        raise ModelError(f"method must be 'ML' or 'REML', not {method!r}")
    if constant_response(design):
        raise ModelError("the response is constant: there is no variance to split between groups and "
                         "residual")
    reml = method == "REML"
    if design.weights is not None or design.offset is not None:
        return _with_weights_and_offset(fit_design(whitened(design), method, exact=False), design)
    if design.kinship is not None:
        stats = SpectralStatistics.of(design)
        return make_kinship_result(design, stats, optimise(stats, reml), design.messages)
    if not design.is_random_intercept:
        return make_general_result(design, optimise_general(profiled_deviance(design, reml)), design.messages)
    stats = GroupStatistics.of(design)
    _check_group_variance_estimable(design, stats)
    with stage("optimising the profiled %s criterion over theta = sigma_s / sigma", method):
        opt = optimise(stats, reml)
    ex, why = (exact_optimum(design, reml, "auto" if exact == "auto" else "requested") if exact
               else (None, "not requested (exact=False)"))
    return dataclasses.replace(make_result(design, stats, opt, ex, design.messages), exact_reason=why)


def _with_weights_and_offset(fit: FitResult, design: Design) -> FitResult:
    """A fit of the whitened design (:func:`whitened`) as the fit of ``design``: the deviance gains
    -sum log w_i (log|Sigma| = log|Sigma*| - sum log w_i), the fitted values return to the response's
    scale with the offset added."""
    shift = -float(np.log(design.weights).sum()) if design.weights is not None else 0.0
    r = np.sqrt(design.weights) if design.weights is not None else 1.0
    fitted = np.asarray(fit.fitted) / r + (design.offset if design.offset is not None else 0.0)
    return dataclasses.replace(fit, design=design, deviance=fit.deviance + shift, loglik=fit.loglik - shift / 2,
                               aic=fit.aic + shift, bic=fit.bic + shift, fitted=fitted,
                               exact_reason="exact estimates are not derived with prior weights or an offset")


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
    """anova(m0, m1): chi^2 = 2 (logLik_1 - logLik_0) on the difference in parameters, ML fits only."""
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
    """The profiled criterion of ``design`` as a function of lme4's theta, in the response's own units:
    -2 log L (ML) or the REML criterion, with beta and sigma^2 profiled out (lme4's devfun). The function
    takes theta as a sequence (length 1 for (1|g) and kinship) and has ``n_theta`` and ``lower_bounds``."""
    method = method.upper()
    reml = method == "REML"
    if design.weights is not None or design.offset is not None:
        inner = deviance_function(whitened(design), method)
        shift = -float(np.log(design.weights).sum()) if design.weights is not None else 0.0

        def weighted(theta):
            return inner(theta) + shift
        weighted.n_theta, weighted.lower_bounds = inner.n_theta, inner.lower_bounds
        return weighted
    if design.kinship is not None or design.is_random_intercept:
        stats = SpectralStatistics.of(design) if design.kinship is not None else GroupStatistics.of(design)
        ob = ProfiledDeviance(stats, reml)

        def scalar(theta):
            return ob(float(np.atleast_1d(theta)[0])) + 2 * ob.n_eff * np.log(stats.scale)
        scalar.n_theta, scalar.lower_bounds = 1, [0.0]
        return scalar
    ob = profiled_deviance(design, reml)

    def general(theta):
        return ob(np.asarray(theta, dtype=float)) + 2 * ob.n_eff * np.log(ob.scale)
    general.n_theta, general.lower_bounds = ob.n_theta, ob.lower_bounds
    return general
