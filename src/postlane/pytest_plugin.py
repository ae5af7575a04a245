"""postlane's pytest plugin (registered through the ``pytest11`` entry point: installing
postlane is enough): test that your application sends the mail it should, through the real
queue, without any mail leaving the machine.

``postlane_mail`` gives each test a throwaway postlane (a SQLite store in the test's
``tmp_path``) whose deliveries are captured into files instead of sent; it is Django's
``mail.outbox`` for postlane, except that a message goes through the same validation,
rendering, lanes and worker as in production::

    def test_welcome_mail(postlane_mail):
        postlane_mail.send(sender="app@example.com", to=["ada@example.net"],
                           subject="Welcome", text="Hi Ada")
        postlane_mail.deliver()                     # the worker, until the queue is idle
        [message] = postlane_mail.messages
        assert message["Subject"] == "Welcome"
        assert message.envelope_to == ["ada@example.net"]

``postlane_config`` is the throwaway postlane's :class:`~postlane.Config`; override it (with
:func:`throwaway_config`) to test with your own lanes, retry or size limits.

This module imports postlane only when a test asks for a fixture, so that merely having
postlane installed costs every pytest run nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.policy
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from postlane.blocking import Postlane
    from postlane.config import Config
    from postlane.records import EnqueueResult

__all__ = [
    "DeliveredMessage",
    "PostlaneMail",
    "postlane_config",
    "postlane_mail",
    "throwaway_config",
]

#: how long :meth:`PostlaneMail.deliver` may take: the worker stops by itself once idle, so
#: reaching this means something is stuck, and the test should say so rather than hang
DELIVER_TIMEOUT = 60.0


class DeliveredMessage(EmailMessage):
    """A delivered message as its recipients' server received it, parsed (``message["To"]``,
    ``message.get_body()``, ``message.iter_attachments()``), with its SMTP envelope."""

    #: the envelope sender (MAIL FROM)
    envelope_from: str
    #: the envelope recipients (RCPT TO): To, Cc and Bcc recipients alike
    envelope_to: list[str]


def throwaway_config(folder: Path, **sections: dict[str, Any]) -> Config:
    """A configuration for a postlane that lives in ``folder``: its SQLite store there, its
    deliveries captured into ``folder/postlane-capture``, no retry jitter. ``sections`` are
    TOML sections as dicts, merged over those, e.g. ``smtp={"max_size": "1MB"}``."""
    from postlane.config import config_from_dict

    data: dict[str, Any] = {
        "store": {"url": f"sqlite:///{folder / 'postlane.db'}"},
        "delivery": {"relay": f"capture://{folder / 'postlane-capture'}"},
        "retry": {"jitter": 0},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return config_from_dict(data, source="postlane's pytest plugin", base_dir=folder)


class PostlaneMail:
    """A throwaway postlane for one test: send through :attr:`app` (a sync
    :class:`~postlane.Postlane`) or :meth:`send`, run the worker with :meth:`deliver`, then read
    :attr:`messages`. Whatever ``delivery.relay`` says, deliveries are captured, never sent."""

    def __init__(self, config: Config) -> None:
        from postlane.blocking import Postlane
        from postlane.transports import capture_folder

        self.config = config
        relay = config.delivery.relay
        #: where each delivery is written as an ``.eml`` file
        self.capture_folder = (
            Path(capture_folder(config))
            if relay.startswith("capture://")
            else config.resolve_path("postlane-capture")
        )
        self.app: Postlane = Postlane(config)
        self._seen: list[Path] = []

    def send(self, *args: Any, **fields: Any) -> EnqueueResult:
        """Enqueue a message, as :meth:`postlane.Postlane.send` (a Message or keywords)."""
        return self.app.send(*args, **fields)

    def deliver(self, *, at: datetime | float | None = None) -> int:
        """Run a worker until nothing is due, as ``postlane worker`` would, with every delivery
        captured; returns the number of delivery attempts. Deferred deliveries (none, unless
        the test set them up) stay for a later call.

        Mail goes out as in production: with the configuration's DKIM signatures, ``[bounces]``
        return paths and ``[unsubscribe]`` links, whatever ``delivery.relay`` and ``[[routes]]``
        say (they are not used: everything is captured). ``at`` (an aware datetime or Unix
        seconds): deliver as if it were then, to test ``send_at`` and ``expires_at`` without
        waiting (mail scheduled up to then goes; mail past its ``expires_at`` is dead-lettered).
        """
        # a thread of its own: works the same from sync tests and from inside a running event
        # loop (an async test), and shares nothing with the app's loop thread
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="postlane-deliver")
        try:
            future = pool.submit(asyncio.run, self._deliver(at))
            try:
                return future.result(timeout=DELIVER_TIMEOUT)
            except TimeoutError:
                raise RuntimeError(
                    f"postlane_mail.deliver() did not finish within {DELIVER_TIMEOUT:.0f}s"
                ) from None
        finally:
            pool.shutdown(wait=False)

    async def _deliver(self, at: datetime | float | None) -> int:
        from postlane.app import AsyncPostlane
        from postlane.clock import Clock, FakeClock, SystemClock, parse_when
        from postlane.transports import delivery_transport
        from postlane.worker import Worker

        # every relay and route captured, the rest of the configuration as it is
        delivery = dataclasses.replace(
            self.config.delivery, relay=f"capture://{self.capture_folder.resolve()}"
        )
        config = dataclasses.replace(self.config, delivery=delivery, routes=())
        when = parse_when(at, "at")
        clock: Clock = SystemClock() if when is None else FakeClock(when)
        async with AsyncPostlane(config, clock=clock) as app:
            transport = await delivery_transport(config, app.store, clock.now())
            worker = Worker.from_config(config, app.store, transport, clock=clock)
            try:
                return await worker.run_until_idle()
            finally:
                await transport.close()

    @property
    def messages(self) -> list[DeliveredMessage]:
        """Every delivery so far, oldest first, parsed: one per delivery, so a message to
        two recipients on one server is one entry with both in ``envelope_to``."""
        if self.capture_folder.is_dir():
            known = set(self._seen)
            fresh = [p for p in self.capture_folder.glob("*.eml") if p not in known]
            # queue ids sort by enqueue time; the order within one deliver() is that order
            self._seen.extend(sorted(fresh, key=lambda p: p.name))
        return [_parse_capture(path.read_bytes()) for path in self._seen]

    def close(self) -> None:
        self.app.close()

    def __repr__(self) -> str:
        # shown by pytest when an assertion about .messages fails: say where to look
        delivered = (
            len(list(self.capture_folder.glob("*.eml"))) if self.capture_folder.is_dir() else 0
        )
        return f"<PostlaneMail: {delivered} delivered into {self.capture_folder}>"


def _parse_capture(content: bytes) -> DeliveredMessage:
    from postlane.transports.capture import ENVELOPE_FROM, ENVELOPE_TO

    parser = BytesParser(_class=DeliveredMessage, policy=email.policy.default)
    message = parser.parsebytes(content)
    assert isinstance(message, DeliveredMessage)
    message.envelope_from = str(message.get(ENVELOPE_FROM, "")).strip().strip("<>")
    message.envelope_to = [
        part.strip().strip("<>") for part in str(message.get(ENVELOPE_TO, "")).split(",") if part
    ]
    # added by the capture transport, not part of what was delivered
    del message[ENVELOPE_FROM]
    del message[ENVELOPE_TO]
    return message


@pytest.fixture
def postlane_config(tmp_path: Path) -> Config:
    """The configuration of the test's throwaway postlane (see ``postlane_mail``): a SQLite
    store and a capture folder in ``tmp_path``. Override this fixture to change it, e.g.
    ``return throwaway_config(tmp_path, smtp={"max_size": "10KB"})``."""
    return throwaway_config(tmp_path)


@pytest.fixture
def postlane_mail(postlane_config: Config) -> Iterator[PostlaneMail]:
    """A throwaway postlane for this test, whose deliveries are captured: ``.send(...)`` (or
    ``.app``, a sync ``postlane.Postlane``) to enqueue, ``.deliver()`` to run the worker until
    idle, ``.messages`` for what was delivered (parsed, with ``.envelope_from`` and
    ``.envelope_to``). Like Django's ``mail.outbox``, through the real queue."""
    mail = PostlaneMail(postlane_config)
    try:
        yield mail
    finally:
        mail.close()
