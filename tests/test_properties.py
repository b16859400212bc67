"""Property tests on random unbalanced designs nobody picked by hand (issue 8).

* the compiled closed-form log-likelihood (Eq. 10 over per-group statistics) and the profiled ML deviance
  and REML criterion equal scipy's dense ``multivariate_normal.logpdf`` to 1e-9 relative;
* the derived |Sigma|, Sigma^-1 and quadratic form equal dense sympy ``det()`` / ``inv()`` exactly;
* the fit's derivative vanishes at an interior optimum (and points inward at a boundary one);
* the fit's ML log-likelihood is never below statsmodels' MixedLM on the same data.

Designs: 1-30 groups of 1-15 observations, 1-4 fixed effects (intercept, covariates varying within groups,
one constant within groups), random intercepts. Example counts are modest so the suite stays fast.
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import sympy as sp
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

import lmm_symbolic as lmm
from lmm_symbolic.compilation import LogLikelihood, ProfiledDeviance
from lmm_symbolic.errors import LMMWarning
from lmm_symbolic.statistics import GroupStatistics

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
                derandomize=True)


# ------------------------------------------------------------------------------------- designs
@st.composite
def designs(draw, max_groups=30, max_size=15, min_groups=1):
    """(y, X, codes, G): an unbalanced random-intercept design in shuffled row order, X of full rank."""
    G = draw(st.integers(min_groups, max_groups))
    sizes = np.array(draw(st.lists(st.integers(1, max_size), min_size=G, max_size=G)))
    p = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**32 - 1))
    sigma = draw(st.floats(0.2, 5.0))
    sigma_s = draw(st.sampled_from([0.0, 0.05, 0.5, 1.0, 3.0]))
    rng = np.random.default_rng(seed)
    codes = rng.permutation(np.repeat(np.arange(G), sizes))
    n = len(codes)
    columns = [np.ones(n)]
    if p >= 2:
        columns.append(rng.normal(size=G)[codes])          # a between-group covariate
    while len(columns) < p:
        columns.append(rng.normal(scale=2.0, size=n))      # within-group covariates
    X = np.column_stack(columns)
    assume(n > p and np.linalg.matrix_rank(X) == p)
    beta = rng.normal(scale=3.0, size=p)
    y = X @ beta + sigma_s * rng.normal(size=G)[codes] + sigma * rng.normal(size=n)
    return y, X, codes, G


def dense_sigma(codes, sigma, sigma_s):
    same = codes[:, None] == codes[None, :]
    return sigma**2 * np.eye(len(codes)) + sigma_s**2 * same


def dense_profiled(y, X, codes, theta, reml):
    """-2 log L (ML) or the REML criterion at theta, beta and sigma^2 profiled out, from dense matrices and
    scipy's multivariate normal density: REML = -2 [log N(y; X b, S) - 1/2 log|X^T S^-1 X| + p/2 log 2 pi]."""
    n, p = X.shape
    V = dense_sigma(codes, 1.0, theta)
    Vinv = np.linalg.inv(V)
    A = X.T @ Vinv @ X
    beta = np.linalg.solve(A, X.T @ Vinv @ y)
    r = y - X @ beta
    s2 = float(r @ Vinv @ r) / (n - p if reml else n)
    ll = scipy.stats.multivariate_normal.logpdf(y, X @ beta, s2 * V)
    if reml:
        ll += -0.5 * np.linalg.slogdet(A / s2)[1] + p / 2 * np.log(2 * np.pi)
    return -2.0 * ll


# -------------------------------------------------------------------- closed forms vs dense scipy
@settings(max_examples=60, **SETTINGS)
@given(designs(), st.floats(0.1, 10.0), st.sampled_from([0.0, 0.01, 0.3, 1.0, 4.0]), st.integers(0, 2**16))
def test_closed_form_loglik_equals_dense_multivariate_normal(design, sig, sig_s, seed):
    y, X, codes, G = design
    beta = np.random.default_rng(seed).normal(scale=3.0, size=X.shape[1])
    compiled = LogLikelihood(GroupStatistics.from_arrays(y, X, codes, G))(sig, sig_s, beta)
    dense = scipy.stats.multivariate_normal.logpdf(y, X @ beta, dense_sigma(codes, sig, sig_s))
    assert compiled == pytest.approx(dense, rel=1e-9, abs=1e-9)


@settings(max_examples=60, **SETTINGS)
@given(designs(), st.sampled_from([0.0, 0.02, 0.4, 1.0, 2.5, 9.0]), st.booleans())
def test_profiled_deviance_and_reml_criterion_equal_dense_values(design, theta, reml):
    y, X, codes, G = design
    stats = GroupStatistics.from_arrays(y, X, codes, G)
    objective = ProfiledDeviance(stats, reml)
    # the criterion works on the response (y - shift) / scale: -2 log L gains 2 n_eff log(scale) back
    compiled = objective(theta) + 2 * objective.n_eff * np.log(stats.scale)
    assert compiled == pytest.approx(dense_profiled(y, X, codes, theta, reml), rel=1e-9, abs=1e-9)


# ------------------------------------------------------------------- symbolic vs dense sympy
def _exactly_zero(expr) -> bool:
    """cancel() brings a rational function to lowest terms, so it is 0 exactly when the function is 0;
    simplify() is the fallback for anything cancel leaves."""
    return sp.cancel(expr) == 0 or sp.simplify(expr) == 0


@st.composite
def small_frames(draw):
    """A data frame of at most 12 observations in 2-5 groups (n > groups), integer covariate, shuffled."""
    G = draw(st.integers(2, 5))
    sizes = draw(st.lists(st.integers(1, 8), min_size=G, max_size=G).filter(lambda s: G < sum(s) <= 12))
    order = draw(st.permutations(range(sum(sizes))))
    labels = np.repeat([f"G{k}" for k in range(G)], sizes)[list(order)]
    n = len(labels)
    x = draw(st.lists(st.integers(-4, 4), min_size=n, max_size=n))
    y = draw(st.lists(st.integers(-50, 50), min_size=n, max_size=n))
    covariate = draw(st.booleans())
    return pd.DataFrame({"y": np.array(y) / 4, "x": x, "g": labels}), covariate


@settings(max_examples=25, **SETTINGS)
@given(small_frames())
def test_derived_det_inverse_and_quadratic_form_equal_dense_sympy(case):
    df, covariate = case
    formula = "y ~ x + (1|g)" if covariate else "y ~ 1 + (1|g)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LMMWarning)  # an x aliased with the intercept is dropped, fine
        d = lmm.derive(formula, df)
    s, ss = d.symbols.sigma, d.symbols.sigma_s
    g = df["g"].to_numpy()
    n = len(g)
    Sigma = sp.Matrix(n, n, lambda i, j: (s**2 if i == j else 0) + (ss**2 if g[i] == g[j] else 0))
    assert sp.simplify(d.det - Sigma.det()) == 0
    inverse = Sigma.inv()
    assert d.inverse.shape == (n, n)
    assert all(_exactly_zero(v) for v in (d.inverse - inverse))
    names = d.design.fixed_names
    X = sp.Matrix([[1 if name == "(Intercept)" else int(df["x"].iloc[i]) for name in names] for i in range(n)])
    r = sp.Matrix(d.symbols.y) - X * sp.Matrix(d.symbols.beta)
    assert _exactly_zero(d.quadratic_form - (r.T * inverse * r)[0, 0])


# ------------------------------------------------------------------------------------ the fit
def _frame(y, X, codes) -> tuple[pd.DataFrame, str]:
    cols = {f"x{k}": X[:, k] for k in range(1, X.shape[1])}
    df = pd.DataFrame({"y": y, **cols, "g": codes})
    return df, "y ~ " + " + ".join(["1", *cols]) + " + (1|g)"


fit_designs = designs(min_groups=2).filter(lambda d: len(d[0]) > d[3] + 1)


@settings(max_examples=40, **SETTINGS)
@given(fit_designs, st.sampled_from(["ML", "REML"]))
def test_the_fits_derivative_vanishes_at_an_interior_optimum(design, method):
    y, X, codes, G = design
    df, formula = _frame(y, X, codes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LMMWarning)
        fit = lmm.fit(formula, df, method=method, exact=False)
    assert fit.converged
    stats = GroupStatistics.from_arrays(y, X, codes, G)
    objective = ProfiledDeviance(stats, method == "REML")
    theta = fit.sigma_s / fit.sigma
    slope = objective.derivative(objective.state(theta))
    event(f"{'interior' if theta > 1e-3 else 'boundary'} optimum, {'10+' if G >= 10 else '2-9'} groups")
    if theta > 1e-3:  # interior: d'(theta) = 0, by the analytic derivative and by central differences
        h = 1e-5 * theta
        central = (objective(theta + h) - objective(theta - h)) / (2 * h)
        assert abs(slope) * theta < 1e-6 * max(1.0, abs(objective(theta)))
        assert abs(central) * theta < 1e-5 * max(1.0, abs(objective(theta)))
        if method == "ML":  # and the full log-likelihood's sympy gradient in (sigma, sigma_s, beta)
            grad = LogLikelihood(stats).gradient(fit.sigma, fit.sigma_s, fit.params.to_numpy())
            size = np.concatenate([[fit.sigma, fit.sigma_s], fit.bse.to_numpy()])
            assert np.all(np.abs(grad * size) < 1e-5 * max(1.0, abs(fit.loglik))), grad * size
    else:  # at the boundary theta = 0 the criterion must not fall moving inward; d'(0) = 0 always (the
        # criterion depends on theta^2), so look at the values themselves
        assert theta == 0.0 and fit.singular
        f0 = objective(0.0)
        assert slope >= -1e-6 * max(1.0, abs(f0))
        assert all(objective(t) >= f0 - 1e-9 * max(1.0, abs(f0)) for t in np.geomspace(1e-4, 1e2, 25))


@settings(max_examples=40, **SETTINGS)
@given(fit_designs)
def test_the_ml_loglik_is_never_below_statsmodels(design):
    from statsmodels.regression.mixed_linear_model import MixedLM

    y, X, codes, G = design
    df, formula = _frame(y, X, codes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = lmm.fit(formula, df, method="ML", exact=False)
        try:
            sm = MixedLM(y, X, groups=codes).fit(reml=False)
        except (np.linalg.LinAlgError, ValueError):
            assume(False)
    assume(np.isfinite(sm.llf))
    assert fit.loglik >= sm.llf - 1e-6 * abs(sm.llf)


def test_a_boundary_that_is_a_maximum_along_theta_is_left():
    """Found by the statsmodels property: L-BFGS-B stepped from theta = 1 to the bound theta = 0, where the
    derivative is 0 by symmetry, and stopped at a maximum along theta (logLik -7.12406 against statsmodels'
    -7.07944 at theta = 0.451)."""
    y = np.array([1.6187004, 1.26178131, -0.38903488, -0.95072112, -0.30857411])
    df = pd.DataFrame({"y": y, "g": [1, 1, 1, 0, 0]})
    fit = lmm.fit("y ~ 1 + (1|g)", df, method="ML", exact=False)
    assert fit.converged and not fit.singular
    assert fit.sigma_s / fit.sigma == pytest.approx(0.451115, rel=1e-5)
    assert fit.loglik == pytest.approx(-7.0794398430812, rel=1e-12)


@st.composite
def balanced_frames(draw):
    """Equal group sizes, a within-group covariate with one pattern (rows shuffled), perhaps a between-group
    covariate, with or without the intercept: the designs on which ``fit`` may solve the score equations."""
    G, size = draw(st.integers(2, 6)), draw(st.integers(2, 4))
    pattern = draw(st.lists(st.integers(-3, 3), min_size=size, max_size=size).filter(lambda v: len(set(v)) > 1))
    between = draw(st.lists(st.integers(-5, 5), min_size=G, max_size=G))
    n = G * size
    order = draw(st.permutations(range(n)))
    y = draw(st.lists(st.integers(-40, 40), min_size=n, max_size=n))
    codes = np.repeat(np.arange(G), size)[list(order)]
    x = np.tile(pattern, G)[list(order)]
    df = pd.DataFrame({"y": np.array(y) / 4, "x": x, "w": np.array(between)[codes], "g": codes})
    terms = draw(st.sampled_from(["1 + x", "0 + x", "1 + x + w", "0 + x + w", "1 + w", "1"]))
    return df, f"y ~ {terms} + (1|g)"


@settings(max_examples=30, **SETTINGS)
@given(balanced_frames(), st.sampled_from(["ML", "REML"]))
def test_exact_estimates_when_given_equal_the_numeric_optimum(case, method):
    df, formula = case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LMMWarning)
        try:
            fit = lmm.fit(formula, df, method=method)
        except lmm.LMMError:
            assume(False)
    event("exact" if fit.exact is not None else "no exact solution")
    if fit.exact is None:
        return
    ex = fit.exact
    assert float(ex.sigma2) == pytest.approx(fit.sigma**2, rel=1e-6)
    assert float(ex.sigma_s2) == pytest.approx(fit.sigma_s**2, rel=1e-6, abs=1e-9 * fit.sigma**2)
    np.testing.assert_allclose([float(b) for b in ex.beta], fit.params, rtol=1e-6, atol=1e-9)


def test_no_exact_estimates_when_gls_differs_from_ols():
    """``y ~ 0 + x + (1|g)`` with x varying within groups: equal sizes and one pattern, but without the
    intercept col(X) is not invariant under Sigma, GLS != OLS, and OLS-based 'exact' values were wrong
    (beta 1.712 against the optimum's 2.067)."""
    rng = np.random.default_rng(3)
    codes = np.repeat(np.arange(6), 2)
    x = np.tile([1.0, 2.0], 6)
    y = (2 * x + 2 * rng.normal(size=6)[codes] + rng.normal(size=12)).round(2)
    df = pd.DataFrame({"y": y, "x": x, "g": codes})
    for method in ("ML", "REML"):
        assert lmm.fit("y ~ 0 + x + (1|g)", df, method=method).exact is None
        shuffled = df.sample(frac=1.0, random_state=1)
        assert lmm.fit("y ~ 1 + x + (1|g)", shuffled, method=method).exact is not None
