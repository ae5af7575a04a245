"""Amazon SES API v2, raw MIME: ``relay = "ses://ACCESS_KEY_ID:SECRET_ACCESS_KEY@REGION"``, or
``"ses://REGION"`` with the credentials in ``$AWS_ACCESS_KEY_ID`` / ``$AWS_SECRET_ACCESS_KEY``
(and ``$AWS_SESSION_TOKEN`` for temporary ones), or ``"ses://"`` with the region in
``$AWS_REGION`` / ``$AWS_DEFAULT_REGION``. A secret key's ``/`` and ``+`` must be written
``%2F`` and ``%2B`` in the URL. Options: ``?configuration_set=NAME``, ``?base_url=...``.

``SendEmail`` (``POST /v2/email/outbound-emails``, https://docs.aws.amazon.com/ses/latest/
APIReference-V2/API_SendEmail.html) takes the stored message as ``Content.Raw.Data`` (base64)
and the recipients as ``Destination.ToAddresses``: the headers are sent as they are, and the
message's From header is the identity SES checks. Requests are signed with Signature Version 4
(:func:`sigv4_headers`, AWS's documented algorithm, written here rather than pulling in boto3).

Idempotency: SendEmail has no idempotency token. The queue id is sent as the message tag
``postlane_queue_id`` (and the idempotency key as ``postlane_idempotency_key``, characters
outside SES's tag alphabet replaced by ``_``), which SES repeats in its event publishing.

Answers (the error's name in ``x-amzn-ErrorType``, its text in the body's ``message``):

- 200: delivered, ``MessageId`` recorded.
- ``MessageRejected`` "Email address is not verified. The following identities failed the
  check ...: ADDRESSES" (the account is in the sandbox): policy_block for the recipients named
  (the others are sent again), or for all when it is the sender; other ``MessageRejected``
  (the content: a virus, a bad header): message_error.
- ``BadRequestException`` about an address ("Illegal address", "Missing final '@domain'"):
  hard bounce, the recipients tried one call each to find it; otherwise message_error.
- ``MailFromDomainNotVerifiedException``: policy_block (that sender's domain).
- ``TooManyRequestsException`` (429), ``LimitExceededException``, ``Throttling``: throttled.
- ``AccountSuspendedException``, ``SendingPausedException``, ``NotFoundException`` (e.g. the
  configuration set), 403 (``AccessDeniedException``, ``UnrecognizedClientException``,
  ``SignatureDoesNotMatch``, ``ExpiredTokenException``): connection, the account's problem.
- 5xx: temporary.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

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

__all__ = ["SESTransport", "sigv4_headers"]

SERVICE = "ses"
_ALGORITHM = "AWS4-HMAC-SHA256"
_REGION = re.compile(r"[a-z]{2}(-[a-z]+)+-\d+")
_TAG_VALUE = re.compile(r"[^A-Za-z0-9_-]")
_UNVERIFIED = re.compile(r"failed the check in region [^:]+:\s*(.+)$", re.IGNORECASE | re.DOTALL)
_BAD_ADDRESS = ("illegal address", "missing final '@", "local address contains")
_THROTTLED = frozenset({"TooManyRequestsException", "LimitExceededException", "Throttling"})
_ACCOUNT = frozenset(
    {
        "AccountSuspendedException",
        "SendingPausedException",
        "NotFoundException",
        "AccessDeniedException",
        "UnrecognizedClientException",
        "InvalidSignatureException",
        "SignatureDoesNotMatch",
        "IncompleteSignature",
        "ExpiredTokenException",
        "InvalidClientTokenId",
    }
)


def sigv4_headers(
    *,
    method: str,
    url: httpx.URL,
    headers: Mapping[str, str],
    body: bytes,
    access_key: str,
    secret_key: str,
    region: str,
    service: str,
    now: float,
    session_token: str | None = None,
) -> dict[str, str]:
    """The headers that sign a request with AWS Signature Version 4: ``Authorization``,
    ``X-Amz-Date`` (and ``X-Amz-Security-Token`` with temporary credentials).

    Follows https://docs.aws.amazon.com/IAM/latest/UserGuide/create-signed-request.html: a
    canonical request (method, URI, sorted query, the signed headers lower-cased and trimmed,
    the body's SHA-256), the string to sign over its hash and the credential scope, and an
    HMAC-SHA256 key derived from the secret through date, region, service and "aws4_request".
    Every header in ``headers`` is signed, with ``Host`` and ``X-Amz-Date``.
    """
    amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    date = amz_date[:8]
    signed = {name.lower(): " ".join(value.split()) for name, value in headers.items()}
    signed["host"] = url.netloc.decode("ascii")
    signed["x-amz-date"] = amz_date
    if session_token:
        signed["x-amz-security-token"] = session_token
    names = sorted(signed)
    signed_headers = ";".join(names)
    query = "&".join(
        sorted(
            f"{quote(key, safe='-_.~')}={quote(value, safe='-_.~')}"
            for key, value in url.params.multi_items()
        )
    )
    canonical_request = "\n".join(
        [
            method.upper(),
            quote(url.path or "/", safe="/-_.~"),
            query,
            "".join(f"{name}:{signed[name]}\n" for name in names),
            signed_headers,
            hashlib.sha256(body).hexdigest(),
        ]
    )
    scope = f"{date}/{region}/{service}/aws4_request"
    string_to_sign = "\n".join(
        [_ALGORITHM, amz_date, scope, hashlib.sha256(canonical_request.encode()).hexdigest()]
    )
    key = ("AWS4" + secret_key).encode()
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
    out = {
        "Authorization": f"{_ALGORITHM} Credential={access_key}/{scope}, "
        f"SignedHeaders={signed_headers}, Signature={signature}",
        "X-Amz-Date": amz_date,
    }
    if session_token:
        out["X-Amz-Security-Token"] = session_token
    return out


class SESTransport(ProviderTransport):
    """Send raw MIME through Amazon SES API v2 (see the module docstring)."""

    provider = "ses"
    default_base_url = "https://email.us-east-1.amazonaws.com"

    def __init__(
        self,
        access_key: str,
        secret_key: str,
        region: str,
        *,
        session_token: str | None = None,
        configuration_set: str | None = None,
        base_url: str | None = None,
        **settings: Any,
    ) -> None:
        super().__init__(base_url=base_url or f"https://email.{region}.amazonaws.com", **settings)
        self.region = region
        self.configuration_set = configuration_set
        self._access_key = access_key
        self._secret_key = secret_key
        self._session_token = session_token

    @classmethod
    def from_url(
        cls,
        url: str,
        delivery: DeliveryConfig | None = None,
        *,
        env: Mapping[str, str] | None = None,
    ) -> SESTransport:
        parsed = ProviderURL.parse(url, "ses", ["configuration_set"])
        environment = from_env(env)
        if parsed.where is None:  # ses://REGION, the credentials from the environment
            credentials, region = "", parsed.credentials
        else:
            credentials, region = parsed.credentials, parsed.where
        region = (
            region or environment.get("AWS_REGION") or environment.get("AWS_DEFAULT_REGION", "")
        )
        if not _REGION.fullmatch(region):
            raise ConfigError(
                f"delivery.relay: {region!r} is not an AWS region; expected ses://KEY:SECRET@REGION"
            )
        access_key, _, secret_key = credentials.partition(":")
        access_key = secret_from(access_key, environment, "AWS_ACCESS_KEY_ID", "AWS access key")
        secret_key = secret_from(
            secret_key, environment, "AWS_SECRET_ACCESS_KEY", "AWS secret access key"
        )
        token = None if credentials else environment.get("AWS_SESSION_TOKEN") or None
        return cls(
            access_key,
            secret_key,
            region,
            session_token=token,
            configuration_set=parsed.options.get("configuration_set") or None,
            base_url=parsed.options.get("base_url") or None,
            **cls.delivery_settings(delivery),
        )

    def calls(self, envelope: Envelope, recipients: Sequence[str]) -> list[Call]:
        tags = [{"Name": "postlane_queue_id", "Value": _tag_value(envelope.queue_id)}]
        if envelope.idempotency_key:
            tags.append(
                {"Name": "postlane_idempotency_key", "Value": _tag_value(envelope.idempotency_key)}
            )
        payload: dict[str, Any] = {
            "Content": {"Raw": {"Data": base64.b64encode(envelope.content).decode("ascii")}},
            "Destination": {"ToAddresses": list(recipients)},
            "EmailTags": tags,
        }
        if self.configuration_set:
            payload["ConfigurationSetName"] = self.configuration_set
        body = json.dumps(payload).encode()
        url = httpx.URL(f"{self.base_url}/v2/email/outbound-emails")
        headers = {"Content-Type": "application/json"}
        headers |= sigv4_headers(
            method="POST",
            url=url,
            headers=headers,
            body=body,
            access_key=self._access_key,
            secret_key=self._secret_key,
            region=self.region,
            service=SERVICE,
            now=self.clock.now(),
            session_token=self._session_token,
        )
        request = self._client.build_request("POST", url, content=body, headers=headers)
        return [Call(request, tuple(recipients))]

    def read_answer(self, answer: httpx.Response, call: Call) -> Outcome:
        status = answer.status_code
        body = json_or_none(answer)
        body = body if isinstance(body, dict) else {}
        if 200 <= status < 300:
            return Accepted(body.get("MessageId"))
        kind = str(
            answer.headers.get("x-amzn-errortype") or body.get("__type") or body.get("code") or ""
        )
        kind = kind.split(":", 1)[0].rpartition("#")[2]
        text = str(body.get("message") or body.get("Message") or answer.text or "no text")
        reason = f"{kind}: {text}" if kind else text
        lowered = text.lower()
        if kind == "MessageRejected":
            if "not verified" in lowered:
                named = _unverified_identities(text)
                if named & {r.lower() for r in call.recipients}:
                    return Refused(ReplyClass.POLICY_BLOCK, reason, status, named)
                return Refused(ReplyClass.POLICY_BLOCK, reason, status)
            return Refused(ReplyClass.MESSAGE_ERROR, reason, status)
        if kind == "BadRequestException" and any(p in lowered for p in _BAD_ADDRESS):
            return Refused(ReplyClass.HARD_BOUNCE, reason, status, about_a_recipient=True)
        if kind == "MailFromDomainNotVerifiedException":
            return Refused(ReplyClass.POLICY_BLOCK, reason, status)
        if kind in _THROTTLED or status == 429:
            return Refused(
                ReplyClass.THROTTLED, reason, status, retry_after=self.retry_after(answer)
            )
        if kind in _ACCOUNT:
            return Refused(ReplyClass.CONNECTION, reason, status)
        return self.default_outcome(answer, reason)


def _tag_value(value: str) -> str:
    """SES tag values: letters, digits, ``_`` and ``-``, at most 256 characters."""
    return _TAG_VALUE.sub("_", value)[:256] or "_"


def _unverified_identities(text: str) -> frozenset[str]:
    match = _UNVERIFIED.search(text.strip())
    if match is None:
        return frozenset()
    return frozenset(
        part.strip().strip(".").lower() for part in match.group(1).split(",") if "@" in part
    )
