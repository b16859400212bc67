"""Exercises for teachers: a small random design, the questions a student derives by hand, the worked
solutions (from the derivation, never typed in), as LaTeX and as notebook cells checked with ``verify``."""
from __future__ import annotations

import random
from dataclasses import dataclass

import pandas as pd
import sympy as sp

from .derivation import derive
from .errors import ModelError
from .specification import specify
from .verification import TITLES, derived_quantity

QUESTIONS = ("det", "quadratic_form", "gls_estimator", "loglik", "conditional_modes")
#: asked when the design is balanced (equal group sizes, GLS = OLS): the closed forms exist
BALANCED_QUESTIONS = ("reml_sigma2", "reml_sigma_s2", "ml_sigma_s2")
FORMULA = "y ~ x + (1|g)"


@dataclass(frozen=True)
class Exercise:
    """A design (``data``, ``formula``), its derivation and the (quantity, question, solution) triples."""

    seed: int
    data: pd.DataFrame
    formula: str
    derivation: object
    questions: tuple[tuple[str, str, sp.Basic], ...]

    def to_latex(self) -> str:
        rows = " \\\\\n".join(f"{r.g} & {r.x} & {r.y}" for r in self.data.itertuples())
        out = [r"\documentclass{article}", r"\usepackage{amsmath}", r"\begin{document}",
               rf"\section*{{Exercise (seed {self.seed}): $y \sim x + (1 \mid g)$}}",
               r"\begin{tabular}{ccc} g & x & y \\ \hline", rows, r"\end{tabular}", r"\begin{enumerate}"]
        out += [rf"\item {q}" for _, q, _ in self.questions]
        out += [r"\end{enumerate}", r"\subsection*{Solutions}", r"\begin{enumerate}"]
        out += [rf"\item $\displaystyle {sp.latex(s, symbol_names=self.derivation.symbols.latex_names)}$"
                for _, _, s in self.questions]
        out += [r"\end{enumerate}", r"\end{document}", ""]
        return "\n".join(out)

    def to_notebook(self):
        import nbformat
        nb = nbformat.v4.new_notebook()
        csv = self.data.to_csv(index=False)
        cells = [nbformat.v4.new_markdown_cell(f"# Exercise (seed {self.seed})\nModel `{self.formula}` on the data below."),
                 nbformat.v4.new_code_cell("import io\nimport pandas as pd\nimport lmm_symbolic as lmm\n"
                                           f"data = pd.read_csv(io.StringIO({csv!r}))\n"
                                           f"d = lmm.derive({self.formula!r}, data)\ndata")]
        for key, q, _ in self.questions:
            cells.append(nbformat.v4.new_markdown_cell(q))
            cells.append(nbformat.v4.new_code_cell(f"answer = r''  # your {key}\nprint(lmm.verify(d, {key!r}, answer))"))
        nb.cells = cells
        return nb


def exercise(seed: int = 0, groups: int = 2, sizes=None) -> Exercise:
    """A random design with ``groups`` groups of the given ``sizes`` (default 2 each, at most 6 per group,
    at most 12 observations), integer responses and a 0/1 covariate, and its questions with solutions."""
    sizes = [2] * groups if sizes is None else [int(s) for s in sizes]
    if len(sizes) != groups or not (1 <= groups <= 6) or any(not 1 <= s <= 6 for s in sizes) or sum(sizes) > 12:
        raise ModelError("an exercise has 1 to 6 groups of 1 to 6 observations (at most 12), one size per group")
    rng = random.Random(seed)
    rows = [(f"g{j + 1}", i % 2, rng.randint(0, 20)) for j, m in enumerate(sizes) for i in range(m)]
    data = pd.DataFrame(rows, columns=["g", "x", "y"])
    der = derive(specify(FORMULA, data))
    questions = [(k, f"Derive {TITLES[k]}.", derived_quantity(der, k)) for k in QUESTIONS]
    for k in BALANCED_QUESTIONS:
        try:
            questions.append((k, f"Derive {TITLES[k]}, and its value at these data.", derived_quantity(der, k)))
        except ModelError:          # unequal group sizes: no closed form to ask for
            break
    questions = tuple(questions)
    return Exercise(seed, data, FORMULA, der, questions)
