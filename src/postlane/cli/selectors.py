"""Which deliveries a command means: the exiqgrep-style selector options and the
:class:`~postlane.records.Selector` they build (``--lane``, ``--state``, ``--domain``, ``--class``,
``--older-than``, ``--sender``, ``--recipient``, ``--metadata``; each narrows the set)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import click

from postlane import selectors
from postlane.classify import ReplyClass
from postlane.clock import SystemClock
from postlane.errors import ValidationError
from postlane.message import Lane, RecipientState
from postlane.records import Selector

F = TypeVar("F", bound=Callable[..., Any])

#: the option of each field of postlane.selectors.parse_selector
_OPTIONS = {
    "lane": "--lane",
    "state": "--state",
    "domain": "--domain",
    "class": "--class",
    "older_than": "--older-than",
    "sender": "--sender",
    "recipient": "--recipient",
    "metadata": "--metadata",
}
_CHOICES: Mapping[str, Sequence[str]] = {
    "lane": [lane.value for lane in Lane],
    "state": [state.value for state in RecipientState],
    "class": [cls.value for cls in ReplyClass],
}


@contextmanager
def _as_bad_parameter(given: Mapping[str, Any]) -> Iterator[None]:
    """The shared parser's ValidationError as click's error naming the option: ``Invalid
    value for '--lane': 'urgent' is not one of high, normal, low``."""
    try:
        yield
    except ValidationError as exc:
        field = exc.field or ""
        choices = _CHOICES.get(field)
        values = given.get(field) or ()
        wrong = [v for v in values if choices and v.lower() not in choices]
        if choices and wrong:
            message = f"{wrong[0]!r} is not one of {', '.join(choices)}"
        else:
            message = exc.message.removeprefix(f"{field}: ")
        raise click.BadParameter(message, param_hint=repr(_OPTIONS.get(field, field))) from None


def lane_choice(value: str) -> str:
    """A ``--lane`` value checked as the selectors check theirs (``send --lane``)."""
    with _as_bad_parameter({"lane": [value]}):
        selectors.parse_selector({"lane": value}, SystemClock())
    return value.lower()


def metadata_pairs(items: Sequence[str]) -> dict[str, str]:
    """``--metadata KEY=VALUE`` options as a dict (the last of a key wins)."""
    with _as_bad_parameter({}):
        return selectors.metadata_pairs(items)


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
    """The :class:`Selector` the selector options (and message IDs, or ``--all``) describe,
    read by :func:`postlane.selectors.parse_selector` as the HTTP API and the dashboard read
    theirs; click.BadParameter naming the option for a bad value."""
    fields: dict[str, Any] = {
        "ids": list(ids),
        "all": all_,
        "lane": list(lanes),
        "state": list(states),
        "domain": list(domains),
        "class": list(classes),
        "older_than": older_than,
        "sender": sender,
        "recipient": recipient,
        "metadata": metadata_pairs(metadata),
    }
    with _as_bad_parameter(fields):
        return selectors.parse_selector(fields, SystemClock())
