"""The supervisor of ``serve --processes N`` with stand-in children (small Python programs):
a child that keeps dying is started again after a growing delay, one that ignores SIGTERM is
killed past the grace, and the exit status says whether every child stopped cleanly."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

import pytest

from postlane.config import parse_processes
from postlane.supervisor import ProcessSlot, Supervisor, parse_descriptors
from tests.polling import until


def supervisor(code: str, tmp_path: Path, *, processes: int = 1, grace: float = 5.0) -> Supervisor:
    # the supervisor appends --process-slot and --listen-fd: argv of the stand-in, unread
    return Supervisor(
        [sys.executable, "-c", code],
        {},
        processes,
        grace=grace,
        metrics_dir=tmp_path,
    )


async def test_a_child_dying_young_is_started_again_after_a_growing_delay(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="postlane.supervisor")
    crashing = supervisor("import sys; sys.exit(3)", tmp_path)
    running = asyncio.create_task(crashing.run())

    def restarts() -> list[str]:
        return [r.getMessage() for r in caplog.records if "starting it again" in r.getMessage()]

    await until(lambda: len(restarts()) >= 3, "three restarts")
    crashing.stop()
    assert await running == 0  # stopped between two starts: nothing left to stop
    said = restarts()
    assert "exited with status 3; starting it again in 0.5 s" in said[0]
    assert said[1].endswith("in 1 s") and said[2].endswith("in 2 s")


async def test_a_child_ignoring_sigterm_is_killed_past_the_grace(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="postlane.supervisor")
    ready = tmp_path / "ready"
    stubborn = supervisor(
        "import signal, time, pathlib; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        f"pathlib.Path({str(ready)!r}).touch(); time.sleep(60)",
        tmp_path,
        processes=2,
        grace=0.5,
    )
    running = asyncio.create_task(stubborn.run())
    await until(ready.exists, "the children to start")
    await until(lambda: len(stubborn.children) == 2, "both children")
    await asyncio.sleep(0.2)  # (both have set their handler by now; the first one told us)
    stubborn.stop()
    assert await running == 1
    assert "did not stop within 0.5 s: killing it" in caplog.text
    assert all(child.returncode is not None for child in stubborn.children.values())


@pytest.mark.parametrize(
    ("value", "expected"), [(1, 1), (8, 8), ("3", 3), ("auto", None), ("AUTO", None)]
)
def test_processes_is_a_positive_integer_or_auto(value: object, expected: int | None) -> None:
    got = parse_processes(value)
    assert got == expected if expected is not None else got >= 1


@pytest.mark.parametrize("value", [0, -1, "0", "many", 1.5, True, "", None])
def test_processes_refuses_anything_else(value: object) -> None:
    with pytest.raises(ValueError, match='a positive integer or "auto"'):
        parse_processes(value)


def test_a_child_is_told_its_slot_and_its_sockets() -> None:
    assert ProcessSlot.parse("1/4") == ProcessSlot(1, 4)
    assert str(ProcessSlot(0, 2)) == "0/2"
    for bad in ("4/4", "-1/2", "1", "a/b"):
        with pytest.raises(ValueError):
            ProcessSlot.parse(bad)
    assert parse_descriptors(["http=5", "smtp=6"]) == {"http": 5, "smtp": 6}
    with pytest.raises(ValueError):
        parse_descriptors(["ftp=7"])
