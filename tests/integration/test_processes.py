"""The tests' own process helper (``tests/processes.py``): a postlane process that dies fails the
wait at once with its log, and a failure inside a running process's context carries its log."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.processes import ProcessFailed, start_postlane

pytestmark = pytest.mark.slow


async def test_a_process_that_dies_fails_the_wait_at_once_with_its_log(tmp_path: Path) -> None:
    (tmp_path / "postlane.toml").write_text('[delivery]\nrelai = "smtp://x"\n')
    worker = start_postlane("worker", cwd=tmp_path, log=tmp_path / "worker.log")
    # not the deadline (an hour) but the exit ends the wait, and the log says why
    with pytest.raises(
        ProcessFailed, match=r"(?s)exited while waiting.*unknown key delivery.relai"
    ):
        await worker.wait_running(timeout=3600)
    assert worker.returncode not in (None, 0)


async def test_a_failure_inside_the_context_carries_the_log_and_stops_the_process(
    tmp_path: Path,
) -> None:
    (tmp_path / "postlane.toml").write_text('[delivery]\npoll_interval = "100ms"\n')
    with pytest.raises(AssertionError, match="the test's own failure") as failed:
        async with start_postlane("worker", cwd=tmp_path, log=tmp_path / "w.log") as worker:
            await worker.wait_running()
            raise AssertionError("the test's own failure")
    assert worker.returncode == 0  # SIGTERM on the way out: a graceful stop
    [note] = failed.value.__notes__
    assert "`postlane worker`" in note and "postlane is running" in note
