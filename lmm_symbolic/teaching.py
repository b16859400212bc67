r"""Teaching helpers for the notebooks: ordinary least squares, the Resp_std trick, and the proof that the
paired t-test is the REML t of ``Resp ~ Treat + (1|Ind)``.

The proofs are derived with sympy from the package's own objects (a :class:`~lmm_symbolic.derivation.Derivation`
with symbolic responses :math:`y_{ij}`, or the block identities of a group of symbolic size :math:`m`),
never from formulas typed in here:

* :func:`paired_equivalence` (2 to about 8 pairs): the GLS estimate of :math:`\beta` solves
  :math:`\partial \log L / \partial\beta = 0` (Eq. 10); the REML log-likelihood, written in the two
  eigenvalues of a pair's block (:math:`a = \sigma^2` for the difference, :math:`b = \sigma^2 + 2\sigma_s^2`
  for the sum), is maximised by solving its score equations;
  :math:`\operatorname{Var}(\hat\beta_\text{Treat}) = [(X^\top \Sigma^{-1} X)^{-1}]_\text{Treat}` at the
  estimates. sympy shows :math:`\hat\sigma^2 = s_d^2 / 2`, :math:`\operatorname{se}(\text{Treat}) = s_d / \sqrt{G}`
  and :math:`t_\text{REML} - t_\text{paired} = 0`, with the :math:`y_{ij}` left as symbols.
* :func:`paired_equivalence_general` (any number :math:`G` of pairs): the same argument with :math:`G` a
  symbol, from the block identities for :math:`m = 2` and the pairs' sufficient statistics.

The equality needs an interior REML estimate, :math:`\hat\sigma_s^2 \ge 0` (the pairs' sums vary more than
their differences); at a boundary fit (:math:`\hat\sigma_s = 0`) lmer's t is the unpaired one.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.stats
import sympy as sp

from .derivation import Derivation, m, random_intercept_block, sigma, sigma_s
from .errors import DataError
from .paired import within_centred
from .specification import DataLike, read_data, specify

#: the two eigenvalues of a pair's block :math:`\sigma^2 I_2 + \sigma_s^2 J_2` (difference and sum directions)
a, b = sp.symbols("a b", positive=True)
_EIGEN = {sigma: sp.sqrt(a), sigma_s: sp.sqrt((b - a) / 2)}


# ------------------------------------------------------------------------------------ least squares
@dataclass(frozen=True)
class OLSFit:
    """Ordinary least squares of y on 1 + x: estimates, standard errors, t, p and the confidence band."""

    x_name: str
    y_name: str
    params: pd.Series
    bse: pd.Series
    tvalues: pd.Series
    pvalues: pd.Series
    df: int
    sigma: float
    x: np.ndarray = field(repr=False)
    y: np.ndarray = field(repr=False)

    @property
    def residuals(self) -> np.ndarray:
        return self.y - self.predict(self.x)

    def predict(self, x) -> np.ndarray:
        x = np.asarray(x, dtype=float)
        return self.params.iloc[0] + self.params.iloc[1] * x

    def band(self, x, level: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(fit, lower, upper): the confidence band of the mean response at x (t quantile, ``df``)."""
        x = np.asarray(x, dtype=float)
        fit = self.predict(x)
        if self.df <= 0:
            return fit, np.full_like(fit, np.nan), np.full_like(fit, np.nan)
        xbar, sxx = self.x.mean(), float(((self.x - self.x.mean()) ** 2).sum())
        se = self.sigma * np.sqrt(1.0 / len(self.x) + (x - xbar) ** 2 / sxx)
        q = scipy.stats.t.ppf(0.5 + level / 2, self.df)
        return fit, fit - q * se, fit + q * se

    def table(self) -> pd.DataFrame:
        return pd.DataFrame({"Estimate": self.params, "Std. Error": self.bse, "t value": self.tvalues,
                             "Pr(>|t|)": self.pvalues})


def ols(data: DataLike, x: str, y: str, df: int | None = None) -> OLSFit:
    r"""R's ``lm(y ~ x)``; ``df`` overrides the residual degrees of freedom (:math:`n - 2` by default)."""
    frame = read_data(data)
    for col in (x, y):
        if col not in frame.columns:
            raise DataError(f"unknown column {col!r}; the data has {', '.join(map(str, frame.columns))}")
    xv, yv = frame[x].to_numpy(dtype=float), frame[y].to_numpy(dtype=float)
    if np.ptp(xv) == 0:
        raise DataError(f"{x!r} is constant: a slope cannot be estimated")
    X = np.column_stack([np.ones_like(xv), xv])
    coef, *_ = np.linalg.lstsq(X, yv, rcond=None)
    resid = yv - X @ coef
    df = len(yv) - 2 if df is None else int(df)
    s2 = float(resid @ resid) / df if df > 0 else np.nan
    bse = np.sqrt(s2 * np.diag(np.linalg.inv(X.T @ X)))
    with np.errstate(divide="ignore", invalid="ignore"):
        t = coef / bse
    p = 2 * scipy.stats.t.sf(np.abs(t), df) if df > 0 else np.full(2, np.nan)
    names = ["(Intercept)", x]
    series = lambda v: pd.Series(np.asarray(v, dtype=float), index=names)  # noqa: E731
    return OLSFit(x_name=x, y_name=y, params=series(coef), bse=series(bse), tvalues=series(t),
                  pvalues=series(p), df=df, sigma=float(np.sqrt(s2)), x=xv, y=yv)


def resp_std_regression(data: DataLike, response: str = "Resp", treatment: str = "Treat",
                        subject: str = "Ind") -> pd.DataFrame:
    r"""The tutorial's Resp_std trick: OLS of the within-centred response on the treatment.

    One row with the naive residual df (:math:`n - 2`) and one with the df corrected for the :math:`G`
    subject means removed by the centring (:math:`n - G - 1`); the corrected t is the paired t.
    """
    frame = within_centred(data, response, subject)
    G = frame[subject].nunique()
    n = len(frame)
    rows = {}
    for label, df in ((f"naive df = n - 2 = {n - 2}", n - 2), (f"corrected df = n - G - 1 = {n - G - 1}", n - G - 1)):
        fit = ols(frame, treatment, f"{response}_std", df=df)
        rows[label] = {"estimate": fit.params[treatment], "std_error": fit.bse[treatment],
                       "t": fit.tvalues[treatment], "df": df, "p_value": fit.pvalues[treatment]}
    return pd.DataFrame(rows).T


# ------------------------------------------------------------------------ paired t = REML, G pairs
def pairs_data(n_pairs: int) -> pd.DataFrame:
    r"""A paired design with ``n_pairs`` individuals (Treat 0 then 1 each), as the toy data is laid out.

    The responses are placeholders: for up to 100 pairs :func:`~lmm_symbolic.derive` keeps them as symbols
    :math:`y_{ij}`."""
    if n_pairs < 2:
        raise DataError("a paired design needs at least 2 pairs")
    G = int(n_pairs)
    return pd.DataFrame({"Treat": [0, 1] * G, "Resp": np.arange(1.0, 2 * G + 1) ** 2,
                         "Ind": pd.Categorical(np.repeat([f"{j + 1:02d}" for j in range(G)], 2))})


@dataclass(frozen=True)
class PairedEquivalence:
    r"""The REML fit of a paired design with symbolic responses, and its t next to the paired t.

    ``sigma2``, ``sigma_s2`` are the REML estimates (polynomials in the :math:`y_{ij}`), ``beta`` the GLS
    estimates, ``var_treat`` the variance of :math:`\hat\beta_\text{Treat}` as a function of
    :math:`a = \sigma^2` and at the estimates, ``t_reml`` and ``t_paired`` the two t statistics and
    ``difference`` their simplified difference (0).
    """

    n_pairs: int
    derivation: Derivation = field(repr=False)
    differences: tuple[sp.Expr, ...]
    beta: dict
    sigma2: sp.Expr
    sigma_s2: sp.Expr
    var_treat_in_a: sp.Expr
    var_treat: sp.Expr
    sd2: sp.Expr
    t_reml: sp.Expr
    t_paired: sp.Expr
    sigma2_minus_half_sd2: sp.Expr
    var_minus_sd2_over_G: sp.Expr
    difference: sp.Expr

    @property
    def proved(self) -> bool:
        return self.difference == 0 and self.sigma2_minus_half_sd2 == 0 and self.var_minus_sd2_over_G == 0

    def _repr_latex_(self) -> str:
        G = self.n_pairs
        names = self.derivation._names
        lat = lambda e: sp.latex(e, symbol_names=names)  # noqa: E731
        treat = self.derivation.symbols.beta[-1]
        # d_j = y_2j - y_1j written in that order (sympy would print -y_1j + y_2j)
        def signed(x):
            terms = sp.Add.make_args(x)
            pos = [lat(t) for t in terms if not t.could_extract_minus_sign()]
            return " + ".join(pos) + "".join(f" - {lat(-t)}" for t in terms if t.could_extract_minus_sign())
        diffs = [signed(x) for x in self.differences]
        mean = (rf"\tfrac{{1}}{{{G}}}\left(" + " + ".join(f"d_{{{j + 1}}}" for j in range(G)) + r"\right)"
                if sp.expand(G * self.beta[treat] - sp.Add(*self.differences)) == 0 else lat(self.beta[treat]))
        lines = [
            rf"\text{{{G} pairs, }} d_j = y_{{2j}} - y_{{1j}}:\ "
            + r",\ ".join(f"d_{{{j + 1}}} = {x}" for j, x in enumerate(diffs)),
            rf"\hat\beta_{{\mathrm{{Treat}}}} = {mean} = \bar d",
            rf"\hat\sigma^2_{{\mathrm{{REML}}}} - \tfrac{{1}}{{2}} s_d^2 = {lat(self.sigma2_minus_half_sd2)}",
            rf"\operatorname{{var}}(\hat\beta_{{\mathrm{{Treat}}}}) = {sp.latex(self.var_treat_in_a.subs(a, sigma**2))}"
            rf",\quad \operatorname{{var}}(\hat\beta_{{\mathrm{{Treat}}}}) - s_d^2/{G} = {lat(self.var_minus_sd2_over_G)}",
            rf"t_{{\mathrm{{REML}}}} - t_{{\mathrm{{paired}}}} = {lat(self.difference)}",
        ]
        return r"$$\begin{aligned}" + r" \\ ".join("&" + s for s in lines) + r"\end{aligned}$$"


def paired_equivalence(n_pairs: int) -> PairedEquivalence:
    r"""Prove with sympy, responses symbolic, that the REML t of Treat equals the paired t for :math:`G` pairs.

    Steps, each on the package's :class:`~lmm_symbolic.derivation.Derivation` of ``Resp ~ Treat + (1|Ind)``:

    1. :math:`\hat\beta` solves :math:`\partial \log L / \partial\beta = 0` (Eq. 10); it comes out free of
       :math:`\sigma` and :math:`\sigma_s` (balance).
    2. The REML log-likelihood at :math:`\hat\beta`, written in :math:`a = \sigma^2`,
       :math:`b = \sigma^2 + 2\sigma_s^2` (the two eigenvalues of a pair's block), separates; each score
       equation is solved for its own parameter.
    3. :math:`\operatorname{Var}(\hat\beta_\text{Treat}) = [(X^\top \Sigma^{-1} X)^{-1}]_\text{Treat}`, with
       :math:`X^\top \Sigma^{-1} X` from the derivation, is :math:`2a/G`.
    4. :math:`t_\text{REML} = \hat\beta_\text{Treat} / \sqrt{\operatorname{Var}}` and
       :math:`t_\text{paired} = \bar d / (s_d / \sqrt{G})` are compared.

    Each difference is expanded to the polynomial 0 (an exact proof, not a numerical check).
    """
    G = int(n_pairs)
    d = Derivation(specify("Resp ~ Treat + (1|Ind)", pairs_data(G)))
    beta = d.symbols.beta
    # 1. GLS from the score in beta of the derived log-likelihood
    beta_hat = sp.solve([sp.diff(d.loglik, bk) for bk in beta], beta, dict=True)[0]
    # 2. REML in the eigenvalues a, b: each score equation involves its own parameter only
    reml = sp.expand(sp.expand(sp.expand_log(d.reml_loglik.subs(_EIGEN), force=True)).subs(beta_hat))
    est = {}
    for v in (a, b):
        score = sp.expand(sp.numer(sp.together(sp.diff(reml, v))))
        roots = sp.solve(score, v)
        if len(roots) != 1:
            raise ArithmeticError(f"the REML score equation in {v} has roots {roots}")
        est[v] = sp.expand(roots[0])
    sigma2, sigma_s2 = est[a], sp.expand((est[b] - est[a]) / 2)
    # 3. the variance of beta_Treat from X^T Sigma^-1 X
    info = d.gls_information.subs(_EIGEN)
    var_in_a = sp.factor(info.inv()[len(beta) - 1, len(beta) - 1])
    var = sp.expand(var_in_a.subs({a: sigma2, b: est[b]}))
    # 4. the paired t on the same symbols
    codes, position = d.groups.codes, d.groups.position
    y = {(int(i), int(j)): s for s, i, j in zip(d.symbols.y, position, codes)}
    diffs = tuple(y[(1, j)] - y[(0, j)] for j in range(G))
    dbar = sp.Add(*diffs) / G
    sd2 = sp.expand(sp.Add(*[(x - dbar) ** 2 for x in diffs]) / (G - 1))
    treat = beta[-1]
    t_reml = beta_hat[treat] / sp.sqrt(var)
    t_paired = dbar / sp.sqrt(sd2 / G)
    return PairedEquivalence(
        n_pairs=G, derivation=d, differences=diffs, beta=beta_hat, sigma2=sigma2, sigma_s2=sigma_s2,
        var_treat_in_a=var_in_a, var_treat=var, sd2=sd2, t_reml=t_reml, t_paired=t_paired,
        sigma2_minus_half_sd2=sp.expand(sigma2 - sd2 / 2), var_minus_sd2_over_G=sp.expand(var - sd2 / G),
        difference=sp.simplify(sp.expand(t_reml - t_paired)))


# ----------------------------------------------------------------------- paired t = REML, any G
@dataclass(frozen=True)
class GeneralPairedEquivalence:
    r"""The paired-design argument with the number of pairs :math:`G` a symbol.

    ``pair_quadratic`` is one pair's quadratic form from the block identities (:math:`m = 2`) in the
    residuals' difference :math:`D` and sum :math:`S`; ``reml_loglik`` the REML log-likelihood in :math:`a`,
    :math:`b` and the statistics :math:`\mathrm{SSD} = \sum (d_j - \bar d)^2`,
    :math:`\mathrm{SSS} = \sum (s_j - \bar s)^2`; ``sigma2_ml``, ``sigma2_reml`` the two estimates of
    :math:`\sigma^2` (:math:`\mathrm{SSD}/(2G)` and :math:`\mathrm{SSD}/(2(G-1))`); ``difference``
    :math:`= t_\text{REML} - t_\text{paired}`, simplified (0).
    """

    G: sp.Symbol
    pair_det: sp.Expr
    pair_quadratic: sp.Expr
    information: sp.Matrix
    loglik: sp.Expr
    reml_loglik: sp.Expr
    sigma2_ml: sp.Expr
    sigma2_reml: sp.Expr
    var_treat: sp.Expr
    t_reml: sp.Expr
    t_paired: sp.Expr
    difference: sp.Expr

    def _repr_latex_(self) -> str:
        lines = [
            r"|\Sigma_j| = " + sp.latex(self.pair_det),
            r"(r_j)^T \Sigma_j^{-1} r_j = " + sp.latex(self.pair_quadratic),
            r"\ell_{\mathrm{REML}}(a, b) = " + _collected_latex(self.reml_loglik, (sp.log(a), sp.log(b)),
                                                         2 * sp.pi),
            r"\hat\sigma^2_{\mathrm{ML}} = " + sp.latex(self.sigma2_ml) + r",\quad \hat\sigma^2_{\mathrm{REML}} = "
            + sp.latex(self.sigma2_reml),
            r"\operatorname{var}(\hat\beta_{\mathrm{Treat}}) = " + sp.latex(self.var_treat),
            r"t_{\mathrm{REML}} = " + sp.latex(self.t_reml) + r",\quad t_{\mathrm{paired}} = " + sp.latex(self.t_paired),
            r"t_{\mathrm{REML}} - t_{\mathrm{paired}} = " + sp.latex(self.difference),
        ]
        return r"$$\begin{aligned}" + r" \\ ".join("&" + s for s in lines) + r"\end{aligned}$$"


def _coefficient_latex(c: sp.Expr, body: str, first: bool) -> str:
    """`` - \\tfrac{G - 1}{2} \\log a``: one term, sign first, a fractional coefficient as \\tfrac."""
    neg = c.could_extract_minus_sign()
    c = sp.factor(-c if neg else c)
    num, den = sp.fraction(c)
    if den == 1:
        mag = "" if num == 1 else (rf"\left({sp.latex(num)}\right)" if isinstance(num, sp.Add) else sp.latex(num))
    else:
        mag = rf"\tfrac{{{sp.latex(num)}}}{{{sp.latex(den)}}}"
    sign = ("-" if neg else "") if first else (" - " if neg else " + ")
    return f"{sign}{mag}{' ' if mag else ''}{body}"


def _log_latex(e: sp.Expr) -> str:
    """log a, log 2 pi: the log of a symbol or a product without sympy's parentheses."""
    return r"\log " + sp.latex(e.args[0]) if isinstance(e, sp.log) and e.args[0].is_Atom else sp.latex(e)


def _collected_latex(expr: sp.Expr, logs: tuple, constant: sp.Expr) -> str:
    """A log-likelihood written as a reader collects it, on two aligned lines: c_1 log a + c_2 log b +
    c log(2 pi), then the other terms (``constant`` is 2 pi, whose log sympy splits). Checked to equal ``expr``."""
    expr = sp.expand(sp.expand_log(expr, force=True))
    log_c = sp.expand_log(sp.log(constant), force=True)
    parts = [(sp.factor(expr.coeff(lg)), lg, _log_latex(lg)) for lg in logs]
    parts.append((sp.factor(expr.coeff(sp.log(sp.pi))), log_c, r"\log " + sp.latex(constant)))
    parts = [p for p in parts if p[0] != 0]
    rest = sp.expand(expr - sum(c * v for c, v, _ in parts))
    if sp.expand(sum(c * v for c, v, _ in parts) + rest - expr) != 0:
        raise ArithmeticError("the collected form differs from the expression")
    head = "".join(_coefficient_latex(c, body, i == 0) for i, (c, _, body) in enumerate(parts))
    terms = sorted(sp.Add.make_args(rest), key=lambda t: t.has(sp.log))   # the log of a constant last
    tail = " ".join(lat if lat.startswith("-") else "+ " + lat
                    for lat in (_log_latex(t) if isinstance(t, sp.log) else
                                ("- " + _log_latex(-t) if isinstance(-t, sp.log) else sp.latex(t)) for t in terms))
    return head + r" \\ &\qquad " + tail


def paired_equivalence_general() -> GeneralPairedEquivalence:
    r"""The REML t of Treat equals the paired t for any number :math:`G` of pairs (:math:`G` a sympy symbol).

    From the package's block identities for a group of size :math:`m = 2` (determinant lemma and Woodbury):
    with a pair's residuals :math:`r_1, r_2`, :math:`D = r_2 - r_1` and :math:`S = r_1 + r_2`, sympy rewrites
    the block's quadratic form as :math:`D^2/(2a) + S^2/(2b)`, :math:`a = \sigma^2`,
    :math:`b = \sigma^2 + 2\sigma_s^2`, and its determinant as :math:`ab`. The form is linear in :math:`D^2`
    and :math:`S^2`, so summed over the pairs it needs only

    .. math::

        \sum_j (d_j - \beta_1)^2 &= \mathrm{SSD} + G (\bar d - \beta_1)^2, \\
        \sum_j (s_j - \gamma)^2 &= \mathrm{SSS} + G (\bar s - \gamma)^2

    (:math:`\gamma = 2\beta_0 + \beta_1`). :math:`X^\top \Sigma^{-1} X = G\, X_j^\top \Sigma_j^{-1} X_j` with
    :math:`\Sigma_j^{-1}` from Woodbury. The score equations are then solved with :math:`G` symbolic.
    """
    block = random_intercept_block()
    G = sp.Symbol("G", positive=True, integer=True)
    D, S, SSD, SSS, dbar, sbar = sp.symbols("D S SSD SSS dbar sbar", real=True)
    beta0, beta1, gamma = sp.symbols("beta_0 beta_1 gamma", real=True)
    r1, r2 = (S - D) / 2, (S + D) / 2
    quad = block.quadratic.subs({block.R2: r1**2 + r2**2, block.Zr[0, 0]: r1 + r2, m: 2})
    quad = sp.expand(sp.simplify(quad.subs(_EIGEN)))
    det = sp.factor(block.det.subs(m, 2).subs(_EIGEN))
    coeff_D, coeff_S = quad.coeff(D, 2), quad.coeff(S, 2)
    if sp.simplify(quad - coeff_D * D**2 - coeff_S * S**2) != 0:
        raise ArithmeticError("a pair's quadratic form is not linear in D^2 and S^2")
    # summed over the G pairs, at the residuals of the means model (d_j - beta_1, s_j - gamma)
    total = coeff_D * (SSD + G * (dbar - beta1) ** 2) + coeff_S * (SSS + G * (sbar - gamma) ** 2)
    logdet = G * sp.expand_log(sp.log(det), force=True)
    loglik = -G * sp.log(2 * sp.pi) - logdet / 2 - total / 2
    # X^T Sigma^-1 X in (beta_0, beta_1): G X_j^T Sigma_j^-1 X_j, Sigma_j^-1 = (I - W J) / sigma^2
    W = block.W[0, 0].subs(m, 2)
    Sigma_inv = ((sp.eye(2) - W * sp.ones(2, 2)) / sigma**2).subs(_EIGEN)
    Xj = sp.Matrix([[1, 0], [1, 1]])
    info = (G * Xj.T * Sigma_inv * Xj).applyfunc(sp.factor)
    at_gls = {beta1: dbar, gamma: sbar}  # the GLS estimates maximise log L in beta_1 and gamma
    profiled = loglik.subs(at_gls)
    reml = sp.expand(profiled - sp.expand_log(sp.log(sp.factor(info.det())), force=True) / 2
                     + sp.log(2 * sp.pi))
    sigma2_ml = sp.solve(sp.diff(profiled, a), a)[0]
    sigma2_reml = sp.solve(sp.diff(reml, a), a)[0]
    var = sp.factor(info.inv()[1, 1])
    var_at = sp.simplify(var.subs(a, sigma2_reml))
    t_reml = dbar / sp.sqrt(var_at)
    t_paired = dbar / (sp.sqrt(SSD / (G - 1)) / sp.sqrt(G))
    return GeneralPairedEquivalence(
        G=G, pair_det=det, pair_quadratic=quad, information=info, loglik=loglik, reml_loglik=reml,
        sigma2_ml=sigma2_ml, sigma2_reml=sigma2_reml, var_treat=var, t_reml=sp.simplify(t_reml),
        t_paired=sp.simplify(t_paired), difference=sp.simplify(t_reml - t_paired))


__all__ = ["GeneralPairedEquivalence", "OLSFit", "PairedEquivalence", "a", "b", "ols", "pairs_data",
           "paired_equivalence", "paired_equivalence_general", "resp_std_regression"]
