"""Fits against the committed lme4 / nlme / lmerTest reference (tests/reference/lme4_reference.json)."""
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import sympy as sp

import lmm_symbolic as lmm

REFERENCE = json.loads((Path(__file__).parent / "reference" / "lme4_reference.json").read_text())
DATASET = {"toy": "toy", "sleepstudy": "sleepstudy", "Dyestuff": "Dyestuff", "Dyestuff2": "Dyestuff2"}
INTERCEPT_CASES = ["toy_ml", "toy_reml", "toy_cellmeans_ml", "toy_cellmeans_reml", "sleepstudy_intercept_ml",
                   "sleepstudy_intercept_reml", "dyestuff_ml", "dyestuff_reml", "dyestuff2_ml", "dyestuff2_reml"]
REL = 1e-5


def _fit(case_id):
    case = REFERENCE["cases"][case_id]
    formula = case["formula"].replace("factor(Treat)", "C(Treat)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lmm.LMMWarning)
        return case, lmm.fit(formula, lmm.datasets.load(DATASET[case["dataset"]]), method=case["method"])


@pytest.fixture(scope="module", params=INTERCEPT_CASES)
def fitted(request):
    return _fit(request.param)


def test_estimates_ses_and_sds_match_lme4(fitted):
    case, fit = fitted
    ref = case["lme4"]
    est = [f["estimate"] for f in ref["fixed_effects"]]
    se = [f["std_error"] for f in ref["fixed_effects"]]
    np.testing.assert_allclose(fit.params.values, est, rtol=REL)
    np.testing.assert_allclose(fit.bse.values, se, rtol=REL)
    sds = {r["group"]: r["sd"] for r in ref["random_effects"]}
    assert fit.sigma == pytest.approx(sds["Residual"], rel=REL)
    group = fit.group
    assert fit.sigma_s == pytest.approx(sds[group], rel=REL, abs=1e-10)


def test_loglik_never_below_lme4(fitted):
    case, fit = fitted
    ref = case["lme4"]
    assert fit.loglik >= ref["loglik"] - 1e-8 * abs(ref["loglik"])
    assert fit.loglik == pytest.approx(ref["loglik"], rel=1e-8)
    assert fit.aic == pytest.approx(ref["aic"], rel=1e-8)
    assert fit.bic == pytest.approx(ref["bic"], rel=1e-8)
    assert fit.deviance == pytest.approx(ref["deviance"], rel=1e-8)


def test_singular_flag_and_convergence(fitted):
    case, fit = fitted
    assert fit.singular == case["lme4"]["singular"]
    assert fit.converged
    if fit.singular:
        assert fit.sigma_s == 0.0
        assert any("singular" in m for m in fit.messages)
        assert "singular" in fit.summary()
    # lme4's theta = sigma_s / sigma (getME(fit, "theta")); lme4 stops ~1e-6 short on the toy REML
    np.testing.assert_allclose(fit.opt.theta, case["lme4"]["theta"], rtol=REL, atol=1e-7)
    assert fit.opt.theta == (pytest.approx(fit.sigma_s / fit.sigma, rel=1e-12),)


def test_satterthwaite_matches_lmertest(fitted):
    case, fit = fitted
    ref = case["lmerTest"]["fixed_effects"]
    np.testing.assert_allclose(fit.df_satterthwaite.values, [f["df"] for f in ref], rtol=REL)
    np.testing.assert_allclose(fit.pvalues_satterthwaite.values, [f["p_value"] for f in ref], rtol=1e-4)


def test_between_within_df_and_p_match_nlme(fitted):
    case, fit = fitted
    ref = case["nlme"]["fixed_effects"]
    np.testing.assert_array_equal(fit.df.values, [f["df"] for f in ref])
    # nlme stops at its own tolerance (up to ~5e-6 relative on these cases)
    np.testing.assert_allclose(fit.pvalues.values, [f["p_value"] for f in ref], rtol=2e-5)


def test_blups_fitted_and_wald_intervals(fitted):
    case, fit = fitted
    ref = case["lme4"]
    ranef = ref["ranef"][fit.group]
    np.testing.assert_allclose(fit.random_effects["(Intercept)"].values, ranef["(Intercept)"], rtol=REL,
                               atol=1e-6 * max(1.0, fit.sigma))
    assert list(fit.random_effects.index) == [str(v) for v in ranef["levels"]]
    np.testing.assert_allclose(fit.random_effects["cond_sd"].values, ranef["condsd"]["(Intercept)"], rtol=REL)
    np.testing.assert_allclose(fit.fitted, ref["fitted"], rtol=REL)
    # conf_int's default is lme4's, the profile; Wald (NaN for the variance parameters, as lme4) on request
    wald = fit.conf_int(method="wald")
    np.testing.assert_allclose(wald.loc[list(fit.params.index)].values, ref["confint_wald"], rtol=REL)
    assert wald.loc[[".sig01", ".sigma"]].isna().all().all()
    np.testing.assert_allclose(fit.vcov.values, ref["vcov"], rtol=2 * REL)


def test_toy_exact_estimates():
    _, ml = _fit("toy_ml")
    _, reml = _fit("toy_reml")
    assert (ml.exact.sigma2, ml.exact.sigma_s2) == (18, sp.Rational(133, 4))
    assert (reml.exact.sigma2, reml.exact.sigma_s2) == (36, sp.Rational(133, 2))
    assert ml.sigma == pytest.approx(3 * math.sqrt(2), rel=1e-12)
    assert ml.sigma_s == pytest.approx(math.sqrt(133) / 2, rel=1e-12)
    assert reml.sigma == pytest.approx(6, rel=1e-12)
    assert reml.to_dict()["exact"] == {"sigma2": "36", "sigma_s2": "133/2"}


@pytest.mark.parametrize("case_id", ["sleepstudy_intercept_ml", "sleepstudy_intercept_reml", "dyestuff_reml",
                                     "dyestuff2_ml"])
def test_exact_estimates_agree_with_numeric_optimum(case_id):
    _, fit = _fit(case_id)
    assert fit.exact is not None
    assert float(fit.exact.sigma2) == pytest.approx(fit.sigma**2, rel=1e-10)
    assert float(fit.exact.sigma_s2) == pytest.approx(fit.sigma_s**2, rel=1e-10, abs=1e-12)


def test_unbalanced_design_has_no_exact():
    data = lmm.datasets.load("sleepstudy").iloc[:-3]
    assert lmm.fit("Reaction ~ Days + (1|Subject)", data).exact is None


@pytest.mark.parametrize("name", ["toy", "sleepstudy"])
def test_likelihood_ratio_test_matches_anova(name):
    ref = REFERENCE["lrt"][name]
    data = lmm.datasets.load(name)
    m0 = lmm.fit(ref["null"], data, method="ML")
    m1 = lmm.fit(ref["alt"], data, method="ML")
    out = lmm.likelihood_ratio_test(m0, m1)
    assert out["chisq"] == pytest.approx(ref["chisq"], rel=1e-6)
    assert out["df"] == ref["df"]
    assert out["p_value"] == pytest.approx(ref["p_value"], rel=1e-5)
    with pytest.raises(lmm.ModelError):
        lmm.likelihood_ratio_test(lmm.fit(ref["null"], data), m1)


def test_paired_t_test_equals_reml_t():
    ref = REFERENCE["paired_t_test"]["toy"]
    data = lmm.datasets.load("toy")
    tt = lmm.paired_t_test(data)
    assert tt.t == pytest.approx(ref["t"], rel=1e-12)
    assert tt.df == ref["df"]
    assert tt.p_value == pytest.approx(ref["p_value"], rel=1e-9)
    np.testing.assert_allclose(tt.conf_int, ref["conf_int"], rtol=1e-9)
    reml = lmm.fit("Resp ~ Treat + (1|Ind)", data)
    assert reml.tvalues["Treat"] == pytest.approx(tt.t, rel=1e-9)
    assert reml.pvalues["Treat"] == pytest.approx(tt.p_value, rel=1e-9)


def test_within_centred_regression_reproduces_treat_effect():
    data = lmm.within_centred(lmm.datasets.load("toy"))
    X = np.column_stack([np.ones(4), data["Treat"]])
    coef, rss, *_ = np.linalg.lstsq(X, data["Resp_std"], rcond=None)
    assert coef[1] == pytest.approx(9.0)
    # residual df corrected for the 2 individual means removed: n - G - 1 = 1
    se = math.sqrt(rss[0] / 1 * np.linalg.inv(X.T @ X)[1, 1])
    assert coef[1] / se == pytest.approx(lmm.paired_t_test(lmm.datasets.load("toy")).t, rel=1e-12)


def test_result_is_immutable_and_fit_leaves_design_alone():
    design = lmm.specify("Resp ~ Treat + (1|Ind)", lmm.datasets.load("toy"))
    y_before = design.y.copy()
    fit = lmm.fit_design(design, "ML")
    with pytest.raises(AttributeError):
        fit.sigma = 1.0
    np.testing.assert_array_equal(design.y, y_before)
    assert fit.design is design


def test_summary_html_and_json_layout():
    _, fit = _fit("sleepstudy_intercept_reml")
    text = fit.summary()
    for part in ("REML criterion at convergence", "Random effects:", "Subject", "Residual", "Fixed effects:",
                 "Number of obs: 180"):
        assert part in text
    assert "<table" in fit._repr_html_()
    d = fit.to_dict()
    assert set(d) >= {"formula", "method", "n_obs", "groups", "fixed_effects", "random_effects", "loglik", "aic",
                      "bic", "deviance", "converged", "singular", "exact"}
    assert d["groups"] == {"Subject": 18}
    assert [f["name"] for f in d["fixed_effects"]] == ["(Intercept)", "Days"]
    assert set(d["fixed_effects"][0]) == {"name", "estimate", "std_error", "t_value", "df", "p_value",
                                          "t_value_nlme", "df_satterthwaite", "p_value_satterthwaite"}
    assert set(d["df_rules"]) == {"df", "df_satterthwaite"}
    assert d["random_effects"][-1]["group"] == "Residual" and d["random_effects"][-1]["term"] is None
    json.dumps(d)


@pytest.mark.parametrize("method", ["ML", "REML"])
def test_every_p_value_follows_from_the_t_and_df_beside_it(method):
    """Issue 14: no row mixes lme4's t with nlme's df; each block's p is 2 P(T_df > |t|) of its own t."""
    import scipy.stats

    fit = lmm.fit("Resp ~ Treat + (1|Ind)", lmm.datasets.load("toy"), method=method)
    table = fit._fixed_table()
    for block in ("Satterthwaite (lmerTest)", "between/within (nlme)"):
        t = table[(block, "t value")] if (block, "t value") in table else table[("lme4", "t value")]
        expected = 2 * scipy.stats.t.sf(t.abs(), table[(block, "df")])
        np.testing.assert_allclose(table[(block, "Pr(>|t|)")], expected, rtol=1e-12)
    for row in fit.to_dict()["fixed_effects"]:
        assert row["p_value"] == pytest.approx(2 * scipy.stats.t.sf(abs(row["t_value_nlme"]), row["df"]))
        assert row["p_value_satterthwaite"] == pytest.approx(
            2 * scipy.stats.t.sf(abs(row["t_value"]), row["df_satterthwaite"]))
    text = fit.summary()
    treat = next(line for line in text.splitlines() if line.startswith("Treat"))
    assert "0.374334" in treat and treat.split("|")[0].split()[-1] == ("2.12132" if method == "ML" else "1.5")
    assert (len(treat.split("|")[2].split()) == 3) == (method == "ML")   # nlme's own t for ML


def test_full_loglik_gradient_vanishes_at_ml_optimum():
    from lmm_symbolic.results import full_loglik

    _, fit = _fit("sleepstudy_intercept_ml")
    ll = full_loglik(fit)
    assert ll(fit.sigma, fit.sigma_s, fit.params.values) == pytest.approx(fit.loglik, rel=1e-12)
    g = ll.gradient(fit.sigma, fit.sigma_s, fit.params.values)
    assert np.max(np.abs(g)) < 1e-6
    H = ll.hessian(fit.sigma, fit.sigma_s, fit.params.values)
    assert np.all(np.linalg.eigvalsh(H) < 0)   # a maximum


@pytest.mark.parametrize("resp,match", [([10, 25, 3, 18], "essentially constant"),     # both differences 15
                                        ([10, 10, 3, 3], "essentially constant"),      # both 0
                                        ([10, 25, None, None], "at least two subjects")])
def test_paired_t_test_refuses_what_r_refuses(resp, match):
    """R's t.test(paired = TRUE) stops on constant differences and on fewer than two pairs; so does ours,
    with a DataError instead of a division by zero."""
    import pandas as pd
    data = pd.DataFrame({"Treat": [0, 1, 0, 1], "Resp": resp, "Ind": [1, 1, 2, 2]}).dropna()
    with pytest.raises(lmm.DataError, match=match):
        lmm.paired_t_test(data)
