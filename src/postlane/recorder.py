"""The worker's recorder: outcomes of many sends written in batches, each batch one transaction.

Sends finish one by one; writing each result on its own would cost a commit per recipient. The
recorder queues outcomes, writes everything waiting in one :meth:`Store.record` call, and wakes
each caller once its outcome is durable. While the store cannot answer (a database failover, a
full disk) the outcomes are kept and written again, with a growing pause, until it answers: a
result never recorded would be sent again, though this worker is alive and the remote server
said 250. The worker's own leases are not reaped meanwhile (housekeeping keeps them), so the
result still lands on its rows. Any other error is retried for half a lease, then raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from postlane.clock import Clock
from postlane.errors import StoreUnavailable
from postlane.records import Outcome
from postlane.store.base import DeliveryStore

log = logging.getLogger("postlane.worker")

#: the longest pause between two tries of a record while the store cannot answer
MAX_RETRY_PAUSE = 5.0


@dataclass
class _Pending:
    outcome: Outcome
    done: asyncio.Future[None]


class Recorder:
    """Batches outcomes into store transactions (see the module docstring)."""

    def __init__(self, store: DeliveryStore, owner: str, clock: Clock, lease: float) -> None:
        self.store = store
        self.owner = owner
        self.clock = clock
        self.lease = lease
        self._queue: list[_Pending] = []
        #: the batch being written now (taken off the queue)
        self._writing: list[_Pending] = []
        self._wake = asyncio.Event()
        #: set each time a batch is over (written, or failed)
        self._written = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="postlane-recorder")

    async def record(self, outcomes: Sequence[Outcome]) -> None:
        """Queue outcomes and wait until they are committed."""
        if not outcomes:
            return
        loop = asyncio.get_running_loop()
        waits = []
        for outcome in outcomes:
            pending = _Pending(outcome, loop.create_future())
            self._queue.append(pending)
            waits.append(pending.done)
        self._wake.set()
        await asyncio.gather(*waits)

    async def stop(self, timeout: float | None = None) -> int:
        """Write what is queued, then stop. While the store cannot answer, waits up to
        ``timeout`` (None: until it answers) and gives up what is left: returns how many
        outcomes were not recorded (their deliveries are sent again once their leases lapse).
        A stop that waited for a store that never came back kept its process from ending,
        busy on a core (a durability audit)."""
        if self._task is None:
            return 0
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drained(), timeout)
        left = len(self._writing) + len(self._queue)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        return left

    async def _drained(self) -> None:
        while self._queue or self._writing:
            self._written.clear()
            self._wake.set()
            await self._written.wait()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                batch = self._writing = self._queue
                self._queue = []
                try:
                    await self._write([p.outcome for p in batch])
                except asyncio.CancelledError:
                    for p in batch:
                        if not p.done.done():
                            p.done.cancel()
                    raise
                except Exception as exc:
                    for p in batch:
                        if not p.done.done():
                            p.done.set_exception(exc)
                    continue
                else:
                    for p in batch:
                        if not p.done.done():
                            p.done.set_result(None)
                finally:
                    self._writing = []
                    self._written.set()

    async def _write(self, outcomes: list[Outcome]) -> None:
        delay = 0.05
        deadline = time.monotonic() + max(self.lease / 2, 1.0)
        failing = False
        while True:
            try:
                await self.store.record(self.owner, outcomes, self.clock.now())
            except StoreUnavailable as exc:
                if not failing:
                    log.warning(
                        "could not record %d outcome(s): %s; keeping them, trying again until "
                        "the store answers",
                        len(outcomes),
                        exc,
                    )
                    failing = True
            except Exception:
                if time.monotonic() > deadline:
                    log.exception("could not record %d outcome(s)", len(outcomes))
                    raise
            else:
                if failing:
                    log.warning("recorded %d outcome(s) once the store answered", len(outcomes))
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_RETRY_PAUSE)
