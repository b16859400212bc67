"""A whitelist parser for untrusted maths: plain (``sigma**2``, ``^`` allowed) or LaTeX (``\\sigma^2``).

The text never reaches ``eval``, ``sympify``, ``parse_expr`` or ``lambdify``. Plain syntax is read with
``ast.parse(..., mode="eval")`` and the tree is walked allowing only numbers, the derivation's symbol names,
``pi`` and ``e``, ``+ - * / **``, a few functions (``log``, ``ln``, ``exp``, ``sqrt``, ``abs``, ``det``),
``Rational(a, b)``, sums and products over an index (``Sum(body, (j, 1, G))``, ``Product``, or
``sum_{j=1}^{G} body`` as on paper) and lists of rows for matrices. LaTeX is read by a small tokenizer and
recursive-descent parser of our own. Both build the sympy object through ``_Builder``, which bounds
everything that could make sympy work hard:

* the text's length (:data:`MAX_LENGTH`) and bracket nesting (:data:`MAX_DEPTH`, counted before any parser
  runs, so 100,000 nested parentheses never reach ``ast.parse``);
* the number of digits of a literal (:data:`MAX_LITERAL_DIGITS`) and of any number sympy would compute
  (:data:`MAX_NUMBER_DIGITS`), checked *before* a power or product of numbers is evaluated;
* exponents: a constant exponent has magnitude at most :data:`MAX_EXPONENT`; a symbolic exponent (and the
  argument of ``exp``) may not itself contain a symbolic power or ``exp`` -- no power towers;
* the polynomial degree of the result (:data:`MAX_DEGREE`) and the size of matrices (:data:`MAX_MATRIX_DIM`).

Anything else raises :class:`~lmm_symbolic.errors.ExpressionError` with a one-line message saying what is
not allowed.
"""
from __future__ import annotations

import ast
import math
import re
import warnings
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from fractions import Fraction

import sympy as sp
from sympy.matrices import MatrixBase

from .errors import ExpressionError

#: the longest expression text read, in characters
MAX_LENGTH = 10_000
#: the deepest bracket nesting read
MAX_DEPTH = 100
#: the largest magnitude of a constant exponent
MAX_EXPONENT = 1000
#: the most digits of a number literal in the text
MAX_LITERAL_DIGITS = 100
#: the most digits of any number sympy would compute (checked before a power or product is evaluated)
MAX_NUMBER_DIGITS = 300
#: the highest polynomial degree of the result
MAX_DEGREE = 2000
#: the most rows or columns of a matrix
MAX_MATRIX_DIM = 50
#: the most multiplications a matrix product may take (rows x inner size x columns)
MAX_MATRIX_PRODUCT = 20_000
#: the largest matrix whose determinant is expanded (``|A|``, ``\det A``, ``vmatrix``, ``det(...)``)
MAX_DET_DIM = 8
#: the most terms a sum or product over an index (``\sum_{j=1}^{G}``, ``\prod``) expands to, nested ones multiplied
MAX_EXPANDED_TERMS = 500
#: the most tokens read again while expanding sums and products (bodies times their length), all together
MAX_EXPANDED_TOKENS = 100_000

_MAX_BITS = MAX_NUMBER_DIGITS * math.log2(10)  # about 997 bits

#: functions the plain syntax may call, by name
PLAIN_FUNCTIONS = ("log", "ln", "exp", "sqrt", "abs", "Abs", "det")
#: names of constants (in both syntaxes, ``\\pi`` in LaTeX)
CONSTANTS = {"pi": sp.pi, "E": sp.E, "e": sp.E}

Value = sp.Expr | MatrixBase
_INFINITE = (sp.zoo, sp.nan, sp.oo, -sp.oo)


def detect_syntax(text: str) -> str:
    """``"latex"`` when the text has a backslash, a brace or a sum or product sign, else ``"plain"`` -- also
    for text without a backslash whose braces come with a plain sum, ``sum_{j=1}^{G} log(...)``."""
    if "\\" in text or "∑" in text or "∏" in text:
        return "latex"
    if "{" in text:
        return "plain" if (_PLAIN_BIG.search(text) or _PLAIN_CALL.search(text)) else "latex"
    return "plain"


def parse_expression(text: str, names: Mapping[str, sp.Symbol], syntax: str | None = None,
                     sizes: Mapping | None = None) -> Value:
    """The sympy expression (or Matrix) ``text`` states, with symbol names taken from ``names``.

    ``sizes`` are the design's sizes that the limits of a sum or product (LaTeX ``\\sum_{j=1}^{G}``, plain
    ``Sum(body, (j, 1, G))`` or ``sum_{j=1}^{G} body``) and the expression itself (G, n) may name:
    ``{"G": groups, "n": observations, "m": [size of group 1, ...]}`` (so ``\\sum_{j=1}^{G}``,
    ``\\prod_{i=1}^{m_j}``, and ``m_j`` or ``n_j`` in the body is group j's size).

    ``syntax`` is ``"plain"``, ``"latex"`` or None (detect: LaTeX if the text has ``\\`` or ``{``).
    Raises ExpressionError for anything outside the whitelist or beyond the bounds.
    """
    if not isinstance(text, str):
        raise ExpressionError(f"the expression must be text, not {type(text).__name__}")
    if len(text) > MAX_LENGTH:
        raise ExpressionError(f"the expression is too long ({len(text):,} characters; at most {MAX_LENGTH:,})")
    if syntax is None:
        syntax = detect_syntax(text)
    text = normalise_unicode(text, str(syntax).lower() == "latex")
    bad = next((c for c in text if not (" " <= c <= "~" or c in "\t\n\r")), None)
    if bad is not None:
        raise ExpressionError(f"character {bad!r} is not allowed; write the expression in ASCII "
                              "(e.g. sigma_s, \\sigma_s)")
    if not text.strip():
        raise ExpressionError("the expression is empty")
    if syntax is None:
        syntax = detect_syntax(text)
    syntax = str(syntax).lower()
    if syntax not in ("plain", "latex"):
        raise ExpressionError(f"unknown syntax {syntax!r}; use 'plain' or 'latex'")
    _check_nesting(text)
    if syntax == "plain":
        text = implicit_products(plain_big_operators(text), names)
    builder = _Builder(names, sizes)
    try:
        parser = _PlainParser(text, builder) if syntax == "plain" else _LatexParser(text, builder)
        value = parser.parse()
        builder.check_result(value)
    except (RecursionError, MemoryError):
        raise ExpressionError("the expression is nested too deeply or too complex to read") from None
    return value


_GREEK_CHARS = {"σ": "sigma", "ρ": "rho", "β": "beta", "μ": "mu", "ε": "epsilon", "ϵ": "epsilon", "π": "pi",
                "θ": "theta", "τ": "tau", "λ": "lambda", "α": "alpha", "γ": "gamma", "δ": "delta", "ω": "omega"}
_SUPERSCRIPTS = dict(zip("⁰¹²³⁴⁵⁶⁷⁸⁹⁺⁻", "0123456789+-"))
_SUBSCRIPTS = dict(zip("₀₁₂₃₄₅₆₇₈₉ₛᵢⱼₖ", "0123456789sijk"))
_OPERATOR_CHARS = {"·": "*", "⋅": "*", "∙": "*", "×": "*", "÷": "/", "−": "-", "–": "-", "\u00a0": " ",
                   "\u2009": " ", "\u202f": " "}


def normalise_unicode(text: str, latex: bool) -> str:
    """Maths pasted from a PDF in ASCII: Greek letters (σ, σs for ``sigma_s``), superscript and subscript
    digits (σ⁴, σ₀), the product signs · and ×, and the minus sign U+2212. Only characters are rewritten;
    the whitelist parser still reads the result."""
    if all(c < "\x80" for c in text):
        return text
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in _GREEK_CHARS:
            name = _GREEK_CHARS[c]
            # σs (not followed by a letter) is the tutorial's sigma_s
            if c == "σ" and i + 1 < n and text[i + 1] in "sₛ" and not (i + 2 < n and text[i + 2].isalpha()):
                name, i = "sigma_s", i + 1
            out.append(("\\" + name.replace("_s", "_s ") + " ") if latex else name)
            i += 1
        elif c in _SUPERSCRIPTS or c in _SUBSCRIPTS:
            table, mark = (_SUPERSCRIPTS, "^") if c in _SUPERSCRIPTS else (_SUBSCRIPTS, "_")
            j = i
            while j < n and text[j] in table:
                j += 1
            body = "".join(table[ch] for ch in text[i:j])
            if mark == "_":
                out.append("_{" + body + "}" if latex else "_" + body)
            else:
                out.append("^{" + body + "}" if latex else "^(" + body + ")")
            i = j
        elif c in "∑∏" and latex:
            out.append("\\sum " if c == "∑" else "\\prod ")
            i += 1
        elif c in _OPERATOR_CHARS:
            op = _OPERATOR_CHARS[c]
            out.append(" \\cdot " if latex and op == "*" else op)
            i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


_PLAIN_TOKEN = re.compile(r"""(?P<num>0[xXoObB][0-9a-fA-F_]+|(?:\d[\d_]*\.?[\d_]*|\.\d[\d_]*)(?:[eE][+-]?\d+)?[jJ]?)
    |(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<ws>\s+)|(?P<other>.)""", re.VERBOSE | re.DOTALL)


def implicit_products(text: str, names: Mapping[str, sp.Symbol]) -> str:
    """Plain text with the products people leave implicit made explicit: ``2 sigma``, ``2sigma_s``,
    ``sigma^4 (sigma^2 + 1)``, ``(a)(b)``. Only ``*`` is inserted: what the parser accepts is unchanged."""
    if "'" in text or '"' in text:
        return text
    import keyword
    out: list[str] = []
    prev = None   # kind of the previous significant token: "operand", "call" or None
    for m in _PLAIN_TOKEN.finditer(text):
        kind, tok = m.lastgroup, m.group(0)
        if kind == "ws":
            out.append(tok)
            continue
        starts = kind == "num" or (kind == "name" and not keyword.iskeyword(tok)) or tok == "("
        if prev == "operand" and starts:
            out.append("*")
        out.append(tok)
        if kind == "num" or tok in (")", "]"):
            prev = "operand"
        elif kind == "name" and not keyword.iskeyword(tok):
            # a function's name has no underscore: m_j, y_ij and an index j are operands even when unknown
            prev = "call" if (tok not in names and tok not in CONSTANTS and "_" not in tok and len(tok) > 1) \
                else "operand"
        else:
            prev = None
    return "".join(out)


#: sum_{j=1}^{G}, prod_(i=1)^(m_j), Sum_{k=1}^3 in plain text: the operator, its index and two limits
_PLAIN_BIG = re.compile(r"""\b(sum|prod|Sum|Product)_\s*[{(]\s*([A-Za-z])\s*=\s*([A-Za-z0-9_ +-]{1,40}?)\s*[})]
    \s*(?:\^|\*\*)\s*(?:[{(]\s*([A-Za-z0-9_ +-]{1,40}?)\s*[})]|([A-Za-z](?:_[A-Za-z0-9]{1,10})?|\d{1,7}))""", re.VERBOSE)
_PLAIN_CALL = re.compile(r"\b(?:Sum|Product|summation|product)\s*\(")
#: the most sums and products written sum_{j=1}^{G} in one plain expression
MAX_PLAIN_BIG = 50


def plain_big_operators(text: str) -> str:
    """Plain sums written as on paper, ``sum_{j=1}^{G} (m_j - 1) log(sigma^2)``, rewritten as the sympy form
    ``Sum((m_j - 1) log(sigma^2), (j, 1, G))`` that the plain parser reads. As in LaTeX, the body is the
    product that follows, up to the next + or - outside brackets (put a longer body in parentheses).
    Subscripts in braces become plain names (``y_{i,j}`` is ``y_i_j``), other braces parentheses."""
    matches = list(_PLAIN_BIG.finditer(text))
    if len(matches) > MAX_PLAIN_BIG:
        raise ExpressionError(f"too many sums and products (at most {MAX_PLAIN_BIG})")
    for m in reversed(matches):      # the last first: an earlier sum's body then holds the rewritten one
        end = _body_end(text, m.end())
        body = text[m.end():end].strip()
        if not body:
            raise ExpressionError(f"{m.group(1)}_{{{m.group(2)}={m.group(3)}}} needs a body after its limits")
        hi = m.group(4) or m.group(5)
        call = "Sum" if m.group(1).lower() == "sum" else "Product"
        text = f"{text[:m.start()]}{call}({body}, ({m.group(2)}, {m.group(3)}, {hi})){text[end:]}"
    if "{" in text or "}" in text:
        text = re.sub(r"_\{([A-Za-z0-9, ]{1,40})\}", lambda s: "_" + "_".join(re.split(r"[, ]+", s.group(1).strip())),
                      text)
        text = text.replace("{", "(").replace("}", ")")
    return text


def _body_end(text: str, start: int) -> int:
    """Where the body of a plain sum starting at ``start`` ends: the next + or - between terms, a comma or
    a closing bracket outside the body's own brackets, or the end of the text."""
    depth, operand = 0, False
    for m in _PLAIN_TOKEN.finditer(text, start):
        kind, tok = m.lastgroup, m.group(0)
        if kind == "ws":
            continue
        if tok in "([{":
            depth, operand = depth + 1, False
        elif tok in ")]}":
            if depth == 0:
                return m.start()
            depth, operand = depth - 1, True
        elif depth == 0 and (tok == "," or (tok in "+-" and operand)):
            return m.start()
        else:
            operand = kind in ("num", "name")
    return len(text)


def _check_nesting(text: str) -> None:
    """Reject bracket nesting deeper than MAX_DEPTH before any parser (or ast.parse) sees the text."""
    depth = deepest = 0
    for c in text:
        if c in "([{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_DEPTH:
                    raise ExpressionError(f"brackets are nested too deeply (more than {MAX_DEPTH} levels)")
        elif c in ")]}":
            depth -= 1
    if text.count("\\begin") > MAX_DEPTH:
        raise ExpressionError(f"too many \\begin environments (at most {MAX_DEPTH})")


# ------------------------------------------------------------------------------------------ builder
def _bits(r: sp.Rational) -> int:
    return max(abs(int(r.p)).bit_length(), int(r.q).bit_length())


def _log2(r: sp.Rational) -> float:
    """log2 of the larger of |numerator| and denominator: the bits a power of r grows by per unit exponent."""
    p, q = abs(int(r.p)), int(r.q)
    return max(math.log2(p) if p else 0.0, math.log2(q))


def _too_big() -> ExpressionError:
    return ExpressionError(f"a number in the expression is too large (more than {MAX_NUMBER_DIGITS} digits)")


def _coeff_bits(v: sp.Expr) -> float:
    """log2 of the rational coefficient sympy would multiply out when v is a factor or a power's base."""
    if v.is_Rational:
        return _log2(v)
    if v.is_Mul:
        c = v.as_coeff_Mul()[0]
        return _log2(c) if c.is_Rational else 0.0
    return 0.0


def _has_tower(e: sp.Expr) -> bool:
    """True when e contains exp or a power with a non-constant exponent (a power tower's ingredient)."""
    for node in sp.preorder_traversal(e):
        if isinstance(node, sp.exp):
            return True
        if isinstance(node, sp.Pow) and node.exp.free_symbols:
            return True
    return False


def degree_bound(e: sp.Basic, memo: dict | None = None) -> int:
    """An upper bound on e's total degree in its symbols (functions' arguments counted by their degree)."""
    memo = {} if memo is None else memo
    if e in memo:
        return memo[e]
    if e.is_Symbol:
        d = 1
    elif e.is_Number or e.is_NumberSymbol or not e.args:
        d = 0
    elif e.is_Add:
        d = max(degree_bound(a, memo) for a in e.args)
    elif e.is_Mul:
        d = sum(degree_bound(a, memo) for a in e.args)
    elif e.is_Pow and e.exp.is_Rational:
        d = int(degree_bound(e.base, memo) * abs(e.exp) + 1) if e.exp.q != 1 else \
            degree_bound(e.base, memo) * abs(int(e.exp.p))
    else:
        d = max(degree_bound(a, memo) for a in e.args)
    memo[e] = d
    return d


def group_size(builder, sub: str) -> int:
    r""":math:`m_k` of the text ``m_k``: the size of group :math:`k` (1-based) of the design the builder reads
    for."""
    sizes = builder.sizes.get("m") or ()
    k = int(sub)
    if not 1 <= k <= len(sizes):
        raise ExpressionError(f"there is no group {k} (the design has {len(sizes)} groups)")
    return int(sizes[k - 1])

class _Builder:
    """Makes the sympy objects for both parsers, checking every bound before sympy evaluates anything."""

    def __init__(self, names: Mapping[str, sp.Symbol], sizes: Mapping | None = None):
        self.names = dict(names)
        self.sizes = dict(sizes or {})

    # ---------------------------------------------------------------------------------- leaves
    def number(self, text: str) -> sp.Rational:
        """The exact rational a decimal literal states (``0.1`` is 1/10, not the nearest double)."""
        digits = sum(c.isdigit() for c in text)
        if digits > MAX_LITERAL_DIGITS:
            raise ExpressionError(f"the number {text[:20]}... has too many digits (at most {MAX_LITERAL_DIGITS})")
        try:
            dec = Decimal(text.replace("_", ""))
        except InvalidOperation:
            raise ExpressionError(f"cannot read the number {text[:40]!r}") from None
        if not dec.is_finite():
            raise ExpressionError(f"the number {text[:40]!r} is not finite")
        exponent = dec.as_tuple().exponent
        if abs(exponent) > MAX_NUMBER_DIGITS or dec.adjusted() > MAX_NUMBER_DIGITS:
            raise _too_big()
        return sp.Rational(Fraction(dec))

    def resolve(self, name: str) -> str:
        """The known name ``name`` stands for: itself, or y_11 for y_1_1 (y_{1,1}) when that is unique."""
        if name in self.names or "_" not in name:
            return name
        base, _, sub = name.partition("_")
        key = base + "_" + sub.replace("_", "")
        hits = [k for k in self.names if k.partition("_")[0] == base and
                base + "_" + k.partition("_")[2].replace("_", "") == key]
        return hits[0] if len(hits) == 1 else name

    def symbol(self, name: str) -> sp.Expr:
        name = self.resolve(name)
        if name in self.names:
            return self.names[name]
        if name in CONSTANTS:
            return CONSTANTS[name]
        size = self.size(name)
        if size is not None:
            return size
        raise ExpressionError(f"unknown symbol {name!r}; known names: {self.known()}")

    def size(self, name: str) -> sp.Integer | None:
        """G, n (or N): the design's numbers of groups and observations, when they are not symbols."""
        key = {"N": "n"}.get(name, name)
        if key in ("G", "n") and name not in self.names and isinstance(self.sizes.get(key), int):
            return sp.Integer(self.sizes[key])
        return None

    def known(self) -> str:
        order = [n for n in ("sigma", "sigma_s") if n in self.names] + \
            [n for n in self.names if n not in ("sigma", "sigma_s")]
        shown = order[:40]
        more = f", ... ({len(order)} in all)" if len(order) > len(shown) else ""
        return ", ".join(shown) + more + ", pi, e"

    # ------------------------------------------------------------------------------ arithmetic
    @staticmethod
    def _checked(v):
        if isinstance(v, MatrixBase):
            return v
        if v in _INFINITE or any(a in _INFINITE for a in v.args):
            raise ExpressionError("the expression divides by zero or is infinite (e.g. 1/0, log(0))")
        if v.is_Rational and _bits(v) > _MAX_BITS:
            raise _too_big()
        if v.is_Mul and _coeff_bits(v) > _MAX_BITS:
            raise _too_big()
        return v

    def add(self, terms: list[tuple[int, Value]]) -> Value:
        """sum of sign * value; matrices add to matrices of the same shape."""
        mats = [isinstance(v, MatrixBase) for _, v in terms]
        if any(mats):
            if not all(mats):
                raise ExpressionError("a matrix and a scalar cannot be added")
            shape = terms[0][1].shape
            if any(v.shape != shape for _, v in terms):
                raise ExpressionError("matrices of different shapes cannot be added")
            out = sp.zeros(*shape)
            for s, v in terms:
                out = out + v if s > 0 else out - v
            return out.applyfunc(self._checked)
        return self._checked(sp.Add(*[v if s > 0 else -v for s, v in terms]))

    def neg(self, v: Value) -> Value:
        return -v

    def mul(self, factors: list[tuple[str, Value]]) -> Value:
        """A product left to right; op is '*' or '/' (the first factor's op is ignored)."""
        acc = factors[0][1]
        for op, v in factors[1:]:
            acc = self._div(acc, v) if op == "/" else self._mul2(acc, v)
        return acc

    def _mul2(self, a: Value, b: Value) -> Value:
        am, bm = isinstance(a, MatrixBase), isinstance(b, MatrixBase)
        if am and bm:
            if a.shape[1] != b.shape[0]:
                raise ExpressionError(f"cannot multiply a {a.shape[0]}x{a.shape[1]} matrix by a "
                                      f"{b.shape[0]}x{b.shape[1]} matrix")
            if a.shape[0] * a.shape[1] * b.shape[1] > MAX_MATRIX_PRODUCT:
                raise ExpressionError("the matrix product is too large")
            return (a * b).applyfunc(self._checked)
        if am or bm:
            m, s = (a, b) if am else (b, a)
            if _coeff_bits(s) + max((_coeff_bits(x) for x in m), default=0) > _MAX_BITS:
                raise _too_big()
            return m.applyfunc(lambda x: self._checked(s * x))
        if _coeff_bits(a) + _coeff_bits(b) > _MAX_BITS:
            raise _too_big()
        return self._checked(a * b)

    def _div(self, a: Value, b: Value) -> Value:
        if isinstance(b, MatrixBase):
            raise ExpressionError("division by a matrix is not allowed (write its inverse out)")
        if b == 0:
            raise ExpressionError("division by zero")
        return self._mul2(a, self.power(b, sp.Integer(-1)))

    def power(self, base: Value, exponent: Value) -> sp.Expr:
        """base ** exponent after the checks that stop power towers and huge numbers."""
        if isinstance(base, MatrixBase) or isinstance(exponent, MatrixBase):
            raise ExpressionError("powers of matrices are not allowed (write the product or inverse out)")
        if exponent.free_symbols:
            if _has_tower(exponent):
                raise ExpressionError("power towers are not allowed: an exponent may not contain a power "
                                      "with a symbolic exponent or exp")
            if base.is_Rational and _bits(base) > 64:
                raise _too_big()
            return self._checked(sp.Pow(base, exponent))
        if exponent.is_Rational:
            if abs(exponent) > MAX_EXPONENT or exponent.q > MAX_EXPONENT:
                raise ExpressionError(f"the exponent is too large (at most {MAX_EXPONENT} in magnitude)")
            if base == 0 and exponent < 0:
                raise ExpressionError("division by zero (0 to a negative power)")
            if _coeff_bits(base) * float(abs(exponent)) > _MAX_BITS:
                raise _too_big()
            if degree_bound(base) * abs(exponent) > MAX_DEGREE:
                raise ExpressionError(f"the expression's degree is too high (at most {MAX_DEGREE})")
            return self._checked(sp.Pow(base, exponent))
        # a constant such as pi, log(2) or sqrt(2): no towers, and a bounded magnitude
        if _has_tower(exponent):
            raise ExpressionError("power towers are not allowed: an exponent may not contain exp or a power "
                                  "of a power")
        value = exponent.evalf(15)
        if not value.is_real or not value.is_finite or abs(value) > MAX_EXPONENT:
            raise ExpressionError(f"the exponent is too large (at most {MAX_EXPONENT} in magnitude)")
        if base.is_Rational and _bits(base) > 64:
            raise _too_big()
        return self._checked(sp.Pow(base, exponent))

    def determinant(self, M: Value) -> sp.Expr:
        """|A| = det A for a square matrix of at most :data:`MAX_DET_DIM` rows (Berkowitz, no division);
        the determinant of a scalar is the scalar."""
        if not isinstance(M, MatrixBase):
            return M
        if M.shape[0] != M.shape[1]:
            raise ExpressionError(f"a determinant needs a square matrix, not {M.shape[0]}x{M.shape[1]}")
        if M.shape[0] > MAX_DET_DIM:
            raise ExpressionError(f"determinants are expanded for matrices of at most {MAX_DET_DIM} rows")
        return self._checked(sp.expand(M.det(method="berkowitz")) if M.shape[0] <= 3 else M.det(method="berkowitz"))

    def function(self, name: str, arg: Value) -> sp.Expr:
        if name == "det" or (name in ("abs", "Abs") and isinstance(arg, MatrixBase)):
            return self.determinant(arg)
        if isinstance(arg, MatrixBase):
            raise ExpressionError(f"{name} of a matrix is not allowed")
        if name in ("log", "ln"):
            if arg == 0:
                raise ExpressionError("log(0) is not finite")
            return self._checked(sp.log(arg))
        if name == "exp":
            return self.power(sp.E, arg)
        if name == "sqrt":
            return self.power(arg, sp.Rational(1, 2))
        if name in ("abs", "Abs"):
            return self._checked(sp.Abs(arg))
        raise ExpressionError(f"function {name!r} is not allowed")  # pragma: no cover - callers check

    def root(self, arg: Value, index: Value) -> sp.Expr:
        if not (isinstance(index, sp.Integer) and 1 <= index <= MAX_EXPONENT):
            raise ExpressionError(f"a root's index must be a whole number from 1 to {MAX_EXPONENT}")
        return self.power(arg, sp.Rational(1, int(index)))

    def matrix(self, rows: list[list[Value]]) -> sp.Matrix:
        if not rows or not rows[0]:
            raise ExpressionError("a matrix needs at least one row and one column")
        ncol = len(rows[0])
        if any(len(r) != ncol for r in rows):
            raise ExpressionError("the rows of the matrix have different lengths")
        if len(rows) > MAX_MATRIX_DIM or ncol > MAX_MATRIX_DIM:
            raise ExpressionError(f"the matrix is too large (at most {MAX_MATRIX_DIM}x{MAX_MATRIX_DIM})")
        for r in rows:
            for v in r:
                if isinstance(v, MatrixBase):
                    raise ExpressionError("a matrix entry must be a number or an expression, not a matrix")
        return sp.Matrix(rows)

    # ----------------------------------------------------------------------------------- result
    def check_result(self, value: Value) -> None:
        entries = list(value) if isinstance(value, MatrixBase) else [value]
        memo: dict = {}
        for e in entries:
            if e.has(*_INFINITE):
                raise ExpressionError("the expression divides by zero or is infinite (e.g. 1/0, log(0))")
            if degree_bound(e, memo) > MAX_DEGREE:
                raise ExpressionError(f"the expression's degree is too high (at most {MAX_DEGREE})")
            for a in e.atoms(sp.Rational):
                if _bits(a) > _MAX_BITS:
                    raise _too_big()
            for a in e.atoms(sp.Pow):
                if a.exp.is_Rational and a.exp.q > MAX_EXPONENT:
                    raise ExpressionError(f"roots are nested too deeply (a root index above {MAX_EXPONENT})")


# ------------------------------------------------------------------------------------ plain syntax
_AST_NAMES = {
    ast.Attribute: "attribute access ('.')", ast.Lambda: "lambda", ast.Subscript: "indexing ('x[...]')",
    ast.Compare: "comparisons", ast.BoolOp: "'and'/'or'", ast.IfExp: "'if ... else'",
    ast.NamedExpr: "assignment (':=')", ast.Dict: "dictionaries", ast.Set: "sets",
    ast.ListComp: "comprehensions", ast.SetComp: "comprehensions", ast.DictComp: "comprehensions",
    ast.GeneratorExp: "generator expressions", ast.JoinedStr: "f-strings", ast.FormattedValue: "f-strings",
    ast.Starred: "'*' unpacking", ast.Await: "await", ast.Yield: "yield", ast.YieldFrom: "yield",
    ast.Slice: "slices",
}
_OP_NAMES = {ast.Mod: "%", ast.FloorDiv: "//", ast.MatMult: "@", ast.BitAnd: "&", ast.BitOr: "|",
             ast.BitXor: "^", ast.LShift: "<<", ast.RShift: ">>", ast.Not: "not", ast.Invert: "~"}


#: the plain names of a sum and a product over an index, as sympy spells them: Sum(body, (j, 1, G))
PLAIN_BIG_OPERATORS = {"Sum": "sum", "summation": "sum", "sum": "sum", "Product": "prod", "product": "prod",
                       "prod": "prod"}


class _PlainParser:
    def __init__(self, text: str, builder: _Builder):
        self.source = text.replace("^", "**").strip()
        self.b = builder
        self.bound: dict[str, int] = {}      # the indices of the sums and products being expanded
        self.expanded = 0                    # bodies read so far, all sums together
        self.work = 0                        # tree nodes read in the bodies of sums and products

    def parse(self) -> Value:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # SyntaxWarning for e.g. "1if": the text is rejected anyway
                tree = ast.parse(self.source, mode="eval")
        except SyntaxError as exc:
            where = f" at column {exc.offset}" if exc.offset else ""
            raise ExpressionError(f"cannot read the expression ({exc.msg}{where}); only one expression is "
                                  "allowed: no statements, assignments or imports") from None
        except (RecursionError, MemoryError, ValueError, OverflowError):
            raise ExpressionError("the expression is nested too deeply or too complex to read") from None
        return self.walk(tree.body, 1, top=True)

    def walk(self, node: ast.AST, depth: int, top: bool = False) -> Value:
        if depth > MAX_DEPTH:
            raise ExpressionError(f"the expression is nested too deeply (more than {MAX_DEPTH} levels)")
        if self.bound:
            self.work += 1
            if self.work > MAX_EXPANDED_TOKENS:
                raise ExpressionError(f"the sums and products are too long to expand (more than "
                                      f"{MAX_EXPANDED_TOKENS:,} terms read)")
        b = self.b
        if isinstance(node, ast.BinOp):
            op = type(node.op)
            if op in (ast.Add, ast.Sub):
                return b.add(self._chain(node, (ast.Add, ast.Sub), depth, lambda o: 1 if o is ast.Add else -1))
            if op in (ast.Mult, ast.Div):
                return b.mul(self._chain(node, (ast.Mult, ast.Div), depth, lambda o: "*" if o is ast.Mult else "/"))
            if op is ast.Pow:
                base = self.walk(node.left, depth + 1)
                return b.power(base, self.walk(node.right, depth + 1))
            raise ExpressionError(f"the operator {_OP_NAMES.get(op, op.__name__)} is not allowed; "
                                  "use + - * / ** (or ^)")
        if isinstance(node, ast.UnaryOp):
            if isinstance(node.op, ast.USub):
                return b.neg(self.walk(node.operand, depth + 1))
            if isinstance(node.op, ast.UAdd):
                return self.walk(node.operand, depth + 1)
            raise ExpressionError(f"the operator {_OP_NAMES.get(type(node.op), '?')} is not allowed")
        if isinstance(node, ast.Constant):
            return self._constant(node)
        if isinstance(node, ast.Name):
            return self._name(node.id)
        if isinstance(node, ast.Call):
            return self._call(node, depth, top)
        if isinstance(node, (ast.List, ast.Tuple)):
            return self._matrix(node, depth)
        what = _AST_NAMES.get(type(node), type(node).__name__)
        if isinstance(node, ast.Attribute):
            what = f"attribute access ('.{node.attr}')"
        raise ExpressionError(f"{what} is not allowed in an expression")

    def _chain(self, node, ops, depth, label):
        """Operands of a left-associated chain a op b op c ..., collected without recursion."""
        items = []
        while isinstance(node, ast.BinOp) and type(node.op) in ops:
            items.append((label(type(node.op)), node.right))
            node = node.left
        items.append((label(ops[0]), node))
        items.reverse()
        return [(lab, self.walk(n, depth + 1)) for lab, n in items]

    def _constant(self, node: ast.Constant) -> sp.Rational:
        v = node.value
        if type(v) is int or type(v) is float:
            text = ast.get_source_segment(self.source, node) or repr(v)
            if type(v) is int:
                if v.bit_length() > int(MAX_LITERAL_DIGITS * 3.33) + 1:
                    raise ExpressionError(f"a number has too many digits (at most {MAX_LITERAL_DIGITS})")
                return sp.Integer(v)
            return self.b.number(text)
        if isinstance(v, complex):
            raise ExpressionError("complex numbers are not allowed")
        if isinstance(v, (str, bytes)):
            raise ExpressionError("strings are not allowed in an expression")
        raise ExpressionError(f"{v!r} is not allowed in an expression")

    def _call(self, node: ast.Call, depth: int, top: bool) -> Value:
        func = node.func
        if not isinstance(func, ast.Name):
            what = f"attribute access ('.{func.attr}')" if isinstance(func, ast.Attribute) else "calling this"
            raise ExpressionError(f"{what} is not allowed; functions: {', '.join(PLAIN_FUNCTIONS)}")
        name = func.id
        if name in PLAIN_BIG_OPERATORS:
            return self._big_operator(node, name, depth)
        if name == "Determinant":          # sympy's unevaluated det, as sympy prints it
            name = "det"
        if name == "Rational" and len(node.args) == 2 and not node.keywords:
            a, b = (self.walk(x, depth + 1) for x in node.args)
            if not (isinstance(a, sp.Expr) and isinstance(b, sp.Expr) and a.is_Rational and b.is_Rational):
                raise ExpressionError("Rational takes two numbers, e.g. Rational(1, 2)")
            return self.b.mul([("*", a), ("/", b)])
        if name not in PLAIN_FUNCTIONS and name != "Matrix":
            raise ExpressionError(f"the function {name!r} is not allowed; functions: {', '.join(PLAIN_FUNCTIONS)}")
        if node.keywords or len(node.args) != 1 or isinstance(node.args[0], ast.Starred):
            raise ExpressionError(f"{name} takes exactly one argument")
        if name == "Matrix":
            if not isinstance(node.args[0], (ast.List, ast.Tuple)):
                raise ExpressionError("Matrix takes a list of rows, e.g. Matrix([[a, b], [c, d]])")
            return self._matrix(node.args[0], depth)
        return self.b.function(name, self.walk(node.args[0], depth + 1))

    # --------------------------------------------------------------------- sums and products
    def _name(self, name: str) -> sp.Expr:
        """A name in the body of a sum: the index is its value, an index in a subscript is replaced
        (y_ij is y_12 at i = 1, j = 2), and m_j, n_j, m_2 are the size of group j or 2; else the symbol."""
        if name in self.bound:
            return sp.Integer(self.bound[name])
        if "_" in name and name not in self.b.names:
            base, _, sub = name.partition("_")
            if self.bound and any(c in self.bound for c in sub) and all(c.isdigit() or c in self.bound or c == "_"
                                                                       for c in sub):
                sub = "_".join(str(self.bound.get(c, c)) for c in sub if c != "_")
                name = f"{base}_{sub}"
            if base in ("m", "n") and sub.replace("_", "").isdigit() and self.b.sizes.get("m") and \
                    self.b.resolve(name) not in self.b.names:
                return sp.Integer(self._group_size(sub.replace("_", "")))
        return self.b.symbol(name)

    def _group_size(self, sub: str) -> int:
        return group_size(self.b, sub)

    def _limit(self, node: ast.AST) -> int:
        """A limit: a whole number, G or n (the design's groups and observations), m_j or n_j (the size of
        group j), an index being expanded, or a sum or difference of these (m_j - 1)."""
        if isinstance(node, ast.Constant) and type(node.value) is int:
            if node.value > 10**6:
                raise ExpressionError(f"the sums and products expand to more than {MAX_EXPANDED_TERMS} terms")
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -self._limit(node.operand)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub)):
            a, b = self._limit(node.left), self._limit(node.right)
            return a + b if isinstance(node.op, ast.Add) else a - b
        if isinstance(node, ast.Name):
            name = node.id
            if name in self.bound:
                return self.bound[name]
            key = {"J": "G", "N": "n"}.get(name, name)
            if key in ("G", "n") and key in self.b.sizes:
                return int(self.b.sizes[key])
            base, _, sub = name.partition("_")
            if base in ("m", "n") and sub and self.b.sizes.get("m"):
                sub = "".join(str(self.bound.get(c, c)) for c in sub if c != "_")
                if sub.isdigit():
                    return self._group_size(sub)
                raise ExpressionError(f"{name} in a limit: write the group index of a sum around it")
        raise ExpressionError("a limit of a sum must be a whole number, G (groups), n (observations) or m_j "
                              "(the size of group j)")

    def _big_operator(self, node: ast.Call, name: str, depth: int) -> Value:
        """Sum(body, (j, 1, G)) and Product(...), sympy's spelling; several limits as in sympy, the
        innermost first: Sum(body, (i, 1, m_j), (j, 1, G)). The body is read once for each value of the
        index; at most :data:`MAX_EXPANDED_TERMS` bodies and :data:`MAX_EXPANDED_TOKENS` nodes in all."""
        usage = f"{name}(body, (j, 1, G)), e.g. Sum(log(sigma**2 + m_j*sigma_s**2), (j, 1, G))"
        if node.keywords or len(node.args) < 2 or len(node.args) > 4:
            raise ExpressionError(f"{name} takes a body and its limits: {usage}")
        limits = []
        for lim in node.args[1:]:
            if not (isinstance(lim, ast.Tuple) and len(lim.elts) == 3 and isinstance(lim.elts[0], ast.Name)
                    and len(lim.elts[0].id) == 1):
                raise ExpressionError(f"the limits of {name} are (index, lower, upper) with a one-letter index: "
                                      f"{usage}")
            limits.append(lim)
        return self._expand(node.args[0], limits[::-1], PLAIN_BIG_OPERATORS[name], depth)

    def _expand(self, body: ast.AST, limits: list, kind: str, depth: int) -> Value:
        if not limits:
            return self.walk(body, depth + 1)
        index, lo, hi = limits[0].elts
        if index.id in self.bound:
            raise ExpressionError(f"the index {index.id} is already in use by an outer sum or product")
        lo, hi = self._limit(lo), self._limit(hi)
        count = max(0, hi - lo + 1)
        if self.expanded + count > MAX_EXPANDED_TERMS:
            raise ExpressionError(f"the sums and products expand to more than {MAX_EXPANDED_TERMS} terms")
        values = []
        try:
            for v in range(lo, hi + 1):
                self.bound[index.id] = v
                self.expanded += 1
                values.append(self._expand(body, limits[1:], kind, depth + 1))
        finally:
            self.bound.pop(index.id, None)
        if not values:                    # an empty sum is 0, an empty product 1
            return sp.Integer(0 if kind == "sum" else 1)
        if len(values) == 1:
            return values[0]
        return self.b.add([(1, v) for v in values]) if kind == "sum" else self.b.mul([("*", v) for v in values])

    def _matrix(self, node, depth: int) -> sp.Matrix:
        if not node.elts or not all(isinstance(r, (ast.List, ast.Tuple)) for r in node.elts):
            raise ExpressionError("a matrix is a list of rows, e.g. [[a, b], [c, d]]")
        if len(node.elts) > MAX_MATRIX_DIM:
            raise ExpressionError(f"the matrix is too large (at most {MAX_MATRIX_DIM}x{MAX_MATRIX_DIM})")
        rows = []
        for r in node.elts:
            if len(r.elts) > MAX_MATRIX_DIM:
                raise ExpressionError(f"the matrix is too large (at most {MAX_MATRIX_DIM}x{MAX_MATRIX_DIM})")
            if any(isinstance(e, (ast.List, ast.Tuple)) for e in r.elts):
                raise ExpressionError("a matrix entry must be a number or an expression, not a list")
            rows.append([self.walk(e, depth + 2) for e in r.elts])
        return self.b.matrix(rows)


# ------------------------------------------------------------------------------------ LaTeX syntax
_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<rowsep>\\\\)
  | (?P<begin>\\begin\s*\{\s*(?P<benv>[A-Za-z]+\*?)\s*\})
  | (?P<end>\\end\s*\{\s*(?P<eenv>[A-Za-z]+\*?)\s*\})
  | (?P<cmd>\\[A-Za-z]+)
  | (?P<space>\\[,;:!\ ])
  | (?P<brace>\\[{}|])
  | (?P<badcmd>\\.?)
  | (?P<num>\d+(?:\.\d+)?|\.\d+)
  | (?P<letter>[A-Za-z])
  | (?P<op>[-+*/^_&,|()\[\]{}.=])
""", re.VERBOSE | re.DOTALL)

_GREEK = {"alpha", "beta", "gamma", "delta", "epsilon", "varepsilon", "zeta", "eta", "theta", "iota",
          "kappa", "lambda", "mu", "nu", "xi", "rho", "sigma", "tau", "upsilon", "phi", "varphi", "chi", "psi",
          "omega"}
_GREEK_NAME = {"varepsilon": "epsilon", "varphi": "phi"}
_FUNCTIONS = {"log": "log", "ln": "ln", "exp": "exp", "det": "det"}
_MULOPS = {"cdot": "*", "times": "*", "div": "/"}
_FRACS = {"frac", "dfrac", "tfrac"}
_MATRIX_ENVS = {"matrix", "pmatrix", "bmatrix", "Bmatrix", "smallmatrix", "vmatrix"}
_CLOSER = {"(": ")", "[": "]", "{": "}", "\\{": "\\}", "|": "|", "\\|": "\\|", ".": None}
_SKIP_CMDS = {"quad", "qquad", "displaystyle", "big", "Big", "bigg", "Bigg", "bigl", "bigr", "Bigl", "Bigr",
              "biggl", "biggr", "Biggl", "Biggr", "bigm", "Bigm"}
_TEXT_CMDS = {"mathrm", "text", "textrm", "mathit", "rm", "mathsf", "textit"}


class _Tok:
    __slots__ = ("kind", "pos", "text")

    def __init__(self, kind: str, text: str, pos: int):
        self.kind, self.text, self.pos = kind, text, pos

    def show(self) -> str:
        return "end of the expression" if self.kind == "eof" else f"'{self.text}'"


def _tokenize(text: str) -> list[_Tok]:
    out = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise ExpressionError(f"character {text[pos]!r} is not allowed in LaTeX input")
        tok = m.group(0)
        if m.group("begin"):
            out.append(_Tok("begin", m.group("benv"), pos))
        elif m.group("end"):
            out.append(_Tok("end", m.group("eenv"), pos))
        elif m.group("cmd"):
            name = tok[1:]
            if name not in _SKIP_CMDS:
                out.append(_Tok("cmd", name, pos))
        elif m.group("badcmd"):
            raise ExpressionError(f"unknown LaTeX command {tok!r}")
        elif m.group("rowsep"):
            out.append(_Tok("rowsep", tok, pos))
        elif m.group("brace"):
            out.append(_Tok("op", tok, pos))
        elif m.group("num"):
            out.append(_Tok("num", tok, pos))
        elif m.group("letter"):
            out.append(_Tok("letter", tok, pos))
        elif m.group("op"):
            out.append(_Tok("op", tok, pos))
        pos = m.end()
    out.append(_Tok("eof", "", len(text)))
    return out


class _LatexParser:
    """Recursive descent over the token list; every recursion goes through ``self.enter``."""

    def __init__(self, text: str, builder: _Builder):
        text = text.strip()
        while len(text) >= 2 and text[0] == "$" and text[-1] == "$":
            text = text[1:-1].strip()
        self.toks = _tokenize(text)
        self.i = 0
        self.depth = 0
        self.b = builder
        self.bound: dict[str, int] = {}      # the indices of the sums and products being expanded
        self.expanded = 0                    # bodies read so far, all sums together
        self.used: set[str] = set()          # indices of sums already closed
        self.work = 0                        # tokens read in the bodies of sums and products

    # --------------------------------------------------------------------------------- helpers
    def peek(self) -> _Tok:
        return self.toks[self.i]

    def next(self) -> _Tok:
        t = self.toks[self.i]
        if t.kind != "eof":
            self.i += 1
        return t

    def is_op(self, text: str, t: _Tok | None = None) -> bool:
        t = t or self.peek()
        return t.kind == "op" and t.text == text

    def is_cmd(self, name, t: _Tok | None = None) -> bool:
        t = t or self.peek()
        return t.kind == "cmd" and (t.text == name if isinstance(name, str) else t.text in name)

    def expect_op(self, text: str) -> None:
        t = self.next()
        if not (t.kind == "op" and t.text == text):
            raise ExpressionError(f"expected {text!r} but found {t.show()}")

    def enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ExpressionError(f"the expression is nested too deeply (more than {MAX_DEPTH} levels)")

    def leave(self) -> None:
        self.depth -= 1

    # ---------------------------------------------------------------------------------- grammar
    def parse(self) -> Value:
        value = self.expr()
        t = self.peek()
        if t.kind == "rowsep":
            raise ExpressionError("'\\\\' is allowed only inside a matrix environment")
        if t.kind == "end":
            raise ExpressionError(f"unexpected \\end{{{t.text}}}")
        if t.kind != "eof":
            if t.kind == "cmd" and t.text not in _GREEK | _FUNCTIONS.keys() | _FRACS | {"sqrt", "pi", "left"}:
                raise ExpressionError(f"unknown or misplaced LaTeX command \\{t.text}")
            raise ExpressionError(f"unexpected {t.show()} in LaTeX input")
        return value

    def expr(self) -> Value:
        self.enter()
        terms = [(1, self.term())]
        while self.is_op("+") or self.is_op("-"):
            sign = 1 if self.next().text == "+" else -1
            terms.append((sign, self.term()))
        self.leave()
        return terms[0][1] if len(terms) == 1 and terms[0][0] == 1 else self.b.add(terms)

    def term(self) -> Value:
        factors = [("*", self.unary())]
        while True:
            t = self.peek()
            if t.kind == "op" and t.text in ("*", "/"):
                self.next()
                factors.append((t.text, self.unary()))
            elif t.kind == "cmd" and t.text in _MULOPS:
                self.next()
                factors.append((_MULOPS[t.text], self.unary()))
            elif self.starts_factor(t):
                if t.kind == "num":
                    raise ExpressionError(f"a number after a factor needs an explicit \\cdot (before {t.text})")
                factors.append(("*", self.power()))
            else:
                break
        return factors[0][1] if len(factors) == 1 else self.b.mul(factors)

    def starts_factor(self, t: _Tok) -> bool:
        if t.kind in ("num", "letter", "begin"):
            return True
        if t.kind == "op":
            return t.text in ("(", "[", "{", "\\{")
        if t.kind == "cmd":
            return t.text not in _MULOPS and t.text not in ("right", "end")
        return False

    def unary(self) -> Value:
        if self.is_op("-") or self.is_op("+"):
            sign = self.next().text
            self.enter()
            v = self.unary()
            self.leave()
            return self.b.neg(v) if sign == "-" else v
        return self.power()

    def power(self) -> Value:
        t = self.peek()
        if t.kind == "letter" or (t.kind == "cmd" and t.text in _GREEK):
            return self.identifier()
        base = self.atom()
        if self.is_op("^"):
            self.next()
            base = self.b.power(base, self.script())
            if self.is_op("^"):
                raise ExpressionError("double superscript: write x^{a b} or (x^a)^b")
        if self.is_op("_"):
            raise ExpressionError("a subscript is allowed only on a symbol name (e.g. y_{11}, \\sigma_s)")
        return base

    def identifier(self) -> Value:
        """A symbol with optional subscript and superscript in either order: \\sigma_s^2, y_{11}."""
        t = self.next()
        base = _GREEK_NAME.get(t.text, t.text) if t.kind == "cmd" else t.text
        sub = sup = None
        while self.is_op("_") or self.is_op("^"):
            which = self.next().text
            if which == "_":
                if sub is not None:
                    raise ExpressionError("double subscript")
                sub = self.subscript()
            else:
                if sup is not None:
                    raise ExpressionError("double superscript: write x^{a b} or (x^a)^b")
                sup = self.script()
        if sub is None and t.kind == "letter" and base in self.bound:
            value = sp.Integer(self.bound[base])
        elif sub is not None and t.kind == "letter" and base in ("m", "n") and sub.isdigit() and \
                f"{base}_{sub}" not in self.b.names and "m" in self.b.sizes:
            value = sp.Integer(self._group_size(sub))
        elif sub is None and t.kind == "letter" and base == "e":
            value = sp.E
        elif sub is None and t.kind == "letter" and self.b.size(base) is not None:
            value = self.b.size(base)
        else:
            name = self.b.resolve(base if sub is None else f"{base}_{sub}")
            if name not in self.b.names:
                if t.kind == "letter" and sub is None and sup is None:
                    self._spelled_word(t)
                shown = ("\\" + name) if t.kind == "cmd" else name
                if sub is not None and any(c in self.used for c in sub):
                    raise ExpressionError(f"{shown!r} stands outside the sum or product over its index: a sum's "
                                          "body is the product that follows it; put a longer body in parentheses, "
                                          "\\sum_{j=1}^{G} \\left( ... \\right)")
                raise ExpressionError(f"unknown symbol {shown!r}; known names: {self.b.known()}")
            value = self.b.symbol(name)
        return value if sup is None else self.b.power(value, sup)

    def _spelled_word(self, first: _Tok) -> None:
        """Plain names typed as LaTeX (sigma, log): say to write \\sigma, \\log instead."""
        word, j = first.text, self.i
        while self.toks[j].kind == "letter":
            word += self.toks[j].text
            j += 1
        if word in _GREEK or word in _FUNCTIONS or word in ("pi", "sqrt", "frac"):
            raise ExpressionError(f"in LaTeX every letter is a separate symbol: write \\{word}, not {word}")

    def subscript(self) -> str:
        t = self.next()
        if t.kind == "op" and t.text == "{":
            parts = []
            while not self.is_op("}"):
                u = self.next()
                if u.kind == "letter" and u.text in self.bound:
                    parts.append(f"_{self.bound[u.text]}_")
                elif u.kind in ("num", "letter"):
                    parts.append(u.text)
                elif u.kind == "cmd" and u.text in _TEXT_CMDS:   # \sigma_{\mathrm{s}}, \sigma_{\text{s}}
                    self.expect_op("{")
                    while not self.is_op("}"):
                        w = self.next()
                        if w.kind in ("num", "letter"):
                            parts.append(w.text)
                        elif not (w.kind == "op" and w.text in "()"):
                            raise ExpressionError(f"\\{u.text}{{...}} in a subscript may hold only letters and "
                                                  f"digits, not {w.show()}")
                    self.next()
                elif u.kind == "op" and u.text == ",":
                    parts.append("_")
                else:
                    raise ExpressionError(f"a subscript may hold only letters, digits and commas, not {u.show()}")
            self.next()
            if not parts:
                raise ExpressionError("empty subscript")
            return re.sub("_+", "_", "".join(parts)).strip("_")
        if t.kind == "letter":
            return str(self.bound[t.text]) if t.text in self.bound else t.text
        if t.kind == "num":
            if len(t.text) > 1:
                raise ExpressionError(f"ambiguous subscript _{t.text}: LaTeX sets only the first character "
                                      f"low; write _{{{t.text}}}")
            return t.text
        raise ExpressionError(f"a subscript must be a letter, a digit or {{...}}, not {t.show()}")

    def script(self) -> Value:
        """A superscript: {expr}, one digit, or one symbol."""
        t = self.peek()
        if self.is_op("{"):
            return self.group()
        if t.kind == "num":
            self.next()
            if len(t.text) > 1:
                raise ExpressionError(f"ambiguous superscript ^{t.text}: LaTeX raises only the first "
                                      f"character; write ^{{{t.text}}}")
            return self.b.number(t.text)
        if t.kind == "letter" or (t.kind == "cmd" and t.text in _GREEK):
            self.next()
            base = _GREEK_NAME.get(t.text, t.text)
            if t.kind == "letter" and base == "e":
                return sp.E
            return self.b.symbol(base)
        if self.is_cmd("pi"):
            self.next()
            return sp.pi
        raise ExpressionError(f"a superscript must be {{...}}, one digit or one symbol, not {t.show()}"
                              + (" (write ^{-1})" if self.is_op("-", t) else ""))

    def group(self) -> Value:
        """{ expr } (the braces are required)."""
        self.expect_op("{")
        v = self.expr()
        self.expect_op("}")
        return v

    def argument(self) -> Value:
        """The argument of \\frac or \\sqrt: {expr}, or one digit / symbol as LaTeX allows (\\frac12)."""
        t = self.peek()
        if self.is_op("{"):
            return self.group()
        if t.kind == "num":
            self.next()
            if len(t.text) > 1:  # \frac12: the first digit, the rest stays for the next argument
                if not t.text.isdigit():
                    raise ExpressionError(f"write braces around {t.text}: \\frac{{..}}{{..}}")
                self.i -= 1
                self.toks[self.i] = _Tok("num", t.text[1:], t.pos + 1)
                return self.b.number(t.text[0])
            return self.b.number(t.text)
        if t.kind == "letter" or (t.kind == "cmd" and t.text in _GREEK):
            tok = self.next()
            base = _GREEK_NAME.get(tok.text, tok.text)
            return sp.E if (tok.kind == "letter" and base == "e") else self.b.symbol(base)
        if self.is_cmd("pi"):
            self.next()
            return sp.pi
        raise ExpressionError(f"expected {{...}} but found {t.show()}")

    def atom(self) -> Value:
        t = self.next()
        if t.kind == "num":
            return self.b.number(t.text)
        if t.kind == "op":
            if t.text in ("(", "[", "\\{"):
                v = self.expr()
                self.expect_op(_CLOSER[t.text])
                return v
            if t.text == "{":
                v = self.expr()
                self.expect_op("}")
                return v
            if t.text == "|":
                v = self.expr()
                self.expect_op("|")
                return self.b.function("abs", v)
            raise ExpressionError(f"unexpected {t.show()} in LaTeX input")
        if t.kind == "begin":
            return self.matrix(t.text)
        if t.kind == "cmd":
            name = t.text
            if name == "pi":
                return sp.pi
            if name in ("sum", "prod"):
                return self.big_operator(name)
            if name in _FRACS:
                num = self.argument()
                den = self.argument()
                return self.b.mul([("*", num), ("/", den)])
            if name == "sqrt":
                index = None
                if self.is_op("["):
                    self.next()
                    index = self.expr()
                    self.expect_op("]")
                arg = self.argument()
                return self.b.function("sqrt", arg) if index is None else self.b.root(arg, index)
            if name == "operatorname":
                self.expect_op("{")
                word = ""
                while not self.is_op("}"):
                    w = self.next()
                    if w.kind != "letter" or len(word) > 20:
                        raise ExpressionError("\\operatorname{...} takes a function name, e.g. \\operatorname{log}")
                    word += w.text
                self.next()
                if word not in _FUNCTIONS:
                    raise ExpressionError(f"\\operatorname{{{word}}} is not allowed; functions: log, ln, exp")
                return self.function(_FUNCTIONS[word])
            if name in _FUNCTIONS:
                return self.function(_FUNCTIONS[name])
            if name == "left":
                return self.left()
            if name == "mathrm":
                self.expect_op("{")
                inner = self.next()
                self.expect_op("}")
                if inner.kind == "letter" and inner.text == "e":
                    return sp.E
                raise ExpressionError("only \\mathrm{e} is understood")
            if name in _MULOPS or name in ("right",):
                raise ExpressionError(f"unexpected \\{name}")
            raise ExpressionError(f"unknown LaTeX command \\{name}")
        if t.kind == "end":
            raise ExpressionError(f"unexpected \\end{{{t.text}}}")
        if t.kind == "rowsep":
            raise ExpressionError("'\\\\' is allowed only inside a matrix environment")
        raise ExpressionError(f"unexpected {t.show()} in LaTeX input")

    def _group_size(self, sub: str) -> int:
        return group_size(self.b, sub)

    def _limit(self) -> int:
        """A limit of a sum: a whole number, G or n (the design's groups and observations), m_j or n_j (the
        size of group j, j an index being expanded), or an index being expanded."""
        t = self.next()
        if t.kind == "op" and t.text == "{":
            value = self._limit()
            self.expect_op("}")
            return value
        if t.kind == "num":
            if not t.text.isdigit():
                raise ExpressionError(f"a limit of a sum must be a whole number, not {t.text}")
            if len(t.text) > 6:
                raise ExpressionError(f"the sums and products expand to more than {MAX_EXPANDED_TERMS} terms")
            return int(t.text)
        if t.kind == "letter":
            if t.text in self.bound:
                return self.bound[t.text]
            if self.is_op("_") and t.text in ("m", "n"):
                self.next()
                sub = self.subscript()
                if sub.isdigit() and "m" in self.b.sizes:
                    return self._group_size(sub)
                raise ExpressionError(f"{t.text}_{sub} in a limit: write the group index of a sum around it")
            key = {"J": "G", "N": "n"}.get(t.text, t.text)
            if key in self.b.sizes and not isinstance(self.b.sizes[key], (list, tuple)):
                return int(self.b.sizes[key])
        raise ExpressionError(f"a limit of a sum must be a number, G (groups), n (observations) or m_j (the size "
                              f"of group j), not {t.show()}")

    def big_operator(self, name: str) -> Value:
        """\\sum_{j=1}^{G} body and \\prod: the body (the product that follows) read once for each value of
        the index, with the index's value in subscripts (y_{ij}) and as a number; at most
        :data:`MAX_EXPANDED_TERMS` bodies in all."""
        if not self.is_op("_"):
            raise ExpressionError(f"\\{name} needs its limits, as in \\{name}_{{j=1}}^{{G}}")
        self.next()
        if not self.is_op("{"):
            raise ExpressionError(f"\\{name} needs its limits, as in \\{name}_{{j=1}}^{{G}}")
        self.next()
        idx = self.next()
        if idx.kind != "letter" or idx.text in self.bound:
            raise ExpressionError(f"the index of \\{name} must be a letter not already in use, e.g. j")
        self.expect_op("=")
        lo = self._limit()
        self.expect_op("}")
        if not self.is_op("^"):
            raise ExpressionError(f"\\{name} needs an upper limit, as in \\{name}_{{j=1}}^{{G}}")
        self.next()
        hi = self._limit()
        count = max(0, hi - lo + 1)
        if self.expanded + count > MAX_EXPANDED_TERMS:
            raise ExpressionError(f"the sums and products expand to more than {MAX_EXPANDED_TERMS} terms")
        self.enter()
        start, values = self.i, []
        try:
            for v in range(lo, hi + 1):
                self.i = start
                self.bound[idx.text] = v
                self.expanded += 1
                values.append(self.term())
                self.work += self.i - start
                if self.work > MAX_EXPANDED_TOKENS:
                    raise ExpressionError(f"the sums and products are too long to expand (more than "
                                          f"{MAX_EXPANDED_TOKENS:,} tokens read)")
            if not values:                    # an empty sum is 0, an empty product 1: skip its body
                self.bound[idx.text] = 0
                self.term()
        finally:
            self.bound.pop(idx.text, None)
            self.used.add(idx.text)
        self.leave()
        if not values:
            return sp.Integer(0 if name == "sum" else 1)
        if name == "sum":
            return values[0] if len(values) == 1 else self.b.add([(1, v) for v in values])
        return values[0] if len(values) == 1 else self.b.mul([("*", v) for v in values])

    def left(self) -> Value:
        d = self.next()
        if not (d.kind == "op" and d.text in ("(", "[", "\\{", "|", "\\|")):
            raise ExpressionError(f"\\left must be followed by ( [ \\{{ or |, not {d.show()}")
        v = self.expr()
        r = self.next()
        if not (r.kind == "cmd" and r.text == "right"):
            raise ExpressionError(f"expected \\right{_CLOSER[d.text]} but found {r.show()}")
        c = self.next()
        if not (c.kind == "op" and c.text == _CLOSER[d.text]):
            raise ExpressionError(f"\\left{d.text} must be closed by \\right{_CLOSER[d.text]}")
        return self.b.function("abs", v) if d.text in ("|", "\\|") else v

    def function(self, name: str) -> Value:
        if self.is_op("_"):
            raise ExpressionError(f"\\{name} with a base is not supported; divide by \\log b instead")
        if self.is_op("^"):
            raise ExpressionError(f"write (\\{name} x)^2 rather than \\{name}^2 x")
        t = self.peek()
        self.enter()
        if (t.kind == "op" and t.text in ("(", "[", "{", "\\{", "|")) or self.is_cmd("left") or t.kind == "begin":
            arg = self.atom()
        else:  # \log 2\pi\sigma^2: the implicit product that follows, up to the next operator or function
            if not self.starts_factor(t) or t.kind == "begin":
                raise ExpressionError(f"\\{name} needs an argument")
            factors = [("*", self.power())]
            while self.starts_factor(self.peek()) and not self.is_cmd(_FUNCTIONS.keys()) \
                    and self.peek().kind != "num":
                factors.append(("*", self.power()))
            arg = factors[0][1] if len(factors) == 1 else self.b.mul(factors)
        self.leave()
        return self.b.function(name, arg)

    def matrix(self, env: str) -> sp.Matrix:
        if env not in _MATRIX_ENVS:
            raise ExpressionError(f"the environment {env!r} is not allowed; use pmatrix, bmatrix, matrix (or vmatrix for a determinant)")
        self.enter()
        rows: list[list[Value]] = [[]]
        cells = 0
        while True:
            t = self.peek()
            if t.kind == "end":
                self.next()
                if t.text != env:
                    raise ExpressionError(f"\\begin{{{env}}} is closed by \\end{{{t.text}}}")
                break
            if t.kind == "eof":
                raise ExpressionError(f"\\begin{{{env}}} is not closed by \\end{{{env}}}")
            rows[-1].append(self.expr())
            cells += 1
            if cells > MAX_MATRIX_DIM * MAX_MATRIX_DIM:
                raise ExpressionError(f"the matrix is too large (at most {MAX_MATRIX_DIM}x{MAX_MATRIX_DIM})")
            t = self.peek()
            if t.kind == "op" and t.text == "&":
                self.next()
                if self.peek().kind in ("rowsep", "end"):
                    raise ExpressionError("empty matrix entry")
            elif t.kind == "rowsep":
                self.next()
                if self.peek().kind != "end":
                    rows.append([])
            elif t.kind == "eof":
                raise ExpressionError(f"\\begin{{{env}}} is not closed by \\end{{{env}}}")
            elif t.kind != "end":
                raise ExpressionError(f"unexpected {t.show()} in the matrix")
        self.leave()
        M = self.b.matrix(rows)
        return self.b.determinant(M) if env == "vmatrix" else M
