"""SMTP submission (aiosmtpd): any language's mail library can hand messages to postlane.

Clients in ``trusted_networks`` may submit without AUTH; everyone else must AUTH (PLAIN or
LOGIN), and AUTH is offered only after STARTTLS, so passwords never cross in clear. Nobody else
can relay: this is never an open relay. SIZE is announced and enforced, each RCPT is answered on
its own, a client's Message-ID is kept (one is added when missing), and 250 is sent only after
the message is durably stored (421 when the store cannot take it).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import hmac
import ipaddress
import logging
import os
import socket
import ssl
from collections.abc import AsyncIterator, Sequence
from email.utils import formatdate
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from postlane.app import AsyncPostlane
from postlane.config import Config
from postlane.errors import (
    ConfigError,
    MessageTooLarge,
    PostlaneError,
    StoreUnavailable,
    ValidationError,
)
from postlane.ingest.smtpd import FastSMTP
from postlane.message import MAX_RECIPIENTS, Message, parse_address

log = logging.getLogger("postlane.smtp")

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
#: failed AUTH attempts on one connection before it is closed
MAX_AUTH_FAILURES = 3


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """A hash for ``[smtp] users`` (what ``postlane hash-password`` prints): scrypt, salted."""
    salt = salt or os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P)
    b64 = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    """Check a password against a ``users`` entry (an scrypt hash, or a plain password)."""
    if not stored.startswith("scrypt$"):
        return hmac.compare_digest(password.encode(), stored.encode())
    try:
        _, n, r, p, salt, digest = stored.split("$")
        expected = base64.b64decode(digest)
        actual = hashlib.scrypt(
            password.encode(),
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(expected),
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


class _Networks:
    def __init__(self, networks: Sequence[str]) -> None:
        self._networks = [ipaddress.ip_network(n, strict=False) for n in networks]

    def __contains__(self, host: object) -> bool:
        try:
            address = ipaddress.ip_address(str(host))
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in network for network in self._networks)


class SubmissionHandler:
    """aiosmtpd hooks: who may submit, per-recipient answers, and the durable enqueue."""

    def __init__(self, config: Config, app: AsyncPostlane, metrics: Any = None) -> None:
        self.app = app
        self.metrics = metrics
        self.config = config
        self.trusted = _Networks(config.smtp.trusted_networks)
        self.users = config.smtp.users
        self.hostname = config.smtp.hostname or socket.gethostname()
        self.accepted = 0

    def __dir__(self) -> list[str]:
        # aiosmtpd scans the handler per connection for handle_* hooks and auth_* methods
        return _HANDLER_NAMES

    def _may_submit(self, session: Session) -> bool:
        peer = session.peer[0] if isinstance(session.peer, tuple) else session.peer
        return bool(session.authenticated) or peer in self.trusted

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if not self._may_submit(session):
            if server.tls_context is not None and server._tls_protocol is None:
                return "530 5.7.0 Must issue a STARTTLS command first, then AUTH"
            return "530 5.7.0 Authentication required"
        if not address:
            return "553 5.1.7 A sender address is required (the null sender is not accepted)"
        try:
            parse_address(address, "sender")
        except ValidationError as exc:
            return f"553 5.1.7 {exc.message}"
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return "452 4.5.3 Too many recipients"
        try:
            parse_address(address, "recipient")
        except ValidationError as exc:
            return f"553 5.1.3 {exc.message}"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        if not isinstance(content, bytes):
            content = str(content).encode("utf-8")
        received = self._received_header(session, server)
        message = Message(
            sender=envelope.mail_from or "",
            to=list(envelope.rcpt_tos),
            raw=received + content,
        )
        user = session.auth_data if isinstance(session.auth_data, str) else None
        submitter = f"smtp:{user}" if user else "smtp:trusted"
        try:
            prepared = dataclasses.replace(self.app.prepare(message), submitter=submitter)
            result = (await self.app.send_prepared([prepared]))[0]
        except MessageTooLarge as exc:
            return f"552 5.3.4 {exc.message}"
        except ValidationError as exc:
            return f"554 5.6.0 {exc.message}"
        except StoreUnavailable:
            log.exception("the store refused a submitted message")
            return "421 4.3.0 The queue cannot take the message now, try again later"
        except PostlaneError as exc:
            return f"451 4.3.0 {exc.message}"
        self.accepted += 1
        if self.metrics is not None and not result.duplicate:
            self.metrics.enqueued.labels("smtp").inc()
        return f"250 2.0.0 Ok: queued as {result.id}"

    def _received_header(self, session: Session, server: SMTP) -> bytes:
        peer = session.peer[0] if isinstance(session.peer, tuple) else str(session.peer)
        helo = session.host_name or "unknown"
        protocol = "ESMTP" if session.extended_smtp else "SMTP"
        if server._tls_protocol is not None:
            protocol += "S"
        if session.authenticated:
            protocol += "A"
        line = (
            f"Received: from {helo} ([{peer}])\r\n\tby {self.hostname} (postlane) "
            f"with {protocol};\r\n\t{formatdate(usegmt=True)}\r\n"
        )
        return line.encode("utf-8", "replace")

    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        username = auth_data.login.decode("utf-8", "replace")
        password = auth_data.password.decode("utf-8", "replace")
        stored = self.users.get(username)
        if stored is not None and verify_password(password, stored):
            return AuthResult(success=True, auth_data=username)
        # never log the password; the user name helps the operator
        log.warning("AUTH %s failed for user %r from %s", mechanism, username, session.peer)
        return AuthResult(success=False, handled=False)


_HANDLER_NAMES = sorted(
    name for name in dir(SubmissionHandler) if name.startswith(("handle_", "auth_"))
)


class SubmissionServer(FastSMTP):
    """aiosmtpd's SMTP with a growing delay after failed AUTH, then a disconnect."""

    async def smtp_AUTH(self, arg: str) -> None:
        await super().smtp_AUTH(arg)
        session = self.session
        if session is None or session.authenticated:
            return
        self._auth_failures = getattr(self, "_auth_failures", 0) + 1
        failures = self._auth_failures
        if failures >= MAX_AUTH_FAILURES:
            await self.push("421 4.7.0 Too many failed authentications, closing")
            if self.transport is not None:
                self.transport.close()
            return
        await asyncio.sleep(0.5 * 2**failures)


def server_tls_context(config: Config) -> ssl.SSLContext | None:
    if not config.smtp.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(
            str(config.resolve_path(config.smtp.tls_cert)),
            str(config.resolve_path(config.smtp.tls_key or config.smtp.tls_cert)),
        )
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"smtp.tls_cert/tls_key: cannot load ({exc})") from None
    return context


@contextlib.asynccontextmanager
async def start_smtp(config: Config, app: AsyncPostlane, metrics: Any = None) -> AsyncIterator[str]:
    """Listen for SMTP submission until the context exits; yields "host:port"."""
    from postlane.ingest.http import bind

    handler = SubmissionHandler(config, app, metrics)
    tls_context = server_tls_context(config)
    if config.smtp.users and tls_context is None:
        log.warning(
            "smtp.users is set but no tls_cert: AUTH is never offered in clear, so only "
            "trusted_networks can submit"
        )
    sock = bind(config.smtp.listen, "smtp.listen")
    loop = asyncio.get_running_loop()

    def factory() -> SMTP:
        return SubmissionServer(
            handler,
            data_size_limit=config.smtp.max_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=handler.hostname,
            ident="postlane",
            tls_context=tls_context,
            auth_required=False,  # enforced per client in handle_MAIL (trusted networks)
            auth_require_tls=True,
            authenticator=handler.authenticate,
            loop=loop,
        )

    server = await loop.create_server(factory, sock=sock)
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
        await server.wait_closed()
