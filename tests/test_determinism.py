"""Determinism (issue 8): the same data and formula give bit-identical JSON, in one process and across
processes with different hash seeds; the row order of the input does not change the estimates beyond
1e-10 relative."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest

import lmm_symbolic as lmm
from lmm_symbolic import LMMWarning


def unbalanced(seed: int = 11) -> pd.DataFrame:
    """Unbalanced groups (1 to 12 observations), two covariates, one of them constant within groups."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 13, size=25)
    codes = np.repeat(np.arange(25), sizes)
    n = len(codes)
    w = rng.normal(size=25)[codes]
    x = rng.normal(size=n)
    y = 10 + 2 * x - w + rng.normal(scale=1.5, size=25)[codes] + rng.normal(size=n)
    return pd.DataFrame({"y": y, "x": x, "w": w, "g": [f"s{c:02d}" for c in codes]})


CASES = [
    ("toy", lambda: lmm.datasets.load("toy"), "Resp ~ Treat + (1|Ind)"),
    ("sleepstudy", lambda: lmm.datasets.load("sleepstudy"), "Reaction ~ Days + (1|Subject)"),
    ("Dyestuff2", lambda: lmm.datasets.load("Dyestuff2"), "Yield ~ 1 + (1|Batch)"),
    ("unbalanced", unbalanced, "y ~ x + w + (1|g)"),
]


def _fit(formula, data, method):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LMMWarning)
        return lmm.fit(formula, data, method=method)


@pytest.mark.parametrize("method", ["ML", "REML"])
@pytest.mark.parametrize("name, data, formula", CASES, ids=[c[0] for c in CASES])
def test_the_same_fit_twice_gives_bit_identical_json(name, data, formula, method):
    first, second = _fit(formula, data(), method), _fit(formula, data(), method)
    assert first.to_json() == second.to_json()
    assert first.to_dict() == second.to_dict()


@pytest.mark.parametrize("name, data, formula", CASES[:3], ids=[c[0] for c in CASES[:3]])
def test_the_same_derivation_twice_gives_identical_json(name, data, formula):
    assert lmm.derive(formula, data()).to_dict() == lmm.derive(formula, data()).to_dict()


def _cli(args: list[str], hash_seed: str) -> str:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    res = subprocess.run([sys.executable, "-m", "lmm_symbolic", *args], capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    return res.stdout


@pytest.mark.parametrize("args", [
    ["fit", "sleepstudy", "Reaction ~ Days + (1|Subject)", "--json"],
    ["fit", "toy", "Resp ~ Treat + (1|Ind)", "--ml", "--json"],
    ["fit", "UNBALANCED", "y ~ x + w + (1|g)", "--json"],
    ["derive", "toy", "Resp ~ Treat + (1|Ind)", "--json"],
    ["derive", "Dyestuff", "Yield ~ 1 + (1|Batch)", "--json"],
], ids=["fit-sleepstudy", "fit-toy-ml", "fit-unbalanced", "derive-toy", "derive-Dyestuff"])
def test_cli_json_is_bit_identical_across_processes_and_hash_seeds(args, tmp_path):
    if "UNBALANCED" in args:
        path = tmp_path / "unbalanced.csv"
        unbalanced().to_csv(path, index=False)
        args = [str(path) if a == "UNBALANCED" else a for a in args]
    outputs = {_cli(args, seed) for seed in ("0", "12345")}
    assert len(outputs) == 1


def _assert_same_estimates(a, b, rtol=1e-10):
    np.testing.assert_allclose(a.params, b.params, rtol=rtol, atol=0)
    np.testing.assert_allclose(a.bse, b.bse, rtol=rtol, atol=0)
    np.testing.assert_allclose(a.df_satterthwaite, b.df_satterthwaite, rtol=1e-8, atol=0)
    np.testing.assert_allclose([a.sigma, a.loglik, a.aic, a.bic, a.deviance],
                               [b.sigma, b.loglik, b.aic, b.bic, b.deviance], rtol=rtol, atol=0)
    if a.sigma_s == 0.0:
        assert b.sigma_s == 0.0
    else:
        assert b.sigma_s == pytest.approx(a.sigma_s, rel=rtol, abs=0)
    ra, rb = a.random_effects["(Intercept)"], b.random_effects["(Intercept)"]
    assert list(ra.index) == list(rb.index)
    np.testing.assert_allclose(ra, rb, rtol=rtol, atol=1e-12 * a.sigma)
    assert (a.converged, a.singular, a.n_obs) == (b.converged, b.singular, b.n_obs)
    assert (a.exact is None) == (b.exact is None)
    if a.exact is not None:
        assert (a.exact.sigma2, a.exact.sigma_s2) == (b.exact.sigma2, b.exact.sigma_s2)


@pytest.mark.parametrize("method", ["ML", "REML"])
@pytest.mark.parametrize("name, data, formula", CASES, ids=[c[0] for c in CASES])
def test_row_order_does_not_change_the_estimates(name, data, formula, method):
    df = data()
    base = _fit(formula, df, method)
    for seed in (1, 2, 3):
        shuffled = df.sample(frac=1.0, random_state=seed).reset_index(drop=True)
        result = _fit(formula, shuffled, method)
        _assert_same_estimates(base, result)
        # fitted values follow their rows
        order = df.sample(frac=1.0, random_state=seed).index.to_numpy()
        np.testing.assert_allclose(result.fitted, base.fitted[order], rtol=1e-10, atol=1e-12)


def test_row_order_does_not_change_the_closed_forms():
    df = unbalanced(5).iloc[:60]
    formula = "y ~ x + (1|g)"
    d1 = lmm.derive(formula, df)
    d2 = lmm.derive(formula, df.sample(frac=1.0, random_state=4).reset_index(drop=True))
    assert d1.det == d2.det and d1.logdet == d2.logdet
