"""Provider webhooks as the configuration gives them: ``[webhooks.ses]``, ``[webhooks.sendgrid]``,
``[webhooks.postmark]`` and ``[webhooks.mailgun]``, each the key that proves a request comes from
that provider. A provider without its table has no endpoint (404).

::

    [webhooks.ses]
    topic_arns = ["arn:aws:sns:eu-west-1:123456789012:postlane-feedback"]

    [webhooks.sendgrid]
    verification_key = "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE..."  # or verification_key_file
    max_age = "10m"               # signed timestamps older than this are refused

    [webhooks.postmark]
    username = "postmark"         # the basic auth credentials put in the webhook's URL
    password = "${POSTMARK_WEBHOOK_PASSWORD}"

    [webhooks.mailgun]
    signing_key = "key-..."       # or signing_key_file; Mailgun's HTTP webhook signing key
    max_age = "5m"

Values take ``${VAR}`` and the secrets a ``KEY_file`` form, as ``[[webhooks.out]]`` does:
:mod:`postlane.config` resolves those (through the ``resolve`` callable it passes) and this
module checks what they say. Every mistake is a :class:`~postlane.errors.ConfigError` naming
the key, never showing a secret.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_der_public_key

from postlane import toml_values
from postlane.errors import ConfigError

__all__ = [
    "PROVIDERS",
    "MailgunWebhook",
    "PostmarkWebhook",
    "ProviderWebhooks",
    "Resolve",
    "SESWebhook",
    "SendGridWebhook",
    "provider_webhooks_from_config",
]

#: the providers whose webhooks postlane takes, as their ``[webhooks.NAME]`` tables are named
PROVIDERS = ("ses", "sendgrid", "postmark", "mailgun")
#: ``resolve(table, where, file_keys)``: the table's values with ``${VAR}`` expanded and each
#: ``KEY_file`` of ``file_keys`` read (its secret remembered, so no error shows it)
Resolve = Callable[[Mapping[str, Any], str, Collection[str]], dict[str, Any]]

#: an SNS topic's ARN: arn:PARTITION:sns:REGION:ACCOUNT:NAME
_TOPIC_ARN = re.compile(r"arn:aws(-[a-z]+)*:sns:[a-z0-9-]+:\d{12}:[A-Za-z0-9_.-]{1,256}")
#: how old a signed timestamp may be by default (Mailgun's own examples allow a few minutes;
#: SendGrid signs each attempt when it posts it)
DEFAULT_MAX_AGE = 300.0


@dataclass(frozen=True)
class SESWebhook:
    """Amazon SES events through SNS: only notifications of these topics are taken (the
    signature is checked against the signing certificate SNS names)."""

    topic_arns: tuple[str, ...]


@dataclass(frozen=True)
class SendGridWebhook:
    """SendGrid's signed Event Webhook: ``verification_key`` is the base64 public key (ECDSA
    P-256, DER) SendGrid shows when signing is turned on."""

    verification_key: str = field(repr=False)
    max_age: float = DEFAULT_MAX_AGE

    @cached_property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        return _public_key(self.verification_key)


@dataclass(frozen=True)
class PostmarkWebhook:
    """Postmark's webhooks, with the basic auth credentials given in the webhook's URL."""

    username: str = field(repr=False)
    password: str = field(repr=False)


@dataclass(frozen=True)
class MailgunWebhook:
    """Mailgun's webhooks, signed with the account's HTTP webhook signing key."""

    signing_key: str = field(repr=False)
    max_age: float = DEFAULT_MAX_AGE


@dataclass(frozen=True)
class ProviderWebhooks:
    """The configured provider webhooks (None: that provider's endpoint answers 404)."""

    ses: SESWebhook | None = None
    sendgrid: SendGridWebhook | None = None
    postmark: PostmarkWebhook | None = None
    mailgun: MailgunWebhook | None = None

    def __repr__(self) -> str:  # never the keys
        configured = ", ".join(name for name in PROVIDERS if getattr(self, name) is not None)
        return f"ProviderWebhooks({configured or 'none'})"


def provider_webhooks_from_config(
    section: Mapping[str, Any], resolve: Resolve, prefix: str = "webhooks"
) -> ProviderWebhooks:
    """The provider tables of ``[webhooks]`` (``section``; other tables are not looked at)."""
    found: dict[str, Any] = {}
    for name in PROVIDERS:
        if name not in section:
            continue
        where = f"{prefix}.{name}"
        table = section[name]
        if not isinstance(table, Mapping):
            raise ConfigError(f"{where}: expected a table ([{where}]), got {table!r}")
        read, file_keys = _READERS[name]
        values = _Table(resolve(table, where, file_keys), where)
        found[name] = read(values)
        values.done()
    return ProviderWebhooks(**found)


class _Table:
    """One provider's resolved table: each key read once, unknown keys refused at the end."""

    def __init__(self, values: dict[str, Any], where: str) -> None:
        self.values = values
        self.where = where
        self.read: set[str] = set()

    def get(self, key: str, reader: toml_values.Reader[Any], default: Any = None) -> Any:
        self.read.add(key)
        if key not in self.values:
            if default is None:
                raise ConfigError(f"{self.where}: give {key}")
            return default
        try:
            return reader(self.values[key])
        except ValueError as exc:
            shown = (
                exc.without_value()
                if isinstance(exc, toml_values.UnexpectedValue) and _secret(key)
                else str(exc)
            )
            raise ConfigError(f"{self.where}.{key}: {shown}") from None

    def done(self) -> None:
        unknown = sorted(set(self.values) - self.read)
        if unknown:
            known = ", ".join(sorted(self.read | {f"{k}_file" for k in self.read if _secret(k)}))
            raise ConfigError(f"unknown key {self.where}.{unknown[0]} (known keys: {known})")


def _secret(key: str) -> bool:
    return key in ("verification_key", "signing_key", "username", "password")


def _text(value: Any) -> str:
    text = toml_values.string(value).strip()
    if not text:
        raise ValueError("expected a non-empty string")
    return text


#: the shortest secret a guesser is to meet (the API's tokens need as many characters)
MIN_SECRET_LENGTH = 16


def _strong(value: Any) -> str:
    """A secret long enough not to be guessed (never shown in the error)."""
    text = _text(value)
    if len(text) < MIN_SECRET_LENGTH:
        raise ValueError(
            f"{len(text)} characters; a secret needs at least {MIN_SECRET_LENGTH} (make one "
            "with `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
        )
    return text


def _topic_arns(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise toml_values.expected(
            'a list of SNS topic ARNs ["arn:aws:sns:REGION:ACCOUNT:NAME"]', value
        )
    arns = tuple(toml_values.string(item) for item in value)
    for arn in arns:
        if not _TOPIC_ARN.fullmatch(arn):
            raise ValueError(f"{arn!r} is not an SNS topic ARN (arn:aws:sns:REGION:ACCOUNT:NAME)")
    return arns


def _public_key(text: str) -> ec.EllipticCurvePublicKey:
    """SendGrid's verification key: base64 of a DER SubjectPublicKeyInfo on P-256 (PEM, with
    its armour, is taken too)."""
    body = "".join(line for line in text.strip().splitlines() if not line.startswith("-----"))
    try:
        key = load_der_public_key(base64.b64decode(body, validate=True))
    except (binascii.Error, ValueError):
        raise ValueError(
            "not a public key (expected the base64 key SendGrid shows for the signed Event "
            "Webhook; not shown: it is a secret)"
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("not an ECDSA P-256 public key (SendGrid signs with P-256)")
    return key


def _verification_key(value: Any) -> str:
    text = _text(value)
    _public_key(text)
    return text


def _ses(table: _Table) -> SESWebhook:
    return SESWebhook(topic_arns=table.get("topic_arns", _topic_arns))


def _sendgrid(table: _Table) -> SendGridWebhook:
    return SendGridWebhook(
        verification_key=table.get("verification_key", _verification_key),
        max_age=table.get("max_age", toml_values.duration, DEFAULT_MAX_AGE),
    )


def _postmark(table: _Table) -> PostmarkWebhook:
    return PostmarkWebhook(
        username=table.get("username", _text), password=table.get("password", _strong)
    )


def _mailgun(table: _Table) -> MailgunWebhook:
    return MailgunWebhook(
        signing_key=table.get("signing_key", _strong),
        max_age=table.get("max_age", toml_values.duration, DEFAULT_MAX_AGE),
    )


#: each provider's table: how it is read, and the keys that may be given as ``KEY_file``
_READERS: dict[str, tuple[Callable[[_Table], Any], tuple[str, ...]]] = {
    "ses": (_ses, ()),
    "sendgrid": (_sendgrid, ("verification_key",)),
    "postmark": (_postmark, ("username", "password")),
    "mailgun": (_mailgun, ("signing_key",)),
}
