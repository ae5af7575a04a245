"""Selectors read one way for every door: which deliveries an operator command touches (and
what a suppression stops: its lanes and its scope).

The HTTP API (a JSON body or a query string), the dashboard (its filter form) and the CLI (its
options) each turn what they were given into a plain mapping of field to value(s) and call
:func:`parse_selector`, so a lane, a state or ``older_than`` means the same thing everywhere.
Every field narrows (exiqgrep's habit). A bad value is a :class:`~postlane.errors.ValidationError`
whose ``field`` names the field and whose message names it too, as the API has always answered.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import TypeVar

from postlane.addresses import check_text
from postlane.classify import ReplyClass
from postlane.clock import Clock
from postlane.config import parse_duration
from postlane.errors import ValidationError, kind_of
from postlane.message import Lane, RecipientState, in_lane_order
from postlane.records import Selector

__all__ = [
    "SELECTOR_FIELDS",
    "metadata_pairs",
    "optional_string",
    "parse_selector",
    "string_list",
]

#: the fields :func:`parse_selector` reads (the HTTP API's selector object and query string)
SELECTOR_FIELDS = frozenset(
    {
        "ids",
        "all",
        "lane",
        "state",
        "domain",
        "class",
        "older_than",
        "sender",
        "recipient",
        "metadata",
    }
)

E = TypeVar("E", bound=StrEnum)


def parse_selector(fields: Mapping[str, object], clock: Clock) -> Selector:
    """The :class:`Selector` that ``fields`` describe; a field left out (or None) selects all.

    ``ids``, ``lane``, ``state``, ``domain`` and ``class`` take a string or a list (or tuple) of
    strings; enum names are case-insensitive and domains are lowercased. ``all`` is a bool.
    ``older_than`` is a duration (``"2h"``): what arrived before ``clock.now()`` minus it.
    ``sender`` and ``recipient`` are strings; ``metadata`` a mapping of strings to strings (see
    :func:`metadata_pairs` for ``KEY=VALUE`` items). Any other field is refused.
    """
    unknown = sorted(set(fields) - SELECTOR_FIELDS)
    if unknown:
        raise ValidationError(f"unknown selector {unknown[0]!r}", field=unknown[0])
    older_than = _older_than(optional_string(fields.get("older_than"), "older_than"), clock)
    metadata = fields.get("metadata") or {}
    if not isinstance(metadata, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise ValidationError("metadata must be an object of strings", field="metadata")
    for key, value in metadata.items():
        check_text(key, "metadata")
        check_text(value, "metadata")
    all_ = fields.get("all", False)
    if not isinstance(all_, bool):
        raise ValidationError("all must be true or false", field="all")
    for name in ("ids", "domain", "sender", "recipient"):
        # what no text postlane stores or looks up may hold: PostgreSQL refused a NUL as a
        # store failure (503, and /readyz unavailable for 30 s: a dashboard audit)
        for value in string_list(fields.get(name), name):
            check_text(value, name)
    return Selector(
        ids=tuple(string_list(fields.get("ids"), "ids")),
        all=all_,
        lanes=_enums(fields, "lane", Lane),
        states=_enums(fields, "state", RecipientState),
        domains=tuple(d.lower() for d in string_list(fields.get("domain"), "domain")),
        classes=_enums(fields, "class", ReplyClass),
        older_than=older_than,
        sender=optional_string(fields.get("sender"), "sender"),
        recipient=optional_string(fields.get("recipient"), "recipient"),
        metadata=dict(metadata),
    )


def metadata_pairs(items: Iterable[str]) -> dict[str, str]:
    """``KEY=VALUE`` items (the CLI's ``--metadata``) as the mapping ``metadata`` takes."""
    pairs: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValidationError(f"metadata: {item!r} is not KEY=VALUE", field="metadata")
        pairs[key] = value
    return pairs


def string_list(value: object, name: str) -> list[str]:
    """A string or a list (or tuple) of strings as a list; None is empty. Also reads a message's
    address fields in the HTTP API."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValidationError(f"{name} must be a string or a list of strings", field=name)


def optional_string(value: object, name: str) -> str | None:
    """A string, or None for none; anything else is refused."""
    if value is not None and not isinstance(value, str):
        raise ValidationError(f"{name} must be a string", field=name)
    return value


def _enums(fields: Mapping[str, object], name: str, enum: type[E]) -> tuple[E, ...]:
    try:
        return tuple(enum(v.lower()) for v in string_list(fields.get(name), name))
    except ValueError:
        known = ", ".join(e.value for e in enum)
        raise ValidationError(f"{name}: one of {known}", field=name) from None


def _older_than(duration: str | None, clock: Clock) -> float | None:
    if duration is None:
        return None
    try:
        return clock.now() - parse_duration(duration)
    except ValueError as exc:
        raise ValidationError(f"older_than: {exc}", field="older_than") from None


def suppression_lanes(lanes: Iterable[Lane | str] | None) -> tuple[Lane, ...] | None:
    """The lanes a suppression stops, in lane order; None (every lane) for None. Raises
    :class:`ValidationError` for an unknown lane or for none at all (an entry that stops no
    mail is a mistake: leave ``lanes`` out for every lane)."""
    if lanes is None:
        return None
    if isinstance(lanes, str):  # one lane, not its letters
        lanes = [lanes]
    if not isinstance(lanes, Iterable) or isinstance(lanes, bytes | bytearray | Mapping):
        raise ValidationError(
            f"lanes must be a lane or a list of lanes (high, normal, low), not {kind_of(lanes)}",
            field="lanes",
        )
    chosen: set[Lane] = set()
    for lane in lanes:
        if not isinstance(lane, str):
            raise ValidationError(
                f"lanes must be a lane or a list of lanes (high, normal, low), not a list "
                f"holding {kind_of(lane)}",
                field="lanes",
            )
        try:
            chosen.add(Lane(str(lane).strip().lower()))
        except ValueError:
            raise ValidationError(
                f"unknown lane {lane!r} (lanes are high, normal, low)", field="lanes"
            ) from None
    if not chosen:
        raise ValidationError(
            "lanes names no lane (leave it out to stop mail of every lane)", field="lanes"
        )
    return in_lane_order(chosen)


def suppression_scope(scope: str | None) -> str:
    """``*`` (every sender) or a sender domain, as the suppression list keeps it: lower case,
    without a leading ``@``. Raises :class:`ValidationError` for anything else."""
    if scope is not None and not isinstance(scope, str):
        raise ValidationError(
            f"scope must be * or a sender domain (a string), not {kind_of(scope)}", field="scope"
        )
    if scope is None or scope.strip() == "*":
        return "*"
    domain = scope.strip().lstrip("@").lower().rstrip(".")
    labels = domain.split(".")
    if len(labels) < 2 or not all(
        label and len(label) <= 63 and label.replace("-", "").isalnum() for label in labels
    ):
        raise ValidationError(
            f"scope must be * or a sender domain like example.com, got {scope!r}", field="scope"
        )
    return domain
