"""OffLoop: calls run in one thread beside the event loop, results and errors come back as the
callers' futures, and what was queued together wakes the loop once."""

from __future__ import annotations

import asyncio
import threading

import pytest

from postlane import waits
from postlane.waits import OffLoop


async def test_results_and_errors_come_back_to_their_callers() -> None:
    off = OffLoop("test-off-loop")

    def fail() -> None:
        raise ValueError("no")

    try:
        assert await off.run(lambda a, b: a + b, 2, 3) == 5
        with pytest.raises(ValueError, match="no"):
            await off.run(fail)
        assert await off.run(threading.current_thread) is not threading.current_thread()
    finally:
        off.close()


async def test_calls_queued_together_wake_the_loop_once_a_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    wake_ups: list[int] = []
    settle_all = waits._settle_all

    def counted(settled: list[object]) -> None:
        wake_ups.append(len(settled))
        settle_all(settled)  # type: ignore[arg-type]

    monkeypatch.setattr(waits, "_settle_all", counted)
    off = OffLoop("test-off-loop", batch=4)
    started, gate = threading.Event(), threading.Event()

    def hold() -> bool:
        started.set()
        return gate.wait(30)

    try:
        first = off.run(hold)  # holds the thread while ten more are queued
        assert started.wait(30)
        rest = [off.run(pow, n, 2) for n in range(10)]
        gate.set()
        assert await first is True
        assert await asyncio.gather(*rest) == [n * n for n in range(10)]
    finally:
        off.close()
    # the first alone (it was running while the others came), then the ten by fours
    assert wake_ups == [1, 4, 4, 2]
