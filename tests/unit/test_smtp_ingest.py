"""SMTP submission's pure logic: the AUTH failure budgets (on a fake clock) and the control
headers taken out of a submitted message."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postlane.errors import ValidationError
from postlane.ingest.smtp import Controls, take_control_headers
from postlane.ingest.smtp_auth import FailureBudgets, Outcome, address_key
from postlane.message import MAX_HEADER_BYTES


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def budgets(per_address: int = 3, total: int = 10, window: float = 60.0) -> tuple[Any, Clock]:
    clock = Clock()
    return FailureBudgets(per_address, total, window, clock), clock


def fail(b: FailureBudgets, key: str, times: int = 1) -> None:
    for _ in range(times):
        assert b.reserve(key) is None
        b.settle(key, success=False)


def test_an_address_is_refused_once_its_failures_reach_the_budget_until_they_age_out() -> None:
    b, clock = budgets(per_address=3)
    fail(b, "192.0.2.1", 3)
    assert b.reserve("192.0.2.1") is Outcome.REFUSED_ADDRESS
    assert b.reserve("192.0.2.2") is None  # another address has its own budget
    clock.now += 61
    assert b.reserve("192.0.2.1") is None


def test_attempts_being_checked_count_against_the_budget_until_answered() -> None:
    """Fifty parallel connections get no more checks than one."""
    b, _ = budgets(per_address=3)
    assert [b.reserve("192.0.2.1") for _ in range(5)] == [None, None, None] + [
        Outcome.REFUSED_ADDRESS
    ] * 2
    b.settle("192.0.2.1", success=True)  # a right password gives its place back
    assert b.reserve("192.0.2.1") is None


def test_the_total_budget_spares_addresses_that_logged_in_but_never_their_own_budget() -> None:
    b, clock = budgets(per_address=3, total=6)
    assert b.reserve("198.51.100.7") is None
    b.settle("198.51.100.7", success=True)
    for n in range(3):
        fail(b, f"192.0.2.{n}", 2)
    assert b.reserve("192.0.2.99") is Outcome.REFUSED_TOTAL
    fail(b, "198.51.100.7", 3)  # known good: past the total budget, within its own
    assert b.reserve("198.51.100.7") is Outcome.REFUSED_ADDRESS
    clock.now += 61
    assert b.reserve("192.0.2.99") is None


def test_failures_are_forgotten_after_the_window() -> None:
    b, clock = budgets(total=1000)
    for n in range(200):
        fail(b, f"192.0.2.{n % 250}")
    clock.now += 61
    assert b.reserve("192.0.2.1") is None
    assert not b._failures and set(b._by_address) == set()


@pytest.mark.parametrize(
    ("host", "key"),
    [
        ("192.0.2.1", "192.0.2.1"),
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"),
    ],
)
def test_an_ipv6_host_is_budgeted_by_its_64(host: str, key: str) -> None:
    assert address_key(host) == key


def test_control_headers_are_read_and_taken_out_folded_lines_included() -> None:
    message = (
        b"From: a@example.com\r\nX-Postlane-Lane: high\r\nX-POSTLANE-IDEMPOTENCY-KEY: k\r\n"
        b' 1\r\nX-Postlane-Metadata: {"a": 1}\r\nSubject: s\r\n\r\n'
        b"X-Postlane-Lane: low\r\n"
    )
    controls, rest = take_control_headers(message)
    assert controls == Controls(lane="high", idempotency_key="k 1", metadata={"a": 1})
    assert rest == b"From: a@example.com\r\nSubject: s\r\n\r\nX-Postlane-Lane: low\r\n"


@pytest.mark.parametrize(
    ("header", "says"),
    [
        (b"X-Postlane-Priority: 1", "unknown control header X-Postlane-Priority"),
        (b"X-Postlane-Lane: high\r\nX-Postlane-Lane: low", "appears more than once"),
        (b"X-Postlane-Metadata: [1]", "must be a JSON object"),
        (b"X-Postlane-Metadata: {", "is not JSON"),
        (b"X-Postlane-Lane: \xff", "not UTF-8"),
    ],
)
def test_a_bad_control_header_is_refused(header: bytes, says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        take_control_headers(header + b"\r\nSubject: s\r\n\r\nbody\r\n")


HEADER_LINES = st.lists(
    st.from_regex(rb"\A[A-Za-z-]{1,20}: [ -~]{0,40}\Z", fullmatch=True).filter(
        lambda line: not line.lower().startswith(b"x-postlane-")
    ),
    max_size=8,
)


@given(lines=HEADER_LINES, body=st.binary(max_size=200))
def test_a_message_without_control_headers_is_left_as_it_is(
    lines: list[bytes], body: bytes
) -> None:
    message = b"".join(line + b"\r\n" for line in lines) + b"\r\n" + body
    assert take_control_headers(message) == (Controls(), message)


def test_a_header_section_past_its_limit_is_not_read_line_by_line() -> None:
    """Past MAX_HEADER_BYTES the section is left whole for prepare() to refuse (read line by
    line here, millions of short fields held the event loop for seconds)."""
    head = b"X-Postlane-Lane: high\r\n" + b"X-A: b\r\n" * (MAX_HEADER_BYTES // 8)
    for message in (head + b"\r\nbody", head):  # a headers-only message too (a review)
        assert take_control_headers(message) == (Controls(), message)
    # the limit is the header section's own size, as prepare() counts it (a review: four
    # bytes of the blank line counted here made a section just under the limit skip this)
    fits = b"X-Postlane-Lane: high\r\n" + b"X" * (MAX_HEADER_BYTES - 30) + b": b"
    assert len(fits) <= MAX_HEADER_BYTES
    assert take_control_headers(fits + b"\r\n\r\nbody")[0].lane == "high"
    small = b"X-Postlane-Lane: high\r\nX-A: b\r\n\r\nbody"
    assert take_control_headers(small)[0].lane == "high"


BODY = st.binary(max_size=300)
HEADER_LINES = st.lists(
    st.sampled_from(
        [b"Subject: hi", b"X-Postlane-Lane: high", b"x-postlane-metadata: {}", b" folded", b"To: a"]
    ),
    max_size=6,
    unique=True,
)


@given(head=HEADER_LINES, eol=st.sampled_from([b"\r\n", b"\n"]), body=BODY)
def test_only_the_header_section_is_read_and_the_body_comes_back_untouched(
    head: list[bytes], eol: bytes, body: bytes
) -> None:
    content = b"".join(line + eol for line in head) + eol + body
    try:
        controls, kept = take_control_headers(content)
    except ValidationError:
        return  # a folded line after a control header, or the like: refused as a whole
    assert kept.endswith(eol + body)
    assert b"x-postlane" not in kept[: len(kept) - len(body)].lower()
    if not any(line.lower().startswith(b"x-postlane") for line in head):
        assert kept == content and controls == Controls()
