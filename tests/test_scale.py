"""A million rows: the fit from per-group statistics gives a finite log-likelihood equal to the sum of
dense per-group multivariate normal densities at the estimates (speed goals live in benchmarks/)."""
import numpy as np
import pandas as pd
import pytest
import scipy.stats

import lmm_symbolic as lmm
from lmm_symbolic.results import full_loglik

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def million():
    rng = np.random.default_rng(10**6)
    n, G = 10**6, 10**4
    g = rng.integers(0, G, n)
    x1, x2 = rng.normal(size=n), rng.normal(size=n)
    y = 1e4 + 0.5 * x1 - 0.3 * x2 + 2.0 * rng.normal(size=G)[g] + rng.normal(size=n)
    data = pd.DataFrame({"y": y, "x1": x1, "x2": x2, "g": g})
    return data, lmm.fit("y ~ x1 + x2 + (1|g)", data, method="ML")


def _dense_loglik(data: pd.DataFrame, beta, sigma: float, sigma_s: float) -> float:
    """sum over groups of log N(y_g; X_g beta, sigma^2 I + sigma_s^2 J), groups of one size at a time."""
    X = np.column_stack([np.ones(len(data)), data.x1, data.x2])
    r = data.y.to_numpy() - X @ np.asarray(beta)
    order = np.argsort(data.g.to_numpy(), kind="stable")
    sizes = np.bincount(data.g.to_numpy())
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    total = 0.0
    for m in np.unique(sizes[sizes > 0]):
        groups = np.flatnonzero(sizes == m)
        rows = order[(starts[groups][:, None] + np.arange(m)).ravel()].reshape(len(groups), m)
        cov = sigma**2 * np.eye(m) + sigma_s**2 * np.ones((m, m))
        chol = scipy.stats.Covariance.from_cholesky(np.linalg.cholesky(cov))
        total += scipy.stats.multivariate_normal.logpdf(r[rows], mean=np.zeros(m), cov=chol).sum()
    return float(total)


def test_a_million_rows_give_the_dense_per_group_log_likelihood(million):
    data, fit = million
    assert fit.n_obs == 10**6 and fit.converged
    assert np.isfinite(fit.loglik)
    dense = _dense_loglik(data, fit.params.values, fit.sigma, fit.sigma_s)
    assert fit.loglik == pytest.approx(dense, rel=1e-9)
    assert fit.params["x1"] == pytest.approx(0.5, abs=0.01) and fit.sigma == pytest.approx(1.0, abs=0.01)


def test_a_million_rows_at_the_maximum(million):
    data, fit = million
    # Eq. 10 compiled over the statistics: the same value, and a vanishing gradient at the estimates
    ll = full_loglik(fit)
    assert ll(fit.sigma, fit.sigma_s, fit.params.values) == pytest.approx(fit.loglik, rel=1e-12)
    grad = ll.gradient(fit.sigma, fit.sigma_s, fit.params.values)
    assert np.all(np.abs(grad) < 1e-4 * np.sqrt(fit.n_obs))
    # and moving away lowers the log-likelihood (dense, and from the statistics)
    assert _dense_loglik(data, fit.params.values, fit.sigma + 0.01, fit.sigma_s - 0.05) < fit.loglik
    for d_sigma, d_sigma_s in ((0.01, 0.0), (0.0, 0.05), (-0.01, -0.05)):
        assert ll(fit.sigma + d_sigma, fit.sigma_s + d_sigma_s, fit.params.values) < fit.loglik
