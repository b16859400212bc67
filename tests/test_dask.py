"""A Dask DataFrame as data: the per-group statistics computed by Dask on a distributed LocalCluster, then
fitted as usual; the same fit as in memory to 1e-10. Random intercepts (1|g) and random terms that share
one grouping factor ((Days|Subject), (1|S) + (0 + Days|S)); other models are refused clearly."""
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest

import lmm_symbolic as lmm
from lmm_symbolic.compilation import BlockDeviance, ProfiledDeviance, profiled_deviance
from lmm_symbolic.statistics import BlockStatistics, DaskDesign, GroupStatistics, single_factor, specify_dask

dd = pytest.importorskip("dask.dataframe")
distributed = pytest.importorskip("dask.distributed")

REL = 1e-10
#: Satterthwaite's df come from a central-difference Hessian; halving its step moves the in-memory df by
#: ~1e-8, so the Dask fit cannot agree more closely than that
DF_REL = 1e-7


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
    _close([got.sigma_s, *got.opt.theta], [ref.sigma_s, *ref.opt.theta])
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
    for formula in ("y ~ x1 + (1|g) + (1|site)", "y ~ x1 + (1|site/g)", "y ~ x1 + (x1|g) + (1|name)"):
        with pytest.raises(lmm.ModelError, match=r"share one grouping factor.*\(x\|g\).*crossed or nested"):
            lmm.fit(formula, ddf)
    with pytest.raises(lmm.ModelError, match="5 random effects per level of 'g'"):
        lmm.fit("y ~ x1 + (x1 + x2 + treat|g)", ddf)
    with pytest.raises(lmm.ModelError, match="kinship matrix needs the data in memory.*share one grouping"):
        lmm.fit("y ~ x1", ddf, kinship=np.eye(len(frame)))
    with pytest.raises(lmm.ModelError, match="scale"):
        lmm.fit("y ~ x1 + (scale(x1, scale = FALSE)|g)", ddf)
    with pytest.raises(lmm.ModelError, match="scale"):
        lmm.fit("y ~ scale(x1, scale = FALSE) + (1|g)", ddf)
    with pytest.raises(lmm.DataError, match="unknown column"):
        lmm.fit("y ~ nope + (1|g)", ddf)
    with pytest.raises(lmm.ModelError, match="constant"):
        lmm.fit("y ~ x2 + (1|g)", dd.from_pandas(frame.assign(y=1.0), npartitions=4))


# ------------------------------------------------------------------- random terms on one grouping factor
def _same_fit(got, ref):
    """Every quantity of two fits equal to REL (Satterthwaite's df to DF_REL); the largest difference."""
    assert isinstance(got.design, DaskDesign) and isinstance(got.design.statistics, BlockStatistics)
    assert got.n_obs == ref.n_obs and got.messages == ref.messages and got.converged and ref.converged
    assert list(got.params.index) == list(ref.params.index)
    pairs = [(got.params, ref.params), (got.bse, ref.bse), (got.vcov, ref.vcov),
             ([got.sigma, got.sigma_s, got.loglik, got.deviance, got.aic, got.bic],
              [ref.sigma, ref.sigma_s, ref.loglik, ref.deviance, ref.aic, ref.bic]),
             (got.opt.theta, ref.opt.theta), (got.variance_components[["variance", "sd"]],
                                              ref.variance_components[["variance", "sd"]]),
             (got.correlations["corr"], ref.correlations["corr"]), (got.random_effects, ref.random_effects),
             (got.fitted.compute(), ref.fitted)]
    assert len(got.correlations) == len(ref.correlations)
    pairs = [(a, b) for a, b in pairs if np.size(b)]    # no correlations in (1|S) + (0 + Days|S)
    for a, b in pairs:
        _close(a, b)
    assert got.variance_components[["group", "term"]].equals(ref.variance_components[["group", "term"]])
    assert got.random_effects.index.equals(ref.random_effects.index)
    assert list(got.random_effects.columns) == list(ref.random_effects.columns)
    np.testing.assert_array_equal(got.df, ref.df)  # nlme's between/within df from the Dask pass
    _close(got.df_satterthwaite, ref.df_satterthwaite, rel=DF_REL)
    rel = lambda a, b: float(np.max(np.abs(np.asarray(a, float) - np.asarray(b, float))  # noqa: E731
                                    / np.abs(np.asarray(b, float)).max()))
    return max(rel(a, b) for a, b in pairs)


SLEEP = ["Reaction ~ Days + (Days|Subject)", "Reaction ~ Days + (1|Subject) + (0 + Days|Subject)"]


@pytest.mark.parametrize("npartitions", [3, 5])
@pytest.mark.parametrize("method", ["ML", "REML"])
@pytest.mark.parametrize("formula", SLEEP)
def test_sleepstudy_slopes_on_dask_equal_the_pandas_fit(client, formula, method, npartitions):
    data = lmm.datasets.load("sleepstudy")
    ddf = dd.from_pandas(data, npartitions=npartitions)
    assert ddf.npartitions == npartitions    # 180 rows: subjects are split across partitions
    ref = lmm.fit(formula, data, method=method)
    got = lmm.fit(formula, ddf, method=method)
    assert got.design.npartitions == npartitions
    assert _same_fit(got, ref) < REL
    assert len(got.variance_components) == 3 and got.random_effects.shape == (18, 4)   # two modes, two conditional SDs
    assert type(got.fitted).__module__.startswith("dask")     # the rows stay lazy
    _close(got.residuals.compute(), ref.residuals, rel=1e-9)


def test_block_statistics_from_dask_equal_the_in_memory_ones(client):
    data = lmm.datasets.load("sleepstudy")
    design = specify_dask(SLEEP[0], dd.from_pandas(data, npartitions=4))
    memory = lmm.specify(SLEEP[0], data)
    assert single_factor(design) and single_factor(memory)
    got, ref = BlockStatistics.of(design), BlockStatistics.of(memory)
    assert got is design.statistics and (got.n, got.G, got.q, got.p) == (ref.n, 18, 2, 2)
    for name in ("S", "ZtX", "Zty", "XtX", "Xty", "yty", "beta_shift"):
        np.testing.assert_allclose(getattr(got, name), getattr(ref, name), rtol=1e-12, atol=1e-9, err_msg=name)
    assert got.shift == pytest.approx(ref.shift, rel=1e-14) and got.scale == pytest.approx(ref.scale, rel=1e-13)
    for reml in (False, True):   # the same likelihood surface and gradient, to rounding
        a, b = profiled_deviance(design, reml), profiled_deviance(memory, reml)
        assert isinstance(a, BlockDeviance)
        for theta in ([0.0, 0.0, 0.1], [1.0, 0.0, 1.0], [0.9, 0.1, 0.2], [3.0, -1.0, 0.5]):
            assert a(theta) == pytest.approx(b(theta), rel=1e-12)
            np.testing.assert_allclose(a.gradient(a.state(theta)), b.gradient(b.state(theta)), rtol=1e-9, atol=1e-9)


def test_a_dask_random_intercept_has_block_statistics_too(client, frame):
    """(1|g) on Dask keeps its GroupStatistics; as BlockStatistics (S_g = n_g, Z_g^T X_g = X_g^T 1) it gives
    the in-memory block deviance."""
    formula = "y ~ x1 + treat + (1|g)"
    design = _quiet(specify_dask, formula, dd.from_pandas(frame, npartitions=4))
    memory = _quiet(lmm.specify, formula, frame)
    assert isinstance(design.statistics, GroupStatistics) and single_factor(design)
    a, b = BlockDeviance(design, True), BlockDeviance(memory, True)
    for theta in (0.0, 0.5, 2.0):
        assert a([theta]) == pytest.approx(b([theta]), rel=1e-12)
        assert a([theta]) == pytest.approx(ProfiledDeviance(design.statistics, True)(theta), rel=1e-12)


@pytest.fixture(scope="module")
def slopes():
    """20,000 rows in 200 groups with a correlated random intercept and slope in x and a two-level
    random effect of site, rows shuffled so every group spans partitions; a few rows missing x."""
    rng = np.random.default_rng(7)
    n, G = 20_000, 200
    g = rng.integers(0, G, n)
    x = rng.normal(size=n) * 2 + 1
    u = rng.multivariate_normal([0, 0], [[4.0, 1.2], [1.2, 1.0]], G)
    frame = pd.DataFrame({"g": np.array([f"s{k:03d}" for k in range(G)])[g], "x": x,
                          "site": rng.choice(["north", "south"], n), "age": rng.normal(size=G)[g] * 5 + 40})
    frame["y"] = (1e4 + 2 * x + 0.1 * frame.age + (frame.site == "south") * 0.7 + u[g, 0] + u[g, 1] * x
                  + rng.normal(size=G)[g] * 0.8 * (frame.site == "south") + rng.normal(size=n) * 1.5)
    frame.loc[[11, 5000, 19_999], "x"] = np.nan
    return frame


SIMULATED = [("y ~ x + age + site + (x|g)", "REML"), ("y ~ x + age + (x||g)", "ML"),
             ("y ~ x + site + (0 + site|g)", "REML"), ("y ~ 0 + site + x + (1 + x|g)", "ML")]


@pytest.mark.parametrize("formula,method", SIMULATED)
def test_simulated_slopes_on_dask_equal_the_pandas_fit(client, slopes, formula, method):
    ddf = dd.from_pandas(slopes, npartitions=6)
    assert ddf.npartitions == 6
    ref = _quiet(lmm.fit, formula, slopes, method=method)
    got = _quiet(lmm.fit, formula, ddf, method=method)
    assert got.n_obs == len(slopes) - 3 and got.messages == ref.messages
    assert _same_fit(got, ref) < REL
    if "age" in formula:   # a between-group covariate: nlme's G - 1 - 1 df
        assert got.df["age"] == 198


def test_dask_is_not_imported_with_the_package():
    code = "import sys, lmm_symbolic; sys.exit('dask' in sys.modules or 'distributed' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
