"""Who may use postlane over HTTP: scopes, bearer tokens, local clients and browser sessions.

The HTTP API and the dashboard ask the same questions here and differ only in how they say no
(the API answers JSON 401/403, the dashboard a login page or a 403 page)::

    Refused
    ├── NotLocal        no token is configured and the request is not a local one
    └── Unauthenticated no credential this door accepts
        ├── MissingToken    no ``Authorization: Bearer`` (nor a session cookie)
        └── InvalidToken    a bearer token that is not configured

``[http] tokens`` (and ``$POSTLANE_API_TOKEN``) have the ``admin`` scope: everything. ``[http]
send_tokens`` have ``send``: enqueue, and read back what that token enqueued. With no token
configured only a *local* request gets in: a loopback peer that also names this machine in its
Host header (a web page whose name an attacker re-points at 127.0.0.1, DNS rebinding, sends its
own name). The dashboard's session cookie is derived from an admin token, and its forms carry a
CSRF token bound to the session.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Sequence
from enum import StrEnum
from urllib.parse import urlsplit

from starlette.requests import HTTPConnection

from postlane.config import HttpConfig

__all__ = [
    "SESSION_COOKIE",
    "Caller",
    "Csrf",
    "InvalidToken",
    "MissingToken",
    "NotLocal",
    "Refused",
    "Scope",
    "Session",
    "Tokens",
    "addressed_locally",
    "bearer_token",
    "cross_site",
    "fingerprint",
    "is_local",
    "is_loopback_host",
    "session_value",
]

#: the dashboard's session cookie
SESSION_COOKIE = "postlane_session"


class Scope(StrEnum):
    SEND = "send"
    ADMIN = "admin"


@dataclasses.dataclass(frozen=True)
class Caller:
    """Who is calling the API, and what they may do."""

    scope: Scope
    #: recorded with what this caller enqueues: a token's fingerprint, never the token
    submitter: str | None


@dataclasses.dataclass(frozen=True)
class Session:
    """Who is looking at the dashboard (always with the admin scope)."""

    #: what CSRF tokens are bound to: "loopback", or the start of the session value
    identity: str
    #: authenticated by the browser's cookie (or as a local visitor): forms need the CSRF token
    browser: bool


class Refused(Exception):
    """The request may not in."""


class NotLocal(Refused):
    """No token is configured, and the request is not from and to this machine."""


class Unauthenticated(Refused):
    """No credential this door accepts."""


class MissingToken(Unauthenticated):
    """No ``Authorization: Bearer <token>`` header (and, for the dashboard, no session)."""


class InvalidToken(Unauthenticated):
    """A bearer token that is not configured."""


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


def session_value(token: str) -> str:
    """The dashboard's session cookie for an admin token. Derived from the token, so it
    survives restarts and dies when the token is rotated; it never reveals the token."""
    return hmac.new(token.encode(), b"postlane-dashboard-session", hashlib.sha256).hexdigest()


class Tokens:
    """The configured bearer tokens and their scopes; answers who a request is."""

    def __init__(self, admin: Sequence[str] = (), send: Sequence[str] = ()) -> None:
        self._known = [(t.encode(), Scope.ADMIN) for t in admin] + [
            (t.encode(), Scope.SEND) for t in send
        ]
        self._sessions = [session_value(t) for t in admin]

    @classmethod
    def from_config(cls, http: HttpConfig) -> Tokens:
        return cls(http.tokens, http.send_tokens)

    @property
    def configured(self) -> bool:
        """Any token at all (else the API answers local requests only)."""
        return bool(self._known)

    @property
    def admin_configured(self) -> bool:
        """Any admin token (else the dashboard lets in local requests only)."""
        return bool(self._sessions)

    def scope_of(self, token: str) -> Scope | None:
        """The scope of a token, or None for an unknown one (``send`` if it is listed as both)."""
        scopes = self._scopes(token)
        return Scope.SEND if Scope.SEND in scopes else Scope.ADMIN if scopes else None

    def _scopes(self, token: str) -> set[Scope]:
        found = set()
        for known, scope in self._known:  # compare with every token: no timing hint
            if hmac.compare_digest(token.encode(), known):
                found.add(scope)
        return found

    def caller(self, request: HTTPConnection) -> Caller:
        """The API's caller: a bearer token's scope, or admin for a local request when no token
        is configured. Raises :class:`Refused`."""
        if not self.configured:
            if not is_local(request):
                raise NotLocal
            return Caller(Scope.ADMIN, None)
        token = bearer_token(request)
        if token is None:
            raise MissingToken
        scope = self.scope_of(token)
        if scope is None:
            raise InvalidToken
        return Caller(scope, fingerprint(token))

    def login(self, token: str) -> str | None:
        """The session cookie's value for an admin token, or None for any other."""
        if Scope.ADMIN not in self._scopes(token):
            return None
        return session_value(token)

    def session(self, request: HTTPConnection) -> Session:
        """The dashboard's visitor: an admin bearer token or session cookie, or a local request
        when no admin token is configured. Raises :class:`Refused`."""
        if not self.admin_configured:
            if not is_local(request):
                raise NotLocal
            return Session("loopback", browser=True)
        token = bearer_token(request)
        if token is not None:
            value = self.login(token)
            if value is not None:
                return Session(value[:16], browser=False)
        cookie = request.cookies.get(SESSION_COOKIE, "")
        for known in self._sessions:
            if cookie and hmac.compare_digest(cookie, known):
                return Session(cookie[:16], browser=True)
        raise MissingToken


class Csrf:
    """CSRF tokens for the dashboard's forms: an HMAC of the session under a key made at start,
    so another site open in the operator's browser cannot post to the dashboard."""

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key if key is not None else secrets.token_bytes(32)

    def token(self, session: Session) -> str:
        return hmac.new(self._key, session.identity.encode(), hashlib.sha256).hexdigest()

    def check(self, session: Session, submitted: str) -> bool:
        """A form's token is right (a bearer-token script posts without one)."""
        return not session.browser or hmac.compare_digest(submitted, self.token(session))
