"""Optimisation: minimise the profiled deviance with scipy, and solve the score equations exactly with
sympy where the design is balanced.

Like lme4's ``optimizeLmer`` the numeric search is over theta = sigma_s / sigma >= 0 alone; sigma^2 and
beta follow in closed form. :class:`OptSummary` keeps the optimiser's settings, its path and its outcome in
one immutable object (as MixedModels.jl's ``OptSummary``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.optimize
import sympy as sp

from .compilation import DevianceState, ProfiledDeviance, ThetaDeviance, difference_hessian
from .statistics import GroupStatistics
from .derivation import Derivation, derive, exact_number, m, sigma, sigma_s
from .errors import NumericalError
from .specification import Design

#: lme4's tolerance for a singular (boundary) fit: theta below this counts as sigma_s = 0
SINGULAR_TOL = 1e-4
#: the derivative test for convergence (scaled response units)
GRADIENT_TOL = 1e-6


@dataclass(frozen=True)
class OptSummary:
    """The optimiser's settings, path and outcome. theta is lme4's relative covariance parameter vector
    (getME(fit, "theta")): sigma_s / sigma for (1|g), the relative Cholesky factors' entries otherwise;
    ``initial`` its start and ``path`` every point the optimiser evaluated."""

    method: str
    optimizer: str
    initial: tuple[float, ...]
    theta: tuple[float, ...]
    fmin: float
    gradient: float
    evaluations: int
    converged: bool
    at_boundary: bool
    message: str
    path: tuple[tuple[float, ...], ...] = field(repr=False, default=())


@dataclass(frozen=True)
class Optimum:
    """The numeric optimum in the response's own units (GLS beta, sigma, sigma_s)."""

    theta: float
    sigma: float
    sigma_s: float
    beta: np.ndarray
    deviance: float
    summary: OptSummary
    objective: ProfiledDeviance = field(repr=False)


def optimise(stats: GroupStatistics, reml: bool, theta0: float = 1.0) -> Optimum:
    """Minimise the profiled deviance over theta >= 0 (L-BFGS-B, analytic derivative), then polish.

    At the optimum the derivative must vanish, or be >= 0 at theta = 0 (a boundary fit); otherwise the
    fit is reported as not converged.
    """
    objective = ProfiledDeviance(stats, reml)
    path: list[float] = []

    def fun(x):
        path.append(float(x[0]))
        return objective.value_and_derivative(x)

    res = scipy.optimize.minimize(fun, x0=[theta0], jac=True, method="L-BFGS-B", bounds=[(0.0, None)],
                                  options={"ftol": 1e-15, "gtol": 1e-10, "maxiter": 500})
    th = float(res.x[0])
    if th <= 0.0:
        th, res = _off_the_boundary(objective, fun, res)
    th = _polish(objective, th)
    st = objective.state(th)
    grad = objective.derivative(st)
    at_boundary = th <= 0.0
    converged = (abs(grad) < GRADIENT_TOL * max(1.0, abs(objective.value(st)))
                 or (at_boundary and grad >= -GRADIENT_TOL))
    message = str(res.message) if converged else (
        f"the optimiser stopped with derivative {grad:.3g} at theta = {th:.6g}: {res.message}")
    summary = OptSummary(method="REML" if reml else "ML", optimizer="L-BFGS-B (scipy) + Newton polish",
                         initial=(float(theta0),), theta=(th,), fmin=objective.value(st), gradient=grad,
                         evaluations=len(path), converged=bool(converged), at_boundary=at_boundary,
                         message=message, path=tuple((t,) for t in path))
    return _in_units(objective, st, summary)


def _off_the_boundary(objective: ProfiledDeviance, fun, res):
    """theta = 0 is a stationary point of every profiled criterion (it depends on theta^2), so L-BFGS-B can
    stop there although the criterion falls moving inward (0 a maximum along theta). Scan theta on a
    log-grid; if some theta beats 0, restart from the best one."""
    best = _inward_of_the_bound(lambda t: objective(float(t[0])), np.zeros(1), np.zeros(1),
                                grid=np.geomspace(1e-6, 1e3, 46), rel=1e-12)
    if best is None:
        return 0.0, res
    res = scipy.optimize.minimize(fun, x0=best, jac=True, method="L-BFGS-B", bounds=[(0.0, None)],
                                  options={"ftol": 1e-15, "gtol": 1e-10, "maxiter": 500})
    th = float(res.x[0])
    return (th, res) if objective(th) <= objective(float(best[0])) else (float(best[0]), res)


def _polish(objective: ProfiledDeviance, th: float, steps: int = 20) -> float:
    """Safeguarded secant steps on the derivative, to reach the optimum to machine precision."""
    if th <= 0.0:
        return 0.0
    h = max(1e-6, 1e-6 * th)
    for _ in range(steps):
        g = objective.derivative(objective.state(th))
        g2 = (objective.derivative(objective.state(th + h)) - g) / h
        if not np.isfinite(g2) or g2 <= 0:
            break
        step = g / g2
        new = max(th - step, 0.0)
        if objective(new) > objective(th) + 1e-13 * max(1.0, abs(objective(th))):
            break
        if abs(new - th) <= 1e-14 * max(1.0, th):
            th = new
            break
        th = new
    return th


def _in_units(objective: ProfiledDeviance, st, summary: OptSummary) -> Optimum:
    s = objective.stats
    sig_w = np.sqrt(st.rss / objective.n_eff)
    sig = sig_w * s.scale
    beta = st.beta * s.scale + s.beta_shift
    dev = objective.value(st) + 2 * objective.n_eff * np.log(s.scale)
    return Optimum(theta=st.theta, sigma=float(sig), sigma_s=float(st.theta * sig), beta=beta,
                   deviance=float(dev), summary=summary, objective=objective)


# ------------------------------------------------------------------------------ exact estimates
def is_balanced(design: Design) -> bool:
    """Equal group sizes, and col(X) invariant under Sigma: the group means of every X column lie in col(X).

    That is what makes GLS equal OLS for every sigma, sigma_s. It holds for columns constant within groups
    and for columns with one within-group pattern (in any row order) when the intercept is in col(X); a
    within-group column without an intercept (``y ~ 0 + x + (1|g)``) breaks it.
    """
    if not design.is_random_intercept:
        return False
    codes = np.asarray(design.terms[0].codes)
    sizes = np.bincount(codes)
    if len(set(sizes.tolist())) != 1:
        return False
    X = np.asarray(design.X, dtype=float)
    sums = np.zeros((len(sizes), design.p))
    np.add.at(sums, codes, X)
    means = sums[codes] / float(sizes[0])
    coef, *_ = np.linalg.lstsq(X, means, rcond=None)
    return bool(np.allclose(X @ coef, means, rtol=0.0, atol=1e-9 * max(1.0, float(np.abs(X).max()))))


@dataclass(frozen=True)
class ExactOptimum:
    """sigma^2 and sigma_s^2 that solve the score equations exactly (sympy rationals or radicals)."""

    sigma2: sp.Expr
    sigma_s2: sp.Expr
    beta: tuple[sp.Expr, ...]


def exact_optimum(design: Design, reml: bool, derivation: Derivation | None = None) -> ExactOptimum | None:
    """Solve d log L / d(sigma^2, sigma_s^2) = 0 with sympy for a balanced design; None otherwise.

    Under balance GLS equals OLS (col(X) is invariant under Sigma), so beta is exact first. Every group
    has size m, and the block quadratic form (r^T r - w (1^T r)^2) / sigma^2 is linear in r^T r and
    (1^T r)^2, so Eq. 10 summed over groups needs only R2 = sum r^2 and S1 = sum_g (1^T r_g)^2. The
    score equations in v = sigma^2, vs = sigma_s^2 are then solved exactly; without an interior root the
    optimum is on the boundary sigma_s^2 = 0.
    """
    if not is_balanced(design):
        return None
    d = derivation or derive(design)
    X = d.X_exact
    if X is None:
        return None
    y = sp.Matrix([exact_number(v) for v in design.y])
    beta = (X.T * X).LUsolve(X.T * y)
    r = y - X * beta
    codes = np.asarray(design.terms[0].codes)
    G, size = d.groups.sizes.size, int(d.groups.sizes[0])
    R2 = sum(ri**2 for ri in r)
    S1 = sum(sp.Add(*[r[i] for i in np.flatnonzero(codes == g)]) ** 2 for g in range(G))
    blk = d.block
    n, p = design.n, design.p
    ll = (-sp.Rational(n, 2) * sp.log(2 * sp.pi) - G * blk.logdet.subs(m, size) / 2
          - blk.quadratic.subs({blk.R2: R2, blk.Zr[0, 0]: sp.sqrt(S1), m: size}) / 2)
    if reml:
        ll += -sp.log(d.gls_information.det()) / 2 + sp.Rational(p, 2) * sp.log(2 * sp.pi)
    v, vs = sp.symbols("v v_s", positive=True)
    ll = sp.expand_log(ll.subs({sigma: sp.sqrt(v), sigma_s: sp.sqrt(vs)}), force=True)
    scores = [sp.numer(sp.together(sp.diff(ll, x))) for x in (v, vs)]
    interior = [s for s in sp.solve(scores, [v, vs], dict=True)
                if sp.S(s.get(v, 0)).is_positive and sp.S(s.get(vs, 0)).is_positive]
    if interior:
        sol = interior[0]
        return ExactOptimum(sigma2=sp.nsimplify(sol[v]), sigma_s2=sp.nsimplify(sol[vs]), beta=tuple(beta))
    boundary = sp.numer(sp.together(sp.diff(ll.subs(vs, 0), v)))
    roots = [root for root in sp.solve(boundary, v) if root.is_positive]
    if not roots:
        raise NumericalError("the score equations have no positive solution")
    return ExactOptimum(sigma2=roots[0], sigma_s2=sp.Integer(0), beta=tuple(beta))


@dataclass(frozen=True)
class GeneralOptimum:
    """The optimum of a model with several random terms or slopes, in the response's units."""

    theta: np.ndarray
    sigma: float
    beta: np.ndarray
    b: np.ndarray              # conditional modes Lambda u, all terms stacked as in Z's columns
    deviance: float
    summary: OptSummary
    objective: ThetaDeviance = field(repr=False)
    state: DevianceState = field(repr=False)     # the criterion at theta (scaled response units)


def optimise_general(objective: ThetaDeviance) -> GeneralOptimum:
    """Minimise lme4's profiled deviance over theta (L-BFGS-B, analytic gradient, lme4's bounds).

    A diagonal theta at its bound 0 is a stationary point (the deviance is even in each column of T), so
    a stop there is tested by moving that theta inward, and the search restarts from any better point."""
    path: list[np.ndarray] = []

    def fun(x):
        path.append(np.array(x))
        return objective.value_and_gradient(x)

    theta0 = objective.initial()
    bounds = [(lo, None) for lo in objective.lower_bounds]
    lower = np.array([lo if lo is not None else -np.inf for lo in objective.lower_bounds])

    def search(start):
        return scipy.optimize.minimize(fun, x0=start, jac=True, method="L-BFGS-B", bounds=bounds,
                                       options={"ftol": 1e-12, "gtol": 1e-6, "maxiter": 2000})

    res = search(theta0)
    for _ in range(objective.n_theta):
        inward = _inward_of_the_bound(objective, np.array(res.x), lower)
        if inward is None:
            break
        res = search(inward)
    theta = _polish_general(objective, np.array(res.x), lower)
    st = objective.state(theta)
    grad = objective.gradient(st)
    at_bound = theta <= lower + 1e-12
    free = np.where(at_bound, np.minimum(grad, 0.0), grad)   # a bound may hold a positive derivative
    scale = max(1.0, abs(objective.value(st)))
    converged = bool(np.max(np.abs(free), initial=0.0) < 1e-4 * scale)
    message = str(res.message) if converged else (
        f"the optimiser stopped with projected gradient {np.max(np.abs(free)):.3g}: {res.message}")
    summary = OptSummary(method="REML" if objective.reml else "ML", optimizer="L-BFGS-B (scipy)",
                         initial=tuple(map(float, theta0)), theta=tuple(map(float, theta)),
                         fmin=objective.value(st), gradient=float(np.max(np.abs(free), initial=0.0)),
                         evaluations=len(path), converged=converged, at_boundary=bool(at_bound.any()),
                         message=message, path=tuple(tuple(map(float, p)) for p in path))
    k = objective.scale
    dev = objective.value(st) + 2 * objective.n_eff * np.log(k)
    return GeneralOptimum(theta=theta, sigma=float(np.sqrt(st.rss / objective.n_eff) * k),
                          beta=st.beta * k + objective.beta_shift, b=st.b * k, deviance=float(dev),
                          summary=summary, objective=objective, state=st)


def _polish_general(objective: ThetaDeviance, theta: np.ndarray, lower: np.ndarray, steps: int = 10) -> np.ndarray:
    """Chord-Newton steps theta_f -= H_ff^-1 g_f(theta) on the thetas off their bounds, H the Hessian at the
    start (central differences of the analytic gradient, positive definite at a minimum). L-BFGS-B stops
    ~1e-8 short of the optimum, at a point that moves with the rounding of the data's sums; from there each
    step gains ~6 digits. A step is kept while |g_f| falls (there the criterion's changes, ~1e-16, are below
    its rounding) and the criterion does not rise by more than its rounding could."""
    free = np.flatnonzero(theta > lower + 1e-12)
    if not len(free):
        return theta
    try:
        H = difference_hessian(lambda th: objective.gradient(objective.state(th)), theta)[np.ix_(free, free)]
        np.linalg.cholesky(H)
        st = objective.state(theta)
        f, g = objective.value(st), objective.gradient(st)[free]
        for _ in range(steps):
            new = theta.copy()
            new[free] = np.maximum(theta[free] - np.linalg.solve(H, g), lower[free])
            st = objective.state(new)
            f_new, g_new = objective.value(st), objective.gradient(st)[free]
            if not (np.linalg.norm(g_new) < np.linalg.norm(g) and f_new <= f + 1e-10 * max(1.0, abs(f))):
                break
            theta, f, g = new, f_new, g_new
    except (np.linalg.LinAlgError, NumericalError):
        pass
    return theta


def _inward_of_the_bound(objective, theta: np.ndarray, lower: np.ndarray, grid=np.geomspace(1e-4, 10.0, 16),
                         rel: float = 1e-10) -> np.ndarray | None:
    """The best point found by moving one theta that sits at its bound inward along ``grid``, when it beats
    theta by more than ``rel`` (relative); None when none does."""
    f0 = objective(theta)
    best, best_f = None, f0 - rel * max(1.0, abs(f0))
    for i in np.flatnonzero(theta <= lower + 1e-12):
        for t in grid:
            trial = theta.copy()
            trial[i] = t
            f = objective(trial)
            if f < best_f:
                best, best_f = trial, f
    return best
