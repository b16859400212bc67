"""The figures of lmm_symbolic.plots (Agg backend) and the teaching helpers they and the notebooks use.

Each figure is checked for what it draws, not only that it draws: the lines are the groups' data or fitted
values, the surface peaks at the fit's (sigma, sigma_s) with the fit's log-likelihood, the profile is
maximal at the estimate, the caterpillar's intervals are +- 1.96 conditional SDs.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # tests only: the package never chooses a backend

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import scipy.stats  # noqa: E402
import sympy as sp  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.contour import ContourSet  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

import lmm_symbolic as lmm  # noqa: E402
from lmm_symbolic import plots, teaching  # noqa: E402

TOY = "Resp ~ Treat + (1|Ind)"
SLEEP = "Reaction ~ Days + (1|Subject)"
DYE = "Yield ~ 1 + (1|Batch)"


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def toy():
    return lmm.datasets.load("toy")


@pytest.fixture(scope="module")
def sleep():
    return lmm.datasets.load("sleepstudy")


def _fit(formula, data, method="REML"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lmm.LMMWarning)
        return lmm.fit(formula, data, method=method)


@pytest.fixture(scope="module")
def fits(toy, sleep):
    return {
        "toy_reml": _fit(TOY, toy), "toy_ml": _fit(TOY, toy, "ML"),
        "sleep_reml": _fit(SLEEP, sleep), "sleep_ml": _fit(SLEEP, sleep, "ML"),
        "dye_reml": _fit(DYE, lmm.datasets.load("Dyestuff")),
        "dye2_reml": _fit(DYE, lmm.datasets.load("Dyestuff2")),
    }


def _labelled(ax):
    assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()


def _group_lines(ax):
    return {line.get_gid()[len("group:"):]: line for line in ax.get_lines()
            if (line.get_gid() or "").startswith("group:")}


# -------------------------------------------------------------------------------------- raw data
@pytest.mark.parametrize("name, x, y, group", [("toy", "Treat", "Resp", "Ind"),
                                               ("sleepstudy", "Days", "Reaction", "Subject")])
def test_plot_data_draws_one_line_per_group_through_its_data(name, x, y, group):
    data = lmm.datasets.load(name)
    ax = plots.plot_data(data, x, y, group)
    assert isinstance(ax, Axes)
    _labelled(ax)
    assert (ax.get_xlabel(), ax.get_ylabel()) == (x, y)
    lines = ax.get_lines()
    assert len(lines) == data[group].nunique()
    for line in lines:
        sub = data[data[group].astype(str) == line.get_label()].sort_values(x)
        np.testing.assert_array_equal(line.get_xdata(), sub[x].to_numpy())
        np.testing.assert_array_equal(line.get_ydata(), sub[y].to_numpy())


def test_plot_data_uses_the_given_axes_and_rejects_unknown_columns(toy):
    fig, ax = plt.subplots()
    assert plots.plot_data(toy, "Treat", "Resp", "Ind", ax=ax) is ax
    with pytest.raises(lmm.DataError, match="unknown column 'Dose'"):
        plots.plot_data(toy, "Dose", "Resp", "Ind")


def test_plot_ols_line_and_band_are_statsmodels_ols(sleep):
    sm = pytest.importorskip("statsmodels.api")
    ax = plots.plot_ols(sleep, "Days", "Reaction")
    _labelled(ax)
    line = next(l for l in ax.get_lines() if l.get_label() == "OLS fit")
    xs = np.asarray(line.get_xdata())
    ref = sm.OLS(sleep["Reaction"], sm.add_constant(sleep["Days"].astype(float))).fit()
    pred = ref.get_prediction(sm.add_constant(xs)).summary_frame(alpha=0.05)
    np.testing.assert_allclose(line.get_ydata(), pred["mean"], rtol=1e-12)
    band = next(c for c in ax.collections if c.get_label().startswith("95 % confidence band"))
    vertices = band.get_paths()[0].vertices
    lower = np.interp(xs, xs, pred["mean_ci_lower"])
    # the band's polygon runs along the lower bound then back along the upper bound
    assert vertices[:, 1].min() == pytest.approx(lower.min(), rel=1e-10)
    assert vertices[:, 1].max() == pytest.approx(pred["mean_ci_upper"].max(), rel=1e-10)
    assert "10.47" in ax.get_title()


def test_plot_ols_colours_points_by_group(toy):
    ax = plots.plot_ols(toy, "Treat", "Resp", group="Ind")
    labels = [c.get_label() for c in ax.collections]
    assert "Ind 1" in labels and "Ind 2" in labels
    assert "slope 9 " in ax.get_title() and "df 2" in ax.get_title()


@pytest.mark.parametrize("name, x, y, group", [("toy", "Treat", "Resp", "Ind"),
                                               ("sleepstudy", "Days", "Reaction", "Subject")])
def test_plot_individual_fits_one_facet_and_least_squares_line_per_group(name, x, y, group):
    data = lmm.datasets.load(name)
    fig = plots.plot_individual_fits(data, x, y, group)
    assert isinstance(fig, Figure)
    facets = [ax for ax in fig.axes if ax.get_visible()]
    assert len(facets) == data[group].nunique()
    assert fig.axes[0].get_ylabel() == y
    assert any(ax.get_xlabel() == x for ax in facets)
    slopes = []
    for ax, (level, sub) in zip(facets, data.groupby(group, observed=True)):
        (line,) = ax.get_lines()
        xs, ys = np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)
        slope = (ys[1] - ys[0]) / (xs[1] - xs[0])
        assert slope == pytest.approx(np.polyfit(sub[x], sub[y], 1)[0], rel=1e-10)
        assert str(level) in ax.get_title()
        slopes.append(slope)
    if name == "toy":
        assert slopes == pytest.approx([15.0, 3.0])


# -------------------------------------------------------------------------------------- LMM fit
@pytest.mark.parametrize("key", ["toy_reml", "sleep_reml", "sleep_ml"])
def test_plot_lmm_fit_draws_population_line_and_one_blup_line_per_group(fits, key):
    fit = fits[key]
    ax = plots.plot_lmm_fit(fit)
    assert isinstance(ax, Axes)
    _labelled(ax)
    term = fit.design.terms[0]
    lines = _group_lines(ax)
    assert len(lines) == term.n_levels
    assert set(lines) == set(term.levels)
    x = fit.design.fixed_names[1]
    xv = fit.design.frame[x].to_numpy(float)
    codes = np.asarray(term.codes)
    u = fit.random_effects["(Intercept)"]
    for j, level in enumerate(term.levels):
        rows = np.flatnonzero(codes == j)
        order = rows[np.argsort(xv[rows], kind="stable")]
        np.testing.assert_allclose(lines[level].get_ydata(), fit.fitted[order], rtol=1e-12)
        expected = fit.params.iloc[0] + u[level] + fit.params[x] * xv[order]
        np.testing.assert_allclose(lines[level].get_ydata(), expected, rtol=1e-10)
    (population,) = [l for l in ax.get_lines() if l.get_gid() == "population"]
    np.testing.assert_allclose(population.get_ydata(),
                               fit.params.iloc[0] + fit.params[x] * np.sort(xv), rtol=1e-12)


def test_plot_lmm_fit_without_covariate_draws_each_group_at_its_level(fits):
    fit = fits["dye_reml"]
    ax = plots.plot_lmm_fit(fit)
    lines = _group_lines(ax)
    assert len(lines) == 6
    for level, line in lines.items():
        expected = fit.params["(Intercept)"] + fit.random_effects.loc[level, "(Intercept)"]
        np.testing.assert_allclose(line.get_ydata(), [expected, expected], rtol=1e-12)
    (population,) = [l for l in ax.get_lines() if l.get_gid() == "population"]
    assert population.get_ydata()[0] == pytest.approx(1527.5)
    assert ax.get_xlabel() == "Batch"


def test_plot_lmm_fit_of_a_singular_fit_puts_every_group_on_the_population_line(fits):
    fit = fits["dye2_reml"]
    ax = plots.plot_lmm_fit(fit)
    for line in _group_lines(ax).values():
        assert line.get_ydata() == pytest.approx([fit.params.iloc[0]] * 2, abs=1e-9)
    assert "singular" in ax.get_title()


def test_plot_lmm_fit_random_slopes_when_available(sleep):
    try:
        fit = _fit("Reaction ~ Days + (Days|Subject)", sleep)
    except lmm.ModelError:
        pytest.skip("random slopes not available in this version")
    ax = plots.plot_lmm_fit(fit)
    lines = _group_lines(ax)
    assert len(lines) == 18
    slopes = {level: np.polyfit(line.get_xdata(), line.get_ydata(), 1)[0] for level, line in lines.items()}
    expected = fit.params["Days"] + fit.random_effects["Days"]
    for level, slope in slopes.items():
        assert slope == pytest.approx(expected[level], rel=1e-8)
    with pytest.raises(lmm.ModelError):
        plots.plot_loglik_surface(fit)


@pytest.mark.parametrize("key", ["sleep_reml", "dye_reml", "toy_ml"])
def test_plot_caterpillar_points_are_sorted_blups_with_196_cond_sd_bars(fits, key):
    fit = fits[key]
    ax = plots.plot_caterpillar(fit)
    assert isinstance(ax, Axes)
    _labelled(ax)
    re = fit.random_effects.sort_values("(Intercept)")
    (points,) = [l for l in ax.get_lines() if l.get_marker() == "o"]
    np.testing.assert_allclose(points.get_xdata(), re["(Intercept)"], rtol=1e-12)
    np.testing.assert_array_equal(points.get_ydata(), np.arange(len(re)))
    assert [t.get_text() for t in ax.get_yticklabels()] == [str(v) for v in re.index]
    (bars,) = [c for c in ax.collections if len(c.get_segments()) == len(re)]
    half = np.array([abs(seg[1, 0] - seg[0, 0]) / 2 for seg in bars.get_segments()])
    np.testing.assert_allclose(half, 1.959963984540054 * re["cond_sd"].to_numpy(), rtol=1e-9)


# ---------------------------------------------------------------------- likelihood surface, profile
def _marker(ax, symbol):
    (line,) = [l for l in ax.get_lines() if l.get_marker() == symbol]
    return float(line.get_xdata()[0]), float(line.get_ydata()[0])


@pytest.mark.parametrize("key", ["toy_ml", "toy_reml", "sleep_reml", "dye2_reml"])
def test_surface_peaks_at_the_fit_with_the_fits_loglik(fits, key):
    fit = fits[key]
    ax = plots.plot_loglik_surface(fit, n=21)
    assert isinstance(ax, Axes)
    _labelled(ax)
    star = _marker(ax, "*")
    assert star[0] == pytest.approx(fit.sigma, rel=1e-6, abs=1e-6)
    assert star[1] == pytest.approx(fit.sigma_s, rel=1e-6, abs=1e-6)
    # the filled contours' top level is the criterion at the star, which is the fit's log-likelihood
    filled = [c for c in ax.collections if isinstance(c, ContourSet) and c.filled]
    assert filled and max(filled[0].levels) == pytest.approx(fit.loglik, rel=1e-10)
    # the optimum lies inside the frame, and the frame's grid has no higher value
    criterion = plots.Criterion.of(fit)
    (lo, hi), (lo_s, hi_s) = ax.get_xlim(), ax.get_ylim()
    assert lo < fit.sigma < hi and lo_s <= fit.sigma_s < hi_s
    grid = criterion.grid(np.linspace(lo, hi, 15), np.linspace(lo_s, hi_s, 15))
    assert grid.max() <= fit.loglik + 1e-9 * abs(fit.loglik)
    # the optimiser's path: one point per evaluation, ending at the optimum
    path_line = next(l for l in ax.get_lines() if l.get_label().startswith("optimiser's path"))
    assert len(path_line.get_xdata()) == len(fit.opt.path) == fit.opt.evaluations
    end = plots.optimiser_path(fit)[-1]
    assert end[0] == pytest.approx(fit.sigma, rel=1e-6)
    assert end[1] == pytest.approx(fit.sigma_s, rel=1e-6, abs=1e-6)


def test_surface_title_and_colourbar_name_the_criterion(fits):
    ax = plots.plot_loglik_surface(fits["toy_reml"], n=11, show_path=False)
    assert "REML" in ax.get_title()
    assert not any(l.get_label().startswith("optimiser's path") for l in ax.get_lines())
    assert any(a.get_ylabel() == "REML log-likelihood" for a in ax.figure.axes)
    ax = plots.plot_loglik_surface(fits["toy_ml"], n=11, sigma_range=(2, 8), sigma_s_range=(1, 12))
    assert ax.get_xlim() == (2, 8) and ax.get_ylim() == (1, 12)
    assert "REML" not in ax.get_title()


def test_criterion_is_the_multivariate_normal_density_at_gls_beta(fits):
    """ML: log L(sigma, sigma_s, beta_GLS) against scipy's multivariate normal on the dense Sigma."""
    fit = fits["sleep_ml"]
    d = fit.design
    criterion = plots.Criterion.of(fit)
    K = d.terms[0].indicator()
    rng = np.random.default_rng(1)
    for sig, sig_s in rng.uniform(5, 60, size=(4, 2)):
        Sigma = sig_s**2 * K @ K.T + sig**2 * np.eye(d.n)
        Si = np.linalg.inv(Sigma)
        beta = np.linalg.solve(d.X.T @ Si @ d.X, d.X.T @ Si @ d.y)
        np.testing.assert_allclose(criterion.beta(sig_s / sig), beta, rtol=1e-9)
        expected = scipy.stats.multivariate_normal(d.X @ beta, Sigma).logpdf(d.y)
        assert criterion(sig, sig_s) == pytest.approx(expected, rel=1e-10)


def test_reml_criterion_is_the_restricted_likelihood(fits):
    """REML: log L(beta_GLS) - 1/2 log|X^T Sigma^-1 X| + p/2 log(2 pi), on the dense Sigma."""
    fit = fits["sleep_reml"]
    d = fit.design
    criterion = plots.Criterion.of(fit)
    K = d.terms[0].indicator()
    for sig, sig_s in [(20.0, 50.0), (31.0, 37.0), (45.0, 5.0)]:
        Sigma = sig_s**2 * K @ K.T + sig**2 * np.eye(d.n)
        Si = np.linalg.inv(Sigma)
        A = d.X.T @ Si @ d.X
        beta = np.linalg.solve(A, d.X.T @ Si @ d.y)
        ml = scipy.stats.multivariate_normal(d.X @ beta, Sigma).logpdf(d.y)
        expected = ml - 0.5 * np.linalg.slogdet(A)[1] + d.p / 2 * np.log(2 * np.pi)
        assert criterion(sig, sig_s) == pytest.approx(expected, rel=1e-10)


def test_criterion_at_the_exact_toy_estimates(fits):
    ml, reml = fits["toy_ml"], fits["toy_reml"]
    assert plots.Criterion.of(ml)(3 * math.sqrt(2), math.sqrt(133) / 2) == pytest.approx(ml.loglik, rel=1e-12)
    assert plots.Criterion.of(reml)(6.0, math.sqrt(266) / 2) == pytest.approx(reml.loglik, rel=1e-12)


@pytest.mark.parametrize("key", ["toy_reml", "sleep_reml", "sleep_ml"])
def test_profile_of_sigma_s_is_maximal_at_the_estimate(fits, key):
    fit = fits[key]
    ax = plots.plot_profile_sigma_s(fit, n=15)
    assert isinstance(ax, Axes)
    _labelled(ax)
    curve = next(l for l in ax.get_lines() if l.get_label() == "profile")
    xs, ys = np.asarray(curve.get_xdata()), np.asarray(curve.get_ydata())
    assert len(xs) >= 15 and xs[0] == 0.0
    k = int(np.argmax(ys))
    assert xs[k] == pytest.approx(fit.sigma_s, rel=1e-12)
    assert ys[k] == pytest.approx(fit.loglik, rel=1e-8)
    assert _marker(ax, "o") == pytest.approx((fit.sigma_s, fit.loglik), rel=1e-8)
    # profiling maximises over sigma: never below the surface at the fit's sigma
    criterion = plots.Criterion.of(fit)
    for s, v in zip(xs[::3], ys[::3]):
        assert v >= criterion(fit.sigma, s) - 1e-9 * abs(v)
    cut = next(l for l in ax.get_lines() if l.get_label().startswith("95 %"))
    assert cut.get_ydata()[0] == pytest.approx(fit.loglik - scipy.stats.chi2.ppf(0.95, 1) / 2)


def test_profile_of_a_boundary_fit_falls_from_zero(fits):
    fit = fits["dye2_reml"]
    ax = plots.plot_profile_sigma_s(fit, n=12)
    curve = next(l for l in ax.get_lines() if l.get_label() == "profile")
    ys = np.asarray(curve.get_ydata())
    assert curve.get_xdata()[0] == 0.0 and fit.sigma_s == 0.0
    assert np.all(np.diff(ys) < 0)
    assert ys[0] == pytest.approx(fit.loglik, rel=1e-10)


# ------------------------------------------------------------------------------------- explorer
def test_explorer_is_static_outside_a_kernel(fits):
    assert not plots._widget_frontend()
    fig = plots.explorer(fits["toy_ml"], n=11)
    assert isinstance(fig, Figure)
    assert fig.number not in plt.get_fignums()  # closed in pyplot: shown once, as the cell's value
    lines_ax, sigma_ax, surface_ax = fig.axes[:3]  # then the two colour bars
    for ax in (lines_ax, sigma_ax, surface_ax):
        _labelled(ax)
    assert len(_group_lines(lines_ax)) == 2
    # Sigma at the ML estimates: sigma^2 + sigma_s^2 on the diagonal, sigma_s^2 within an individual
    S = sigma_ax.get_images()[0].get_array()
    assert S[0, 0] == pytest.approx(18 + 133 / 4) and S[0, 1] == pytest.approx(133 / 4) and S[0, 2] == 0
    assert _marker(surface_ax, "*") == pytest.approx((3 * math.sqrt(2), math.sqrt(133) / 2), rel=1e-8)


def test_explorer_lines_follow_the_parameters(fits, toy):
    fit = fits["toy_ml"]
    # sigma_s = 0: no random effects, every individual on the population line
    fig = plots.explorer(fit, sigma=4.0, sigma_s=0.0, beta=[5.0, 10.0], interactive=False, n=11)
    lines = _group_lines(fig.axes[0])
    assert lines["1"].get_ydata() == pytest.approx([5.0, 15.0])
    assert lines["2"].get_ydata() == pytest.approx([5.0, 15.0])
    # sigma_s huge: each line through its individual's mean residual (BLUP -> mean of y - X beta)
    fig = plots.explorer(fit, sigma=1.0, sigma_s=1e6, beta=[5.0, 10.0], interactive=False, n=11)
    lines = _group_lines(fig.axes[0])
    u1 = ((10 - 5) + (25 - 15)) / 2
    u2 = ((3 - 5) + (6 - 15)) / 2
    assert lines["1"].get_ydata() == pytest.approx([5 + u1, 15 + u1], rel=1e-9)
    assert lines["2"].get_ydata() == pytest.approx([5 + u2, 15 + u2], rel=1e-9)
    # log L at the sliders is Eq. 10 at those values, in the legend
    legend = [t.get_text() for t in fig.axes[2].get_legend().get_texts()]
    value = plots.Criterion.of(fit).loglik(1.0, 1e6, [5.0, 10.0])
    assert f"chosen values, log L = {value:.4f}" in legend


def test_explorer_takes_a_design_and_refits_reml_by_ml(toy, fits):
    fig = plots.explorer(lmm.specify(TOY, toy), n=11)
    assert _marker(fig.axes[2], "*") == pytest.approx((fits["toy_ml"].sigma, fits["toy_ml"].sigma_s), rel=1e-8)
    fig = plots.explorer(fits["toy_reml"], n=11)
    assert _marker(fig.axes[2], "*") == pytest.approx((fits["toy_ml"].sigma, fits["toy_ml"].sigma_s), rel=1e-8)
    with pytest.raises(TypeError):
        plots.explorer(toy)


def test_explorer_shows_the_first_groups_of_a_large_sigma(fits):
    fig = plots.explorer(fits["sleep_reml"], n=11)
    S = fig.axes[1].get_images()[0].get_array()
    assert S.shape == (20, 20)  # two subjects of 10 days
    ml = fits["sleep_ml"]
    assert S[0, 0] == pytest.approx(ml.sigma**2 + ml.sigma_s**2, rel=1e-8)
    assert S[0, 1] == pytest.approx(ml.sigma_s**2, rel=1e-8) and S[0, 10] == 0.0
    assert len(_group_lines(fig.axes[0])) == 18


def test_explorer_widget_has_sliders_for_sigma_sigma_s_and_each_beta(fits):
    widgets = pytest.importorskip("ipywidgets")
    box = plots.explorer(fits["sleep_ml"], interactive=True, n=11)
    assert isinstance(box, widgets.VBox)
    sliders = [w for row in box.children[:2] for w in row.children]
    assert [s.description for s in sliders] == ["sigma", "sigma_s", "beta (Intercept)", "beta Days"]
    assert sliders[0].value == pytest.approx(fits["sleep_ml"].sigma)
    assert sliders[3].value == pytest.approx(fits["sleep_ml"].params["Days"])


def test_widget_detection_honours_the_static_switch(monkeypatch):
    monkeypatch.setenv(plots.STATIC_ENV, "1")
    assert not plots._widget_frontend()


def test_module_leaves_backend_and_showing_to_the_caller():
    source = Path(plots.__file__).read_text()
    assert "matplotlib.use(" not in source and "plt.show(" not in source and "switch_backend" not in source


# ----------------------------------------------------------------------------------- teaching
def test_ols_matches_numpy_and_r_lm_on_the_toy_data(toy):
    fit = teaching.ols(toy, "Treat", "Resp")
    assert list(fit.params) == pytest.approx([6.5, 9.0])
    # R: summary(lm(Resp ~ Treat)) -> SE 7.158911, 10.124228 on 2 df
    assert list(fit.bse) == pytest.approx([7.158911, 10.124228], rel=1e-6)
    assert fit.df == 2
    mean, lo, hi = fit.band([0.0, 1.0])
    assert list(mean) == pytest.approx([6.5, 15.5])
    assert hi[0] - mean[0] == pytest.approx(scipy.stats.t.ppf(0.975, 2) * 7.158911, rel=1e-6)
    with pytest.raises(lmm.DataError):
        teaching.ols(toy.assign(Treat=1), "Treat", "Resp")


def test_resp_std_regression_with_corrected_df_is_the_paired_t(toy):
    table = teaching.resp_std_regression(toy)
    paired = lmm.paired_t_test(toy)
    naive, corrected = table.iloc[0], table.iloc[1]
    assert corrected["t"] == pytest.approx(paired.t) and corrected["df"] == paired.df
    assert corrected["p_value"] == pytest.approx(paired.p_value)
    assert naive["df"] == 2 and naive["t"] == pytest.approx(9 / math.sqrt(18))


@pytest.mark.parametrize("G", [2, 3, 4])
def test_paired_equivalence_is_an_exact_proof(G):
    proof = teaching.paired_equivalence(G)
    assert proof.proved and proof.difference == 0
    assert proof.var_treat_in_a == sp.Rational(2, G) * teaching.a
    # the symbolic estimates are the paired-design statistics: check them on numbers too
    rng = np.random.default_rng(G)
    values = rng.integers(-20, 20, size=2 * G)
    at = dict(zip(proof.derivation.symbols.y, map(int, values)))
    d = values[1::2] - values[0::2]  # pairs_data lists (Treat 0, Treat 1) per individual
    assert float(proof.sigma2.subs(at)) == pytest.approx(d.var(ddof=1) / 2)
    assert float(proof.t_reml.subs(at)) == pytest.approx(d.mean() / (d.std(ddof=1) / math.sqrt(G)))


def test_paired_equivalence_agrees_with_the_numeric_fit_when_interior():
    data = teaching.pairs_data(3).assign(Resp=[10.0, 25.0, 3.0, 6.0, 40.0, 47.0])
    fit = _fit(TOY, data)
    assert not fit.singular
    proof = teaching.paired_equivalence(3)
    at = dict(zip(proof.derivation.symbols.y, [10, 25, 3, 6, 40, 47]))
    assert float(proof.sigma2.subs(at)) == pytest.approx(fit.sigma**2, rel=1e-8)
    assert float(proof.sigma_s2.subs(at)) == pytest.approx(fit.sigma_s**2, rel=1e-8)
    assert float(proof.t_reml.subs(at)) == pytest.approx(fit.tvalues["Treat"], rel=1e-8)
    assert float(proof.t_reml.subs(at)) == pytest.approx(lmm.paired_t_test(data).t, rel=1e-12)


def test_paired_equivalence_general_for_symbolic_G():
    g = teaching.paired_equivalence_general()
    a, b = teaching.a, teaching.b
    D, S, SSD, G = (sp.Symbol(n, real=True) for n in ("D", "S", "SSD", "G"))
    G = g.G
    assert g.difference == 0
    assert sp.simplify(g.pair_det - a * b) == 0
    assert sp.simplify(g.pair_quadratic - (D**2 / (2 * a) + S**2 / (2 * b))) == 0
    assert sp.simplify(g.sigma2_reml - SSD / (2 * (G - 1))) == 0
    assert sp.simplify(g.sigma2_ml - SSD / (2 * G)) == 0
    assert sp.simplify(g.var_treat - 2 * a / G) == 0
    assert r"t_{\mathrm{REML}} - t_{\mathrm{paired}} = 0" in g._repr_latex_()


def test_pairs_data_layout():
    data = teaching.pairs_data(4)
    assert list(data["Treat"]) == [0, 1] * 4 and data["Ind"].nunique() == 4
    with pytest.raises(lmm.DataError):
        teaching.pairs_data(1)
    assert isinstance(data, pd.DataFrame)
