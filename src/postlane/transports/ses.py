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
from postlane.errors import ConfigError
from postlane.transports import http_api
from postlane.transports.base import Envelope

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


class SESTransport(http_api.ProviderTransport):
    """Send raw MIME through Amazon SES API v2 (see the module docstring)."""

    provider = "ses"
    default_base_url = "https://email.us-east-1.amazonaws.com"
    url_options = ("configuration_set",)

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
        self._secret_key = http_api.Secret(secret_key)
        self._session_token = http_api.Secret(session_token) if session_token else None

    @classmethod
    def url_arguments(cls, url: http_api.ProviderURL, env: Mapping[str, str]) -> dict[str, Any]:
        credentials, region = url.credentials_at()  # ses://REGION: credentials from env
        region = region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION", "")
        if not _REGION.fullmatch(region):
            # (ses://KEY:SECRET without @REGION reads the credentials as the region: not shown)
            shown = "KEY:SECRET" if ":" in region else region
            raise ConfigError(
                f"delivery.relay: {shown!r} is not an AWS region; expected ses://KEY:SECRET@REGION"
            )
        access_key, _, secret_key = credentials.partition(":")
        return {
            "access_key": http_api.secret_from(
                access_key, env, "AWS_ACCESS_KEY_ID", "AWS access key"
            ),
            "secret_key": http_api.secret_from(
                secret_key, env, "AWS_SECRET_ACCESS_KEY", "AWS secret access key"
            ),
            "region": region,
            "session_token": None if credentials else env.get("AWS_SESSION_TOKEN") or None,
            "configuration_set": url.options.get("configuration_set") or None,
        }

    def authenticate(self, request: httpx.Request) -> None:
        """Sign ``request`` (its Content-Type, Host and X-Amz-Date headers and its body)."""
        token = self._session_token.reveal() if self._session_token else None
        request.headers.update(
            sigv4_headers(
                method=request.method,
                url=request.url,
                headers={"Content-Type": request.headers["Content-Type"]},
                body=request.content,
                access_key=self._access_key,
                secret_key=self._secret_key.reveal(),
                region=self.region,
                service=SERVICE,
                now=self.clock.now(),
                session_token=token,
            )
        )

    def calls(self, envelope: Envelope, recipients: Sequence[str]) -> list[http_api.Call]:
        tags = [
            {"Name": name, "Value": _tag_value(value)}
            for name, value in http_api.envelope_tags(envelope).items()
        ]
        payload: dict[str, Any] = {
            "Content": {"Raw": {"Data": base64.b64encode(envelope.content).decode("ascii")}},
            "Destination": {"ToAddresses": list(recipients)},
            "EmailTags": tags,
        }
        if self.configuration_set:
            payload["ConfigurationSetName"] = self.configuration_set
        request = self.post(
            "/v2/email/outbound-emails",
            content=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json"},
        )
        return [http_api.Call(request, tuple(recipients))]

    def read_answer(self, answer: httpx.Response, call: http_api.Call) -> http_api.Outcome:
        body = http_api.json_object(answer)
        if 200 <= answer.status_code < 300:
            return http_api.Accepted(body.get("MessageId"))
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
                    return self.refused(answer, ReplyClass.POLICY_BLOCK, reason, named)
                return self.refused(answer, ReplyClass.POLICY_BLOCK, reason)
            return self.refused(answer, ReplyClass.MESSAGE_ERROR, reason)
        if kind == "BadRequestException" and any(p in lowered for p in _BAD_ADDRESS):
            return self.refused(answer, ReplyClass.HARD_BOUNCE, reason, about_a_recipient=True)
        if kind == "MailFromDomainNotVerifiedException":
            return self.refused(answer, ReplyClass.POLICY_BLOCK, reason)
        if kind in _THROTTLED or answer.status_code == 429:
            return self.refused(answer, ReplyClass.THROTTLED, reason)
        if kind in _ACCOUNT:
            return self.refused(answer, ReplyClass.CONNECTION, reason)
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
