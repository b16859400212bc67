"""Slopes, nested and crossed terms: the per-group q x q closed forms and the sparse general form.

* :func:`block_forms` (the LDL^T pivots of M_g = I + T^T S T and W_g = T M_g^-1 T^T) equal the determinant
  lemma and Woodbury forms of :func:`block_identities` and brute-force dense sympy on a concrete group;
* :class:`BlockDeviance`, :class:`SparseDeviance` and a dense numpy profiled deviance (V = I + Z L L^T Z^T
  written out, ``slogdet``, GLS) agree on random designs, and their analytic gradients equal central
  differences;
* the Satterthwaite Hessian (analytic gradient differenced) equals a full finite-difference Hessian;
* a stop at a theta bound that is not a minimum is left for a better interior point.
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import sympy as sp
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import lmm_symbolic as lmm
from lmm_symbolic.compilation import (BlockDeviance, DenseDeviance, SparseDeviance, ThetaDeviance, difference_hessian, block_forms, block_symbols,
                                      profiled_deviance, relative_factor)
from lmm_symbolic.derivation import block_identities, m, sigma
from lmm_symbolic.optimisation import _inward_of_the_bound, optimise
from lmm_symbolic.specification import random_effects_matrix, specify
from lmm_symbolic.statistics import BlockStatistics

SETTINGS = dict(deadline=None, max_examples=25, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


# ---------------------------------------------------------------------------------- closed forms
@pytest.mark.parametrize("qs", [(2,), (1, 1)])
def test_block_forms_equal_the_lemma_and_woodbury(qs):
    f = block_forms(qs)
    T, _ = relative_factor(qs)
    ident = block_identities(T * T.T, f.S, sp.Matrix(sp.symbols(f"z_0:{T.shape[0]}")), f.thetas)
    lemma = sp.simplify((ident.logdet - 2 * m * sp.log(sigma)).subs(sigma, 1))
    assert sp.simplify(sp.exp(f.logdet) - sp.exp(lemma)) == 0
    assert sp.simplify(f.W - ident.W.subs(sigma, 1)) == sp.zeros(*f.W.shape)


def test_block_forms_equal_dense_sympy_on_a_group():
    """A group of four days: |I_4 + Z T T^T Z^T| and (I_4 + Z T T^T Z^T)^-1 written out by sympy."""
    f = block_forms((2,))
    Z = sp.Matrix([[1, 0], [1, 1], [1, 2], [1, 5]])
    S = Z.T * Z
    at = {f.S[a, b]: S[a, b] for a in range(2) for b in range(2)}
    V = sp.eye(4) + Z * f.T * f.T.T * Z.T
    assert sp.simplify(sp.exp(f.logdet.subs(at)) - V.det()) == 0
    Vinv = sp.eye(4) - Z * f.W.subs(at) * Z.T
    assert sp.simplify(Vinv * V - sp.eye(4)) == sp.zeros(4, 4)


@pytest.mark.parametrize("qs", [(2,), (1, 1), (3,)])
def test_block_form_derivatives_equal_sympys_diff(qs):
    """tr(M^-1 dM) and the d(T M^-1 T^T) identity equal sp.diff of log|M_g| and W_g, at random points."""
    f = block_forms(qs)
    rng = np.random.default_rng(len(qs) + sum(qs))
    q = f.T.shape[0]
    Z = sp.Matrix(rng.integers(-3, 4, size=(q + 2, q)))
    at = {**{t: sp.Rational(int(v), 7) for t, v in zip(f.thetas, rng.integers(1, 20, len(f.thetas)))},
          **{f.S[a, b]: (Z.T * Z)[a, b] for a in range(q) for b in range(q)}}
    for k, t in enumerate(f.thetas):
        assert sp.simplify((f.dlogdet[k] - sp.diff(f.logdet, t)).subs(at)) == 0
        assert (f.dW[k] - f.W.diff(t)).subs(at).applyfunc(sp.simplify) == sp.zeros(q, q)


@pytest.mark.parametrize("qs", [(2,), (1, 1), (2, 1)])
def test_block_hessian_pieces_equal_sympys_second_derivatives(qs):
    """The matrix-calculus forms BlockDeviance evaluates (in Sigma_b = T T^T, W = (Sigma_b^-1 + S)^-1):
    dW_k = R Sigma_k R^T, d2W_kl = R Sigma_kl R^T - dW_l S Sigma_k R^T - R Sigma_k S dW_l and
    d2log|M_g| = tr(B Sigma_kl) - tr(S dW_l S Sigma_k) equal sp.diff of the derived W_g and log|M_g|."""
    f = block_forms(qs)
    rng = np.random.default_rng(3 + sum(qs))
    q = f.T.shape[0]
    Zg = rng.normal(size=(q + 3, q))
    S = Zg.T @ Zg
    theta = rng.uniform(0.2, 1.5, len(f.thetas)) * rng.choice([-1, 1], len(f.thetas))
    at = {**dict(zip(f.thetas, theta)), **{f.S[a, b]: S[a, b] for a in range(q) for b in range(q)}}
    num = lambda e: np.array(sp.Matrix(e).subs(at).evalf(), dtype=float)  # noqa: E731
    T = num(f.T)
    W = num(f.W)
    R, B = np.eye(q) - W @ S, S - S @ W @ S
    E = [num(f.T.diff(t)) for t in f.thetas]
    Sk = [Ek @ T.T + T @ Ek.T for Ek in E]
    for k, tk in enumerate(f.thetas):
        dWk = R @ Sk[k] @ R.T
        np.testing.assert_allclose(dWk, num(f.W.diff(tk)), rtol=1e-9, atol=1e-12)
        for l, tl in enumerate(f.thetas):
            dWl = R @ Sk[l] @ R.T
            Skl = E[k] @ E[l].T + E[l] @ E[k].T
            d2W = R @ Skl @ R.T - dWl @ S @ Sk[k] @ R.T - R @ Sk[k] @ S @ dWl
            np.testing.assert_allclose(d2W, num(f.W.diff(tk).diff(tl)), rtol=1e-8, atol=1e-11)
            d2logdet = np.trace(B @ Skl) - np.trace(S @ dWl @ S @ Sk[k])
            assert d2logdet == pytest.approx(float(sp.diff(f.logdet, tk, tl).subs(at)), rel=1e-8, abs=1e-11)


@pytest.mark.parametrize("formula,dataset", [
    ("Reaction ~ Days + (Days|Subject)", "sleepstudy"),
    ("Reaction ~ Days + (Days||Subject)", "sleepstudy"),
    ("Reaction ~ Days + (1|Subject) + (0 + Days|Subject)", "sleepstudy"),
])
@pytest.mark.parametrize("reml", [False, True])
def test_block_hessian_equals_differences_of_the_gradient(formula, dataset, reml):
    """BlockDeviance.hessian (beta profiled: RSS'' - 2 h A^-1 h^T, REML's log|A|'') against central
    differences of the analytic gradient, on an unbalanced subset too (distinct S_g summed by pattern)."""
    data = lmm.datasets.load(dataset)
    for frame in (data, data.drop(index=data.index[::7])):
        ob = BlockDeviance(specify(formula, frame), reml)
        rng = np.random.default_rng(2)
        theta = ob.initial() * rng.uniform(0.4, 1.3, ob.n_theta) + (ob.initial() == 0) * 0.05
        H = ob.hessian(ob.state(theta))
        ref = difference_hessian(lambda th: ob.gradient(ob.state(th)), theta)
        np.testing.assert_allclose(H, ref, rtol=2e-6, atol=2e-6 * np.abs(ref).max())


def test_newton_fits_one_factor_slopes_in_few_evaluations():
    """Newton with the analytic Hessian: sleepstudy (Days|Subject) REML reaches lme4's optimum in at most 12
    criterion evaluations (L-BFGS-B needed 21), and the fit says which optimiser ran."""
    fit = lmm.fit("Reaction ~ Days + (Days|Subject)", lmm.datasets.load("sleepstudy"))
    assert fit.opt.optimizer.startswith("Newton") and fit.opt.converged
    assert fit.opt.evaluations <= 12
    assert fit.loglik == pytest.approx(-871.8141, abs=1e-4)


def test_block_symbols_are_symmetric():
    S = block_symbols(3)
    assert S == S.T and len(S.free_symbols) == 6


# ---------------------------------------------------------------------------------- numerics
def dense_deviance(design, theta, reml):
    """The profiled deviance with V = I + Z Lambda Lambda^T Z^T written out (scaled as the objective)."""
    ob = SparseDeviance(design, reml)
    Z = random_effects_matrix(design).toarray()
    L = np.zeros((Z.shape[1], Z.shape[1]))
    k = 0
    for lay in ob.layouts:
        base = lay.offset + np.arange(lay.n_levels) * lay.q
        for r, c in lay.theta_index:
            L[base + r, base + c] = theta[k]
            k += 1
    y = (design.y - ob.shift) / ob.scale
    X = design.X
    V = np.eye(design.n) + Z @ L @ L.T @ Z.T
    Vinv = np.linalg.inv(V)
    A = X.T @ Vinv @ X
    beta = np.linalg.solve(A, X.T @ Vinv @ y)
    r = y - X @ beta
    n_eff = design.n - (design.p if reml else 0)
    dev = np.linalg.slogdet(V)[1] + n_eff * (1 + np.log(2 * np.pi * (r @ Vinv @ r) / n_eff))
    return dev + (np.linalg.slogdet(A)[1] if reml else 0.0)


def central_gradient(ob, theta, h=1e-6):
    return np.array([(ob(theta + h * e) - ob(theta - h * e)) / (2 * h) for e in np.eye(len(theta))])


@st.composite
def slope_designs(draw):
    """A random single-factor design: 2-8 groups of 1-7 rows, a covariate x varying within groups."""
    G = draw(st.integers(2, 8))
    sizes = draw(st.lists(st.integers(1, 7), min_size=G, max_size=G))
    assume(sum(sizes) > 2 * G + 3)            # lme4's check: more rows than random effects
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    g = rng.permutation(np.repeat(np.arange(G), sizes))
    n = len(g)
    x = rng.normal(scale=2, size=n)
    y = 3 + x + rng.normal(size=G)[g] + rng.normal(size=G)[g] * x + rng.normal(size=n)
    data = pd.DataFrame({"y": y, "x": x, "g": [f"g{v}" for v in g], "z": rng.normal(size=n)})
    theta = np.array([draw(st.floats(0.0, 3.0)), draw(st.floats(-2.0, 2.0)), draw(st.floats(0.0, 3.0))])
    return data, theta


@settings(**SETTINGS)
@given(slope_designs(), st.booleans())
def test_block_sparse_and_dense_deviances_agree(case, reml):
    data, theta = case
    design = specify("y ~ x + z + (x|g)", data)
    block, sparse = BlockDeviance(design, reml), SparseDeviance(design, reml)
    dense = DenseDeviance(design, reml)
    ref = dense_deviance(design, theta, reml)
    assert block(theta) == pytest.approx(ref, rel=1e-9, abs=1e-9)
    assert sparse(theta) == pytest.approx(ref, rel=1e-9, abs=1e-9)
    assert dense(theta) == pytest.approx(ref, rel=1e-9, abs=1e-9)
    gb = block.gradient(block.state(theta))
    gs = sparse.gradient(sparse.state(theta))
    np.testing.assert_allclose(gb, gs, rtol=1e-7, atol=1e-7)
    np.testing.assert_allclose(dense.gradient(dense.state(theta)), gs, rtol=1e-7, atol=1e-7)
    np.testing.assert_allclose(block.state(theta).b, sparse.state(theta).b, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(dense.state(theta).b, sparse.state(theta).b, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(dense.conditional_variances(dense.state(theta)),
                               sparse.conditional_variances(sparse.state(theta)), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("formula,dataset,kind", [
    ("Reaction ~ Days + (Days|Subject)", "sleepstudy", BlockDeviance),
    ("Reaction ~ Days + (1|Subject) + (0 + Days|Subject)", "sleepstudy", BlockDeviance),
    ("strength ~ 1 + (1|batch/cask)", "Pastes", SparseDeviance),
    ("diameter ~ 1 + (1|plate) + (1|sample)", "Penicillin", SparseDeviance),
    ("strength ~ 1 + (1|batch/cask)", "Pastes", DenseDeviance),
    ("diameter ~ 1 + (1|plate) + (1|sample)", "Penicillin", DenseDeviance),
])
@pytest.mark.parametrize("reml", [False, True])
def test_gradients_equal_central_differences(formula, dataset, kind, reml):
    design = specify(formula, lmm.datasets.load(dataset))
    ob = kind(design, reml)
    # the fit's own choice: per-group blocks for one factor, dense M for few random effects
    assert isinstance(profiled_deviance(design, reml), BlockDeviance if kind is BlockDeviance else DenseDeviance)
    rng = np.random.default_rng(1)
    for _ in range(3):
        theta = ob.initial() + rng.uniform(0.05, 0.8, size=ob.n_theta)
        np.testing.assert_allclose(ob.gradient(ob.state(theta)), central_gradient(ob, theta), rtol=1e-5,
                                   atol=1e-5)
        assert ob(theta) == pytest.approx(dense_deviance(design, theta, reml), rel=1e-10)


def test_crossed_sparse_deviance_equals_dense_on_a_random_design():
    rng = np.random.default_rng(7)
    n = 300
    a, b = rng.integers(0, 25, n), rng.integers(0, 12, n)
    x = rng.normal(size=n)
    y = 1 + 0.5 * x + rng.normal(size=25)[a] + 0.7 * rng.normal(size=12)[b] + rng.normal(size=n)
    design = specify("y ~ x + (1|a) + (x|b)", pd.DataFrame({"y": y, "x": x, "a": a, "b": b}))
    for reml in (False, True):
        assert isinstance(profiled_deviance(design, reml), DenseDeviance)
        ob = SparseDeviance(design, reml)
        theta = np.array([0.8, 0.6, 0.2, 0.4])
        assert ob(theta) == pytest.approx(dense_deviance(design, theta, reml), rel=1e-10)
        np.testing.assert_allclose(ob.gradient(ob.state(theta)), central_gradient(ob, theta), rtol=1e-5)


def test_more_than_three_effects_per_level_use_the_sparse_form():
    rng = np.random.default_rng(3)
    n = 200
    d = pd.DataFrame({"g": rng.integers(0, 10, n), "x1": rng.normal(size=n), "x2": rng.normal(size=n),
                      "x3": rng.normal(size=n)})
    d["y"] = d.x1 + rng.normal(size=10)[d.g] + rng.normal(size=n)
    assert isinstance(profiled_deviance(specify("y ~ x1 + (x1 + x2 + x3|g)", d), True), DenseDeviance)
    assert isinstance(profiled_deviance(specify("y ~ x1 + (x1 + x2|g)", d), True), BlockDeviance)


def test_block_statistics_are_the_per_group_sums():
    design = specify("Reaction ~ Days + (Days|Subject)", lmm.datasets.load("sleepstudy"))
    s = BlockStatistics.of(design)
    term = design.terms[0]
    g = 4
    rows = np.asarray(term.codes) == g
    Zg, Xg = term.Z[rows], design.X[rows]
    yg = (design.y[rows] - s.shift) / s.scale
    np.testing.assert_allclose(s.S[g], Zg.T @ Zg)
    np.testing.assert_allclose(s.ZtX[g], Zg.T @ Xg)
    np.testing.assert_allclose(s.Zty[g], Zg.T @ yg)
    assert s.S.shape == (18, 2, 2) and s.ZtX.shape == (18, 2, 2)
    with pytest.raises(lmm.ModelError):
        BlockStatistics.of(specify("diameter ~ 1 + (1|plate) + (1|sample)", lmm.datasets.load("Penicillin")))


@pytest.mark.parametrize("formula,dataset", [("Reaction ~ Days + (Days|Subject)", "sleepstudy"),
                                             ("diameter ~ 1 + (1|plate) + (1|sample)", "Penicillin")])
def test_satterthwaite_hessian_equals_finite_differences(formula, dataset):
    design = specify(formula, lmm.datasets.load(dataset))
    ob = profiled_deviance(design, True)
    theta = ob.initial() * 0.7 + 0.1
    sig = 0.5
    H, _, _ = ob.varpar_hessian(theta, sig)
    x0 = np.append(theta, sig)
    f = lambda x: ob.varpar_deviance(x[:-1], x[-1])  # noqa: E731
    h = 1e-4
    k = len(x0)
    ref = np.empty((k, k))
    for i in range(k):
        for j in range(k):
            ei, ej = np.eye(k)[i] * h, np.eye(k)[j] * h
            ref[i, j] = (f(x0 + ei + ej) - f(x0 + ei - ej) - f(x0 - ei + ej) + f(x0 - ei - ej)) / (4 * h * h)
    np.testing.assert_allclose(H, ref, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("formula,dataset", [("Reaction ~ Days + (Days|Subject)", "sleepstudy"),
                                             ("diameter ~ 1 + (1|plate) + (1|sample)", "Penicillin"),
                                             ("strength ~ 1 + (1|batch/cask)", "Pastes"),
                                             ("Reaction ~ Days + (1|Subject)", "sleepstudy")])
@pytest.mark.parametrize("reml", [False, True])
def test_satterthwaite_hessian_from_the_profiled_hessian_by_the_envelope(formula, dataset, reml):
    """At sigma = sigma_hat(theta), D_tt = d'' + D_ts D_ts^T / D_ss: the optimiser's Hessian of the profiled
    deviance gives lmerTest's (theta, sigma) Hessian without differencing again."""
    design = specify(formula, lmm.datasets.load(dataset))
    ob = profiled_deviance(design, reml)
    theta = ob.initial() * 0.7 + 0.2
    st = ob.state(theta)
    sig = np.sqrt(st.rss / ob.n_eff)
    d2 = (ob.hessian(st) if hasattr(ob, "hessian")
          else difference_hessian(lambda th: ob.gradient(ob.state(th)), theta))
    direct, _, _ = ThetaDeviance.varpar_hessian(ob, theta, sig)
    via, _, _ = ob.varpar_hessian(theta, sig, hessian=d2, st=st)
    np.testing.assert_allclose(via, direct, rtol=1e-6, atol=1e-6)


def test_a_stop_at_a_bound_is_left_for_a_better_point():
    design = specify("diameter ~ 1 + (1|plate) + (1|sample)", lmm.datasets.load("Penicillin"))
    ob = profiled_deviance(design, True)
    lower = np.zeros(2)
    stuck = np.array([0.0, 3.0])           # sigma_plate = 0: a stationary point (even in theta), not a minimum
    assert ob.gradient(ob.state(stuck))[0] == pytest.approx(0.0, abs=1e-12)
    better = _inward_of_the_bound(ob, stuck, lower)
    assert better is not None and better[0] > 0 and ob(better) < ob(stuck)
    optimum = optimise(ob)
    assert optimum.summary.converged and np.all(optimum.theta > 0)
    assert _inward_of_the_bound(ob, optimum.theta, lower) is None       # nothing at its bound
    assert ob(optimum.theta) <= ob(better)


@pytest.mark.parametrize("chunk", [3, 4096])
def test_blockwise_factorisation_equals_dense_m(monkeypatch, chunk):
    """log|M| and M^-1 on M's pattern from the Schur complement equal numpy on the dense M, with the
    largest term a correlated slope (q_1 = 2) and the levels taken a few at a time or all at once."""
    import lmm_symbolic.compilation as compilation

    monkeypatch.setattr(compilation, "LEVEL_CHUNK", chunk)
    rng = np.random.default_rng(11)
    n = 400
    a, b, c = rng.integers(0, 30, n), rng.integers(0, 9, n), rng.integers(0, 4, n)
    x = rng.normal(size=n)
    y = x + rng.normal(size=30)[a] + rng.normal(size=9)[b] + rng.normal(size=n)
    design = specify("y ~ x + (x|a) + (1|b) + (1|c)", pd.DataFrame({"y": y, "x": x, "a": a, "b": b, "c": c}))
    ob = SparseDeviance(design, False)
    assert (ob.w1, ob.q1, ob.w2) == (60, 2, 13)
    theta = np.array([0.9, -0.3, 0.5, 0.7, 1.2])
    f = ob._factor(theta)
    L = ob._lambda(theta).toarray()
    M = L.T @ ob.ZtZ.toarray() @ L + np.eye(ob.width)
    assert f["logdet"] == pytest.approx(np.linalg.slogdet(M)[1], rel=1e-12)
    Minv = np.linalg.inv(M)
    np.testing.assert_allclose(ob._inverse_on_pattern(f), Minv[ob._rows, ob._cols], rtol=1e-9, atol=1e-12)
    rhs = rng.normal(size=(ob.width, 3))
    np.testing.assert_allclose(ob._solve(f, rhs), Minv @ rhs, rtol=1e-9, atol=1e-12)
    assert ob(theta) == pytest.approx(dense_deviance(design, theta, False), rel=1e-10)


def test_too_many_effects_outside_the_largest_term_are_refused(monkeypatch):
    import lmm_symbolic.compilation as compilation

    monkeypatch.setattr(compilation, "SCHUR_MAX", 5)
    design = specify("diameter ~ 1 + (1|plate) + (1|sample)", lmm.datasets.load("Penicillin"))
    with pytest.raises(lmm.ModelError, match="outside the largest term"):
        SparseDeviance(design, True)


@pytest.mark.parametrize("formula,dataset,response", [
    ("Reaction ~ Days + (Days|Subject)", "sleepstudy", "Reaction"),
    ("diameter ~ 1 + (1|plate) + (1|sample)", "Penicillin", "diameter"),
])
def test_a_response_around_1e8_fits_as_one_around_1(formula, dataset, response):
    """The statistics are of the centred, scaled response, so y + 1e8 changes only the intercept."""
    data = lmm.datasets.load(dataset)
    shifted = data.assign(**{response: data[response] + 1e8})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lmm.LMMWarning)
        a, b = lmm.fit(formula, data), lmm.fit(formula, shifted)
    assert b.params.iloc[0] - a.params.iloc[0] == pytest.approx(1e8, rel=1e-14)
    np.testing.assert_allclose(b.params.values[1:], a.params.values[1:], rtol=1e-7)
    np.testing.assert_allclose(b.variance_components["sd"], a.variance_components["sd"], rtol=1e-7)
    np.testing.assert_allclose(b.bse, a.bse, rtol=1e-7)
    assert b.loglik == pytest.approx(a.loglik, rel=1e-10)


def test_eq_11_for_slopes_is_written_with_positive_sigma_terms():
    """|Sigma| = sigma^288 (sigma^4 + 10 sigma^2 s_I^2 + 285 sigma^2 s_D^2 + ...)^18, not -(... - sigma^4)^18."""
    d = lmm.derive("Reaction ~ Days + (Days|Subject)", lmm.datasets.load("sleepstudy"))
    factors = sp.Mul.make_args(d.det)
    assert sigma**288 in factors
    (inner,) = [f.base for f in factors if isinstance(f, sp.Pow) and f.exp == 18]
    poly = sp.Poly(inner, sigma)
    assert poly.LC() == 1 and poly.degree() == 4
    s_i, s_d = (sp.Symbol(f"sigma_Subject_{n}", positive=True) for n in ("Intercept", "Days"))
    assert poly.coeff_monomial(sigma**2) == 10 * s_i**2 + 285 * s_d**2 + 90 * sp.Symbol(
        "rho_Subject_Intercept_Days", real=True) * s_i * s_d                # tr(D S) with S = [[10, 45], [45, 285]]


def _crossed_frame(seed: int = 3, n: int = 400) -> pd.DataFrame:
    """Two crossed factors (40 and 9 levels), a third nested in the second, and a covariate."""
    rng = np.random.default_rng(seed)
    g1, g2 = rng.integers(0, 40, n), rng.integers(0, 9, n)
    x = rng.normal(size=n)
    y = (1 + 0.5 * x + rng.normal(size=40)[g1] * (1 + 0.3 * x) + rng.normal(size=9)[g2] * (1 - 0.4 * x)
         + rng.normal(size=n))
    return pd.DataFrame({"y": y, "x": x, "g1": [f"a{v}" for v in g1], "g2": [f"b{v}" for v in g2],
                         "g3": [f"c{v % 3}" for v in g1]})


SPARSE_FORMULAS = ["y ~ x + (1|g1) + (1|g2)",
                   "y ~ x + (x|g1) + (1|g2)",           # the largest term with a slope: 2 x 2 level blocks
                   "y ~ x + (1|g1) + (x|g2)",           # a slope in the Schur complement's block
                   "y ~ x + (x|g1) + (x|g2)",
                   "y ~ x + (1|g1) + (1|g2) + (1|g2:g3)",
                   "y ~ x + (1|g2/g3) + (0 + x|g1)"]


@pytest.mark.parametrize("formula", SPARSE_FORMULAS)
@pytest.mark.parametrize("reml", [False, True])
def test_sparse_hessian_equals_differences_of_the_gradient(formula, reml):
    """SparseDeviance.hessian (log|M|'' from the blocks of M^-1 and Lambda^-1 E_k; RSS'' and A'' through
    Z^T V^-1 Z) against central differences of the analytic gradient, at points away from the optimum."""
    ob = SparseDeviance(specify(formula, _crossed_frame()), reml)
    rng = np.random.default_rng(5)
    for _ in range(2):
        theta = ob.initial() * rng.uniform(0.4, 1.5, ob.n_theta) + (ob.initial() == 0) * rng.normal(0, 0.2, ob.n_theta)
        H = ob.hessian(ob.state(theta))
        ref = difference_hessian(lambda th: ob.gradient(ob.state(th)), theta)
        np.testing.assert_allclose(H, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())


@pytest.mark.parametrize("formula,dataset", [("diameter ~ 1 + (1|plate) + (1|sample)", "Penicillin"),
                                             ("strength ~ 1 + (1|batch/cask)", "Pastes"),
                                             ("Reaction ~ Days + (Days|Subject)", "sleepstudy")])
@pytest.mark.parametrize("reml", [False, True])
def test_dense_hessian_equals_differences_of_the_gradient(formula, dataset, reml):
    """DenseDeviance.hessian (tr(P d2M) - tr(P dM_l P dM_k) held densely) against central differences of
    the analytic gradient, inside and with a diagonal theta on its bound 0."""
    ob = DenseDeviance(specify(formula, lmm.datasets.load(dataset)), reml)
    rng = np.random.default_rng(4)
    theta = ob.initial() * rng.uniform(0.4, 1.3, ob.n_theta) + (ob.initial() == 0) * 0.1
    for th in (theta, np.concatenate([[0.0], theta[1:]])):
        H = ob.hessian(ob.state(th))
        ref = difference_hessian(lambda t: ob.gradient(ob.state(t)), th)
        np.testing.assert_allclose(H, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())


def test_sparse_hessian_on_a_bound_is_the_gradients_differences():
    """A diagonal theta at 0 makes T singular: the Hessian is then central differences of the gradient."""
    ob = SparseDeviance(specify("y ~ x + (x|g1) + (1|g2)", _crossed_frame()), False)
    theta = np.array([0.8, 0.1, 0.0, 0.6])
    H = ob.hessian(ob.state(theta))
    np.testing.assert_array_equal(H, difference_hessian(lambda th: ob.gradient(ob.state(th)), theta))


@pytest.mark.parametrize("formula", SPARSE_FORMULAS)
def test_sparse_models_fit_by_newton_to_the_quasi_newton_optimum(formula):
    """Newton with the sparse analytic Hessian reaches the optimum L-BFGS-B finds (the criterion's value
    no higher), in fewer evaluations."""
    from lmm_symbolic import optimisation
    design = specify(formula, _crossed_frame())
    ob = SparseDeviance(design, True)
    lower = np.array([-np.inf if lo is None else lo for lo in ob.lower_bounds])
    newton = optimisation._minimise_several(ob, ob.initial(), lower, path := [])
    assert newton[3].startswith("Newton")
    n_newton = len(path)

    class Quasi(SparseDeviance):       # the same criterion without a Hessian: the quasi-Newton route
        hessian = property()           # no getter: hasattr(q, "hessian") is False
    q = Quasi(design, True)
    quasi = optimisation._minimise_several(q, q.initial(), lower, path2 := [])
    assert quasi[3].startswith("L-BFGS-B")
    assert ob(newton[0]) <= q(quasi[0]) + 1e-8 * abs(q(quasi[0]))
    assert n_newton < len(path2)


@pytest.mark.parametrize("formula", ["y ~ x + (x|g1) + (1|g2)", "y ~ x + (1|g1) + (x|g2)"])
def test_sparse_log_det_derivatives_equal_exact_dense_sympy(formula):
    """The block forms of log|M|' and log|M|'' (M^-1's diagonal block sums, Lambda^-1 E_k, the K tensors)
    equal tr(M^-1 dM_k) and tr(M^-1 d2M_kl) - tr(M^-1 dM_l M^-1 dM_k) with M = I + Lambda^T Z^T Z Lambda
    written out by sympy and evaluated in exact rationals."""
    rng = np.random.default_rng(0)
    d = pd.DataFrame({"y": rng.normal(size=10), "x": rng.integers(0, 3, 10).astype(float),
                      "g1": [f"a{v}" for v in [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]],
                      "g2": [f"b{v}" for v in [0, 1, 0, 1, 0, 1, 0, 1, 1, 0]]})
    design = specify(formula, d)
    ob = SparseDeviance(design, False)
    Z = sp.Matrix(random_effects_matrix(design).toarray().astype(int))[:, list(ob._perm)]
    th = sp.symbols(f"t0:{ob.n_theta}")
    L = sp.zeros(Z.shape[1], Z.shape[1])
    for k, (r, c) in enumerate(ob._by_theta):
        for i, j in zip(r, c):
            L[i, j] += th[k]
    M = sp.eye(Z.shape[1]) + L.T * Z.T * Z * L
    at = {t: sp.Rational(v, 10) for t, v in zip(th, [7, 3, 5, 9])}
    Minv = M.subs(at).inv()
    dM = [M.diff(t).subs(at) for t in th]
    grad = [float((Minv * dM[a]).trace()) for a in range(len(th))]
    hess = [[float((Minv * M.diff(th[a], th[b]).subs(at)).trace() - (Minv * dM[b] * Minv * dM[a]).trace())
             for b in range(len(th))] for a in range(len(th))]
    st = ob.state(np.array([float(at[t]) for t in th]))
    np.testing.assert_allclose(ob.derivatives(st)[0], grad, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ob._d2logdet(st), hess, rtol=1e-12, atol=1e-12)
