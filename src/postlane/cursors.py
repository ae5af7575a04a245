"""Listing cursors: where the next page of a listing starts, as a keyset position on the
listing's stable, unique order, and the opaque text a client hands back for it.

=============================  ======================================  =========================
listing                        order                                   the next page starts after
=============================  ======================================  =========================
messages (``/v1/messages``)    arrival: each message's first selected  ``MessageKey``: a delivery
                               recipient's row                         row (``page_messages``)
dead letters (``/v1/dlq``)     newest death first, then row id         ``DeadLetterKey``
suppressions                   newest first, then address, scope       ``SuppressionKey``
                               and reason
=============================  ======================================  =========================

A keyset, not an offset: a page starts strictly after the last entry of the page before, so
entries added meanwhile (new mail at the end of the queue, new dead letters and suppressions
at the front of theirs) neither push an entry onto the next page twice nor hide one.

The text form is base64url of a short JSON array whose first item names the listing: a cursor
of one listing given to another, or anything a client made up, is a :class:`ValidationError`
naming the field ``cursor`` (the HTTP API's 400), never a failed query.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar, get_type_hints

from postlane.errors import ValidationError

__all__ = [
    "DeadLetterKey",
    "MessageKey",
    "Page",
    "SuppressionKey",
    "decode_cursor",
    "encode_cursor",
]

#: a cursor's text is at most this long (an address and a scope fit many times over)
MAX_CURSOR = 2048
#: a text field of a key (an address, a scope) is at most this long
_MAX_TEXT = 512
_MAX_ROW_ID = 2**63 - 1

T = TypeVar("T")


class _Key:
    """A keyset position; ``KIND`` names its listing in the cursor's text."""

    KIND: ClassVar[str]


@dataclass(frozen=True)
class MessageKey(_Key):
    """The queue's listing starts after this delivery row (``page_messages``' ``after``)."""

    KIND: ClassVar[str] = "m"
    after_row: int


@dataclass(frozen=True)
class DeadLetterKey(_Key):
    """The dead-letter listing (newest death first, then row id) starts after this one."""

    KIND: ClassVar[str] = "d"
    dead_at: float
    delivery_id: int


@dataclass(frozen=True)
class SuppressionKey(_Key):
    """The suppression list (newest first, then address, scope and reason) starts after this
    entry."""

    KIND: ClassVar[str] = "s"
    created_at: float
    address: str
    scope: str
    reason: str


K = TypeVar("K", bound=_Key)


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a listing, and the cursor of the next one (None: this is the last)."""

    items: Sequence[T]
    next_cursor: str | None


def encode_cursor(key: _Key) -> str:
    """The opaque text of a keyset position (URL-safe: it travels in a query string)."""
    values = [getattr(key, f.name) for f in dataclasses.fields(key)]  # type: ignore[arg-type]
    text = json.dumps([key.KIND, *values], separators=(",", ":"), ensure_ascii=True)
    return base64.urlsafe_b64encode(text.encode("ascii")).rstrip(b"=").decode("ascii")


def decode_cursor(text: str, kind: type[K]) -> K:
    """The position ``text`` (a cursor this listing gave) names; a :class:`ValidationError`
    (field ``cursor``) for anything else."""
    values = _decoded(text)
    if not values or values[0] != kind.KIND:
        raise _invalid("it is not a cursor of this listing")
    hints = get_type_hints(kind)
    fields = dataclasses.fields(kind)  # type: ignore[arg-type]
    if len(values) != len(fields) + 1:
        raise _invalid("it is not a cursor of this listing")
    checked = [_checked(value, hints[f.name]) for f, value in zip(fields, values[1:], strict=True)]
    return kind(*checked)


def _decoded(text: str) -> list[Any]:
    if not text or len(text) > MAX_CURSOR or not text.isascii():
        raise _invalid("it is empty, too long or not a cursor")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        values = json.loads(raw.decode("ascii"), parse_constant=_no_constant)
    except (binascii.Error, ValueError):  # JSONDecodeError and UnicodeDecodeError included
        raise _invalid("it is not a cursor") from None
    if not isinstance(values, list):
        raise _invalid("it is not a cursor")
    return values


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a cursor value")


def _checked(value: Any, wanted: type) -> Any:
    """``value`` as the key's field of type ``wanted`` takes it, or a ValidationError."""
    if wanted is int and type(value) is int and 0 <= value <= _MAX_ROW_ID:
        return value
    if wanted is float and type(value) in (int, float) and math.isfinite(value):
        return float(value)
    if wanted is str and isinstance(value, str) and len(value) <= _MAX_TEXT:
        return value
    raise _invalid("it is not a cursor of this listing")


def _invalid(why: str) -> ValidationError:
    return ValidationError(
        f"cursor is not valid ({why}): pass the cursor a page of this listing gave, or none "
        "for the first page",
        field="cursor",
    )
