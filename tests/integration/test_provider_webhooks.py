"""Provider webhooks end to end: each provider's published payloads (tests/data/provider_webhooks),
signed the way the provider signs them with keys made here (an X.509 certificate and RSA key for
SNS, served over HTTPS by a local server; ECDSA P-256 for SendGrid; HMAC-SHA256 for Mailgun;
basic auth for Postmark), posted with httpx to the API running under uvicorn, on both stores.
A signed request changes the recipient; the same request altered, unsigned, expired or replayed
gets 401 and changes nothing.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import hmac
import json
import re
import ssl
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID
from starlette.applications import Starlette

from postlane import serve
from postlane.app import AsyncPostlane
from postlane.classify import ReplyClass
from postlane.clock import FakeClock
from postlane.feedback.providers.sns import SigningCertificates
from postlane.ingest.door import FrontDoor
from postlane.ingest.provider_webhooks import install_provider_webhooks
from postlane.message import Lane, Message, PreparedMessage, RecipientState, prepare
from postlane.metrics import Metrics
from postlane.records import AttemptRecord, Outcome
from tests.conftest import make_config
from tests.integration.test_provider_apis import serving

DATA = Path(__file__).parent.parent / "data" / "provider_webhooks"
T0 = 1_800_000_000.0
TOPIC = "arn:aws:sns:us-east-1:123456789012:postlane-feedback"
OTHER_TOPIC = "arn:aws:sns:us-east-1:123456789012:someone-else"
MAILGUN_KEY = "key-3ax6xnjp29jd6fds4gc373sgvjxteol0"
POSTMARK_USER, POSTMARK_PASSWORD = "postmark", "correct horse battery staple"
SNS_TEXT = {"content-type": "text/plain; charset=UTF-8"}
ALL_LANES = [(Lane.HIGH, 0), (Lane.NORMAL, 0), (Lane.LOW, 0)]


def sample(name: str, **values: str) -> str:
    """A sample payload with its ``{{placeholders}}`` filled in."""
    text = (DATA / name).read_text()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    assert "{{" not in text, f"{name}: a placeholder is left"
    return text


# -- SNS: a signing certificate served over HTTPS by a local server ------------------------------


@functools.cache
def sns_signing_key() -> tuple[rsa.RSAPrivateKey, bytes]:
    """An RSA key and a certificate for it, as SNS's signing certificates are (valid at T0)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns.amazonaws.com")])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.fromtimestamp(T0 - 86400, UTC))
        .not_valid_after(datetime.fromtimestamp(T0 + 365 * 86400, UTC))
        .sign(key, hashes.SHA256())
    )
    return key, certificate.public_bytes(serialization.Encoding.PEM)


@dataclass
class HTTPSPeer:
    """A local HTTPS server (a trustme CA's certificate) serving the SNS signing certificate
    and answering subscription confirmations; records each path it was asked for."""

    base: str
    ca: trustme.CA
    visits: list[str] = field(default_factory=list)

    @property
    def cert_url(self) -> str:
        return f"{self.base}/SimpleNotificationService-0123456789abcdef.pem"

    def client(self) -> httpx.AsyncClient:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return httpx.AsyncClient(verify=context, timeout=5)


@pytest.fixture
async def https_peer() -> AsyncIterator[HTTPSPeer]:
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    peer: HTTPSPeer

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1].decode()
            peer.visits.append(path)
            if path.endswith(".pem"):
                status, body = "200 OK", sns_signing_key()[1]
            elif path.startswith("/confirm"):
                status, body = "200 OK", b"<ConfirmSubscriptionResponse/>"
            else:
                status, body = "404 Not Found", b""
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    peer = HTTPSPeer(f"https://127.0.0.1:{port}", ca)
    yield peer
    server.close()
    await server.wait_closed()


#: the fields SNS signs, in order (AWS SNS Developer Guide, "Verifying the signatures of
#: Amazon SNS messages")
NOTIFICATION_SIGNED = ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type")
CONFIRMATION_SIGNED = (
    "Message",
    "MessageId",
    "SubscribeURL",
    "Timestamp",
    "Token",
    "TopicArn",
    "Type",
)


def sns_message(
    kind: str,
    message: str,
    cert_url: str,
    *,
    version: str = "1",
    topic: str = TOPIC,
    subject: str | None = None,
    subscribe_url: str | None = None,
) -> dict[str, Any]:
    """An SNS message as SNS posts it, signed with :func:`sns_signing_key`."""
    fields: dict[str, Any] = {
        "Type": kind,
        "MessageId": str(uuid.uuid4()),
        "TopicArn": topic,
        "Message": message,
        "Timestamp": "2027-01-15T08:00:00.000Z",
        "SignatureVersion": version,
        "SigningCertURL": cert_url,
    }
    if subject is not None:
        fields["Subject"] = subject
    if kind == "SubscriptionConfirmation":
        fields["Token"] = "2336412f37fb687f5d51e6e2425c464de12884"
        fields["SubscribeURL"] = subscribe_url
        names = CONFIRMATION_SIGNED
    else:
        fields["UnsubscribeURL"] = "https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe"
        names = NOTIFICATION_SIGNED
    signed = "".join(f"{name}\n{fields[name]}\n" for name in names if name in fields)
    algorithm = hashes.SHA1() if version == "1" else hashes.SHA256()
    signature = sns_signing_key()[0].sign(signed.encode(), padding.PKCS1v15(), algorithm)
    fields["Signature"] = base64.b64encode(signature).decode()
    return fields


# -- a store with a message sent to ada and bob, the API running ---------------------------------


@dataclass
class Site:
    app: AsyncPostlane
    client: httpx.AsyncClient
    metrics: Metrics
    prepared: PreparedMessage
    ids: dict[str, int]
    sendgrid_key: ec.EllipticCurvePrivateKey
    peer: HTTPSPeer
    certificates: SigningCertificates
    asgi: Starlette

    @property
    def queue_id(self) -> str:
        return self.prepared.id

    def values(self, recipient: str = "ada@example.net", **more: str) -> dict[str, str]:
        return {
            "recipient": recipient,
            "queue_id": self.queue_id,
            "message_id": self.prepared.message_id,
            "bare_message_id": self.prepared.message_id.strip("<>"),
            **more,
        }

    async def state(self, address: str) -> RecipientState:
        [ref] = await self.app.store.delivery_refs([self.ids[address]])
        return RecipientState(ref.state)

    async def states(self) -> dict[str, RecipientState]:
        return {a: await self.state(a) for a in self.ids}

    async def suppressions(self) -> set[tuple[str, str, str]]:
        listed = await self.app.store.list_suppressions(limit=100)
        return {(s.address, s.scope, s.reason) for s in listed}

    async def events(self, type: str, at_least: int = 0) -> list[Any]:
        """Events of ``type``, once there are ``at_least`` (PostgreSQL shows an event once no
        older transaction may still write one: this polls, with a deadline)."""
        deadline = time.monotonic() + 10
        while True:
            found = await self.app.store.events_after(None, limit=100, types=[type])
            if len(found) >= at_least:
                return list(found)
            assert time.monotonic() < deadline, f"{len(found)} {type} events, not {at_least}"
            await asyncio.sleep(0.02)

    async def history(self, address: str) -> list[Any]:
        view = await self.app.get(self.queue_id)
        [recipient] = [r for r in view.recipients if r.address == address]
        return list(recipient.history or ())

    async def counted(self, source: str, kind: str) -> float:
        exposition = (await self.metrics.exposition()).decode()
        found = re.search(
            rf'^postlane_feedback_total\{{source="{source}",type="{kind}"\}} (\S+)$',
            exposition,
            re.MULTILINE,
        )
        return float(found.group(1)) if found else 0.0

    async def unchanged(self) -> None:
        """Nothing a refused request could have changed did."""
        assert await self.states() == dict.fromkeys(self.ids, RecipientState.SENT)
        assert await self.suppressions() == set()
        assert await self.app.store.events_after(None, limit=10, types=["bounced"]) == []
        assert await self.app.store.events_after(None, limit=10, types=["complained"]) == []
        assert await self.app.store.list_unmatched(limit=10) == []

    # -- each provider's way of posting -------------------------------------------------------

    async def post_ses(self, message: dict[str, Any]) -> httpx.Response:
        headers = {**SNS_TEXT, "x-amz-sns-message-type": str(message["Type"])}
        return await self.client.post(
            "/v1/webhooks/ses", content=json.dumps(message), headers=headers
        )

    def sendgrid_headers(self, body: bytes, timestamp: float = T0) -> dict[str, str]:
        stamp = str(int(timestamp))
        signature = self.sendgrid_key.sign(stamp.encode() + body, ec.ECDSA(hashes.SHA256()))
        return {
            "content-type": "application/json",
            "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(signature).decode(),
            "X-Twilio-Email-Event-Webhook-Timestamp": stamp,
        }

    async def post_sendgrid(self, body: bytes, headers: dict[str, str] | None = None) -> Any:
        headers = self.sendgrid_headers(body) if headers is None else headers
        return await self.client.post("/v1/webhooks/sendgrid", content=body, headers=headers)

    async def post_postmark(self, body: str, auth: tuple[str, str] | None = None) -> Any:
        return await self.client.post(
            "/v1/webhooks/postmark",
            content=body,
            headers={"content-type": "application/json"},
            auth=auth or (POSTMARK_USER, POSTMARK_PASSWORD),
        )

    def mailgun_body(
        self,
        name: str,
        *,
        recipient: str = "ada@example.net",
        timestamp: float = T0,
        token: str | None = None,
        key: str = MAILGUN_KEY,
    ) -> str:
        stamp = str(int(timestamp))
        token = token or uuid.uuid4().hex + uuid.uuid4().hex[:18]
        signature = hmac.new(key.encode(), (stamp + token).encode(), hashlib.sha256).hexdigest()
        return sample(
            name, **self.values(recipient, timestamp=stamp, token=token, signature=signature)
        )

    async def post_mailgun(self, body: str) -> httpx.Response:
        return await self.client.post(
            "/v1/webhooks/mailgun", content=body, headers={"content-type": "application/json"}
        )


async def sent_message(store: Any, to: list[str]) -> tuple[PreparedMessage, dict[str, int]]:
    """A message from news@shop.example stored and recorded sent to each of ``to``."""
    prepared = prepare(
        Message(sender="news@shop.example", to=to, subject="Deals", text="Half price."),
        max_size=1_000_000,
    )
    await store.enqueue([prepared], T0)
    ids = {a: (await store.find_deliveries(a, queue_id=prepared.id))[0].delivery_id for a in to}
    claimed = await store.claim_due("w1", ALL_LANES, limit=100, now=T0, lease_until=T0 + 600)
    outcomes = []
    for message in claimed:
        for delivery in message.deliveries:
            attempt = AttemptRecord(
                T0 + 1, ReplyClass.DELIVERED, 250, "2.0.0", "250 ok", "sendgrid", "sendgrid", 5
            )
            outcomes.append(Outcome(delivery.id, RecipientState.SENT, 1, 0, T0, attempt))
    await store.record("w1", outcomes, T0 + 1)
    return prepared, ids


def provider_tables(sendgrid_public: str) -> dict[str, Any]:
    return {
        "ses": {"topic_arns": [TOPIC]},
        "sendgrid": {"verification_key": sendgrid_public},
        "postmark": {"username": POSTMARK_USER, "password": POSTMARK_PASSWORD},
        "mailgun": {"signing_key": MAILGUN_KEY},
    }


@pytest.fixture
async def site(store: Any, tmp_path: Path, https_peer: HTTPSPeer) -> AsyncIterator[Site]:
    sendgrid_key = ec.generate_private_key(ec.SECP256R1())
    public = sendgrid_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    config = make_config(
        tmp_path,
        webhooks=provider_tables(base64.b64encode(public).decode()),
        http={"tokens": ["api-token-that-webhooks-never-send"]},
    )
    app = AsyncPostlane(config, store=store, clock=FakeClock(T0 + 60))
    prepared, ids = await sent_message(store, ["ada@example.net", "bob@example.net"])
    metrics = Metrics(app)
    asgi = serve.build_app(FrontDoor(config, app, metrics))  # as serve mounts it
    peer_client = https_peer.client()
    certificates = SigningCertificates(
        url_allowed=lambda url: url.startswith(https_peer.base + "/"), client=peer_client
    )
    install_provider_webhooks(
        asgi.state, FrontDoor(config, app, metrics), certificates=certificates
    )
    async with serving(asgi) as base_url, httpx.AsyncClient(base_url=base_url) as client:
        yield Site(
            app, client, metrics, prepared, ids, sendgrid_key, https_peer, certificates, asgi
        )
    await peer_client.aclose()


# -- Amazon SES through SNS ----------------------------------------------------------------------


@pytest.mark.parametrize("version", ["1", "2"])
async def test_an_ses_bounce_over_sns_bounces_and_suppresses_the_recipient(
    site: Site, version: str
) -> None:
    event = sample("ses-bounce.json", **site.values())
    message = sns_message("Notification", event, site.peer.cert_url, version=version)
    answer = await site.post_ses(message)
    assert answer.status_code == 200, answer.text
    assert answer.json()["recorded"] == 1
    assert await site.states() == {
        "ada@example.net": RecipientState.BOUNCED,
        "bob@example.net": RecipientState.SENT,
    }
    assert await site.suppressions() == {("ada@example.net", "*", "hard_bounce")}
    [bounced] = await site.events("bounced", at_least=1)
    assert (bounced.recipient, bounced.queue_id, bounced.cls) == (
        "ada@example.net",
        site.queue_id,
        ReplyClass.HARD_BOUNCE,
    )
    assert (bounced.code, bounced.enhanced) == (550, "5.1.1")
    last = (await site.history("ada@example.net"))[-1]
    assert (last.relay, last.cls) == ("webhook:ses", ReplyClass.HARD_BOUNCE)
    assert await site.counted("webhook:ses", "bounced") == 1.0
    # SNS delivers at least once: the same notification again changes nothing
    again = await site.post_ses(message)
    assert (again.status_code, again.json()["duplicates"]) == (200, 1)
    assert len(await site.events("bounced")) == 1
    assert site.certificates.fetched == 1  # the certificate was kept


async def test_an_ses_complaint_suppresses_for_the_senders_domain(site: Site) -> None:
    event = sample("ses-complaint.json", **site.values("bob@example.net"))
    answer = await site.post_ses(sns_message("Notification", event, site.peer.cert_url))
    assert answer.status_code == 200, answer.text
    assert await site.state("bob@example.net") is RecipientState.COMPLAINED
    assert await site.suppressions() == {("bob@example.net", "shop.example", "complaint")}
    [complained] = await site.events("complained", at_least=1)
    assert complained.recipient == "bob@example.net"
    assert await site.counted("webhook:ses", "complained") == 1.0


async def test_an_ses_delay_is_an_event_and_a_delivery_history_only(site: Site) -> None:
    delay = sample("ses-delivery-delay.json", **site.values())
    assert (await site.post_ses(sns_message("Notification", delay, site.peer.cert_url))).is_success
    [deferred] = await site.events("deferred", at_least=1)
    assert (deferred.recipient, deferred.enhanced) == ("ada@example.net", "4.4.1")
    # an identity notification carries no tags: matched by the Message-ID header
    delivery = sample("ses-delivery.json", **site.values("bob@example.net"))
    answer = await site.post_ses(sns_message("Notification", delivery, site.peer.cert_url))
    assert answer.json()["recorded"] == 1
    assert await site.states() == dict.fromkeys(site.ids, RecipientState.SENT)
    assert await site.suppressions() == set()
    last = (await site.history("bob@example.net"))[-1]
    assert (last.relay, last.cls, last.code) == ("webhook:ses", ReplyClass.DELIVERED, 250)
    assert await site.counted("webhook:ses", "delivered") == 1.0


async def test_sns_messages_that_do_not_verify_are_refused_and_change_nothing(
    site: Site, tmp_path: Path
) -> None:
    event = sample("ses-bounce.json", **site.values())
    good = sns_message("Notification", event, site.peer.cert_url)
    altered = {**good, "Message": good["Message"].replace("ada@", "bob@")}
    unsigned = {k: v for k, v in good.items() if k != "Signature"}
    other_topic = sns_message("Notification", event, site.peer.cert_url, topic=OTHER_TOPIC)
    unknown_version = {**good, "SignatureVersion": "3"}
    off_host = sns_message(
        "Notification", event, "https://sns.us-east-1.amazonaws.com.evil.example/x.pem"
    )
    plain_http = sns_message("Notification", event, site.peer.cert_url.replace("https", "http"))
    for message in (altered, unsigned, other_topic, unknown_version, off_host, plain_http):
        answer = await site.post_ses(message)
        assert answer.status_code == 401, (message, answer.text)
        assert answer.json()["error"]["code"] == "unauthorized"
    await site.unchanged()
    # only the allowed certificate URL was fetched, once (then kept)
    assert site.peer.visits == ["/SimpleNotificationService-0123456789abcdef.pem"]


async def test_by_default_only_amazons_sns_hosts_are_trusted(site: Site) -> None:
    """With the certificates a real deployment uses, a local certificate URL is refused
    before anything is fetched."""
    install_provider_webhooks(site.asgi.state, FrontDoor(site.app.config, site.app, site.metrics))
    event = sample("ses-bounce.json", **site.values())
    answer = await site.post_ses(sns_message("Notification", event, site.peer.cert_url))
    assert answer.status_code == 401
    assert "not Amazon SNS's" in answer.json()["error"]["message"]
    assert site.peer.visits == []
    await site.unchanged()


async def test_a_subscription_confirmation_visits_the_subscribe_url(site: Site) -> None:
    url = f"{site.peer.base}/confirm?Action=ConfirmSubscription&TopicArn={TOPIC}&Token=2336"
    confirmation = sns_message(
        "SubscriptionConfirmation",
        f"You have chosen to subscribe to the topic {TOPIC}.",
        site.peer.cert_url,
        subscribe_url=url,
    )
    answer = await site.post_ses(confirmation)
    assert answer.status_code == 200, answer.text
    assert site.peer.visits[-1] == url.removeprefix(site.peer.base)
    # another topic's confirmation, or one pointing elsewhere, is refused and not visited
    visits = len(site.peer.visits)
    for refused in (
        sns_message(
            "SubscriptionConfirmation",
            "x",
            site.peer.cert_url,
            topic=OTHER_TOPIC,
            subscribe_url=url,
        ),
        sns_message(
            "SubscriptionConfirmation",
            "x",
            site.peer.cert_url,
            subscribe_url="https://attacker.example/confirm",
        ),
    ):
        assert (await site.post_ses(refused)).status_code == 401
    assert all(v.endswith(".pem") for v in site.peer.visits[visits:])


async def test_sess_own_test_notification_is_taken_and_ignored(site: Site) -> None:
    text = "Successfully validated SNS topic for Amazon SES event publishing."
    answer = await site.post_ses(sns_message("Notification", text, site.peer.cert_url))
    assert (answer.status_code, answer.json()["received"]) == (200, 0)
    await site.unchanged()


# -- SendGrid --------------------------------------------------------------------------------


async def test_signed_sendgrid_events_bounce_defer_and_ignore_the_rest(site: Site) -> None:
    body = sample("sendgrid-events.json", **site.values()).encode()
    answer = await site.post_sendgrid(body)
    assert answer.status_code == 200, answer.text
    # processed and open are not taken; deferred and bounce are
    assert answer.json() == {
        "received": 2,
        "recorded": 2,
        "duplicates": 0,
        "unmatched": 0,
        "ignored": 0,
    }
    assert await site.state("ada@example.net") is RecipientState.BOUNCED
    [deferred] = await site.events("deferred", at_least=1)
    assert deferred.recipient == "ada@example.net"
    [bounced] = await site.events("bounced", at_least=1)
    assert bounced.cls is ReplyClass.HARD_BOUNCE
    assert await site.suppressions() == {("ada@example.net", "*", "hard_bounce")}
    assert await site.counted("webhook:sendgrid", "bounced") == 1.0

    spam = sample("sendgrid-spamreport.json", **site.values("bob@example.net")).encode()
    assert (await site.post_sendgrid(spam)).status_code == 200
    assert await site.state("bob@example.net") is RecipientState.COMPLAINED
    assert ("bob@example.net", "shop.example", "complaint") in await site.suppressions()


def sendgrid_event(site: Site, event: str, event_id: str, **more: Any) -> dict[str, Any]:
    """One item of SendGrid's array about ada's copy of the site's message."""
    return {
        "email": "ada@example.net",
        "timestamp": int(T0),
        "smtp-id": site.prepared.message_id,
        "event": event,
        "sg_event_id": event_id,
        "postlane_queue_id": site.queue_id,
        **more,
    }


async def test_a_provider_sending_its_events_again_changes_nothing(site: Site) -> None:
    """An outside audit: SendGrid (and Postmark) deliver events at least once, and a batch
    sent again added a second ``deferred`` event (and outbound webhook) and a second history
    entry for each delay and delivery: only bounces and complaints were repeats. An event is
    now a repeat by its id (``sg_event_id``); another delay, with an id of its own, is news."""
    delay = sendgrid_event(site, "deferred", "dly-1", response="451 4.7.1 greylisted")
    delivered = sendgrid_event(site, "delivered", "dlv-1", response="250 2.0.0 OK")
    delivered["email"] = "bob@example.net"
    body = json.dumps([delay, delivered]).encode()
    first = (await site.post_sendgrid(body)).json()
    assert (first["recorded"], first["duplicates"]) == (2, 0)
    again = (await site.post_sendgrid(body)).json()
    assert (again["recorded"], again["duplicates"]) == (0, 2)
    assert len(await site.events("deferred", at_least=1)) == 1
    assert [h.relay for h in await site.history("ada@example.net")].count("webhook:sendgrid") == 1
    assert [h.relay for h in await site.history("bob@example.net")].count("webhook:sendgrid") == 1
    later = sendgrid_event(site, "deferred", "dly-2", response="451 4.7.1 greylisted")
    assert (await site.post_sendgrid(json.dumps([later]).encode())).json()["recorded"] == 1
    assert len(await site.events("deferred", at_least=2)) == 2

    postmark = sample("postmark-delivery.json", **site.values("bob@example.net"))
    assert (await site.post_postmark(postmark)).json()["recorded"] == 1
    assert (await site.post_postmark(postmark)).json()["duplicates"] == 1
    assert [h.relay for h in await site.history("bob@example.net")].count("webhook:postmark") == 1


async def test_a_delay_heard_after_the_bounce_is_history_not_news(site: Site) -> None:
    """An outside audit: reports come out of order (a provider's batch, a late DSN), and a
    delay heard after the recipient bounced told the application, in a ``deferred`` event,
    that it was still being tried after it was told it failed. The delay is kept in the
    recipient's history; no event; the recipient stays bounced."""
    bounce = sendgrid_event(site, "bounce", "bnc-1", reason="550 5.1.1 no such user")
    bounce.update(status="5.1.1", type="bounce")
    delay = sendgrid_event(site, "deferred", "dly-9", response="451 4.7.1 greylisted")
    answer = await site.post_sendgrid(json.dumps([bounce, delay]).encode())
    assert answer.json()["recorded"] == 2
    assert await site.state("ada@example.net") is RecipientState.BOUNCED
    await site.events("bounced", at_least=1)
    assert await site.app.store.events_after(None, limit=10, types=["deferred"]) == []
    assert "greylisted" in (await site.history("ada@example.net"))[-1].text


async def test_an_event_whose_message_id_names_two_messages_is_kept_not_applied(
    site: Site,
) -> None:
    """An outside audit: an application sent the same raw message (one Message-ID) twice to
    ada; one SendGrid bounce matched by that Message-ID alone bounced both. Which message
    the event is about cannot be told: it is kept for review, and both stay sent."""
    twice = "<order-8812@shop.example>"
    store = site.app.store
    copies = []
    for _ in range(2):
        raw = (
            f"From: news@shop.example\r\nTo: ada@example.net\r\nMessage-ID: {twice}\r\n"
            "Subject: Order\r\n\r\nYour order.\r\n"
        )
        prepared = prepare(Message(sender="news@shop.example", raw=raw), max_size=1_000_000)
        await store.enqueue([prepared], T0)
        copies.append(prepared.id)
    claimed = await store.claim_due("w1", ALL_LANES, limit=100, now=T0, lease_until=T0 + 600)
    attempt = AttemptRecord(
        T0 + 1, ReplyClass.DELIVERED, 250, "2.0.0", "250 ok", "sendgrid", "sendgrid", 5
    )
    await store.record(
        "w1",
        [
            Outcome(d.id, RecipientState.SENT, 1, 0, T0, attempt)
            for m in claimed
            for d in m.deliveries
        ],
        T0 + 1,
    )
    bounce = sendgrid_event(site, "bounce", "bnc-2", reason="550 5.1.1 no such user")
    bounce.update({"smtp-id": twice, "status": "5.1.1", "type": "bounce"})
    del bounce["postlane_queue_id"]
    answer = (await site.post_sendgrid(json.dumps([bounce]).encode())).json()
    assert (answer["recorded"], answer["unmatched"]) == (0, 1)
    for queue_id in copies:
        [ref] = await store.find_deliveries("ada@example.net", queue_id=queue_id)
        assert ref.state is RecipientState.SENT
    [kept] = await store.list_unmatched(limit=10)
    assert twice in kept.reason and "names 2 messages" in kept.reason
    assert await site.suppressions() == set()


async def test_sendgrid_requests_altered_unsigned_or_expired_are_refused(site: Site) -> None:
    body = sample("sendgrid-events.json", **site.values()).encode()
    headers = site.sendgrid_headers(body)
    other_key = ec.generate_private_key(ec.SECP256R1())
    forged = site.sendgrid_headers(body)
    stamp = forged["X-Twilio-Email-Event-Webhook-Timestamp"]
    forged["X-Twilio-Email-Event-Webhook-Signature"] = base64.b64encode(
        other_key.sign(stamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    ).decode()
    cases = [
        (body.replace(b"ada@", b"bob@"), headers),  # altered
        (body, {"content-type": "application/json"}),  # unsigned
        (body, forged),  # signed with another key
        (body, site.sendgrid_headers(body, timestamp=T0 - 3600)),  # an hour old
        (body, {**headers, "X-Twilio-Email-Event-Webhook-Timestamp": str(int(T0) + 1)}),
    ]
    for content, sent_headers in cases:
        answer = await site.post_sendgrid(content, sent_headers)
        assert answer.status_code == 401, answer.text
        assert answer.json()["error"]["code"] == "unauthorized"
    await site.unchanged()
    assert await site.app.store.events_after(None, limit=10, types=["deferred"]) == []


# -- Postmark --------------------------------------------------------------------------------


async def test_postmark_bounce_complaint_and_delivery(site: Site) -> None:
    bounce = await site.post_postmark(sample("postmark-bounce.json", **site.values()))
    assert bounce.status_code == 200, bounce.text
    assert await site.state("ada@example.net") is RecipientState.BOUNCED
    complaint = sample("postmark-spam-complaint.json", **site.values("bob@example.net"))
    assert (await site.post_postmark(complaint)).status_code == 200
    assert await site.state("bob@example.net") is RecipientState.COMPLAINED
    assert await site.suppressions() == {
        ("ada@example.net", "*", "hard_bounce"),
        ("bob@example.net", "shop.example", "complaint"),
    }
    delivery = sample("postmark-delivery.json", **site.values("bob@example.net"))
    assert (await site.post_postmark(delivery)).json()["recorded"] == 1
    assert (await site.history("bob@example.net"))[-1].relay == "webhook:postmark"
    assert await site.counted("webhook:postmark", "complained") == 1.0


async def test_postmark_without_the_right_credentials_is_refused(site: Site) -> None:
    body = sample("postmark-bounce.json", **site.values())
    for auth in ((POSTMARK_USER, "wrong"), ("someone", POSTMARK_PASSWORD), ("", "")):
        answer = await site.post_postmark(body, auth)
        assert answer.status_code == 401
        assert answer.headers["www-authenticate"].startswith("Basic")
    bare = await site.client.post(
        "/v1/webhooks/postmark", content=body, headers={"content-type": "application/json"}
    )
    assert bare.status_code == 401
    bearer = await site.client.post(
        "/v1/webhooks/postmark",
        content=body,
        headers={"authorization": "Bearer api-token-that-webhooks-never-send"},
    )
    assert bearer.status_code == 401  # the API's token is no proof here
    await site.unchanged()


async def test_guessing_postmarks_password_is_slowed_and_logged_once_a_minute(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    """The API's wrong-token rule at the webhook door: five free tries, then 429 with
    Retry-After before the next is even looked at; one log line, not one per guess."""
    body = sample("postmark-bounce.json", **site.values())
    caplog.set_level("WARNING", logger="postlane")
    answers = [await site.post_postmark(body, (POSTMARK_USER, f"guess-{i}")) for i in range(30)]
    assert [a.status_code for a in answers[:5]] == [401] * 5
    assert {a.status_code for a in answers[6:]} == {429}
    assert int(answers[-1].headers["retry-after"]) >= 1
    assert answers[-1].json()["error"]["code"] == "too_many_attempts"
    right = await site.post_postmark(body)  # the right password, from the same client, waits
    assert right.status_code == 429
    await site.unchanged()
    site.asgi.state.provider_webhooks.refusals.flush()
    lines = [m for r in caplog.records if "provider webhooks refused" in (m := r.getMessage())]
    assert 1 <= len(lines) <= 2  # the first refusal at once, the rest in the minute's line
    assert "postmark" in lines[-1] and "wrong basic auth credentials" in lines[-1]
    assert all("guess-" not in r.getMessage() for r in caplog.records)


# -- Mailgun ---------------------------------------------------------------------------------


async def test_mailgun_signed_failure_and_complaint(site: Site) -> None:
    failed = await site.post_mailgun(site.mailgun_body("mailgun-failed-permanent.json"))
    assert failed.status_code == 200, failed.text
    assert await site.state("ada@example.net") is RecipientState.BOUNCED
    complained = site.mailgun_body("mailgun-complained.json", recipient="bob@example.net")
    assert (await site.post_mailgun(complained)).status_code == 200
    assert await site.state("bob@example.net") is RecipientState.COMPLAINED
    assert await site.suppressions() == {
        ("ada@example.net", "*", "hard_bounce"),
        ("bob@example.net", "shop.example", "complaint"),
    }
    assert await site.counted("webhook:mailgun", "bounced") == 1.0


async def test_mailgun_requests_altered_expired_or_replayed_are_refused(site: Site) -> None:
    body = site.mailgun_body("mailgun-failed-permanent.json")
    # Mailgun signs the timestamp and the token (not the event): altering either breaks it
    cases = [
        re.sub(r'"token": "(\w+)"', r'"token": "\g<1>0"', body),
        re.sub(r'"timestamp": "(\d+)"', lambda m: f'"timestamp": "{int(m[1]) - 1}"', body),
        site.mailgun_body("mailgun-failed-permanent.json", key="key-of-someone-else"),
        site.mailgun_body("mailgun-failed-permanent.json", timestamp=T0 - 3600),
        re.sub(r'"signature": \{[^}]*\},', "", body),  # unsigned
    ]
    for content in cases:
        answer = await site.post_mailgun(content)
        assert answer.status_code == 401, answer.text
    await site.unchanged()
    # the signed request is taken once; its replay is refused
    assert (await site.post_mailgun(body)).status_code == 200
    replay = await site.post_mailgun(body)
    assert replay.status_code == 401
    assert "replay" in replay.json()["error"]["message"]
    assert len(await site.events("bounced", at_least=1)) == 1


# -- what every endpoint shares --------------------------------------------------------------


async def test_an_event_about_an_unknown_message_is_kept_unmatched_and_answered_200(
    site: Site,
) -> None:
    values = site.values(queue_id="0000000000000000unknown", message_id="<nobody@x.example>")
    body = sample("sendgrid-events.json", **values).encode()
    answer = await site.post_sendgrid(body)
    assert answer.status_code == 200
    assert answer.json()["unmatched"] == 2
    listed = await site.app.store.list_unmatched(limit=10)
    assert {(u.source, u.kind, u.rcpt_to) for u in listed} == {
        ("webhook:sendgrid", "event", "ada@example.net")
    }
    assert all("no delivery matches ada@example.net" in u.reason for u in listed)
    kept = await site.app.store.get_unmatched(listed[0].id)
    assert json.loads(kept.content or b"")["postlane_queue_id"] == "0000000000000000unknown"
    assert await site.states() == dict.fromkeys(site.ids, RecipientState.SENT)


async def test_malformed_bodies_get_400_json(site: Site) -> None:
    not_json = b"{not json"
    answers = [
        await site.client.post("/v1/webhooks/ses", content=not_json, headers=SNS_TEXT),
        await site.post_sendgrid(not_json),  # signed, but not JSON
        await site.post_sendgrid(b'{"event": "bounce"}'),  # signed JSON, not an array
        await site.post_postmark(not_json.decode()),
        await site.post_mailgun(not_json.decode()),
    ]
    for answer in answers:
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["code"] == "invalid_json"
    await site.unchanged()


async def test_a_body_over_the_limit_is_refused(site: Site) -> None:
    answer = await site.post_postmark("[" + " " * (5 * 1024 * 1024) + "]")
    assert answer.status_code == 413
    assert answer.json()["error"]["code"]


async def test_an_unconfigured_provider_cannot_verify_anything_401(tmp_path: Path) -> None:
    """Without its table nothing can verify the provider's proof: 401, as for a wrong one
    (the contract: an unverifiable request gets 401 and changes nothing), naming the table."""
    from postlane.store.sqlite import SQLiteStore

    config = make_config(tmp_path, webhooks={"mailgun": {"signing_key": MAILGUN_KEY}})
    store = SQLiteStore(tmp_path / "s.db")
    await store.open()
    try:
        app = AsyncPostlane(config, store=store, clock=FakeClock(T0))
        asgi = serve.build_app(FrontDoor(config, app))
        async with serving(asgi) as base_url, httpx.AsyncClient(base_url=base_url) as client:
            for provider in ("ses", "sendgrid", "postmark"):
                answer = await client.post(f"/v1/webhooks/{provider}", content=b"[]")
                assert answer.status_code == 401
                assert answer.json()["error"]["code"] == "unauthorized"
                assert (
                    f"[webhooks.{provider}] is not configured" in answer.json()["error"]["message"]
                )
            assert (await client.post("/v1/webhooks/mailgun", content=b"{}")).status_code == 401
    finally:
        await store.close()


async def test_an_event_about_a_delivery_being_sent_is_retried_and_one_never_sent_is_kept(
    site: Site,
) -> None:
    site.asgi.state.provider_webhooks.recorder.in_flight_wait = 0.2
    store = site.app.store
    prepared = prepare(
        Message(sender="news@shop.example", to=["cy@example.net"], subject="S", text="T"),
        max_size=1_000_000,
    )
    await store.enqueue([prepared], T0)
    values = {**site.values("cy@example.net"), "queue_id": prepared.id}
    body = sample("postmark-bounce.json", **values)
    # still queued: never sent, so the bounce cannot apply; kept for review
    kept = await site.post_postmark(body)
    assert (kept.status_code, kept.json()["unmatched"]) == (200, 1)
    [report] = await store.list_unmatched(limit=10)
    assert "never sent" in report.reason
    # being sent (claimed by a worker): the provider is asked to send it again
    [claimed] = await store.claim_due("w1", ALL_LANES, limit=10, now=T0, lease_until=T0 + 600)
    retry = await site.post_postmark(body)
    assert retry.status_code == 503
    assert retry.headers["retry-after"]
    assert len(await store.list_unmatched(limit=10)) == 1  # nothing more kept
    # once the worker has recorded it sent, the provider's retry bounces it
    [delivery] = claimed.deliveries
    attempt = AttemptRecord(
        T0 + 1, ReplyClass.DELIVERED, 250, "2.0.0", "250 ok", "postmark", "postmark", 5
    )
    await store.record("w1", [Outcome(delivery.id, RecipientState.SENT, 1, 0, T0, attempt)], T0 + 1)
    assert (await site.post_postmark(body)).json()["recorded"] == 1
    [ref] = await store.find_deliveries("cy@example.net", queue_id=prepared.id)
    assert ref.state is RecipientState.BOUNCED
