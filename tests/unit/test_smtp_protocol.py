"""The SMTP server's pure parsing: MAIL and RCPT paths (the fast path for plain addresses and
the RFC 5322 parser behind it must agree) and ESMTP parameters."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postlane.ingest import smtp_syntax
from postlane.ingest.smtp_protocol import parse_path


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("<a@b.example>", ("a@b.example", "")),
        ("<a@b.example> SIZE=10 BODY=8BITMIME", ("a@b.example", "SIZE=10 BODY=8BITMIME")),
        ("<>", ("<>", "")),  # the null path (what DSNs use)
        ("", ("", "")),
        ('<"a b"@b.example>', ('"a b"@b.example', "")),
        ("a@b.example", ("a@b.example", "")),
        ("<jörg@exämple.de> SMTPUTF8", ("jörg@exämple.de", "SMTPUTF8")),
        ("<a@>", (None, "")),
        ("<<<", (None, "")),
    ],
)
def test_paths(arg: str, expected: tuple[str | None, str]) -> None:
    assert parse_path(arg) == expected


ATOM = st.text("abcdefghijklmnopqrstuvwxyz0123456789!#$%&'*+/=?^_`{|}~-", min_size=1, max_size=8)


@given(
    local=st.lists(ATOM, min_size=1, max_size=3).map(".".join),
    domain=st.lists(st.text("abcxyz019-", min_size=1, max_size=8), min_size=1, max_size=3).map(
        ".".join
    ),
    rest=st.sampled_from(["", " SIZE=100", " BODY=8BITMIME SMTPUTF8"]),
)
def test_the_fast_path_agrees_with_the_rfc_5322_parser(local: str, domain: str, rest: str) -> None:
    arg = f"<{local}@{domain}>{rest}"
    slow = smtp_syntax.get_angle_addr(arg)
    assert parse_path(arg) == (str(slow[0].addr_spec), str(slow[1]).strip())


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        (
            ["SIZE=10", "BODY=8BITMIME", "SMTPUTF8"],
            {"SIZE": "10", "BODY": "8BITMIME", "SMTPUTF8": True},
        ),
        (["SIZE="], None),
        (["BAD-NAME=1"], None),
        ([], {}),
    ],
)
def test_parameters(words: list[str], expected: dict[str, str | bool] | None) -> None:
    assert smtp_syntax.parse_parameters(words) == expected
