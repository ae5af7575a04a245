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
from postlane.transports import http_api
from postlane.transports.base import Envelope
from postlane.transports.parsed_message import BUILT_HEADERS, ParsedMessage

__all__ = ["PostmarkTransport"]

#: the two wordings postmark's own client library parses (postmark-gem lib/postmark/error.rb)
_INACTIVE = (
    re.compile(r"Found inactive addresses: (.+?)\. Inactive", re.IGNORECASE | re.DOTALL),
    re.compile(r"these inactive addresses: (.+?)\.?$", re.IGNORECASE | re.DOTALL),
)
_BAD_ADDRESS = re.compile(r"invalid '(to|cc|bcc)' address|illegal email address", re.IGNORECASE)
_ACCOUNT_CANNOT_SEND = frozenset({10, 405, 412, 413})
_BAD_REQUEST = frozenset({402, 403, 409, 411})


class PostmarkTransport(http_api.ProviderTransport):
    """Send through Postmark's Email API (see the module docstring)."""

    provider = "postmark"
    default_base_url = "https://api.postmarkapp.com"
    url_options = ("stream",)

    def __init__(self, server_token: str, *, stream: str | None = None, **settings: Any) -> None:
        super().__init__(**settings)
        self._token = http_api.Secret(server_token)
        self.stream = stream

    @classmethod
    def url_arguments(cls, url: http_api.ProviderURL, env: Mapping[str, str]) -> dict[str, Any]:
        token = http_api.secret_from(
            url.credentials, env, "POSTMARK_SERVER_TOKEN", "Postmark server token"
        )
        return {"server_token": token, "stream": url.options.get("stream") or None}

    def authenticate(self, request: httpx.Request) -> None:
        request.headers["X-Postmark-Server-Token"] = self._token.reveal()

    def calls(self, envelope: Envelope, recipients: Sequence[str]) -> list[http_api.Call]:
        message = ParsedMessage.parse(envelope.content, exclude_headers=BUILT_HEADERS)
        to, cc, bcc = message.split(recipients)
        groups = [(to, cc, bcc)] if to else [([r], [], []) for r in recipients]
        return [
            http_api.Call(
                self._request(envelope, message, *group), (*group[0], *group[1], *group[2])
            )
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
            "Metadata": http_api.envelope_tags(envelope),
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
        if self.stream:
            payload["MessageStream"] = self.stream
        return self.post("/email", json=payload, headers={"Accept": "application/json"})

    @staticmethod
    def _addresses(message: ParsedMessage, addresses: list[str]) -> str:
        out = []
        for address in addresses:
            _, name = message.mailbox(address)
            out.append(str(Address(display_name=name or "", addr_spec=address)))
        return ", ".join(out)

    def read_answer(self, answer: httpx.Response, call: http_api.Call) -> http_api.Outcome:
        body = http_api.json_object(answer)
        code = body.get("ErrorCode")
        text = str(body.get("Message") or answer.text or "no text")
        if 200 <= answer.status_code < 300 and code in (0, None):
            return http_api.Accepted(body.get("MessageID"))
        reason = f"ErrorCode {code}: {text}" if code is not None else text
        if code == 406:
            inactive = _inactive_addresses(text)
            if inactive:
                return self.refused(answer, ReplyClass.HARD_BOUNCE, reason, inactive)
            return self.refused(answer, ReplyClass.HARD_BOUNCE, reason, about_a_recipient=True)
        if code == 300:
            if _BAD_ADDRESS.search(text):
                return self.refused(answer, ReplyClass.HARD_BOUNCE, reason, about_a_recipient=True)
            return self.refused(answer, ReplyClass.MESSAGE_ERROR, reason)
        if code in (400, 401) and answer.status_code != 401:
            return self.refused(answer, ReplyClass.POLICY_BLOCK, reason)
        if code in _ACCOUNT_CANNOT_SEND:
            return self.refused(answer, ReplyClass.CONNECTION, reason)
        if code in _BAD_REQUEST:
            return self.refused(answer, ReplyClass.MESSAGE_ERROR, reason)
        if code == 100:
            return self.refused(answer, ReplyClass.TEMPORARY, reason)
        if code == 429:
            return self.refused(answer, ReplyClass.THROTTLED, reason)
        return self.default_outcome(answer, reason)


def _inactive_addresses(text: str) -> frozenset[str]:
    for pattern in _INACTIVE:
        match = pattern.search(text.strip())
        if match:
            return frozenset(
                part.strip().lower() for part in match.group(1).split(",") if "@" in part
            )
    return frozenset()
