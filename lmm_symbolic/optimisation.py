r"""Optimisation: minimise the one profiled deviance with scipy, and solve the score equations exactly with
sympy where the design is balanced.

Like lme4's ``optimizeLmer`` the numeric search is over :math:`\theta` alone (:math:`\sigma_s / \sigma` for
(1|g), the relative covariance factors' entries otherwise); :math:`\sigma^2` and :math:`\beta` follow in closed
form. One :math:`\theta`: Newton with the analytic second derivative; several: Newton in a trust region
with the analytic Hessian (every evaluation of the deviance has one), and where that does not reach a
stationary point L-BFGS-B with the analytic gradient over unconstrained :math:`\theta`, made canonical and
polished. :class:`OptSummary` keeps the optimiser's settings, its path and its outcome in one immutable
object (as MixedModels.jl's ``OptSummary``).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import scipy.optimize
import sympy as sp

from .compilation import DevianceState, ThetaDeviance, difference_hessian
from .derivation import m, random_intercept_block, sigma, sigma_s
from .errors import NumericalError
from .specification import Design

#: lme4's tolerance for a singular (boundary) fit: :math:`\theta` below this counts as :math:`\sigma_s = 0`
SINGULAR_TOL = 1e-4
#: the derivative test for convergence: the projected gradient below this times max(1, |deviance|)
GRADIENT_TOL = 1e-4


@dataclass(frozen=True)
class OptSummary:
    r"""The optimiser's settings, path and outcome. :math:`\theta` is lme4's relative covariance parameter
    vector (``getME(fit, "theta")``): :math:`\sigma_s / \sigma` for (1|g), the relative Cholesky factors' entries
    otherwise; ``initial`` its start and ``path`` every point the optimiser evaluated."""

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


# ------------------------------------------------------------------------------ exact estimates
def is_balanced(design: Design) -> bool:
    r"""Equal group sizes, and :math:`\operatorname{col}(X)` invariant under :math:`\Sigma`: the group means of
    every :math:`X` column lie in :math:`\operatorname{col}(X)`.

    That is what makes GLS equal OLS for every :math:`\sigma, \sigma_s`. It holds for columns constant within
    groups and for columns with one within-group pattern (in any row order) when the intercept is in
    :math:`\operatorname{col}(X)`; a within-group column without an intercept (``y ~ 0 + x + (1|g)``) breaks
    it."""
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
    r""":math:`\sigma^2` and :math:`\sigma_s^2` that solve the score equations exactly (sympy rationals)."""

    sigma2: sp.Expr
    sigma_s2: sp.Expr
    beta: tuple[sp.Expr, ...]


#: the exact step's bounds, decided from the data's size before any exact arithmetic: at most this many
#: data values (:math:`n (p + 1)`) and digits in their exact rationals (numerators and denominators). "auto" (a
#: fit's default) stays within a few milliseconds; ``exact=True`` allows about a second.
EXACT_LIMITS = {"auto": (2_000, 40_000), "requested": (30_000, 400_000)}


@functools.lru_cache(maxsize=None)
def balanced_score_solution(reml: bool):
    r"""The score equations of a balanced random-intercept model, solved once by sympy in closed form.

    Every group has size :math:`m`, so :math:`\Sigma_g = \sigma^2 I + \sigma_s^2 J` has two eigenvalues:
    :math:`v = \sigma^2` (:math:`m - 1` times) and :math:`\lambda = \sigma^2 + m \sigma_s^2` (once). With
    :math:`R_2 = r^\top r` and :math:`S_1 = \sum_g (\mathbf{1}^\top r_g)^2` at the OLS residuals (GLS = OLS
    under balance), Eq. 10 summed over the :math:`G` groups is, after :math:`v_s = (\lambda - v)/m`,

    .. math::

        \log L = -\frac{n}{2} \log 2\pi - \frac{G}{2} \log|\Sigma_g| - \frac{R_2 - w S_1}{2 v},
        \qquad w = \sigma_s^2 / \lambda,

    which separates into a function of :math:`v` and one of :math:`\lambda`. REML adds
    :math:`-\frac12 \log|X^\top \Sigma^{-1} X|`, which under balance is
    :math:`\frac{p_w}{2} \log v + \frac{p_b}{2} \log\lambda + \text{const}` (:math:`X`'s columns split into
    :math:`p_b` between-group and :math:`p_w` within-group directions). Each score equation is then solved
    in its own variable. Returns :math:`(v, v_s)` at the interior root and :math:`v` on the boundary
    :math:`v_s = 0`, as expressions in :math:`R_2, S_1, n, G, m, p_w, p_b`.
    """
    block = random_intercept_block()
    v, lam, vs = sp.symbols("v lambda v_s", positive=True)
    R2, S1, n, G, pw, pb = sp.symbols("R2 S1 n G p_w p_b", positive=True)
    at = {sigma: sp.sqrt(v), sigma_s: sp.sqrt(vs)}
    logdet = sp.expand_log(block.logdet.subs(at), force=True)
    quad = block.quadratic.subs({block.R2: R2, block.Zr[0, 0]: sp.sqrt(S1)}).subs(at)
    ll = -n / 2 * sp.log(2 * sp.pi) - G / 2 * logdet - quad / 2
    if reml:
        ll += pw / 2 * sp.log(v) + pb / 2 * sp.log(v + m * vs)
    boundary_ll = ll.subs(vs, 0)
    ll = sp.expand_log(ll.subs(vs, (lam - v) / m), force=True)
    if sp.simplify(sp.diff(ll, v, lam)) != 0:
        raise AssertionError("the balanced log-likelihood does not separate in v and lambda")
    v_hat = sp.solve(sp.numer(sp.together(sp.diff(ll, v))), v)
    lam_hat = sp.solve(sp.numer(sp.together(sp.diff(ll, lam))), lam)
    v0 = sp.solve(sp.numer(sp.together(sp.diff(boundary_ll, v))), v)
    if not (len(v_hat) == len(lam_hat) == len(v0) == 1):
        raise AssertionError("the balanced score equations have no unique root")
    symbols = (R2, S1, n, G, m, pw, pb)
    return symbols, v_hat[0], sp.simplify((lam_hat[0] - v_hat[0]) / m), v0[0]


def _fractions(values: np.ndarray) -> list[Fraction]:
    """The rationals the values' decimal texts state, as :func:`exact_number` reads them (14 digits)."""
    return [Fraction(int(v)) if v.is_integer() else Fraction(f"{v:.14g}")
            for v in np.asarray(values, dtype=float).ravel().tolist()]


def _digits(values: np.ndarray) -> int:
    """About how many decimal digits the values' exact rationals hold (numerators and denominators),
    from their sizes alone: an integer its own digits, any other value its 14 significant digits over a
    power of ten."""
    v = np.abs(np.asarray(values, dtype=float).ravel())
    whole = v == np.round(v)
    size = np.floor(np.log10(np.maximum(v, 1.0))) + 1
    return int(np.sum(np.where(whole, size, 14 + np.maximum(0, 14 - size))))


def _exact_sums(yq: list[Fraction], Xq: list[list[Fraction]], codes: np.ndarray, G: int):
    """The OLS beta, R2 = r^T r and S1 = sum_g (1^T r_g)^2 in exact rationals."""
    p = len(Xq[0])
    XtX = sp.Matrix(p, p, lambda a, b: sp.Rational(sum(r[a] * r[b] for r in Xq)))
    Xty = sp.Matrix(p, 1, lambda a, _: sp.Rational(sum(r[a] * yi for r, yi in zip(Xq, yq))))
    beta = XtX.LUsolve(Xty)
    bq = [Fraction(int(b.p), int(b.q)) for b in beta]
    r = [yi - sum(x * b for x, b in zip(row, bq)) for row, yi in zip(Xq, yq)]
    group_sums = [Fraction(0)] * G
    for ri, g in zip(r, codes.tolist()):
        group_sums[g] += ri
    return tuple(beta), sum(ri * ri for ri in r), sum(s * s for s in group_sums)


def exact_optimum(design: Design, reml: bool, bound: str = "auto") -> tuple[ExactOptimum | None, str | None]:
    r"""The exact ML/REML estimates of a balanced random-intercept design, with the reason when there are
    none: (ExactOptimum, None) or (None, reason).

    Under balance GLS equals OLS (:math:`\operatorname{col}(X)` is invariant under :math:`\Sigma`), so
    :math:`\hat\beta`, :math:`R_2` and :math:`S_1` are exact rationals first, and
    :func:`balanced_score_solution` gives :math:`\sigma^2` and :math:`\sigma_s^2` as
    rational functions of them: the cost is that of the rational arithmetic, decided from the data's
    digits before any is done. Without an interior root (:math:`v_s \le 0`) the optimum is on the boundary
    :math:`\sigma_s^2 = 0`."""
    if not design.is_random_intercept:
        return None, "exact estimates are derived for one random intercept (1|g)"
    if design.weights is not None or design.offset is not None:
        return None, "exact estimates are not derived with prior weights or an offset"
    if not is_balanced(design):
        return None, ("the design is not balanced (unequal group sizes, or GLS differs from OLS): the score "
                      "equations have no closed-form root")
    max_values, max_digits = EXACT_LIMITS[bound]
    values = design.n * (design.p + 1)
    digits = _digits(design.y) + _digits(design.X)
    if values > max_values or digits > max_digits:
        hint = "; fit(..., exact=True) allows more" if bound == "auto" else ""
        return None, (f"the exact step is bounded to {max_values} data values and {max_digits} digits of their "
                      f"exact rationals; these data have {values} values and about {digits} digits{hint}")
    codes = np.asarray(design.terms[0].codes)
    sizes = np.bincount(codes)
    G, size, n, p = len(sizes), int(sizes[0]), design.n, design.p
    yq, flat = _fractions(design.y), _fractions(design.X)
    Xq = [flat[i * p:(i + 1) * p] for i in range(n)]
    beta, R2, S1 = _exact_sums(yq, Xq, codes, G)
    # between-group directions of col(X): the rank of the group means of X
    means = np.zeros((G, p))
    np.add.at(means, codes, np.asarray(design.X, dtype=float))
    pb = int(np.linalg.matrix_rank(means / size)) if reml else 0
    pw = (p - pb) if reml else 0
    symbols, v_hat, vs_hat, v_boundary = balanced_score_solution(reml)
    values = dict(zip(symbols, (sp.Rational(R2), sp.Rational(S1), n, G, size, pw, pb)))
    vs = sp.Rational(vs_hat.subs(values))
    if vs > 0:
        return ExactOptimum(sigma2=sp.Rational(v_hat.subs(values)), sigma_s2=vs, beta=beta), None
    v0 = sp.Rational(v_boundary.subs(values))
    if v0 <= 0:
        return None, "the score equations have no positive solution (the response is fitted exactly)"
    return ExactOptimum(sigma2=v0, sigma_s2=sp.Integer(0), beta=beta), None


@dataclass(frozen=True)
class Optimum:
    r"""The optimum of the profiled deviance, in the response's units: lme4's :math:`\theta`, :math:`\sigma`,
    the GLS :math:`\hat\beta` and the conditional modes :math:`b = \Lambda u` (all terms stacked as in
    :math:`Z`'s columns)."""

    theta: np.ndarray
    sigma: float
    beta: np.ndarray
    b: np.ndarray
    deviance: float
    summary: OptSummary
    objective: ThetaDeviance = field(repr=False)
    state: DevianceState = field(repr=False)     # the criterion at theta (scaled response units)
    #: the Hessian of the profiled deviance at :math:`\theta` (scaled units): analytic, except for the sparse
    #: evaluation with a singular :math:`T` (a boundary fit), where it is central differences of the gradient
    hessian: np.ndarray = field(repr=False, default=None)


def optimise(objective: ThetaDeviance) -> Optimum:
    r"""Minimise lme4's profiled deviance over :math:`\theta` within lme4's bounds (the diagonal entries of
    each :math:`T_k` are :math:`\ge 0`).

    One :math:`\theta` (a random intercept, a kinship matrix, one scalar term): Newton's method on
    :math:`d'(\theta) = 0` with the analytic second derivative where the criterion has one
    (:meth:`InterceptDeviance.hessian`), safeguarded by backtracking. Several: Newton in a trust region
    with the analytic Hessian (:meth:`BlockDeviance.hessian`, :meth:`DenseDeviance.hessian`,
    :meth:`SparseDeviance.hessian`), else L-BFGS-B with the analytic gradient, then chord-Newton polishing.
    A diagonal :math:`\theta` at its bound 0 is a stationary point (the deviance is even in each column of
    :math:`T_k`), so a stop there is tested by moving that :math:`\theta` inward, and the search restarts
    from any better point."""
    path: list[np.ndarray] = []
    theta0 = objective.initial()
    lower = np.array([lo if lo is not None else -np.inf for lo in objective.lower_bounds])
    if objective.n_theta == 1:
        theta, message = _minimise_scalar(objective, float(theta0[0]), path)
        optimizer = "Newton (analytic second derivative)" if hasattr(objective, "hessian") else "Newton (secant)"
        st = objective.state(theta)
        H = (objective.hessian(st) if hasattr(objective, "hessian")
             else difference_hessian(lambda th: objective.gradient(objective.state(th)), theta))
    else:
        theta, message, H, optimizer, st = _minimise_several(objective, theta0, lower, path)
        st = _state(objective, theta) if st is None else st
    at_bound = theta <= lower + 1e-12
    projected = _projected_gradient(objective, st, theta, lower)
    converged = bool(projected < GRADIENT_TOL * max(1.0, abs(objective.value(st))))
    if not converged:
        message = f"the optimiser stopped with projected gradient {projected:.3g}: {message}"
    summary = OptSummary(method="REML" if objective.reml else "ML", optimizer=optimizer,
                         initial=tuple(map(float, theta0)), theta=tuple(map(float, theta)),
                         fmin=objective.value(st), gradient=projected,
                         evaluations=len(path), converged=converged, at_boundary=bool(at_bound.any()),
                         message=message, path=tuple(tuple(map(float, p)) for p in path))
    k = objective.scale
    dev = objective.value(st) + 2 * objective.n_eff * np.log(k)
    return Optimum(theta=theta, sigma=float(np.sqrt(st.rss / objective.n_eff) * k),
                   beta=st.beta * k + objective.beta_shift, b=st.b * k, deviance=float(dev),
                   summary=summary, objective=objective, state=st, hessian=H)


def _minimise_scalar(objective: ThetaDeviance, t: float, path: list) -> tuple[np.ndarray, str]:
    """Safeguarded Newton on d'(theta) = 0 over theta >= 0: the step -d'/d'' where d'' > 0 (else a step
    downhill of the current size), halved until the criterion does not rise, and never past 0 (a step
    that would cross it goes a tenth of the way there; an even criterion's quadratic model lands on 0
    itself). At a stop on 0 the grid inward is scanned and the search restarted from any better point."""
    hessian = getattr(objective, "hessian", None)

    def evaluate(x):
        """The state, value and derivative at x; a value of inf where the criterion cannot be evaluated
        (theta so large that sigma^2 -> 0 leaves X^T V^-1 X or RSS at rounding), so the step backs off."""
        path.append(np.array([x]))
        try:
            st = objective.state([x])
            return st, objective.value(st), float(objective.gradient(st)[0])
        except NumericalError:
            return None, np.inf, np.nan

    def curvature(x, st, g):
        if hessian is not None:
            return float(hessian(st)[0, 0])
        h = 1e-6 * max(x, 1e-3)
        return (float(objective.gradient(objective.state([x + h]))[0]) - g) / h

    def newton(x):
        st, f, g = evaluate(x)
        if st is None:
            raise NumericalError(f"the profiled criterion cannot be evaluated at theta = {x:g}")
        for _ in range(100):
            if g == 0.0:
                return x, "converged: d'(theta) = 0"
            h = curvature(x, st, g)
            step = -g / h if h > 0 else -np.sign(g) * max(x, 0.1)
            new = x + step if x + step >= 0 else (0.0 if x < 1e-10 else 0.1 * x)
            for _ in range(40):
                st_new, f_new, g_new = evaluate(new)
                if f_new <= f + 1e-13 * max(1.0, abs(f)):
                    break
                if abs(new - x) <= 1e-9 * max(x, 1e-6):
                    return x, "converged: the Newton step is below the criterion's rounding"
                new = 0.5 * (x + new)
            else:
                return x, "no descent along the Newton direction"
            done = abs(new - x) <= 1e-14 * max(x, 1e-6)
            x, st, f, g = new, st_new, f_new, g_new
            if done:
                return x, "converged: the Newton step is at machine precision"
        return x, "iteration limit (100 Newton steps)"

    x, message = newton(t)
    if x <= 1e-8:
        inward = _inward_of_the_bound(objective, np.array([0.0]), np.zeros(1), grid=np.geomspace(1e-4, 1e2, 13),
                                      rel=1e-12)
        if inward is not None:
            x2, message2 = newton(float(inward[0]))
            if objective([x2]) < objective([x]):
                x, message = x2, message2 + "; restarted inward of theta = 0"
    return np.array([x]), message


def _newton(objective: ThetaDeviance, x: np.ndarray, path: list, max_steps: int = 100):
    r"""Newton's method on the unconstrained :math:`\theta` with the analytic Hessian, in a trust region.
    With :math:`D = \operatorname{diag}|H|^{1/2}` (so nothing depends on :math:`\theta`'s scale) and the
    eigen-decomposition :math:`D^{-1} H D^{-1} = V \operatorname{diag}(\mu) V^\top`, the step is
    :math:`s = -D^{-1} V \operatorname{diag}(1/|\mu|) V^\top D^{-1} g` -- the Newton step where :math:`H` is
    positive definite, a descent direction of the same scale where it is not (far from the optimum the
    profiled deviance is not convex) -- shortened to :math:`\|s\|_\infty \le \Delta`. A step that lowers the
    criterion is taken (and :math:`\Delta` doubled if the step was cut); one that does not quarters
    :math:`\Delta` below the step's length; a cut step that would put a diagonal :math:`\theta` on 0
    (stationary in its column: Newton could not leave it) is shortened by a tenth. Stops when a step no
    longer lowers the criterion beyond its rounding and the Newton decrement :math:`-g^\top s` is below
    :math:`10^{-10}` (relative), or the step is at machine precision. Returns (theta, message, converged,
    the state at theta)."""
    def evaluate(x):
        path.append(np.array(x))
        try:
            st = objective.state(x)
            return st, objective.value(st)
        except NumericalError:
            return None, np.inf

    st, f = evaluate(x)
    if st is None:
        return x, "the criterion cannot be evaluated at the start", False, None
    radius = 1.0
    diagonal = np.array([lo is not None for lo in objective.lower_bounds])
    for _ in range(max_steps):
        g, H = objective.gradient(st), objective.hessian(st)
        if not (np.all(np.isfinite(H)) and np.all(np.isfinite(g))):
            return x, "the Hessian cannot be evaluated", False, st
        d = np.sqrt(np.maximum(np.abs(np.diag(H)), 1e-300))
        eig, V = np.linalg.eigh(H / np.outer(d, d))
        convex = bool(np.all(eig > 0))
        mu = np.maximum(np.abs(eig), 1e-10 * max(float(np.max(np.abs(eig))), 1e-300))
        full = -(V @ ((V.T @ (g / d)) / mu)) / d
        decrement = -float(g @ full)
        while True:
            size = float(np.max(np.abs(full)))
            step = full if size <= radius else full * (radius / size)
            if size > radius and np.any(diagonal & (np.abs(x + step) < 1e-6 * np.maximum(np.abs(x), 1e-3))):
                step = 0.9 * step       # a cut step never onto 0: theta = 0 is stationary in its column
            st_new, f_new = evaluate(x + step)
            if f_new <= f + 1e-13 * max(1.0, abs(f)):
                break
            if convex and decrement <= 1e-10 * max(1.0, abs(f)):
                return x, "converged: the Newton decrement is below the criterion's rounding", True, st
            radius = min(radius, size) / 4.0
            if radius < 1e-12 * max(1.0, float(np.max(np.abs(x)))):
                return x, "no descent along the Newton direction", False, st
        if size > radius:
            radius *= 2.0
        x_new = x + step
        small = np.max(np.abs(x_new - x)) <= 1e-12 * max(1.0, float(np.max(np.abs(x))))
        x, st, f = x_new, st_new, f_new
        if small or (convex and size <= radius and decrement <= 1e-10 * max(1.0, abs(f))):
            return x, "converged: Newton steps with the analytic Hessian", True, st
    return x, f"iteration limit ({max_steps} Newton steps)", False, st


def _minimise_several(objective: ThetaDeviance, theta0: np.ndarray, lower: np.ndarray, path: list):
    """L-BFGS-B (analytic gradient) over unconstrained theta, then lme4's canonical form, a retest of each
    theta on its bound, a second start in standardised slope coordinates where lme4's are badly
    conditioned, and polishing.

    The deviance depends on each T only through T T^T, which a change of sign of a whole column of T leaves
    alone; so every lower-triangular T is admissible, the search needs no bounds (a projected search stalls
    on a face where a diagonal theta touched 0 early), and its result is made canonical afterwards: each
    column with a negative diagonal changes sign, and a diagonal within rounding of 0 is put on the bound
    when the deviance does not rise (lme4's boundary fit)."""

    if hasattr(objective, "hessian"):
        found = _newton_several(objective, theta0, lower, path)
        if found is not None:
            theta, message, H, st = found
            return theta, message, H, "Newton (analytic Hessian), trust region", st
    quasi = "L-BFGS-B (scipy) + chord-Newton polish"
    bounds = [(lo, None) for lo in objective.lower_bounds]

    def fun(x):
        path.append(np.array(x))
        try:
            st = _state(objective, x)
            return objective.value(st), objective.gradient(st)
        except NumericalError:          # theta where X^T V^-1 X or M lost definiteness in rounding: back off
            return np.inf, np.zeros_like(x)

    def search(start):
        res = scipy.optimize.minimize(fun, x0=start, jac=True, method="L-BFGS-B",      # polished below
                                      options={"ftol": 1e-10, "gtol": 1e-6, "maxiter": 2000})
        return _canonical(objective, np.asarray(res.x)), res

    def bounded(start):
        res = scipy.optimize.minimize(fun, x0=start, jac=True, method="L-BFGS-B", bounds=bounds,
                                      options={"ftol": 1e-12, "gtol": 1e-6, "maxiter": 2000})
        return np.asarray(res.x), res

    def raw():
        theta, res = search(theta0)
        # an unconstrained search stops at an exact 0 only where it began on one (theta = 0 is stationary in
        # its column): then each such theta is moved inward, and the search restarted from a better point
        for _ in range(objective.n_theta):
            inward = _inward_of_the_bound(objective, theta, lower)
            if inward is None:
                break
            theta, res = search(inward)
        theta = _on_the_bounds(objective, theta, lower)
        if not _stationary(objective, theta, lower):
            # badly conditioned coordinates can stall the free search short of an optimum on a bound, which
            # a projected search reaches along the bound
            other, res2 = bounded(theta0)
            if _value(objective, other) < _value(objective, theta):
                theta, res = other, res2
        return theta, res

    standard = _standardising_map(objective)
    if standard is not None and standard.poorly_centred:
        # a slope whose covariate sits far from 0 (or on another scale) makes lme4's theta badly conditioned:
        # the search runs in the coordinates of centred and scaled slope columns, lme4's only if that fails
        first = standard.minimise(objective, theta0, bounds, path)
        if first is not None:
            theta = _on_the_bounds(objective, first, lower)
            if not np.any(theta <= lower + 1e-12):
                theta, H = _polish_general(objective, theta, lower)
                if H is not None:
                    return theta, "converged in centred and scaled slope coordinates", H, quasi, None
        theta, res = raw()
        message = str(res.message)
        if first is not None and _value(objective, first) < _value(objective, theta):
            kept, H = _polish_general(objective, first, lower)
            return kept, f"{message}; centred and scaled slope coordinates better", H, quasi, None
    else:
        theta, res = raw()
        message = str(res.message)
        if standard is not None and (np.any(theta <= lower + 1e-12) or not res.success) \
                and not _stationary(objective, theta, lower):
            # a second start, in the coordinates of centred and scaled slope columns
            second = standard.minimise(objective, theta0, bounds, path)
            if second is not None and _value(objective, second) < _value(objective, theta):
                theta, message = second, f"{message}; second start in centred and scaled slope coordinates"
    theta, H = _polish_general(objective, theta, lower)
    return theta, message, H, quasi, None


def _newton_several(objective: ThetaDeviance, theta0: np.ndarray, lower: np.ndarray, path: list):
    """Newton (:func:`_newton`) from lme4's start mapped to centred and scaled slope coordinates (the same
    covariance, better scaled), made canonical, diagonal thetas within rounding of 0 put on their bound.
    A theta on its bound whose curvature there is not positive may be a saddle of the even criterion
    (theta = 0 is stationary in its column): the grid inward is scanned and Newton restarted from any better
    point. Returns (theta, message, Hessian) when the result is stationary, None otherwise (then the
    quasi-Newton search runs instead)."""
    standard = _standardising_map(objective)
    start = np.asarray(theta0, dtype=float) if standard is None else standard.theta(np.asarray(theta0, float))
    for _ in range(objective.n_theta + 1):
        found, message, ok, st = _newton(objective, start, path)
        if not ok:
            return None
        theta = _on_the_bounds(objective, _canonical(objective, found), lower)
        try:
            if not np.array_equal(theta, found):
                st = objective.state(theta)
            H = objective.hessian(st)
        except NumericalError:
            return None
        flat = (theta <= lower + 1e-12) & (np.diag(H) <= 1e-8 * max(1.0, float(np.max(np.abs(np.diag(H))))))
        inward = _inward_of_the_bound(objective, theta, lower, which=flat) if flat.any() else None
        if inward is None:
            break
        start = inward
    if _projected_gradient(objective, st, theta, lower) >= GRADIENT_TOL * max(1.0, abs(objective.value(st))):
        return None
    return theta, message, H, st


def _state(objective: ThetaDeviance, theta) -> DevianceState:
    """The criterion's state at theta, remembering the last one: the search, the checks after it and the
    polish ask for the same point several times (a large crossed design pays ~0.1 s per evaluation)."""
    theta = np.asarray(theta, dtype=float)
    last = getattr(objective, "_last_state", None)
    if last is not None and last[0].shape == theta.shape and np.array_equal(last[0], theta):
        return last[1]
    st = objective.state(theta)
    objective._last_state = (theta.copy(), st)
    return st


def _projected_gradient(objective: ThetaDeviance, st: DevianceState, theta: np.ndarray, lower: np.ndarray) -> float:
    """max |gradient| at theta, projected on the bounds (a bound may hold a positive derivative)."""
    grad = objective.gradient(st)
    free = np.where(theta <= lower + 1e-12, np.minimum(grad, 0.0), grad)
    return float(np.max(np.abs(free), initial=0.0))


def _stationary(objective: ThetaDeviance, theta: np.ndarray, lower: np.ndarray) -> bool:
    """The projected gradient at theta within the convergence test."""
    try:
        st = _state(objective, theta)
        return _projected_gradient(objective, st, theta, lower) < GRADIENT_TOL * max(1.0, abs(objective.value(st)))
    except NumericalError:
        return False


def _value(objective, theta) -> float:
    """The criterion at theta, inf where it cannot be evaluated (definiteness lost in rounding)."""
    try:
        return float(objective.value(_state(objective, theta)))
    except NumericalError:
        return np.inf


def _canonical(objective: ThetaDeviance, theta: np.ndarray) -> np.ndarray:
    """lme4's form of the same T T^T: each column of each T with a negative diagonal changes sign."""
    out, k = theta.copy(), 0
    for lay in objective.layouts:
        idx = {rc: k + j for j, rc in enumerate(lay.theta_index)}
        for c in range(lay.q):
            if out[idx[c, c]] < 0:
                for r in range(c, lay.q):
                    out[idx[r, c]] = -out[idx[r, c]]
        k += len(lay.theta_index)
    return out


def _on_the_bounds(objective: ThetaDeviance, theta: np.ndarray, lower: np.ndarray, tol: float = 1e-5) -> np.ndarray:
    """Diagonal thetas within ``tol`` of their bound 0 set on it, one at a time, where the deviance does not
    rise beyond its rounding (an unconstrained search only approaches a boundary optimum)."""
    near = np.flatnonzero(np.isfinite(lower) & (theta - lower < tol) & (theta != lower))
    if not len(near):
        return theta
    f = _value(objective, theta)
    for i in near:
        trial = theta.copy()
        trial[i] = lower[i]
        f_trial = _value(objective, trial)
        if f_trial <= f + 1e-10 * max(1.0, abs(f)):
            theta, f = trial, f_trial
    return theta


@dataclass(frozen=True)
class StandardisingMap:
    r""":math:`\theta` of the slope columns centred and scaled, as a map to lme4's :math:`\theta`.

    For a term (1 + z | g), :math:`Z' = Z A` with :math:`z' = (z - \bar z) / \operatorname{sd}(z)` gives the
    same model with :math:`b = A b'`, so :math:`\operatorname{Cov}(b) = \sigma^2 (A T')(A T')^\top` and lme4's
    :math:`T` is the lower Cholesky factor of that: :math:`\theta` = its entries. The deviance is unchanged;
    only the optimiser's coordinates are better conditioned."""

    A: tuple                         # per term: A (q x q), or None for the identity
    layouts: tuple
    poorly_centred: bool

    def theta(self, phi: np.ndarray) -> np.ndarray:
        out, k = [], 0
        for A, lay in zip(self.A, self.layouts):
            width = len(lay.theta_index)
            block = phi[k:k + width]
            k += width
            if A is None:
                out.append(block)
                continue
            T1 = np.zeros((lay.q, lay.q))
            for v, (r, c) in zip(block, lay.theta_index):
                T1[r, c] = v
            R = np.linalg.qr((A @ T1).T, mode="r")           # (A T')^T = Q R  ->  (A T')(A T')^T = R^T R
            T = R.T * np.where(np.diag(R) < 0, -1.0, 1.0)    # the lower factor with a non-negative diagonal
            out.append(np.array([T[r, c] for r, c in lay.theta_index]))
        return np.concatenate(out)

    def jacobian(self, phi: np.ndarray) -> np.ndarray:
        r""":math:`\partial\theta / \partial\varphi` by central differences of the (cheap, smooth) map."""
        h = 1e-7 * np.maximum(1.0, np.abs(phi))
        cols = [(self.theta(phi + h[i] * e) - self.theta(phi - h[i] * e)) / (2 * h[i])
                for i, e in enumerate(np.eye(len(phi)))]
        return np.column_stack(cols)

    def minimise(self, objective, phi0: np.ndarray, bounds, path: list) -> np.ndarray | None:
        def fun(phi):
            th = self.theta(phi)
            path.append(th)
            try:
                f, g = objective.value_and_gradient(th)
            except NumericalError:
                return np.inf, np.zeros_like(phi)
            return f, self.jacobian(phi).T @ g

        try:
            res = scipy.optimize.minimize(fun, x0=phi0, jac=True, method="L-BFGS-B", bounds=bounds,
                                          options={"ftol": 1e-12, "gtol": 1e-6, "maxiter": 2000})
        except (NumericalError, np.linalg.LinAlgError):
            return None
        return self.theta(np.asarray(res.x)) if np.isfinite(res.fun) else None


def _standardising_map(objective: ThetaDeviance) -> StandardisingMap | None:
    """The map for the terms with an intercept and slope columns (None when no term has one). The columns'
    means and SDs come from Z, or for data held out of memory (Dask) from the per-group sums Z_g^T Z_g, so
    that both start the search at the same point."""
    mats, poor = [], False
    stats = getattr(objective.design, "statistics", None)
    offset = 0
    for term, lay in zip(objective.design.terms, objective.layouts):
        Z, first = term.Z, offset
        offset += lay.q
        if lay.q < 2 or term.names[0] != "(Intercept)":
            mats.append(None)
            continue
        if isinstance(Z, np.ndarray):
            mean, sd = Z.mean(axis=0), Z.std(axis=0)
            ones = not np.any(np.abs(Z[:, 0] - 1.0) > 0)
        elif isinstance(getattr(stats, "S", None), np.ndarray) and stats.S.ndim == 3:
            G = stats.S[:, first:first + lay.q, first:first + lay.q].sum(axis=0)    # sum_g Z_g^T Z_g
            n = objective.design.n
            mean = G[0] / n
            sd = np.sqrt(np.maximum(np.diag(G) / n - mean**2, 0.0))
            ones = G[0, 0] == n
        else:
            mats.append(None)
            continue
        if np.any(sd[1:] <= 0) or not ones:
            mats.append(None)
            continue
        A = np.eye(lay.q)
        A[0, 1:] = -mean[1:] / sd[1:]
        A[np.arange(1, lay.q), np.arange(1, lay.q)] = 1.0 / sd[1:]
        poor |= bool(np.any(np.abs(mean[1:]) > 10 * sd[1:]) or np.any((sd[1:] > 1e3) | (sd[1:] < 1e-3)))
        mats.append(A)
    if all(A is None for A in mats):
        return None
    return StandardisingMap(A=tuple(mats), layouts=objective.layouts, poorly_centred=poor)


def _polish_general(objective: ThetaDeviance, theta: np.ndarray, lower: np.ndarray,
                    steps: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Chord-Newton steps theta_f -= H_ff^-1 g_f(theta) on the thetas off their bounds, H the Hessian at the
    start (the criterion's analytic one, else central differences of the analytic gradient; positive
    definite at a minimum). L-BFGS-B stops
    ~1e-8 short of the optimum, at a point that moves with the rounding of the data's sums; from there each
    step gains ~6 digits. A step is kept while |g_f| falls (there the criterion's changes, ~1e-16, are below
    its rounding) and the criterion does not rise by more than its rounding could. Returns theta and H (which
    Satterthwaite's df reuse: it moves by less than its own differencing error over these steps)."""
    try:
        H = (objective.hessian(_state(objective, theta)) if hasattr(objective, "hessian")
             else difference_hessian(lambda th: objective.gradient(objective.state(th)), theta))
    except NumericalError:              # a neighbour of theta lost definiteness in rounding
        return theta, None
    free = np.flatnonzero(theta > lower + 1e-12)
    if not len(free):
        return theta, H
    try:
        Hf = H[np.ix_(free, free)]
        np.linalg.cholesky(Hf)
        st = _state(objective, theta)
        f, g = objective.value(st), objective.gradient(st)[free]
        for _ in range(steps):
            new = theta.copy()
            new[free] = np.maximum(theta[free] - np.linalg.solve(Hf, g), lower[free])
            st = _state(objective, new)
            f_new, g_new = objective.value(st), objective.gradient(st)[free]
            if not (np.linalg.norm(g_new) < np.linalg.norm(g) and f_new <= f + 1e-10 * max(1.0, abs(f))):
                break
            small = np.max(np.abs(new - theta)) <= 1e-10 * max(1.0, float(np.max(np.abs(theta))))
            theta, f, g = new, f_new, g_new
            if small:                   # the next step would be below the criterion's rounding
                break
    except (np.linalg.LinAlgError, NumericalError):
        pass
    return theta, H


def _inward_of_the_bound(objective, theta: np.ndarray, lower: np.ndarray, grid=np.geomspace(1e-4, 10.0, 16),
                         rel: float = 1e-10, which: np.ndarray | None = None) -> np.ndarray | None:
    """The best point found by moving one theta that sits at its bound inward along ``grid``, when it beats
    theta by more than ``rel`` (relative); None when none does."""
    at = theta <= lower + 1e-12
    if which is not None:
        at &= which
    if not at.any():
        return None
    f0 = _value(objective, theta)
    best, best_f = None, f0 - rel * max(1.0, abs(f0))
    for i in np.flatnonzero(at):
        for t in grid:
            trial = theta.copy()
            trial[i] = t
            f = _value(objective, trial)
            if f < best_f:
                best, best_f = trial, f
    return best
