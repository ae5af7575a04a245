"""How a dashboard page is served: who may see it, its CSRF check, its template, its headers.

Every page handler is a plain function of the request and the visitor's
:class:`~postlane.auth.Session`; :func:`page` wraps it with the access check (a login redirect,
or a 403 for a stranger when no admin token is set), the CSRF check of posted forms, and an
error page for a :class:`~postlane.errors.PostlaneError`. What the handlers need (the
application, the tokens, the CSRF key) is a :class:`DashboardContext` on ``request.app.state``.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlencode

import jinja2
from markupsafe import Markup
from starlette.datastructures import State
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from postlane.app import AsyncPostlane
from postlane.auth import (
    CSRF_SECRET,
    Csrf,
    NoAdminToken,
    NotAdmin,
    NotLocal,
    Session,
    Tokens,
    TooManyAttempts,
    Unauthenticated,
    cross_site,
)
from postlane.clock import iso, when
from postlane.config import Config, format_duration
from postlane.dashboard.forms import read_form
from postlane.errors import NotFound, PostlaneError, StoreUnavailable
from postlane.ingest.server import escaped_store_error

log = logging.getLogger("postlane.dashboard")

__all__ = ["SECURITY_HEADERS", "DashboardContext", "context", "install", "page", "render"]

#: seconds between refreshes of a page's ``<main>`` by its script
REFRESH = 5

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

_NO_ADMIN_TOKEN = (
    "the dashboard needs an admin token ([http] tokens): with send tokens alone, the API and "
    "the dashboard are locked for everyone"
)
_NOT_LOCAL = (
    "no admin token is configured: loopback clients only, addressing this server as "
    "localhost or 127.0.0.1"
)


def _age(seconds: float) -> str:
    return format_duration(seconds) if seconds >= 1 else "0s"


def unicode_domain(domain: str) -> str:
    """An internationalised domain as its reader knows it (``xn--bcher-kva.example``:
    ``bücher.example``); anything that is not valid punycode is left as it is."""
    labels = []
    for label in domain.split("."):
        if label[:4].lower() == "xn--":
            try:
                label = label[4:].encode("ascii").decode("punycode")
            except (UnicodeError, ValueError):
                return domain
        labels.append(label)
    return ".".join(labels)


def _idn(value: str) -> Markup | str:
    """An address or a domain shown in Unicode, with its ASCII form (what the queue, the
    filters and the links use) as its tooltip; unchanged when it has no punycode label."""
    local, at, domain = value.rpartition("@")
    shown = unicode_domain(domain)
    if shown == domain:
        return value
    return Markup('<span class="idn" title="{}">{}</span>').format(value, local + at + shown)


templates = jinja2.Environment(
    loader=jinja2.PackageLoader("postlane", "dashboard/templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
templates.filters["when"] = when
templates.filters["age"] = _age
templates.filters["iso"] = iso
templates.filters["idn"] = _idn


@dataclass(frozen=True)
class DashboardContext:
    """What the dashboard's pages need, kept on ``app.state.dashboard`` (see :func:`install`)."""

    postlane: AsyncPostlane
    tokens: Tokens
    #: keyed by the store's shared secret: one key for every process, kept across restarts
    csrf: Csrf

    async def ready(self) -> None:
        """Key the CSRF tokens, the first time the store answers."""
        if not self.csrf.keyed:
            now = self.postlane.clock.now()
            self.csrf.use(await self.postlane.store.secret(CSRF_SECRET, now))

    async def logged_out(self, session: Session) -> bool:
        """The session's cookie was logged out, by this process or another."""
        if session.session_id is None:
            return False
        now = self.postlane.clock.now()
        return await self.postlane.store.session_ended(session.session_id, now)


def install(
    state: State, config: Config, postlane: AsyncPostlane, tokens: Tokens | None = None
) -> None:
    """Give the dashboard's pages, wherever they are mounted, what they need. ``tokens``: the
    API's, when it is served beside (one count of failed attempts for both doors)."""
    if tokens is None:
        tokens = Tokens.from_config(config.http, clock=postlane.clock.now)
    state.dashboard = DashboardContext(postlane, tokens, Csrf())


def context(request: Request) -> DashboardContext:
    return cast(DashboardContext, request.app.state.dashboard)


def render(
    request: Request, session: Session, template: str, status: int = 200, **values: Any
) -> HTMLResponse:
    """A page from its template, with what every page shows (the CSRF token, the log-out
    button, the time, the note of what was just done) and the security headers."""
    dashboard = context(request)
    html = templates.get_template(template).render(
        request=request,
        path=request.url.path,
        csrf=dashboard.csrf.token(session),
        login=dashboard.tokens.admin_configured,
        refresh=REFRESH,
        now=dashboard.postlane.clock.now(),
        done=request.query_params.get("done"),
        **values,
    )
    return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)


#: seconds a browser (or a proxy) is told to wait when the store cannot answer
STORE_RETRY_AFTER = 5


def forbidden(reason: str) -> HTMLResponse:
    return HTMLResponse(
        f"<h1>403</h1><p>{html.escape(reason)}</p>", status_code=403, headers=SECURITY_HEADERS
    )


def refused_cross_site(request: Request) -> HTMLResponse | None:
    """A 403 for a form another site's page posts (besides the CSRF token, which such a page
    cannot read: two locks), or None."""
    refusal = cross_site(request)
    if refusal is None:
        return None
    return forbidden(f"this form was posted from another site's page ({refusal})")


Page = Callable[[Request, Session], Awaitable[Response]]


def page(handler: Page, *, post: bool = False) -> Callable[[Request], Awaitable[Response]]:
    """A Starlette endpoint serving ``handler`` to a visitor who may see the dashboard; with
    ``post``, only for a form that carries this session's CSRF token."""

    async def run(request: Request) -> Response:
        dashboard = context(request)
        try:
            session = dashboard.tokens.session(request)
        except NotLocal:
            return forbidden(_NOT_LOCAL)
        except NoAdminToken:
            return forbidden(_NO_ADMIN_TOKEN)
        except NotAdmin:
            return forbidden("a send token may send mail, never use the dashboard")
        except TooManyAttempts as exc:
            return HTMLResponse(
                f"<h1>429</h1><p>Too many wrong tokens from your address: retry in "
                f"{exc.retry_after} s.</p>",
                status_code=429,
                headers={**SECURITY_HEADERS, "Retry-After": str(exc.retry_after)},
            )
        except Unauthenticated:
            return _to_login(request)
        if post and (refusal := refused_cross_site(request)) is not None:
            return refusal
        try:
            await dashboard.ready()
            if await dashboard.logged_out(session):
                return _to_login(request)
            if post:
                form = await read_form(request)
                if not dashboard.csrf.check(session, str(form.get("csrf", ""))):
                    return forbidden("the form is stale or not ours (reload the page)")
            return await handler(request, session)
        except NotFound as exc:
            return render(request, session, "error.html", 404, message=exc.message)
        except StoreUnavailable as exc:  # not the visitor's fault: the page says so, and retries
            return _store_unavailable(request, session, exc)
        except PostlaneError as exc:
            return render(request, session, "error.html", 400, message=exc.message)
        except Exception as exc:
            failure = escaped_store_error(exc)
            if failure is None:
                raise
            log.exception("the store let a driver error through on %s", request.url.path)
            return _store_unavailable(request, session, failure)

    return run


def _to_login(request: Request) -> RedirectResponse:
    """To the login page, back here after it (no session, or one expired or logged out)."""
    return RedirectResponse("/login?" + urlencode({"next": request.url.path}), status_code=303)


def _store_unavailable(request: Request, session: Session, exc: StoreUnavailable) -> HTMLResponse:
    response = render(
        request,
        session,
        "error.html",
        503,
        message=exc.message,
        heading="The store cannot answer now",
    )
    response.headers["Retry-After"] = str(STORE_RETRY_AFTER)
    return response
