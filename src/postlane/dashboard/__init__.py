"""The dashboard: ``postlane serve`` answers "is mail flowing, what is stuck, why" at ``/``.

Server-rendered pages (Jinja2, autoescaped), one small vendored stylesheet and one small script
that refreshes the page's ``<main>`` every few seconds; charts are inline SVG drawn here. Every
action is a plain HTML form, so the pages work without JavaScript, and every action goes through
the same :class:`~postlane.app.AsyncPostlane` methods as the CLI and the HTTP API: the same
selectors, the same confirmation (counts by lane, domain, state and class before a delete, a
purge or a requeue), the same export before a delete.

Access: with ``[http] tokens`` set, an admin token logs in (a session cookie derived from the
token: HttpOnly, SameSite=Strict; ``Authorization: Bearer`` works too); without tokens, only
loopback clients get in. Every form carries a CSRF token, so another site open in the operator's
browser cannot post to a dashboard on localhost.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import io
import secrets
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from typing import Any, cast
from urllib.parse import parse_qsl, urlencode

import jinja2
from starlette.datastructures import ImmutableMultiDict
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from postlane.app import AsyncPostlane, QueueAction
from postlane.classify import ReplyClass
from postlane.clock import iso, when
from postlane.config import Config, format_duration, parse_duration
from postlane.dashboard.charts import Series, line_chart
from postlane.errors import NotFound, PostlaneError
from postlane.ingest.http import Tokens, addressed_locally, is_loopback_host
from postlane.message import Lane, RecipientState
from postlane.records import DeadGroup, DeadLetter, Sample, Selector
from postlane.triage import normalize_reply

__all__ = ["dashboard_routes"]

PAGE_SIZE = 50
#: what a requeue or purge of one dead-letter group may touch at most (one click, one slice)
GROUP_LIMIT = 10_000
WINDOWS = {"1h": 3600.0, "3h": 3 * 3600.0, "6h": 6 * 3600.0, "24h": 86400.0}
#: actions that show what they will touch and ask first (as the CLI does)
CONFIRMED = {QueueAction.DELETE, QueueAction.PURGE, QueueAction.REQUEUE}
#: actions that can hand over what they remove (JSON Lines for `postlane queue import`)
EXPORTABLE = {QueueAction.DELETE, QueueAction.PURGE}
SESSION_COOKIE = "postlane_session"
DEFERRING = ("temporary", "throttled", "connection")

_env = jinja2.Environment(
    loader=jinja2.PackageLoader("postlane", "dashboard/templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def _age(seconds: float) -> str:
    return format_duration(seconds) if seconds >= 1 else "0s"


_env.filters["when"] = when
_env.filters["age"] = _age
_env.filters["iso"] = iso


class Denied(Exception):
    """The visitor may not see the dashboard (not loopback, no valid session)."""


@dataclass(frozen=True)
class Visitor:
    #: what the session is bound to: "loopback", or a token's fingerprint
    identity: str
    #: authenticated by a browser session (cookie): forms need the CSRF token
    browser: bool


class Access:
    """Who may in: loopback clients when no admin token is set, else holders of one."""

    def __init__(self, admin_tokens: Sequence[str]) -> None:
        self.tokens = [t.encode() for t in admin_tokens]
        self._admin = Tokens(tuple(admin_tokens), ())
        self._csrf_key = secrets.token_bytes(32)

    @staticmethod
    def session_value(token: bytes) -> str:
        # derived from the token, so it survives restarts and dies when the token is rotated
        return hmac.new(token, b"postlane-dashboard-session", hashlib.sha256).hexdigest()

    def login(self, token: str) -> str | None:
        """The session cookie's value for an admin token, or None."""
        if self._admin.scope_of(token) is None:
            return None
        return self.session_value(token.encode())

    def visitor(self, request: Request) -> Visitor:
        if not self.tokens:
            host = request.client.host if request.client else ""
            if not is_loopback_host(host) or not addressed_locally(request):
                raise PermissionError(
                    "no admin token is configured: loopback clients only, addressing this "
                    "server as localhost or 127.0.0.1"
                )
            return Visitor("loopback", browser=True)
        scheme, _, bearer = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and bearer.strip():
            value = self.login(bearer.strip())
            if value is not None:
                return Visitor(value[:16], browser=False)
        cookie = request.cookies.get(SESSION_COOKIE, "")
        for known in self.tokens:
            if cookie and hmac.compare_digest(cookie, self.session_value(known)):
                return Visitor(cookie[:16], browser=True)
        raise Denied

    def csrf(self, visitor: Visitor) -> str:
        return hmac.new(self._csrf_key, visitor.identity.encode(), hashlib.sha256).hexdigest()

    def check_csrf(self, visitor: Visitor, submitted: str) -> bool:
        return not visitor.browser or hmac.compare_digest(submitted, self.csrf(visitor))


# -- selectors from forms ------------------------------------------------------------------------

_FILTERS = ("lane", "state", "domain", "class", "older_than", "sender", "recipient")


def _filters(params: Mapping[str, str]) -> dict[str, str]:
    return {k: params[k].strip() for k in _FILTERS if params.get(k, "").strip()}


def selector_from_filters(filters: Mapping[str, str], ids: Sequence[str] = ()) -> Selector:
    """A selector from the queue page's filter fields; a bad value is a PostlaneError."""
    try:
        lanes = (Lane(filters["lane"]),) if "lane" in filters else ()
        states = (RecipientState(filters["state"]),) if "state" in filters else ()
        classes = (ReplyClass(filters["class"]),) if "class" in filters else ()
    except ValueError as exc:
        raise PostlaneError(str(exc)) from None
    older_than = None
    if "older_than" in filters:
        try:
            older_than = time.time() - parse_duration(filters["older_than"])
        except ValueError as exc:
            raise PostlaneError(f"older than: {exc}") from None
    return Selector(
        ids=tuple(ids),
        all=not ids,
        lanes=lanes,
        states=states,
        domains=(filters["domain"].lower(),) if "domain" in filters else (),
        classes=classes,
        older_than=older_than,
        sender=filters.get("sender"),
        recipient=filters.get("recipient"),
    )


def group_key(cls: str, domain: str, code: int | None, enhanced: str | None, reply: str) -> str:
    """A dead-letter group's stable name in forms and URLs (what ``dlq list`` groups by)."""
    raw = "\x1f".join([cls, domain, str(code), str(enhanced), reply])
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _key_of_group(g: DeadGroup) -> str:
    return group_key(g.cls.value, g.domain, g.code, g.enhanced, g.reply)


def _key_of_letter(d: DeadLetter) -> str:
    r = d.last_response
    return group_key(
        d.cls.value,
        d.domain,
        r.code if r else None,
        r.enhanced if r else None,
        normalize_reply(r.text if r else None),
    )


# -- the overview's numbers ----------------------------------------------------------------------


def _history(samples: Sequence[Sample], start: float, end: float) -> dict[str, Any]:
    by_lane: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_lane[s.lane].append(s)
    lanes = [lane.value for lane in Lane]
    wide = by_lane.get("*", [])
    per_minute = [
        Series("delivered", [(s.at, s.sent) for s in wide]),
        Series("deferred", [(s.at, s.deferrals) for s in wide]),
        Series("dead", [(s.at, s.dead) for s in wide]),
    ]
    bounces = [
        Series("hard bounces", [(s.at, s.hard_bounces) for s in wide]),
        Series("soft bounces", [(s.at, s.soft_bounces) for s in wide]),
    ]
    return {
        "depth": line_chart(
            "Waiting per lane (ready + deferred + sending)",
            [Series(lane, [(s.at, s.depth) for s in by_lane.get(lane, [])]) for lane in lanes],
            start=start,
            end=end,
        ),
        "age": line_chart(
            "Oldest waiting message per lane",
            [Series(lane, [(s.at, s.oldest_age) for s in by_lane.get(lane, [])]) for lane in lanes],
            start=start,
            end=end,
            unit="s",
        ),
        "flow": line_chart("Recipients per minute", per_minute, start=start, end=end),
        "bounces": line_chart("Bounces per minute", bounces, start=start, end=end),
        "totals": {
            "delivered": sum(s.sent for s in wide),
            "deferred": sum(s.deferrals for s in wide),
            "dead": sum(s.dead for s in wide),
            "hard": sum(s.hard_bounces for s in wide),
            "soft": sum(s.soft_bounces for s in wide),
        },
    }


# -- the routes ----------------------------------------------------------------------------------

Page = Callable[[Request, Visitor], Awaitable[Response]]


def dashboard_routes(config: Config, app: AsyncPostlane) -> list[BaseRoute]:
    """The dashboard's routes, mounted by :func:`postlane.ingest.http.build_app`."""
    access = Access(config.http.tokens)
    refresh = 5

    def render(
        request: Request, visitor: Visitor, template: str, status: int = 200, **context: Any
    ) -> HTMLResponse:
        done = request.query_params.get("done")
        html = _env.get_template(template).render(
            request=request,
            path=request.url.path,
            csrf=access.csrf(visitor),
            login=bool(access.tokens),
            refresh=refresh,
            now=app.clock.now(),
            done=done,
            **context,
        )
        return HTMLResponse(html, status_code=status, headers=_SECURITY_HEADERS)

    def page(handler: Page, *, post: bool = False) -> Callable[[Request], Awaitable[Response]]:
        async def run(request: Request) -> Response:
            try:
                visitor = access.visitor(request)
            except PermissionError as exc:
                return HTMLResponse(
                    f"<h1>403</h1><p>{exc}</p>", status_code=403, headers=_SECURITY_HEADERS
                )
            except Denied:
                target = "/login?" + urlencode({"next": request.url.path})
                return RedirectResponse(target, status_code=303)
            try:
                if post:
                    form = await _form(request)
                    if not access.check_csrf(visitor, str(form.get("csrf", ""))):
                        return HTMLResponse(
                            "<h1>403</h1><p>the form is stale or not ours (reload the page)</p>",
                            status_code=403,
                            headers=_SECURITY_HEADERS,
                        )
                return await handler(request, visitor)
            except NotFound as exc:
                return render(request, visitor, "error.html", 404, message=exc.message)
            except PostlaneError as exc:
                return render(request, visitor, "error.html", 400, message=exc.message)

        return run

    # -- overview ------------------------------------------------------------------------------

    async def overview(request: Request, visitor: Visitor) -> Response:
        window = request.query_params.get("window", "3h")
        if window not in WINDOWS:
            window = "3h"
        now = app.clock.now()
        start = now - WINDOWS[window]
        stats = await app.stats()
        samples = await app.store.samples(start)
        firing = await app.store.alerts_firing()
        lanes = [(lane.value, stats.lanes.get(lane)) for lane in Lane]
        return render(
            request,
            visitor,
            "overview.html",
            stats=stats,
            lanes=lanes,
            history=_history(samples, start, now),
            window=window,
            windows=list(WINDOWS),
            firing=firing,
            paused=[d for d in stats.destinations if (d.paused_until or 0) > now],
        )

    # -- destinations --------------------------------------------------------------------------

    async def destinations(request: Request, visitor: Visitor) -> Response:
        now = app.clock.now()
        stats = await app.stats()
        replies: dict[str, dict[str, int]] = defaultdict(dict)
        for destination, cls, count in await app.store.destination_replies(now - 900.0):
            replies[destination][cls] = count
        states = {d.destination: d for d in await app.store.destination_states()}
        names = sorted(
            {d.destination for d in stats.destinations} | set(replies),
            key=lambda n: (-sum(replies.get(n, {}).values()), n),
        )
        rows = [
            {
                "name": name,
                "status": states.get(name),
                "paused": (states[name].paused_until or 0) > now if name in states else False,
                "replies": sorted(replies.get(name, {}).items(), key=lambda kv: -kv[1]),
                "total": sum(replies.get(name, {}).values()),
            }
            for name in names
        ]
        return render(request, visitor, "destinations.html", rows=rows)

    async def lift(request: Request, visitor: Visitor) -> Response:
        form = await _form(request)
        name = str(form.get("destination", "")).strip()
        if not name:
            raise PostlaneError("which destination?")
        await app.store.lift_destinations([name], app.clock.now())
        app.wake.set()
        return _back("/destinations", f"lifted the pause on {name}")

    # -- queue ---------------------------------------------------------------------------------

    async def queue(request: Request, visitor: Visitor) -> Response:
        jump = request.query_params.get("id", "").strip()
        if jump:
            return RedirectResponse(f"/queue/{jump}", status_code=303)
        filters = _filters(request.query_params)
        selector = selector_from_filters(filters)
        after_text = request.query_params.get("after", "0")
        after = int(after_text) if after_text.isdigit() else 0
        views, next_after = await app.store.page_messages(selector, after=after, limit=PAGE_SIZE)
        return render(
            request,
            visitor,
            "queue.html",
            messages=views,
            filters=filters,
            query=urlencode(filters),
            after=after,
            next_after=next_after,
            lanes=[lane.value for lane in Lane],
            states=[s.value for s in RecipientState],
            classes=[c.value for c in ReplyClass],
        )

    async def message(request: Request, visitor: Visitor) -> Response:
        queue_id = request.path_params["queue_id"]
        view = await app.get(queue_id, history=True)
        content = await app.content(queue_id)
        head = content.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
        headers = list(BytesHeaderParser().parsebytes(head).items())
        return render(request, visitor, "message.html", message=view, headers=headers)

    async def act(request: Request, visitor: Visitor) -> Response:
        form = await _form(request)
        try:
            action = QueueAction(str(form.get("action", "")))
        except ValueError:
            raise PostlaneError(f"no action {form.get('action')!r}") from None
        back = _safe_back(str(form.get("back", "/queue")))
        group = str(form.get("group", ""))
        filters = _filters(dict(form.items()))
        if group:  # a dead-letter group: exactly the recipients whose failure reads the same
            rows = await _group_rows(app, group, filters)
            if not rows:
                return _back(back, "that group is empty now")
            selector = dataclasses.replace(
                selector_from_filters(filters), all=False, delivery_ids=tuple(rows)
            )
            ids = []
        else:
            ids = [str(v) for v in form.getlist("ids") if str(v).strip()]
            if form.get("all") == "1":  # every message the filter matches: its recipients
                ids = []
            elif ids:  # the messages ticked: all their recipients, whatever the page's filter
                filters = {}
            else:
                return _back(back, "select messages first (or apply to all matching)")
            selector = selector_from_filters(filters, ids)
        confirmed = form.get("confirm") == "1"
        if action in CONFIRMED and not confirmed:
            counts = await app.summarize(action, selector)
            hidden = [
                ("action", action.value),
                ("back", back),
                ("group", group),
                *[(k, v) for k, v in filters.items()],
                *[("ids", i) for i in ids],
                *([("all", "1")] if not ids and not group else []),
            ]
            return render(
                request,
                visitor,
                "confirm.html",
                action=action.value,
                counts=counts,
                total=sum(c.count for c in counts),
                hidden=hidden,
                back=back,
            )
        if action in EXPORTABLE and form.get("export") == "1":
            buffer = io.StringIO()
            count = await app.act(action, selector, export=buffer)
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(app.clock.now()))
            name = f"postlane-{action.value}d-{stamp}.jsonl"
            return Response(
                buffer.getvalue(),
                media_type="application/x-ndjson",
                headers={
                    "Content-Disposition": f'attachment; filename="{name}"',
                    "X-Postlane-Deleted": str(count),
                },
            )
        count = await app.act(action, selector)
        verb = {"flush": "flushed", "hold": "held", "release": "released"}.get(
            action.value, action.value + "d"
        )
        return _back(back, f"{verb} {count:,} recipient(s)")

    # -- dead letters and suppressions ---------------------------------------------------------

    async def dlq(request: Request, visitor: Visitor) -> Response:
        filters = _filters(request.query_params)
        selector = selector_from_filters(filters)
        groups = await app.dead_groups(selector, limit=200)
        recent = await app.dead_letters(selector, limit=PAGE_SIZE)
        stats = await app.stats()
        return render(
            request,
            visitor,
            "dlq.html",
            groups=[(g, _key_of_group(g)) for g in groups],
            recent=recent,
            total=stats.dead if not filters else sum(g.count for g in groups),
            shown=sum(g.count for g in groups),
            filters=filters,
        )

    async def suppressions(request: Request, visitor: Visitor) -> Response:
        entries = await app.suppressions(limit=1000)
        total = (await app.stats()).suppression_list
        return render(request, visitor, "suppressions.html", entries=entries, total=total)

    async def suppress(request: Request, visitor: Visitor) -> Response:
        form = await _form(request)
        address = str(form.get("address", "")).strip()
        if str(form.get("remove", "")) == "1":
            removed = await app.unsuppress(address)
            note = f"removed {address}" if removed else f"{address} was not on the list"
        else:
            reason = str(form.get("reason", "")).strip() or None
            added = await app.suppress(address, reason=reason)
            note = f"added {address}" if added else f"{address} was already on the list"
        return _back("/suppressions", note)

    # -- login ---------------------------------------------------------------------------------

    async def login_page(request: Request) -> Response:
        next_page = _safe_back(request.query_params.get("next", "/"))
        html = _env.get_template("login.html").render(next=next_page, failed=False)
        return HTMLResponse(html, headers=_SECURITY_HEADERS)

    async def login_post(request: Request) -> Response:
        try:
            form = await _form(request)
        except PostlaneError as exc:
            return HTMLResponse(exc.message, status_code=400, headers=_SECURITY_HEADERS)
        next_page = _safe_back(str(form.get("next", "/")))
        value = access.login(str(form.get("token", "")).strip())
        if value is None:
            html = _env.get_template("login.html").render(next=next_page, failed=True)
            return HTMLResponse(html, status_code=401, headers=_SECURITY_HEADERS)
        response = RedirectResponse(next_page, status_code=303)
        response.set_cookie(
            SESSION_COOKIE,
            value,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            max_age=12 * 3600,
        )
        return response

    async def logout(request: Request, visitor: Visitor) -> Response:
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE)
        return response

    static = StaticFiles(packages=[("postlane", "dashboard/static")])
    return [
        Route("/", page(overview), methods=["GET"]),
        Route("/destinations", page(destinations), methods=["GET"]),
        Route("/destinations/lift", page(lift, post=True), methods=["POST"]),
        Route("/queue", page(queue), methods=["GET"]),
        Route("/queue/action", page(act, post=True), methods=["POST"]),
        Route("/queue/{queue_id}", page(message), methods=["GET"]),
        Route("/dlq", page(dlq), methods=["GET"]),
        Route("/suppressions", page(suppressions), methods=["GET"]),
        Route("/suppressions", page(suppress, post=True), methods=["POST"]),
        Route("/login", login_page, methods=["GET"]),
        Route("/login", login_post, methods=["POST"]),
        Route("/logout", page(logout, post=True), methods=["POST"]),
        Mount("/ui/static", app=static, name="static"),
    ]


async def _group_rows(app: AsyncPostlane, key: str, filters: dict[str, str]) -> list[int]:
    """The dead recipients (store rows) in group ``key``: the most recent ``GROUP_LIMIT`` of
    its class and domain (given with the form) whose reply reads the same. Exactly those:
    a message's other dead recipients, in other groups, are left alone."""
    letters = await app.dead_letters(selector_from_filters(filters), limit=GROUP_LIMIT)
    return sorted(d.delivery_id for d in letters if _key_of_letter(d) == key)


FORM_LIMIT = 1024 * 1024


async def _form(request: Request) -> ImmutableMultiDict[str, str]:
    """The posted form (``application/x-www-form-urlencoded``, what every form here sends;
    the standard library parses it, so no multipart parser is needed), read once."""
    cached = request.scope.get("postlane.form")
    if cached is not None:
        return cast(ImmutableMultiDict[str, str], cached)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        raise PostlaneError("send the page's form (application/x-www-form-urlencoded)")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > FORM_LIMIT:
            raise PostlaneError("the form is too large")
    pairs = parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
    form = ImmutableMultiDict(pairs)
    request.scope["postlane.form"] = form
    return form


def _safe_back(target: str) -> str:
    """Only our own pages: a path, never another site (``//evil.example`` or a URL)."""
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def _back(target: str, note: str) -> RedirectResponse:
    target = _safe_back(target)
    joiner = "&" if "?" in target else "?"
    return RedirectResponse(f"{target}{joiner}{urlencode({'done': note})}", status_code=303)


_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
