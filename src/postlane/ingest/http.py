"""The HTTP API (Starlette on uvicorn): enqueue, read, operate, stats, metrics, health.

Bearer tokens carry a scope (see :mod:`postlane.auth`). ``[http] tokens`` (and
``$POSTLANE_API_TOKEN``) are ``admin``: everything, operations included. ``[http] send_tokens``
are ``send``: enqueue, and read back the messages that token enqueued. With no token configured
at all the API answers only clients on loopback (with every scope). ``/metrics`` and ``/healthz``
need no token, so a Prometheus scraper and a load balancer can reach them. The API describes
itself at ``/openapi.json``. It answers programs, not web pages: a body must be
``application/json`` (415), and a request a browser says another site's page sent is refused
(403 ``cross_site``; see ``docs/security.md``).

Errors are ``{"error": {"code", "message"}}`` with a 4xx status (503 when the store is down),
and a refused request stores nothing. Bodies are read within bounds by
:mod:`postlane.ingest.bodies`; the listener's own limits are :mod:`postlane.ingest.server`'s.

The endpoints are plain functions that find what they need (the application, the config, the
tokens, metrics) in an :class:`ApiContext` on ``request.app.state``: :func:`build_app` makes the
API alone, and ``postlane serve`` puts :func:`api_routes` beside the dashboard's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from postlane.app import AsyncPostlane
from postlane.auth import Caller, Scope
from postlane.cursors import Page
from postlane.errors import NotFound, PostlaneError, StoreUnavailable, ValidationError
from postlane.exports import check_export
from postlane.ingest.api_core import (
    STORE_RETRY_AFTER,
    ApiContext,
    ApiJSON,
    Handler,
    batch_from_json,
    body_flag,
    check_sender,
    context_of,
    endpoint,
    error_response,
    install,
    message_from_json,
    page_response,
    query_cursor,
    query_selector,
    read_body,
    read_json,
    read_page,
    refuse_batch_idempotency_header,
    selector_of,
)
from postlane.ingest.bodies import NDJSON, NDJSON_TYPES, ApiError, require_media_type
from postlane.ingest.http_feeds import (
    add_suppression,
    get_unmatched,
    list_events,
    list_suppressions,
    list_unmatched,
    list_webhooks,
    remove_suppression,
    webhook_failures,
    webhook_replay,
    webhook_resume,
    webhook_test,
)
from postlane.ingest.openapi import openapi_document
from postlane.ingest.provider_webhooks import install_provider_webhooks, provider_webhook
from postlane.ingest.server import HttpLimits, bind, serve_http
from postlane.queue_actions import QueueAction
from postlane.records import Selector

if TYPE_CHECKING:
    from postlane.ingest.door import FrontDoor
    from postlane.supervisor import ProcessSlot


__all__ = ["ApiContext", "api_routes", "bind", "build_app", "install", "start_http"]

#: an exported delete or purge over HTTP takes at most this many recipients (one slice: it is
#: exported and deleted in one go); more is a job for `postlane queue delete --export`
MAX_EXPORT_RECIPIENTS = 1000
_QUEUE_ACTIONS = (QueueAction.FLUSH, QueueAction.HOLD, QueueAction.RELEASE, QueueAction.DELETE)
_DLQ_ACTIONS = (QueueAction.REQUEUE, QueueAction.PURGE)
#: the actions that can answer with what they removed (``"export": true``)
_EXPORTING = (QueueAction.DELETE, QueueAction.PURGE)

log = logging.getLogger("postlane.http")


# -- enqueue and read ------------------------------------------------------------------------------


async def post_message(request: Request, caller: Caller) -> Response:
    api = context_of(request)
    data = await read_json(request, api.body_limit)
    message = message_from_json(data, request.headers.get("idempotency-key"))
    prepared = dataclasses.replace(api.postlane.prepare(message), submitter=caller.submitter)
    check_sender(caller, prepared)
    [result] = await api.postlane.send_prepared([prepared])
    if api.metrics is not None and not result.duplicate:
        api.metrics.enqueued.labels("http").inc()
    return ApiJSON(result.as_json(), status_code=202)


async def post_batch(request: Request, caller: Caller) -> Response:
    api = context_of(request)
    refuse_batch_idempotency_header(request)
    items = batch_from_json(await read_json(request, api.batch_limit))
    results: list[dict[str, Any] | None] = [None] * len(items)
    prepared = []
    positions = []
    for index, item in enumerate(items):
        items[index] = None  # its JSON goes as its rendering comes: held once, not twice
        try:
            message = api.postlane.prepare(message_from_json(item))
            check_sender(caller, message)
            prepared.append(dataclasses.replace(message, submitter=caller.submitter))
            positions.append(index)
        except (ApiError, PostlaneError) as exc:
            results[index] = {"error": {"code": exc.code, "message": exc.message}}
        del item
    if prepared:
        stored = await api.postlane.send_prepared(prepared)  # one durable commit for all
        for index, result in zip(positions, stored, strict=True):
            results[index] = result.as_json()
        if api.metrics is not None:
            api.metrics.enqueued.labels("http").inc(sum(1 for r in stored if not r.duplicate))
    accepted = len(prepared)
    return ApiJSON(
        {"accepted": accepted, "refused": len(items) - accepted, "results": results},
        status_code=202 if accepted == len(items) else 207,
    )


async def get_message(request: Request, caller: Caller) -> Response:
    view = await context_of(request).postlane.get(request.path_params["queue_id"], history=True)
    if caller.scope is Scope.SEND and view.submitter != caller.submitter:
        raise NotFound(f"no message with id {view.id}")  # not yours: as if it did not exist
    return ApiJSON(view.as_json())


async def cancel_message(request: Request, caller: Caller) -> Response:
    """Cancel what of a message has not gone yet; a send token, only its own messages."""
    submitter = caller.submitter if caller.scope is Scope.SEND else None
    cancelled = await context_of(request).postlane.cancel(
        request.path_params["queue_id"], submitter=submitter
    )
    return ApiJSON(cancelled.as_json())


Listing = Callable[[AsyncPostlane, Selector, int], Awaitable[Sequence[Any]]]
PagedListing = Callable[[AsyncPostlane, Selector, str | None, int], Awaitable[Page[Any]]]


def listing(fetch: Listing) -> Handler:
    """A GET that answers what ``fetch`` finds for the query string's selector, as JSON."""

    async def run(request: Request, caller: Caller) -> Response:
        selector, limit = query_selector(request)
        found = await fetch(context_of(request).postlane, selector, limit)
        return ApiJSON([item.as_json() for item in found])

    return run


def paged_listing(fetch: PagedListing) -> Handler:
    """A GET that answers a page of what ``fetch`` finds for the query string's selector, as a
    JSON array, from the query's ``cursor``; the next page's cursor is in its headers."""

    async def run(request: Request, caller: Caller) -> Response:
        selector, limit = query_selector(request, paged=True)
        cursor = query_cursor(request)
        page = await read_page(fetch(context_of(request).postlane, selector, cursor, limit))
        return page_response(request, page)

    return run


list_messages = paged_listing(
    lambda app, selector, cursor, limit: app.message_page(selector, cursor=cursor, limit=limit)
)
list_dead = paged_listing(
    lambda app, selector, cursor, limit: app.dead_letter_page(selector, cursor=cursor, limit=limit)
)
# an aggregate, largest group first: its order moves as letters die, so it has no keyset to
# page on (a group's letters page through /v1/dlq with its class and domain)
dead_groups = listing(lambda app, selector, limit: app.dead_groups(selector, limit=limit))


async def get_stats(request: Request, caller: Caller) -> Response:
    return ApiJSON((await context_of(request).postlane.stats()).as_json())


# -- operate ---------------------------------------------------------------------------------------


async def post_action(request: Request, caller: Caller) -> Response:
    """flush, hold, release, delete (``/v1/queue/...``), requeue, purge (``/v1/dlq/...``) of
    what a selector picks: ``dry_run`` counts, ``export`` answers with what was removed."""
    app = context_of(request).postlane
    action = _action(request)
    data = await read_json(request, 1024 * 1024)
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_field", "send a selector object")
    dry_run = body_flag(data, "dry_run")
    export = body_flag(data, "export")
    # a requeue may lift the suppression of what it requeues (else it is refused: 409)
    unsuppress = body_flag(data, "unsuppress") if action is QueueAction.REQUEUE else False
    if export and action not in _EXPORTING:
        raise ApiError(400, "invalid_field", "export applies to delete and purge")
    selector = selector_of(request, data)
    if not selector.ids and not selector.all and action is not QueueAction.FLUSH:
        raise ApiError(400, "invalid_field", 'give "ids" or "all": true (selectors narrow)')
    counts = await app.summarize(action, selector)
    if dry_run:
        return ApiJSON({"would_touch": [c.as_json() for c in counts]})
    if export:
        return await exported(request, action, selector, sum(c.count for c in counts))
    if action is QueueAction.REQUEUE:
        requeued = await app.requeue(selector, unsuppress=unsuppress)
        return ApiJSON(
            {"action": action.value, "count": requeued.count, "unsuppressed": requeued.unsuppressed}
        )
    count = await app.act(action, selector)
    return ApiJSON({"action": action.value, "count": count})


def _action(request: Request) -> QueueAction:
    """The path's action, if this path (queue or dead letters) has it; else a 404."""
    allowed = _DLQ_ACTIONS if request.url.path.startswith("/v1/dlq/") else _QUEUE_ACTIONS
    name = request.path_params["action"]
    try:
        action = QueueAction(name)
    except ValueError:
        action = None
    if action not in allowed:
        known = ", ".join(a.value for a in allowed)
        raise ApiError(404, "not_found", f"no action {name!r} ({known})")
    return cast(QueueAction, action)


class _ExportBuffer(io.StringIO):
    """An exported delete's JSON Lines, in memory, refused past ``limit`` characters (ASCII:
    bytes). :meth:`AsyncPostlane.act` writes a slice here before deleting it, so the refusal
    comes before that slice is deleted."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.size = 0

    def write(self, text: str, /) -> int:
        if self.size + len(text) > self.limit:
            raise ApiError(
                413,
                "export_too_large",
                f"the export would pass {self.limit} bytes: narrow the selector, or use "
                "`postlane queue delete --export FILE`",
            )
        self.size += len(text)
        return super().write(text)


async def exported(
    request: Request, action: QueueAction, selector: Selector, selected: int
) -> Response:
    """Delete (or purge) and answer with what was deleted, as `postlane queue delete
    --export` writes it. All or nothing: should the action fail part-way (the store, the
    size limit), what it had deleted is imported back before the error is returned."""
    if selected > MAX_EXPORT_RECIPIENTS:
        raise ApiError(
            413,
            "export_too_large",
            f"an exported {action.value} takes at most {MAX_EXPORT_RECIPIENTS} recipients "
            f"({selected:,} selected): narrow the selector, or use "
            "`postlane queue delete --export FILE`",
        )
    api = context_of(request)
    buffer = _ExportBuffer(api.export_limit)
    removed = 0  # how much of the buffer describes slices already deleted

    def slice_done(_: int) -> None:
        nonlocal removed
        removed = buffer.size

    try:
        count = await api.postlane.act(
            action,
            selector,
            export=buffer,
            progress=slice_done,
            slice_size=MAX_EXPORT_RECIPIENTS,
        )
    except Exception:
        if removed:
            lines = buffer.getvalue()[:removed].split("\n")
            try:
                await api.postlane.import_(lines, batch_size=None)
            except Exception:
                log.exception("an exported %s failed and could not be undone", action.value)
                raise
        raise
    return Response(buffer.getvalue(), media_type=NDJSON, headers={"X-Postlane-Count": str(count)})


async def import_export(request: Request, caller: Caller) -> Response:
    """`postlane queue import` over HTTP: every line is checked before anything is stored,
    then all are stored in one transaction."""
    api = context_of(request)
    require_media_type(request, NDJSON_TYPES)
    body = await read_body(request, api.export_limit)
    try:
        lines = body.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        raise ApiError(400, "invalid_export", "the body is not UTF-8 JSON Lines") from None
    try:
        records = check_export(lines)
    except ValidationError as exc:
        raise ApiError(400, "invalid_export", exc.message) from None
    if not records:
        raise ApiError(400, "invalid_export", "the body holds no export record")
    restored = await api.postlane.import_(lines, batch_size=None)
    return ApiJSON({"records": records, "imported": restored})


# -- probes and description ------------------------------------------------------------------------


async def get_metrics(request: Request, caller: Caller) -> Response:
    metrics = context_of(request).metrics
    if metrics is None:
        raise ApiError(404, "not_found", "metrics are not enabled")
    body = await metrics.exposition()
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")


async def healthz(request: Request, caller: Caller) -> Response:
    """The process is up (for a load balancer's liveness check); under ``serve --processes
    N``, which of them answered (its index and pid)."""
    process = context_of(request).process
    if process is None:
        return ApiJSON({"status": "ok"})
    return ApiJSON({"status": "ok", "process": process.index, "pid": os.getpid()})


#: how long /readyz waits for the store's small write
READY_TIMEOUT = 5.0


async def readyz(request: Request, caller: Caller) -> Response:
    """The store takes a small write now (a full disk, a corrupted file, a lost server say
    no) and, in serve, the worker runs: for readiness checks."""
    api = context_of(request)
    reason = None
    try:
        await asyncio.wait_for(
            api.postlane.store.check(api.postlane.clock.now()), timeout=READY_TIMEOUT
        )
    except StoreUnavailable as exc:
        reason = exc.message
    except TimeoutError:
        reason = f"the store did not answer within {READY_TIMEOUT:g} s"
    except Exception as exc:  # a probe answers, whatever broke
        log.exception("the readiness check failed")
        reason = f"the store check failed: {type(exc).__name__}"
    if reason is None:
        reason = api.store_health.recent_failure()
    if reason is None and api.worker is not None and not api.worker.running:
        reason = "the worker is not running"
    if reason is not None:
        return ApiJSON(
            {"status": "unavailable", "error": reason},
            status_code=503,
            headers={"Retry-After": str(STORE_RETRY_AFTER)},
        )
    return ApiJSON({"status": "ok"})


async def openapi(request: Request, caller: Caller) -> Response:
    return ApiJSON(openapi_document())


async def not_found(request: Request, exc: Exception) -> Response:
    return error_response(404, "not_found", f"no route {request.url.path}")


async def method_not_allowed(request: Request, exc: Exception) -> Response:
    return error_response(405, "method_not_allowed", f"{request.method} is not allowed here")


async def server_error(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return error_response(500, "internal_error", "unexpected error (logged)")


#: JSON errors for what no endpoint answers (also for the dashboard's paths, beside the API)
EXCEPTION_HANDLERS = {404: not_found, 405: method_not_allowed, 500: server_error}

_SEND, _ADMIN, _PUBLIC = Scope.SEND, Scope.ADMIN, None
#: path, method, handler, scope needed (None: no token)
_ROUTES: tuple[tuple[str, str, Handler, Scope | None], ...] = (
    ("/v1/messages", "POST", post_message, _SEND),
    ("/v1/messages", "GET", list_messages, _ADMIN),
    ("/v1/messages/batch", "POST", post_batch, _SEND),
    ("/v1/messages/{queue_id}", "GET", get_message, _SEND),
    ("/v1/messages/{queue_id}", "DELETE", cancel_message, _SEND),
    ("/v1/stats", "GET", get_stats, _ADMIN),
    ("/v1/queue", "GET", list_messages, _ADMIN),
    ("/v1/queue/import", "POST", import_export, _ADMIN),
    ("/v1/queue/{action}", "POST", post_action, _ADMIN),
    ("/v1/dlq", "GET", list_dead, _ADMIN),
    ("/v1/dlq/groups", "GET", dead_groups, _ADMIN),
    ("/v1/dlq/{action}", "POST", post_action, _ADMIN),
    ("/v1/suppressions", "GET", list_suppressions, _ADMIN),
    ("/v1/suppressions", "POST", add_suppression, _ADMIN),
    ("/v1/suppressions/{address}", "DELETE", remove_suppression, _ADMIN),
    ("/v1/events", "GET", list_events, _ADMIN),
    ("/v1/feedback/unmatched", "GET", list_unmatched, _ADMIN),
    ("/v1/feedback/unmatched/{report_id}", "GET", get_unmatched, _ADMIN),
    ("/v1/webhooks/out", "GET", list_webhooks, _ADMIN),
    ("/v1/webhooks/out/{name}/failures", "GET", webhook_failures, _ADMIN),
    ("/v1/webhooks/out/{name}/test", "POST", webhook_test, _ADMIN),
    ("/v1/webhooks/out/{name}/replay", "POST", webhook_replay, _ADMIN),
    ("/v1/webhooks/out/{name}/resume", "POST", webhook_resume, _ADMIN),
    # the providers' own webhooks: their signature is the proof (ingest/provider_webhooks.py)
    ("/v1/webhooks/ses", "POST", provider_webhook, _PUBLIC),
    ("/v1/webhooks/sendgrid", "POST", provider_webhook, _PUBLIC),
    ("/v1/webhooks/postmark", "POST", provider_webhook, _PUBLIC),
    ("/v1/webhooks/mailgun", "POST", provider_webhook, _PUBLIC),
    ("/metrics", "GET", get_metrics, _PUBLIC),
    ("/healthz", "GET", healthz, _PUBLIC),
    ("/readyz", "GET", readyz, _PUBLIC),
    ("/openapi.json", "GET", openapi, _PUBLIC),
)
#: what ``postlane worker --metrics`` serves
PROBES = ("/metrics", "/healthz", "/readyz")


def api_routes(*, probes_only: bool = False) -> list[BaseRoute]:
    """The API's routes (their endpoints need :func:`install` on the app's state)."""
    return [
        Route(path, endpoint(handler, scope), methods=[method])
        for path, method, handler, scope in _ROUTES
        if not probes_only or path in PROBES
    ]


def build_app(
    door: FrontDoor,
    *,
    probes_only: bool = False,
    limits: HttpLimits | None = None,
    process: ProcessSlot | None = None,
) -> Starlette:
    """The API as a Starlette application (tests drive it with httpx's ASGI transport). With
    ``probes_only`` (``postlane worker --metrics``): /metrics, /healthz and /readyz only.
    ``postlane serve`` adds the dashboard beside it (:func:`postlane.serve.build_app`)."""
    asgi = Starlette(
        routes=api_routes(probes_only=probes_only), exception_handlers=EXCEPTION_HANDLERS
    )
    install(asgi.state, door, limits, process)
    if not probes_only:
        install_provider_webhooks(asgi.state, door)
    return asgi


@contextlib.asynccontextmanager
async def start_http(
    door: FrontDoor, *, probes_on: str | None = None, limits: HttpLimits | None = None
) -> AsyncIterator[str]:
    """Serve the API until the context exits; yields the address it listens on. With
    ``probes_on`` (HOST:PORT), serve only /metrics, /healthz and /readyz there (a worker).
    ``limits`` default to the configuration's (see :class:`HttpLimits`)."""
    limits = limits or HttpLimits.from_config(door.config)
    asgi = build_app(door, probes_only=probes_on is not None, limits=limits)
    refusals = cast(ApiContext, asgi.state.api).refusals
    async with serve_http(
        asgi, door.config, probes_on=probes_on, limits=limits, refusals=refusals
    ) as address:
        yield address
