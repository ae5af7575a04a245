"""What the services of :class:`~postlane.app.AsyncPostlane` take from their callers, checked
before anything is read or stored: a message given as keywords or a mapping (the HTTP API's
JSON shape too), a queue id, a text argument, an event cursor."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from postlane.addresses import check_text
from postlane.errors import NotFound, ValidationError, kind_of
from postlane.events import event_cursor
from postlane.message import Message


def check_string(value: object, name: str) -> None:
    """Refuse (:class:`ValidationError`) an argument that should be text and is not, or holds
    what no text postlane stores or looks up may (a NUL: PostgreSQL refused it as a store
    failure, a 503 that took the node out of its load balancer: a dashboard audit)."""
    if not isinstance(value, str):
        raise ValidationError(f"{name} must be a string, not {kind_of(value)}", field=name)
    check_text(value, name)


def message_from_fields(fields: Mapping[str, Any]) -> Message:
    """A :class:`Message` from its fields, as keywords or a mapping (the HTTP API's JSON
    shape too: ``"from"`` is the sender)."""
    fields = dict(fields)
    for alias in ("from_", "from"):
        if alias in fields:
            fields["sender"] = fields.pop(alias)
    known = {f.name for f in dataclasses.fields(Message)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValidationError(
            f"unknown message field {unknown[0]!r} (known: {', '.join(sorted(known))}; the "
            "sender is sender=, or from_)"
        )
    return Message(**fields)


def as_message(message: Message | Mapping[str, Any]) -> Message:
    if isinstance(message, Message):
        return message
    if isinstance(message, Mapping):
        return message_from_fields(message)
    raise ValidationError(
        f"a message is a postlane.Message or a mapping, not {type(message).__name__}"
    )


def event_id(value: str | int | None) -> int | None:
    if value is None or value == "":
        return None
    return event_cursor(str(value).strip() if isinstance(value, str) else value)


def check_id(queue_id: str) -> str:
    if (
        not isinstance(queue_id, str)
        or not queue_id
        or len(queue_id) > 64
        or not queue_id.isalnum()
    ):
        raise NotFound(f"no message with id {queue_id!r}")
    return queue_id
