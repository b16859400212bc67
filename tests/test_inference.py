"""After the fit, against lme4 (tests/reference/after_fit_reference.json, written by
tests/reference/make_after_fit_reference.R): predict, simulate moments, profile intervals, anova, bootstrap;
and update, refit, the result tables."""
from __future__ import annotations

import json
import pathlib
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.stats

import lmm_symbolic as lmm
from lmm_symbolic import inference

REF = json.loads((pathlib.Path(__file__).parent / "reference" / "after_fit_reference.json").read_text())
CASES = REF["cases"]


def _data(name):
    return lmm.datasets.load("toy" if name == "toy" else "sleepstudy")


_FITS: dict = {}


def _fit(name):
    if name not in _FITS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", lmm.LMMWarning)
            _FITS[name] = lmm.fit(CASES[name]["formula"], _data(name), method="REML")
    return _FITS[name]


@pytest.mark.parametrize("name", list(CASES))
def test_predict_matches_lme4(name):
    """Population level exactly (1e-8); conditional as closely as the fit's own modes match lme4's."""
    case, fit = CASES[name], _fit(name)
    new = pd.DataFrame(case["newdata"])
    np.testing.assert_allclose(fit.predict(new, re_form="~0"), case["predict_population"], rtol=1e-10, atol=1e-8)
    np.testing.assert_allclose(fit.predict(new, re_form=np.nan), case["predict_population"], rtol=1e-10, atol=1e-8)
    np.testing.assert_allclose(fit.marginal_fitted, case["fitted_population"], rtol=1e-10, atol=1e-8)
    # conditional: the modes' agreement with lme4 (1e-10 relative for (1|g), 1e-7 for the slope model)
    np.testing.assert_allclose(fit.predict(new), case["predict_conditional"], rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(fit.predict(), case["fitted_conditional"], rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(fit.residuals, case["residuals_conditional"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(fit.predict(), fit.fitted, rtol=1e-12)


def test_new_level_gets_population_prediction():
    fit = _fit("sleepstudy_slope")
    new = pd.DataFrame({"Days": [3.0, 3.0], "Subject": ["999", "308"]})
    cond, pop = fit.predict(new), fit.predict(new, re_form="~0")
    assert cond[0] == pytest.approx(pop[0], rel=1e-14)
    assert abs(cond[1] - pop[1]) > 1
    assert fit.predict(new, re_form="~(1|Subject)")[1] == pytest.approx(cond[1], rel=1e-14)


def test_scale_parameters_are_the_fits_after_dropping_rows():
    """scale() of new rows uses the fit's centre and SD, whatever rows the new data hold."""
    data = _data("sleepstudy")
    fit = lmm.fit("Reaction ~ scale(Days) + (1|Subject)", data)
    one = pd.DataFrame({"Days": [4.0], "Subject": ["308"]})
    many = pd.DataFrame({"Days": [4.0, 100.0, -3.0], "Subject": ["308"] * 3})
    assert fit.predict(one)[0] == pytest.approx(fit.predict(many)[0], rel=1e-14)
    c, s = fit.design.formula_parameters["scale(Days)"]
    assert (c, s) == pytest.approx((4.5, np.std(np.tile(np.arange(10.0), 18), ddof=1)), rel=1e-12)


def test_factor_levels_as_in_the_fit():
    data = _data("sleepstudy").assign(week=lambda d: np.where(d.Days < 5, "first", "second"))
    fit = lmm.fit("Reaction ~ week + (1|Subject)", data)
    new = pd.DataFrame({"week": ["second"], "Subject": ["308"]})
    b = fit.params
    assert fit.predict(new, re_form="~0")[0] == pytest.approx(b["(Intercept)"] + b["weeksecond"], rel=1e-14)
    with pytest.raises(lmm.DataError, match="new level"):
        fit.predict(pd.DataFrame({"week": ["third"], "Subject": ["308"]}))


@pytest.mark.parametrize("name", list(CASES))
def test_simulate_moments(name):
    """E y* = X beta and var y*_i = sigma^2 (||Lambda^T z_i||^2 + 1) to 1e-8 against lme4's; the draws
    within Monte Carlo error of them (and lme4's draws too)."""
    case, fit = CASES[name], _fit(name)
    v = inference.marginal_variance(fit)
    tol = 1e-8 if name != "sleepstudy_slope" and name != "toy" else 2e-5   # the fit's own theta vs lme4's
    np.testing.assert_allclose(v, case["marginal_variance"], rtol=tol)
    nsim = case["simulate"]["nsim"]
    Y = fit.simulate(nsim, seed=1).to_numpy()
    mean, var = Y.mean(axis=1), Y.var(axis=1, ddof=1)
    se_mean = np.sqrt(v / nsim)
    assert np.max(np.abs(mean - fit.marginal_fitted) / se_mean) < 5
    assert np.max(np.abs(np.array(case["simulate"]["mean"]) - fit.marginal_fitted) / se_mean) < 5
    se_var = v * np.sqrt(2 / (nsim - 1))
    assert np.max(np.abs(var - v) / se_var) < 5
    assert np.max(np.abs(np.array(case["simulate"]["var"]) - v) / se_var) < 5
    np.testing.assert_array_equal(fit.simulate(3, seed=7).to_numpy(), fit.simulate(3, seed=7).to_numpy())


@pytest.mark.parametrize("name", list(CASES))
def test_profile_intervals_near_lme4s_default(name):
    """lme4's confint(fit) interpolates a spline through profile()'s few points (every 1/8 in zeta): its
    limits lie within 2e-3 (relative) of ours, the roots themselves, on these cases (9e-3 on the toy
    data's scale of 25); the 1e-4 comparison is with lme4's profile on a fine grid (PROFILES below)."""
    case, fit = CASES[name], _fit(name)
    ref = case["confint_profile"]
    ours = fit.conf_int().loc[ref["rows"]].to_numpy()
    theirs = np.array(ref["values"], dtype=float)
    assert np.all(np.abs(ours - theirs) <= 2e-3 * np.maximum(1.0, np.abs(theirs)))


PROFILES = REF["profiles"]
_PROFILE_DATA = {"toy": "toy", "sleepstudy": "sleepstudy", "dyestuff": "Dyestuff", "penicillin": "Penicillin",
                 "pastes": "Pastes"}


def _profile_fit(key):
    if key not in _FITS:
        case = PROFILES[key]
        data = lmm.datasets.load(_PROFILE_DATA[key.split("_")[0]])
        if case.get("weights"):          # the R script's w = 1 + (as.integer(Subject) %% 3); {} is R's NULL
            data = data.assign(w=1 + (data["Subject"].cat.codes.to_numpy() + 1) % 3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", lmm.LMMWarning)
            _FITS[key] = lmm.fit(case["formula"], data, method=case["method"], weights=case.get("weights") or None)
    return _FITS[key]


@pytest.mark.parametrize("key", list(PROFILES))
def test_profile_intervals_match_lme4s_fine_profile(key):
    """The roots of zeta = +-qnorm(0.975) against lme4's confint(profile(fit, delta.cutoff = 1/128)), whose
    spline through ~1000 points has converged: within 1e-4 (relative to max(1, |limit|)); the rows are
    lme4's rownames, .sigNN in lme4's order of the terms (most levels first)."""
    case, fit = PROFILES[key], _profile_fit(key)
    ref = case["confint_fine"]
    ci = fit.conf_int()
    assert list(ci.index) == ref["rows"] == case["confint_default"]["rows"]
    assert list(ci.columns) == ref["cols"]
    theirs = np.array(ref["values"], dtype=float)
    ours = ci.to_numpy()
    default = np.array(case["confint_default"]["values"], dtype=float)
    if case.get("weights"):
        # lme4 1.1-31 profiles a weighted fit's fixed effects wrongly (an interval some 1/400 of the Wald
        # interval's width, around the estimate): only the variance parameters are compared; the fixed
        # effects' limits are checked as roots of zeta and against the Wald interval
        k = len(inference.varpar_names(fit.design))
        wald = fit.conf_int(method="wald").to_numpy()[k:]
        assert np.all(np.abs(ours[k:] - wald) < 0.1 * (wald[:, 1:] - wald[:, :1]))
        pr = inference._Profiler(fit)
        z = scipy.stats.norm.ppf(0.975)
        for name, (lo, hi) in ci.iloc[k:].iterrows():
            assert (pr.zeta(name, lo), pr.zeta(name, hi)) == pytest.approx((-z, z), abs=1e-6)
        ours, theirs, default = ours[:k], theirs[:k], default[:k]
    assert np.all(np.abs(ours - theirs) <= 1e-4 * np.maximum(1.0, np.abs(theirs))), (ci, theirs)
    # lme4's default (the coarse spline) is further off, but still close
    assert np.all(np.abs(ours - default) <= 5e-3 * np.maximum(1.0, np.abs(default)))


def test_sig_names_follow_lme4s_order_of_the_terms():
    """(1|sample) + (1|plate): lme4 puts plate (24 levels) before sample (6), so .sig01 is plate's SD in
    confint, parameters and the labels; the formula's order does not change the intervals."""
    a, b = _profile_fit("penicillin_REML"), _profile_fit("penicillin_reversed_REML")
    assert b.to_dict()["theta_names"] == PROFILES["penicillin_reversed_REML"]["theta_names"]
    assert inference.varpar_labels(b.design) == ["sd_(Intercept)|plate", "sd_(Intercept)|sample", "sigma"]
    assert inference.varpar_labels(a.design) == inference.varpar_labels(b.design)
    np.testing.assert_allclose(inference.parameters(b), inference.parameters(a), rtol=1e-7)
    assert inference.parameters(b)[".sig01"] == pytest.approx(
        float(b.variance_components.set_index("group").loc["plate", "sd"]), rel=1e-12)
    pastes = _profile_fit("pastes_REML")
    assert inference.varpar_labels(pastes.design)[:2] == ["sd_(Intercept)|cask:batch", "sd_(Intercept)|batch"]


@pytest.mark.parametrize("key", ["toy_ML", "sleepstudy_slope_REML", "penicillin_reversed_REML"])
def test_zeta_at_the_limits_is_plus_minus_z(key):
    """A fresh profiler, started from the estimate, gives zeta = -+z at our limits (no warm start shared),
    and the deviance at the estimate is the ML fit's."""
    fit = _profile_fit(key)
    ci = fit.conf_int()
    pr = inference._Profiler(fit)
    ml = fit if fit.method == "ML" else inference.refit(fit, fit.design.y, method="ML")
    assert pr.base + 2 * pr.n * np.log(pr.k) == pytest.approx(ml.deviance, rel=1e-10)
    z = scipy.stats.norm.ppf(0.975)
    for name, (lo, hi) in ci.iterrows():
        for side, v in ((-1, lo), (1, hi)):
            if pr.kind(name) == "sd" and v == 0:
                assert pr.zeta(name, 0.0) > -z
                continue
            assert pr.zeta(name, v) == pytest.approx(side * z, abs=1e-6), (name, v)


def test_profile_points_lie_on_the_curve_and_are_few():
    """profile(): the root search's own points plus a few to fill in, each one's zeta the profile's."""
    fit = _profile_fit("sleepstudy_slope_ML")
    prof = fit.profile(points=9)
    counts = prof.groupby(".par").size()
    assert set(counts.index) == set(inference.parameters(fit).index)
    assert counts.min() >= 9 and counts.max() <= 30
    pr = inference._Profiler(fit)
    for name, sub in prof.groupby(".par"):
        sub = sub.sort_values("value")
        assert np.all(np.diff(sub[".zeta"]) > -1e-9)                   # zeta increases with the parameter
        assert sub[".zeta"].min() < -2.5 and sub[".zeta"].max() > 2.5   # out to level 0.99's +-2.58
        row = sub.iloc[len(sub) // 3]
        assert pr.zeta(name, row["value"]) == pytest.approx(row[".zeta"], abs=1e-6)


def test_kinship_profile_equals_the_random_intercepts():
    """K = Z Z^T of sleepstudy's Subject is (1|Subject): the kinship fit's profile intervals are the
    random-intercept fit's, which match lme4's (above)."""
    data = _data("sleepstudy")
    codes = data["Subject"].cat.codes.to_numpy()
    Z = (codes[:, None] == np.arange(18)).astype(float)
    for method in ("ML", "REML"):
        a = lmm.fit("Reaction ~ Days", data, method=method, kinship=Z @ Z.T)
        b = lmm.fit("Reaction ~ Days + (1|Subject)", data, method=method)
        ca, cb = a.conf_int(), b.conf_int()
        assert list(ca.index) == [".sig01", ".sigma", "(Intercept)", "Days"]
        np.testing.assert_allclose(ca.to_numpy(), cb.to_numpy(), rtol=1e-8)
    lme4_fine = np.array(PROFILES["sleepstudy_intercept_ML"]["confint_fine"]["values"])
    np.testing.assert_allclose(ca.to_numpy(), lme4_fine, rtol=1e-6)


def _dense_ml_deviance(y, X, K, sig_s, sig, fixed=None):
    """-2 log L of y ~ N(X beta, sig_s^2 K + sig^2 I) at the GLS beta (beta_j held at b when fixed = (j, b)),
    by a dense Cholesky factor: the brute force beside the profiler's criterion."""
    S = sig_s**2 * K + sig**2 * np.eye(len(y))
    L = np.linalg.cholesky(S)
    Xw, yw = np.linalg.solve(L, X), np.linalg.solve(L, y)
    if fixed is not None:
        j, b = fixed
        keep = [k for k in range(X.shape[1]) if k != j]
        yw, Xw = yw - b * Xw[:, j], Xw[:, keep]
    beta = np.linalg.lstsq(Xw, yw, rcond=None)[0]
    r = yw - Xw @ beta
    return float(2 * np.log(np.diag(L)).sum() + r @ r + len(y) * np.log(2 * np.pi))


def test_kinship_profile_against_a_brute_force_profile():
    """A genomic relationship matrix (no random term): each limit against the root of a profile computed
    the plain way -- the dense -2 log L, the other variance parameters maximised numerically (Nelder-Mead on
    their logs), beta by GLS -- zeta = +-z found by Brent's method."""
    import scipy.optimize
    rng = np.random.default_rng(5)
    n, markers = 60, 30
    G = rng.normal(size=(n, markers))
    K = G @ G.T / markers
    x = rng.normal(size=n)
    y = 2 + 0.5 * x + rng.multivariate_normal(np.zeros(n), 0.8 * K + 0.5 * np.eye(n))
    fit = lmm.fit("y ~ x", pd.DataFrame({"y": y, "x": x}), method="ML", kinship=K)
    ci = fit.conf_int()
    X = np.column_stack([np.ones(n), x])
    base = _dense_ml_deviance(y, X, K, fit.sigma_s, fit.sigma)
    assert base == pytest.approx(fit.deviance, rel=1e-9)
    z = scipy.stats.norm.ppf(0.975)

    def profiled(name, v):
        if name == ".sig01":
            res = scipy.optimize.minimize_scalar(lambda ls: _dense_ml_deviance(y, X, K, v, np.exp(ls)),
                                                 bracket=(np.log(fit.sigma) - 0.5, np.log(fit.sigma) + 0.5),
                                                 tol=1e-12)
        elif name == ".sigma":
            res = scipy.optimize.minimize_scalar(lambda ls: _dense_ml_deviance(y, X, K, np.exp(ls), v),
                                                 bracket=(np.log(fit.sigma_s) - 0.5, np.log(fit.sigma_s) + 0.5),
                                                 tol=1e-12)
        else:
            j = list(fit.params.index).index(name)
            res = scipy.optimize.minimize(lambda p: _dense_ml_deviance(y, X, K, *np.exp(p), fixed=(j, v)),
                                          np.log([fit.sigma_s, fit.sigma]), method="Nelder-Mead",
                                          options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 4000})
        est = inference.parameters(fit)[name]
        return np.sign(v - est) * np.sqrt(max(res.fun - base, 0.0))

    for name, (lo, hi) in ci.iterrows():
        est = inference.parameters(fit)[name]
        for side, ours in ((-1, lo), (1, hi)):
            far = est + side * 3 * abs(ours - est)
            if name in (".sig01", ".sigma"):
                far = max(far, 1e-3 * est)
            root = scipy.optimize.brentq(lambda v: profiled(name, v) - side * z, *sorted((est + side * 1e-9, far)),
                                         xtol=1e-10)
            assert ours == pytest.approx(root, rel=1e-6, abs=1e-8), (name, side)


def test_wald_and_names():
    fit = _fit("sleepstudy_slope")
    wald = fit.conf_int(method="wald")
    assert list(wald.index) == [".sig01", ".sig02", ".sig03", ".sigma", "(Intercept)", "Days"]
    assert list(wald.columns) == ["2.5 %", "97.5 %"]
    z = scipy.stats.norm.ppf(0.975)
    assert wald.loc["Days", "97.5 %"] == pytest.approx(fit.params["Days"] + z * fit.bse["Days"], rel=1e-14)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in CASES if "confint_boot" in CASES[n]])
def test_bootstrap_within_monte_carlo_error(name):
    """Percentile limits of nsim refits against lme4's (other draws, as many): distribution-free, lme4's
    p-quantile must lie between our (p - d)- and (p + d)-quantiles, d = 4 sqrt(2 p (1 - p) / nsim) (four
    SEs of the difference of two sample quantiles' ranks)."""
    case, fit = CASES[name], _fit(name)
    # on the 4-row toy data bootMer's warm-started refit() lands elsewhere than a fresh lmer fit in most
    # draws; our refits agree with fresh lmer fits, so the toy is compared with that bootstrap
    ref = case.get("bootstrap_fresh_lmer", case["confint_boot"])
    nsim = ref["nsim"]
    boot = fit.bootstrap(nsim, seed=2)
    if "boundary_share" in ref:
        p = ref["boundary_share"]
        assert abs(boot.boundary_share - p) <= 4 * np.sqrt(2 * p * (1 - p) / nsim)
    theirs = np.array(ref["values"], dtype=float)
    for k, row in enumerate(ref["rows"]):
        draws = boot.draws[row].dropna().to_numpy()
        for j, p in enumerate((0.025, 0.975)):
            d = 4 * np.sqrt(2 * p * (1 - p) / nsim)
            lo, hi = np.quantile(draws, [max(p - d, 0), min(p + d, 1)])
            assert lo - 1e-8 <= theirs[k, j] <= hi + 1e-8, (row, p, lo, theirs[k, j], hi)
    assert 0 <= boot.boundary_share <= 1
    assert boot.n_failed == 0


def _anova_fits(formulas, data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lmm.LMMWarning)
        return [lmm.fit(f, data, method="REML") for f in formulas]


@pytest.mark.parametrize("key", list(REF["anova"]))
def test_anova_matches_lme4(key):
    ref = REF["anova"][key]
    data = _data("toy" if key.startswith("toy") else "sleepstudy")
    fits = _anova_fits(ref["formulas"], data)
    refit = key.endswith("_refit")
    table = lmm.anova(*fits, refit=True if refit else "auto")
    assert (inference.ML_REFIT_MESSAGE in table.attrs["notes"]) == refit
    for col in ("npar", "AIC", "BIC", "logLik", "deviance"):
        np.testing.assert_allclose(table[col].to_numpy(dtype=float), np.array(ref[col], dtype=float), rtol=1e-6)
    for col, rcol in (("Chisq", "Chisq"), ("Df", "Df"), ("Pr(>Chisq)", "p")):
        theirs = np.array([np.nan if v is None else v for v in ref[rcol]], dtype=float)
        np.testing.assert_allclose(table[col].to_numpy(dtype=float)[1:], theirs[1:], rtol=1e-6, atol=1e-12)
    assert list(table.columns[:8]) == ["npar", "AIC", "BIC", "logLik", "deviance", "Chisq", "Df", "Pr(>Chisq)"]


def test_anova_auto_refits_when_fixed_effects_differ_and_mixture():
    data = _data("sleepstudy")
    m1, m2 = _anova_fits(["Reaction ~ Days + (1|Subject)", "Reaction ~ Days + (Days|Subject)"], data)
    m0 = _anova_fits(["Reaction ~ 1 + (1|Subject)"], data)[0]
    assert inference.ML_REFIT_MESSAGE in lmm.anova(m0, m1).attrs["notes"]
    t = lmm.anova(m1, m2)                          # random effects only: REML compared directly
    assert inference.ML_REFIT_MESSAGE not in t.attrs["notes"]
    assert t["logLik"].iloc[1] == pytest.approx(m2.loglik, rel=1e-14)
    chisq, df = t["Chisq"].iloc[1], t["Df"].iloc[1]
    mixture = 0.5 * scipy.stats.chi2.sf(chisq, df - 1) + 0.5 * scipy.stats.chi2.sf(chisq, df)
    assert t["Pr(>Chisq) boundary"].iloc[1] == pytest.approx(mixture, rel=1e-12)
    # the old two-model test still works
    ml = [lmm.fit(f, data, method="ML") for f in ("Reaction ~ 1 + (1|Subject)", "Reaction ~ Days + (1|Subject)")]
    assert lmm.likelihood_ratio_test(*ml)["chisq"] == pytest.approx(lmm.anova(*ml)["Chisq"].iloc[1], rel=1e-12)


def test_bootstrap_quick():
    fit = _fit("sleepstudy_intercept")
    boot = fit.bootstrap(20, seed=4)
    again = fit.bootstrap(20, seed=4)
    assert boot.draws.equals(again.draws)
    assert list(boot.draws.columns) == [".sig01", ".sigma", "(Intercept)", "Days"]
    ci = fit.conf_int(method="boot", nsim=20, seed=4)
    np.testing.assert_allclose(ci.to_numpy(), boot.conf_int().to_numpy())
    assert boot.boundary_share == 0 and boot.n_failed == 0


def test_refit_same_design_new_response():
    fit = _fit("sleepstudy_slope")
    same = fit.refit(fit.design.y)
    assert same.loglik == pytest.approx(fit.loglik, rel=1e-12)
    y = fit.simulate(1, seed=3)["sim_1"].to_numpy()
    direct = lmm.fit(fit.design.formula, _data("sleepstudy").assign(Reaction=y))
    np.testing.assert_allclose(fit.refit(y).params, direct.params, rtol=1e-9)


@pytest.mark.parametrize("old,new,expected", [
    ("Reaction ~ Days + (1|Subject)", ". ~ . + I(Days^2)", "Reaction ~ Days + I(Days^2) + (1 | Subject)"),
    ("Reaction ~ Days + (Days|Subject)", ". ~ . - Days", "Reaction ~ (Days | Subject)"),
    ("Reaction ~ Days + (Days|Subject)", ". ~ . - (Days|Subject) + (1|Subject)", "Reaction ~ Days + (1 | Subject)"),
    ("Reaction ~ Days + (1|Subject)", "log(.) ~ .", "log(Reaction) ~ Days + (1 | Subject)"),
    ("y ~ a*b + (1|g)", "~ . - a:b", "y ~ a + b + (1 | g)"),
    ("y ~ a + (1|g)", ". ~ . - 1", "y ~ 0 + a + (1 | g)"),
])
def test_update_formula(old, new, expected):
    assert lmm.update_formula(old, new) == expected


def test_update_refits():
    fit = _fit("sleepstudy_intercept")
    bigger = fit.update(". ~ . + I(Days^2)")
    assert list(bigger.params.index) == ["(Intercept)", "Days", "I(Days^2)"]
    assert bigger.method == fit.method


def test_result_tables():
    fit = _fit("sleepstudy_slope")
    ct = fit.coef_table()
    assert list(ct.columns) == ["Estimate", "Std. Error", "df", "t value", "Pr(>|t|)"]
    assert fit.fixef().equals(fit.params)
    re = fit.ranef()["Subject"]
    assert {"(Intercept)", "Days", "cond_sd (Intercept)", "cond_sd Days"} <= set(re.columns)
    vc = fit.VarCorr()
    assert list(vc.columns) == ["grp", "var1", "var2", "vcov", "sdcor"]
    corr = vc[vc["var2"].notna()]["sdcor"].iloc[0]
    assert corr == pytest.approx(fit.correlations["corr"].iloc[0], rel=1e-14)
    d = fit.to_dict()
    assert {"coef_table", "fixef", "ranef", "varcorr", "parameters"} <= set(d)
    json.dumps(d, allow_nan=False)
    assert fit._repr_latex_().startswith("$$")


def test_cli_predict_profile_bootstrap_and_anova(tmp_path, capsys):
    from lmm_symbolic.cli import main
    new = tmp_path / "new.csv"
    new.write_text("Days,Subject\n0,308\n5,999\n")
    assert main(["fit", "sleepstudy", "Reaction ~ Days + (1|Subject)", "--predict", str(new), "--bootstrap", "5",
                 "--seed", "1", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    b = _fit("sleepstudy_intercept").params
    assert d["predict"]["population"][1] == pytest.approx(b["(Intercept)"] + 5 * b["Days"], rel=1e-10)
    assert d["predict"]["conditional"][1] == d["predict"]["population"][1]      # Subject 999 is new
    assert d["bootstrap"]["nsim"] == 5 and 0 <= d["bootstrap"]["boundary_share"] <= 1
    assert main(["anova", "sleepstudy", "Reaction ~ 1 + (1|Subject)", "Reaction ~ Days + (1|Subject)"]) == 0
    out = capsys.readouterr().out
    assert "refitting model(s) with ML (instead of REML)" in out and "Pr(>Chisq)" in out


def test_profile_zeta_plot():
    import matplotlib
    matplotlib.use("Agg")
    from lmm_symbolic.plots import plot_profile_zeta
    fit = _fit("sleepstudy_intercept")
    prof = fit.profile(points=5)
    assert set(prof[".par"]) == {".sig01", ".sigma", "(Intercept)", "Days"}
    fig = plot_profile_zeta(fit, prof)
    assert len([ax for ax in fig.axes if ax.get_visible()]) == 4


def test_profile_sig01_equals_the_sigma_s_profile_interval():
    """The random intercept's profile interval two ways: over (sigma_s, sigma) here and plots.py's own."""
    from lmm_symbolic.plots import profile_interval_sigma_s
    fit = _fit("sleepstudy_intercept")
    np.testing.assert_allclose(fit.conf_int(which=[".sig01"]).to_numpy()[0], profile_interval_sigma_s(fit),
                               rtol=1e-6)


@pytest.mark.slow
def test_after_fit_reference_matches_fresh_r_run(tmp_path):
    """The committed after_fit_reference.json really comes from make_after_fit_reference.R (seeded)."""
    import shutil
    import subprocess

    from test_reference_live import _differences, _r_missing
    reason = _r_missing()
    if reason is not None:
        pytest.skip(reason)
    import copy
    import os
    script = pathlib.Path(__file__).parent / "reference" / "make_after_fit_reference.R"
    out = tmp_path / "fresh.json"
    # the fine-grid profiles of all 12 cases take many minutes (the three-effect term most of them): the
    # fresh run profiles three quick ones, compared with the committed ones; the rest as committed
    quick = ["toy_ML", "dyestuff_REML", "penicillin_reversed_REML"]
    proc = subprocess.run([shutil.which("Rscript"), str(script), str(out)], capture_output=True, text=True,
                          timeout=1800, env={**os.environ, "LMM_PROFILE_CASES": ",".join(quick)})
    assert proc.returncode == 0, proc.stderr
    fresh = json.loads(out.read_text())
    committed = copy.deepcopy(REF)
    committed["profiles"] = {k: committed["profiles"][k] for k in quick}
    assert set(fresh["profiles"]) == set(quick)
    for case in list(fresh["cases"].values()) + list(committed["cases"].values()):
        case.get("confint_boot", {}).pop("seconds", None)
    for case in list(fresh["profiles"].values()) + list(committed["profiles"].values()):     # timings
        case.pop("seconds", None)
        case["confint_fine"].pop("seconds_fine", None)
    diffs = _differences(committed, fresh)
    assert not diffs, "\n".join(diffs[:40])


def test_predict_missing_values_give_nan_and_poly_uses_the_fits_coefficients():
    fit = _fit("sleepstudy_poly")
    new = pd.DataFrame({"Days": [np.nan, 4.0], "Subject": ["308", None]})
    out = fit.predict(new)
    assert np.isnan(out[0]) and np.isnan(out[1])
    assert np.isfinite(fit.predict(new, re_form="~0")[1])
    one = fit.predict(pd.DataFrame({"Days": [4.0], "Subject": ["308"]}))
    assert one[0] == pytest.approx(fit.predict()[4], rel=1e-12)      # Subject 308, Days 4 is row 4
