"""Which deliveries a command means: the exiqgrep-style selector options and the
:class:`~postlane.records.Selector` they build (``--lane``, ``--state``, ``--domain``, ``--class``,
``--older-than``, ``--sender``, ``--recipient``, ``--metadata``; each narrows the set)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from enum import StrEnum
from typing import Any, TypeVar

import click

from postlane.classify import ReplyClass
from postlane.config import parse_duration
from postlane.message import Lane, RecipientState
from postlane.records import Selector

F = TypeVar("F", bound=Callable[..., Any])
E = TypeVar("E", bound=StrEnum)


def _lanes(values: Sequence[str]) -> tuple[Lane, ...]:
    try:
        return tuple(Lane(v.lower()) for v in values)
    except ValueError as exc:
        raise click.BadParameter(f"{exc} (lanes are high, normal, low)") from None


def _states(values: Sequence[str]) -> tuple[RecipientState, ...]:
    return _members(RecipientState, values, "state", "states")


def _classes(values: Sequence[str]) -> tuple[ReplyClass, ...]:
    return _members(ReplyClass, values, "class", "classes")


def _members(enum: type[E], values: Sequence[str], what: str, plural: str) -> tuple[E, ...]:
    try:
        return tuple(enum(v.lower()) for v in values)
    except ValueError:
        known = ", ".join(member.value for member in enum)
        raise click.BadParameter(f"unknown {what} ({plural} are {known})") from None


def _older_than(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--older-than") from None
    return time.time() - seconds


def metadata_pairs(items: Sequence[str]) -> dict[str, str]:
    """``--metadata KEY=VALUE`` options as a dict (the last of a key wins)."""
    pairs: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--metadata")
        pairs[key] = value
    return pairs


def selector_options(func: F) -> F:
    """exiqgrep's habits: every selector narrows the set."""
    return _selector_options(func, states=True)


def dead_letter_selector_options(func: F) -> F:
    """The selectors of dead letters: no ``--state``, a dead letter is always ``dead``."""
    return _selector_options(func, states=False)


def _selector_options(func: F, *, states: bool) -> F:
    options = [
        click.option("--lane", "lanes", multiple=True, help="high, normal or low (repeatable)."),
    ]
    if states:
        options.append(
            click.option("--state", "states", multiple=True, help="Recipient state (repeatable).")
        )
    options += [
        click.option("--domain", "domains", multiple=True, help="Recipient domain (repeatable)."),
        click.option("--class", "classes", multiple=True, help="Class of the last reply."),
        click.option("--older-than", metavar="DURATION", help='Arrived before, e.g. "2h".'),
        click.option("--sender", metavar="ADDR", help="Envelope sender."),
        click.option("--recipient", metavar="ADDR", help="Recipient address."),
        click.option(
            "--metadata", "metadata", multiple=True, metavar="KEY=VALUE", help="Metadata match."
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def build_selector(
    ids: Sequence[str] = (),
    *,
    all_: bool = False,
    lanes: Sequence[str] = (),
    states: Sequence[str] = (),
    domains: Sequence[str] = (),
    classes: Sequence[str] = (),
    older_than: str | None = None,
    sender: str | None = None,
    recipient: str | None = None,
    metadata: Sequence[str] = (),
) -> Selector:
    """The :class:`Selector` the selector options (and message IDs, or ``--all``) describe;
    click.BadParameter naming the option for a bad value."""
    pairs = metadata_pairs(metadata)
    return Selector(
        ids=tuple(ids),
        all=all_,
        lanes=_lanes(lanes),
        states=_states(states),
        domains=tuple(d.lower() for d in domains),
        classes=_classes(classes),
        older_than=_older_than(older_than),
        sender=sender,
        recipient=recipient,
        metadata=pairs,
    )
