"""Random slopes, nested and crossed random effects against the lme4 / lmerTest / nlme reference."""
import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import lmm_symbolic as lmm
from lmm_symbolic.compilation import profiled_deviance

REFERENCE = json.loads((Path(__file__).parent / "reference" / "lme4_reference.json").read_text())["cases"]
CASES = {"sleepstudy_slope": "sleepstudy", "sleepstudy_slope_uncorrelated": "sleepstudy", "pastes": "Pastes",
         "penicillin": "Penicillin", "crossed_slopes": "crossed_slopes"}
#: a simulated crossed design with a correlated slope (the largest term has q = 2), beside the R script
CROSSED_SLOPES = Path(__file__).parent / "reference" / "crossed_slopes.csv"


def load(name):
    return pd.read_csv(CROSSED_SLOPES) if name == "crossed_slopes" else lmm.datasets.load(name)
IDS = [f"{c}_{m}" for c in CASES for m in ("ml", "reml")]


@pytest.fixture(scope="module", params=IDS)
def fitted(request):
    case = REFERENCE[request.param]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lmm.LMMWarning)
        fit = lmm.fit(case["formula"], load(CASES[request.param.rsplit("_", 1)[0]]), method=case["method"])
    return case, fit


def _tolerance(case, fit):
    """1e-5 relative, unless lme4 stopped short of the optimum (our log-likelihood is then higher; that it
    is the same criterion is checked at lme4's theta below): 1e-4, or 1e-3 when lme4's deviance is more
    than 1e-6 above ours."""
    better = fit.loglik - case["lme4"]["loglik"]
    return 1e-3 if better > 1e-6 else 1e-4 if better > 1e-9 else 1e-5


def test_theta_is_lme4s(fitted):
    """The relative covariance parameters, in lme4's order (getME(fit, "theta")), in the summary and JSON."""
    case, fit = fitted
    np.testing.assert_allclose(fit.opt.theta, case["lme4"]["theta"], rtol=10 * _tolerance(*fitted), atol=1e-6)
    assert fit.to_dict()["theta"] == fit.theta.tolist()
    assert len(fit.opt.path) == fit.opt.evaluations and len(fit.opt.path[0]) == len(fit.opt.theta)
    if "theta_names" in case["lme4"]:
        assert list(fit.theta.index) == case["lme4"]["theta_names"]
    np.testing.assert_allclose(fit.theta.to_numpy(), case["lme4"]["theta"], rtol=10 * _tolerance(*fitted), atol=1e-6)


@pytest.mark.parametrize("method", ["ML", "REML"])
def test_theta_is_in_lme4s_order_whatever_the_formulas_order(method):
    """fit.theta is getME(fit, "theta"): Penicillin's terms written sample first still give plate (24 levels)
    first, as lme4 sorts terms by decreasing number of levels; opt.theta stays in the formula's order."""
    case = REFERENCE[f"penicillin_{method.lower()}"]
    fit = lmm.fit("diameter ~ 1 + (1|sample) + (1|plate)", lmm.datasets.load("Penicillin"), method=method)
    assert list(fit.theta.index) == case["lme4"]["theta_names"] == ["plate.(Intercept)", "sample.(Intercept)"]
    np.testing.assert_allclose(fit.theta.to_numpy(), case["lme4"]["theta"], rtol=1e-4)
    np.testing.assert_allclose(fit.opt.theta, case["lme4"]["theta"][::-1], rtol=1e-4)


def test_the_criterion_at_lme4s_theta_is_lme4s(fitted):
    """The profiled deviance pinned at lme4's own theta equals lme4's deviance (REML criterion), and our
    optimum is no higher (as MixedModels.jl's tests pin the objective at fixed theta)."""
    case, fit = fitted
    design = fit.design
    ob = profiled_deviance(design, case["method"] == "REML")
    offset = 2 * ob.n_eff * np.log(ob.scale)                 # the criterion of the unscaled response
    theta = np.array(case["lme4"]["theta"])
    assert ob(theta) + offset == pytest.approx(case["lme4"]["deviance"], rel=1e-10)
    assert fit.deviance <= case["lme4"]["deviance"] + 1e-9 * abs(case["lme4"]["deviance"])


def test_loglik_never_below_lme4(fitted):
    case, fit = fitted
    ref = case["lme4"]["loglik"]
    assert fit.loglik >= ref - 1e-8 * abs(ref)
    assert fit.loglik == pytest.approx(ref, rel=1e-8)
    assert fit.aic == pytest.approx(case["lme4"]["aic"], rel=1e-8)
    assert fit.bic == pytest.approx(case["lme4"]["bic"], rel=1e-8)
    assert fit.converged


def test_estimates_ses_sds_and_correlations(fitted):
    case, fit = fitted
    ref, rtol = case["lme4"], _tolerance(*fitted)
    np.testing.assert_allclose(fit.params.values, [f["estimate"] for f in ref["fixed_effects"]],
                               rtol=1e-10 if rtol == 1e-5 else rtol / 100)
    np.testing.assert_allclose(fit.bse.values, [f["std_error"] for f in ref["fixed_effects"]], rtol=rtol)
    vc = fit.variance_components
    assert list(vc["group"]) == [r["group"] for r in ref["random_effects"]]
    assert list(vc["term"]) == [r["term"] or "" for r in ref["random_effects"]]
    np.testing.assert_allclose(vc["sd"].values, [r["sd"] for r in ref["random_effects"]], rtol=rtol)
    np.testing.assert_allclose(fit.correlations["corr"].values, [c["corr"] for c in ref["correlations"]],
                               rtol=10 * rtol)
    np.testing.assert_allclose(fit.fitted, ref["fitted"], rtol=rtol, atol=rtol * np.max(np.abs(ref["fitted"])))


def test_conditional_modes(fitted):
    case, fit = fitted
    ranef = case["lme4"]["ranef"]
    frames = fit.random_effects if isinstance(fit.random_effects, dict) else {fit.group: fit.random_effects}
    assert set(frames) == set(ranef)
    for group, frame in frames.items():
        assert list(frame.index) == [str(v) for v in ranef[group]["levels"]]
        terms = [c for c in frame.columns if not c.startswith("cond_sd ")]
        assert [c for c in frame.columns if c.startswith("cond_sd ")] == [f"cond_sd {t}" for t in terms]
        for term in terms:
            scale = np.max(np.abs(ranef[group][term]))
            np.testing.assert_allclose(frame[term].values, ranef[group][term], atol=1e-3 * scale)
            # lme4's ranef(condVar = TRUE): sigma^2 diag(Lambda M^-1 Lambda^T)
            np.testing.assert_allclose(frame[f"cond_sd {term}"].values, ranef[group]["condsd"][term],
                                       rtol=10 * _tolerance(*fitted))


def test_satterthwaite_and_between_within_df(fitted):
    case, fit = fitted
    np.testing.assert_allclose(fit.df_satterthwaite.values,
                               [f["df"] for f in case["lmerTest"]["fixed_effects"]],
                               rtol=max(2e-4, 2 * _tolerance(*fitted)))
    if case["nlme"] is None:   # crossed factors: lme has no between/within rule
        assert np.isnan(fit.df.values).all()
    else:
        np.testing.assert_array_equal(fit.df.values, [f["df"] for f in case["nlme"]["fixed_effects"]])


def test_summary_and_json_for_general_models(fitted):
    case, fit = fitted
    text = fit.summary()
    for r in case["lme4"]["random_effects"]:
        assert r["group"] in text
    d = fit.to_dict()
    json.dumps(d)
    assert d["groups"] == {t.group: t.n_levels for t in fit.design.terms}
    assert len(d["random_effects"]) == len(case["lme4"]["random_effects"])
    rows = text.split("Fixed effects:")[1].splitlines()[3:3 + fit.design.p]
    blocks = [row.split("|") for row in rows]               # lme4 | Satterthwaite | between/within
    np.testing.assert_allclose([float(b[1].split()[0]) for b in blocks], fit.df_satterthwaite.values, rtol=1e-5)
    if case["nlme"] is not None:
        np.testing.assert_allclose([float(b[2].split()[-2]) for b in blocks], fit.df.values, rtol=1e-5)
    assert ("between/within (nlme)" in text) == (case["nlme"] is not None)
    assert "Satterthwaite (lmerTest)" in text
    widths = {len(line.split("(Intercept)")[0]) for line in text.splitlines() if line.startswith(" ")
              and "(Intercept)" in line and "Corr" not in line}
    assert len(widths) == 1                                    # the Name column lines up


def test_more_random_effects_than_observations_is_refused():
    data = lmm.datasets.load("sleepstudy")
    small = data[data["Days"] < 1]            # one observation per subject, two random effects each
    with pytest.raises(lmm.ModelError):
        lmm.fit("Reaction ~ 1 + (Days|Subject)", small)
