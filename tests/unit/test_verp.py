"""VERP return paths: a token names one delivery, is short and lower-case, and cannot be made
without the key."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postlane.feedback.verp import ReturnPaths

KEY = bytes(range(32))
PATHS = ReturnPaths("Bounce.Example.COM.", KEY)


def test_a_return_path_names_its_delivery() -> None:
    address = PATHS.address(42)
    local, _, domain = address.partition("@")
    assert domain == "bounce.example.com"
    assert PATHS.verify_token(local) == 42
    assert PATHS.delivery_id(address) == 42
    assert PATHS.delivery_id(f"<{address.upper()}>") == 42


@given(st.integers(min_value=1, max_value=2**63 - 1))
def test_every_delivery_id_round_trips_in_a_short_lower_case_local_part(delivery_id: int) -> None:
    local = PATHS.local_part(delivery_id)
    assert re.fullmatch(r"b-[0-9a-z]+-[a-z2-7]{16}", local)
    assert len(local) < 64
    assert PATHS.verify_token(local) == delivery_id
    assert PATHS.verify_token(local.upper()) == delivery_id  # some MTAs change the case


def test_a_forged_or_altered_token_names_nothing() -> None:
    local = PATHS.local_part(42)
    prefix, id_part, mac = local.split("-")
    other_mac = PATHS.local_part(43).split("-")[2]
    assert PATHS.verify_token(f"{prefix}-{PATHS.local_part(43).split('-')[1]}-{mac}") is None
    assert PATHS.verify_token(f"{prefix}-{id_part}-{other_mac}") is None
    flipped = mac[:-1] + ("b" if mac.endswith("a") else "a")
    assert PATHS.verify_token(f"{prefix}-{id_part}-{flipped}") is None
    assert PATHS.verify_token(f"{prefix}-0{id_part}-{mac}") is None  # not the canonical form
    assert PATHS.verify_token("postmaster") is None
    assert PATHS.verify_token("") is None


def test_another_key_or_domain_names_nothing() -> None:
    address = PATHS.address(42)
    assert ReturnPaths("bounce.example.com", bytes(32)).delivery_id(address) is None
    assert PATHS.delivery_id(address.replace("bounce.example.com", "evil.example")) is None
    assert PATHS.delivery_id(address.replace("@", "@x.")) is None


@given(st.text(max_size=80))
def test_no_random_local_part_verifies(local: str) -> None:
    assert PATHS.verify_token(local) is None


def test_a_key_must_be_long_enough() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        ReturnPaths("bounce.example.com", b"short")


def test_return_paths_quoted_in_a_report_are_found_once_and_only_if_valid() -> None:
    text = (
        f"Return-Path: <{PATHS.address(7)}>\r\n"
        f"X-Postfix-Sender: rfc822; {PATHS.address(7).upper()}\r\n"
        f"Original-Mail-From: <{PATHS.address(9)}>\r\n"
        "Return-Path: <b-a-aaaaaaaaaaaaaaaa@bounce.example.com>\r\n"  # forged
        f"Reply-To: x{PATHS.address(11)}\r\n"  # not an address of ours: another local part
        f"Sender: {PATHS.address(12)}.evil.example\r\n"  # another domain
        f"Done at {PATHS.address(13)}.\r\n"  # a sentence's full stop is not a domain
    )
    assert list(PATHS.find(text)) == [7, 9, 13]
