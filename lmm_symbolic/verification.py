r"""Verification: is a hand-derived expression the package's derived quantity, and if not, where is it wrong?

``verify(model, quantity, expression)`` reads the expression with the whitelist parser of
:mod:`lmm_symbolic.expression` (never ``eval``/``sympify``), then decides:

* **equal** only with an exact proof: the difference (user - derived), with logarithms of products split
  into sums (``expand_log`` under the symbols' positivity assumptions, no ``force``), is brought over a
  common denominator and cancelled to 0 -- a decision procedure for rational functions, the logs, ``pi``
  and roots acting as independent indeterminates -- or ``sympy.simplify`` returns 0. For ``inverse``
  the proof may also be :math:`\Sigma M - I = 0`.
* **not equal** with a counterexample: the two sides are first evaluated at a few random points (exact
  rationals; :math:`\sigma` and :math:`\sigma_s` positive, the other symbols any sign). For rational quantities the values
  are exact rationals and differ exactly; with logarithms they are compared at 50 significant digits and
  must differ by more than :math:`10^{-25}` relative. The counterexample reports the symbols' values and both sides.
* **not proven** (``equal=False``, ``counterexample=None``, hint "could not prove equality ..."): the two
  agree at every random point tried but sympy could not simplify the difference to 0 (or the expression is
  too large to try). The package never says "equal" on numerical evidence alone, and never says "wrong"
  without a point where the two differ; this third answer is what is left, and the hint says so.

Hints are given where they are cheap: a constant difference (e.g. a wrong ``log(2*pi)`` term), a sign, a
constant factor, a missing, doubled or sign-flipped term, a term that should be another one, and for
matrices the number of wrong entries (or :math:`\Sigma` given for its inverse).
"""
from __future__ import annotations

import math
import random
import textwrap
import weakref
from dataclasses import dataclass, field
from math import comb

import numpy as np
import sympy as sp
from sympy.matrices import MatrixBase

from .derivation import INVERSE_N, Derivation, derive
from .errors import ExpressionError, ModelError
from .expression import degree_bound, parse_expression
from .specification import Design

#: quantity name -> Derivation attribute
QUANTITIES = {
    "det": "det",
    "logdet": "logdet",
    "inverse": "inverse",
    "quadratic_form": "quadratic_form",
    "loglik": "loglik",
    "reml_loglik": "reml_loglik",
    "sigma": "sigma_matrix",
    "kinship": "kinship",
    "gls_information": "gls_information",
    "gls_estimator": "gls_estimator",
    "beta_covariance": "beta_covariance",
    "profiled_loglik": "profiled_loglik",
    "deviance": "deviance",
    "reml_criterion": "reml_criterion",
    "likelihood": "likelihood",
    "ml_sigma2": "ml_sigma2",
    "ml_sigma_s2": "ml_sigma_s2",
    "reml_sigma2": "reml_sigma2",
    "reml_sigma_s2": "reml_sigma_s2",
    "conditional_modes": "conditional_modes",
}
TITLES = {
    "det": "|Sigma| (Eq. 11)",
    "logdet": "log|Sigma|",
    "inverse": "Sigma^-1",
    "quadratic_form": "the quadratic form (Y - X beta)^T Sigma^-1 (Y - X beta) (Eq. 12)",
    "loglik": "the log-likelihood (Eq. 10)",
    "reml_loglik": "the restricted (REML) log-likelihood",
    "sigma": "Sigma (Eq. 8)",
    "kinship": "K K^T (Eq. 7)",
    "gls_information": "X^T Sigma^-1 X",
    "gls_estimator": "the GLS estimator beta_hat(sigma, sigma_s) (a column)",
    "beta_covariance": "var(beta_hat) = (X^T Sigma^-1 X)^-1",
    "profiled_loglik": "the profiled log-likelihood (beta = beta_hat)",
    "deviance": "the deviance -2 log L",
    "reml_criterion": "the REML criterion -2 log L_R",
    "likelihood": "the likelihood L (Eq. 9)",
    "ml_sigma2": "the ML estimate of sigma^2 in closed form (balanced design, interior root)",
    "ml_sigma_s2": "the ML estimate of sigma_s^2 in closed form (balanced design, interior root)",
    "reml_sigma2": "the REML estimate of sigma^2 in closed form (balanced design)",
    "reml_sigma_s2": "the REML estimate of sigma_s^2 in closed form (balanced design, interior root)",
    "conditional_modes": "the conditional modes u_hat = D Z^T Sigma^-1 (y - X beta) (a column, one per group)",
}
_ALIASES = {"beta_hat": "gls_estimator", "xtsx": "gls_information", "var_beta_hat": "beta_covariance",
            "L": "likelihood", "remlcrit": "reml_criterion", "sigma_matrix": "sigma", "determinant": "det", "quadratic": "quadratic_form", "kk^t": "kinship",
            "u_hat": "conditional_modes", "blup": "conditional_modes", "ranef": "conditional_modes",
            "sigma2_ml": "ml_sigma2", "sigma_s2_ml": "ml_sigma_s2", "sigma2_reml": "reml_sigma2",
            "sigma_s2_reml": "reml_sigma_s2"}

#: random points tried before the exact proof
TRIES = 6
#: numbers compared at this many significant digits when they are not exact rationals
DIGITS = 50
RELATIVE_TOLERANCE = sp.Float("1e-25", DIGITS)
#: the symbolic proof is not tried when the expanded difference would have more terms than this
MAX_TERMS = 20_000
#: the difference is shown cancelled, and the hints are looked for, only below this many estimated terms
HINT_TERMS = 1000
#: sympy.simplify and factor (slow) are tried only below this many estimated terms and this degree
SIMPLIFY_TERMS = 400
SIMPLIFY_DEGREE = 30
#: exponentials whose arguments' coefficients would make sympy's polynomials this large are masked
MAX_EXP_DEGREE = 50
_SEED = 20240517
_POSITIVE = [sp.Rational(k, 4) for k in range(1, 41)]                      # 1/4 .. 10
_REAL = [sp.Rational(k, 4) for k in range(-40, 41) if k != 0]             # -10 .. 10 without 0


@dataclass(frozen=True)
class Verdict:
    """The answer of :func:`verify`.

    ``equal`` is True only with an exact proof. ``difference`` is the simplified user - derived ("0" when
    equal; a Matrix of entry-wise differences for matrices). ``counterexample`` maps symbol names to the
    values where the two differ, plus ``expected`` (derived) and ``given`` (user) -- and ``entry``
    [row, column] (1-based) for matrices; None when equal or not proven. ``hint`` says what may be wrong.
    ``status`` is "equal", "different" or "unproven" (not part of ``to_dict``).
    """

    equal: bool
    difference: str
    counterexample: dict | None
    hint: str | None
    quantity: str = field(default="", compare=False)
    status: str = field(default="", compare=False)

    def to_dict(self) -> dict:
        return {"equal": self.equal, "difference": self.difference, "counterexample": self.counterexample,
                "hint": self.hint}

    def __str__(self) -> str:
        """The verdict for a reader: lines of at most ``WIDTH`` characters, a long difference shortened
        (its first terms, or a matrix's differing entries; ``difference`` holds all of it)."""
        what = TITLES.get(self.quantity, self.quantity or "the derived quantity")
        if self.equal:
            return _wrap(f"equal: the expression is {what} (proved symbolically)")
        if self.status == "unproven":
            lines = [f"not proven: the expression may be {what}, but equality could not be proved"]
        else:
            lines = [f"not equal: the expression is not {what}"]
        lines.append(f"  given - derived {_readable_difference(self.difference)}")
        ce = self.counterexample
        if ce:
            values = ", ".join(f"{k} = {v}" for k, v in ce.items() if k not in ("expected", "given", "entry"))
            where = f" (row {ce['entry'][0]}, column {ce['entry'][1]})" if "entry" in ce else ""
            lines.append(f"  counterexample: {values or 'any values'}{where}: derived {_g(ce['expected'])}, "
                         f"given {_g(ce['given'])}")
        if self.hint:
            lines.append(f"  hint: {self.hint}")
        return "\n".join(_wrap(line) for line in lines)


def _g(value) -> str:
    """A value of the counterexample to 10 significant digits (enough to see the two differ)."""
    return f"{value:.10g}" if isinstance(value, float) else str(value)


#: the printed verdict's lines are wrapped at this many characters (a notebook's output box)
WIDTH = 74
#: a difference longer than this is shown by its first terms
SHOWN_CHARS = 60


def _wrap(line: str) -> str:
    return textwrap.fill(line, WIDTH, subsequent_indent="    ", break_on_hyphens=False, break_long_words=False)


def _top_level(text: str, seps: tuple[str, ...]) -> list[str]:
    """``text`` split at the separators that are outside brackets (display only, nothing evaluated)."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(text):
        ch = text[i]
        depth += ch in "([{"
        depth -= ch in ")]}"
        sep = next((s for s in seps if depth == 0 and text.startswith(s, i)), None)
        if sep is not None and i > start:
            parts.append(text[start:i])
            start = i + (len(sep) if sep == ", " else 0)
            i += len(sep)
            continue
        i += 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _readable_difference(text: str) -> str:
    """``= d`` for a short difference; its first terms and their count for a long one; for a matrix the
    entries that are not 0, by row and column."""
    if text.startswith("Matrix([") and text.endswith("])"):
        rows = _top_level(text[len("Matrix(["):-2], (", ",))
        entries = [(i + 1, j + 1, v) for i, row in enumerate(rows)
                   for j, v in enumerate(_top_level(row.strip()[1:-1], (", ",))) if v != "0"]
        if not entries:
            return f"= {text}"
        shown = "; ".join(f"row {i}, column {j}: {_readable_difference(v).removeprefix('= ')}"
                          for i, j, v in entries[:2])
        more = f"; and {len(entries) - 2} more entries" if len(entries) > 2 else ""
        return f"is 0 except at {shown}{more}"
    if len(text) <= SHOWN_CHARS:
        return f"= {text}"
    terms = _top_level(text, (" + ", " - "))
    head = ""
    for k, term in enumerate(terms):
        piece = term if k == 0 else (" - " if term.startswith("- ") else " + ") + term.lstrip("+- ")
        if k and len(head) + len(piece) > SHOWN_CHARS:
            return f"= {head} ... ({len(terms)} terms)"
        head += piece
    return f"= {head}"


def _short(text: str, limit: int = 2000) -> str:
    return text if len(text) <= limit else text[:limit] + " ..."


# ------------------------------------------------------------------------------------- entry point
def verify(model, quantity: str, expression: str, syntax: str | None = None) -> Verdict:
    r"""Whether ``expression`` equals the derived ``quantity`` of ``model`` (a Derivation or a Design).

    ``quantity``: ``det``, ``logdet``, ``inverse``, ``quadratic_form``, ``loglik``, ``reml_loglik``,
    ``sigma`` (:math:`\Sigma`), ``kinship`` (:math:`K K^\top`), ``gls_information``, ``gls_estimator``,
    ``beta_covariance``, ``profiled_loglik``, ``deviance``, ``reml_criterion``, ``likelihood``,
    ``ml_sigma2``, ``ml_sigma_s2``, ``reml_sigma2``, ``reml_sigma_s2`` (closed forms of a balanced design),
    ``conditional_modes`` (:math:`\hat u`), ``score_<symbol>``. An expression without :math:`\beta` is
    compared with :math:`\beta = \hat\beta` substituted, one without :math:`y`'s with the data's :math:`y`
    values, and the hint says so.
    ``syntax``: "plain", "latex" or None (LaTeX when the text has a backslash or a brace).
    Raises ExpressionError when the expression cannot be read (or is a scalar where a matrix is due, or
    the other way round) and ModelError when the quantity is not written out for this design.
    """
    if isinstance(model, Derivation):
        der = model
    elif isinstance(model, Design):
        der = derive(model)
    else:
        raise TypeError(f"model must be a Derivation or a Design, not {type(model).__name__}")
    key = str(quantity).strip()
    key = _ALIASES.get(key.lower(), key if key in QUANTITIES else key.lower())
    if key not in QUANTITIES and not key.startswith("score_"):
        raise ExpressionError(f"unknown quantity {quantity!r}; choose one of {', '.join(QUANTITIES)}")
    expected = derived_quantity(der, key)
    if expected is None:
        raise ModelError(f"{key} is written out only for designs of at most {INVERSE_N} observations "
                         f"(this one has {der.design.n})")
    names = symbol_table(der)
    given = parse_expression(expression, names, syntax, design_sizes(der))
    order = _symbol_order(names)
    expected, note = _plugged_in(der, key, expected, given)
    verdict = _compare(given, expected, key, der, order)
    if note is None:
        return verdict
    hint = f"equal {note}" if verdict.equal else "; ".join(h for h in (f"compared {note}", verdict.hint) if h)
    return Verdict(verdict.equal, verdict.difference, verdict.counterexample, hint, quantity=verdict.quantity,
                   status=verdict.status)


def _plugged_in(der: Derivation, key: str, expected, given) -> tuple:
    """The quantity with beta = beta_hat (the GLS estimator) substituted when the quantity holds beta and the
    expression does not, and with the data's y values when the expression holds no y: the answers people
    write after plugging in. Returns (quantity, a note saying what was substituted, or None)."""
    free = lambda v: v.free_symbols if hasattr(v, "free_symbols") else set()  # noqa: E731
    have, want = free(given), free(expected)
    notes = []
    beta = [b for b in der.symbols.beta]
    if set(beta) & want and not set(beta) & have and key not in ("gls_estimator", "gls_information",
                                                                   "beta_covariance") and der.symbolic_y:
        try:
            beta_hat = derived_quantity(der, "gls_estimator")
        except (ModelError, ExpressionError):
            beta_hat = None
        if beta_hat is not None:
            at = dict(zip(beta, list(beta_hat)))
            expected = expected.xreplace(at) if not isinstance(expected, MatrixBase) else expected.applyfunc(
                lambda e: e.xreplace(at))
            notes.append("with beta = beta_hat(sigma, sigma_s), the GLS estimator, substituted")
            want = free(expected)
    ys = list(der.symbols.y)
    if ys and set(ys) & want and not set(ys) & have:
        at = {y: sp.Rational(repr(float(v))) for y, v in zip(ys, der.design.y)}
        expected = expected.xreplace(at) if not isinstance(expected, MatrixBase) else expected.applyfunc(
            lambda e: e.xreplace(at))
        notes.append("with the data's y values substituted")
    return expected, (" and ".join(notes) or None)


def _compare(given, expected, key, der, order) -> Verdict:
    if isinstance(expected, MatrixBase):
        if not isinstance(given, MatrixBase):
            r, c = expected.shape
            raise ExpressionError(f"{key} is a {r}x{c} matrix: give a matrix, e.g. [[a, b], [c, d]] or "
                                  r"\begin{pmatrix} a & b \\ c & d \end{pmatrix}")
        return _compare_matrix(given, expected, key, der, order)
    if isinstance(given, MatrixBase):
        raise ExpressionError(f"{key} is a scalar, but the expression is a matrix")
    return _compare_scalar(given, expected, key, order)


def symbol_table(der: Derivation) -> dict[str, sp.Symbol]:
    """Every name the derivation shows, by its plain name: ``der.symbols.by_name()``, the variance
    parameters (``sigma_g_Intercept``, ``rho_...``, and any short aliases the derivation registers) and every
    symbol its quantities hold -- taken from the derivation, never from a list kept here."""
    names = dict(der.symbols.by_name())
    for s in getattr(der, "variance_symbols", ()):
        names.setdefault(s.name, s)
    for attr in ("symbol_aliases", "aliases"):
        extra = getattr(der, attr, None) or getattr(der.symbols, attr, None)
        if isinstance(extra, dict):
            for k, v in extra.items():
                names.setdefault(str(k), v)
    for attr in ("det", "quadratic_form"):
        if attr == "quadratic_form" and attr not in vars(der):
            continue     # not derived yet (25 s for crossed terms): its names are the y's, beta's and variances
        try:
            value = getattr(der, attr)
        except Exception:  # noqa: BLE001 - a quantity that is not written out holds no names
            continue
        for s in getattr(value, "free_symbols", ()):
            if isinstance(s, sp.Symbol) and not isinstance(s, sp.Dummy):
                names.setdefault(s.name, s)
    return names


def design_sizes(der: Derivation) -> dict:
    r"""The sizes the limits of a sum may name: :math:`G` groups (of the first random term), :math:`n`
    observations, and :math:`m` = the groups' sizes in the order of :math:`y_{ij}`'s second index."""
    design = der.design
    out = {"n": int(design.n)}
    if design.terms:
        t = design.terms[0]
        out["G"] = int(t.n_levels)
        out["m"] = [int(k) for k in np.bincount(np.asarray(t.codes), minlength=t.n_levels)]
    return out


def _symbol_order(names: dict) -> dict:
    keys = [n for n in ("sigma", "sigma_s") if n in names] + [n for n in names if n not in ("sigma", "sigma_s")]
    return {names[k]: i for i, k in enumerate(keys)}


# ------------------------------------------------------------------------------- exact reasoning
def _normal(e: sp.Expr) -> sp.Expr:
    """Logs of products and powers split into sums of logs (their arguments factored first).

    ``expand_log`` runs without ``force``: a log is split only where sympy can tell the factors are
    positive, so no identity that fails for some values is used.
    """
    if e.has(sp.exp):
        e = e.replace(lambda x: isinstance(x, sp.exp), lambda x: sp.exp(_canonical(x.args[0])))
    if not e.has(sp.log):
        return e
    e = e.replace(lambda x: isinstance(x, sp.log), lambda x: sp.log(_factored(x.args[0])))
    e = sp.expand_log(e, force=False)
    if e.has(sp.exp):   # log(a exp(x)) = log(a) + x for x real (a rational function of real symbols)
        e = e.replace(lambda x: isinstance(x, sp.log) and x.args[0].has(sp.exp), _log_of_exp)
    return e


def _log_of_exp(x: sp.log) -> sp.Expr:
    """log(a exp(x1) exp(x2) ...) = log(a) + x1 + x2 + ... for real x_k: exp of a real number is a positive
    real, and a positive factor does not change the principal log's argument."""
    factors = sp.Mul.make_args(x.args[0])
    real = [f for f in factors if isinstance(f, sp.exp) and _real_rational(f.args[0])]
    if not real:
        return x
    rest = sp.Mul(*[f for f in factors if f not in real])
    return (0 if rest == 1 else sp.log(rest)) + sp.Add(*[f.args[0] for f in real])


def _real_rational(x: sp.Expr) -> bool:
    """True when x is a rational function (rational coefficients, pi allowed) of real symbols, so real
    wherever it is defined."""
    free = x.free_symbols
    return all(s.is_real for s in free) and x.is_rational_function(*free) and not x.has(sp.I)


def _canonical(arg: sp.Expr) -> sp.Expr:
    """An exponent in one form (its logs split, over a common denominator, cancelled), so that
    exp(-Q/2) written two ways is the same atom to cancel: the likelihood L = exp(log L) (Eq. 9)."""
    arg = _normal(arg)
    m, back = _masked(arg)
    if _terms_estimate(m) > HINT_TERMS:
        return arg
    return sp.cancel(sp.together(m)).xreplace(back)


def _factored(arg: sp.Expr) -> sp.Expr:
    """A log's argument factored, when that is cheap (small, low degree, no large exponentials)."""
    if _small(arg) and _exp_degree(_exponentials(arg)) <= MAX_EXP_DEGREE:
        return sp.factor(sp.together(arg))
    return arg


def _terms_estimate(e: sp.Basic, memo: dict | None = None, cap: int = 10**9) -> int:
    """An upper estimate of the number of terms of e fully expanded (capped), to skip hopeless proofs."""
    memo = {} if memo is None else memo
    if e in memo:
        return memo[e]
    if not e.args:
        t = 1
    elif e.is_Add:
        t = sum(_terms_estimate(a, memo, cap) for a in e.args)
    elif e.is_Mul:
        t = 1
        for a in e.args:
            t = min(cap, t * _terms_estimate(a, memo, cap))
    elif e.is_Pow and e.exp.is_Integer:
        b, n = _terms_estimate(e.base, memo, cap), abs(int(e.exp))
        t = 1 if b == 1 else (cap if n > 10_000 else min(cap, comb(b + n - 1, n)))
    else:
        t = max(_terms_estimate(a, memo, cap) for a in e.args)
    t = min(t, cap)
    memo[e] = t
    return t


def _exponentials(e: sp.Expr) -> list[sp.Expr]:
    """The outermost exp(...), powers with a symbolic exponent and roots (x**(p/q)) in e."""
    out = []
    stack = [e]
    while stack:
        x = stack.pop()
        if isinstance(x, sp.exp) or (x.is_Pow and (x.exp.free_symbols or (x.exp.is_Rational and x.exp.q > 1))):
            out.append(x)
        else:
            stack.extend(x.args)
    return out


def _exp_degree(nodes: list[sp.Expr]) -> int:
    """How large a power of one generator sympy's polynomials may make of these nodes: exp(1000 x) is
    exp(x)**1000 to them, and x**(999/1000) is (x**(1/1000))**999. The product of the largest numerator
    and the largest denominator in their exponents."""
    num = den = 1
    for x in nodes:
        arg = x.args[0] if isinstance(x, sp.exp) else x.exp
        for r in ([arg] if arg.is_Rational else arg.atoms(sp.Rational)):
            num, den = max(num, abs(int(r.p))), max(den, int(r.q))
    return num * den


def _masked(e: sp.Expr, every: bool = False) -> tuple[sp.Expr, dict]:
    """e with its exponentials replaced by fresh symbols when their exponents are large (see _exp_degree),
    or (``every``, for the cheap hints and the shown difference) every exp of a non-constant argument:
    sympy splits exp(a + b + ...) into one generator per term, which makes cancel slow for exp(-Q/2).

    Sound for proving zero: an identity in independent indeterminates holds for any values of them, so
    masking can only fail to prove an equality, never prove a false one.
    """
    nodes = _exponentials(e)
    if every and any(isinstance(x, sp.exp) and x.args[0].free_symbols for x in nodes):
        nodes = [x for x in nodes if isinstance(x, sp.exp) and x.args[0].free_symbols] + \
            ([x for x in nodes if not isinstance(x, sp.exp)] if _exp_degree(nodes) > MAX_EXP_DEGREE else [])
    elif not nodes or _exp_degree(nodes) <= MAX_EXP_DEGREE:
        return e, {}
    mapping = {x: sp.Dummy(f"E{k}") for k, x in enumerate(dict.fromkeys(nodes))}
    return e.xreplace(mapping), {v: k for k, v in mapping.items()}


def _small(e: sp.Expr, terms: int = SIMPLIFY_TERMS) -> bool:
    """True when e is small enough for simplify and factor."""
    return _terms_estimate(e) <= terms and degree_bound(e) <= SIMPLIFY_DEGREE


def _is_zero(d: sp.Expr) -> bool | None:
    """True when d is proved to be 0; False when not proved; None when d is too large to try."""
    d = _normal(d)
    if d == 0:
        return True
    d, _ = _masked(d)
    if _terms_estimate(d) > MAX_TERMS and not _few_generators(d):
        return None
    if sp.cancel(sp.together(d)) == 0:
        return True
    return bool(_small(d) and sp.simplify(d) == 0)


#: a difference in at most this many generators (symbols, logs, exps, roots) is cancelled whatever its
#: estimated size: the estimate counts products of sums, but few variables allow few monomials (an answer
#: with the data's y values and beta_hat plugged in is a rational function of sigma and sigma_s alone)
FEW_GENERATORS = 4


def _few_generators(d: sp.Expr) -> bool:
    """At most FEW_GENERATORS symbols, logs and exps of non-constants and roots, and few monomials of
    their degree: comb(k + D, k) <= 5 MAX_TERMS for k generators and degree bound D."""
    roots = {p.base for p in d.atoms(sp.Pow) if not p.exp.is_Integer and p.free_symbols}
    k = len(d.free_symbols) + len([a for a in d.atoms(sp.log, sp.exp) if a.free_symbols]) + len(roots)
    return k <= FEW_GENERATORS and comb(k + degree_bound(d), k) <= 5 * MAX_TERMS


def _quick_zero(d: sp.Expr) -> bool:
    """A cheap exact zero test for the hints (no simplify)."""
    d = _normal(d)
    if d == 0:
        return True
    d, _ = _masked(d, every=True)
    if _terms_estimate(d) > HINT_TERMS:
        return False
    return sp.cancel(sp.together(d)) == 0


def _simplified(d: sp.Expr) -> sp.Expr:
    """The difference in its shortest readable form: cancelled over a common denominator, or factored."""
    d = _normal(d)
    m, back = _masked(d, every=True)
    if _terms_estimate(m) > HINT_TERMS:
        return d
    c = sp.cancel(sp.together(m))
    candidates = [c]
    if _small(c):
        candidates.append(sp.factor(c))
    return min(candidates, key=lambda x: len(sp.sstr(x))).xreplace(back)


# -------------------------------------------------------------------------------- numeric search
def _points(symbols: list[sp.Symbol], count: int):
    """Random exact points: distinct values for the symbols, positive ones positive."""
    rng = random.Random(_SEED)
    for _ in range(count):
        pos = [s for s in symbols if s.is_positive]
        real = [s for s in symbols if not s.is_positive]
        point = {}
        for group, pool in ((pos, _POSITIVE), (real, _REAL)):
            if len(group) <= len(pool):
                values = rng.sample(pool, len(group))
            else:
                values = [rng.choice(pool) for _ in group]
            point.update(zip(group, values))
        yield point


def _at(e: sp.Expr, point: dict) -> sp.Expr | None:
    v = e.xreplace(point)
    if v.free_symbols or v.has(sp.zoo, sp.nan, sp.oo, -sp.oo):
        return None
    return v


def _differ(g: sp.Expr, e: sp.Expr) -> bool | None:
    """True when two numbers differ (exactly, or beyond 1e-25 relative at 50 digits); None if unknown."""
    if g.is_Rational and e.is_Rational:
        return g != e
    try:
        diff = abs((g - e).evalf(DIGITS))
        scale = max(sp.Float(1), abs(g.evalf(30)), abs(e.evalf(30)))
        if not (diff.is_Number and scale.is_Number):
            return None
        return bool(diff > RELATIVE_TOLERANCE * scale)
    except (TypeError, ValueError, ArithmeticError):  # pragma: no cover - defensive
        return None


def _differ_exactly(g: sp.Expr, e: sp.Expr) -> bool:
    """True when two numbers at an exact rational point provably differ: the difference evaluated by
    sympy's adaptive-precision evalf (working precision raised up to 5000 digits against cancellation)
    has significant digits and is not 0."""
    d = g - e
    if d.is_Rational:
        return d != 0
    try:
        v = d.evalf(30, maxn=5000)
    except (TypeError, ValueError, ArithmeticError):  # pragma: no cover - defensive
        return False
    return bool(v.is_Number and v != 0 and getattr(v, "_prec", 0) > 10 and abs(v) > sp.Float("1e-4000"))


def _value(v: sp.Expr):
    """A number for the JSON: a float when it is a finite real, else its decimal text."""
    try:
        if v.is_real:
            f = float(v.evalf(20))
            if math.isfinite(f):
                return f
    except (TypeError, ValueError, OverflowError):
        pass
    return sp.sstr(v.evalf(15))


def _counterexample(point: dict, e: sp.Expr, g: sp.Expr, order: dict, entry=None) -> dict:
    out = {s.name: _value(v) for s, v in sorted(point.items(), key=lambda kv: order.get(kv[0], 10**6))}
    exp_v, giv_v = _value(e), _value(g)
    if exp_v == giv_v:  # the difference is below float resolution: show the numbers to the digits that differ
        digits = _digits_apart(g, e)
        exp_v = sp.sstr(e if e.is_Rational else e.evalf(digits))
        giv_v = sp.sstr(g if g.is_Rational else g.evalf(digits))
    out["expected"] = exp_v
    out["given"] = giv_v
    if entry is not None:
        out["entry"] = [entry[0] + 1, entry[1] + 1]
    return out


def _digits_apart(g: sp.Expr, e: sp.Expr) -> int:
    """Significant digits that show two close numbers apart: 20 more than log10(|e| / |g - e|), at most
    5000 (the precision _differ_exactly works to)."""
    try:
        d = abs((g - e).evalf(20, maxn=5000))
        scale = max(abs(e.evalf(20)), sp.Float(1))
        if d.is_Number and d != 0:
            return int(min(5000, 20 + max(0, math.ceil(math.log10(float(scale)) - float(sp.log(d, 10).evalf(20))))))
    except (TypeError, ValueError, ArithmeticError, OverflowError):  # pragma: no cover - defensive
        pass
    return 30


def _free(*exprs) -> list[sp.Symbol]:
    syms = set()
    for x in exprs:
        syms |= x.free_symbols
    return sorted(syms, key=lambda s: s.name)


# ------------------------------------------------------------------------------------ comparisons
def _unproven(difference: str, agree: int, too_large: bool, quantity: str) -> Verdict:
    why = "the expression is too large to simplify" if too_large else \
        "sympy could not simplify the difference to 0"
    hint = (f"could not prove equality: the two agree at {agree} random point{'s' if agree != 1 else ''}, "
            f"but {why}; try writing the expression in another form") if agree else \
        f"could not prove equality: {why}, and the expression could not be evaluated at random points"
    return Verdict(False, difference, None, hint, quantity=quantity, status="unproven")


def _compare_scalar(given: sp.Expr, expected: sp.Expr, quantity: str, order: dict) -> Verdict:
    symbols = _free(given, expected)
    agree = 0
    for point in _points(symbols, TRIES):
        g, e = _at(given, point), _at(expected, point)
        if g is None or e is None:
            continue
        differs = _differ(g, e)
        if differs is None:
            continue
        if differs:
            diff = _simplified(given - expected)
            return Verdict(False, sp.sstr(diff), _counterexample(point, e, g, order),
                           _scalar_hint(given, expected, diff), quantity=quantity, status="different")
        agree += 1
    proof = _is_zero(given - expected)
    if not proof and given.has(sp.exp) and expected.has(sp.exp) and not given.is_Add and not expected.is_Add:
        # a product with exp(...), as the likelihood L: the principal log is one-to-one, so
        # log(given) = log(expected) identically proves given = expected
        proof = _is_zero(_normal(sp.log(given)) - _normal(sp.log(expected))) or proof
    if proof:
        return Verdict(True, "0", None, None, quantity=quantity, status="equal")
    for point in _points(symbols, TRIES):   # a near miss (off by 1e-30): exact points, adaptive precision
        g, e = _at(given, point), _at(expected, point)
        if g is not None and e is not None and _differ_exactly(g, e):
            diff = _simplified(given - expected)
            return Verdict(False, sp.sstr(diff), _counterexample(point, e, g, order),
                           _scalar_hint(given, expected, diff), quantity=quantity, status="different")
    return _unproven(sp.sstr(_normal(given - expected)), agree, proof is None, quantity)


def _term_list(e: sp.Expr) -> list[sp.Expr]:
    return list(sp.Add.make_args(e))


def _scalar_hint(given: sp.Expr, expected: sp.Expr, diff: sp.Expr) -> str | None:
    if given == 0:
        return "the expression is 0"
    if not diff.free_symbols:
        extra = " (check the constant term, e.g. -n/2 log(2*pi))" if diff.has(sp.pi) or diff.has(sp.log) else ""
        return f"the two differ by the constant {sp.sstr(diff)} (given - derived): a missing or wrong " \
               f"additive constant{extra}"
    if _quick_zero(given + expected):
        return "wrong sign: the expression is minus the derived one"
    G, E = _normal(given), _normal(expected)
    if E != 0 and _terms_estimate(G) + _terms_estimate(E) <= HINT_TERMS:
        ratio, _ = _masked(G / E, every=True)
        ratio = sp.cancel(sp.together(ratio))
        if not ratio.free_symbols and ratio != 1:
            return f"off by a constant factor: the expression is {sp.sstr(ratio)} times the derived one"
    if _terms_estimate(G) + _terms_estimate(E) <= 200 and G.is_polynomial() and E.is_polynomial():
        hint = _term_hint(sp.expand(G), sp.expand(E), diff)
        if hint is not None:
            return hint
    return _term_hint(G, E, diff)


def _term_hint(G: sp.Expr, E: sp.Expr, diff: sp.Expr) -> str | None:
    """Missing, doubled, sign-flipped or replaced terms, from the terms of the two sums."""
    te, tg = _term_list(E), _term_list(G)
    if len(te) > 1 and len(te) <= 30:
        for t in te:
            if _quick_zero(diff + t):
                return f"a term of the derived expression is missing: {sp.sstr(t)}"
            if _quick_zero(diff - t):
                return f"a term is counted twice: {sp.sstr(t)}"
            if _quick_zero(diff + 2 * t):
                return f"a term has the wrong sign: {sp.sstr(t)}"
    missing = [t for t in te if t not in tg]
    extra = [t for t in tg if t not in te]
    if not missing and not extra or len(missing) > 6 or len(extra) > 6 or len(missing) == len(te):
        return None
    for m in list(missing):  # the same term written differently is not a difference
        for x in extra:
            if _quick_zero(m - x):
                missing.remove(m)
                extra.remove(x)
                break
    if len(missing) > 3 or len(extra) > 3 or not (missing or extra) or len(missing) == len(te):
        return None
    def show(ts):
        return ", ".join(sp.sstr(t) for t in ts)

    if len(missing) == 1 and len(extra) == 1:
        return f"the term {show(extra)} should be {show(missing)}"
    parts = []
    if extra:
        parts.append(f"not in the derived expression: {show(extra)}")
    if missing:
        parts.append(f"missing: {show(missing)}")
    return "terms " + "; ".join(parts)


def _compare_matrix(given: MatrixBase, expected: MatrixBase, quantity: str, der: Derivation,
                    order: dict) -> Verdict:
    if given.shape != expected.shape:
        (r, c), (R, C) = given.shape, expected.shape
        return Verdict(False, f"shape {r}x{c}; the derived matrix is {R}x{C}", None,
                       f"{quantity} is {R}x{C}: one row and one column per observation",
                       quantity=quantity, status="different")
    symbols = _free(*given, *expected)
    rows, cols = expected.shape
    agree = 0
    for point in _points(symbols, TRIES):
        usable = True
        for i in range(rows):
            for j in range(cols):
                g, e = _at(given[i, j], point), _at(expected[i, j], point)
                differs = None if g is None or e is None else _differ(g, e)
                if differs is None:
                    usable = False
                    continue
                if differs:
                    D = (given - expected).applyfunc(_simplified)
                    return Verdict(False, _matrix_str(D), _counterexample(point, e, g, order, (i, j)),
                                   _matrix_hint(given, expected, D, quantity, der), quantity=quantity,
                                   status="different")
        agree += usable
    proofs = [_is_zero(g - e) for g, e in zip(given, expected)]
    if all(proofs):
        return Verdict(True, "0", None, None, quantity=quantity, status="equal")
    if quantity == "inverse":
        product = der.sigma_matrix * given - sp.eye(rows)
        if all(_is_zero(x) for x in product):
            return Verdict(True, "0", None, None, quantity=quantity, status="equal")
    D = (given - expected).applyfunc(_normal)
    return _unproven(_matrix_str(D), agree, any(p is None for p in proofs), quantity)


def _matrix_str(M: MatrixBase) -> str:
    """One line that the plain syntax reads back: Matrix([[a, b], [c, d]])."""
    return f"Matrix({sp.sstr(M.tolist())})"


def _matrix_hint(given, expected, D, quantity: str, der: Derivation) -> str | None:
    if quantity == "inverse" and der.sigma_matrix is not None and \
            all(_quick_zero(g - s) for g, s in zip(given, der.sigma_matrix)):
        return "this is Sigma itself, not its inverse"
    if quantity == "sigma" and der.inverse is not None and \
            all(_quick_zero(g - s) for g, s in zip(given, der.inverse)):
        return "this is Sigma^-1, not Sigma"
    wrong = [(k // D.shape[1], k % D.shape[1]) for k, x in enumerate(D) if x != 0]
    first = next(((g, e) for g, e in zip(given, expected) if e != 0), None)
    if first is not None:
        ratio, _ = _masked(_normal(first[0]) / _normal(first[1]), every=True)
        ratio = sp.cancel(sp.together(ratio))
        if not ratio.free_symbols and ratio not in (0, 1) and all(_quick_zero(g - ratio * e) for g, e in zip(given, expected)):
            if ratio == -1:
                return "wrong sign: the matrix is minus the derived one"
            return f"off by a constant factor: the matrix is {sp.sstr(ratio)} times the derived one"
    if wrong and all(_quick_zero(g - e) for g, e in zip(given, expected.T)):
        return "the matrix is the transpose of the derived one"
    if not wrong:
        return None
    i, j = wrong[0]
    text = f"{len(wrong)} of {D.shape[0] * D.shape[1]} entries differ, the first at row {i + 1}, column {j + 1}"
    inner = _scalar_hint(given[i, j], expected[i, j], D[i, j])
    return f"{text}; there {inner}" if inner else text


# ------------------------------------------------------------------------------------ step by step
@dataclass(frozen=True)
class StepReport:
    """The answer of :func:`verify_steps`: a verdict per line against the quantity (``lines``), which
    lines equal it (``equal_lines``, 1-based), and the first line that does not follow from the one
    before (``first_break``, 1-based, None when the chain holds) with that step's verdict (``step``)."""

    quantity: str
    lines: tuple[Verdict, ...]
    equal_lines: tuple[int, ...]
    first_break: int | None
    step: Verdict | None

    def to_dict(self) -> dict:
        return {"quantity": self.quantity, "equal_lines": list(self.equal_lines), "first_break": self.first_break,
                "step": None if self.step is None else self.step.to_dict(),
                "lines": [v.to_dict() for v in self.lines]}

    def __str__(self) -> str:
        out = []
        for k, v in enumerate(self.lines, 1):
            mark = "equal" if v.equal else ("not proven" if v.status == "unproven" else "not equal")
            out.append(f"line {k}: {mark}")
        if self.first_break is None:
            out.append("every step follows from the one before")
        else:
            label = self.step.quantity if self.step is not None else ""
            if self.first_break == 1 or not label.startswith(("line ", "the left side")):
                out.append(f"first broken step: line {self.first_break} is not {TITLES.get(self.quantity, self.quantity)}")
            elif label.startswith("the left side"):
                out.append(f"first broken step: inside line {self.first_break}, from one side of '=' to the next")
            else:
                out.append(f"first broken step: {label} -> line {self.first_break}")
            out.extend("  " + line for line in str(self.step).splitlines()[1:])
        return "\n".join(out)


def verify_steps(model, quantity: str, lines, syntax: str | None = None) -> StepReport:
    r"""Check a derivation written over several lines: each line against ``quantity`` (as :func:`verify`)
    and each line against the one before it, mathematically (exact proof or counterexample, as
    :func:`verify`); the first step whose two lines differ is the break, with a counterexample between them.

    A line may be written as in a derivation on paper: ``= ...`` or ``&= ... \\`` (the chain goes on),
    or ``A = B = C`` (each ``=`` a step; a left side that is not an expression, such as ``|\Sigma|`` or
    ``log L``, is a label and skipped). A line is compared with the one before it after the same plug-ins
    :func:`verify` makes: a line without :math:`\beta` is compared with the previous one at
    :math:`\beta = \hat\beta`, a line without :math:`y`'s at the data's :math:`y` values. A step between two
    lines that both equal the quantity always holds."""
    lines = [str(x) for x in lines if str(x).strip()]
    if not lines:
        raise ExpressionError("no lines to check")
    if len(lines) > 200:
        raise ExpressionError("too many lines (at most 200)")
    der = model if isinstance(model, Derivation) else derive(model) if isinstance(model, Design) else None
    if der is None:
        raise TypeError(f"model must be a Derivation or a Design, not {type(model).__name__}")
    names = symbol_table(der)
    order = _symbol_order(names)
    sizes = design_sizes(der)
    parts: list[list[tuple[str, object]]] = []       # per line: its readable sides (text, value)
    for k, text in enumerate(lines, 1):
        sides = _sides(text)
        read = []
        for m, side in enumerate(sides):
            try:
                read.append((side, parse_expression(side, names, syntax, sizes)))
            except ExpressionError as exc:
                if m == 0 and len(sides) > 1:       # a label: |\Sigma| = ..., log L = ...
                    continue
                raise ExpressionError(f"line {k}: {exc}") from None
        parts.append(read)
    verdicts = []
    for k, read in enumerate(parts, 1):
        try:
            verdicts.append(verify(der, quantity, read[-1][0], syntax))
        except ExpressionError as exc:
            raise ExpressionError(f"line {k}: {exc}") from None
    verdicts = tuple(verdicts)
    first, step = None, None
    previous, prev_line = None, 0
    for k, read in enumerate(parts, 1):
        for m, (_, current) in enumerate(read):
            both_equal = m == len(read) - 1 and prev_line != k and verdicts[prev_line - 1].equal and \
                verdicts[k - 1].equal       # the two expressions verify checked, both the quantity
            if previous is not None and not both_equal:
                v = _compare_step(der, quantity, previous, current, f"line {prev_line}" if prev_line != k
                                  else f"the left side of line {k}", order)
                if not v.equal:
                    first, step = k, v
                    break
            previous, prev_line = current, k
        if first is not None:
            break
    if first is None and not verdicts[0].equal:
        first, step = 1, verdicts[0]
    return StepReport(quantity, verdicts, tuple(k for k, v in enumerate(verdicts, 1) if v.equal), first, step)


def _sides(text: str) -> list[str]:
    """The expressions of a derivation line: ``&=``, a leading ``=`` and a trailing ``\\\\`` dropped, and
    the line split at each ``=`` outside brackets and braces (so \\sum_{j=1} keeps its =)."""
    t = text.strip()
    t = t.removesuffix("\\\\").strip().removesuffix(",").strip()
    t = t.lstrip("&").lstrip().removeprefix("=").lstrip()
    out, depth, start = [], 0, 0
    for i, ch in enumerate(t):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "=" and depth == 0:
            out.append(t[start:i].replace("&", " "))
            start = i + 1
    out.append(t[start:].replace("&", " ") if len(out) else t[start:])
    return [p.strip() for p in out if p.strip()] or [t]


def _compare_step(der: Derivation, quantity: str, previous, current, label: str, order: dict) -> Verdict:
    """current against previous, with previous's beta = beta_hat and y's = the data when current has none
    (the plug-ins :func:`verify` makes)."""
    if isinstance(current, MatrixBase) != isinstance(previous, MatrixBase) or (
            isinstance(current, MatrixBase) and current.shape != previous.shape):
        return Verdict(False, "shape", None, "the two lines are not of the same shape (a matrix and a scalar, "
                       "or matrices of different sizes)", quantity=label, status="different")
    key = _ALIASES.get(str(quantity).strip().lower(), str(quantity).strip())
    previous, _ = _plugged_in(der, key if key in QUANTITIES else "", previous, current)
    if isinstance(current, MatrixBase):
        return _compare_matrix(current, previous, label, der, order)
    return _compare_scalar(current, previous, label, order)


# ------------------------------------------------------------------------- the quantities derived next
def _exact(values) -> sp.Matrix:
    return sp.Matrix([[sp.Rational(repr(float(v))) for v in row] for row in values])


def _closed_form_estimate(der: Derivation, key: str) -> sp.Expr:
    """sigma^2 or sigma_s^2 at the root of the score equations of a balanced random-intercept design, as an
    expression in the y's: :func:`~lmm_symbolic.optimisation.balanced_score_solution` (the root in the
    eigenvalues v = sigma^2 and lambda = sigma^2 + m sigma_s^2) at R2 = r^T r and S1 = sum_j (1^T r_j)^2,
    r = y - X beta_hat the OLS residuals (GLS = OLS under balance). sigma_s^2 is the interior root: the
    estimate is max(0, it) -- at 0 the ML sigma^2 is R2 / n."""
    from .optimisation import balanced_score_solution, is_balanced
    design = der.design
    if not design.is_random_intercept or design.weights is not None or design.offset is not None:
        raise ModelError(f"{key} is written out for one random intercept (1|g) without weights or offsets")
    if not is_balanced(design):
        raise ModelError(f"{key} has a closed form only for balanced designs (equal group sizes, GLS = OLS)")
    reml = key.startswith("reml")
    X = _exact(design.X)
    y = sp.Matrix(der.symbols.y)
    beta = (X.T * X).inv() * X.T * y
    r = (y - X * beta).applyfunc(sp.expand)
    codes = np.asarray(design.terms[0].codes)
    G, n, p = int(codes.max()) + 1, design.n, design.p
    size = int(np.bincount(codes)[0])
    R2 = sp.expand((r.T * r)[0, 0])
    S1 = sp.expand(sum(sp.Add(*[r[i] for i in np.flatnonzero(codes == j)]) ** 2 for j in range(G)))
    means = np.zeros((G, p))
    np.add.at(means, codes, np.asarray(design.X, dtype=float))
    pb = int(np.linalg.matrix_rank(means / size)) if reml else 0
    pw = (p - pb) if reml else 0
    symbols, v_hat, vs_hat, _ = balanced_score_solution(reml)
    at = dict(zip(symbols, (R2, S1, n, G, size, pw, pb)))
    return sp.factor(sp.expand((v_hat if key.endswith("_sigma2") else vs_hat).xreplace(at)))


def _conditional_modes(der: Derivation) -> sp.Matrix:
    """u_hat_j = sigma_s^2 / (sigma^2 + m_j sigma_s^2) 1^T (y_j - X_j beta) for (1|g): D Z^T Sigma^-1 (y - X beta)
    through the block identity Sigma_j^-1 = (I - sigma_s^2 / (sigma^2 + m_j sigma_s^2) J) / sigma^2."""
    from .derivation import sigma, sigma_s
    design = der.design
    if not design.is_random_intercept or design.weights is not None:
        raise ModelError("conditional_modes is written out for one random intercept (1|g) without weights")
    X = _exact(design.X)
    r = sp.Matrix(der.symbols.y) - X * sp.Matrix(der.symbols.beta)
    if design.offset is not None:
        r -= _exact([[v] for v in design.offset])
    codes = np.asarray(design.terms[0].codes)
    G = int(codes.max()) + 1
    out = []
    for j in range(G):
        rows = np.flatnonzero(codes == j)
        out.append(sigma_s**2 / (sigma**2 + len(rows) * sigma_s**2) * sp.expand(sp.Add(*[r[i] for i in rows])))
    return sp.Matrix(out)


def _gls_parts(der: Derivation) -> tuple[sp.Matrix, sp.Matrix]:
    """X^T Sigma^-1 X and X^T Sigma^-1 Y from Eq. 12 by sympy: Q(beta) = c - 2 b^T beta + beta^T A beta,
    so A = Hessian/2 and b = -grad Q(0)/2 (the block forms of the derivation, differentiated)."""
    Q = der.quadratic_form
    beta = list(der.symbols.beta)
    zero = {b: 0 for b in beta}
    A = sp.Matrix(len(beta), len(beta), lambda i, j: sp.cancel(sp.diff(Q, beta[i], beta[j]).xreplace(zero) / 2))
    b = sp.Matrix([sp.cancel(-sp.diff(Q, bk).xreplace(zero) / 2) for bk in beta])
    return A, b


def derived_quantity(der: Derivation, key: str):
    r"""The quantity ``key`` of the derivation: an attribute (``det``, ``loglik``, ...) or one derived here
    by sympy from the block forms (``gls_estimator``, ``beta_covariance``, ``deviance``,
    ``score_<symbol>``, ...); a determinant left unevaluated by the derivation
    (:math:`|X^\top \Sigma^{-1} X|` of a slope model's REML criterion) written out, so that the quantity can
    be evaluated at a point."""
    try:
        cache = _CACHE.setdefault(der, {})
    except TypeError:               # pragma: no cover - a derivation that cannot be weakly referenced
        cache = {}
    if key in cache:
        return cache[key]
    value = _derived_quantity(der, key)
    if isinstance(value, sp.Basic) and value.has(sp.Determinant):
        value = value.replace(lambda x: isinstance(x, sp.Determinant),
                              lambda x: sp.Matrix(x.arg).det(method="berkowitz"))
    if isinstance(value, MatrixBase):
        value = sp.ImmutableMatrix(value)
    cache[key] = value
    return value


#: the quantities derived so far, per derivation (sympy objects are immutable; a derivation never changes)
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _derived_quantity(der: Derivation, key: str):
    if key in ("det", "logdet", "inverse", "quadratic_form", "loglik", "reml_loglik", "sigma", "kinship"):
        return getattr(der, QUANTITIES[key])
    if key == "deviance":
        return -2 * der.loglik
    if key == "reml_criterion":
        return -2 * der.reml_loglik
    if key == "likelihood":
        return sp.exp(der.loglik)
    if key.startswith("score_"):
        name = key[len("score_"):]
        names = symbol_table(der)
        if name.endswith("2") and name[:-1] in names and names[name[:-1]].is_positive:   # d/d sigma^2
            s = names[name[:-1]]
            if s not in der.loglik.free_symbols:
                raise ExpressionError(f"score_{name}: {s.name} is not a parameter of this model's log-likelihood")
            return sp.diff(der.loglik, s) / (2 * s)
        if name not in names:
            raise ExpressionError(f"score_{name}: unknown symbol {name!r}")
        if names[name] not in der.loglik.free_symbols:
            raise ExpressionError(f"score_{name}: {name} is not a parameter of this model's log-likelihood")
        return sp.diff(der.loglik, names[name])
    if not der.symbolic_y:
        raise ModelError(f"{key} is written out only for designs with symbolic responses")
    if key in ("ml_sigma2", "ml_sigma_s2", "reml_sigma2", "reml_sigma_s2"):
        return _closed_form_estimate(der, key)
    if key == "conditional_modes":
        return _conditional_modes(der)
    if key == "profiled_loglik":
        beta_hat = derived_quantity(der, "gls_estimator")
        return der.loglik.xreplace(dict(zip(der.symbols.beta, beta_hat)))
    A, b = _gls_parts(der)
    if key == "gls_information":
        return A
    Ainv = A.inv(method="ADJ").applyfunc(sp.factor) if A.shape[0] <= 4 else A.inv()
    if key == "beta_covariance":
        return Ainv
    beta_hat = (Ainv * b).applyfunc(sp.factor)
    if key == "gls_estimator":
        return beta_hat
    if key == "profiled_loglik":  # pragma: no cover - handled above
        return der.loglik.xreplace(dict(zip(der.symbols.beta, beta_hat)))
    raise ExpressionError(f"unknown quantity {key!r}")  # pragma: no cover
