"""The records ``queue delete --export`` writes and ``queue import`` reads back (JSON Lines,
one ``postlane-export/1`` object per message), checked line by line before a store sees them."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from typing import Any

from postlane.addresses import parse_address
from postlane.errors import ValidationError
from postlane.records import EXPORT_FORMAT, ExportedMessage

__all__ = ["EXPORT_FORMAT", "check_export", "parse_export_line", "read_export"]

#: bounds of an imported record's numbers (the stores' integer columns are 64-bit)
_MAX_COUNT = 1_000_000_000
#: 10000-01-01T00:00:00Z: later times cannot be shown as dates
_END_OF_TIME = 253_402_300_800.0


def read_export(lines: Iterable[str]) -> Iterator[ExportedMessage]:
    """The records of JSON Lines written by ``queue delete --export`` (blank lines skipped),
    each checked as :func:`parse_export_line` does."""
    for number, line in enumerate(lines, 1):
        if line.strip():
            yield parse_export_line(line, number)


def check_export(lines: Iterable[str]) -> int:
    """Check every line before anything is imported (so a bad line refuses the whole import);
    returns how many records there are. Raises :class:`ValidationError` naming the line."""
    return sum(1 for _ in read_export(lines))


def parse_export_line(line: str, number: int = 1) -> ExportedMessage:
    """One export record, refused with a :class:`ValidationError` naming the line unless the
    stores can take it as it is and show it afterwards: a message id as postlane makes them,
    valid addresses, times before the year 10000, counts and reply codes in range, no NUL or
    lone surrogate in any string (PostgreSQL refuses those)."""
    try:
        data = json.loads(line)
        if not isinstance(data, dict):
            raise ValueError("a line is one JSON object")
        if data.get("format") != EXPORT_FORMAT:
            raise ValueError(f'"format" is not "{EXPORT_FORMAT}"')
        _check_values(data)
        record = ExportedMessage.from_json(data)
        _check_record(record)
    except KeyError as exc:
        raise ValidationError(f"line {number}: not a postlane export record (no {exc})") from None
    except (
        ValueError,
        TypeError,
        AttributeError,
        OverflowError,
        RecursionError,
        ValidationError,
    ) as exc:
        detail = exc.message if isinstance(exc, ValidationError) else str(exc)
        raise ValidationError(f"line {number}: not a postlane export record ({detail})") from None
    return record


def _check_values(value: Any) -> None:
    """Strings and numbers anywhere in a record (metadata included) that a store would refuse."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            if "\x00" in item:
                raise ValueError("a string holds a NUL character")
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("a string holds an unpaired surrogate") from None
        elif isinstance(item, float) and not math.isfinite(item):
            raise ValueError("a number is NaN or infinite")


def _check_record(record: ExportedMessage) -> None:
    if not (0 < len(record.id) <= 64 and record.id.isascii() and record.id.isalnum()):
        raise ValueError("id is not a postlane message id")
    # what postlane queued once comes back, a local part over 64 octets included (the doors
    # refuse one now, older versions queued it; the receiving server decides)
    if record.sender:
        parse_address(record.sender, "sender", any_length=True)
    key = record.idempotency_key
    if key is not None and (not isinstance(key, str) or len(key) > 255):
        raise ValueError("idempotency_key is a string of at most 255 characters")
    if not record.recipients:
        raise ValueError("no recipients")
    times = [record.created_at]
    times += [t for t in (record.send_at, record.expires_at) if t is not None]
    for r in record.recipients:
        mailbox = parse_address(r.address, "recipient", any_length=True)
        if mailbox.domain != r.domain.lower():
            raise ValueError(f"recipient {r.address!r} is not in domain {r.domain!r}")
        if not r.destination or "\n" in r.destination or "\r" in r.destination:
            raise ValueError(f"recipient {r.address!r} has no usable destination")
        if r.reason is not None and not isinstance(r.reason, str):
            raise ValueError("reason is a string or null")
        for count in (r.attempts, r.deferrals):
            if not 0 <= count <= _MAX_COUNT:
                raise ValueError(f"attempts and deferrals are 0 to {_MAX_COUNT}")
        times += [r.next_attempt_at, r.created_at]
        if r.expires_at is not None:
            times.append(r.expires_at)
        replies: list[tuple[Any, Any, Any]] = [(a.code, a.enhanced, a.text) for a in r.history]
        if r.last_response is not None:
            last = r.last_response
            replies.append((last.code, last.enhanced, last.text))
        for code, enhanced, text in replies:
            if code is not None and (type(code) is not int or not 0 <= code <= 999):
                raise ValueError("a reply code is an integer from 0 to 999 or null")
            if enhanced is not None and not isinstance(enhanced, str):
                raise ValueError("an enhanced status code is a string or null")
            if not isinstance(text, str):
                raise ValueError("a reply text is a string")
        for a in r.history:
            times.append(a.at)
            if not 0 <= a.duration_ms <= _MAX_COUNT:
                raise ValueError(f"duration_ms is 0 to {_MAX_COUNT}")
    if not all(0 <= t < _END_OF_TIME for t in times):
        raise ValueError("times are seconds since the epoch, before the year 10000")
