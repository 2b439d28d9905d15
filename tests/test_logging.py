"""layerfusion's console log follows `sys.stderr` as it is now (pytest's capture, a notebook, a server)."""

from __future__ import annotations

import io
import logging
import sys

from layerfusion.cli import log_to_stderr


def test_log_goes_to_the_current_stderr_even_after_the_old_one_closed(monkeypatch):
    logger = logging.getLogger("layerfusion")
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(logger, "level", logger.level)
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    log_to_stderr()
    logger.info("one")
    first.close()  # e.g. the capture of a finished test
    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    logger.info("two")
    assert second.getvalue() == "[layerfusion] two\n"
