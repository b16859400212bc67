"""Derivation: the tutorial's Eq. 1-12 derived with sympy from the design's structure.

Sigma is block-diagonal by group, each block sigma^2 I_m + Z_g D Z_g^T. The determinant lemma and the
Woodbury identity are applied once, for a block of symbolic size m, and the results are assembled over the
groups, so the cost does not grow with the number of observations:

    |Sigma_g|            = sigma^(2m) |I_q + D S_g / sigma^2|                 (S_g = Z_g^T Z_g)
    Sigma_g^(-1)         = (I_m - Z_g W_g Z_g^T) / sigma^2,  W_g = D (sigma^2 I_q + S_g D)^(-1)
    r^T Sigma_g^(-1) r   = (r^T r - (Z_g^T r)^T W_g (Z_g^T r)) / sigma^2

For a random intercept (q = 1, Z_g = 1, D = sigma_s^2) these give Eq. 11 and Eq. 12.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import sympy as sp

from .errors import ModelError
from .specification import Design

sigma = sp.Symbol("sigma", positive=True)
sigma_s = sp.Symbol("sigma_s", positive=True)
m = sp.Symbol("m", positive=True, integer=True)
n_obs = sp.Symbol("n", positive=True, integer=True)

#: designs up to this many observations keep the responses y_ij as symbols and Sigma^-1 written out
SYMBOLIC_N = 200
INVERSE_N = 40
#: designs up to this many observations carry X as exact rationals (for X^T Sigma^-1 X, exact estimates)
EXACT_N = 5000
#: written-out matrices (Eq. 1, 3, 7, 8) show this many rows before the ellipsis
SHOWN_ROWS = 8


@dataclass(frozen=True)
class Equation:
    """One numbered equation of the tutorial: its sympy expression and LaTeX."""

    number: int
    title: str
    expr: sp.Basic
    latex: str
    note: str = ""

    def _repr_latex_(self) -> str:
        return rf"$$\textbf{{Eq. {self.number}}}\quad {self.latex}$$"

    def __str__(self) -> str:
        return f"Eq. {self.number}  {self.title}\n{sp.pretty(self.expr, use_unicode=True)}"

    def to_dict(self) -> dict:
        return {"number": self.number, "title": self.title, "latex": self.latex, "sympy": sp.sstr(self.expr)}


# ------------------------------------------------------------------------------ the block identities
@dataclass(frozen=True)
class BlockIdentities:
    """Closed forms for one group's block Sigma_g = sigma^2 I_m + Z D Z^T, from the lemma and Woodbury.

    ``S`` (q x q) stands for Z^T Z, ``Zr`` (q x 1) for Z^T r and ``R2`` for r^T r; for a random intercept
    S = [m] and Zr = [1^T r].
    """

    D: sp.Matrix
    S: sp.Matrix
    Zr: sp.Matrix
    R2: sp.Symbol
    det: sp.Expr
    logdet: sp.Expr
    W: sp.Matrix
    quadratic: sp.Expr
    params: tuple[sp.Symbol, ...]


def block_identities(D: sp.Matrix, S: sp.Matrix, Zr: sp.Matrix, params: tuple[sp.Symbol, ...]) -> BlockIdentities:
    """Apply the matrix determinant lemma and Woodbury's identity to sigma^2 I_m + Z D Z^T (size m)."""
    q = D.shape[0]
    A = sigma**2 * sp.Identity(m)
    det_A = sp.Determinant(A).doit().subs(sp.Determinant(sp.Identity(m)), 1)  # sigma^(2m)
    inner = sp.eye(q) + D * S / sigma**2                       # I_q + D Z^T A^-1 Z
    det = sp.factor(sp.powsimp(sp.together(det_A * inner.det())))
    logdet = 2 * m * sp.log(sigma) + sp.log(sp.factor(inner.det() * sigma**(2 * q)))
    logdet = sp.expand_log(logdet - 2 * q * sp.log(sigma), force=True)
    W = (D * (sigma**2 * sp.eye(q) + S * D).inv()).applyfunc(sp.factor)
    R2 = sp.Symbol("R2")
    quadratic = (R2 - (Zr.T * W * Zr)[0, 0]) / sigma**2
    return BlockIdentities(D=D, S=S, Zr=Zr, R2=R2, det=det, logdet=logdet, W=W, quadratic=quadratic,
                           params=params)


@functools.lru_cache(maxsize=None)
def random_intercept_block() -> BlockIdentities:
    """The compound-symmetric block sigma^2 I_m + sigma_s^2 J_m: |.| = sigma^(2(m-1)) (sigma^2 + m sigma_s^2)."""
    R1 = sp.Symbol("R1")
    return block_identities(sp.Matrix([[sigma_s**2]]), sp.Matrix([[m]]), sp.Matrix([[R1]]), (sigma, sigma_s))


# ------------------------------------------------------------------------------------- helpers
def exact_number(x: float) -> sp.Number:
    """The rational number a data value's decimal text states (integers stay integers)."""
    if float(x).is_integer():
        return sp.Integer(int(x))
    return sp.Rational(Fraction(repr(float(x))))


def _matrix_latex(M: sp.Matrix, total_rows: int, total_cols: int, names: dict) -> str:
    """LaTeX of a matrix shown in part: a row of vertical dots and a column of dots where it is cut."""
    rows = [[sp.latex(M[i, j], symbol_names=names) for j in range(M.shape[1])] for i in range(M.shape[0])]
    if total_cols > M.shape[1]:
        rows = [r + [r"\cdots"] for r in rows]
    if total_rows > M.shape[0]:
        width = len(rows[0]) if rows else 1
        rows.append([r"\vdots"] * width)
    body = r" \\ ".join(" & ".join(r) for r in rows)
    return r"\left[\begin{matrix}" + body + r"\end{matrix}\right]"


# ------------------------------------------------------------------------------------ derivation
@dataclass(frozen=True)
class Symbols:
    """The names ``derive`` uses: sigma, sigma_s, beta_k, y_ij (data-row order), u_j, epsilon_ij.

    ``y_names`` lists every observation's name; for a large design ``y``, ``u`` and ``epsilon`` hold the
    symbols of the rows and groups that are shown (the data's values stand in the closed forms).
    """

    beta: tuple[sp.Symbol, ...]
    y: tuple[sp.Symbol, ...]
    u: tuple[sp.Symbol, ...]
    epsilon: tuple[sp.Symbol, ...]
    y_names: tuple[str, ...]
    latex_names: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def sigma(self) -> sp.Symbol:
        return sigma

    @property
    def sigma_s(self) -> sp.Symbol:
        return sigma_s

    def by_name(self) -> dict[str, sp.Symbol]:
        """Every symbol of the derivation by its plain name."""
        out = {s.name: s for s in (*self.beta, *self.y, *self.u, *self.epsilon)}
        out.update(sigma=sigma, sigma_s=sigma_s)
        return out


@dataclass(frozen=True)
class GroupStructure:
    """Observations arranged by group: position i within group j for each data row (both 0-based)."""

    codes: np.ndarray
    position: np.ndarray
    sizes: np.ndarray

    @classmethod
    def of(cls, design: Design) -> "GroupStructure":
        codes = np.asarray(design.terms[0].codes)
        order = np.argsort(codes, kind="stable")
        sizes = np.bincount(codes, minlength=design.terms[0].n_levels)
        starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
        position = np.empty(len(codes), dtype=np.int64)
        position[order] = np.arange(len(codes)) - np.repeat(starts, sizes)
        return cls(codes=codes, position=position, sizes=sizes)


def u_symbol(j: int) -> sp.Symbol:
    """u_(j+1), the random effect of group j (0-based)."""
    return sp.Symbol(f"u_{j + 1}", real=True)


def _symbols(design: Design, groups: GroupStructure, shown: int) -> Symbols:
    """Symbols for the first ``shown`` rows (all rows of a symbolic design), names for every row."""
    p = design.p
    first = 0 if design.has_intercept else 1
    beta = tuple(sp.Symbol(f"beta_{k + first}", real=True) for k in range(p))
    G = len(groups.sizes)
    wide = groups.sizes.max() > 9 or G > 9
    i_s, j_s = (groups.position + 1).tolist(), (groups.codes + 1).tolist()
    sep = "_" if wide else ""
    names = tuple(f"{i}{sep}{j}" for i, j in zip(i_s, j_s))
    latex_names = {}
    ys, eps = [], []
    for name, i, j in zip(names[:shown], i_s, j_s):
        y, e = sp.Symbol(f"y_{name}", real=True), sp.Symbol(f"epsilon_{name}", real=True)
        latex_names[y] = f"y_{{{i},{j}}}" if wide else f"y_{{{name}}}"
        latex_names[e] = rf"\varepsilon_{{{i},{j}}}" if wide else rf"\varepsilon_{{{name}}}"
        ys.append(y)
        eps.append(e)
    u = tuple(u_symbol(j) for j in range(G if shown >= len(names) else 0))
    return Symbols(beta=beta, y=tuple(ys), u=u, epsilon=tuple(eps), y_names=tuple(f"y_{v}" for v in names),
                   latex_names=latex_names)


class Derivation:
    """Eq. 1-12 of the tutorial for one random-intercept design, derived by sympy.

    Attributes: ``equations`` (Eq. 1-12 as :class:`Equation`), ``det`` (|Sigma|, Eq. 11), ``logdet``
    (log|Sigma| as a sum of logs), ``quadratic_form`` (Eq. 12), ``inverse`` (Sigma^-1, None when large),
    ``loglik`` (Eq. 10 in closed form) and ``reml_loglik`` (the restricted log-likelihood, in which beta
    stands for its GLS estimate).
    """

    def __init__(self, design: Design):
        if not design.is_random_intercept:
            raise ModelError("derive handles one random intercept (1|g); models with slopes or several "
                             "random terms are not derived symbolically yet")
        self.design = design
        self.block = random_intercept_block()
        self.groups = GroupStructure.of(design)
        self.symbolic_y = design.n <= SYMBOLIC_N
        self.symbols = _symbols(design, self.groups, design.n if self.symbolic_y else SHOWN_ROWS)
        self._names = self.symbols.latex_names

    @functools.cached_property
    def X_exact(self) -> sp.Matrix | None:
        """X as the rationals its decimal values state (None beyond EXACT_N rows)."""
        X = self.design.X
        if self.design.n > EXACT_N:
            return None
        return sp.Matrix(X.shape[0], X.shape[1], [exact_number(v) for v in X.ravel()])

    # ------------------------------------------------------------------ closed forms (Eq. 11, 12)
    @functools.cached_property
    def size_counts(self) -> dict[int, int]:
        """How many groups have each size m."""
        sizes, counts = np.unique(self.groups.sizes, return_counts=True)
        return {int(s): int(c) for s, c in zip(sizes, counts)}

    def _weight(self, size: int) -> sp.Expr:
        """w_m = sigma_s^2 / (sigma^2 + m sigma_s^2), the Woodbury weight of a group of size m."""
        return self.block.W[0, 0].subs(m, size)

    @functools.cached_property
    def det(self) -> sp.Expr:
        """Eq. 11: |Sigma| = prod_g sigma^(2(m_g - 1)) (sigma^2 + m_g sigma_s^2)."""
        return sp.Mul(*[self.block.det.subs(m, s) ** c for s, c in self.size_counts.items()])

    @functools.cached_property
    def logdet(self) -> sp.Expr:
        """log|Sigma| as a sum of logs over the group sizes (never the log of a polynomial)."""
        return sp.Add(*[c * self.block.logdet.subs(m, s) for s, c in self.size_counts.items()])

    @functools.cached_property
    def residuals(self) -> list[sp.Expr]:
        """r = Y - X beta, one entry per observation (data-row order); symbolic designs only."""
        xb = self.X_exact * sp.Matrix(self.symbols.beta)
        return [y - v for y, v in zip(self.symbols.y, xb)]

    @functools.cached_property
    def quadratic_form(self) -> sp.Expr:
        """Eq. 12: (Y - X beta)^T Sigma^-1 (Y - X beta) = sum_g (r_g^T r_g - w_g (1^T r_g)^2) / sigma^2."""
        R1, R2 = self.block.Zr[0, 0], self.block.R2
        if self.symbolic_y:
            terms = []
            for g, size in enumerate(self.groups.sizes):
                r = [self.residuals[i] for i in np.flatnonzero(self.groups.codes == g)]
                terms.append(self.block.quadratic.subs({m: int(size), R1: sp.Add(*r),
                                                        R2: sp.Add(*[ri**2 for ri in r])}))
            return sp.together(sp.Add(*terms))
        return self._quadratic_by_size()

    def _quadratic_by_size(self) -> sp.Expr:
        """Eq. 12 for a large design: the data's sums substituted, groups of equal size pooled."""
        d, G = self.design, len(self.groups.sizes)
        beta = sp.Matrix(self.symbols.beta)
        codes = self.groups.codes
        X, y = d.X, d.y
        total = _quadratic_poly(X.T @ X, X.T @ y, float(y @ y), beta)
        Xt1 = np.zeros((G, d.p))
        np.add.at(Xt1, codes, X)
        one_y = np.bincount(codes, weights=y, minlength=G)
        pooled = []
        for size in self.size_counts:
            sel = self.groups.sizes == size
            C, s = Xt1[sel], one_y[sel]
            # sum_g (1^T y_g - (X_g^T 1)^T beta)^2 over the groups of this size
            poly = _quadratic_poly(C.T @ C, C.T @ s, float(s @ s), beta)
            pooled.append(self._weight(size) * poly)
        return (total - sp.Add(*pooled)) / sigma**2

    @functools.cached_property
    def inverse(self) -> sp.Matrix | None:
        """Sigma^-1 in closed form (Woodbury per block), in data-row order; None for large designs."""
        n = self.design.n
        if n > INVERSE_N:
            return None
        codes, sizes = self.groups.codes, self.groups.sizes
        weights = {s: self._weight(s) for s in self.size_counts}

        def entry(i, j):
            same = codes[i] == codes[j]
            return ((1 if i == j else 0) - (weights[int(sizes[codes[i]])] if same else 0)) / sigma**2

        return sp.Matrix(n, n, lambda i, j: sp.factor(entry(i, j)))

    @functools.cached_property
    def kinship(self) -> sp.Matrix | None:
        """Eq. 7: K K^T, 1 where two observations share a group (None for large designs)."""
        if self.design.n > INVERSE_N:
            return None
        K = sp.Matrix(self.design.terms[0].indicator().astype(int))
        return K * K.T

    @functools.cached_property
    def sigma_matrix(self) -> sp.Matrix | None:
        """Eq. 8: Sigma = sigma_s^2 K K^T + sigma^2 I written out (None for large designs)."""
        if self.kinship is None:
            return None
        return sigma_s**2 * self.kinship + sigma**2 * sp.eye(self.design.n)

    @functools.cached_property
    def loglik(self) -> sp.Expr:
        """Eq. 10 in closed form: -n/2 log(2 pi) - 1/2 log|Sigma| - 1/2 (Y - X beta)^T Sigma^-1 (Y - X beta)."""
        n = self.design.n
        return -sp.Rational(n, 2) * sp.log(2 * sp.pi) - self.logdet / 2 - self.quadratic_form / 2

    @functools.cached_property
    def gls_information(self) -> sp.Matrix:
        """X^T Sigma^-1 X = sum_g (X_g^T X_g - w_g X_g^T 1 1^T X_g) / sigma^2, pooled by group size."""
        d, G = self.design, len(self.groups.sizes)
        Xt1 = np.zeros((G, d.p))
        np.add.at(Xt1, self.groups.codes, d.X)
        out = self.X_exact.T * self.X_exact if self.X_exact is not None else _exact_matrix(d.X.T @ d.X)
        for size in self.size_counts:
            C = Xt1[self.groups.sizes == size]
            out = out - self._weight(size) * _exact_matrix(C.T @ C)
        return out / sigma**2

    @functools.cached_property
    def reml_loglik(self) -> sp.Expr:
        """The restricted log-likelihood: loglik - 1/2 log|X^T Sigma^-1 X| + p/2 log(2 pi), beta = beta_hat."""
        p = self.design.p
        info = self.gls_information
        if p <= 4 and len(self.size_counts) <= 3:
            logdet_info = sp.expand_log(sp.log(sp.factor(info.det(method="berkowitz"))), force=True)
        else:  # many distinct group sizes: factoring the determinant costs more than it shows
            logdet_info = sp.log(sp.Determinant(info))
        return self.loglik - logdet_info / 2 + sp.Rational(p, 2) * sp.log(2 * sp.pi)

    # -------------------------------------------------------------------------------- Eq. 1 - 12
    @functools.cached_property
    def equations(self) -> list[Equation]:
        return [self._eq1(), self._eq2(), self._eq3(), self._eq4(), self._eq5(), self._eq6(), self._eq7(),
                self._eq8(), self._eq9(), self._eq10(), self._eq11(), self._eq12()]

    def equation(self, number: int) -> Equation:
        return self.equations[number - 1]

    def _latex(self, expr) -> str:
        return sp.latex(expr, symbol_names=self._names)

    def _row_rhs(self, i: int) -> sp.Expr:
        s = self.symbols
        x = self.design.X[i]
        fixed = sp.Add(*[exact_number(v) * b for v, b in zip(x, s.beta)])
        return sp.Add(fixed, u_symbol(self.groups.codes[i]), s.epsilon[i], evaluate=False)

    def _eq1(self) -> Equation:
        n = self.design.n
        shown = range(min(n, SHOWN_ROWS) if n > 12 else n)
        eqs = [sp.Eq(self.symbols.y[i], self._row_rhs(i), evaluate=False) for i in shown]
        lines = [sp.latex(e, symbol_names=self._names, order="none") for e in eqs] + ([r"\vdots"] if len(eqs) < n else [])
        latex = r"\begin{cases}" + r" \\ ".join(lines) + r"\end{cases}"
        return Equation(1, "the model, one equation per observation", sp.Tuple(*eqs), latex,
                        note="" if len(eqs) == n else f"first {len(eqs)} of {n} observations")

    def _eq2(self) -> Equation:
        i, j = sp.symbols("i j", integer=True)
        y, u, e = sp.IndexedBase("y"), sp.IndexedBase("u"), sp.IndexedBase("epsilon")
        d = self.design
        if self._cell_means_by_position():
            fixed = sp.IndexedBase("beta")[i]
        else:
            s = self.symbols.beta
            fixed = sp.Add(*[b if name in ("(Intercept)", "Intercept") else b * self._covariate(name, k)[i, j]
                             for k, (b, name) in enumerate(zip(s, d.fixed_names))])
        expr = sp.Eq(y[i, j], fixed + u[j] + e[i, j], evaluate=False)
        latex = sp.latex(expr, order="none").replace(r"{\epsilon}", r"{\varepsilon}")
        return Equation(2, "index form: observation i of group j", expr, latex)

    @staticmethod
    def _covariate(name: str, k: int) -> sp.IndexedBase:
        return sp.IndexedBase(name if name.isidentifier() else f"x_{k}")

    def _cell_means_by_position(self) -> bool:
        """True when X is cell-means coding whose level is the observation's position in its group."""
        X = self.design.X
        if self.design.has_intercept or not np.all(np.isin(X, (0.0, 1.0))) or not np.all(X.sum(1) == 1):
            return False
        return bool(np.all(X.argmax(1) == self.groups.position))

    def _shown(self, M: sp.Matrix, cols: bool = False) -> tuple[sp.Matrix, str]:
        rows = M.shape[0] if M.shape[0] <= 12 else SHOWN_ROWS
        ncols = M.shape[1] if (not cols or M.shape[1] <= 12) else SHOWN_ROWS
        part = M[:rows, :ncols]
        return part, _matrix_latex(part, M.shape[0], M.shape[1], self._names)

    def _column(self, syms) -> sp.Matrix:
        return sp.Matrix(list(syms[: SHOWN_ROWS if len(syms) > 12 else len(syms)]))

    def _eq3(self) -> Equation:
        d, s = self.design, self.symbols
        n, G = d.n, d.terms[0].n_levels
        rows = n if n <= 12 else SHOWN_ROWS
        Xs = sp.Matrix(rows, d.p, lambda i, k: exact_number(d.X[i, k]))
        gcols = G if G <= 12 else SHOWN_ROWS
        codes = self.groups.codes
        Ks = sp.Matrix(rows, gcols, lambda i, j: int(codes[i] == j))
        U = sp.Matrix([u_symbol(j) for j in range(gcols)])
        Y, E, B = (sp.Matrix(list(v[:rows])) for v in (s.y, s.epsilon, s.beta))
        expr = sp.Eq(Y, sp.MatAdd(sp.MatMul(Xs, B), sp.MatMul(Ks, U), E, evaluate=False), evaluate=False)
        lat = lambda M, r, c: _matrix_latex(M, r, c, self._names)  # noqa: E731
        latex = (lat(Y, n, 1) + " = " + lat(Xs, n, d.p) + lat(B, d.p, 1) + " + " + lat(Ks, n, G)
                 + lat(U, G, 1) + " + " + lat(E, n, 1))
        return Equation(3, "the explicit matrix form with the data's X and K", expr, latex,
                        note="" if rows == n and gcols == G else f"first {rows} rows and {gcols} groups shown")

    def _matrix_symbols(self):
        d = self.design
        n, p, G = d.n, d.p, d.terms[0].n_levels
        return (sp.MatrixSymbol("Y", n, 1), sp.MatrixSymbol("X", n, p), sp.MatrixSymbol("beta", p, 1),
                sp.MatrixSymbol("K", n, G), sp.MatrixSymbol("u", G, 1), sp.MatrixSymbol("epsilon", n, 1))

    def _eq4(self) -> Equation:
        Y, X, b, K, u, e = self._matrix_symbols()
        expr = sp.Eq(Y, sp.MatAdd(X * b, K * u, e, evaluate=False), evaluate=False)
        return Equation(4, "the model in matrix notation", expr,
                        sp.latex(expr, symbol_names={e: r"\varepsilon"}, order="none"))

    def _eq5(self) -> Equation:
        Y, X, b, K, u, e = self._matrix_symbols()
        n, G = Y.shape[0], u.shape[0]
        # E[u] = 0 and E[eps] = 0, so E[Y] = X beta + K E[u] + E[eps] collapses to X beta
        expectation = sp.MatAdd(X * b, K * sp.ZeroMatrix(G, 1), sp.ZeroMatrix(n, 1)).doit()
        EY = sp.Symbol("E[Y]")
        expr = sp.Eq(EY, expectation, evaluate=False)
        latex = (r"E[Y] = X\beta + K\,E[u] + E[\varepsilon] = " + sp.latex(expectation))
        return Equation(5, "the expectation, from E[u] = 0 and E[epsilon] = 0", expr, latex)

    def _eq6(self) -> Equation:
        Y, X, b, K, u, e = self._matrix_symbols()
        n, G = Y.shape[0], u.shape[0]
        # var(Y) = var(K u) + var(eps) = K var(u) K^T + var(eps), var(u) = sigma_s^2 I, var(eps) = sigma^2 I
        variance = sp.MatAdd(K * (sigma_s**2 * sp.Identity(G)) * K.T, sigma**2 * sp.Identity(n)).doit()
        expr = sp.Eq(sp.MatrixSymbol("Sigma", n, n), variance, evaluate=False)
        latex = (r"\operatorname{var}(Y) = K \operatorname{var}(u) K^{T} + \operatorname{var}(\varepsilon) = "
                 r"K \left(\sigma_{s}^{2} I\right) K^{T} + \sigma^{2} I = " + sp.latex(variance)
                 + r" = \Sigma")
        return Equation(6, "the variance, from var(A u) = A var(u) A^T", expr, latex)

    def _dense(self, entry) -> tuple[sp.Matrix, str]:
        n = self.design.n
        rows = n if n <= 12 else SHOWN_ROWS
        codes = self.groups.codes
        M = sp.Matrix(rows, rows, lambda i, j: entry(i == j, codes[i] == codes[j]))
        return M, _matrix_latex(M, n, n, self._names)

    def _eq7(self) -> Equation:
        M, latex = self._dense(lambda diag, same: sp.Integer(1 if same else 0))
        return Equation(7, "the kinship matrix K K^T: 1 where two observations share a group",
                        sp.Eq(sp.Symbol("KK^T"), M, evaluate=False), r"K K^{T} = " + latex)

    def _eq8(self) -> Equation:
        M, latex = self._dense(lambda diag, same: (sigma**2 if diag else 0) + (sigma_s**2 if same else 0))
        return Equation(8, "Sigma written out", sp.Eq(sp.Symbol("Sigma"), M, evaluate=False),
                        r"\Sigma = " + latex)

    def _likelihood_parts(self):
        n = self.design.n
        Q = sp.Symbol("Q")
        det = sp.Determinant(sp.MatrixSymbol("Sigma", n, n))
        names = {Q: r"(Y - X\beta)^{T} \Sigma^{-1} (Y - X\beta)"}
        return n, Q, det, names

    def _eq9(self) -> Equation:
        n, Q, det, names = self._likelihood_parts()
        L = sp.Symbol("L")
        rhs = (2 * sp.pi) ** (-n_obs / 2) * det ** (-sp.Rational(1, 2)) * sp.exp(-Q / 2)
        expr = sp.Eq(L, rhs, evaluate=False)
        return Equation(9, "the multivariate normal likelihood", expr,
                        r"L(\beta, \sigma, \sigma_{s}) = " + sp.latex(rhs, symbol_names=names),
                        note=f"n = {n}, Q = (Y - X beta)^T Sigma^-1 (Y - X beta)")

    def _eq10(self) -> Equation:
        n, Q, det, names = self._likelihood_parts()
        rhs = -n_obs / 2 * sp.log(2 * sp.pi) - sp.log(det) / 2 - Q / 2
        expr = sp.Eq(sp.Symbol("log L"), rhs, evaluate=False)
        return Equation(10, "the log-likelihood", expr,
                        r"\log L(\beta, \sigma, \sigma_{s}) = " + sp.latex(rhs, symbol_names=names),
                        note=f"n = {n}, Q = (Y - X beta)^T Sigma^-1 (Y - X beta)")

    def _eq11(self) -> Equation:
        n = self.design.n
        lhs = sp.Determinant(sp.MatrixSymbol("Sigma", n, n))
        return Equation(11, "the determinant |Sigma| in closed form", sp.Eq(lhs, self.det, evaluate=False),
                        sp.latex(lhs) + " = " + self._latex(self.det))

    def _eq12(self) -> Equation:
        n, Q, det, names = self._likelihood_parts()
        q = self.quadratic_form
        note = "" if self.symbolic_y else "the data's values substituted; groups of equal size pooled"
        return Equation(12, "the quadratic form (Y - X beta)^T Sigma^-1 (Y - X beta) in closed form",
                        sp.Eq(Q, q, evaluate=False), names[Q] + " = " + self._latex(q), note=note)

    # ----------------------------------------------------------------------------------- output
    def to_dict(self) -> dict:
        """The JSON of ``lmm-symbolic derive --json``; every string parses back with sympy.sympify."""
        s = self.symbols
        return {
            "equations": [e.to_dict() for e in self.equations],
            "symbols": {"sigma": sigma.name, "sigma_s": sigma_s.name, "y": list(s.y_names),
                        "beta": [b.name for b in s.beta], "beta_columns": list(self.design.fixed_names)},
            "det": sp.sstr(self.det),
            "logdet": sp.sstr(self.logdet),
            "inverse": None if self.inverse is None else sp.sstr(self.inverse.tolist()),
            "quadratic_form": sp.sstr(self.quadratic_form),
            "loglik": sp.sstr(self.loglik),
            "reml_loglik": sp.sstr(self.reml_loglik),
            "data_substituted": not self.symbolic_y,
        }

    def to_latex_document(self) -> str:
        """A standalone LaTeX document of Eq. 1-12 (compiles with pdflatex and amsmath)."""
        body = []
        for e in self.equations:
            body.append(rf"\paragraph{{Eq. {e.number}: {_tex_text(e.title)}}}" + "\n")
            body.append(r"\[")
            body.append(e.latex)
            body.append(r"\]")
            if e.note:
                body.append(rf"\emph{{{_tex_text(e.note)}}}")
        return "\n".join([
            r"\documentclass{article}", r"\usepackage{amsmath,amssymb}",
            r"\usepackage[margin=2cm,landscape]{geometry}", r"\setcounter{MaxMatrixCols}{40}",
            r"\begin{document}", rf"\section*{{{_tex_text(self.design.formula)}}}", *body, r"\end{document}", ""])

    def _repr_latex_(self) -> str:
        return "\n".join(e._repr_latex_() for e in self.equations)


def _tex_text(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("^", r"\^{}"), ("&", r"\&"), ("%", r"\%"),
                 ("#", r"\#"), ("~", r"\textasciitilde{}"), ("|", r"$|$"), ("{", r"\{"), ("}", r"\}")):
        text = text.replace(a, b)
    return text


def _exact_matrix(A: np.ndarray) -> sp.Matrix:
    return sp.Matrix(A.shape[0], A.shape[1], [exact_number(v) for v in np.ravel(A)])


def _quadratic_poly(A: np.ndarray, b: np.ndarray, c: float, beta: sp.Matrix) -> sp.Expr:
    """c - 2 b^T beta + beta^T A beta, the expanded sum of squares (y - X beta)^T (y - X beta)."""
    A, b = _exact_matrix(np.atleast_2d(A)), _exact_matrix(np.atleast_2d(b).reshape(-1, 1))
    return sp.expand(exact_number(c) - 2 * (b.T * beta)[0, 0] + (beta.T * A * beta)[0, 0])


def derive(design: Design) -> Derivation:
    """The derivation of Eq. 1-12 for a design (see :class:`Derivation`)."""
    return Derivation(design)
