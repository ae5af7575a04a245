"""A slice of a bulk action handed to the store is counted whatever a Ctrl-C does meanwhile:
the caller's cancellation waits for the slice's end (waits.to_its_end)."""

from __future__ import annotations

import asyncio

import pytest

from postlane.waits import to_its_end


async def test_a_cancelled_caller_gets_the_result_and_is_told() -> None:
    release = asyncio.Event()

    async def slice_written() -> int:
        await release.wait()
        return 500

    seen: list[tuple[int, bool]] = []

    async def caller() -> None:
        seen.append(await to_its_end(slice_written()))

    task = asyncio.create_task(caller())
    await asyncio.sleep(0)
    task.cancel()  # the Ctrl-C, while the slice is being written
    await asyncio.sleep(0)
    assert not task.done()  # it waits for the slice
    release.set()
    await task
    assert seen == [(500, True)]


async def test_a_cancellation_as_the_work_ends_still_counts_it() -> None:
    """A review: SIGINT landing after the store call finished, before the caller resumed,
    lost the slice from the count."""
    caller_task: asyncio.Task[tuple[int, bool]] | None = None

    async def slice_written() -> int:
        assert caller_task is not None
        asyncio.get_running_loop().call_soon(caller_task.cancel)
        return 500

    async def caller() -> tuple[int, bool]:
        return await to_its_end(slice_written())

    caller_task = asyncio.create_task(caller())
    assert await caller_task == (500, True)


async def test_work_cancelled_itself_is_a_cancellation() -> None:
    async def cancelled() -> int:
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await to_its_end(cancelled())
