"""The one selector parser that the HTTP API, the dashboard and the CLI share."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postlane.classify import ReplyClass
from postlane.clock import FakeClock
from postlane.errors import ValidationError
from postlane.message import Lane, RecipientState
from postlane.records import Selector
from postlane.selectors import SELECTOR_FIELDS, metadata_pairs, parse_selector


def test_nothing_given_selects_what_a_bare_selector_does(clock: FakeClock) -> None:
    assert parse_selector({}, clock) == Selector()
    every_field_none = dict.fromkeys(SELECTOR_FIELDS - {"all"})
    assert parse_selector(every_field_none, clock) == Selector()


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"ids": "AAAA1111"}, Selector(ids=("AAAA1111",))),
        ({"ids": ["AAAA1111", "BBBB2222"]}, Selector(ids=("AAAA1111", "BBBB2222"))),
        ({"all": True}, Selector(all=True)),
        ({"all": False}, Selector(all=False)),
        ({"lane": "high"}, Selector(lanes=(Lane.HIGH,))),
        ({"lane": ["HIGH", "Low"]}, Selector(lanes=(Lane.HIGH, Lane.LOW))),
        ({"state": "deferred"}, Selector(states=(RecipientState.DEFERRED,))),
        (
            {"state": ["held", "QUEUED"]},
            Selector(states=(RecipientState.HELD, RecipientState.QUEUED)),
        ),
        ({"domain": "Example.NET"}, Selector(domains=("example.net",))),
        ({"domain": ["a.example", "B.example"]}, Selector(domains=("a.example", "b.example"))),
        ({"class": "hard_bounce"}, Selector(classes=(ReplyClass.HARD_BOUNCE,))),
        ({"class": ["Throttled"]}, Selector(classes=(ReplyClass.THROTTLED,))),
        ({"sender": "App@example.com"}, Selector(sender="App@example.com")),
        ({"recipient": "ada@example.net"}, Selector(recipient="ada@example.net")),
        ({"metadata": {"user": "7"}}, Selector(metadata={"user": "7"})),
        ({"metadata": {}}, Selector()),
    ],
)
def test_each_field_narrows(clock: FakeClock, fields: dict[str, Any], expected: Selector) -> None:
    assert parse_selector(fields, clock) == expected


def test_the_clis_tuples_are_lists_too(clock: FakeClock) -> None:
    """click hands ``multiple=True`` options over as tuples."""
    selector = parse_selector(
        {"ids": ("AAAA1111",), "lane": ("low",), "domain": ("X.example",)}, clock
    )
    assert selector == Selector(ids=("AAAA1111",), lanes=(Lane.LOW,), domains=("x.example",))


@pytest.mark.parametrize(
    ("duration", "seconds"), [("2h", 7200.0), ("30s", 30.0), ("1h30m", 5400.0), ("500ms", 0.5)]
)
def test_older_than_counts_back_from_the_injected_clock(
    clock: FakeClock, duration: str, seconds: float
) -> None:
    selector = parse_selector({"older_than": duration}, clock)
    assert selector.older_than == clock.now() - seconds


async def test_older_than_follows_the_clock_as_it_moves(clock: FakeClock) -> None:
    before = parse_selector({"older_than": "1h"}, clock).older_than
    await clock.advance(600)
    after = parse_selector({"older_than": "1h"}, clock).older_than
    assert before is not None and after == before + 600


@pytest.mark.parametrize(
    ("fields", "field", "says"),
    [
        ({"lanes": "high"}, "lanes", "unknown selector 'lanes'"),
        ({"ids": 5}, "ids", "ids must be a string or a list of strings"),
        ({"ids": ["a", 5]}, "ids", "ids must be a string or a list of strings"),
        ({"all": "yes"}, "all", "all must be true or false"),
        ({"all": None}, "all", "all must be true or false"),
        ({"lane": "urgent"}, "lane", "lane: one of high, normal, low"),
        ({"lane": ["high", "urgent"]}, "lane", "lane: one of high, normal, low"),
        ({"state": "lost"}, "state", "state: one of queued, sending, deferred"),
        ({"class": "bounce"}, "class", "class: one of delivered, temporary"),
        ({"domain": {"a": "b"}}, "domain", "domain must be a string or a list of strings"),
        ({"older_than": "soon"}, "older_than", "older_than: expected a duration"),
        ({"older_than": 3600}, "older_than", "older_than must be a string"),
        ({"sender": ["a@example.com"]}, "sender", "sender must be a string"),
        ({"recipient": 7}, "recipient", "recipient must be a string"),
        ({"metadata": "user=7"}, "metadata", "metadata must be an object of strings"),
        ({"metadata": {"user": 7}}, "metadata", "metadata must be an object of strings"),
    ],
)
def test_a_bad_field_is_named_in_the_error(
    clock: FakeClock, fields: dict[str, Any], field: str, says: str
) -> None:
    with pytest.raises(ValidationError) as refused:
        parse_selector(fields, clock)
    assert refused.value.field == field
    assert refused.value.message.startswith(says), refused.value.message


def test_the_unknown_field_is_named_before_any_bad_value(clock: FakeClock) -> None:
    with pytest.raises(ValidationError) as refused:
        parse_selector({"lane": "urgent", "zone": "x"}, clock)
    assert refused.value.field == "zone"


def test_metadata_pairs_read_key_equals_value() -> None:
    assert metadata_pairs(["user=7", "plan=a=b", "empty="]) == {
        "user": "7",
        "plan": "a=b",
        "empty": "",
    }
    assert metadata_pairs([]) == {}


@pytest.mark.parametrize("item", ["user", "=7", ""])
def test_metadata_pairs_refuse_an_item_without_a_key(item: str) -> None:
    with pytest.raises(ValidationError, match="is not KEY=VALUE") as refused:
        metadata_pairs([item])
    assert refused.value.field == "metadata"


@given(st.lists(st.sampled_from([lane.value for lane in Lane]), max_size=5))
def test_any_lanes_in_any_case_parse(lanes: list[str]) -> None:
    upper = [lane.upper() for lane in lanes]
    selector = parse_selector({"lane": upper}, FakeClock())
    assert selector.lanes == tuple(Lane(lane) for lane in lanes)
