"""Logging of the command line and the jobs: a quiet, readable run by default.

distann's own messages go to stderr at the chosen level (INFO by default). Dask's loggers
(``distributed``, ``bokeh``, ``tornado``) stay at WARNING unless ``verbose`` is asked for; the
embedded cluster's worker processes follow the level of the ``distributed`` logger (see
:mod:`distann.cluster`).
"""

from __future__ import annotations

import logging
import warnings

DASK_LOGGERS = ("distributed", "bokeh", "tornado")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class _NoCancelledTracebacks(logging.Filter):
    """Drops a Dask logger's record carrying an ``asyncio.CancelledError`` traceback: Dask's
    client logs them as it shuts itself down after losing its scheduler, and the job's own error
    (SchedulerLostError) already says what happened and what to do."""

    def filter(self, record: logging.LogRecord) -> bool:
        import asyncio

        exc = record.exc_info[0] if record.exc_info else None
        return not (record.name.split(".")[0] in DASK_LOGGERS and exc is not None
                    and issubclass(exc, asyncio.CancelledError))


def _log_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Python warnings (a TrainingWarning, say) as one log line, not file:line and source."""
    logging.getLogger("distann").warning("%s: %s", category.__name__, message)


def setup(level: str = "INFO", verbose: bool = False) -> None:
    """Configure logging for a command line run (``level`` one of :data:`LEVELS`)."""
    numeric = logging.getLevelName(level)
    fmt = "%(asctime)s %(levelname)-7s %(name)s: %(message)s" if verbose else "%(asctime)s %(levelname)-7s %(message)s"
    logging.basicConfig(level=numeric, format=fmt, datefmt="%H:%M:%S")
    logging.getLogger("distann").setLevel(numeric)
    warnings.showwarning = _log_warning
    import distributed  # noqa: F401 - its import sets the levels of its loggers; ours must come after

    if verbose:
        logging.getLogger("distributed").setLevel(max(numeric, logging.INFO))
        return
    for name in DASK_LOGGERS:  # never more talkative than Dask's own defaults (bokeh: ERROR)
        logger = logging.getLogger(name)
        logger.setLevel(max(logger.getEffectiveLevel(), numeric, logging.WARNING))
    for handler in logging.getLogger().handlers:  # a handler's filter sees the records of every child logger
        if not any(isinstance(f, _NoCancelledTracebacks) for f in handler.filters):
            handler.addFilter(_NoCancelledTracebacks())
