"""Every bad input gets a clear answer through the Python API (issue 8).

Each case raises its typed error (DataError, FormulaError, ModelError) with a message that says what was
wrong and what to do; the inputs that are only awkward (NA rows, aliased columns, a boundary fit, extreme
scales or imbalance) fit, and say what they did in ``messages`` and as an LMMWarning.

The table ``BAD_INPUTS`` is shared with tests/test_cli_errors.py, which runs the same cases through the CLI.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pytest

import lmm_symbolic as lmm
from lmm_symbolic import DataError, FormulaError, LMMError, LMMWarning, ModelError

REFERENCE = json.loads((Path(__file__).parent / "reference" / "lme4_reference.json").read_text())["cases"]


# ------------------------------------------------------------------------------------------- data
def frame(groups: int = 5, per: int = 4, seed: int = 0) -> pd.DataFrame:
    """A small random-intercept data set: y, a covariate x, grouping g and a second factor h."""
    rng = np.random.default_rng(seed)
    g = np.repeat([f"g{k}" for k in range(groups)], per)
    codes = np.repeat(np.arange(groups), per)
    x = rng.normal(size=groups * per)
    y = 2.0 + 0.5 * x + rng.normal(size=groups)[codes] + rng.normal(scale=0.7, size=groups * per)
    return pd.DataFrame({"y": y, "x": x, "g": g, "h": np.tile(["p", "q"], groups * per // 2)})


def _csv(tmp: Path, df: pd.DataFrame, name: str = "data.csv") -> str:
    path = tmp / name
    df.to_csv(path, index=False)
    return str(path)


def _with(**changes) -> Callable[[Path], str]:
    """A CSV of ``frame()`` with some cells changed: column -> {row: value} or a whole new column."""
    def make(tmp: Path) -> str:
        df = frame().astype({"y": object, "x": object})
        for col, val in changes.items():
            if isinstance(val, dict):
                for row, v in val.items():
                    df.loc[row, col] = v
            else:
                df[col] = val
        return _csv(tmp, df)
    return make


def _good(tmp: Path) -> str:
    return _csv(tmp, frame())


def _write(name: str, content: bytes) -> Callable[[Path], str]:
    def make(tmp: Path) -> str:
        (tmp / name).write_bytes(content)
        return str(tmp / name)
    return make


def _random_slope_too_many(tmp: Path) -> str:
    # 10 groups of 2 observations: (x|g) has 2 random effects per group, 20 in all, for 20 observations
    return _csv(tmp, frame(groups=10, per=2))


@dataclass(frozen=True)
class BadInput:
    """One bad input: the data (made in a temporary folder), the formula, the error and what it must say."""

    id: str
    data: Callable[[Path], str]
    formula: str
    error: type
    says: tuple[str, ...]          # fragments the message must contain (case-insensitive)
    commands: tuple[str, ...] = ("fit", "derive")


F = "y ~ x + (1|g)"
BAD_INPUTS = [
    # files
    BadInput("missing file", lambda t: str(t / "nope.csv"), F, DataError, ("not found", "nope.csv", "path")),
    BadInput("binary file", _write("data.csv", bytes(range(256)) * 8), F, DataError, ("binary", "csv")),
    BadInput("directory", lambda t: str(t), F, DataError, ("directory", "csv file")),
    BadInput("empty file", _write("data.csv", b""), F, DataError, ("empty", "header")),
    BadInput("header only", _write("data.csv", b"y,x,g,h\n"), F, DataError, ("empty", "no rows")),
    BadInput("not utf-8", _write("data.csv", "y,x,g,h\n1,2,\xe9,p\n".encode("latin-1")), F, DataError,
             ("utf-8", "save it")),
    BadInput("broken csv quoting", _write("data.csv", b'y,x,g,h\n1,2,3,p\n"1,2\n'), F, DataError,
             ("cannot read", "comma-separated")),
    BadInput("empty after dropping NA", _with(y=np.nan), F, DataError, ("no rows left", "missing")),
    # columns
    BadInput("unknown fixed column", _good, "y ~ z + (1|g)", DataError, ("unknown column 'z'", "x, y")),
    BadInput("unknown grouping column", _good, "y ~ x + (1|k)", DataError, ("unknown column 'k'", "g, h")),
    BadInput("unknown random-slope column", _good, "y ~ x + (w|g)", DataError, ("unknown column 'w'",)),
    BadInput("unknown response", _good, "yy ~ x + (1|g)", DataError, ("unknown column 'yy'", "columns")),
    BadInput("response is an expression of no column", _good, "log(z) ~ x + (1|g)", DataError,
             ("unknown column 'z'",)),
    # formulas
    BadInput("no random term", _good, "y ~ x", FormulaError, ("no random-effect term", "least squares")),
    BadInput("empty formula", _good, "", FormulaError, ("empty", "resp ~ treat + (1|ind)")),
    BadInput("missing tilde", _good, "y x + (1|g)", FormulaError, ("malformed", "response ~ terms")),
    BadInput("two tildes", _good, "y ~ ~ x + (1|g)", FormulaError, ("malformed", "response ~ terms")),
    BadInput("no response", _good, "~ x + (1|g)", FormulaError, ("malformed", "response ~ terms")),
    BadInput("unclosed parenthesis", _good, "y ~ (x + (1|g)", FormulaError, ("unbalanced", "add the missing ')'")),
    BadInput("unopened parenthesis", _good, "y ~ x + (1|g))", FormulaError, ("unbalanced", "closes nothing")),
    BadInput("empty grouping factor", _good, "y ~ x + (1|)", FormulaError, ("grouping factor", "(1|group)")),
    BadInput("empty random expression", _good, "y ~ x + (|g)", FormulaError, ("expression", "(1|group)")),
    BadInput("dangling plus", _good, "y ~ x +", FormulaError, ("empty term", "+")),
    BadInput("double bar", _good, "y ~ x + (1|g|h)", FormulaError, ("more than one bar",)),
    BadInput("bar outside parentheses", _good, "y ~ x | g", FormulaError, ("parentheses", "(1|group)")),
    BadInput("bad nesting", _good, "y ~ x + (1|g/)", FormulaError, ("grouping factor", "a/b")),
    BadInput("dangling power", _good, "y ~ x** + (1|g)", FormulaError, ("empty term", "'^'")),
    BadInput("bad term argument", _good, "y ~ C(x, 'zz') + (1|g)", FormulaError, ("cannot build", "argument")),
    BadInput("response also a predictor", _good, "y ~ y + (1|g)", FormulaError,
             ("right-hand side", "remove it")),
    BadInput("no fixed effects", _good, "y ~ 0 + (1|g)", ModelError, ("no fixed effects", "keep the intercept")),
    # hostile formulas: rejected by the whitelist before formulaic evaluates anything
    BadInput("import call", _good, "y ~ __import__('os').system('touch PWNED') + (1|g)", FormulaError,
             ("'__import__' is not allowed",)),
    BadInput("attribute access", _good, "y ~ x.__class__ + (1|g)", FormulaError, ("not allowed",)),
    BadInput("braces", _good, "y ~ {x} + (1|g)", FormulaError, ("character formulas do not use",)),
    BadInput("subscript", _good, "y ~ x[0] + (1|g)", FormulaError, ("character formulas do not use",)),
    BadInput("lambda", _good, "y ~ (lambda: x)() + (1|g)", FormulaError, ("'lambda' is not allowed",)),
    BadInput("statement", _good, "y ~ x + (1|g); import os", FormulaError, ("character formulas do not use",)),
    BadInput("power tower", _good, "y ~ I(9**9**9) + (1|g)", FormulaError, ("power of constants",)),
    BadInput("string arithmetic", _good, "y ~ I('a'*99999) + (1|g)", FormulaError, ("function argument",)),
    # values
    BadInput("non-numeric response", _with(y={0: "250ms"}), F, DataError, ("numeric", "'250ms'", "convert")),
    BadInput("Inf in response", _with(y={3: np.inf}), F, DataError, ("infinite", "'y'", "remove or correct")),
    BadInput("-Inf in predictor", _with(x={5: -np.inf}), F, DataError, ("infinite", "'x'", "remove or correct")),
    BadInput("non-finite transformed predictor", _good, "y ~ I(x*1e400) + (1|g)", DataError, ("non-finite",)),
    BadInput("response of size 1e300", lambda t: _csv(t, frame().assign(y=lambda d: d.y * 1e300)), F, DataError,
             ("the response 'y'", "double precision", "rescale")),
    BadInput("response varying by 1e-300", lambda t: _csv(t, frame().assign(y=lambda d: d.y * 1e-300)), F,
             DataError, ("the response 'y'", "rescale")),
    BadInput("predictor of size 1e200", lambda t: _csv(t, frame().assign(x=lambda d: d.x * 1e200)), F, DataError,
             ("the column 'x'", "rescale")),
    # model
    BadInput("grouping factor with one level", _with(g="only"), F, ModelError, ("single level", "two groups")),
    BadInput("as many levels as observations", _with(g=[f"s{k}" for k in range(20)]), F, ModelError,
             ("number of levels", "less than the number of observations", "replicates")),
    BadInput("more random effects than observations", _random_slope_too_many, "y ~ x + (x|g)", ModelError,
             ("number of random effects", "unidentifiable")),
    BadInput("constant response", _with(y=3.25), F, ModelError, ("constant",), commands=("fit",)),
    BadInput("groups' means fixed by fixed effects", _good, "y ~ x + g + (1|g)", ModelError,
             ("cannot be estimated", "separate mean", "drop the fixed effects"), commands=("fit",)),
]


def call(command: str, formula: str, data):
    """The Python API of one CLI command."""
    return lmm.fit(formula, data) if command == "fit" else lmm.derive(formula, data)


# ------------------------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c.id for c in BAD_INPUTS])
def test_bad_input_raises_its_typed_error_with_a_clear_message(case, tmp_path):
    data = case.data(tmp_path)
    for command in case.commands:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", LMMWarning)
            with pytest.raises(case.error) as info:
                call(command, case.formula, data)
        message = str(info.value)
        assert isinstance(info.value, LMMError)
        assert "\n" not in message, message
        for part in case.says:
            assert part.lower() in message.lower(), (part, message)
    assert not (tmp_path / "PWNED").exists() and not Path("PWNED").exists()


def test_the_same_errors_from_a_data_frame():
    df = frame()
    with pytest.raises(DataError, match="empty"):
        lmm.fit(F, df.iloc[:0])
    with pytest.raises(DataError, match="no rows left"):
        lmm.fit(F, df.assign(x=np.nan))
    with pytest.raises(DataError, match="DataFrame or a CSV path"):
        lmm.fit(F, 42)
    with pytest.raises(DataError, match="'250ms'"):
        lmm.fit(F, df.astype({"y": object}).assign(y=lambda d: d.y.where(d.index != 4, "250ms")))
    with pytest.raises(DataError, match="infinite"):
        lmm.derive(F, df.assign(y=df.y.where(df.index != 2, np.inf)))
    with pytest.raises(DataError, match="numeric"):
        lmm.fit(F, df.assign(y=df.y > 2))
    with pytest.raises(ModelError, match="'ML' or 'REML'"):
        lmm.fit(F, df, method="least squares")


def test_unreadable_file(tmp_path, monkeypatch):
    """A file the user may not read (as root, chmod cannot stop the read, so ``open`` is made to refuse)."""
    path = _good(tmp_path)
    import lmm_symbolic.specification as specification

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", args[0])

    monkeypatch.setattr(specification, "open", refuse, raising=False)
    with pytest.raises(DataError, match="cannot open the data file .*Permission denied.*may read it"):
        lmm.fit(F, path)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_by_permissions(tmp_path):
    path = _good(tmp_path)
    os.chmod(path, 0)
    with pytest.raises(DataError, match="Permission denied"):
        lmm.fit(F, path)


def test_hostile_formulas_never_reach_formulaic(monkeypatch):
    """The whitelist rejects a hostile formula before formulaic (which evaluates Python) sees it."""
    import formulaic

    def tripwire(*args, **kwargs):
        raise AssertionError("formulaic was called")

    monkeypatch.setattr(formulaic, "model_matrix", tripwire)
    hostile = [c for c in BAD_INPUTS if c.id in ("import call", "attribute access", "braces", "subscript",
                                                  "lambda", "statement", "power tower", "string arithmetic")]
    assert len(hostile) == 8
    for case in hostile:
        with pytest.raises(FormulaError):
            lmm.specify(case.formula, frame())
    for formula in ("y ~ eval('x') + (1|g)", "y ~ open('/etc/passwd') + (1|g)", "y ~ globals() + (1|g)",
                    "y ~ x + (1|g.__class__)", "y ~ I(x).real + (1|g)", "y ~ `__import__`('os') + (1|g)",
                    "y ~ I((9**99)**99) + (1|g)", "y ~ I(x**(9**9)) + (1|g)", "y ~ x + (1|g) + \"\"*9"):
        with pytest.raises(LMMError):
            lmm.specify(formula, frame())


def test_powers_and_strings_that_formulas_need_still_work():
    df = frame()
    for formula in ("y ~ I(x**2) + (1|g)", "y ~ I(2**x) + (1|g)", "y ~ I(x**-1) + (1|g)",
                    "y ~ (x + h)**2 + (1|g)", "y ~ I(x^2) + (1|g)", "y ~ (x + h)^2 + (1|g)",
                    "y ~ C(h, contr.poly) + (1|g)", "y ~ factor(h) + (1|g)"):
        assert lmm.specify(formula, df).p >= 2, formula


# ------------------------------------------------------------------------------ awkward inputs
def test_na_rows_are_dropped_counted_warned_and_the_fit_matches_the_cleaned_data():
    df = frame(groups=8, per=5, seed=3)
    dirty = df.copy()
    dirty.loc[[1, 7], "y"] = np.nan
    dirty.loc[12, "x"] = np.nan
    dirty.loc[30, "g"] = np.nan
    dirty["unused"] = np.nan  # a column the formula does not use costs no rows
    with pytest.warns(LMMWarning, match="4 row"):
        result = lmm.fit(F, dirty, method="ML")
    clean = lmm.fit(F, df.drop(index=[1, 7, 12, 30]).reset_index(drop=True), method="ML")
    assert result.design.n_dropped_rows == 4 and result.n_obs == 36
    assert any("4 row(s) with missing values dropped" in m for m in result.messages)
    assert "4 row(s) with missing values dropped" in result.summary()
    assert result.to_dict()["messages"] == list(result.messages)
    np.testing.assert_allclose(result.params, clean.params, rtol=1e-12)
    np.testing.assert_allclose([result.sigma, result.sigma_s, result.loglik],
                               [clean.sigma, clean.sigma_s, clean.loglik], rtol=1e-12)
    with pytest.warns(LMMWarning, match="4 row"):
        d = lmm.derive(F, dirty)
    assert d.design.n == 36


def test_rank_deficient_x_drops_the_later_aliased_column_by_name():
    df = frame(groups=6, per=5, seed=4)
    df["x2"] = 2 * df["x"]
    df["x3"] = df["x"] + 1.0  # aliased with intercept and x
    with pytest.warns(LMMWarning, match="rank deficient"):
        result = lmm.fit("y ~ x + x2 + x3 + (1|g)", df)
    assert result.design.dropped_columns == ("x2", "x3")
    assert list(result.params.index) == ["(Intercept)", "x"]
    assert any("dropping 2 columns / coefficients (x2, x3)" in m for m in result.messages)
    plain = lmm.fit("y ~ x + (1|g)", df)
    np.testing.assert_allclose(result.params, plain.params, rtol=1e-10)
    assert result.loglik == pytest.approx(plain.loglik, rel=1e-12)
    # the earlier column is kept: with x2 first, x is the one dropped (lme4 keeps the pivot order)
    with pytest.warns(LMMWarning, match=r"\(x\)$"):
        assert lmm.specify("y ~ x2 + x + (1|g)", df).fixed_names == ("(Intercept)", "x2")


def test_constant_response_is_a_model_error_but_derives():
    df = frame().assign(y=3.25)
    with pytest.raises(ModelError, match="constant"):
        lmm.fit(F, df)
    d = lmm.derive(F, df)  # the closed forms hold for any y
    assert d.det is not None


@pytest.mark.parametrize("scale", [1e-8, 1e8])
@pytest.mark.parametrize("method", ["ML", "REML"])
def test_a_scaled_response_scales_the_estimates_exactly(scale, method):
    data = lmm.datasets.load("sleepstudy")
    formula = "Reaction ~ Days + (1|Subject)"
    base = lmm.fit(formula, data, method=method, exact=False)
    scaled = lmm.fit(formula, data.assign(Reaction=data.Reaction * scale), method=method, exact=False)
    assert scaled.converged
    np.testing.assert_allclose(scaled.params / scale, base.params, rtol=1e-6)
    np.testing.assert_allclose(scaled.bse / scale, base.bse, rtol=1e-6)
    np.testing.assert_allclose([scaled.sigma / scale, scaled.sigma_s / scale], [base.sigma, base.sigma_s],
                               rtol=1e-6)
    np.testing.assert_allclose(scaled.random_effects["(Intercept)"] / scale, base.random_effects["(Intercept)"],
                               rtol=1e-6)
    # the density of y/scale: log L shifts by n log(scale) for ML and (n - p) log(scale) for REML, whose
    # restricted likelihood is of the n - p error contrasts
    n_eff = base.n_obs - (base.design.p if method == "REML" else 0)
    assert scaled.loglik == pytest.approx(base.loglik - n_eff * np.log(scale), rel=1e-9)


def test_extreme_imbalance_fits_finite_and_converged():
    """One group of 10,000 observations and 999 groups of one."""
    rng = np.random.default_rng(8)
    codes = np.concatenate([np.zeros(10_000, dtype=int), np.arange(1, 1000)])
    x = rng.normal(size=len(codes))
    y = 1.0 + x + rng.normal(size=1000)[codes] + rng.normal(size=len(codes))
    df = pd.DataFrame({"y": y, "x": x, "g": codes})
    for method in ("ML", "REML"):
        result = lmm.fit(F, df, method=method)
        assert result.converged and not result.singular
        values = [result.loglik, result.aic, result.bic, result.sigma, result.sigma_s,
                  *result.params, *result.bse, *result.pvalues, *result.df_satterthwaite]
        assert np.all(np.isfinite(values))
        assert np.all(np.isfinite(result.random_effects["(Intercept)"]))
        assert 0.8 < result.sigma < 1.2 and 0.7 < result.sigma_s < 1.3
    d = lmm.derive(F, df)
    assert d.size_counts == {1: 999, 10_000: 1}


@pytest.mark.parametrize("method", ["ML", "REML"])
def test_boundary_fit_dyestuff2_is_exactly_singular_with_lme4s_advice(method):
    ref = REFERENCE[f"dyestuff2_{method.lower()}"]["lme4"]
    with pytest.warns(LMMWarning, match="singular"):
        result = lmm.fit("Yield ~ 1 + (1|Batch)", lmm.datasets.load("Dyestuff2"), method=method)
    assert result.sigma_s == 0.0 and result.singular is True and result.converged is True
    assert result.sigma == pytest.approx(ref["sigma"], rel=1e-6)
    assert result.loglik >= ref["loglik"] - 1e-8 * abs(ref["loglik"])
    assert result.exact is not None and result.exact.sigma_s2 == 0
    advice = [m for m in result.messages if "singular" in m]
    assert len(advice) == 1
    for words in ("boundary (singular) fit", "variance is zero", "consider dropping the random term"):
        assert words in advice[0] and words in result.summary()
    as_json = result.to_dict()
    assert as_json["singular"] is True and as_json["converged"] is True
    assert as_json["random_effects"][0]["sd"] == 0.0
    assert all(v == 0.0 for v in result.random_effects["(Intercept)"])


def test_non_convergence_is_reported(monkeypatch):
    import lmm_symbolic.optimisation as optimisation

    monkeypatch.setattr(optimisation, "GRADIENT_TOL", -1.0)  # no derivative passes this test
    with pytest.warns(LMMWarning, match="did not converge"):
        result = lmm.fit("Reaction ~ Days + (1|Subject)", lmm.datasets.load("sleepstudy"))
    assert result.converged is False and result.to_dict()["converged"] is False
    assert any(m.startswith("not converged") for m in result.messages)
    assert "not converged" in result.summary()


@pytest.mark.parametrize("units", [1e-8, 1e8])
def test_a_predictor_in_other_units_is_kept_and_its_coefficient_scales(units):
    """Aliasing is judged per column (as R's qr), so x * 1e-8 is not 'rank deficient'."""
    data = lmm.datasets.load("sleepstudy")
    formula = "Reaction ~ Days + (1|Subject)"
    base = lmm.fit(formula, data, exact=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LMMWarning)
        scaled = lmm.fit(formula, data.assign(Days=data.Days * units), exact=False)
    assert scaled.design.fixed_names == ("(Intercept)", "Days")
    assert scaled.params["Days"] * units == pytest.approx(base.params["Days"], rel=1e-6)
    assert scaled.params["(Intercept)"] == pytest.approx(base.params["(Intercept)"], rel=1e-6)
    # REML: log|X^T V^-1 X| gains 2 log(units), so the restricted log-likelihood loses log(units)
    assert scaled.loglik == pytest.approx(base.loglik - np.log(units), rel=1e-9)
