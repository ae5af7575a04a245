"""Who may use postlane over HTTP: scopes, bearer tokens, local clients and browser sessions.

The HTTP API and the dashboard ask the same questions here and differ only in how they say no
(the API answers JSON 401/403/429, the dashboard a login page, a 403 or a 429 page)::

    Refused
    ├── NotLocal         no token is configured and the request is not a local one
    ├── TooManyAttempts  this client (or, under a wide attack, any failing one) must wait
    └── Unauthenticated  no credential this door accepts
        ├── MissingToken     no ``Authorization: Bearer`` (nor a live session cookie)
        └── InvalidToken     a token that is not configured (or, at /login, not an admin's)

``[http] tokens`` (and ``$POSTLANE_API_TOKEN``) have the ``admin`` scope: everything. ``[http]
send_tokens`` have ``send``: enqueue, and read back what that token enqueued; one bound to
``senders`` enqueues mail from those sender domains only (:attr:`Caller.senders`). A token is at
least :data:`MIN_TOKEN_LENGTH` characters. With no token configured only a *local* request gets
in: a loopback peer that also names this machine in its Host header (a web page whose name an
attacker re-points at 127.0.0.1, DNS rebinding, sends its own name).

Wrong tokens are counted per client and in all (:class:`Attempts`): past a few, a client waits
a doubling delay before its next token is even looked at (429). The dashboard's sessions
(:class:`Sessions`) are random, signed with a key derived from an admin token, expire after a
fixed lifetime and end at logout; its forms carry a CSRF token bound to the session.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import hmac
import ipaddress
import logging
import math
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from enum import StrEnum
from typing import TypeVar
from urllib.parse import urlsplit

from starlette.requests import HTTPConnection

from postlane.config import HttpConfig
from postlane.errors import ConfigError
from postlane.ingest.tally import Tally
from postlane.sender_bindings import SendToken

log = logging.getLogger("postlane.auth")

__all__ = [
    "MIN_TOKEN_LENGTH",
    "SESSION_COOKIE",
    "SESSION_LIFETIME",
    "Attempts",
    "Caller",
    "Csrf",
    "InvalidToken",
    "MissingToken",
    "NotLocal",
    "Refused",
    "Scope",
    "Session",
    "Sessions",
    "Tokens",
    "TooManyAttempts",
    "addressed_locally",
    "bearer_token",
    "client_key",
    "cross_site",
    "fingerprint",
    "is_local",
    "is_loopback_host",
]

#: the dashboard's session cookie
SESSION_COOKIE = "postlane_session"
#: seconds a dashboard session lasts from its login, whatever is done with it
SESSION_LIFETIME = 12 * 3600.0
#: a token shorter than this is refused at start (a short one can be guessed)
MIN_TOKEN_LENGTH = 16


#: the store's shared secret (``store.secret(name)``) that keys the dashboard's CSRF tokens
CSRF_SECRET = "dashboard-csrf"


class Scope(StrEnum):
    SEND = "send"
    ADMIN = "admin"


@dataclasses.dataclass(frozen=True)
class Caller:
    """Who is calling the API, and what they may do."""

    scope: Scope
    #: recorded with what this caller enqueues: a token's fingerprint, never the token
    submitter: str | None
    #: the sender domains it may enqueue mail from (a send token's ``senders``, lower-cased,
    #: exact); None: any domain
    senders: tuple[str, ...] | None = None

    def may_send_from(self, domain: str) -> bool:
        """Whether this caller may enqueue mail from sender domain ``domain``."""
        return sender_refusal(self.senders, [(domain, "")]) is None


def sender_refusal(senders: Sequence[str] | None, domains: Iterable[tuple[str, str]]) -> str | None:
    """Why mail from ``domains`` (each with what says so: ``""`` for the envelope sender,
    ``" (its From header)"``, see :func:`postlane.message.sender_domains`) is refused to a
    token or an SMTP user bound to ``senders``: ``"may send from a.example only, not from
    b.example (its From header)"``; None when every domain is allowed (or ``senders`` is None:
    any domain)."""
    if senders is None:
        return None
    for domain, which in domains:
        if domain.lower() not in senders:
            allowed = ", ".join(senders) or "no domain"
            return f"may send from {allowed} only, not from {domain}{which}"
    return None


@dataclasses.dataclass(frozen=True)
class Session:
    """Who is looking at the dashboard (always with the admin scope)."""

    #: what CSRF tokens are bound to: "loopback", the session's ID, or a bearer token's
    #: fingerprint
    identity: str
    #: authenticated by the browser's cookie (or as a local visitor): forms need the CSRF token
    browser: bool
    #: the session cookie's ID (None for a bearer token or a local visitor)
    session_id: str | None = None


class Refused(Exception):
    """The request may not in."""


class NotLocal(Refused):
    """No token is configured, and the request is not from and to this machine."""


class NoAdminToken(Refused):
    """Send tokens are configured and no admin token: the API is locked, so is the dashboard
    (nobody gets in; a send token never does)."""


class NotAdmin(Refused):
    """A valid send token at the dashboard: it may send, never look or act (not a guess)."""


class Unauthenticated(Refused):
    """No credential this door accepts."""


class MissingToken(Unauthenticated):
    """No ``Authorization: Bearer <token>`` header (and, for the dashboard, no session)."""


class InvalidToken(Unauthenticated):
    """A bearer token that is not configured."""


class TooManyAttempts(Refused):
    """This client failed too often lately: its next credential is not looked at before
    ``retry_after`` seconds."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"too many failed attempts: retry after {retry_after:.0f} s")
        self.retry_after = max(1, math.ceil(retry_after))


def fingerprint(token: str) -> str:
    """What identifies a token in the store (who submitted a message) without revealing it."""
    return "token:" + hashlib.sha256(token.encode()).hexdigest()[:16]


def is_loopback_host(host: str) -> bool:
    """True for 127.0.0.0/8 and ::1 (a peer on this machine)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def addressed_locally(request: HTTPConnection) -> bool:
    """The request names this machine in its Host header (``localhost``, a loopback address,
    any port). Without tokens, a loopback peer is trusted only then: a web page whose name an
    attacker re-points at 127.0.0.1 (DNS rebinding) sends its own name as Host, not these."""
    host = request.headers.get("host", "").strip().lower()
    if host.startswith("["):
        name = host[1 : host.find("]")] if "]" in host else host
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return name == "localhost" or name.endswith(".localhost") or is_loopback_host(name)


def is_local(request: HTTPConnection) -> bool:
    """From a loopback peer and addressed to this machine: who gets in without a token."""
    peer = request.client.host if request.client else ""
    return is_loopback_host(peer) and addressed_locally(request)


#: what ``Sec-Fetch-Site`` says of a request a page of this very origin made, or a user typed
_SAME_ORIGIN = frozenset({"same-origin", "none"})


def cross_site(request: HTTPConnection) -> str | None:
    """Why a browser says this request comes from a page of another origin, or None.

    A web page may send "simple" requests anywhere (a form post, or a ``fetch`` with a
    ``text/plain`` body) without asking first; the browser then says where it came from. Its
    ``Sec-Fetch-Site`` header (every current browser sends it) is believed first: only
    ``same-origin`` (our own pages) and ``none`` (typed, bookmarked) pass. ``same-site`` is
    refused too: another port of 127.0.0.1 is the same site. Without it, an ``Origin`` header
    must name the host the request was sent to. Scripts and servers send neither, and pass."""
    fetch_site = request.headers.get("sec-fetch-site")
    if fetch_site is not None:
        if fetch_site.strip().lower() in _SAME_ORIGIN:
            return None
        return f"Sec-Fetch-Site: {fetch_site[:40]}"
    origin = request.headers.get("origin")
    if origin is None:
        return None
    host = request.headers.get("host", "").strip().lower()
    try:
        named = urlsplit(origin.strip()).netloc.lower()
    except ValueError:
        named = ""
    if origin.strip() == "null" or not named or named != host:
        return f"Origin: {origin[:100]}"
    return None


def bearer_token(request: HTTPConnection) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def client_key(request: HTTPConnection) -> str:
    """Whom failed attempts are counted against: the peer's address, or for IPv6 its /64
    (one host usually holds a whole /64, and could rotate through it)."""
    peer = request.client.host if request.client else ""
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return peer or "unknown"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


@dataclasses.dataclass
class _Failures:
    count: int = 0
    last: float = 0.0
    locked_until: float = 0.0


#: what a credential names (a scope, an admin token's index)
_Found = TypeVar("_Found")


class Attempts:
    """Failed credentials (wrong bearer tokens, wrong tokens at /login), per client and in all.

    A client may fail :attr:`FREE` times; each further failure makes it wait before its next
    credential is looked at at all, twice as long each time (:attr:`FIRST_WAIT` up to
    :attr:`LONGEST_WAIT`); it is forgotten after :attr:`FORGET` seconds without a failure.
    When all clients together failed more than :attr:`WIDE` times in the last minute (one
    guesser behind many addresses), a failing client waits from its first failure. A client
    that never fails never waits. Memory is bounded: at most :attr:`CLIENTS` clients are
    remembered, the longest quiet forgotten first. Failures are logged as one summary line a
    minute, without any token."""

    FREE = 5
    FIRST_WAIT = 1.0
    LONGEST_WAIT = 300.0
    FORGET = 900.0
    WIDE = 50
    WIDE_WINDOW = 60.0
    CLIENTS = 10_000

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._clients: collections.OrderedDict[str, _Failures] = collections.OrderedDict()
        self._recent: collections.deque[float] = collections.deque()
        #: failures and refusals (429) by door since start (the metrics read them)
        self.failures: collections.Counter[str] = collections.Counter()
        self.throttled: collections.Counter[str] = collections.Counter()
        self._tally = Tally(log, _describe_attempts)

    @property
    def remembered(self) -> int:
        """How many clients are remembered (at most :attr:`CLIENTS`)."""
        return len(self._clients)

    def check(self, client: str, door: str) -> None:
        """Raise :class:`TooManyAttempts` while ``client`` must wait."""
        found = self._clients.get(client)
        now = self._clock()
        if found is not None and found.locked_until > now:
            self.throttled[door] += 1
            self._tally.count(_THROTTLED)
            raise TooManyAttempts(found.locked_until - now)

    def verify(self, client: str, door: str, look_up: Callable[[], _Found | None]) -> _Found:
        """What ``look_up`` finds for the credential ``client`` presents at ``door``; raises
        :class:`TooManyAttempts` (before looking) while ``client`` must wait, and
        :class:`InvalidToken` when nothing is found, counting the failure."""
        self.check(client, door)
        found = look_up()
        if found is None:
            self.failed(client, door)
            raise InvalidToken
        return found

    def failed(self, client: str, door: str) -> None:
        """Count a failed credential of ``client`` at ``door`` (``api``, ``dashboard``,
        ``login``), and make it wait if it has failed too often."""
        now = self._clock()
        found = self._clients.pop(client, None) or _Failures()
        if now - found.last > self.FORGET:
            found.count = 0
        found.count += 1
        found.last = now
        self._recent.append(now)
        while self._recent and self._recent[0] < now - self.WIDE_WINDOW:
            self._recent.popleft()
        free = 0 if len(self._recent) > self.WIDE else self.FREE
        if found.count > free:
            wait = self.FIRST_WAIT * 2.0 ** min(found.count - free - 1, 30)
            found.locked_until = now + min(wait, self.LONGEST_WAIT)
        self._clients[client] = found  # the most recent last
        while len(self._clients) > self.CLIENTS:
            self._clients.popitem(last=False)
        self.failures[door] += 1
        self._tally.count(client)


#: the tally's kind for a refusal while waiting (the other kinds are client addresses)
_THROTTLED = "429"


def _describe_attempts(counts: dict[str, int]) -> str:
    throttled = counts.pop(_THROTTLED, 0)
    busiest = sorted(counts.items(), key=lambda item: -item[1])[:3]
    return (
        f"wrong tokens since the last such line: {sum(counts.values())} failed attempt(s) "
        f"from {len(counts)} client(s) (most: "
        f"{', '.join(f'{c} ({n})' for c, n in busiest) or 'none'}), {throttled} refused "
        "while waiting (429)"
    )


class Sessions:
    """The dashboard's sessions: ``ID.ISSUED.SIGNATURE`` cookies, signed (HMAC-SHA256) with a
    key derived from an admin token, so they hold across restarts and processes, die when the
    token is rotated, and never reveal it. A session ends :data:`SESSION_LIFETIME` after its
    login whatever is done with it, or at logout: a logged-out ID is remembered here until it
    would have expired anyway (and, by the dashboard, in the store, for every process)."""

    def __init__(
        self,
        admin: Sequence[str],
        lifetime: float = SESSION_LIFETIME,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._keys = [
            hmac.new(t.encode(), b"postlane-session-key", "sha256").digest() for t in admin
        ]
        self.lifetime = lifetime
        self._clock = clock
        #: logged-out session IDs, with when they would have expired
        self._revoked: dict[str, float] = {}

    def start(self, token_index: int) -> str:
        """A new session's cookie value, signed with the key of admin token ``token_index``."""
        payload = f"{secrets.token_urlsafe(18)}.{int(self._clock())}"
        return f"{payload}.{self._sign(self._keys[token_index], payload)}"

    def identity(self, cookie: str) -> str | None:
        """The session ID of a live, untampered, not logged-out cookie, or None."""
        sid, _, rest = cookie.partition(".")
        issued_text, _, signature = rest.partition(".")
        if not sid or not (issued_text.isascii() and issued_text.isdigit()) or not signature:
            return None
        payload = f"{sid}.{issued_text}"
        if not any(hmac.compare_digest(signature, self._sign(k, payload)) for k in self._keys):
            return None
        issued = int(issued_text)
        now = self._clock()
        if not issued - 60 <= now < issued + self.lifetime or sid in self._revoked:
            return None
        return sid

    def end(self, cookie: str) -> tuple[str, float] | None:
        """Log a session out: its cookie is refused (here) from now on. Returns its ID and
        when it would have expired, or None for a cookie that was no live session."""
        sid = self.identity(cookie)
        if sid is None:
            return None
        now = self._clock()
        until = int(cookie.split(".")[1]) + self.lifetime
        self._revoked = {s: t for s, t in self._revoked.items() if t > now}
        self._revoked[sid] = until
        return sid, until

    @staticmethod
    def _sign(key: bytes, payload: str) -> str:
        return hmac.new(key, payload.encode(), hashlib.sha256).hexdigest()


class Tokens:
    """The configured bearer tokens and their scopes, the failed attempts against them, and
    the dashboard's sessions: answers who a request is. One instance serves the API and the
    dashboard alike, so a guesser is counted once whichever door it knocks at."""

    def __init__(
        self,
        admin: Sequence[str] = (),
        send: Sequence[str | SendToken] = (),
        *,
        clock: Callable[[], float] = time.time,
        session_lifetime: float = SESSION_LIFETIME,
    ) -> None:
        bound = [t if isinstance(t, SendToken) else SendToken(t) for t in send]
        self._known: list[tuple[bytes, Scope, tuple[str, ...] | None]] = [
            (t.encode(), Scope.ADMIN, None) for t in admin
        ] + [(t.token.encode(), Scope.SEND, _lower(t.senders)) for t in bound]
        self._admin = [t.encode() for t in admin]
        self.attempts = Attempts(clock)
        self.sessions = Sessions(admin, session_lifetime, clock)
        #: a bearer token came to a server that has none to check it against (said once)
        self._unchecked_token_said = False

    @classmethod
    def from_config(cls, http: HttpConfig, *, clock: Callable[[], float] = time.time) -> Tokens:
        """The tokens of ``[http]``; a token shorter than :data:`MIN_TOKEN_LENGTH` is a
        :class:`ConfigError` naming its key and place (never the token)."""
        send = tuple(t.token for t in http.send_tokens)
        for key, tokens in (("http.tokens", http.tokens), ("http.send_tokens", send)):
            for number, token in enumerate(tokens, 1):
                if len(token) < MIN_TOKEN_LENGTH:
                    where = f"{key} (or $POSTLANE_API_TOKEN)" if key == "http.tokens" else key
                    raise ConfigError(
                        f"{where}: token {number} of {len(tokens)} is {len(token)} characters; "
                        f"a token needs at least {MIN_TOKEN_LENGTH} (make one with "
                        "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
                    )
        return cls(
            http.tokens, http.send_tokens, session_lifetime=http.session_lifetime, clock=clock
        )

    @property
    def configured(self) -> bool:
        """Any token at all (else the API answers local requests only)."""
        return bool(self._known)

    @property
    def admin_configured(self) -> bool:
        """Any admin token (else the dashboard lets in local requests only)."""
        return bool(self._admin)

    def scope_of(self, token: str) -> Scope | None:
        """The scope of a token, or None for an unknown one (``send`` if it is listed as both)."""
        grant = self._grant(token)
        return None if grant is None else grant[0]

    def _scopes(self, token: str) -> set[Scope]:
        return {scope for scope, _ in self._matches(token)}

    def _matches(self, token: str) -> list[tuple[Scope, tuple[str, ...] | None]]:
        found = []
        for known, scope, senders in self._known:  # compare with every token: no timing hint
            if hmac.compare_digest(token.encode(), known):
                found.append((scope, senders))
        return found

    def _grant(self, token: str) -> tuple[Scope, tuple[str, ...] | None] | None:
        """What a token may do: its scope (``send`` if it is listed as both) and the sender
        domains it may send from (None: any); None for an unknown token."""
        matches = self._matches(token)
        if not matches:
            return None
        if all(scope is Scope.ADMIN for scope, _ in matches):
            return Scope.ADMIN, None
        senders: tuple[str, ...] | None = None
        for scope, bound in matches:  # listed more than once: the narrowest binding holds
            if scope is Scope.SEND and bound is not None:
                senders = bound if senders is None else tuple(d for d in senders if d in bound)
        return Scope.SEND, senders

    def _admin_index(self, token: str) -> int | None:
        found = None
        for index, known in enumerate(self._admin):  # every one: no timing hint
            if hmac.compare_digest(token.encode(), known) and found is None:
                found = index
        return found

    def caller(self, request: HTTPConnection) -> Caller:
        """The API's caller: a bearer token's scope, or admin for a local request when no token
        is configured. Raises :class:`Refused`."""
        if not self.configured:
            if not is_local(request):
                raise NotLocal
            if not self._unchecked_token_said and bearer_token(request) is not None:
                # a client set up with a token it believes checked (a wrong one would pass
                # here unseen until production): said once, the token never shown
                self._unchecked_token_said = True
                log.warning(
                    "a request presented a bearer token, but no [http] tokens are configured: "
                    "no token is checked, and every loopback client is admin (configure "
                    "[http] tokens for the token to be checked)"
                )
            return Caller(Scope.ADMIN, None)
        token = bearer_token(request)
        if token is None:
            raise MissingToken
        scope, senders = self.attempts.verify(
            client_key(request), "api", lambda: self._grant(token)
        )
        return Caller(scope, fingerprint(token), senders)

    def login(self, request: HTTPConnection, token: str) -> str:
        """A new session's cookie value for an admin token. Raises :class:`TooManyAttempts`
        while this client must wait, :class:`InvalidToken` for any other token."""
        index = self.attempts.verify(client_key(request), "login", lambda: self._admin_index(token))
        return self.sessions.start(index)

    def logout(self, request: HTTPConnection) -> tuple[str, float] | None:
        """End the request's session in this process (its cookie is refused here from now on);
        returns its ID and when it would have expired, for the other processes to hear of."""
        return self.sessions.end(request.cookies.get(SESSION_COOKIE, ""))

    def session(self, request: HTTPConnection) -> Session:
        """The dashboard's visitor: an admin bearer token or a live session cookie, or a local
        request when no admin token is configured. Raises :class:`Refused`."""
        if not self.admin_configured:
            if self.configured:  # send tokens only: locked, as the API is
                raise NoAdminToken
            if not is_local(request):
                raise NotLocal
            return Session("loopback", browser=True)
        token = bearer_token(request)
        if token is not None:
            client = client_key(request)
            self.attempts.check(client, "dashboard")
            index = self._admin_index(token)
            if index is None and Scope.SEND in self._scopes(token):
                raise NotAdmin  # a right token for another door: no guess to count
            self.attempts.verify(client, "dashboard", lambda: index)
            return Session(fingerprint(token), browser=False)
        sid = self.sessions.identity(request.cookies.get(SESSION_COOKIE, ""))
        if sid is None:  # none, expired, logged out or forged: log in again
            raise MissingToken
        return Session(sid, browser=True, session_id=sid)


def _lower(domains: tuple[str, ...] | None) -> tuple[str, ...] | None:
    return None if domains is None else tuple(domain.lower() for domain in domains)


class Csrf:
    """CSRF tokens for the dashboard's forms: an HMAC of the session, so another site open in
    the operator's browser cannot post to the dashboard. The key is the store's shared secret
    (:data:`CSRF_SECRET`), so a form rendered by one process of ``serve --processes`` posts to
    any other, and across restarts; it is set once the store has answered (:meth:`use`)."""

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key

    @property
    def keyed(self) -> bool:
        return self._key is not None

    def use(self, key: bytes) -> None:
        self._key = key

    def token(self, session: Session) -> str:
        """The session's token ("" before the key is known: such a page's forms are refused)."""
        if self._key is None:
            return ""
        return hmac.new(self._key, session.identity.encode(), hashlib.sha256).hexdigest()

    def check(self, session: Session, submitted: str) -> bool:
        """A form's token is right (a bearer-token script posts without one)."""
        if not session.browser:
            return True
        return self._key is not None and hmac.compare_digest(submitted, self.token(session))
