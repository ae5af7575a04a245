"""While the store cannot answer, a task that fails every second logs its first failure, then
a line a minute saying how many more, then one line when the store answers again. (A store
that could not be written made two warnings a second, and the alert evaluator a traceback.)"""

from __future__ import annotations

import logging

import pytest

from postlane.logs import OutageLog


def test_an_outage_is_three_lines_not_one_a_second(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    outage = OutageLog(logging.getLogger("postlane.test"), "housekeeping", clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="postlane.test"):
        outage.answered()  # no outage: nothing to say
        for _ in range(90):  # a failure a second for a minute and a half
            outage.failed("database is locked")
            now[0] += 1.0
        outage.answered()
        outage.answered()
        outage.failed("disk full")  # a new outage: said at once
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "housekeeping: the store cannot answer: database is locked",
        "housekeeping: the store cannot answer: database is locked "
        "(59 more time(s) since the last line)",
        "housekeeping: the store answers again (after 90 s)",
        "housekeeping: the store cannot answer: disk full",
    ]
