"""The Python API: what an application, the CLI and the HTTP API all call.

:class:`AsyncPostlane` for asyncio code, :class:`Postlane` for everything else (a Django view, a
script): the same methods, without ``await``. Both read the configuration the way the CLI does
(``postlane.toml``, ``$POSTLANE_CONFIG``, or the built-in defaults: SQLite in the working
directory)::

    import postlane

    mail = postlane.Postlane()
    mail.send(sender="app@example.com", to=["ada@example.net"], subject="Welcome", text="Hi!")
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Sequence
from concurrent.futures import Future
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from postlane.clock import Clock, SystemClock
from postlane.config import Config, load_config
from postlane.errors import NotFound, ValidationError
from postlane.message import Message, PreparedMessage, prepare
from postlane.records import (
    DeadLetter,
    EnqueueResult,
    MessageView,
    Selector,
    Stats,
    Suppression,
)
from postlane.store import Store, open_store_url

T = TypeVar("T")
#: listings are bounded; a caller wanting more pages narrows the selector
MAX_LIMIT = 10_000


class AsyncPostlane:
    """postlane for asyncio code. Open it (``async with`` or :meth:`open`) before use."""

    def __init__(
        self,
        config: Config | None = None,
        *,
        config_path: str | Path | None = None,
        store: Store | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.config = config if config is not None else load_config(config_path)
        self.clock: Clock = clock or SystemClock()
        self.store: Store = store or open_store_url(
            self.config.store.url, base_dir=self.config.base_dir
        )
        #: set after every enqueue, so a worker in this process wakes at once
        self.wake = asyncio.Event()
        self._opened = False

    async def open(self) -> AsyncPostlane:
        if not self._opened:
            await self.store.open()
            self._opened = True
        return self

    async def close(self) -> None:
        if self._opened:
            self._opened = False
            await self.store.close()

    async def __aenter__(self) -> AsyncPostlane:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- sending ---------------------------------------------------------------------------------

    def prepare(self, message: Message) -> PreparedMessage:
        """Validate and render a message (raises :class:`ValidationError`), storing nothing."""
        return prepare(message, max_size=self.config.smtp.max_size, now=self.clock.now())

    async def send(self, message: Message | None = None, /, **fields: Any) -> EnqueueResult:
        """Enqueue one message; returns once it is durably stored.

        Pass a :class:`Message`, or its fields as keywords (``sender``, ``to``, ``subject``,
        ``text``, ``html``, ``lane``, ``idempotency_key``, ...)."""
        if message is None:
            message = _message_from_fields(fields)
        elif fields:
            raise TypeError("pass a Message or keyword fields, not both")
        results = await self.send_prepared([self.prepare(message)])
        return results[0]

    async def send_many(self, messages: Sequence[Message]) -> list[EnqueueResult]:
        """Enqueue several messages in one durable commit. All are validated first: one bad
        message refuses the whole batch and stores nothing."""
        return await self.send_prepared([self.prepare(m) for m in messages])

    async def send_prepared(self, prepared: Sequence[PreparedMessage]) -> list[EnqueueResult]:
        results = await self.store.enqueue(prepared, self.clock.now())
        self.wake.set()
        return results

    # -- reading ---------------------------------------------------------------------------------

    async def get(self, queue_id: str, *, history: bool = True) -> MessageView:
        return await self.store.get_message(_check_id(queue_id), history=history)

    async def content(self, queue_id: str) -> bytes:
        return await self.store.get_content(_check_id(queue_id))

    async def messages(
        self, selector: Selector | None = None, *, limit: int = 1000
    ) -> list[MessageView]:
        """Messages matching ``selector`` (default: those not yet finished), oldest first."""
        return await self.store.list_messages(selector or Selector(), limit=_limit(limit))

    async def stats(self) -> Stats:
        return await self.store.stats(self.clock.now())

    async def dead_letters(
        self, selector: Selector | None = None, *, limit: int = 1000
    ) -> list[DeadLetter]:
        return await self.store.list_dead(selector or Selector(), limit=_limit(limit))

    async def dead_letter(self, queue_id: str) -> list[DeadLetter]:
        return await self.store.get_dead(_check_id(queue_id))

    # -- suppression -----------------------------------------------------------------------------

    async def suppressions(self, *, limit: int = 1000) -> list[Suppression]:
        return await self.store.list_suppressions(limit=_limit(limit))

    async def suppress(
        self, address: str, *, reason: str | None = None, source: str = "operator"
    ) -> bool:
        from postlane.message import parse_address

        mailbox = parse_address(address, "address")
        return await self.store.add_suppression(
            Suppression(
                address=mailbox.address,
                created_at=self.clock.now(),
                source=source,
                reason=reason or "added by an operator",
            )
        )

    async def unsuppress(self, address: str) -> bool:
        return await self.store.remove_suppression(address.strip())


def _message_from_fields(fields: dict[str, Any]) -> Message:
    fields = dict(fields)
    if "from_" in fields:
        fields["sender"] = fields.pop("from_")
    try:
        return Message(**fields)
    except TypeError as exc:
        raise ValidationError(f"unknown message field: {exc}") from None


def _check_id(queue_id: str) -> str:
    if (
        not isinstance(queue_id, str)
        or not queue_id
        or len(queue_id) > 64
        or not queue_id.isalnum()
    ):
        raise NotFound(f"no message with id {queue_id!r}")
    return queue_id


def _limit(limit: int) -> int:
    if limit < 1:
        raise ValidationError("limit must be at least 1")
    return min(limit, MAX_LIMIT)


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


class Postlane:
    """postlane for synchronous code (Django views, scripts, Celery tasks): thread-safe; every
    call returns once done (``send`` once the message is durably stored)."""

    def __init__(
        self,
        config: Config | None = None,
        *,
        config_path: str | Path | None = None,
        clock: Clock | None = None,
    ) -> None:
        self._portal = _LoopThread()
        try:
            self._async = self._portal.run(_build(config, config_path, clock))
        except BaseException:
            self._portal.stop()
            raise
        self.config = self._async.config

    def close(self) -> None:
        if self._portal.loop.is_running():
            self._portal.run(self._async.close())
            self._portal.stop()

    def __enter__(self) -> Postlane:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, message: Message | None = None, /, **fields: Any) -> EnqueueResult:
        return self._portal.run(self._async.send(message, **fields))

    def send_many(self, messages: Sequence[Message]) -> list[EnqueueResult]:
        return self._portal.run(self._async.send_many(messages))

    def get(self, queue_id: str, *, history: bool = True) -> MessageView:
        return self._portal.run(self._async.get(queue_id, history=history))

    def messages(self, selector: Selector | None = None, *, limit: int = 1000) -> list[MessageView]:
        return self._portal.run(self._async.messages(selector, limit=limit))

    def stats(self) -> Stats:
        return self._portal.run(self._async.stats())

    def dead_letters(
        self, selector: Selector | None = None, *, limit: int = 1000
    ) -> list[DeadLetter]:
        return self._portal.run(self._async.dead_letters(selector, limit=limit))

    def suppress(self, address: str, *, reason: str | None = None) -> bool:
        return self._portal.run(self._async.suppress(address, reason=reason))

    def unsuppress(self, address: str) -> bool:
        return self._portal.run(self._async.unsuppress(address))


async def _build(
    config: Config | None, path: str | Path | None, clock: Clock | None
) -> AsyncPostlane:
    app = AsyncPostlane(config, config_path=path, clock=clock)
    await app.open()
    return app
