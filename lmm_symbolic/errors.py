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


#: the most characters of a data value quoted in a message (a 50 MB cell must not become a 50 MB message)
SHOWN_CHARACTERS = 40


def shown(value) -> str:
    """``repr(value)`` for a message, cut to :data:`SHOWN_CHARACTERS` with the value's length said."""
    text = repr(value)
    if len(text) <= SHOWN_CHARACTERS:
        return text
    return f"{text[:SHOWN_CHARACTERS]}... ({len(str(value)):,} characters)"
