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
import base64
import binascii
import contextlib
import dataclasses
import io
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, cast

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.datastructures import State
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from postlane.app import AsyncPostlane, QueueAction, check_export
from postlane.auth import (
    Caller,
    InvalidToken,
    MissingToken,
    NotLocal,
    Refused,
    Scope,
    Tokens,
    TooManyAttempts,
    cross_site,
)
from postlane.config import Config
from postlane.errors import (
    IdempotencyConflict,
    MessageTooLarge,
    NotFound,
    PostlaneError,
    StoreUnavailable,
    ValidationError,
)
from postlane.ingest.bodies import (
    JSON_TYPES,
    NDJSON,
    NDJSON_TYPES,
    ApiError,
    RequestBudget,
    Reservation,
    parse_json,
    require_media_type,
)
from postlane.ingest.bodies import read_body as read_within
from postlane.ingest.openapi import openapi_document
from postlane.ingest.server import (
    HttpLimits,
    Refusals,
    bind,
    escaped_store_error,
    serve_http,
)
from postlane.message import Attachment, Message, check_text
from postlane.metrics import Metrics
from postlane.records import Selector
from postlane.selectors import SELECTOR_FIELDS, optional_string, parse_selector, string_list

if TYPE_CHECKING:
    from postlane.worker import Worker

__all__ = ["ApiContext", "api_routes", "bind", "build_app", "install", "start_http"]

log = logging.getLogger("postlane.http")

MAX_BATCH = 1000
#: a batch's body is at most this many times a message's
BATCH_BODIES = 4
MAX_LIST = 1000
#: an exported delete or purge over HTTP takes at most this many recipients (one slice: it is
#: exported and deleted in one go); more is a job for `postlane queue delete --export`
MAX_EXPORT_RECIPIENTS = 1000
#: an export (and so an import) body is at most this large, and at least two messages of
#: max_size (JSON and base64 included)
EXPORT_BYTES = 64 * 1024 * 1024
#: seconds a client is told to wait (Retry-After) when the store cannot answer
STORE_RETRY_AFTER = 5
#: JSON (and base64) inflate a message: the body may be this much larger than max_size
JSON_OVERHEAD = 1.4
_MESSAGE_FIELDS = {
    "from",
    "to",
    "cc",
    "bcc",
    "subject",
    "text",
    "html",
    "headers",
    "lane",
    "idempotency_key",
    "metadata",
    "attachments",
    "raw",
    "send_at",
    "expires_at",
}
#: query parameters that may repeat (a list); the others take their last value
_REPEATABLE = ("ids", "lane", "state", "domain", "class")

_QUEUE_ACTIONS = (QueueAction.FLUSH, QueueAction.HOLD, QueueAction.RELEASE, QueueAction.DELETE)
_DLQ_ACTIONS = (QueueAction.REQUEUE, QueueAction.PURGE)
#: the actions that can answer with what they removed (``"export": true``)
_EXPORTING = (QueueAction.DELETE, QueueAction.PURGE)


# -- errors --------------------------------------------------------------------------------------


class ApiJSON(JSONResponse):
    """A JSON answer that renders whatever a store holds: a value strict JSON cannot carry (a
    NaN, a lone surrogate, kept by an older version that let them in) is written as null or
    as an escape, not a 500 on every later read."""

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except (ValueError, UnicodeEncodeError):
            return json.dumps(
                _finite(content), ensure_ascii=True, allow_nan=False, separators=(",", ":")
            ).encode("ascii")


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return ApiJSON(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers
    )


def _postlane_error(exc: PostlaneError) -> JSONResponse:
    if isinstance(exc, IdempotencyConflict):  # Stripe's answer; the body names the first id
        error = {"code": exc.code, "message": exc.message, "id": exc.existing_id, "key": exc.key}
        return ApiJSON({"error": error}, status_code=409)
    if isinstance(exc, MessageTooLarge):
        return error_response(413, exc.code, exc.message)
    if isinstance(exc, ValidationError):
        return error_response(422, exc.code, exc.message)
    if isinstance(exc, NotFound):
        return error_response(404, exc.code, exc.message)
    if isinstance(exc, StoreUnavailable):  # never the client's fault: it may retry
        return error_response(503, exc.code, exc.message, {"Retry-After": str(STORE_RETRY_AFTER)})
    return error_response(400, exc.code, exc.message)


#: how the API says no to each refusal of :mod:`postlane.auth`: status, code, message
_REFUSALS: dict[type[Refused], tuple[int, str, str]] = {
    NotLocal: (
        403,
        "forbidden",
        "no API token is configured: the API answers only loopback clients "
        "addressing it as localhost or 127.0.0.1",
    ),
    MissingToken: (401, "unauthorized", "send Authorization: Bearer <token>"),
    InvalidToken: (401, "unauthorized", "the token is not valid"),
}


@contextlib.contextmanager
def _invalid_field() -> Iterator[None]:
    """A field of the wrong shape is a 400 ``invalid_field`` (not a refused message's 422)."""
    try:
        yield
    except ValidationError as exc:
        raise ApiError(400, "invalid_field", exc.message) from None


# -- what the endpoints share ----------------------------------------------------------------------


class StoreHealth:
    """The last store failure a request met, for /readyz: a small write can pass while the
    pages mail needs are damaged (a corrupted file), so readiness also says no for a while
    after requests failed."""

    #: seconds a failure met by a request keeps /readyz at 503
    MEMORY = 30.0

    def __init__(self) -> None:
        self.failed_at: float | None = None
        self.reason = ""

    def failed(self, reason: str) -> None:
        self.failed_at = time.monotonic()
        self.reason = reason

    def recent_failure(self) -> str | None:
        """What a request met in the last :attr:`MEMORY` seconds, or None."""
        if self.failed_at is None:
            return None
        ago = time.monotonic() - self.failed_at
        if ago > self.MEMORY:
            return None
        return f"a request failed {ago:.0f} s ago: {self.reason}"


@dataclasses.dataclass(frozen=True)
class ApiContext:
    """What the API's endpoints need, kept on ``app.state.api`` (see :func:`install`)."""

    postlane: AsyncPostlane
    config: Config
    tokens: Tokens
    metrics: Metrics | None
    #: in ``serve``, the worker /readyz reports on
    worker: Worker | None
    #: a message's JSON body is at most this large
    body_limit: int
    #: an export (or import) body is at most this large
    export_limit: int
    #: timeouts and sizes of the listener and of request bodies
    limits: HttpLimits
    #: request bytes in flight, process-wide
    budget: RequestBudget
    #: store failures requests met (readiness)
    store_health: StoreHealth = dataclasses.field(default_factory=StoreHealth)
    #: what the listener turned away (serve_http counts into it; the metrics read it)
    refusals: Refusals = dataclasses.field(default_factory=Refusals)

    @classmethod
    def create(
        cls,
        config: Config,
        postlane: AsyncPostlane,
        metrics: Metrics | None = None,
        worker: Worker | None = None,
        limits: HttpLimits | None = None,
    ) -> ApiContext:
        limits = limits or HttpLimits.from_config(config)
        body_limit = int(config.smtp.max_size * JSON_OVERHEAD) + 64 * 1024
        export_limit = max(EXPORT_BYTES, 2 * body_limit)
        largest = max(BATCH_BODIES * body_limit, export_limit)
        api = cls(
            postlane=postlane,
            config=config,
            tokens=Tokens.from_config(config.http, clock=postlane.clock.now),
            metrics=metrics,
            worker=worker,
            body_limit=body_limit,
            export_limit=export_limit,
            limits=limits,
            budget=RequestBudget(limits.request_bytes or largest + body_limit),
        )
        if metrics is not None:
            with contextlib.suppress(ValueError):  # already counted (one registry, two apps)
                metrics.registry.register(_DoorMetrics(api))
        return api

    @property
    def batch_limit(self) -> int:
        """A batch's JSON body is at most this large."""
        return BATCH_BODIES * self.body_limit


class _DoorMetrics(Collector):
    """What the HTTP doors turned away, read from their counts at scrape time."""

    def __init__(self, api: ApiContext) -> None:
        self.api = api

    def collect(self) -> Iterator[Metric]:
        attempts = self.api.tokens.attempts
        failures = CounterMetricFamily(
            "postlane_http_auth_failures",
            "Wrong tokens, by door (api: a bearer token; dashboard; login: the login form)",
            labels=["door"],
        )
        throttled = CounterMetricFamily(
            "postlane_http_auth_throttled",
            "Requests refused with 429 because their client failed too often lately, by door",
            labels=["door"],
        )
        for door in _DOORS:
            failures.add_metric([door], attempts.failures[door])
            throttled.add_metric([door], attempts.throttled[door])
        refused = CounterMetricFamily(
            "postlane_http_refused",
            "Requests and connections turned away: too_many_connections (over the cap, all "
            "busy), evicted (idle or unfinished, closed to make room), header_timeout (a "
            "request head not sent in time), busy (request bytes in flight over the budget)",
            labels=["reason"],
        )
        counts = self.api.refusals.counts
        refused.add_metric(["too_many_connections"], counts.get("connections", 0))
        refused.add_metric(["evicted"], counts.get("evicted", 0))
        refused.add_metric(["header_timeout"], counts.get("header_timeouts", 0))
        refused.add_metric(["busy"], self.api.budget.refused)
        yield failures
        yield throttled
        yield refused


_DOORS = ("api", "dashboard", "login")


def install(
    state: State,
    config: Config,
    postlane: AsyncPostlane,
    metrics: Metrics | None = None,
    worker: Worker | None = None,
    limits: HttpLimits | None = None,
) -> ApiContext:
    """Give the API's endpoints, wherever they are mounted, what they need."""
    api = ApiContext.create(config, postlane, metrics, worker, limits)
    state.api = api
    return api


def _context(request: Request) -> ApiContext:
    return cast(ApiContext, request.app.state.api)


Handler = Callable[[Request, Caller], Awaitable[Response]]
#: where a request's hold on the request budget is kept (its ASGI scope)
_RESERVATION = "postlane.reservation"


def endpoint(handler: Handler, scope: Scope | None) -> Callable[[Request], Awaitable[Response]]:
    """A Starlette endpoint running ``handler`` for a caller with ``scope`` (None: anyone),
    answering every refusal and :class:`PostlaneError` as a JSON error."""

    async def run(request: Request) -> Response:
        reservation = Reservation(_context(request).budget)
        request.scope[_RESERVATION] = reservation
        try:
            return await handler(request, _caller(request, scope))
        except ApiError as exc:
            return error_response(exc.status, exc.code, exc.message, exc.headers)
        except StoreUnavailable as exc:
            _context(request).store_health.failed(exc.message)
            return _postlane_error(exc)
        except PostlaneError as exc:
            return _postlane_error(exc)
        except Exception as exc:
            failure = escaped_store_error(exc)
            if failure is None:
                raise
            log.exception("the store let a driver error through on %s", request.url.path)
            _context(request).store_health.failed(failure.message)
            return _postlane_error(failure)
        finally:
            reservation.release()  # the body, parsed or not, is no longer held

    return run


def _caller(request: Request, scope: Scope | None) -> Caller:
    if scope is None:
        return Caller(Scope.ADMIN, None)
    refusal = cross_site(request)
    if refusal is not None:  # a web page the user visits, posting to the API behind its back
        raise ApiError(
            403,
            "cross_site",
            f"the browser says this request comes from another site's page ({refusal}); "
            "the API takes requests from programs, not from web pages",
        )
    try:
        caller = _context(request).tokens.caller(request)
    except TooManyAttempts as exc:
        raise ApiError(
            429,
            "too_many_attempts",
            f"too many wrong tokens from this client: retry after {exc.retry_after} s",
            {"Retry-After": str(exc.retry_after)},
        ) from None
    except Refused as exc:
        raise ApiError(*_REFUSALS[type(exc)]) from None
    if scope is Scope.ADMIN and caller.scope is not Scope.ADMIN:
        raise ApiError(403, "forbidden", "this needs a token with the admin scope")
    return caller


# -- reading requests ------------------------------------------------------------------------------


async def read_body(request: Request, limit: int) -> bytearray:
    """The request body within ``limit`` bytes, the body timeout and the request budget."""
    return await read_within(
        request,
        limit,
        reservation=cast(Reservation, request.scope[_RESERVATION]),
        timeout=_context(request).limits.body_timeout,
    )


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON: ``application/json``, strict JSON (no NaN or Infinity, no number too
    large for a float, no lone surrogate), nesting no deeper than Python's recursion limit."""
    require_media_type(request, JSON_TYPES)
    return parse_json(await read_body(request, limit))


def message_from_json(data: Any, idempotency_header: str | None = None) -> Message:
    """A :class:`Message` from the API's JSON shape (raises :class:`ApiError` on bad shapes;
    the message itself is validated when it is prepared)."""
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_field", "a message must be a JSON object")
    unknown = sorted(set(data) - _MESSAGE_FIELDS)
    if unknown:
        raise ApiError(400, "unknown_field", f"unknown field {unknown[0]!r}")
    headers = data.get("headers") or {}
    if not isinstance(headers, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        raise ApiError(400, "invalid_field", "headers must be an object of strings")
    metadata = data.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise ApiError(400, "invalid_field", "metadata must be an object")
    attachments = _attachments(data.get("attachments") or [])
    with _invalid_field():
        key = optional_string(data.get("idempotency_key"), "idempotency_key")
        return Message(
            sender=optional_string(data.get("from"), "from") or "",
            to=string_list(data.get("to"), "to"),
            cc=string_list(data.get("cc"), "cc"),
            bcc=string_list(data.get("bcc"), "bcc"),
            subject=optional_string(data.get("subject"), "subject"),
            text=optional_string(data.get("text"), "text"),
            html=optional_string(data.get("html"), "html"),
            headers=headers,
            attachments=attachments,
            raw=optional_string(data.get("raw"), "raw"),
            lane=optional_string(data.get("lane"), "lane") or "normal",
            idempotency_key=key or idempotency_header,
            metadata=metadata,
            send_at=_when(data.get("send_at"), "send_at"),
            expires_at=_when(data.get("expires_at"), "expires_at"),
        )


def _when(value: Any, what: str) -> str | float | None:
    """``send_at``/``expires_at`` as JSON gives them: ISO 8601 text or Unix seconds (the
    message checks the rest)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise ApiError(400, "invalid_field", f"{what} must be ISO 8601 text or Unix seconds")


def _attachments(items: Any) -> list[Attachment]:
    if not isinstance(items, list):
        raise ApiError(400, "invalid_field", "attachments must be a list")
    attachments = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("content"), str):
            raise ApiError(
                400,
                "invalid_field",
                "each attachment is {filename, content (base64), content_type}",
            )
        try:
            content = base64.b64decode(item["content"], validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "invalid_field", "attachment content must be base64") from None
        attachments.append(
            Attachment(
                filename=str(item.get("filename") or "attachment"),
                content=content,
                content_type=str(item.get("content_type") or "application/octet-stream"),
            )
        )
    return attachments


def _selector(request: Request, fields: dict[str, Any]) -> Selector:
    """A selector from JSON (or query parameters): every field narrows."""
    try:
        return parse_selector(fields, _context(request).postlane.clock)
    except ValidationError as exc:
        code = "invalid_field" if exc.field in SELECTOR_FIELDS else "unknown_field"
        raise ApiError(400, code, exc.message) from None


def _query_selector(request: Request) -> tuple[Selector, int]:
    """The selector and the limit of a listing's query string."""
    params: dict[str, Any] = {}
    for key in request.query_params:
        if key == "limit":
            continue
        values = request.query_params.getlist(key)
        params[key] = values if key in _REPEATABLE else values[-1]
    if "all" in params:
        params["all"] = params["all"] in ("1", "true", "yes")
    limit_text = request.query_params.get("limit", "100")
    if not limit_text.isdigit() or not 1 <= int(limit_text) <= MAX_LIST:
        raise ApiError(400, "invalid_field", f"limit must be 1 to {MAX_LIST}")
    return _selector(request, params), int(limit_text)


def _flag(data: dict[str, Any], name: str) -> bool:
    value = data.pop(name, False)
    if not isinstance(value, bool):
        raise ApiError(400, "invalid_field", f"{name} must be true or false")
    return value


# -- enqueue and read ------------------------------------------------------------------------------


async def post_message(request: Request, caller: Caller) -> Response:
    api = _context(request)
    data = await read_json(request, api.body_limit)
    message = message_from_json(data, request.headers.get("idempotency-key"))
    prepared = dataclasses.replace(api.postlane.prepare(message), submitter=caller.submitter)
    [result] = await api.postlane.send_prepared([prepared])
    if api.metrics is not None and not result.duplicate:
        api.metrics.enqueued.labels("http").inc()
    return ApiJSON(result.as_json(), status_code=202)


async def post_batch(request: Request, caller: Caller) -> Response:
    api = _context(request)
    data = await read_json(request, api.batch_limit)
    items = data.get("messages") if isinstance(data, dict) else data
    if not isinstance(items, list) or not items:
        raise ApiError(400, "invalid_field", 'send {"messages": [...]} with 1 to 1000 messages')
    if len(items) > MAX_BATCH:
        raise ApiError(413, "batch_too_large", f"at most {MAX_BATCH} messages per batch")
    results: list[dict[str, Any] | None] = [None] * len(items)
    prepared = []
    positions = []
    for index, item in enumerate(items):
        items[index] = None  # its JSON goes as its rendering comes: held once, not twice
        try:
            message = api.postlane.prepare(message_from_json(item))
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
    view = await _context(request).postlane.get(request.path_params["queue_id"], history=True)
    if caller.scope is Scope.SEND and view.submitter != caller.submitter:
        raise NotFound(f"no message with id {view.id}")  # not yours: as if it did not exist
    return ApiJSON(view.as_json())


Listing = Callable[[AsyncPostlane, Selector, int], Awaitable[Sequence[Any]]]


def listing(fetch: Listing) -> Handler:
    """A GET that answers what ``fetch`` finds for the query string's selector, as JSON."""

    async def run(request: Request, caller: Caller) -> Response:
        selector, limit = _query_selector(request)
        found = await fetch(_context(request).postlane, selector, limit)
        return ApiJSON([item.as_json() for item in found])

    return run


list_messages = listing(lambda app, selector, limit: app.messages(selector, limit=limit))
list_dead = listing(lambda app, selector, limit: app.dead_letters(selector, limit=limit))
dead_groups = listing(lambda app, selector, limit: app.dead_groups(selector, limit=limit))


async def get_stats(request: Request, caller: Caller) -> Response:
    return ApiJSON((await _context(request).postlane.stats()).as_json())


# -- operate ---------------------------------------------------------------------------------------


async def post_action(request: Request, caller: Caller) -> Response:
    """flush, hold, release, delete (``/v1/queue/...``), requeue, purge (``/v1/dlq/...``) of
    what a selector picks: ``dry_run`` counts, ``export`` answers with what was removed."""
    app = _context(request).postlane
    action = _action(request)
    data = await read_json(request, 1024 * 1024)
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_field", "send a selector object")
    dry_run = _flag(data, "dry_run")
    export = _flag(data, "export")
    if export and action not in _EXPORTING:
        raise ApiError(400, "invalid_field", "export applies to delete and purge")
    selector = _selector(request, data)
    if not selector.ids and not selector.all and action is not QueueAction.FLUSH:
        raise ApiError(400, "invalid_field", 'give "ids" or "all": true (selectors narrow)')
    counts = await app.summarize(action, selector)
    if dry_run:
        return ApiJSON({"would_touch": [c.as_json() for c in counts]})
    if export:
        return await exported(request, action, selector, sum(c.count for c in counts))
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
    api = _context(request)
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
    api = _context(request)
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


# -- suppressions ----------------------------------------------------------------------------------


async def list_suppressions(request: Request, caller: Caller) -> Response:
    entries = await _context(request).postlane.suppressions(limit=10_000)
    return ApiJSON([e.as_json() for e in entries])


async def add_suppression(request: Request, caller: Caller) -> Response:
    data = await read_json(request, 64 * 1024)
    if not isinstance(data, dict) or not isinstance(data.get("address"), str):
        raise ApiError(
            400,
            "invalid_field",
            'send {"address": ..., "reason": ..., "scope": ..., "expires_at": ..., "detail": ...}',
        )
    unknown = sorted(set(data) - {"address", "reason", "scope", "expires_at", "detail"})
    if unknown:
        raise ApiError(400, "unknown_field", f"unknown field {unknown[0]!r}")
    with _invalid_field():
        reason = optional_string(data.get("reason"), "reason")
        scope = optional_string(data.get("scope"), "scope")
        detail = optional_string(data.get("detail"), "detail")
    for value, what in ((reason, "reason"), (scope, "scope"), (detail, "detail")):
        if value is not None:
            check_text(value, what)  # a ValidationError: 422, as a message's fields
    added = await _context(request).postlane.suppress(
        data["address"],
        reason=reason,
        scope=scope,
        expires_at=_when(data.get("expires_at"), "expires_at"),
        detail=detail,
        source="api",
    )
    return ApiJSON({"address": data["address"], "added": added}, status_code=201 if added else 200)


async def remove_suppression(request: Request, caller: Caller) -> Response:
    address = request.path_params["address"]
    scope = request.query_params.get("scope")
    if not await _context(request).postlane.unsuppress(address, scope=scope):
        raise NotFound(f"{address} is not on the suppression list")
    return ApiJSON({"address": address, "removed": True})


# -- events ----------------------------------------------------------------------------------------


async def list_events(request: Request, caller: Caller) -> Response:
    """``GET /v1/events?after=ID&limit=N&type=T``: the event log in commit order, and the
    cursor to read on from."""
    query = request.query_params
    unknown = sorted(set(query) - {"after", "limit", "type"})
    if unknown:
        raise ApiError(400, "unknown_field", f"unknown parameter {unknown[0]!r}")
    limit_text = query.get("limit", "100")
    if not limit_text.isdigit() or not 1 <= int(limit_text) <= MAX_LIST:
        raise ApiError(400, "invalid_field", f"limit must be 1 to {MAX_LIST}")
    with _invalid_field():
        page = await _context(request).postlane.events(
            query.get("after"), limit=int(limit_text), types=query.getlist("type")
        )
    return ApiJSON(page.as_json())


# -- reports nothing matched ----------------------------------------------------------------------


async def list_unmatched(request: Request, caller: Caller) -> Response:
    limit_text = request.query_params.get("limit", "100")
    if not limit_text.isdigit() or not 1 <= int(limit_text) <= MAX_LIST:
        raise ApiError(400, "invalid_field", f"limit must be 1 to {MAX_LIST}")
    reports = await _context(request).postlane.store.list_unmatched(limit=int(limit_text))
    return ApiJSON([report.as_json() for report in reports])


async def get_unmatched(request: Request, caller: Caller) -> Response:
    text = request.path_params["report_id"]
    if not text.isdigit() or len(text) > 19:
        raise NotFound(f"no unmatched report {text!r}")
    report = await _context(request).postlane.store.get_unmatched(int(text))
    content = (report.content or b"").decode("utf-8", "replace")
    return ApiJSON({**report.as_json(), "content": content})


# -- outbound webhooks (the operator's view) ------------------------------------------------------


def _webhook_endpoints(request: Request) -> Any:
    endpoints = _context(request).postlane.config.webhooks_out
    if not endpoints:
        raise NotFound("no webhook endpoint is configured ([[webhooks.out]])")
    return endpoints


async def list_webhooks(request: Request, caller: Caller) -> Response:
    from postlane.webhooks.operations import endpoint_statuses

    postlane = _context(request).postlane
    statuses = await endpoint_statuses(
        postlane.store, _webhook_endpoints(request), now=postlane.clock.now(),
        sender=postlane.webhooks,
    )  # fmt: skip
    return ApiJSON(statuses)


async def webhook_failures(request: Request, caller: Caller) -> Response:
    from postlane.webhooks.operations import failures

    postlane = _context(request).postlane
    found = await failures(
        postlane.store, _webhook_endpoints(request), sender=postlane.webhooks,
        name=request.path_params["name"],
    )  # fmt: skip
    return ApiJSON(found)


async def webhook_test(request: Request, caller: Caller) -> Response:
    from postlane.webhooks.endpoints import endpoint_named
    from postlane.webhooks.operations import send_test_event

    endpoint = endpoint_named(_webhook_endpoints(request), request.path_params["name"])
    result = await send_test_event(endpoint, now=_context(request).postlane.clock.now())
    return ApiJSON(result.as_json())


async def webhook_replay(request: Request, caller: Caller) -> Response:
    from postlane.webhooks.operations import replay

    data = await read_json(request, 4096) if await _has_body(request) else {}
    if not isinstance(data, dict) or set(data) - {"after"}:
        raise ApiError(400, "invalid_field", 'send {"after": EVENT_ID} or nothing')
    after = data.get("after")
    if after is not None:
        with _invalid_field():
            after = _event_cursor(after)
    postlane = _context(request).postlane
    name = request.path_params["name"]
    await replay(
        postlane.store, _webhook_endpoints(request), name, after=after, now=postlane.clock.now()
    )
    return ApiJSON({"endpoint": name, "replaying_after": None if after is None else str(after)})


async def webhook_resume(request: Request, caller: Caller) -> Response:
    from postlane.webhooks.operations import resume

    postlane = _context(request).postlane
    name = request.path_params["name"]
    await resume(postlane.store, _webhook_endpoints(request), name, now=postlane.clock.now())
    return ApiJSON({"endpoint": name, "resumed": True})


async def _has_body(request: Request) -> bool:
    length = request.headers.get("content-length")
    return length not in (None, "0") or "transfer-encoding" in request.headers


def _event_cursor(value: Any) -> int:
    text = str(value)
    if isinstance(value, bool) or not text.isdigit() or len(text) > 19:
        raise ValidationError(f"after must be an event id, got {value!r}", field="after")
    return int(text)


# -- probes and description ------------------------------------------------------------------------


async def get_metrics(request: Request, caller: Caller) -> Response:
    metrics = _context(request).metrics
    if metrics is None:
        raise ApiError(404, "not_found", "metrics are not enabled")
    body = await metrics.exposition()
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")


async def healthz(request: Request, caller: Caller) -> Response:
    """The process is up (for a load balancer's liveness check)."""
    return ApiJSON({"status": "ok"})


#: how long /readyz waits for the store's small write
READY_TIMEOUT = 5.0


async def readyz(request: Request, caller: Caller) -> Response:
    """The store takes a small write now (a full disk, a corrupted file, a lost server say
    no) and, in serve, the worker runs: for readiness checks."""
    api = _context(request)
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
    config: Config,
    app: AsyncPostlane,
    metrics: Metrics | None = None,
    worker: Worker | None = None,
    *,
    probes_only: bool = False,
    limits: HttpLimits | None = None,
) -> Starlette:
    """The API as a Starlette application (tests drive it with httpx's ASGI transport). With
    ``probes_only`` (``postlane worker --metrics``): /metrics, /healthz and /readyz only.
    ``postlane serve`` adds the dashboard beside it (:func:`postlane.serve.build_app`)."""
    asgi = Starlette(
        routes=api_routes(probes_only=probes_only), exception_handlers=EXCEPTION_HANDLERS
    )
    install(asgi.state, config, app, metrics, worker, limits)
    return asgi


@contextlib.asynccontextmanager
async def start_http(
    config: Config,
    app: AsyncPostlane,
    metrics: Metrics | None = None,
    worker: Worker | None = None,
    *,
    probes_on: str | None = None,
    limits: HttpLimits | None = None,
) -> AsyncIterator[str]:
    """Serve the API until the context exits; yields the address it listens on. With
    ``probes_on`` (HOST:PORT), serve only /metrics, /healthz and /readyz there (a worker).
    ``limits`` default to the configuration's (see :class:`HttpLimits`)."""
    limits = limits or HttpLimits.from_config(config)
    asgi = build_app(config, app, metrics, worker, probes_only=probes_on is not None, limits=limits)
    refusals = cast(ApiContext, asgi.state.api).refusals
    async with serve_http(
        asgi, config, probes_on=probes_on, limits=limits, refusals=refusals
    ) as address:
        yield address
