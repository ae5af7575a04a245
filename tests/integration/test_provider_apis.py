"""The provider API transports against local HTTP servers that speak each provider's API.

Each fake (a Starlette app served by uvicorn on a free port) checks what a real provider would:
the path, the credentials, the shape of the JSON or multipart body, and for SES the Signature
Version 4 ``Authorization`` header, recomputed here with the same secret by code independent of
the transport's. It answers like the provider: 2xx by default, the provider's documented error
for recipients whose address starts with "bad", and whatever a test scripts next.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import SMTP
from email.policy import default as default_policy
from email.utils import format_datetime, getaddresses
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import pytest_asyncio
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.responses import Response as HTTPResponse
from starlette.routing import Route

from postlane.classify import ReplyClass
from postlane.clock import FakeClock
from postlane.errors import ConfigError
from postlane.transports.base import Envelope, Response
from postlane.transports.http_api import ProviderTransport, parse_retry_after
from postlane.transports.mailgun import MailgunTransport
from postlane.transports.postmark import PostmarkTransport
from postlane.transports.sendgrid import SendGridTransport
from postlane.transports.ses import SESTransport, sigv4_headers

SENDGRID_KEY = "SG.test-key.secret"
POSTMARK_TOKEN = "pm-server-token-0001"
MAILGUN_KEY = "key-mailgun-secret"
AWS_KEY = "AKIDEXAMPLE"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
SECRETS = (SENDGRID_KEY, POSTMARK_TOKEN, MAILGUN_KEY, AWS_SECRET)

# every test shares the module's event loop, where the fake providers serve (all tests are async)
pytestmark = pytest.mark.asyncio(loop_scope="module")


# -- a local HTTP server -----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def serving(app: Starlette) -> AsyncIterator[str]:
    """Serve ``app`` on 127.0.0.1 until the block ends; yields its base URL. The socket listens
    before uvicorn starts, so the first request simply waits in the backlog: no start-up race."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    sock.setblocking(False)
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, log_config=None, access_log=False, lifespan="off", http="h11", ws="none"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


@dataclass
class Reply:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)

    def http(self) -> HTTPResponse:
        if isinstance(self.body, str):
            return PlainTextResponse(self.body, self.status, self.headers)
        if self.body is None:
            return HTTPResponse(b"", self.status, self.headers)
        return JSONResponse(self.body, self.status, self.headers)


@dataclass
class Seen:
    """One request as the fake provider received it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    recipients: list[str] = field(default_factory=list)
    json: Any = None
    form: dict[str, list[str]] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    #: the status the fake answered with
    status: int = 0


Check = Callable[[Seen], Reply]


@dataclass
class FakeAPI:
    """A provider's API: ``check`` validates a request (assertions) and gives the default reply;
    ``scripted`` replies, if any, are given instead, in order."""

    check: Check
    url: str = ""
    seen: list[Seen] = field(default_factory=list)
    scripted: list[Reply] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    async def endpoint(self, request: Request) -> HTTPResponse:
        body = await request.body()
        seen = Seen(
            request.method,
            request.url.path,
            {k.lower(): v for k, v in request.headers.items()},
            body,
        )
        self.seen.append(seen)
        try:
            reply = self.check(seen)
        except Exception as exc:  # the transport sent something a provider would refuse
            self.problems.append(f"{seen.path}: {type(exc).__name__}: {exc}")
            return JSONResponse({"problem": str(exc)}, 418)
        if self.scripted:
            reply = self.scripted.pop(0)
        seen.status = reply.status
        return reply.http()

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/{path:path}", self.endpoint, methods=["POST", "GET"])])


# -- what each provider checks and answers -----------------------------------------------------


def check_sendgrid(seen: Seen) -> Reply:
    assert seen.path == "/v3/mail/send", seen.path
    assert seen.headers.get("authorization") == f"Bearer {SENDGRID_KEY}", "bad Authorization"
    assert seen.headers.get("content-type") == "application/json"
    data = seen.json = json.loads(seen.body)
    assert data["from"]["email"] == "app@sender.test"
    assert data["subject"] == "Your receipt"
    kinds = [c["type"] for c in data["content"]]
    assert kinds and kinds[0] == "text/plain", "text/plain must come first"
    assert data["custom_args"]["postlane_queue_id"] == "q1"
    assert data["headers"]["Message-ID"] == "<m1@sender.test>"
    assert not {"To", "From", "Subject", "Content-Type"} & set(data["headers"])
    errors = []
    for i, personalization in enumerate(data["personalizations"]):
        assert personalization["to"], "each personalization needs a to"
        for kind in ("to", "cc", "bcc"):
            for j, mailbox in enumerate(personalization.get(kind, [])):
                seen.recipients.append(mailbox["email"])
                if mailbox["email"].startswith("bad"):
                    errors.append(
                        {
                            "message": "Does not contain a valid address.",
                            "field": f"personalizations.{i}.{kind}.{j}.email",
                            "help": "http://sendgrid.com/docs/API_Reference/...",
                        }
                    )
    assert len(set(seen.recipients)) == len(seen.recipients), "duplicate recipients"
    if errors:
        return Reply(400, {"errors": errors})
    return Reply(202, None, {"X-Message-Id": "sg-" + uuid.uuid4().hex[:12]})


def check_postmark(seen: Seen) -> Reply:
    assert seen.path == "/email", seen.path
    assert seen.headers.get("x-postmark-server-token") == POSTMARK_TOKEN, "bad token"
    assert seen.headers.get("accept") == "application/json"
    data = seen.json = json.loads(seen.body)
    assert data["From"] == "Shop <app@sender.test>"
    assert data["Subject"] == "Your receipt"
    assert data.get("TextBody") or data.get("HtmlBody"), "a body is required"
    assert data["Metadata"]["postlane_queue_id"] == "q1"
    assert {"Name": "Message-ID", "Value": "<m1@sender.test>"} in data["Headers"]
    assert data["To"], "To is required"
    for name in ("To", "Cc", "Bcc"):
        seen.recipients += [a for _, a in getaddresses([data.get(name, "")]) if a]
    assert len(seen.recipients) <= 50, "at most 50 recipients"
    if any(r.startswith("invalid") for r in seen.recipients):
        return Reply(422, {"ErrorCode": 300, "Message": "Invalid 'To' address: 'x@'."})
    inactive = [r for r in seen.recipients if r.startswith("bad")]
    if inactive:
        return Reply(
            422,
            {
                "ErrorCode": 406,
                "Message": "You tried to send to recipient(s) that have been marked as "
                f"inactive. Found inactive addresses: {', '.join(inactive)}. Inactive "
                "recipients are ones that have generated a hard bounce, a spam complaint, "
                "or a manual suppression.",
            },
        )
    return Reply(
        200,
        {
            "To": data["To"],
            "SubmittedAt": "2026-01-01T00:00:00.0000000-05:00",
            "MessageID": str(uuid.uuid4()),
            "ErrorCode": 0,
            "Message": "OK",
        },
    )


def check_mailgun(seen: Seen) -> Reply:
    assert seen.path == "/v3/mg.example.test/messages.mime", seen.path
    expected = "Basic " + base64.b64encode(f"api:{MAILGUN_KEY}".encode()).decode()
    assert seen.headers.get("authorization") == expected, "bad Authorization"
    content_type = seen.headers.get("content-type", "")
    assert content_type.startswith("multipart/form-data; boundary="), content_type
    boundary = content_type.split("boundary=", 1)[1].strip('"').encode()
    for chunk in seen.body.split(b"--" + boundary)[1:-1]:
        head, _, payload = chunk.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        part = BytesParser(policy=default_policy).parsebytes(head + b"\r\n\r\n")
        name = part.get_param("name", header="content-disposition")
        assert isinstance(name, str), head
        payload = payload.removesuffix(b"\r\n")
        if part.get_filename():
            seen.files[name] = payload
        else:
            seen.form.setdefault(name, []).append(payload.decode())
    assert seen.files.get("message") == CONTENT, "the message must be the stored MIME, as is"
    assert seen.form["v:postlane-queue-id"] == ["q1"]
    seen.recipients = [a for _, a in getaddresses(seen.form.get("to", []))]
    assert seen.recipients, "'to' is required"
    if any(r.startswith("bad") for r in seen.recipients):
        return Reply(
            400, {"message": "'to' parameter is not a valid address. please check documentation"}
        )
    return Reply(
        200, {"id": f"<{uuid.uuid4().hex}@mg.example.test>", "message": "Queued. Thank you."}
    )


def verify_sigv4(seen: Seen, secret: str) -> None:
    """Recompute the request's Signature Version 4 as AWS would, from what was received."""
    authorization = seen.headers.get("authorization", "")
    algorithm, _, rest = authorization.partition(" ")
    assert algorithm == "AWS4-HMAC-SHA256", "not a SigV4 Authorization header"
    parts = dict(item.strip().split("=", 1) for item in rest.split(","))
    credential = parts["Credential"].split("/")
    assert len(credential) == 5 and credential[4] == "aws4_request", parts["Credential"]
    _key_id, date, region, service, _ = credential
    assert (region, service) == ("us-east-1", "ses"), credential
    amz_date = seen.headers["x-amz-date"]
    assert amz_date.startswith(date)
    names = parts["SignedHeaders"].split(";")
    assert {"host", "x-amz-date", "content-type"} <= set(names), names
    canonical = "\n".join(
        [
            seen.method,
            quote(seen.path),
            "",
            "".join(f"{n}:{' '.join(seen.headers[n].split())}\n" for n in names),
            ";".join(names),
            hashlib.sha256(seen.body).hexdigest(),
        ]
    )
    scope = "/".join(credential[1:])
    to_sign = (
        f"AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
    )
    key = f"AWS4{secret}".encode()
    for piece in credential[1:]:
        key = hmac.new(key, piece.encode(), hashlib.sha256).digest()
    expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    assert hmac.compare_digest(parts["Signature"], expected), "signature does not match"


def check_ses(seen: Seen) -> Reply:
    assert seen.path == "/v2/email/outbound-emails", seen.path
    verify_sigv4(seen, AWS_SECRET)
    data = seen.json = json.loads(seen.body)
    assert base64.b64decode(data["Content"]["Raw"]["Data"]) == CONTENT
    assert {"Name": "postlane_queue_id", "Value": "q1"} in data["EmailTags"]
    seen.recipients = data["Destination"]["ToAddresses"]
    unverified = [r for r in seen.recipients if r.startswith("bad")]
    if unverified:
        return Reply(
            400,
            {
                "message": "Email address is not verified. The following identities failed "
                f"the check in region US-EAST-1: {', '.join(unverified)}"
            },
            {
                "x-amzn-ErrorType": "MessageRejected:http://internal.amazon.com/coral/com.amazon.ses/"
            },
        )
    return Reply(200, {"MessageId": "0100018-" + uuid.uuid4().hex})


# -- the providers, as the parametrised tests see them -------------------------------------------


@dataclass
class Provider:
    name: str
    check: Check
    make: Callable[[str], ProviderTransport]
    #: the class a recipient the provider refuses ("bad...") gets
    bad_recipient: ReplyClass
    unauthorized: Reply
    content_error: Reply
    throttled: Reply


PROVIDERS = [
    Provider(
        "sendgrid",
        check_sendgrid,
        lambda url: SendGridTransport(SENDGRID_KEY, base_url=url, timeout=5),
        ReplyClass.HARD_BOUNCE,
        Reply(
            401,
            {
                "errors": [
                    {
                        "message": "The provided authorization grant is invalid, expired, "
                        "or revoked",
                        "field": None,
                    }
                ]
            },
        ),
        Reply(
            400,
            {
                "errors": [
                    {
                        "message": "The content value must be a string at least one "
                        "character in length.",
                        "field": "content.0.value",
                    }
                ]
            },
        ),
        Reply(429, {"errors": [{"message": "too many requests"}]}, {"Retry-After": "7"}),
    ),
    Provider(
        "postmark",
        check_postmark,
        lambda url: PostmarkTransport(POSTMARK_TOKEN, base_url=url, timeout=5),
        ReplyClass.HARD_BOUNCE,
        Reply(401, {"ErrorCode": 10, "Message": "Bad or missing Server API token."}),
        Reply(
            422, {"ErrorCode": 300, "Message": "Provide either email TextBody or HtmlBody or both."}
        ),
        Reply(429, {"ErrorCode": 429, "Message": "Rate limit exceeded."}, {"Retry-After": "7"}),
    ),
    Provider(
        "mailgun",
        check_mailgun,
        lambda url: MailgunTransport(MAILGUN_KEY, "mg.example.test", base_url=url, timeout=5),
        ReplyClass.HARD_BOUNCE,
        Reply(401, "Forbidden"),
        Reply(413, {"message": "Request Entity Too Large"}),
        Reply(429, {"message": "Too many requests"}, {"Retry-After": "7"}),
    ),
    Provider(
        "ses",
        check_ses,
        lambda url: SESTransport(AWS_KEY, AWS_SECRET, "us-east-1", base_url=url, timeout=5),
        ReplyClass.POLICY_BLOCK,  # an unverified recipient in the sandbox: never suppressed
        Reply(
            403,
            {"message": "The security token included in the request is invalid."},
            {"x-amzn-ErrorType": "UnrecognizedClientException"},
        ),
        Reply(
            400,
            {"message": "Transaction failed: Illegal header."},
            {"x-amzn-ErrorType": "MessageRejected"},
        ),
        Reply(
            429,
            {"message": "Maximum sending rate exceeded."},
            {"x-amzn-ErrorType": "TooManyRequestsException", "Retry-After": "7"},
        ),
    ),
]


def _message() -> bytes:
    message = EmailMessage()
    message["From"] = "Shop <app@sender.test>"
    message["To"] = "Ann <ann@example.org>, bad@example.org"
    message["Cc"] = "carl@example.org"
    message["Subject"] = "Your receipt"
    message["Message-ID"] = "<m1@sender.test>"
    message["Date"] = format_datetime(datetime(2026, 1, 1, tzinfo=UTC))
    message["List-Unsubscribe"] = "<mailto:unsubscribe@sender.test>"
    message.set_content("Thank you for your order.\n")
    message.add_alternative("<p>Thank you for your order.</p>\n", subtype="html")
    message.add_attachment(
        b"%PDF-1.4 receipt", maintype="application", subtype="pdf", filename="receipt.pdf"
    )
    return message.as_bytes(policy=SMTP)


CONTENT = _message()


def envelope(*recipients: str, key: str | None = "order-1234") -> Envelope:
    return Envelope(
        queue_id="q1",
        sender="app@sender.test",
        recipients=recipients,
        content=CONTENT,
        message_id="<m1@sender.test>",
        idempotency_key=key,
    )


def classes(responses: list[Response]) -> list[ReplyClass]:
    return [response.verdict().cls for response in responses]


@dataclass
class Harness:
    provider: Provider
    api: FakeAPI
    transport: ProviderTransport


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fakes() -> AsyncIterator[dict[str, FakeAPI]]:
    """One fake per provider, serving for the whole module (a server start and stop costs
    about 0.2 s); each test starts from a clean one (:func:`apis`)."""
    apis = {provider.name: FakeAPI(provider.check) for provider in PROVIDERS}
    async with contextlib.AsyncExitStack() as stack:
        for api in apis.values():
            api.url = await stack.enter_async_context(serving(api.app()))
        yield apis


@pytest_asyncio.fixture(loop_scope="module")
async def apis(fakes: dict[str, FakeAPI]) -> AsyncIterator[dict[str, FakeAPI]]:
    for api in fakes.values():
        api.seen.clear()
        api.scripted.clear()
        api.problems.clear()
    yield fakes
    for api in fakes.values():
        assert api.problems == []


@pytest_asyncio.fixture(params=PROVIDERS, ids=[p.name for p in PROVIDERS], loop_scope="module")
async def h(request: pytest.FixtureRequest, apis: dict[str, FakeAPI]) -> AsyncIterator[Harness]:
    provider: Provider = request.param
    api = apis[provider.name]
    transport = provider.make(api.url)
    yield Harness(provider, api, transport)
    await transport.close()


def no_secrets(responses: list[Response], transport: ProviderTransport) -> None:
    for text in [transport.name, *(r.text for r in responses), *(r.relay for r in responses)]:
        assert not any(secret in text for secret in SECRETS), text


# -- every provider --------------------------------------------------------------------------


async def test_an_accepted_message_is_delivered_to_every_recipient(h: Harness) -> None:
    responses = await h.transport.send(
        envelope("ann@example.org", "carl@example.org", "dan@example.org")
    )
    assert classes(responses) == [ReplyClass.DELIVERED] * 3
    assert all(r.code == 250 and "accepted the message" in r.text for r in responses)
    assert len(h.api.seen) == 1
    assert sorted(h.api.seen[0].recipients) == [
        "ann@example.org",
        "carl@example.org",
        "dan@example.org",
    ]
    assert responses[0].relay == h.transport.name
    assert h.transport.shared_destination == h.provider.name
    no_secrets(responses, h.transport)


async def test_a_429_is_throttled_and_honours_retry_after(h: Harness) -> None:
    h.api.scripted.append(h.provider.throttled)
    [response] = await h.transport.send(envelope("ann@example.org"))
    assert response.verdict().cls is ReplyClass.THROTTLED
    assert response.retry_after == 7.0


async def test_a_5xx_is_temporary(h: Harness) -> None:
    h.api.scripted.append(Reply(503, "Service Unavailable"))
    responses = await h.transport.send(envelope("ann@example.org", "carl@example.org"))
    assert classes(responses) == [ReplyClass.TEMPORARY] * 2
    assert "HTTP 503" in responses[0].text


async def test_a_503_with_retry_after_carries_the_wait_to_the_policy(h: Harness) -> None:
    """A counted reply's Retry-After delays its retry (the policy takes the longer of the
    schedule and the wait): the transport must hand it over, not only for throttling."""
    h.api.scripted.append(Reply(503, "Service Unavailable", {"Retry-After": "600"}))
    [response] = await h.transport.send(envelope("ann@example.org"))
    assert response.verdict().cls is ReplyClass.TEMPORARY
    assert response.retry_after == 600.0


async def test_issue_17_4_a_providers_refused_credentials_are_a_connection_failure(
    h: Harness,
) -> None:
    h.api.scripted.append(h.provider.unauthorized)
    [response] = await h.transport.send(envelope("ann@example.org"))
    assert response.verdict().cls is ReplyClass.CONNECTION
    assert response.code is None
    # a key the provider rejects can never work: the relay is paused for it (issue 17.4)
    assert response.misconfigured is not None and "credentials" in response.misconfigured
    no_secrets([response], h.transport)


async def test_a_content_error_is_a_message_error(h: Harness) -> None:
    h.api.scripted.append(h.provider.content_error)
    responses = await h.transport.send(envelope("ann@example.org", "carl@example.org"))
    assert classes(responses) == [ReplyClass.MESSAGE_ERROR] * 2


async def test_a_refused_recipient_fails_alone_and_the_others_are_delivered(h: Harness) -> None:
    responses = await h.transport.send(
        envelope("ann@example.org", "bad@example.org", "carl@example.org")
    )
    assert classes(responses) == [
        ReplyClass.DELIVERED,
        h.provider.bad_recipient,
        ReplyClass.DELIVERED,
    ]
    accepted = [r for seen in h.api.seen if seen.status < 300 for r in seen.recipients]
    assert sorted(accepted) == ["ann@example.org", "carl@example.org"]  # each once, never "bad"


async def test_an_unreachable_api_is_a_connection_failure(h: Harness) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed when the block ends: connections are refused
    transport = h.provider.make(f"http://127.0.0.1:{port}")
    try:
        [response] = await transport.send(envelope("ann@example.org"))
    finally:
        await transport.close()
    assert response.verdict().cls is ReplyClass.CONNECTION


# -- SendGrid ------------------------------------------------------------------------------------


@pytest_asyncio.fixture(loop_scope="module")
async def sendgrid(
    apis: dict[str, FakeAPI],
) -> AsyncIterator[tuple[FakeAPI, SendGridTransport]]:
    api = apis["sendgrid"]
    transport = SendGridTransport(SENDGRID_KEY, base_url=api.url, timeout=5)
    yield api, transport
    await transport.close()


async def test_sendgrid_builds_its_json_from_the_stored_message(
    sendgrid: tuple[FakeAPI, SendGridTransport],
) -> None:
    api, transport = sendgrid
    await transport.send(envelope("ann@example.org", "carl@example.org", "dan@example.org"))
    data = api.seen[0].json
    assert data["personalizations"] == [
        {
            "to": [{"email": "ann@example.org", "name": "Ann"}],
            "cc": [{"email": "carl@example.org"}],
            "bcc": [{"email": "dan@example.org"}],
        }
    ]
    assert data["from"] == {"email": "app@sender.test", "name": "Shop"}
    assert [c["type"] for c in data["content"]] == ["text/plain", "text/html"]
    assert data["attachments"] == [
        {
            "content": base64.b64encode(b"%PDF-1.4 receipt").decode(),
            "type": "application/pdf",
            "filename": "receipt.pdf",
            "disposition": "attachment",
        }
    ]
    assert data["headers"]["List-Unsubscribe"] == "<mailto:unsubscribe@sender.test>"
    assert data["custom_args"] == {
        "postlane_queue_id": "q1",
        "postlane_idempotency_key": "order-1234",
    }


async def test_sendgrid_gives_bcc_only_recipients_a_personalization_each(
    sendgrid: tuple[FakeAPI, SendGridTransport],
) -> None:
    api, transport = sendgrid
    responses = await transport.send(envelope("dan@example.org", "eve@example.org"))
    assert classes(responses) == [ReplyClass.DELIVERED] * 2
    assert api.seen[0].json["personalizations"] == [
        {"to": [{"email": "dan@example.org"}]},
        {"to": [{"email": "eve@example.org"}]},
    ]


async def test_sendgrid_rate_limit_reset_is_the_wait_without_retry_after(
    sendgrid: tuple[FakeAPI, SendGridTransport],
) -> None:
    api, transport = sendgrid
    transport.clock = FakeClock(1_800_000_000.0)
    api.scripted.append(
        Reply(
            429, {"errors": [{"message": "too many requests"}]}, {"X-RateLimit-Reset": "1800000042"}
        )
    )
    [response] = await transport.send(envelope("ann@example.org"))
    assert (response.verdict().cls, response.retry_after) == (ReplyClass.THROTTLED, 42.0)


async def test_sendgrid_unverified_sender_identity_is_a_policy_block(
    sendgrid: tuple[FakeAPI, SendGridTransport],
) -> None:
    api, transport = sendgrid
    api.scripted.append(
        Reply(
            403,
            {
                "errors": [
                    {
                        "message": "The from address does not match a verified Sender "
                        "Identity. Mail cannot be sent until this error is resolved.",
                        "field": "from",
                    }
                ]
            },
        )
    )
    [response] = await transport.send(envelope("ann@example.org"))
    assert response.verdict().cls is ReplyClass.POLICY_BLOCK


async def test_a_silent_api_times_out_as_a_connection_failure() -> None:
    held: list[asyncio.BaseTransport] = []

    class Silent(asyncio.Protocol):  # takes the request, never answers
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            held.append(transport)

    server = await asyncio.get_running_loop().create_server(Silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport = SendGridTransport(SENDGRID_KEY, base_url=f"http://127.0.0.1:{port}", timeout=0.3)
    try:
        [response] = await transport.send(envelope("ann@example.org"))
    finally:
        await transport.close()
        for connection in held:
            connection.close()
        server.close()
        await server.wait_closed()
    assert response.verdict().cls is ReplyClass.CONNECTION
    assert "timed out" in response.text


# -- Postmark --------------------------------------------------------------------------------


@pytest_asyncio.fixture(loop_scope="module")
async def postmark(
    apis: dict[str, FakeAPI],
) -> AsyncIterator[tuple[FakeAPI, PostmarkTransport]]:
    api = apis["postmark"]
    transport = PostmarkTransport(POSTMARK_TOKEN, base_url=api.url, stream="outbound", timeout=5)
    yield api, transport
    await transport.close()


async def test_postmark_builds_its_json_from_the_stored_message(
    postmark: tuple[FakeAPI, PostmarkTransport],
) -> None:
    api, transport = postmark
    await transport.send(envelope("ann@example.org", "carl@example.org", "dan@example.org"))
    data = api.seen[0].json
    assert (data["To"], data["Cc"], data["Bcc"]) == (
        "Ann <ann@example.org>",
        "carl@example.org",
        "dan@example.org",
    )
    assert data["TextBody"] == "Thank you for your order.\n"
    assert data["HtmlBody"] == "<p>Thank you for your order.</p>\n"
    assert data["MessageStream"] == "outbound"
    assert data["Attachments"][0]["Name"] == "receipt.pdf"
    assert data["Metadata"] == {"postlane_queue_id": "q1", "postlane_idempotency_key": "order-1234"}


async def test_postmark_invalid_address_without_a_name_is_found_one_call_each(
    postmark: tuple[FakeAPI, PostmarkTransport],
) -> None:
    api, transport = postmark
    responses = await transport.send(envelope("ann@example.org", "invalid@example.org"))
    assert classes(responses) == [ReplyClass.DELIVERED, ReplyClass.HARD_BOUNCE]
    assert api.seen[0].recipients == ["ann@example.org", "invalid@example.org"]
    assert sorted(seen.recipients[0] for seen in api.seen[1:]) == [
        "ann@example.org",
        "invalid@example.org",
    ]


async def test_postmark_inactive_addresses_it_does_not_name_are_never_all_bounced(
    postmark: tuple[FakeAPI, PostmarkTransport],
) -> None:
    api, transport = postmark
    api.scripted.append(
        Reply(
            422,
            {
                "ErrorCode": 406,
                "Message": "Found inactive addresses: someone.else@example.org. Inactive "
                "recipients are ones that have generated a hard bounce.",
            },
        )
    )
    responses = await transport.send(envelope("ann@example.org", "carl@example.org"))
    assert classes(responses) == [ReplyClass.DELIVERED] * 2  # asked one call each instead
    assert len(api.seen) == 3


async def test_postmark_unconfirmed_sender_signature_is_a_policy_block(
    postmark: tuple[FakeAPI, PostmarkTransport],
) -> None:
    api, transport = postmark
    api.scripted.append(
        Reply(
            422,
            {
                "ErrorCode": 400,
                "Message": "The 'From' address you supplied (app@sender.test) is not a "
                "Sender Signature on your account.",
            },
        )
    )
    [response] = await transport.send(envelope("ann@example.org"))
    assert response.verdict().cls is ReplyClass.POLICY_BLOCK


# -- Mailgun ---------------------------------------------------------------------------------


async def test_mailgun_finds_the_invalid_address_with_one_call_per_recipient(
    apis: dict[str, FakeAPI],
) -> None:
    api = apis["mailgun"]
    transport = MailgunTransport(MAILGUN_KEY, "mg.example.test", base_url=api.url, timeout=5)
    responses = await transport.send(
        envelope("ann@example.org", "bad@example.org", "carl@example.org")
    )
    await transport.close()
    assert classes(responses) == [
        ReplyClass.DELIVERED,
        ReplyClass.HARD_BOUNCE,
        ReplyClass.DELIVERED,
    ]
    assert len(api.seen) == 4  # all three, then one each
    assert api.seen[0].form["v:postlane-idempotency-key"] == ["order-1234"]


# -- SES -------------------------------------------------------------------------------------


async def test_sigv4_reproduces_aws_published_test_vectors() -> None:
    """get-vanilla and post-vanilla from AWS's Signature Version 4 test suite."""
    for method, signature in (
        ("GET", "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"),
        ("POST", "5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b"),
    ):
        headers = sigv4_headers(
            method=method,
            url=httpx.URL("https://example.amazonaws.com/"),
            headers={},
            body=b"",
            access_key="AKIDEXAMPLE",
            secret_key="wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            region="us-east-1",
            service="service",
            now=datetime(2015, 8, 30, 12, 36, tzinfo=UTC).timestamp(),
        )
        assert headers["X-Amz-Date"] == "20150830T123600Z"
        assert headers["Authorization"] == (
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
            f"SignedHeaders=host;x-amz-date, Signature={signature}"
        )


async def test_ses_signs_with_the_session_token_of_temporary_credentials(
    apis: dict[str, FakeAPI],
) -> None:
    api = apis["ses"]
    transport = SESTransport(
        AWS_KEY,
        AWS_SECRET,
        "us-east-1",
        session_token="FwoGZXIvYXdzE",
        base_url=api.url,
        configuration_set="transactional",
    )
    [response] = await transport.send(envelope("ann@example.org"))
    await transport.close()
    assert response.verdict().cls is ReplyClass.DELIVERED
    seen = api.seen[0]
    assert seen.headers["x-amz-security-token"] == "FwoGZXIvYXdzE"
    assert "x-amz-security-token" in seen.headers["authorization"]
    assert seen.json["ConfigurationSetName"] == "transactional"
    assert {"Name": "postlane_idempotency_key", "Value": "order-1234"} in seen.json["EmailTags"]


async def test_ses_unverified_sender_blocks_every_recipient(apis: dict[str, FakeAPI]) -> None:
    api = apis["ses"]
    api.scripted.append(
        Reply(
            400,
            {
                "message": "Email address is not verified. The following identities "
                "failed the check in region US-EAST-1: app@sender.test"
            },
            {"x-amzn-ErrorType": "MessageRejected"},
        )
    )
    transport = SESTransport(AWS_KEY, AWS_SECRET, "us-east-1", base_url=api.url)
    responses = await transport.send(envelope("ann@example.org", "carl@example.org"))
    await transport.close()
    assert classes(responses) == [ReplyClass.POLICY_BLOCK] * 2
    assert len(api.seen) == 1


# -- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "env", "cls", "name"),
    [
        ("sendgrid://SG.abc.def", {}, SendGridTransport, "sendgrid://api.sendgrid.com"),
        (
            "sendgrid://?region=eu",
            {"SENDGRID_API_KEY": "SG.x"},
            SendGridTransport,
            "sendgrid://api.eu.sendgrid.com",
        ),
        (
            "postmark://tok-123?stream=broadcast",
            {},
            PostmarkTransport,
            "postmark://api.postmarkapp.com",
        ),
        (
            "mailgun://key-1@mg.example.com?region=eu",
            {},
            MailgunTransport,
            "mailgun://mg.example.com",
        ),
        (
            "mailgun://mg.example.com",
            {"MAILGUN_API_KEY": "key-1"},
            MailgunTransport,
            "mailgun://mg.example.com",
        ),
        ("ses://AKID:se%2Fcret@eu-west-1", {}, SESTransport, "ses://email.eu-west-1.amazonaws.com"),
        (
            "ses://",
            {"AWS_REGION": "us-east-2", "AWS_ACCESS_KEY_ID": "AKID", "AWS_SECRET_ACCESS_KEY": "s"},
            SESTransport,
            "ses://email.us-east-2.amazonaws.com",
        ),
    ],
)
async def test_relay_urls_give_transports_named_without_credentials(
    url: str, env: dict[str, str], cls: type[Any], name: str
) -> None:
    transport = cls.from_url(url, env=env)
    try:
        assert transport.name == name
        for secret in ("SG.abc", "SG.x", "tok-123", "key-1", "se/cret", "se%2Fcret"):
            assert secret not in transport.name
    finally:
        await transport.close()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sendgrid://", "SENDGRID_API_KEY"),
        ("postmark://", "POSTMARK_SERVER_TOKEN"),
        ("mailgun://key@", "mailgun://API_KEY@DOMAIN"),
        ("ses://AKID:secret@nowhere", "not an AWS region"),
        ("sendgrid://SG.x?colour=blue", "unknown option 'colour'"),
        ("mailgun://k@mg.example.com?region=mars", "region"),
    ],
)
async def test_bad_relay_urls_are_configuration_errors(url: str, message: str) -> None:
    cls = {
        "sendgrid": SendGridTransport,
        "postmark": PostmarkTransport,
        "mailgun": MailgunTransport,
        "ses": SESTransport,
    }[url.split(":")[0]]
    with pytest.raises(ConfigError, match=message):
        cls.from_url(url, env={})


async def test_configuration_errors_and_reprs_never_show_a_credential() -> None:
    with pytest.raises(ConfigError, match="not an AWS region") as raised:
        SESTransport.from_url("ses://AKID:se%2Fcret", env={})  # @REGION forgotten
    assert "se/cret" not in str(raised.value)
    transport = SendGridTransport.from_url("sendgrid://SG.abc", env={})
    try:
        assert "SG.abc" not in repr(transport)
        assert "SG.abc" not in repr(vars(transport))
    finally:
        await transport.close()


async def test_retry_after_takes_seconds_or_an_http_date() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC).timestamp()
    assert parse_retry_after("120", now) == 120.0
    assert parse_retry_after("Thu, 01 Jan 2026 00:01:30 GMT", now) == 90.0
    assert parse_retry_after("Wed, 31 Dec 2025 00:00:00 GMT", now) == 0.0
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after(None, now) is None


# -- issue 17.3: a provider token from the environment ---------------------------------------


async def test_issue_17_3_a_relay_urls_variable_is_expanded_and_reaches_the_provider(
    apis: dict[str, FakeAPI], tmp_path: Path
) -> None:
    """`relay = "postmark://${POSTMARK_TOKEN}"` as docs/transports.md shows it: the token the
    fake Postmark receives is the variable's value (its check refuses any other, as the literal
    `${POSTMARK_TOKEN}` was sent before); unset, the configuration is refused naming both."""
    from postlane.config import load_config
    from postlane.transports import transport_for

    api = apis["postmark"]
    path = tmp_path / "postlane.toml"
    path.write_text(f'[delivery]\nrelay = "postmark://${{POSTMARK_TOKEN}}?base_url={api.url}"\n')
    config = load_config(path, env={"POSTMARK_TOKEN": POSTMARK_TOKEN})
    transport = transport_for(config)
    try:
        responses = await transport.send(envelope("ann@example.org"))
    finally:
        await transport.close()
    assert classes(responses) == [ReplyClass.DELIVERED]
    assert len(api.seen) == 1  # and the fake's check found the token right (api.problems)
    with pytest.raises(ConfigError) as unset:
        load_config(path, env={})
    assert "delivery.relay" in unset.value.message
    assert "POSTMARK_TOKEN is not set" in unset.value.message
