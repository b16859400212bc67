"""R's model formula language, for the specification stage: the formula as lme4 takes it, read by a
whitelist parser and evaluated without ``eval``.

``lmer`` reads ``y ~ x + (1|g)`` with R's ``model.frame`` and ``model.matrix``; this module does the same
steps for the fixed part and each random term's left-hand side:

* a lexer and a precedence parser for R's syntax (``^`` is a power inside ``I()`` and an interaction
  power outside it, ``%in%``, ``TRUE``/``FALSE``, dotted and Unicode names, backquoted names);
* R's term algebra (``+ - * / : ^ %in%``, ``0``/``1``/``-1``), terms ordered by degree as ``terms()`` does;
* the variables evaluated over the data by a small interpreter with a fixed set of functions (``I``,
  ``log``, ``exp``, ``sqrt``, ``factor``, ``scale``, ``poly``, ``offset`` ...), in float arithmetic, so
  no input can run code or cause unbounded work;
* R's coding of factors (treatment contrasts for unordered factors, ``contr.poly`` for ordered ones,
  indicator columns where the term's margin is absent: R's ``TermCode`` rule) and R's column names
  (``factor(Days)1``, ``temperature.L``, ``TreatB:x``, ``poly(x, 2)1``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .errors import DataError, FormulaError, shown

MAX_FORMULA_LENGTH = 2000
#: how deeply parentheses and operators may nest (R itself stops near 5000; a formula needs a few)
MAX_DEPTH = 100
#: how many terms the algebra may produce (``(a+b+c+d+e)^5`` has 31)
MAX_TERMS = 512
#: the largest polynomial degree poly() builds
MAX_DEGREE = 20


# ----------------------------------------------------------------------------------------- lexer
_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?L?)
  | (?P<name>(?:[^\W\d]|\.(?![\d]))[\w.]*)
  | (?P<quoted>`[^`]+`)
  | (?P<str>"[^"\\]*"|'[^'\\]*')
  | (?P<op>%in%|\*\*|\|\||==|!=|<=|>=|[~+\-*/^:|(),=<>])
""", re.VERBOSE)


#: R's reserved words and the statement words of other languages: not names in a formula (backquote a
#: column of that name, as R needs)
_RESERVED = frozenset({"if", "else", "repeat", "while", "function", "for", "next", "break", "NULL", "in",
                       "lambda", "import", "def", "return", "exec"})


@dataclass(frozen=True)
class Token:
    kind: str      # num, name, str, op, end
    text: str
    pos: int


def tokenize(text: str) -> list[Token]:
    """R's tokens; anything else (``$``, ``[``, ``;``, ``@``, ``{``, a backslash...) is refused."""
    if len(text) > MAX_FORMULA_LENGTH:
        raise FormulaError(f"formula longer than {MAX_FORMULA_LENGTH} characters")
    out, pos = [], 0
    while pos < len(text):
        mt = _TOKEN.match(text, pos)
        if mt is None:
            raise FormulaError(f"formula {text!r} contains a character formulas do not use: {text[pos]!r} "
                               f"(character {pos + 1})")
        kind = mt.lastgroup
        if kind == "name" and (mt.group().startswith("_") or mt.group() in _RESERVED):
            raise FormulaError(f"formula {text!r}: {mt.group()!r} is not allowed in a formula (write a column "
                               "name with unusual characters in backquotes, as in R)")
        if kind == "quoted":
            out.append(Token("name", mt.group()[1:-1], pos))
        elif kind == "op" and mt.group() == "**":     # R reads ** as ^
            out.append(Token("op", "^", pos))
        elif kind != "ws":
            out.append(Token(kind, mt.group(), pos))
        pos = mt.end()
    out.append(Token("end", "", len(text)))
    return out


# ---------------------------------------------------------------------------------------- parser
@dataclass(frozen=True)
class Node:
    """A parsed expression: ``kind`` is name, num, str, call, binary, unary or paren."""

    kind: str
    value: object = None                 # a name, a number, a string, an operator or a function name
    args: tuple = ()                     # operands, or a call's positional arguments
    kwargs: tuple = ()                   # a call's (name, Node) keyword arguments

    def __str__(self) -> str:
        return deparse(self)


#: binary operators: (left binding power, right binding power); R's precedence, ^ right-associative
_BINARY = {"~": (1, 2), "||": (3, 4), "|": (3, 4), "==": (5, 6), "!=": (5, 6), "<": (5, 6), ">": (5, 6),
           "<=": (5, 6), ">=": (5, 6), "+": (7, 8), "-": (7, 8), "*": (9, 10), "/": (9, 10),
           "%in%": (11, 12), ":": (13, 14), "^": (18, 17)}
_UNARY = {"-": 15, "+": 15, "~": 2}


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.tokens = tokenize(text)
        self.k = 0
        self.depth = 0

    def peek(self) -> Token:
        return self.tokens[self.k]

    def take(self) -> Token:
        tok = self.tokens[self.k]
        self.k += 1
        return tok

    def expect(self, text: str) -> None:
        tok = self.take()
        if tok.text != text or tok.kind not in ("op",):
            raise FormulaError(f"malformed formula {self.text!r}: expected {text!r} at character {tok.pos + 1}")

    def expression(self, min_bp: int = 0) -> Node:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise FormulaError(f"formula {self.text[:60]!r}...: nested more than {MAX_DEPTH} levels deep")
        tok = self.take()
        if tok.kind == "num":
            text = tok.text.rstrip("L")
            left = Node("num", float(text))
        elif tok.kind == "str":
            left = Node("str", tok.text[1:-1])
        elif tok.kind == "name":
            if self.peek().text == "(" and self.peek().kind == "op":
                left = self.call(tok.text)
            else:
                left = Node("name", tok.text)
        elif tok.kind == "op" and tok.text == "(":
            left = Node("paren", args=(self.expression(),))
            self.expect(")")
        elif tok.kind == "op" and tok.text in _UNARY:
            left = Node("unary", tok.text, (self.expression(_UNARY[tok.text]),))
        else:
            where = f"character {tok.pos + 1}" if tok.kind != "end" else "the end"
            raise FormulaError(f"malformed formula {self.text!r}: unexpected {tok.text or 'end'!r} at {where}")
        while True:
            tok = self.peek()
            if tok.kind != "op" or tok.text not in _BINARY:
                break
            lbp, rbp = _BINARY[tok.text]
            if lbp < min_bp:
                break
            self.take()
            left = Node("binary", tok.text, (left, self.expression(rbp)))
        self.depth -= 1
        return left

    def call(self, name: str) -> Node:
        self.expect("(")
        args, kwargs = [], []
        if self.peek().text != ")":
            while True:
                tok = self.peek()
                if tok.kind == "name" and self.tokens[self.k + 1].text == "=" and self.tokens[self.k + 1].kind == "op":
                    self.k += 2
                    kwargs.append((tok.text, self.expression(3)))
                else:
                    if kwargs:
                        raise FormulaError(f"formula {self.text!r}: a positional argument of {name}() after "
                                           "a named one")
                    args.append(self.expression(3))
                if self.peek().text == ",":
                    self.take()
                    continue
                break
        self.expect(")")
        return Node("call", name, tuple(args), tuple(kwargs))


def _check_structure(text: str, tokens: list[Token]) -> None:
    """The mistakes people make, named before the parser's generic 'unexpected token'."""
    depth = 0
    for tok in tokens:
        if tok.kind == "op" and tok.text in "()":
            depth += 1 if tok.text == "(" else -1
            if depth < 0:
                raise FormulaError(f"unbalanced parentheses in formula {text!r}: the ')' at character "
                                   f"{tok.pos + 1} closes nothing; remove it or add the missing '('")
    if depth:
        raise FormulaError(f"unbalanced parentheses in formula {text!r}: {depth} '(' never closed; add the "
                           "missing ')'")
    for a, b in zip(tokens, tokens[1:]):
        pair = (a.text if a.kind == "op" else a.kind, b.text if b.kind == "op" else b.kind)
        if pair[0] == "(" and pair[1] in ("|", "||") or pair[0] in ("|", "||") and pair[1] == ")":
            raise FormulaError(f"random-effect term in {text!r} needs an expression and a grouping factor, as "
                               "in (1|group)")
        if pair[0] in ("/", ":") and pair[1] == ")":
            raise FormulaError(f"malformed grouping factor in {text!r}: use a column name, a/b for nesting or "
                               "a:b for an interaction")
        if a.kind == "op" and a.text in _BINARY and a.text not in ("~",) and pair[1] in (")", "end", "+", "|", "~"):
            raise FormulaError(f"malformed formula {text!r}: an empty term around '{a.text}' (character "
                               f"{a.pos + 1})")


def parse(text: str, formula: bool = False) -> Node:
    """The whole formula (or an expression) as a tree; FormulaError for anything R would not read."""
    if not isinstance(text, str) or not text.strip():
        raise FormulaError("the formula is empty; write one like 'Resp ~ Treat + (1|Ind)'")
    parser = _Parser(text)
    if formula:
        tildes = sum(t.kind == "op" and t.text == "~" for t in parser.tokens)
        if tildes != 1 or parser.tokens[0].text == "~":
            raise FormulaError(f"malformed formula {text!r}: write it as 'response ~ terms', e.g. "
                               "'Resp ~ Treat + (1|Ind)'")
        _check_structure(text, parser.tokens)
    node = parser.expression()
    tok = parser.peek()
    if tok.kind != "end":
        raise FormulaError(f"malformed formula {text!r}: unexpected {tok.text!r} at character {tok.pos + 1}")
    return node


# --------------------------------------------------------------------------------------- deparse
_SPACED = {"+", "-", "*", "==", "!=", "<", ">", "<=", ">=", "%in%", "|", "||", "~"}


def _number_text(v: float) -> str:
    if float(v).is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(float(v))


def deparse(node: Node) -> str:
    """The expression as R's deparse() writes it (spaces around + - * and comparisons, none around
    / ^ :, ``name = value`` arguments): the text R uses for variable and column names."""
    if node.kind == "name":
        return str(node.value)
    if node.kind == "num":
        return _number_text(node.value)
    if node.kind == "str":
        return f'"{node.value}"'
    if node.kind == "paren":
        return f"({deparse(node.args[0])})"
    if node.kind == "unary":
        return f"{node.value}{deparse(node.args[0])}"
    if node.kind == "binary":
        op = node.value
        sep = f" {op} " if op in _SPACED else op
        return f"{deparse(node.args[0])}{sep}{deparse(node.args[1])}"
    parts = [deparse(a) for a in node.args] + [f"{k} = {deparse(v)}" for k, v in node.kwargs]
    return f"{node.value}({', '.join(parts)})"


def names_in(node: Node) -> set[str]:
    """Every name the expression mentions (columns, or constants like TRUE)."""
    if node.kind == "name":
        return {str(node.value)}
    out: set[str] = set()
    for a in node.args:
        out |= names_in(a)
    for _, v in node.kwargs:
        out |= names_in(v)
    return out


# ------------------------------------------------------------------------------------ the formula
@dataclass(frozen=True)
class RandomPart:
    """One ``(expr | group)`` as written: its left-hand side, the grouping expression and the bar."""

    expr: Node
    group: Node
    correlated: bool


@dataclass(frozen=True)
class Formula:
    """``response ~ fixed + (expr | group) + ...`` split into its parts (R's ``lme4::findbars`` /
    ``nobars``): the response expression, the fixed part's terms and offsets, and the random parts."""

    text: str
    response: Node
    fixed: "Terms"
    random: tuple[RandomPart, ...]


def split_formula(text: str) -> Formula:
    tree = parse(text, formula=True)
    if tree.kind != "binary" or tree.value != "~":
        raise FormulaError(f"malformed formula {text!r}: write it as 'response ~ terms', e.g. "
                           "'Resp ~ Treat + (1|Ind)'")
    lhs, rhs = tree.args
    if _contains(lhs, {"~", "|", "||"}):
        raise FormulaError(f"malformed formula {text!r}: the response must be a variable or a "
                           "transformation of one")
    randoms: list[RandomPart] = []
    fixed = _strip_bars(rhs, randoms, text)
    if fixed is None:
        fixed = Node("num", 1.0)
    return Formula(text=text, response=lhs, fixed=expand_terms(fixed, text), random=tuple(randoms))


def _contains(node: Node, ops: set[str]) -> bool:
    if node.kind == "binary" and node.value in ops:
        return True
    if node.kind == "unary" and node.value in ops:
        return True
    return any(_contains(a, ops) for a in node.args) or any(_contains(v, ops) for _, v in node.kwargs)


def _strip_bars(node: Node, randoms: list, text: str) -> Node | None:
    """Remove the ``(expr|group)`` terms from a sum, collecting them; what stays is the fixed part."""
    if node.kind == "paren" and node.args[0].kind == "binary" and node.args[0].value in ("|", "||"):
        expr, group = node.args[0].args
        if _contains(group, {"|", "||", "~"}) or _contains(expr, {"|", "||", "~"}):
            raise FormulaError(f"random-effect term {deparse(node)!r} in {text!r} has more than one bar")
        randoms.append(RandomPart(expr=expr, group=group, correlated=node.args[0].value == "|"))
        return None
    if node.kind == "binary" and node.value == "+":
        left = _strip_bars(node.args[0], randoms, text)
        right = _strip_bars(node.args[1], randoms, text)
        if left is None or right is None:
            return left if right is None else right
        return Node("binary", "+", (left, right))
    if _contains(node, {"|", "||"}):
        raise FormulaError(f"malformed formula {text!r}: put random-effect terms in parentheses and join "
                           "them with '+', as in 'y ~ x + (1|group)'")
    if _contains(node, {"~"}):
        raise FormulaError(f"malformed formula {text!r}: more than one '~'")
    return node


# ------------------------------------------------------------------------------- the term algebra
@dataclass(frozen=True)
class Terms:
    """R's ``terms()``: the variables in order of appearance, the terms (tuples of variable indices, in
    order of degree), whether there is an intercept, and the offsets."""

    variables: tuple[Node, ...]
    terms: tuple[tuple[int, ...], ...]
    intercept: bool
    offsets: tuple[Node, ...] = ()

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(":".join(deparse(self.variables[i]) for i in t) for t in self.terms)


def expand_terms(node: Node, text: str, intercept: bool = True) -> Terms:
    """Expand R's formula operators into terms, as ``terms.formula`` does."""
    variables: list[str] = []
    nodes: dict[str, Node] = {}
    offsets: list[Node] = []
    state = {"intercept": intercept}

    def var(n: Node) -> list[frozenset]:
        key = deparse(n)
        if key not in nodes:
            nodes[key] = n
            variables.append(key)
        return [frozenset([key])]

    def product(a: list[frozenset], b: list[frozenset]) -> list[frozenset]:
        out = _unique([x | y for x in a for y in b])
        if len(out) > MAX_TERMS:
            raise FormulaError(f"the formula {text!r} expands to more than {MAX_TERMS} terms")
        return out

    def walk(n: Node) -> list[frozenset]:
        if n.kind == "paren":
            return walk(n.args[0])
        if n.kind == "num":
            if n.value == 1:
                state["intercept"] = True
                return []
            if n.value == 0:
                state["intercept"] = False
                return []
            raise FormulaError(f"formula {text!r}: the number {_number_text(n.value)} is not a term "
                               "(only 0, 1 and -1 stand alone)")
        if n.kind == "unary" and n.value == "-":
            inner = n.args[0]
            if inner.kind == "num" and inner.value in (0, 1):
                state["intercept"] = inner.value == 0
                return []
            raise FormulaError(f"formula {text!r}: '-' removes a term only from a sum, as in 'y ~ a*b - a:b'")
        if n.kind == "unary" and n.value == "+":
            return walk(n.args[0])
        if n.kind == "binary":
            op, (a, b) = n.value, n.args
            if op == "+":
                return _unique(walk(a) + walk(b))
            if op == "-":
                keep = walk(a)
                if b.kind == "num" and b.value in (0, 1):
                    state["intercept"] = b.value == 0
                    return keep
                saved = dict(state)
                drop = set(walk(b))
                state.update(saved)
                return [t for t in keep if t not in drop]
            if op == "*":
                ta, tb = walk(a), walk(b)
                return _unique(ta + tb + product(ta, tb))
            if op == ":":
                return product(walk(a), walk(b))
            if op == "%in%":
                inner = walk(a)
                return product(inner, [frozenset().union(*walk(b))])
            if op == "/":
                ta = walk(a)
                outer = frozenset().union(*ta) if ta else frozenset()
                return _unique(ta + product(walk(b), [outer]))
            if op == "^":
                if b.kind != "num" or not float(b.value).is_integer() or b.value < 1:
                    raise FormulaError(f"formula {text!r}: the power in {deparse(n)!r} must be a whole number")
                base = walk(a)
                out = list(base)
                for _ in range(int(min(b.value, len(base))) - 1):
                    out = _unique(out + product(out, base))
                return out
            if op in ("==", "!=", "<", ">", "<=", ">="):
                return var(n)
            raise FormulaError(f"formula {text!r}: {op!r} cannot stand here")
        if n.kind == "call" and n.value == "offset":
            if len(n.args) != 1 or n.kwargs:
                raise FormulaError(f"formula {text!r}: offset() takes one argument")
            offsets.append(n.args[0])
            return []
        if n.kind == "str":
            raise FormulaError(f"formula {text!r}: the string {deparse(n)} is not a term")
        return var(n)

    terms = walk(node)
    index = {k: i for i, k in enumerate(variables)}
    ordered = sorted(terms, key=len)                      # by degree, stable (terms.formula)
    as_idx = tuple(tuple(sorted(index[v] for v in t)) for t in ordered)
    return Terms(variables=tuple(nodes[k] for k in variables), terms=as_idx, intercept=state["intercept"],
                 offsets=tuple(offsets))


def _unique(items: list) -> list:
    return list(dict.fromkeys(items))


# -------------------------------------------------------------------------------- the interpreter
@dataclass(frozen=True)
class Factor:
    """A categorical variable: integer codes (-1 for missing) into ``levels``; ``ordered`` for R's
    ordered factors (coded by polynomial contrasts)."""

    codes: np.ndarray
    levels: tuple[str, ...]
    ordered: bool = False

    def take(self, rows: np.ndarray) -> "Factor":
        """The rows kept, with the levels no row uses dropped (lmer's drop.unused.levels)."""
        codes = self.codes[rows]
        used = np.zeros(len(self.levels), dtype=bool)
        used[codes[codes >= 0]] = True
        new = np.cumsum(used) - 1
        return Factor(np.where(codes >= 0, new[np.maximum(codes, 0)], -1),
                      tuple(l for l, u in zip(self.levels, used) if u), self.ordered)


@dataclass(frozen=True)
class Numeric:
    """A numeric variable: an (n, k) matrix with its column suffixes (``("",)`` for a plain vector)."""

    values: np.ndarray
    suffixes: tuple[str, ...] = ("",)


_CONSTANTS = {"TRUE": True, "FALSE": False, "T": True, "F": False, "pi": np.pi}

_UFUNCS = {"log2": np.log2, "log10": np.log10, "log1p": np.log1p, "exp": np.exp, "expm1": np.expm1,
           "sqrt": np.sqrt, "abs": np.abs, "sin": np.sin, "cos": np.cos, "tan": np.tan, "floor": np.floor,
           "ceiling": np.ceil, "round": np.round, "sign": np.sign}

#: every function a formula may call
FUNCTIONS = frozenset(_UFUNCS) | {"I", "log", "factor", "as.factor", "ordered", "as.ordered", "as.numeric",
                                  "as.double", "as.integer", "scale", "poly", "offset", "C"}


class Frame:
    """Evaluates formula expressions over a DataFrame (R's ``model.frame``), each variable once."""

    def __init__(self, data: pd.DataFrame, text: str, parameters: dict | None = None):
        self.data = data
        self.text = text
        self.n = len(data)
        self.columns = {str(c): c for c in data.columns}
        #: the data-dependent parameters of scale() and poly() by their expression's text (R's predvars):
        #: computed and kept here on the fit's data, taken as given when new data are evaluated
        self.given = parameters is not None
        self.parameters = dict(parameters) if parameters is not None else {}

    # the result of an expression: a float array (n,), a bool array (n,), a Factor, a Numeric or a scalar
    def evaluate(self, node: Node):
        kind = node.kind
        if kind == "num":
            return float(node.value)
        if kind == "str":
            raise FormulaError(f"formula {self.text!r}: the string {deparse(node)} may only be a function "
                               "argument")
        if kind == "name":
            return self._column(str(node.value))
        if kind == "paren":
            return self.evaluate(node.args[0])
        if kind == "unary":
            x = self._number(self.evaluate(node.args[0]), node)
            return -x if node.value == "-" else x
        if kind == "binary":
            return self._binary(node)
        return self._call(node)

    def _column(self, name: str):
        if name in self.columns:
            return self._from_series(self.data[self.columns[name]], name)
        if name in _CONSTANTS:
            return _CONSTANTS[name]
        if "__" in name:
            raise FormulaError(f"formula {self.text!r}: {name!r} is not allowed in a formula")
        raise DataError(f"unknown column {name!r} in formula; the data has columns "
                        f"{', '.join(sorted(self.columns))}")

    def _from_series(self, col: pd.Series, name: str):
        if isinstance(col.dtype, pd.CategoricalDtype):
            return Factor(col.cat.codes.to_numpy().astype(np.int64), tuple(str(c) for c in col.cat.categories),
                          bool(col.cat.ordered))
        if pd.api.types.is_bool_dtype(col):
            return col.to_numpy(dtype=bool)
        if pd.api.types.is_numeric_dtype(col):
            if pd.api.types.is_complex_dtype(col):
                raise DataError(f"column {name!r} holds complex numbers; a model needs real numbers")
            return col.to_numpy(dtype=float, na_value=np.nan)
        return _factor_of_values(col)

    def _number(self, x, node: Node) -> np.ndarray | float:
        if isinstance(x, Factor):
            raise FormulaError(f"formula {self.text!r}: {deparse(node)!r} does arithmetic on a factor")
        if isinstance(x, Numeric):
            if x.values.shape[1] != 1:
                raise FormulaError(f"formula {self.text!r}: {deparse(node)!r} does arithmetic on a matrix")
            return x.values[:, 0]
        if isinstance(x, np.ndarray) and x.dtype == bool:
            return x.astype(float)
        if isinstance(x, bool):
            return float(x)
        return x

    def _binary(self, node: Node):
        op = node.value
        if op in ("+", "-", "*", "/", "^"):
            a = self._number(self.evaluate(node.args[0]), node)
            b = self._number(self.evaluate(node.args[1]), node)
            if op == "^" and np.ndim(a) == 0 and np.ndim(b) == 0:
                raise FormulaError(f"formula {self.text!r}: a power of constants ({deparse(node)}) is not "
                                   "evaluated; write its value, or raise a column to a power")
            with np.errstate(all="ignore"):
                if op == "+":
                    return a + b
                if op == "-":
                    return a - b
                if op == "*":
                    return a * b
                if op == "/":
                    return np.true_divide(a, b)
                return np.power(np.asarray(a, dtype=float), b)
        if op in ("==", "!=", "<", ">", "<=", ">="):
            a = self._number(self.evaluate(node.args[0]), node)
            b = self._number(self.evaluate(node.args[1]), node)
            fn = {"==": np.equal, "!=": np.not_equal, "<": np.less, ">": np.greater, "<=": np.less_equal,
                  ">=": np.greater_equal}[op]
            out = fn(a, b)
            return np.broadcast_to(out, (self.n,)).copy() if np.ndim(out) == 0 else out
        raise FormulaError(f"formula {self.text!r}: {op!r} is a formula operator; inside a function write "
                           f"arithmetic (for {deparse(node)!r} as a product use I(a * b))")

    def _args(self, node: Node, names: tuple[str, ...], required: int = 1) -> dict:
        """A call's arguments matched to ``names`` by position and name, as R matches them."""
        fn = node.value
        if len(node.args) > len(names):
            raise FormulaError(f"formula {self.text!r}: {fn}() takes at most {len(names)} arguments")
        out = dict(zip(names, node.args))
        for k, v in node.kwargs:
            match = [n for n in names if n == k] or [n for n in names if n.startswith(k)]
            if len(match) != 1 or match[0] in out:
                raise FormulaError(f"formula {self.text!r}: {fn}() has no argument {k!r} (it takes "
                                   f"{', '.join(names)})")
            out[match[0]] = v
        missing = [n for n in names[:required] if n not in out]
        if missing:
            raise FormulaError(f"formula {self.text!r}: {fn}() needs the argument {missing[0]!r}")
        return out

    def _constant(self, node: Node | None, default, what: str):
        if node is None:
            return default
        v = self.evaluate(node)
        if isinstance(v, (bool, float, int)) and not isinstance(v, np.ndarray):
            return v
        raise FormulaError(f"formula {self.text!r}: {what} must be a constant")

    def _call(self, node: Node):
        fn = node.value
        if fn not in FUNCTIONS:
            raise FormulaError(f"formula {self.text!r}: the function {fn}() is not available in formulas "
                               f"(available: {', '.join(sorted(FUNCTIONS))})")
        if fn == "offset":
            raise FormulaError(f"formula {self.text!r}: offset() stands alone as a term, as in 'y ~ x + "
                               "offset(z)'")
        if fn in _UFUNCS:
            x = self._number(self.evaluate(self._args(node, ("x",))["x"]), node)
            with np.errstate(all="ignore"):
                return _UFUNCS[fn](x)
        if fn == "log":
            a = self._args(node, ("x", "base"))
            x = self._number(self.evaluate(a["x"]), node)
            base = self._constant(a.get("base"), None, "log()'s base")
            with np.errstate(all="ignore"):
                return np.log(x) if base is None else np.log(x) / np.log(float(base))
        if fn == "I":
            return self.evaluate(self._args(node, ("x",))["x"])
        if fn in ("as.numeric", "as.double", "as.integer"):
            x = self.evaluate(self._args(node, ("x",))["x"])
            if isinstance(x, Factor):   # R: the codes 1..K
                return np.where(x.codes >= 0, x.codes + 1.0, np.nan)
            x = self._number(x, node)
            return np.trunc(x) if fn == "as.integer" else x
        if fn in ("factor", "as.factor", "ordered", "as.ordered", "C"):
            a = self._args(node, ("x",) if fn != "C" else ("x", "contr"))
            x = self.evaluate(a["x"])
            f = x if isinstance(x, Factor) else _factor_of_values(pd.Series(self._vector(x, node)))
            ordered = fn in ("ordered", "as.ordered") or (fn in ("as.factor", "factor") and f.ordered)
            if fn == "C" and "contr" in a:
                contr = deparse(a["contr"]).strip('"')
                if contr not in ("contr.treatment", "treatment", "contr.poly", "poly"):
                    raise FormulaError(f"cannot build the term {deparse(node)!r}: C()'s contrasts argument must "
                                       "be contr.treatment or contr.poly")
                ordered = contr.endswith("poly")
            return Factor(f.codes, f.levels, ordered)
        if fn == "scale":
            a = self._args(node, ("x", "center", "scale"))
            x = self._number(self.evaluate(a["x"]), node)
            center = self._constant(a.get("center"), True, "scale()'s center")
            scale = self._constant(a.get("scale"), True, "scale()'s scale")
            key = deparse(node)
            if not self.given or key not in self.parameters:
                self.parameters[key] = scale_parameters(np.asarray(x, dtype=float), center, scale)
            c, s = self.parameters[key]
            return Numeric(((np.asarray(x, dtype=float) - c) / s)[:, None])
        if fn == "poly":
            a = self._args(node, ("x", "degree", "coefs", "raw"))
            if "coefs" in a:
                raise FormulaError(f"formula {self.text!r}: poly()'s coefs are computed from the data")
            x = np.asarray(self._number(self.evaluate(a["x"]), node), dtype=float)
            degree = self._constant(a.get("degree"), 1.0, "poly()'s degree")
            raw = bool(self._constant(a.get("raw"), False, "poly()'s raw"))
            names = tuple(str(k) for k in range(1, int(degree) + 1))
            key = deparse(node)
            if raw or not (self.given and key in self.parameters):
                P = _poly(x, degree, raw, key)
                if not raw and not self.given:
                    self.parameters[key] = poly_coefs(x, int(degree))
                return Numeric(P, names)
            return Numeric(poly_predict(x, *self.parameters[key]), names)
        raise AssertionError(fn)

    def _vector(self, x, node: Node) -> np.ndarray:
        if isinstance(x, Numeric):
            return self._number(x, node)
        if np.ndim(x) == 0:
            return np.full(self.n, x)
        return x


def _factor_of_values(col: pd.Series) -> Factor:
    """R's factor(): the distinct values sorted (numbers numerically, text as text), missing as -1."""
    values = pd.Series(col).reset_index(drop=True)
    missing = values.isna().to_numpy()
    present = values[~missing]
    try:
        uniques = np.unique(present.to_numpy())
    except TypeError:
        uniques = np.array(sorted(pd.unique(present), key=str), dtype=object)
    codes = np.full(len(values), -1, dtype=np.int64)
    if len(present):
        lookup = pd.Index(uniques)
        codes[~missing] = lookup.get_indexer(present.to_numpy())
    return Factor(codes, tuple(_level_text(u) for u in uniques))


def _level_text(v) -> str:
    """A level's label as R prints it: 1 not 1.0, TRUE/FALSE for booleans."""
    if isinstance(v, (bool, np.bool_)):
        return "TRUE" if v else "FALSE"
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    return str(v)


def scale_parameters(x: np.ndarray, center, scale) -> tuple[float, float]:
    """The centre and divisor R's scale(x, center, scale) uses (its "scaled:center", "scaled:scale"):
    scale(x) = (x - c) / s, kept so new data are scaled by the fit's c and s (R's makepredictcall)."""
    ok = ~np.isnan(x)
    c = float(np.mean(x[ok])) if center is True else (0.0 if center is False else float(center))
    if scale is True:
        k = max(int(ok.sum()) - 1, 1)
        s = float(np.sqrt(np.sum((x[ok] - c) ** 2) / k))
        if s == 0:
            raise DataError("scale() of a constant column divides by zero")
    else:
        s = 1.0 if scale is False else float(scale)
    return c, s


def poly_coefs(x: np.ndarray, degree: int) -> tuple[np.ndarray, np.ndarray]:
    """R's poly(x, degree)'s coefs (alpha, norm2): the three-term recurrence of the polynomials
    orthogonal over the fit's x, P_0 = 1, P_1 = x - alpha_1,
    P_(k+1) = (x - alpha_(k+1)) P_k - (norm2_(k+1) / norm2_k) P_(k-1), each column divided by sqrt(norm2)."""
    xbar = float(np.mean(x))
    xc = x - xbar
    Q, R = np.linalg.qr(np.vander(xc, degree + 1, increasing=True))
    Z = Q * np.diag(R)
    norm2 = (Z ** 2).sum(axis=0)
    alpha = ((xc[:, None] * Z ** 2).sum(axis=0) / norm2 + xbar)[:degree]
    return alpha, np.concatenate([[1.0], norm2])


def poly_predict(x: np.ndarray, alpha: np.ndarray, norm2: np.ndarray) -> np.ndarray:
    """poly(x, coefs = list(alpha, norm2)) on new x, as R's predict.poly evaluates it."""
    degree = len(alpha)
    Z = np.ones((len(x), degree + 1))
    Z[:, 1] = x - alpha[0]
    for i in range(1, degree):
        Z[:, i + 1] = (x - alpha[i]) * Z[:, i] - (norm2[i + 1] / norm2[i]) * Z[:, i - 1]
    return Z[:, 1:] / np.sqrt(norm2[2:])


def _scale(x: np.ndarray, center, scale) -> np.ndarray:
    """R's scale(): centre by the mean (or a given number), divide by the SD (n - 1) or the root mean square."""
    ok = ~np.isnan(x)
    out = x.copy()
    if center is True:
        out = out - np.mean(x[ok])
    elif center is not False:
        out = out - float(center)
    if scale is True:
        k = max(int(ok.sum()) - 1, 1)
        s = np.sqrt(np.sum(out[ok] ** 2) / k)
        if s == 0:
            raise DataError("scale() of a constant column divides by zero")
        out = out / s
    elif scale is not False:
        out = out / float(scale)
    return out


def orthogonal_polynomial(x: np.ndarray, degree: int) -> np.ndarray:
    """R's poly(x, degree): the powers 0..degree of the centred x orthogonalised by QR in order
    (Z = Q diag(R), so no sign is arbitrary), each column scaled to unit length, the constant dropped."""
    xc = x - x.mean()
    V = np.vander(xc, degree + 1, increasing=True)
    Q, R = np.linalg.qr(V)
    Z = Q * np.diag(R)
    return Z[:, 1:] / np.sqrt((Z[:, 1:] ** 2).sum(axis=0))


def _poly(x: np.ndarray, degree, raw: bool, what: str) -> np.ndarray:
    if not float(degree).is_integer() or not 1 <= degree <= MAX_DEGREE:
        raise FormulaError(f"{what}: the degree must be a whole number from 1 to {MAX_DEGREE}")
    degree = int(degree)
    if np.isnan(x).any():
        raise DataError(f"{what}: missing values are not allowed in poly() (as in R); drop those rows first")
    distinct = len(np.unique(x))
    if not raw and degree >= distinct:
        raise FormulaError(f"{what}: 'degree' must be less than number of unique points ({distinct})")
    if raw:
        return np.vander(x, degree + 1, increasing=True)[:, 1:]
    return orthogonal_polynomial(x, degree)


def contr_poly(k: int) -> np.ndarray:
    """R's contr.poly(k): orthonormal polynomial contrasts over the scores 1..k."""
    return orthogonal_polynomial(np.arange(1.0, k + 1), k - 1)


def contr_poly_names(k: int) -> list[str]:
    """.L, .Q, .C, ^4, ^5, ... as R names the polynomial contrasts."""
    return [".L", ".Q", ".C"][: k - 1] + [f"^{d}" for d in range(4, k)]


# -------------------------------------------------------------------------------- the model matrix
@dataclass(frozen=True)
class Evaluated:
    """The variables of one Terms evaluated over the rows of a frame."""

    terms: Terms
    values: tuple                  # Factor or Numeric, one per variable
    n: int                         # rows
    offset: np.ndarray | None = field(default=None, repr=False)


def evaluate_terms(terms: Terms, frame: Frame) -> Evaluated:
    values = []
    for node in terms.variables:
        v = frame.evaluate(node)
        if isinstance(v, np.ndarray) and v.dtype == bool:      # R codes a logical as a factor
            v = Factor(v.astype(np.int64), ("FALSE", "TRUE"))
        elif isinstance(v, (bool, float, int)):
            raise FormulaError(f"formula {frame.text!r}: the term {deparse(node)!r} is a constant; "
                               "use 1 for the intercept")
        elif isinstance(v, np.ndarray):
            v = Numeric(np.asarray(v, dtype=float)[:, None])
        values.append(v)
    offset = None
    for node in terms.offsets:
        v = frame._number(frame.evaluate(node), node)
        v = np.broadcast_to(np.asarray(v, dtype=float), (frame.n,))
        offset = v.copy() if offset is None else offset + v
    return Evaluated(terms=terms, values=tuple(values), n=frame.n, offset=offset)


def missing_rows(ev: Evaluated) -> np.ndarray:
    """Rows where any variable (or the offset) is missing or NaN: model.frame's na.omit."""
    bad = np.zeros(ev.n, dtype=bool)
    for v in ev.values:
        bad |= (v.codes < 0) if isinstance(v, Factor) else np.isnan(v.values).any(axis=1)
    if ev.offset is not None:
        bad |= np.isnan(ev.offset)
    return bad


def take_rows(ev: Evaluated, rows: np.ndarray) -> Evaluated:
    values = tuple(v.take(rows) if isinstance(v, Factor) else Numeric(v.values[rows], v.suffixes)
                   for v in ev.values)
    return Evaluated(ev.terms, values, len(rows), None if ev.offset is None else ev.offset[rows])


def _coding(terms: Terms, values: tuple) -> list[list[str]]:
    """R's TermCode for every factor of every term: 'contrasts' when the term without that factor is
    empty or lies within an earlier term, else 'indicators'; without an intercept the first factor of the
    first term holding one is coded by indicators."""
    codes = []
    first_done = terms.intercept
    for j, term in enumerate(terms.terms):
        row = []
        for i in term:
            if not isinstance(values[i], Factor):
                row.append("numeric")
                continue
            rest = set(term) - {i}
            if not first_done:
                row.append("indicators")
                first_done = True
            elif not rest or any(rest <= set(t) for t in terms.terms[:j]):
                row.append("contrasts")
            else:
                row.append("indicators")
        codes.append(row)
    return codes


def _factor_columns(f: Factor, coding: str, name: str, n: int) -> tuple[np.ndarray, list[str]]:
    k = len(f.levels)
    if coding == "indicators" or k < 2:
        C, suffix = np.eye(k), list(f.levels)
    elif f.ordered:
        C, suffix = contr_poly(k), contr_poly_names(k)
    else:
        C, suffix = np.eye(k)[:, 1:], list(f.levels[1:])
    return C[f.codes], [f"{name}{s}" for s in suffix]


def model_matrix(ev: Evaluated) -> tuple[np.ndarray, list[str]]:
    """R's model.matrix: the intercept, then each term's columns, the first variable of an interaction
    varying fastest; columns named as R names them."""
    terms, values, n = ev.terms, ev.values, ev.n
    blocks, names = [], []
    if terms.intercept:
        blocks.append(None)                       # the column of ones, written in place below
        names.append("(Intercept)")
    for term, coding in zip(terms.terms, _coding(terms, values)):
        cols, labels = None, [""]
        for i, how in zip(term, coding):
            name = deparse(terms.variables[i])
            v = values[i]
            if isinstance(v, Factor):
                M, vnames = _factor_columns(v, how, name, n)
            else:
                M, vnames = v.values, [f"{name}{s}" for s in v.suffixes]
            M = np.asarray(M, dtype=float).reshape(n, -1)
            # the earlier variables vary fastest: column (a, b) at position b * width_a + a
            cols = M if cols is None else np.einsum("na,nb->nba", cols, M).reshape(n, -1)
            labels = [f"{l}:{m}" if l else m for m in vnames for l in labels]
        blocks.append(np.ones((n, 1)) if cols is None else cols)
        names.extend(labels)
    X = np.empty((n, len(names)))
    j = 0
    for block in blocks:
        if block is None:
            X[:, j] = 1.0
            j += 1
        else:
            X[:, j:j + block.shape[1]] = block
            j += block.shape[1]
    return X, names


def response_values(node: Node, frame: Frame) -> np.ndarray:
    """The response, evaluated like any variable; it must be numeric."""
    v = frame.evaluate(node)
    if isinstance(v, Factor):
        bad = next((lvl for lvl in v.levels if not _is_number(lvl)), v.levels[0] if v.levels else "")
        raise DataError(f"the response {deparse(node)!r} must be numeric, but it holds {shown(bad)}; convert it to "
                        "numbers first")
    if isinstance(v, Numeric):
        if v.values.shape[1] != 1:
            raise FormulaError(f"the response {deparse(node)!r} has {v.values.shape[1]} columns; a linear "
                               "mixed model has one response")
        v = v.values[:, 0]
    if isinstance(v, np.ndarray) and v.dtype == bool:
        raise DataError(f"the response {deparse(node)!r} is logical (TRUE/FALSE); a linear mixed model needs "
                        "a numeric response")
    if np.ndim(v) == 0:
        raise FormulaError(f"the response {deparse(node)!r} is a constant")
    return np.asarray(v, dtype=float)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False
