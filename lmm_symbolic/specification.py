"""Specification: data + lme4-style formula -> design (y, X, the random-effect terms and their grouping).

The first stage of the pipeline, like lme4's ``lFormula``. The fixed part goes to formulaic (after a
whitelist check, since formulaic evaluates Python); the random terms ``(expr | group)``,
``(expr || group)`` and ``group1/group2`` are parsed here.
"""
from __future__ import annotations

import io
import keyword
import os
import re
import tokenize
import warnings
from dataclasses import dataclass, field
from typing import Union

import numpy as np
import pandas as pd

from .errors import DataError, FormulaError, LMMWarning, ModelError, shown
from .formula import (Evaluated, Frame, Terms, deparse, evaluate_terms, expand_terms, missing_rows, model_matrix,
                      names_in, response_values, split_formula, take_rows)

DataLike = Union[pd.DataFrame, str, os.PathLike]

#: functions a formula may call; formulaic evaluates them, so nothing else is let through
FORMULA_FUNCTIONS = frozenset({"C", "I", "log", "log2", "log10", "exp", "sqrt", "center", "scale",
                               "poly", "abs", "Treatment", "Sum", "Helmert", "Poly", "Diff"})
_FORMULA_OPS = frozenset({"+", "-", "*", "/", ":", "**", "(", ")", ",", "|", "||", "~", "="})
MAX_FORMULA_LENGTH = 2000


@dataclass(frozen=True)
class RandomTerm:
    r"""One random-effect term ``(expr | group)``: :math:`u_j \sim N(0, D)` for each level :math:`j` of the
    grouping.

    ``Z`` holds the term's columns (:math:`n \times q`), ``codes`` each row's level index, ``levels`` the level labels.
    """

    expr: str
    group: str
    names: tuple[str, ...]
    Z: np.ndarray
    codes: np.ndarray
    levels: tuple[str, ...]
    #: Z's rows were multiplied by the square roots of prior weights (:func:`whitened`)
    weighted: bool = False

    @property
    def q(self) -> int:
        """Random effects per level (1 for a random intercept)."""
        return self.Z.shape[1]

    @property
    def n_levels(self) -> int:
        return len(self.levels)

    @property
    def is_intercept(self) -> bool:
        r"""True for ``(1|g)``: :math:`Z` is the column of ones, so :math:`Z_j^\top Z_j = m_j`."""
        return self.q == 1 and self.names == ("(Intercept)",) and not self.weighted

    def indicator(self) -> np.ndarray:
        r"""The tutorial's :math:`K` for a random intercept: :math:`K_{ij} = 1` when row :math:`i` belongs to
        level :math:`j` (Eq. 3)."""
        K = np.zeros((len(self.codes), self.n_levels))
        K[np.arange(len(self.codes)), self.codes] = 1.0
        return K

    @property
    def sizes(self) -> np.ndarray:
        r""":math:`m_j`, the number of observations of each level."""
        return np.bincount(self.codes, minlength=self.n_levels)


@dataclass(frozen=True)
class Design:
    r"""The model's data in matrix form: :math:`y = X\beta + \sum_k Z_k u_k + \varepsilon` (Eq. 4)."""

    formula: str
    response: str
    y: np.ndarray
    X: np.ndarray
    fixed_names: tuple[str, ...]
    terms: tuple[RandomTerm, ...]
    frame: pd.DataFrame = field(repr=False)
    messages: tuple[str, ...] = ()
    dropped_columns: tuple[str, ...] = ()
    n_dropped_rows: int = 0
    kinship: np.ndarray | None = field(default=None, repr=False)
    #: prior weights :math:`w_i` (lmer's ``weights``): :math:`\operatorname{Var}(\varepsilon_i) = \sigma^2 / w_i`;
    #: None for :math:`w_i = 1`
    weights: np.ndarray | None = field(default=None, repr=False)
    #: a known term added to the linear predictor (``offset(x)`` or ``offset=``); None for 0
    offset: np.ndarray | None = field(default=None, repr=False)
    #: scale()'s and poly()'s parameters computed on the data, by expression (R's predvars): new data
    #: are evaluated with them (:class:`lmm_symbolic.formula.Frame`)
    formula_parameters: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def n(self) -> int:
        return len(self.y)

    @property
    def p(self) -> int:
        return self.X.shape[1]

    @property
    def has_intercept(self) -> bool:
        return "Intercept" in self.fixed_names or "(Intercept)" in self.fixed_names

    @property
    def is_random_intercept(self) -> bool:
        r"""One ``(1|g)`` term: the tutorial's model, whose :math:`\Sigma` is block-diagonal by :math:`g`."""
        return len(self.terms) == 1 and self.terms[0].is_intercept


def whitened(design: Design) -> Design:
    r"""The design with its prior weights and offset moved into the data: with :math:`W = \operatorname{diag}(w)`,

    .. math:: y^* = W^{1/2} (y - o), \quad X^* = W^{1/2} X, \quad Z^* = W^{1/2} Z,

    so :math:`y^* = X^* \beta + Z^* u + \varepsilon^*`,

    :math:`\operatorname{Var}(\varepsilon^*) = \sigma^2 I`, and
    :math:`\log|\Sigma| = \log|\Sigma^*| - \sum_i \log w_i` (Eq. 6 and 11 with :math:`\sigma^2 W^{-1}` for
    :math:`\sigma^2 I`). Every estimate of the model is that of the whitened one."""
    import dataclasses

    y = design.y - (design.offset if design.offset is not None else 0.0)
    if design.weights is None:
        return dataclasses.replace(design, y=y, offset=None)
    r = np.sqrt(design.weights)
    terms = tuple(dataclasses.replace(t, Z=t.Z * r[:, None], weighted=True) for t in design.terms)
    return dataclasses.replace(design, y=y * r, X=design.X * r[:, None], terms=terms, weights=None, offset=None)


#: the condition number (columns scaled to unit norm) above which X, or a correlated random term's Z, is
#: fitted in a well-conditioned basis (:func:`conditioned`); below it the design is used as given
CONDITION_LIMIT = 1e3


def _lower_factor(A: np.ndarray) -> np.ndarray:
    """The lower-triangular L with a non-negative diagonal and L L^T = A A^T (an LQ factorisation of A:
    A^T = Q R gives A A^T = R^T R); it exists when A is singular too (a boundary fit)."""
    R = np.linalg.qr(A.T, mode="r")
    R = R * np.where(np.diag(R) < 0, -1.0, 1.0)[:, None]
    return np.ascontiguousarray(R.T)


def _basis(A: np.ndarray) -> tuple[np.ndarray, np.ndarray, float] | None:
    """(A~, C, log|det C|) with A~ = A C well conditioned, or None when A's columns (scaled to unit norm) have a
    condition number within :data:`CONDITION_LIMIT` (or A is rank deficient: left to the core to report).

    Householder QR of A with its all-ones column (if any) first, A P = Q R; A~ = Q S with S = diag(s),
    s = sqrt(n) sign(R_kk) (columns of RMS 1), s_0 = R_00 for the ones column so that it stays exactly the
    ones column; then C = P R^-1 S. Q is orthonormal to rounding however ill-conditioned A is, which the
    normal equations of A are not (they square its condition number)."""
    n, p = A.shape
    if p < 2 or n < p or not isinstance(A, np.ndarray):
        return None
    gram = A.T @ A                                    # a cheap first test: cond(G) = cond(A D^-1)^2
    norms = np.sqrt(np.diag(gram))
    if not (np.all(np.isfinite(gram)) and np.all(norms > 0)):
        return None
    lam = np.linalg.eigvalsh(gram / np.outer(norms, norms))
    if lam[0] > 0 and lam[-1] <= CONDITION_LIMIT ** 2 * lam[0] / 4:
        return None
    ones = [k for k in range(p) if A[0, k] == 1.0 and bool(np.all(A[:, k] == 1.0))][:1]
    order = ones + [k for k in range(p) if k not in ones]
    Q, R = np.linalg.qr(A[:, order])
    d = np.diag(R)
    if not np.all(np.abs(d) > 0):
        return None
    cond = np.linalg.cond(R / norms[order])
    if not np.isfinite(cond) or cond <= CONDITION_LIMIT:
        return None
    s = np.where(d < 0, -1.0, 1.0) * np.sqrt(n)
    if ones:
        s[0] = d[0]
    At = Q * s
    if ones:
        At[:, 0] = 1.0
    import scipy.linalg
    C = np.empty((p, p))
    C[order, :] = scipy.linalg.solve_triangular(R, np.diag(s))
    return At, C, float(np.log(np.abs(s)).sum() - np.log(np.abs(d)).sum())


@dataclass(frozen=True)
class Conditioning:
    r"""How a design was re-expressed for the core (:func:`conditioned`), and the maps back.

    :math:`\tilde X = X C_X`, so :math:`X\beta = \tilde X \tilde\beta` with :math:`\beta = C_X \tilde\beta` and
    :math:`\operatorname{Var}(\beta) = C_X \operatorname{Var}(\tilde\beta) C_X^\top`; the REML criterion's
    :math:`\log|X^\top V^{-1} X| = \log|\tilde X^\top V^{-1} \tilde X| - 2 \log|\det C_X|` (ML is unchanged).
    For a correlated term (:math:`q \ge 2`, an unstructured :math:`q \times q` covariance)
    :math:`\tilde Z_k = Z_k C_k`, so :math:`Z_k b = \tilde Z_k \tilde b` with :math:`b = C_k \tilde b` and
    :math:`D_k = C_k \tilde D_k C_k^\top`: the same model, its relative factor :math:`T_k` the lower factor of
    :math:`C_k \tilde T_k` (lme4's :math:`\theta` for the user's columns). None where the design is used as
    given."""

    fixed: np.ndarray | None = None
    terms: tuple[np.ndarray | None, ...] = ()
    logdet: float = 0.0          # log|det C_X|

    @property
    def identity(self) -> bool:
        return self.fixed is None and all(C is None for C in self.terms)

    def beta(self, beta_t: np.ndarray) -> np.ndarray:
        return beta_t if self.fixed is None else self.fixed @ beta_t

    def vcov(self, V: np.ndarray) -> np.ndarray:
        return V if self.fixed is None else self.fixed @ V @ self.fixed.T

    def _map_theta(self, theta, qs, inverse: bool) -> np.ndarray:
        theta = np.asarray(theta, dtype=float)
        if all(C is None for C in self.terms):
            return theta
        out, k = [], 0
        for q, C in zip(qs, self.terms):
            rows, cols = np.triu_indices(q)          # lme4's column-major lower triangle: (col, row) pairs
            idx = (cols, rows)
            size = len(rows)
            block = theta[k:k + size]
            k += size
            if C is None:
                out.append(block)
                continue
            T = np.zeros((q, q))
            T[idx] = block
            T = _lower_factor((np.linalg.solve(C, T) if inverse else C @ T))
            out.append(T[idx])
        return np.concatenate(out + [theta[k:]]) if out else theta

    def theta(self, theta_t, qs) -> np.ndarray:
        r"""lme4's :math:`\theta` for the user's :math:`Z` from :math:`\tilde\theta` of :math:`\tilde Z` (formula
        order, :math:`q_k` per term)."""
        return self._map_theta(theta_t, qs, inverse=False)

    def theta_tilde(self, theta, qs) -> np.ndarray:
        r""":math:`\tilde\theta` of :math:`\tilde Z` from lme4's :math:`\theta`."""
        return self._map_theta(theta, qs, inverse=True)

    def modes(self, b_t: np.ndarray, k: int) -> np.ndarray:
        r"""Term :math:`k`'s conditional modes (levels :math:`\times q`) for the user's columns:
        :math:`b = C_k \tilde b` per level."""
        C = self.terms[k] if k < len(self.terms) else None
        return b_t if C is None else b_t @ C.T


def conditioned(design: Design) -> tuple[Design, Conditioning]:
    r"""The design the core fits: :math:`X`, and the :math:`Z` of each correlated term (:math:`q \ge 2`),
    replaced by a well-conditioned basis of the same column space where their condition number exceeds
    :data:`CONDITION_LIMIT` (near-collinear covariates, a covariate far from 0 such as
    :math:`x = 1000 + 0.01 z`), with the maps back (:class:`Conditioning`). The model is the same:
    :math:`\operatorname{col}(X)` and each unstructured term's family of covariances do not change, so the ML
    optimum is the same point and every reported quantity is mapped to the user's parametrisation. The
    normal equations :math:`X^\top V^{-1} X` of an :math:`X` with condition number :math:`\kappa` lose
    :math:`\kappa^2 \varepsilon` of the criterion; in the new basis they lose :math:`\varepsilon`. Scalar terms
    (:math:`q = 1`) are left as they are (centring their covariate would change the model)."""
    import dataclasses

    if not isinstance(design.X, np.ndarray):
        return design, Conditioning()
    fixed = _basis(design.X)
    terms, Cs = [], []
    for t in design.terms:
        basis = _basis(t.Z) if t.q >= 2 and isinstance(t.Z, np.ndarray) else None
        Cs.append(None if basis is None else basis[1])
        terms.append(t if basis is None else dataclasses.replace(t, Z=basis[0]))
    cond = Conditioning(fixed=None if fixed is None else fixed[1], terms=tuple(Cs),
                        logdet=0.0 if fixed is None else fixed[2])
    if cond.identity:
        return design, cond
    work = dataclasses.replace(design, X=design.X if fixed is None else fixed[0], terms=tuple(terms))
    return work, cond


def random_effects_matrix(design: Design):
    r""":math:`Z = [Z_1 \cdots Z_K]` of Eq. 4 (:math:`n \times \sum_k q_k G_k`, scipy.sparse): term :math:`k`'s
    column :math:`c` for level :math:`j` sits at :math:`\text{offset}_k + j q_k + c` (lme4's layout), so each row
    has :math:`\sum_k q_k` non-zeros."""
    import scipy.sparse

    rows, cols, vals, offset = [], [], [], 0
    for term in design.terms:
        codes = np.asarray(term.codes)
        for c in range(term.q):
            rows.append(np.arange(design.n))
            cols.append(offset + codes * term.q + c)
            vals.append(np.asarray(term.Z[:, c], dtype=float))
        offset += term.q * term.n_levels
    return scipy.sparse.csc_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                                   shape=(design.n, offset))


# --------------------------------------------------------------------------------------------- data
def read_data(data: DataLike) -> pd.DataFrame:
    """A DataFrame as given, or a CSV file read with pandas; anything else is a DataError."""
    if isinstance(data, pd.DataFrame):
        return data
    if not isinstance(data, (str, os.PathLike)):
        raise DataError(f"data must be a pandas DataFrame or a CSV path, not {type(data).__name__}")
    path = os.fspath(data)
    if not os.path.exists(path):
        raise DataError(f"data file not found: {path!r}; give the path of a CSV file")
    if os.path.isdir(path):
        raise DataError(f"{path!r} is a directory; give the path of a CSV file")
    if not os.path.isfile(path):
        raise DataError(f"{path!r} is not a regular file (a pipe, socket or device is not read, since it may "
                        "never end); save the data to a CSV file")
    size = os.path.getsize(path)
    if size > MAX_CSV_BYTES:
        raise DataError(f"{path!r} holds {size / 2**20:.0f} MiB, more than the {MAX_CSV_BYTES // 2**20} MiB a CSV "
                        "file may hold here; use a Dask DataFrame (dask.dataframe.read_csv) for larger data")
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError as exc:
        raise DataError(f"cannot open the data file {path!r}: {exc.strerror or exc}; check that it exists "
                        "and that you may read it") from None
    if b"\x00" in head:
        raise DataError(f"{path!r} is not a text CSV file (it holds binary data); export the data as CSV")
    if _header_separators(path) >= MAX_COLUMNS:
        raise DataError(f"{path!r} has more than {MAX_COLUMNS} columns, more than a model's data may have here")
    try:
        # as R's read.csv: only empty cells and NA are missing (a level called "None" or "null" is data)
        frame = pd.read_csv(path, keep_default_na=False, na_values=["", "NA"], **_csv_dialect(path, head))
    except pd.errors.EmptyDataError:
        raise DataError(f"the data file {path!r} is empty; it needs a header line and rows of data") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"cannot read {path!r} as CSV: it is not UTF-8 text ({exc.reason} at byte "
                        f"{exc.start}); save it as UTF-8 CSV") from None
    except (pd.errors.ParserError, OSError, ValueError) as exc:
        raise DataError(f"cannot read {path!r} as CSV: {str(exc).splitlines()[0]}; check the file is "
                        "comma-separated with one header line") from None
    return _numeric_text_columns(frame)


def _header_separators(path: str, chunk: int = 1 << 16) -> int:
    """The separators (, ; tab) on the header line, read in chunks up to its end or until there are
    :data:`MAX_COLUMNS` of them (a header of any width is never read whole)."""
    count = 0
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            line = block.split(b"\n", 1)[0]
            count += line.count(b",") + line.count(b";") + line.count(b"\t")
            if len(line) < len(block) or not block or count >= MAX_COLUMNS:
                return count


#: the largest CSV file read into memory, and the most columns. pandas' reader peaks at about 2.4 times the
#: file's size (measured: a 176 MB file of two float columns and a group code, 420 MB above the interpreter),
#: so 1 GiB keeps a read near 2.5 GB; a 2 GB file is refused at once, before any reading
MAX_CSV_BYTES = 2**30
MAX_COLUMNS = 10_000


def _numeric_text_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """A text column whose every value is a number, NaN or Inf becomes numeric (R's read.csv reads "NaN"
    and "Inf" in a numeric column as numbers); any other text column stays text."""
    for c in frame.columns:
        col = frame[c]
        if col.dtype == object or pd.api.types.is_string_dtype(col):
            numbers = pd.to_numeric(col, errors="coerce")
            text = col.astype(str).str.strip().str.lower()
            if numbers.notna().sum() and (numbers.notna() | col.isna() | text.isin(["nan", "-nan"])).all():
                frame[c] = numbers.astype(float)
    return frame


def _csv_dialect(path: str, head: bytes) -> dict:
    """Comma-, semicolon- or tab-separated, by the header line. A semicolon file is read with decimal
    commas when its numbers have them (as spreadsheets write where the comma is the decimal mark), with
    decimal points otherwise."""
    header = head.split(b"\n", 1)[0]
    sep = max((b",", b";", b"\t"), key=header.count)
    if not header.count(sep) or sep == b",":
        return {}
    if sep == b";":
        with open(path, "rb") as fh:
            body = fh.read(1 << 16)
        commas = len(re.findall(rb"(?:^|;)-?\d+,\d+(?=;|\r?$)", body, re.M))
        points = len(re.findall(rb"(?:^|;)-?\d*\.\d+(?=;|\r?$)", body, re.M))
        return {"sep": ";", **({"decimal": ","} if commas >= points and commas else {})}
    return {"sep": sep.decode()}


# ------------------------------------------------------------------------------------------ formula
def _check_tokens(text: str, columns: set[str]) -> None:
    """Whitelist the formula's tokens: column names, known functions, numbers, strings and operators.

    formulaic evaluates terms as Python, so attribute access, subscripts, braces, backticks and unknown
    names never reach it.
    """
    if len(text) > MAX_FORMULA_LENGTH:
        raise FormulaError(f"formula longer than {MAX_FORMULA_LENGTH} characters")
    if any(ch in text for ch in "{}[]`;\\@"):
        raise FormulaError(f"formula {text!r} contains a character formulas do not use")
    _check_parentheses(text)
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(text.replace("~", " ~ ")).readline))
    except (tokenize.TokenError, SyntaxError, IndentationError) as exc:
        raise FormulaError(f"malformed formula {text!r}: {exc.args[0]}") from None
    for tok in tokens:
        if tok.type in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER, tokenize.INDENT,
                        tokenize.DEDENT, tokenize.NUMBER, tokenize.STRING):
            continue
        if tok.type == tokenize.NAME:
            if tok.string in columns or tok.string in FORMULA_FUNCTIONS:
                continue
            if keyword.iskeyword(tok.string) or tok.string.startswith("_"):
                raise FormulaError(f"formula {text!r}: {tok.string!r} is not allowed in a formula")
            raise DataError(f"unknown column {tok.string!r} in formula; the data has columns "
                            f"{', '.join(sorted(map(str, columns)))}")
        elif tok.type == tokenize.OP and tok.string in _FORMULA_OPS:
            continue
        else:
            raise FormulaError(f"formula {text!r}: {tok.string!r} is not allowed in a formula")
    _check_constants(text, [t for t in tokens if t.type in (tokenize.NAME, tokenize.NUMBER, tokenize.STRING,
                                                             tokenize.OP)], columns)


def _check_parentheses(text: str) -> None:
    """Every '(' closed, no ')' without its '(' -- said plainly, before the tokenizer's own wording."""
    depth = 0
    for i, ch in enumerate(text):
        depth += (ch == "(") - (ch == ")")
        if depth < 0:
            raise FormulaError(f"unbalanced parentheses in formula {text!r}: the ')' at character {i + 1} "
                               "closes nothing; remove it or add the missing '('")
    if depth:
        raise FormulaError(f"unbalanced parentheses in formula {text!r}: {depth} '(' never closed; "
                           "add the missing ')'")


def _check_constants(text: str, toks: list, columns: set[str]) -> None:
    """No arithmetic on literals alone, which Python would evaluate at any cost (``I(9**9**9)`` never ends,
    ``I('a'*10**9)`` fills the memory): a string may only be a function argument, and a power needs a
    column on one side."""
    s = [t.string for t in toks]

    def group_end(k: int, step: int) -> int:
        depth = 0
        while 0 <= k < len(s):
            depth += (s[k] == "(") - (s[k] == ")")
            if depth == 0:
                return k
            k += step
        return k

    def constant(lo: int, hi: int) -> bool:
        return not any(toks[k].type == tokenize.NAME and s[k] in columns for k in range(lo, hi + 1))

    for k, t in enumerate(toks):
        if t.type == tokenize.STRING and not (k > 0 and s[k - 1] in ("(", ",", "=")
                                              and k + 1 < len(s) and s[k + 1] in (")", ",")):
            raise FormulaError(f"formula {text!r}: the string {t.string} may only be a function argument")
        if s[k] != "**" or k == 0 or k + 1 >= len(s):
            continue
        lo = group_end(k - 1, -1) if s[k - 1] == ")" else k - 1
        if lo > 0 and s[lo] == "(" and toks[lo - 1].type == tokenize.NAME and s[lo - 1] not in columns:
            lo -= 1  # a function call
        r = k + 1
        while r < len(s) and s[r] in ("+", "-"):
            r += 1
        if r < len(s) and toks[r].type == tokenize.NAME and r + 1 < len(s) and s[r + 1] == "(":
            r += 1  # a function call
        hi = group_end(r, 1) if r < len(s) and s[r] == "(" else r
        if constant(lo, k - 1) and constant(k + 1, min(hi, len(s) - 1)):
            raise FormulaError(f"formula {text!r}: a power of constants ({' '.join(s[lo:hi + 1])}) is not "
                               "evaluated; write its value, or raise a column to a power")


def _split_top(text: str, sep: str) -> list[str]:
    """Split on ``sep`` where it stands outside all parentheses."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(text):
        ch = text[i]
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise FormulaError(f"unbalanced parentheses in {text!r}")
        elif depth == 0 and text.startswith(sep, i):
            parts.append(text[start:i])
            start = i + len(sep)
            i = start
            continue
        i += 1
    if depth != 0:
        raise FormulaError(f"unbalanced parentheses in {text!r}")
    parts.append(text[start:])
    return parts


def _random_bar(term: str) -> tuple[str, str, bool] | None:
    """``(expr | group)`` -> (expr, group, correlated); None for a fixed-effect term."""
    t = term.strip()
    if not (t.startswith("(") and t.endswith(")")):
        return None
    inner = t[1:-1]  # a parenthesised term with no top-level bar, like (x + z), is fixed
    for bar, correlated in (("||", False), ("|", True)):
        pieces = _split_top(inner, bar)
        if len(pieces) == 2:
            expr, group = (s.strip() for s in pieces)
            if not expr or not group:
                raise FormulaError(f"random-effect term {t!r} needs an expression and a grouping factor, "
                                   "as in (1|group)")
            return expr, group, correlated
        if len(pieces) > 2:
            raise FormulaError(f"random-effect term {t!r} has more than one bar")
    return None


@dataclass(frozen=True)
class ParsedFormula:
    """A formula split into its response, the fixed part for formulaic and the random terms."""

    response: str
    fixed: str
    random: tuple[tuple[str, str], ...]  # (expr, group) with group possibly "a:b"


def parse_formula(formula: str, columns: set[str], require_random: bool = True) -> ParsedFormula:
    """Split ``y ~ fixed + (expr|group) + ...``; ``a/b`` groups expand to ``b:a`` and ``a`` as in lme4."""
    if not isinstance(formula, str) or not formula.strip():
        raise FormulaError("the formula is empty; write one like 'Resp ~ Treat + (1|Ind)'")
    _check_tokens(formula, columns)
    sides = formula.split("~")
    if len(sides) != 2 or not sides[0].strip() or not sides[1].strip():
        raise FormulaError(f"malformed formula {formula!r}: write it as 'response ~ terms', "
                           "e.g. 'Resp ~ Treat + (1|Ind)'")
    response, rhs = sides[0].strip(), sides[1]
    if response not in columns:
        raise DataError(f"the response {response!r} must be a column of the data; add it (or its "
                        "transformation) to the data as a column first")
    if re.search(rf"(?<![\w.]){re.escape(response)}(?![\w.])", rhs):
        raise FormulaError(f"the response {response!r} also appears on the right-hand side of {formula!r}; "
                           "a variable cannot predict itself: remove it from the terms")
    fixed_terms, random_terms = [], []
    for term in _split_top(rhs, "+"):
        if not term.strip():
            raise FormulaError(f"malformed formula {formula!r}: an empty term around '+'")
        bar = _random_bar(term)
        if bar is None:
            if "|" in term:
                raise FormulaError(f"malformed formula {formula!r}: put random-effect terms in parentheses, "
                                   "as in (1|group)")
            fixed_terms.append(term.strip())
            continue
        expr, group, correlated = bar
        groups = _expand_group(group, formula)
        exprs = [expr] if correlated else _uncorrelated(expr)
        random_terms.extend((e, g) for g in groups for e in exprs)
    if not random_terms and require_random:
        raise FormulaError(f"the formula {formula!r} has no random-effect term such as (1|group); this is "
                           "then an ordinary linear model: fit it with ordinary least squares "
                           "(e.g. statsmodels.formula.api.ols)")
    fixed = " + ".join(fixed_terms) if fixed_terms else "1"
    return ParsedFormula(response, fixed, tuple(random_terms))


def _expand_group(group: str, formula: str) -> list[str]:
    """``a/b`` -> ``b:a``, ``a`` (lme4's order and names); ``a:b`` stays an interaction."""
    parts = [g.strip() for g in group.split("/")]
    if any(not re.fullmatch(r"[A-Za-z_.][\w.]*(\s*:\s*[A-Za-z_.][\w.]*)*", g) for g in parts):
        raise FormulaError(f"malformed grouping factor {group!r} in {formula!r}: use a column name, "
                           "a/b for nesting or a:b for an interaction")
    out = []
    for k in range(len(parts), 0, -1):
        out.append(":".join(reversed([p.replace(" ", "") for p in parts[:k]])))
    return out


def _uncorrelated(expr: str) -> list[str]:
    """``(x || g)`` -> ``(1|g) + (0 + x|g)``, one independent term per column, as lme4."""
    terms = [t.strip() for t in _split_top(expr, "+")]
    intercept = not any(t in ("0", "-1") for t in terms)
    slopes = [t for t in terms if t not in ("0", "1", "-1")]
    return (["1"] if intercept else []) + [f"0 + {t}" for t in slopes]


# ------------------------------------------------------------------------------------------- design
def _group_values(frame: pd.DataFrame, group: str) -> pd.Series:
    """The grouping factor's value in each row (the ``a:b`` text for an interaction)."""
    cols = group.split(":")
    if len(cols) == 1:
        return frame[cols[0]]
    values = frame[cols[0]].astype(str)
    for c in cols[1:]:
        values = values + ":" + frame[c].astype(str)
    return values


def _grouping(frame: pd.DataFrame, group: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """Level codes and labels of a grouping factor (an interaction for ``a:b``); levels sorted as R does."""
    if ":" in group:
        return _interaction_codes(frame, group.split(":"))
    values = _group_values(frame, group)
    if isinstance(values.dtype, pd.CategoricalDtype):
        cat = values.cat.remove_unused_categories()
        return cat.cat.codes.to_numpy().astype(np.int64), tuple(str(c) for c in cat.cat.categories)
    codes, levels = _sorted_codes(values)
    return codes, tuple(str(v) for v in levels)


def _interaction_codes(frame: pd.DataFrame, cols: list[str]) -> tuple[np.ndarray, tuple[str, ...]]:
    """The levels of ``a:b`` as the texts "a:b" of the combinations present, sorted as text (the order
    :func:`_group_values`' strings sort in), from integer codes: the texts are made once per combination,
    not once per row."""
    combined = np.zeros(len(frame), dtype=np.int64)
    labels = []
    for c in cols:
        codes, uniques = pd.factorize(frame[c])
        combined = combined * max(len(uniques), 1) + codes
        labels.append([str(v) for v in uniques.tolist()])       # few values: no Index of strings built
    present, inverse = np.unique(combined, return_inverse=True)
    parts, rest = [], present
    for lab in reversed(labels):
        rest, k = np.divmod(rest, max(len(lab), 1))
        parts.append(np.asarray(lab, dtype=object)[k])
    texts = parts[-1]
    for part in reversed(parts[:-1]):
        texts = texts + ":" + part
    texts = texts.tolist()
    order = sorted(range(len(texts)), key=texts.__getitem__)
    rank = np.empty(len(texts), dtype=np.int64)
    rank[order] = np.arange(len(texts))
    return rank[inverse.ravel()], tuple(texts[k] for k in order)


def _sorted_codes(values: pd.Series) -> tuple[np.ndarray, list]:
    """Codes of ``values`` into their sorted distinct values, in one vectorised pass (no loop over rows):
    a counting sort for integer labels of modest range, else pandas.factorize(sort=True); labels of mixed
    types are sorted by their text."""
    arr = values.to_numpy()
    if isinstance(values.dtype, np.dtype) and values.dtype.kind in "iu" and len(arr):
        lo = int(arr.min())
        span = int(arr.max()) - lo + 1
        if span <= 2 * len(arr) + 1024:
            offset = (arr - lo).astype(np.intp, copy=False)
            present = np.bincount(offset, minlength=span) > 0
            rank = np.cumsum(present) - 1
            return rank[offset].astype(np.int64, copy=False), (np.flatnonzero(present) + lo).tolist()
    if arr.dtype != object or pd.api.types.infer_dtype(arr, skipna=False) in ("string", "bytes"):
        codes, uniques = pd.factorize(values, sort=True)
        return np.asarray(codes, dtype=np.int64), list(uniques)
    uniques = pd.unique(values)
    try:
        levels = sorted(uniques)
    except TypeError:
        levels = sorted(uniques, key=str)
    index = {v: k for k, v in enumerate(levels)}
    codes = np.fromiter((index[v] for v in values), dtype=np.int64, count=len(values))
    return codes, levels


_IN_C = re.compile(r"\bC\(\s*([A-Za-z_.][\w.]*)")
_POLY = re.compile(r"\bpoly\(\s*([A-Za-z_.][\w.]*)\s*,\s*(?:degree\s*=\s*)?(\d+)")


def _guarded_frame(spec: str, frame: pd.DataFrame) -> pd.DataFrame:
    """R's check that poly()'s degree is below the number of distinct values (a larger one only builds a
    huge, rank-deficient matrix), and integer columns used outside C() as floats, so that I(x**40) or
    I(2**x) cannot wrap around silently as numpy's integer arithmetic does."""
    for column, degree in _POLY.findall(spec):
        if column in frame.columns and int(degree) >= (k := frame[column].nunique()):
            raise FormulaError(f"poly({column}, {degree}): the degree must be less than the number of distinct "
                               f"values of {column!r} ({k})")
    categorical = set(_IN_C.findall(spec))
    ints = [c for c in frame.columns if c not in categorical and isinstance(frame[c].dtype, np.dtype)
            and frame[c].dtype.kind in "iu" and re.search(rf"\b{re.escape(str(c))}\b", spec)]
    return frame.astype({c: float for c in ints}) if ints else frame


def _model_matrix(spec: str, frame: pd.DataFrame, what: str) -> pd.DataFrame:
    from formulaic import model_matrix
    from formulaic.errors import FormulaicError

    frame = _guarded_frame(spec, frame)
    try:
        mm = model_matrix(spec, frame, na_action="raise")
    except FormulaicError as exc:
        raise FormulaError(f"cannot build the {what} from {spec!r}: {str(exc).splitlines()[0]}") from None
    except (ValueError, TypeError) as exc:
        raise DataError(f"cannot build the {what} from {spec!r}: {str(exc).splitlines()[0]}") from None
    except (LookupError, ArithmeticError, AttributeError) as exc:
        raise FormulaError(f"cannot build the {what} from {spec!r}: {type(exc).__name__}: "
                           f"{(str(exc).splitlines() or [''])[0]}; check the terms' arguments") from None
    return pd.DataFrame(mm)


def _plain_model_matrix(spec: str, frame: pd.DataFrame) -> dict | None:
    """The model matrix of a sum of plain numeric columns (``x1 + x2``, ``0 + x``, ``1``) without formulaic,
    as {column name: values}, in formulaic's names and order; None for anything else (formulaic builds it).

    For 10^6-10^7 rows this skips formulaic's copies; tests check it gives formulaic's matrix exactly.
    """
    terms = [t.strip() for t in spec.split("+")]
    names = [t for t in terms if t not in ("0", "1")]
    if ("0" in terms and "1" in terms) or len(set(names)) != len(names):
        return None
    columns: dict = {} if "0" in terms else {"Intercept": 1.0}
    for name in names:
        if not (re.fullmatch(r"[A-Za-z]\w*", name) and name in frame.columns) or name in FORMULA_FUNCTIONS:
            return None
        col = frame[name]
        if not (isinstance(col.dtype, np.dtype) and col.dtype.kind in "iuf"):
            return None
        columns[name] = col.to_numpy()
    return columns


def _float_matrix(columns, n: int) -> np.ndarray:
    """An n x k float matrix (column-major, filled one column at a time) from a DataFrame or a dict of
    columns (a scalar stands for a constant column)."""
    X = np.empty((len(columns.keys()), n), dtype=float).T
    for k, (name, values) in enumerate(columns.items()):
        X[:, k] = values.to_numpy() if isinstance(values, pd.Series) else values
    return X


def _numeric_response(frame: pd.DataFrame, response: str) -> np.ndarray:
    col = frame[response]
    if not pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col):
        bad = next((v for v in col if not _is_number(v)), col.iloc[0] if len(col) else None)
        raise DataError(f"the response {response!r} must be numeric, but it holds {shown(bad)}; "
                        "convert it to numbers first")
    return col.to_numpy(dtype=float)


def _bare_names(node) -> list[str]:
    """The column names a term list uses as they stand (x in ``1 + x + x:z``), not inside a call
    (``factor(h)``)."""
    if node.kind == "name":
        return [node.value]
    if node.kind == "binary" and node.value in ("+", ":", "*"):
        return [name for a in node.args for name in _bare_names(a)]
    return []


def _check_numeric_columns(parsed, frame: pd.DataFrame) -> None:
    """A column used as a covariate whose values are numbers but for a few (at most 10% of them, at most 3
    distinct: ``12.5``, ``13,1``, ``n/a``) is a typing error in the data, not a factor with a level per
    number: say which value, where."""
    bare = [v.value for v in parsed.fixed.variables if v.kind == "name"]
    for part in parsed.random:
        bare += _bare_names(part.expr)
    for c in dict.fromkeys(bare):
        if c not in frame.columns:
            continue
        col = frame[c]
        if isinstance(col.dtype, pd.CategoricalDtype) or pd.api.types.is_numeric_dtype(col) or \
                not (col.dtype == object or pd.api.types.is_string_dtype(col)):
            continue
        present = col.dropna()
        numbers = pd.to_numeric(present, errors="coerce")
        if len(present) == 0 or numbers.notna().mean() < 0.5:
            continue
        where = np.flatnonzero(numbers.isna().to_numpy())
        # a few stray values among numbers are a typing error; more are a factor's levels (as R reads them)
        if where.size == 0 or where.size > max(1, len(present) // 10) or present.iloc[where].nunique() > 3:
            continue
        first = present.index[where[0]]
        row = frame.index.get_loc(first) + 1
        raise DataError(f"the column {c!r} is numbers except for {len(where)} value(s) that are not, the first "
                        f"{shown(present.iloc[where[0]])} in data row {row}; correct them or leave those cells "
                        f"empty (missing), or write factor({c}) if {c!r} is meant as a factor")


def _is_number(v) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


#: values whose squares and products stay well inside double precision (1e+-308)
MAGNITUDE_LIMITS = (1e-150, 1e150)


def _check_magnitudes(y: np.ndarray, X: np.ndarray, response: str, names: list[str]) -> None:
    """Sums of squares of values beyond 1e150 overflow and of spreads below 1e-150 underflow: say so."""
    lo, hi = MAGNITUDE_LIMITS
    columns = [(f"the response {response!r}", y)]
    columns += [(f"the column {name!r}", X[:, k]) for k, name in enumerate(names)]
    for what, v in columns:
        big = float(np.abs(v).max()) if v.size else 0.0
        spread = float(v.max() - v.min()) if v.size else 0.0
        if big > hi or 0.0 < spread < lo * max(1.0, big):
            raise DataError(f"{what} holds values of size {big:.3g} varying by {spread:.3g}: beyond what "
                            "sums of squares hold in double precision; rescale it (e.g. to other units)")


def _drop_aliased(X: np.ndarray, names: list[str], tol: float = 1e-7) -> tuple[np.ndarray, list[str], list[str]]:
    """Drop each column that is a linear combination of the earlier kept ones, as R's qr (dqrdc2, which
    lme4's check.rankX uses): a column goes when its norm after projecting out the kept columns is below
    ``tol`` times its own norm. Near-collinear columns above that (x2 = x1 + 1e-6 noise) stay, as in lme4."""
    n, p = X.shape
    norms = np.sqrt((X * X).sum(axis=0)) if X.size else np.zeros(p)
    zero = norms == 0
    scaled = X / np.where(zero, 1.0, norms)
    if 0 < p <= n and not zero.any():
        # full rank by the normalised Gram matrix: each column's relative residual is >= sqrt(lambda_min)
        lam = np.linalg.eigvalsh(scaled.T @ scaled)
        if np.all(np.isfinite(lam)) and lam[0] > 1e-8:
            return X, list(names), []
    keep = [k for k in range(p) if not zero[k]]
    while keep:
        R = np.linalg.qr(scaled[:, keep], mode="r")
        small = np.flatnonzero(np.abs(np.diag(R)) < tol) if R.shape[0] >= len(keep) else np.array([], int)
        if R.shape[0] < len(keep):            # more columns than rows: the later ones are combinations
            small = np.array([np.flatnonzero(np.abs(np.diag(R)) < tol)[0] if (np.abs(np.diag(R)) < tol).any()
                              else R.shape[0]])
        if not len(small):
            break
        del keep[int(small[0])]
    dropped = [names[k] for k in range(p) if k not in keep]
    return X[:, keep], [names[k] for k in keep], dropped


def specify(formula: str, data: DataLike, kinship=None, weights=None, offset=None) -> Design:
    r"""Data + formula -> Design (Eq. 3-4): response :math:`y`, fixed effects :math:`X`, random terms :math:`Z_k`
    with groupings.

    The formula is read as lme4 reads it (:mod:`lmm_symbolic.formula`: R's operators, ``I(x^2)``,
    ``factor(x)``, ``poly``, ``scale``, ``log(y) ~ ...``, ``offset(z)``); every variable is evaluated over
    all rows and then rows with a missing value in any used variable, weight or offset are dropped and
    counted (model.frame's na.omit), unused factor levels with them. Aliased fixed-effect columns are
    dropped with lme4's message. ``weights`` (a column name or :math:`n` values) are lmer's prior weights,
    :math:`\operatorname{Var}(\varepsilon_i) = \sigma^2 / w_i`; ``offset`` (a column name or :math:`n` values)
    is added to the linear predictor, as ``offset()`` terms are. With ``kinship`` (an :math:`n \times n`
    positive semi-definite relationship matrix :math:`K` over the data's rows) the formula has no random
    term and :math:`\Sigma = \sigma_s^2 K + \sigma^2 I`.
    Bad input raises DataError, FormulaError or ModelError.
    """
    frame = read_data(data)
    if frame.shape[0] == 0 or frame.shape[1] == 0:
        raise DataError("the data are empty: no rows to fit")
    _check_columns(frame)
    text = formula
    parsed = split_formula(text)
    if kinship is not None and parsed.random:
        raise FormulaError("give either random-effect terms or a kinship matrix, not both")
    if not parsed.random and kinship is None:
        raise FormulaError(f"the formula {text!r} has no random-effect term such as (1|group); this is "
                           "then an ordinary linear model: fit it with ordinary least squares "
                           "(e.g. statsmodels.formula.api.ols), or add a term like (1|group)")
    _check_response_not_predictor(parsed)
    _check_numeric_columns(parsed, frame)
    ev_frame = Frame(frame, text)
    y_all = response_values(parsed.response, ev_frame)
    fixed = evaluate_terms(parsed.fixed, ev_frame)
    parts = _random_parts(parsed, frame)
    if len(parts) > MAX_RANDOM_TERMS:
        raise FormulaError(f"the formula has {len(parts)} random-effect terms, more than the {MAX_RANDOM_TERMS} a model "
                           "may have here (each adds covariance parameters to optimise over)")
    random_parts = [(evaluate_terms(t, ev_frame), group) for t, group in parts]
    w_all = _row_values(weights, frame, "weights")
    o_all = _row_values(offset, frame, "offset")
    if fixed.offset is not None:
        o_all = fixed.offset if o_all is None else o_all + fixed.offset
    if w_all is not None and np.any(w_all[~np.isnan(w_all)] <= 0):
        raise DataError("the weights must be positive (lmer: Var(epsilon_i) = sigma^2 / w_i); remove the rows "
                        "with zero or negative weight")
    na = np.isnan(y_all) | missing_rows(fixed)
    for ev, group in random_parts:
        na |= missing_rows(ev) | _group_missing(frame, group)
    for extra in (w_all, o_all):
        if extra is not None:
            na |= np.isnan(extra)
    n_dropped = int(na.sum())
    messages: list[str] = []
    if n_dropped and kinship is not None:
        raise DataError(f"{n_dropped} row(s) have missing values; with a kinship matrix remove them from "
                        "the data and from K together")
    if n_dropped == len(na):
        raise DataError("no rows left after dropping rows with missing values")
    keep = np.flatnonzero(~na)
    if n_dropped:
        messages.append(f"{n_dropped} row(s) with missing values dropped ({len(keep)} of {len(na)} used): "
                        f"{_missing_summary(frame, na, parsed, w_all, o_all)}")
    sub = frame.iloc[keep].reset_index(drop=True)
    y = y_all[keep]
    X, names = model_matrix(take_rows(fixed, keep))
    if not np.all(np.isfinite(y)):
        raise DataError(f"the response {deparse(parsed.response)!r} holds non-finite (infinite) values (log of "
                        "0? division by 0?); remove or correct those rows")
    for k in np.flatnonzero(~np.isfinite(X).all(axis=0)):
        raise DataError(f"the fixed-effect column {names[k]!r} holds non-finite (infinite) values (log of 0? "
                        "division by 0? overflow?); remove or correct those rows")
    w = None if w_all is None else w_all[keep]
    o = None if o_all is None else o_all[keep]
    if o is not None and not np.all(np.isfinite(o)):
        raise DataError("the offset holds infinite values")
    if w is not None and not np.all(np.isfinite(w)):
        raise DataError("the weights hold infinite values")
    _check_magnitudes(y, X, deparse(parsed.response), names)
    X, names, dropped = _drop_aliased(X, names)
    if X.shape[1] == 0:
        raise ModelError(f"the formula {formula!r} has no fixed effects (the intercept is removed and no "
                         "other term is left); keep the intercept, as in "
                         f"'{deparse(parsed.response)} ~ 1 + (1|group)'")
    if dropped:
        s_ = "" if len(dropped) == 1 else "s"
        messages.append(f"fixed-effect model matrix is rank deficient so dropping {len(dropped)} column{s_} / "
                        f"coefficient{s_} ({', '.join(dropped)})")
    terms = tuple(_random_term(ev, group, keep, sub) for ev, group in random_parts)
    _check_repeated_terms(terms)
    _check_identifiable(terms, len(y))
    K = None
    if kinship is not None:
        K, values, vectors = _check_kinship(kinship, len(y))
        _check_kinship_residual(values, vectors, X, y)
    for msg in messages:
        warnings.warn(msg, LMMWarning, stacklevel=2)
    for arr in (y, X, w, o):
        if arr is not None:
            arr.setflags(write=False)
    return Design(formula=formula, response=deparse(parsed.response), y=y, X=X, fixed_names=tuple(names),
                  terms=terms, frame=sub, messages=tuple(messages), dropped_columns=tuple(dropped),
                  n_dropped_rows=n_dropped, kinship=K, weights=w, offset=o,
                  formula_parameters=dict(ev_frame.parameters))


def _check_columns(frame: pd.DataFrame) -> None:
    names = [str(c) for c in frame.columns]
    repeated = sorted({c for c in names if names.count(c) > 1})
    if repeated:
        raise DataError(f"the data have more than one column named {', '.join(map(repr, repeated))}; give "
                        "every column its own name")


def _check_response_not_predictor(parsed) -> None:
    response = parsed.response
    if response.kind != "name":
        return
    used = set().union(*(names_in(v) for v in parsed.fixed.variables), set())
    for part in parsed.random:
        used |= names_in(part.expr)
    if response.value in used:
        raise FormulaError(f"the response {response.value!r} also appears on the right-hand side of "
                           f"{parsed.text!r}; a variable cannot predict itself: remove it from the terms")


def _random_parts(parsed, frame: pd.DataFrame) -> list[tuple[Terms, str]]:
    """Each ``(expr|group)`` as Terms and a grouping: ``a/b`` as ``b:a`` and ``a``, ``(x||g)`` as one
    uncorrelated term per column, as lme4's findbars and expandDoubleVerts do."""
    out = []
    for part in parsed.random:
        terms = expand_terms(part.expr, parsed.text)
        groups = _expand_group(deparse(part.group).replace(" ", ""), parsed.text)
        if part.correlated:
            pieces = [terms]
        else:
            pieces = ([Terms(terms.variables, (), True)] if terms.intercept else [])
            pieces += [Terms(terms.variables, (t,), False) for t in terms.terms]
        for g in groups:
            for cols in g.split(":"):
                if cols not in frame.columns:
                    raise DataError(f"unknown column {cols!r} as grouping factor in {parsed.text!r}; the data "
                                    f"has columns {', '.join(sorted(map(str, frame.columns)))}")
            out += [(t, g) for t in pieces]
    return out


def _group_missing(frame: pd.DataFrame, group: str) -> np.ndarray:
    """Rows where a grouping column is missing (column by column: no frame is built)."""
    missing = np.zeros(len(frame), dtype=bool)
    for c in group.split(":"):
        missing |= frame[c].isna().to_numpy()
    return missing


def _row_values(values, frame: pd.DataFrame, what: str) -> np.ndarray | None:
    """``weights`` or ``offset``: a column name or n numbers, as floats (NaN where missing)."""
    if values is None:
        return None
    if isinstance(values, str):
        if values not in frame.columns:
            raise DataError(f"unknown column {values!r} given as {what}; the data has columns "
                            f"{', '.join(sorted(map(str, frame.columns)))}")
        values = frame[values]
    try:
        arr = np.asarray(pd.to_numeric(pd.Series(np.asarray(values).ravel()), errors="raise"), dtype=float)
    except (TypeError, ValueError):
        raise DataError(f"the {what} must be numbers") from None
    if arr.shape != (len(frame),):
        raise DataError(f"the {what} have {arr.size} values but the data have {len(frame)} rows")
    return arr


def _missing_summary(frame: pd.DataFrame, na: np.ndarray, parsed, w, o) -> str:
    """Which variables were missing in the dropped rows, as R users read it."""
    columns = set()
    for v in parsed.fixed.variables + (parsed.response,):
        columns |= names_in(v)
    for part in parsed.random:
        columns |= names_in(part.expr) | names_in(part.group)
    counts = []
    for c in sorted(c for c in columns if c in frame.columns):
        k = int(frame[c].isna().to_numpy()[na].sum())
        if k:
            counts.append(f"{c} missing in {k}")
    for name, v in (("weights", w), ("offset", o)):
        if v is not None and np.isnan(v[na]).any():
            counts.append(f"{name} missing in {int(np.isnan(v[na]).sum())}")
    return "; ".join(counts) or "a transformation is undefined there (e.g. log of a negative number)"


def _check_kinship(kinship, n: int) -> np.ndarray:
    """K must be an n x n symmetric positive semi-definite matrix of finite numbers."""
    try:
        K = np.array(kinship, dtype=float)
    except (TypeError, ValueError):
        raise DataError("the kinship matrix must hold numbers") from None
    if K.ndim != 2 or K.shape[0] != K.shape[1]:
        raise DataError(f"the kinship matrix must be square, not of shape {K.shape}")
    if K.shape[0] != n:
        raise DataError(f"the kinship matrix is {K.shape[0]} x {K.shape[0]} but the data have {n} rows; "
                        "K needs one row and column per observation, in the data's order")
    if not np.all(np.isfinite(K)):
        raise DataError("the kinship matrix holds missing or infinite values")
    if not np.allclose(K, K.T, rtol=1e-10, atol=1e-12 * max(1.0, np.abs(K).max())):
        raise DataError("the kinship matrix is not symmetric")
    values, vectors = np.linalg.eigh(K)
    smallest, largest = values.min(), values.max()
    if smallest < -1e-8 * max(1.0, np.abs(K).max()):
        raise DataError(f"the kinship matrix is not positive semi-definite (smallest eigenvalue {smallest:.3g})")
    lo, hi = MAGNITUDE_LIMITS
    if largest <= 0:
        raise DataError("the kinship matrix is zero: sigma_s^2 K is then 0 for every sigma_s, so sigma_s cannot "
                        "be estimated; give the relationship matrix itself (1 on the diagonal for unrelated "
                        "individuals)")
    if largest < lo or largest > hi:
        raise DataError(f"the kinship matrix's largest eigenvalue is {largest:.3g}, outside [{lo:.0e}, {hi:.0e}]: "
                        "sigma_s would be estimated on a scale that double precision cannot hold; rescale K "
                        "(e.g. divide it by the mean of its diagonal)")
    K.setflags(write=False)
    return K, values, vectors


def _check_kinship_residual(values: np.ndarray, vectors: np.ndarray, X: np.ndarray, y: np.ndarray) -> None:
    """When K has rank r < n and y lies in the span of X and K's columns, the fixed effects plus the
    kinship term reproduce y exactly: as sigma -> 0 the likelihood grows without bound (-2 log L ~
    2 (n - r) log sigma), so there is no maximum to report (lme4 stops at an arbitrary tiny sigma on the
    matching (1|g) model). A full-rank K keeps a finite boundary fit at sigma -> 0 and is fitted."""
    keep = values > 1e-10 * values.max()
    if keep.all():
        return
    M = np.column_stack([X, vectors[:, keep]])
    coef, *_ = np.linalg.lstsq(M, y, rcond=None)
    spread = np.linalg.norm(y - y.mean())
    if spread > 0 and np.linalg.norm(y - M @ coef) <= 1e-9 * spread:
        raise ModelError(f"the response is reproduced exactly by the fixed effects plus the kinship term (y lies "
                         f"in the span of X and of K's columns, K of rank {int(keep.sum())} < n = {len(y)}): the residual SD sigma -> 0 and the likelihood has no maximum; "
                         "check that the response is not a sum of the predictors and K's effects")


def _used_columns(parsed: ParsedFormula, columns: set[str]) -> set[str]:
    text = " ".join([parsed.response, parsed.fixed] + [f"{e} {g}" for e, g in parsed.random])
    return {name for name in re.findall(r"[A-Za-z_.][\w.]*", text) if name in columns}


def _random_term(ev: Evaluated, group: str, keep: np.ndarray, frame: pd.DataFrame) -> RandomTerm:
    """One random term: its model matrix Z (R's coding and names) and the grouping's level codes."""
    Z, names = model_matrix(take_rows(ev, keep))
    label = " + ".join(ev.terms.labels) or "1"
    expr = label if ev.terms.intercept or not ev.terms.terms else f"0 + {label}"
    if Z.shape[1] == 0:
        raise FormulaError(f"random-effect term ({expr}|{group}) has no columns")
    if not np.all(np.isfinite(Z)):
        raise DataError(f"the random-effect term ({expr}|{group}) gives infinite values")
    codes, levels = _grouping(frame, group)
    Z = np.asfortranarray(Z)
    for arr in (Z, codes):
        arr.setflags(write=False)
    return RandomTerm(expr=expr, group=group, names=tuple(names), Z=Z, codes=codes, levels=levels)


#: the most random-effect terms in one formula (after a/b and || are expanded)
MAX_RANDOM_TERMS = 50


def _check_repeated_terms(terms: tuple[RandomTerm, ...]) -> None:
    """The same random term twice, ``(1|g) + (1|g)``, only splits one variance between two copies in any
    proportion (lme4 fits it, unidentified): refused, naming the term."""
    seen: dict[tuple, int] = {}
    for t in terms:
        key = (t.group, t.names)
        seen[key] = seen.get(key, 0) + 1
    for t in terms:
        k = seen[(t.group, t.names)]
        if k > 1:
            raise FormulaError(f"the random-effect term ({t.expr}|{t.group}) appears {k} times; copies of a term "
                               "split one variance between them in any proportion (it is not identifiable): "
                               "write it once")


def _check_identifiable(terms: tuple[RandomTerm, ...], n: int) -> None:
    """lme4's checks: every grouping factor has 2 to n-1 levels, random effects fewer than observations."""
    for t in terms:
        if t.n_levels < 2:
            raise ModelError(f"grouping factor {t.group!r} has a single level: a random effect needs at "
                             "least two groups; drop the term or use a fixed effect")
        if t.n_levels >= n:
            raise ModelError(f"number of levels of grouping factor {t.group!r} ({t.n_levels}) must be less "
                             f"than the number of observations ({n}): each group needs replicates")
        if t.n_levels * t.q >= n:
            raise ModelError(f"number of observations ({n}) <= number of random effects "
                             f"({t.n_levels * t.q}) for term ({t.expr}|{t.group}); the random-effects "
                             "parameters and the residual variance are probably unidentifiable")
