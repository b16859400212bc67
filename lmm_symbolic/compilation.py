"""Compilation: the derived closed forms turned into numpy functions over per-group statistics.

A random-intercept log-likelihood sees the data only through per-group sums (n_g, X_g^T 1, X_g^T y,
X_g^T X_g, y_g^T y_g, 1^T y_g; :mod:`lmm_symbolic.statistics`). The per-group closed forms of
:mod:`lmm_symbolic.derivation` (Eq. 11-12 for a block of size m) are lambdified with ``cse=True`` and
evaluated over all groups at once, so each evaluation costs O(G p^2), not O(n).

Two compiled objects come out of this stage:

* :class:`ProfiledDeviance` -- -2 log L (ML) or the REML criterion as a function of theta = sigma_s / sigma,
  with beta (GLS) and sigma^2 profiled out as lme4 does, with its analytic derivatives in theta;
* :class:`LogLikelihood` -- Eq. 10 as a function of (sigma, sigma_s, beta), with its sympy gradient and
  Hessian.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import sympy as sp

from .derivation import m, random_intercept_block, sigma, sigma_s
from .errors import ModelError, NumericalError
from .specification import Design
from .statistics import GroupStatistics

theta = sp.Symbol("theta", nonnegative=True)


# ------------------------------------------------------------------------------ lambdified kernels
@functools.lru_cache(maxsize=None)
def intercept_kernels():
    """w(m, theta), log|V_g|(m, theta) and their first two theta-derivatives, V = Sigma / sigma^2.

    From the derived block: w = W[0,0] and log|V_g| = log|Sigma_g| - 2 m log sigma at sigma = 1,
    sigma_s = theta (the Woodbury weight and the determinant lemma of Eq. 11-12).
    """
    block = random_intercept_block()
    at = {sigma: 1, sigma_s: theta}
    w = block.W[0, 0].subs(at)
    logdet = (block.logdet - 2 * m * sp.log(sigma)).subs(at)
    exprs = [w, sp.diff(w, theta), sp.diff(w, theta, 2), logdet, sp.diff(logdet, theta),
             sp.diff(logdet, theta, 2)]
    return exprs, sp.lambdify((theta, m), exprs, modules="numpy", cse=True)


def weighted_gram(w: np.ndarray, C: np.ndarray) -> np.ndarray:
    """sum_g w_g c_g c_g^T for the rows c_g of C."""
    return (C * w[:, None]).T @ C


@dataclass(frozen=True)
class ProfileState:
    """Everything the profiled criterion knows at one theta (scaled response units)."""

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
    """-2 log L (ML) or the REML criterion as a function of theta = sigma_s / sigma (lme4's devfun).

    With V = Sigma / sigma^2 (block I + theta^2 J), beta and sigma^2 profiled out:
      ML:   d(theta) = n log(2 pi RSS / n) + log|V| + n
      REML: d(theta) = (n - p) log(2 pi RSS / (n - p)) + log|V| + log|X^T V^-1 X| + (n - p)
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
        """d d/d theta: n_eff RSS'/RSS + log|V|' (+ tr(A^-1 A') for REML), RSS' = -sum_g w'_g e_g^2."""
        drss = -float(st.dw @ st.e ** 2)
        out = self.n_eff * drss / st.rss + st.dlogdet
        if self.reml and self.stats.p:
            dA = -weighted_gram(st.dw, self.stats.Xt1)
            out += float(np.trace(np.linalg.solve(st.A, dA)))
        return out

    def value_and_derivative(self, th) -> tuple[float, np.ndarray]:
        st = self.state(float(np.atleast_1d(th)[0]))
        return self.value(st), np.array([self.derivative(st)])

    def varpar_hessian(self, st: ProfileState, sig: float) -> np.ndarray:
        """Hessian of lmerTest's deviance in varpar = (theta, sigma), beta at its GLS value beta(theta).

        dev = log|V| + RSS/sigma^2 + n log(2 pi sigma^2)  [+ log|A| - p log(2 pi sigma^2) for REML].
        """
        s = self.stats
        Xt1 = s.Xt1
        dA = -weighted_gram(st.dw, Xt1)
        d2A = -weighted_gram(st.d2w, Xt1)
        dc = -Xt1.T @ (st.dw * s.one_y)
        dbeta = np.linalg.solve(st.A, dc - dA @ st.beta) if s.p else np.zeros(0)
        de = -Xt1 @ dbeta
        drss = -float(st.dw @ st.e ** 2)
        d2rss = -float(st.d2w @ st.e ** 2) - 2.0 * float(st.dw @ (st.e * de))
        h_tt = st.d2logdet + d2rss / sig**2
        if self.reml and s.p:
            Ainv_dA = np.linalg.solve(st.A, dA)
            h_tt += float(np.trace(np.linalg.solve(st.A, d2A)) - np.trace(Ainv_dA @ Ainv_dA))
        h_ts = -2.0 * drss / sig**3
        h_ss = 6.0 * st.rss / sig**4 - 2.0 * self.n_eff / sig**2
        return np.array([[h_tt, h_ts], [h_ts, h_ss]])


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
    """Eq. 10, log L(sigma, sigma_s, beta), in the original units of the response, with its gradient and
    Hessian from sympy (the closed form of Eq. 11-12 per group, summed over groups)."""

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
        """d log L / d(sigma, sigma_s, beta)."""
        return self._evaluate(sig, sig_s, beta)[1]

    def hessian(self, sig: float, sig_s: float, beta) -> np.ndarray:
        return self._evaluate(sig, sig_s, beta)[2]


# -------------------------------------------------------------- several terms, slopes, crossed factors
@dataclass(frozen=True)
class TermLayout:
    """Where one random term's parameters sit: its relative Cholesky factor T (q x q, lower triangular for
    a correlated term) fills Lambda = diag(I_G kron T) in the term's block of columns."""

    q: int
    n_levels: int
    offset: int            # first column of the term in Z
    theta_index: tuple[tuple[int, int], ...]   # (row, col) of T for each theta, lme4's column-major order

    @property
    def width(self) -> int:
        return self.q * self.n_levels


def term_layouts(design: Design) -> tuple[TermLayout, ...]:
    layouts, offset = [], 0
    for term in design.terms:
        q = term.q
        index = tuple((r, c) for c in range(q) for r in range(c, q))
        layouts.append(TermLayout(q=q, n_levels=term.n_levels, offset=offset, theta_index=index))
        offset += q * term.n_levels
    return tuple(layouts)


def random_effects_matrix(design: Design):
    """Z (n x sum_k q_k G_k, sparse): row i holds term k's columns at level codes_k[i]."""
    import scipy.sparse

    rows, cols, vals = [], [], []
    n = design.n
    for term, lay in zip(design.terms, term_layouts(design)):
        codes = np.asarray(term.codes)
        for c in range(term.q):
            rows.append(np.arange(n))
            cols.append(lay.offset + codes * term.q + c)
            vals.append(term.Z[:, c])
    width = sum(lay.width for lay in term_layouts(design))
    return scipy.sparse.csc_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                                   shape=(n, width))


class GeneralDeviance:
    """lme4's profiled deviance for any set of random terms (slopes, nested and crossed factors).

    With Lambda(theta) the relative covariance factor (D_k = sigma^2 T_k T_k^T), M = Lambda^T Z^T Z Lambda + I
    and V = I + Z Lambda Lambda^T Z^T, the determinant lemma gives |V| = |M| and Woodbury gives
    X^T V^-1 X = X^T X - X^T Z Lambda M^-1 Lambda^T Z^T X:
      ML:   d = log|M| + n (1 + log(2 pi RSS / n))
      REML: d = log|M| + log|X^T V^-1 X| + (n - p)(1 + log(2 pi RSS / (n - p)))
    RSS = (y - X beta)^T V^-1 (y - X beta) at the GLS beta. The derivative in theta follows from
    d log|M| = tr(M^-1 dM), dRSS = -r^T dV r (envelope), d log|A| = tr(A^-1 dA), dA = -P^T dV P, P = V^-1 X,
    with dLambda/dtheta_k the constant pattern of theta_k.
    """

    def __init__(self, design: Design, reml: bool):
        self.design = design
        self.reml = reml
        self.layouts = term_layouts(design)
        y, X = design.y, design.X
        self.shift = float(np.mean(y)) if design.has_intercept else 0.0
        self.scale = float(np.std(y - self.shift)) or 1.0
        self.y = (y - self.shift) / self.scale
        self.X = X
        Z = random_effects_matrix(design)
        self.ZtZ = (Z.T @ Z).toarray()
        self.ZtX = np.asarray(Z.T @ X)
        self.Zty = np.asarray(Z.T @ self.y)
        self.XtX, self.Xty, self.yty = X.T @ X, X.T @ self.y, float(self.y @ self.y)
        self.n, self.p = design.n, design.p
        self.n_eff = self.n - (self.p if reml else 0)
        self.n_theta = sum(len(lay.theta_index) for lay in self.layouts)
        self._patterns = self._theta_patterns()

    @property
    def lower_bounds(self) -> list[float | None]:
        """0 for the diagonal of each T (standard deviations), unbounded off the diagonal (lme4)."""
        return [0.0 if r == c else None for lay in self.layouts for r, c in lay.theta_index]

    def initial(self) -> np.ndarray:
        return np.array([1.0 if r == c else 0.0 for lay in self.layouts for r, c in lay.theta_index])

    def _theta_patterns(self) -> list[np.ndarray]:
        """dLambda / dtheta_k: the 0/1 pattern each theta occupies (Lambda is linear in theta)."""
        width = self.ZtZ.shape[0]
        out = []
        for lay in self.layouts:
            for r, c in lay.theta_index:
                E = np.zeros((width, width))
                base = lay.offset + np.arange(lay.n_levels) * lay.q
                E[base + r, base + c] = 1.0
                out.append(E)
        return out

    def factor(self, theta) -> np.ndarray:
        """Lambda(theta)."""
        return sum(t * E for t, E in zip(np.asarray(theta, dtype=float), self._patterns))

    def terms(self, theta) -> tuple[np.ndarray, ...]:
        """T_k (q_k x q_k) for each term."""
        out, k = [], 0
        for lay in self.layouts:
            T = np.zeros((lay.q, lay.q))
            for r, c in lay.theta_index:
                T[r, c] = theta[k]
                k += 1
            out.append(T)
        return tuple(out)

    def state(self, theta) -> dict:
        L = self.factor(theta)
        LtZtZL = L.T @ self.ZtZ @ L
        M = LtZtZL + np.eye(len(L))
        chol = np.linalg.cholesky(M)
        LZX, LZy = L.T @ self.ZtX, L.T @ self.Zty
        Cu = np.linalg.solve(M, LZX)
        cu = np.linalg.solve(M, LZy)
        A = self.XtX - LZX.T @ Cu
        c = self.Xty - LZX.T @ cu
        beta = np.linalg.solve(A, c) if self.p else np.zeros(0)
        u = cu - Cu @ beta
        # RSS = y^T V^-1 y - c^T beta with y^T V^-1 y = y^T y - (L^T Z^T y)^T M^-1 (L^T Z^T y)
        rss = self.yty - float(LZy @ cu) - float(c @ beta)
        logdetM = 2.0 * float(np.log(np.diag(chol)).sum())
        logdetA = float(np.linalg.slogdet(A)[1]) if self.p else 0.0
        return dict(theta=np.asarray(theta, float), L=L, M=M, A=A, beta=beta, u=u, rss=rss, logdetM=logdetM,
                    logdetA=logdetA, Cu=Cu, cu=cu)

    def value(self, st: dict) -> float:
        dev = st["logdetM"] + self.n_eff * (1 + np.log(2 * np.pi * st["rss"] / self.n_eff))
        return float(dev + (st["logdetA"] if self.reml else 0.0))

    def __call__(self, theta) -> float:
        return self.value(self.state(theta))

    def gradient(self, st: dict) -> np.ndarray:
        L, M, beta = st["L"], st["M"], st["beta"]
        Minv = np.linalg.inv(M)
        # Z^T r and Z^T P with r = V^-1 (y - X beta), P = V^-1 X, through Woodbury:
        # V^-1 = I - Z L M^-1 L^T Z^T
        Zt_res = self.Zty - self.ZtX @ beta
        Zt_r = Zt_res - self.ZtZ @ L @ (Minv @ (L.T @ Zt_res))
        Zt_P = self.ZtX - self.ZtZ @ L @ (Minv @ (L.T @ self.ZtX))
        Ainv = np.linalg.inv(st["A"]) if self.p else None
        grad = np.empty(self.n_theta)
        for k, E in enumerate(self._patterns):
            dLLt = E @ L.T + L @ E.T                      # d(Lambda Lambda^T)
            dM = E.T @ self.ZtZ @ L + L.T @ self.ZtZ @ E
            g = float(np.sum(Minv * dM))                   # tr(M^-1 dM), M symmetric
            drss = -float(Zt_r @ dLLt @ Zt_r)
            g += self.n_eff * drss / st["rss"]
            if self.reml and self.p:
                dA = -Zt_P.T @ dLLt @ Zt_P
                g += float(np.sum(Ainv * dA))
            grad[k] = g
        return grad

    def value_and_gradient(self, theta) -> tuple[float, np.ndarray]:
        st = self.state(theta)
        return self.value(st), self.gradient(st)

    def varpar_deviance(self, theta, sig: float) -> float:
        """lmerTest's deviance in varpar = (theta, sigma), beta at its GLS value (scaled response units)."""
        st = self.state(theta)
        dev = st["logdetM"] + st["rss"] / sig**2 + self.n * np.log(2 * np.pi * sig**2)
        if self.reml:
            dev += st["logdetA"] - self.p * np.log(2 * np.pi * sig**2)
        return float(dev)
