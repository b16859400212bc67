"""Results: inference from an optimum, and the immutable fit object with lmer-style output.

Standard errors from (X^T Sigma^-1 X)^-1 (lme4's); p values with nlme's between/within degrees of freedom
and nlme's t (for ML fits lme scales the fixed-effects covariance by n/(n-p), which is why lmer's and lme's
ML standard errors differ), and with
Satterthwaite's (as lmerTest: df = 2 (L V L^T)^2 / (g^T A g), A = 2 H^-1 the covariance of the variance
parameters (theta, sigma), g the gradient of L V(theta, sigma) L^T); log-likelihood, AIC and BIC as lme4;
conditional modes (BLUPs) u_g = w_g 1^T r_g with conditional variance sigma^2 w_g.
"""
from __future__ import annotations

import html
import json
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.stats
import sympy as sp

from .compilation import LogLikelihood
from .statistics import GroupStatistics
from .errors import LMMWarning, ModelError
from .optimisation import SINGULAR_TOL, ExactOptimum, Optimum, exact_optimum, optimise
from .specification import Design

SINGULAR_ADVICE = ("boundary (singular) fit: the estimated random-effect variance is zero, so the groups "
                   "differ no more than the residual noise predicts; the model is over-fitted for these data "
                   "-- consider dropping the random term (see lme4's ?isSingular)")


@dataclass(frozen=True)
class FitResult:
    """A fitted random-intercept model; nothing in it changes after it is made."""

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
    random_effects: pd.DataFrame = field(repr=False)
    fitted: np.ndarray = field(repr=False)
    opt: object = field(repr=False)
    messages: tuple[str, ...] = ()

    # ------------------------------------------------------------------------------ accessors
    @property
    def group(self) -> str:
        return self.design.terms[0].group

    @property
    def n_obs(self) -> int:
        return self.design.n

    @property
    def residuals(self) -> np.ndarray:
        """Conditional residuals y - X beta - K u."""
        return self.design.y - self.fitted

    @property
    def variance_components(self) -> pd.DataFrame:
        """Variance and SD of the random intercept and of the residual (lme4's VarCorr)."""
        return pd.DataFrame({"group": [self.group, "Residual"], "term": ["(Intercept)", ""],
                             "variance": [self.sigma_s**2, self.sigma**2], "sd": [self.sigma_s, self.sigma]})

    def conf_int(self, alpha: float = 0.05) -> pd.DataFrame:
        """Wald intervals beta +- z_(1-alpha/2) se (lme4's confint(method = "Wald"))."""
        z = scipy.stats.norm.ppf(1 - alpha / 2)
        lo, hi = f"{100 * alpha / 2:.1f} %", f"{100 * (1 - alpha / 2):.1f} %"
        return pd.DataFrame({lo: self.params - z * self.bse, hi: self.params + z * self.bse})

    # -------------------------------------------------------------------------------- output
    def _fixed_table(self) -> pd.DataFrame:
        return pd.DataFrame({"Estimate": self.params, "Std. Error": self.bse, "df": self.df,
                             "t value": self.tvalues, "Pr(>|t|)": self.pvalues})

    def summary(self) -> str:
        """lmer's summary layout, with nlme's between/within df and p values."""
        crit = "REML criterion at convergence" if self.method == "REML" else "Deviance"
        fit_by = "REML" if self.method == "REML" else "maximum likelihood"
        lines = [f"Linear mixed model fit by {fit_by} (lmm_symbolic)", f"Formula: {self.design.formula}"]
        if self.method == "ML":
            lines += ["", f"{'AIC':>10}{'BIC':>10}{'logLik':>10}{'deviance':>10}",
                      f"{self.aic:10.1f}{self.bic:10.1f}{self.loglik:10.1f}{self.deviance:10.1f}"]
        else:
            lines += [f"{crit}: {self.deviance:.4f}"]
        vc = self.variance_components
        lines += ["", "Random effects:", f" {'Groups':<10}{'Name':<13}{'Variance':>12}{'Std.Dev.':>12}"]
        for _, r in vc.iterrows():
            lines.append(f" {r['group']:<10}{r['term']:<13}{r['variance']:12.4f}{r['sd']:12.4f}")
        term = self.design.terms[0]
        lines.append(f"Number of obs: {self.n_obs}, groups:  {self.group}, {term.n_levels}")
        lines += ["", "Fixed effects:", self._fixed_table().to_string(float_format=lambda v: f"{v:.6g}")]
        if self.exact is not None:
            lines += ["", "Exact estimates (score equations solved with sympy):",
                      f"  sigma^2 = {self.exact.sigma2},  sigma_s^2 = {self.exact.sigma_s2}"]
        if self.singular:
            lines += ["", SINGULAR_ADVICE]
        if not self.converged:
            lines += ["", f"WARNING: not converged: {self.opt.message}"]
        lines += [f"note: {m}" for m in self.messages]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def _repr_html_(self) -> str:
        vc = self.variance_components.to_html(index=False, float_format=lambda v: f"{v:.4f}")
        fx = self._fixed_table().to_html(float_format=lambda v: f"{v:.6g}")
        head = (f"<b>Linear mixed model fit by {self.method}</b><br><code>{html.escape(self.design.formula)}"
                f"</code><br>logLik {self.loglik:.4f}, AIC {self.aic:.2f}, BIC {self.bic:.2f}, "
                f"n = {self.n_obs}, {html.escape(self.group)}: {self.design.terms[0].n_levels} groups")
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
        """The JSON of ``lmm-symbolic fit --json``."""
        term = self.design.terms[0]
        fixed = [{"name": name, "estimate": float(self.params[name]), "std_error": float(self.bse[name]),
                  "t_value": float(self.tvalues[name]), "df": float(self.df[name]),
                  "p_value": float(self.pvalues[name]),
                  "df_satterthwaite": float(self.df_satterthwaite[name]),
                  "p_value_satterthwaite": float(self.pvalues_satterthwaite[name])}
                 for name in self.params.index]
        random = [{"group": r["group"], "term": r["term"] or None, "variance": float(r["variance"]),
                   "sd": float(r["sd"])} for _, r in self.variance_components.iterrows()]
        return {
            "formula": self.design.formula, "method": self.method, "n_obs": self.n_obs,
            "groups": {term.group: term.n_levels}, "fixed_effects": fixed, "random_effects": random,
            "loglik": self.loglik, "aic": self.aic, "bic": self.bic, "deviance": self.deviance,
            "converged": self.converged, "singular": self.singular,
            "exact": None if self.exact is None else {"sigma2": str(self.exact.sigma2),
                                                       "sigma_s2": str(self.exact.sigma_s2)},
            "messages": list(self.messages),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# ------------------------------------------------------------------------------------ inference
def _between_within_df(design: Design) -> np.ndarray:
    """nlme's rule: a column constant within every group gets G - 1 - p_between, every other column
    (and the intercept) n - G - p_within."""
    codes = np.asarray(design.terms[0].codes)
    G = design.terms[0].n_levels
    X = design.X
    sums = np.zeros((G, design.p))
    np.add.at(sums, codes, X)
    means = sums / np.bincount(codes, minlength=G)[:, None]
    constant = np.all(np.isclose(X, means[codes]), axis=0)
    intercept = np.array([name in ("(Intercept)", "Intercept") for name in design.fixed_names])
    between = constant & ~intercept
    within_count = int((~constant).sum())
    between_count = int(between.sum())
    if not intercept.any() and _spans_constant(X):
        # an implicit intercept (cell-means coding): one of its columns is the intercept
        if within_count:
            within_count -= 1
        else:
            between_count -= 1
    return np.where(between, G - 1 - between_count, design.n - G - within_count).astype(float)


def _spans_constant(X: np.ndarray) -> bool:
    ones = np.ones(X.shape[0])
    coef, *_ = np.linalg.lstsq(X, ones, rcond=None)
    return bool(np.linalg.norm(X @ coef - ones) <= 1e-8 * np.sqrt(X.shape[0]))


def _satterthwaite(opt: Optimum) -> tuple[np.ndarray, np.ndarray]:
    """Satterthwaite df per coefficient (lmerTest), and the covariance of beta."""
    objective, stats = opt.objective, opt.objective.stats
    st = objective.state(opt.theta)
    sig_w = opt.sigma / stats.scale
    Ainv = np.linalg.inv(st.A)
    vcov_w = sig_w**2 * Ainv
    H = objective.varpar_hessian(st, sig_w)
    cov_varpar = 2.0 * np.linalg.pinv(H)
    dA = -np.einsum("g,gk,gl->kl", st.dw, stats.Xt1, stats.Xt1)
    jac = [-sig_w**2 * Ainv @ dA @ Ainv, 2.0 * sig_w * Ainv]
    df = np.empty(stats.p)
    for k in range(stats.p):
        g = np.array([J[k, k] for J in jac])
        denom = float(g @ cov_varpar @ g)
        df[k] = 2.0 * vcov_w[k, k] ** 2 / denom if denom > 0 else np.inf
    return df, vcov_w * stats.scale**2


def make_result(design: Design, stats: GroupStatistics, opt: Optimum, exact: ExactOptimum | None,
                messages: tuple[str, ...] = ()) -> FitResult:
    """Everything a user reads off a fit, computed once from the optimum."""
    names = list(design.fixed_names)
    reml = opt.summary.method == "REML"
    df_s, vcov = _satterthwaite(opt)
    bse = np.sqrt(np.diag(vcov))
    t = opt.beta / bse
    df_bw = _between_within_df(design)
    # nlme's t: for ML fits lme scales the fixed-effect covariance by n / (n - p)
    t_nlme = t if reml else t * np.sqrt((design.n - design.p) / design.n)
    p_bw = 2 * scipy.stats.t.sf(np.abs(t_nlme), df_bw)
    p_s = 2 * scipy.stats.t.sf(np.abs(t), df_s)
    n, p = design.n, design.p
    # log-likelihood in the response's units: the deviance is -2 log L (REML: the REML criterion)
    loglik = -opt.deviance / 2
    k = p + 2
    aic, bic = -2 * loglik + 2 * k, -2 * loglik + k * np.log(n)
    st = opt.objective.state(opt.theta)
    term = design.terms[0]
    u = st.w * st.e * stats.scale
    cond_sd = opt.sigma * np.sqrt(st.w)
    ranef = pd.DataFrame({"(Intercept)": u, "cond_sd": cond_sd}, index=pd.Index(term.levels, name=term.group))
    fitted = design.X @ opt.beta + u[np.asarray(term.codes)]
    singular = opt.theta < SINGULAR_TOL
    msgs = list(messages)
    if singular:
        msgs.append(SINGULAR_ADVICE)
        warnings.warn(SINGULAR_ADVICE, LMMWarning, stacklevel=3)
    if not opt.summary.converged:
        msgs.append(f"not converged: {opt.summary.message}")
        warnings.warn(f"the fit did not converge: {opt.summary.message}", LMMWarning, stacklevel=3)
    series = lambda v: pd.Series(np.asarray(v, dtype=float), index=names)  # noqa: E731
    return FitResult(
        design=design, method="REML" if reml else "ML", params=series(opt.beta), bse=series(bse),
        tvalues=series(t), df=series(df_bw), pvalues=series(p_bw), df_satterthwaite=series(df_s),
        pvalues_satterthwaite=series(p_s), vcov=pd.DataFrame(vcov, index=names, columns=names),
        sigma=opt.sigma, sigma_s=opt.sigma_s, loglik=float(loglik), aic=float(aic), bic=float(bic),
        deviance=float(opt.deviance), converged=opt.summary.converged, singular=bool(singular), exact=exact,
        random_effects=ranef, fitted=fitted, opt=opt.summary, messages=tuple(msgs))


def fit_design(design: Design, method: str = "REML", exact: bool = True) -> FitResult:
    """Fit a design by ML or REML (lme4's default, REML)."""
    method = method.upper()
    if method not in ("ML", "REML"):
        raise ModelError(f"method must be 'ML' or 'REML', not {method!r}")
    if not design.is_random_intercept:
        raise ModelError("fit handles one random intercept (1|g) so far")
    stats = GroupStatistics.of(design)
    if np.ptp(design.y) == 0:
        raise ModelError("the response is constant: there is no variance to split between groups and "
                         "residual")
    reml = method == "REML"
    opt = optimise(stats, reml)
    ex = exact_optimum(design, reml) if exact else None
    return make_result(design, stats, opt, ex, design.messages)


def likelihood_ratio_test(restricted: FitResult, full: FitResult) -> dict:
    """anova(m0, m1): chi^2 = 2 (logLik_1 - logLik_0) on the difference in parameters, ML fits only."""
    for f in (restricted, full):
        if f.method != "ML":
            raise ModelError("a likelihood-ratio test of fixed effects compares ML fits; refit with "
                             "method='ML' (lme4's anova refits for you)")
    if restricted.design.n != full.design.n:
        raise ModelError("the two fits use different observations")
    k0, k1 = restricted.design.p + 2, full.design.p + 2
    if k1 <= k0:
        raise ModelError("the second model must have more parameters than the first")
    chisq = max(0.0, 2 * (full.loglik - restricted.loglik))
    return {"chisq": chisq, "df": k1 - k0, "p_value": float(scipy.stats.chi2.sf(chisq, k1 - k0)),
            "loglik_restricted": restricted.loglik, "loglik_full": full.loglik,
            "aic": [restricted.aic, full.aic], "bic": [restricted.bic, full.bic]}


def full_loglik(fit: FitResult) -> LogLikelihood:
    """Eq. 10 compiled for this fit's data (for its gradient and Hessian at the estimates)."""
    return LogLikelihood(GroupStatistics.of(fit.design))
