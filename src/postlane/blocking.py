"""postlane for synchronous code: :class:`Postlane` runs an :class:`~postlane.app.AsyncPostlane`
on an event loop of its own thread, so a Django view, a script or a Celery task calls it as
plain functions (``postlane.Postlane``)."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import threading
import weakref
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from concurrent.futures import Future
from datetime import datetime
from pathlib import Path
from typing import Any, TypedDict, TypeVar, Unpack

from postlane.app import AsyncPostlane, EventPage
from postlane.clock import Clock
from postlane.config import Config
from postlane.cursors import Page
from postlane.message import Lane, Message
from postlane.records import (
    Cancelled,
    DeadLetter,
    EnqueueResult,
    MessageView,
    Selector,
    Stats,
    Suppression,
)

__all__ = ["Postlane"]

T = TypeVar("T")


class _LoopThread:
    """An event loop on a daemon thread, for running :class:`AsyncPostlane` from sync code."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="postlane-loop", daemon=True
        )
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class _SuppressOptions(TypedDict, total=False):
    """The keywords :meth:`Postlane.suppress` passes on to :meth:`AsyncPostlane.suppress`."""

    reason: str | None
    scope: str | None
    expires_at: datetime | str | float | None
    detail: str | None
    lanes: Iterable[Lane | str] | None


class Postlane:
    """postlane for synchronous code (Django views, scripts, Celery tasks): thread-safe; every
    call returns once done (``send`` once the message is durably stored)."""

    def __init__(
        self,
        config: Config | str | Path | None = None,
        *,
        config_path: str | Path | None = None,
        clock: Clock | None = None,
    ) -> None:
        """``config``: a :class:`Config`, or the path of a configuration file (as
        ``config_path``); neither: ``postlane.toml`` here, or ``$POSTLANE_CONFIG``."""
        self._portal = _LoopThread()
        try:
            self._async = self._portal.run(_build(config, config_path, clock))
        except BaseException:
            self._portal.stop()
            raise
        self.config = self._async.config
        # a script that never closes it: closed at exit, before the interpreter tears down its
        # loop's thread (a PostgreSQL pool's tasks said "Task was destroyed but it is
        # pending!" three times)
        self._at_exit = functools.partial(_close_at_exit, weakref.ref(self))
        atexit.register(self._at_exit)

    def close(self) -> None:
        atexit.unregister(self._at_exit)
        if self._portal.loop.is_running():
            self._portal.run(self._async.close())
            self._portal.stop()

    def __enter__(self) -> Postlane:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(
        self, message: Message | Mapping[str, Any] | None = None, /, **fields: Any
    ) -> EnqueueResult:
        return self._portal.run(self._async.send(message, **fields))

    def send_many(self, messages: Sequence[Message | Mapping[str, Any]]) -> list[EnqueueResult]:
        return self._portal.run(self._async.send_many(messages))

    def get(self, queue_id: str, *, history: bool = True) -> MessageView:
        return self._portal.run(self._async.get(queue_id, history=history))

    def content(self, queue_id: str) -> bytes:
        """The stored message's bytes, as they are sent."""
        return self._portal.run(self._async.content(queue_id))

    def cancel(self, queue_id: str) -> Cancelled:
        """Cancel what of a message has not gone yet (see :meth:`AsyncPostlane.cancel`)."""
        return self._portal.run(self._async.cancel(queue_id))

    def messages(self, selector: Selector | None = None, *, limit: int = 1000) -> list[MessageView]:
        return self._portal.run(self._async.messages(selector, limit=limit))

    def stats(self) -> Stats:
        return self._portal.run(self._async.stats())

    def dead_letters(
        self, selector: Selector | None = None, *, limit: int = 1000
    ) -> list[DeadLetter]:
        return self._portal.run(self._async.dead_letters(selector, limit=limit))

    def message_page(
        self, selector: Selector | None = None, *, cursor: str | None = None, limit: int = 100
    ) -> Page[MessageView]:
        return self._portal.run(self._async.message_page(selector, cursor=cursor, limit=limit))

    def dead_letter_page(
        self, selector: Selector | None = None, *, cursor: str | None = None, limit: int = 100
    ) -> Page[DeadLetter]:
        return self._portal.run(self._async.dead_letter_page(selector, cursor=cursor, limit=limit))

    def suppression_page(
        self, *, cursor: str | None = None, limit: int = 1000
    ) -> Page[Suppression]:
        return self._portal.run(self._async.suppression_page(cursor=cursor, limit=limit))

    def suppress(self, address: str, **options: Unpack[_SuppressOptions]) -> bool:
        """See :meth:`AsyncPostlane.suppress`."""
        return self._portal.run(self._async.suppress(address, **options))

    def unsuppress(
        self, address: str, *, scope: str | None = None, reason: str | None = None
    ) -> bool:
        """See :meth:`AsyncPostlane.unsuppress`."""
        return self._portal.run(self._async.unsuppress(address, scope=scope, reason=reason))

    def suppressions(self, *, limit: int = 1000) -> list[Suppression]:
        return self._portal.run(self._async.suppressions(limit=limit))

    def events(
        self, after: str | int | None = None, *, limit: int = 100, types: Sequence[str] = ()
    ) -> EventPage:
        """See :meth:`AsyncPostlane.events`."""
        return self._portal.run(self._async.events(after, limit=limit, types=types))


async def _build(
    config: Config | str | Path | None, path: str | Path | None, clock: Clock | None
) -> AsyncPostlane:
    app = AsyncPostlane(config, config_path=path, clock=clock)
    await app.open()
    return app


def _close_at_exit(ref: weakref.ref[Postlane]) -> None:
    mail = ref()
    if mail is not None:
        with contextlib.suppress(Exception):  # the store gone already: nothing left to close
            mail.close()
