"""Differential testing against lme4 on seeded random designs (issue 18 item 1) and invariances (item 2).

Regression seeds: tests/differential/seeds/*.csv with lme4's answers in lme4_seeds.json (no R needed);
seeds 64 and 77 are weights with an offset, 581 and 854 crossed terms that lme4 reorders (theta checked).
Live (R present, slow): a fresh batch of seeds generated, fitted by lme4 in one Rscript call, compared.
Requires logLik never below lme4's by more than 1e-6 relative, identical n_obs, and an LMMError where lme4
refuses; for (1|g) designs with an ill-conditioned X (collinear, offset1000) lme4's logLik is replaced by the
criterion at lme4's theta in 60-digit arithmetic (lme4 rounds its REML log|X^T V^-1 X| there by up to 1e-3). Failures name the seed. Fits use exact=False (the exact step can hang: issue 12 item 1).
"""
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import lmm_symbolic as lmm

HERE = Path(__file__).parent / "differential"
sys.path.insert(0, str(HERE))
import generate  # noqa: E402

REF = json.loads((HERE / "lme4_seeds.json").read_text())


def _read(path):
    d = pd.read_csv(path, keep_default_na=False, na_values=[""])
    for c in ("g", "h", "f"):
        if c in d:
            d[c] = d[c].astype(str).astype("category")
    return d


def exact_loglik(design, theta, reml):
    """The profiled log-likelihood (REML criterion / -2) of a (1|g) design at theta in 60-digit arithmetic:
    X^T V^-1 X, the GLS fit and log|X^T V^-1 X| from per-group sums, V_g = I + theta^2 J."""
    import mpmath as mp
    with mp.workdps(60):
        th2 = mp.mpf(float(theta)) ** 2
        X = [[mp.mpf(float(v)) for v in row] for row in design.X]
        y = [mp.mpf(float(v)) for v in design.y]
        n, p = design.X.shape
        codes = np.asarray(design.terms[0].codes)
        A, c, yVy, logV = mp.zeros(p, p), mp.zeros(p, 1), mp.mpf(0), mp.mpf(0)
        for j in range(design.terms[0].n_levels):
            rows = np.flatnonzero(codes == j)
            w = th2 / (1 + len(rows) * th2)
            logV += mp.log(1 + len(rows) * th2)
            s1 = [mp.fsum(X[i][a] for i in rows) for a in range(p)]
            sy = mp.fsum(y[i] for i in rows)
            for a in range(p):
                c[a] += mp.fsum(X[i][a] * y[i] for i in rows) - w * s1[a] * sy
                for b in range(p):
                    A[a, b] += mp.fsum(X[i][a] * X[i][b] for i in rows) - w * s1[a] * s1[b]
            yVy += mp.fsum(y[i] ** 2 for i in rows) - w * sy ** 2
        beta = mp.lu_solve(A, c)
        rss = yVy - (c.T * beta)[0]
        ne = n - p if reml else n
        dev = logV + ne * (1 + mp.log(2 * mp.pi * rss / ne)) + (mp.log(mp.det(A)) if reml else 0)
        return float(-dev / 2)


def check(ref, data, weights):
    tag = f"seed {ref['seed']} ({ref['family']}, {ref['formula']}, {ref['method']})"
    if ref["family"] in ("collinear", "offset1000") and "(x | g)" not in ref["formula"] and "loglik" in ref:
        # x2 = x + 1 + 1e-6 noise, x = 1000 + 0.01 z: cond(X) ~ 1e7..1e8, so lme4's log|X^T V^-1 X| (REML) is
        # rounded by up to cond(X)^2 eps ~ 1e-3 (measured: seed 4 REML +1.13e-3, seed 17 +6.4e-4, seed 1084
        # +7.4e-6 above the criterion's value at lme4's own theta). The reference is therefore the criterion
        # at lme4's theta in 60 digits.
        design = lmm.specify(ref["formula"], data)
        exact = exact_loglik(design, next(iter(ref["theta"].values())), ref["method"] == "REML")
        assert ref["loglik"] == pytest.approx(exact, abs=2e-3), f"{tag}: lme4's logLik vs its criterion"
        ref = {**ref, "loglik": exact, "theta_converged": ref["method"] == "ML" or ref["family"] != "collinear"}
    kw = {"method": ref["method"], "exact": False}
    if weights:
        kw["weights"] = data[weights].to_numpy(float)
    if "error" in ref:
        with pytest.raises(lmm.LMMError):
            lmm.fit(ref["formula"], data, **kw)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f = lmm.fit(ref["formula"], data, **kw)
    assert f.n_obs == ref["n_obs"], tag
    assert f.loglik >= ref["loglik"] - 1e-6 * abs(ref["loglik"]), f"{tag}: logLik {f.loglik} < lme4 {ref['loglik']}"
    if "theta" in ref:                              # getME(fit, "theta"): names and order, values near
        out = f.to_dict()
        assert out["theta_names"] == list(ref["theta"]), f"{tag}: theta order {out['theta_names']}"
        # (x|g) at x ~ 1000: lme4 stops short on a criterion flat in its theta; collinear REML: lme4 stops on a
        # criterion it evaluates to ~1e-3 (above), 0.8% short in theta (seed 30)
        if ref["family"] != "offset1000" and ref.get("theta_converged", True):
            np.testing.assert_allclose(out["theta"], list(ref["theta"].values()), atol=5e-3, rtol=5e-3, err_msg=tag)
    return f.loglik - ref["loglik"]


@pytest.mark.parametrize("key", list(REF))
def test_regression_seed_reaches_lme4(key):
    ref = REF[key]
    w = "w" if ref["family"] == "weights" else None
    check(ref, _read(HERE / "seeds" / f"seed{ref['seed']}.csv"), w)


@pytest.mark.slow
def test_live_random_designs_against_lme4(tmp_path):
    if shutil.which("Rscript") is None:
        pytest.skip("R not installed")
    seeds = range(1000, 1100)
    generate.write_batch(seeds, tmp_path)
    subprocess.run(["Rscript", str(HERE / "fit_lme4.R"), str(tmp_path), str(tmp_path / "out.json")], check=True,
                   timeout=300)
    fresh = json.loads((tmp_path / "out.json").read_text())
    failures, differences, refused = [], [], 0
    for ref in fresh.values():
        try:
            diff = check(ref, _read(tmp_path / f"seed{ref['seed']}.csv"), "w" if ref["family"] == "weights" else None)
            if diff is None:
                refused += 1
            else:
                differences.append((diff / abs(ref["loglik"]), ref["seed"], ref["method"]))
        except Exception as e:  # noqa: BLE001 -- collected with the seed
            failures.append(f"seed {ref['seed']} {ref['method']}: {type(e).__name__}: {str(e)[:150]}")
    worst = min(differences) if differences else None
    print(f"compared {len(fresh)} fits of {len(fresh) // 2} designs: {len(differences)} fitted at or above lme4's "
          f"logLik (within 1e-6 relative), {refused} refused by both, "
          f"{len(failures)} failures; worst relative logLik difference (ours - lme4's) {worst}")
    assert not failures, "\n".join(failures)


# ------------------------------------------------------------------ invariances (issue 18 item 2)
def _fit(d, formula="y ~ x + (1 | g)", method="ML"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lmm.fit(formula, d, method=method, exact=False)


@pytest.fixture(scope="module")
def base():
    d, _, _, _ = generate.design(14)                          # unbalanced, random intercept
    d["g"] = d["g"].astype("category")
    return d


def test_row_order(base):
    a, b = _fit(base), _fit(base.sample(frac=1, random_state=1).reset_index(drop=True))
    assert b.loglik == pytest.approx(a.loglik, rel=1e-9)
    np.testing.assert_allclose(b.params.values, a.params.values, rtol=1e-6)


def test_renamed_levels(base):
    d = base.copy()
    d["g"] = d["g"].cat.rename_categories(lambda s: "L" + s[::-1])
    a, b = _fit(base), _fit(d)
    assert b.loglik == pytest.approx(a.loglik, rel=1e-9)
    assert b.sigma_s == pytest.approx(a.sigma_s, rel=1e-6)


@pytest.mark.parametrize("c", [1e-3, 7.0, 1e4])
def test_response_times_c(base, c):
    d = base.copy()
    d["y"] = d["y"] * c
    a, b = _fit(base), _fit(d)
    np.testing.assert_allclose(b.params.values, a.params.values * c, rtol=1e-5)
    assert b.sigma == pytest.approx(a.sigma * c, rel=1e-5)
    assert b.loglik == pytest.approx(a.loglik - a.n_obs * np.log(c), rel=1e-8, abs=1e-6)


def test_response_plus_c(base):
    d = base.copy()
    d["y"] = d["y"] + 1000
    a, b = _fit(base), _fit(d)
    assert b.params["(Intercept)"] == pytest.approx(a.params["(Intercept)"] + 1000, rel=1e-8)
    assert b.params["x"] == pytest.approx(a.params["x"], rel=1e-5)
    assert b.loglik == pytest.approx(a.loglik, rel=1e-8)


@pytest.mark.parametrize("scale,shift", [(3.0, 0.0), (1.0, 1000.0), (0.01, -50.0)])
def test_covariate_affine_keeps_fitted_values(base, scale, shift):
    """x -> a x + b is the same model for (1|g) and for (x|g) (an unstructured 2 x 2 covariance): the same
    logLik and fitted values; with x far from 0 (x + 1000) lme4's own theta is ill-conditioned, the core
    fits in a centred basis (specification.conditioned)."""
    d = base.copy()
    d["x"] = d["x"] * scale + shift
    for formula in ("y ~ x + (1 | g)", "y ~ x + (x | g)"):
        a, b = _fit(base, formula), _fit(d, formula)
        np.testing.assert_allclose(b.fitted, a.fitted, rtol=1e-5, atol=1e-6, err_msg=formula)
        assert b.loglik == pytest.approx(a.loglik, rel=1e-8), formula
        if "(x | g)" in formula:
            # reported for the user's x: b0 + b1 x = (b0 - b1 shift / scale) + (b1 / scale) x', so
            # b' = C b and D' = C D C^T with C = [[1, -shift/scale], [0, 1/scale]]
            C = np.array([[1.0, -shift / scale], [0.0, 1.0 / scale]])
            Da, Db = _covariance(a), _covariance(b)
            np.testing.assert_allclose(Db, C @ Da @ C.T, rtol=1e-4, atol=1e-6 * np.abs(Db).max())
            ba, bb = a.random_effects[["(Intercept)", "x"]].to_numpy(), b.random_effects[["(Intercept)", "x"]].to_numpy()
            np.testing.assert_allclose(bb, ba @ C.T, rtol=1e-4, atol=1e-5 * np.abs(bb).max())


def _covariance(fit):
    """D of the (x | g) term from VarCorr."""
    vc = fit.variance_components.set_index("term")
    sd = vc.loc[["(Intercept)", "x"], "sd"].to_numpy(float)
    rho = float(fit.correlations["corr"].iloc[0])
    return np.outer(sd, sd) * np.array([[1.0, rho], [rho, 1.0]])
