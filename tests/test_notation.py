"""Issue 15: what people type -- Unicode pasted from a PDF, implicit products, Rational(a, b), the
names of slope models, near misses and a leading minus on the command line."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import sympy as sp

from lmm_symbolic import datasets
from lmm_symbolic.cli import main
from lmm_symbolic.derivation import derive
from lmm_symbolic.specification import specify
from lmm_symbolic.verification import symbol_table, verify

DET = "4*sigma_s**4*sigma**4 + 4*sigma_s**2*sigma**6 + sigma**8"


@pytest.fixture(scope="module")
def der():
    return derive(specify("Resp ~ Treat + (1|Ind)", datasets.load("toy")))


@pytest.mark.parametrize("text", [
    "σ⁴(σ²+2σs²)²", "σ⁴·(σ² + 2·σ_s²)²", "σ⁴ × (σ² + 2 σs²)²", "sigma^4 (sigma^2 + 2 sigma_s^2)^2",
    "sigma^4 (sigma^2 + 2sigma_s^2)(sigma^2 + 2 sigma_s^2)", "σ⁸ + 4σ⁶σs² + 4σ⁴σs⁴",
    "sigma^8 + 4 sigma^6 sigma_s^2 + Rational(4, 1) sigma^4 sigma_s^4",
    r"\sigma^4\left(σ²+2σs²\right)^2", r"σ⁴ \cdot (σ^2 + 2 \sigma_s^2)^2",
])
def test_pasted_and_implicit_forms_are_read(der, text):
    assert verify(der, "det", text).equal


@pytest.mark.parametrize("text", [
    "σ⁴(σ²+σs²)²", "sigma^4 (sigma^2 + 3 sigma_s^2)^2", "σ⁸ − 4σ⁶σs² + 4σ⁴σs⁴", r"σ⁴\left(σ²+σs²\right)^2",
])
def test_pasted_wrong_forms_get_a_counterexample(der, text):
    v = verify(der, "det", text)
    assert v.equal is False and v.counterexample is not None


def test_rational_and_minus_sign(der):
    rest = sp.sstr(der.loglik + 2 * sp.log(2 * sp.pi))
    assert verify(der, "loglik", f"Rational(-4, 2)*log(2*pi) + {rest}").equal
    assert verify(der, "loglik", f"−2·log(2π) + {rest}").equal
    assert verify(der, "loglik", f"Rational(-3, 2)*log(2*pi) + {rest}").counterexample


def test_a_near_miss_gets_a_counterexample(der):
    v = verify(der, "loglik", sp.sstr(der.loglik) + " + 1e-30*log(3)")
    assert v.equal is False and v.status == "different" and v.counterexample is not None


def test_leading_minus_on_the_command_line(capsys):
    ll = sp.sstr(derive(specify("Resp ~ Treat + (1|Ind)", datasets.load("toy"))).loglik)
    assert ll.startswith("-")
    assert main(["verify", "toy", "Resp ~ Treat + (1|Ind)", "--quantity", "loglik", "--expr", ll]) == 0
    assert main(["verify", "toy", "Resp ~ Treat + (1|Ind)", "--quantity", "loglik", f"--expr={ll}"]) == 0
    assert main(["verify", "toy", "Resp ~ Treat + (1|Ind)", "--quantity", "loglik", "--expr", ll + "+1"]) == 1
    assert "equal" in capsys.readouterr().out


@pytest.fixture(scope="module")
def slope():
    rng = np.random.default_rng(1)
    df = pd.DataFrame({"g": np.repeat(list("abc"), 4), "x": np.tile([0.0, 1, 2, 3], 3)})
    df["y"] = rng.normal(size=12)
    return derive(specify("y ~ x + (x|g)", df))


def test_every_name_derive_shows_is_accepted(slope):
    names = symbol_table(slope)
    for s in slope.variance_symbols:
        assert s.name in names
    assert verify(slope, "det", sp.sstr(slope.det)).equal
    wrong = verify(slope, "det", sp.sstr(slope.det) + " + sigma_g_Intercept")
    assert wrong.equal is False and "sigma_g_Intercept" in wrong.counterexample


def test_slope_kinship_is_z_z_transpose(slope):
    Z = sp.Matrix(slope.Z.toarray().astype(int))
    assert slope.kinship == Z * Z.T
    assert slope.kinship != sp.Matrix((slope.Z.toarray() != 0).astype(int)) * \
        sp.Matrix((slope.Z.toarray() != 0).astype(int)).T
    assert verify(slope, "kinship", sp.sstr((Z * Z.T).tolist())).equal


@pytest.mark.parametrize("text", [
    r"\sigma^4\bigl(\sigma^2+2\sigma_{\mathrm{s}}^2\bigr)^2",
    r"\sigma^4\Bigl(\sigma^2+2\sigma_{\text{s}}^2\Bigr)^2",
    r"\exp\left(\operatorname{log}(\sigma^4)\right)\biggl(\sigma^2+2\sigma_s^2\biggr)^2",
])
def test_latex_decorations_are_read(der, text):
    assert verify(der, "det", text).equal
    wrong = verify(der, "det", text.replace("+2", "+3"))
    assert wrong.equal is False and wrong.counterexample is not None


def test_comma_subscripts_name_the_observation(der):
    q = sp.sstr(der.quadratic_form)
    assert verify(der, "quadratic_form", q.replace("y_11", "y_1_1")).equal
    tex = sp.latex(der.quadratic_form).replace("y_{11}", "y_{1,1}")
    assert "y_{1,1}" in tex and verify(der, "quadratic_form", tex).equal
    assert verify(der, "quadratic_form", q.replace("y_11", "y_1_2")).counterexample is not None


def test_operatorname_refuses_other_functions(der):
    from lmm_symbolic.errors import ExpressionError
    with pytest.raises(ExpressionError, match="operatorname"):
        verify(der, "det", r"\operatorname{eval}(\sigma)")


STEPS = ["σ⁴(σ²+2σs²)²", "sigma^4 (sigma^4 + 4 sigma^2 sigma_s^2 + 4 sigma_s^4)",
         "sigma^8 + 4 sigma^6 sigma_s^2 + 2 sigma^4 sigma_s^4", "sigma^8 + 4 sigma^6 sigma_s^2 + 2 sigma^4 sigma_s^4"]


def test_verify_steps_finds_the_first_broken_step(der):
    from lmm_symbolic import verify_steps
    r = verify_steps(der, "det", STEPS)
    assert r.equal_lines == (1, 2) and r.first_break == 3
    assert r.step.counterexample is not None and "should be" in r.step.hint
    ok = verify_steps(der, "det", STEPS[:2] + [r"\sigma^8 + 4\sigma^6\sigma_s^2 + 4\sigma^4\sigma_s^4"])
    assert ok.first_break is None and ok.equal_lines == (1, 2, 3)


def test_steps_from_the_command_line(tmp_path, capsys):
    f = tmp_path / "steps.txt"
    f.write_text("\n".join(STEPS) + "\n", encoding="utf-8")
    code = main(["verify", "toy", "Resp ~ Treat + (1|Ind)", "--quantity", "det", "--steps", str(f)])
    out = capsys.readouterr().out
    assert code == 1 and "first broken step: line 2 -> line 3" in out
    f.write_text("\n".join(STEPS[:2]) + "\n", encoding="utf-8")
    assert main(["verify", "toy", "Resp ~ Treat + (1|Ind)", "--quantity", "det", "--steps", str(f), "--json"]) == 0


# ------------------------------------------------------------------- the quantities derived next
BETA_HAT = "[[(y_11+y_12)/2], [(y_21+y_22-y_11-y_12)/2]]"
BETA_HAT_TEX = (r"\begin{pmatrix} \frac{y_{11}+y_{12}}{2} \\ \frac{y_{21}+y_{22}-y_{11}-y_{12}}{2} "
                r"\end{pmatrix}")


@pytest.mark.parametrize("text", [BETA_HAT, BETA_HAT_TEX])
def test_gls_estimator_on_the_toy_data(der, text):
    assert verify(der, "gls_estimator", text).equal
    assert verify(der, "beta_hat", text.replace("y_21+", "y_21-").replace("y_{21}+", "y_{21}-")).counterexample


def test_gls_information_covariance_deviance_score_likelihood(der):
    from lmm_symbolic.verification import derived_quantity
    s, ss = sp.Symbol("sigma", positive=True), sp.Symbol("sigma_s", positive=True)
    info = derived_quantity(der, "gls_information")
    # X^T Sigma^-1 X cross-checked against dense sympy
    X = der.X_exact
    dense = (X.T * der.sigma_matrix.inv() * X).applyfunc(sp.simplify)
    assert (info - dense).applyfunc(sp.simplify) == sp.zeros(2, 2)
    assert verify(der, "gls_information", sp.sstr(dense.tolist())).equal
    assert verify(der, "beta_covariance", sp.sstr(dense.inv().tolist())).equal
    assert verify(der, "beta_covariance", sp.sstr(dense.tolist())).equal is False
    assert verify(der, "deviance", sp.sstr(-2 * der.loglik)).equal
    assert verify(der, "deviance", sp.sstr(-der.loglik)).counterexample
    assert verify(der, "reml_criterion", sp.sstr(-2 * der.reml_loglik)).equal
    assert verify(der, "score_sigma_s", sp.sstr(sp.diff(der.loglik, ss))).equal
    assert verify(der, "score_sigma2", sp.sstr(sp.diff(der.loglik, s) / (2 * s))).equal
    assert verify(der, "score_sigma", sp.sstr(sp.diff(der.loglik, ss))).counterexample
    assert verify(der, "likelihood", "exp(" + sp.sstr(der.loglik) + ")").equal
    assert verify(der, "likelihood", "exp(" + sp.sstr(der.loglik) + " + 1)").counterexample
    assert verify(der, "profiled_loglik", sp.sstr(derived_quantity(der, "profiled_loglik"))).equal
