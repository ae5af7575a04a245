"""The providers' webhooks: ``POST /v1/webhooks/ses`` (SNS), ``/v1/webhooks/sendgrid``,
``/v1/webhooks/postmark`` and ``/v1/webhooks/mailgun`` (routes in :mod:`postlane.ingest.http`).

They need no bearer token, as the one-click unsubscribe needs none: the provider's signature (or
Postmark's basic auth) is the proof, checked by :mod:`postlane.feedback.providers`. The API's
other protections hold: the body is read within :data:`MAX_BODY` bytes, the body timeout and the
request budget, and every error is JSON.

- ``200`` ``{"received", "recorded", "duplicates", "unmatched", "ignored"}``: the events were
  recorded, kept for the operator or ignored (an event about a message postlane does not know is
  never an error: the provider would send it again forever).
- ``401`` ``unauthorized``: the proof is missing, wrong, expired or replayed, the SNS topic is
  not listed, or its certificate is not Amazon's; or that provider's ``[webhooks.NAME]`` table
  is not configured (nothing can verify it; the message says so). Nothing changes. Refusals
  count as the API's wrong tokens do (door ``webhook``): a client refused too often waits
  (``429`` with ``Retry-After``) before its next request is looked at, so Postmark's password
  cannot be guessed at speed; they are logged as one line a minute, with the last reason.
- ``400`` ``invalid_json``: not JSON, or not the provider's shape.
- ``413``: over :data:`MAX_BODY`. ``503`` (with ``Retry-After``): the store cannot record, or a
  delivery the events name is still being sent; the provider sends them again.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from starlette.datastructures import State
from starlette.requests import Request
from starlette.responses import Response

from postlane.auth import Caller, TooManyAttempts, client_key
from postlane.feedback.inbound import ComplaintScope
from postlane.feedback.providers import Malformed, Received, Unverified
from postlane.feedback.providers.mailgun import MailgunReceiver
from postlane.feedback.providers.postmark import PostmarkReceiver
from postlane.feedback.providers.recorder import EventRecorder
from postlane.feedback.providers.sendgrid import SendGridReceiver
from postlane.feedback.providers.ses import SESReceiver
from postlane.feedback.providers.sns import SigningCertificates
from postlane.ingest.api_core import (
    STORE_RETRY_AFTER,
    ApiJSON,
    context_of,
    read_body,
    too_many_attempts,
)
from postlane.ingest.bodies import ApiError
from postlane.ingest.tally import Tally

if TYPE_CHECKING:
    from postlane.ingest.door import FrontDoor
    from postlane.metrics import Metrics

__all__ = ["MAX_BODY", "ProviderWebhooks", "install_provider_webhooks", "provider_webhook"]

log = logging.getLogger("postlane.webhooks.in")

#: the largest body read: SendGrid batches events up to about 1 MB, SNS messages are at most
#: 256 KB, Postmark's bounce webhook may carry the bounce's content
MAX_BODY = 4 * 1024 * 1024


class Receiver(Protocol):
    """Checks one provider's requests and reads their events."""

    provider: str

    async def receive(self, headers: Mapping[str, str], body: bytes, now: float) -> Received: ...


@dataclass
class ProviderWebhooks:
    """What the endpoints share, on ``app.state.provider_webhooks``: a receiver per configured
    provider, the recorder, and the SNS certificates (kept across requests)."""

    receivers: dict[str, Receiver]
    recorder: EventRecorder
    certificates: SigningCertificates
    metrics: Metrics | None = None
    #: why each provider's last refused request was refused
    last_refusals: dict[str, str] = field(default_factory=dict)
    #: refused requests by provider, logged as a line a minute (with the last reasons)
    refusals: Tally = field(init=False)

    def __post_init__(self) -> None:
        self.refusals = Tally(log, self._describe_refusals)

    def refused(self, provider: str, reason: str) -> None:
        self.last_refusals[provider] = reason[:200]
        self.refusals.count(provider)

    def _describe_refusals(self, counts: dict[str, int]) -> str:
        return "provider webhooks refused since the last such line: " + "; ".join(
            f"{provider} {n} (last: {self.last_refusals.get(provider, '?')})"
            for provider, n in sorted(counts.items())
        )


def install_provider_webhooks(
    state: State, door: FrontDoor, *, certificates: SigningCertificates | None = None
) -> ProviderWebhooks:
    """Give the provider endpoints what they need. ``certificates``: where SNS signing
    certificates come from (by default fetched from Amazon's SNS hosts only; a test passes
    its own, serving a certificate it made)."""
    settings = door.config.provider_webhooks
    certificates = certificates or SigningCertificates()
    receivers: dict[str, Receiver] = {}
    if settings.ses is not None:
        receivers["ses"] = SESReceiver(settings.ses, certificates)
    if settings.sendgrid is not None:
        receivers["sendgrid"] = SendGridReceiver(settings.sendgrid)
    if settings.postmark is not None:
        receivers["postmark"] = PostmarkReceiver(settings.postmark)
    if settings.mailgun is not None:
        receivers["mailgun"] = MailgunReceiver(settings.mailgun)
    recorder = EventRecorder(
        door.app.store,
        door.app.clock,
        complaint_scope=ComplaintScope(door.config.bounces.complaint_scope),
    )
    hooks = ProviderWebhooks(receivers, recorder, certificates, door.metrics)
    state.provider_webhooks = hooks
    return hooks


async def provider_webhook(request: Request, caller: Caller) -> Response:
    """``POST /v1/webhooks/{provider}`` (see the module docstring)."""
    provider = request.url.path.rstrip("/").rpartition("/")[2]
    hooks: ProviderWebhooks | None = getattr(request.app.state, "provider_webhooks", None)
    receiver = hooks.receivers.get(provider) if hooks is not None else None
    if hooks is None or receiver is None:
        raise ApiError(
            401,
            "unauthorized",
            f"[webhooks.{provider}] is not configured: nothing here can verify this request",
        )
    api = context_of(request)
    client = client_key(request)
    try:
        api.tokens.attempts.check(client, "webhook")
    except TooManyAttempts as exc:
        raise too_many_attempts(exc, "refused requests") from None
    body = bytes(await read_body(request, MAX_BODY))
    try:
        received = await receiver.receive(request.headers, body, api.postlane.clock.now())
    except Unverified as exc:
        _count(hooks, provider, "unverified")
        api.tokens.attempts.failed(client, "webhook")
        hooks.refused(provider, str(exc))
        headers = {"WWW-Authenticate": 'Basic realm="postlane"'} if provider == "postmark" else None
        raise ApiError(
            401, "unauthorized", f"not verified as {provider}'s: {exc}", headers
        ) from None
    except Malformed as exc:
        _count(hooks, provider, "malformed")
        raise ApiError(400, "invalid_json", str(exc)) from None
    try:
        result = await hooks.recorder.record(received.events)
    except BaseException:
        if received.release is not None:
            received.release()  # the provider sends it again: its token is not a replay then
        raise
    if result.pending:
        if received.release is not None:
            received.release()
        _count(hooks, provider, "retry")
        raise ApiError(
            503,
            "in_flight",
            f"{result.pending} deliveries these events name are still being sent; "
            "send them again later",
            {"Retry-After": str(STORE_RETRY_AFTER)},
        )
    _count(hooks, provider, "accepted")
    if hooks.metrics is not None:
        hooks.metrics.feedback.provider_events(provider, result)
    if result.recorded:
        log.info("%s webhook: %s", provider, result.as_json())
    return ApiJSON({"received": len(received.events), **result.as_json()})


def _count(hooks: ProviderWebhooks, provider: str, outcome: str) -> None:
    if hooks.metrics is not None:
        hooks.metrics.feedback.provider_requests.labels(provider, outcome).inc()
