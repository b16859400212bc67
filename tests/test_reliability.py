"""Bounded work on any input and no silent wrong answer on bad input (issue 18 items 3 and 5).

Each input of the issue has a test here or is named with the file that tests it:
semicolon files with decimal points (tests/test_formula.py), 900-deep and 100-times-repeated formulas in the
API (tests/test_formula.py), fits that used to hang (tests/test_formula.py), the differential suite and the
invariances on random designs (tests/test_differential.py, tests/test_invariance.py).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import warnings

import numpy as np
import pandas as pd
import pytest

import lmm_symbolic as lmm
import lmm_symbolic.specification as specification
from lmm_symbolic.cli import EXIT_BROKEN_PIPE, main
from lmm_symbolic.results import lme4_theta_order


def frame(groups: int = 8, per: int = 5, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(groups), per)
    n = groups * per
    x = rng.normal(size=n)
    return pd.DataFrame({"y": 1 + 0.5 * x + rng.normal(size=groups)[g] + rng.normal(size=n), "x": x,
                         "g": [f"g{k}" for k in g]})


def run_cli(args, capsys):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if not ln.startswith("lmm_symbolic: ")]   # progress of a long step
    assert len(lines) == 1 and lines[0].startswith("lmm-symbolic: error: "), err[:500]
    return lines[0]


# ------------------------------------------------------------------------------ the command line
def test_a_reader_that_stops_early_ends_the_command_quietly():
    """``lmm-symbolic demo | head -1``: no "Broken pipe" error and exit 2, but exit 141 (128 + SIGPIPE)
    and nothing on stderr, as the Python documentation recommends for SIGPIPE."""
    proc = subprocess.Popen([sys.executable, "-m", "lmm_symbolic", "demo"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == EXIT_BROKEN_PIPE == 141
    assert err == ""


@pytest.mark.skipif(shutil.which("head") is None, reason="no head(1)")
def test_piping_json_into_head_in_a_shell():
    cmd = f"'{sys.executable}' -m lmm_symbolic demo | head -c 10"
    res = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, timeout=300)
    assert "Broken pipe" not in res.stderr and "Traceback" not in res.stderr
    assert res.returncode in (0, EXIT_BROKEN_PIPE)


NESTED = "(" * 900 + "x" + ")" * 900


@pytest.mark.parametrize("formula, says", [
    ("y ~ " + NESTED + " + (1|g)", "nested more than"),
    ("y ~ I(" + NESTED + ") + (1|g)", "nested more than"),
    ("y ~ " + " + ".join(["(1|g)"] * 100), "more than the 50"),
    ("y ~ x + " + " + ".join(["(x|g)"] * 100), "more than the 50"),
    ("y ~ x + (1|g) + (1|g)", "appears 2 times"),
    ("y ~ x + (x||g) + (1|g)", "appears 2 times"),
])
@pytest.mark.parametrize("command", ["fit", "derive"])
def test_deep_and_repeated_formulas_exit_2_with_one_line(formula, says, command, tmp_path, capsys):
    path = tmp_path / "d.csv"
    frame().to_csv(path, index=False)
    code, out, err = run_cli([command, str(path), formula], capsys)
    assert code == 2 and says in one_error_line(err)


def test_a_term_repeated_100_times_in_the_fixed_part_fits_once(capsys):
    d = frame()
    one = lmm.fit("y ~ x + (1|g)", d)
    many = lmm.fit("y ~ " + " + ".join(["x"] * 100) + " + (1|g)", d)
    assert list(many.params.index) == ["(Intercept)", "x"] and many.loglik == pytest.approx(one.loglik, rel=1e-12)


# ------------------------------------------------------------------------------------ data files
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_as_the_data_is_refused_without_reading(tmp_path, capsys):
    fifo = tmp_path / "data.csv"
    os.mkfifo(fifo)
    result = {}
    t = threading.Thread(target=lambda: result.update(code=main(["fit", str(fifo), "y ~ x + (1|g)"])), daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "the CLI blocked on a FIFO"
    assert result["code"] == 2
    assert "not a regular file" in one_error_line(capsys.readouterr().err)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
def test_a_device_as_the_data_is_refused():
    with pytest.raises(lmm.DataError, match="not a regular file"):
        lmm.fit("y ~ x + (1|g)", "/dev/zero")


def test_a_2gb_csv_is_refused_before_reading(tmp_path):
    """A sparse 2 GiB file (no disk used): refused by its size, naming the 1024 MiB limit, in well under the
    time or memory a read would take."""
    path = tmp_path / "big.csv"
    with open(path, "wb") as fh:
        fh.write(b"y,x,g\n")
        fh.truncate(2 * 2**30)
    assert specification.MAX_CSV_BYTES == 2**30
    with pytest.raises(lmm.DataError, match=r"2048 MiB, more than the 1024 MiB .*Dask"):
        lmm.fit("y ~ x + (1|g)", str(path))


def test_a_csv_beyond_the_size_limit_is_refused_naming_the_limit(tmp_path, monkeypatch):
    path = tmp_path / "d.csv"
    frame().to_csv(path, index=False)
    monkeypatch.setattr(specification, "MAX_CSV_BYTES", 1024)
    with pytest.raises(lmm.DataError, match=r"more than the 0 MiB .*Dask"):
        lmm.fit("y ~ x + (1|g)", str(path))
    assert specification.MAX_CSV_BYTES == 1024 and os.path.getsize(path) > 1024


def test_a_csv_with_too_many_columns_is_refused(tmp_path):
    path = tmp_path / "wide.csv"
    names = ["y", "x", "g"] + [f"c{k}" for k in range(specification.MAX_COLUMNS)]
    path.write_text(",".join(names) + "\n" + ",".join(["1"] * len(names)) + "\n")
    with pytest.raises(lmm.DataError, match=f"more than {specification.MAX_COLUMNS} columns"):
        lmm.fit("y ~ x + (1|g)", str(path))


@pytest.fixture(scope="module")
def cell_50mb(tmp_path_factory):
    """The data with one 50 MB cell in the response, the grouping factor or an unused column."""
    out = {}
    for col in ("y", "g", "note"):
        d = frame().astype(object)
        d["note"] = "a"
        d.loc[2, col] = "z" * 50_000_000
        path = tmp_path_factory.mktemp("cell") / f"{col}.csv"
        d.to_csv(path, index=False)
        out[col] = str(path)
    return out


def test_a_50mb_cell_in_the_response_gives_a_short_message(cell_50mb, capsys):
    code, out, err = run_cli(["fit", cell_50mb["y"], "y ~ x + (1|g)"], capsys)
    line = one_error_line(err)
    assert code == 2 and len(line) < 300 and "50,000,000 characters" in line


@pytest.mark.parametrize("col", ["g", "note"])
def test_a_50mb_cell_elsewhere_is_read_and_fitted(cell_50mb, col, capsys):
    code, out, err = run_cli(["fit", cell_50mb[col], "y ~ x + (1|g)", "--json"], capsys)
    # the JSON names each level of g once (its conditional mode): a 50 MB level name appears there, once
    assert code == 0 and len(out) < (50_000_000 + 20_000 if col == "g" else 20_000)
    assert json.loads(out)["n_obs"] == 40


# ------------------------------------------------------------------------- silent wrong answers
def test_a_column_named_Intercept_does_not_replace_the_intercept():
    d = frame()
    plain = lmm.fit("y ~ x + (1|g)", d, method="ML")
    named = lmm.fit("y ~ x + (1|g)", d.assign(Intercept=3 * d.x + 7), method="ML")
    assert named.loglik == pytest.approx(plain.loglik, rel=1e-12)
    np.testing.assert_allclose(named.params.values, plain.params.values, rtol=1e-10)


def test_a_complex_response_is_refused():
    d = frame()
    with pytest.raises(lmm.DataError, match="complex"):
        lmm.fit("y ~ x + (1|g)", d.assign(y=d.y + 1j))


def test_duplicated_column_names_are_a_data_error():
    d = frame()
    with pytest.raises(lmm.DataError, match="more than one column named 'x'"):
        lmm.fit("y ~ x + (1|g)", pd.concat([d, d[["x"]]], axis=1))


@pytest.mark.parametrize("method", [None, 1, "maximum", "reml "])
def test_a_bad_method_is_a_model_error(method):
    with pytest.raises(lmm.ModelError, match="'ML' or 'REML'"):
        lmm.fit("y ~ x + (1|g)", frame(), method=method)


def test_sqrt_in_a_formula_is_rs_sqrt():
    d = frame().assign(x=lambda f: f.x ** 2 + 1)
    a = lmm.fit("y ~ sqrt(x) + (1|g)", d)
    b = lmm.fit("y ~ r + (1|g)", d.assign(r=np.sqrt(d.x)))
    assert a.params.iloc[1] == pytest.approx(b.params.iloc[1], rel=1e-12)
    assert list(a.params.index) == ["(Intercept)", "sqrt(x)"]


def test_unicode_and_dotted_names_are_column_names():
    d = frame()
    plain = lmm.fit("y ~ x + (1|g)", d)
    named = lmm.fit("y.b ~ x.a + (1|grüppe)", d.rename(columns={"y": "y.b", "x": "x.a", "g": "grüppe"}))
    assert named.loglik == pytest.approx(plain.loglik, rel=1e-12)
    assert list(named.params.index) == ["(Intercept)", "x.a"] and named.groups == {"grüppe": 8}


def test_one_text_value_in_a_numeric_covariate_is_named_in_a_short_message():
    d = frame().astype({"x": object})
    d.loc[3, "x"] = "n/a?"
    with pytest.raises(lmm.DataError) as info:
        lmm.fit("y ~ x + (1|g)", d)
    msg = str(info.value)
    assert "'x'" in msg and "'n/a?'" in msg and "row 4" in msg and "factor(x)" in msg and len(msg) < 300
    assert "grouping" not in msg


def test_a_text_column_is_still_a_factor():
    d = frame()
    d["f"] = np.where(np.arange(40) % 3 == 0, "a", "b")
    assert "f[T.b]" in lmm.fit("y ~ x + f + (1|g)", d).params.index or \
        any(n.startswith("f") for n in lmm.fit("y ~ x + f + (1|g)", d).params.index)


# ------------------------------------------------------------------------------------ kinship
@pytest.fixture(scope="module")
def kin():
    d = frame()
    g = d.g.str[1:].astype(int).to_numpy()
    Z = (g[:, None] == np.arange(8)[None, :]).astype(float)
    return d, Z @ Z.T


@pytest.mark.parametrize("scale, says", [(0.0, "kinship matrix is zero"), (1e-300, "rescale K"),
                                         (1e300, "rescale K")])
def test_a_vanishing_or_huge_kinship_matrix_is_refused(kin, scale, says):
    """K = 0 (or K x 1e-300) had given a kinship SD equal to sigma with no warning."""
    d, K = kin
    with pytest.raises(lmm.DataError, match=says):
        lmm.fit("y ~ x", d, kinship=K * scale)


def test_a_small_but_representable_kinship_scale_is_fitted_on_its_scale(kin):
    d, K = kin
    a, b = lmm.fit("y ~ x", d, kinship=K), lmm.fit("y ~ x", d, kinship=K * 1e-6)
    assert b.loglik == pytest.approx(a.loglik, rel=1e-7)
    assert b.sigma_s == pytest.approx(a.sigma_s * 1e3, rel=1e-4)


def test_kinship_equals_the_random_intercept_fit(kin):
    d, K = kin
    for method in ("ML", "REML"):
        a, b = lmm.fit("y ~ x", d, kinship=K, method=method), lmm.fit("y ~ x + (1|g)", d, method=method)
        assert a.loglik == pytest.approx(b.loglik, rel=1e-7)


def test_an_exactly_fitted_response_with_low_rank_kinship_gets_a_clear_message(kin):
    """y = X beta + Z u exactly: as sigma -> 0 the likelihood has no maximum (lme4 stops at an arbitrary
    sigma of 4e-6 on the matching (1|g) model); the message says why instead of "X^T V^-1 X is not positive
    definite at theta = 6e7"."""
    d, K = kin
    rng = np.random.default_rng(5)
    g = d.g.str[1:].astype(int).to_numpy()
    exact = d.assign(y=1 + 0.5 * d.x + rng.normal(size=8)[g])
    for method in ("ML", "REML"):
        with pytest.raises(lmm.ModelError, match="reproduced exactly .* sigma -> 0"):
            lmm.fit("y ~ x", exact, kinship=K, method=method)


def test_a_full_rank_kinship_at_sigma_zero_returns_the_boundary_fit():
    """y ~ N(X beta, s^2 K) with K of full rank: the ML estimate of sigma is (near) 0, and the fit is
    returned (the boundary fit lme4 returns), its logLik at least that of sigma = 0 exactly."""
    from scipy.stats import multivariate_normal
    rng = np.random.default_rng(2)
    n = 40
    x = rng.normal(size=n)
    A = rng.normal(size=(n, n))
    K = A @ A.T / n
    y = 1 + 0.5 * x + np.linalg.cholesky(K) @ rng.normal(size=n)
    d = pd.DataFrame({"y": y, "x": x})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f = lmm.fit("y ~ x", d, kinship=K, method="ML")
    X = np.c_[np.ones(n), x]
    Ki = np.linalg.inv(K)
    b = np.linalg.solve(X.T @ Ki @ X, X.T @ Ki @ y)
    s2 = (y - X @ b) @ Ki @ (y - X @ b) / n
    at_zero = multivariate_normal(X @ b, s2 * K).logpdf(y)
    assert f.sigma < 1e-3 * f.sigma_s
    assert f.loglik >= at_zero - 1e-6 * abs(at_zero)


# --------------------------------------------------------------------------- theta in lme4's order
def crossed() -> pd.DataFrame:
    """a with 3 levels, b and c with 6: lme4 orders the terms c, b, a (decreasing levels, ties reversed)."""
    rng = np.random.default_rng(3)
    n = 60
    d = pd.DataFrame({"x": rng.normal(size=n), "a": [f"a{i}" for i in rng.integers(0, 3, n)],
                      "b": [f"b{i}" for i in rng.integers(0, 6, n)], "c": [f"c{i}" for i in rng.integers(0, 6, n)]})
    idx = {k: d[k].str[1:].astype(int) for k in "abc"}
    d["y"] = (d.x + rng.normal(size=3)[idx["a"]] + rng.normal(size=6)[idx["b"]] + 0.5 * rng.normal(size=6)[idx["c"]]
              + rng.normal(size=n))
    return d


#: getME(lmer(formula, crossed(), REML = FALSE), "theta") measured with lme4 1.1 (R 4.2)
LME4_THETA = {
    "y ~ x + (1|a) + (1|b)": {"b.(Intercept)": 0.7151907, "a.(Intercept)": 0.0},
    "y ~ x + (1|a) + (1|b) + (1|c)": {"c.(Intercept)": 0.2931058, "b.(Intercept)": 0.7189894, "a.(Intercept)": 0.0},
    "y ~ x + (1|b) + (1|a)": {"b.(Intercept)": 0.7151907, "a.(Intercept)": 0.0},
    "y ~ x + (x|a) + (1|b)": {"b.(Intercept)": 0.7152058, "a.(Intercept)": 0.0, "a.x.(Intercept)": 0.0,
                              "a.x": 0.0},
}


@pytest.mark.parametrize("formula", list(LME4_THETA))
def test_json_theta_is_in_lme4s_order_with_lme4s_names(formula):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = lmm.fit(formula, crossed(), method="ML").to_dict()
    expected = LME4_THETA[formula]
    assert out["theta_names"] == list(expected)
    np.testing.assert_allclose(out["theta"], list(expected.values()), atol=2e-4)


def test_theta_order_keeps_a_formula_already_in_lme4s_order():
    d = lmm.datasets.load("Penicillin")
    design = lmm.specify("diameter ~ 1 + (1|plate) + (1|sample)", d)
    assert lme4_theta_order(design, 2) == ([0, 1], ["plate.(Intercept)", "sample.(Intercept)"])
    rev = lmm.specify("diameter ~ 1 + (1|sample) + (1|plate)", d)
    assert lme4_theta_order(rev, 2) == ([1, 0], ["plate.(Intercept)", "sample.(Intercept)"])


@pytest.mark.skipif(shutil.which("Rscript") is None, reason="R not installed")
def test_json_theta_against_live_lme4(tmp_path):
    d = crossed()
    d.to_csv(tmp_path / "d.csv", index=False)
    script = ("suppressMessages(library(lme4)); d <- read.csv(commandArgs(TRUE)[1]); "
              "f <- commandArgs(TRUE)[2]; m <- lmer(as.formula(f), d, REML = FALSE); "
              "th <- getME(m, 'theta'); cat(paste(names(th), format(th, digits = 15), sep = '='), sep = '\\n')")
    for formula in LME4_THETA:
        res = subprocess.run(["Rscript", "-e", script, str(tmp_path / "d.csv"), formula], capture_output=True,
                             text=True, timeout=120)
        r = dict(line.split("=") for line in res.stdout.split())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = lmm.fit(formula, d, method="ML").to_dict()
        assert out["theta_names"] == list(r), formula
        np.testing.assert_allclose(out["theta"], [float(v) for v in r.values()], atol=2e-4)


# ------------------------------------------------------------------------ every fit in bounded time
@pytest.mark.parametrize("formula", ["Reaction ~ D + (1|Subject)", "Reaction ~ Days + D + (1|Subject)",
                                     "Reaction ~ scale(Days) + D + (1|Subject)"])
def test_the_default_fit_with_ordered_factor_contrasts_ends(formula):
    """Issue 18 item 4, the class tests/test_formula.py does not cover: an ordered factor (contr.poly: D.L,
    D.Q, D.C) on a balanced design, the default fit (exact step included) in a separate process under a
    generous limit, so a hang fails instead of stalling the suite."""
    code = ("import lmm_symbolic as lmm, warnings, pandas as pd; warnings.simplefilter('ignore');"
            "d = lmm.datasets.load('sleepstudy'); d['D'] = pd.Categorical(d.Days % 4, ordered=True);"
            f"f = lmm.fit({formula!r}, d); print(list(f.params.index), f.exact is not None)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    assert "'D.L', 'D.Q', 'D.C'" in out.stdout and out.stdout.strip().endswith("True")


def test_verify_reads_sums_and_determinants_from_the_command_line(capsys):
    code, out, err = run_cli(["verify", "toy", "Resp ~ Treat + (1|Ind)", "--quantity", "det", "--latex", "--expr",
                              r"\prod_{j=1}^{G} \sigma^{2(m_j-1)}(\sigma^2 + m_j\sigma_s^2)"], capsys)
    assert code == 0 and out.startswith("equal"), err
    code, out, err = run_cli(["verify", "toy", "Resp ~ Treat + (1|Ind)", "--quantity", "det", "--expr",
                              "det([[sigma**2 + sigma_s**2, sigma_s**2], [sigma_s**2, sigma**2]])**2"], capsys)
    assert code == 1 and out.startswith("not equal") and "counterexample" in out
    code, out, err = run_cli(["verify", "toy", "Resp ~ Treat + (1|Ind)", "--quantity", "det", "--latex", "--expr",
                              r"\sum_{j=1}^{99999999} \sigma"], capsys)
    assert code == 2 and "more than" in one_error_line(err)


def test_a_column_of_many_non_numbers_is_a_factor_as_r_reads_it():
    """Levels "1", "2", "3", "3a" (a quarter not numbers) are a factor's levels, not typing errors."""
    d = frame()
    d["h"] = ["1", "2", "3", "3a"] * 10
    fit = lmm.fit("y ~ x + h + (1|g)", d)
    assert len(fit.params) == 5
    d.loc[[0, 1], "h"] = ["2", "1"]
    d["h2"] = [str(v) for v in range(40)]
    d.loc[7, "h2"] = "seven"
    with pytest.raises(lmm.DataError, match="'seven' in data row 8"):
        lmm.fit("y ~ x + (h2|g)", d)
