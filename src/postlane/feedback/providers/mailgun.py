"""Mailgun's webhooks at ``POST /v1/webhooks/mailgun``, signed with the HTTP webhook signing key.

Each POST is ``{"signature": {"timestamp", "token", "signature"}, "event-data": {...}}``
(https://documentation.mailgun.com/docs/mailgun/user-manual/webhooks/securing-webhooks):
``signature`` is the hex HMAC-SHA256, keyed with ``[webhooks.mailgun] signing_key``, of the
timestamp followed by the token. A timestamp older (or further ahead) than ``max_age`` is
refused, and so is a token seen before within that time (a replay): tokens are kept in memory
for ``max_age`` (per process: with ``serve --processes N`` a replay could reach another process
once, within ``max_age``; recording the same bounce twice changes nothing).

``event-data`` names the recipient (``recipient``), the user variables the transport set
(``user-variables`` ``postlane-queue-id``) and the message's Message-ID
(``message.headers.message-id``):

============== ======================================================= =====================
event          what postlane reads                                     heard as
============== ======================================================= =====================
``failed``     ``severity`` ``permanent``, ``delivery-status`` (code,   failed
               message), ``reason`` (``suppress-bounce``: a bad address)
``failed``     ``severity`` ``temporary``                              delayed: an event only
``complained`` -                                                       complained
``delivered``  ``delivery-status``                                     delivered (history)
============== ======================================================= =====================

Other events (accepted, opened, clicked, unsubscribed, ...) are ignored.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import OrderedDict
from collections.abc import Mapping
from functools import partial
from typing import Any

from postlane.feedback.providers import (
    Heard,
    Malformed,
    ProviderEvent,
    Received,
    Unverified,
    check_timestamp,
    message_id_header,
    read_json,
    text_of,
)
from postlane.feedback.providers.config import MailgunWebhook

__all__ = ["MailgunReceiver", "SeenTokens", "mailgun_events"]

PROVIDER = "mailgun"
#: tokens remembered at most (a flood of valid requests within max_age is no provider's)
MAX_TOKENS = 100_000
#: ``reason`` values of a permanent failure that say the address is bad
_BAD_ADDRESS_REASONS = ("suppress-bounce", "bounce")


class SeenTokens:
    """Tokens of verified requests, each kept until it expires (a replay is refused)."""

    def __init__(self, max_age: float, limit: int = MAX_TOKENS) -> None:
        self.max_age = max_age
        self.limit = limit
        self._expires: OrderedDict[str, float] = OrderedDict()

    def claim(self, token: str, now: float) -> bool:
        """Take ``token``; False when it was taken before and has not expired."""
        while self._expires and (
            next(iter(self._expires.values())) <= now or len(self._expires) >= self.limit
        ):
            self._expires.popitem(last=False)
        if token in self._expires:
            return False
        self._expires[token] = now + 2 * self.max_age  # the timestamp may be ahead by max_age
        return True

    def release(self, token: str) -> None:
        """Forget ``token`` (its request could not be recorded: the provider sends it again)."""
        self._expires.pop(token, None)


class MailgunReceiver:
    """Reads ``POST /v1/webhooks/mailgun`` (see the module docstring)."""

    provider = PROVIDER

    def __init__(self, settings: MailgunWebhook) -> None:
        self.settings = settings
        self.seen = SeenTokens(settings.max_age)

    async def receive(self, headers: Mapping[str, str], body: bytes, now: float) -> Received:
        data = read_json(body)
        if not isinstance(data, dict):
            raise Malformed('expected {"signature": {...}, "event-data": {...}}')
        token = self.verify(data.get("signature"), now)
        return Received(mailgun_events(data.get("event-data")), lambda: self.seen.release(token))

    def verify(self, signature: Any, now: float) -> str:
        """Check the signature block; returns its token, now claimed."""
        if not isinstance(signature, dict):
            raise Unverified("no signature")
        timestamp = signature.get("timestamp")
        token = signature.get("token")
        given = signature.get("signature")
        if isinstance(timestamp, int) and not isinstance(timestamp, bool):
            timestamp = str(timestamp)
        if not all(isinstance(v, str) and v for v in (timestamp, token, given)):
            raise Unverified("the signature needs timestamp, token and signature")
        assert isinstance(timestamp, str) and isinstance(token, str) and isinstance(given, str)
        check_timestamp(timestamp, now, self.settings.max_age, "the timestamp")
        expected = hmac.new(
            self.settings.signing_key.encode(), (timestamp + token).encode(), hashlib.sha256
        ).hexdigest()
        if not hmac.compare_digest(expected.encode(), given.lower().encode()):
            raise Unverified("the signature does not match")
        if not self.seen.claim(token, now):
            raise Unverified("the token was used before (a replay)")
        return token


def mailgun_events(data: Any) -> list[ProviderEvent]:
    """The event one Mailgun ``event-data`` tells (none for what postlane does not take)."""
    if not isinstance(data, dict):
        return []
    recipient = text_of(data.get("recipient"))
    kind = text_of(data.get("event"))
    if recipient is None or kind is None:
        return []
    variables = data.get("user-variables")
    message = data.get("message")
    headers = message.get("headers") if isinstance(message, dict) else None
    event = partial(
        ProviderEvent,
        PROVIDER,
        recipient=recipient,
        queue_id=text_of(variables.get("postlane-queue-id"))
        if isinstance(variables, dict)
        else None,
        message_id=message_id_header(headers.get("message-id"))
        if isinstance(headers, dict)
        else None,
        event_id=text_of(data.get("id")),
        raw=data,
    )
    status = data.get("delivery-status")
    status = status if isinstance(status, dict) else {}
    diagnostic = _diagnostic(status)
    if kind == "failed":
        permanent = text_of(data.get("severity")) == "permanent"
        reason = text_of(data.get("reason")) or "generic"
        if permanent:
            bad = reason in _BAD_ADDRESS_REASONS
            default = "5.1.1" if bad else "5.0.0"
        else:
            default = "4.0.0"
        return [
            event(
                Heard.FAILED if permanent else Heard.DELAYED,
                status=text_of(status.get("enhanced-code")) or default,
                diagnostic=diagnostic or f"Mailgun {reason}",
                label=f"failed/{'permanent' if permanent else 'temporary'}/{reason}",
            )
        ]
    if kind == "complained":
        return [event(Heard.COMPLAINED, complaint_type="abuse", label=kind)]
    if kind == "delivered":
        return [event(Heard.DELIVERED, status="2.0.0", diagnostic=diagnostic, label=kind)]
    return []


def _diagnostic(status: Mapping[str, Any]) -> str | None:
    """``550 <message>`` from ``delivery-status`` (Mailgun's own codes, 605 and the like, are
    no SMTP reply: left out)."""
    text = text_of(status.get("message")) or text_of(status.get("description"))
    code = status.get("code")
    if isinstance(code, int) and 200 <= code < 600 and text:
        return f"{code} {text}"
    return text
