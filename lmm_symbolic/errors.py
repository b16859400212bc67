"""Error and warning types: one per kind of mistake, each message says what was wrong and what to do."""


class LMMError(Exception):
    """Base class of every error lmm_symbolic raises on purpose."""


class DataError(LMMError, ValueError):
    """The data cannot be used: missing or unreadable file, unknown column, non-numeric or infinite values."""


class FormulaError(LMMError, ValueError):
    """The formula cannot be read, or it describes no linear mixed model."""


class ModelError(LMMError, ValueError):
    """The model cannot be fitted to these data (lme4's checks: levels, random effects per group, ...)."""


class NumericalError(LMMError, ArithmeticError):
    """A computation lost its meaning (non-finite log-likelihood, singular GLS system)."""


class ExpressionError(LMMError, ValueError):
    """A user's expression cannot be read by the whitelist parser."""


class LMMWarning(UserWarning):
    """Something the user should know that does not stop the work (dropped rows, singular fit, ...)."""
