"""What the provider API transports (SendGrid, Postmark, Mailgun, Amazon SES) share: an httpx
client with timeouts, the relay URL forms, the mapping of HTTP answers to response classes, and
reading the stored MIME message for the providers that want its parts as JSON.

A provider module says how to build its request (:meth:`ProviderTransport.calls`) and how to
read its answer (:meth:`ProviderTransport.read_answer`); everything else is here:

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
- **Secrets.** API keys travel only in request headers; a transport's ``name`` (recorded with
  every attempt) never contains them, nor does any response text.
"""

from __future__ import annotations

import abc
import asyncio
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from email import policy as email_policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import getaddresses, parsedate_to_datetime
from typing import Any
from urllib.parse import parse_qsl, unquote

import httpx

from postlane.classify import ReplyClass, classify
from postlane.clock import Clock, SystemClock
from postlane.config import DeliveryConfig
from postlane.errors import ConfigError
from postlane.transports.base import Envelope, Response, no_reply

__all__ = [
    "Accepted",
    "Call",
    "ParsedMessage",
    "ProviderTransport",
    "ProviderURL",
    "Refused",
    "parse_retry_after",
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


Outcome = Accepted | Refused


@dataclass(frozen=True)
class Call:
    """One HTTP request and the recipients it delivers to."""

    request: httpx.Request
    recipients: tuple[str, ...]
    #: what the provider module needs to read the answer (e.g. which JSON field is which address)
    context: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ProviderURL:
    """A provider relay URL, ``scheme://CREDENTIALS[@WHERE][?option=value&...]``, split up.

    ``credentials`` and ``where`` are percent-decoded (a secret with ``/`` or ``@`` in it must be
    written ``%2F``, ``%40``).
    """

    scheme: str
    credentials: str
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


def secret_from(value: str, env: Mapping[str, str], variable: str, what: str) -> str:
    """``value`` if given, else ``$variable``; a :class:`ConfigError` when neither is set."""
    secret = value or env.get(variable, "")
    if not secret:
        raise ConfigError(f"delivery.relay: no {what}: put it in the URL or set ${variable}")
    return secret


@dataclass(frozen=True)
class Attachment:
    filename: str | None
    content_type: str
    content: bytes
    content_id: str | None
    inline: bool


@dataclass
class ParsedMessage:
    """The parts of a stored message that JSON APIs want: addresses, subject, bodies,
    attachments, and the other header fields to pass through."""

    sender: Address | None
    reply_to: list[Address]
    to: list[str]
    cc: list[str]
    subject: str
    text: str | None
    html: str | None
    attachments: list[Attachment] = field(default_factory=list)
    headers: list[tuple[str, str]] = field(default_factory=list)
    #: display names of the To and Cc addresses, by lower-cased address
    names: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, content: bytes, *, exclude_headers: frozenset[str]) -> ParsedMessage:
        """Read ``content``; header fields named in ``exclude_headers`` (lower case) are the
        ones the API sets from its own fields, the others are passed through."""
        message = BytesParser(policy=email_policy.default).parsebytes(content)
        assert isinstance(message, EmailMessage)
        text_part = message.get_body(preferencelist=("plain",))
        html_part = message.get_body(preferencelist=("html",))
        attachments = []
        for part in message.walk():
            if part.is_multipart() or part is text_part or part is html_part:
                continue
            payload = part.get_payload(decode=True)
            content_id = part.get("Content-ID")
            attachments.append(
                Attachment(
                    filename=part.get_filename(),
                    content_type=part.get_content_type(),
                    content=payload if isinstance(payload, bytes) else b"",
                    content_id=str(content_id).strip("<> ") if content_id else None,
                    inline=part.get_content_disposition() != "attachment"
                    and content_id is not None,
                )
            )
        to, cc = _addresses(message, "to"), _addresses(message, "cc")
        return cls(
            sender=_first_address(message, "from"),
            reply_to=_addresses(message, "reply-to"),
            to=[a.addr_spec.lower() for a in to],
            cc=[a.addr_spec.lower() for a in cc],
            subject=str(message.get("subject", "")),
            text=_content(text_part),
            html=_content(html_part),
            attachments=attachments,
            headers=[
                (name, str(value))
                for name, value in message.items()
                if name.lower() not in exclude_headers
            ],
            names={a.addr_spec.lower(): a.display_name for a in to + cc if a.display_name},
        )

    def mailbox(self, address: str) -> tuple[str, str | None]:
        """``address`` and the display name the message's headers give it, if any."""
        return address, self.names.get(address.lower())

    def split(self, recipients: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
        """The recipients as To, Cc and Bcc: where the message's headers show them (a recipient
        in neither To nor Cc is a Bcc)."""
        to: list[str] = []
        cc: list[str] = []
        bcc: list[str] = []
        for recipient in recipients:
            lowered = recipient.lower()
            (to if lowered in self.to else cc if lowered in self.cc else bcc).append(recipient)
        return to, cc, bcc


def _addresses(message: EmailMessage, name: str) -> list[Address]:
    out: list[Address] = []
    for value in message.get_all(name, []):
        addresses = getattr(value, "addresses", None)
        if addresses is not None:
            out.extend(addresses)
        else:  # an unparsable header: fall back to the plain parser
            out.extend(
                Address(display_name=display, addr_spec=spec)
                for display, spec in getaddresses([str(value)])
                if "@" in spec
            )
    return out


def _first_address(message: EmailMessage, name: str) -> Address | None:
    found = _addresses(message, name)
    return found[0] if found else None


def _content(part: Any) -> str | None:
    if part is None:
        return None
    try:
        text = str(part.get_content())
    except (LookupError, ValueError):  # an unknown charset: the bytes, decoded leniently
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes):
            return None
        text = payload.decode("utf-8", "replace")
    return text.replace("\r\n", "\n")  # stored with CRLF (SMTP's); JSON bodies use LF


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - now)


def json_or_none(answer: httpx.Response) -> Any:
    try:
        return answer.json()
    except ValueError:
        return None


def short(text: str) -> str:
    """One line, at most :data:`MAX_REASON` characters."""
    text = " ".join(text.split())
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."


class ProviderTransport(abc.ABC):
    """Send through a provider's HTTP API (see the module docstring)."""

    #: the provider's name: the throttle destination every delivery is charged to
    provider: str
    #: where the API is when no ``base_url`` is given
    default_base_url: str

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

    @abc.abstractmethod
    def calls(self, envelope: Envelope, recipients: Sequence[str]) -> list[Call]:
        """The request(s) that deliver ``envelope`` to ``recipients`` (usually one)."""

    @abc.abstractmethod
    def read_answer(self, answer: httpx.Response, call: Call) -> Outcome:
        """What the provider's answer to ``call`` means."""

    def default_outcome(self, answer: httpx.Response, reason: str) -> Outcome:
        """The class an HTTP status means when the provider's own codes say nothing more."""
        status = answer.status_code
        if 200 <= status < 300:
            return Accepted()
        if status == 429:
            return Refused(
                ReplyClass.THROTTLED, reason, status, retry_after=self.retry_after(answer)
            )
        if status >= 500 or status == 408:
            return Refused(ReplyClass.TEMPORARY, reason, status)
        if status in (401, 403, 404, 405, 407):
            return Refused(ReplyClass.CONNECTION, reason, status)
        return Refused(ReplyClass.MESSAGE_ERROR, reason, status)

    def retry_after(self, answer: httpx.Response) -> float | None:
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
            return no_reply(text, self.name, refused.cls)
        text = f"{code} {enhanced} {self.provider}: {reason}{status}"
        failure = None if classify(text).cls is refused.cls else refused.cls
        return Response(code, text, self.name, failure, refused.retry_after)

    async def close(self) -> None:
        await self._client.aclose()


def from_env(env: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if env is None else env
