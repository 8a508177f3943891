"""The package logger: add_default_handler, and a run's log that neither forces console output nor doubles it."""

import logging

import pytest

from si_ks2py import add_default_handler
from si_ks2py.logs import logger, run_log


@pytest.fixture
def clean_loggers():
    """Restore the package and root loggers' handlers, levels and propagation after the test."""
    root = logging.getLogger()
    saved = [(x, list(x.handlers), x.level, x.propagate) for x in (logger, root)]
    yield
    for x, handlers, level, propagate in saved:
        x.handlers[:] = handlers
        x.setLevel(level)
        x.propagate = propagate


class Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)


def test_add_default_handler_once_on_the_package_logger(clean_loggers):
    root_handlers = list(logging.getLogger().handlers)
    first = add_default_handler(level="DEBUG")
    second = add_default_handler(level="WARNING")
    assert first is second and logger.handlers.count(first) == 1
    assert isinstance(first, logging.StreamHandler) and first.formatter is not None
    assert logger.level == logging.WARNING
    assert logging.getLogger().handlers == root_handlers


def test_a_logger_set_to_warning_sees_no_info_and_the_file_log_is_complete(clean_loggers, tmp_path):
    mine, above = Collect(), Collect()
    logger.addHandler(mine)
    logging.getLogger().addHandler(above)
    logger.setLevel(logging.WARNING)
    with run_log(tmp_path, verbose=True):
        logger.info("an info line")
        logger.warning("a warning")
    assert [r.getMessage() for r in mine.records] == ["a warning"]
    assert [r.getMessage() for r in above.records] == ["a warning"]  # propagated as before
    text = (tmp_path / "ks2py.log").read_text()
    assert "INFO an info line" in text and "WARNING a warning" in text
    # the caller's configuration is back
    assert logger.level == logging.WARNING and logger.propagate and logger.handlers == [mine]


def test_verbose_with_a_root_handler_prints_each_line_once(clean_loggers, tmp_path, capsys):
    root = logging.getLogger()
    root.addHandler(logging.StreamHandler())  # stderr as of now: captured by capsys
    root.setLevel(logging.INFO)
    with run_log(tmp_path, verbose=True):
        logger.info("printed once")
    assert capsys.readouterr().err.count("printed once") == 1
    assert "printed once" in (tmp_path / "ks2py.log").read_text()


def test_verbose_without_handlers_prints_info_on_the_console(clean_loggers, tmp_path, capsys):
    logger.handlers[:] = []
    logging.getLogger().handlers[:] = []
    with run_log(tmp_path, verbose=True):
        logger.info("to the console")
    with run_log(tmp_path, verbose=False):
        logger.info("to the file only")
    err = capsys.readouterr().err
    assert "to the console" in err and "to the file only" not in err
    assert "to the file only" in (tmp_path / "ks2py.log").read_text()


def test_debug_from_add_default_handler_reaches_its_handler(clean_loggers, tmp_path):
    handler = add_default_handler(level="DEBUG")
    mine = Collect()
    logger.addHandler(mine)
    with run_log(tmp_path, verbose=True):
        logger.debug("a debug line")
    assert [r.getMessage() for r in mine.records] == ["a debug line"]
    assert "a debug line" not in (tmp_path / "ks2py.log").read_text()  # the file takes INFO and above
    assert logger.handlers.count(handler) == 1
