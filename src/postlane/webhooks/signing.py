"""Signing webhooks as the Standard Webhooks specification says.

Each request carries three headers:

- ``webhook-id``: ``evt_<event id>``, the same on every retry of one event, so a receiver can
  use it as an idempotency key (at-least-once delivery means an event may come twice);
- ``webhook-timestamp``: this attempt's time in whole seconds, so a receiver can refuse an old
  request replayed by someone who recorded it (the reference libraries allow 5 minutes);
- ``webhook-signature``: ``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``, one per
  secret, space-separated (while secrets rotate, receivers accept either).

The body is the specification's recommended payload, ``{"type", "timestamp", "data"}``, with
the event's own JSON (as ``/v1/events`` gives it) as ``data``; its ``type`` is the event type
itself (``sent``, ``bounced``...), the same word the configuration's ``events`` list uses.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from postlane.clock import iso
from postlane.events import Event

#: the synthetic event an operator sends to check an endpoint (never stored)
TEST_EVENT_TYPE = "test"


def webhook_id(event_id: int | str) -> str:
    """The ``webhook-id`` of an event: stable across retries and restarts."""
    return f"evt_{event_id}"


def payload(event: Event) -> bytes:
    """The request body for ``event`` (compact JSON, as signed and as sent)."""
    return encode(event.type, event.at, event.as_json())


def encode(event_type: str, at: float, data: Mapping[str, Any]) -> bytes:
    body = {"type": event_type, "timestamp": iso(at), "data": data}
    return json.dumps(body, separators=(",", ":")).encode("utf-8")


def signature(secret: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """``v1,<base64>``: HMAC-SHA256 of ``{msg_id}.{timestamp}.{body}`` with ``secret``."""
    signed = b"%s.%d.%s" % (msg_id.encode("utf-8"), timestamp, body)
    digest = hmac.new(secret, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


@dataclass(frozen=True)
class Signer:
    """Signs requests to one endpoint with its secrets (the current one first)."""

    secrets: tuple[bytes, ...] = field(repr=False)

    def headers(self, msg_id: str, now: float, body: bytes) -> dict[str, str]:
        """The three Standard Webhooks headers for one attempt at time ``now``."""
        timestamp = math.floor(now)
        return {
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": " ".join(
                signature(secret, msg_id, timestamp, body) for secret in self.secrets
            ),
        }
