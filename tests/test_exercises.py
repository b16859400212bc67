"""The exercise generator: solutions verified by verify, from the API and the CLI."""
import sympy as sp

from lmm_symbolic.cli import main
from lmm_symbolic.exercises import exercise
from lmm_symbolic.verification import verify


def test_solutions_verify_and_wrong_answers_do_not():
    ex = exercise(seed=3, groups=2, sizes=[2, 3])
    assert len(ex.data) == 5
    for key, _, solution in ex.questions:
        text = sp.sstr(solution.tolist() if isinstance(solution, sp.MatrixBase) else solution)
        assert verify(ex.derivation, key, text).equal
    assert verify(ex.derivation, "det", sp.sstr(ex.questions[0][2]) + " + sigma").counterexample
    assert r"\begin{enumerate}" in ex.to_latex() and len(ex.to_notebook().cells) == 2 + 2 * len(ex.questions)


def test_exercise_cli(tmp_path, capsys):
    stem = str(tmp_path / "ex")
    assert main(["exercise", "--seed", "1", "--groups", "3", "--sizes", "2", "2", "2", "--out", stem]) == 0
    assert (tmp_path / "ex.tex").read_text().startswith(r"\documentclass")
    assert (tmp_path / "ex.ipynb").exists() and (tmp_path / "ex.csv").exists()
    assert main(["exercise", "--groups", "9"]) == 2
