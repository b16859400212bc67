"""A Dask DataFrame as data: the per-group statistics computed by Dask on a distributed LocalCluster, then
fitted as usual; the same fit as in memory to 1e-10."""
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest

import lmm_symbolic as lmm
from lmm_symbolic.compilation import ProfiledDeviance
from lmm_symbolic.statistics import DaskDesign, GroupStatistics, specify_dask

dd = pytest.importorskip("dask.dataframe")
distributed = pytest.importorskip("dask.distributed")

REL = 1e-10


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                       dashboard_address=None)
    with distributed.Client(cluster) as c:
        yield c
    cluster.close()


@pytest.fixture(scope="module")
def frame():
    rng = np.random.default_rng(2024)
    n, G = 6000, 120
    g = rng.integers(0, G, n)
    frame = pd.DataFrame({
        "y": 50.0 + rng.normal(size=n) * 2 + rng.normal(size=G)[g] * 3,
        "x1": rng.normal(size=n), "x2": rng.normal(size=n) * 10,
        "treat": rng.choice(["ctl", "low", "high"], n), "site": rng.choice(["s1", "s2"], n),
        "g": g, "name": np.array([f"id{k:03d}" for k in range(G)])[g]})
    frame["y"] += 0.5 * frame.x1 - 0.05 * frame.x2 + frame.treat.map({"ctl": 0, "low": 1, "high": 2})
    frame.loc[[7, 4000], "x1"] = np.nan  # dropped, as in memory
    return frame


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lmm.LMMWarning)
        return fn(*args, **kwargs)


def _close(a, b, rel=REL):
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    np.testing.assert_allclose(a, b, rtol=rel, atol=rel * np.abs(b).max())


CASES = [("y ~ x1 + x2 + (1|g)", "ML"), ("y ~ x1 + x2 + (1|g)", "REML"), ("y ~ x1 + treat + (1|name)", "ML"),
         ("y ~ 0 + treat + x2 + (1|g)", "REML"), ("y ~ C(treat) + x1 + (1|site:g)", "ML")]


@pytest.mark.parametrize("formula,method", CASES)
def test_dask_fit_equals_the_pandas_fit(client, frame, formula, method):
    ddf = dd.from_pandas(frame, npartitions=5)
    assert ddf.npartitions >= 4
    ref = _quiet(lmm.fit, formula, frame, method=method)
    got = _quiet(lmm.fit, formula, ddf, method=method)
    assert isinstance(got.design, DaskDesign)
    assert list(got.params.index) == list(ref.params.index)
    assert got.n_obs == ref.n_obs == len(frame) - (2 if "x1" in formula else 0)
    _close(got.params, ref.params)
    _close([got.sigma, got.loglik, got.deviance, got.aic], [ref.sigma, ref.loglik, ref.deviance, ref.aic])
    _close([got.sigma_s, got.opt.theta], [ref.sigma_s, ref.opt.theta])
    _close(got.bse, ref.bse)
    np.testing.assert_array_equal(got.df, ref.df)  # nlme's between/within df from the Dask pass
    _close(got.df_satterthwaite, ref.df_satterthwaite, rel=1e-6)
    assert list(got.random_effects.index) == list(ref.random_effects.index)
    _close(got.random_effects["(Intercept)"], ref.random_effects["(Intercept)"])
    assert got.messages == ref.messages


def test_dask_statistics_equal_the_in_memory_statistics(client, frame):
    ddf = dd.from_pandas(frame, npartitions=7)
    design = _quiet(specify_dask, "y ~ x1 + treat + (1|g)", ddf)
    ref = GroupStatistics.of(_quiet(lmm.specify, "y ~ x1 + treat + (1|g)", frame))
    got = design.statistics
    assert design.npartitions == 7
    for name in ("m", "Xt1", "Xty", "XtX", "yty", "one_y", "beta_shift"):
        np.testing.assert_allclose(getattr(got, name), getattr(ref, name), rtol=1e-12, atol=1e-9, err_msg=name)
    assert got.shift == pytest.approx(ref.shift, rel=1e-14) and got.scale == pytest.approx(ref.scale, rel=1e-13)
    for reml in (False, True):  # the same likelihood surface, to rounding
        a, b = ProfiledDeviance(got, reml), ProfiledDeviance(ref, reml)
        for theta in (0.0, 0.3, 1.0, 4.0):
            assert a(theta) == pytest.approx(b(theta), rel=1e-12)


def test_rows_stay_lazy_and_match(client, frame):
    ddf = dd.from_pandas(frame, npartitions=4)
    got = _quiet(lmm.fit, "y ~ x1 + x2 + (1|g)", ddf, method="ML")
    ref = _quiet(lmm.fit, "y ~ x1 + x2 + (1|g)", frame, method="ML")
    assert type(got.fitted).__module__.startswith("dask")
    _close(got.fitted.compute(), ref.fitted, rel=1e-9)
    _close(got.residuals.compute(), ref.residuals, rel=1e-7)
    _close(got.design.X.compute(), ref.design.X, rel=0)
    np.testing.assert_array_equal(got.design.terms[0].codes.compute(), ref.design.terms[0].codes)


def test_categorical_levels_missing_from_some_partitions(client, frame):
    # sorted by treatment, so the first partitions see one level only: levels must be known globally
    data = frame.sort_values("treat", kind="stable").reset_index(drop=True)
    ddf = dd.from_pandas(data, npartitions=6)
    ref = _quiet(lmm.fit, "y ~ treat + x2 + (1|g)", data, method="ML")
    got = _quiet(lmm.fit, "y ~ treat + x2 + (1|g)", ddf, method="ML")
    assert list(got.params.index) == list(ref.params.index)
    _close(got.params, ref.params)
    _close(got.loglik, ref.loglik)


def test_aliased_columns_are_dropped_as_in_memory(client, frame):
    data = frame.assign(x3=2 * frame.x2 - 1)
    ddf = dd.from_pandas(data, npartitions=4)
    ref = _quiet(lmm.fit, "y ~ x2 + x3 + (1|g)", data, method="ML")
    with pytest.warns(lmm.LMMWarning, match="rank deficient"):
        got = lmm.fit("y ~ x2 + x3 + (1|g)", ddf, method="ML")
    assert list(got.params.index) == list(ref.params.index) == ["(Intercept)", "x2"]
    _close(got.params, ref.params)


def test_unsupported_models_are_refused_clearly(client, frame):
    ddf = dd.from_pandas(frame, npartitions=4)
    with pytest.raises(lmm.ModelError, match="single random intercept"):
        lmm.fit("y ~ x1 + (x1|g)", ddf)
    with pytest.raises(lmm.ModelError, match="center"):
        lmm.fit("y ~ center(x1) + (1|g)", ddf)
    with pytest.raises(lmm.DataError, match="unknown column"):
        lmm.fit("y ~ nope + (1|g)", ddf)
    with pytest.raises(lmm.ModelError, match="constant"):
        lmm.fit("y ~ x2 + (1|g)", dd.from_pandas(frame.assign(y=1.0), npartitions=4))


def test_dask_is_not_imported_with_the_package():
    code = "import sys, lmm_symbolic; sys.exit('dask' in sys.modules or 'distributed' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
