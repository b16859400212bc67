"""The lmm-symbolic command: derive, fit and demo (error paths: tests/test_cli_errors.py)."""
import json
import subprocess
import sys

import pytest
import sympy as sp

from lmm_symbolic.cli import main


def test_derive_json_gives_the_two_closed_forms(capsys):
    assert main(["derive", "toy", "Resp ~ Treat + (1|Ind)", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    names = {k: sp.Symbol(k) for k in ["sigma", "sigma_s", *out["symbols"]["y"], *out["symbols"]["beta"]]}
    s, ss = names["sigma"], names["sigma_s"]
    assert sp.expand(sp.sympify(out["det"], locals=names) - s**4 * (s**2 + 2 * ss**2) ** 2) == 0
    q = sp.sympify(out["quadratic_form"], locals=names)
    assert sp.fraction(sp.factor(q))[1] == s**2 * (s**2 + 2 * ss**2)
    assert [e["number"] for e in out["equations"]] == list(range(1, 13))
    assert all(e["latex"] and e["title"] for e in out["equations"])


def test_derive_latex_writes_a_document(tmp_path, capsys):
    target = tmp_path / "toy.tex"
    assert main(["derive", "toy", "Resp ~ Treat + (1|Ind)", "--latex", str(target)]) == 0
    assert target.read_text().startswith(r"\documentclass")


def test_fit_json_ml_and_default_reml(capsys):
    assert main(["fit", "toy", "Resp ~ Treat + (1|Ind)", "--ml", "--json"]) == 0
    ml = json.loads(capsys.readouterr().out)
    assert ml["method"] == "ML" and ml["exact"] == {"sigma2": "18", "sigma_s2": "133/4"}
    assert main(["fit", "toy", "Resp ~ Treat + (1|Ind)", "--json"]) == 0
    reml = json.loads(capsys.readouterr().out)
    assert reml["method"] == "REML"
    treat = reml["fixed_effects"][1]
    assert treat["name"] == "Treat" and treat["t_value"] == pytest.approx(1.5)
    assert treat["p_value"] == pytest.approx(0.374334, abs=1e-6)


def test_demo_runs_as_a_module():
    res = subprocess.run([sys.executable, "-m", "lmm_symbolic", "demo"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    for part in ("Eq. 1:", "Eq. 12:", "sigma^2 = 18,  sigma_s^2 = 133/4", "sigma^2 = 36,  sigma_s^2 = 133/2",
                 "t = 1.5, df = 1, p-value = 0.3743"):
        assert part in res.stdout


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["fit", str(tmp_path / "missing.csv"), "y ~ x + (1|g)"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not found" in err and "Traceback" not in err


def test_fit_json_is_standard_json_for_crossed_factors(capsys):
    """nlme's df do not exist for crossed factors: null, not NaN, which strict JSON parsers reject."""
    assert main(["fit", "Penicillin", "diameter ~ 1 + (1|plate) + (1|sample)", "--json"]) == 0

    def refuse(token):
        raise ValueError(f"{token} is not JSON")

    out = json.loads(capsys.readouterr().out, parse_constant=refuse)
    (fixed,) = out["fixed_effects"]
    assert fixed["df"] is None and fixed["p_value"] is None
    assert fixed["df_satterthwaite"] == pytest.approx(5.4870, rel=1e-4)      # lmerTest: 5.48709
    assert [r["group"] for r in out["random_effects"]] == ["plate", "sample", "Residual"]
