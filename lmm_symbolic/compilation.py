r"""Compilation: the derived closed forms turned into numpy functions, and the one profiled deviance.

Every model is fitted through one criterion, lme4's profiled deviance in :math:`\theta`
(:class:`ThetaDeviance`: :math:`\beta` and :math:`\sigma^2` profiled out, :math:`-2 \log L` for ML, the REML
criterion otherwise), with its analytic gradient and Hessian. :func:`profiled_deviance` picks the cheapest evaluation
of it that the model's structure allows:

* :class:`InterceptDeviance` -- ``(1|g)`` (and :math:`\Sigma = \sigma_s^2 K + \sigma^2 I` after
  :math:`K`'s rotation): the log-likelihood sees the data only through per-group sums
  (:mod:`lmm_symbolic.statistics`); the derived per-group closed forms (Eq. 11-12 for a block of size
  :math:`m`: the Woodbury weight and the determinant lemma) are lambdified with ``cse=True``
  (:class:`ProfiledDeviance`) and evaluated over all groups at once, :math:`O(G p^2)` per evaluation, with
  the analytic second derivative;
* :class:`BlockDeviance` -- terms sharing one factor: the derived :math:`q \times q` block forms
  (:func:`block_forms`);
* :class:`DenseDeviance` -- few random effects in all: :math:`M = \Lambda^\top Z^\top Z \Lambda + I` in
  dense arrays;
* :class:`SparseDeviance` -- nested and crossed terms: :math:`M` factorised by blocks, the largest term's
  block-diagonal part first, then the dense Schur complement.

:class:`LogLikelihood` is Eq. 10 as a function of :math:`(\sigma, \sigma_s, \beta)`, with its sympy gradient
and Hessian.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg
import scipy.linalg.lapack
import scipy.sparse
import sympy as sp

from .derivation import m, random_intercept_block, sigma, sigma_s
from .errors import ModelError, NumericalError
from .specification import Design, random_effects_matrix
from .statistics import BLOCK_Q, BlockStatistics, GroupStatistics, response_scaling, single_factor

theta = sp.Symbol("theta", nonnegative=True)


# ------------------------------------------------------------------------------ lambdified kernels
@functools.lru_cache(maxsize=None)
def intercept_kernels():
    r""":math:`w(m, \theta)`, :math:`\log|V_g|(m, \theta)` and their first two :math:`\theta`-derivatives,
    :math:`V = \Sigma / \sigma^2`.

    From the derived block: :math:`w = W_{11}` and :math:`\log|V_g| = \log|\Sigma_g| - 2 m \log\sigma` at
    :math:`\sigma = 1`, :math:`\sigma_s = \theta` (the Woodbury weight and the determinant lemma of Eq. 11-12).
    """
    block = random_intercept_block()
    at = {sigma: 1, sigma_s: theta}
    w = block.W[0, 0].subs(at)
    logdet = (block.logdet - 2 * m * sp.log(sigma)).subs(at)
    exprs = [w, sp.diff(w, theta), sp.diff(w, theta, 2), logdet, sp.diff(logdet, theta),
             sp.diff(logdet, theta, 2)]
    return exprs, sp.lambdify((theta, m), exprs, modules="numpy", cse=True)


def cholesky_solve(R: np.ndarray, b: np.ndarray) -> np.ndarray:
    r""":math:`x` with :math:`R R^\top x = b` for a lower Cholesky factor :math:`R` (LAPACK potrs, without
    scipy's argument checks, which cost more than the solve at these sizes)."""
    x, info = scipy.linalg.lapack.dpotrs(R, b, lower=1)
    if info:
        raise NumericalError(f"potrs failed (info {info})")
    return x


def weighted_gram(w: np.ndarray, C: np.ndarray) -> np.ndarray:
    r""":math:`\sum_g w_g c_g c_g^\top` for the rows :math:`c_g` of :math:`C`."""
    return (C * w[:, None]).T @ C


@dataclass(frozen=True)
class ProfileState:
    r"""Everything the profiled criterion knows at one :math:`\theta` (scaled response units)."""

    theta: float
    w: np.ndarray
    dw: np.ndarray
    d2w: np.ndarray
    logdet: float
    dlogdet: float
    d2logdet: float
    A: np.ndarray          # X^T V^-1 X
    c: np.ndarray          # X^T V^-1 y
    beta: np.ndarray       # GLS estimate
    e: np.ndarray          # 1^T r_g at beta
    rss: float             # (y - X beta)^T V^-1 (y - X beta)
    logdetA: float


class ProfiledDeviance:
    r""":math:`-2 \log L` (ML) or the REML criterion as a function of :math:`\theta = \sigma_s / \sigma`
    (lme4's devfun).

    With :math:`V = \Sigma / \sigma^2` (block :math:`I + \theta^2 J`), :math:`\beta` and :math:`\sigma^2`
    profiled out:

    .. math::

        \text{ML:} \quad d(\theta) &= n \log(2\pi\, \mathrm{RSS} / n) + \log|V| + n, \\
        \text{REML:} \quad d(\theta) &= (n - p) \log\bigl(2\pi\, \mathrm{RSS} / (n - p)\bigr) + \log|V| \\
            &\quad + \log|X^\top V^{-1} X| + (n - p).
    """

    def __init__(self, stats: GroupStatistics, reml: bool):
        self.stats = stats
        self.reml = reml
        self.n_eff = stats.n - (stats.p if reml else 0)
        if self.n_eff <= 0:
            raise ModelError(f"{stats.n} observations cannot estimate {stats.p} fixed effects and "
                             "a residual variance")
        self._kernel = intercept_kernels()[1]
        self._XtX = stats.XtX.sum(0)
        self._Xty = stats.Xty.sum(0)
        self._yty = float(stats.yty.sum())

    def state(self, th: float) -> ProfileState:
        s = self.stats
        w, dw, d2w, ld, dld, d2ld = (np.broadcast_to(np.asarray(v, dtype=float), s.m.shape)
                                     for v in self._kernel(float(th), s.m))
        A = self._XtX - weighted_gram(w, s.Xt1)
        c = self._Xty - s.Xt1.T @ (w * s.one_y)
        try:
            L = np.linalg.cholesky(A) if s.p else np.zeros((0, 0))
        except np.linalg.LinAlgError:
            raise NumericalError(f"X^T V^-1 X is not positive definite at theta = {th:g}") from None
        beta = np.linalg.solve(A, c) if s.p else np.zeros(0)
        e = s.one_y - s.Xt1 @ beta
        yVy = self._yty - float(w @ (s.one_y ** 2))
        rss = yVy - float(c @ beta)
        rss = max(rss, 0.0)
        logdetA = 2.0 * float(np.log(np.diag(L)).sum()) if s.p else 0.0
        return ProfileState(theta=float(th), w=w, dw=dw, d2w=d2w, logdet=float(ld.sum()),
                            dlogdet=float(dld.sum()), d2logdet=float(d2ld.sum()), A=A, c=c, beta=beta,
                            e=e, rss=rss, logdetA=logdetA)

    def __call__(self, th: float) -> float:
        return self.value(self.state(th))

    def value(self, st: ProfileState) -> float:
        if st.rss <= 0:
            raise NumericalError("the residual sum of squares is zero: the response is fitted exactly")
        dev = self.n_eff * np.log(2 * np.pi * st.rss / self.n_eff) + st.logdet + self.n_eff
        return float(dev + (st.logdetA if self.reml else 0.0))

    def derivative(self, st: ProfileState) -> float:
        r""":math:`\mathrm{d}d/\mathrm{d}\theta = n_\text{eff}\, \mathrm{RSS}'/\mathrm{RSS} + \log|V|'`
        (:math:`+ \operatorname{tr}(A^{-1} A')` for REML), :math:`\mathrm{RSS}' = -\sum_g w'_g e_g^2`."""
        drss = -float(st.dw @ st.e ** 2)
        out = self.n_eff * drss / st.rss + st.dlogdet
        if self.reml and self.stats.p:
            dA = -weighted_gram(st.dw, self.stats.Xt1)
            out += float(np.trace(np.linalg.solve(st.A, dA)))
        return out

    def value_and_derivative(self, th) -> tuple[float, np.ndarray]:
        st = self.state(float(np.atleast_1d(th)[0]))
        return self.value(st), np.array([self.derivative(st)])


# -------------------------------------------------------------------------- the full log-likelihood
@functools.lru_cache(maxsize=None)
def _loglik_kernel(p: int):
    """Eq. 10 for one group of size m, in its statistics, with its gradient and Hessian in (sigma,
    sigma_s, beta); lambdified with cse=True and evaluated over all groups at once."""
    block = random_intercept_block()
    beta = sp.symbols(f"beta_0:{p}", real=True)
    yty, one_y = sp.symbols("yty one_y", real=True)
    Xty = sp.symbols(f"Xty_0:{p}", real=True)
    Xt1 = sp.symbols(f"Xt1_0:{p}", real=True)
    XtX = [[sp.Symbol(f"XtX_{min(k, l)}_{max(k, l)}", real=True) for l in range(p)] for k in range(p)]
    R2 = (yty - 2 * sum(b * v for b, v in zip(beta, Xty))
          + sum(beta[k] * beta[l] * XtX[k][l] for k in range(p) for l in range(p)))
    R1 = one_y - sum(b * v for b, v in zip(beta, Xt1))
    quad = block.quadratic.subs({block.R2: R2, block.Zr[0, 0]: R1})
    ell = -m / 2 * sp.log(2 * sp.pi) - block.logdet / 2 - quad / 2
    params = (sigma, sigma_s, *beta)
    grad = [sp.diff(ell, v) for v in params]
    hess = [[sp.diff(g, v) for v in params] for g in grad]
    uniq = [XtX[k][l] for k in range(p) for l in range(k, p)]
    args = (params, (m, yty, one_y, *Xty, *Xt1, *uniq))
    return sp.lambdify(args, [ell, grad, hess], modules="numpy", cse=True)


class LogLikelihood:
    r"""Eq. 10, :math:`\log L(\sigma, \sigma_s, \beta)`, in the original units of the response, with its
    gradient and Hessian from sympy (the closed form of Eq. 11-12 per group, summed over groups)."""

    def __init__(self, stats: GroupStatistics):
        self.stats = stats
        self._f = _loglik_kernel(stats.p)
        p = stats.p
        iu = [(k, l) for k in range(p) for l in range(k, p)]
        self._data = (stats.m, stats.yty, stats.one_y, *stats.Xty.T, *stats.Xt1.T,
                      *[stats.XtX[:, k, l] for k, l in iu])

    def _evaluate(self, sig: float, sig_s: float, beta) -> tuple[float, np.ndarray, np.ndarray]:
        s = self.stats
        k = s.scale
        # work in the scaled response: y_w = (y - shift)/scale, so beta_w = (beta - beta_shift)/scale
        beta_w = (np.asarray(beta, dtype=float) - s.beta_shift) / k
        ell, grad, hess = self._f((sig / k, sig_s / k, *beta_w), self._data)
        total = lambda v: float(np.sum(np.broadcast_to(v, s.m.shape)))  # noqa: E731
        ell = total(ell) - s.n * np.log(k)
        J = 1.0 / k
        g = np.array([total(v) for v in grad]) * J
        H = np.array([[total(v) for v in row] for row in hess]) * J * J
        if not np.isfinite(ell):
            raise NumericalError("the log-likelihood is not finite at these parameters")
        return ell, g, H

    def __call__(self, sig: float, sig_s: float, beta) -> float:
        return self._evaluate(sig, sig_s, beta)[0]

    def gradient(self, sig: float, sig_s: float, beta) -> np.ndarray:
        r""":math:`\partial \log L / \partial(\sigma, \sigma_s, \beta)`."""
        return self._evaluate(sig, sig_s, beta)[1]

    def hessian(self, sig: float, sig_s: float, beta) -> np.ndarray:
        return self._evaluate(sig, sig_s, beta)[2]


# -------------------------------------------------------------- several terms, slopes, crossed factors
def theta_index(q: int) -> tuple[tuple[int, int], ...]:
    r"""(row, col) of the lower triangle of a :math:`q \times q` relative factor :math:`T`, in lme4's
    column-major order."""
    return tuple((r, c) for c in range(q) for r in range(c, q))


@dataclass(frozen=True)
class TermLayout:
    r"""Where one random term's parameters sit: its relative Cholesky factor :math:`T`
    (:math:`q \times q`, lower triangular, :math:`D = \sigma^2 T T^\top`) fills
    :math:`\Lambda = \operatorname{diag}(I_G \otimes T)` in the term's block of :math:`Z`'s columns."""

    q: int
    n_levels: int
    offset: int            # first column of the term in Z
    theta_index: tuple[tuple[int, int], ...]

    @property
    def width(self) -> int:
        return self.q * self.n_levels


def term_layouts(design: Design) -> tuple[TermLayout, ...]:
    layouts, offset = [], 0
    for term in design.terms:
        layouts.append(TermLayout(q=term.q, n_levels=term.n_levels, offset=offset, theta_index=theta_index(term.q)))
        offset += term.q * term.n_levels
    return tuple(layouts)


@dataclass(frozen=True)
class DevianceState:
    r"""The profiled criterion at one :math:`\theta` (scaled response units): :math:`A = X^\top V^{-1} X`,
    the GLS :math:`\hat\beta`, :math:`\mathrm{RSS} = (y - X\hat\beta)^\top V^{-1} (y - X\hat\beta)`,
    :math:`\log|M| = \log|V|`, :math:`\log|A|` and the conditional modes :math:`b = \Lambda u` in :math:`Z`'s
    column layout; ``work`` keeps what the gradient reuses."""

    theta: np.ndarray
    A: np.ndarray
    beta: np.ndarray
    rss: float
    logdetM: float
    logdetA: float
    b: np.ndarray
    work: dict = field(repr=False, compare=False)


class ThetaDeviance:
    r"""lme4's profiled deviance in :math:`\theta` for any set of random terms, :math:`\beta` and
    :math:`\sigma^2` profiled out.

    With :math:`\Lambda(\theta)` the relative covariance factor (:math:`D_k = \sigma^2 T_k T_k^\top`),
    :math:`M = \Lambda^\top Z^\top Z \Lambda + I` and :math:`V = \Sigma / \sigma^2 = I + Z \Lambda \Lambda^\top Z^\top`,
    the determinant lemma gives :math:`|V| = |M|` and Woodbury gives
    :math:`V^{-1} = I - Z \Lambda M^{-1} \Lambda^\top Z^\top` (Eq. 11-12 generalised):

    .. math::

        \text{ML:} \quad d &= \log|M| + n \bigl(1 + \log(2\pi\, \mathrm{RSS} / n)\bigr), \\
        \text{REML:} \quad d &= \log|M| + \log|X^\top V^{-1} X| \\
            &\quad + (n - p)\bigl(1 + \log(2\pi\, \mathrm{RSS} / (n - p))\bigr).

    Subclasses evaluate these for block-diagonal :math:`\Sigma` (:class:`BlockDeviance`) or any :math:`Z`
    (:class:`SparseDeviance`).
    """

    def __init__(self, design: Design, reml: bool, shift: float, scale: float, beta_shift: np.ndarray,
                 layouts: tuple[TermLayout, ...] | None = None):
        self.design = design
        self.reml = reml
        self.layouts = term_layouts(design) if layouts is None else layouts
        self.shift, self.scale, self.beta_shift = shift, scale, np.asarray(beta_shift, dtype=float)
        self.n, self.p = design.n, design.p
        self.n_eff = self.n - (self.p if reml else 0)
        if self.n_eff <= 0:
            raise ModelError(f"{self.n} observations cannot estimate {self.p} fixed effects and "
                             "a residual variance")
        self.n_theta = sum(len(lay.theta_index) for lay in self.layouts)

    @property
    def lower_bounds(self) -> list[float | None]:
        r"""0 for the diagonal of each :math:`T` (standard deviations), unbounded off the diagonal (lme4)."""
        return [0.0 if r == c else None for lay in self.layouts for r, c in lay.theta_index]

    def initial(self) -> np.ndarray:
        return np.array([1.0 if r == c else 0.0 for lay in self.layouts for r, c in lay.theta_index])

    def terms(self, theta) -> tuple[np.ndarray, ...]:
        r""":math:`T_k` (:math:`q_k \times q_k`) for each term."""
        out, k = [], 0
        for lay in self.layouts:
            T = np.zeros((lay.q, lay.q))
            for r, c in lay.theta_index:
                T[r, c] = theta[k]
                k += 1
            out.append(T)
        return tuple(out)

    def _profile(self, theta, A, c, yVy) -> tuple[np.ndarray, float, float]:
        """beta = A^-1 c, RSS = y^T V^-1 y - c^T beta and log|A| (Cholesky of A)."""
        if not self.p:
            return np.zeros(0), max(yVy, 0.0), 0.0
        try:
            R = np.linalg.cholesky(A)
        except np.linalg.LinAlgError:
            raise NumericalError(f"X^T V^-1 X is not positive definite at theta = {np.round(theta, 6)}") from None
        beta = cholesky_solve(R, c)
        return beta, max(yVy - float(c @ beta), 0.0), 2.0 * float(np.log(np.diag(R)).sum())

    def _woodbury_profile(self, theta, LZX: np.ndarray, LZy: np.ndarray, sol: np.ndarray):
        """From sol = M^-1 [Lambda^T Z^T X, Lambda^T Z^T y], by Woodbury: A = X^T X - (Lambda^T Z^T X)^T
        M^-1 Lambda^T Z^T X, X^T V^-1 y and y^T V^-1 y alike, then beta, RSS, log|A| (:meth:`_profile`) and
        the spherical modes u = M^-1 Lambda^T Z^T (y - X beta). Needs the sums XtX, Xty, yty (scaled units)."""
        Cu, cu = sol[:, :self.p], sol[:, self.p]
        A = self.XtX - LZX.T @ Cu
        c = self.Xty - LZX.T @ cu
        yVy = self.yty - float(LZy @ cu)
        beta, rss, logdetA = self._profile(theta, A, c, yVy)
        return A, beta, rss, logdetA, cu - Cu @ beta

    def value(self, st: DevianceState) -> float:
        if st.rss <= 0:
            raise NumericalError("the residual sum of squares is zero: the response is fitted exactly")
        dev = st.logdetM + self.n_eff * (1 + np.log(2 * np.pi * st.rss / self.n_eff))
        return float(dev + (st.logdetA if self.reml else 0.0))

    def __call__(self, theta) -> float:
        return self.value(self.state(theta))

    def state(self, theta) -> DevianceState:
        raise NotImplementedError

    def derivatives(self, st: DevianceState) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        r""":math:`\partial \log|M| / \partial\theta_k` (k,), :math:`\partial \mathrm{RSS} / \partial\theta_k` at
        fixed :math:`\beta` (k,) and :math:`\partial A / \partial\theta_k` (k, p, p)."""
        raise NotImplementedError

    def conditional_variances(self, st: DevianceState) -> np.ndarray:
        r""":math:`\operatorname{diag}(\Lambda M^{-1} \Lambda^\top)` in :math:`Z`'s column layout:
        :math:`\operatorname{Var}(b \mid y) / \sigma^2` at :math:`\hat\beta` (lme4's condVar)."""
        raise NotImplementedError

    def _combine(self, st: DevianceState, derivatives, rss_weight: float) -> np.ndarray:
        """d log|M| + rss_weight dRSS (+ tr(A^-1 dA) for REML) from :meth:`derivatives`."""
        dlogdet, drss, dA = derivatives
        grad = dlogdet + rss_weight * drss
        if self.reml and self.p:
            grad = grad + np.einsum("pr,krp->k", self.a_inverse(st), dA)
        return grad

    @staticmethod
    def a_inverse(st: DevianceState) -> np.ndarray:
        r""":math:`(X^\top V^{-1} X)^{-1}` at the state, computed once."""
        if "Ainv" not in st.work:
            st.work["Ainv"] = np.linalg.inv(st.A)
        return st.work["Ainv"]

    def gradient(self, st: DevianceState) -> np.ndarray:
        r""":math:`\partial \log|M| + n_\text{eff}\, \partial\mathrm{RSS} / \mathrm{RSS}` (:math:`\hat\beta`'s change
        does not move RSS: envelope), :math:`+ \operatorname{tr}(A^{-1} \partial A)` for REML."""
        return self._combine(st, self.cached_derivatives(st), self.n_eff / st.rss)

    def cached_derivatives(self, st: DevianceState) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`derivatives` at ``st``, computed once per state."""
        if "derivatives" not in st.work:
            st.work["derivatives"] = self.derivatives(st)
        return st.work["derivatives"]

    def value_and_gradient(self, theta) -> tuple[float, np.ndarray]:
        st = self.state(theta)
        return self.value(st), self.gradient(st)

    def _profiled_hessian(self, st: DevianceState, d2logdet: np.ndarray, d2rss: np.ndarray, h: np.ndarray,
                          d2A: np.ndarray | None) -> np.ndarray:
        r"""The Hessian :math:`d''` of the profiled deviance from its second-order pieces at fixed
        :math:`\beta`: ``d2logdet`` :math:`= \partial^2 \log|M|`, ``d2rss`` :math:`= \partial^2 \mathrm{RSS}`
        (k, k), :math:`h_k = \partial_k A\, \beta - \partial_k c` (k, p) and ``d2A`` (k, k, p, p; REML). As
        :math:`\beta` moves with :math:`\theta` (:math:`\partial_l \beta = -A^{-1} h_l`), the total
        :math:`\mathrm{RSS}'' = \partial^2 \mathrm{RSS} - 2\, h A^{-1} h^\top`, and

        .. math::

            d''_{kl} = \partial^2_{kl} \log|M| + n_\text{eff} \Bigl(\frac{\mathrm{RSS}''_{kl}}{\mathrm{RSS}}
                - \frac{\mathrm{RSS}'_k \mathrm{RSS}'_l}{\mathrm{RSS}^2}\Bigr)
                \;\bigl[+ \operatorname{tr}(A^{-1} \partial^2_{kl} A)
                - \operatorname{tr}(A^{-1} \partial_k A\, A^{-1} \partial_l A)\bigr]_\text{REML}.
        """
        _, drss, dA = self.cached_derivatives(st)
        if self.p:
            Ainv = self.a_inverse(st)
            d2rss = d2rss - 2.0 * h @ Ainv @ h.T
        H = d2logdet + self.n_eff * (d2rss / st.rss - np.outer(drss, drss) / st.rss**2)
        if self.reml and self.p:
            AdA = np.einsum("pr,krs->kps", Ainv, dA)
            H = H + np.einsum("pr,klrp->kl", Ainv, d2A) - np.einsum("kps,lsp->kl", AdA, AdA)
        return (H + H.T) / 2

    def _residual_second_order(self, L, Zt: np.ndarray, LtZt: np.ndarray, zt_vinv_z):
        r"""The residual pieces of the Hessian at fixed :math:`\beta`, for any :math:`\Lambda = \sum_k \theta_k E_k`
        (``self._by_theta`` holds each :math:`E_k`'s entries). With :math:`\partial_k V = Z \Delta_k Z^\top`,
        :math:`\Delta_k = E_k \Lambda^\top + \Lambda E_k^\top`, :math:`\partial^2_{kl} V = Z (E_k E_l^\top +
        E_l E_k^\top) Z^\top`, ``Zt`` :math:`= [g, Q] = Z^\top V^{-1} [y - X\beta, X]`, ``LtZt`` :math:`=
        \Lambda^\top` ``Zt``, :math:`a_k = \Delta_k g` and ``zt_vinv_z`` applying :math:`N = Z^\top V^{-1} Z`:

        .. math::

            \partial^2_{kl} \mathrm{RSS} &= 2\, a_l^\top N a_k - 2 (E_k^\top g)^\top (E_l^\top g), \qquad
            h_k = Q^\top a_k, \\
            \partial^2_{kl} A &= (\Delta_l Q)^\top N (\Delta_k Q) + (\Delta_k Q)^\top N (\Delta_l Q)
                - (E_k^\top Q)^\top E_l^\top Q - (E_l^\top Q)^\top E_k^\top Q.

        Returns (d2rss, h, d2A), d2A None for ML."""
        k, p, w = self.n_theta, self.p, Zt.shape[0]
        g, Lg = Zt[:, 0], LtZt[:, 0]
        Q, LQ = Zt[:, 1:], LtZt[:, 1:]
        Etg, EtQ = np.zeros((k, w)), np.zeros((k, w, p))                     # E_k^T g, E_k^T Q
        ELg, ELQ = np.zeros((k, w)), np.zeros((k, w, p))                     # E_k Lambda^T g, E_k Lambda^T Q
        for j, (r, c) in enumerate(self._by_theta):
            Etg[j, c], EtQ[j, c] = g[r], Q[r]
            ELg[j, r], ELQ[j, r] = Lg[c], LQ[c]
        a = ELg + (L @ Etg.T).T                                                  # (k, w): Delta_k g
        DQ = ELQ + (L @ EtQ.transpose(1, 0, 2).reshape(w, k * p)).reshape(w, k, p).transpose(1, 0, 2)
        Nb = zt_vinv_z(np.column_stack([a.T, DQ.transpose(1, 0, 2).reshape(w, k * p)]))
        Na, NDQ = Nb[:, :k].T, Nb[:, k:].reshape(w, k, p).transpose(1, 0, 2)
        d2rss = 2.0 * a @ Na.T - 2.0 * Etg @ Etg.T
        d2A = None
        if self.reml and p:
            flat = lambda Y: Y.transpose(1, 0, 2).reshape(w, k * p)            # noqa: E731  (w, k p)
            cross = (flat(DQ).T @ flat(NDQ)).reshape(k, p, k, p).transpose(2, 0, 1, 3)   # [k, l, p, r]
            EE = (flat(EtQ).T @ flat(EtQ)).reshape(k, p, k, p).transpose(0, 2, 1, 3)
            d2A = cross + cross.transpose(1, 0, 2, 3) - EE - EE.transpose(1, 0, 2, 3)
        return d2rss, a @ Q, d2A

    def varpar_deviance(self, theta, sig: float) -> float:
        r"""lmerTest's deviance in varpar :math:`= (\theta, \sigma)`, :math:`\beta` at its GLS value (scaled
        response units): :math:`\log|M| + \mathrm{RSS} / \sigma^2 + n \log(2\pi\sigma^2)`
        (:math:`{} + \log|A| - p \log(2\pi\sigma^2)` for REML)."""
        st = self.state(theta)
        dev = st.logdetM + st.rss / sig**2 + self.n_eff * np.log(2 * np.pi * sig**2)
        return float(dev + (st.logdetA if self.reml else 0.0))

    def varpar_hessian(self, theta, sig: float, hessian: np.ndarray | None = None,
                       st: DevianceState | None = None) -> tuple[np.ndarray, DevianceState, np.ndarray]:
        r"""The Hessian of :meth:`varpar_deviance` in :math:`(\theta, \sigma)`, with the state and
        :math:`\partial A` at :math:`\theta`. The :math:`\sigma` row is closed form:
        :math:`D_{\theta\sigma} = -2\, \partial\mathrm{RSS} / \sigma^3`,
        :math:`D_{\sigma\sigma} = 6\, \mathrm{RSS} / \sigma^4 - 2 n_\text{eff} / \sigma^2`. The :math:`\theta`
        block: given the Hessian :math:`d''` of the profiled deviance
        :math:`d(\theta) = \min_\sigma D(\theta, \sigma)` at :math:`\sigma = \hat\sigma(\theta)` (the
        optimiser's), by the envelope relation

        .. math:: D_{\theta\theta} = d'' + D_{\theta\sigma} D_{\theta\sigma}^\top / D_{\sigma\sigma};

        otherwise by central differences of the analytic gradient
        :math:`\partial \log|M| + \partial\mathrm{RSS} / \sigma^2` (:math:`+ \operatorname{tr}(A^{-1} \partial A)`)."""
        theta = np.asarray(theta, dtype=float)
        k = self.n_theta
        st = self.state(theta) if st is None else st
        _, drss, dA = self.cached_derivatives(st)
        H = np.empty((k + 1, k + 1))
        H[:k, k] = H[k, :k] = -2.0 * drss / sig**3
        H[k, k] = 6.0 * st.rss / sig**4 - 2.0 * self.n_eff / sig**2
        if hessian is not None:
            H[:k, :k] = hessian + np.outer(H[:k, k], H[:k, k]) / H[k, k]
            return H, st, dA

        def grad(th):
            s2 = self.state(th)
            return self._combine(s2, self.cached_derivatives(s2), 1.0 / sig**2)

        H[:k, :k] = difference_hessian(grad, theta)
        return H, st, dA


def difference_hessian(grad, theta: np.ndarray) -> np.ndarray:
    r"""The Hessian as central differences of an analytic gradient,
    :math:`H_{:,i} = \bigl(g(\theta + h_i e_i) - g(\theta - h_i e_i)\bigr) / 2h_i` with
    :math:`h_i = 10^{-5} \max(|\theta_i|, 0.01)`, symmetrised."""
    k = len(theta)
    H = np.empty((k, k))
    h = 1e-5 * np.maximum(np.abs(theta), 1e-2)
    for i in range(k):
        step = np.eye(k)[i] * h[i]
        H[:, i] = (grad(theta + step) - grad(theta - step)) / (2 * h[i])
    return (H + H.T) / 2


# --------------------------------------------------------------- one random intercept, or a kinship matrix
class InterceptDeviance(ThetaDeviance):
    r"""The profiled deviance of ``(1|g)`` in :math:`\theta = \sigma_s / \sigma`, evaluated from the
    per-group sums with the derived Woodbury weight :math:`w(m, \theta)` and determinant lemma
    :math:`\log|V_g|(m, \theta)` (Eq. 11-12, through :class:`ProfiledDeviance`): the same criterion as
    :class:`ThetaDeviance`, in :math:`O(G p^2)` per evaluation, with its analytic second derivative.
    :math:`\Sigma = \sigma_s^2 K + \sigma^2 I` is the same object after the rotation by :math:`K`'s
    eigenvectors (:class:`~lmm_symbolic.statistics.SpectralStatistics`: each observation a group of size :math:`\lambda_i`).

    Conditional modes (scaled units): :math:`b_g = w_g \mathbf{1}^\top r_g`; for the kinship fit
    :math:`U (\sqrt{\lambda}\, w\, e)`."""

    def __init__(self, design: Design, reml: bool, stats: GroupStatistics | None = None):
        if stats is None:
            from .statistics import SpectralStatistics
            stats = SpectralStatistics.of(design) if design.kinship is not None else GroupStatistics.of(design)
        levels = stats.G if design.kinship is None else design.n
        layout = (TermLayout(q=1, n_levels=levels, offset=0, theta_index=((0, 0),)),)
        super().__init__(design, reml, stats.shift, stats.scale, stats.beta_shift, layouts=layout)
        self.stats = stats
        self.profile = ProfiledDeviance(stats, reml)

    def state(self, theta) -> DevianceState:
        th = float(np.atleast_1d(theta)[0])
        ps = self.profile.state(th)
        b = ps.w * ps.e
        if getattr(self.stats, "eigenvectors", None) is not None:
            b = self.stats.eigenvectors @ (np.sqrt(self.stats.m) * b)
        return DevianceState(theta=np.array([th]), A=ps.A, beta=ps.beta, rss=ps.rss, logdetM=ps.logdet,
                             logdetA=ps.logdetA, b=b, work=dict(profile=ps))

    def derivatives(self, st: DevianceState) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        r""":math:`\partial \log|V| = \sum_g \partial \log|V_g|`,
        :math:`\partial\mathrm{RSS} = -\sum_g w'_g e_g^2`,
        :math:`\partial A = -\sum_g w'_g (X_g^\top \mathbf{1})(X_g^\top \mathbf{1})^\top`."""
        ps = st.work["profile"]
        return (np.array([ps.dlogdet]), np.array([-float(ps.dw @ ps.e ** 2)]),
                -weighted_gram(ps.dw, self.stats.Xt1)[None])

    def conditional_variances(self, st: DevianceState) -> np.ndarray:
        r""":math:`\operatorname{Var}(u_g \mid y) / \sigma^2 = w_g` (lme4's condVar for (1|g))."""
        return np.asarray(st.work["profile"].w, dtype=float)

    def hessian(self, st: DevianceState) -> np.ndarray:
        r""":math:`d'' = n_\text{eff} \bigl(\mathrm{RSS}''/\mathrm{RSS} - (\mathrm{RSS}'/\mathrm{RSS})^2\bigr) + \log|V|''`
        (:math:`+ \operatorname{tr}(A^{-1} A'') - \operatorname{tr}\bigl((A^{-1} A')^2\bigr)` for REML), with the
        total :math:`\mathrm{RSS}'' = -\sum w'' e^2 - 2 \sum w' e e'` (:math:`\hat\beta` moves with
        :math:`\theta`: :math:`e' = -X_g^\top \mathbf{1}\, \hat\beta'`)."""
        ps, s = st.work["profile"], self.stats
        dA = -weighted_gram(ps.dw, s.Xt1)
        dc = -s.Xt1.T @ (ps.dw * s.one_y)
        dbeta = np.linalg.solve(ps.A, dc - dA @ ps.beta) if s.p else np.zeros(0)
        de = -s.Xt1 @ dbeta
        drss = -float(ps.dw @ ps.e ** 2)
        d2rss = -float(ps.d2w @ ps.e ** 2) - 2.0 * float(ps.dw @ (ps.e * de))
        h = self.n_eff * (d2rss / ps.rss - (drss / ps.rss) ** 2) + ps.d2logdet
        if self.reml and s.p:
            d2A = -weighted_gram(ps.d2w, s.Xt1)
            AdA = np.linalg.solve(ps.A, dA)
            h += float(np.trace(np.linalg.solve(ps.A, d2A)) - np.trace(AdA @ AdA))
        return np.array([[h]])


# ------------------------------------------------------------------- one grouping factor: q x q blocks
def relative_factor(qs: tuple[int, ...]) -> tuple[sp.Matrix, tuple[sp.Symbol, ...]]:
    r""":math:`\Lambda_g = \operatorname{diag}(T_1, \dots, T_K)` for terms of sizes ``qs`` on one factor,
    :math:`T_k` lower triangular in :math:`\theta_0, \theta_1, \dots` (lme4's order)."""
    T = sp.zeros(sum(qs), sum(qs))
    thetas, offset = [], 0
    for q in qs:
        for r, c in theta_index(q):
            t = sp.Symbol(f"theta_{len(thetas)}", real=True)
            T[offset + r, offset + c] = t
            thetas.append(t)
        offset += q
    return T, tuple(thetas)


def block_symbols(q: int) -> sp.Matrix:
    r""":math:`S = Z_g^\top Z_g` as a symmetric matrix of symbols ``S_a_b`` (:math:`a \le b`)."""
    return sp.Matrix(q, q, lambda a, b: sp.Symbol(f"S_{min(a, b)}_{max(a, b)}", real=True))


@dataclass(frozen=True)
class BlockForms:
    r"""One group's closed forms in :math:`\theta` and :math:`S = Z_g^\top Z_g` (:math:`\sigma = 1`):
    the lemma's :math:`\log|I_m + Z_g T T^\top Z_g^\top| = \log|M_g|`, :math:`M_g = I_q + T^\top S T`, as the
    sum of the logs of :math:`M_g`'s :math:`LDL^\top` pivots (each :math:`\ge 1`), and Woodbury's weight
    :math:`W_g = T M_g^{-1} T^\top` (so :math:`V_g^{-1} = I - Z_g W_g Z_g^\top`). Their
    :math:`\theta`-derivatives, with :math:`E_k = \partial T / \partial\theta_k` and
    :math:`\partial M_k = E_k^\top S T + T^\top S E_k`:

    .. math::

        \partial \log|M_g| &= \operatorname{tr}(M_g^{-1}\, \partial M_k), \\
        \partial W_g &= E_k M_g^{-1} T^\top + T M_g^{-1} E_k^\top - T M_g^{-1}\, \partial M_k\, M_g^{-1} T^\top."""

    T: sp.Matrix
    thetas: tuple[sp.Symbol, ...]
    S: sp.Matrix
    logdet: sp.Expr
    W: sp.Matrix
    dlogdet: tuple[sp.Expr, ...]
    dW: tuple[sp.Matrix, ...]


@functools.lru_cache(maxsize=None)
def block_forms(qs: tuple[int, ...]) -> BlockForms:
    """:class:`BlockForms` for terms of sizes ``qs`` on one factor, derived and lambdified once per ``qs``."""
    T, thetas = relative_factor(qs)
    S = block_symbols(T.shape[0])
    M = (sp.eye(T.shape[0]) + T.T * S * T).applyfunc(sp.expand)
    L, P = M.LDLdecomposition(hermitian=False)
    Linv = L.lower_triangular_solve(sp.eye(L.shape[0]))          # L.inv() takes seconds at q = 3
    Minv = Linv.T * sp.diag(*[1 / P[i, i] for i in range(P.shape[0])]) * Linv
    W = T * Minv * T.T
    dlogdet, dW = [], []
    for t in thetas:
        E = T.diff(t)
        dM = E.T * S * T + T.T * S * E
        dlogdet.append((Minv * dM).trace())
        dW.append(E * Minv * T.T + T * Minv * E.T - T * Minv * dM * Minv * T.T)
    return BlockForms(T=T, thetas=thetas, S=S, logdet=sp.Add(*[sp.log(P[i, i]) for i in range(P.shape[0])]), W=W,
                      dlogdet=tuple(dlogdet), dW=tuple(dW))


@functools.lru_cache(maxsize=None)
def block_kernels(qs: tuple[int, ...]):
    r"""The derived :math:`[W_g` entries (:math:`a \le b`), :math:`\log|M_g|]` as one function of
    (:math:`\theta`, the entries :math:`S_{ab}`, :math:`a \le b`, of every group at once), lambdified with
    ``cse=True``."""
    f = block_forms(qs)
    q = f.T.shape[0]
    upper = [(a, b) for a in range(q) for b in range(a, q)]
    args = (f.thetas, [f.S[a, b] for a, b in upper])
    return sp.lambdify(args, [f.W[a, b] for a, b in upper] + [f.logdet], modules="numpy", cse=True)


#: groups with this many distinct :math:`S_g` or fewer evaluate the kernels in Python floats, one pattern at a time
FEW_PATTERNS = 16


class BlockDeviance(ThetaDeviance):
    r"""The profiled deviance when all terms share one grouping factor: :math:`\Sigma` is block-diagonal,
    and each group enters through :math:`S_g = Z_g^\top Z_g`, :math:`Z_g^\top X_g` and :math:`Z_g^\top y_g`
    (:class:`BlockStatistics`):

    .. math::

        \log|V| = \sum_g \log|M_g|, \qquad
        X^\top V^{-1} X = X^\top X - \sum_g (Z_g^\top X_g)^\top W_g (Z_g^\top X_g),

    :math:`X^\top V^{-1} y` and :math:`y^\top V^{-1} y` likewise, with the derived per-group :math:`W_g` and
    :math:`\log|M_g|` (:func:`block_forms`). Groups with the same :math:`S_g` share :math:`W_g`: the kernel
    runs once per distinct :math:`S_g` (one for a balanced design, whatever :math:`G`), and the data's
    per-group products are added up by pattern once, so an evaluation costs :math:`O(U q^2 p^2)` for
    :math:`U` distinct :math:`S_g`. The derivatives follow from :math:`W_g` by matrix calculus in the relative
    covariance :math:`\Sigma_b = T T^\top` (:math:`W_g = (\Sigma_b^{-1} + S_g)^{-1}`): with
    :math:`R = I - W S`, :math:`B = S - S W S`, :math:`E_k = \partial T / \partial\theta_k` and
    :math:`\Sigma_k = E_k T^\top + T E_k^\top`,

    .. math::

        \partial_k W_g = R\, \Sigma_k R^\top, \qquad \partial_k \log|M_g| = \operatorname{tr}(B\, \Sigma_k),

    which equal the sympy derivatives of the block forms (tests), and likewise the second derivatives
    (:meth:`hessian`)."""

    #: the per-pattern sums of :math:`(Z^\top X)_g (Z^\top X)_g^\top` are kept when they have at most this
    #: many entries
    PATTERN_GRAM_MAX = 20_000_000

    def __init__(self, design: Design, reml: bool):
        stats = BlockStatistics.of(design)
        super().__init__(design, reml, stats.shift, stats.scale, stats.beta_shift)
        self.stats = stats
        self.qs = tuple(t.q for t in design.terms)
        self._value = block_kernels(self.qs)
        q, p = stats.q, self.p
        self._upper = [(a, b) for a in range(q) for b in range(a, q)]
        patterns, pattern_of = np.unique(np.stack([stats.S[:, a, b] for a, b in self._upper], axis=1),
                                         axis=0, return_inverse=True)
        self._pattern_of = pattern_of = pattern_of.ravel()
        U = len(patterns)
        self._patterns = [[float(v) for v in row] for row in patterns] if U <= FEW_PATTERNS else None
        self._S = list(patterns.T)
        index = {ab: j for j, ab in enumerate(self._upper)}
        self._full = np.array([[index[min(a, b), max(a, b)] for b in range(q)] for a in range(q)])  # (q, q)
        self._Sfull = patterns[:, self._full]                                  # (U, q, q): each distinct S_g
        self._counts = np.bincount(pattern_of, minlength=U).astype(float)
        self._order = np.argsort(pattern_of, kind="stable")                    # groups pattern by pattern
        self._starts = np.searchsorted(pattern_of[self._order], np.arange(U))
        E, k, offset = np.zeros((self.n_theta, q, q)), 0, 0                   # E_k = dT / dtheta_k
        for lay in self.layouts:
            for r, c in lay.theta_index:
                E[k, offset + r, offset + c] = 1.0
                k += 1
            offset += lay.q
        self._E = E
        self._T_index = tuple(np.array(ix) for ix in zip(*[np.unravel_index(int(np.argmax(Ek)), (q, q)) for Ek in E]))
        EEt = E[:, None] @ E.transpose(0, 2, 1)[None]                          # E_k E_l^T
        self._Skl = EEt + EEt.transpose(1, 0, 2, 3)                             # d2 Sigma_b / dtheta_k dtheta_l
        Zy = stats.Zty
        self._zyzy = self._by_pattern(Zy[:, :, None] * Zy[:, None, :])          # (U, q, q)
        self._zxzy = self._by_pattern(stats.ZtX[:, :, None, :] * Zy[:, None, :, None])   # (U, a, b, p)
        self._zxzx = (self._by_pattern(np.einsum("gap,gbr->gabpr", stats.ZtX, stats.ZtX))
                      if U * q * q * p * p <= self.PATTERN_GRAM_MAX else None)  # (U, a, b, p, r)

    def _by_pattern(self, per_group: np.ndarray) -> np.ndarray:
        """Per-group arrays (G, ...) added up over the groups that share each distinct S_g: (U, ...)."""
        if len(self._starts) == len(self._order):
            return per_group[self._order]
        return np.add.reduceat(per_group[self._order], self._starts, axis=0)

    def _gram(self, Wp: np.ndarray) -> np.ndarray:
        """sum_g (Z^T X)_g^T Wp[pattern of g] (Z^T X)_g for per-pattern q x q matrices Wp (..., U, q, q)."""
        lead, (U, q) = Wp.shape[:-3], Wp.shape[-3:-1]
        p = self.p
        if self._zxzx is not None:
            return (Wp.reshape(-1, U * q * q) @ self._zxzx.reshape(U * q * q, p * p)).reshape(*lead, p, p)
        Z = self.stats.ZtX
        return np.einsum("gap,...gab,gbr->...pr", Z, Wp[..., self._pattern_of, :, :], Z, optimize=True)

    def _kernel(self, theta) -> np.ndarray:
        """The derived [W entries, log|M|] on each distinct S_g, (outputs, U) (in Python floats when few)."""
        theta = tuple(float(t) for t in theta)
        if self._patterns is not None:
            return np.array([self._value(theta, S) for S in self._patterns], dtype=float).T
        U = len(self._S[0])
        return np.stack([v if isinstance(v, np.ndarray) and v.shape == (U,) else np.full(U, float(v))
                         for v in self._value(theta, self._S)])

    def state(self, theta) -> DevianceState:
        s = self.stats
        theta = np.asarray(theta, dtype=float)
        out = self._kernel(theta)
        Wp = np.moveaxis(out[:-1][self._full], -1, 0)                           # (U, q, q)
        w = Wp.ravel()
        A = s.XtX - self._gram(Wp)
        c = s.Xty - w @ self._zxzy.reshape(len(w), -1)
        yVy = s.yty - float(w @ self._zyzy.ravel())
        beta, rss, logdetA = self._profile(theta, A, c, yVy)
        e = s.Zty - s.ZtX @ beta                                  # Z_g^T (y_g - X_g beta)
        b = np.einsum("gab,gb->ga", Wp[self._pattern_of], e)      # Lambda u = W_g Z_g^T r_g, per group
        return DevianceState(theta=theta, A=A, beta=beta, rss=rss, logdetM=float(self._counts @ out[-1]),
                             logdetA=logdetA, b=self._layout(b), work=dict(e=e, W=Wp))

    def conditional_variances(self, st: DevianceState) -> np.ndarray:
        r""":math:`\operatorname{diag}(W_g) = \operatorname{diag}(T M_g^{-1} T^\top)` per group."""
        return self._layout(np.diagonal(st.work["W"], axis1=1, axis2=2)[self._pattern_of])

    def _layout(self, b: np.ndarray) -> np.ndarray:
        """Per-group (G, q) modes to Z's columns (term by term, level-major)."""
        out, col = [], 0
        for lay in self.layouts:
            out.append(b[:, col:col + lay.q].ravel())
            col += lay.q
        return np.concatenate(out)

    def _first_order(self, st: DevianceState) -> dict:
        r"""Per pattern: :math:`R = I - W S`, :math:`\Sigma_k`, :math:`\partial_k W = R \Sigma_k R^\top`,
        :math:`B = S - S W S`; and the residual products :math:`\sum_g e_g e_g^\top` and
        :math:`\sum_g (Z^\top X)_g e_g^\top` by pattern (computed once per state)."""
        if "first" not in st.work:
            S, W, q = self._Sfull, st.work["W"], self._Sfull.shape[1]
            T = np.zeros((q, q))
            T[self._T_index] = st.theta
            R = np.eye(q) - W @ S
            ET = self._E @ T.T
            Sk = ET + ET.transpose(0, 2, 1)                                     # (k, q, q)
            Rt = R.transpose(0, 2, 1)
            e = st.work["e"]
            st.work["first"] = dict(
                R=R, Rt=Rt, Sk=Sk, dW=R[:, None] @ Sk[None] @ Rt[:, None], B=S - S @ W @ S,
                EE=self._by_pattern(e[:, :, None] * e[:, None, :]),
                Ze=self._by_pattern(self.stats.ZtX[:, :, None, :] * e[:, None, :, None]))
        return st.work["first"]

    def derivatives(self, st: DevianceState) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        r""":math:`\partial_k \log|M| = \sum_g \operatorname{tr}(B_g \Sigma_k)`,
        :math:`\partial_k \mathrm{RSS} = -\sum_g e_g^\top \partial_k W_g\, e_g` and
        :math:`\partial_k A = -\sum_g (Z^\top X)_g^\top\, \partial_k W_g\, (Z^\top X)_g`, with
        :math:`e_g = Z_g^\top (y_g - X_g \beta)`."""
        f = self._first_order(st)
        dW = f["dW"]                                                            # (U, k, q, q)
        dlogdet = np.einsum("ab,kba->k", np.tensordot(self._counts, f["B"], axes=1), f["Sk"])
        drss = -np.einsum("ukab,uab->k", dW, f["EE"])
        dA = -self._gram(dW.transpose(1, 0, 2, 3))
        return dlogdet, drss, dA

    def hessian(self, st: DevianceState) -> np.ndarray:
        r"""The Hessian :math:`d''` of the profiled deviance (assembled as ``_profiled_hessian`` says), per
        distinct :math:`S_g` from :math:`\Sigma_{kl} = E_k E_l^\top + E_l E_k^\top` and

        .. math::

            \partial^2_{kl} W_g &= R\, \Sigma_{kl} R^\top - \partial_l W_g\, S\, \Sigma_k R^\top
                - R\, \Sigma_k S\, \partial_l W_g, \\
            \partial^2_{kl} \log|M_g| &= \operatorname{tr}(B\, \Sigma_{kl})
                - \operatorname{tr}(S\, \partial_l W_g\, S\, \Sigma_k),

        and :math:`\beta`'s movement with :math:`\theta` through
        :math:`h_k = \partial_k A\, \beta - \partial_k c = \sum_g (Z^\top X)_g^\top\, \partial_k W_g\, e_g`.
        :math:`\partial^2 W` is only needed in sums :math:`\sum_g \langle Y_g, \partial^2_{kl} W_g \rangle`
        (:math:`Y_g = e_g e_g^\top` for the RSS, the products of :math:`Z^\top X`'s columns for :math:`A`),
        which ``_against_d2W`` forms without a (k, k, q, q) array per group."""
        f = self._first_order(st)
        S, k, p = self._Sfull, self.n_theta, self.p
        U, q = S.shape[:2]
        Sk, dW = f["Sk"], f["dW"]
        SdWS = S[:, None] @ dW @ S[:, None]
        d2logdet = (np.einsum("ab,klba->kl", np.tensordot(self._counts, f["B"], axes=1), self._Skl)
                    - np.einsum("lab,kba->kl", np.tensordot(self._counts, SdWS, axes=1), Sk))
        d2rss = -self._against_d2W(f, f["EE"][:, None])[0]
        h = dW.transpose(1, 0, 2, 3).reshape(k, U * q * q) @ f["Ze"].reshape(U * q * q, p)
        d2A = None
        if self.reml and p:
            if self._zxzx is not None:
                Y = self._zxzx.transpose(0, 3, 4, 1, 2).reshape(U, p * p, q, q)
                d2A = -self._against_d2W(f, Y).reshape(p, p, k, k).transpose(2, 3, 0, 1)
            else:                       # the per-pattern products would not fit: d2W itself, summed by group
                R, Rt = f["R"], f["Rt"]
                G = dW[:, None, :] @ (S[:, None] @ Sk[None] @ Rt[:, None])[:, :, None]
                d2W = R[:, None, None] @ self._Skl[None] @ Rt[:, None, None] - G - G.transpose(0, 1, 2, 4, 3)
                d2A = -self._gram(d2W.transpose(1, 2, 0, 3, 4))
        return self._profiled_hessian(st, d2logdet, d2rss, h, d2A)

    def _against_d2W(self, f: dict, Y: np.ndarray) -> np.ndarray:
        r""":math:`\sum_u \langle Y_{uj}, \partial^2_{kl} W_u \rangle` for symmetric weights :math:`Y`
        (U, J, q, q), as (J, k, k), from :math:`\langle Y, R \Sigma_{kl} R^\top \rangle =
        \langle R^\top Y R, \Sigma_{kl} \rangle` and :math:`\langle Y, \partial_l W S \Sigma_k R^\top +
        (\cdot)^\top \rangle = 2 \operatorname{tr}(R^\top Y\, \partial_l W S\, \Sigma_k)`, each summed over
        the patterns before the contraction with :math:`\Sigma`."""
        R, Rt, Sk, dW, S = f["R"], f["Rt"], f["Sk"], f["dW"], self._Sfull
        U, J, q = Y.shape[0], Y.shape[1], Y.shape[2]
        k = Sk.shape[0]
        RtY = np.einsum("uab,ujbc->ujac", Rt, Y)                                  # (U, J, q, q)
        RtYR = (RtY.transpose(1, 2, 0, 3).reshape(J * q, U * q) @ R.reshape(U * q, q)).reshape(J, q, q)
        first = np.einsum("jab,klab->jkl", RtYR, self._Skl)                       # sum_u R^T Y R
        dWS = dW @ S[:, None]                                                     # (U, k, q, q)
        # sum_u (R^T Y)_uj dW_ul S_u as one matrix product over (u, b)
        Z = (RtY.transpose(1, 2, 0, 3).reshape(J * q, U * q)
             @ dWS.transpose(0, 2, 1, 3).reshape(U * q, k * q)).reshape(J, q, k, q).transpose(0, 2, 1, 3)
        return first - 2.0 * np.einsum("jlab,kba->jkl", Z, Sk)


def lambda_pattern(layouts) -> list[tuple[np.ndarray, np.ndarray]]:
    r"""Where each :math:`\theta_k` sits in :math:`\Lambda` (Z's column layout): the (rows, columns) of
    :math:`E_k = \partial\Lambda / \partial\theta_k`, one entry per level of its term."""
    out = []
    for lay in layouts:
        base = lay.offset + np.arange(lay.n_levels) * lay.q
        out += [(base + r, base + c) for r, c in lay.theta_index]
    return out


def _stacked(pattern) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All E_k's entries at once: rows, columns and which theta each is."""
    rows, cols = (np.concatenate(v) for v in zip(*pattern))
    which = np.concatenate([np.full(len(r), k) for k, (r, _) in enumerate(pattern)])
    return rows, cols, which


# ------------------------------------------------------------------------- any Z, few random effects: dense M
#: at most this many random effects in all are evaluated with dense matrices (:class:`DenseDeviance`)
DENSE_MAX = 120


class DenseDeviance(ThetaDeviance):
    r"""The profiled deviance for any random terms when they have few random effects in all
    (:math:`w \le` ``DENSE_MAX``): the same :math:`M = \Lambda^\top Z^\top Z \Lambda + I` and formulas as
    :class:`SparseDeviance`, held in dense arrays (one Cholesky factor of :math:`M` per evaluation, no sparse
    bookkeeping). With :math:`G = M^{-1} \Lambda^\top Z^\top Z`, :math:`v = Z^\top V^{-1} (y - X\hat\beta)`
    and :math:`Q = Z^\top V^{-1} X`, and :math:`E_k` the 0/1 pattern of :math:`\theta_k` in :math:`\Lambda`:

    .. math::

        \partial \log|M| / \partial\theta_k &= \operatorname{tr}(M^{-1}\, \partial M_k)
            = 2 \textstyle\sum_{(i,j) \in E_k} G_{ji}, \\
        \partial\mathrm{RSS} / \partial\theta_k &= -2 \textstyle\sum_{(i,j) \in E_k} v_i\, (\Lambda^\top v)_j, \\
        \partial A_k &= -\textstyle\sum_{(i,j) \in E_k} \bigl(Q_{i\cdot}^\top (\Lambda^\top Q)_{j\cdot}
            + \text{its transpose}\bigr)."""

    def __init__(self, design: Design, reml: bool):
        X = np.asarray(design.X, dtype=float)
        shift, scale, beta_shift = response_scaling(design.y, X)
        super().__init__(design, reml, shift, scale, beta_shift)
        y = (design.y - shift) / scale
        Z = random_effects_matrix(design)
        self.width = Z.shape[1]
        self.ZtZ = np.asarray((Z.T @ Z).toarray())
        self.ZtX, self.Zty = np.asarray(Z.T @ X), np.asarray(Z.T @ y).ravel()
        self.XtX, self.Xty, self.yty = X.T @ X, X.T @ y, float(y @ y)
        self._by_theta = lambda_pattern(self.layouts)                   # E_k's (row, column) indices
        self._rows, self._cols, self._which = _stacked(self._by_theta)
        self._eye = np.eye(self.width)

    def _lambda(self, theta) -> np.ndarray:
        L = np.zeros((self.width, self.width))
        L[self._rows, self._cols] = np.asarray(theta, dtype=float)[self._which]
        return L

    def state(self, theta) -> DevianceState:
        theta = np.asarray(theta, dtype=float)
        L = self._lambda(theta)
        ZtZL = self.ZtZ @ L
        M = L.T @ ZtZL + self._eye
        try:
            R = scipy.linalg.cholesky(M, lower=True, check_finite=False)
        except np.linalg.LinAlgError:
            raise NumericalError(f"Lambda^T Z^T Z Lambda + I lost positive definiteness at theta = {theta}") from None
        LZX, LZy = L.T @ self.ZtX, L.T @ self.Zty
        sol = cholesky_solve(R, np.column_stack([LZX, LZy]))
        A, beta, rss, logdetA, u = self._woodbury_profile(theta, LZX, LZy, sol)
        return DevianceState(theta=theta, A=A, beta=beta, rss=rss, logdetM=2.0 * float(np.log(np.diag(R)).sum()),
                             logdetA=logdetA, b=L @ u, work=dict(L=L, R=R, ZtZL=ZtZL))

    def _minv(self, st: DevianceState) -> np.ndarray:
        if "Minv" not in st.work:
            st.work["Minv"] = cholesky_solve(st.work["R"], self._eye)
        return st.work["Minv"]

    def conditional_variances(self, st: DevianceState) -> np.ndarray:
        L = st.work["L"]
        return np.einsum("ij,jk,ik->i", L, self._minv(st), L)

    def derivatives(self, st: DevianceState) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        L, ZtZL, R = st.work["L"], st.work["ZtZL"], st.work["R"]
        Minv = self._minv(st)
        G = Minv @ ZtZL.T                                     # M^-1 Lambda^T Z^T Z
        k, rows, cols, which = self.n_theta, self._rows, self._cols, self._which
        dlogdet = 2.0 * np.bincount(which, weights=G[cols, rows], minlength=k)
        # Z^T V^-1 w = Z^T w - Z^T Z Lambda M^-1 Lambda^T Z^T w, for w = y - X beta and the columns of X
        rhs = np.column_stack([self.Zty - self.ZtX @ st.beta, self.ZtX])
        Zt = rhs - ZtZL @ cholesky_solve(R, L.T @ rhs)
        LtZt = L.T @ Zt
        st.work["ZtV"] = (Zt, LtZt)
        v, Lv = Zt[:, 0], LtZt[:, 0]
        drss = -2.0 * np.bincount(which, weights=v[rows] * Lv[cols], minlength=k)
        Q, LQ = Zt[:, 1:], LtZt[:, 1:]
        dA = np.stack([Q[r].T @ LQ[c] for r, c in self._by_theta])
        return dlogdet, drss, -(dA + dA.transpose(0, 2, 1))

    def hessian(self, st: DevianceState) -> np.ndarray:
        r"""The Hessian :math:`d''` of the profiled deviance (assembled as ``_profiled_hessian`` says), with
        :math:`P = M^{-1}`, :math:`\partial_k M = E_k^\top C \Lambda + \Lambda^\top C E_k` and
        :math:`\partial^2_{kl} M = E_k^\top C E_l + E_l^\top C E_k` held densely (:math:`C = Z^\top Z`):

        .. math::

            \partial^2_{kl} \log|M| = 2 \langle P, E_k^\top C E_l \rangle
                - \operatorname{tr}(P\, \partial_l M\, P\, \partial_k M),

        and the residual pieces from ``_residual_second_order``."""
        self.cached_derivatives(st)
        L, ZtZL, R = st.work["L"], st.work["ZtZL"], st.work["R"]
        P, C, k = self._minv(st), self.ZtZ, self.n_theta
        PdM = []
        for r, c in self._by_theta:
            EtCL = np.zeros_like(ZtZL)
            EtCL[c] = ZtZL[r]
            PdM.append(P @ (EtCL + EtCL.T))
        d2logdet = np.empty((k, k))
        for i, (ri, ci) in enumerate(self._by_theta):
            for j, (rj, cj) in enumerate(self._by_theta):
                d2logdet[i, j] = (2.0 * np.sum(P[np.ix_(ci, cj)] * C[np.ix_(ri, rj)])
                                  - np.sum(PdM[j] * PdM[i].T))

        def zt_vinv_z(x):
            Cx = C @ x
            return Cx - ZtZL @ cholesky_solve(R, L.T @ Cx)

        d2rss, h, d2A = self._residual_second_order(L, *st.work["ZtV"], zt_vinv_z)
        return self._profiled_hessian(st, (d2logdet + d2logdet.T) / 2, d2rss, h, d2A)


# --------------------------------------------------------------------------- any Z: sparse Z^T Z, M by blocks
#: at most this many random effects outside the term with the most (the dense Schur complement)
SCHUR_MAX = 5000
#: levels of the largest term handled at once when :math:`M^{-1}` is formed on :math:`M`'s pattern
LEVEL_CHUNK = 4096
#: :math:`H = F S^{-1}` is kept in the state for the Hessian when it has at most this many entries
H_KEEP = 6_000_000
#: :class:`SparseDeviance`'s block forms of :math:`\log|M|'` and the Hessian need :math:`T^{-1}`: below this
#: smallest :math:`|T_{ii}|` (or above this condition number of :math:`T`) the gradient is summed on
#: :math:`M`'s pattern and the Hessian is central differences of the analytic gradient instead
HESSIAN_T_MIN, HESSIAN_T_COND = 1e-5, 1e7


def _inverse_from_cholesky(R: np.ndarray) -> np.ndarray:
    """S^-1 from S's lower Cholesky factor R (LAPACK potri: half the work of solving S X = I)."""
    inv, info = scipy.linalg.lapack.dpotri(np.asfortranarray(R), lower=1)
    if info != 0:
        raise NumericalError("the Schur complement of M is singular")
    return np.tril(inv) + np.tril(inv, -1).T


class SparseDeviance(ThetaDeviance):
    r"""The profiled deviance for any random terms (nested, crossed), with :math:`Z^\top Z` sparse
    (scipy.sparse).

    :math:`\Lambda = \sum_k \theta_k E_k` is linear in :math:`\theta`, so
    :math:`M = I + \sum_{kl} \theta_k \theta_l P_{kl}` with the constant sparse
    :math:`P_{kl} = E_k^\top Z^\top Z E_l`, all held on :math:`M`'s one sparsity pattern: an evaluation
    starts from a weighted sum of their non-zeros. :math:`M` is factorised by blocks, the :math:`w_1`
    columns of the term with the most random effects first: its block :math:`M_{11}` is block-diagonal
    (:math:`q_1 \times q_1` per level: each observation has one level of it), so with
    :math:`F = M_{11}^{-1} M_{12}` and the Schur complement :math:`S = M_{22} - M_{12}^\top F` (dense
    :math:`w_2 \times w_2`, Cholesky)

    .. math::

        \log|M| = \sum_\text{levels} \log|M_{11,l}| + \log|S|,

        M^{-1} = \begin{bmatrix} M_{11}^{-1} + F S^{-1} F^\top & -F S^{-1} \\
                                 -S^{-1} F^\top & S^{-1} \end{bmatrix}

    (the fill a sparse Cholesky of a crossed design makes too). The derivatives:
    :math:`\operatorname{tr}(M^{-1}\, \partial M_k) = 2 \sum_l \theta_l \operatorname{tr}(M^{-1} P_{kl})`, which
    needs :math:`M^{-1}` only on the pattern; :math:`\partial\mathrm{RSS} = -r^\top Z\, \partial(\Lambda\Lambda^\top) Z^\top r`
    and :math:`\partial A = -P^\top Z\, \partial(\Lambda\Lambda^\top) Z^\top P`, with
    :math:`\partial(\Lambda\Lambda^\top) = \sum_l \theta_l (E_k E_l^\top + E_l E_k^\top)`
    (:math:`r = V^{-1} (y - X\hat\beta)`, :math:`P = V^{-1} X`). The Hessian (:meth:`hessian`) uses the
    same blocks of :math:`M^{-1}`.
    """

    def __init__(self, design: Design, reml: bool):
        X = np.asarray(design.X, dtype=float)
        shift, scale, beta_shift = response_scaling(design.y, X)
        super().__init__(design, reml, shift, scale, beta_shift)
        y = (design.y - shift) / scale
        big = self._big = max(self.layouts, key=lambda lay: lay.width)
        w = self.width = sum(lay.width for lay in self.layouts)
        self.q1, self.w1, self.w2 = big.q, big.width, w - big.width
        if self.w2 > SCHUR_MAX:
            raise ModelError(f"{self.w2} random effects outside the largest term: more than the {SCHUR_MAX} "
                             "this dense Schur complement allows")
        first = np.arange(big.offset, big.offset + big.width)
        self._perm = np.concatenate([first, np.setdiff1d(np.arange(w), first)])   # new -> original column
        position = np.empty(w, dtype=np.intp)
        position[self._perm] = np.arange(w)
        Z = random_effects_matrix(design)[:, self._perm]
        ZtZ = (Z.T @ Z).tocsc()
        self.ZtZ, self.ZtX, self.Zty = ZtZ, np.asarray(Z.T @ X), np.asarray(Z.T @ y)
        self.XtX, self.Xty, self.yty = X.T @ X, X.T @ y, float(y @ y)
        self._by_theta = [(position[r], position[c]) for r, c in lambda_pattern(self.layouts)]   # in M's order
        self._lam_rows, self._lam_cols, self._lam_which = _stacked(self._by_theta)
        # Lambda's and Lambda^T's CSR structure, fixed: an evaluation only fills in theta
        self._lam = self._csr_structure(self._lam_rows, self._lam_cols)
        self._lamT = self._csr_structure(self._lam_cols, self._lam_rows)
        # E_k^T x puts x's rows r_k at c_k ((r_k, c_k) = E_k's entries, the r_k distinct)
        k = self.n_theta
        self._EtZtX, self._EtZty = np.zeros((k, w, self.p)), np.zeros((k, w))
        where = np.full((k, w), -1)
        for j, (r, c) in enumerate(self._by_theta):
            self._EtZtX[j, c], self._EtZty[j, c] = self.ZtX[r], self.Zty[r]
            where[j, r] = c
        # P_kl = E_k^T Z^T Z E_l: each non-zero C_st of C = Z^T Z lands at (where_k[s], where_l[t]), if both exist
        C = ZtZ.tocoo()
        P = []
        for a in range(k):
            ra = where[a][C.row]
            row = []
            for b in range(k):
                cb = where[b][C.col]
                keep = (ra >= 0) & (cb >= 0)
                row.append((ra[keep], cb[keep], C.data[keep]))
            P.append(row)
        self._pattern(P)

    def _csr_structure(self, rows: np.ndarray, cols: np.ndarray) -> tuple:
        """(which theta each stored entry takes, indices, indptr) of the w x w CSR matrix with entries at
        (rows, cols), numbered as ``_lam_which``."""
        order = np.lexsort((cols, rows))
        indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=self.width))]).astype(np.int32)
        return self._lam_which[order], cols[order].astype(np.int32), indptr

    def _lambda(self, theta, transpose: bool = False) -> scipy.sparse.csr_matrix:
        """Lambda (or Lambda^T) at theta as a CSR matrix on its fixed structure."""
        which, indices, indptr = self._lamT if transpose else self._lam
        return scipy.sparse.csr_matrix((np.asarray(theta, dtype=float)[which], indices, indptr),
                                       shape=(self.width, self.width))

    def _pattern(self, P) -> None:
        """M's pattern (the union of the P_kl, given as (rows, columns, values), and the diagonal), each
        P_kl's values on it, and where each non-zero sits in the blocks M_11 (level, row, column), M_12, M_21
        and M_22."""
        w, w1, q1 = self.width, self.w1, self.q1
        key = lambda r, c: c.astype(np.int64) * w + r                    # noqa: E731  (column-major)
        keys = np.unique(np.concatenate([key(np.arange(w), np.arange(w))]
                                        + [key(r, c) for row in P for r, c, _ in row]))
        rows, cols = (keys % w).astype(np.intp), (keys // w).astype(np.intp)
        self._P = np.zeros((self.n_theta, self.n_theta, len(keys)))
        for k, row in enumerate(P):
            for l, (r, c, v) in enumerate(row):
                self._P[k, l, np.searchsorted(keys, key(r, c))] = v
        self._eye = (rows == cols).astype(float)
        self._rows, self._cols = rows, cols
        self._m11 = np.flatnonzero((rows < w1) & (cols < w1))
        self._m12 = np.flatnonzero((rows < w1) & (cols >= w1))
        self._m21 = np.flatnonzero((rows >= w1) & (cols < w1))
        self._m22 = np.flatnonzero((rows >= w1) & (cols >= w1))
        if np.any(rows[self._m11] // q1 != cols[self._m11] // q1):
            raise AssertionError("the largest term's block of M is not block-diagonal by level")
        # M_12's CSR structure, fixed for every theta: an evaluation only fills in its values
        i = self._m12
        r12, c12 = rows[i], cols[i] - w1
        order = np.lexsort((c12, r12))
        self._m12_csr = i[order]
        self._m12_indices = c12[order].astype(np.int32)
        self._m12_indptr = np.concatenate([[0], np.cumsum(np.bincount(r12, minlength=w1))]).astype(np.int32)
        self._m12_level = (r12[order] // q1).astype(np.intp)

    def _factor(self, theta) -> dict:
        """M's blocks at theta: M_11^-1 per level, F = M_11^-1 M_12, the Cholesky factor of S, log|M|."""
        k = self.n_theta
        data = self._eye + np.outer(theta, theta).ravel() @ self._P.reshape(k * k, -1)
        w1, w2, q1 = self.w1, self.w2, self.q1
        rows, cols = self._rows, self._cols
        M11 = np.zeros((w1 // q1, q1, q1))
        i = self._m11
        M11[rows[i] // q1, rows[i] % q1, cols[i] % q1] = data[i]
        try:
            R11 = np.linalg.cholesky(M11)
        except np.linalg.LinAlgError:
            raise NumericalError(f"Lambda^T Z^T Z Lambda + I lost positive definiteness at theta = {theta}") from None
        logdet = 2.0 * float(np.log(np.diagonal(R11, axis1=1, axis2=2)).sum())
        M12 = scipy.sparse.csr_matrix((data[self._m12_csr], self._m12_indices, self._m12_indptr), shape=(w1, w2))
        if q1 == 1:                         # M_11 diagonal: F is M_12 with its rows divided by M_11's
            M11inv = 1.0 / M11
            B = None
            F = scipy.sparse.csr_matrix((M12.data * M11inv[self._m12_level, 0, 0], self._m12_indices,
                                         self._m12_indptr), shape=(w1, w2))
        else:
            M11inv = np.linalg.inv(M11)
            B = scipy.sparse.bsr_matrix((M11inv, np.arange(w1 // q1), np.arange(w1 // q1 + 1)), shape=(w1, w1))
            F = (B @ M12).tocsr()
        FT = F.T.tocsr()
        S = np.zeros((w2, w2))
        i = self._m22
        S[rows[i] - w1, cols[i] - w1] = data[i]
        S -= (FT @ M12).toarray()
        try:
            RS = scipy.linalg.cholesky(S, lower=True, check_finite=False) if w2 else S
        except np.linalg.LinAlgError:
            raise NumericalError(f"the Schur complement of M is not positive definite at theta = {theta}") from None
        logdet += 2.0 * float(np.log(np.diag(RS)).sum())
        return dict(B=B, M11inv=M11inv, F=F, FT=FT, RS=RS, logdet=logdet)

    def _solve(self, f: dict, R: np.ndarray) -> np.ndarray:
        """M^-1 R by block elimination: x_2 = S^-1 (R_2 - F^T R_1), x_1 = M_11^-1 R_1 - F x_2."""
        R1, R2 = R[:self.w1], R[self.w1:]
        x2 = scipy.linalg.cho_solve((f["RS"], True), R2 - f["FT"] @ R1, check_finite=False) if self.w2 else R2
        B1 = (f["M11inv"][:, 0, 0].reshape((-1,) + (1,) * (R1.ndim - 1)) * R1 if f["B"] is None
              else f["B"] @ R1)
        return np.concatenate([B1 - f["F"] @ x2, x2])

    def state(self, theta) -> DevianceState:
        theta = np.asarray(theta, dtype=float)
        f = self._factor(theta)
        LZX = np.einsum("k,kwp->wp", theta, self._EtZtX)             # Lambda^T Z^T X
        LZy = theta @ self._EtZty                                      # Lambda^T Z^T y
        sol = self._solve(f, np.column_stack([LZX, LZy]))
        A, beta, rss, logdetA, u = self._woodbury_profile(theta, LZX, LZy, sol)
        b = np.empty(self.width)
        b[self._perm] = self._lambdas(f, theta)[0] @ u                    # Lambda u, Z's column order
        return DevianceState(theta=theta, A=A, beta=beta, rss=rss, logdetM=f["logdet"], logdetA=logdetA,
                             b=b, work=f)

    def conditional_variances(self, st: DevianceState) -> np.ndarray:
        r""":math:`(\Lambda M^{-1} \Lambda^\top)_{ii}` needs :math:`M^{-1}` only within each level's block, which lies
        on :math:`M`'s pattern."""
        Minv = scipy.sparse.csr_matrix((self._inverse_on_pattern(st.work), (self._rows, self._cols)),
                                       shape=(self.width, self.width))
        L = self._lambdas(st.work, st.theta)[0]
        out = np.empty(self.width)
        out[self._perm] = np.asarray((L @ Minv).multiply(L).sum(axis=1)).ravel()
        return out

    def _schur_inverse(self, f: dict) -> np.ndarray:
        """S^-1 (dense w_2 x w_2), computed once per state."""
        if "Sinv" not in f:
            f["Sinv"] = _inverse_from_cholesky(f["RS"]) if self.w2 else np.zeros((0, 0))
        return f["Sinv"]

    def _chunks(self, f: dict):
        """(start, stop, F_c, H_c = F_c S^-1) for the rows of the largest term, a chunk of levels at a time;
        kept in the state when all of H fits in ``H_KEEP`` numbers (the Hessian reuses the gradient's)."""
        if "H" in f:
            yield from f["H"]
            return
        Sinv, F = self._schur_inverse(f), f["F"]
        keep = [] if self.w1 * self.w2 <= H_KEEP else None
        step = LEVEL_CHUNK * self.q1
        for start in range(0, self.w1, step):
            stop = min(start + step, self.w1)
            Fc = F[start:stop]
            item = (start, stop, Fc, np.asarray(Fc @ Sinv))
            if keep is not None:
                keep.append(item)
            yield item
        if keep is not None:
            f["H"] = keep

    def _inverse_on_pattern(self, f: dict) -> np.ndarray:
        """(M^-1)_ij at every non-zero (i, j) of M's pattern, from the block inverse: S^-1 on M_22's pattern,
        -H = -F S^-1 on M_12's (H = F S^-1 from the sparse F, a chunk of levels at a time), and
        M_11^-1 + (F S^-1 F^T)_ij on M_11's, each (H F^T)_ij summed over the non-zeros of F's row j."""
        w1, q1 = self.w1, self.q1
        rows, cols = self._rows, self._cols
        out = np.empty(len(rows))
        Sinv = self._schur_inverse(f)
        i = self._m22
        out[i] = Sinv[rows[i] - w1, cols[i] - w1]
        for start, stop, Fc, Hc in self._chunks(f):
            i = self._m12[(rows[self._m12] >= start) & (rows[self._m12] < stop)]
            out[i] = -Hc[rows[i] - start, cols[i] - w1]
            i = self._m21[(cols[self._m21] >= start) & (cols[self._m21] < stop)]
            out[i] = -Hc[cols[i] - start, rows[i] - w1]
            i = self._m11[(rows[self._m11] >= start) & (rows[self._m11] < stop)]
            r, c = rows[i] - start, cols[i] - start
            counts = np.diff(Fc.indptr)[c]
            pair = np.repeat(np.arange(len(i)), counts)
            first = np.repeat(Fc.indptr[c] - np.cumsum(counts) + counts, counts)
            at = first + np.arange(len(pair))
            quad = np.bincount(pair, weights=Fc.data[at] * Hc[r[pair], Fc.indices[at]], minlength=len(i))
            out[i] = f["M11inv"][rows[i] // q1, rows[i] % q1, cols[i] % q1] + quad
        return out

    def derivatives(self, st: DevianceState) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        theta, f = st.theta, st.work
        k = self.n_theta
        _, invertible, terms, small = self._relative(f, theta)
        if invertible:                      # tr(M^-1 dM_k) = 2 (tr D_k - tr(M^-1 D_k)), D_k = Lambda^-1 E_k
            Pbar, _ = self._diagonal_sums(f)
            trace = np.array([2.0 * (self.layouts[t].n_levels * np.trace(d) - np.sum(Pbar[t].T * d))
                              for t, d in zip(terms, small)])
        else:
            trace = 2.0 * (self._P.reshape(k * k, -1) @ self._inverse_on_pattern(f)).reshape(k, k) @ theta
        # Z^T V^-1 v = Z^T v - Z^T Z Lambda M^-1 Lambda^T Z^T v, for v = y - X beta and the columns of X
        L, LT = self._lambdas(f, theta)
        Zt_res = self.Zty - self.ZtX @ st.beta
        rhs = np.column_stack([Zt_res, self.ZtX])
        Zt = rhs - self.ZtZ @ (L @ self._solve(f, LT @ rhs))            # [Z^T r, Z^T P]
        LtZt = LT @ Zt
        f["ZtV"] = (Zt, LtZt)
        # sum over E_k's entries (i, j): dRSS_k = -2 (Z^T r)_i (Lambda^T Z^T r)_j, dA_k likewise for P
        rows, cols = self._lam_rows, self._lam_cols
        drss = -2.0 * np.bincount(self._lam_which, weights=Zt[rows, 0] * LtZt[cols, 0], minlength=k)
        QQ = np.stack([Zt[r, 1:].T @ LtZt[c, 1:] for r, c in self._by_theta])
        return trace, drss, -(QQ + QQ.transpose(0, 2, 1))

    def _zt_vinv_z(self, f: dict, theta, x: np.ndarray) -> np.ndarray:
        r""":math:`Z^\top V^{-1} Z\, x = C x - C \Lambda M^{-1} \Lambda^\top C x` (:math:`C = Z^\top Z`, Woodbury)."""
        Cx = self.ZtZ @ x
        L, LT = self._lambdas(f, theta)
        return Cx - self.ZtZ @ (L @ self._solve(f, LT @ Cx))

    def hessian(self, st: DevianceState) -> np.ndarray:
        r"""The Hessian :math:`d''` of the profiled deviance (assembled as ``_profiled_hessian`` says), the
        residual pieces from ``_residual_second_order``. For :math:`\log|M|`, with :math:`P = M^{-1}` and
        :math:`D_k = \Lambda^{-1} E_k` (block-diagonal: :math:`d_k = T^{-1} e_{rc}` in every level of
        :math:`\theta_k`'s term), :math:`\Lambda^\top C E_k = (M - I) D_k`, so
        :math:`\partial_k M = (M - I) D_k + D_k^\top (M - I)` and :math:`\partial^2_{kl} M = E_k^\top C E_l +
        E_l^\top C E_k`; :math:`\operatorname{tr}(P\, \partial^2_{kl} M) - \operatorname{tr}(P\, \partial_l M\,
        P\, \partial_k M)` then reduces (with :math:`P (M - I) = I - P`) to

        .. math::

            \partial^2_{kl} \log|M| &= 2 \bigl[\operatorname{tr}(P D_l D_k) + \operatorname{tr}(P D_k D_l)
                + \operatorname{tr}(P D_k^\top D_l) - \operatorname{tr}(D_l D_k)\bigr] \\
                &\quad - 2 \bigl[\operatorname{tr}(P D_l P D_k) + \operatorname{tr}(P D_l P D_k^\top)\bigr],

        and likewise :math:`\partial_k \log|M| = 2 \bigl(\operatorname{tr} D_k - \operatorname{tr}(P D_k)\bigr)`
        (:meth:`derivatives`). Where a :math:`T` is singular or nearly so (a boundary fit) the whole Hessian
        is central differences of the analytic gradient."""
        theta, f = st.theta, st.work
        if not self._relative(f, theta)[1]:
            return difference_hessian(lambda th: self.gradient(self.state(th)), theta)
        self.cached_derivatives(st)
        d2rss, h, d2A = self._residual_second_order(self._lambdas(f, theta)[0], *f["ZtV"],
                                                    lambda x: self._zt_vinv_z(f, theta, x))
        return self._profiled_hessian(st, self._d2logdet(st), d2rss, h, d2A)

    def _d2logdet(self, st: DevianceState) -> np.ndarray:
        r""":math:`\partial^2 \log|M|` as :meth:`hessian` gives it: the first three traces from the sums
        :math:`\bar P_t` of :math:`P`'s diagonal blocks per term, the last two from ``_trace_tensors``
        contracted with :math:`d_l` and :math:`d_k`."""
        k = self.n_theta
        _, _, terms, small = self._relative(st.work, st.theta)
        Pbar, K = self._trace_tensors(st.work)
        H = np.zeros((k, k))
        for l in range(k):
            for j in range(k):
                tl, tj, dl, dk = terms[l], terms[j], small[l], small[j]
                Klj = K[tl, tj]
                H[j, l] = -np.einsum("rc,rcRC,RC->", dl, Klj, dk + dk.T)
                if tl == tj:
                    P_ = Pbar[tl]
                    H[j, l] += (np.trace(P_ @ dl @ dk) + np.trace(P_ @ dk @ dl) + np.trace(P_ @ dk.T @ dl)
                                - self.layouts[tl].n_levels * np.trace(dl @ dk))
        return H + H.T

    def _lambdas(self, f: dict, theta) -> tuple:
        """Lambda and Lambda^T at the state (CSR), built once per state."""
        if "Lambda" not in f:
            f["Lambda"] = (self._lambda(theta), self._lambda(theta, transpose=True))
        return f["Lambda"]

    def _relative(self, f: dict, theta) -> tuple:
        """(the T_k, whether every T is far enough from singular for the formulas in Lambda^-1, and for each
        theta_k its term and d_k = T^-1 e_rc, the block of D_k = Lambda^-1 E_k in every level), once per state."""
        if "relative" not in f:
            Ts = self.terms(theta)
            invertible = not any(np.min(np.abs(np.diag(T))) < HESSIAN_T_MIN or np.linalg.cond(T) > HESSIAN_T_COND
                                 for T in Ts)
            terms, small = [], []
            if invertible:
                for t, (lay, T) in enumerate(zip(self.layouts, Ts)):
                    Ti = np.linalg.inv(T)
                    for r, c in lay.theta_index:
                        terms.append(t)
                        small.append(np.outer(Ti[:, r], np.eye(lay.q)[c]))
            f["relative"] = (Ts, invertible, terms, small)
        return f["relative"]

    def _term_block(self, t: int) -> int | None:
        """Where term t's columns start in the Schur complement's block (None: the largest term)."""
        lay, big = self.layouts[t], self._big
        if lay is big:
            return None
        return lay.offset if lay.offset < big.offset else lay.offset - big.width

    def _trace_tensors(self, f: dict) -> tuple[list, dict]:
        r"""For every pair of terms :math:`(a, b)`, :math:`K_{ab}[r, c, r', c'] = \operatorname{tr}(P E^a_{rc}
        P E^b_{r'c'})` with :math:`E^a_{rc} = I \otimes e_{rc}` on term :math:`a`'s columns, so that
        :math:`\operatorname{tr}(P A P B) = \sum a_{rc} K_{ab}[r, c, r', c'] b_{r'c'}` for block-diagonal
        :math:`A = I \otimes a`, :math:`B = I \otimes b`; and the sums :math:`\bar P_t` of :math:`P`'s diagonal
        blocks. With :math:`X = P_{ab}` as (levels, :math:`q_a`, levels, :math:`q_b`),
        :math:`K_{ab}[r, c, r', c'] = \sum_{\ell m} X_{\ell r m c'} X_{\ell c m r'}`, from the blocks of
        :math:`P = M^{-1}`: :math:`P_{22} = S^{-1}`, :math:`P_{12} = -H`; for the largest term
        :math:`P_{11} = M_{11}^{-1} + G` with :math:`G = H F^\top` (never formed), whose part
        :math:`\sum_{\ell m} G_{(m, c'), (\ell, r)} G_{(\ell, c), (m, r')} = \langle U^{rc}, (U^{r'c'})^\top \rangle`,
        :math:`U^{rc} = F_r^\top H_c` (the rows of :math:`F` and :math:`H` at offsets r and c within each level),
        and the cross parts need only :math:`G`'s diagonal blocks, summed over :math:`F`'s non-zeros."""
        q1, w2 = self.q1, self.w2
        Sinv = self._schur_inverse(f)
        n_terms = len(self.layouts)
        place = [self._term_block(t) for t in range(n_terms)]
        big = place.index(None)
        K = {}

        def tensor(X, qa, qb, Lb):           # X: (La * qa, Lb * qb) -> K (qa, qa, qb, qb)
            Y = X.reshape(-1, qa, Lb, qb).transpose(1, 3, 0, 2).reshape(qa * qb, -1)
            return (Y @ Y.T).reshape(qa, qb, qa, qb).transpose(0, 2, 3, 1)

        others = [t for t in range(n_terms) if t != big]
        for a in others:
            la = self.layouts[a]
            sa = slice(place[a], place[a] + la.width)
            for b in others:
                lb = self.layouts[b]
                K[a, b] = tensor(Sinv[sa, place[b]:place[b] + lb.width], la.q, lb.q, lb.n_levels)
        Pbar, Gd = self._diagonal_sums(f)
        m = f["M11inv"].reshape(-1, q1, q1)
        U = np.zeros((q1, q1, w2, w2))
        cross = {b: 0.0 for b in others}
        for start, stop, Fc, Hc in self._chunks(f):
            for r in range(q1):
                Fr = Fc[r::q1].T
                for c in range(q1):
                    U[r, c] += Fr @ Hc[c::q1]
            for b in others:
                lb = self.layouts[b]
                cross[b] = cross[b] + tensor(Hc[:, place[b]:place[b] + lb.width], q1, lb.q, lb.n_levels)
        for b in others:
            K[big, b] = cross[b]
            K[b, big] = cross[b].transpose(2, 3, 0, 1)
        K[big, big] = (np.einsum("lCr,lcR->rcRC", m, m) + np.einsum("lCr,lcR->rcRC", m, Gd)
                       + np.einsum("lCr,lcR->rcRC", Gd, m)
                       + np.einsum("rcab,RCba->rcRC", U, U))
        return Pbar, K

    def _diagonal_sums(self, f: dict) -> tuple[list, np.ndarray]:
        r"""The sums :math:`\bar P_t = \sum_\ell (M^{-1})_{\ell\ell}` of :math:`M^{-1}`'s diagonal
        :math:`q_t \times q_t` blocks, per term, and :math:`G = H F^\top`'s diagonal blocks in the largest
        term (levels, :math:`q_1`, :math:`q_1`): :math:`S^{-1}`'s blocks in the second block,
        :math:`M_{11}^{-1} + G` in the first, :math:`G_{\ell, c r} = \sum_n H_{(\ell, c) n} F_{(\ell, r) n}` over
        :math:`F`'s non-zeros. Computed once per state."""
        if "diagonal" in f:
            return f["diagonal"]
        q1, Sinv = self.q1, self._schur_inverse(f)
        Pbar = []
        for t, lay in enumerate(self.layouts):
            s = self._term_block(t)
            if s is None:
                big = t
                Pbar.append(None)
                continue
            block = Sinv[s:s + lay.width, s:s + lay.width].reshape(lay.n_levels, lay.q, lay.n_levels, lay.q)
            Pbar.append(block[np.arange(lay.n_levels), :, np.arange(lay.n_levels), :].sum(axis=0))
        m = f["M11inv"].reshape(-1, q1, q1)
        Gd = np.zeros_like(m)
        for start, stop, Fc, Hc in self._chunks(f):
            C = Fc.tocoo()
            level, R = C.row // q1, C.row % q1
            for c in range(q1):
                v = C.data * Hc[level * q1 + c, C.col]
                Gd[start // q1:stop // q1, c] += np.bincount(level * q1 + R, weights=v,
                                                             minlength=(stop - start)).reshape(-1, q1)
        Pbar[big] = (m + Gd).sum(axis=0)
        f["diagonal"] = (Pbar, Gd)
        return f["diagonal"]


def profiled_deviance(design: Design, reml: bool) -> ThetaDeviance:
    r"""lme4's profiled deviance in :math:`\theta` for ``design``: one criterion, evaluated the cheapest
    way its structure allows -- per-group sums and the derived (1|g) forms for a random intercept or a
    kinship matrix, the derived :math:`q \times q` block forms when the terms share one factor
    (:math:`q \le` ``BLOCK_Q``), dense :math:`M` for few random effects (:class:`DenseDeviance`), else the
    blocked factorisation of :math:`M` (:class:`SparseDeviance`)."""
    if design.kinship is not None or design.is_random_intercept:
        return InterceptDeviance(design, reml)
    if single_factor(design) and sum(t.q for t in design.terms) <= BLOCK_Q:
        return BlockDeviance(design, reml)
    if sum(t.q * t.n_levels for t in design.terms) <= DENSE_MAX and not hasattr(design, "statistics"):
        return DenseDeviance(design, reml)
    return SparseDeviance(design, reml)
