"""Data sets shipped with the package: the tutorial's toy data and lme4's classic examples.

Sources are listed in ``data/SOURCES.md``; grouping columns load as categorical, as R factors.
"""
from __future__ import annotations

from importlib import resources

import pandas as pd

from ..errors import DataError

#: data set name -> (its grouping columns, the model the tutorial or lme4 fits to it)
CATALOGUE = {
    "toy": (("Ind",), "Resp ~ Treat + (1|Ind)"),
    "sleepstudy": (("Subject",), "Reaction ~ Days + (1|Subject)"),
    "Dyestuff": (("Batch",), "Yield ~ 1 + (1|Batch)"),
    "Dyestuff2": (("Batch",), "Yield ~ 1 + (1|Batch)"),
    "Pastes": (("batch", "cask", "sample"), "strength ~ 1 + (1|batch/cask)"),
    "Penicillin": (("plate", "sample"), "diameter ~ 1 + (1|plate) + (1|sample)"),
}


def names() -> list[str]:
    """The names ``load`` accepts."""
    return list(CATALOGUE)


def path(name: str):
    """The packaged CSV file of a data set."""
    if name not in CATALOGUE:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(CATALOGUE)}")
    return resources.files(__package__).joinpath("data", f"{name}.csv")


def load(name: str) -> pd.DataFrame:
    """A shipped data set as a DataFrame, its grouping columns categorical with sorted levels."""
    with resources.as_file(path(name)) as csv:
        frame = pd.read_csv(csv)
    for col in CATALOGUE[name][0]:
        frame[col] = pd.Categorical(frame[col], categories=sorted(frame[col].unique()))
    return frame


def formula(name: str) -> str:
    """The model usually fitted to a data set."""
    path(name)
    return CATALOGUE[name][1]


def reference(case: str | None = None) -> dict:
    """lme4's, nlme's and lmerTest's numbers for the fits the notebooks print (``data/lme4_reference.json``,
    the notebooks' subset of tests/reference/lme4_reference.json, written by make_reference.R): every case,
    or one case (``"toy_ml"``, ``"sleepstudy_slope_reml"``, ...)."""
    import json

    text = resources.files(__package__).joinpath("data", "lme4_reference.json").read_text()
    cases = json.loads(text)["cases"]
    if case is None:
        return cases
    if case not in cases:
        raise DataError(f"no reference case {case!r}; choose one of {', '.join(cases)}")
    return cases[case]
