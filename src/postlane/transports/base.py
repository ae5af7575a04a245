"""The transport protocol: send one message to some recipients, get one response per recipient.

Transports know nothing of the store or retries. A response carries the reply as the server
wrote it (classification happens outside), or, when there was no reply at all (refused, reset,
timeout, DNS, TLS), a ``failure`` class saying so.

What else the worker needs of a transport (the relay a delivery goes through, a way to learn
which relays are paused) is declared on :class:`Transport` too; :class:`BaseTransport` gives
every hook its default, and transports inherit it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from postlane.classify import ReplyClass, Verdict, classify


@dataclass(frozen=True)
class Envelope:
    queue_id: str
    sender: str
    recipients: tuple[str, ...]
    content: bytes
    message_id: str
    idempotency_key: str | None = None
    #: the message's lane (routing rules may choose a transport by it)
    lane: str = "normal"
    #: each recipient's delivery id, in the order of ``recipients`` (a VERP return path or an
    #: unsubscribe link names one delivery); empty when not known (a test's own envelope)
    delivery_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Response:
    """What one recipient got from one try."""

    #: the reply's code, None when no reply came
    code: int | None
    #: the whole reply as the server wrote it ("550-5.1.1 ...\n550 5.1.1 ..."), or what went wrong
    text: str
    #: where it came from, e.g. "smtp://relay.example:587" (recorded with every attempt)
    relay: str
    #: set when there was no reply to classify (refused, timeout, DNS, TLS): usually CONNECTION
    failure: ReplyClass | None = None
    #: a wait the server asked for (HTTP Retry-After), seconds
    retry_after: float | None = None
    #: why this can never work until an operator changes something (refused credentials, a
    #: relay without the TLS that AUTH needs, an API key the provider rejects): the relay is
    #: paused with this reason, an alert fires, nothing is tried meanwhile
    misconfigured: str | None = None
    #: the reply was to this recipient's RCPT TO alone (not to the connection, MAIL or DATA):
    #: through a relay, a slow-down it asks for speaks of the recipient's destination, not of
    #: the relay, whose other mail goes on at its pace (as Postfix defers that recipient only)
    per_recipient: bool = False

    def verdict(self) -> Verdict:
        if self.failure is not None:
            return Verdict(self.failure, self.code, None, self.text, rule="no reply")
        return classify(self.text)


def no_reply(text: str, relay: str, cls: ReplyClass = ReplyClass.CONNECTION) -> Response:
    return Response(code=None, text=text, relay=relay, failure=cls)


#: whether a shared destination (a relay, a provider account) is paused now
PauseCheck = Callable[[str], bool]


class Transport(Protocol):
    """Send one message to some recipients, and say which relay the mail goes through.

    Every member is declared here, so the worker and the throttle gate never probe a transport
    for what it can do; :class:`BaseTransport` gives each hook its usual default."""

    #: how attempts name this transport ("smtp://host:port", "capture:///path")
    name: str

    @property
    def shared_destination(self) -> str | None:
        """The throttle destination every delivery goes through (a relay, a provider account),
        charged with its slow-downs and connection failures; None when deliveries go straight
        to their own destinations (direct MX, the capture folder) or depend on the route."""
        ...

    def shared_destination_for(self, lane: str, sender: str, recipient_domain: str) -> str | None:
        """The shared destination of one delivery: :attr:`shared_destination`, or the chosen
        route's when routing."""
        ...

    def follow_pauses(self, is_paused: PauseCheck) -> None:
        """Learn how to tell whether a shared destination is paused now (the throttle gate
        calls this once): a router then takes a route's fallback while its relay is paused."""
        ...

    async def send(self, envelope: Envelope) -> list[Response]:
        """Deliver ``envelope`` to its recipients; one response per recipient, in order."""
        ...

    async def close(self) -> None:
        """Close pooled connections (after in-flight sends finish)."""
        ...


class BaseTransport:
    """Every hook of :class:`Transport` with its usual default, for transports to inherit
    (httpx's ``AsyncBaseTransport`` style): no shared destination, pauses ignored, nothing to
    close. A transport overrides :meth:`send` and what it has to say."""

    name: str
    shared_destination: str | None = None

    def shared_destination_for(self, lane: str, sender: str, recipient_domain: str) -> str | None:
        return self.shared_destination

    def follow_pauses(self, is_paused: PauseCheck) -> None:
        return None  # only a transport that chooses between relays has a use for it

    async def send(self, envelope: Envelope) -> list[Response]:
        raise NotImplementedError

    async def close(self) -> None:
        return None


class WrappingTransport(BaseTransport):
    """A transport that changes how messages are sent and hands them to ``inner``: everything
    else, its name, shared destination, routes and pauses, is ``inner``'s. A subclass
    overrides :meth:`send` (and :meth:`close` when it holds something of its own)."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.name = inner.name
        self.shared_destination = inner.shared_destination

    def shared_destination_for(self, lane: str, sender: str, recipient_domain: str) -> str | None:
        return self.inner.shared_destination_for(lane, sender, recipient_domain)

    def follow_pauses(self, is_paused: PauseCheck) -> None:
        self.inner.follow_pauses(is_paused)

    async def send(self, envelope: Envelope) -> list[Response]:
        return await self.inner.send(envelope)

    async def close(self) -> None:
        await self.inner.close()


class InterruptedSends:
    """How many sends of this process were cut off after the message was handed over (an SMTP
    server had the whole message but no reply had come; a provider had the request): their
    recipients may get the message twice, as the delivery is tried again. A worker stopping
    past its ``shutdown_grace`` says how many."""

    def __init__(self) -> None:
        self.after_handover = 0

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        """Count a cancellation inside this block (the handed-over part of a send)."""
        try:
            yield
        except asyncio.CancelledError:
            self.after_handover += 1
            raise


#: this process's count (transports add to it, the worker reads it when it stops)
interrupted = InterruptedSends()
