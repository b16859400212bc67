"""Issue 15's audit, item by item: every notation the issue lists and every quantity, in both syntaxes, with
a correct and a wrong answer each, on the toy design (2 groups of 2, a within-group covariate), a 3-group
unbalanced design (sizes 2, 3, 4), a balanced 3 x 2 design (the closed-form ML/REML estimates) and a
random-slope model; the steps mode, near misses, the exercise generator and the bad inputs.

Every "correct" answer must be proved equal and every "wrong" one must get a counterexample (a point where
the two differ); the hand-written answers are typed as a student would, not printed by sympy."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pandas as pd
import pytest
import sympy as sp

import lmm_symbolic as lmm
from lmm_symbolic.cli import main
from lmm_symbolic.expression import MAX_LENGTH, parse_expression
from lmm_symbolic.verification import QUANTITIES, derived_quantity, symbol_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = "Resp ~ Treat + (1|Ind)"
UNBALANCED = pd.DataFrame({"g": list("aabbbcccc"), "x": [0, 1, 0, 1, 1, 0, 1, 0, 1],
                           "y": [1.0, 2.5, 4.0, 3.0, 0.5, 2.0, 5.0, 4.5, 7.0]})
BALANCED = pd.DataFrame({"y": [1.0, 2.5, 4.0, 3.0, 0.5, 2.0], "g": list("aabbcc")})
CROSSED = pd.DataFrame({"g": list("aabbcc"), "h": list("pqpqpq"), "y": [1.0, 2.5, 4.0, 3.0, 0.5, 2.0]})
SLOPE = pd.DataFrame({"g": list("aaabbbccc"), "x": [0, 1, 2] * 3, "y": [1.0, 2.5, 4.0, 3.0, 0.5, 2.0, 5.0, 4.5, 7.0]})


@pytest.fixture(scope="module")
def toy():
    return lmm.derive(TOY, lmm.datasets.load("toy"))


@pytest.fixture(scope="module")
def designs(toy):
    return {"toy": toy, "unbalanced": lmm.derive("y ~ x + (1|g)", UNBALANCED),
            "balanced": lmm.derive("y ~ 1 + (1|g)", BALANCED), "slope": lmm.derive("y ~ x + (x|g)", SLOPE),
            "crossed": lmm.derive("y ~ 1 + (1|g) + (1|h)", CROSSED)}


def _equal(der, quantity, text, syntax=None):
    v = lmm.verify(der, quantity, text, syntax)
    assert v.equal and v.status == "equal", f"{quantity}: {text!r} -> {v}"
    return v


def _wrong(der, quantity, text, syntax=None):
    v = lmm.verify(der, quantity, text, syntax)
    assert not v.equal and v.status == "different" and v.counterexample, f"{quantity}: {text!r} -> {v}"
    return v


# ================================================================ 1. notations (toy design, |Sigma| etc.)
# (notation, quantity, plain correct, plain wrong, LaTeX correct, LaTeX wrong); None where a syntax has no
# such notation (the other syntax's usual spelling is then tested instead)
NOTATIONS = [
    ("unicode pasted from a PDF", "det", "σ⁴(σ²+2σs²)²", "σ⁴(σ²+σs²)²",
     r"σ⁴\left(σ²+2σ_s²\right)²", r"σ⁴\left(σ²+σ_s²\right)²"),
    ("sigma_s as σ_s", "det", "σ^4 (σ^2 + 2 σ_s^2)^2", "σ^4 (σ^2 + 2 σ_s)^2",
     r"σ^4 (σ^2 + 2σ_{s}^2)^2", r"σ^4 (σ^2 + 2σ_{s})^2"),
    ("the product sign ·", "det", "σ⁴·(σ²+2·σs²)²", "σ⁴·(σ²+2·σs²)·σ²", r"σ^4 · (σ^2 + 2·\sigma_s^2)^2",
     r"σ^4 · (σ^2 + 2·\sigma_s^2)"),
    ("the product sign ×", "det", "σ⁴ × (σ² + 2 × σs²)²", "σ⁴ × (σ² + 2 × σs²)", r"\sigma^4 \times (\sigma^2 + 2 \times \sigma_s^2)^2",
     r"\sigma^4 \times (\sigma^2 \times 2 \sigma_s^2)^2"),
    ("the minus sign U+2212", "ml_sigma2", "(y_11 − y_12 − y_21 + y_22)²/8", "(y_11 − y_12 + y_21 − y_22)²/8",
     r"\frac{(y_{11} − y_{12} − y_{21} + y_{22})^2}{8}", r"\frac{(y_{11} − y_{12} − y_{21} + y_{22})^2}{4}"),
    ("superscript digits", "det", "σ⁸ + 4σ⁶σs² + 4σ⁴σs⁴", "σ⁸ + 4σ⁶σs² + 2σ⁴σs⁴",
     r"\sigma⁸ + 4\sigma⁶\sigma_s² + 4\sigma⁴\sigma_s⁴", r"\sigma⁸ + 4\sigma⁶\sigma_s² + 4\sigma⁴\sigma_s³"),
    ("implicit multiplication with a space", "det", "sigma^4 (sigma^2 + 2 sigma_s^2)^2",
     "sigma^4 (sigma^2 + 2 sigma_s^2) (sigma^2 + sigma_s^2)", r"\sigma^4 \left(\sigma^2 + 2 \sigma_s^2\right)^2",
     r"\sigma^4 \left(\sigma^2 + 2 \sigma_s^2\right) \left(\sigma^2 + \sigma_s^2\right)"),
    (r"\sigma_{\mathrm{s}}", "det", None, None, r"\sigma^4(\sigma^2+2\sigma_{\mathrm{s}}^2)^2",
     r"\sigma^4(\sigma^2+\sigma_{\mathrm{s}}^2)^2"),
    (r"\sigma_{\text{s}}", "det", None, None, r"\sigma^4(\sigma^2+2\sigma_{\text{s}}^2)^2",
     r"\sigma^4(\sigma^2+\sigma_{\text{s}}^2)^2"),
    (r"\operatorname{log}", "logdet", "2*log(sigma^2) + 2*log(sigma^2 + 2*sigma_s^2)",
     "2*log(sigma^2) + log(sigma^2 + 2*sigma_s^2)",
     r"2\operatorname{log}\sigma^2 + 2\operatorname{log}(\sigma^2 + 2\sigma_s^2)",
     r"2\operatorname{log}\sigma^2 + 2\operatorname{ln}(\sigma^2 + \sigma_s^2)"),
    (r"\det of a matrix", "det", "det([[sigma^2 + sigma_s^2, sigma_s^2], [sigma_s^2, sigma^2 + sigma_s^2]])^2",
     "det([[sigma^2 + sigma_s^2, sigma_s^2], [sigma_s^2, sigma^2]])^2",
     r"\left(\det\begin{pmatrix}\sigma^2+\sigma_s^2 & \sigma_s^2\\ \sigma_s^2 & \sigma^2+\sigma_s^2\end{pmatrix}\right)^2",
     r"\det\begin{pmatrix}\sigma^2+\sigma_s^2 & \sigma_s^2\\ \sigma_s^2 & \sigma^2+\sigma_s^2\end{pmatrix}"),
    ("vmatrix", "det", "Abs(Matrix([[sigma^2 + sigma_s^2, sigma_s^2], [sigma_s^2, sigma^2 + sigma_s^2]]))^2",
     "Abs(Matrix([[sigma^2 + sigma_s^2, sigma_s^2], [sigma_s^2, sigma^2 + sigma_s^2]]))",
     r"\begin{vmatrix}\sigma^2+\sigma_s^2 & \sigma_s^2\\ \sigma_s^2 & \sigma^2+\sigma_s^2\end{vmatrix}^2",
     r"\begin{vmatrix}\sigma^2+\sigma_s^2 & \sigma_s^2\\ \sigma_s^2 & \sigma^2\end{vmatrix}^2"),
    (r"\bigl( \bigr)", "det", None, None, r"\sigma^4\bigl(\sigma^2+2\sigma_s^2\bigr)^2",
     r"\sigma^4\bigl(\sigma^2+3\sigma_s^2\bigr)^2"),
    (r"\Bigl( \Bigr)", "det", None, None, r"\sigma^4\Bigl(\sigma^2+2\sigma_s^2\Bigr)^2",
     r"\sigma^4\Bigl(\sigma^2+3\sigma_s^2\Bigr)^2"),
    (r"\biggl( \biggr)", "det", None, None, r"\sigma^4\biggl(\sigma^2+2\sigma_s^2\biggr)^2",
     r"\sigma^4\biggl(\sigma^2+2\sigma_s^2\biggr)"),
    ("y_{1,1} for y_11", "reml_sigma2", "(y_1_1 - y_1_2 - y_2_1 + y_2_2)^2/4", "(y_1_1 - y_1_2 - y_2_1 + y_2_2)^2/8",
     r"\frac{1}{4}(y_{1,1} - y_{1,2} - y_{2,1} + y_{2,2})^2", r"\frac{1}{4}(y_{1,1} + y_{1,2} - y_{2,1} - y_{2,2})^2"),
    (r"\prod over groups", "det", "Product(sigma^(2*(m_j - 1))*(sigma^2 + m_j*sigma_s^2), (j, 1, G))",
     "Product(sigma^(2*m_j)*(sigma^2 + m_j*sigma_s^2), (j, 1, G))",
     r"\prod_{j=1}^{G}\sigma^{2(m_j-1)}\left(\sigma^2+m_j\sigma_s^2\right)",
     r"\prod_{j=1}^{G}\sigma^{2(m_j-1)}\left(\sigma^2+\sigma_s^2\right)"),
    ("sum_{j=1}^{G} written plainly", "logdet",
     "sum_{j=1}^{G} (m_j - 1) log(sigma^2) + sum_{j=1}^{G} log(sigma^2 + m_j sigma_s^2)",
     "sum_{j=1}^{G} m_j log(sigma^2) + sum_{j=1}^{G} log(sigma^2 + m_j sigma_s^2)",
     r"(n - G)\log\sigma^2 + \sum_{j=1}^{G}\log\left(\sigma^2 + m_j\sigma_s^2\right)",
     r"n\log\sigma^2 + \sum_{j=1}^{G}\log\left(\sigma^2 + m_j\sigma_s^2\right)"),
    (r"\sum over observations in groups", "quadratic_form",
     "Sum((y_ij - beta_0 - (i-1)*beta_1)^2 - sigma_s^2/(sigma^2 + m_j*sigma_s^2)/m_j*Sum(y_kj - beta_0 - (k-1)*beta_1,"
     " (k, 1, m_j))^2, (i, 1, m_j), (j, 1, G))/sigma^2",
     "Sum((y_ij - beta_0 - (i-1)*beta_1)^2, (i, 1, m_j), (j, 1, G))/sigma^2",
     r"\frac{1}{\sigma^2}\sum_{j=1}^{G}\left(\sum_{i=1}^{m_j}(y_{ij}-\beta_0-(i-1)\beta_1)^2 - \frac{\sigma_s^2}"
     r"{\sigma^2+m_j\sigma_s^2}\Bigl(\sum_{i=1}^{m_j}(y_{ij}-\beta_0-(i-1)\beta_1)\Bigr)^2\right)",
     r"\frac{1}{\sigma^2}\sum_{j=1}^{G}\sum_{i=1}^{m_j}(y_{ij}-\beta_0-(i-1)\beta_1)^2"),
    ("Rational(a, b)", "ml_sigma_s2", "Rational(1, 4)*(y_11 - y_12)*(y_21 - y_22)",
     "Rational(1, 2)*(y_11 - y_12)*(y_21 - y_22)", r"\frac14 (y_{11} - y_{12})(y_{21} - y_{22})",
     r"\tfrac{1}{2} (y_{11} - y_{12})(y_{21} - y_{22})"),
]


@pytest.mark.parametrize("row", NOTATIONS, ids=[r[0] for r in NOTATIONS])
@pytest.mark.parametrize("syntax", ["plain", "latex"])
def test_every_notation_correct_and_wrong(toy, row, syntax):
    _, quantity, plain_ok, plain_bad, latex_ok, latex_bad = row
    ok, bad = (plain_ok, plain_bad) if syntax == "plain" else (latex_ok, latex_bad)
    if ok is None:     # a LaTeX-only decoration: the plain answer is the usual spelling
        ok, bad = "sigma^4*(sigma^2 + 2*sigma_s^2)^2", "sigma^4*(sigma^2 + sigma_s^2)^2"
    assert lmm.expression.detect_syntax(ok) == syntax or syntax == "latex" and "σ" in ok
    _equal(toy, quantity, ok)
    _wrong(toy, quantity, bad)


@pytest.mark.parametrize("expr, code", [
    ("-2*log(2*pi) - 1/2*log(sigma^4*(sigma^2 + 2*sigma_s^2)^2) - (Q)/2", 0),
    ("-2*log(2*pi) - 1/2*log(sigma^4*(sigma^2 + 2*sigma_s^2)^2) - (Q)", 1),
    (r"-2\log(2\pi) - \frac12\log\left(\sigma^4(\sigma^2 + 2\sigma_s^2)^2\right) - \frac{Q}{2}", 0),
    (r"-2\log(2\pi) - \log\left(\sigma^4(\sigma^2 + 2\sigma_s^2)^2\right) - \frac{Q}{2}", 1),
])
def test_a_leading_minus_on_the_command_line(toy, expr, code, capsys):
    q = sp.latex(toy.quadratic_form) if "\\" in expr else sp.sstr(toy.quadratic_form)
    text = expr.replace("Q", q)
    assert text.startswith("-")
    assert main(["verify", "toy", TOY, "--quantity", "loglik", "--expr", text]) == code
    out = capsys.readouterr().out
    assert ("equal: " in out) if code == 0 else ("counterexample" in out)


# ================================================ 2. every quantity, hand-written, both syntaxes (toy)
SUMQ = ("Sum(Sum((y_ij - beta_0 - (i-1)*beta_1)^2, (i, 1, m_j)) - sigma_s^2/(sigma^2 + m_j*sigma_s^2)*"
        "Sum(y_ij - beta_0 - (i-1)*beta_1, (i, 1, m_j))^2, (j, 1, G))/sigma^2")
TEXQ = (r"\frac{1}{\sigma^2}\sum_{j=1}^{G}\left(\sum_{i=1}^{m_j}(y_{ij}-\beta_0-(i-1)\beta_1)^2 - \frac{\sigma_s^2}"
        r"{\sigma^2+m_j\sigma_s^2}\left(\sum_{i=1}^{m_j}(y_{ij}-\beta_0-(i-1)\beta_1)\right)^2\right)")
DETP, DETT = "(sigma^4*(sigma^2 + 2*sigma_s^2)^2)", r"\sigma^4\left(\sigma^2+2\sigma_s^2\right)^2"
B0, B1 = "(y_11 + y_12)/2", "((y_21 + y_22) - (y_11 + y_12))/2"
TB0, TB1 = r"\frac{y_{11}+y_{12}}{2}", r"\frac{y_{21}+y_{22}-y_{11}-y_{12}}{2}"
IDENT4 = "[[1,0,0,0],[0,1,0,0],[0,0,1,0],[0,0,0,1]]"
J4 = "[[1,1,0,0],[1,1,0,0],[0,0,1,1],[0,0,1,1]]"
TI4 = r"\begin{pmatrix}1&0&0&0\\0&1&0&0\\0&0&1&0\\0&0&0&1\end{pmatrix}"
TJ4 = r"\begin{pmatrix}1&1&0&0\\1&1&0&0\\0&0&1&1\\0&0&1&1\end{pmatrix}"
INFO = "2/sigma^2*([[2, 1], [1, 1]] - sigma_s^2/(sigma^2 + 2*sigma_s^2)*[[4, 2], [2, 1]])"
TINFO = (r"\frac{2}{\sigma^2}\left(\begin{bmatrix}2&1\\1&1\end{bmatrix} - \frac{\sigma_s^2}{\sigma^2+2\sigma_s^2}"
         r"\begin{bmatrix}4&2\\2&1\end{bmatrix}\right)")
SCORE_S2 = ("Sum(-m_j/(2*(sigma^2 + m_j*sigma_s^2)) + Sum(y_ij - beta_0 - (i-1)*beta_1, (i, 1, m_j))^2/"
            "(2*(sigma^2 + m_j*sigma_s^2)^2), (j, 1, G))")
TSCORE_S2 = (r"\sum_{j=1}^{G}\left(-\frac{m_j}{2(\sigma^2+m_j\sigma_s^2)} + \frac{\left(\sum_{i=1}^{m_j}(y_{ij}-\beta_0"
             r"-(i-1)\beta_1)\right)^2}{2(\sigma^2+m_j\sigma_s^2)^2}\right)")
SCORE_B1 = ("Sum((i-1)*(y_ij - beta_0 - (i-1)*beta_1 - sigma_s^2/(sigma^2 + m_j*sigma_s^2)*Sum(y_kj - beta_0 - "
            "(k-1)*beta_1, (k, 1, m_j))), (i, 1, m_j), (j, 1, G))/sigma^2")
TSCORE_B1 = (r"\frac{1}{\sigma^2}\sum_{j=1}^{G}\sum_{i=1}^{m_j}(i-1)\left(y_{ij}-\beta_0-(i-1)\beta_1 - \frac{\sigma_s^2}"
             r"{\sigma^2+m_j\sigma_s^2}\sum_{k=1}^{m_j}(y_{kj}-\beta_0-(k-1)\beta_1)\right)")
MODES = "[[sigma_s^2/(sigma^2 + 2*sigma_s^2)*(y_11 + y_21 - 2*beta_0 - beta_1)], " \
        "[sigma_s^2/(sigma^2 + 2*sigma_s^2)*(y_12 + y_22 - 2*beta_0 - beta_1)]]"
TMODES = (r"\begin{pmatrix}\frac{\sigma_s^2}{\sigma^2+2\sigma_s^2}(y_{11}+y_{21}-2\beta_0-\beta_1)\\"
          r"\frac{\sigma_s^2}{\sigma^2+2\sigma_s^2}(y_{12}+y_{22}-2\beta_0-\beta_1)\end{pmatrix}")
SIGMA = ("[[sigma^2+sigma_s^2, sigma_s^2, 0, 0], [sigma_s^2, sigma^2+sigma_s^2, 0, 0], "
         "[0, 0, sigma^2+sigma_s^2, sigma_s^2], [0, 0, sigma_s^2, sigma^2+sigma_s^2]]")


def _swap(text, a, b):
    assert a in text, (a, text)
    return text.replace(a, b, 1)


# quantity -> (plain correct, plain wrong, LaTeX correct, LaTeX wrong)
HAND = {
    "det": (DETP, _swap(DETP, "2*sigma_s", "sigma_s"), DETT, _swap(DETT, "2\\sigma_s", "\\sigma_s")),
    "logdet": ("2*log(sigma^2) + 2*log(sigma^2 + 2*sigma_s^2)", "4*log(sigma^2) + 2*log(sigma^2 + 2*sigma_s^2)",
               r"\log|\Sigma|".replace(r"|\Sigma|", "(" + DETT + ")"), r"\log(\sigma^4)"),
    "inverse": (f"1/sigma^2*({IDENT4} - sigma_s^2/(sigma^2 + 2*sigma_s^2)*{J4})",
                f"1/sigma^2*({IDENT4} - sigma_s^2/(sigma^2 + sigma_s^2)*{J4})",
                rf"\frac{{1}}{{\sigma^2}}\left({TI4} - \frac{{\sigma_s^2}}{{\sigma^2+2\sigma_s^2}}{TJ4}\right)",
                rf"\frac{{1}}{{\sigma^2}}\left({TI4} - \frac{{\sigma_s^2}}{{\sigma^2+2\sigma_s^2}}{TI4}\right)"),
    "sigma": (SIGMA, _swap(SIGMA, "sigma_s^2, 0, 0]", "0, 0, 0]"),
              r"\sigma^2 " + TI4 + r" + \sigma_s^2 " + TJ4, r"\sigma^2 " + TJ4 + r" + \sigma_s^2 " + TI4),
    "kinship": (J4, IDENT4, TJ4, TI4),
    "quadratic_form": (SUMQ, _swap(SUMQ, "sigma_s^2/", "2*sigma_s^2/"), TEXQ, _swap(TEXQ, r"\beta_0-(i-1)", r"\beta_0-i")),
    "loglik": (f"-n/2*log(2*pi) - 1/2*log{DETP} - 1/2*{SUMQ}", f"-n*log(2*pi) - 1/2*log{DETP} - 1/2*{SUMQ}",
               rf"-\frac{{n}}{{2}}\log(2\pi) - \frac12\log\left({DETT}\right) - \frac{{1}}{{2}}{TEXQ}",
               rf"-\frac{{n}}{{2}}\log(2\pi) - \log\left({DETT}\right) - \frac{{1}}{{2}}{TEXQ}"),
    "likelihood": (f"(2*pi)^(-n/2)*{DETP}^(-1/2)*exp(-{SUMQ}/2)", f"(2*pi)^(-n/2)*{DETP}^(-1/2)*exp(-{SUMQ})",
                   rf"(2\pi)^{{-n/2}}\left({DETT}\right)^{{-1/2}}\exp\left(-\frac{{1}}{{2}}{TEXQ}\right)",
                   rf"(2\pi)^{{-n}}\left({DETT}\right)^{{-1/2}}\exp\left(-\frac{{1}}{{2}}{TEXQ}\right)"),
    "gls_estimator": (f"[[{B0}], [{B1}]]", f"[[(y_11 + y_21)/2], [{B1}]]",
                      rf"\begin{{pmatrix}}{TB0}\\{TB1}\end{{pmatrix}}", rf"\begin{{pmatrix}}{TB1}\\{TB0}\end{{pmatrix}}"),
    "gls_information": (INFO, _swap(INFO, "2/sigma^2", "1/sigma^2"), TINFO, _swap(TINFO, "}4&2", "}4&1")),
    "beta_covariance": ("[[(sigma^2 + sigma_s^2)/2, -sigma^2/2], [-sigma^2/2, sigma^2]]",
                        "[[(sigma^2 + sigma_s^2)/2, sigma^2/2], [sigma^2/2, sigma^2]]",
                        r"\begin{pmatrix}\frac{\sigma^2+\sigma_s^2}{2} & -\frac{\sigma^2}{2}\\ -\frac{\sigma^2}{2} & "
                        r"\sigma^2\end{pmatrix}",
                        r"\begin{pmatrix}\frac{\sigma^2+\sigma_s^2}{2} & -\frac{\sigma^2}{2}\\ -\frac{\sigma^2}{2} & "
                        r"\sigma^2+\sigma_s^2\end{pmatrix}"),
    "ml_sigma2": ("(y_11 - y_12 - y_21 + y_22)^2/8", "(y_11 - y_12 - y_21 + y_22)^2/4",
                  r"\frac{(y_{11}-y_{12}-y_{21}+y_{22})^2}{8}", r"\frac{(y_{11}-y_{12}-y_{21}+y_{22})^2}{6}"),
    "ml_sigma_s2": ("(y_11 - y_12)*(y_21 - y_22)/4", "(y_11 - y_12)*(y_21 - y_22)/2",
                    r"\frac{(y_{11}-y_{12})(y_{21}-y_{22})}{4}", r"\frac{(y_{11}-y_{21})(y_{12}-y_{22})}{4}"),
    "reml_sigma2": ("(y_11 - y_12 - y_21 + y_22)^2/4", "(y_11 - y_12 - y_21 + y_22)^2/8",
                    r"\frac{(y_{11}-y_{12}-y_{21}+y_{22})^2}{4}", r"\frac{(y_{11}-y_{12}+y_{21}-y_{22})^2}{4}"),
    "reml_sigma_s2": ("(y_11 - y_12)*(y_21 - y_22)/2", "(y_11 - y_12)*(y_21 - y_22)/4",
                      r"\frac{(y_{11}-y_{12})(y_{21}-y_{22})}{2}", r"\frac{(y_{11}-y_{12})(y_{21}-y_{22})}{3}"),
    "score_sigma_s2": (SCORE_S2, _swap(SCORE_S2, "-m_j/(2*", "-m_j/("), TSCORE_S2,
                       _swap(TSCORE_S2, r"{2(\sigma^2+m_j\sigma_s^2)^2}", r"{2(\sigma^2+m_j\sigma_s^2)}")),
    "score_sigma_s": (f"2*sigma_s*{SCORE_S2}", SCORE_S2, rf"2\sigma_s {TSCORE_S2}", rf"\sigma_s {TSCORE_S2}"),
    "score_beta_1": (SCORE_B1, _swap(SCORE_B1, "(i-1)*(y_ij", "(y_ij"), TSCORE_B1, _swap(TSCORE_B1, "(i-1)\\left(", "\\left(")),
    "profiled_loglik": (f"-n/2*log(2*pi) - 1/2*log{DETP} - 1/2*{SUMQ}".replace("beta_0", B0).replace("beta_1", B1),
                        f"-n/2*log(2*pi) - 1/2*log{DETP} - 1/2*{SUMQ}".replace("beta_0", "(y_11 + y_21)/2")
                        .replace("beta_1", B1),
                        rf"-\frac{{n}}{{2}}\log(2\pi) - \frac12\log\left({DETT}\right) - \frac{{1}}{{2}}{TEXQ}"
                        .replace(r"\beta_0", "{" + TB0 + "}").replace(r"\beta_1", "{" + TB1 + "}"),
                        rf"-\frac{{n}}{{2}}\log(2\pi) - \frac12\log\left({DETT}\right) - \frac{{1}}{{2}}{TEXQ}"
                        .replace(r"\beta_0", "{" + TB1 + "}").replace(r"\beta_1", "{" + TB0 + "}")),
    "deviance": (f"n*log(2*pi) + log{DETP} + {SUMQ}", f"log{DETP} + {SUMQ}",
                 rf"n\log(2\pi) + \log\left({DETT}\right) + {TEXQ}", rf"n\log(2\pi) + \log\left({DETT}\right) + 2{TEXQ}"),
    "reml_criterion": (f"(n - 2)*log(2*pi) + log{DETP} + log(det({INFO})) + {SUMQ}",
                       f"n*log(2*pi) + log{DETP} + log(det({INFO})) + {SUMQ}",
                       rf"(n-2)\log(2\pi) + \log\left({DETT}\right) + \log\det\left({TINFO}\right) + {TEXQ}",
                       rf"(n-2)\log(2\pi) + \log\left({DETT}\right) - \log\det\left({TINFO}\right) + {TEXQ}"),
    "reml_loglik": (f"-(n - 2)/2*log(2*pi) - 1/2*log{DETP} - 1/2*log(det({INFO})) - 1/2*{SUMQ}",
                    f"-n/2*log(2*pi) - 1/2*log{DETP} - 1/2*log(det({INFO})) - 1/2*{SUMQ}",
                    rf"-\frac{{n-2}}{{2}}\log(2\pi) - \frac12\log\left({DETT}\right) - \frac12\log\begin{{vmatrix}}"
                    rf"\frac{{4}}{{\sigma^2+2\sigma_s^2}} & \frac{{2}}{{\sigma^2+2\sigma_s^2}}\\ \frac{{2}}{{\sigma^2+2\sigma_s^2}}"
                    rf" & \frac{{2(\sigma^2+\sigma_s^2)}}{{\sigma^2(\sigma^2+2\sigma_s^2)}}\end{{vmatrix}} - \frac12 {TEXQ}",
                    rf"-\frac{{n-2}}{{2}}\log(2\pi) - \frac12\log\left({DETT}\right) - \frac12 {TEXQ}"),
    "conditional_modes": (MODES, MODES.replace("2*beta_0 - beta_1)]]", "2*beta_0)]]"), TMODES,
                          TMODES.replace(r"2\beta_0-\beta_1)\end", r"\beta_0-\beta_1)\end")),
}


def test_the_hand_written_table_covers_every_quantity():
    assert set(QUANTITIES) <= set(HAND)


@pytest.mark.parametrize("quantity", sorted(HAND))
@pytest.mark.parametrize("syntax", ["plain", "latex"])
def test_every_quantity_by_hand(toy, quantity, syntax):
    plain_ok, plain_bad, latex_ok, latex_bad = HAND[quantity]
    ok, bad = (plain_ok, plain_bad) if syntax == "plain" else (latex_ok, latex_bad)
    assert lmm.expression.detect_syntax(ok) == syntax
    v = _equal(toy, quantity, ok)
    plugged = "beta" not in ok and any(b.name in sp.sstr(derived_quantity(toy, quantity)) for b in toy.symbols.beta)
    assert ("beta_hat" in (v.hint or "")) == (plugged and quantity not in ("gls_estimator",)), v.hint
    _wrong(toy, quantity, bad)


# ============================ 3. every quantity on four designs, as sympy prints it (plain and LaTeX)
def _perturbed(e):
    """A wrong answer: the quantity times 1001/1000 (a matrix: its first entry, plus 1/1000)."""
    if isinstance(e, sp.MatrixBase):
        e = sp.Matrix(e)
        e[0, 0] = e[0, 0] * sp.Rational(1001, 1000) + sp.Rational(1, 1000)
        return e
    return e * sp.Rational(1001, 1000)


SCORES = ["score_sigma", "score_sigma2", "score_beta_0"]
DESIGN_QUANTITIES = {
    "toy": list(QUANTITIES) + SCORES + ["score_sigma_s", "score_sigma_s2", "score_beta_1"],
    "unbalanced": [q for q in QUANTITIES if q not in ("profiled_loglik", "ml_sigma2", "ml_sigma_s2", "reml_sigma2",
                                                      "reml_sigma_s2")] + SCORES + ["score_sigma_s", "score_beta_1"],
    "balanced": list(QUANTITIES) + SCORES + ["score_sigma_s", "score_sigma_s2"],
    # the slope model: every quantity whose printed text is at most MAX_LENGTH characters (see below)
    "slope": ["det", "logdet", "quadratic_form", "loglik", "sigma", "kinship", "gls_information", "gls_estimator",
              "beta_covariance", "deviance", "likelihood", "score_beta_0", "score_beta_1"],
    # two random terms (1|g) + (1|h): names sigma_g_Intercept / sigma_1, sigma_h_Intercept / sigma_2
    "crossed": ["det", "logdet", "quadratic_form", "sigma", "kinship", "gls_information", "gls_estimator",
                "beta_covariance", "loglik", "score_beta_0"],
}
#: about 10 s each (the REML criterion's |X^T Sigma^-1 X| of the slope model cancelled exactly)
SLOW = [("slope", "reml_loglik"), ("slope", "reml_criterion")]
CASES = [(d, q) for d, qs in DESIGN_QUANTITIES.items() for q in qs] + \
    [pytest.param(d, q, marks=pytest.mark.slow) for d, q in SLOW]


@pytest.mark.parametrize("design, quantity", CASES, ids=[f"{d}-{q}" for d, qs in DESIGN_QUANTITIES.items() for q in qs]
                         + [f"{d}-{q}" for d, q in SLOW])
def test_every_quantity_on_every_design(designs, design, quantity):
    """Correct and wrong, plain and LaTeX; a text longer than MAX_LENGTH (the slope model's LaTeX score) is
    refused as too long, and at least one syntax is checked."""
    der = designs[design]
    e = derived_quantity(der, quantity)
    checked = 0
    for value, check in ((e, _equal), (_perturbed(e), _wrong)):
        plain = sp.sstr(value.tolist() if isinstance(value, sp.MatrixBase) else value)
        latex = sp.latex(value, symbol_names=der.symbols.latex_names)
        for text in (plain, latex):
            if len(text) > MAX_LENGTH:
                with pytest.raises(lmm.ExpressionError, match="too long"):
                    lmm.verify(der, quantity, text)
                continue
            check(der, quantity, text)
            checked += 1
    assert checked >= 2


def test_a_score_in_a_parameter_the_model_does_not_have_is_refused(designs):
    with pytest.raises(lmm.ExpressionError, match="not a parameter"):
        lmm.verify(designs["slope"], "score_sigma_s", "0")


@pytest.mark.parametrize("design, quantity", [(d, q) for d in ("unbalanced", "slope") for q in
                                              ("ml_sigma2", "ml_sigma_s2", "reml_sigma2", "reml_sigma_s2")] +
                         [("slope", "conditional_modes")])
def test_closed_forms_where_they_do_not_exist_are_refused_clearly(designs, design, quantity):
    with pytest.raises(lmm.ModelError, match="balanced|one random intercept"):
        lmm.verify(designs[design], quantity, "1")


def test_slope_quantities_too_long_to_paste_are_refused_not_misjudged(designs):
    """The slope model's Sigma^-1 and score in sigma are longer than MAX_LENGTH when printed in full: the
    text is refused (exit 2 on the command line), never read in part."""
    der = designs["slope"]
    for q in ("inverse", "score_sigma"):
        e = derived_quantity(der, q)
        text = sp.sstr(e.tolist() if isinstance(e, sp.MatrixBase) else e)
        assert len(text) > MAX_LENGTH
        with pytest.raises(lmm.ExpressionError, match="too long"):
            lmm.verify(der, q, text)


# ---------------------------------------------------------------- the slope model's names, short and long
def test_slope_names_long_and_short_both_syntaxes(designs):
    der = designs["slope"]
    names = symbol_table(der)
    for n in ("sigma_g_Intercept", "sigma_g_x", "rho_g_Intercept_x", "sigma_0", "sigma_1", "rho"):
        assert n in names
    det = sp.sstr(der.det)
    short = det.replace("rho_g_Intercept_x", "rho").replace("sigma_g_Intercept", "sigma_0").replace("sigma_g_x", "sigma_1")
    tex = sp.latex(der.det).replace(r"\rho_{g Intercept x}", r"\rho").replace(r"\sigma_{g Intercept}", r"\sigma_0") \
        .replace(r"\sigma_{g x}", r"\sigma_1")
    assert r"\sigma_0" in tex and r"\rho" in tex
    for text in (det, short, tex, "σ⁶" + short[len("sigma**6"):] if short.startswith("sigma**6") else short):
        _equal(der, "det", text)
    _wrong(der, "det", short.replace("rho**2", "rho"))
    pasted = short.replace("sigma_0", "σ₀").replace("sigma_1", "σ₁").replace("rho", "ρ").replace("**", "^")
    _equal(der, "det", pasted)
    _wrong(der, "det", pasted.replace("ρ^2", "ρ"))
    _wrong(der, "det", tex.replace(r"\sigma^{6}", r"\sigma^{4}", 1))
    # the block form: |Sigma| = prod_j |sigma^2 I + Z_j D Z_j^T|, D from sigma_0, sigma_1, rho
    block = ("Product(det([[sigma^2 + sigma_0^2, sigma_0^2 + rho*sigma_0*sigma_1, sigma_0^2 + 2*rho*sigma_0*sigma_1],"
             " [sigma_0^2 + rho*sigma_0*sigma_1, sigma^2 + sigma_0^2 + 2*rho*sigma_0*sigma_1 + sigma_1^2, sigma_0^2 + "
             "3*rho*sigma_0*sigma_1 + 2*sigma_1^2], [sigma_0^2 + 2*rho*sigma_0*sigma_1, sigma_0^2 + 3*rho*sigma_0*sigma_1"
             " + 2*sigma_1^2, sigma^2 + sigma_0^2 + 4*rho*sigma_0*sigma_1 + 4*sigma_1^2]]), (j, 1, G))")
    _equal(der, "det", block)
    _wrong(der, "det", block.replace("4*sigma_1^2]]", "3*sigma_1^2]]"))


def test_names_printed_by_derive_json_are_accepted_for_a_slope_model(tmp_path, capsys):
    import json
    path = tmp_path / "slope.csv"
    SLOPE.to_csv(path, index=False)
    assert main(["derive", str(path), "y ~ x + (x|g)", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    der = lmm.derive("y ~ x + (x|g)", SLOPE)
    for key in ("det", "loglik"):
        _equal(der, key, shown[key])
    for name in shown["symbols"]["variance"]:
        assert name in symbol_table(der)


# ====================================================================== 4. step by step, every design
def test_steps_on_every_random_intercept_design(designs):
    for name in ("toy", "unbalanced", "balanced"):
        der = designs[name]
        det = der.det
        lines = [sp.sstr(det), sp.sstr(sp.expand(det)), sp.latex(sp.factor(det)), sp.sstr(sp.expand(det) + 1)]
        r = lmm.verify_steps(der, "det", lines)
        assert r.equal_lines == (1, 2, 3) and r.first_break == 4 and r.step.counterexample, name


def test_steps_in_a_derivation_as_written(toy):
    lines = [r"|\Sigma| = \prod_{j=1}^{G}\sigma^{2(m_j-1)}(\sigma^2+m_j\sigma_s^2)",
             r"&= \sigma^2(\sigma^2+2\sigma_s^2)\cdot\sigma^2(\sigma^2+2\sigma_s^2) \\",
             "= σ⁴(σ²+2σs²)²",
             "= sigma^8 + 4 sigma^6 sigma_s^2 + 4 sigma^4 sigma_s^4"]
    r = lmm.verify_steps(toy, "det", lines)
    assert r.first_break is None and r.equal_lines == (1, 2, 3, 4)
    bad = lines[:3] + ["= sigma^8 + 4 sigma^6 sigma_s^2 + 2 sigma^4 sigma_s^4 = sigma^8"]
    r = lmm.verify_steps(toy, "det", bad)
    assert r.first_break == 4 and r.step.counterexample and "line 3 -> line 4" in str(r)
    inner = lines[:3] + ["= sigma^8 + 4 sigma^6 sigma_s^2 + 4 sigma^4 sigma_s^4 = sigma^8"]
    r = lmm.verify_steps(toy, "det", inner)
    assert r.first_break == 4 and "inside line 4" in str(r) and r.equal_lines == (1, 2, 3)


def test_steps_compare_lines_mathematically_after_plug_ins(toy):
    """A step from log L(beta) to log L(beta_hat) is a substitution, not a break; a wrong substitution is."""
    ll, pl = HAND["loglik"][0], HAND["profiled_loglik"][0]
    r = lmm.verify_steps(toy, "loglik", [ll, pl])
    assert r.first_break is None and r.equal_lines == (1, 2)
    r = lmm.verify_steps(toy, "loglik", [ll, HAND["profiled_loglik"][1]])
    assert r.first_break == 2 and r.step.counterexample and r.equal_lines == (1,)
    y = {f"y_{k}": v for k, v in zip(("11", "21", "12", "22"), (10, 25, 3, 6))}
    numbers = HAND["ml_sigma2"][0]
    for k, v in y.items():
        numbers = numbers.replace(k, str(v))
    r = lmm.verify_steps(toy, "ml_sigma2", [HAND["ml_sigma2"][0], numbers, "(10 - 3 - 25 + 6)^2/8", "18"])
    assert r.first_break is None and r.equal_lines == (1, 2, 3, 4)
    r = lmm.verify_steps(toy, "ml_sigma2", [HAND["ml_sigma2"][0], numbers, "19"])
    assert r.first_break == 3


def test_steps_with_matrices_are_not_proved_by_the_inverse_rule(toy):
    """Two different matrix lines for Sigma^-1: the step is broken even though line 2 is the inverse."""
    r = lmm.verify_steps(toy, "inverse", [IDENT4, HAND["inverse"][0]])
    assert r.equal_lines == (2,) and r.first_break == 2 and r.step.counterexample


def test_steps_from_the_command_line_both_syntaxes(tmp_path, capsys):
    f = tmp_path / "derivation.txt"
    f.write_text("\n".join([HAND["loglik"][2], HAND["loglik"][0], HAND["deviance"][0].replace("n*", "-n/2*")]),
                 encoding="utf-8")
    assert main(["verify", "toy", TOY, "--quantity", "loglik", "--steps", str(f)]) == 1
    out = capsys.readouterr().out
    assert "line 1: equal" in out and "line 2: equal" in out and "line 2 -> line 3" in out
    f.write_text("\n".join([HAND["loglik"][2], HAND["loglik"][0]]), encoding="utf-8")
    assert main(["verify", "toy", TOY, "--quantity", "loglik", "--steps", str(f), "--json"]) == 0


# ============================================================================== 5. near misses
@pytest.mark.parametrize("quantity, extra", [
    ("det", " + 10^(-30)"), ("det", " + 1e-30*sigma"), ("loglik", " + 1e-30"), ("loglik", " + 1e-30*log(3)"),
    ("loglik", " + 10^(-30)*pi"), ("likelihood", "*(1 + 1e-30)"), ("reml_sigma2", " + 1e-30"),
    ("inverse", None),
])
def test_near_misses_get_an_exact_counterexample(toy, quantity, extra):
    e = derived_quantity(toy, quantity)
    if extra is None:
        e = sp.Matrix(e)
        e[1, 0] += sp.Rational(1, 10**30)
        text = sp.sstr(e.tolist())
    else:
        text = sp.sstr(e) + extra
    v = _wrong(toy, quantity, text)
    ce = v.counterexample
    assert ce["expected"] != ce["given"]          # shown exactly when floats cannot tell them apart


# ====================================================================== 6. the exercise generator
@pytest.mark.parametrize("seed, groups, sizes", [(0, 2, None), (7, 3, [2, 2, 2]), (11, 3, [2, 3, 4])])
def test_exercise_solutions_verify_in_both_syntaxes_and_perturbed_ones_do_not(seed, groups, sizes):
    from lmm_symbolic.exercises import exercise
    ex = exercise(seed, groups, sizes)
    keys = [k for k, _, _ in ex.questions]
    assert {"det", "quadratic_form", "gls_estimator", "loglik", "conditional_modes"} <= set(keys)
    assert ("reml_sigma2" in keys) == (sizes is None or len(set(sizes)) == 1)
    for key, _, solution in ex.questions:
        plain = sp.sstr(solution.tolist() if isinstance(solution, sp.MatrixBase) else solution)
        latex = sp.latex(solution, symbol_names=ex.derivation.symbols.latex_names)
        _equal(ex.derivation, key, plain)
        _equal(ex.derivation, key, latex)
        bad = _perturbed(solution)
        _wrong(ex.derivation, key, sp.sstr(bad.tolist() if isinstance(bad, sp.MatrixBase) else bad))
    tex = ex.to_latex()
    assert tex.count(r"\item") == 2 * len(ex.questions)


def test_exercise_from_the_command_line_and_its_tex_solutions_verify(tmp_path):
    from lmm_symbolic.exercises import exercise
    stem = str(tmp_path / "ex")
    assert main(["exercise", "--seed", "5", "--out", stem]) == 0
    assert main(["exercise", "--seed", "5", "--groups", "3", "--sizes", "2", "3", "1", "--out", stem + "u"]) == 0
    tex = (tmp_path / "ex.tex").read_text(encoding="utf-8")
    solutions = tex.split(r"\subsection*{Solutions}")[1]
    items = [s.split("$", 2)[1].replace(r"\displaystyle", "") for s in solutions.split(r"\item")[1:]]
    ex = exercise(5)
    assert len(items) == len(ex.questions)
    data = pd.read_csv(stem + ".csv")
    assert data.equals(ex.data)
    for (key, _, _), item in zip(ex.questions, items):
        _equal(ex.derivation, key, item)
        code = main(["verify", stem + ".csv", ex.formula, "--quantity", key, "--expr", item])
        assert code == 0, (key, item)
    import nbformat
    nb = nbformat.read(stem + ".ipynb", as_version=4)
    assert sum("lmm.verify(d" in c.source for c in nb.cells if c.cell_type == "code") == len(ex.questions)


# ========================================================================== 7. bad input, bounded
def _cli(*args, timeout=120):
    env = dict(os.environ, PYTHONPATH=ROOT)
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "lmm_symbolic.cli", *args], capture_output=True, text=True,
                       timeout=timeout, env=env, cwd=ROOT)
    return p.returncode, p.stderr, time.time() - t0


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_as_data_or_steps_file_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    code, err, _ = _cli("verify", str(fifo), "y ~ x + (1|g)", "--quantity", "det", "--expr", "1", timeout=60)
    assert code == 2 and "not a regular file" in err
    code, err, _ = _cli("verify", "toy", TOY, "--quantity", "det", "--steps", str(fifo), timeout=60)
    assert code == 2 and "not a regular file" in err


@pytest.mark.parametrize("formula, says", [
    ("Resp ~ Treat + " + " + ".join(["(1|Ind)"] * 100), "random-effect terms"),
    ("Resp ~ Treat + (1|Ind) + (1|Ind)", "appears 2 times"),
    ("Resp ~ " + " + ".join(["Treat"] * 400) + " + (1|Ind)", "longer than"),
    ("Resp ~ I(" + "(" * 900 + "Treat" + ")" * 900 + ") + (1|Ind)", "nested"),
])
def test_hostile_formulas_exit_2_in_bounded_time(formula, says, capsys):
    t0 = time.time()
    assert main(["verify", "toy", formula, "--quantity", "det", "--expr", "1"]) == 2
    assert says in capsys.readouterr().err and time.time() - t0 < 60


def test_a_term_repeated_100_times_is_read_once(capsys):
    """`Treat` written 100 times is one fixed effect (as R's model.frame reads it), in bounded time."""
    formula = "Resp ~ " + " + ".join(["Treat"] * 100) + " + (1|Ind)"
    assert main(["verify", "toy", formula, "--quantity", "det", "--expr", "σ⁴(σ²+2σs²)²"]) == 0


@pytest.mark.parametrize("text", [
    "(" * 100_000 + "sigma" + ")" * 100_000, "9**9**9**9", "exp(exp(exp(sigma)))", "__import__('os').system('true')",
    "(lambda: 1)()", "sigma.__class__", "[x for x in (1,)]", "Sum(sigma, (j, 1, 10**9))", "sum_{j=1}^{999999} sigma",
    r"\sum_{j=1}^{999999}\sigma", "Sum(Sum(Sum(sigma, (i, 1, 99)), (k, 1, 99)), (l, 1, 99))", "1" * 200,
    "sigma**(10**6)", "x" * (MAX_LENGTH + 1), "Product((sigma + j)**1000, (j, 1, 500))", "Sum(sigma, (j, 1, G), x=1)",
])
def test_hostile_expressions_are_refused_quickly(toy, text):
    t0 = time.time()
    with pytest.raises(lmm.ExpressionError):
        lmm.verify(toy, "det", text)
    assert time.time() - t0 < 10


def test_hostile_expression_on_the_command_line_exits_2():
    code, err, seconds = _cli("verify", "toy", TOY, "--quantity", "det", "--expr", "-" + "(" * 4000 + "1" + ")" * 4000)
    assert code == 2 and "nested" in err


def test_plain_sums_read_what_latex_sums_read(toy):
    names = symbol_table(toy)
    sizes = {"n": 4, "G": 2, "m": [2, 2]}
    pairs = [("Sum(k^2, (k, 1, 4))", r"\sum_{k=1}^{4} k^2"), ("Product(k, (k, 1, 5))", r"\prod_{k=1}^{5} k"),
             ("Sum(y_ij, (i, 1, m_j), (j, 1, G))", r"\sum_{j=1}^{G}\sum_{i=1}^{m_j} y_{ij}"),
             ("sum_{j=1}^{G} u_j", r"\sum_{j=1}^{G} u_j"), ("Sum(sigma, (j, 3, 2))", r"\sum_{j=3}^{2} \sigma"),
             ("prod_(j=1)^G (sigma^2 + m_j sigma_s^2)", r"\prod_{j=1}^{G}(\sigma^2 + m_j\sigma_s^2)")]
    for plain, latex in pairs:
        assert parse_expression(plain, names, None, sizes) == parse_expression(latex, names, None, sizes), plain


# ================================================== 8. answers with beta_hat or the data's y plugged in
PLUGGED = ["quadratic_form", "loglik", "likelihood", "deviance", "reml_criterion", "conditional_modes", "score_sigma"]


@pytest.mark.parametrize("design", ["toy", "unbalanced"])
@pytest.mark.parametrize("quantity", PLUGGED)
def test_answers_with_beta_hat_or_y_plugged_in(designs, design, quantity):
    """With beta = beta_hat substituted, and with the data's y values as well: equal, the hint saying what
    was substituted; the same answer off by a factor 1001/1000 gets a counterexample and the same note."""
    der = designs[design]
    e = derived_quantity(der, quantity)
    beta_hat = derived_quantity(der, "gls_estimator")
    at_hat = dict(zip(der.symbols.beta, list(beta_hat)))
    at_y = {y: sp.Rational(repr(float(v))) for y, v in zip(der.symbols.y, der.design.y)}
    sub = (lambda x, at: x.xreplace(at)) if not isinstance(e, sp.MatrixBase) else \
        (lambda x, at: x.applyfunc(lambda c: c.xreplace(at)))
    for at, note in ((at_hat, "beta_hat"), ({**at_hat}, "y values")):
        value = sub(e, at_hat)
        if note == "y values":
            value = sub(value, at_y)
        for val, check in ((value, _equal), (_perturbed(value), _wrong)):
            plain = sp.sstr(val.tolist() if isinstance(val, sp.MatrixBase) else val)
            latex = sp.latex(val, symbol_names=der.symbols.latex_names)
            for text in (plain, latex):
                if len(text) > MAX_LENGTH:
                    continue
                v = check(der, quantity, text)
                assert note in v.hint, v.hint
