"""The one profiled deviance and its one optimiser: every model class evaluates the same criterion in theta
(issue 13), a random intercept by Newton with the analytic second derivative, several thetas unconstrained
then made canonical, and the exact estimates derived only when asked for."""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

import lmm_symbolic as lmm
from lmm_symbolic.compilation import (BlockDeviance, DenseDeviance, InterceptDeviance, SparseDeviance,
                                      difference_hessian, profiled_deviance)
from lmm_symbolic.optimisation import _canonical, optimise
from lmm_symbolic.specification import specify


def test_every_model_class_is_a_theta_deviance():
    sleep = lmm.datasets.load("sleepstudy")
    cases = [("Reaction ~ Days + (1|Subject)", sleep, InterceptDeviance),
             ("Reaction ~ Days + (Days|Subject)", sleep, BlockDeviance),
             ("diameter ~ 1 + (1|plate) + (1|sample)", lmm.datasets.load("Penicillin"), DenseDeviance)]
    for formula, data, kind in cases:
        ob = profiled_deviance(specify(formula, data), True)
        assert isinstance(ob, kind)
        st = ob.state(ob.initial())
        assert np.isfinite(ob.value(st)) and ob.gradient(st).shape == (ob.n_theta,)


@pytest.mark.parametrize("reml", [False, True])
def test_intercept_deviance_second_derivative_is_the_derivative_of_its_gradient(reml):
    ob = profiled_deviance(specify("Reaction ~ Days + (1|Subject)", lmm.datasets.load("sleepstudy")), reml)
    for th in (0.05, 0.4, 1.0, 3.0):
        analytic = ob.hessian(ob.state([th]))
        numeric = difference_hessian(lambda t: ob.gradient(ob.state(t)), np.array([th]))
        np.testing.assert_allclose(analytic, numeric, rtol=1e-6)


@pytest.mark.parametrize("method,theta2", [("ML", 133 / 4 / 18), ("REML", 133 / 2 / 36)])
def test_newton_reaches_the_exact_theta_of_the_toy_data_in_few_steps(method, theta2):
    fit = lmm.fit("Resp ~ Treat + (1|Ind)", lmm.datasets.load("toy"), method=method, exact=False)
    assert fit.opt.theta[0] == pytest.approx(np.sqrt(theta2), rel=1e-14)
    assert fit.opt.evaluations <= 12 and fit.converged
    assert fit.opt.optimizer.startswith("Newton")


def test_the_exact_estimates_are_derived_on_first_use_not_during_the_fit(monkeypatch):
    import lmm_symbolic.results as results

    calls = []
    real = results.exact_optimum
    monkeypatch.setattr(results, "exact_optimum", lambda *a, **k: calls.append(a) or real(*a, **k))
    fit = lmm.fit("Resp ~ Treat + (1|Ind)", lmm.datasets.load("toy"), method="ML")
    assert calls == []
    assert str(fit.exact.sigma2) == "18" and str(fit.exact.sigma_s2) == "133/4"
    assert fit.exact_reason is None and len(calls) == 1
    fit.exact
    assert len(calls) == 1                                   # derived once
    off = lmm.fit("Resp ~ Treat + (1|Ind)", lmm.datasets.load("toy"), exact=False)
    assert off.exact is None and "not requested" in off.exact_reason


def test_canonical_form_changes_the_sign_of_whole_columns_and_keeps_the_deviance():
    ob = profiled_deviance(specify("Reaction ~ Days + (Days|Subject)", lmm.datasets.load("sleepstudy")), False)
    theta = np.array([-0.9, 0.3, -0.2])                       # T = [[-0.9, 0], [0.3, -0.2]]
    canon = _canonical(ob, theta)
    np.testing.assert_allclose(canon, [0.9, -0.3, 0.2])
    assert ob(canon) == pytest.approx(ob(theta), rel=1e-13)


def test_a_residual_variance_at_zero_is_said_and_beats_lme4():
    # both individuals' differences equal (15): Treat and the individuals fit the four values exactly.
    # lme4 1.1.31 returns sigma 1.5e-7, logLik 23.2401 with "failed to converge" and "nearly unidentifiable"
    d = pd.DataFrame({"Treat": [0, 1, 0, 1], "Resp": [10, 25, 3, 18], "Ind": ["1", "1", "2", "2"]})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = lmm.fit("Resp ~ Treat + (1|Ind)", d, method="ML")
    assert fit.sigma < 1e-6 * np.std(d.Resp)
    assert any("residual variance is estimated as (nearly) 0" in str(w.message) for w in caught)
    assert any("residual variance" in m for m in fit.messages)
    assert fit.loglik >= 23.2401


@pytest.mark.parametrize("formula,dataset", [("strength ~ 1 + (1|batch/cask)", "Pastes"),
                                             ("diameter ~ 1 + (1|plate) + (1|sample)", "Penicillin")])
def test_dense_and_blocked_evaluations_find_the_same_optimum(formula, dataset):
    design = specify(formula, lmm.datasets.load(dataset))
    for reml in (False, True):
        dense, blocked = optimise(DenseDeviance(design, reml)), optimise(SparseDeviance(design, reml))
        assert dense.deviance == pytest.approx(blocked.deviance, rel=1e-12)
        np.testing.assert_allclose(dense.theta, blocked.theta, rtol=1e-5, atol=1e-7)


def test_fits_are_bit_identical_from_run_to_run():
    sleep = lmm.datasets.load("sleepstudy")
    a = lmm.fit("Reaction ~ Days + (Days|Subject)", sleep).to_json()
    b = lmm.fit("Reaction ~ Days + (Days|Subject)", sleep).to_json()
    assert a == b
