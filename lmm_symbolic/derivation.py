r"""Derivation: the tutorial's Eq. 1-12 derived with sympy from the design's structure.

:math:`\Sigma` is block-diagonal by group, each block :math:`\sigma^2 I_m + Z_g D Z_g^\top`. The determinant
lemma and the Woodbury identity are applied once, for a block of symbolic size :math:`m`, and the results
are assembled over the groups, so the cost does not grow with the number of observations
(:math:`S_g = Z_g^\top Z_g`, :math:`W_g = D\,(\sigma^2 I_q + S_g D)^{-1}`):

.. math::

    |\Sigma_g| &= \sigma^{2m}\, |I_q + D S_g / \sigma^2|, \\
    \Sigma_g^{-1} &= (I_m - Z_g W_g Z_g^\top) / \sigma^2, \\
    r^\top \Sigma_g^{-1} r &= \bigl(r^\top r - (Z_g^\top r)^\top W_g\, (Z_g^\top r)\bigr) / \sigma^2.

For a random intercept (:math:`q = 1`, :math:`Z_g = \mathbf{1}`, :math:`D = \sigma_s^2`) these give Eq. 11
and Eq. 12.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import sympy as sp

from .errors import ModelError
from .specification import Design, random_effects_matrix

sigma = sp.Symbol("sigma", positive=True)
sigma_s = sp.Symbol("sigma_s", positive=True)
m = sp.Symbol("m", positive=True, integer=True)
n_obs = sp.Symbol("n", positive=True, integer=True)

#: designs up to this many observations keep the responses :math:`y_{ij}` as symbols and :math:`\Sigma^{-1}` written out
SYMBOLIC_N = 200
INVERSE_N = 40
#: designs up to this many observations carry :math:`X` as exact rationals (for :math:`X^\top \Sigma^{-1} X`, exact estimates)
EXACT_N = 5000
#: written-out matrices (Eq. 1, 3) show this many rows before the ellipsis
SHOWN_ROWS = 8
#: ... and Eq. 3's K (or Z) this many columns; Eq. 7 and 8 this many observations of each of two groups
#: (:math:`\Sigma`'s entries are wide: 2 + 2 columns and the ellipsis fit a 671 px column)
SHOWN_COLUMNS = 4
SHOWN_PER_GROUP = 2
#: a display line holds about this many characters of LaTeX source before it is broken
LINE_CHARS = 90


@dataclass(frozen=True)
class Equation:
    """One numbered equation of the tutorial: its sympy expression and LaTeX."""

    number: int
    title: str
    expr: sp.Basic
    latex: str
    note: str = ""
    text: str = ""   #: the plain-text form print() shows (sympy's pretty form when empty)

    def _repr_latex_(self) -> str:
        return rf"$$\textbf{{Eq. {self.number}}}\quad {self.latex}$$"

    def __str__(self) -> str:
        body = self.text or sp.pretty(self.expr, use_unicode=True, order="none", wrap_line=False)
        return f"Eq. {self.number}  {self.title}\n{body}"

    def to_dict(self) -> dict:
        return {"number": self.number, "title": self.title, "latex": self.latex, "sympy": sp.sstr(self.expr)}


# ------------------------------------------------------------------------------ the block identities
@dataclass(frozen=True)
class BlockIdentities:
    r"""Closed forms for one group's block :math:`\Sigma_g = \sigma^2 I_m + Z D Z^\top`, from the lemma and
    Woodbury.

    ``S`` (:math:`q \times q`) stands for :math:`Z^\top Z`, ``Zr`` (:math:`q \times 1`) for :math:`Z^\top r`
    and ``R2`` for :math:`r^\top r`; for a random intercept :math:`S = [m]` and
    :math:`Z^\top r = [\mathbf{1}^\top r]`.
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
    r"""Apply the matrix determinant lemma and Woodbury's identity to :math:`\sigma^2 I_m + Z D Z^\top`
    (size :math:`m`)."""
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
    r"""The compound-symmetric block :math:`\sigma^2 I_m + \sigma_s^2 J_m`, whose determinant is
    :math:`\sigma^{2(m-1)} (\sigma^2 + m \sigma_s^2)`."""
    R1 = sp.Symbol("R1")
    return block_identities(sp.Matrix([[sigma_s**2]]), sp.Matrix([[m]]), sp.Matrix([[R1]]), (sigma, sigma_s))


# ------------------------------------------------------------------------------------- helpers
def exact_number(x: float) -> sp.Number:
    """The rational number a data value's decimal text states (integers stay integers).

    Values are read to 14 significant digits, so a sum of decimals carries no floating-point dust
    (7206.4000000000006 is 7206.4); data with more significant digits than that are rounded.
    """
    if float(x).is_integer():
        return sp.Integer(int(x))
    return sp.Rational(Fraction(f"{float(x):.14g}"))


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
    r"""The names ``derive`` uses: :math:`\sigma`, :math:`\sigma_s`, :math:`\beta_k`, :math:`y_{ij}` (data-row
    order), :math:`u_j`, :math:`\varepsilon_{ij}`.

    ``y_names`` lists every observation's name; for a large design ``y``, ``u`` and ``epsilon`` hold the
    symbols of the rows and groups that are shown (the data's values stand in the closed forms).
    """

    beta: tuple[sp.Symbol, ...]
    y: tuple[sp.Symbol, ...]
    u: tuple[sp.Symbol, ...]
    epsilon: tuple[sp.Symbol, ...]
    y_names: tuple[str, ...]
    latex_names: dict = field(default_factory=dict, compare=False, repr=False)
    #: further names of shown symbols (a slope model's short :math:`\sigma_0`, :math:`\sigma_1`, :math:`\rho` and their long names)
    aliases: dict = field(default_factory=dict, compare=False, repr=False)

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
        out.update(self.aliases)
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
    r""":math:`u_{j+1}`, the random effect of group :math:`j` (0-based)."""
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
    r"""Eq. 1-12 of the tutorial for one random-intercept design, derived by sympy.

    Attributes: ``equations`` (Eq. 1-12 as :class:`Equation`), ``det`` (:math:`|\Sigma|`, Eq. 11),
    ``logdet`` (:math:`\log|\Sigma|` as a sum of logs), ``quadratic_form`` (Eq. 12), ``inverse``
    (:math:`\Sigma^{-1}`, None when large), ``loglik`` (Eq. 10 in closed form) and ``reml_loglik`` (the
    restricted log-likelihood, in which :math:`\beta` stands for its GLS estimate).
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
    @property
    def _few_blocks(self) -> bool:
        """Few distinct blocks: factoring |X^T Sigma^-1 X| then shows more than it costs."""
        return len(self.size_counts) <= 3

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
        r"""Eq. 11: :math:`|\Sigma| = \prod_g \sigma^{2(m_g - 1)} (\sigma^2 + m_g \sigma_s^2)`."""
        return sp.Mul(*[self.block.det.subs(m, s) ** c for s, c in self.size_counts.items()])

    @functools.cached_property
    def logdet(self) -> sp.Expr:
        r""":math:`\log|\Sigma|` as a sum of logs over the group sizes (never the log of a polynomial)."""
        return sp.Add(*[c * self.block.logdet.subs(m, s) for s, c in self.size_counts.items()])

    @functools.cached_property
    def residuals(self) -> list[sp.Expr]:
        r""":math:`r = Y - X\beta`, one entry per observation (data-row order); symbolic designs only."""
        xb = self.X_exact * sp.Matrix(self.symbols.beta)
        return [y - v for y, v in zip(self.symbols.y, xb)]

    @functools.cached_property
    def quadratic_form(self) -> sp.Expr:
        r"""Eq. 12: :math:`(Y - X\beta)^\top \Sigma^{-1} (Y - X\beta) = \sum_g \bigl(r_g^\top r_g - w_g (\mathbf{1}^\top r_g)^2\bigr) / \sigma^2`."""
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
        r""":math:`\Sigma^{-1}` in closed form (Woodbury per block), in data-row order; None for large designs."""
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
        r"""Eq. 7: :math:`K K^\top`, 1 where two observations share a group (None for large designs)."""
        if self.design.n > INVERSE_N:
            return None
        K = sp.Matrix(self.design.terms[0].indicator().astype(int))
        return K * K.T

    @functools.cached_property
    def sigma_matrix(self) -> sp.Matrix | None:
        r"""Eq. 8: :math:`\Sigma = \sigma_s^2 K K^\top + \sigma^2 I` written out (None for large designs)."""
        if self.kinship is None:
            return None
        return sigma_s**2 * self.kinship + sigma**2 * sp.eye(self.design.n)

    @functools.cached_property
    def loglik(self) -> sp.Expr:
        r"""Eq. 10 in closed form:
        :math:`-\frac{n}{2} \log(2\pi) - \frac12 \log|\Sigma| - \frac12 (Y - X\beta)^\top \Sigma^{-1} (Y - X\beta)`."""
        n = self.design.n
        return -sp.Rational(n, 2) * sp.log(2 * sp.pi) - self.logdet / 2 - self.quadratic_form / 2

    @functools.cached_property
    def gls_information(self) -> sp.Matrix:
        r""":math:`X^\top \Sigma^{-1} X = \sum_g (X_g^\top X_g - w_g X_g^\top \mathbf{1} \mathbf{1}^\top X_g) / \sigma^2`,
        pooled by group size."""
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
        r"""The restricted log-likelihood:
        :math:`\text{loglik} - \frac12 \log|X^\top \Sigma^{-1} X| + \frac{p}{2} \log(2\pi)`, :math:`\beta = \hat\beta`."""
        p = self.design.p
        info = self.gls_information
        if p <= 4 and self._few_blocks:
            logdet_info = sp.expand_log(sp.log(sp.factor(info.det(method="berkowitz"))), force=True)
        else:  # many distinct group sizes: factoring the determinant costs more than it shows
            logdet_info = sp.log(sp.Determinant(info))
        return self.loglik - logdet_info / 2 + sp.Rational(p, 2) * sp.log(2 * sp.pi)

    # ------------------------------------------------------------- readable forms (display only)
    def _fixed_terms(self, coefs) -> list[tuple[sp.Expr, sp.Symbol]]:
        return [(exact_number(c), b) for c, b in zip(coefs, self.symbols.beta) if c != 0]

    def _residual_latex(self, ys: list, coefs) -> str:
        """y_1 + ... - (fixed part): the data first, then the fixed effects, e.g. y_{21} - \\beta_{0} - \\beta_{1}."""
        out = " + ".join(self._latex(y) for y in ys)
        for c, b in self._fixed_terms(coefs):
            mag = "" if abs(c) == 1 else self._latex(abs(c)) + " "
            out += (" - " if c > 0 else " + ") + mag + self._latex(b)
        return out

    def _residual_text(self, ys: list, coefs) -> str:
        out = " + ".join(y.name for y in ys)
        for c, b in self._fixed_terms(coefs):
            mag = "" if abs(c) == 1 else f"{abs(c)}*"
            out += (" - " if c > 0 else " + ") + mag + b.name
        return out

    def _group_rows(self) -> list[np.ndarray]:
        return [np.flatnonzero(self.groups.codes == g) for g in range(len(self.groups.sizes))]

    def _readable(self) -> bool:
        return self.symbolic_y and len(self.groups.sizes) <= 6 and self.groups.sizes.max() <= 4

    def _weight_name(self, size: int) -> str:
        return "w" if len(self.size_counts) == 1 else f"w_{{{size}}}"

    def _weights_latex(self) -> str:
        return r",\quad ".join(self._weight_name(k) + " = " + self._latex(self._weight(k)) for k in self.size_counts)

    def quadratic_latex(self) -> str:
        r"""Eq. 12 as a reader checks it: one aligned line per group in the residuals
        :math:`r_{ij} = y_{ij} - x_{ij}^\top \beta`,

        .. math:: \bigl[r_{1j}^2 + r_{2j}^2 + \dots - w\,(r_{1j} + r_{2j} + \dots)^2\bigr] / \sigma^2,
           \qquad w = \frac{\sigma_s^2}{\sigma^2 + m \sigma_s^2};

        then :math:`w` and the residuals, one group per line. The same expression as ``quadratic_form`` (tests
        check it through :meth:`quadratic_text`), written for reading."""
        if not self._readable():
            return self._latex(self.quadratic_form)
        X, y = self.design.X, self.symbols.y
        r = [self._latex(v).replace("y_", "r_", 1) for v in y]
        lines, legend = [], []
        for rows in self._group_rows():
            squares = " + ".join(f"{r[i]}^{{2}}" for i in rows)
            total = " + ".join(r[i] for i in rows)
            w = self._weight_name(len(rows))
            lines.append(rf"\frac{{1}}{{\sigma^{{2}}}}\Big[{squares} - {w}\left({total}\right)^{{2}}\Big]")
            legend.append(r",\quad ".join(f"{r[i]} = {self._residual_latex([y[i]], X[i])}" for i in rows))
        body = r" \\ &\quad + ".join(lines)
        where = r" \\ &\text{with } " + self._weights_latex() + r"\ \text{and the residuals}"
        return (r"\begin{aligned} Q &= " + body + where
                + "".join(r" \\ &\qquad " + line for line in legend) + r"\end{aligned}")

    def quadratic_text(self) -> str:
        """The plain-text twin of :meth:`quadratic_latex`."""
        if not self._readable():
            return sp.pretty(self.quadratic_form, use_unicode=True, wrap_line=False)
        X, y = self.design.X, self.symbols.y
        lines = []
        for rows in self._group_rows():
            squares = " + ".join(f"({self._residual_text([y[i]], X[i])})^2" for i in rows)
            total = self._residual_text([y[i] for i in rows], X[rows].sum(0))
            w = "w" if len(self.size_counts) == 1 else f"w_{len(rows)}"
            lines.append(f"[{squares} - {w}*({total})^2] / sigma^2")
        ws = ",  ".join(("w" if len(self.size_counts) == 1 else f"w_{k}") + " = " + sp.sstr(self._weight(k))
                        for k in self.size_counts)
        return "Q =   " + "\n    + ".join(lines) + "\nwith " + ws

    def _logdet_half_latex(self) -> str:
        """-1/2 log|Sigma| as - a log sigma^2 - b log(sigma^2 + m sigma_s^2), from the group sizes (Eq. 11)."""
        out = ""
        for size, count in self.size_counts.items():
            for coef, arg in ((sp.Rational(count * (size - 1), 2), sigma**2),
                              (sp.Rational(count, 2), sigma**2 + size * sigma_s**2)):
                if coef == 0:
                    continue
                c = "" if coef == 1 else (self._latex(coef) if coef.q == 1 else rf"\tfrac{{{coef.p}}}{{{coef.q}}}")
                a = self._latex(arg) if arg == sigma**2 else rf"\left({self._latex(arg)}\right)"
                out += rf" - {c}\log {a}"
        return out

    @staticmethod
    def _half(k) -> str:
        k = sp.Rational(k, 2)
        if k == 1:
            return ""
        return sp.latex(k) if k.q == 1 else rf"\tfrac{{{k.p}}}{{{k.q}}}"

    def loglik_latex(self) -> str:
        r"""Eq. 10 with Eq. 11 and 12 in it, terms in the tutorial's order:
        :math:`\log L = -\frac{n}{2} \log 2\pi - (\text{log-determinant terms}) - \frac{1}{2} Q`, :math:`Q` as in
        :meth:`quadratic_latex`."""
        n = self.design.n
        return (rf"\log L = -{self._half(n)}\log 2\pi{self._logdet_half_latex()} - \tfrac{{1}}{{2}} Q")

    def reml_latex(self) -> str:
        r"""The REML criterion in the same layout:
        :math:`\log L_R = -\frac{n-p}{2} \log 2\pi - \dots - \frac{1}{2} \log|X^\top \Sigma^{-1} X| - \frac{1}{2} Q`."""
        n, p = self.design.n, self.design.p
        return (rf"\log L_R = -{self._half(n - p)}\log 2\pi{self._logdet_half_latex()}"
                r" - \tfrac{1}{2}\log\left|X^{T}\Sigma^{-1}X\right| - \tfrac{1}{2} Q(\hat\beta)")

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
        text = "\n".join(f"{e.lhs.name} = " + " + ".join(sp.sstr(a) for a in e.rhs.args) for e in eqs)
        return Equation(1, "the model, one equation per observation", sp.Tuple(*eqs), latex,
                        note="" if len(eqs) == n else f"first {len(eqs)} of {n} observations",
                        text=text + ("\n..." if len(eqs) < n else ""))

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
        for name in d.fixed_names:   # covariates in roman: \mathrm{Treat}_{i,j}
            if name.isidentifier() and len(name) > 1:
                latex = latex.replace("{" + name + "}_", r"\mathrm{" + name + "}_")
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

    def _eq3(self) -> Equation:
        d, s = self.design, self.symbols
        n = d.n
        rows = n if n <= 12 else SHOWN_ROWS
        Xs = sp.Matrix(rows, d.p, lambda i, k: exact_number(d.X[i, k]))
        Ms, U, width, letter = self._random_part(rows)
        Y, E, B = (sp.Matrix(list(v[:rows])) for v in (s.y, s.epsilon, s.beta))
        expr = sp.Eq(Y, sp.MatAdd(sp.MatMul(Xs, B), sp.MatMul(Ms, U), E, evaluate=False), evaluate=False)
        lat = lambda M, r, c: _matrix_latex(M, r, c, self._names)  # noqa: E731
        latex = (lat(Y, n, 1) + " = " + lat(Xs, n, d.p) + lat(B, d.p, 1) + " + " + lat(Ms, n, width)
                 + lat(U, width, 1) + " + " + lat(E, n, 1))
        shown = rows == n and Ms.shape[1] == width
        return Equation(3, f"the explicit matrix form with the data's X and {letter}", expr, latex,
                        note="" if shown else f"first {rows} rows and {Ms.shape[1]} of {width} columns of "
                                              f"{letter} shown")

    def _random_part(self, rows: int) -> tuple[sp.Matrix, sp.Matrix, int, str]:
        """The first rows of K (Eq. 3), the random effects they multiply, K's width and its letter."""
        G = self.design.terms[0].n_levels
        gcols = G if G <= 12 else SHOWN_COLUMNS
        codes = self.groups.codes
        K = sp.Matrix(rows, gcols, lambda i, j: int(codes[i] == j))
        return K, sp.Matrix([u_symbol(j) for j in range(gcols)]), G, "K"

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
        # one step per line; the random part first, as Eq. 4 orders the terms
        terms = sorted(sp.Add.make_args(variance), key=lambda t: not t.has(K))
        collected = " + ".join(sp.latex(t) for t in terms).replace(r"\mathbb{I}", rf"I_{{{n}}}")
        latex = (r"\begin{aligned} \operatorname{var}(Y) &= K \operatorname{var}(u) K^{T} + \operatorname{var}(\varepsilon)"
                 rf" \\ &= K \left(\sigma_{{s}}^{{2}} I_{{{G}}}\right) K^{{T}} + \sigma^{{2}} I_{{{n}}}"
                 r" \\ &= " + collected + r" = \Sigma \end{aligned}")
        return Equation(6, "the variance, from var(A u) = A var(u) A^T", expr, latex)

    def _shown_rows(self) -> list[int]:
        """The rows Eq. 7 and 8 show: all of a small design; else the first rows of the first two groups,
        so that a zero block between groups is visible."""
        n = self.design.n
        if n <= 12:
            return list(range(n))
        half = SHOWN_PER_GROUP
        rows = [int(i) for g in range(min(2, len(self.groups.sizes)))
                for i in np.flatnonzero(self.groups.codes == g)[:half]]
        return rows if len(rows) > 1 else list(range(SHOWN_ROWS))

    def _shown_note(self) -> str:
        rows = self._shown_rows()
        if len(rows) == self.design.n:
            return ""
        term = self.design.terms[0]
        groups = sorted({int(self.groups.codes[i]) for i in rows})
        names = f"{term.group} " + " and ".join(str(term.levels[g]) for g in groups)
        return (f"observations 1-{SHOWN_PER_GROUP} of {names}; "
                f"Sigma = diag(Sigma_1, ..., Sigma_{len(self.groups.sizes)})")

    def _dense(self, entry) -> tuple[sp.Matrix, str]:
        n = self.design.n
        shown = self._shown_rows()
        codes = self.groups.codes
        M = sp.Matrix(len(shown), len(shown), lambda a, b: entry(a == b, codes[shown[a]] == codes[shown[b]]))
        return M, _matrix_latex(M, n, n, self._names)

    def _eq7(self) -> Equation:
        M, latex = self._dense(lambda diag, same: sp.Integer(1 if same else 0))
        return Equation(7, "the kinship matrix K K^T: 1 where two observations share a group",
                        sp.Eq(sp.Symbol("KK^T"), M, evaluate=False), r"K K^{T} = " + latex,
                        text="K K^T =\n" + sp.pretty(M, use_unicode=True), note=self._shown_note())

    def _eq8(self) -> Equation:
        M, latex = self._dense(lambda diag, same: (sigma**2 if diag else 0) + (sigma_s**2 if same else 0))
        return Equation(8, "Sigma written out", sp.Eq(sp.Symbol("Sigma"), M, evaluate=False),
                        r"\Sigma = " + latex, note=self._shown_note())

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
        latex = (r"\begin{aligned} \log L(\beta, \sigma, \sigma_{s}) &= -\frac{n}{2}\log(2\pi)"
                 r" - \frac{1}{2}\log\left|\Sigma\right| \\ &\quad - \frac{1}{2}" + names[Q] + r" \end{aligned}")
        return Equation(10, "the log-likelihood", expr, latex,
                        text="log L = -n/2 log(2 pi) - 1/2 log|Sigma| - 1/2 Q",
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
        if self._readable():
            latex = self.quadratic_latex().replace("Q &=", names[Q] + " &=", 1)
        else:
            latex = names[Q] + " = " + self._latex(q)
        return Equation(12, "the quadratic form (Y - X beta)^T Sigma^-1 (Y - X beta) in closed form",
                        sp.Eq(Q, q, evaluate=False), latex, note=note, text=self.quadratic_text())

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


def _monomial_term_latex(c: sp.Expr, k: int) -> tuple[bool, str]:
    """(negative, LaTeX) of c sigma^k: a symbolic common factor of c taken out, c's sum in parentheses."""
    c = sp.expand(c)
    g = sp.factor_terms(c)
    coeff, rest = g.as_coeff_Mul()
    factors = sp.Mul.make_args(rest)
    monomial = sp.Mul(*[f for f in factors if not isinstance(f, sp.Add)])
    sums = [f for f in factors if isinstance(f, sp.Add)]
    if sums and monomial == 1 and k == 0:   # the constant term: written as it is, no parentheses
        negative = c.could_extract_minus_sign()
        return negative, _sum_latex(-c if negative else c)
    if sums and monomial == 1:          # only a number came out: keep the sum as it is
        coeff, sums = sp.Integer(1), [c]
        if c.could_extract_minus_sign():
            coeff, sums = sp.Integer(-1), [-c]
    elif sums and coeff < 0:             # 825 (1 - rho^2), not -825 (rho^2 - 1)
        coeff, sums = -coeff, [-sums[0]] + sums[1:]
    negative = coeff < 0
    pieces = []
    mag = abs(coeff)
    if mag != 1 or (monomial == 1 and not sums and k == 0):
        pieces.append(sp.latex(mag))
    if k:
        pieces.append(sp.latex(sigma**k))
    pieces += [r"\left(" + _sum_latex(a) + r"\right)" for a in sums]
    if monomial != 1:
        pieces.append(sp.latex(monomial))
    return negative, " ".join(pieces)


def _sum_latex(a: sp.Expr) -> str:
    """A sum with its terms in lexicographic order of the SDs (sigma_0^2 + rho sigma_0 sigma_1 + sigma_1^2)."""
    gens = sorted((s for s in a.free_symbols if s.name.startswith("sigma")), key=lambda s: s.name)
    terms = sorted(sp.Add.make_args(a), key=lambda t: tuple(-sp.degree(t, g) for g in gens))
    out = ""
    for t in terms:
        negative = t.could_extract_minus_sign()
        text = sp.latex(-t if negative else t)
        out += ("-" if negative else "") + text if not out else (" - " if negative else " + ") + text
    return out


def _falling_powers_latex(poly: sp.Expr) -> str:
    """A polynomial in sigma in falling powers, each coefficient collected (display only)."""
    out = ""
    for (k,), c in sorted(sp.Poly(sp.expand(poly), sigma).terms(), reverse=True):
        negative, text = _monomial_term_latex(c, k)
        out += ("-" if negative else "") + text if not out else (" - " if negative else " + ") + text
    return out


def _tex_text(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("^", r"\^{}"), ("&", r"\&"), ("%", r"\%"),
                 ("#", r"\#"), ("~", r"\textasciitilde{}"), ("|", r"$|$"), ("{", r"\{"), ("}", r"\}")):
        text = text.replace(a, b)
    return text


def _factor_in_sigma(expr: sp.Expr) -> sp.Expr:
    """sympy's factorisation with each factor signed so that its leading term in sigma is positive
    (sigma^4 + ..., not -(... - sigma^4)), as a reader writes a determinant."""
    def signed(poly: sp.Expr) -> sp.Expr:
        coeff, factors = sp.factor_list(poly)
        out = []
        for base, power in factors:
            if sp.Poly(base, sigma).LC().could_extract_minus_sign():
                base, coeff = -base, coeff * (-1) ** power
            out.append(base ** power)
        return sp.Mul(coeff, *out)

    numerator, denominator = sp.fraction(sp.together(expr))
    return signed(numerator) / signed(denominator)


def _exact_matrix(A: np.ndarray) -> sp.Matrix:
    return sp.Matrix(A.shape[0], A.shape[1], [exact_number(v) for v in np.ravel(A)])


def _quadratic_poly(A: np.ndarray, b: np.ndarray, c: float, beta: sp.Matrix) -> sp.Expr:
    """c - 2 b^T beta + beta^T A beta, the expanded sum of squares (y - X beta)^T (y - X beta)."""
    A, b = _exact_matrix(np.atleast_2d(A)), _exact_matrix(np.atleast_2d(b).reshape(-1, 1))
    return sp.expand(exact_number(c) - 2 * (b.T * beta)[0, 0] + (beta.T * A * beta)[0, 0])


# ----------------------------------------------------------------- slopes and several random terms
def _ident(text: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in text).strip("_") or "x"


@dataclass(frozen=True)
class _Component:
    """A block of Sigma: the observations and random-effect columns that Z links (a group for one
    grouping factor, a batch for nested factors, everything for crossed ones)."""

    rows: np.ndarray
    cols: np.ndarray


class GeneralDerivation(Derivation):
    r"""Eq. 1-12 for slopes, nested and crossed terms: :math:`\Sigma = Z D Z^\top + \sigma^2 I` with
    :math:`D` block-diagonal.

    :math:`\Sigma` splits into independent blocks, one per connected component of :math:`Z`'s columns; on
    each block the determinant lemma and Woodbury's identity (:func:`block_identities`, with
    :math:`q \times q` :math:`D` and :math:`S = Z_c^\top Z_c`) give :math:`|\Sigma_c|` and
    :math:`r^\top \Sigma_c^{-1} r`. Blocks with the same S and D are pooled; a block of more than
    ``MAX_BLOCK`` random effects (crossed factors) keeps its determinant unexpanded.
    """

    MAX_BLOCK = 4

    @functools.cached_property
    def equations(self) -> list[Equation]:
        """Eq. 1-12; their plain text uses the short names of the legend."""
        out = []
        for e in Derivation.equations.func(self):
            text = e.text or sp.pretty(e.expr.subs(self.short_symbols), use_unicode=True, order="none",
                                       wrap_line=False)
            if self.legend and e.number in (6, 8, 11, 12):
                text += "\nwhere " + "; ".join(f"{k}: {v}" for k, v in self.legend.items())
            out.append(dataclasses.replace(e, text=text))
        return out

    def legend_latex(self) -> str:
        """The legend of the short symbol names, as LaTeX: one aligned line per symbol."""
        lines = [self._names[v] + r" &\quad \text{" + _tex_text(self.legend[k]) + "}"
                 for k, v in self.symbols.aliases.items() if k in self.legend]
        return r"\begin{aligned}" + r" \\ ".join(lines) + r"\end{aligned}"

    def __init__(self, design: Design):
        if not design.terms:
            raise ModelError("the design has no random-effect terms")
        self.design = design
        self.symbolic_y = design.n <= INVERSE_N
        self.groups = GroupStructure.of(design)
        self.symbols = _symbols(design, self.groups, design.n if self.symbolic_y else SHOWN_ROWS)
        self._names = dict(self.symbols.latex_names)
        self.variance_symbols, self.D_terms = self._variance_parameters()

    def _variance_parameters(self):
        """SD symbols sigma_<group>_<column> and correlations rho_<group>_<a>_<b>; D_k per term.

        They are shown by short names with a legend (``legend``): for one term sigma_0, sigma_1, ... by
        column and rho; for several terms sigma_k (or sigma_k_c) and rho_k by term k = 1, 2, ... Both the
        short and the long names are in ``symbols.by_name()``."""
        terms = self.design.terms
        single = len(terms) == 1 and terms[0].q == 1
        params, Ds = [], []
        self.legend: dict[str, str] = {}
        self.short_symbols: dict[sp.Symbol, sp.Symbol] = {}
        aliases = self.symbols.aliases

        def short(sym, name, tex, meaning):
            self._names[sym] = tex
            alias = sp.Symbol(name, **sym.assumptions0)
            self.short_symbols[sym] = alias
            self.legend[name] = meaning
            aliases[name] = sym
            aliases[sym.name] = sym

        for k, term in enumerate(terms, start=1):
            sds = []
            for c, name in enumerate(term.names):
                sym = sigma_s if single else sp.Symbol(f"sigma_{_ident(term.group)}_{_ident(name)}", positive=True)
                if not single:
                    if len(terms) == 1:
                        sub, tex = f"{c}", f"{c}"
                    else:
                        sub, tex = (f"{k}", f"{k}") if term.q == 1 else (f"{k}_{c}", f"{k},{c}")
                    short(sym, f"sigma_{sub}", rf"\sigma_{{{tex}}}", f"SD of {term.group}'s {name}")
                sds.append(sym)
            R = sp.eye(term.q)
            rhos = []
            for a in range(term.q):
                for b in range(a + 1, term.q):
                    rho = sp.Symbol(f"rho_{_ident(term.group)}_{_ident(term.names[a])}_{_ident(term.names[b])}",
                                    real=True)
                    pair = "" if term.q == 2 else f"{a}{b}"
                    sub = pair if len(terms) == 1 else f"{k}{pair}"
                    name = f"rho_{sub}" if sub else "rho"
                    tex = rf"\rho_{{{sub}}}" if sub else r"\rho"
                    short(rho, name, tex, f"correlation of {term.group}'s {term.names[a]} and {term.names[b]}")
                    R[a, b] = R[b, a] = rho
                    rhos.append(rho)
            params += sds + rhos
            Ds.append(sp.diag(*sds) * R * sp.diag(*sds))
        return tuple(dict.fromkeys(params)), Ds

    # ------------------------------------------------------------------------------ structure
    @functools.cached_property
    def Z(self):
        return random_effects_matrix(self.design)

    @functools.cached_property
    def D_columns(self) -> list[tuple[int, int]]:
        """(term, column within the term) of each column of Z."""
        out = []
        for k, term in enumerate(self.design.terms):
            out += [(k, c) for _ in range(term.n_levels) for c in range(term.q)]
        return out

    @functools.cached_property
    def components(self) -> list[_Component]:
        import scipy.sparse.csgraph
        ZtZ = (self.Z.T @ self.Z).tocsr()
        count, labels = scipy.sparse.csgraph.connected_components(ZtZ != 0, directed=False)
        Zc = self.Z.tocsr()
        row_of = np.asarray(Zc.argmax(axis=1)).ravel()  # every row has a non-zero in its component
        out = []
        for c in range(count):
            cols = np.flatnonzero(labels == c)
            rows = np.flatnonzero(labels[row_of] == c)
            out.append(_Component(rows=rows, cols=cols))
        return out

    def _D_block(self, cols: np.ndarray) -> sp.Matrix:
        """The symbolic covariance of a set of random-effect columns (zero across levels and terms)."""
        Dc = self.D_columns
        offsets = np.cumsum([0] + [t.q * t.n_levels for t in self.design.terms])

        def entry(a, b):
            (ka, ca), (kb, cb) = Dc[cols[a]], Dc[cols[b]]
            same_level = ka == kb and (cols[a] - offsets[ka]) // self.design.terms[ka].q == \
                (cols[b] - offsets[kb]) // self.design.terms[kb].q
            return self.D_terms[ka][ca, cb] if same_level else 0
        return sp.Matrix(len(cols), len(cols), entry)

    @functools.cached_property
    def classes(self) -> list[tuple[BlockIdentities | None, int, list[_Component], sp.Matrix, sp.Matrix]]:
        r"""Components pooled by (size, :math:`Z_c^\top Z_c`, :math:`D_c`): their identities, size :math:`m`,
        members, :math:`S` and :math:`D`."""
        Zd = self.Z.tocsc()
        pooled: dict = {}
        for comp in self.components:
            Zc = Zd[comp.rows][:, comp.cols].toarray()
            S = Zc.T @ Zc
            D = self._D_block(comp.cols)
            key = (len(comp.rows), S.tobytes(), S.shape, sp.srepr(D))
            pooled.setdefault(key, (S, D, []))[2].append(comp)
        out = []
        for (size, *_), (S, D, members) in pooled.items():
            Se = _exact_matrix(S)
            ident = None
            if D.shape[0] <= self.MAX_BLOCK:
                Zr = sp.Matrix(sp.symbols(f"z_0:{D.shape[0]}", real=True))
                ident = block_identities(D, Se, Zr, self.variance_symbols)
            out.append((ident, size, members, Se, D))
        return out

    # ---------------------------------------------------------------------------- closed forms
    def _block_det(self, ident, size, S, D) -> sp.Expr:
        if ident is not None:
            return _factor_in_sigma(ident.det.subs(m, size))
        return sigma ** (2 * size) * sp.Determinant(sp.eye(D.shape[0]) + D * S / sigma**2)

    @functools.cached_property
    def det(self) -> sp.Expr:
        r"""Eq. 11: :math:`\prod_c \sigma^{2 m_c} |I + D_c S_c / \sigma^2|` over the blocks (determinant lemma)."""
        return sp.Mul(*[self._block_det(i, size, S, D) ** len(mem) for i, size, mem, S, D in self.classes])

    @functools.cached_property
    def logdet(self) -> sp.Expr:
        terms = []
        for ident, size, members, S, D in self.classes:
            if ident is not None:
                inner = _factor_in_sigma(sp.together(ident.det.subs(m, size) / sigma ** (2 * size)))
                terms.append(len(members) * (2 * size * sp.log(sigma) + sp.log(inner)))
            else:
                terms.append(len(members) * sp.log(self._block_det(ident, size, S, D)))
        return sp.expand_log(sp.Add(*terms), force=True)

    @functools.cached_property
    def quadratic_form(self) -> sp.Expr:
        r"""Eq. 12: :math:`\bigl(r^\top r - \sum_c (Z_c^\top r)^\top W_c (Z_c^\top r)\bigr) / \sigma^2`,
        :math:`W_c = D_c (\sigma^2 I + S_c D_c)^{-1}`."""
        d = self.design
        beta = sp.Matrix(self.symbols.beta)
        Zd = self.Z.tocsc()
        if self.symbolic_y:
            r = sp.Matrix(self.residuals)
            total = sum(ri**2 for ri in r)
            pooled = []
            for ident, size, members, S, D in self.classes:
                W = self._weight_matrix(ident, S, D)
                for comp in members:
                    Zc = _exact_matrix(Zd[comp.rows][:, comp.cols].toarray())
                    zr = Zc.T * sp.Matrix([r[i] for i in comp.rows])
                    pooled.append((zr.T * W * zr)[0, 0])
            return (total - sp.Add(*pooled)) / sigma**2
        if any(ident is None for ident, *_ in self.classes):
            return self._woodbury_form()
        X, y = d.X, d.y
        total = _quadratic_poly(X.T @ X, X.T @ y, float(y @ y), beta)
        pooled = []
        for ident, size, members, S, D in self.classes:
            W = self._weight_matrix(ident, S, D)
            q = S.shape[0]
            C = np.stack([(Zd[c.rows][:, c.cols].T @ X[c.rows]) for c in members])        # (k, q, p)
            zy = np.stack([(Zd[c.rows][:, c.cols].T @ y[c.rows]) for c in members])       # (k, q)
            acc = 0
            for a in range(q):
                for b in range(q):
                    A = (np.einsum("kp,kr->pr", C[:, a], C[:, b]) + np.einsum("kp,kr->pr", C[:, b], C[:, a])) / 2
                    bb = (np.einsum("k,kp->p", zy[:, a], C[:, b]) + np.einsum("k,kp->p", zy[:, b], C[:, a])) / 2
                    acc += W[a, b] * _quadratic_poly(A, bb, float(zy[:, a] @ zy[:, b]), beta)
            pooled.append(acc)
        return (total - sp.Add(*pooled)) / sigma**2

    def _woodbury_form(self) -> sp.Expr:
        """Eq. 12 for a block too large to write out (crossed factors): Woodbury in matrix symbols."""
        n, q = n_obs, sp.Symbol("q", positive=True, integer=True)
        r, Z, D = sp.MatrixSymbol("r", n, 1), sp.MatrixSymbol("Z", n, q), sp.MatrixSymbol("D", q, q)
        inner = sp.Inverse(sigma**2 * sp.Identity(q) + Z.T * Z * D)
        # a 1 x 1 matrix; its trace is the number
        return sp.Trace(r.T * r - r.T * Z * D * inner * Z.T * r) / sigma**2

    @property
    def _few_blocks(self) -> bool:
        return len(self.classes) <= 3 and all(D.shape[0] == 1 for *_, D in self.classes)

    @staticmethod
    def _weight_matrix(ident, S, D) -> sp.Matrix:
        if ident is not None:
            return ident.W
        return D * sp.Inverse(sigma**2 * sp.eye(D.shape[0]) + S * D)

    @functools.cached_property
    def residuals(self) -> list[sp.Expr]:
        xb = self.X_exact * sp.Matrix(self.symbols.beta)
        return [y - v for y, v in zip(self.symbols.y, xb)]

    @functools.cached_property
    def sigma_matrix(self) -> sp.Matrix | None:
        r"""Eq. 8: :math:`\Sigma = Z D Z^\top + \sigma^2 I` written out (None for large designs)."""
        if self.design.n > INVERSE_N:
            return None
        Z = _exact_matrix(self.Z.toarray())
        D = self._D_block(np.arange(Z.shape[1]))
        return Z * D * Z.T + sigma**2 * sp.eye(self.design.n)

    @functools.cached_property
    def inverse(self) -> sp.Matrix | None:
        r""":math:`\Sigma^{-1}` assembled from the blocks' Woodbury forms (None for large designs)."""
        if self.design.n > INVERSE_N or any(i is None for i, *_ in self.classes):
            return None
        n = self.design.n
        out = sp.eye(n) / sigma**2
        Zd = self.Z.tocsc()
        for ident, size, members, S, D in self.classes:
            for comp in members:
                Zc = _exact_matrix(Zd[comp.rows][:, comp.cols].toarray())
                block = Zc * ident.W * Zc.T / sigma**2
                for a, i in enumerate(comp.rows):
                    for b, j in enumerate(comp.rows):
                        out[i, j] -= block[a, b]
        return out.applyfunc(sp.factor)

    @functools.cached_property
    def kinship(self) -> sp.Matrix | None:
        r""":math:`Z Z^\top`, which observations share a random effect (None for large designs)."""
        if self.design.n > INVERSE_N:
            return None
        Z = _exact_matrix(self.Z.toarray())
        return Z * Z.T

    @functools.cached_property
    def gls_information(self) -> sp.Matrix:
        r""":math:`X^\top \Sigma^{-1} X = \bigl(X^\top X - \sum_c (Z_c^\top X)^\top W_c (Z_c^\top X)\bigr) / \sigma^2`."""
        if any(ident is None for ident, *_ in self.classes):   # crossed: the matrix form
            n, q = n_obs, sp.Symbol("q", positive=True, integer=True)
            X, Z = sp.MatrixSymbol("X", n, self.design.p), sp.MatrixSymbol("Z", n, q)
            D = sp.MatrixSymbol("D", q, q)
            inner = sp.Inverse(sigma**2 * sp.Identity(q) + Z.T * Z * D)
            return (X.T * X - X.T * Z * D * inner * Z.T * X) / sigma**2
        X = self.design.X
        Zd = self.Z.tocsc()
        out = _exact_matrix(X.T @ X)
        for ident, size, members, S, D in self.classes:
            W = self._weight_matrix(ident, S, D)
            for comp in members:
                C = _exact_matrix(np.atleast_2d(Zd[comp.rows][:, comp.cols].T @ X[comp.rows]))
                out = out - C.T * W * C
        return out / sigma**2

    # ------------------------------------------------------------------------------ equations
    def _u(self, k: int, c: int, j: int) -> sp.Symbol:
        """Random effect of term k, column c, level j: u, v, w, ... by term; _c for slopes."""
        letter = "uvwabcdefgh"[k]
        q = self.design.terms[k].q
        name = f"{letter}_{c}_{j + 1}" if q > 1 else f"{letter}_{j + 1}"
        return sp.Symbol(name, real=True)

    def _row_rhs(self, i: int) -> sp.Expr:
        s, d = self.symbols, self.design
        fixed = sp.Add(*[exact_number(v) * b for v, b in zip(d.X[i], s.beta)])
        random = [exact_number(t.Z[i, c]) * self._u(k, c, int(t.codes[i]))
                  for k, t in enumerate(d.terms) for c in range(t.q) if t.Z[i, c] != 0]
        return sp.Add(fixed, *random, s.epsilon[i], evaluate=False)

    def _eq2(self) -> Equation:
        i = sp.Symbol("i", integer=True)
        y, e = sp.IndexedBase("y"), sp.IndexedBase("epsilon")
        d = self.design
        fixed = sp.Add(*[b if name in ("(Intercept)", "Intercept") else b * self._covariate(name, k)[i]
                         for k, (b, name) in enumerate(zip(self.symbols.beta, d.fixed_names))])
        random = []
        for k, t in enumerate(d.terms):
            j = sp.Symbol(f"j_{k + 1}", integer=True)
            for c, name in enumerate(t.names):
                base = sp.IndexedBase("uvwabcdefgh"[k])
                u = base[c, j] if t.q > 1 else base[j]
                random.append(u if name == "(Intercept)" else u * self._covariate(name, c)[i])
        expr = sp.Eq(y[i], sp.Add(fixed, *random, e[i], evaluate=False), evaluate=False)
        groups = ", ".join(f"j_{k + 1} = {t.group}[i]" for k, t in enumerate(d.terms))
        latex = sp.latex(expr, order="none").replace(r"{\epsilon}", r"{\varepsilon}")
        return Equation(2, "index form: observation i, its level j_k of each grouping factor", expr, latex,
                        note=groups)

    def _random_part(self, rows: int) -> tuple[sp.Matrix, sp.Matrix, int, str]:
        Zd = self.Z[:rows].toarray()
        width = Zd.shape[1]
        cols = width if width <= 12 else SHOWN_COLUMNS
        labels = [self._u(k, c, j) for k, t in enumerate(self.design.terms)
                  for j in range(t.n_levels) for c in range(t.q)]
        Z = sp.Matrix(rows, cols, lambda i, j: exact_number(Zd[i, j]))
        return Z, sp.Matrix(labels[:cols]), width, "Z"

    def _eq4(self) -> Equation:
        Y, X, b, K, u, e = self._matrix_symbols()
        Z = sp.MatrixSymbol("Z", K.shape[0], K.shape[1])
        expr = sp.Eq(Y, sp.MatAdd(X * b, Z * u, e, evaluate=False), evaluate=False)
        return Equation(4, "the model in matrix notation", expr,
                        sp.latex(expr, symbol_names={e: r"\varepsilon"}, order="none"))

    def _matrix_symbols(self):
        d = self.design
        n, p, q = d.n, d.p, self.Z.shape[1]
        return (sp.MatrixSymbol("Y", n, 1), sp.MatrixSymbol("X", n, p), sp.MatrixSymbol("beta", p, 1),
                sp.MatrixSymbol("Z", n, q), sp.MatrixSymbol("u", q, 1), sp.MatrixSymbol("epsilon", n, 1))

    def _eq5(self) -> Equation:
        Y, X, b, Z, u, e = self._matrix_symbols()
        n, q = Y.shape[0], u.shape[0]
        expectation = sp.MatAdd(X * b, Z * sp.ZeroMatrix(q, 1), sp.ZeroMatrix(n, 1)).doit()
        expr = sp.Eq(sp.Symbol("E[Y]"), expectation, evaluate=False)
        return Equation(5, "the expectation, from E[u] = 0 and E[epsilon] = 0", expr,
                        r"E[Y] = X\beta + Z\,E[u] + E[\varepsilon] = " + sp.latex(expectation))

    def _eq6(self) -> Equation:
        Y, X, b, Z, u, e = self._matrix_symbols()
        n, q = Y.shape[0], u.shape[0]
        Dsym = sp.MatrixSymbol("D", q, q)
        variance = sp.MatAdd(Z * Dsym * Z.T, sigma**2 * sp.Identity(n)).doit()
        expr = sp.Eq(sp.MatrixSymbol("Sigma", n, n), variance, evaluate=False)
        Ds = ", ".join(rf"D_{{\mathrm{{{t.group}}}}} = " + self._latex(D) for t, D in zip(self.design.terms,
                                                                                          self.D_terms))
        terms = sorted(sp.Add.make_args(variance), key=lambda t: not t.has(Z))
        collected = " + ".join(sp.latex(t) for t in terms).replace(r"\mathbb{I}", rf"I_{{{n}}}")
        latex = (r"\begin{aligned} \operatorname{var}(Y) &= Z \operatorname{var}(u) Z^{T} + \operatorname{var}(\varepsilon)"
                 r" = " + collected + r" = \Sigma \\ D &= \operatorname{diag}(I \otimes D_k),\quad " + Ds
                 + r" \end{aligned}")
        return Equation(6, "the variance, from var(A u) = A var(u) A^T", expr, latex)

    def _dense(self, matrix_of) -> tuple[sp.Matrix, str]:
        n = self.design.n
        rows = n if n <= 12 else SHOWN_ROWS
        Z = _exact_matrix(self.Z[:rows].toarray())
        M = matrix_of(Z)
        return M, _matrix_latex(M, n, n, self._names)

    def _eq7(self) -> Equation:
        D = self._D_block(np.arange(self.Z.shape[1]))
        M, latex = self._dense(lambda Z: Z * D * Z.T)
        return Equation(7, "the random effects' share Z D Z^T", sp.Eq(sp.Symbol("ZDZ^T"), M, evaluate=False),
                        r"Z D Z^{T} = " + latex)

    def _eq8(self) -> Equation:
        D = self._D_block(np.arange(self.Z.shape[1]))
        M, latex = self._dense(lambda Z: Z * D * Z.T + sigma**2 * sp.eye(Z.shape[0]))
        return Equation(8, "Sigma written out", sp.Eq(sp.Symbol("Sigma"), M, evaluate=False), r"\Sigma = " + latex)

    def _eq11(self) -> Equation:
        """Eq. 11 with each block's determinant written in falling powers of sigma^2, its coefficients
        collected in the legend's short names (sigma^4 + sigma^2 (...) + 825 (1 - rho^2) sigma_0^2 sigma_1^2)."""
        eq = super()._eq11()
        det = self.det.subs(self.short_symbols)
        parts, blocks = [], []
        for f in sp.Mul.make_args(det):
            base, power = f.as_base_exp()
            if isinstance(base, sp.Add) and base.has(sigma) and base.is_polynomial(sigma):
                blocks.append(_falling_powers_latex(base))
                body = r"\left(" + blocks[-1] + r"\right)"
            else:
                body = sp.latex(base) if base.is_Atom else r"\left(" + sp.latex(base) + r"\right)"
            parts.append([body, "" if power == 1 else f"^{{{sp.latex(power)}}}"])
        lhs = eq.latex.split(" = ", 1)[0]
        if sum(len(b) for b in blocks) <= LINE_CHARS:
            return dataclasses.replace(eq, latex=lhs + " = " + " ".join(b + p for b, p in parts))
        # too long for one line: each block's polynomial named Delta_k and written below
        names = [r"\Delta" if len(blocks) == 1 else rf"\Delta_{{{k + 1}}}" for k in range(len(blocks))]
        k = 0
        for part in parts:
            if part[0].startswith(r"\left(") and k < len(blocks) and part[0] == r"\left(" + blocks[k] + r"\right)":
                part[0], k = names[k], k + 1
        latex = (r"\begin{aligned} " + lhs + " &= " + " ".join(b + p for b, p in parts)
                 + "".join(rf" \\ {n} &= {b}" for n, b in zip(names, blocks)) + r" \end{aligned}")
        return dataclasses.replace(eq, latex=latex)

    def _readable(self) -> bool:
        """The per-group reading of Eq. 12 (one Woodbury weight w per group size) is the random intercept's;
        a slope or multi-term model prints its quadratic form as derived."""
        return False

    def _eq12(self) -> Equation:
        eq = super()._eq12()
        note = "" if self.symbolic_y else "the data's values substituted; identical blocks pooled"
        return Equation(eq.number, eq.title, eq.expr, eq.latex, note=note)

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["symbols"]["variance"] = [v.name for v in self.variance_symbols]
        return out


def derive(design: Design) -> Derivation:
    """The derivation of Eq. 1-12 for a design: :class:`Derivation` for the tutorial's (1|g),
    :class:`GeneralDerivation` for slopes and several random terms."""
    if design.kinship is not None:
        raise ModelError("derive does not write out kinship models; their closed form is the spectral one "
                         "(see lmm_symbolic.statistics.SpectralStatistics)")
    return Derivation(design) if design.is_random_intercept else GeneralDerivation(design)
