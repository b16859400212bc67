"""Issue 15: determinants (\\det, vmatrix, |A|, det(...)), sums and products with limits (\\sum_{j=1}^{G},
\\prod, the unicode signs), the closed-form ML/REML estimates and the conditional modes as quantities, and
answers with beta_hat or the data's y values plugged in -- each with a correct and a wrong answer, in both
syntaxes where the notation has both."""
from __future__ import annotations

import pandas as pd
import pytest
import sympy as sp

import lmm_symbolic as lmm
from lmm_symbolic.expression import MAX_DET_DIM, MAX_EXPANDED_TERMS, parse_expression  # noqa: F401
from lmm_symbolic.verification import derived_quantity


@pytest.fixture(scope="module")
def toy():
    return lmm.derive("Resp ~ Treat + (1|Ind)", lmm.datasets.load("toy"))


@pytest.fixture(scope="module")
def balanced():
    """3 groups of 2, intercept only: REML sigma^2 = MSW = 11/12, sigma_s^2 = (MSB - MSW)/2 = 15/16; ML
    sigma_s^2 = 17/36 (the fit's exact estimates)."""
    d = pd.DataFrame({"y": [1.0, 2.5, 4.0, 3.0, 0.5, 2.0], "g": ["a", "a", "b", "b", "c", "c"]})
    return lmm.derive("y ~ 1 + (1|g)", d), d


BLOCK = r"\sigma^2+\sigma_s^2 & \sigma_s^2 \\ \sigma_s^2 & \sigma^2+\sigma_s^2"
SIGMA = (r"\begin{pmatrix} \sigma^2+\sigma_s^2 & \sigma_s^2 & 0 & 0\\ \sigma_s^2 & \sigma^2+\sigma_s^2 & 0 & 0\\ "
         r"0&0&\sigma^2+\sigma_s^2 & \sigma_s^2 \\ 0&0&\sigma_s^2 & \sigma^2+\sigma_s^2\end{pmatrix}")
PLAIN_BLOCK = "[[sigma**2 + sigma_s**2, sigma_s**2], [sigma_s**2, sigma**2 + sigma_s**2]]"


# ---------------------------------------------------------------------------------- determinants
@pytest.mark.parametrize("text", [
    r"\det " + SIGMA, r"\det\left(" + SIGMA + r"\right)", r"\left|" + SIGMA + r"\right|", "|" + SIGMA + "|",
    SIGMA.replace("pmatrix", "vmatrix"),
    r"\left(\begin{vmatrix}" + BLOCK + r"\end{vmatrix}\right)^2",
    r"\det\begin{pmatrix}" + BLOCK + r"\end{pmatrix} \cdot \det\begin{pmatrix}" + BLOCK + r"\end{pmatrix}",
    f"det({PLAIN_BLOCK})**2", f"abs(Matrix({PLAIN_BLOCK}))**2", f"det({PLAIN_BLOCK}) * det({PLAIN_BLOCK})",
])
def test_determinant_notations_are_the_determinant(toy, text):
    assert lmm.verify(toy, "det", text).equal


@pytest.mark.parametrize("text", [
    r"\begin{vmatrix}" + BLOCK + r"\end{vmatrix}",                                # one block, not both
    r"\left(\begin{vmatrix} \sigma^2 & \sigma_s^2 \\ \sigma_s^2 & \sigma^2 \end{vmatrix}\right)^2",
    f"det({PLAIN_BLOCK})**2 + sigma**2",
])
def test_a_wrong_determinant_gets_a_counterexample(toy, text):
    v = lmm.verify(toy, "det", text)
    assert not v.equal and v.counterexample is not None


def test_determinants_are_bounded():
    n = MAX_DET_DIM + 1
    big = "[" + ", ".join("[" + ", ".join("a" if i == j else "0" for j in range(n)) + "]" for i in range(n)) + "]"
    with pytest.raises(lmm.ExpressionError, match=f"at most {MAX_DET_DIM} rows"):
        parse_expression(f"det({big})", {"a": sp.Symbol("a")})
    with pytest.raises(lmm.ExpressionError, match="square"):
        parse_expression("det([[a, a]])", {"a": sp.Symbol("a")})


# ----------------------------------------------------------------------------- sums and products
@pytest.mark.parametrize("q, text", [
    ("det", r"\prod_{j=1}^{G} \sigma^{2(m_j-1)}(\sigma^2 + m_j\sigma_s^2)"),
    ("det", "∏_{j=1}^{G} σ^{2(m_j-1)}(σ^2 + m_j σ_s^2)"),
    ("det", r"\prod_{j=1}^{2} \sigma^{2}\left(\sigma^2 + 2\sigma_s^2\right)"),
    ("logdet", r"\sum_{j=1}^{G} \left( (m_j-1)\log\sigma^2 + \log(\sigma^2 + m_j\sigma_s^2) \right)"),
    ("logdet", r"∑_{j=1}^{G} \left( (m_j-1)\log\sigma^2 + \log(\sigma^2 + m_j\sigma_s^2) \right)"),
    ("logdet", r"(n - G)\log\sigma^2 + \sum_{j=1}^{G}\log(\sigma^2 + m_j\sigma_s^2)".replace("n - G", "4 - 2")),
    ("quadratic_form", r"\frac{1}{\sigma^2}\sum_{j=1}^{G}\left(\sum_{i=1}^{m_j} (y_{ij} - \beta_0 - (i-1)\beta_1)^2"
                       r" - \frac{\sigma_s^2}{\sigma^2 + m_j\sigma_s^2}\left(\sum_{i=1}^{m_j}(y_{ij} - \beta_0 - "
                       r"(i-1)\beta_1)\right)^2\right)"),
    ("quadratic_form", r"\frac{1}{\sigma^2}\sum_{j=1}^{G}\left(\sum_{i=1}^{m_j} (y_{i,j} - \beta_0 - (i-1)\beta_1)^2"
                       r" - \frac{\sigma_s^2}{\sigma^2 + m_j\sigma_s^2}\left(\sum_{i=1}^{m_j}(y_{i,j} - \beta_0 - "
                       r"(i-1)\beta_1)\right)^2\right)"),
])
def test_sums_and_products_over_groups_and_observations(toy, q, text):
    assert lmm.verify(toy, q, text).equal


@pytest.mark.parametrize("q, text", [
    ("det", r"\prod_{j=1}^{G} \sigma^{2}(\sigma^2 + 3\sigma_s^2)"),
    ("det", r"\prod_{j=1}^{G} \sigma^{2 m_j}(\sigma^2 + m_j\sigma_s^2)"),
    ("logdet", r"\sum_{j=1}^{G} \left( m_j\log\sigma^2 + \log(\sigma^2 + m_j\sigma_s^2) \right)"),
    ("quadratic_form", r"\sum_{j=1}^{G}\sum_{i=1}^{m_j} \frac{(y_{ij} - \beta_0 - (j-1)\beta_1)^2}{\sigma^2}"),
])
def test_a_wrong_sum_gets_a_counterexample(toy, q, text):
    v = lmm.verify(toy, q, text)
    assert not v.equal and v.counterexample is not None


def test_the_index_is_a_number_in_the_body():
    assert parse_expression(r"\sum_{k=1}^{4} k^2", {}, "latex") == 30
    assert parse_expression(r"\prod_{k=1}^{5} k", {}, "latex") == 120


@pytest.mark.parametrize("text, says", [
    (r"\sum_{j=1}^{100000} \sigma", f"more than {MAX_EXPANDED_TERMS} terms"),
    (r"\sum_{j=1}^{G}\sum_{k=1}^{999}\sum_{l=1}^{999} \sigma", f"more than {MAX_EXPANDED_TERMS} terms"),
    (r"\sum_{j=1}^{400} \left(" + " + ".join([r"\sigma"] * 300) + r"\right)", "too long to expand"),
    (r"\sum_j \sigma", "needs its limits"),
    (r"\sum_{j=1} \sigma", "upper limit"),
    (r"\sum_{j=1}^{Q} \sigma", "a limit of a sum"),
    (r"\sum_{j=1}^{G} (m_j - 1)\log\sigma^2 + \log(\sigma^2 + m_j\sigma_s^2)", "outside the sum"),
    (r"\sum_{j=1}^{G}\sum_{j=1}^{2} \sigma", "not already in use"),
    (r"m_{7}", "no group 7"),
])
def test_bad_sums_are_refused_clearly(toy, text, says):
    with pytest.raises(lmm.ExpressionError, match=says):
        lmm.verify(toy, "logdet", text)


# ------------------------------------------------------------------- closed-form ML/REML estimates
MSW = "((y_11-y_21)**2 + (y_12-y_22)**2 + (y_13-y_23)**2)/6"
REML_S2 = (r"\frac{1}{2}\left(\sum_{j=1}^{G}\left(\frac{y_{1j}+y_{2j}}{2} - \frac{1}{6}\sum_{k=1}^{G}(y_{1k}+y_{2k})"
           r"\right)^2 - \frac{1}{3}\sum_{j=1}^{G}\frac{(y_{1j}-y_{2j})^2}{2}\right)")
ML_S2 = (r"\frac{1}{2}\left(\frac{2}{3}\sum_{j=1}^{G}\left(\frac{y_{1j}+y_{2j}}{2} - \frac{1}{6}\sum_{k=1}^{G}"
         r"(y_{1k}+y_{2k})\right)^2 - \frac{1}{3}\sum_{j=1}^{G}\frac{(y_{1j}-y_{2j})^2}{2}\right)")


@pytest.mark.parametrize("q, text", [("reml_sigma2", MSW), ("ml_sigma2", MSW), ("reml_sigma_s2", REML_S2),
                                     ("ml_sigma_s2", ML_S2), ("sigma2_reml", MSW.replace("**", "^"))])
def test_closed_form_estimates(balanced, q, text):
    der, _ = balanced
    assert lmm.verify(der, q, text).equal


@pytest.mark.parametrize("q, text", [("reml_sigma2", MSW.replace("/6", "/4")), ("ml_sigma_s2", REML_S2),
                                     ("reml_sigma_s2", ML_S2)])
def test_wrong_closed_form_estimates_get_a_counterexample(balanced, q, text):
    der, _ = balanced
    v = lmm.verify(der, q, text)
    assert not v.equal and v.counterexample is not None


@pytest.mark.parametrize("q, value", [("reml_sigma2", "11/12"), ("reml_sigma_s2", "15/16"), ("ml_sigma2", "11/12"),
                                      ("ml_sigma_s2", r"\frac{17}{36}")])
def test_estimates_at_the_data_equal_the_fits_exact_estimates(balanced, q, value):
    der, d = balanced
    fit = lmm.fit("y ~ 1 + (1|g)", d, method="REML" if q.startswith("reml") else "ML")
    exact = fit.exact.sigma2 if q.endswith("_sigma2") else fit.exact.sigma_s2
    assert sp.Rational(value.replace(r"\frac{17}{36}", "17/36")) == exact
    v = lmm.verify(der, q, value)
    assert v.equal and "y values substituted" in v.hint


def test_closed_forms_need_a_balanced_design(toy):
    d = pd.DataFrame({"y": [1.0, 2.5, 4.0, 3.0, 0.5], "g": ["a", "a", "b", "b", "b"]})
    with pytest.raises(lmm.ModelError, match="balanced"):
        lmm.verify(lmm.derive("y ~ 1 + (1|g)", d), "ml_sigma2", "1")


# --------------------------------------------------------------------------------- conditional modes
def _modes(m, centre="beta_0", bad_group=None):
    rows = []
    for j in (1, 2, 3):
        mj = m if j != bad_group else m - 1
        rows.append(f"[sigma_s**2/(sigma**2 + {mj}*sigma_s**2)*(y_1{j} + y_2{j} - 2*{centre})]")
    return "[" + ", ".join(rows) + "]"


def test_conditional_modes(balanced):
    der, _ = balanced
    assert lmm.verify(der, "conditional_modes", _modes(2)).equal
    latex = (r"\begin{pmatrix}" + r"\\".join(rf"\frac{{\sigma_s^2}}{{\sigma^2+2\sigma_s^2}}(y_{{1{j}}}+y_{{2{j}}}-2\beta_0)"
                                           for j in (1, 2, 3)) + r"\end{pmatrix}")
    assert lmm.verify(der, "u_hat", latex).equal
    v = lmm.verify(der, "conditional_modes", _modes(2, bad_group=3))
    assert not v.equal and v.counterexample["entry"] == [3, 1]


def test_conditional_modes_with_beta_hat_plugged_in(balanced):
    der, _ = balanced
    ybar = "(y_11 + y_21 + y_12 + y_22 + y_13 + y_23)/6"
    v = lmm.verify(der, "conditional_modes", _modes(2, centre=ybar))
    assert v.equal and "beta_hat" in v.hint
    w = lmm.verify(der, "conditional_modes", _modes(2, centre="(y_11 + y_21)/2"))
    assert not w.equal and "beta_hat" in w.hint and w.counterexample is not None


# ------------------------------------------------------------------------------------ plug-ins
def test_the_profiled_loglik_is_the_loglik_with_beta_hat(toy):
    profiled = derived_quantity(toy, "profiled_loglik")
    v = lmm.verify(toy, "loglik", sp.sstr(profiled))
    assert v.equal and "beta_hat" in v.hint


def test_numbers_for_y(toy):
    y = lmm.datasets.load("toy")["Resp"].tolist()
    q = derived_quantity(toy, "quadratic_form").xreplace(dict(zip(toy.symbols.y, [sp.Rational(str(v)) for v in y])))
    v = lmm.verify(toy, "quadratic_form", sp.sstr(q))
    assert v.equal and "y values substituted" in v.hint
    w = lmm.verify(toy, "quadratic_form", sp.sstr(q + 1 / sp.Symbol("sigma", positive=True) ** 2))
    assert not w.equal and "y values substituted" in w.hint and w.counterexample is not None


def test_an_answer_with_beta_and_y_is_compared_as_it_stands(toy):
    v = lmm.verify(toy, "quadratic_form", sp.sstr(toy.quadratic_form))
    assert v.equal and v.hint is None


def test_steps_with_sums_and_determinants(toy):
    lines = [r"\det " + SIGMA, r"\prod_{j=1}^{G} \left|\begin{pmatrix}" + BLOCK + r"\end{pmatrix}\right|",
             r"\prod_{j=1}^{G} \sigma^{2(m_j-1)}(\sigma^2 + m_j\sigma_s^2)",
             r"\prod_{j=1}^{G} \sigma^{2}(\sigma^2 + 3\sigma_s^2)"]
    report = lmm.verify_steps(toy, "det", lines)
    assert report.equal_lines == (1, 2, 3) and report.first_break == 4
    assert report.step.counterexample is not None
