"""Waiting: on the first of several things, and for mail to go first."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


async def first_of(*waits: Awaitable[object], timeout: float | None) -> None:
    """Wait until any of ``waits`` completes or ``timeout`` passes; cancel the rest."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


async def to_its_end(work: Awaitable[T]) -> tuple[T, bool]:
    """Run ``work`` to its end even when the caller is cancelled meanwhile (a Ctrl-C), and say
    whether it was: a slice of a bulk action handed to the store commits whatever happens,
    so what it changed must be counted before the cancellation goes on (re-raise it then)."""
    task = asyncio.ensure_future(work)
    cancelled = False
    while True:
        try:
            return await asyncio.shield(task), cancelled
        except asyncio.CancelledError:
            if task.cancelled():  # the work itself was cancelled, not only its caller
                raise
            if task.done():  # it ended as the cancellation came: its result counts
                return task.result(), True
            cancelled = True


async def took(event: asyncio.Event, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for ``event``; True (and the event cleared) when it was
    set, False on timeout."""
    if not event.is_set():  # (wait_for with a timeout of 0 would time out even when set)
        try:
            await asyncio.wait_for(event.wait(), timeout=max(0.0, timeout))
        except TimeoutError:
            return False
    event.clear()
    return True


class MailFirst:
    """Mail has priority over background work in a process that does both: webhook requests
    (:mod:`postlane.webhooks.sender`) and reports arriving at the bounce listener.

    A webhook costs about what a delivery costs (a request and its reply through the event
    loop), and each message makes two events or more, so a sender going flat out beside a busy
    worker would take a third of its rate or more; a report read and recorded costs about as
    much. While ``activity`` (a counter that moves with each delivery attempt: the worker's)
    has moved within the last half second, or the process started less than half a second
    ago, such work starts only in the first ``share`` of every quarter second; when mail is
    idle, or the work is more than ``max_lag`` seconds late, it starts at once. So during a
    burst it falls behind by a bounded amount and catches up when the burst is over.
    """

    CYCLE = 0.25
    QUIET = 0.5

    def __init__(self, activity: Callable[[], int] | None, share: float, max_lag: float) -> None:
        self.activity = activity
        self.share = share
        self.max_lag = max_lag
        self._seen = 0 if activity is None else activity()
        #: when the counter was last seen to move, and when it was last looked at (None: not
        #: yet; a process starting with a backlog delivers at once, so mail counts as busy
        #: until it has been quiet for a while)
        self._moved_at: float | None = None
        self._looked_at: float | None = None

    def busy(self) -> bool:
        """True while mail is being delivered: the counter moved within the last half second
        (as far as this can tell: a move is dated to the previous look, the earliest it can
        have happened, so a long look away does not read as a busy moment)."""
        if self.activity is None:
            return False
        now = time.monotonic()
        value = self.activity()
        if self._looked_at is None or self._moved_at is None:
            self._moved_at = now
        elif value != self._seen:
            self._moved_at = self._looked_at
        self._seen = value
        self._looked_at = now
        return now - self._moved_at < self.QUIET

    async def turn(self, age: float) -> None:
        """Wait until a request for an event ``age`` seconds old may start."""
        while age < self.max_lag and self.share < 1 and self.busy():
            phase = time.monotonic() % self.CYCLE
            if phase < self.CYCLE * self.share:
                return
            await asyncio.sleep(self.CYCLE - phase)


def settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    """Give a waiting caller its result or its error (unless it stopped waiting)."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


#: what became of one call run off the loop: the loop and future waiting for it, and its result
#: or its error
Outcome = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Any, BaseException | None]


def _settle_all(settled: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for future, result, error in settled:
        settle(future, result, error)


def report(outcomes: Sequence[Outcome]) -> None:
    """From another thread: resolve the futures, one wake-up per event loop (not one each)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[Any]] = {}
    for loop, future, result, error in outcomes:
        by_loop.setdefault(loop, []).append((future, result, error))
    for loop, settled in by_loop.items():
        loop.call_soon_threadsafe(_settle_all, settled)


async def in_own_thread(call: Callable[[], T]) -> T:
    """``call()`` in a thread of its own, awaited: for a blocking step that must also run while
    the interpreter exits (an ``atexit`` handler closing a store), when the loop's default
    executor (``asyncio.to_thread``) no longer takes work ("cannot schedule new futures after
    shutdown")."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def run() -> None:
        try:
            result = call()
        except BaseException as exc:
            loop.call_soon_threadsafe(settle, future, None, exc)
        else:
            loop.call_soon_threadsafe(settle, future, result, None)

    threading.Thread(target=run, name="postlane-blocking-step", daemon=True).start()
    return await future


def take_queued(queued: queue.SimpleQueue[T | None], first: T, most: int) -> tuple[list[T], bool]:
    """``first`` and what else is queued already, up to ``most`` in all, without waiting;
    True when the stop mark (None) was met, which is taken off the queue."""
    batch = [first]
    while len(batch) < most:
        try:
            more = queued.get_nowait()
        except queue.Empty:
            break
        if more is None:
            return batch, True
        batch.append(more)
    return batch, False


class OffLoop:
    """One thread that runs calls beside the event loop (work that releases the GIL, such as
    OpenSSL's RSA). It takes every call queued at once (up to ``batch``) and wakes each waiting
    loop once for all of them: under load, a wake-up of the loop per call cost about as much
    loop time as the call saved (``ThreadPoolExecutor`` wakes it for every call). The thread
    starts on first use and is a daemon; :meth:`close` lets it finish what is queued and end."""

    def __init__(self, name: str, batch: int = 16) -> None:
        self.name = name
        self.batch = batch
        self._calls: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._started = False
        self._lock = threading.Lock()

    def run(self, call: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """``call(*args)`` in the thread; its result (or error) comes back as this future's."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._lock:
            if not self._started:
                self._started = True
                threading.Thread(target=self._work, name=self.name, daemon=True).start()
        self._calls.put((call, args, loop, future))
        return future

    def close(self) -> None:
        with self._lock:
            if self._started:
                self._started = False
                self._calls.put(None)

    def _work(self) -> None:
        while True:
            first = self._calls.get()
            if first is None:
                return
            calls, stop = take_queued(self._calls, first, self.batch)
            if stop:
                self._calls.put(None)  # end after this batch
            outcomes: list[Outcome] = []
            for call, args, loop, future in calls:
                try:
                    outcomes.append((loop, future, call(*args), None))
                except Exception as exc:
                    outcomes.append((loop, future, None, exc))
            report(outcomes)
