"""Outbound webhooks, the pure parts: endpoint settings, address checks, signatures (verified
with the Standard Webhooks reference library), the retry schedule."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import random
import time
from typing import Any

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from postlane.alerts import load_rules
from postlane.errors import ConfigError
from postlane.events import EVENT_TYPES, Event
from postlane.message import Lane
from postlane.webhooks.addresses import (
    AddressRefused,
    literal_address_refusal,
    refusal,
    resolve_allowed,
)
from postlane.webhooks.endpoints import (
    WebhookEndpoint,
    derived_name,
    endpoints_from_config,
    new_secret,
)
from postlane.webhooks.retry import RetrySchedule
from postlane.webhooks.sender import MailFirst
from postlane.webhooks.signing import Signer, payload, webhook_id

SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()


def table(**keys: Any) -> dict[str, Any]:
    return {"url": "https://app.example.com/hooks/mail", "secret": SECRET, **keys}


def event(**changes: Any) -> Event:
    values: dict[str, Any] = {
        "id": 42,
        "type": "sent",
        "at": 1_800_000_000.5,
        "queue_id": "q1",
        "recipient": "ada@example.net",
        "lane": Lane.NORMAL,
        "cls": None,
        "code": 250,
        "enhanced": "2.0.0",
        "text": "250 2.0.0 OK",
        "metadata": {"order": "42"},
    }
    values.update(changes)
    return Event(**values)


# -- endpoint settings ----------------------------------------------------------------------------


def test_an_endpoint_table_is_read_with_its_defaults() -> None:
    endpoint = WebhookEndpoint.from_table(table())
    assert endpoint.name == "app.example.com-hooks-mail"
    assert endpoint.events == frozenset(EVENT_TYPES)
    assert endpoint.secrets == (bytes(range(32)),)
    assert (endpoint.allow_private, endpoint.timeout, endpoint.concurrency) == (False, 15.0, 8)
    assert endpoint.parts.authority == "app.example.com" and endpoint.parts.port == 443
    assert endpoint.parts.target == "/hooks/mail"
    assert SECRET not in repr(endpoint) and "secret" not in endpoint.as_json()


def test_every_key_of_an_endpoint_table() -> None:
    endpoint = WebhookEndpoint.from_table(
        table(
            url="http://10.1.2.3:8080/h?x=1",
            events=["sent", "dead"],
            allow_private=True,
            name="app",
            timeout="2s",
            concurrency=3,
            secret=[SECRET, new_secret()],
        )
    )
    assert (endpoint.name, endpoint.events, endpoint.timeout, endpoint.concurrency) == (
        "app",
        frozenset({"sent", "dead"}),
        2.0,
        3,
    )
    assert endpoint.parts.authority == "10.1.2.3:8080" and endpoint.parts.target == "/h?x=1"
    assert len(endpoint.secrets) == 2
    assert endpoint.wants("sent") and not endpoint.wants("queued")


@pytest.mark.parametrize(
    ("url", "name"),
    [
        ("https://app.example.com/hooks/mail", "app.example.com-hooks-mail"),
        ("http://127.0.0.1:8080/", "127.0.0.1-8080"),
        ("https://Hooks.Example.com", "hooks.example.com"),
    ],
)
def test_the_default_name_comes_from_the_host_and_path(url: str, name: str) -> None:
    assert derived_name(url) == name


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"url": "ftp://app.example.com/x"}, "webhooks.out.url: expected an http:// or https://"),
        ({"url": "app.example.com/x"}, "webhooks.out.url: expected an http://"),
        ({"url": "https:///x"}, "names no host"),
        ({"url": "https://user:pw@app.example.com/"}, "credentials do not belong"),
        ({"url": "http://169.254.169.254/latest/meta-data/"}, "link-local"),
        ({"url": "http://10.0.0.1/hooks"}, "10.0.0.1 is a private address"),
        ({"url": "http://[::1]:8080/hooks"}, "::1 is a loopback address"),
        ({"url": "http://127.0.0.1/hooks"}, "loopback"),
        ({"url": "http://2852039166/"}, "link-local"),  # 169.254.169.254, as a number
        ({"url": "http://0x7f.1/"}, "loopback"),
        ({"url": "http://[::ffff:10.0.0.1]/"}, "private"),
        ({"url": "http://app.example.com/a b"}, "spaces"),
        ({"url": "http://bücher.example/"}, "ASCII"),
        ({"secret": "dGVzdA=="}, 'webhooks.out.secret: expected "whsec_"'),
        ({"secret": "whsec_not*base64!"}, "webhooks.out.secret: the part after whsec_ is not"),
        ({"secret": "whsec_" + base64.b64encode(b"short").decode()}, "the key is 5 bytes"),
        ({"secret": 5}, "webhooks.out.secret: expected"),
        ({"events": ["sent", "opened"]}, "webhooks.out.events: unknown event type 'opened'"),
        ({"events": []}, "at least one event type"),
        ({"allow_private": "yes"}, "webhooks.out.allow_private: expected true or false"),
        ({"timeout": 5}, "webhooks.out.timeout: expected a duration"),
        ({"timeout": "0s"}, "above zero"),
        ({"concurrency": 0}, "webhooks.out.concurrency: expected an integer from 1"),
        ({"name": "a/b"}, "webhooks.out.name: expected letters"),
        ({"retries": 3}, "unknown key webhooks.out.retries"),
    ],
)
def test_a_bad_endpoint_is_a_clear_error_naming_the_key(keys: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        WebhookEndpoint.from_table(table(**keys))
    assert message in error.value.message


def test_url_and_secret_are_required() -> None:
    with pytest.raises(ConfigError, match="give url"):
        WebhookEndpoint.from_table({"secret": SECRET})
    with pytest.raises(ConfigError, match="give secret"):
        WebhookEndpoint.from_table({"url": "https://app.example.com/"})


@pytest.mark.parametrize(
    "url", ["http://10.0.0.1/h", "http://[::1]:9/h", "http://169.254.169.254/", "http://localhost/"]
)
def test_allow_private_lets_private_addresses_through(url: str) -> None:
    assert WebhookEndpoint.from_table(table(url=url, allow_private=True)).url == url


def test_a_host_name_is_checked_when_sent_not_when_read() -> None:
    # localhost resolves to a loopback address: refused at send time (see the integration tests)
    assert WebhookEndpoint.from_table(table(url="http://localhost:8080/h")).name


def test_endpoint_names_are_unique_and_errors_say_which_table() -> None:
    with pytest.raises(ConfigError, match=r"webhooks.out\[2\]: another endpoint is already named"):
        endpoints_from_config([table(), table()])
    with pytest.raises(ConfigError, match=r"webhooks.out\[2\].secret"):
        endpoints_from_config([table(), table(name="other", secret="nope")])
    assert [e.name for e in endpoints_from_config([table(), table(name="b")])] == [
        "app.example.com-hooks-mail",
        "b",
    ]


def test_a_new_secret_is_valid_and_random() -> None:
    first, second = new_secret(), new_secret()
    assert first != second
    assert WebhookEndpoint.from_table(table(secret=first)).secrets[0] == base64.b64decode(
        first.removeprefix("whsec_")
    )


# -- addresses ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "refused"),
    [
        ("169.254.169.254", "link-local"),
        ("10.0.0.1", "private"),
        ("192.168.1.1", "private"),
        ("172.16.0.1", "private"),
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("fe80::1", "link-local"),
        ("fd00::1", "private"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("100.64.0.1", "reserved"),  # carrier-grade NAT
        ("::ffff:127.0.0.1", "loopback"),
        # an IPv4 address inside an IPv6 one, where the network translates it (a security
        # audit: these passed both checks)
        ("64:ff9b::a9fe:a9fe", "link-local"),  # NAT64's well-known prefix
        ("::7f00:1", "loopback"),  # IPv4-compatible
        ("::ffff:0:a9fe:a9fe", "link-local"),  # SIIT's IPv4-translated
        ("2002:a9fe:a9fe::1", "link-local"),  # 6to4
        ("64:ff9b:1::a00:1", "NAT64 local-use"),
        ("8.8.8.8", None),
        ("2606:4700:4700::1111", None),
        ("::ffff:8.8.8.8", None),
        ("64:ff9b::808:808", None),  # NAT64 to a public address
    ],
)
def test_which_addresses_webhooks_may_reach(address: str, refused: str | None) -> None:
    why = refusal(ipaddress.ip_address(address))
    assert (why is None) if refused is None else (why is not None and refused in why)


def test_only_literal_addresses_are_judged_when_the_configuration_is_read() -> None:
    assert literal_address_refusal("app.example.com", False) is None
    assert literal_address_refusal("10.0.0.1", True) is None
    assert "private" in (literal_address_refusal("10.0.0.1", False) or "")


async def test_the_first_allowed_address_is_chosen_and_private_ones_refused() -> None:
    async def answers(host: str, port: int) -> list[str]:
        return {"mixed.test": ["10.0.0.7", "93.184.216.34"], "inside.test": ["127.0.0.1"]}[host]

    assert await resolve_allowed("mixed.test", 443, allow_private=False, resolver=answers) == (
        "93.184.216.34"
    )
    with pytest.raises(AddressRefused, match=r"inside.test, which resolves to 127.0.0.1, a loop"):
        await resolve_allowed("inside.test", 443, allow_private=False, resolver=answers)
    assert await resolve_allowed("inside.test", 443, allow_private=True, resolver=answers) == (
        "127.0.0.1"
    )
    with pytest.raises(AddressRefused, match=r"169\.254\.169\.254, a link-local"):
        await resolve_allowed("169.254.169.254", 80, allow_private=False, resolver=answers)


# -- signatures -----------------------------------------------------------------------------------


def test_the_body_is_the_specifications_payload_with_the_event_as_data() -> None:
    import json

    body = json.loads(payload(event()))
    assert body == {
        "type": "sent",
        "timestamp": "2027-01-15T08:00:00.500Z",
        "data": event().as_json(),
    }
    assert webhook_id(42) == "evt_42"


def test_a_signature_verifies_with_the_reference_library() -> None:
    body = payload(event())
    headers = Signer((base64.b64decode(SECRET[6:]),)).headers("evt_42", time.time(), body)
    assert set(headers) == {"webhook-id", "webhook-timestamp", "webhook-signature"}
    assert headers["webhook-signature"].startswith("v1,")
    assert Webhook(SECRET).verify(body, headers)["data"]["id"] == "42"


def test_a_wrong_secret_a_changed_body_or_an_old_timestamp_is_refused() -> None:
    body = payload(event())
    signer = Signer((base64.b64decode(SECRET[6:]),))
    headers = signer.headers("evt_42", time.time(), body)
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        Webhook(new_secret()).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(body.replace(b"ada", b"eve"), headers)
    with pytest.raises(WebhookVerificationError):  # the id is signed too
        Webhook(SECRET).verify(body, {**headers, "webhook-id": "evt_43"})
    # a request recorded and replayed ten minutes later: its timestamp is too old
    replayed = signer.headers("evt_42", time.time() - 600, body)
    with pytest.raises(WebhookVerificationError, match="too old"):
        Webhook(SECRET).verify(body, replayed)
    with pytest.raises(WebhookVerificationError, match="too new"):
        Webhook(SECRET).verify(body, signer.headers("evt_42", time.time() + 600, body))


def test_while_secrets_rotate_each_one_signs_and_either_verifies() -> None:
    old, new = SECRET, new_secret()
    endpoint = WebhookEndpoint.from_table(table(secret=[new, old]))
    body = payload(event())
    headers = Signer(endpoint.secrets).headers("evt_42", time.time(), body)
    assert len(headers["webhook-signature"].split(" ")) == 2
    assert Webhook(old).verify(body, headers) and Webhook(new).verify(body, headers)


# -- the retry schedule ---------------------------------------------------------------------------


def test_retries_start_within_seconds_and_back_off_to_an_hour() -> None:
    schedule = RetrySchedule()
    assert [schedule.ceiling(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]
    # a recovered endpoint gets its backlog within a minute (the contract) while the outage is
    # young: the ceiling stays at 30 s for its first 30 failures, at least 6 minutes failing
    assert all(schedule.ceiling(n) == 30 for n in range(6, 31))
    assert sum(schedule.ceiling(n) / 2 for n in range(1, 31)) > 6 * 60
    assert [schedule.ceiling(n) for n in range(31, 38)] == [60, 120, 240, 480, 960, 1920, 3600]
    assert schedule.ceiling(10_000) == 3600
    rng = random.Random(7)
    for failures in range(1, 30):
        assert 0 <= schedule.delay(failures, rng) <= schedule.ceiling(failures)
    # full jitter: spread over the whole range, not bunched at its top
    delays = [schedule.delay(40, rng) for _ in range(2000)]  # at the cap
    assert min(delays) < 360 and max(delays) > 3240
    # in expectation a short outage is found again within a minute
    assert sum(schedule.ceiling(n) / 2 for n in range(1, 7)) < 60


def test_retry_after_is_honoured_up_to_the_cap_and_410_waits_the_cap() -> None:
    schedule = RetrySchedule()
    rng = random.Random(1)
    assert schedule.delay(1, rng, retry_after=120) == 120
    assert schedule.delay(1, rng, retry_after=10 * 86400) == 3600
    assert schedule.delay(1, rng, status=410) == 3600


def test_an_endpoint_counts_as_paused_where_the_alert_fires() -> None:
    schedule = RetrySchedule()
    assert not schedule.paused(schedule.pause_after - 1) and schedule.paused(schedule.pause_after)
    [rule] = [rule for rule in load_rules() if rule.check == "webhook_failing"]
    assert rule.params["failures"] == schedule.pause_after
    assert f">= {schedule.pause_after}" in rule.expr


# -- mail first ----------------------------------------------------------------------------------


async def test_webhooks_yield_to_mail_while_it_is_delivered() -> None:
    attempts = 0

    def activity() -> int:
        return attempts

    mail_first = MailFirst(activity, share=0.2, max_lag=60.0)
    assert mail_first.busy()  # just started: mail may have a backlog to deliver
    await asyncio.sleep(MailFirst.QUIET + 0.05)
    assert not mail_first.busy()
    started = time.monotonic()
    await mail_first.turn(age=0)  # mail idle: at once
    assert time.monotonic() - started < 0.01
    attempts += 1  # a delivery attempt: mail is busy for the next half second
    assert mail_first.busy()
    for _ in range(3):
        await mail_first.turn(age=0)
        # a request may start only in the first fifth of each quarter second
        assert time.monotonic() % MailFirst.CYCLE < MailFirst.CYCLE * 0.2 + 0.02
        await asyncio.sleep(MailFirst.CYCLE * 0.3)
        attempts += 1
    # an event over a minute old goes at once, busy or not (outside the webhooks' share)
    phase = time.monotonic() % MailFirst.CYCLE
    await asyncio.sleep(max(0.0, MailFirst.CYCLE * 0.3 - phase))
    started = time.monotonic()
    await mail_first.turn(age=61)
    assert time.monotonic() - started < 0.01
    # half a second without an attempt: mail is idle again
    await asyncio.sleep(MailFirst.QUIET + 0.05)
    assert not mail_first.busy()


def test_without_an_activity_counter_webhooks_never_wait() -> None:
    assert not MailFirst(None, share=0.1, max_lag=60).busy()
