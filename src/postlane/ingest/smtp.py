"""SMTP submission: any language's mail library can hand messages to postlane.

Clients in ``trusted_networks`` may submit without AUTH; everyone else must AUTH (PLAIN or
LOGIN), and AUTH is offered only after STARTTLS, so passwords never cross in clear. Nobody else
can relay: this is never an open relay. SIZE is announced and enforced, each RCPT is answered on
its own, a client's Message-ID is kept (one is added when missing), and 250 is sent only after
the message is durably stored.

What the listener bounds (``[smtp]`` keys; docs/ingest.md has the table):

- connections: ``max_connections`` at once, ``max_connections_per_address`` from one address
  outside trusted_networks; one more gets ``421 4.7.0`` at once and is closed, unread;
- time: each command within ``command_timeout``, the whole message within ``data_timeout``;
  a silent client gets ``421 4.4.2`` and is closed;
- AUTH guessing: failure budgets, growing delays, checks off the event loop
  (:mod:`postlane.ingest.smtp_auth`).

Answers that are postlane's own trouble are temporary, never 5xx: the store failing is
``421 4.3.0`` (and the connection closes, as 421 says), its disk full ``452 4.3.1`` (as
Postfix says it; the session goes on), any unexpected error ``451 4.3.0`` or
``421 4.3.0``, never with the exception's text; a client retries later and nothing is half
stored (an enqueue is one transaction).

Control headers: ``X-Postlane-Lane``, ``X-Postlane-Idempotency-Key``, ``X-Postlane-Metadata``,
``X-Postlane-Send-At`` and ``X-Postlane-Expires-At``
(as the Django backend reads them) choose the lane, the idempotency key and the metadata, and are
removed from the stored message; any other ``X-Postlane-*`` header is refused (a typo must not
silently send in the wrong lane), but the capture folder's own envelope lines, which are dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from postlane.addresses import parse_address
from postlane.app import AsyncPostlane
from postlane.auth import sender_refusal
from postlane.config import Config
from postlane.errors import (
    ConfigError,
    IdempotencyConflict,
    MessageTooLarge,
    PostlaneError,
    StoreFull,
    StoreUnavailable,
    ValidationError,
)
from postlane.ingest.smtp_auth import AuthGuard
from postlane.ingest.smtp_auth import hash_password as hash_password
from postlane.ingest.smtp_auth import verify_password as verify_password
from postlane.ingest.smtp_listener import OpenConnections
from postlane.ingest.smtp_protocol import Envelope, ServerSettings, Session, SmtpConnection
from postlane.ingest.tally import Tally
from postlane.message import (
    MAX_HEADER_BYTES,
    MAX_RECIPIENTS,
    NULL_SENDER,
    Message,
    rfc5322_date,
    sender_domains,
)
from postlane.metrics import SmtpMetrics

if TYPE_CHECKING:
    from postlane.ingest.door import FrontDoor
    from postlane.metrics import Metrics

log = logging.getLogger("postlane.smtp")

#: failed AUTH attempts on one connection before it is closed
MAX_AUTH_FAILURES = 3
#: RFC 5321 4.5.3.1.5: a reply line is at most 512 octets, its code and CRLF included
MAX_REPLY_LINE = 512
#: the control headers a submitted message may carry (those the Django backend reads)
CONTROL_HEADERS = frozenset(
    {
        "x-postlane-lane",
        "x-postlane-idempotency-key",
        "x-postlane-metadata",
        "x-postlane-send-at",
        "x-postlane-expires-at",
    }
)
#: postlane's own trace headers (the capture folder's envelope): dropped, never refused, so a
#: captured message can be submitted again
_DROPPED_HEADERS = frozenset({"x-postlane-envelope-from", "x-postlane-envelope-to"})
_CONTROL_NAMES = (
    "X-Postlane-Lane, X-Postlane-Idempotency-Key, X-Postlane-Metadata, X-Postlane-Send-At, "
    "X-Postlane-Expires-At"
)


class _Networks:
    #: answers remembered (each connection asks at connect and at MAIL; parsing costs more)
    MEMORY = 4096

    def __init__(self, networks: Sequence[str]) -> None:
        self._networks = [ipaddress.ip_network(n, strict=False) for n in networks]
        self._known: dict[str, bool] = {}

    def __contains__(self, host: object) -> bool:
        key = str(host)
        known = self._known.get(key)
        if known is None:
            if len(self._known) >= self.MEMORY:
                self._known.clear()
            known = self._known[key] = self._contains(key)
        return known

    def _contains(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(str(host))
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in network for network in self._networks)


@dataclasses.dataclass(frozen=True)
class Controls:
    """What a submitted message's control headers ask for."""

    lane: str = "normal"
    idempotency_key: str | None = None
    metadata: dict[str, Any] | None = None
    #: ISO 8601 with a zone, or Unix seconds, as the header gave them (the message checks)
    send_at: str | None = None
    expires_at: str | None = None


def take_control_headers(content: bytes) -> tuple[Controls, bytes]:
    """The ``X-Postlane-*`` headers of a submitted message: what the control headers ask for,
    and the message without any of them. Raises :class:`ValidationError` for an unknown or
    repeated one, or a bad value."""
    # the header section ends at its first empty line, at the latest where the first CRLF CRLF
    # or LF LF is: only that much is looked at, and split in lines only if it names X-Postlane
    # (a 25 MB body is neither copied nor split)
    ends = [i for i in (content.find(b"\r\n\r\n"), content.find(b"\n\n")) if i >= 0]
    head_size = min(ends) if ends else len(content)
    if head_size > MAX_HEADER_BYTES:  # too large to be read line by line: prepare refuses it
        return Controls(), content
    head_end = head_size + 4 if ends else len(content)
    if b"x-postlane-" not in content[:head_end].lower():
        return Controls(), content
    head, body = content[:head_end], content[head_end:]
    values: dict[str, str] = {}
    kept: list[bytes] = []
    lines = head.splitlines(keepends=True)
    taking: str | None = None  # the X-Postlane header whose folded lines are being taken out
    for index, line in enumerate(lines):
        if line in (b"\r\n", b"\n", b"\r"):  # the end of the header section
            kept.extend(lines[index:])
            break
        if line[:1] in (b" ", b"\t"):
            if taking is None:
                kept.append(line)
            elif taking in values:
                values[taking] = f"{values[taking]} {_header_text(line.strip(), taking)}".strip()
            continue
        name, colon, value = line.partition(b":")
        lowered = name.strip().lower().decode("ascii", "replace")
        if not colon or not lowered.startswith("x-postlane-"):
            taking = None
            kept.append(line)
            continue
        taking = lowered
        if lowered in _DROPPED_HEADERS:
            continue
        shown = name.strip().decode("ascii", "replace")
        if lowered not in CONTROL_HEADERS:
            raise ValidationError(f"unknown control header {shown} (known: {_CONTROL_NAMES})")
        if lowered in values:
            raise ValidationError(f"{shown} appears more than once")
        values[lowered] = _header_text(value.strip(), shown)
    else:
        return Controls(), content  # no blank line: no header section (prepare refuses it)
    kept.append(body)
    return _controls(values), b"".join(kept)


def _controls(values: dict[str, str]) -> Controls:
    metadata = None
    if "x-postlane-metadata" in values:
        try:
            metadata = json.loads(values["x-postlane-metadata"])
        except ValueError as exc:
            raise ValidationError(f"X-Postlane-Metadata is not JSON: {exc}") from None
        if not isinstance(metadata, dict):
            raise ValidationError("X-Postlane-Metadata must be a JSON object")
    return Controls(
        lane=values.get("x-postlane-lane", "") or "normal",
        idempotency_key=values.get("x-postlane-idempotency-key") or None,
        metadata=metadata,
        send_at=values.get("x-postlane-send-at") or None,
        expires_at=values.get("x-postlane-expires-at") or None,
    )


def _header_text(value: bytes, name: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise ValidationError(f"{name} is not UTF-8 text") from None


def _refusal(code: str, text: str) -> str:
    """The reply ``code text`` within :data:`MAX_REPLY_LINE` octets: a text that repeats what
    the client sent (a control header's value, an address) is cut, with an ellipsis."""
    reply = f"{code} {text}"
    room = MAX_REPLY_LINE - len(b"\r\n")
    encoded = reply.encode("utf-8")
    if len(encoded) <= room:
        return reply
    return encoded[: room - len("...")].decode("utf-8", "ignore") + "..."


def _describe_not_stored(reasons: dict[str, int]) -> str:
    """``SMTP: 59 submitted message(s) not stored (answered 421/451, the clients try again):
    database or disk is full``."""
    total = sum(reasons.values())
    said = "; ".join(f"{reason} (x{n})" if n > 1 else reason for reason, n in reasons.items())
    return (
        f"SMTP: {total} submitted message(s) not stored (answered 421/451, the clients try "
        f"again): {said}"
    )


class SubmissionHandler:
    """What the submission listener decides (its
    :class:`~postlane.ingest.smtp_protocol.SmtpHandler`): who may submit, per-recipient answers,
    and the durable enqueue."""

    def __init__(self, config: Config, app: AsyncPostlane, metrics: Metrics | None = None) -> None:
        self.app = app
        self.metrics = metrics
        self.smtp_metrics = metrics.smtp if metrics is not None else SmtpMetrics()
        self.config = config
        self.trusted = _Networks(config.smtp.trusted_networks)
        self.hostname = config.smtp.hostname or socket.gethostname()
        self.accepted = 0
        #: messages the store could not take, logged as a line a minute by reason (a full disk
        #: refuses every client: one line for the condition, not one per client)
        self.not_stored = Tally(log, _describe_not_stored, logging.ERROR)

    def _may_submit(self, session: Session) -> bool:
        return session.authenticated or session.peer in self.trusted

    def _senders_of(self, session: Session) -> tuple[str, ...] | None:
        """The sender domains the session's user is bound to (``[smtp] user_senders``); None:
        any domain (an unbound user, a client of a trusted network)."""
        if not session.authenticated or session.auth_data is None:
            return None
        return self.config.smtp.user_senders.get(session.auth_data)

    def mail(self, session: Session, envelope: Envelope, address: str, options: list[str]) -> str:
        if not self._may_submit(session):
            if session.tls_offered and not session.tls:
                return "530 5.7.0 Must issue a STARTTLS command first, then AUTH"
            return "530 5.7.0 Authentication required"
        if address != NULL_SENDER:  # <>: a bounce or an auto-reply, sent on as it came
            try:
                domain = parse_address(address, "sender").domain  # ASCII, as user_senders
            except ValidationError as exc:
                return _refusal("553 5.1.7", exc.message)
            refusal = sender_refusal(self._senders_of(session), [(domain, "")])
            if refusal is not None:  # Postfix's reject_sender_login_mismatch answers so too
                return _refusal("553 5.7.1", f"<{address}>: this user {refusal}")
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    def rcpt(self, session: Session, envelope: Envelope, address: str, options: list[str]) -> str:
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return "452 4.5.3 Too many recipients"
        try:
            parse_address(address, "recipient")
        except ValidationError as exc:
            return _refusal("553 5.1.3", exc.message)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 OK"

    async def data(self, session: Session, envelope: Envelope) -> str:
        content = envelope.content
        if b"\x00" in content:
            return "554 5.6.0 Message refused: it contains NUL bytes, which RFC 5322 forbids"
        try:
            controls, content = take_control_headers(content)
        except ValidationError as exc:
            return _refusal("550 5.6.0", exc.message)
        if not content.strip():  # the Received line added below would pass for a header
            return "554 5.6.0 Message refused: it is empty"
        try:
            received = self._received_header(session)
            message = Message(
                sender=envelope.mail_from or "",
                to=list(envelope.rcpt_tos),
                raw=received + content,
                lane=controls.lane,
                idempotency_key=controls.idempotency_key,
                metadata=controls.metadata,
                send_at=controls.send_at,
                expires_at=controls.expires_at,
            )
            user = session.auth_data
            submitter = f"smtp:{user}" if user else "smtp:trusted"
            # the size limit counts the client's octets (RFC 1870), not the Received line
            limit = self.app.config.smtp.max_size + len(received)
            prepared = self.app.prepare(message, max_size=limit)
            prepared = dataclasses.replace(prepared, submitter=submitter)
            refusal = sender_refusal(self._senders_of(session), sender_domains(prepared))
            if refusal is not None:
                return _refusal("550 5.7.1", f"this user {refusal}")
        except MessageTooLarge as exc:
            return _refusal("552 5.3.4", exc.message)
        except ValidationError as exc:
            if exc.field == "lane":
                return _refusal("550 5.6.0", f"X-Postlane-Lane: {exc.message}")
            if exc.field == "idempotency_key":
                return _refusal("550 5.6.0", f"X-Postlane-Idempotency-Key: {exc.message}")
            return _refusal("554 5.6.0", exc.message)
        except Exception:
            return self._internal_error(session)
        try:
            result = (await self.app.send_prepared([prepared]))[0]
        except ValidationError as exc:
            return _refusal("554 5.6.0", exc.message)
        except IdempotencyConflict as exc:
            return _refusal("554 5.6.0", exc.message)
        except StoreFull as exc:  # as Postfix says it: the session may go on
            self.not_stored.count(exc.message)
            self.smtp_metrics.temporary_failures.labels("store").inc()
            return "452 4.3.1 Insufficient system storage, try again later"
        except StoreUnavailable as exc:
            # the store's text may name its file or host: it goes to the log, not the client
            self.not_stored.count(exc.message)
            self.smtp_metrics.temporary_failures.labels("store").inc()
            return "421 4.3.0 The queue cannot take the message now, try again later"
        except PostlaneError as exc:
            self.not_stored.count(exc.message)
            self.smtp_metrics.temporary_failures.labels("store").inc()
            return "451 4.3.0 The queue cannot take the message now, try again later"
        except Exception:
            return self._internal_error(session)
        self.accepted += 1
        if result.duplicate:
            return f"250 2.0.0 Ok: queued as {result.id} (a duplicate: the key was seen before)"
        if self.metrics is not None:
            self.metrics.enqueued.labels("smtp").inc()
        return f"250 2.0.0 Ok: queued as {result.id}"

    def too_big(self, session: Session) -> str:
        return "552 5.3.4 Message size exceeds fixed maximum message size"

    def failed(self, session: Session, error: Exception) -> str:
        # never aiosmtpd's "500 Error: (TypeName) text": permanent, and telling
        log.error("SMTP: unexpected error in a session from %s", session.peer, exc_info=error)
        self.smtp_metrics.temporary_failures.labels("internal").inc()
        return f"421 4.3.0 {self.hostname} Local error in processing, try again later"

    def timed_out(self, session: Session, phase: str) -> str:
        self.smtp_metrics.timeouts.labels(phase).inc()
        waited = "the message" if phase == "data" else "a command"
        log.info("SMTP: %s sent nothing in time, closing (waiting for %s)", session.peer, waited)
        return f"421 4.4.2 {self.hostname} Error: timeout exceeded"

    def _internal_error(self, session: Session) -> str:
        log.exception("SMTP: unexpected error with a message from %s", session.peer)
        self.smtp_metrics.temporary_failures.labels("internal").inc()
        return "451 4.3.0 Local error in processing, try again later"

    def _received_header(self, session: Session) -> bytes:
        # what the client said of itself, in ASCII (the message may not be SMTPUTF8), never a
        # header break or a control character
        helo = "".join(
            c if c.isascii() and c.isprintable() and c != " " else "?"
            for c in session.host_name or "unknown"
        )
        protocol = "ESMTP" if session.extended_smtp else "SMTP"
        if session.tls:
            protocol += "S"
        if session.authenticated:
            protocol += "A"
        line = (
            f"Received: from {helo} ([{session.peer}])\r\n\tby {self.hostname} (postlane) "
            f"with {protocol};\r\n\t{rfc5322_date()}\r\n"
        )
        return line.encode("utf-8", "replace")


class Sessions:
    """The connections open now: the caps on them, and closing them all at shutdown."""

    def __init__(
        self, config: Config, trusted: _Networks, guard: AuthGuard, metrics: SmtpMetrics
    ) -> None:
        self.max_total = config.smtp.max_connections
        self.max_per_address = config.smtp.max_connections_per_address
        self.hostname = config.smtp.hostname or socket.gethostname()
        self.trusted = trusted
        self.guard = guard
        self.metrics = metrics
        self.open = OpenConnections()
        self._all_closed = asyncio.Event()
        #: set at shutdown: sessions still open are told 421 and closed
        self.closing = False

    def admit(self, server: SmtpConnection, host: str) -> str | None:
        """None when the connection may go on, else the 421 it gets before being closed."""
        trusted = host in self.trusted
        if self.closing:
            refusal = f"421 4.3.2 {self.hostname} Service shutting down, try again later"
        elif len(self.open) >= self.max_total:
            self.metrics.connections_refused.labels("total").inc()
            refusal = f"421 4.7.0 {self.hostname} Too many connections, try again later"
        elif not trusted and self.open.from_address(host) >= self.max_per_address:
            self.metrics.connections_refused.labels("address").inc()
            refusal = (
                f"421 4.7.0 {self.hostname} Too many connections from your address, try again later"
            )
        elif not trusted and self.guard.refuses_connections_from(host):
            self.metrics.connections_refused.labels("auth").inc()
            refusal = f"421 4.7.0 {self.hostname} Too many failed authentications, try again later"
        else:
            self.open.add(server, host)
            self._all_closed.clear()
            self.metrics.connections.set(len(self.open))
            return None
        # counted, not logged: an attacker reconnecting in a loop would fill the log
        log.debug("SMTP: refused a connection from %s: %s", host, refusal)
        return refusal

    def release(self, server: SmtpConnection, host: str) -> None:
        if not self.open.discard(server, host):
            return
        self.metrics.connections.set(len(self.open))
        if not self.open:
            self._all_closed.set()

    async def close(self, grace: float) -> None:
        """Tell every session 421 and close it, except those storing a message: they get up
        to ``grace`` seconds to store it and answer, then are closed too."""
        self.closing = True
        for server in self.open:
            if server.phase != "storing":
                server.shut_down()
        if self.open:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_closed.wait(), timeout=grace)
        for server in self.open:
            server.shut_down()
        if self.open:  # connection_lost comes on the next turns of the loop
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_closed.wait(), timeout=1.0)


def server_tls_context(config: Config) -> ssl.SSLContext | None:
    if not config.smtp.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert = config.resolve_path(config.smtp.tls_cert)
    key = config.resolve_path(config.smtp.tls_key or config.smtp.tls_cert)
    for name, path in (("tls_cert", cert), ("tls_key", key)):
        try:
            path.open("rb").close()
        except OSError as exc:
            raise ConfigError(f"smtp.{name}: cannot read {path}: {exc.strerror}") from None
    try:
        context.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"smtp.tls_cert/tls_key: cannot load {cert} and {key} ({exc})") from None
    return context


@contextlib.asynccontextmanager
async def start_smtp(
    door: FrontDoor, *, sock: socket.socket | None = None, ident: str = "postlane"
) -> AsyncIterator[str]:
    """Listen for SMTP submission on ``[smtp] listen`` (or on ``sock``, a socket already bound
    and listening, shared by several processes) until the context exits; yields "host:port".
    ``ident`` follows the host name in the 220 greeting (serve --processes N: which process
    answered). On exit the sessions still open are closed (see :meth:`Sessions.close`)."""
    from postlane.ingest.server import bind

    config = door.config
    handler = SubmissionHandler(config, door.app, door.metrics)
    tls_context = server_tls_context(config)
    if config.smtp.users and tls_context is None:
        log.warning(
            "smtp.users is set but no tls_cert: AUTH is never offered in clear, so only "
            "trusted_networks can submit"
        )
    guard = AuthGuard(config.smtp, handler.smtp_metrics)
    guard.start()
    sessions = Sessions(config, handler.trusted, guard, handler.smtp_metrics)
    if sock is None:
        sock = bind(config.smtp.listen, "smtp.listen")
    loop = asyncio.get_running_loop()

    settings = ServerSettings(
        hostname=handler.hostname,
        ident=ident,
        max_size=config.smtp.max_size,
        command_timeout=config.smtp.command_timeout,
        data_timeout=config.smtp.data_timeout,
        tls_context=tls_context,
        guard=guard,
        max_auth_failures=MAX_AUTH_FAILURES,
    )

    def factory() -> SmtpConnection:
        return SmtpConnection(handler, sessions, settings)

    try:
        server = await loop.create_server(factory, sock=sock)
    except BaseException:
        sock.close()
        await guard.close()
        raise
    host, port = sock.getsockname()[:2]
    log.info(
        "SMTP submission on %s:%s (%s)",
        host,
        port,
        "STARTTLS + AUTH" if tls_context else "no TLS: trusted networks only",
    )
    try:
        yield f"{host}:{port}"
    finally:
        server.close()
        await sessions.close(grace=config.delivery.shutdown_grace)
        await server.wait_closed()
        await guard.close()
