"""The dashboard's pages and the forms they post: overview, destinations, queue, one message,
dead letters, suppressions, log in and out. Each is a function of the request and the visitor's
session, served through :func:`postlane.dashboard.rendering.page`; each action goes through the
same :class:`~postlane.app.AsyncPostlane` methods as the CLI and the HTTP API."""

from __future__ import annotations

import dataclasses
import io
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from urllib.parse import urlencode

from starlette.datastructures import ImmutableMultiDict
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from postlane.addresses import check_text
from postlane.alerts import evaluate, history_needed, load_rules
from postlane.app import AsyncPostlane
from postlane.auth import SESSION_COOKIE, InvalidToken, Session, TooManyAttempts
from postlane.classify import ReplyClass
from postlane.dashboard.charts import overview_charts
from postlane.dashboard.forms import (
    back_to,
    filters_of,
    read_form,
    safe_back,
    selector_from_filters,
)
from postlane.dashboard.groups import group_rows, key_of_group
from postlane.dashboard.rendering import (
    SECURITY_HEADERS,
    context,
    refused_cross_site,
    render,
    templates,
)
from postlane.destinations import provider_names
from postlane.errors import NotFound, PostlaneError
from postlane.events import WebhookEndpointState
from postlane.message import Lane, RecipientState
from postlane.queue_actions import QueueAction
from postlane.records import Sample, Selector

PAGE_SIZE = 50
WINDOWS = {"1h": 3600.0, "3h": 3 * 3600.0, "6h": 6 * 3600.0, "24h": 86400.0}
#: actions that show what they will touch and ask first (as the CLI does)
CONFIRMED = {QueueAction.DELETE, QueueAction.PURGE, QueueAction.REQUEUE}
#: actions that can hand over what they remove (JSON Lines for `postlane queue import`)
EXPORTABLE = {QueueAction.DELETE, QueueAction.PURGE}


def _postlane(request: Request) -> AsyncPostlane:
    return context(request).postlane


# -- overview and destinations -------------------------------------------------------------------


async def overview(request: Request, session: Session) -> Response:
    app = _postlane(request)
    window = request.query_params.get("window", "3h")
    if window not in WINDOWS:
        window = "3h"
    now = app.clock.now()
    start = now - WINDOWS[window]
    stats = await app.stats()
    samples = await app.store.samples(start)
    webhooks = await app.store.webhook_endpoints()
    firing = firing_alerts(await app.store.alerts_firing(), samples, now, webhooks)
    lanes = [(lane.value, stats.lanes.get(lane)) for lane in Lane]
    return render(
        request,
        session,
        "overview.html",
        stats=stats,
        lanes=lanes,
        history=overview_charts(samples, start, now),
        window=window,
        windows=list(WINDOWS),
        firing=firing,
        paused=[d for d in stats.destinations if (d.paused_until or 0) > now],
    )


@dataclass(frozen=True)
class FiringAlert:
    """A firing alert as the overview's banner shows it: what is wrong, since when, the
    evaluation's detail, and the runbook saying what to do."""

    name: str
    severity: str
    summary: str
    detail: str
    since: float
    runbook: str | None


def firing_alerts(
    firing: Sequence[tuple[str, float]],
    samples: Sequence[Sample],
    now: float,
    webhooks: Sequence[WebhookEndpointState] = (),
) -> list[FiringAlert]:
    """The alerts the monitor recorded as firing (``key``, since when), each with its rule's
    summary and runbook, and the detail of an evaluation of ``samples`` (and the webhook
    endpoints' state) now."""
    recent = [s for s in samples if s.at >= now - history_needed()]
    verdicts = (
        {a.key: a.as_json() for a in evaluate(recent, now, webhooks=webhooks)} if firing else {}
    )
    rules = {rule.name: rule for rule in load_rules()}
    shown = []
    for key, since in firing:
        name, _, inside = key.partition("{")
        labels = dict(item.split("=", 1) for item in inside.rstrip("}").split(",") if "=" in item)
        rule = rules.get(name)
        verdict = verdicts.get(key, {})
        summary = rule.summary if rule else name
        shown.append(
            FiringAlert(
                name=name,
                severity=rule.severity if rule else "",
                summary=verdict.get("summary")
                or summary.format(
                    lane=labels.get("lane", ""), destination=labels.get("destination", "")
                ),
                detail=verdict.get("detail", ""),
                since=since,
                runbook=rule.runbook_url if rule else None,
            )
        )
    return shown


async def destinations(request: Request, session: Session) -> Response:
    app = _postlane(request)
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
    providers = provider_names()
    rows = []
    for name in names:
        status = states.get(name)
        paused = status is not None and (status.paused_until or 0) > now
        slowed = (
            status is not None
            and not paused
            and status.rate is not None
            and (status.configured_rate is None or status.rate < status.configured_rate)
        )
        rows.append(
            {
                "name": name,
                "kind": _destination_kind(name, providers),
                "status": status,
                "paused": paused,
                "slowed": slowed,
                "replies": sorted(replies.get(name, {}).items(), key=lambda kv: -kv[1]),
                "total": sum(replies.get(name, {}).values()),
            }
        )
    return render(
        request,
        session,
        "destinations.html",
        rows=rows,
        relay=app.config.redact(app.config.delivery.relay),
    )


def _destination_kind(name: str, providers: frozenset[str]) -> str:
    """``relay`` (every delivery goes through it: its own slow-downs and pauses), ``provider``
    (a mailbox provider's domains together) or ``domain``."""
    if name == "relay" or name.startswith("relay:"):
        return "relay"
    return "provider" if name in providers else "domain"


async def lift(request: Request, session: Session) -> Response:
    app = _postlane(request)
    form = await read_form(request)
    name = str(form.get("destination", "")).strip()
    if not name:
        raise PostlaneError("which destination?")
    held = {
        s.destination
        for s in await app.store.destination_states()
        if s.paused_until is not None or s.rate is not None or s.reason
    }
    due = await app.lift_destinations([name])
    app.wake.set()
    if name not in held and not due:  # a name typed wrong said "lifted" all the same
        return back_to("/destinations", f"{name} was neither paused nor slowed down")
    return back_to(
        "/destinations", f"lifted the pause and slow-down on {name}: {due:,} recipient(s) due now"
    )


# -- queue -----------------------------------------------------------------------------------------


async def queue(request: Request, session: Session) -> Response:
    app = _postlane(request)
    jump = request.query_params.get("id", "").strip()
    if jump:
        return RedirectResponse(f"/queue/{jump}", status_code=303)
    filters = filters_of(request.query_params)
    selector = selector_from_filters(app.clock, filters)
    after_text = request.query_params.get("after", "0")
    after = int(after_text) if after_text.isdigit() else 0
    views, next_after = await app.store.page_messages(selector, after=after, limit=PAGE_SIZE)
    views = await app.as_due(views)
    return render(
        request,
        session,
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


async def message(request: Request, session: Session) -> Response:
    app = _postlane(request)
    queue_id = request.path_params["queue_id"]
    view = await app.get(queue_id, history=True)
    content = await app.content(queue_id)
    head = content.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
    headers = list(BytesHeaderParser().parsebytes(head).items())
    return render(request, session, "message.html", message=view, headers=headers)


@dataclass(frozen=True)
class _Choice:
    """What an action form chose, and the form fields that choose it again (to confirm)."""

    selector: Selector
    fields: list[tuple[str, str]]


async def act(request: Request, session: Session) -> Response:
    """An action on what a form chose (ticked messages, every message the filter matches, or
    a dead-letter group): asks first when the action needs it, exports when asked to."""
    app = _postlane(request)
    form = await read_form(request)
    try:
        action = QueueAction(str(form.get("action", "")))
    except ValueError:
        raise PostlaneError(f"no action {form.get('action')!r}") from None
    back = safe_back(str(form.get("back", "/queue")))
    choice = await _chosen(app, form)
    if isinstance(choice, str):
        return back_to(back, choice)
    counts = None
    if action in CONFIRMED and form.get("confirm") == "1":
        # what is confirmed is what was counted: mail that joined the selection since (a
        # filter, "every message matching") is asked about again, not removed unseen (an
        # audit: "Delete 30?" deleted 100)
        counts = await app.summarize(action, choice.selector)
        if str(sum(c.count for c in counts)) != str(form.get("total", "")):
            form = _unconfirmed(form)
    if action in CONFIRMED and form.get("confirm") != "1":
        counts = counts if counts is not None else await app.summarize(action, choice.selector)
        total = sum(c.count for c in counts)
        suppressed = []
        if action is QueueAction.REQUEUE:  # requeued as they are, they would never be tried
            suppressed = await app.suppressed_dead_letters(choice.selector)
        return render(
            request,
            session,
            "confirm.html",
            action=action.value,
            counts=counts,
            total=total,
            hidden=[("action", action.value), ("back", back), ("total", total), *choice.fields],
            back=back,
            suppressed=suppressed,
            changed=form.get("changed") == "1",
        )
    if action in EXPORTABLE and form.get("export") == "1":
        return await _download(app, action, choice.selector)
    if action is QueueAction.REQUEUE:
        requeued = await app.requeue(choice.selector, unsuppress=form.get("unsuppress") == "1")
        lifted = len(requeued.unsuppressed)
        lifted_note = f", {lifted:,} address(es) taken off the suppression list" if lifted else ""
        return back_to(back, f"requeued {requeued.count:,} recipient(s){lifted_note}")
    count = await app.act(action, choice.selector)
    verb = {"flush": "flushed", "hold": "held", "release": "released"}.get(
        action.value, action.value + "d"
    )
    if action in EXPORTABLE:
        back = await _still_there(app, back)
    return back_to(back, f"{verb} {count:,} recipient(s)")


async def _still_there(app: AsyncPostlane, back: str) -> str:
    """``back``, or the queue's list when it is the page of a message the action removed
    (deleting from a message's own page landed on "no message with id ...": an audit)."""
    prefix, _, queue_id = back.partition("/queue/")
    if prefix or not queue_id or "/" in queue_id or "?" in queue_id:
        return back
    try:
        await app.get(queue_id, history=False)
    except NotFound:
        return "/queue"
    return back


def _unconfirmed(form: ImmutableMultiDict[str, str]) -> ImmutableMultiDict[str, str]:
    """``form`` to be confirmed again, saying the selection changed since it was counted."""
    items = [(k, v) for k, v in form.multi_items() if k != "confirm"]
    return ImmutableMultiDict([*items, ("changed", "1")])


async def _chosen(app: AsyncPostlane, form: ImmutableMultiDict[str, str]) -> _Choice | str:
    """What the form chose, or a note saying why there is nothing to act on."""
    group = str(form.get("group", ""))
    filters = filters_of(dict(form.items()))
    if group:  # a dead-letter group: exactly the recipients whose failure reads the same
        rows = await group_rows(app, group, filters)
        if not rows:
            return "that group is empty now"
        selector = dataclasses.replace(
            selector_from_filters(app.clock, filters), all=False, delivery_ids=tuple(rows)
        )
        return _Choice(selector, [("group", group), *filters.items()])
    ids = [str(v) for v in form.getlist("ids") if str(v).strip()]
    if form.get("all") == "1":  # every message the filter matches: its recipients
        ids = []
    elif ids:  # the messages ticked: all their recipients, whatever the page's filter
        filters = {}
    else:
        return "select messages first (or apply to all matching)"
    fields = [("group", group), *filters.items(), *[("ids", i) for i in ids]]
    if not ids:
        fields.append(("all", "1"))
    return _Choice(selector_from_filters(app.clock, filters, ids), fields)


async def _download(app: AsyncPostlane, action: QueueAction, selector: Selector) -> Response:
    """Delete (or purge) and hand over what was removed, for `postlane queue import`."""
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


# -- dead letters and suppressions -----------------------------------------------------------------


async def dlq(request: Request, session: Session) -> Response:
    app = _postlane(request)
    filters = filters_of(request.query_params)
    selector = selector_from_filters(app.clock, filters)
    groups = await app.dead_groups(selector, limit=200)
    recent = await app.dead_letters(selector, limit=PAGE_SIZE)
    stats = await app.stats()
    return render(
        request,
        session,
        "dlq.html",
        groups=[(g, key_of_group(g)) for g in groups],
        recent=recent,
        total=stats.dead if not filters else sum(g.count for g in groups),
        shown=sum(g.count for g in groups),
        filters=filters,
    )


async def suppressions(request: Request, session: Session) -> Response:
    app = _postlane(request)
    sought = request.query_params.get("address", "").strip()
    if sought:  # one address's entries, however long the list
        entries = await app.suppressions_of([check_text(sought, "address")])
    else:
        entries = await app.suppressions(limit=1000)
    total = (await app.stats()).suppression_list
    return render(
        request, session, "suppressions.html", entries=entries, total=total, sought=sought
    )


async def suppress(request: Request, session: Session) -> Response:
    app = _postlane(request)
    form = await read_form(request)
    address = str(form.get("address", "")).strip()
    scope = check_text(str(form.get("scope", "")).strip(), "scope") or None
    if str(form.get("remove", "")) == "1":
        # one row's entry: its scope and reason (an unsubscribe stays when a bounce goes)
        reason = str(form.get("reason", "")).strip() or None
        removed = await app.unsuppress(address, scope=scope, reason=reason)
        note = f"removed {address}" if removed else f"{address} was not on the list"
    else:
        reason = check_text(str(form.get("reason", "")).strip(), "reason") or None
        lanes = form.getlist("lanes") or None  # none ticked: every lane
        added = await app.suppress(address, reason=reason, scope=scope, lanes=lanes)
        note = f"added {address}" if added else f"{address} was already on the list"
    return back_to("/suppressions", note)


async def unmatched(request: Request, session: Session) -> Response:
    app = _postlane(request)
    reports = await app.store.list_unmatched(limit=200)
    shown = None
    chosen = request.query_params.get("id", "")
    if chosen.isdigit() and len(chosen) <= 19:
        shown = await app.store.get_unmatched(int(chosen))
    text = (shown.content or b"").decode("utf-8", "replace") if shown is not None else ""
    return render(request, session, "feedback.html", reports=reports, shown=shown, shown_text=text)


# -- log in and out --------------------------------------------------------------------------------


async def login_page(request: Request) -> Response:
    next_page = safe_back(request.query_params.get("next", "/"))
    html = templates.get_template("login.html").render(next=next_page, failed=False)
    return HTMLResponse(html, headers=SECURITY_HEADERS)


async def login_post(request: Request) -> Response:
    """An admin token in, a new session's cookie out (never the token itself). Wrong tokens
    are counted against the client: past a few, it waits before the next is looked at."""
    refusal = refused_cross_site(request)  # another site logging the browser in as it likes
    if refusal is not None:
        return refusal
    try:
        form = await read_form(request)
    except PostlaneError as exc:
        return HTMLResponse(exc.message, status_code=400, headers=SECURITY_HEADERS)
    next_page = safe_back(str(form.get("next", "/")))
    dashboard = context(request)
    try:
        value = dashboard.tokens.login(request, str(form.get("token", "")).strip())
    except TooManyAttempts as exc:
        return login_refused(next_page, exc)
    except InvalidToken:
        html = templates.get_template("login.html").render(next=next_page, failed=True)
        return HTMLResponse(html, status_code=401, headers=SECURITY_HEADERS)
    response = RedirectResponse(next_page, status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        value,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        max_age=int(dashboard.tokens.sessions.lifetime),
    )
    return response


def login_refused(next_page: str, exc: TooManyAttempts) -> HTMLResponse:
    """The login page, saying how long to wait (429 with Retry-After)."""
    html = templates.get_template("login.html").render(
        next=next_page, failed=False, wait=exc.retry_after
    )
    headers = {**SECURITY_HEADERS, "Retry-After": str(exc.retry_after)}
    return HTMLResponse(html, status_code=429, headers=headers)


async def logout(request: Request, session: Session) -> Response:
    """End the session in every process (its cookie no longer works, even if kept), and in the
    browser."""
    dashboard = context(request)
    ended = dashboard.tokens.logout(request)
    if ended is not None:
        session_id, until = ended
        now = dashboard.postlane.clock.now()
        await dashboard.postlane.store.end_session(session_id, until, now)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE)
    return response
