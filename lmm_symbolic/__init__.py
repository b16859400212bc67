"""lmm_symbolic: the linear mixed model derived in closed form with sympy, fitted with scipy.

Pipeline (each stage returns a plain value to the next, like lme4's modular functions):
specification (:func:`~lmm_symbolic.specification.specify`) -> derivation (:func:`derive`) -> compilation -> optimisation -> results
(:func:`fit`).
"""
from __future__ import annotations

from . import datasets
from .derivation import Derivation, Equation
from .derivation import derive as derive_design
from .errors import DataError, ExpressionError, FormulaError, LMMError, LMMWarning, ModelError, NumericalError
from .paired import paired_t_test, within_centred
from .results import FitResult, fit_design, likelihood_ratio_test
from .inference import anova, update_formula
from .progress import stage
from .specification import Design, specify
from .statistics import is_dask_dataframe, specify_dask
from .exercises import Exercise, exercise
from .verification import StepReport, Verdict, verify, verify_steps

__version__ = "0.1.0"


def derive(formula: str, data) -> Derivation:
    """Eq. 1-12 for ``formula`` on ``data`` (a DataFrame or CSV path), derived by sympy."""
    return derive_design(specify(formula, data))


def fit(formula: str, data, method: str = "REML", exact: bool | str = "auto", kinship=None, weights=None,
        offset=None) -> FitResult:
    r"""Fit ``formula`` (lme4 syntax, e.g. ``Resp ~ Treat + (1|Ind)``) by REML (default) or ML.

    ``weights`` and ``offset`` (column names or :math:`n` values) are lmer's:
    :math:`\operatorname{Var}(\varepsilon_i) = \sigma^2 / w_i`, and a known term added to the linear
    predictor (as ``offset(z)`` in the formula). ``exact``: "auto" derives the exact estimates of a
    balanced random-intercept design when that is cheap (bounded by the data's size and digits, decided
    before any exact arithmetic), True allows more work, False skips it; ``fit.exact_reason`` says why
    there are none.

    With ``kinship`` (an :math:`n \times n` relationship matrix :math:`K` over the rows) the formula names
    the fixed part only (``y ~ x``) and :math:`\Sigma = \sigma_s^2 K + \sigma^2 I`.

    ``data`` may be a Dask DataFrame when the random terms share one grouping factor (``(1|g)``, ``(x|g)``,
    ``(1|g) + (0 + x|g)``): the per-group statistics are computed with Dask, partition by partition, on the
    active scheduler or distributed Client, and fitted as usual.
    Progress is logged under the ``lmm_symbolic`` logger at INFO (``lmm_symbolic.progress.enable()``).
    """
    if not isinstance(method, str) or method.upper() not in ("ML", "REML"):
        raise ModelError(f"method must be 'ML' or 'REML', not {method!r}")
    if is_dask_dataframe(data):
        if weights is not None or offset is not None:
            raise ModelError("weights and offsets are not supported with a Dask DataFrame yet; compute the "
                             "data into pandas first")
        return fit_design(specify_dask(formula, data, kinship=kinship), method=method, exact=False)
    with stage("specifying the design"):
        design = specify(formula, data, kinship=kinship, weights=weights, offset=offset)
    return fit_design(design, method=method, exact=exact)


__all__ = ["anova", "update_formula", "DataError", "Derivation", "Design", "Equation", "Exercise", "exercise", "ExpressionError", "FitResult", "FormulaError",
           "LMMError", "LMMWarning", "ModelError", "NumericalError", "datasets", "derive", "derive_design",
           "fit", "fit_design", "likelihood_ratio_test", "paired_t_test", "specify", "StepReport", "Verdict", "verify", "verify_steps", "within_centred"]
