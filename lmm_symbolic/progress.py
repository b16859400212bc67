"""Progress reports: log lines under the ``lmm_symbolic`` logger, at INFO.

Off by default in the API (Python's logging shows nothing below WARNING unless configured); on in the
command line, which calls :func:`enable`. A stage that runs longer than ``REPORT_AFTER`` seconds then
reports what it is doing and how long it took (quick work stays silent)::

    lmm_symbolic: specifying the design (1000000 rows)...
    lmm_symbolic: specifying the design: 0.08 s
    lmm_symbolic: computing group statistics (1000000 rows, 10000 groups)...

In a notebook or script: ``lmm_symbolic.progress.enable()`` (or configure ``logging`` yourself).
"""
from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time

logger = logging.getLogger("lmm_symbolic")


#: a stage that takes longer than this (seconds) is reported; quicker work stays silent
REPORT_AFTER = 2.0


@contextlib.contextmanager
def stage(what: str, *args):
    """Log ``what % args`` + '...' (INFO) once the stage has run for REPORT_AFTER seconds, and then its
    duration when it ends; quick stages print nothing."""
    if not logger.isEnabledFor(logging.INFO):
        yield
        return
    text = what % args if args else what
    timer = threading.Timer(REPORT_AFTER, logger.info, args=("%s...", text))
    timer.daemon = True
    start = time.perf_counter()
    if REPORT_AFTER <= 0:
        logger.info("%s...", text)
    else:
        timer.start()
    try:
        yield
    finally:
        timer.cancel()
        elapsed = time.perf_counter() - start
        if elapsed >= REPORT_AFTER:
            logger.info("%s: %.2f s", text, elapsed)


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


@contextlib.contextmanager
def reporting(stream=None):
    """Progress lines on ``stream`` (stderr) for the duration of a block; logging as it was afterwards."""
    level = logger.level
    handler = enable(stream=stream)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
