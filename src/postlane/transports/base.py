"""The transport protocol: send one message to some recipients, get one response per recipient.

Transports know nothing of the store, retries or lanes. A response carries the reply as the
server wrote it (classification happens outside), or, when there was no reply at all (refused,
reset, timeout, DNS, TLS), a ``failure`` class saying so.
"""

from __future__ import annotations

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

    def verdict(self) -> Verdict:
        if self.failure is not None:
            return Verdict(self.failure, self.code, None, self.text, rule="no reply")
        return classify(self.text)


def no_reply(text: str, relay: str, cls: ReplyClass = ReplyClass.CONNECTION) -> Response:
    return Response(code=None, text=text, relay=relay, failure=cls)


class Transport(Protocol):
    """Send one message to some recipients. A transport may also have a
    ``shared_destination`` attribute: the throttle destination every delivery goes through
    (a relay, a provider account), charged with its slow-downs and connection failures."""

    #: how attempts name this transport ("smtp://host:port", "capture:///path")
    name: str

    async def send(self, envelope: Envelope) -> list[Response]:
        """Deliver ``envelope`` to its recipients; one response per recipient, in order."""
        ...

    async def close(self) -> None:
        """Close pooled connections (after in-flight sends finish)."""
        ...
