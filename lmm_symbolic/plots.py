r"""Figures of the tutorial, drawn with matplotlib: one function per figure, each returning its Axes or Figure.

* :func:`plot_data` -- the data, one line per individual;
* :func:`plot_ols` -- the naive OLS fit (individuals ignored) with its confidence band;
* :func:`plot_individual_fits` -- one OLS fit per individual, in facets;
* :func:`plot_lmm_fit` -- the mixed model: the population line :math:`X\hat\beta` and each group's line
  :math:`X\hat\beta + \hat u_g` from the BLUPs;
* :func:`plot_loglik_surface` -- the (restricted) log-likelihood over :math:`(\sigma, \sigma_s)` as contours, with the
  optimum and the optimiser's path;
* :func:`plot_profile_sigma_s` -- the profile log-likelihood of :math:`\sigma_s`;
* :func:`plot_caterpillar` -- the BLUPs with their :math:`\pm 1.96` conditional-SD intervals;
* :func:`explorer` -- sliders for :math:`\sigma`, :math:`\sigma_s` and :math:`\beta` redrawing the fitted lines,
  :math:`\Sigma` and :math:`\log L`
  (an ipywidgets widget inside a Jupyter kernel; a static figure elsewhere).

Nothing here chooses a matplotlib backend or shows a figure. The log-likelihood is the package's
compiled Eq. 10 (:class:`~lmm_symbolic.compilation.LogLikelihood`) with :math:`\beta` at its GLS value, read from
the profiled criterion (:class:`~lmm_symbolic.compilation.ProfiledDeviance`) that the optimiser minimised.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import scipy.optimize
import scipy.stats
import sympy as sp

from .compilation import LogLikelihood, ProfiledDeviance, intercept_kernels
from .derivation import Derivation, sigma, sigma_s
from .errors import DataError, ModelError
from .results import FitResult, fit_design
from .specification import DataLike, Design, read_data, specify
from .statistics import GroupStatistics
from .teaching import ols

#: environment variable that makes :func:`explorer` draw its static figure even inside a Jupyter kernel
#: (``notebooks/run.py`` sets it: a kernel cannot tell whether a widget front end is attached)
STATIC_ENV = "LMM_SYMBOLIC_STATIC"
#: z for the 95 % intervals of the caterpillar plot
Z95 = float(scipy.stats.norm.ppf(0.975))


# ----------------------------------------------------------------------------------- raw data
def _columns(frame: pd.DataFrame, *names: str) -> None:
    for col in names:
        if col not in frame.columns:
            raise DataError(f"unknown column {col!r}; the data has {', '.join(map(str, frame.columns))}")


def _groups(frame: pd.DataFrame, group: str) -> list:
    col = frame[group]
    if isinstance(col.dtype, pd.CategoricalDtype):
        return [g for g in col.cat.categories if (col == g).any()]
    return sorted(pd.unique(col), key=str)


def _colour(index: int):
    """One colour per individual, the same in every figure (matplotlib's tab10, then tab20)."""
    cmap = plt.get_cmap("tab10" if index < 10 else "tab20")
    return cmap(index % (10 if index < 10 else 20))


def _binary_axis(ax, values) -> None:
    """A 0/1 covariate (the tutorial's Treat) is labelled untreated/treated rather than drawn as a number."""
    vals = set(np.unique(np.asarray(values, dtype=float)).tolist())
    if vals <= {0.0, 1.0} and len(vals) == 2:
        ax.set_xticks([0, 1])
        ax.set_xticklabels(["untreated (0)", "treated (1)"])
        ax.set_xlim(-0.25, 1.25)


def _legend_outside(ax, **kwargs) -> None:
    """The legend beside the axes, never over the data."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize="small", **kwargs)


def plot_data(data: DataLike, x: str, y: str, group: str, ax=None):
    """The data, one line (and marker) per individual, joined in order of x. Returns the Axes."""
    frame = read_data(data)
    _columns(frame, x, y, group)
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    levels = _groups(frame, group)
    for k, g in enumerate(levels):
        sub = frame[frame[group] == g].sort_values(x)
        ax.plot(sub[x], sub[y], marker="o", label=str(g), color=_colour(k))
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    _binary_axis(ax, frame[x])
    ax.set_title(f"{y} by {x}, one line per {group} ({len(levels)} {group})")
    if len(levels) <= 10:
        _legend_outside(ax, title=group)
    return ax


def plot_ols(data: DataLike, x: str, y: str, group: str | None = None, level: float = 0.95, ax=None):
    """The naive OLS fit of y on x, ignoring the individuals, with its ``level`` confidence band.

    With ``group`` the points are coloured by individual, which shows what the fit ignores. Returns the Axes.
    """
    frame = read_data(data)
    _columns(frame, x, y, *([group] if group else []))
    fit = ols(frame, x, y)
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    if group:
        for k, g in enumerate(_groups(frame, group)):
            sub = frame[frame[group] == g]
            ax.scatter(sub[x], sub[y], label=f"{group} {g}", zorder=3, color=_colour(k))
    else:
        ax.scatter(frame[x], frame[y], color="0.3", zorder=3, label="data")
    grid = np.linspace(float(frame[x].min()), float(frame[x].max()), 100)
    mean, lo, hi = fit.band(grid, level)
    ax.plot(grid, mean, color="black", label="OLS fit")
    ax.fill_between(grid, lo, hi, color="grey", alpha=0.3, label=f"{100 * level:g} % confidence band")
    slope, se = fit.params[x], fit.bse[x]
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(f"naive OLS: slope {slope:.4g} (SE {se:.3g}, df {fit.df})")
    _binary_axis(ax, frame[x])
    if len(ax.get_legend_handles_labels()[0]) <= 12:
        _legend_outside(ax)
    return ax


def plot_individual_fits(data: DataLike, x: str, y: str, group: str, ncols: int | None = None):
    """One OLS line per individual, one facet each (shared axes). Returns the Figure."""
    frame = read_data(data)
    _columns(frame, x, y, group)
    levels = _groups(frame, group)
    ncols = ncols or min(len(levels), 6)
    nrows = math.ceil(len(levels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.4 * ncols + 1, 2.2 * nrows + 0.8), sharex=True,
                             sharey=True, squeeze=False)
    flat = axes.ravel()
    for k, (ax, g) in enumerate(zip(flat, levels)):
        sub = frame[frame[group] == g]
        ax.scatter(sub[x], sub[y], s=14, zorder=3, color=_colour(k))
        _binary_axis(ax, frame[x])
        if sub[x].nunique() > 1:
            fit = ols(sub, x, y)
            grid = np.array([float(sub[x].min()), float(sub[x].max())])
            ax.plot(grid, fit.predict(grid), color=_colour(k))
            ax.set_title(f"{group} {g}: slope {fit.params[x]:.3g}", fontsize="small")
        else:
            ax.set_title(f"{group} {g}", fontsize="small")
    for ax in flat[len(levels):]:
        ax.set_visible(False)
    for ax in axes[-1, :]:
        ax.set_xlabel(x)
    for ax in axes[:, 0]:
        ax.set_ylabel(y)
    fig.suptitle(f"one least-squares fit per {group}")
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------ the LMM fit
def _covariate(design: Design, x: str | None) -> str | None:
    """The column drawn on the x axis: ``x``, else the first fixed-effect column that is a data column."""
    if x is not None:
        _columns(design.frame, x)
        return x
    return next((name for name in design.fixed_names if name in design.frame.columns), None)


def _draw_lmm_lines(ax, design: Design, x: str | None, population: np.ndarray, fitted: np.ndarray,
                    title: str):
    """Points, the population line and one line per group (fitted values joined in order of x)."""
    term = design.terms[0]
    codes = np.asarray(term.codes)
    group_label = rf"one line per {term.group}: $X\hat\beta + Z\hat u_j$"
    if x is None:  # no covariate: the groups along the axis, each a short level at beta_0 + u_g
        xs = codes.astype(float)
        ax.scatter(xs, design.y, s=14, color="0.4", zorder=3, label="data")
        for j in range(term.n_levels):
            level = fitted[codes == j][0]
            line, = ax.plot([j - 0.35, j + 0.35], [level, level], color=_colour(j), lw=2,
                            label=group_label if j == 0 else "_nolegend_")
            line.set_gid(f"group:{term.levels[j]}")
        line = ax.axhline(float(population[0]), color="black", lw=2.5, label="population mean")
        line.set_gid("population")
        ax.set_xticks(range(term.n_levels), term.levels, rotation=90 if term.n_levels > 12 else 0)
        ax.set_xlabel(term.group)
    else:
        xv = design.frame[x].to_numpy(dtype=float)
        ax.scatter(xv, design.y, s=14, color="0.4", zorder=3, label="data")
        for j in range(term.n_levels):
            rows = np.flatnonzero(codes == j)
            order = rows[np.argsort(xv[rows], kind="stable")]
            line, = ax.plot(xv[order], fitted[order], color=_colour(j), lw=1, alpha=0.8,
                            label=group_label if j == 0 else "_nolegend_")
            line.set_gid(f"group:{term.levels[j]}")
        order = np.argsort(xv, kind="stable")
        line, = ax.plot(xv[order], population[order], color="black", lw=2.5, label=r"population: $X\hat\beta$")
        line.set_gid("population")
        ax.set_xlabel(x)
    ax.set_ylabel(design.response)
    if x is not None:
        _binary_axis(ax, design.frame[x])
    ax.set_title(title)
    _legend_outside(ax)
    return ax


def _require_intercept(fit: FitResult, what: str) -> None:
    if not fit.design.is_random_intercept:
        raise ModelError(f"{what} is drawn for a model with one random intercept (1|g); "
                         f"{fit.design.formula!r} has other random terms")


def plot_lmm_fit(fit: FitResult, x: str | None = None, ax=None):
    r"""The mixed model's fit: the population line :math:`X\hat\beta` and each group's line
    :math:`X\hat\beta + \hat u_g` (BLUPs).

    ``x`` is the covariate on the horizontal axis (default: the first fixed-effect column of the data);
    without one (``y ~ 1``) the groups are spread along the axis. Any model with one grouping factor is
    drawn (random slopes too: the group lines are the fitted values :math:`X\hat\beta + Z_g \hat u_g`).
    Returns the Axes."""
    design = fit.design
    if len({t.group for t in design.terms}) != 1:
        raise ModelError(f"the fitted lines are drawn for a model with one grouping factor; "
                         f"{design.formula!r} has {len({t.group for t in design.terms})}")
    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 4.5))
    population = design.X @ fit.params.to_numpy()
    if design.is_random_intercept:
        title = rf"{fit.method} fit: $\hat\sigma$ = {fit.sigma:.4g}, $\hat\sigma_s$ = {fit.sigma_s:.4g}"
    else:
        title = f"{fit.method} fit of {design.formula}"
    title += " (singular)" if fit.singular else ""
    return _draw_lmm_lines(ax, design, _covariate(design, x), population, np.asarray(fit.fitted), title)


def plot_caterpillar(fit: FitResult, term: str = "(Intercept)", level: float = 0.95, ax=None):
    r"""The BLUPs of ``term`` (default the random intercept), sorted, with
    :math:`\hat u_g \pm z\, \mathrm{cond\_sd}` intervals.

    lme4's dotplot of ranef(condVar = TRUE), the intervals from the conditional SDs. Returns the Axes."""
    re = fit.random_effects
    if not isinstance(re, pd.DataFrame) or term not in re.columns:
        raise ModelError(f"no random effect {term!r} with one grouping factor in {fit.design.formula!r}")
    re = re.sort_values(term)
    z = float(scipy.stats.norm.ppf(0.5 + level / 2))
    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, max(2.5, 0.28 * len(re) + 1.2)))
    pos = np.arange(len(re))
    sd = f"cond_sd {term}" if f"cond_sd {term}" in re.columns else "cond_sd"    # slopes / (1|g)
    intervals = sd in re.columns and (sd != "cond_sd" or term == "(Intercept)")
    xerr = z * re[sd].to_numpy(dtype=float) if intervals else None
    ax.errorbar(re[term].to_numpy(dtype=float), pos, xerr=xerr, fmt="o", color="C0",
                ecolor="C0", capsize=2, markersize=4)
    ax.axvline(0.0, color="0.5", lw=1, ls="--")
    ax.set_yticks(pos, [str(v) for v in re.index])
    ax.set_xlabel(f"{term}: conditional mode" + (rf" $\pm$ {z:.2f} conditional SD" if intervals else ""))
    ax.set_ylabel(fit.group)
    ax.set_title(f"conditional modes of the random {term} by {fit.group} ({len(re)} levels)")
    return ax


# ----------------------------------------------------------------------- the likelihood surface
class Criterion:
    r""":math:`\log L(\sigma, \sigma_s)` with :math:`\beta` at its GLS value (ML), or the REML log-likelihood.

    ML: Eq. 10 compiled by the package (:class:`~lmm_symbolic.compilation.LogLikelihood`) at
    :math:`\hat\beta(\theta)`, :math:`\theta = \sigma_s/\sigma`. REML: the same, minus
    :math:`\frac12 \log|X^\top \Sigma^{-1} X|` plus :math:`\frac{p}{2} \log(2\pi)`, with
    :math:`X^\top \Sigma^{-1} X = A / \sigma^2` (:math:`A = X^\top V^{-1} X` from the profiled criterion,
    :math:`V = \Sigma / \sigma^2`). Its maximum is the fit's :math:`\log L`.
    """

    def __init__(self, design: Design, reml: bool):
        self.design = design
        self.reml = bool(reml)
        self.stats = GroupStatistics.of(design)
        self.profiled = ProfiledDeviance(self.stats, self.reml)
        self.loglik = LogLikelihood(self.stats)

    @classmethod
    def of(cls, fit: FitResult) -> "Criterion":
        _require_intercept(fit, "the likelihood over (sigma, sigma_s)")
        return cls(fit.design, fit.method == "REML")

    def beta(self, theta: float) -> np.ndarray:
        r"""The GLS estimate of :math:`\beta` at :math:`\theta`, in the response's units."""
        s = self.stats
        return self.profiled.state(theta).beta * s.scale + s.beta_shift

    def __call__(self, sig: float, sig_s: float) -> float:
        st = self.profiled.state(sig_s / sig)
        s = self.stats
        value = self.loglik(sig, sig_s, st.beta * s.scale + s.beta_shift)
        if self.reml:
            value += -0.5 * (st.logdetA - s.p * math.log(sig**2)) + 0.5 * s.p * math.log(2 * math.pi)
        return value

    def estimates(self, theta: float) -> tuple[float, float]:
        r""":math:`\bigl(\hat\sigma(\theta), \theta\, \hat\sigma(\theta)\bigr)`: where the optimiser stands at :math:`\theta`."""
        st = self.profiled.state(theta)
        sig = math.sqrt(st.rss / self.profiled.n_eff) * self.stats.scale
        return sig, theta * sig

    def grid(self, sigmas, sigma_ss) -> np.ndarray:
        r"""Values over the grid, rows :math:`\sigma_s`, columns :math:`\sigma` (as contour wants them)."""
        return np.array([[self(s, ss) for s in sigmas] for ss in sigma_ss])

    def profile_sigma_s(self, sig_s: float, guess: float) -> tuple[float, float]:
        r"""max over :math:`\sigma` of the criterion at fixed :math:`\sigma_s`: (value, :math:`\sigma` at the maximum)."""
        res = scipy.optimize.minimize_scalar(lambda ls: -self(math.exp(ls), sig_s), method="bounded",
                                             bounds=(math.log(guess) - 4.0, math.log(guess) + 4.0),
                                             options={"xatol": 1e-10})
        return -float(res.fun), math.exp(float(res.x))


@dataclass(frozen=True)
class _Surface:
    sigmas: np.ndarray
    sigma_ss: np.ndarray
    values: np.ndarray
    maximum: float


def _surface(fit: FitResult, criterion: Criterion, n: int, path: np.ndarray | None,
             sigma_range=None, sigma_s_range=None, depth: float = 12.0) -> _Surface:
    """The criterion on an n x n grid. Ranges not given cover where it is within ``depth`` log-units of
    the maximum (found on a coarse grid first), and the optimiser's steps that stay near it."""
    sig, sig_s = fit.sigma, fit.sigma_s
    scale = max(sig, sig_s)
    lo, hi = sigma_range or (0.2 * sig, 3.0 * sig)
    lo_s, hi_s = sigma_s_range or (0.0, max(3.0 * sig_s, scale))
    top = criterion(sig, sig_s)
    if sigma_range is None or sigma_s_range is None:
        coarse_s, coarse_ss = np.linspace(lo, hi, 17), np.linspace(lo_s, hi_s, 17)
        inside = criterion.grid(coarse_s, coarse_ss) >= top - depth
        cols, rows = np.flatnonzero(inside.any(axis=0)), np.flatnonzero(inside.any(axis=1))
        step, step_s = coarse_s[1] - coarse_s[0], coarse_ss[1] - coarse_ss[0]
        if sigma_range is None:
            lo, hi = max(coarse_s[cols[0]] - step, 0.5 * lo), coarse_s[cols[-1]] + step
        if sigma_s_range is None:
            lo_s, hi_s = max(coarse_ss[rows[0]] - step_s, 0.0), coarse_ss[rows[-1]] + step_s
        if path is not None:  # take in the optimiser's steps unless they wander far away
            near = path[(path[:, 0] < 2 * hi) & (path[:, 1] < 2 * hi_s)]
            if len(near) and sigma_range is None:
                lo, hi = min(lo, 0.97 * near[:, 0].min()), max(hi, 1.03 * near[:, 0].max())
            if len(near) and sigma_s_range is None:
                lo_s, hi_s = min(lo_s, 0.97 * near[:, 1].min()), max(hi_s, 1.03 * near[:, 1].max())
    sigmas, sigma_ss = np.linspace(lo, hi, n), np.linspace(lo_s, hi_s, n)
    return _Surface(sigmas, sigma_ss, criterion.grid(sigmas, sigma_ss), top)


def _draw_surface(ax, surface: _Surface, label: str) -> None:
    """Filled contours of the criterion within 12 log-units of the maximum, and the likelihood regions."""
    top = surface.maximum
    levels = top - np.array([12, 9, 7, 5.5, 4.5, 3.5, 2.5, 1.75, 1.0, 0.5, 0.2, 0.0])
    z = np.maximum(surface.values, top - 12.0)
    filled = ax.contourf(surface.sigmas, surface.sigma_ss, z, levels=levels, cmap="viridis", extend="min")
    coverage = (99, 95, 50)
    regions = top - scipy.stats.chi2.ppf(np.array(coverage) / 100, 2) / 2
    lines = ax.contour(surface.sigmas, surface.sigma_ss, surface.values, levels=regions, colors="white",
                       linewidths=0.8)
    ax.clabel(lines, fmt={v: f"{c}%" for v, c in zip(lines.levels, coverage)}, fontsize="x-small")
    ax.figure.colorbar(filled, ax=ax, label=label)
    ax.set_xlabel(r"$\sigma$ (residual SD)")
    ax.set_ylabel(r"$\sigma_s$ (random-intercept SD)")


def optimiser_path(fit: FitResult, criterion: Criterion | None = None) -> np.ndarray:
    r"""The optimiser's iterates :math:`\theta` mapped to :math:`\bigl(\hat\sigma(\theta), \theta\, \hat\sigma(\theta)\bigr)`,
    shape (k, 2)."""
    criterion = criterion or Criterion.of(fit)
    return np.array([criterion.estimates(th) for (th,) in fit.opt.path]).reshape(-1, 2)


def plot_loglik_surface(fit: FitResult, n: int = 45, show_path: bool = True, sigma_range=None,
                        sigma_s_range=None, ax=None):
    r"""Contours of the log-likelihood (REML log-likelihood for a REML fit) over :math:`(\sigma, \sigma_s)`.

    :math:`\beta` is at its GLS value for each :math:`(\sigma, \sigma_s)`. The star marks the fit's
    :math:`(\hat\sigma, \hat\sigma_s)`, where the surface peaks at the fit's :math:`\log L`; white lines bound
    the 50/95/99 % likelihood regions (:math:`\chi^2_2`). With ``show_path`` the optimiser's iterates (over
    :math:`\theta`) are drawn at :math:`\bigl(\hat\sigma(\theta), \theta\, \hat\sigma(\theta)\bigr)`. Returns the
    Axes."""
    criterion = Criterion.of(fit)
    path = optimiser_path(fit, criterion) if show_path and len(fit.opt.path) else None
    surface = _surface(fit, criterion, n, path, sigma_range, sigma_s_range)
    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 5))
    what = "REML log-likelihood" if criterion.reml else "log-likelihood"
    _draw_surface(ax, surface, what)
    if path is not None:
        inside = ((path[:, 0] >= surface.sigmas[0]) & (path[:, 0] <= surface.sigmas[-1])
                  & (path[:, 1] >= surface.sigma_ss[0]) & (path[:, 1] <= surface.sigma_ss[-1]))
        shown = "" if inside.all() else f", {int(inside.sum())} inside the frame"
        ax.plot(path[:, 0], path[:, 1], "-o", color="orange", ms=3, lw=1,
                label=f"optimiser's path ({len(path)} evaluations{shown})")
    ax.plot([fit.sigma], [fit.sigma_s], marker="*", color="red", ms=14, ls="none",
            label=rf"optimum ({fit.sigma:.4g}, {fit.sigma_s:.4g}), $\log L$ = {surface.maximum:.4f}")
    ax.set_xlim(surface.sigmas[0], surface.sigmas[-1])
    ax.set_ylim(surface.sigma_ss[0], surface.sigma_ss[-1])
    ax.set_title(rf"{what} over $(\sigma, \sigma_s)$, $\beta$ at GLS")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(0.0, -0.15), borderaxespad=0.0)
    return ax


def plot_profile_sigma_s(fit: FitResult, n: int = 41, upper: float | None = None, ax=None):
    r"""The profile log-likelihood of :math:`\sigma_s`: at each :math:`\sigma_s` the maximum over
    :math:`\sigma` (and :math:`\beta`).

    For a REML fit the REML log-likelihood is profiled. The dashed line is the maximum minus
    :math:`\chi^2_1(0.95)/2`: the :math:`\sigma_s` where the curve is above it form the 95 % profile interval.
    Returns the Axes."""
    criterion = Criterion.of(fit)
    upper = upper or max(2.5 * fit.sigma_s, 0.8 * fit.sigma)
    grid = np.unique(np.concatenate([np.linspace(0.0, upper, n), [fit.sigma_s]]))
    values = np.array([criterion.profile_sigma_s(v, fit.sigma)[0] for v in grid])
    top = criterion(fit.sigma, fit.sigma_s)
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    ax.plot(grid, values, color="C0", label="profile")
    cut = top - scipy.stats.chi2.ppf(0.95, 1) / 2
    ax.axhline(cut, color="0.4", ls="--", lw=1, label="95 % cut-off (max - 1.92)")
    ax.plot([fit.sigma_s], [top], "o", color="red", label=rf"estimate $\hat\sigma_s$ = {fit.sigma_s:.4g}")
    what = "REML log-likelihood" if criterion.reml else "log-likelihood"
    ax.set_xlabel(r"$\sigma_s$ (random-intercept SD)")
    ax.set_ylabel(f"profile {what}")
    ax.set_title(rf"{fit.method}: profile {what} of $\sigma_s$ (max over $\sigma$)", fontsize="medium")
    ax.legend(fontsize="small", loc="lower center")
    return ax


def profile_interval_sigma_s(fit: FitResult, level: float = 0.95, method: str = "ML",
                             upper: float | None = None) -> tuple[float, float]:
    r"""The profile-likelihood interval of :math:`\sigma_s`: where the profile (max over :math:`\sigma` and
    :math:`\beta`) is within :math:`\chi^2_1(\text{level})/2` of its maximum. ``method="ML"`` profiles the likelihood, as lme4's
    confint(method = "profile") does even for a REML fit (the fit is redone by ML); ``"REML"`` profiles
    the restricted likelihood. The lower end is 0 when the profile at 0 is above the cut-off."""
    method = method.upper()
    if method not in ("ML", "REML"):
        raise ModelError(f"method must be 'ML' or 'REML', not {method!r}")
    if fit.method != method:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit = fit_design(fit.design, method, exact=False)
    criterion = Criterion.of(fit)
    top = criterion(fit.sigma, fit.sigma_s)
    cut = top - scipy.stats.chi2.ppf(level, 1) / 2
    gap = lambda v: criterion.profile_sigma_s(v, fit.sigma)[0] - cut  # noqa: E731
    lo = 0.0 if gap(0.0) >= 0 else scipy.optimize.brentq(gap, 0.0, fit.sigma_s, xtol=1e-10)
    hi_end = upper or 10 * max(fit.sigma_s, fit.sigma)
    while gap(hi_end) > 0 and hi_end < 1e6 * max(fit.sigma, 1.0):
        hi_end *= 4
    hi = scipy.optimize.brentq(gap, max(fit.sigma_s, 1e-12), hi_end, xtol=1e-10)
    return float(lo), float(hi)


def plot_shrinkage(fit: FitResult, ax=None):
    r"""Shrinkage: each group's own estimate (the mean of its residuals from the population line, what a
    separate fit per group gives) against its conditional mode :math:`\hat u_g`. For (1|g) Eq. 12's Woodbury
    weight gives :math:`\hat u_g = m_g w_g \bar r_g` (:math:`\bar r_g` the mean residual) with
    :math:`m_g w_g = \sigma_s^2 / (\sigma_s^2 + \sigma^2 / m_g)`: the factor by which a group's own estimate is pulled towards 0. Returns the Axes."""
    _require_intercept(fit, "the shrinkage plot")
    design = fit.design
    term = design.terms[0]
    codes = np.asarray(term.codes)
    resid = design.y - design.X @ fit.params.to_numpy()
    m_g = np.bincount(codes, minlength=term.n_levels).astype(float)
    own = np.bincount(codes, weights=resid, minlength=term.n_levels) / m_g
    modes = fit.random_effects["(Intercept)"].to_numpy()
    factor = fit.sigma_s**2 / (fit.sigma_s**2 + fit.sigma**2 / m_g)
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4.5))
    lim = float(np.max(np.abs(own))) * 1.1 or 1.0
    ax.plot([-lim, lim], [-lim, lim], color="0.6", ls="--", lw=1, label=r"no shrinkage ($\hat u_j$ = own estimate)")
    for k in range(term.n_levels):
        ax.plot([own[k], own[k]], [own[k], modes[k]], color=_colour(k), lw=1, alpha=0.7)
        ax.plot([own[k]], [modes[k]], "o", color=_colour(k))
    ax.axhline(0, color="0.85", lw=0.8)
    ax.axvline(0, color="0.85", lw=0.8)
    ax.set_xlabel(f"{term.group}'s own estimate: mean residual from the population line")
    ax.set_ylabel(r"conditional mode $\hat u_j$")
    f = np.unique(np.round(factor, 4))
    fac = f"{f[0]:.3g}" if len(f) == 1 else f"{f.min():.3g} to {f.max():.3g}"
    ax.set_title(r"shrinkage: $\hat u_j = \frac{\sigma_s^2}{\sigma_s^2 + \sigma^2/m_j}\times$ own estimate"
                 f"  (factor {fac})", fontsize="medium")
    ax.legend(fontsize="small", loc="upper left")
    return ax


# ------------------------------------------------------------------------------------- explorer
def _widget_frontend() -> bool:
    """True inside an IPython kernel with a comm manager and ipywidgets importable (and no STATIC_ENV)."""
    if os.environ.get(STATIC_ENV, "").strip().lower() not in ("", "0", "false", "no"):
        return False
    try:
        import ipywidgets  # noqa: F401
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    kernel = getattr(shell, "kernel", None)
    if kernel is None:
        return False
    if getattr(kernel, "comm_manager", None) is not None:
        return True
    try:
        import comm
        return comm.get_comm_manager() is not None
    except Exception:  # noqa: BLE001 -- any failure means: no widgets
        return False


class _Explorer:
    """What the explorer's panels need, computed once: the ML fit, the surface and Sigma's first blocks."""

    def __init__(self, fit: FitResult, n: int = 35):
        self.fit = fit if fit.method == "ML" else fit_design(fit.design, method="ML", exact=False)
        self.design = design = self.fit.design
        self.criterion = Criterion(design, reml=False)
        self.surface = _surface(self.fit, self.criterion, n, None)
        self.x = _covariate(design, None)
        term = design.terms[0]
        self.codes = np.asarray(term.codes)
        self.sizes = term.sizes.astype(float)
        self.weight = intercept_kernels()[1]
        shown = _first_groups(design, max_rows=8)
        self.sigma_matrix = sp.lambdify((sigma, sigma_s), shown.sigma_matrix, modules="numpy")
        self.shown_n = shown.design.n

    def draw(self, sig: float, sig_s: float, beta) -> plt.Figure:
        beta = np.asarray(beta, dtype=float)
        design = self.design
        population = design.X @ beta
        # BLUPs at these parameters: u_g = w_g 1^T (y_g - X_g beta), w_g = theta^2 / (1 + m_g theta^2)
        w = np.broadcast_to(self.weight(sig_s / sig, self.sizes)[0], self.sizes.shape)
        sums = np.bincount(self.codes, weights=design.y - population, minlength=len(self.sizes))
        fitted = population + (w * sums)[self.codes]
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.6), gridspec_kw={"width_ratios": [1.2, 0.9, 1.1]})
        beta_text = ", ".join(f"{b:.3g}" for b in beta)
        _draw_lmm_lines(axes[0], design, self.x, population, fitted,
                        f"fitted lines at sigma = {sig:.3g}, sigma_s = {sig_s:.3g}, beta = ({beta_text})")
        S = np.asarray(self.sigma_matrix(sig, sig_s), dtype=float)
        image = axes[1].imshow(S, cmap="magma")
        fig.colorbar(image, ax=axes[1], label="covariance")
        if len(S) <= 8:
            for i in range(len(S)):
                for j in range(len(S)):
                    axes[1].text(j, i, f"{S[i, j]:.3g}", ha="center", va="center", fontsize="x-small",
                                 color="white" if S[i, j] < 0.6 * S.max() else "black")
        ticks = np.arange(0, len(S), max(1, len(S) // 10))
        axes[1].set_xticks(ticks, [str(t + 1) for t in ticks])
        axes[1].set_yticks(ticks, [str(t + 1) for t in ticks])
        axes[1].set_xlabel("observation j")
        axes[1].set_ylabel("observation i")
        axes[1].set_title(rf"$\Sigma$ (Eq. 8), first {len(S)} of {design.n} rows")
        _draw_surface(axes[2], self.surface, "log-likelihood (beta at GLS)")
        value = self.criterion.loglik(sig, sig_s, beta)
        axes[2].plot([self.fit.sigma], [self.fit.sigma_s], "*", color="red", ms=13,
                     label=f"ML maximum, log L = {self.surface.maximum:.4f}")
        axes[2].plot([sig], [sig_s], "o", color="orange", ms=9, label=f"chosen values, log L = {value:.4f}")
        axes[2].set_title(r"$\log L$ (Eq. 10) at the chosen values")
        axes[2].legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(0.0, -0.15))
        fig.tight_layout()
        return fig


def _first_groups(design: Design, max_rows: int) -> Derivation:
    """The derivation of the design's first groups (at most ``max_rows`` rows, at least one group):
    Sigma is block-diagonal, so its Sigma is the top-left block of the whole Sigma."""
    term = design.terms[0]
    codes = np.asarray(term.codes)
    order = np.argsort(codes, kind="stable")
    keep, rows = [], 0
    for j, size in enumerate(term.sizes):
        if keep and rows + size > max_rows:
            break
        keep.append(j)
        rows += int(size)
    if len(keep) < 2:  # a design needs two groups; show the first two, whatever their size
        keep = [0, 1]
    frame = design.frame.iloc[order[np.isin(codes[order], keep)]].reset_index(drop=True)
    frame[term.group] = frame[term.group].astype(str)
    return Derivation(specify(design.formula, frame))


def explorer(fit_or_design: FitResult | Design, sigma: float | None = None, sigma_s: float | None = None,
             beta=None, interactive: bool | None = None, n: int = 35):
    r"""Sliders for :math:`\sigma`, :math:`\sigma_s` and each :math:`\beta` that redraw the fitted lines,
    :math:`\Sigma` and :math:`\log L`.

    Left: the data with :math:`X\beta` and each group's line :math:`X\beta + u_g` (:math:`u_g` the BLUP at
    the sliders' values); middle: :math:`\Sigma` (Eq. 8) for the first groups; right: the ML log-likelihood
    surface with the maximum and the sliders' point, and :math:`\log L` (Eq. 10) at the sliders'
    :math:`(\sigma, \sigma_s, \beta)` in the legend.

    Inside a Jupyter kernel with ipywidgets this returns the widget. Elsewhere -- and when
    ``interactive=False`` or the environment variable ``LMM_SYMBOLIC_STATIC`` is set, as
    ``notebooks/run.py`` does -- it returns a static Figure drawn at ``sigma``, ``sigma_s``, ``beta``
    (default: the ML estimates). The static figure is closed in pyplot, so showing it is up to the caller
    (a notebook shows it as the cell's value). ``n`` is the resolution of the surface (:math:`n \times n` points).
    """
    if isinstance(fit_or_design, Design):
        fit = fit_design(fit_or_design, method="ML", exact=False)
    elif isinstance(fit_or_design, FitResult):
        fit = fit_or_design
    else:
        raise TypeError(f"explorer takes a FitResult or a Design, not {type(fit_or_design).__name__}")
    if not fit.design.is_random_intercept:
        raise ModelError("the explorer handles one random intercept (1|g)")
    state = _Explorer(fit, n)
    ml = state.fit
    start = (ml.sigma if sigma is None else float(sigma), ml.sigma_s if sigma_s is None else float(sigma_s),
             ml.params.to_numpy() if beta is None else np.asarray(beta, dtype=float))
    if interactive is None:
        interactive = _widget_frontend()
    if not interactive:
        fig = state.draw(*start)
        plt.close(fig)
        return fig
    return _widget(state, start)


def _widget(state: _Explorer, start):
    import ipywidgets as widgets
    from IPython.display import display

    ml = state.fit
    top = 3.0 * max(ml.sigma, ml.sigma_s, 1e-8)

    def slider(name, value, lo, hi):
        return widgets.FloatSlider(value=value, min=lo, max=hi, step=(hi - lo) / 200, description=name,
                                   continuous_update=False, readout_format=".4g")

    controls = {"sig": slider("sigma", start[0], top / 200, top),
                "sig_s": slider("sigma_s", start[1], 0.0, top)}
    for k, (name, value) in enumerate(zip(ml.design.fixed_names, start[2])):
        half = 4 * float(ml.bse.iloc[k]) + 1e-8
        controls[f"b{k}"] = slider(f"beta {name}"[:18], float(value), float(value) - half, float(value) + half)

    def redraw(sig, sig_s, **betas):
        fig = state.draw(sig, sig_s, [betas[f"b{k}"] for k in range(len(betas))])
        display(fig)
        plt.close(fig)

    output = widgets.interactive_output(redraw, controls)
    return widgets.VBox([widgets.HBox(list(controls.values())[:2]),
                         widgets.HBox(list(controls.values())[2:]), output])


__all__ = ["Criterion", "STATIC_ENV", "explorer", "optimiser_path", "plot_caterpillar", "plot_data",
           "plot_individual_fits", "plot_lmm_fit", "plot_loglik_surface", "plot_ols",
           "plot_profile_sigma_s"]


def _zeta_label(name: str, design: Design) -> str:
    """A parameter's name as mathtext: .sig01 -> sigma_1 (what it is beside it), .sigma -> sigma, beta_x."""
    from .inference import varpar_labels, varpar_names
    names = varpar_names(design)
    if name in names:
        what = varpar_labels(design)[names.index(name)]
        if name == ".sigma":
            return r"$\sigma$ (residual SD)"
        k = int(name[4:])
        kind, rest = what.split("_", 1)
        term, group = rest.rsplit("|", 1)
        symbol = r"\sigma" if kind == "sd" else r"\rho"
        return rf"${symbol}_{{{k}}}$ ({'SD' if kind == 'sd' else 'corr.'} {term} | {group})"
    return rf"$\beta$: {name}"


def plot_profile_zeta(fit: FitResult, profile: pd.DataFrame | None = None, level: float = 0.95, ncols: int = 3):
    """lme4's xyplot(profile(fit)): zeta(psi) = sign(psi - psi_hat) sqrt(D(psi) - D(psi_hat)) for every
    parameter, the deviance D minimised over the others (ML, as lme4 profiles). A straight line means a
    quadratic log-likelihood, where the Wald interval is right; the dashed lines at +-z_(1-alpha/2) cut out
    the profile interval. ``profile`` is ``fit.profile()`` (computed when not given). Returns the Figure."""
    prof = fit.profile() if profile is None else profile
    names = list(dict.fromkeys(prof[".par"]))
    nrows = math.ceil(len(names) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.1 * ncols, 2.6 * nrows), squeeze=False)
    z = scipy.stats.norm.ppf(1 - (1 - level) / 2)
    for ax, name in zip(axes.ravel(), names):
        sub = prof[prof[".par"] == name].sort_values("value")
        ax.plot(sub["value"], sub[".zeta"], "-o", ms=3, color="C0")
        for s in (-z, z):
            ax.axhline(s, color="0.5", ls="--", lw=0.8)
        ax.axhline(0, color="0.8", lw=0.6)
        ax.set_xlabel(_zeta_label(name, fit.design), fontsize="small")
        ax.set_ylabel(r"$\zeta$")
        ax.tick_params(labelsize="x-small")
    for ax in axes.ravel()[len(names):]:
        ax.set_visible(False)
    fig.suptitle(rf"Profile $\zeta$ of each parameter (dashed: $\pm z_{{{(1 + level) / 2:.3g}}}$ = $\pm${z:.3g})",
                 fontsize="medium")
    fig.tight_layout()
    return fig
