"""The well-conditioned basis the core fits in (specification.conditioned, issue 18): used only where X or a
correlated term's Z is ill-conditioned, the same column space, and maps back that are exact inverses."""
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import lmm_symbolic as lmm
from lmm_symbolic.specification import CONDITION_LIMIT, _lower_factor, conditioned, specify

sys.path.insert(0, str(Path(__file__).parent / "differential"))
import generate  # noqa: E402


def _data(seed):
    d, formula, _, _ = generate.design(seed)
    d["g"] = d["g"].astype("category")
    return d, formula


def test_a_well_conditioned_design_is_fitted_as_given():
    design = specify("Reaction ~ Days + (Days|Subject)", lmm.datasets.load("sleepstudy"))
    work, cond = conditioned(design)
    assert work is design and cond.identity


def test_near_collinear_X_gets_an_orthogonal_basis_of_the_same_column_space():
    d, formula = _data(17)                                    # x2 = x + 1 + 1e-6 noise
    design = specify(formula, d)
    scaled = design.X / np.linalg.norm(design.X, axis=0)
    assert np.linalg.cond(scaled) > CONDITION_LIMIT
    work, cond = conditioned(design)
    assert np.all(work.X[:, 0] == 1.0)                        # the intercept stays the ones column exactly
    assert np.linalg.cond(work.X) < 2
    np.testing.assert_allclose(design.X @ cond.fixed, work.X, atol=1e-6)  # X~ = X C (C ~ 1e6: to rounding)
    # the column space: X~ reproduces X by least squares
    coef, *_ = np.linalg.lstsq(work.X, design.X, rcond=None)
    np.testing.assert_allclose(work.X @ coef, design.X, rtol=1e-12, atol=1e-12)
    assert all(C is None for C in cond.terms)                 # (1|g) is left alone


def test_a_slope_far_from_zero_is_centred_and_theta_maps_back_exactly():
    d, formula = _data(57)                                    # (x|g) with x = 1000 + 0.01 z
    design = specify(formula, d)
    work, cond = conditioned(design)
    C = cond.terms[0]
    assert C is not None and cond.fixed is not None
    np.testing.assert_allclose(work.terms[0].Z[:, 0], 1.0)
    np.testing.assert_allclose(design.terms[0].Z @ C, work.terms[0].Z, atol=1e-8)
    rng = np.random.default_rng(1)
    for _ in range(5):
        th_t = rng.normal(size=3)
        th_t[[0, 2]] = np.abs(th_t[[0, 2]])
        th = cond.theta(th_t, [2])
        T, Tt = np.zeros((2, 2)), np.zeros((2, 2))
        T[[0, 1, 1], [0, 0, 1]], Tt[[0, 1, 1], [0, 0, 1]] = th, th_t
        assert T[0, 0] >= 0 and T[1, 1] >= 0
        np.testing.assert_allclose(T @ T.T, C @ Tt @ Tt.T @ C.T, rtol=1e-12, atol=1e-12 * np.abs(T).max() ** 2)
        np.testing.assert_allclose(cond.theta_tilde(th, [2]), th_t, rtol=1e-8, atol=1e-10)


def test_the_lower_factor_of_a_singular_factor():
    A = np.array([[2.0, 0.0], [-4.0, 0.0]])                   # rank 1: a boundary fit
    L = _lower_factor(A)
    assert L[0, 1] == 0 and L[0, 0] >= 0 and L[1, 1] >= 0
    np.testing.assert_allclose(L @ L.T, A @ A.T, atol=1e-14)
    assert abs(L[1, 1]) < 1e-14


def test_the_fit_reports_the_users_parametrisation():
    """The shifted slope's fit equals the centred one mapped back: beta, its covariance (so SEs and t),
    logLik; REML's criterion differs by exactly 2 log|det| of the change of fixed-effect basis."""
    d, formula = _data(57)
    e = d.copy()
    e["x"] = (d["x"] - 1000) * 100                            # x = 1000 + x_c / 100
    M = np.array([[1.0, 1000.0], [0.0, 0.01]])                # beta_c = M beta  (intercept at x_c = 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for method in ("ML", "REML"):
            a, b = lmm.fit(formula, d, method=method, exact=False), lmm.fit(formula, e, method=method, exact=False)
            # REML: X_c = X M^-1, so log|X_c^T V^-1 X_c| = log|X^T V^-1 X| - 2 log|det M|
            shift = 0.0 if method == "ML" else -np.log(abs(np.linalg.det(M)))
            assert a.loglik == pytest.approx(b.loglik + shift, rel=1e-8), method
            np.testing.assert_allclose(M @ a.params.to_numpy(), b.params.to_numpy(), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(M @ a.vcov.to_numpy() @ M.T, b.vcov.to_numpy(), rtol=1e-4, atol=1e-8)
            assert a.df_satterthwaite["x"] == pytest.approx(b.df_satterthwaite["x"], rel=1e-3), method
