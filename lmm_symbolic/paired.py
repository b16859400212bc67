r"""The paired t-test (R's ``t.test(paired = TRUE)``) and the tutorial's within-individual centring.

For two observations per individual, the REML fit of ``Resp ~ Treat + (1|Ind)`` gives the same t for Treat
as the paired t-test: both rest on the within-individual differences :math:`d_j`, with
:math:`t = \bar d / (s_d / \sqrt{G})` on :math:`G - 1` degrees of freedom.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.stats

from .errors import DataError
from .specification import DataLike, read_data


@dataclass(frozen=True)
class PairedTTest:
    """R's t.test(x, y, paired = TRUE): mean difference x - y, its t, df, p and confidence interval."""

    estimate: float
    t: float
    df: float
    p_value: float
    conf_int: tuple[float, float]
    differences: np.ndarray

    def __str__(self) -> str:
        lo, hi = self.conf_int
        return (f"Paired t-test: t = {self.t:.4g}, df = {self.df:g}, p-value = {self.p_value:.4g}\n"
                f"mean difference {self.estimate:.6g}, 95 percent confidence interval {lo:.6g} {hi:.6g}")


def _pairs(frame: pd.DataFrame, response: str, treatment: str, subject: str) -> tuple[np.ndarray, np.ndarray]:
    for col in (response, treatment, subject):
        if col not in frame.columns:
            raise DataError(f"unknown column {col!r}; the data has {', '.join(map(str, frame.columns))}")
    levels = sorted(pd.unique(frame[treatment]))
    if len(levels) != 2:
        raise DataError(f"a paired t-test needs a treatment with two levels; {treatment!r} has {len(levels)}")
    wide = frame.pivot_table(index=subject, columns=treatment, values=response, aggfunc="count", observed=True)
    if not (wide == 1).all().all():
        raise DataError("a paired t-test needs exactly one observation per subject and treatment level")
    values = frame.pivot_table(index=subject, columns=treatment, values=response, observed=True)
    return values[levels[1]].to_numpy(float), values[levels[0]].to_numpy(float)


def paired_t_test(data: DataLike, response: str = "Resp", treatment: str = "Treat", subject: str = "Ind",
                  conf_level: float = 0.95) -> PairedTTest:
    """t.test(response[second level], response[first level], paired = TRUE), pairs by subject."""
    x, y = _pairs(read_data(data), response, treatment, subject)
    d = x - y
    G = len(d)
    if G < 2:
        raise DataError(f"a paired t-test needs at least two subjects with both treatment levels; there is {G}")
    se = d.std(ddof=1) / np.sqrt(G)
    if se <= 10 * np.finfo(float).eps * abs(d.mean()):      # R: "data are essentially constant"
        raise DataError("the paired differences are all equal (data are essentially constant): their standard "
                        "error is 0, so t is undefined")
    t = d.mean() / se
    df = G - 1
    q = scipy.stats.t.ppf(0.5 + conf_level / 2, df)
    return PairedTTest(estimate=float(d.mean()), t=float(t), df=float(df),
                       p_value=float(2 * scipy.stats.t.sf(abs(t), df)),
                       conf_int=(float(d.mean() - q * se), float(d.mean() + q * se)), differences=d)


def within_centred(data: DataLike, response: str = "Resp", subject: str = "Ind") -> pd.DataFrame:
    """The tutorial's Resp_std: each response minus its individual's mean, plus the grand mean.

    An ordinary regression of Resp_std on Treat gives the treatment effect of the mixed model; with its
    residual degrees of freedom corrected for the G individual means removed (n - G - 1 instead of n - 2)
    its t equals the paired t.
    """
    frame = read_data(data).copy()
    means = frame.groupby(subject, observed=True)[response].transform("mean")
    frame[f"{response}_std"] = frame[response] - means + frame[response].mean()
    return frame
