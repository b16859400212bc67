"""The whitelist parser: plain and LaTeX syntax, exact numbers, the derivation's own symbols, hostile input."""
from __future__ import annotations

import os
import time

import pytest
import sympy as sp
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lmm_symbolic import datasets
from lmm_symbolic.derivation import derive
from lmm_symbolic.errors import ExpressionError
from lmm_symbolic.expression import detect_syntax, parse_expression
from lmm_symbolic.specification import specify


@pytest.fixture(scope="module")
def der():
    return derive(specify("Resp ~ Treat + (1|Ind)", datasets.load("toy")))


@pytest.fixture(scope="module")
def names(der):
    return der.symbols.by_name()


def P(text, names, syntax=None):
    return parse_expression(text, names, syntax)


# ------------------------------------------------------------------------------------------ plain
def test_plain_symbols_are_the_derivations_own(names):
    e = P("sigma**2 + sigma_s**2 + beta_0 + y_11", names)
    assert e.free_symbols == {names["sigma"], names["sigma_s"], names["beta_0"], names["y_11"]}
    assert P("sigma", names).is_positive and P("sigma_s", names).is_positive
    assert P("beta_1", names).is_real
    assert P("sqrt(sigma**2)", names) == names["sigma"]  # only true because sigma is positive


def test_plain_caret_is_power(names):
    s = names["sigma"]
    assert P("sigma^4*(sigma^2+2*sigma_s^2)^2", names) == s**4 * (s**2 + 2 * names["sigma_s"]**2)**2


def test_plain_numbers_are_exact(names):
    assert P("0.1", names) == sp.Rational(1, 10)
    assert P("1.5e-3", names) == sp.Rational(3, 2000)
    assert P("2/3", names) == sp.Rational(2, 3)
    assert P("1_000", names) == 1000
    assert P("-(3)", names) == -3


def test_plain_functions_and_constants(names):
    s = names["sigma"]
    assert P("log(2*pi)", names) == sp.log(2 * sp.pi)
    assert P("ln(sigma)", names) == sp.log(s)
    assert P("exp(-sigma/2)", names) == sp.exp(-s / 2)
    assert P("e**sigma", names) == sp.exp(s)
    assert P("E", names) == sp.E
    assert P("abs(beta_0) + Abs(beta_1)", names) == sp.Abs(names["beta_0"]) + sp.Abs(names["beta_1"])
    assert P("sqrt(4)", names) == 2


def test_plain_matrices(names):
    s = names["sigma"]
    assert P("[[sigma, 1], [0, 2]]", names) == sp.Matrix([[s, 1], [0, 2]])
    assert P("((sigma, 1), (0, 2))", names) == sp.Matrix([[s, 1], [0, 2]])
    assert P("Matrix([[sigma, 1.5]])", names) == sp.Matrix([[s, sp.Rational(3, 2)]])
    assert P("[[1, 0], [0, 1]] / sigma**2", names) == sp.eye(2) / s**2
    assert P("2*[[1, 0], [0, 1]] - [[1, 0], [0, 1]]", names) == sp.eye(2)
    assert P("[[1, 2], [3, 4]] * [[1], [1]]", names) == sp.Matrix([3, 7])


@pytest.mark.parametrize("text, fragment", [
    ("sigma_x", "unknown symbol 'sigma_x'"),
    ("x", "known names: sigma, sigma_s, beta_0"),
    ("[sigma, 1]", "list of rows"),
    ("[[1, 2], [3]]", "different lengths"),
    ("[[1, [2]]]", "not a list"),
    ("[[1, 2]] + 1", "matrix and a scalar"),
    ("log([[1]])", "of a matrix"),
    ("[[1]]**2", "powers of matrices"),
    ("1 / [[1]]", "division by a matrix"),
    ("log(1, 2)", "exactly one argument"),
    ("sigma % 2", "operator %"),
    ("sigma // 2", "operator //"),
    ("~sigma", "operator ~"),
    ("sigma < 1", "comparisons"),
    ("sigma and 1", "'and'/'or'"),
    ("1j", "complex"),
    ("'text'", "strings"),
    ("None", "None is not allowed"),
    ("", "empty"),
    ("☃**2", "ASCII"),
    ("1/(sigma - sigma)", "division by zero"),
    ("log(0)", "not finite"),
])
def test_plain_rejections(names, text, fragment):
    with pytest.raises(ExpressionError, match=None) as err:
        P(text, names)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------ LaTeX
@pytest.mark.parametrize("text, plain", [
    (r"\sigma^4\left(\sigma^2+2\sigma_s^2\right)^2", "sigma**4*(sigma**2+2*sigma_s**2)**2"),
    (r"4\sigma_s^4\sigma^4 + 4\sigma_s^2\sigma^6 + \sigma^8", "4*sigma_s**4*sigma**4 + 4*sigma_s**2*sigma**6 + sigma**8"),
    (r"\sigma_{s}^{2}", "sigma_s**2"),
    (r"\sigma^2_s", "sigma_s**2"),
    (r"\beta_1 + \beta_{0}", "beta_1 + beta_0"),
    (r"y_{11} - y_{2 1}", "y_11 - y_21"),
    (r"2\sigma^2(\sigma^2+1)", "2*sigma**2*(sigma**2+1)"),
    (r"\frac{1}{2}\log(2\pi)", "log(2*pi)/2"),
    (r"\frac12 \ln \sigma^2", "log(sigma**2)/2"),
    (r"\dfrac{\sigma}{\sigma_s}", "sigma/sigma_s"),
    (r"\sqrt{\sigma^2 + 1}", "sqrt(sigma**2 + 1)"),
    (r"\sqrt[3]{\sigma}", "sigma**(1/3)"),
    (r"e^{-\sigma/2}", "exp(-sigma/2)"),
    (r"\exp\left(-\frac{\sigma}{2}\right)", "exp(-sigma/2)"),
    (r"\mathrm{e}^{\sigma}", "exp(sigma)"),
    (r"\sigma \cdot \sigma_s \times 2", "2*sigma*sigma_s"),
    (r"\sigma \div 2", "sigma/2"),
    (r"\log{\left(\sigma \right)}", "log(sigma)"),
    (r"\log 2\pi\sigma^2", "log(2*pi*sigma**2)"),
    (r"\left[\sigma + 1\right] \left\{ 2 \right\}", "2*(sigma+1)"),
    (r"\left|\beta_0\right|", "Abs(beta_0)"),
    (r"-\sigma^2", "-sigma**2"),
    (r"\sigma^{-1}", "1/sigma"),
    (r"0.25\,\sigma", "sigma/4"),
    (r"$\sigma^2$", "sigma**2"),
    (r"{\sigma}^{2}", "sigma**2"),
    (r"\varepsilon_{11} + \epsilon_{12} + u_1", "epsilon_11 + epsilon_12 + u_1"),
])
def test_latex_matches_plain(names, text, plain):
    assert P(text, names, "latex") == P(plain, names, "plain")


def test_latex_matrices(names):
    s = names["sigma"]
    expected = sp.Matrix([[s, 1], [0, names["beta_1"]]])
    assert P(r"\begin{pmatrix} \sigma & 1 \\ 0 & \beta_1 \end{pmatrix}", names) == expected
    assert P(r"\begin{bmatrix} \sigma & 1 \\ 0 & \beta_1 \\ \end{bmatrix}", names) == expected
    assert P(r"\left[\begin{matrix} \sigma & 1 \\ 0 & \beta_1 \end{matrix}\right]", names) == expected
    assert P(r"\frac{1}{\sigma^2}\begin{pmatrix} 1 & 0 \\ 0 & 1 \end{pmatrix}", names) == sp.eye(2) / s**2


@pytest.mark.parametrize("text, fragment", [
    (r"\sigma_x", "unknown symbol"),
    (r"\tau", "unknown symbol"),
    (r"\sigma^10", "write ^{10}"),
    (r"y_11", "write _{11}"),
    (r"\sigma 2", "explicit \\cdot"),
    (r"\sigma^2^3", "double superscript"),
    (r"(\sigma + 1", "expected ')'"),
    (r"\left( \sigma \right]", "closed by \\right)"),
    (r"\begin{pmatrix} 1 & 2 \end{bmatrix}", "closed by"),
    (r"\begin{pmatrix} 1 & 2 \\ 3 \end{pmatrix}", "different lengths"),
    (r"\begin{array} 1 \end{array}", "not allowed"),
    (r"\begin{pmatrix} 1 & 2", "not closed"),
    (r"1 \\ 2", "only inside a matrix"),
    (r"\log_2 \sigma", "base"),
    (r"\frac{1}{0}", "division by zero"),
    (r"(\sigma+1)_2", "subscript is allowed only on a symbol"),
    (r"\sigma ; 1", "not allowed"),
    ("\\", "unknown LaTeX command"),
    ("sigma_s^2", "write \\sigma, not sigma"),
    ("2 log(2)", "write \\log"),
])
def test_latex_rejections(names, text, fragment):
    with pytest.raises(ExpressionError) as err:
        P(text, names, "latex")
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_syntax_detection(names):
    assert detect_syntax(r"\sigma") == "latex"
    assert detect_syntax("{1}") == "latex"
    assert detect_syntax("sigma^2") == "plain"
    assert P("sigma^2", names) == names["sigma"]**2
    with pytest.raises(ExpressionError, match="unknown syntax"):
        P("1", names, "mathml")


# ------------------------------------------------------------------------ the derivation, read back
@pytest.mark.parametrize("attr", ["det", "logdet", "quadratic_form", "loglik", "reml_loglik", "inverse",
                                  "sigma_matrix", "kinship"])
def test_derivation_round_trips(der, names, attr):
    value = getattr(der, attr)
    for text in (sp.sstr(value), sp.latex(value)):
        back = P(text, names)
        diff = back - value
        if isinstance(value, sp.MatrixBase):
            assert all(sp.cancel(sp.together(x)) == 0 for x in diff)
        else:
            assert sp.cancel(sp.together(sp.expand_log(diff))) == 0


def test_equation_latex_reads_back(der, names):
    for number, attr in ((8, "sigma_matrix"), (11, "det")):
        rhs = der.equation(number).latex.split("=", 1)[1]
        assert P(rhs, names) == getattr(der, attr)


# ------------------------------------------------------------------------------ property checks
_S = [sp.Symbol("sigma", positive=True), sp.Symbol("sigma_s", positive=True), sp.Symbol("beta_0", real=True),
      sp.Symbol("y_11", real=True)]
_leaf = st.one_of(st.sampled_from(_S), st.integers(-20, 20).map(sp.Integer),
                  st.fractions(max_denominator=9).filter(lambda f: abs(f) < 50).map(sp.Rational))


def _combine(children):
    return st.one_of(
        st.tuples(children, children).map(lambda t: t[0] + t[1]),
        st.tuples(children, children).map(lambda t: t[0] * t[1]),
        st.tuples(children, st.integers(-4, 4)).map(lambda t: t[0] ** t[1] if t[0] != 0 else t[0]),
        children.map(lambda c: sp.log(c) if c.is_positive else c),
        children.map(lambda c: sp.exp(c) if not c.has(sp.exp) else c),
    )


_exprs = st.recursive(_leaf, _combine, max_leaves=8)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_exprs)
def test_random_expressions_round_trip(e):
    names = {s.name: s for s in _S}
    if e.has(sp.zoo, sp.nan, sp.oo) or sp.count_ops(e) > 60:
        return
    for text, syntax in ((sp.sstr(e), "plain"), (sp.latex(e), "latex")):
        try:
            back = parse_expression(text, names, syntax)
        except ExpressionError as err:  # a bound (e.g. exp(-1331)), not a misreading
            assume(any(w in str(err) for w in ("too large", "too high", "tower")))
            return
        assert sp.cancel(sp.together(back - e)) == 0 or sp.simplify(back - e) == 0, (text, back, e)


_PLAIN_ALPHABET = "sigma_0123456789+-*/^().,[] elogxp"
_LATEX_ALPHABET = "\\sigma_beta{}^()[]&0123456789+- fraclogsqrtleftright"


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=_PLAIN_ALPHABET, max_size=60))
def test_fuzz_plain_only_expression_errors(text):
    try:
        parse_expression(text, {s.name: s for s in _S}, "plain")
    except ExpressionError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=_LATEX_ALPHABET, max_size=60))
def test_fuzz_latex_only_expression_errors(text):
    try:
        parse_expression(text, {s.name: s for s in _S}, "latex")
    except ExpressionError:
        pass


# -------------------------------------------------------------------------------- hostile input
PWNED = "/tmp/lmm_symbolic_pwned_by_test_expression"

#: (label, text, syntax); every one must raise ExpressionError within a second and run nothing
HOSTILE = [
    ("import via __import__", f"__import__('os').system('touch {PWNED}')", "plain"),
    ("bare __import__", "__import__('os')", "plain"),
    ("attribute access", "().__class__", "plain"),
    ("subclass walk", "().__class__.__bases__[0].__subclasses__()", "plain"),
    ("attribute of a symbol", "sigma.evalf", "plain"),
    ("open", "open('/etc/passwd')", "plain"),
    ("eval", "eval('1')", "plain"),
    ("exec", "exec('import os')", "plain"),
    ("getattr", "getattr(sigma, 'evalf')()", "plain"),
    ("globals", "globals()", "plain"),
    ("lambda", "lambda: 1", "plain"),
    ("assignment statement", "x = 1", "plain"),
    ("walrus", "(x := 1)", "plain"),
    ("import statement", "import os", "plain"),
    ("two statements", "1; 2", "plain"),
    ("f-string", "f'{1}'", "plain"),
    ("comprehension", "[x for x in (1, 2)]", "plain"),
    ("conditional", "sigma if 1 else 2", "plain"),
    ("indexing", "sigma[0]", "plain"),
    ("string repetition", "'a' * 10**9", "plain"),
    ("keyword argument", "log(x=1)", "plain"),
    ("star argument", "log(*[1])", "plain"),
    ("100,000 nested parentheses", "(" * 100_000 + "1" + ")" * 100_000, "plain"),
    ("5,000 nested parentheses (within the length bound)", "(" * 5_000 + "1" + ")" * 5_000, "plain"),
    ("10,000 nested lists", "[" * 10_000 + "1" + "]" * 10_000, "plain"),
    ("4,999 nested lists (within the length bound)", "[" * 4_999 + "1" + "]" * 4_999, "plain"),
    ("9,999 unary minus", "-" * 9_999 + "1", "plain"),
    ("long power chain", "2" + "**2" * 3_000, "plain"),
    ("power tower 2**2**2**2**99", "2**2**2**2**99", "plain"),
    ("power tower 9**9**9", "9**9**9", "plain"),
    ("huge exponent", "sigma**(10**100)", "plain"),
    ("huge number", "10**1000", "plain"),
    ("huge product", "*".join(["10**299"] * 4), "plain"),
    ("huge literal", "1" * 500, "plain"),
    ("huge float exponent", "1e999999999", "plain"),
    ("symbolic tower", "sigma**sigma**sigma", "plain"),
    ("exp tower", "exp(exp(exp(sigma)))", "plain"),
    ("degree blow-up", "((sigma+1)**1000)**1000", "plain"),
    ("1 MB string", "sigma+" * 174_763, "plain"),
    ("1 MB of parentheses", "(" * 1_000_000, "plain"),
    ("LaTeX \\input", r"\input{/etc/passwd}", "latex"),
    ("LaTeX \\include", r"\include{/etc/passwd}", "latex"),
    ("LaTeX \\def", r"\def\x{1}\x", "latex"),
    ("LaTeX \\newcommand", r"\newcommand{\x}{1}", "latex"),
    ("LaTeX \\write18", r"\write18{touch /tmp/x}", "latex"),
    ("LaTeX \\catcode", r"\catcode`\^=12", "latex"),
    ("LaTeX unknown command", r"\foo{1}", "latex"),
    ("LaTeX unknown environment", r"\begin{verbatim}x\end{verbatim}", "latex"),
    ("LaTeX deep braces", "{" * 5_000 + "1" + "}" * 5_000, "latex"),
    ("LaTeX tower", r"\sigma^{\sigma^{\sigma}}", "latex"),
    ("LaTeX huge power", r"10^{1000}", "latex"),
    ("LaTeX 9^{9^{9}}", r"9^{9^{9}}", "latex"),
    ("LaTeX 9,999 unary minus", "-" * 9_999 + r"\sigma", "latex"),
    ("LaTeX 1 MB string", "\\sigma+" * 131_072, "latex"),
]


@pytest.mark.parametrize("label, text, syntax", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_input_is_rejected_fast(names, label, text, syntax):
    if os.path.exists(PWNED):
        os.remove(PWNED)
    for chosen in (syntax, None):  # the stated syntax and auto-detection
        start = time.perf_counter()
        with pytest.raises(ExpressionError) as err:
            parse_expression(text, names, chosen)
        elapsed = time.perf_counter() - start
        assert elapsed < 1.0, f"{label}: {elapsed:.2f} s"
        message = str(err.value)
        assert message and "\n" not in message and len(message) < 1000
    assert not os.path.exists(PWNED)

