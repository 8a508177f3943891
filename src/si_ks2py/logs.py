"""The package logger ("si_ks2py"): a console handler for scripts, and the log of each run.

``add_default_handler`` is the standard configuration for a script: one StreamHandler on the package logger and
the logger's level; the root logger is left alone. ``run_log`` gives each run a complete <output>/ks2py.log
without changing what the caller's own handlers print.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

logger = logging.getLogger("si_ks2py")

FORMAT = "%(asctime)s %(levelname)s %(message)s"
DATE_FORMAT = "%H:%M:%S"


class _DefaultHandler(logging.StreamHandler):
    """The console handler of ``add_default_handler`` (its own class, so a second call finds it)."""


def add_default_handler(level: int | str = "INFO") -> logging.Handler:
    """Print the package's log records at ``level`` and above (a name as 'DEBUG' or a number) on stderr.

    Adds a StreamHandler with a formatter to the "si_ks2py" logger and sets the logger's level; calling it again
    only changes the level. Returns the handler.
    """
    handler = next((h for h in logger.handlers if isinstance(h, _DefaultHandler)), None)
    if handler is None:
        handler = _DefaultHandler()
        handler.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
        logger.addHandler(handler)
    logger.setLevel(level.upper() if isinstance(level, str) else level)
    return handler


def reachable_handlers(start: logging.Logger) -> list[logging.Handler]:
    """The handlers a record logged on ``start`` reaches: its own, then its ancestors' while they propagate
    (logging.Logger.callHandlers's walk; the level check is each handler's)."""
    handlers, current = [], start
    while current is not None:
        handlers += current.handlers
        current = current.parent if current.propagate else None
    return handlers


class _Forward(logging.Handler):
    """Hands each record at or above its level to ``handlers``, as propagation would have."""

    def __init__(self, level: int, handlers: list[logging.Handler]):
        super().__init__(level)
        self.handlers = handlers

    def emit(self, record):
        for h in self.handlers:
            if record.levelno >= h.level:
                h.handle(record)


@contextlib.contextmanager
def run_log(output_folder: Path, verbose: bool):
    """Log the run's INFO records (and above) to <output>/ks2py.log (SpikeInterface copies it into its log) and,
    when verbose and no handler of the caller prints them, to the console.

    The file handler's own level is INFO. The caller's configuration decides everything else:
    - if the package logger lets INFO through (its effective level is INFO or lower, e.g. after
      add_default_handler('DEBUG')), nothing else changes: the caller's handlers get what they would anyway;
    - if not (e.g. the caller set it to WARNING, or only the root's default WARNING applies), INFO records would
      never be created, so for the run the logger's level is INFO and it stops propagating; its own handlers are
      moved behind one forwarding handler at the previous effective level, which hands them, and the ancestors'
      handlers, exactly the records they saw before.
    The console handler (verbose) is added only when no handler of the logger or its ancestors exists that would
    print the records already (logging's lastResort aside), so a root handler prints each line once. It prints
    INFO, or the package logger's own level when the caller set one above INFO.
    """
    reachable = reachable_handlers(logger)
    file_handler = logging.FileHandler(output_folder / "ks2py.log")
    ours = [file_handler]
    if verbose and all(isinstance(h, logging.NullHandler) for h in reachable):
        ours.append(logging.StreamHandler())
        ours[-1].setLevel(max(logging.INFO, logger.level))
    for h in ours:
        h.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
    file_handler.setLevel(logging.INFO)
    level, propagate, theirs = logger.level, logger.propagate, list(logger.handlers)
    previous = logger.getEffectiveLevel()
    if previous > logging.INFO:
        for h in theirs:
            logger.removeHandler(h)
        ours.append(_Forward(previous, reachable))
        logger.propagate = False
        logger.setLevel(logging.INFO)
    for h in ours:
        logger.addHandler(h)
    try:
        yield
    finally:
        for h in ours:
            logger.removeHandler(h)
            h.close()
        logger.setLevel(level)
        logger.propagate = propagate
        for h in theirs:
            if h not in logger.handlers:
                logger.addHandler(h)
