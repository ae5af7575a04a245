"""What the provider API transports (SendGrid, Postmark, Mailgun, Amazon SES) share: the relay
URL and its credentials, an httpx client with timeouts, sending the calls, and the mapping of
HTTP answers to responses.

A provider module holds only what is its own: its relay URL's arguments
(:meth:`ProviderTransport.url_arguments`), how a request carries its credentials
(:meth:`~ProviderTransport.authenticate`), the request's payload
(:meth:`~ProviderTransport.calls`) and how its answers read
(:meth:`~ProviderTransport.read_answer`). Everything else is here:

- **Relay URLs.** ``scheme://CREDENTIALS[@WHERE][?option=value&...]``, percent-decoded; a
  credential missing from the URL is read from the provider's environment variable;
  ``?base_url=`` points at a simulator or proxy, ``?region=`` picks one of the provider's API
  hosts. ``[delivery]``'s timeouts and pool size apply.
- **One answer for many recipients.** An API call accepts or refuses the whole message. When a
  provider names the recipients at fault (SendGrid's ``personalizations.0.to.1.email``,
  Postmark's "Found inactive addresses: ..."), those get the refusal and the message is sent
  again, once, to the others. When it only says "a recipient is invalid" without saying which,
  the recipients are sent one call each to find out. So a bad address never holds up, nor
  bounces, the other recipients of its message.
- **Classes.** A refusal becomes a :class:`~postlane.transports.base.Response` whose text is a
  synthetic SMTP reply (``550 5.1.1 sendgrid: ... (HTTP 400)``) that ``postlane.classify``
  reads as the intended class; if the shipped rules ever read it otherwise (a provider's wording
  can match a rule), the class is set explicitly. Defaults by status: 2xx delivered; 429
  throttled with ``Retry-After`` honoured; 5xx and 408 temporary; 401/403/404 and network
  failures ``connection`` (a configuration or account problem: retried and pausing the provider,
  never dead-lettering mail, the same reasoning as SMTP AUTH failures); 413 and other 4xx
  ``message_error``. Providers refine these from their documented error codes.
- **Secrets.** API keys travel only in request headers, added by
  :meth:`~ProviderTransport.authenticate` and otherwise kept as :class:`Secret` (masked in any
  repr or text); a transport's ``name`` (recorded with every attempt) never contains them, nor
  does any response text or configuration error.
"""

from __future__ import annotations

import abc
import asyncio
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, ClassVar, Self
from urllib.parse import parse_qsl, unquote

import httpx

from postlane.classify import ReplyClass, classify
from postlane.clock import Clock, SystemClock
from postlane.config import DeliveryConfig
from postlane.errors import ConfigError
from postlane.toml_values import is_decimal
from postlane.transports.base import BaseTransport, Envelope, Response, interrupted

__all__ = [
    "Accepted",
    "Call",
    "Outcome",
    "ProviderTransport",
    "ProviderURL",
    "Refused",
    "Secret",
    "envelope_tags",
    "json_object",
    "parse_retry_after",
    "secret_from",
]

#: a synthetic reply code and enhanced status per class, for texts that classify() reads back
_SYNTHETIC: dict[ReplyClass, tuple[int | None, str]] = {
    ReplyClass.THROTTLED: (421, "4.7.0"),
    ReplyClass.TEMPORARY: (451, "4.3.0"),
    ReplyClass.SOFT_BOUNCE: (452, "4.2.2"),
    ReplyClass.HARD_BOUNCE: (550, "5.1.1"),
    ReplyClass.POLICY_BLOCK: (550, "5.7.1"),
    ReplyClass.MESSAGE_ERROR: (550, "5.6.0"),
    ReplyClass.CONNECTION: (None, ""),
}
#: longest provider error text kept in a response (they are short; a proxy's HTML page is not)
MAX_REASON = 500


@dataclass(frozen=True)
class Accepted:
    """The provider took the message for these recipients."""

    message_id: str | None = None


@dataclass(frozen=True)
class Refused:
    """The provider refused the call.

    ``recipients`` names the recipients at fault (the others are sent again without them);
    ``about_a_recipient`` says the refusal is about some recipient without naming it (the
    recipients are then tried one call each); neither: the refusal is every recipient's.
    """

    cls: ReplyClass
    reason: str
    status: int | None = None
    recipients: frozenset[str] | None = None
    about_a_recipient: bool = False
    retry_after: float | None = None
    #: why this call can never work until the configuration changes (see Response)
    misconfigured: str | None = None


#: HTTP statuses that say the configuration is wrong, not the message or the moment
_MISCONFIGURED = {
    401: "the provider rejected the configured credentials (HTTP 401): check the relay URL's key",
    403: "the provider refused the configured credentials (HTTP 403): check the key and its rights",
    404: "no provider API at the configured URL (HTTP 404): check the relay URL",
    405: "no provider API at the configured URL (HTTP 405): check the relay URL",
    407: "a proxy asks for credentials (HTTP 407): check the proxy settings",
}


Outcome = Accepted | Refused


@dataclass(frozen=True)
class Call:
    """One HTTP request and the recipients it delivers to."""

    request: httpx.Request
    recipients: tuple[str, ...]
    #: what the provider module needs to read the answer (e.g. which JSON field is which address)
    context: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Secret:
    """A credential. Its repr and text are masked, so it shows in no log line, traceback or
    error message; :meth:`reveal` is for the request that carries it."""

    _value: str = field(repr=False)

    def reveal(self) -> str:
        return self._value

    def __str__(self) -> str:
        return "********"


@dataclass(frozen=True)
class ProviderURL:
    """A provider relay URL, ``scheme://CREDENTIALS[@WHERE][?option=value&...]``, split up.

    ``credentials`` and ``where`` are percent-decoded (a secret with ``/`` or ``@`` in it must be
    written ``%2F``, ``%40``).
    """

    scheme: str
    #: (never in a repr: it is usually a secret)
    credentials: str = field(repr=False)
    #: what follows the last ``@``; None when there is no ``@``
    where: str | None
    options: dict[str, str]

    @classmethod
    def parse(cls, url: str, scheme: str, known_options: Sequence[str]) -> ProviderURL:
        prefix = f"{scheme}://"
        if not url.lower().startswith(prefix):
            raise ConfigError(f"delivery.relay: expected {prefix}..., got a different scheme")
        rest, _, query = url[len(prefix) :].partition("?")
        rest = rest.rstrip("/")
        credentials, at, after = rest.rpartition("@")
        where: str | None = unquote(after) if at else None
        if not at:
            credentials = rest
        options = dict(parse_qsl(query, keep_blank_values=True))
        unknown = sorted(set(options) - set(known_options) - {"base_url"})
        if unknown:
            known = ", ".join(sorted({*known_options, "base_url"}))
            raise ConfigError(
                f"delivery.relay: unknown option {unknown[0]!r} for {prefix} (known: {known})"
            )
        return cls(scheme, unquote(credentials), where, options)

    def credentials_at(self) -> tuple[str, str]:
        """``(CREDENTIALS, PLACE)`` of ``scheme://CREDENTIALS@PLACE``; ``("", PLACE)`` of
        ``scheme://PLACE``, whose credentials come from the environment."""
        if self.where is None:
            return "", self.credentials
        return self.credentials, self.where

    def base_url(self, regions: Mapping[str, str]) -> str | None:
        """``?base_url=``, else the API of ``?region=`` (one of ``regions``, the first by
        default); None when the provider has no regions."""
        base_url = self.options.get("base_url") or None
        if not regions:
            return base_url
        region = self.options.get("region", next(iter(regions)))
        if region not in regions:
            raise ConfigError(
                f"delivery.relay: {self.scheme} region must be one of {sorted(regions)}"
            )
        return base_url or regions[region]


def secret_from(value: str, env: Mapping[str, str], variable: str, what: str) -> str:
    """``value`` if given, else ``$variable``; a :class:`ConfigError` when neither is set."""
    secret = value or env.get(variable, "")
    if not secret:
        raise ConfigError(f"delivery.relay: no {what}: put it in the URL or set ${variable}")
    return secret


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if is_decimal(value):
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - now)


def json_object(answer: httpx.Response) -> dict[str, Any]:
    """The answer's JSON object; empty when its body is not one (a proxy's page, plain text)."""
    try:
        body = answer.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def envelope_tags(envelope: Envelope) -> dict[str, str]:
    """What names the message in the provider's event webhooks, which have no idempotency key
    of their own: the queue id, and the message's idempotency key if it has one (a duplicate
    sent after a timeout can at least be recognised)."""
    tags = {"postlane_queue_id": envelope.queue_id}
    if envelope.idempotency_key:
        tags["postlane_idempotency_key"] = envelope.idempotency_key
    return tags


def short(text: str) -> str:
    """One line, at most :data:`MAX_REASON` characters."""
    text = " ".join(text.split())
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."


class ProviderTransport(BaseTransport, abc.ABC):
    """Send through a provider's HTTP API (see the module docstring)."""

    #: the provider's name: its relay URL's scheme, and the throttle destination every
    #: delivery is charged to
    provider: ClassVar[str]
    #: where the API is when no ``base_url`` is given
    default_base_url: ClassVar[str]
    #: the relay URL's options besides ``base_url`` (and ``region`` when there are ``regions``)
    url_options: ClassVar[tuple[str, ...]] = ()
    #: the API's base URL by ``?region=`` name, the default first; empty: no regions
    regions: ClassVar[Mapping[str, str]] = {}

    def __init__(
        self,
        *,
        base_url: str | None = None,
        timeout: float = 30.0,
        connect_timeout: float = 10.0,
        connections: int = 20,
        clock: Clock | None = None,
    ) -> None:
        self.base_url = (base_url or self.default_base_url).rstrip("/")
        host = httpx.URL(self.base_url).netloc.decode("ascii")
        #: what attempts record: the provider and where its API is, never a credential
        self.name = f"{self.provider}://{host}"
        self.shared_destination = self.provider
        self.clock: Clock = clock or SystemClock()
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
            follow_redirects=False,
        )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"

    @classmethod
    def from_url(
        cls,
        url: str,
        delivery: DeliveryConfig | None = None,
        *,
        env: Mapping[str, str] | None = None,
    ) -> Self:
        """The transport of relay ``url`` (its forms: the provider module's docstring) with
        ``[delivery]``'s timeouts and pool size; credentials the URL leaves out are read from
        ``env`` (default: the process's environment)."""
        known_options = (*cls.url_options, "region") if cls.regions else cls.url_options
        parsed = ProviderURL.parse(url, cls.provider, known_options)
        arguments = cls.url_arguments(parsed, os.environ if env is None else env)
        base_url = parsed.base_url(cls.regions)
        return cls(**arguments, base_url=base_url, **cls.delivery_settings(delivery))

    @staticmethod
    def delivery_settings(delivery: DeliveryConfig | None) -> dict[str, Any]:
        """Constructor arguments from ``[delivery]``: its timeouts and pool size."""
        if delivery is None:
            return {}
        return {
            "timeout": delivery.command_timeout,
            "connect_timeout": delivery.connect_timeout,
            "connections": delivery.connections_per_host,
        }

    # -- what a provider module provides --------------------------------------------------------

    @classmethod
    @abc.abstractmethod
    def url_arguments(cls, url: ProviderURL, env: Mapping[str, str]) -> dict[str, Any]:
        """The constructor's arguments that the relay URL gives (credentials from ``env`` when
        the URL has none), but ``base_url``."""

    @abc.abstractmethod
    def authenticate(self, request: httpx.Request) -> None:
        """Add the credentials to ``request``: a header, or a signature over it."""

    @abc.abstractmethod
    def calls(self, envelope: Envelope, recipients: Sequence[str]) -> list[Call]:
        """The request(s) that deliver ``envelope`` to ``recipients`` (usually one)."""

    @abc.abstractmethod
    def read_answer(self, answer: httpx.Response, call: Call) -> Outcome:
        """What the provider's answer to ``call`` means."""

    def post(
        self,
        path: str,
        *,
        headers: Mapping[str, str] | None = None,
        json: Any = None,
        content: bytes | None = None,
        data: Mapping[str, Any] | None = None,
        files: Mapping[str, tuple[str, bytes, str]] | None = None,
    ) -> httpx.Request:
        """A POST to ``path`` of the API, carrying the credentials (:meth:`authenticate`)."""
        request = self._client.build_request(
            "POST",
            f"{self.base_url}{path}",
            headers=headers,
            json=json,
            content=content,
            data=data,
            files=files,
        )
        self.authenticate(request)
        return request

    def refused(
        self,
        answer: httpx.Response,
        cls: ReplyClass,
        reason: str,
        recipients: frozenset[str] | None = None,
        *,
        about_a_recipient: bool = False,
    ) -> Refused:
        """``answer`` refuses the call as ``cls``: with its status and the wait it asks for
        (:meth:`retry_after`): a 503's Retry-After delays a counted retry too."""
        retry_after = self.retry_after(answer)
        misconfigured = _MISCONFIGURED.get(answer.status_code)
        return Refused(
            cls,
            reason,
            answer.status_code,
            recipients,
            about_a_recipient,
            retry_after,
            misconfigured if cls is ReplyClass.CONNECTION else None,
        )

    def default_outcome(self, answer: httpx.Response, reason: str) -> Outcome:
        """The class an HTTP status means when the provider's own codes say nothing more."""
        status = answer.status_code
        if 200 <= status < 300:
            return Accepted()
        if status == 429:
            return self.refused(answer, ReplyClass.THROTTLED, reason)
        if status >= 500 or status == 408:
            return self.refused(answer, ReplyClass.TEMPORARY, reason)
        if status in (401, 403, 404, 405, 407):
            return self.refused(answer, ReplyClass.CONNECTION, reason)
        return self.refused(answer, ReplyClass.MESSAGE_ERROR, reason)

    def retry_after(self, answer: httpx.Response) -> float | None:
        """The wait ``answer`` asks for: its ``Retry-After``."""
        return parse_retry_after(answer.headers.get("retry-after"), self.clock.now())

    # -- sending --------------------------------------------------------------------------------

    async def send(self, envelope: Envelope) -> list[Response]:
        """Deliver to every recipient; one response per recipient, in order."""
        results: dict[str, Response] = {}
        await self._deliver(envelope, tuple(dict.fromkeys(envelope.recipients)), results, True)
        return [results[recipient] for recipient in envelope.recipients]

    async def _deliver(
        self,
        envelope: Envelope,
        recipients: tuple[str, ...],
        results: dict[str, Response],
        may_retry: bool,
    ) -> None:
        calls = self.calls(envelope, recipients)
        if len(calls) == 1:
            await self._settle(envelope, calls[0], results, may_retry)
            return
        async with asyncio.TaskGroup() as group:
            for call in calls:
                group.create_task(self._settle(envelope, call, results, may_retry))

    async def _settle(
        self, envelope: Envelope, call: Call, results: dict[str, Response], may_retry: bool
    ) -> None:
        """Make ``call`` and record what each of its recipients got (see the module docstring
        for the second try without the recipients at fault)."""
        outcome = await self._call(call)
        if isinstance(outcome, Accepted):
            accepted = self.accepted(outcome)
            results.update((recipient, accepted) for recipient in call.recipients)
            return
        refusal = self.response(outcome)
        named = [r for r in call.recipients if r.lower() in (outcome.recipients or ())]
        # recipients named but none of this call's (a wording we misread): never blame them
        # all at once, find out one call each
        about_a_recipient = outcome.about_a_recipient or (
            outcome.recipients is not None and not named
        )
        if named:
            results.update((recipient, refusal) for recipient in named)
            others = tuple(r for r in call.recipients if r not in named)
            if others and may_retry:
                await self._deliver(envelope, others, results, False)
            elif others:
                not_sent = self.response(
                    Refused(
                        ReplyClass.TEMPORARY,
                        f"not sent, the call was refused for other recipients: {outcome.reason}",
                        outcome.status,
                    )
                )
                results.update((recipient, not_sent) for recipient in others)
        elif about_a_recipient and len(call.recipients) > 1 and may_retry:
            async with asyncio.TaskGroup() as group:  # which one? one call each tells
                for recipient in call.recipients:
                    group.create_task(self._deliver(envelope, (recipient,), results, False))
        else:
            results.update((recipient, refusal) for recipient in call.recipients)

    async def _call(self, call: Call) -> Outcome:
        try:
            with interrupted.counting():  # the provider may have the request from the start
                answer = await self._client.send(call.request)
        except httpx.TimeoutException:
            # the provider may or may not have taken it: retried (at most one duplicate)
            return Refused(ReplyClass.CONNECTION, f"{self.name}: timed out")
        except httpx.HTTPError as exc:
            detail = str(exc) or type(exc).__name__
            return Refused(ReplyClass.CONNECTION, f"{self.name}: {detail}")
        return self.read_answer(answer, call)

    def accepted(self, outcome: Accepted) -> Response:
        identifier = f" (id {outcome.message_id})" if outcome.message_id else ""
        return Response(
            250, f"250 2.0.0 {self.provider} accepted the message{identifier}", self.name
        )

    def response(self, refused: Refused) -> Response:
        """A refusal as a response that ``classify`` reads as ``refused.cls``."""
        status = f" (HTTP {refused.status})" if refused.status is not None else ""
        reason = short(refused.reason)
        code, enhanced = _SYNTHETIC[refused.cls]
        if code is None:
            text = f"{self.provider}: {reason}{status}"
            return Response(None, text, self.name, refused.cls, misconfigured=refused.misconfigured)
        text = f"{code} {enhanced} {self.provider}: {reason}{status}"
        failure = None if classify(text).cls is refused.cls else refused.cls
        return Response(code, text, self.name, failure, refused.retry_after, refused.misconfigured)

    async def close(self) -> None:
        await self._client.aclose()
