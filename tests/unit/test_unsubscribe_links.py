"""One-click unsubscribe links: the token names one delivery and no other use's token passes
for it; the headers go on each recipient's copy of mail in the configured lanes only, never
on a message with the application's own List-Unsubscribe; the [unsubscribe] settings."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postlane.config import config_from_dict
from postlane.errors import ConfigError
from postlane.feedback.tokens import DeliveryTokens
from postlane.feedback.unsubscribe import (
    UnsubscribeLinks,
    UnsubscribeTransport,
    has_list_unsubscribe,
    with_unsubscribe_headers,
)
from postlane.feedback.verp import ReturnPaths
from postlane.transports.base import BaseTransport, Envelope, Response

KEY = bytes(range(32))
LINKS = UnsubscribeLinks("https://mail.example.com/unsubscribe/", KEY)


@given(st.integers(min_value=1, max_value=2**63 - 1))
def test_every_delivery_id_round_trips_in_a_url_safe_link(delivery_id: int) -> None:
    link = LINKS.link(delivery_id)
    base, _, token = link.rpartition("/")
    assert base == "https://mail.example.com/unsubscribe"
    assert re.fullmatch(r"u-[0-9a-z]+-[a-z2-7]{26}", token)  # unreserved URL characters only
    assert LINKS.delivery_id(token) == delivery_id


def test_a_forged_or_altered_token_names_nothing() -> None:
    token = LINKS.token(42)
    prefix, id_part, mac = token.split("-")
    assert LINKS.delivery_id(f"{prefix}-{LINKS.token(43).split('-')[1]}-{mac}") is None
    flipped = mac[:-1] + ("b" if mac.endswith("a") else "a")
    assert LINKS.delivery_id(f"{prefix}-{id_part}-{flipped}") is None
    assert LINKS.delivery_id(token[:-1]) is None
    assert UnsubscribeLinks(LINKS.url, bytes(32)).delivery_id(token) is None  # another key
    assert LINKS.delivery_id("") is None


def test_a_return_path_token_is_no_unsubscribe_token_even_under_the_same_key() -> None:
    verp = ReturnPaths("bounce.example.com", KEY).local_part(42)
    assert LINKS.delivery_id(verp) is None
    assert LINKS.delivery_id("u-" + verp.removeprefix("b-")) is None
    same_shape = DeliveryTokens(KEY, prefix="u-", purpose="verp", mac_chars=26).make(42)
    assert LINKS.delivery_id(same_shape) is None  # the purpose is signed too


def test_return_paths_already_sent_stay_valid() -> None:
    """The shared token class makes the very return paths VERP made before it."""
    paths = ReturnPaths("bounce.example.com", KEY)
    assert paths.address(42) == "b-16-vpncex76i7n2c64k@bounce.example.com"
    assert paths.address(2**63 - 1) == "b-1y2p0ij32e8e7-eyzr6ljo2b23g5sq@bounce.example.com"


MESSAGE = (
    b"From: Shop <news@shop.example>\r\nTo: ada@example.net\r\nSubject: Deals\r\n"
    b"Message-ID: <n1@shop.example>\r\n\r\nList-Unsubscribe: in the body is no header\r\n"
)


def test_the_headers_go_on_top_in_the_messages_line_ends() -> None:
    added = with_unsubscribe_headers(MESSAGE, LINKS.link(42))
    assert added == (
        f"List-Unsubscribe: <{LINKS.link(42)}>\r\n"
        "List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n".encode()
        + MESSAGE
    )
    lf = MESSAGE.replace(b"\r\n", b"\n")
    assert with_unsubscribe_headers(lf, "https://x.example/u-1-a").count(b"\r") == 0


@pytest.mark.parametrize(
    ("field", "present"),
    [
        (b"List-Unsubscribe: <mailto:leave@shop.example>\r\n", True),
        (b"list-unsubscribe : <https://shop.example/leave>\r\n", True),
        (b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n", True),
        (b"List-Id: Deals <deals.shop.example>\r\n", False),
        (b"X-Note: see\r\n List-Unsubscribe: folded into another field\r\n", False),
        (b"", False),
    ],
)
def test_the_applications_own_list_unsubscribe_is_recognised(field: bytes, present: bool) -> None:
    assert has_list_unsubscribe(field + MESSAGE) is present
    assert has_list_unsubscribe((field + MESSAGE).replace(b"\r\n", b"\n")) is present


class Recording(BaseTransport):
    name = "recording://"

    def __init__(self) -> None:
        self.sent: list[Envelope] = []

    async def send(self, envelope: Envelope) -> list[Response]:
        self.sent.append(envelope)
        return [Response(250, "250 ok", self.name) for _ in envelope.recipients]


def envelope(lane: str = "low", content: bytes = MESSAGE, ids: Any = (7, 8)) -> Envelope:
    return Envelope(
        "q1",
        "news@shop.example",
        ("ada@example.net", "bob@example.net"),
        content,
        "<n1@shop.example>",
        lane=lane,
        delivery_ids=tuple(ids),
    )


async def test_each_recipient_in_a_configured_lane_gets_its_own_link() -> None:
    inner = Recording()
    transport = UnsubscribeTransport(inner, LINKS, ["low"])
    responses = await transport.send(envelope())
    assert [r.code for r in responses] == [250, 250]
    assert [(e.recipients, e.delivery_ids) for e in inner.sent] == [
        (("ada@example.net",), (7,)),
        (("bob@example.net",), (8,)),
    ]
    for sent, delivery_id in zip(inner.sent, (7, 8), strict=True):
        assert sent.content == with_unsubscribe_headers(MESSAGE, LINKS.link(delivery_id))


@pytest.mark.parametrize(
    "unchanged",
    [
        pytest.param(envelope(lane="normal"), id="another lane"),
        pytest.param(envelope(ids=()), id="no delivery ids"),
        pytest.param(
            envelope(content=b"List-Unsubscribe: <mailto:u@shop.example>\r\n" + MESSAGE),
            id="the application's own List-Unsubscribe",
        ),
    ],
)
async def test_other_mail_goes_through_as_it_is(unchanged: Envelope) -> None:
    inner = Recording()
    await UnsubscribeTransport(inner, LINKS, ["low"]).send(unchanged)
    assert inner.sent == [unchanged]


def unsubscribe(**values: Any) -> Any:
    return config_from_dict({"unsubscribe": values}).unsubscribe


def test_the_settings_and_their_defaults() -> None:
    assert unsubscribe() == unsubscribe(url="", lanes=["low"], scope="sender-domain")
    assert unsubscribe().url is None  # off until a url is given
    chosen = unsubscribe(url="https://mail.example.com/u/", lanes=["low", "normal"], scope="global")
    assert (chosen.url, chosen.lanes, chosen.scope) == (
        "https://mail.example.com/u",
        ("low", "normal"),
        "global",
    )
    assert unsubscribe(url="http://127.0.0.1:8025/u").url == "http://127.0.0.1:8025/u"
    assert unsubscribe(url="http://localhost/u").url == "http://localhost/u"
    env = {
        "POSTLANE_UNSUBSCRIBE_URL": "https://m.example/u",
        "POSTLANE_UNSUBSCRIBE_LANES": "low,normal",
    }
    from_env = config_from_dict({}, env=env).unsubscribe
    assert (from_env.url, from_env.lanes) == ("https://m.example/u", ("low", "normal"))


@pytest.mark.parametrize(
    ("values", "says"),
    [
        ({"url": "http://mail.example.com/u"}, "https://"),
        ({"url": "mailto:leave@example.com"}, "https://"),
        ({"url": "https://mail.example.com/u?list=1"}, "without query"),
        ({"url": "https://user:secret@mail.example.com/u"}, "without credentials"),
        ({"url": "https:///u"}, "https://"),
        ({"lanes": ["bulk"]}, "unknown lane 'bulk'"),
        ({"scope": "everyone"}, "sender-domain, global"),
    ],
)
def test_bad_settings_are_refused_naming_the_key(values: dict[str, Any], says: str) -> None:
    with pytest.raises(ConfigError) as refused:
        unsubscribe(**values)
    assert refused.value.message.startswith("unsubscribe.")
    assert says in refused.value.message
    assert "secret" not in refused.value.message
