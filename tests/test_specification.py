"""Specification: data + formula -> design."""
import numpy as np
import pandas as pd
import pytest

import lmm_symbolic as lmm
from lmm_symbolic.specification import parse_formula


def test_toy_design():
    d = lmm.specify("Resp ~ Treat + (1|Ind)", lmm.datasets.load("toy"))
    np.testing.assert_array_equal(d.y, [10, 25, 3, 6])
    np.testing.assert_array_equal(d.X, [[1, 0], [1, 1], [1, 0], [1, 1]])
    assert d.fixed_names == ("(Intercept)", "Treat")
    (term,) = d.terms
    assert term.group == "Ind" and term.levels == ("1", "2") and term.is_intercept
    np.testing.assert_array_equal(term.indicator(), [[1, 0], [1, 0], [0, 1], [0, 1]])   # the tutorial's K


def test_cell_means_and_no_intercept():
    data = lmm.datasets.load("toy")
    d = lmm.specify("Resp ~ 0 + C(Treat) + (1|Ind)", data)
    np.testing.assert_array_equal(d.X, [[1, 0], [0, 1], [1, 0], [0, 1]])
    assert not d.has_intercept
    d = lmm.specify("Resp ~ 1 + (1|Ind)", data)
    assert d.fixed_names == ("(Intercept)",)


def test_csv_path_and_categorical_fixed_term(tmp_path):
    frame = pd.DataFrame({"y": [1.0, 2.5, 3.1, 4.2, 5.9, 6.1], "trt": list("abcabc"), "g": [1, 1, 1, 2, 2, 2]})
    path = tmp_path / "d.csv"
    frame.to_csv(path, index=False)
    d = lmm.specify("y ~ trt + (1|g)", str(path))
    assert d.fixed_names == ("(Intercept)", "trtb", "trtc")          # R's names
    assert d.n == 6


@pytest.mark.parametrize("text", ["Treat;Resp;Ind\n0;10,0;1\n1;25;1\n0;3;2\n1;6,0;2\n",
                                  "Treat\tResp\tInd\n0\t10\t1\n1\t25\t1\n0\t3\t2\n1\t6\t2\n"])
def test_semicolon_and_tab_separated_files_give_the_toy_fit(tmp_path, text):
    path = tmp_path / "toy.csv"
    path.write_text(text)
    fit = lmm.fit("Resp ~ Treat + (1|Ind)", str(path), method="ML")
    assert fit.sigma == pytest.approx(3 * np.sqrt(2), rel=1e-9)
    assert list(fit.params) == pytest.approx([6.5, 9.0], rel=1e-12)


def test_random_term_parsing_like_lme4():
    cols = {"y", "x", "a", "b", "g"}
    assert parse_formula("y ~ x + (1|g)", cols).random == (("1", "g"),)
    assert parse_formula("y ~ 1 + (1|a/b)", cols).random == (("1", "b:a"), ("1", "a"))
    assert parse_formula("y ~ x + (x||g)", cols).random == (("1", "g"), ("0 + x", "g"))
    assert parse_formula("y ~ (1|a) + (1|b)", cols).fixed == "1"


@pytest.mark.parametrize("formula, error", [
    ("Resp ~ Foo + (1|Ind)", lmm.DataError),
    ("Resp ~ Treat + (1|Foo)", lmm.DataError),
    ("Resp ~ Treat", lmm.FormulaError),
    ("Resp Treat + (1|Ind)", lmm.FormulaError),
    ("Resp ~ Treat + (1|Ind", lmm.FormulaError),
    ("Resp ~ Treat + 1|Ind", lmm.FormulaError),
    ("Resp ~ Treat.__class__ + (1|Ind)", lmm.FormulaError),
])
def test_bad_formulas_raise_typed_errors(formula, error):
    with pytest.raises(error):
        lmm.specify(formula, lmm.datasets.load("toy"))


def test_no_random_term_suggests_ols():
    with pytest.raises(lmm.FormulaError, match="least squares"):
        lmm.specify("Resp ~ Treat", lmm.datasets.load("toy"))


def test_missing_file_and_non_numeric_response(tmp_path):
    with pytest.raises(lmm.DataError, match="not found"):
        lmm.specify("y ~ x + (1|g)", str(tmp_path / "nope.csv"))
    frame = pd.DataFrame({"y": ["250ms", "300ms", "1", "2"], "g": [1, 1, 2, 2]})
    with pytest.raises(lmm.DataError, match="numeric"):
        lmm.specify("y ~ 1 + (1|g)", frame)


def test_poly_degree_beyond_the_distinct_values_is_refused_like_r():
    d = pd.DataFrame({"y": np.arange(12.0) % 5, "x": np.tile([1, 2, 3, 4], 3), "g": np.repeat([1, 2, 3], 4)})
    with pytest.raises(lmm.FormulaError, match="'degree' must be less than number of unique points \\(4\\)"):
        lmm.specify("y ~ poly(x, 4) + (1|g)", d)
    assert lmm.specify("y ~ poly(x, 3) + (1|g)", d).p == 4


def test_integer_arithmetic_in_I_does_not_wrap_around():
    """numpy's int64 wraps 7**40 round silently; the column is computed in floating point instead."""
    d = pd.DataFrame({"y": np.arange(8.0), "x": np.array([1, 2, 3, 7, 1, 2, 3, 7]), "g": np.repeat([1, 2], 4)})
    design = lmm.specify("y ~ I(x**30) + (1|g)", d)
    np.testing.assert_allclose(design.X[:, 1], d.x.to_numpy(dtype=float) ** 30, rtol=1e-15)
    assert lmm.specify("y ~ C(x) + (1|g)", d).fixed_names[1] == "C(x)2"     # levels keep their names, as in R
