"""Every bad input through the command line (issue 8): exit code 2, exactly one line on stderr, no traceback;
warnings one line each on stderr and in the JSON's ``messages``.

The cases are tests/test_errors.py's ``BAD_INPUTS``, run in-process through ``lmm_symbolic.cli.main`` (fast),
and a few of them as real ``lmm-symbolic`` processes.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lmm_symbolic.cli import main

_spec = importlib.util.spec_from_file_location("_bad_inputs", Path(__file__).with_name("test_errors.py"))
_bad = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bad)
BAD_INPUTS, frame, F = _bad.BAD_INPUTS, _bad.frame, _bad.F

RUNS = [(case, command) for case in BAD_INPUTS for command in case.commands]


def _one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err
    assert lines[0].startswith("lmm-symbolic: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("case, command", RUNS, ids=[f"{c.id}-{cmd}" for c, cmd in RUNS])
def test_bad_input_is_one_line_on_stderr_and_exit_2(case, command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = case.data(tmp_path)
    assert main([command, data, case.formula]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    line = _one_error_line(err)
    for part in case.says:
        assert part.lower() in line.lower(), (part, line)
    assert not (tmp_path / "PWNED").exists()


def test_unreadable_file(tmp_path, monkeypatch, capsys):
    import lmm_symbolic.specification as specification

    path = tmp_path / "data.csv"
    frame().to_csv(path, index=False)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", args[0])

    monkeypatch.setattr(specification, "open", refuse, raising=False)
    for command in ("fit", "derive"):
        assert main([command, str(path), F]) == 2
        assert "Permission denied" in _one_error_line(capsys.readouterr().err)


def test_unwritable_latex_output_is_an_error_not_a_traceback(tmp_path, capsys):
    assert main(["derive", "toy", "Resp ~ Treat + (1|Ind)", "--latex", str(tmp_path / "no" / "eq.tex")]) == 2
    assert "check the path" in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("command", ["fit", "derive"])
def test_na_rows_warn_one_line_and_the_json_says_so(command, tmp_path, capsys):
    df = frame(groups=6, per=5, seed=3)
    df.loc[[0, 9], "y"] = np.nan
    df.loc[14, "x"] = np.nan
    path = tmp_path / "na.csv"
    df.to_csv(path, index=False)
    assert main([command, str(path), F, "--json"]) == 0
    out, err = capsys.readouterr()
    message = "3 row(s) with missing values dropped (27 of 30 used): x missing in 1; y missing in 2"
    assert err == f"lmm-symbolic: warning: {message}\n"
    result = json.loads(out)
    if command == "fit":
        assert result["n_obs"] == 27
        assert result["messages"] == [message]
    else:
        assert len(result["symbols"]["y"]) == 27


def test_aliased_column_warns_one_line_naming_it(tmp_path, capsys):
    df = frame(groups=6, per=5, seed=3)
    df["x2"] = 2 * df["x"]
    path = tmp_path / "aliased.csv"
    df.to_csv(path, index=False)
    assert main(["fit", str(path), "y ~ x + x2 + (1|g)", "--json"]) == 0
    out, err = capsys.readouterr()
    message = "fixed-effect model matrix is rank deficient so dropping 1 column / coefficient (x2)"   # lme4's
    assert err == f"lmm-symbolic: warning: {message}\n"
    result = json.loads(out)
    assert [f["name"] for f in result["fixed_effects"]] == ["(Intercept)", "x"]
    assert result["messages"] == [message]


@pytest.mark.parametrize("flag", ["--ml", "--reml"])
def test_boundary_fit_warns_with_lme4s_advice(flag, capsys):
    assert main(["fit", "Dyestuff2", "Yield ~ 1 + (1|Batch)", flag, "--json"]) == 0
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmm-symbolic: warning: boundary (singular) fit")
    assert "consider dropping the random term" in lines[0]
    result = json.loads(out)
    assert result["singular"] is True and result["converged"] is True
    assert result["random_effects"][0]["variance"] == 0.0
    assert any("singular" in m for m in result["messages"])
    # and in the plain summary
    assert main(["fit", "Dyestuff2", "Yield ~ 1 + (1|Batch)", flag]) == 0
    assert "consider dropping the random term" in capsys.readouterr().out


def test_a_bug_is_still_one_line(monkeypatch, capsys):
    """An unexpected exception (a bug, not bad input) prints one line and exits 3, traceback on request."""
    import lmm_symbolic

    def broken(*args, **kwargs):
        raise RuntimeError("something\ninternal")

    monkeypatch.setattr(lmm_symbolic, "fit", broken)
    assert main(["fit", "toy", "Resp ~ Treat + (1|Ind)"]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error: RuntimeError: something internal" in err
    monkeypatch.setenv("LMM_SYMBOLIC_TRACEBACK", "1")
    with pytest.raises(RuntimeError):
        main(["fit", "toy", "Resp ~ Treat + (1|Ind)"])


# ------------------------------------------------------------------------- as real processes
PROCESS_CASES = ["missing file", "binary file", "unknown fixed column", "no random term", "double bar",
                 "import call", "non-numeric response", "grouping factor with one level"]


@pytest.mark.parametrize("case_id", PROCESS_CASES)
def test_bad_input_as_a_process(case_id, tmp_path):
    case = next(c for c in BAD_INPUTS if c.id == case_id)
    data = case.data(tmp_path)
    command = case.commands[PROCESS_CASES.index(case_id) % len(case.commands)]  # fit and derive in turn
    res = subprocess.run([sys.executable, "-m", "lmm_symbolic", command, data, case.formula],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert res.returncode == 2, res.stderr
    assert res.stdout == ""
    line = _one_error_line(res.stderr)
    assert case.says[0].lower() in line.lower()
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("scale", [1e-8, 1e8])
def test_a_scaled_response_scales_the_json_estimates(scale, tmp_path, capsys):
    import lmm_symbolic as lmm

    data = lmm.datasets.load("sleepstudy")
    path = tmp_path / "scaled.csv"
    data.assign(Reaction=data.Reaction * scale).to_csv(path, index=False)
    formula = "Reaction ~ Days + (1|Subject)"
    assert main(["fit", "sleepstudy", formula, "--ml", "--json"]) == 0
    base = json.loads(capsys.readouterr().out)
    assert main(["fit", str(path), formula, "--ml", "--json"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    scaled = json.loads(out)
    assert scaled["converged"] is True
    for a, b in zip(scaled["fixed_effects"], base["fixed_effects"]):
        assert a["estimate"] / scale == pytest.approx(b["estimate"], rel=1e-6)
        assert a["std_error"] / scale == pytest.approx(b["std_error"], rel=1e-6)
        assert a["t_value"] == pytest.approx(b["t_value"], rel=1e-6)
    for a, b in zip(scaled["random_effects"], base["random_effects"]):
        assert a["sd"] / scale == pytest.approx(b["sd"], rel=1e-6)
    assert scaled["loglik"] == pytest.approx(base["loglik"] - base["n_obs"] * np.log(scale), rel=1e-9)


def test_extreme_imbalance_through_the_cli(tmp_path, capsys):
    rng = np.random.default_rng(8)
    codes = np.concatenate([np.zeros(10_000, dtype=int), np.arange(1, 1000)])
    x = rng.normal(size=len(codes))
    y = 1.0 + x + rng.normal(size=1000)[codes] + rng.normal(size=len(codes))
    path = tmp_path / "imbalanced.csv"
    import pandas as pd
    pd.DataFrame({"y": y, "x": x, "g": codes}).to_csv(path, index=False)
    assert main(["fit", str(path), F, "--json"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    result = json.loads(out)
    assert result["converged"] is True and result["singular"] is False and result["n_obs"] == 10_999
    numbers = [result["loglik"], result["aic"], result["bic"]] + [v for f in result["fixed_effects"]
                                                                  for v in f.values() if not isinstance(v, str)]
    assert np.all(np.isfinite(numbers))
    assert main(["derive", str(path), F, "--json"]) == 0
    assert capsys.readouterr().err == ""


def test_non_convergence_is_reported_on_stderr_and_in_the_json(monkeypatch, capsys):
    import lmm_symbolic.optimisation as optimisation

    monkeypatch.setattr(optimisation, "GRADIENT_TOL", -1.0)  # no derivative passes this test
    assert main(["fit", "sleepstudy", "Reaction ~ Days + (1|Subject)", "--json"]) == 0
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmm-symbolic: warning: the fit did not converge")
    result = json.loads(out)
    assert result["converged"] is False
    assert any(m.startswith("not converged") for m in result["messages"])
