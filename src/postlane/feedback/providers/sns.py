"""Amazon SNS HTTP(S) notifications: checking a message's signature, and confirming a
subscription.

SNS signs each message it posts (https://docs.aws.amazon.com/sns/latest/dg/
sns-verify-signature-of-message.html): the string to sign is ``Name\\nvalue\\n`` for the fields
``Message``, ``MessageId``, ``Subject`` (when there is one), ``Timestamp``, ``TopicArn`` and
``Type`` of a ``Notification`` (``Message``, ``MessageId``, ``SubscribeURL``, ``Timestamp``,
``Token``, ``TopicArn``, ``Type`` of a ``SubscriptionConfirmation`` or
``UnsubscribeConfirmation``), signed with RSA PKCS #1 v1.5 over SHA-1 (``SignatureVersion``
``1``) or SHA-256 (``2``), with the key of the X.509 certificate at ``SigningCertURL``.

That URL is fetched only over https from a host ``sns.<region>.amazonaws.com`` (or
``.amazonaws.com.cn``), and the certificate kept (a few dozen at most: SNS rotates them
rarely); so is ``SubscribeURL``, which is visited (GET) to confirm a subscription. Anything else
is :class:`~postlane.feedback.providers.Unverified`. A message of a topic not in ``[webhooks.ses]
topic_arns`` is refused before any certificate is fetched.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
from collections.abc import Callable, Collection, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from postlane.feedback.providers import Malformed, Unverified

__all__ = ["SNSMessage", "SigningCertificates", "aws_sns_url", "string_to_sign"]

log = logging.getLogger("postlane.webhooks.sns")

#: the hosts SNS signs from and confirms subscriptions at
_SNS_HOST = re.compile(r"sns\.[a-z0-9-]+\.amazonaws\.com(\.cn)?")
_NOTIFICATION_FIELDS = ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type")
_CONFIRMATION_FIELDS = (
    "Message",
    "MessageId",
    "SubscribeURL",
    "Timestamp",
    "Token",
    "TopicArn",
    "Type",
)
_TYPES = ("Notification", "SubscriptionConfirmation", "UnsubscribeConfirmation")
_HASHES: dict[str, Callable[[], hashes.HashAlgorithm]] = {"1": hashes.SHA1, "2": hashes.SHA256}
#: the largest certificate read (they are about 2 KB)
_CERTIFICATE_LIMIT = 64 * 1024
#: certificates kept; more distinct URLs than this is no SNS we know
_CACHE_SIZE = 64


def aws_sns_url(url: str) -> bool:
    """Whether ``url`` is one SNS would sign with or confirm at: https, on a host
    ``sns.<region>.amazonaws.com``, with no user info or port of its own."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return False
    return (
        parts.scheme == "https"
        and parts.username is None
        and port in (None, 443)
        and _SNS_HOST.fullmatch(parts.hostname or "") is not None
    )


def string_to_sign(message: Mapping[str, Any]) -> bytes:
    """What SNS signed for ``message`` (by its ``Type``)."""
    names = _NOTIFICATION_FIELDS if message.get("Type") == "Notification" else _CONFIRMATION_FIELDS
    parts = []
    for name in names:
        value = message.get(name)
        if value is None and name == "Subject":
            continue
        if not isinstance(value, str):
            raise Unverified(f"the SNS message has no {name}")
        parts.append(f"{name}\n{value}\n")
    return "".join(parts).encode("utf-8")


class SigningCertificates:
    """The certificates SNS signs with, fetched from where messages say and kept.

    ``url_allowed`` says which URLs may be fetched (and which subscription URLs visited):
    :func:`aws_sns_url` unless a test serves its own; ``client`` is the HTTP client (one with
    a test's CA, say); ``timeout`` bounds each request."""

    def __init__(
        self,
        *,
        url_allowed: Callable[[str], bool] = aws_sns_url,
        client: httpx.AsyncClient | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.url_allowed = url_allowed
        self.timeout = timeout
        self._client = client
        self._own_client = client is None
        self._keys: dict[str, rsa.RSAPublicKey] = {}
        self._lock = asyncio.Lock()
        #: certificates fetched (tests check the caching)
        self.fetched = 0

    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=self.timeout, follow_redirects=False, trust_env=False
            )
        return self._client

    async def key(self, url: str, now: float) -> rsa.RSAPublicKey:
        """The public key of the certificate at ``url``; :class:`Unverified` when the URL is
        not SNS's, the certificate cannot be had, is no RSA certificate or is out of date."""
        if not self.url_allowed(url) or not urlsplit(url).path.endswith(".pem"):
            raise Unverified(f"the signing certificate URL is not Amazon SNS's: {url[:200]!r}")
        key = self._keys.get(url)
        if key is None:
            async with self._lock:
                key = self._keys.get(url) or await self._fetch(url, now)
        return key

    async def _fetch(self, url: str, now: float) -> rsa.RSAPublicKey:
        try:
            answer = await self.client().get(url, timeout=self.timeout)
        except httpx.HTTPError as exc:
            log.warning("could not fetch the SNS signing certificate %s: %s", url, exc)
            raise Unverified("the signing certificate could not be fetched") from None
        if answer.status_code != 200 or len(answer.content) > _CERTIFICATE_LIMIT:
            raise Unverified(f"the signing certificate could not be fetched ({answer.status_code})")
        try:
            certificate = x509.load_pem_x509_certificate(answer.content)
        except ValueError:
            raise Unverified("the signing certificate is not a PEM certificate") from None
        at = datetime.fromtimestamp(now, UTC)
        if not certificate.not_valid_before_utc <= at <= certificate.not_valid_after_utc:
            raise Unverified("the signing certificate is out of date")
        key = certificate.public_key()
        if not isinstance(key, rsa.RSAPublicKey):
            raise Unverified("the signing certificate holds no RSA key")
        if len(self._keys) >= _CACHE_SIZE:
            self._keys.pop(next(iter(self._keys)))
        self._keys[url] = key
        self.fetched += 1
        return key

    async def visit(self, url: str) -> None:
        """GET a ``SubscribeURL`` (confirming a subscription); raises :class:`Unverified` for
        a URL that is not SNS's, :class:`httpx.HTTPError` when the visit fails."""
        if not self.url_allowed(url):
            raise Unverified(f"the SubscribeURL is not Amazon SNS's: {url[:200]!r}")
        answer = await self.client().get(url, timeout=self.timeout)
        answer.raise_for_status()

    async def close(self) -> None:
        if self._own_client and self._client is not None:
            await self._client.aclose()
            self._client = None


class SNSMessage:
    """One SNS message read from a request body, checked by :meth:`verify`."""

    def __init__(self, fields: Mapping[str, Any]) -> None:
        self.fields = fields

    @classmethod
    def parse(cls, data: Any) -> SNSMessage:
        """The message of a JSON document, or :class:`Malformed`."""
        if not isinstance(data, dict) or data.get("Type") not in _TYPES:
            raise Malformed("not an SNS message (no Type Notification or SubscriptionConfirmation)")
        return cls(data)

    @property
    def type(self) -> str:
        return str(self.fields["Type"])

    @property
    def topic_arn(self) -> str:
        return str(self.fields.get("TopicArn") or "")

    @property
    def message(self) -> str:
        return str(self.fields.get("Message") or "")

    async def verify(
        self, topic_arns: Collection[str], certificates: SigningCertificates, now: float
    ) -> None:
        """Check the topic and the signature; :class:`Unverified` when either fails."""
        if self.topic_arn not in topic_arns:
            raise Unverified(f"the topic {self.topic_arn[:300]!r} is not in topic_arns")
        version = str(self.fields.get("SignatureVersion") or "")
        algorithm = _HASHES.get(version)
        if algorithm is None:
            raise Unverified(f"unknown SignatureVersion {version[:20]!r} (SNS uses 1 and 2)")
        signed = string_to_sign(self.fields)
        try:
            signature = base64.b64decode(str(self.fields.get("Signature") or ""), validate=True)
        except (binascii.Error, ValueError):
            raise Unverified("the Signature is not base64") from None
        url = self.fields.get("SigningCertURL") or self.fields.get("SigningCertUrl")
        if not isinstance(url, str):
            raise Unverified("the SNS message has no SigningCertURL")
        key = await certificates.key(url, now)
        try:
            key.verify(signature, signed, padding.PKCS1v15(), algorithm())
        except InvalidSignature:
            raise Unverified("the SNS signature does not match") from None

    async def confirm(self, certificates: SigningCertificates) -> None:
        """Confirm a subscription: visit its ``SubscribeURL``."""
        url = self.fields.get("SubscribeURL")
        if not isinstance(url, str):
            raise Unverified("the SubscriptionConfirmation has no SubscribeURL")
        await certificates.visit(url)
