"""Sufficient statistics: the one-pass per-group sums against brute force, the compiled profiled deviance
against a dense multivariate normal, cancellation, and the fast paths of the specification stage."""
import logging
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.linalg
import scipy.stats

import lmm_symbolic as lmm
from lmm_symbolic import specification as spec
from lmm_symbolic import statistics as stats_mod
from lmm_symbolic.compilation import ProfiledDeviance
from lmm_symbolic.progress import enable
from lmm_symbolic.statistics import GroupStatistics, constant_within_groups, spans_constant


def _design(rng, n, G, p, intercept=True, order="C"):
    codes = rng.integers(0, G, n)
    X = rng.normal(size=(n, p)) * rng.uniform(0.5, 20, p) + rng.normal(0, 5, p)
    if intercept and p:
        X[:, 0] = 1.0
    X = np.asarray(X, order=order)
    y = 3.0 + rng.normal(size=n) * 2 + rng.normal(size=G)[codes] * 1.5
    if p:
        y = y + X @ rng.normal(size=p)
    return y, X, codes


def _brute(y, X, codes, G, shift, scale):
    """Per-group sums by boolean masks, one group at a time."""
    yw = (y - shift) / scale
    p = X.shape[1]
    out = {"m": np.zeros(G), "Xt1": np.zeros((G, p)), "Xty": np.zeros((G, p)), "XtX": np.zeros((G, p, p)),
           "yty": np.zeros(G), "one_y": np.zeros(G)}
    for g in range(G):
        rows = codes == g
        Xg, yg = X[rows], yw[rows]
        out["m"][g] = rows.sum()
        out["Xt1"][g] = Xg.sum(0)
        out["Xty"][g] = Xg.T @ yg
        out["XtX"][g] = Xg.T @ Xg
        out["yty"][g] = yg @ yg
        out["one_y"][g] = yg.sum()
    return out


@pytest.mark.parametrize("seed", range(8))
def test_statistics_equal_brute_force_group_sums(seed, monkeypatch):
    rng = np.random.default_rng(seed)
    # small blocks, so the pass crosses many block boundaries
    monkeypatch.setattr(stats_mod, "CHUNK_ROWS", int(rng.integers(7, 300)))
    n, G, p = int(rng.integers(50, 2000)), int(rng.integers(2, 40)), int(rng.integers(0, 5))
    y, X, codes = _design(rng, n, G, p, intercept=bool(seed % 2), order="CF"[seed % 3 == 0])
    if seed == 4 and p >= 2:
        X[:, 1] = 1.0  # a second all-ones column
    G_total = G + 3  # trailing levels without rows
    s = GroupStatistics.from_arrays(y, X, codes, G_total)
    ref = _brute(y, X, codes, G_total, s.shift, s.scale)
    for name, value in ref.items():
        np.testing.assert_allclose(getattr(s, name), value, rtol=1e-12, atol=1e-9 * (1 + np.abs(value).max()),
                                   err_msg=name)
    assert s.n == n and s.G == G_total and s.p == p
    np.testing.assert_allclose(s.XtX, np.swapaxes(s.XtX, 1, 2))


def test_shift_is_the_mean_exactly_when_the_constant_is_in_col_X():
    rng = np.random.default_rng(1)
    y, X, codes = _design(rng, 500, 10, 3)
    s = GroupStatistics.from_arrays(y, X, codes, 10)
    assert s.shift == pytest.approx(y.mean(), rel=1e-15)
    assert s.scale == pytest.approx(y.std(), rel=1e-15)
    np.testing.assert_allclose(s.beta_shift, [y.mean(), 0, 0], atol=1e-12)
    cells = np.zeros((500, 2))  # cell-means coding: the constant is the sum of the two columns
    cells[np.arange(500), rng.integers(0, 2, 500)] = 1
    s = GroupStatistics.from_arrays(y, cells, codes, 10)
    np.testing.assert_allclose(s.beta_shift, [y.mean(), y.mean()], rtol=1e-12)
    s = GroupStatistics.from_arrays(y, X[:, 1:], codes, 10)  # no constant: no shift
    assert s.shift == 0.0 and not np.any(s.beta_shift)


# ------------------------------------------------------------------ the deviance against dense algebra
def _dense_deviance(y, X, codes, G, theta, reml):
    n, p = X.shape
    Z = np.zeros((n, G))
    Z[np.arange(n), codes] = 1.0
    V = np.eye(n) + theta**2 * Z @ Z.T
    Vi = np.linalg.inv(V)
    A = X.T @ Vi @ X
    beta = np.linalg.solve(A, X.T @ Vi @ y)
    r = y - X @ beta
    sigma2 = (r @ Vi @ r) / (n - p if reml else n)
    ll = scipy.stats.multivariate_normal.logpdf(y, X @ beta, sigma2 * V)
    if reml:
        ll += -0.5 * np.linalg.slogdet(A / sigma2)[1] + p / 2 * np.log(2 * np.pi)
    return -2 * ll


@pytest.mark.parametrize("reml", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_profiled_deviance_from_statistics_equals_dense_multivariate_normal(seed, reml):
    rng = np.random.default_rng(100 + seed)
    n, G, p = int(rng.integers(30, 120)), int(rng.integers(3, 12)), int(rng.integers(1, 4))
    y, X, codes = _design(rng, n, G, p, intercept=seed != 3)
    if seed == 3:  # cell-means coding, response far from zero
        X = np.zeros((n, 2))
        X[np.arange(n), rng.integers(0, 2, n)] = 1.0
        y = y + 1e4
    codes = np.sort(codes)
    G = int(codes.max()) + 1
    s = GroupStatistics.from_arrays(y, X, codes, G)
    dev = ProfiledDeviance(s, reml)
    shift = 2 * dev.n_eff * np.log(s.scale)  # the statistics are of (y - shift) / scale
    for theta in (0.0, 0.1, 0.7, 1.0, 2.5, 10.0):
        np.testing.assert_allclose(dev(theta) + shift, _dense_deviance(y, X, codes, G, theta, reml), rtol=1e-9)


# ----------------------------------------------------------------------------------- cancellation
@pytest.fixture(scope="module")
def frame():
    rng = np.random.default_rng(7)
    n, G = 3000, 60
    g = rng.integers(0, G, n)
    x = rng.normal(size=n)
    y = 2.0 + 0.7 * x + rng.normal(size=G)[g] * 1.3 + rng.normal(size=n)
    return pd.DataFrame({"y": y, "x": x, "g": g})


def _fit(data, method):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lmm.LMMWarning)
        return lmm.fit("y ~ x + (1|g)", data, method=method)


@pytest.mark.parametrize("method", ["ML", "REML"])
def test_a_response_around_1e8_fits_as_well_as_one_around_1(frame, method):
    base = _fit(frame, method)
    far = _fit(frame.assign(y=frame.y + 1e8), method)
    # y + 1e8 is itself rounded to ~1.5e-8 per value: the estimates agree to far better than 1e-6
    assert far.params["x"] == pytest.approx(base.params["x"], rel=1e-6)
    assert far.params["(Intercept)"] - 1e8 == pytest.approx(base.params["(Intercept)"], rel=1e-6)
    for attr in ("sigma", "sigma_s", "loglik"):
        assert getattr(far, attr) == pytest.approx(getattr(base, attr), rel=1e-6), attr
    np.testing.assert_allclose(far.bse, base.bse, rtol=1e-6)


@pytest.mark.parametrize("factor", [1e8, 1e-8])
@pytest.mark.parametrize("method", ["ML", "REML"])
def test_scaling_the_response_scales_the_fit_exactly(frame, factor, method):
    base = _fit(frame, method)
    scaled = _fit(frame.assign(y=frame.y * factor), method)
    np.testing.assert_allclose(scaled.params, base.params * factor, rtol=1e-10)
    np.testing.assert_allclose(scaled.bse, base.bse * factor, rtol=1e-9)
    assert scaled.sigma == pytest.approx(base.sigma * factor, rel=1e-10)
    assert scaled.sigma_s == pytest.approx(base.sigma_s * factor, rel=1e-9)
    n_eff = len(frame) - (2 if method == "REML" else 0)  # REML: the n - p error contrasts scale
    assert scaled.loglik == pytest.approx(base.loglik - n_eff * np.log(factor), rel=1e-12)


def test_statistics_of_a_shifted_response_are_unchanged():
    rng = np.random.default_rng(3)
    y, X, codes = _design(rng, 4000, 30, 3)
    a = GroupStatistics.from_arrays(y, X, codes, 30)
    b = GroupStatistics.from_arrays(y + 1e8, X, codes, 30)
    for name in ("Xty", "yty", "one_y"):
        np.testing.assert_allclose(getattr(b, name), getattr(a, name), rtol=1e-6, atol=1e-6 * len(y))


# ------------------------------------------------------------------------ specification fast paths
def _formulaic_only(monkeypatch):
    monkeypatch.setattr(spec, "_plain_model_matrix", lambda *a, **k: None)


@pytest.mark.parametrize("formula", ["y ~ x1 + x2 + (1|g)", "y ~ x2 + x1 + (1|g)", "y ~ 0 + x1 + (1|g)",
                                     "y ~ 1 + k + (1|g)", "y ~ f32 + (1 + x1|g)", "y ~ x1 + 1 + (0 + x2|g)",
                                     "y ~ 1 + (1|g)"])
def test_plain_columns_fast_path_gives_formulaics_design(formula, monkeypatch):
    rng = np.random.default_rng(11)
    n = 400
    data = pd.DataFrame({"y": rng.normal(size=n), "x1": rng.normal(size=n), "x2": rng.normal(size=n) * 1e3,
                         "k": rng.integers(-5, 5, n), "f32": rng.normal(size=n).astype(np.float32),
                         "g": rng.integers(0, 20, n)})
    fast = spec.specify(formula, data)
    _formulaic_only(monkeypatch)
    slow = spec.specify(formula, data)
    assert fast.fixed_names == slow.fixed_names
    np.testing.assert_array_equal(fast.X, slow.X)
    for a, b in zip(fast.terms, slow.terms):
        assert a.names == b.names and a.levels == b.levels
        np.testing.assert_array_equal(a.Z, b.Z)
        np.testing.assert_array_equal(a.codes, b.codes)


def test_fast_path_declines_what_it_does_not_know():
    data = pd.DataFrame({"x": [1.0, 2.0], "b": [True, False], "s": ["a", "b"], "log": [1.0, 2.0]})
    for fixed in ("C(x)", "x + s", "b", "x:x", "log", "x + x", "0 + 1 + x", "I(x * 2)", "x - 1"):
        assert spec._plain_model_matrix(fixed, data) is None, fixed
    assert list(spec._plain_model_matrix("x", data)) == ["Intercept", "x"]


def _old_grouping(values):
    uniques = pd.unique(values)
    try:
        levels = sorted(uniques)
    except TypeError:
        levels = sorted(uniques, key=str)
    index = {v: k for k, v in enumerate(levels)}
    return np.array([index[v] for v in values], dtype=np.int64), tuple(str(v) for v in levels)


@pytest.mark.parametrize("values", [
    [3, 1, 2, 3, 1], [10**12, -4, 7, -4], [0, 5000, 5000, 3], list(np.arange(50) % 7 - 3),
    ["b", "a", "c", "a"], ["b10", "b9", "B1", "a"], [2.5, -1.0, 2.5, 0.0], [True, False, True],
    ["x", 1, "y", 2.5, 1], np.array([7, 3, 7], dtype=np.uint16)])
def test_vectorised_grouping_equals_sorted_levels(values):
    frame = pd.DataFrame({"g": pd.Series(values, dtype=object if isinstance(values, list)
                                         and any(isinstance(v, str) for v in values)
                                         and not all(isinstance(v, str) for v in values) else None)})
    codes, levels = spec._grouping(frame, "g")
    ref_codes, ref_levels = _old_grouping(frame["g"])
    assert levels == ref_levels
    np.testing.assert_array_equal(codes, ref_codes)


def test_vectorised_grouping_of_interactions_and_categoricals():
    frame = pd.DataFrame({"a": [2, 1, 2, 1], "b": ["x", "y", "y", "x"],
                          "c": pd.Categorical(["q", "p", "q", "q"], categories=["q", "p", "r"])})
    codes, levels = spec._grouping(frame, "a:b")
    assert levels == ("1:x", "1:y", "2:x", "2:y")
    np.testing.assert_array_equal(codes, [2, 1, 3, 0])
    codes, levels = spec._grouping(frame, "c")
    assert levels == ("q", "p")
    np.testing.assert_array_equal(codes, [0, 1, 0, 0])


def test_drop_aliased_fast_path_agrees_with_the_rank_loop():
    rng = np.random.default_rng(5)
    X = np.column_stack([np.ones(300), rng.normal(size=(300, 3))])
    assert spec._drop_aliased(X, list("abcd"))[2] == []
    Y = np.column_stack([X, X[:, 1] + 2 * X[:, 2], rng.normal(size=300)])
    kept, names, dropped = spec._drop_aliased(Y, list("abcdef"))
    assert names == list("abcdf") and dropped == ["e"]
    np.testing.assert_array_equal(kept, Y[:, [0, 1, 2, 3, 5]])


def test_between_group_columns_and_implicit_intercepts():
    rng = np.random.default_rng(9)
    g = np.repeat(np.arange(20), 10)
    data = pd.DataFrame({"y": rng.normal(size=200), "w": rng.normal(size=20)[g], "x": rng.normal(size=200),
                         "t": np.where(g % 2, "a", "b"), "g": g})
    d = spec.specify("y ~ w + x + (1|g)", data)
    np.testing.assert_array_equal(constant_within_groups(d), [True, True, False])
    assert spans_constant(d)
    d = spec.specify("y ~ 0 + t + x + (1|g)", data)
    np.testing.assert_array_equal(constant_within_groups(d), [True, True, False])
    assert spans_constant(d)
    assert not spans_constant(spec.specify("y ~ 0 + x + (1|g)", data))


# ------------------------------------------------------------------------------------ the fit path
def test_exact_estimates_are_not_attempted_on_large_balanced_data(monkeypatch, frame):
    """The bound is decided from the data's size before any exact arithmetic (no Fraction is made)."""
    import lmm_symbolic.optimisation as optimisation

    def refuse(*args, **kwargs):
        raise AssertionError("exact arithmetic on a large design")

    monkeypatch.setattr(optimisation, "_fractions", refuse)
    g = np.repeat(np.arange(600), 10)  # balanced, 6000 rows
    rng = np.random.default_rng(2)
    data = pd.DataFrame({"y": rng.normal(size=6000) + rng.normal(size=600)[g], "g": g})
    fit = lmm.fit("y ~ 1 + (1|g)", data)
    assert fit.exact is None and "bounded to 2000 data values" in fit.exact_reason


@pytest.fixture
def report_everything(monkeypatch):
    from lmm_symbolic import progress
    monkeypatch.setattr(progress, "REPORT_AFTER", 0.0)


def test_quick_stages_stay_silent_even_when_enabled(frame, caplog):
    with caplog.at_level(logging.INFO, logger="lmm_symbolic"):
        _fit(frame, "ML")
    assert caplog.text == ""


def test_progress_is_logged_at_info_and_silent_by_default(frame, caplog, capsys, report_everything):
    _fit(frame, "ML")
    assert capsys.readouterr().err == ""
    with caplog.at_level(logging.INFO, logger="lmm_symbolic"):
        _fit(frame, "ML")
    text = caplog.text
    assert "specifying the design" in text
    assert "computing group statistics (3000 rows, 60 groups)" in text
    assert "optimising" in text


def test_enable_writes_progress_lines_to_a_stream(frame, report_everything):
    import io

    stream = io.StringIO()
    handler = enable(stream=stream)
    try:
        _fit(frame, "REML")
        enable(stream=stream)  # a second call replaces the handler: lines are not doubled
        _fit(frame, "REML")
    finally:
        logger = logging.getLogger("lmm_symbolic")
        for h in list(logger.handlers):
            if getattr(h, "_lmm_progress", False):
                logger.removeHandler(h)
        logger.setLevel(logging.NOTSET)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("lmm_symbolic: specifying the design")
    assert sum("computing group statistics" in line for line in lines) == 4  # start + end, two fits
    assert handler not in logging.getLogger("lmm_symbolic").handlers
