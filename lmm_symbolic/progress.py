"""Progress reports: log lines under the ``lmm_symbolic`` logger, at INFO.

Off by default in the API (Python's logging shows nothing below WARNING unless configured); on in the
command line, which calls :func:`enable`. A long fit then reports each stage as it starts and how long it
took::

    lmm_symbolic: specifying the design (1000000 rows)...
    lmm_symbolic: specifying the design: 0.08 s
    lmm_symbolic: computing group statistics (1000000 rows, 10000 groups)...

In a notebook or script: ``lmm_symbolic.progress.enable()`` (or configure ``logging`` yourself).
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time

logger = logging.getLogger("lmm_symbolic")


@contextlib.contextmanager
def stage(what: str, *args):
    """Log ``what % args`` + '...' at the start and its duration at the end (INFO)."""
    if not logger.isEnabledFor(logging.INFO):
        yield
        return
    text = what % args if args else what
    logger.info("%s...", text)
    start = time.perf_counter()
    yield
    logger.info("%s: %.2f s", text, time.perf_counter() - start)


def enable(level: int = logging.INFO, stream=None) -> logging.Handler:
    """Show lmm_symbolic's progress lines on ``stream`` (stderr by default); returns the handler (remove it
    with ``logging.getLogger("lmm_symbolic").removeHandler(handler)``). Calling it again replaces the
    handler it added before, so lines are never doubled."""
    for h in list(logger.handlers):
        if getattr(h, "_lmm_progress", False):
            logger.removeHandler(h)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(logging.Formatter("lmm_symbolic: %(message)s"))
    handler._lmm_progress = True
    logger.addHandler(handler)
    logger.setLevel(level)
    return handler
