"""A user-given relationship matrix: Sigma = sigma_s^2 K + sigma^2 I through K's eigendecomposition."""

import numpy as np
import pytest
import scipy.stats
import sympy as sp

import lmm_symbolic as lmm
from lmm_symbolic.statistics import SpectralStatistics


@pytest.fixture(scope="module")
def sleep():
    data = lmm.datasets.load("sleepstudy")
    codes = data["Subject"].cat.codes.to_numpy()
    Z = (codes[:, None] == np.arange(18)).astype(float)
    return data, Z @ Z.T


@pytest.mark.parametrize("method", ["ML", "REML"])
def test_kinship_zzt_gives_the_random_intercept_fit(sleep, method):
    data, K = sleep
    a = lmm.fit("Reaction ~ Days", data, method=method, kinship=K)
    b = lmm.fit("Reaction ~ Days + (1|Subject)", data, method=method)
    assert a.loglik == pytest.approx(b.loglik, rel=1e-12)
    assert a.sigma == pytest.approx(b.sigma, rel=1e-10)
    assert a.sigma_s == pytest.approx(b.sigma_s, rel=1e-10)
    np.testing.assert_allclose(a.params, b.params, rtol=1e-10)
    np.testing.assert_allclose(a.bse, b.bse, rtol=1e-10)
    np.testing.assert_allclose(a.df_satterthwaite, b.df_satterthwaite, rtol=1e-8)
    np.testing.assert_allclose(a.fitted, b.fitted, rtol=1e-10)
    assert a.aic == pytest.approx(b.aic, rel=1e-12)


@pytest.mark.parametrize("method", ["ML", "REML"])
def test_genomic_relationship_matrix_matches_dense_logpdf(method):
    rng = np.random.default_rng(11)
    n, markers = 120, 40
    G = rng.normal(size=(n, markers))
    K = G @ G.T / markers
    x = rng.normal(size=n)
    y = 2 + 0.5 * x + rng.multivariate_normal(np.zeros(n), 0.8 * K + 0.5 * np.eye(n))
    import pandas as pd
    data = pd.DataFrame({"y": y, "x": x})
    fit = lmm.fit("y ~ x", data, method=method, kinship=K)
    assert fit.converged
    X = np.column_stack([np.ones(n), x])
    S = fit.sigma_s**2 * K + fit.sigma**2 * np.eye(n)
    dense = scipy.stats.multivariate_normal(X @ fit.params.values, S).logpdf(y)
    if method == "REML":
        dense += -0.5 * np.linalg.slogdet(X.T @ np.linalg.solve(S, X))[1] + np.log(2 * np.pi)
    assert fit.loglik == pytest.approx(dense, rel=1e-9)
    # the GLS estimate and its covariance
    beta = np.linalg.solve(X.T @ np.linalg.solve(S, X), X.T @ np.linalg.solve(S, y))
    np.testing.assert_allclose(fit.params.values, beta, rtol=1e-9)
    np.testing.assert_allclose(fit.vcov.values, np.linalg.inv(X.T @ np.linalg.solve(S, X)), rtol=1e-8)


def test_spectral_closed_forms_come_from_the_block_identities():
    """With Z = sqrt(lambda), m = 1 the block determinant and quadratic form are the FaST-LMM forms."""
    from lmm_symbolic.derivation import m, random_intercept_block, sigma, sigma_s
    lam, r = sp.symbols("lambda r", positive=True)
    blk = random_intercept_block()
    assert sp.simplify(blk.det.subs(m, 1) - (sigma**2 + sigma_s**2)) == 0
    S = sp.Matrix([[lam]])
    from lmm_symbolic.derivation import block_identities
    spec = block_identities(blk.D, S, sp.Matrix([[sp.sqrt(lam) * r]]), blk.params)
    assert sp.simplify(spec.det.subs(m, 1) - (sigma**2 + lam * sigma_s**2)) == 0
    assert sp.simplify(spec.quadratic.subs(spec.R2, r**2) - r**2 / (sigma**2 + lam * sigma_s**2)) == 0


def test_each_evaluation_is_linear_after_one_eigendecomposition(sleep):
    data, K = sleep
    design = lmm.specify("Reaction ~ Days", data, kinship=K)
    stats = SpectralStatistics.of(design)
    assert stats.m.shape == (180,) and stats.n == 180


@pytest.mark.parametrize("K, message", [
    (np.ones((180, 179)), "square"),
    (np.ones((10, 10)), "180 rows"),
    (np.triu(np.ones((180, 180))), "symmetric"),
    (-np.eye(180), "positive semi-definite"),
    (np.full((180, 180), np.nan), "missing"),
])
def test_bad_kinship_matrices(sleep, K, message):
    data, _ = sleep
    with pytest.raises(lmm.DataError, match=message):
        lmm.fit("Reaction ~ Days", data, kinship=K)


def test_kinship_with_random_terms_is_refused(sleep):
    data, K = sleep
    with pytest.raises(lmm.FormulaError, match="either"):
        lmm.fit("Reaction ~ Days + (1|Subject)", data, kinship=K)


def test_cli_fit_with_kinship_csv(tmp_path, capsys):
    import json

    from lmm_symbolic.cli import main
    data = lmm.datasets.load("toy")
    codes = data["Ind"].cat.codes.to_numpy()
    Z = (codes[:, None] == np.arange(2)).astype(int)
    path = tmp_path / "K.csv"
    np.savetxt(path, Z @ Z.T, delimiter=",", fmt="%d")
    assert main(["fit", "toy", "Resp ~ Treat", "--kinship", str(path), "--ml", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["random_effects"][0]["sd"] == pytest.approx(np.sqrt(133) / 2, rel=1e-9)
    assert main(["fit", "toy", "Resp ~ Treat", "--kinship", str(tmp_path / "missing.csv")]) == 2
