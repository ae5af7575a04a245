"""SendGrid's v3 Mail Send API: ``relay = "sendgrid://API_KEY"``, or ``"sendgrid://"`` with the
key in ``$SENDGRID_API_KEY``. Options: ``?region=eu`` (api.eu.sendgrid.com, for EU-pinned
subusers), ``?base_url=...`` (a simulator or proxy).

Mail Send takes JSON, not MIME (https://www.twilio.com/docs/sendgrid/api-reference/mail-send/
mail-send), so the stored message is read and rebuilt: ``from``, ``reply_to``, ``subject``,
``content`` (text/plain first, then text/html, as the API requires), ``attachments`` (inline
ones with their ``content_id``), the other header fields under ``headers`` (Message-ID among
them, so it stays the one fixed at enqueue), and one personalization whose ``to``/``cc``/``bcc``
are the recipients where the message's own headers show them. When no recipient of the call is
in the To header (a retry for Cc or Bcc recipients only), each gets a personalization of its
own, addressed to them: nobody learns a Bcc.

Idempotency: SendGrid has no idempotency key. The queue id and the message's idempotency key
go in ``custom_args`` (``postlane_queue_id``, ``postlane_idempotency_key``), which SendGrid
repeats in its event webhooks, so a duplicate after a timeout can at least be recognised.

Answers (https://www.twilio.com/docs/sendgrid/api-reference/how-to-use-the-sendgrid-v3-api/
errors and .../mail-send/errors; errors are ``{"errors": [{"message", "field", "help"}]}``):

- 202: delivered; the ``X-Message-Id`` header is recorded.
- 400 on a recipient's field (``personalizations.0.to.1.email``: "Does not contain a valid
  address."): that recipient is a hard bounce, the others are sent again without it; "valid
  address" without a field: the recipients are tried one call each to find it.
- 400 otherwise (content, headers, attachments), 413 (payload too large): message_error.
- 401 "Maximum credits exceeded": throttled (the plan's quota, not the key).
- 401, 403 (bad key, missing scope, "too many bad requests, temporary block"): connection.
- 403 "does not match a verified Sender Identity": policy_block (one sender's setup; the
  provider keeps working for the others).
- 429: throttled, waiting ``Retry-After`` or until ``X-RateLimit-Reset``.
- 5xx: temporary.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from postlane.classify import ReplyClass
from postlane.toml_values import is_decimal
from postlane.transports import http_api
from postlane.transports.base import Envelope
from postlane.transports.parsed_message import BUILT_HEADERS, ParsedMessage

__all__ = ["SendGridTransport"]

REGIONS = {"global": "https://api.sendgrid.com", "eu": "https://api.eu.sendgrid.com"}
#: header fields Mail Send sets itself or refuses in ``headers`` (its reserved list, and ours)
_BUILT_HEADERS = BUILT_HEADERS | {"sender", "x-sg-id", "x-sg-eid"}
_RECIPIENT_FIELD = re.compile(r"personalizations\.(\d+)\.(to|cc|bcc)\.(\d+)(?:\.email)?")


class SendGridTransport(http_api.ProviderTransport):
    """Send through SendGrid's v3 Mail Send API (see the module docstring)."""

    provider = "sendgrid"
    default_base_url = REGIONS["global"]
    regions = REGIONS

    def __init__(self, api_key: str, **settings: Any) -> None:
        super().__init__(**settings)
        self._api_key = http_api.Secret(api_key)

    @classmethod
    def url_arguments(cls, url: http_api.ProviderURL, env: Mapping[str, str]) -> dict[str, Any]:
        key = http_api.secret_from(url.credentials, env, "SENDGRID_API_KEY", "SendGrid API key")
        return {"api_key": key}

    def authenticate(self, request: httpx.Request) -> None:
        request.headers["Authorization"] = f"Bearer {self._api_key.reveal()}"

    def calls(self, envelope: Envelope, recipients: Sequence[str]) -> list[http_api.Call]:
        message = ParsedMessage.parse(envelope.content, exclude_headers=_BUILT_HEADERS)
        personalizations, fields = _personalizations(message, recipients)
        payload: dict[str, Any] = {
            "personalizations": personalizations,
            "from": _mailbox(message.sender.addr_spec, message.sender.display_name)
            if message.sender
            else {"email": envelope.sender},
            "subject": message.subject,
            "content": [
                {"type": kind, "value": value}
                for kind, value in (("text/plain", message.text), ("text/html", message.html))
                if value
            ],
            "custom_args": http_api.envelope_tags(envelope),
        }
        if message.reply_to:
            first = message.reply_to[0]
            payload["reply_to"] = _mailbox(first.addr_spec, first.display_name)
        headers: dict[str, str] = {}
        for name, value in message.headers:
            headers.setdefault(name, value)
        if headers:
            payload["headers"] = headers
        if message.attachments:
            payload["attachments"] = [
                {
                    "content": base64.b64encode(a.content).decode("ascii"),
                    "type": a.content_type,
                    "filename": a.filename or "attachment",
                    "disposition": "inline" if a.inline else "attachment",
                    **({"content_id": a.content_id} if a.inline and a.content_id else {}),
                }
                for a in message.attachments
            ]
        return [http_api.Call(self.post("/v3/mail/send", json=payload), tuple(recipients), fields)]

    def read_answer(self, answer: httpx.Response, call: http_api.Call) -> http_api.Outcome:
        status = answer.status_code
        if 200 <= status < 300:
            return http_api.Accepted(answer.headers.get("x-message-id"))
        errors = http_api.json_object(answer).get("errors")
        errors = [e for e in errors if isinstance(e, dict)] if isinstance(errors, list) else []
        reason = "; ".join(str(e.get("message", "")) for e in errors) or answer.text or "no text"
        lowered = reason.lower()
        if status == 400:
            named: set[str] = set()
            unnamed = False
            for error in errors:
                about_address = "address" in str(error.get("message", "")).lower()
                match = _RECIPIENT_FIELD.fullmatch(str(error.get("field") or ""))
                if match and about_address:
                    address = call.context.get(f"personalizations.{match[1]}.{match[2]}.{match[3]}")
                    if address:
                        named.add(address.lower())
                        continue
                unnamed = unnamed or (about_address and "valid" in lowered)
            if named:
                return self.refused(answer, ReplyClass.HARD_BOUNCE, reason, frozenset(named))
            if unnamed:
                return self.refused(answer, ReplyClass.HARD_BOUNCE, reason, about_a_recipient=True)
            return self.refused(answer, ReplyClass.MESSAGE_ERROR, reason)
        if status == 401 and "credits" in lowered:
            return self.refused(answer, ReplyClass.THROTTLED, reason)
        if status == 403 and "sender identity" in lowered:
            return self.refused(answer, ReplyClass.POLICY_BLOCK, reason)
        return self.default_outcome(answer, reason)

    def retry_after(self, answer: httpx.Response) -> float | None:
        wait = super().retry_after(answer)
        reset = answer.headers.get("x-ratelimit-reset", "")
        if wait is None and is_decimal(reset):
            wait = max(0.0, int(reset) - self.clock.now())
        return wait


def _mailbox(address: str, name: str | None) -> dict[str, str]:
    return {"email": address, "name": name} if name else {"email": address}


def _personalizations(
    message: ParsedMessage, recipients: Sequence[str]
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The personalizations for ``recipients``, and which JSON field holds which address."""
    to, cc, bcc = message.split(recipients)
    groups = [(to, cc, bcc)] if to else [([r], [], []) for r in recipients]
    personalizations: list[dict[str, Any]] = []
    fields: dict[str, str] = {}
    for index, group in enumerate(groups):
        personalization: dict[str, Any] = {}
        for kind, addresses in zip(("to", "cc", "bcc"), group, strict=True):
            if not addresses:
                continue
            personalization[kind] = [_mailbox(*message.mailbox(a)) for a in addresses]
            for position, address in enumerate(addresses):
                fields[f"personalizations.{index}.{kind}.{position}"] = address
        personalizations.append(personalization)
    return personalizations, fields
