"""RFC 5321 address forms beyond the dot-atom: quoted local parts and address literals, their
normal form, what is still refused, the SMTP path syntax, and the headers written for them."""

from __future__ import annotations

import email
import email.policy

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from postlane.addresses import parse_address
from postlane.errors import ValidationError
from postlane.ingest.smtp_syntax import parse_path
from postlane.message import Message, prepare


@pytest.mark.parametrize(
    ("given_", "address", "domain"),
    [
        ('"john doe"@example.com', '"john doe"@example.com', "example.com"),
        ('"john doe"@EXAMPLE.com', '"john doe"@example.com', "example.com"),
        ('"John Doe"@example.com', '"John Doe"@example.com', "example.com"),  # case kept
        ('"a@b"@example.com', '"a@b"@example.com', "example.com"),
        ('"a\\"b"@example.com', '"a\\"b"@example.com', "example.com"),
        ('"a\\ b"@example.com', '"a b"@example.com', "example.com"),  # needless escape dropped
        ('"john"@example.com', "john@example.com", "example.com"),  # needless quotes dropped
        ('"john.doe"@example.com', "john.doe@example.com", "example.com"),
        ('"jö doe"@example.com', '"jö doe"@example.com', "example.com"),
        ("user@[192.0.2.1]", "user@[192.0.2.1]", "[192.0.2.1]"),
        ("user@[IPv6:2001:db8::1]", "user@[IPv6:2001:db8::1]", "[ipv6:2001:db8::1]"),
        ("user@[ipv6:2001:DB8:0:0::1]", "user@[IPv6:2001:db8::1]", "[ipv6:2001:db8::1]"),
        ('"john doe"@[192.0.2.1]', '"john doe"@[192.0.2.1]', "[192.0.2.1]"),
        ('John <"john doe"@example.com>', '"john doe"@example.com', "example.com"),
        ('Jörg <"a<b"@example.com>', '"a<b"@example.com', "example.com"),
    ],
)
def test_quoted_local_parts_and_address_literals_are_taken_in_their_normal_form(
    given_: str, address: str, domain: str
) -> None:
    mailbox = parse_address(given_, "to")
    assert (mailbox.address, mailbox.domain) == (address, domain)
    assert mailbox.is_literal is domain.startswith("[")


def test_the_unquoted_local_part_undoes_quotes_and_escapes() -> None:
    assert parse_address('"a\\"b c"@example.com').unquoted_local_part == 'a"b c'
    assert parse_address("plain@example.com").unquoted_local_part == "plain"


@pytest.mark.parametrize(
    ("given_", "why"),
    [
        ("john doe@example.com", "invalid characters before the @-sign: SPACE"),
        ('"john doe@example.com', "must have an @-sign"),
        ('john"doe"@example.com', "invalid characters before the @-sign"),
        ('"john\tdoe"@example.com', "invalid characters in quotes"),
        ('"john\x01doe"@example.com', "control character"),
        ('""@example.com', "something before the @-sign"),
        ("user@[example.com]", "not an IPv4 address and has no address literal tag"),
        ("user@[192.0.2]", "not an IPv4 address"),
        ("user@[300.0.2.1]", "not an IPv4 address"),
        ("user@[IPv6:2001:db8::zz]", "IPv6 address in brackets"),
        ("user@[IPv6:fe80::1%eth0]", "IPv6 address in brackets"),
        ("user@[Foo:bar]", "after the @-sign"),
    ],
)
def test_what_rfc_5321_does_not_allow_is_still_refused(given_: str, why: str) -> None:
    with pytest.raises(ValidationError, match=r"not a valid address|control character") as info:
        parse_address(given_, "to")
    assert why in info.value.message


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ('<"john doe"@example.com> SIZE=10', ('"john doe"@example.com', "SIZE=10")),
        ('<"a@b"@example.com>', ('"a@b"@example.com', "")),
        ('<"john"@example.com>', ("john@example.com", "")),  # the least quoting (RFC 5321 4.1.2)
        ('<"a\\ b"@example.com>', ('"a b"@example.com', "")),
        ('<"a\\"b"@example.com>', ('"a\\"b"@example.com', "")),
        ("<user@[192.0.2.1]>", ("user@[192.0.2.1]", "")),
        ("<user@[IPv6:2001:db8::1]> BODY=8BITMIME", ("user@[IPv6:2001:db8::1]", "BODY=8BITMIME")),
        ('<@relay.example:"john doe"@example.com>', ('"john doe"@example.com', "")),
        ('"john doe"@example.com SIZE=1', ('"john doe"@example.com', "SIZE=1")),
        ('<"jö doe"@example.com> SMTPUTF8', ('"jö doe"@example.com', "SMTPUTF8")),
        # what the RFC 5322 parser would quote or mend itself is no RFC 5321 path
        ("<john doe@example.com>", (None, "")),
        ("john doe@example.com", (None, "")),
        ('<"john@example.com>', (None, "")),
        ('<"a""b"@example.com>', (None, "")),
        ('<"a\x01b"@example.com>', (None, "")),
        ("<user@[ 192.0.2.1 ]>", (None, "")),
    ],
)
def test_smtp_paths_take_quoted_local_parts_and_literals_as_rfc_5321_writes_them(
    arg: str, expected: tuple[str | None, str]
) -> None:
    assert parse_path(arg) == expected


def _to_line(to: list[str]) -> str:
    """The To header as written, unfolded (RFC 5322 2.2.3: only the CRLF goes)."""
    prepared = prepare(
        Message(sender="app@example.com", to=to, subject="s", text="t"), max_size=10**6
    )
    head = prepared.content.decode("utf-8").split("\r\n\r\n")[0].replace("\r\n ", " ")
    return next(line for line in head.split("\r\n") if line.startswith("To: "))


def _rendered_to(to: list[str], sender: str = "app@example.com") -> tuple[list[str], list[str]]:
    """The To header's addresses as a reader parses them, and the recipients' addresses; both as
    (unquoted local part, domain): the email package's own ``addr_spec`` leaves some local
    parts that need quotes (``"."``) unquoted."""
    prepared = prepare(Message(sender=sender, to=to, subject="s", text="t"), max_size=10**6)
    # UTF-8 headers (SMTPUTF8 addresses) are read as text, as an SMTPUTF8 receiver does
    parsed = email.message_from_string(
        prepared.content.decode("utf-8"), policy=email.policy.SMTPUTF8
    )
    header = parsed["To"]
    assert not [d for d in header.defects if "NonASCIILocalPart" not in type(d).__name__]
    in_header = [f"{a.username} @ {a.domain}" for a in header.addresses]
    boxes = [parse_address(r.address) for r in prepared.recipients]
    return in_header, [f"{b.unquoted_local_part} @ {b.address.rpartition('@')[2]}" for b in boxes]


def test_the_to_header_parses_back_to_the_same_addresses() -> None:
    to = [
        '"john doe"@example.com',
        'John Doe <"a@b"@example.com>',
        '"Doe, John" <"a,b"@example.com>',
        '"a\\"b"@example.com',
        "user@[192.0.2.1]",
        "Ann <ann@[IPv6:2001:db8::1]>",
        '"jö doe"@example.com',
        'A name long enough to fold the header <"' + "ab  cd " * 8 + 'x"@example.com>',
    ]
    in_header, recipients = _rendered_to(to)
    assert in_header == recipients
    assert recipients[:2] == ["john doe @ example.com", "a@b @ example.com"]
    assert "user @ [192.0.2.1]" in in_header and "ann @ [IPv6:2001:db8::1]" in in_header


# qtextSMTP (RFC 5321 4.1.2) and the two characters that need a backslash
QTEXT = st.text(
    st.characters(min_codepoint=32, max_codepoint=126) | st.sampled_from("äø€"),
    min_size=1,
    max_size=64,
)
NAMES = ["", "Ann", "Doe, John", "Jörg", "A display name long enough to make the header fold"]


@given(local=QTEXT, name=st.sampled_from(NAMES))
def test_any_quoted_local_part_round_trips_through_the_header(local: str, name: str) -> None:
    quoted = '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"@example.com'
    try:
        mailbox = parse_address(quoted)
    except ValidationError:
        # what email-validator refuses (a lone space, a combining mark first, ...); should it
        # refuse nearly everything, hypothesis fails the test (a health check)
        assume(False)
        raise
    given_ = f'"{name}" <{quoted}>' if name else quoted
    in_header, recipients = _rendered_to([given_])
    assert in_header == recipients == [f"{mailbox.unquoted_local_part} @ example.com"]
    assert _to_line([given_]).endswith(f"<{mailbox.address}>" if name else mailbox.address)


def test_several_addresses_where_one_goes_are_told_apart_from_a_bad_one() -> None:
    """``"to": "b@example.net, c@example.net"`` (a day-one user's guess) got email-validator's
    "invalid characters: ',', '@', SPACE"; it says what is wrong. A display name with a comma
    is one address, and text with no address in it is refused as before."""
    with pytest.raises(ValidationError) as caught:
        parse_address("b@example.net, c@example.net", "to")
    assert caught.value.message == (
        "to 'b@example.net, c@example.net' holds 2 addresses: give one address each "
        "(a list for several recipients)"
    )
    assert parse_address('"Doe, John" <j@example.net>').address == "j@example.net"
    with pytest.raises(ValidationError, match="is not a valid address"):
        parse_address("x, y", "to")
    with pytest.raises(ValidationError) as missing:
        parse_address("", "from")
    assert missing.value.message == "from is missing: give an address (app@example.com)"


@pytest.mark.parametrize(
    "given_",
    [
        "a" * 64 + "@example.com",
        "Ada <" + "a" * 64 + "@example.com>",
        '"' + "a" * 64 + '"@example.com',  # its needless quotes are not sent
        '"a b' + "c" * 59 + '"@example.com',  # 64 with the quotes it keeps
        "ä" * 32 + "@example.com",  # 64 octets in UTF-8
    ],
)
def test_a_local_part_of_64_octets_is_taken(given_: str) -> None:
    assert parse_address(given_).address.endswith("@example.com")


@pytest.mark.parametrize(
    ("given_", "octets"),
    [
        ("a" * 65 + "@example.com", 65),
        ("Ada <" + "a" * 65 + "@example.com>", 65),
        ('"' + "a" * 65 + '"@example.com', 65),
        ('"a b' + "c" * 60 + '"@example.com', 65),  # the quotes are sent, so they count
        ("ä" * 33 + "@example.com", 66),  # 33 characters, 66 octets
    ],
)
def test_a_local_part_over_64_octets_is_refused(given_: str, octets: int) -> None:
    """RFC 5321 4.5.3.1.1; email-validator checks it only in its strict mode."""
    with pytest.raises(ValidationError) as refused:
        parse_address(given_, "to")
    assert refused.value.field == "to"
    assert f"the part before the @ is {octets} octets" in refused.value.message
    assert "RFC 5321 4.5.3.1.1 allows at most 64" in refused.value.message


def test_a_long_address_is_repeated_cut_in_its_refusal() -> None:
    """A refusal repeats the address to its 100th character, then an ellipsis: the reason
    after it stays in view (and an SMTP reply within its 512 octets)."""
    with pytest.raises(ValidationError) as refused:
        parse_address("x" * 5000, "to")
    message = refused.value.message
    assert message.startswith("to '" + "x" * 100 + "...' is not a valid address: ")
    assert len(message) < 300
    with pytest.raises(ValidationError) as refused:
        parse_address("it's " + "y" * 200, "to")  # repr quotes it with "
    assert "\"it's " + "y" * 95 + '..."' in refused.value.message
