"""Mailgun's Messages API, raw MIME: ``relay = "mailgun://API_KEY@DOMAIN"``, or
``"mailgun://DOMAIN"`` with the key in ``$MAILGUN_API_KEY``. Options: ``?region=eu``
(api.eu.mailgun.net, for domains created in the EU region), ``?base_url=...``.

``POST /v3/DOMAIN/messages.mime`` (https://documentation.mailgun.com/docs/mailgun/api-reference/
send/mailgun/messages/post-v3--domain-name--messages-mime) takes the stored message as it is,
as the multipart file field ``message``, and the recipients as ``to``: the headers, the
Message-ID and any DKIM signature of ours reach the recipient unchanged. Authentication is HTTP
Basic with the user ``api``.

Idempotency: Mailgun has no idempotency key. The queue id and the message's key are sent as
user variables (``v:postlane-queue-id``, ``v:postlane-idempotency-key``), attached to every
event Mailgun reports for the message.

Answers (``{"id", "message"}``; errors ``{"message": ...}`` or plain text):

- 200 "Queued. Thank you.": delivered, its ``id`` recorded.
- 400 "'to' parameter is not a valid address": hard bounce; Mailgun does not say which, so
  the recipients are tried one call each to find it.
- 400 "Sandbox subdomains are for test purposes only ... authorized recipients": policy_block
  (a sandbox domain may only send to addresses authorised in the account).
- 400 otherwise, 413 (too large): message_error.
- 401, 403 ("Domain ... is not allowed to send"), 404 (no such domain): connection.
- 429: throttled (``Retry-After`` honoured); 5xx: temporary.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from postlane.classify import ReplyClass
from postlane.config import DeliveryConfig
from postlane.errors import ConfigError
from postlane.transports.base import Envelope
from postlane.transports.http_api import (
    Accepted,
    Call,
    Outcome,
    ProviderTransport,
    ProviderURL,
    Refused,
    from_env,
    json_or_none,
    secret_from,
)

__all__ = ["MailgunTransport"]

REGIONS = {"us": "https://api.mailgun.net", "eu": "https://api.eu.mailgun.net"}
_BAD_ADDRESS = ("not a valid address", "invalid address", "is not a valid email")
_SANDBOX = ("sandbox subdomains", "authorized recipients")


class MailgunTransport(ProviderTransport):
    """Send raw MIME through Mailgun (see the module docstring)."""

    provider = "mailgun"
    default_base_url = REGIONS["us"]

    def __init__(self, api_key: str, domain: str, **settings: Any) -> None:
        super().__init__(**settings)
        self._authorization = "Basic " + base64.b64encode(f"api:{api_key}".encode()).decode()
        self.domain = domain
        self.name = f"mailgun://{domain}"

    @classmethod
    def from_url(
        cls,
        url: str,
        delivery: DeliveryConfig | None = None,
        *,
        env: Mapping[str, str] | None = None,
    ) -> MailgunTransport:
        parsed = ProviderURL.parse(url, "mailgun", ["region"])
        if parsed.where is None:  # mailgun://DOMAIN, the key from the environment
            key, domain = "", parsed.credentials
        else:
            key, domain = parsed.credentials, parsed.where
        if not domain:
            raise ConfigError("delivery.relay: expected mailgun://API_KEY@DOMAIN")
        key = secret_from(key, from_env(env), "MAILGUN_API_KEY", "Mailgun API key")
        region = parsed.options.get("region", "us")
        if region not in REGIONS:
            raise ConfigError(f"delivery.relay: mailgun region must be one of {sorted(REGIONS)}")
        base_url = parsed.options.get("base_url") or REGIONS[region]
        return cls(key, domain, base_url=base_url, **cls.delivery_settings(delivery))

    def calls(self, envelope: Envelope, recipients: Sequence[str]) -> list[Call]:
        fields: dict[str, Any] = {"to": list(recipients), "v:postlane-queue-id": envelope.queue_id}
        if envelope.idempotency_key:
            fields["v:postlane-idempotency-key"] = envelope.idempotency_key
        request = self._client.build_request(
            "POST",
            f"{self.base_url}/v3/{self.domain}/messages.mime",
            data=fields,
            files={"message": ("message.mime", envelope.content, "message/rfc822")},
            headers={"Authorization": self._authorization},
        )
        return [Call(request, tuple(recipients))]

    def read_answer(self, answer: httpx.Response, call: Call) -> Outcome:
        status = answer.status_code
        body = json_or_none(answer)
        body = body if isinstance(body, dict) else {}
        reason = str(body.get("message") or answer.text or "no text")
        if 200 <= status < 300:
            return Accepted(body.get("id"))
        lowered = reason.lower()
        if status == 400:
            if any(phrase in lowered for phrase in _SANDBOX):
                return Refused(ReplyClass.POLICY_BLOCK, reason, status)
            if any(phrase in lowered for phrase in _BAD_ADDRESS):
                return Refused(ReplyClass.HARD_BOUNCE, reason, status, about_a_recipient=True)
        return self.default_outcome(answer, reason)
