"""Postmark's Email API: ``relay = "postmark://SERVER_TOKEN"``, or ``"postmark://"`` with the
token in ``$POSTMARK_SERVER_TOKEN``. Options: ``?stream=NAME`` (the message stream, default the
server's ``outbound``), ``?base_url=...``.

Postmark takes no raw MIME over HTTP (https://postmarkapp.com/developer/api/email-api: ``POST
/email`` with JSON fields), so the stored message is read and rebuilt: ``From``, ``To``/``Cc``/
``Bcc`` (the recipients where the message's headers show them), ``Subject``, ``TextBody``,
``HtmlBody``, ``ReplyTo``, ``Headers`` (Message-ID among them) and ``Attachments``. A call whose
recipients are all Cc or Bcc (a retry) is sent one call per recipient, each in ``To``.

Idempotency: Postmark has no idempotency key; the queue id and the message's key go in
``Metadata`` (``postlane_queue_id``, ``postlane_idempotency_key``), repeated in its webhooks.

Answers (https://postmarkapp.com/developer/api/overview#error-codes; a 422 carries
``{"ErrorCode", "Message"}``):

- 200 with ``ErrorCode`` 0: delivered, ``MessageID`` recorded.
- 406 "Inactive recipient" (it hard-bounced, complained, or was suppressed at Postmark): the
  addresses after "Found inactive addresses:" are hard bounces, the others are sent again.
- 300 "Invalid email request" about an address ("Invalid 'To' address", "Illegal email
  address"): hard bounce, the recipients tried one call each to find the one; otherwise (no
  body, too many recipients, bad header): message_error. 411 (forbidden attachment type) and
  402/403/409 (bad JSON): message_error.
- 400/401 (sender signature not found / not confirmed): policy_block, for that sender only.
- 10 / HTTP 401 (bad or missing token), 405 (not allowed to send), 412 (account pending),
  413 (account may not send): connection, the account's problem.
- 429: throttled (``Retry-After`` honoured); 100 (maintenance) and 5xx: temporary.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping, Sequence
from email.headerregistry import Address
from typing import Any

import httpx

from postlane.classify import ReplyClass
from postlane.config import DeliveryConfig
from postlane.transports.base import Envelope
from postlane.transports.http_api import (
    Accepted,
    Call,
    Outcome,
    ParsedMessage,
    ProviderTransport,
    ProviderURL,
    Refused,
    from_env,
    json_or_none,
    secret_from,
)

__all__ = ["PostmarkTransport"]

_BUILT_HEADERS = frozenset(
    {
        "from",
        "to",
        "cc",
        "bcc",
        "subject",
        "reply-to",
        "date",
        "mime-version",
        "content-type",
        "content-transfer-encoding",
        "content-disposition",
        "received",
        "return-path",
        "dkim-signature",
    }
)
#: the two wordings postmark's own client library parses (postmark-gem lib/postmark/error.rb)
_INACTIVE = (
    re.compile(r"Found inactive addresses: (.+?)\. Inactive", re.IGNORECASE | re.DOTALL),
    re.compile(r"these inactive addresses: (.+?)\.?$", re.IGNORECASE | re.DOTALL),
)
_BAD_ADDRESS = re.compile(r"invalid '(to|cc|bcc)' address|illegal email address", re.IGNORECASE)
_ACCOUNT_CANNOT_SEND = frozenset({10, 405, 412, 413})
_BAD_REQUEST = frozenset({402, 403, 409, 411})


class PostmarkTransport(ProviderTransport):
    """Send through Postmark's Email API (see the module docstring)."""

    provider = "postmark"
    default_base_url = "https://api.postmarkapp.com"

    def __init__(self, server_token: str, *, stream: str | None = None, **settings: Any) -> None:
        super().__init__(**settings)
        self._token = server_token
        self.stream = stream

    @classmethod
    def from_url(
        cls,
        url: str,
        delivery: DeliveryConfig | None = None,
        *,
        env: Mapping[str, str] | None = None,
    ) -> PostmarkTransport:
        parsed = ProviderURL.parse(url, "postmark", ["stream"])
        token = secret_from(
            parsed.credentials, from_env(env), "POSTMARK_SERVER_TOKEN", "Postmark server token"
        )
        return cls(
            token,
            stream=parsed.options.get("stream") or None,
            base_url=parsed.options.get("base_url") or None,
            **cls.delivery_settings(delivery),
        )

    def calls(self, envelope: Envelope, recipients: Sequence[str]) -> list[Call]:
        message = ParsedMessage.parse(envelope.content, exclude_headers=_BUILT_HEADERS)
        to, cc, bcc = message.split(recipients)
        groups = [(to, cc, bcc)] if to else [([r], [], []) for r in recipients]
        return [
            Call(self._request(envelope, message, *group), (*group[0], *group[1], *group[2]))
            for group in groups
        ]

    def _request(
        self,
        envelope: Envelope,
        message: ParsedMessage,
        to: list[str],
        cc: list[str],
        bcc: list[str],
    ) -> httpx.Request:
        sender = str(message.sender) if message.sender else envelope.sender
        payload: dict[str, Any] = {
            "From": sender,
            "To": self._addresses(message, to),
            "Subject": message.subject,
            "Metadata": {"postlane_queue_id": envelope.queue_id},
        }
        if cc:
            payload["Cc"] = self._addresses(message, cc)
        if bcc:
            payload["Bcc"] = self._addresses(message, bcc)
        if message.text:
            payload["TextBody"] = message.text
        if message.html:
            payload["HtmlBody"] = message.html
        if message.reply_to:
            payload["ReplyTo"] = ", ".join(str(a) for a in message.reply_to)
        if message.headers:
            payload["Headers"] = [{"Name": name, "Value": value} for name, value in message.headers]
        if message.attachments:
            payload["Attachments"] = [
                {
                    "Name": a.filename or "attachment",
                    "Content": base64.b64encode(a.content).decode("ascii"),
                    "ContentType": a.content_type,
                    **({"ContentID": f"cid:{a.content_id}"} if a.inline and a.content_id else {}),
                }
                for a in message.attachments
            ]
        if envelope.idempotency_key:
            payload["Metadata"]["postlane_idempotency_key"] = envelope.idempotency_key
        if self.stream:
            payload["MessageStream"] = self.stream
        return self._client.build_request(
            "POST",
            f"{self.base_url}/email",
            json=payload,
            headers={"Accept": "application/json", "X-Postmark-Server-Token": self._token},
        )

    @staticmethod
    def _addresses(message: ParsedMessage, addresses: list[str]) -> str:
        out = []
        for address in addresses:
            _, name = message.mailbox(address)
            out.append(str(Address(display_name=name or "", addr_spec=address)))
        return ", ".join(out)

    def read_answer(self, answer: httpx.Response, call: Call) -> Outcome:
        status = answer.status_code
        body = json_or_none(answer)
        body = body if isinstance(body, dict) else {}
        code = body.get("ErrorCode")
        text = str(body.get("Message") or answer.text or "no text")
        if 200 <= status < 300 and code in (0, None):
            return Accepted(body.get("MessageID"))
        reason = f"ErrorCode {code}: {text}" if code is not None else text
        if code == 406:
            inactive = _inactive_addresses(text)
            if inactive:
                return Refused(ReplyClass.HARD_BOUNCE, reason, status, inactive)
            return Refused(ReplyClass.HARD_BOUNCE, reason, status, about_a_recipient=True)
        if code == 300:
            if _BAD_ADDRESS.search(text):
                return Refused(ReplyClass.HARD_BOUNCE, reason, status, about_a_recipient=True)
            return Refused(ReplyClass.MESSAGE_ERROR, reason, status)
        if code in (400, 401) and status != 401:
            return Refused(ReplyClass.POLICY_BLOCK, reason, status)
        if code in _ACCOUNT_CANNOT_SEND:
            return Refused(ReplyClass.CONNECTION, reason, status)
        if code in _BAD_REQUEST:
            return Refused(ReplyClass.MESSAGE_ERROR, reason, status)
        if code == 100:
            return Refused(ReplyClass.TEMPORARY, reason, status)
        if code == 429:
            return Refused(
                ReplyClass.THROTTLED, reason, status, retry_after=self.retry_after(answer)
            )
        return self.default_outcome(answer, reason)


def _inactive_addresses(text: str) -> frozenset[str]:
    for pattern in _INACTIVE:
        match = pattern.search(text.strip())
        if match:
            return frozenset(
                part.strip().lower() for part in match.group(1).split(",") if "@" in part
            )
    return frozenset()
