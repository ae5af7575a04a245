"""Which mail a suppression stops, by lane: the rules the store applies to ``suppressed_among``'s
rows (at enqueue and at send time), the column's one form, and what an operator may ask for."""

from __future__ import annotations

from typing import Any

import pytest

from postlane.errors import ValidationError
from postlane.message import Lane
from postlane.selectors import suppression_lanes
from postlane.store import rows

HIGH, NORMAL, LOW = Lane.HIGH, Lane.NORMAL, Lane.LOW


def listed(*entries: tuple[str, str, str | None]) -> dict[str, rows.Listed]:
    found = [{"address": a, "scope": s, "lanes": lanes} for a, s, lanes in entries]
    return rows.scopes_by_address(found)


@pytest.mark.parametrize(
    ("entries", "sender", "lane", "stopped"),
    [
        # an unsubscribe from shop.example's low-lane mail
        ([("ada@x.net", "shop.example", '["low"]')], "news@shop.example", LOW, True),
        ([("ada@x.net", "shop.example", '["low"]')], "accounts@shop.example", HIGH, False),
        ([("ada@x.net", "shop.example", '["low"]')], "news@other.example", LOW, False),
        # a caller that names no lane: any entry counts
        ([("ada@x.net", "shop.example", '["low"]')], "news@shop.example", None, True),
        # every lane (entries made before lanes, bounces, complaints, operators)
        ([("ada@x.net", "*", None)], "accounts@shop.example", HIGH, True),
        # a global unsubscribe beside nothing else
        ([("ada@x.net", "*", '["normal","low"]')], "a@any.example", NORMAL, True),
        ([("ada@x.net", "*", '["normal","low"]')], "a@any.example", HIGH, False),
        # two scopes: either may stop it
        (
            [("ada@x.net", "*", '["low"]'), ("ada@x.net", "shop.example", None)],
            "accounts@shop.example",
            HIGH,
            True,
        ),
    ],
)
def test_an_entry_stops_mail_of_its_lanes_from_its_scope(
    entries: list[tuple[str, str, str | None]], sender: str, lane: Lane | None, stopped: bool
) -> None:
    assert rows.listed_for(listed(*entries), "ADA@x.net", sender, lane) is stopped


@pytest.mark.parametrize(
    ("given", "column"),
    [
        (None, None),
        ((LOW,), '["low"]'),
        (("low", "high"), '["high", "low"]'),  # in lane order, whatever the order given
        ((HIGH, NORMAL, LOW), None),  # all of them is every lane: one way to say it
    ],
)
def test_the_lanes_column_has_one_form(given: Any, column: str | None) -> None:
    assert rows.lanes_column(given) == column


def test_a_column_read_back_is_in_lane_order() -> None:
    assert rows.suppression_lanes('["low", "high", "normal"]') == (HIGH, NORMAL, LOW)
    assert rows.suppression_lanes(["low"]) == (LOW,)  # jsonb, decoded by psycopg
    assert rows.suppression_lanes(None) is None


@pytest.mark.parametrize(
    ("held", "asked", "repeat"),
    [
        (None, None, True),
        (None, (LOW,), True),
        (frozenset({LOW}), (LOW,), True),
        (frozenset({LOW}), None, False),  # a hard bounce after an unsubscribe
        (frozenset({LOW}), (NORMAL, LOW), False),
        (frozenset({NORMAL, LOW}), (LOW,), True),
    ],
)
def test_an_entry_covers_fewer_lanes_only(
    held: frozenset[Lane] | None, asked: tuple[Lane, ...] | None, repeat: bool
) -> None:
    assert rows.covers(held, asked) is repeat


def test_an_operator_names_known_lanes_or_none() -> None:
    assert suppression_lanes(None) is None
    assert suppression_lanes(["Low", " normal "]) == (NORMAL, LOW)
    assert suppression_lanes("high") == (HIGH,)
    with pytest.raises(ValidationError, match=r"unknown lane 'urgent' \(lanes are high"):
        suppression_lanes(["low", "urgent"])
    with pytest.raises(ValidationError, match="names no lane"):
        suppression_lanes([])
