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
from postlane.errors import ConfigError
from postlane.transports import http_api
from postlane.transports.base import Envelope

__all__ = ["MailgunTransport"]

REGIONS = {"us": "https://api.mailgun.net", "eu": "https://api.eu.mailgun.net"}
_BAD_ADDRESS = ("not a valid address", "invalid address", "is not a valid email")
_SANDBOX = ("sandbox subdomains", "authorized recipients")


class MailgunTransport(http_api.ProviderTransport):
    """Send raw MIME through Mailgun (see the module docstring)."""

    provider = "mailgun"
    default_base_url = REGIONS["us"]
    regions = REGIONS

    def __init__(self, api_key: str, domain: str, **settings: Any) -> None:
        super().__init__(**settings)
        basic = base64.b64encode(f"api:{api_key}".encode()).decode()
        self._authorization = http_api.Secret(f"Basic {basic}")
        self.domain = domain
        self.name = f"mailgun://{domain}"

    @classmethod
    def url_arguments(cls, url: http_api.ProviderURL, env: Mapping[str, str]) -> dict[str, Any]:
        key, domain = url.credentials_at()  # mailgun://DOMAIN: the key from the environment
        if not domain:
            raise ConfigError("delivery.relay: expected mailgun://API_KEY@DOMAIN")
        key = http_api.secret_from(key, env, "MAILGUN_API_KEY", "Mailgun API key")
        return {"api_key": key, "domain": domain}

    def authenticate(self, request: httpx.Request) -> None:
        request.headers["Authorization"] = self._authorization.reveal()

    def calls(self, envelope: Envelope, recipients: Sequence[str]) -> list[http_api.Call]:
        fields: dict[str, Any] = {"to": list(recipients)}
        for name, value in http_api.envelope_tags(envelope).items():
            fields[f"v:{name.replace('_', '-')}"] = value  # v:postlane-queue-id
        request = self.post(
            f"/v3/{self.domain}/messages.mime",
            data=fields,
            files={"message": ("message.mime", envelope.content, "message/rfc822")},
        )
        return [http_api.Call(request, tuple(recipients))]

    def read_answer(self, answer: httpx.Response, call: http_api.Call) -> http_api.Outcome:
        body = http_api.json_object(answer)
        reason = str(body.get("message") or answer.text or "no text")
        if 200 <= answer.status_code < 300:
            return http_api.Accepted(body.get("id"))
        lowered = reason.lower()
        if answer.status_code == 400:
            if any(phrase in lowered for phrase in _SANDBOX):
                return self.refused(answer, ReplyClass.POLICY_BLOCK, reason)
            if any(phrase in lowered for phrase in _BAD_ADDRESS):
                return self.refused(answer, ReplyClass.HARD_BOUNCE, reason, about_a_recipient=True)
        return self.default_outcome(answer, reason)
